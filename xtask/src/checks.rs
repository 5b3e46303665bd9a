//! `test`, `callgrind`, `bench` and `perf`: the checks a change must pass and the numbers it
//! is measured by.

use std::process::Command;

use crate::{cargo, root, run, Result};

/// Tools the test suite needs that a fresh machine may lack: (command, Debian package).
/// sshd, ssh and ssh-keygen: the deploy integration test (xtask/tests/deploy.rs).
const TOOLS: [(&str, &str); 4] = [
    ("valgrind", "valgrind"),
    ("/usr/sbin/sshd", "openssh-server"),
    ("ssh", "openssh-client"),
    ("ssh-keygen", "openssh-client"),
];

fn missing_tools() -> Vec<(&'static str, &'static str)> {
    TOOLS
        .iter()
        .copied()
        .filter(|(cmd, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {cmd}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

fn install_tools() -> Result {
    let missing = missing_tools();
    if missing.is_empty() {
        return Ok(());
    }
    let mut pkgs: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
    pkgs.dedup();
    if !is_root() {
        return Err(format!(
            "missing tools; install them with: sudo apt-get install -y {}",
            pkgs.join(" ")
        ));
    }
    run(Command::new("apt-get").arg("update"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&pkgs))
}

pub fn test(args: &[String]) -> Result {
    let quick = args.iter().any(|a| a == "--quick");
    install_tools()?;
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--release",
        "--",
        "-D",
        "warnings",
    ])?;
    // One release build serves the unit tests, the integration tests (both backends) and perf.
    cargo(&["test", "--workspace", "--release"])?;
    if quick {
        return Ok(());
    }
    cargo(&[
        "bench",
        "-p",
        "benches",
        "--",
        "--warm-up-time",
        "0.2",
        "--measurement-time",
        "0.5",
    ])?;
    callgrind()?;
    perf(&["run".into(), "--quick".into()])?;
    if root().join("fuzz/run.sh").exists() {
        run(Command::new("bash").args(["fuzz/run.sh", "10"]))?;
    }
    Ok(())
}

pub fn perf(args: &[String]) -> Result {
    cargo(&["build", "--release", "-p", "relay", "-p", "perf"])?;
    let mut cmd = Command::new(root().join("target/release/perf"));
    run(cmd.args(args))
}

/// Instructions per forwarding decision: the difference between N decisions and none, over N.
pub fn callgrind() -> Result {
    cargo(&[
        "build",
        "--release",
        "-p",
        "benches",
        "--bin",
        "count_forward",
    ])?;
    const N: u64 = 100_000;
    println!("| subscribers | instructions per decision | per egress copy |");
    println!("|---:|---:|---:|");
    for subs in [1u64, 10, 100] {
        let base = instructions(subs, 0)?;
        let loaded = instructions(subs, N)?;
        let per = loaded.saturating_sub(base) as f64 / N as f64;
        println!("| {subs} | {per:.1} | {:.1} |", per / subs as f64);
    }
    Ok(())
}

fn instructions(subs: u64, n: u64) -> Result<u64> {
    let out = Command::new("valgrind")
        .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
        .arg(root().join("target/release/count_forward"))
        .args([subs.to_string(), n.to_string()])
        .output()
        .map_err(|e| format!("valgrind: {e} (apt-get install valgrind)"))?;
    if !out.status.success() {
        return Err(format!(
            "count_forward failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("Collected :"))
        .ok_or("no callgrind total")?;
    line.rsplit(':')
        .next()
        .unwrap_or("")
        .trim()
        .replace(',', "")
        .parse()
        .map_err(|e| format!("callgrind total: {e}"))
}
