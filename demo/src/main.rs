//! `demo`: the project's main job on one machine, as `cargo xtask demo` runs it. It starts the
//! real ctl and one relay (one shard per core) on loopback with a temporary data directory,
//! creates meetings and group chats through ctl, runs simulated participants (audio and video
//! RTP, chat with receipts), prints a summary table, stops everything and removes its files.
//! It exits non-zero when a check fails. `demo up` starts ctl and N relays for trying things
//! by hand and stops them on Ctrl-C.

mod chat;
mod http;
mod media;
mod netns;
mod procs;
mod progress;
mod soak;

use procs::{Proc, TempDir};
use std::net::SocketAddr;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Set by SIGINT or SIGTERM: everything winds down and cleans up.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// The largest media loss the demo accepts on loopback, in percent. Loopback drops nothing
/// unless a socket buffer overflows, which a demo-sized load should never cause.
const MAX_LOSS_PERCENT: f64 = 0.5;

const USAGE: &str = "\
usage: demo [run] [--duration SECONDS] [--rooms N] [--participants N] [--messages-per-s R]
            [--keep-running]
       demo up [--relays N] [--shards N] [--ctl N] [--no-netns]
       demo soak [--duration SECONDS] [--warmup SECONDS] [--sample-s SECONDS] [--relays N]
                 [--shards N] [--meetings N] [--users N] [--out DIR] [--dedup-capacity N]
                 [--segment-bytes N] [--token-ttl-s N] [--journal-slack N]

  run (default)        ctl + one relay on loopback, N rooms of M participants sending audio and
                       video and chatting in one group per room; prints a summary and exits
                       non-zero if a check failed (defaults: 10 s, 2 rooms, 4 participants,
                       2 messages/s per participant)
  --keep-running       after the summary keep ctl and the relay up until Ctrl-C
  up                   ctl + N relays (default 2, 1 shard each) for trying things by hand;
                       as root each relay gets its own network namespace (--no-netns: all on
                       loopback); --ctl N > 1: N ctl processes on one redis-server (ctl on
                       Redis: kill one and another takes over); prints how to connect; Ctrl-C
                       stops everything
  soak                 ctl + relays under churn (meetings, joins, leaves, NAT rebinding, token
                       renewal, chat users going offline and back, groups created and left),
                       sampled every --sample-s (10) into DIR/soak.csv and DIR/soak.svg
                       (default target/soak); fails if memory, descriptors or disk kept
                       growing after the warm-up (default a quarter of the run) or anything was
                       lost (defaults: 3600 s, 2 relays of 1 shard, 3 meetings, 48 users,
                       dedup capacity 4096, 1 MiB segments, token TTL 180 s, ctl's
                       journal compacted beyond 2 x live + 64 records)";

struct RunArgs {
    duration: Duration,
    rooms: usize,
    participants: usize,
    per_second: f64,
    keep_running: bool,
}

fn main() -> ExitCode {
    install_signal_handlers();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("up") => parse_up(&args[1..]).and_then(up),
        Some("-h" | "--help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some("run") => parse_run(&args[1..]).and_then(run),
        Some("soak") => parse_soak(&args[1..]).and_then(soak::run),
        _ => parse_run(&args).and_then(run),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("demo: a check failed (see the summary)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("demo: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn value<T: std::str::FromStr>(args: &[String], i: usize, name: &str) -> Result<T, String> {
    args.get(i + 1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{name} needs a valid value\n{USAGE}"))
}

fn parse_run(args: &[String]) -> Result<RunArgs, String> {
    let mut a = RunArgs {
        duration: Duration::from_secs(10),
        rooms: 2,
        participants: 4,
        per_second: 2.0,
        keep_running: false,
    };
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--duration" => a.duration = Duration::from_secs_f64(value(args, i, "--duration")?),
            "--rooms" => a.rooms = value(args, i, "--rooms")?,
            "--participants" => a.participants = value(args, i, "--participants")?,
            "--messages-per-s" => a.per_second = value(args, i, "--messages-per-s")?,
            "--keep-running" => {
                a.keep_running = true;
                i += 1;
                continue;
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
        i += 2;
    }
    if !(1..=50).contains(&a.rooms) || !(2..=32).contains(&a.participants) {
        return Err("--rooms must be 1..=50 and --participants 2..=32".into());
    }
    if a.duration < Duration::from_secs(1) || a.duration > Duration::from_secs(3600) {
        return Err("--duration must be between 1 and 3600 seconds".into());
    }
    if !(0.1..=50.0).contains(&a.per_second) {
        return Err("--messages-per-s must be between 0.1 and 50".into());
    }
    Ok(a)
}

fn parse_soak(args: &[String]) -> Result<soak::SoakArgs, String> {
    let mut a = soak::SoakArgs::default();
    let mut i = 0;
    let span = |i: usize, name: &str| -> Result<Duration, String> {
        let v: String = value(args, i, name)?;
        parse_span(&v).ok_or_else(|| format!("{name}: {v:?} is not a duration (120, 90s, 30m, 1h)"))
    };
    while i < args.len() {
        match args[i].as_str() {
            "--duration" => a.duration = span(i, "--duration")?,
            "--warmup" => a.warmup = Some(span(i, "--warmup")?),
            "--sample-s" => a.sample = span(i, "--sample-s")?,
            "--relays" => a.relays = value(args, i, "--relays")?,
            "--shards" => a.shards = value(args, i, "--shards")?,
            "--meetings" => a.meetings = value(args, i, "--meetings")?,
            "--users" => a.users = value(args, i, "--users")?,
            "--out" => a.out = Some(value::<String>(args, i, "--out")?.into()),
            "--dedup-capacity" => a.dedup_capacity = value(args, i, "--dedup-capacity")?,
            "--segment-bytes" => a.segment_bytes = value(args, i, "--segment-bytes")?,
            "--token-ttl-s" => a.token_ttl_s = value(args, i, "--token-ttl-s")?,
            "--journal-slack" => a.journal_slack = value(args, i, "--journal-slack")?,
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
        i += 2;
    }
    if a.duration < Duration::from_secs(30) || a.duration > Duration::from_secs(7 * 24 * 3600) {
        return Err("--duration must be between 30 s and 7 days".into());
    }
    if a.warmup.is_some_and(|w| w >= a.duration) {
        return Err("--warmup must be shorter than --duration".into());
    }
    if a.sample < Duration::from_secs(1)
        || a.sample * 8 > a.duration - a.warmup.unwrap_or(a.duration / 4)
    {
        return Err("--sample-s must be at least 1 s and leave 8 samples after the warm-up".into());
    }
    if !(1..=8).contains(&a.relays) || !(1..=8).contains(&a.shards) {
        return Err("--relays and --shards must be 1..=8".into());
    }
    if a.meetings > 20 || !(2..=400).contains(&a.users) {
        return Err("--meetings must be at most 20 and --users 2..=400".into());
    }
    if a.token_ttl_s < 2 * media::RENEW_BEFORE_S {
        return Err(format!(
            "--token-ttl-s must be at least {} (tokens are renewed {} s before they expire)",
            2 * media::RENEW_BEFORE_S,
            media::RENEW_BEFORE_S
        ));
    }
    Ok(a)
}

/// Seconds, or a number with `s`, `m` or `h`.
fn parse_span(v: &str) -> Option<Duration> {
    let (num, unit) = match v.char_indices().last()? {
        (i, 's') => (&v[..i], 1.0),
        (i, 'm') => (&v[..i], 60.0),
        (i, 'h') => (&v[..i], 3600.0),
        _ => (v, 1.0),
    };
    let n: f64 = num.parse().ok()?;
    (n.is_finite() && n >= 0.0).then(|| Duration::from_secs_f64(n * unit))
}

/// What `demo up` starts.
struct UpArgs {
    relays: usize,
    shards: usize,
    ctls: usize,
    use_netns: bool,
}

fn parse_up(args: &[String]) -> Result<UpArgs, String> {
    let (mut relays, mut shards, mut ctls) = (2usize, 1usize, 1usize);
    let mut use_netns = netns::available();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--no-netns" => {
                use_netns = false;
                i += 1;
                continue;
            }
            "--relays" => relays = value(args, i, "--relays")?,
            "--shards" => shards = value(args, i, "--shards")?,
            "--ctl" => ctls = value(args, i, "--ctl")?,
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
        i += 2;
    }
    if !(1..=16).contains(&relays) || !(1..=64).contains(&shards) || !(1..=5).contains(&ctls) {
        return Err("--relays must be 1..=16, --shards 1..=64 and --ctl 1..=5".into());
    }
    Ok(UpArgs {
        relays,
        shards,
        ctls,
        use_netns,
    })
}

/// A `redis-server` for ctl on Redis, persisting every write; stopped when dropped.
struct Redis {
    child: std::process::Child,
    url: String,
}

impl Redis {
    fn start(dir: &TempDir, ip: &str) -> Result<Self, String> {
        let (port, _) = procs::free_ports(ip, 1)?;
        let data = dir.0.join("redis");
        std::fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
        let log = std::fs::File::create(dir.0.join("redis.log")).map_err(|e| e.to_string())?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", ip])
            .arg("--dir")
            .arg(&data)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            // Bound to loopback or the namespaces' bridge only; protected mode would refuse
            // the bridge's other addresses for want of a password.
            .args(["--protected-mode", "no"])
            .stdout(log)
            .spawn()
            .map_err(|e| format!("redis-server (Debian package redis-server): {e}"))?;
        let mut r = Self {
            child,
            url: format!("redis://{ip}:{port}/0"),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((ip, port)).is_err() {
            if std::time::Instant::now() >= deadline || !matches!(r.child.try_wait(), Ok(None)) {
                return Err(format!("redis-server did not start on {ip}:{port}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(r)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Starts ctl; with `cluster` relays > 0 it forms a chat cluster of that many linked relays;
/// with `redis`, it is process `n` of a ctl on Redis.
fn start_ctl(
    dir: &TempDir,
    ip: &str,
    cluster: usize,
    redis: Option<(&Redis, usize)>,
) -> Result<(Proc, SocketAddr), String> {
    let mut cmd = Command::new(procs::binary("ctl")?);
    let n = redis.map_or(1, |(_, n)| n);
    let name = if n == 1 {
        "ctl".to_string()
    } else {
        format!("ctl{n}")
    };
    cmd.args(["serve", "--listen", &format!("{ip}:0"), "--data-dir"])
        .arg(dir.0.join(&name));
    let mut toml = String::new();
    if cluster > 0 {
        toml.push_str(&format!("cluster_relays = {cluster}\n"));
    }
    if let Some((r, _)) = redis {
        toml.push_str(&format!("redis_url = \"{}\"\n", r.url));
    }
    if !toml.is_empty() {
        let cfg = dir.0.join(format!("{name}.toml"));
        std::fs::write(&cfg, toml).map_err(|e| format!("{}: {e}", cfg.display()))?;
        cmd.arg("--config").arg(cfg);
    }
    let p = Proc::start(&name, cmd, &dir.0.join(format!("{name}.log")))?;
    let addr = procs::addr(&p, "listen")?;
    Ok((p, addr))
}

/// Relay `id`'s credential at the demo's ctl (`ctl credential relay ID`): the relays in
/// network namespaces reach ctl from addresses that are not loopback. With ctl on Redis the
/// key is the cluster's, in Redis; `ctl.toml` names it.
fn relay_credential(dir: &TempDir, id: u32) -> Result<String, String> {
    let mut cmd = Command::new(procs::binary("ctl")?);
    cmd.args(["credential", "relay", &id.to_string(), "--data-dir"])
        .arg(dir.0.join("ctl"));
    let cfg = dir.0.join("ctl.toml");
    if cfg.exists() {
        cmd.arg("--config").arg(cfg);
    }
    let out = cmd.output().map_err(|e| format!("ctl credential: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ctl credential relay {id}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Starts relay `id` against ctl with `shards` shards (0: one per core), chat enabled, on free
/// ports, linked to the other relays of ctl's cluster when `linked`; retries on a port race.
fn start_relay(
    dir: &TempDir,
    ctl: &str,
    id: u32,
    shards: usize,
    ns: Option<&netns::Netns>,
    linked: bool,
) -> Result<Proc, String> {
    let n = if shards == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        shards
    };
    let mut last = String::new();
    for _ in 0..3 {
        let relay = procs::binary("relay")?;
        // A fresh namespace has every port free; on loopback look for free ones.
        // On loopback relay `id` takes 127.0.0.`id` (relay 1 the usual address), so that
        // relays started together never race for the same ports.
        let lo = format!("127.0.0.{id}");
        let (mut cmd, ip, (base, chat)) = match ns {
            Some(ns) => (
                ns.command(&relay),
                ns.ns_ip.as_str(),
                (40_000, 40_000 + n as u16),
            ),
            None => (
                Command::new(&relay),
                lo.as_str(),
                procs::free_ports(&lo, n as u16)?,
            ),
        };
        cmd.args(["--ctl", ctl, "--relay-id", &id.to_string()])
            .env("RELAY_CTL_TOKEN", relay_credential(dir, id)?)
            .args(["--bind", ip, "--advertise-host", ip])
            .args(["--shards", &n.to_string(), "--base-port", &base.to_string()])
            .args([
                "--chat-port",
                &chat.to_string(),
                "--metrics",
                &format!("{ip}:0"),
            ])
            .arg("--data-dir")
            .arg(dir.0.join(format!("relay{id}")));
        if linked {
            // Right above the chat ports (a taken one makes the start fail and retry).
            cmd.args(["--link-port", &(chat + n as u16).to_string()]);
        }
        match Proc::start(
            &format!("relay {id}"),
            cmd,
            &dir.0.join(format!("relay{id}.log")),
        ) {
            Ok(p) => return Ok(p),
            Err(e) => last = e,
        }
    }
    Err(last)
}

pub(crate) fn wait_relays(ctl: SocketAddr, n: u64) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, h) = http::call(ctl, "GET", "/health", None)?;
        if h["relays_alive"].as_u64() >= Some(n) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "ctl sees {} of {n} relays after 10 s: {h}",
                h["relays_alive"]
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(a: RunArgs) -> Result<bool, String> {
    let dir = TempDir::new()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "demo: ctl and one relay ({cores} shards) on loopback; {} rooms × {} participants for {:?}; data in {}",
        a.rooms,
        a.participants,
        a.duration,
        dir.0.display()
    );
    let (mut ctl_proc, ctl) = start_ctl(&dir, "127.0.0.1", 0, None)?;
    let mut relay = start_relay(&dir, &format!("http://{ctl}"), 1, 0, None, false)?;
    let metrics = procs::addr(&relay, "metrics")?;
    wait_relays(ctl, 1)?;
    eprintln!("demo: ctl at http://{ctl}; relay: {}", relay.ready_line());

    // Every chat user signs in by phone (fictional 555-01xx numbers), its code read from ctl's
    // SMS outbox, and chats as the account it got.
    let outbox = dir.0.join("ctl").join("sms-outbox.jsonl");
    let homes: Vec<Vec<chat::Home>> = (0..a.rooms)
        .map(|r| {
            let numbers: Vec<String> = (0..a.participants)
                .map(|p| format!("+1 202 555 {:04}", 100 + r * a.participants + p))
                .collect();
            chat::sign_in(ctl, &outbox, &numbers)
        })
        .collect::<Result<_, _>>()?;
    // Each room's first user hosts it: its account creates the meeting; the others join by
    // the code.
    let hosts: Vec<&str> = homes
        .iter()
        .map(|room| room[0].credential.as_str())
        .collect();
    let admissions = media::join_rooms(ctl, &hosts, a.participants)?;
    let mut sessions: Vec<Vec<media::Session>> = admissions
        .iter()
        .map(|room| {
            room.iter()
                .map(|a| {
                    let (sock, binding) = media::connect(a)?;
                    Ok(media::Session {
                        sock,
                        binding,
                        admission: a.clone(),
                        ctl,
                    })
                })
                .collect::<Result<_, String>>()
        })
        .collect::<Result<_, _>>()?;
    let members: Vec<Vec<u64>> = homes
        .iter()
        .map(|room| room.iter().map(|h| h.user).collect())
        .collect();
    println!(
        "signed in {} chat users by phone (codes from the SMS outbox), each with its own home",
        homes.iter().map(Vec::len).sum::<usize>()
    );

    let media_live = Arc::new(media::Live::default());
    let chat_live = Arc::new(chat::Live::default());
    let rooms: Vec<chat::Room> = (0..a.rooms)
        .map(|_| chat::Room::new(a.participants))
        .collect();
    let tx_before = http::metric_sum(metrics, "relay_tx_packets_total")?;
    let epoch = Instant::now();
    let until = epoch + a.duration;
    let expected_copies = (a.rooms * a.participants * (a.participants - 1)) as f64
        * a.per_second
        * a.duration.as_secs_f64();
    let (media_out, chat_out, (tx_after, tx_at)) = std::thread::scope(|s| {
        let media: Vec<Vec<_>> = sessions
            .iter_mut()
            .enumerate()
            .map(|(r, room)| {
                let members = room.len();
                room.iter_mut()
                    .enumerate()
                    .map(|(p, session)| {
                        let live = &media_live;
                        s.spawn(move || {
                            media::participant(r, p, members, session, epoch, until, live)
                        })
                    })
                    .collect()
            })
            .collect();
        let chats: Vec<Vec<_>> = homes
            .iter()
            .enumerate()
            .map(|(r, hs)| {
                hs.iter()
                    .enumerate()
                    .map(|(me, h)| {
                        let (live, room, m) = (&chat_live, &rooms[r], &members[r]);
                        s.spawn(move || chat::user(me, h, m, room, a.per_second, until, live))
                    })
                    .collect()
            })
            .collect();
        let bar = progress::Bars::new(a.duration, expected_copies);
        // The relay's counter at the last sample taken while publishers were sending.
        let (mut tx_after, mut tx_at) = (tx_before, Duration::ZERO);
        while !media.iter().flatten().all(|h| h.is_finished())
            || !chats.iter().flatten().all(|h| h.is_finished())
        {
            std::thread::sleep(Duration::from_millis(200));
            if Instant::now() <= until {
                if let Ok(tx) = http::metric_sum(metrics, "relay_tx_packets_total") {
                    (tx_after, tx_at) = (tx, epoch.elapsed());
                }
            }
            bar.draw(
                epoch.elapsed(),
                &media_live,
                &chat_live,
                &tx_before,
                &tx_after,
            );
        }
        bar.finish();
        (join_all(media), join_all(chats), (tx_after, tx_at))
    });
    let (media_out, chat_out) = (media_out?, chat_out?);
    let tx_total = http::metric_sum(metrics, "relay_tx_packets_total")?;
    let records = http::metric_sum(metrics, "relay_chat_records_total")?;
    let commits = http::metric_sum(metrics, "relay_chat_commits_total")?;
    let m = media::totals(&media_out);
    let c = chat::totals(&chat_out);
    let forwarded = tx_after.saturating_sub(tx_before);
    let summary = progress::Summary {
        rooms: a.rooms,
        participants: a.participants,
        forwarded_per_s: forwarded as f64 / tx_at.as_secs_f64().max(0.001),
        forwarded_total: tx_total.saturating_sub(tx_before),
        media: &m,
        chat: &c,
        records_per_commit: if commits == 0 {
            0.0
        } else {
            records as f64 / commits as f64
        },
        max_loss_percent: MAX_LOSS_PERCENT,
    };
    let ok = summary.print();
    let interrupted = STOP.load(Ordering::Relaxed);
    if interrupted {
        eprintln!("demo: interrupted; the numbers above cover only part of the run");
    }

    if a.keep_running && !interrupted {
        println!(
            "\nStill running (Ctrl-C stops everything and removes {}):",
            dir.0.display()
        );
        print_how_to_connect(ctl, &[&relay]);
        while !STOP.load(Ordering::Relaxed) && relay.alive() && ctl_proc.alive() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let relay_clean = relay.stop();
    let ctl_clean = ctl_proc.stop();
    if !relay_clean || !ctl_clean {
        eprintln!(
            "demo: unclean stop (relay {relay_clean}, ctl {ctl_clean}); relay log:\n{}",
            relay.log_tail(20)
        );
    }
    drop(dir);
    eprintln!("demo: stopped ctl and the relay, removed the temporary directory");
    Ok(ok && relay_clean && ctl_clean && !interrupted)
}

/// Joins every thread of every room; a panic or an error of any is the run's error.
fn join_all<T>(
    hs: Vec<Vec<std::thread::ScopedJoinHandle<'_, Result<T, String>>>>,
) -> Result<Vec<Vec<T>>, String> {
    hs.into_iter()
        .map(|room| {
            room.into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| "a simulated participant panicked".to_string())?
                })
                .collect()
        })
        .collect()
}

fn print_how_to_connect(ctl: SocketAddr, relays: &[&Proc]) {
    println!("  ctl:     http://{ctl}   (API: ctl/API.md; admin: CTL_URL=http://{ctl} target/release/ctl relays)");
    if !ctl.ip().is_loopback() {
        println!("           (admin routes need CTL_ADMIN_TOKEN=$(target/release/ctl credential admin --data-dir <ctl's data dir>))");
    }
    for r in relays {
        println!("  relay:   {}", r.ready_line());
    }
    println!("  meeting: curl -s -XPOST http://{ctl}/v1/meetings -H 'Authorization: Bearer <device credential>'");
    println!("  join:    curl -s -XPOST http://{ctl}/v1/join -d '{{\"code\": \"<code>\"}}'");
    println!("  sign in: curl -s -XPOST http://{ctl}/v1/verification/sessions -d '{{\"number\": \"+1 202 555 0143\"}}'");
    println!("           (the code goes to ctl's sms-outbox.jsonl; POST .../verify gives the device credential; ctl/API.md)");
    println!("  chat:    curl -s http://{ctl}/v1/users/42/home   (admin route, as above: host, chat_port, token; PROTOCOL.md §7)");
    println!("  drain:   CTL_URL=http://{ctl} target/release/ctl drain <relay id>");
}

fn up(a: UpArgs) -> Result<bool, String> {
    let UpArgs {
        relays,
        shards,
        ctls,
        use_netns,
    } = a;
    let dir = TempDir::new()?;
    let bridge = if use_netns {
        Some(netns::Bridge::create()?)
    } else {
        None
    };
    let namespaces: Vec<netns::Netns> = match &bridge {
        Some(b) => (1..=relays as u32)
            .map(|i| netns::Netns::create(b, i))
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    // With namespaces ctl listens on the bridge, every namespace's gateway.
    let ctl_ip = namespaces
        .first()
        .map_or("127.0.0.1", |n| n.host_ip.as_str());
    // More than one ctl: ctl on Redis, every process given to every relay.
    let redis = match ctls {
        1 => None,
        _ => Some(Redis::start(&dir, ctl_ip)?),
    };
    let mut ctl_procs = Vec::new();
    // The relays form one messenger: chat between users homed on different relays crosses
    // their links (PROTOCOL.md section 8). Each waits for the others, so they start together.
    for n in 1..=ctls {
        ctl_procs.push(start_ctl(
            &dir,
            ctl_ip,
            relays,
            redis.as_ref().map(|r| (r, n)),
        )?);
    }
    let ctl = ctl_procs[0].1;
    let ctl_urls: Vec<String> = ctl_procs
        .iter()
        .map(|(_, a)| format!("http://{a}"))
        .collect();
    let ctl_list = ctl_urls.join(",");
    let mut procs = std::thread::scope(|s| {
        let starting: Vec<_> = (1..=relays as u32)
            .map(|id| {
                let (dir, ns, ctl_list) = (&dir, namespaces.get(id as usize - 1), &ctl_list);
                s.spawn(move || start_relay(dir, ctl_list, id, shards, ns, true))
            })
            .collect();
        starting
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err("a relay starter panicked".into()))
            })
            .collect::<Result<Vec<_>, String>>()
    })?;
    wait_relays(ctl, relays as u64)?;
    let ctl_text = match ctls {
        1 => "ctl".to_string(),
        n => format!("{n} ctl processes on one redis-server"),
    };
    match namespaces.is_empty() {
        true => println!(
            "up: {ctl_text} and {relays} relays on loopback; data in {}",
            dir.0.display()
        ),
        false => {
            let names: Vec<&str> = namespaces.iter().map(|n| n.name()).collect();
            println!(
                "up: {ctl_text} and {relays} relays, each in its own network namespace ({}); data in {}",
                names.join(", "),
                dir.0.display()
            );
        }
    }
    print_how_to_connect(ctl, &procs.iter().collect::<Vec<_>>());
    if let Some(r) = &redis {
        println!(
            "  ctl on Redis ({}): every one of {} serves; kill the acting one (its log says",
            r.url,
            ctl_urls.join(" ")
        );
        println!("           \"acting\") and another takes over within 3 s");
    }
    println!("Ctrl-C stops everything.");
    let mut gone = vec![false; ctl_procs.len()];
    while !STOP.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        for (i, p) in procs.iter_mut().enumerate() {
            if !p.alive() {
                eprintln!("up: relay {} exited; its log:\n{}", i + 1, p.log_tail(20));
                STOP.store(true, Ordering::Relaxed);
            }
        }
        for (i, (p, _)) in ctl_procs.iter_mut().enumerate() {
            if !gone[i] && !p.alive() {
                gone[i] = true;
                eprintln!("up: {} exited; its log:\n{}", p.name(), p.log_tail(20));
            }
        }
        // One ctl: its end is the end. Several: the others serve on until all are gone.
        if gone.iter().all(|g| *g) {
            STOP.store(true, Ordering::Relaxed);
        }
    }
    let mut clean = procs.iter_mut().map(Proc::stop).fold(true, |a, b| a & b);
    for (i, (p, _)) in ctl_procs.iter_mut().enumerate() {
        let stopped = p.stop();
        clean &= stopped || gone[i];
    }
    drop(procs);
    drop(redis);
    drop(namespaces);
    drop(bridge);
    drop(dir);
    println!("up: stopped; temporary files removed");
    Ok(clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_take_seconds_minutes_and_hours() {
        assert_eq!(parse_span("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse_span("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_span("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_span("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_span("1.5h"), Some(Duration::from_secs(5400)));
        for bad in ["", "h", "-1", "1d", "inf", "NaN"] {
            assert_eq!(parse_span(bad), None, "{bad:?}");
        }
    }
}
