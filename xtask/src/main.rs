//! `cargo xtask <verb>`: the one entry point for people. Standard library only, so it compiles
//! in seconds.
//!
//! - `demo [--duration S] [--rooms N] [--participants N] [--keep-running]`: the local demo,
//!   ctl and a relay with simulated participants and a summary table (demo/).
//! - `up [--relays N] [--shards N] [--ctl N]`: ctl (N on Redis) and N linked relays (namespaces
//!   as root) until Ctrl-C.
//! - `soak [--duration 1h] [ARGS]`: ctl and relays under churn for a long run, sampled into a
//!   CSV and an SVG; fails if memory, descriptors or disk kept growing (perf/SOAK.md).
//! - `test [--quick]`: format check, clippy and rustdoc (warnings denied), every unit and integration test
//!   (both I/O backends), a short fuzz smoke run, benches and the perf harness at a tiny scale.
//! - `callgrind`: user-space instructions per forwarding decision and per stored 1:1 chat
//!   message (and heap allocations per message), counted with valgrind.
//! - `bench`: the criterion benches and a table of their medians (target/criterion/SUMMARY.md).
//!   `perf [ARGS]`: the end-to-end harness (JSON and an SVG chart beside it).
//! - `dist`: the release tarball; `deploy --inventory FILE`: install it over ssh and roll the
//!   relays one at a time; `tune --check | --apply`: host tuning (README.md, section Deploy).

mod checks;
mod demo;
mod deploy;
mod dist;
mod inventory;
mod ssh;
mod tune;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use checks::{callgrind, perf, test};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo::demo(&args[1..]),
        Some("up") => demo::up(&args[1..]),
        Some("soak") => demo::soak(&args[1..]),
        Some("dist") => dist::dist(&args[1..]),
        Some("deploy") => deploy::deploy(&args[1..]),
        Some("tune") => tune::tune(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("callgrind") => callgrind(),
        Some("bench") => checks::bench(&args[1..]),
        Some("perf") => perf(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask demo [ARGS] | up [ARGS] | soak [ARGS] | test [--quick] | callgrind | bench \
                 | perf [ARGS] | dist | deploy --inventory FILE | tune --check|--apply"
            );
            Err("unknown or missing verb".into())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

pub type Result<T = ()> = std::result::Result<T, String>;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn run(cmd: &mut Command) -> Result {
    eprintln!("xtask: $ {cmd:?}");
    let status = cmd
        .current_dir(root())
        .status()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}"))
    }
}

pub fn cargo(args: &[&str]) -> Result {
    run(Command::new(env!("CARGO")).args(args))
}

/// `cargo build --release -p P ...` for each of `packages`.
pub fn build_release(packages: &[&str]) -> Result {
    let mut args = vec!["build", "--release"];
    for p in packages {
        args.extend(["-p", p]);
    }
    cargo(&args)
}
