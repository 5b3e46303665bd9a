//! The demo as `cargo xtask demo` runs it: real ctl and relay processes, a short run, every
//! check passing and nothing left behind; and clear errors for bad arguments.

use std::path::PathBuf;
use std::process::Command;

/// The newest modification time of any file under `dir`.
fn newest(dir: &std::path::Path) -> std::time::SystemTime {
    let mut t = std::time::UNIX_EPOCH;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let m = if p.is_dir() {
            newest(&p)
        } else {
            e.metadata().and_then(|m| m.modified()).unwrap_or(t)
        };
        t = t.max(m);
    }
    t
}

/// The demo runs the ctl and relay binaries beside it. `cargo test --workspace` builds them;
/// a test of the demo alone must not run them stale (it cannot build them itself: cargo holds
/// the build lock while tests run), so it refuses with the command to run.
fn demo() -> Command {
    let demo = PathBuf::from(env!("CARGO_BIN_EXE_demo"));
    let dir = demo.parent().expect("a directory").to_path_buf();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for (bin, srcs) in [
        ("relay", &["relay/src", "proto/src"][..]),
        ("ctl", &["ctl/src", "proto/src"][..]),
    ] {
        let built = std::fs::metadata(dir.join(bin)).and_then(|m| m.modified());
        let source = srcs.iter().map(|s| newest(&root.join(s))).max().unwrap();
        assert!(
            built.as_ref().is_ok_and(|b| *b >= source),
            "{bin} is missing or older than its sources; run `cargo build --release -p relay -p ctl` \
             (or `cargo test --workspace --release`) first"
        );
    }
    Command::new(demo)
}

#[test]
fn a_short_demo_passes_every_check_and_cleans_up() {
    let out = demo()
        .args([
            "run",
            "--duration",
            "3",
            "--rooms",
            "2",
            "--participants",
            "3",
        ])
        .output()
        .expect("demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
    assert!(stdout.contains("| chat messages lost "), "{stdout}");
    let lost = stdout
        .lines()
        .find(|l| l.starts_with("| chat messages lost"))
        .and_then(|l| l.split('|').nth(2))
        .map(str::trim);
    assert_eq!(lost, Some("0"), "{stdout}");
    // Its temporary directory is gone.
    let dir = stderr
        .lines()
        .find_map(|l| l.split("data in ").nth(1))
        .expect("the demo names its directory");
    assert!(
        !std::path::Path::new(dir.trim()).exists(),
        "{dir} left behind"
    );
}

#[test]
fn bad_arguments_are_refused_with_a_message() {
    for args in [
        &["--rooms", "0"][..],
        &["--participants", "1"],
        &["--duration", "soon"],
        &["--frobnicate"],
    ] {
        let out = demo().args(args).output().expect("demo runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(stderr.contains("demo: error:"), "{args:?}: {stderr}");
    }
}

/// `up` starts ctl and the relays, prints how to connect, and on SIGINT stops them all and
/// removes its files (and its network namespaces, which it creates when run as root).
#[test]
fn up_serves_until_interrupted_then_cleans_up() {
    use std::io::{BufRead, BufReader};
    let mut child = demo()
        .args(["up", "--relays", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("demo up starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for line in lines.by_ref() {
        let line = line.unwrap();
        let done = line.contains("Ctrl-C stops everything");
        seen.push(line);
        if done {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no ready message: {seen:?}"
        );
    }
    let text = seen.join("\n");
    assert_eq!(text.matches("relay:   ready ").count(), 2, "{text}");
    let ctl = text
        .split("ctl:     http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("ctl's address")
        .to_string();
    let dir = text
        .split("data in ")
        .nth(1)
        .and_then(|r| r.lines().next())
        .expect("the data directory")
        .trim()
        .to_string();
    let namespaces: Vec<String> = text
        .split_once("own network namespace (")
        .map(|(_, r)| r.split(')').next().unwrap_or(""))
        .map(|l| l.split(", ").map(String::from).collect())
        .unwrap_or_default();
    // ctl answers and counts both relays alive.
    let mut s = std::net::TcpStream::connect(&ctl).expect("ctl reachable");
    use std::io::{Read, Write};
    write!(
        s,
        "GET /health HTTP/1.1\r\nHost: ctl\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut health = String::new();
    s.read_to_string(&mut health).unwrap();
    assert!(health.contains("\"relays_alive\":2"), "{health}");
    // Ctrl-C, as a person would stop it.
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "up exited with {status}");
    assert!(!std::path::Path::new(&dir).exists(), "{dir} left behind");
    let left = Command::new("ip").args(["netns", "list"]).output();
    if let Ok(out) = left {
        let list = String::from_utf8_lossy(&out.stdout);
        for ns in &namespaces {
            assert!(!list.contains(ns.as_str()), "namespace {ns} left behind");
        }
    }
}
