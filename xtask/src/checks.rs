//! `test`, `callgrind`, `bench` and `perf`: the checks a change must pass and the numbers it
//! is measured by.

use std::process::Command;

use crate::{build_release, cargo, root, run, Result};

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
    // The API documentation builds without a warning (broken or private links, stray HTML).
    run(Command::new(env!("CARGO"))
        .args(["doc", "--workspace", "--no-deps", "--release"])
        .env("RUSTDOCFLAGS", "-D warnings"))?;
    // One release build serves the unit tests, the integration tests (both backends) and perf.
    cargo(&["test", "--workspace", "--release"])?;
    if quick {
        return Ok(());
    }
    bench(&["--warm-up-time", "0.2", "--measurement-time", "0.5"].map(String::from))?;
    callgrind()?;
    perf(&["run".into(), "--quick".into()])?;
    // Two minutes of the long-run soak: memory, descriptors and disk bounded under churn, past
    // a binding TTL and a token renewal (perf/SOAK.md has the hour-long run).
    crate::demo::soak(&SHORT_SOAK.map(String::from))?;
    if root().join("fuzz/run.sh").exists() {
        run(Command::new("bash").args(["fuzz/run.sh", "10"]))?;
    }
    Ok(())
}

/// The soak `cargo xtask test` runs: small log segments and deduplication memory, so that
/// their designed bounds are reached within the warm-up, and tokens that need renewing.
const SHORT_SOAK: [&str; 14] = [
    "--duration",
    "120",
    "--warmup",
    "50",
    "--sample-s",
    "5",
    "--dedup-capacity",
    "1024",
    "--segment-bytes",
    "131072",
    "--token-ttl-s",
    "120",
    "--out",
    "target/soak-short",
];

pub fn perf(args: &[String]) -> Result {
    build_release(&["relay", "perf"])?;
    let mut cmd = Command::new(root().join("target/release/perf"));
    run(cmd.args(args))
}

/// Instructions per forwarding decision: the difference between N decisions and none, over N;
/// then instructions and heap allocations per stored 1:1 chat message (`count_chat`: log
/// written, no fdatasync).
pub fn callgrind() -> Result {
    cargo(&[
        "build",
        "--release",
        "-p",
        "benches",
        "--bin",
        "count_forward",
        "--bin",
        "count_chat",
    ])?;
    const N: u64 = 100_000;
    println!("| subscribers | instructions per decision | per egress copy |");
    println!("|---:|---:|---:|");
    for subs in [1u64, 10, 100] {
        let base = instructions("count_forward", &[], &[subs, 0])?;
        let loaded = instructions("count_forward", &[], &[subs, N])?;
        let per = loaded.saturating_sub(base) as f64 / N as f64;
        println!("| {subs} | {per:.1} | {:.1} |", per / subs as f64);
    }
    // Only the measured loop is counted; two sizes cancel what does not scale with N.
    const M: [u64; 2] = [4_000, 20_000];
    let toggle = ["--collect-atstart=no", "--toggle-collect=count_chat::drive"];
    let small = instructions("count_chat", &toggle, &[M[0]])?;
    let large = instructions("count_chat", &toggle, &[M[1]])?;
    let per = large.saturating_sub(small) as f64 / (M[1] - M[0]) as f64;
    let out = Command::new(root().join("target/release/count_chat"))
        .arg(M[1].to_string())
        .output()
        .map_err(|e| format!("count_chat: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "count_chat failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let allocs = String::from_utf8_lossy(&out.stdout);
    println!();
    println!(
        "stored 1:1 chat message through one shard (engine, log written without fdatasync, \
         commit; no sockets):"
    );
    println!(
        "  {per:.0} instructions per message ({} and {} messages)",
        M[0], M[1]
    );
    println!("  {}", allocs.trim());
    // A steady 1:1 load allocates nothing per message (relay/src/chat/mod.rs); what count_chat
    // counts is the first turns' growth of reused lists and pools, about 240 in 20,000 messages.
    let per_msg: f64 = allocs
        .rsplit("per message=")
        .next()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("count_chat printed no allocation count: {allocs}"))?;
    if per_msg > MAX_CHAT_ALLOCS_PER_MSG {
        return Err(format!(
            "the chat path allocates {per_msg} times per message (at most \
             {MAX_CHAT_ALLOCS_PER_MSG}): a per-message allocation came back"
        ));
    }
    Ok(())
}

/// See [`callgrind`].
const MAX_CHAT_ALLOCS_PER_MSG: f64 = 0.05;

fn instructions(bin: &str, valgrind_args: &[&str], args: &[u64]) -> Result<u64> {
    let out = Command::new("valgrind")
        .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
        .args(valgrind_args)
        .arg(root().join("target/release").join(bin))
        .args(args.iter().map(u64::to_string))
        .output()
        .map_err(|e| format!("valgrind: {e} (apt-get install valgrind)"))?;
    if !out.status.success() {
        return Err(format!(
            "{bin} failed: {}",
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

/// `cargo xtask bench [CRITERION ARGS]`: the criterion benches, then one table of every
/// benchmark's median (from criterion's `estimates.json`) in `target/criterion/SUMMARY.md`.
pub fn bench(args: &[String]) -> Result {
    let mut cmd: Vec<&str> = vec!["bench", "-p", "benches"];
    if !args.is_empty() {
        cmd.push("--");
        cmd.extend(args.iter().map(String::as_str));
    }
    cargo(&cmd)?;
    let dir = root().join("target/criterion");
    let mut rows = Vec::new();
    collect_estimates(&dir, &dir, &mut rows);
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let mut md = String::from("| benchmark | median | 95% interval |\n|---|---:|---:|\n");
    for (name, median, lo, hi) in &rows {
        md.push_str(&format!(
            "| {name} | {} | {} - {} |\n",
            duration(*median),
            duration(*lo),
            duration(*hi)
        ));
    }
    let out = dir.join("SUMMARY.md");
    std::fs::write(&out, &md).map_err(|e| format!("{}: {e}", out.display()))?;
    print!("{md}");
    eprintln!("xtask: wrote {}", out.display());
    Ok(())
}

/// Every `<bench>/new/estimates.json` under `dir`: (name, median, low, high) in ns.
fn collect_estimates(
    base: &std::path::Path,
    dir: &std::path::Path,
    out: &mut Vec<(String, f64, f64, f64)>,
) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() && p.file_name().is_some_and(|n| n != "report") {
            let est = p.join("new/estimates.json");
            if let Ok(text) = std::fs::read_to_string(&est) {
                if let Some((m, lo, hi)) = median_of(&text) {
                    let name = p
                        .strip_prefix(base)
                        .map_or_else(|_| p.display().to_string(), |r| r.display().to_string());
                    out.push((name, m, lo, hi));
                }
            } else {
                collect_estimates(base, &p, out);
            }
        }
    }
}

/// The median's point estimate and confidence bounds from criterion's estimates.json (a
/// fixed layout: `"median":{"confidence_interval":{...,"lower_bound":L,"upper_bound":U},
/// "point_estimate":P,...}`), read without a JSON library.
fn median_of(json: &str) -> Option<(f64, f64, f64)> {
    let m = &json[json.find("\"median\":")?..];
    let num = |key: &str| -> Option<f64> {
        let rest = &m[m.find(key)? + key.len()..];
        let end = rest.find([',', '}'])?;
        rest[..end].trim().parse().ok()
    };
    Some((
        num("\"point_estimate\":")?,
        num("\"lower_bound\":")?,
        num("\"upper_bound\":")?,
    ))
}

/// Nanoseconds in the unit that reads best.
fn duration(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} us", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

#[cfg(test)]
mod bench_tests {
    use super::*;

    #[test]
    fn reads_the_median_of_a_criterion_estimate() {
        let json = r#"{"mean":{"confidence_interval":{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":2.0},"point_estimate":1.5,"standard_error":0.1},"median":{"confidence_interval":{"confidence_level":0.95,"lower_bound":444.4,"upper_bound":445.3},"point_estimate":444.8,"standard_error":0.2}}"#;
        assert_eq!(median_of(json), Some((444.8, 444.4, 445.3)));
        assert_eq!(median_of("{}"), None);
        assert_eq!(duration(444.8), "444.8 ns");
        assert_eq!(duration(40_100.0), "40.10 us");
    }
}
