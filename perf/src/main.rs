//! `perf`: the end-to-end harness of the relay and its two baselines.
//!
//! ```text
//! perf run [--scenario fanout|rooms|all] [--quick] [--runs N] [--out FILE]
//!          [--contenders relay/uring,relay/batch,ideal,tokio] [--relay-bin PATH]
//!          [--relay-shards N] [--cores LOADGEN,CONTENDER | --cores none] [--priority rt|nice|none]
//! perf ideal-forwarder --listen ADDR --rooms FILE
//! perf tokio-relay --listen ADDR --rooms FILE
//! ```
//!
//! Method and caveats: perf/BENCHMARKING.md.

mod args;
mod baseline;
mod contender;
mod harness;
mod join;
mod json;
mod loadgen;
mod payload;
mod perfctl;
mod procstat;
mod report;
mod search;
mod stats;
mod svg;
mod sys;
mod topology;

use std::path::PathBuf;

use anyhow::{bail, Context as _};

use args::Flags;
use contender::Kind;
use harness::{Config, Priority, Scenario};
use json::Json;

const USAGE: &str = "usage:
  perf run [--scenario fanout|rooms|all] [--quick] [--runs N] [--out FILE]
           (default perf/results.json; target/perf-quick.json with --quick)
           [--contenders relay/uring,relay/batch,ideal,tokio] [--relay-bin PATH]
           [--relay-shards N] [--cores LOADGEN,CONTENDER|none] [--priority rt|nice|none]
  perf ideal-forwarder --listen ADDR --rooms FILE
  perf tokio-relay --listen ADDR --rooms FILE";

fn main() -> std::process::ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match dispatch(&argv) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("perf: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Runs a subcommand; `Ok(false)` means it ran but its check failed.
fn dispatch(argv: &[String]) -> anyhow::Result<bool> {
    let Some((sub, rest)) = argv.split_first() else {
        bail!("{USAGE}");
    };
    match sub.as_str() {
        "run" => run(&Flags::parse(rest, &["--quick"])?),
        "ideal-forwarder" | "tokio-relay" => {
            let f = Flags::parse(rest, &[])?;
            let listen = f.required("--listen")?.parse().context("--listen")?;
            let rooms = f.required("--rooms")?;
            if sub == "ideal-forwarder" {
                baseline::ideal::run(listen, rooms)?;
            } else {
                baseline::tokio_relay::run(listen, rooms)?;
            }
            Ok(true)
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(true)
        }
        other => bail!("unknown subcommand {other:?}\n{USAGE}"),
    }
}

fn run(f: &Flags) -> anyhow::Result<bool> {
    let cfg = config(f)?;
    let command = std::iter::once("perf".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let outcome = harness::run(&cfg)?;
    let json = report::results_json(&cfg, &outcome, machine(), &command);
    if let Some(dir) = cfg.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&cfg.out, format!("{json}\n"))
        .with_context(|| format!("writing {}", cfg.out.display()))?;
    eprintln!("wrote {}", cfg.out.display());
    let picture = cfg.out.with_extension("svg");
    std::fs::write(&picture, svg::chart(&outcome, &command))
        .with_context(|| format!("writing {}", picture.display()))?;
    eprintln!("wrote {}", picture.display());
    // Pass only if every contender that ran delivered packets in every measurement; a relay
    // backend that is unavailable on this machine is reported, not failed.
    let ok = outcome
        .scenarios
        .iter()
        .flat_map(|(_, runs)| runs)
        .all(|r| matches!(r.status, harness::Status::Unavailable(_)) || r.delivered());
    Ok(ok)
}

fn config(f: &Flags) -> anyhow::Result<Config> {
    let scenarios = match f.value("--scenario").unwrap_or("all") {
        "fanout" => vec![Scenario::Fanout],
        "rooms" => vec![Scenario::Rooms],
        "all" => vec![Scenario::Fanout, Scenario::Rooms],
        other => bail!("unknown scenario {other:?}"),
    };
    let contenders = match f.value("--contenders") {
        None => Kind::ALL.to_vec(),
        Some(list) => list
            .split(',')
            .map(|n| Kind::parse(n).with_context(|| format!("unknown contender {n:?}")))
            .collect::<anyhow::Result<_>>()?,
    };
    let cores = match f.value("--cores") {
        Some("none") => None,
        Some(v) => Some(args::parse_pair(v).context("--cores LOADGEN,CONTENDER")?),
        // Two or more CPUs: load generator on CPU 0, contender on CPU 1.
        None => (sys::n_cpus() >= 2).then_some((0, 1)),
    };
    Ok(Config {
        scenarios,
        quick: f.switch("--quick"),
        runs: f.number("--runs")?.unwrap_or(1).max(1),
        // A quick (CI) run must not overwrite the committed results of a full one.
        out: PathBuf::from(f.value("--out").unwrap_or(if f.switch("--quick") {
            "target/perf-quick.json"
        } else {
            "perf/results.json"
        })),
        relay_bin: f
            .value("--relay-bin")
            .map_or_else(harness::default_relay_bin, PathBuf::from),
        relay_shards: f.number("--relay-shards")?.unwrap_or(1).max(1),
        contenders,
        cores,
        priority: match f.value("--priority").unwrap_or("rt") {
            "rt" => Priority::Realtime,
            "nice" => Priority::Nice,
            "none" => Priority::Unchanged,
            other => bail!("unknown --priority {other:?} (rt, nice, none)"),
        },
    })
}

/// What the numbers were measured on.
fn machine() -> Json {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or(String::new(), |(_, m)| m.trim().to_string());
    Json::obj([
        (
            "kernel",
            Json::str(read("/proc/sys/kernel/osrelease").trim()),
        ),
        ("cpu_model", Json::str(model)),
        ("cpus", Json::Num(sys::n_cpus() as f64)),
        (
            "clock_ticks_per_s",
            Json::Num(sys::clock_ticks_per_s() as f64),
        ),
    ])
}
