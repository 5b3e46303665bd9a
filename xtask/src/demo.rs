//! `demo` and `up`: build the release binaries, then hand over to the `demo` binary, which
//! runs ctl and relays as real processes (see demo/src/main.rs).

use std::process::Command;

use crate::{build_release, root, run, Result};

fn build() -> Result {
    build_release(&["relay", "ctl", "demo"])
}

/// `cargo xtask demo [ARGS]`: the local demo with a summary table; fails if a check failed.
pub fn demo(args: &[String]) -> Result {
    build()?;
    run(Command::new(root().join("target/release/demo"))
        .arg("run")
        .args(args))
}

/// `cargo xtask up [--relays N] [--shards N] [--ctl N]`: ctl (or N on Redis) and N relays
/// until Ctrl-C.
pub fn up(args: &[String]) -> Result {
    build()?;
    run(Command::new(root().join("target/release/demo"))
        .arg("up")
        .args(args))
}

/// `cargo xtask soak [--duration 1h] [ARGS]`: the long run with churn (demo/src/soak.rs); the
/// CSV and the plot go to target/soak unless `--out` says otherwise.
pub fn soak(args: &[String]) -> Result {
    build()?;
    run(Command::new(root().join("target/release/demo"))
        .arg("soak")
        .args(args))
}
