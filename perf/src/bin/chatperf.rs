//! `chatperf`: the chat relay against NATS core and Redis pub/sub, and its memory per idle
//! connection. Method and numbers: perf/CHAT_RESULTS.md.
//!
//! ```text
//! chatperf run [--users N] [--seconds S] [--size B] [--window W] [--threads T]
//!              [--shards N] [--io batch|uring] [--relay-bin PATH] [--rate R] [--inline-sync] [--no-sync] [--split-cores] [--quick]
//! chatperf idle-memory [--conns N] [--shards N] [--io batch|uring] [--timeout-s S] [--sources K] [--relay-bin PATH]
//! chatperf ab --base PATH [--rounds N] [--users N] [--seconds S] [--shards N] [--io batch|uring]
//! chatperf fsync [--writers N] [--size B] [--syncs N]
//! chatperf cross [--rounds N] [--users N] [--seconds S] [--io batch|uring]
//! ```

#[path = "../chatperf/idle.rs"]
mod idle;
#[path = "../chatperf/load.rs"]
mod load;
#[path = "../chatperf/servers.rs"]
mod servers;
#[path = "../chatperf/wire.rs"]
mod wire;
// Network namespaces for `cross` (as root), shared with `cargo xtask up`.
#[allow(dead_code)]
#[path = "../../../demo/src/netns.rs"]
mod netns;
// Shared with `perf`, which also uses the tick-based user/system split.
#[allow(dead_code)]
#[path = "../procstat.rs"]
mod procstat;

use anyhow::{bail, Context as _};
use load::{LoadCfg, LoadResult, Target};
use std::cell::Cell;
use std::path::PathBuf;
use std::time::Duration;

const USAGE: &str = "usage:
  chatperf run [--users N] [--seconds S] [--size B] [--window W] [--threads T]
               [--shards N] [--io batch|uring] [--relay-bin PATH] [--rate R] [--inline-sync] [--no-sync] [--split-cores] [--quick]
  chatperf idle-memory [--conns N] [--shards N] [--io batch|uring] [--timeout-s S] [--sources K] [--relay-bin PATH]
  chatperf ab --base PATH [--rounds N] [--users N] [--seconds S] [--shards N] [--io batch|uring]
  chatperf fsync [--writers N] [--size B] [--syncs N]
  chatperf cross [--rounds N] [--users N] [--seconds S] [--io batch|uring]";

/// `--name value` flags.
struct Flags(Vec<(String, Option<String>)>);

impl Flags {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut v = Vec::new();
        let mut it = args.iter().peekable();
        while let Some(a) = it.next() {
            let Some(name) = a.strip_prefix("--") else {
                bail!("unexpected argument {a:?}\n{USAGE}");
            };
            let value = match it.peek() {
                Some(n) if !n.starts_with("--") => it.next().cloned(),
                _ => None,
            };
            v.push((name.to_string(), value));
        }
        Ok(Self(v))
    }

    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _)| n == name)
    }

    fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> anyhow::Result<T> {
        match self.0.iter().rev().find(|(n, _)| n == name) {
            None => Ok(default),
            Some((_, None)) => bail!("--{name} needs a value"),
            Some((_, Some(v))) => v
                .parse()
                .map_err(|_| anyhow::anyhow!("bad value {v:?} for --{name}")),
        }
    }

    fn check(&self, known: &[&str]) -> anyhow::Result<()> {
        for (n, _) in &self.0 {
            if !known.contains(&n.as_str()) {
                bail!("unknown flag --{n}\n{USAGE}");
            }
        }
        Ok(())
    }
}

fn relay_bin(flags: &Flags) -> anyhow::Result<PathBuf> {
    let p: String = flags.get("relay-bin", String::new())?;
    let p = if p.is_empty() {
        std::env::current_exe()?
            .parent()
            .context("exe directory")?
            .join("relay")
    } else {
        PathBuf::from(p)
    };
    if !p.is_file() {
        bail!(
            "relay binary {} not found (cargo build --release -p relay, or --relay-bin)",
            p.display()
        );
    }
    Ok(p)
}

struct Row {
    name: String,
    persist: &'static str,
    offered: Option<f64>,
    result: Result<LoadResult, String>,
    rec_per_sync: Option<f64>,
    /// Log records per entry the relay accepted (messages and receipts), same window.
    rec_per_entry: Option<f64>,
    /// Cores the server and this load generator used over the measured window.
    cores: Option<(f64, f64)>,
    /// The relay's log over the measured window: bytes written to storage per second, and
    /// fdatasyncs (commits) per second.
    disk: Option<(f64, f64)>,
    /// Per commit over the measured window: microseconds of fdatasync, and microseconds the
    /// batch was held from hand-off to release.
    commit: Option<(f64, f64)>,
}

/// CPU time (user + system, all threads, exited ones included) of the server and of this
/// process, at a time.
#[derive(Clone, Copy)]
struct CpuMark {
    server_s: f64,
    own_s: f64,
    at: std::time::Instant,
}

impl CpuMark {
    fn now(server: u32) -> Option<Self> {
        Some(Self {
            server_s: procstat::cpu_seconds(server)?,
            own_s: procstat::cpu_seconds(std::process::id())?,
            at: std::time::Instant::now(),
        })
    }

    /// Cores used by the server and by this process from `a` to `b`.
    fn cores(a: Option<Self>, b: Option<Self>) -> Option<(f64, f64)> {
        let (a, b) = (a?, b?);
        let wall = b.at.duration_since(a.at).as_secs_f64();
        (wall > 0.0).then(|| ((b.server_s - a.server_s) / wall, (b.own_s - a.own_s) / wall))
    }
}

fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2}M", r / 1e6)
    } else if r >= 1e3 {
        format!("{:.1}k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<26} {:<12} {:>9} {:>12} {:>9} {:>9} {:>9} {:>9} {:>7} {:>11}",
        "contender",
        "persistence",
        "offered/s",
        "delivered/s",
        "p50 us",
        "p99 us",
        "max us",
        "rec/sync",
        "errors",
        "lag p99 us"
    );
    for r in rows {
        let offered = r.offered.map_or("max".into(), fmt_rate);
        match &r.result {
            Ok(res) => {
                let (p50, p99, max) = wire::percentiles_us(&res.hist);
                let lag = if res.lag.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:.0}", wire::percentiles_us(&res.lag).1)
                };
                println!(
                    "{:<26} {:<12} {:>9} {:>12} {:>9.0} {:>9.0} {:>9.0} {:>9} {:>7} {:>11}",
                    r.name,
                    r.persist,
                    offered,
                    fmt_rate(res.rate),
                    p50,
                    p99,
                    max,
                    r.rec_per_sync.map_or("-".into(), |x| format!("{x:.1}")),
                    res.errors,
                    lag
                );
            }
            Err(e) => println!(
                "{:<26} {:<12} {:>9} unavailable: {e}",
                r.name, r.persist, offered
            ),
        }
    }
    println!();
    for r in rows {
        if let (Some((server, own)), Ok(res)) = (r.cores, &r.result) {
            let per_msg = if res.rate > 0.0 {
                format!("{:.2}", server * 1e6 / res.rate)
            } else {
                "-".into()
            };
            println!(
                "{}: server {server:.2} cores, load generator {own:.2} cores, server CPU per \
                 delivered message {per_msg} us",
                r.name
            );
        }
    }
    println!();
    for r in rows {
        if let Some((bytes_per_s, syncs_per_s)) = r.disk {
            let per_sync = if syncs_per_s > 0.0 {
                format!("{:.0}", bytes_per_s / syncs_per_s / 1024.0)
            } else {
                "-".into()
            };
            println!(
                "{}: log written to storage {:.1} MB/s (write_bytes of /proc/<pid>/io), {:.0} \
                 fdatasyncs/s, {per_sync} KiB per fdatasync",
                r.name,
                bytes_per_s / 1e6,
                syncs_per_s
            );
        }
    }
    println!();
    for r in rows {
        if let Some(res) = r
            .result
            .as_ref()
            .ok()
            .filter(|res| !res.sent_hist.is_empty())
        {
            let (p50, p99, _) = wire::percentiles_us(&res.sent_hist);
            println!(
                "{}: send-to-SENT p50 {p50:.0} us, p99 {p99:.0} us ({} SENTs; the time to \
                 durability as the author sees it)",
                r.name,
                res.sent_hist.len()
            );
        }
    }
    println!();
    for r in rows {
        if let Some((sync_us, held_us)) = r.commit {
            println!(
                "{}: per commit, fdatasync {sync_us:.0} us, batch held {held_us:.0} us from its \
                 hand-off to the sync thread to its release (relay_chat_sync_us_total and \
                 relay_chat_commit_us_total / relay_chat_commits_total)",
                r.name
            );
        }
    }
    println!();
    for r in rows {
        if let Some(x) = r.rec_per_entry {
            println!(
                "{}: {x:.2} log records per accepted entry (relay_chat_records_total / \
                 relay_chat_accepted_total over the measured window)",
                r.name
            );
        }
    }
}

/// How the relay under test is started, the same for each of its rows.
struct RelaySetup<'a> {
    bin: &'a std::path::Path,
    io: &'a str,
    chat_toml: String,
    shards: u16,
    /// What SENT means: "fdatasync", or "write only" under `--no-sync`.
    persist: &'static str,
}

fn relay_row(setup: &RelaySetup<'_>, cfg: LoadCfg, base: u64, name: &str) -> Row {
    let RelaySetup {
        bin,
        io,
        ref chat_toml,
        shards,
        persist,
    } = *setup;
    let offered = cfg.rate_per_pair.map(|r| r * cfg.pairs as f64);
    let (mut rec_per_sync, mut rec_per_entry, mut cores, mut disk) = (None, None, None, None);
    let mut commit = None;
    let result = (|| -> anyhow::Result<LoadResult> {
        let relay = servers::Relay::start(bin, io, shards, chat_toml)?;
        let pid = relay.proc.pid();
        let (cpu0, cpu1) = (Cell::new(None), Cell::new(None));
        let (written0, written1) = (Cell::new(None), Cell::new(None));
        let home = (std::net::Ipv4Addr::LOCALHOST, relay.chat_port);
        let target = Target::Relay {
            homes: [home, home],
            shards: relay.shards,
            key: Box::new(relay.key.clone()),
            base,
        };
        let before = Cell::new(servers::LogCounters::default());
        let after = Cell::new(servers::LogCounters::default());
        let res = load::run(
            &target,
            cfg,
            || {
                before.set(relay.log_counters().unwrap_or_default());
                written0.set(relay.write_bytes().ok());
                cpu0.set(CpuMark::now(pid));
            },
            || {
                cpu1.set(CpuMark::now(pid));
                written1.set(relay.write_bytes().ok());
                after.set(relay.log_counters().unwrap_or_default());
            },
        )?;
        cores = CpuMark::cores(cpu0.get(), cpu1.get());
        let (b, a) = (before.get(), after.get());
        let (r0, c0, a0) = (b.records, b.commits, b.accepted);
        let (r1, c1, a1) = (a.records, a.commits, a.accepted);
        if c1 > c0 {
            let n = (c1 - c0) as f64;
            rec_per_sync = Some((r1 - r0) as f64 / n);
            commit = Some((
                a.sync_us.saturating_sub(b.sync_us) as f64 / n,
                a.commit_us.saturating_sub(b.commit_us) as f64 / n,
            ));
        }
        if a1 > a0 {
            rec_per_entry = Some((r1 - r0) as f64 / (a1 - a0) as f64);
        }
        if let (Some(w0), Some(w1), Some(m0), Some(m1)) =
            (written0.get(), written1.get(), cpu0.get(), cpu1.get())
        {
            let wall = m1.at.duration_since(m0.at).as_secs_f64();
            disk = Some((
                w1.saturating_sub(w0) as f64 / wall,
                c1.saturating_sub(c0) as f64 / wall,
            ));
        }
        Ok(res)
    })()
    .map_err(|e| format!("{e:#}"));
    Row {
        name: name.into(),
        persist,
        offered,
        result,
        rec_per_sync,
        rec_per_entry,
        cores,
        disk,
        commit,
    }
}

fn pubsub_row(which: &str, cfg: LoadCfg, name: &str) -> Row {
    let offered = cfg.rate_per_pair.map(|r| r * cfg.pairs as f64);
    let mut cores = None;
    let result = (|| -> anyhow::Result<LoadResult> {
        let bin_name = if which == "nats" {
            "nats-server"
        } else {
            "redis-server"
        };
        let bin = servers::find_bin(bin_name)
            .with_context(|| format!("{bin_name} not installed (apt-get install -y {bin_name})"))?;
        let (server, target) = match which {
            "nats" => {
                let s = servers::PubSub::nats(&bin)?;
                let port = s.port;
                (s, Target::Nats(port))
            }
            "streams" => {
                let s = servers::PubSub::redis_durable(&bin)?;
                let port = s.port;
                (s, Target::RedisStreams(port))
            }
            _ => {
                let s = servers::PubSub::redis(&bin)?;
                let port = s.port;
                (s, Target::Redis(port))
            }
        };
        let (cpu0, cpu1) = (Cell::new(None), Cell::new(None));
        let pid = server.pid();
        let res = load::run(
            &target,
            cfg,
            || cpu0.set(CpuMark::now(pid)),
            || cpu1.set(CpuMark::now(pid)),
        )?;
        cores = CpuMark::cores(cpu0.get(), cpu1.get());
        drop(server);
        Ok(res)
    })()
    .map_err(|e| format!("{e:#}"));
    Row {
        name: name.into(),
        persist: if which == "streams" {
            "fsync always"
        } else {
            "none"
        },
        offered,
        result,
        rec_per_sync: None,
        rec_per_entry: None,
        cores,
        disk: None,
        commit: None,
    }
}

/// The cost of one fdatasync where the relay's logs go: 100 appends of 4 KiB, each synced.
fn fsync_probe() -> anyhow::Result<(f64, f64)> {
    use std::io::Write as _;
    let dir = servers::temp_dir("fsync")?;
    let mut f = std::fs::File::create(dir.join("probe"))?;
    let mut h = wire::new_hist();
    let block = [7u8; 4096];
    for _ in 0..100 {
        let t = std::time::Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        let _ = h.record((t.elapsed().as_nanos() as u64).max(1));
    }
    drop(f);
    let _ = std::fs::remove_dir_all(&dir);
    let (p50, p99, _) = wire::percentiles_us(&h);
    Ok((p50, p99))
}

fn cmd_run(flags: &Flags) -> anyhow::Result<bool> {
    flags.check(&[
        "users",
        "seconds",
        "size",
        "window",
        "threads",
        "shards",
        "io",
        "relay-bin",
        "quick",
        "rate",
        "inline-sync",
        "no-sync",
        "split-cores",
    ])?;
    let quick = flags.has("quick");
    let users: usize = flags.get("users", if quick { 8 } else { 200 })?;
    let seconds: f64 = flags.get("seconds", if quick { 1.0 } else { 5.0 })?;
    let size: usize = flags.get("size", 100)?;
    let window: usize = flags.get("window", 32)?;
    let threads: usize = flags.get("threads", 2)?;
    let shards: u16 = flags.get("shards", 2)?;
    let io: String = flags.get("io", "batch".to_string())?;
    // The per-session request limit (default 1,000/s) is an abuse guard, not a capacity limit;
    // it is raised so that it does not cap a benchmark sender. Durability stays on.
    let sync_thread = !flags.has("inline-sync");
    // `--no-sync` (a diagnosis: what the relay costs without the disk) writes the log but
    // never fdatasyncs it, so SENT no longer means durable.
    let sync = !flags.has("no-sync");
    let chat_toml = format!("sync = {sync}\nmsgs_per_s = 1000000\nsync_thread = {sync_thread}");
    if users < 2 || size < 16 || window == 0 || seconds <= 0.0 || seconds > 600.0 {
        bail!("need --users >= 2, --size >= 16, --window >= 1, 0 < --seconds <= 600");
    }
    let bin = relay_bin(flags)?;
    // `--split-cores`: every server on the first CPU this process may use, the load generator
    // on the others, so that neither steals the other's core (the default shares them all).
    let split = if flags.has("split-cores") {
        let cpus = servers::own_cpus()?;
        if cpus.len() < 2 {
            bail!("--split-cores needs at least 2 CPUs, this process may use {cpus:?}");
        }
        servers::set_server_cpus(cpus[..1].to_vec())?;
        servers::pin_self(&cpus[1..])?;
        Some((cpus[..1].to_vec(), cpus[1..].to_vec()))
    } else {
        None
    };
    let cfg = LoadCfg {
        pairs: users / 2,
        window,
        size,
        warmup: Duration::from_secs_f64(if quick { 0.3 } else { 1.0 }),
        measure: Duration::from_secs_f64(seconds),
        rate_per_pair: None,
        threads,
    };
    println!(
        "chatperf run: {} users ({} sender->receiver pairs, 1:1), {size}-byte bodies, at most \
         {window} in flight per sender, {threads} client threads, {:.1} s warm-up + {seconds} s \
         measured per contender; relay: io={io}, {shards} shards, [chat] sync = {sync}, \
         sync_thread = {sync_thread}",
        cfg.pairs * 2,
        cfg.pairs,
        cfg.warmup.as_secs_f64()
    );
    if let Some((server, client)) = &split {
        println!(
            "--split-cores: servers on CPU {server:?}, the load generator on CPU {client:?} \
             (nats-server's Go runtime sizes GOMAXPROCS to its 1 CPU)"
        );
    }
    match fsync_probe() {
        Ok((p50, p99)) => println!(
            "fdatasync of a 4 KiB append in {}: p50 {p50:.0} us, p99 {p99:.0} us (100 samples)",
            std::env::temp_dir().display()
        ),
        Err(e) => println!("fdatasync probe failed: {e:#}"),
    }
    let setup = RelaySetup {
        bin: &bin,
        io: &io,
        chat_toml,
        shards,
        persist: if sync { "fdatasync" } else { "write only" },
    };
    let mut rows = vec![relay_row(&setup, cfg, 0, "relay chat (max)")];
    rows.push(pubsub_row("nats", cfg, "nats-server core (max)"));
    rows.push(pubsub_row("redis", cfg, "redis pub/sub (max)"));
    rows.push(pubsub_row("streams", cfg, "redis streams (max)"));
    let relay_max = rows[0].result.as_ref().map_or(0.0, |r| r.rate);
    // `--rate R` replaces "half of the relay's maximum" by R messages/s in total.
    let paced: f64 = flags.get("rate", relay_max / 2.0)?;
    if paced > 0.0 {
        let half = LoadCfg {
            rate_per_pair: Some(paced / cfg.pairs as f64),
            ..cfg
        };
        rows.push(relay_row(
            &setup,
            half,
            1 << 40,
            if flags.has("rate") {
                "relay chat (--rate)"
            } else {
                "relay chat (half load)"
            },
        ));
        rows.push(pubsub_row("nats", half, "nats-server (same rate)"));
        rows.push(pubsub_row("redis", half, "redis pub/sub (same rate)"));
        rows.push(pubsub_row("streams", half, "redis streams (same rate)"));
    }
    println!();
    print_table(&rows);
    println!();
    let rate = |i: usize| rows[i].result.as_ref().map(|r| r.rate).unwrap_or(0.0);
    for (i, name) in [
        (1, "NATS core"),
        (2, "Redis pub/sub"),
        (3, "Redis Streams (appendfsync always)"),
    ] {
        if rate(i) > 0.0 {
            println!("relay / {name} throughput: {:.2}x", rate(0) / rate(i));
        }
    }
    if rate(1) > 0.0 {
        let ratio = rate(0) / rate(1);
        println!(
            "target throughput >= 1.0x NATS core with durability on: {} ({ratio:.2}x)",
            if ratio >= 1.0 { "met" } else { "NOT met" }
        );
    }
    if rate(3) > 0.0 {
        let ratio = rate(0) / rate(3);
        println!(
            "target throughput >= 3x Redis Streams, both durable: {} ({ratio:.2}x)",
            if ratio >= 3.0 { "met" } else { "NOT met" }
        );
    }
    if let (Some(Ok(h)), false) = (rows.get(4).map(|r| r.result.as_ref()), flags.has("rate")) {
        let (_, p99, _) = wire::percentiles_us(&h.hist);
        println!(
            "target p99 <= 2 ms at half of the maximum load: {} (p99 {:.0} us)",
            if p99 <= 2000.0 { "met" } else { "NOT met" },
            p99
        );
    }
    for r in &rows {
        if let Ok(res) = &r.result {
            if let Some(e) = &res.first_error {
                println!("{}: first error: {e}", r.name);
            }
        }
    }
    println!(
        "note: NATS core and Redis pub/sub do not persist (at-most-once, a message is lost if \
         its subscriber is away); the relay answers SENT only after fdatasync and keeps each \
         message until the recipient acknowledges it (every message also makes a DELIVERED \
         receipt for its sender). Redis Streams is the durable peer: XADD is answered after \
         the AOF's fsync (appendfsync always), the receiver reads in a consumer group and \
         XACKs and XDELs what it got (no DELIVERED receipt). Latency is send-to-deliver, from the send time written in \
         the body; \"lag\" is how late paced sends left against their schedule (tokio timers \
         have 1 ms resolution; a large lag means the server fell behind the offered rate)."
    );
    let ok = rows[0].result.as_ref().is_ok_and(|r| r.delivered > 0);
    if !ok {
        println!("FAIL: the relay contender delivered no messages");
    }
    Ok(ok)
}

/// `chatperf ab`: the relay at `--base` (a saved binary, say the last commit's) against this
/// build's relay, under the load of `chatperf run`'s first row, in alternating rounds (base
/// first in odd rounds, this build first in even ones), so that both see the same machine. Prints every row, then the medians of
/// delivered/s and of server CPU per delivered message, and their ratios (this build / base).
fn cmd_ab(flags: &Flags) -> anyhow::Result<bool> {
    flags.check(&["base", "rounds", "users", "seconds", "shards", "io"])?;
    let base: String = flags.get("base", String::new())?;
    let base = PathBuf::from(base);
    if !base.is_file() {
        bail!("--base must name a relay binary (for instance a copy of the last build's)");
    }
    let this = relay_bin(&Flags(Vec::new()))?;
    let rounds: usize = flags.get("rounds", 3)?;
    let users: usize = flags.get("users", 200)?;
    let seconds: f64 = flags.get("seconds", 5.0)?;
    let shards: u16 = flags.get("shards", 2)?;
    let io: String = flags.get("io", "batch".to_string())?;
    if users < 2 || rounds == 0 || rounds > 50 || seconds <= 0.0 || seconds > 600.0 {
        bail!("need --users >= 2, 1 <= --rounds <= 50, 0 < --seconds <= 600");
    }
    let cfg = LoadCfg {
        pairs: users / 2,
        window: 32,
        size: 100,
        warmup: Duration::from_secs(1),
        measure: Duration::from_secs_f64(seconds),
        rate_per_pair: None,
        threads: 2,
    };
    println!(
        "chatperf ab: {rounds} alternating rounds of {} users, {seconds} s measured, io={io}, \
         {shards} shards, [chat] sync = true; base {} against this build's {}",
        cfg.pairs * 2,
        base.display(),
        this.display()
    );
    let chat_toml = "sync = true\nmsgs_per_s = 1000000\nsync_thread = true".to_string();
    let setup = |bin| RelaySetup {
        bin,
        io: &io,
        chat_toml: chat_toml.clone(),
        shards,
        persist: "fdatasync",
    };
    // (is this build, row), in the order run: base first in odd rounds, this build first in
    // even ones, so that neither side always gets the first or second slot.
    let mut rows: Vec<(bool, Row)> = Vec::new();
    for round in 1..=rounds {
        let order = if round % 2 == 1 {
            [false, true]
        } else {
            [true, false]
        };
        for is_this in order {
            let (bin, name) = if is_this {
                (&this, format!("this, round {round}"))
            } else {
                (&base, format!("base, round {round}"))
            };
            rows.push((is_this, relay_row(&setup(bin), cfg, 0, &name)));
        }
    }
    println!();
    let (is_this, rows): (Vec<bool>, Vec<Row>) = rows.into_iter().unzip();
    print_table(&rows);
    // (delivered/s, server CPU us per message) of every good row of one side.
    let side = |want_this: bool| -> Vec<(f64, f64)> {
        rows.iter()
            .zip(&is_this)
            .filter(|(_, &t)| t == want_this)
            .filter_map(|(r, _)| match (&r.result, r.cores) {
                (Ok(res), Some((server, _))) if res.rate > 0.0 => {
                    Some((res.rate, server * 1e6 / res.rate))
                }
                _ => None,
            })
            .collect()
    };
    let median = |mut v: Vec<f64>| -> f64 {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    let (a, b) = (side(false), side(true));
    if a.len() != rounds || b.len() != rounds {
        println!("FAIL: a round delivered nothing or had no CPU figure");
        return Ok(false);
    }
    let (ra, rb) = (
        median(a.iter().map(|x| x.0).collect()),
        median(b.iter().map(|x| x.0).collect()),
    );
    let (ca, cb) = (
        median(a.iter().map(|x| x.1).collect()),
        median(b.iter().map(|x| x.1).collect()),
    );
    println!(
        "median delivered/s: base {}, this {} ({:.3}x)",
        fmt_rate(ra),
        fmt_rate(rb),
        rb / ra
    );
    println!(
        "median server CPU per delivered message: base {ca:.2} us, this {cb:.2} us ({:.3}x)",
        cb / ca
    );
    Ok(true)
}

/// One side of `chatperf cross`: delivered/s, p50 and p99 send-to-deliver (us), server CPU
/// (cores), and frames per link write (cross only).
struct CrossSample {
    rate: f64,
    p50: f64,
    p99: f64,
    cores: f64,
    frames_per_write: Option<f64>,
}

/// Runs the load against relays already started: `homes` of senders and receivers.
fn cross_sample(
    relays: &[servers::Relay],
    homes: [(std::net::Ipv4Addr, u16); 2],
    cfg: LoadCfg,
    base: u64,
) -> anyhow::Result<CrossSample> {
    let shards = relays[0].shards;
    let target = Target::Relay {
        homes,
        shards,
        key: Box::new(relays[0].key.clone()),
        base,
    };
    let links = |relays: &[servers::Relay]| -> (u64, u64) {
        relays
            .iter()
            .filter_map(|r| r.metrics_text().ok())
            .map(|t| {
                (
                    wire::metric_sum(&t, "relay_link_frames_out_total"),
                    wire::metric_sum(&t, "relay_link_writes_total"),
                )
            })
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    };
    let (l0, l1) = (Cell::new((0, 0)), Cell::new((0, 0)));
    let (c0, c1) = (Cell::new(Vec::new()), Cell::new(Vec::new()));
    let marks = |relays: &[servers::Relay]| -> Vec<Option<CpuMark>> {
        relays.iter().map(|r| CpuMark::now(r.proc.pid())).collect()
    };
    let res = load::run(
        &target,
        cfg,
        || {
            l0.set(links(relays));
            c0.set(marks(relays));
        },
        || {
            c1.set(marks(relays));
            l1.set(links(relays));
        },
    )?;
    if res.errors > 0 {
        bail!(
            "{} errors, the first: {}",
            res.errors,
            res.first_error.unwrap_or_default()
        );
    }
    let cores = c0
        .take()
        .into_iter()
        .zip(c1.take())
        .filter_map(|(a, b)| CpuMark::cores(a, b))
        .map(|(server, _)| server)
        .sum();
    let ((f0, w0), (f1, w1)) = (l0.get(), l1.get());
    let (p50, p99, _) = wire::percentiles_us(&res.hist);
    Ok(CrossSample {
        rate: res.rate,
        p50,
        p99,
        cores,
        frames_per_write: (w1 > w0).then(|| (f1 - f0) as f64 / (w1 - w0) as f64),
    })
}

/// `chatperf cross`: 1:1 chat between users homed on two linked relays (ctl and two relays of
/// one shard each, each relay on its own loopback address) against users homed on one relay of
/// two shards, in alternating rounds of one run: the same shard threads either way.
fn cmd_cross(flags: &Flags) -> anyhow::Result<bool> {
    flags.check(&["rounds", "users", "seconds", "io"])?;
    let bin = relay_bin(&Flags(Vec::new()))?;
    let ctl_bin = bin.with_file_name("ctl");
    if !ctl_bin.is_file() {
        bail!(
            "{} not found (cargo build --release -p ctl)",
            ctl_bin.display()
        );
    }
    let rounds: usize = flags.get("rounds", 3)?;
    let users: usize = flags.get("users", 200)?;
    let seconds: f64 = flags.get("seconds", 5.0)?;
    let io: String = flags.get("io", "batch".to_string())?;
    if users < 2 || rounds == 0 || rounds > 50 || seconds <= 0.0 || seconds > 600.0 {
        bail!("need --users >= 2, 1 <= --rounds <= 50, 0 < --seconds <= 600");
    }
    let cfg = LoadCfg {
        pairs: users / 2,
        window: 32,
        size: 100,
        warmup: Duration::from_secs(1),
        measure: Duration::from_secs_f64(seconds),
        rate_per_pair: None,
        threads: 2,
    };
    let chat_toml = "sync = true\nmsgs_per_s = 1000000\nsync_thread = true";
    println!(
        "chatperf cross: {rounds} alternating rounds of {} users, {seconds} s measured, io={io}; \
         same: one relay of 2 shards; cross: senders on relay 1, receivers on relay 2 (1 shard \
         each, linked, ctl forming the cluster; each in a network namespace as root), chats \
         owned half by each",
        cfg.pairs * 2
    );
    let mut same = Vec::new();
    let mut cross = Vec::new();
    for round in 1..=rounds {
        let base = round as u64 * 1_000_000;
        let order = if round % 2 == 1 {
            [false, true]
        } else {
            [true, false]
        };
        for is_cross in order {
            let sample = if is_cross {
                // As root each relay gets a network namespace of its own (veth pairs on one
                // bridge, where ctl listens); else a loopback address of its own.
                let spaces = match netns::available() {
                    true => {
                        let bridge = netns::Bridge::numbered(round as u32 % 10)
                            .map_err(anyhow::Error::msg)?;
                        let spaces = (1..=2)
                            .map(|i| netns::Netns::create(&bridge, i))
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(anyhow::Error::msg)?;
                        Some((bridge, spaces))
                    }
                    false => None,
                };
                let (ctl_ip, hosts) = match &spaces {
                    Some((bridge, spaces)) => (
                        bridge.ip.parse()?,
                        [spaces[0].ns_ip.parse()?, spaces[1].ns_ip.parse()?],
                    ),
                    None => (
                        std::net::Ipv4Addr::LOCALHOST,
                        [
                            std::net::Ipv4Addr::new(127, 0, 3, 1),
                            std::net::Ipv4Addr::new(127, 0, 3, 2),
                        ],
                    ),
                };
                let ctl = servers::Ctl::start(&ctl_bin, 2, ctl_ip)?;
                let starting = [1u32, 2]
                    .into_iter()
                    .map(|id| {
                        let i = id as usize - 1;
                        let host = hosts[i];
                        let cmd = match &spaces {
                            Some((_, spaces)) => spaces[i].command(&bin),
                            None => std::process::Command::new(&bin),
                        };
                        servers::Relay::spawn_in(cmd, &io, 1, chat_toml, Some((ctl.addr, id, host)))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let relays = starting
                    .into_iter()
                    .map(servers::Starting::ready)
                    .collect::<anyhow::Result<Vec<_>>>()?;
                // The links come up just after the cluster forms.
                std::thread::sleep(Duration::from_millis(500));
                let homes = [
                    (hosts[0], relays[0].chat_port),
                    (hosts[1], relays[1].chat_port),
                ];
                let s = cross_sample(&relays, homes, cfg, base);
                drop(relays);
                drop(ctl);
                drop(spaces);
                s
            } else {
                let relay = servers::Relay::start(&bin, &io, 2, chat_toml)?;
                let home = (std::net::Ipv4Addr::LOCALHOST, relay.chat_port);
                cross_sample(std::slice::from_ref(&relay), [home, home], cfg, base)
            }
            .with_context(|| {
                format!("round {round}, {}", if is_cross { "cross" } else { "same" })
            })?;
            println!(
                "round {round} {:5}: {:>9} delivered/s, p50 {:8.0} us, p99 {:8.0} us, server \
                 {:.2} cores{}",
                if is_cross { "cross" } else { "same" },
                fmt_rate(sample.rate),
                sample.p50,
                sample.p99,
                sample.cores,
                sample
                    .frames_per_write
                    .map_or(String::new(), |f| format!(", {f:.1} frames per link write"))
            );
            if is_cross {
                cross.push(sample);
            } else {
                same.push(sample);
            }
        }
    }
    let median = |v: Vec<f64>| -> f64 {
        let mut v = v;
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    let m = |v: &[CrossSample], f: fn(&CrossSample) -> f64| median(v.iter().map(f).collect());
    let (rs, rc) = (m(&same, |s| s.rate), m(&cross, |s| s.rate));
    let (ps, pc) = (m(&same, |s| s.p99), m(&cross, |s| s.p99));
    let fpw = median(cross.iter().filter_map(|s| s.frames_per_write).collect());
    println!(
        "median delivered/s: same {}, cross {} ({:.2}x); p99: same {ps:.0} us, cross {pc:.0} us \
         ({:.2}x); frames per link write {fpw:.1}",
        fmt_rate(rs),
        fmt_rate(rc),
        rc / rs,
        pc / ps
    );
    Ok(true)
}

fn cmd_idle(flags: &Flags) -> anyhow::Result<bool> {
    flags.check(&[
        "conns",
        "shards",
        "timeout-s",
        "sources",
        "relay-bin",
        "io",
        "concurrency",
    ])?;
    let cfg = idle::IdleCfg {
        conns: flags.get("conns", 50_000)?,
        relay_bin: relay_bin(flags)?,
        io: flags.get("io", "batch".to_string())?,
        shards: flags.get("shards", 1)?,
        timeout: Duration::from_secs(flags.get("timeout-s", 180)?),
        concurrency: flags.get("concurrency", 128)?,
        sources: flags.get("sources", 8)?,
    };
    if cfg.shards == 0 {
        bail!("--shards must be at least 1");
    }
    idle::run(&cfg)
}

/// `chatperf idle-client`: one of `idle-memory`'s client processes (internal).
fn cmd_idle_client(flags: &Flags) -> anyhow::Result<bool> {
    flags.check(&[
        "chat-port",
        "shards",
        "from",
        "to",
        "sources",
        "concurrency",
        "timeout-s",
    ])?;
    let cfg = idle::ClientCfg {
        chat_port: flags.get("chat-port", 0)?,
        shards: flags.get("shards", 1)?,
        from: flags.get("from", 0)?,
        to: flags.get("to", 0)?,
        sources: flags.get("sources", 8)?,
        concurrency: flags.get("concurrency", 128)?,
        timeout: Duration::from_secs(flags.get("timeout-s", 180)?),
    };
    if cfg.chat_port == 0 || cfg.shards == 0 || cfg.to <= cfg.from {
        bail!("idle-client needs --chat-port, --shards >= 1 and --from < --to");
    }
    idle::client(&cfg)
}

/// `chatperf fsync`: what one `pwrite` + `fdatasync` costs when it appends to a file (the size
/// and block map change: an ext4 journal commit) against when it overwrites blocks written
/// before (a data flush only), with `--writers` files synced concurrently, as the shards do.
/// The premise of the log's segment recycling (`relay/src/chat/log.rs`).
fn cmd_fsync(flags: &Flags) -> anyhow::Result<bool> {
    use std::os::unix::fs::FileExt as _;
    flags.check(&["writers", "size", "syncs"])?;
    let writers: usize = flags.get("writers", 2)?;
    let size: usize = flags.get("size", 32 << 10)?;
    let syncs: usize = flags.get("syncs", 500)?;
    if writers == 0 || writers > 64 || size == 0 || size > 16 << 20 || syncs == 0 || syncs > 100_000
    {
        bail!("need 1 <= --writers <= 64, 1 <= --size <= 16 MiB, 1 <= --syncs <= 100000");
    }
    let dir = servers::temp_dir("fsync")?;
    println!(
        "chatperf fsync: {writers} writers at once, each {syncs} x (pwrite {size} B + fdatasync) \
         in its own file in {}",
        std::env::temp_dir().display()
    );
    for round in 0..2 {
        for overwrite in [false, true] {
            let results: Vec<anyhow::Result<(hdrhistogram::Histogram<u64>, f64)>> =
                std::thread::scope(|s| {
                    let handles: Vec<_> = (0..writers)
                        .map(|w| {
                            let path = dir.join(format!("w{w}"));
                            s.spawn(
                                move || -> anyhow::Result<(hdrhistogram::Histogram<u64>, f64)> {
                                    let f = std::fs::File::create(&path)?;
                                    let block = vec![7u8; size];
                                    if overwrite {
                                        // Written (not only allocated) blocks, made durable first.
                                        let zeros = vec![0u8; size];
                                        for i in 0..syncs {
                                            f.write_all_at(&zeros, (i * size) as u64)?;
                                        }
                                        f.sync_all()?;
                                    }
                                    let mut h = wire::new_hist();
                                    let start = std::time::Instant::now();
                                    for i in 0..syncs {
                                        let t = std::time::Instant::now();
                                        f.write_all_at(&block, (i * size) as u64)?;
                                        f.sync_data()?;
                                        let _ = h.record((t.elapsed().as_nanos() as u64).max(1));
                                    }
                                    let per_s = syncs as f64 / start.elapsed().as_secs_f64();
                                    drop(f);
                                    std::fs::remove_file(&path)?;
                                    Ok((h, per_s))
                                },
                            )
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().expect("a probe thread panicked"))
                        .collect()
                });
            let mut all = wire::new_hist();
            let mut per_s = Vec::new();
            for r in results {
                let (h, rate) = r?;
                all.add(&h).context("merging histograms")?;
                per_s.push(format!("{rate:.0}"));
            }
            let (p50, p99, _) = wire::percentiles_us(&all);
            println!(
                "round {}: {:<9} p50 {p50:>5.0} us  p99 {p99:>5.0} us  syncs/s per writer: {}",
                round + 1,
                if overwrite { "overwrite" } else { "append" },
                per_s.join(", ")
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(true)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => Flags::parse(&args[1..]).and_then(|f| cmd_run(&f)),
        Some("idle-memory") => Flags::parse(&args[1..]).and_then(|f| cmd_idle(&f)),
        Some("idle-client") => Flags::parse(&args[1..]).and_then(|f| cmd_idle_client(&f)),
        Some("fsync") => Flags::parse(&args[1..]).and_then(|f| cmd_fsync(&f)),
        Some("ab") => Flags::parse(&args[1..]).and_then(|f| cmd_ab(&f)),
        Some("cross") => Flags::parse(&args[1..]).and_then(|f| cmd_cross(&f)),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(true)
        }
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("chatperf: {e:#}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_values_and_switches() {
        let args: Vec<String> = ["--users", "10", "--quick", "--seconds", "2.5"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let f = Flags::parse(&args).unwrap();
        assert!(f.has("quick"));
        assert_eq!(f.get("users", 0usize).unwrap(), 10);
        assert_eq!(f.get("seconds", 0.0f64).unwrap(), 2.5);
        assert_eq!(f.get("size", 100usize).unwrap(), 100);
        assert!(f.get::<usize>("quick", 0).is_err());
        assert!(f.check(&["users", "quick", "seconds"]).is_ok());
        assert!(f.check(&["users"]).is_err());
        assert!(Flags::parse(&["x".to_string()]).is_err());
    }

    #[test]
    fn rates_format_compactly() {
        assert_eq!(fmt_rate(950.0), "950");
        assert_eq!(fmt_rate(12_345.0), "12.3k");
        assert_eq!(fmt_rate(2_500_000.0), "2.50M");
    }
}
