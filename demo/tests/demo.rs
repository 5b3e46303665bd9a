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
