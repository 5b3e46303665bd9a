//! The demo as `cargo xtask demo` runs it: real ctl and relay processes, a short run, every
//! check passing and nothing left behind; and clear errors for bad arguments.

use std::path::PathBuf;
use std::process::Command;

/// The demo needs the ctl and relay binaries beside it; `cargo test --workspace` builds them,
/// and this builds them when the demo's tests run alone.
fn demo() -> Command {
    let demo = PathBuf::from(env!("CARGO_BIN_EXE_demo"));
    let dir = demo.parent().expect("a directory").to_path_buf();
    if !dir.join("relay").exists() || !dir.join("ctl").exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "relay", "-p", "ctl"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().expect("cargo").success(),
            "building relay and ctl"
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
