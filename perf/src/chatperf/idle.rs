//! `chatperf idle-memory`: the relay's user-space memory per idle authenticated connection.

use super::{load, servers, wire};
use anyhow::Context as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The measurement's settings.
pub struct IdleCfg {
    /// Connections to open.
    pub conns: usize,
    /// The relay binary.
    pub relay_bin: PathBuf,
    /// Its I/O backend.
    pub io: String,
    /// Its shards.
    pub shards: u16,
    /// Bound on the whole measurement.
    pub timeout: Duration,
    /// Logins in flight at once, per client process.
    pub concurrency: usize,
    /// Source addresses 127.0.0.1 ..= 127.0.0.`sources`.
    pub sources: u8,
}

/// Connections one client process holds at most: below this machine's descriptor limit
/// (20,000), so that 50,000 connections take several processes.
const PER_CLIENT: usize = 10_000;

/// What one client process (`chatperf idle-client`) does.
pub struct ClientCfg {
    /// The relay's first chat port (shard 0's).
    pub chat_port: u16,
    /// The relay's shards: a user connects to its home shard's port.
    pub shards: u16,
    /// Users `from + 1 ..= to` log in.
    pub from: usize,
    pub to: usize,
    pub sources: u8,
    pub concurrency: usize,
    pub timeout: Duration,
}

/// Raises RLIMIT_NOFILE (soft and hard) to at least `want`; returns the soft limit now in force.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if lim.rlim_cur >= want {
        return lim.rlim_cur;
    }
    let new = libc::rlimit {
        rlim_cur: want,
        rlim_max: lim.rlim_max.max(want),
    };
    // SAFETY: a valid pointer; failure leaves the limit unchanged.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        let soft = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) };
    }
    // SAFETY: a valid out-pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_cur
}

fn sockstat_mib() -> f64 {
    std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|t| wire::sockstat_tcp_pages(&t))
        .map_or(0.0, |p| p as f64 * 4096.0 / (1 << 20) as f64)
}

struct Point {
    conns: usize,
    rss: u64,
    sessions: u64,
    kernel_mib: f64,
}

/// One client process: logs its users in, prints `ok N` (or `error ...`), then holds the
/// connections until its standard input closes.
pub fn client(cfg: &ClientCfg) -> anyhow::Result<bool> {
    use std::io::Write as _;
    raise_nofile((cfg.to - cfg.from) as u64 + 256);
    let deadline = Instant::now() + cfg.timeout;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let streams = Arc::new(Mutex::new(Vec::with_capacity(cfg.to - cfg.from)));
    let next = Arc::new(AtomicUsize::new(cfg.from));
    let stop = Arc::new(AtomicBool::new(false));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let key = servers::test_key();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..cfg.concurrency {
            let (streams, next, stop, first_error, key) = (
                streams.clone(),
                next.clone(),
                stop.clone(),
                first_error.clone(),
                key.clone(),
            );
            let (to, sources, shards, chat_port) =
                (cfg.to, cfg.sources.max(1), cfg.shards, cfg.chat_port);
            tasks.push(tokio::spawn(async move {
                loop {
                    if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= to {
                        return;
                    }
                    let user = i as u64 + 1;
                    let src = Ipv4Addr::new(127, 0, 0, 1 + (i % sources as usize) as u8);
                    let token = servers::token(&key, user, shards);
                    let addr = servers::chat_addr(chat_port, shards, user);
                    let login_deadline = (Instant::now() + Duration::from_secs(10)).min(deadline);
                    match load::relay_idle_login(Some(src), addr, &token, login_deadline).await {
                        Ok(s) => streams.lock().expect("not poisoned").push(s),
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            first_error
                                .lock()
                                .expect("not poisoned")
                                .get_or_insert(format!("connection {i} from {src}: {e:#}"));
                            return;
                        }
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let n = streams.lock().expect("not poisoned").len();
    let mut out = std::io::stdout().lock();
    match first_error.lock().expect("not poisoned").as_ref() {
        Some(e) => writeln!(out, "error {n} {e}")?,
        None if n < cfg.to - cfg.from => writeln!(out, "error {n} timed out")?,
        None => writeln!(out, "ok {n}")?,
    }
    out.flush()?;
    drop(out);
    // Hold the connections (idle) until the parent closes our standard input.
    let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
    Ok(true)
}

/// A running client process and what it reported.
struct ClientProc {
    child: std::process::Child,
    /// Its report line, read by a thread.
    report: std::sync::mpsc::Receiver<String>,
}

fn spawn_client(
    relay: &servers::Relay,
    cfg: &IdleCfg,
    from: usize,
    to: usize,
) -> anyhow::Result<ClientProc> {
    use std::io::BufRead as _;
    let exe = std::env::current_exe().context("chatperf's own path")?;
    let mut child = std::process::Command::new(exe)
        .arg("idle-client")
        .args(["--chat-port", &relay.chat_port.to_string()])
        .args(["--shards", &cfg.shards.to_string()])
        .args(["--from", &from.to_string(), "--to", &to.to_string()])
        .args(["--sources", &cfg.sources.to_string()])
        .args(["--concurrency", &cfg.concurrency.to_string()])
        .args(["--timeout-s", &cfg.timeout.as_secs().to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting a client process")?;
    let stdout = child.stdout.take().context("client stdout")?;
    let (tx, report) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    Ok(ClientProc { child, report })
}

/// Waits for the clients' reports; returns the connections they hold and the first error.
fn wait_clients(clients: &[ClientProc], deadline: Instant) -> (usize, Option<String>) {
    let mut n = 0;
    let mut error = None;
    for c in clients {
        let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(15);
        let line = c.report.recv_timeout(left).unwrap_or_default();
        let mut words = line.split_whitespace();
        let status = words.next().unwrap_or("");
        n += words.next().and_then(|w| w.parse().ok()).unwrap_or(0usize);
        if status != "ok" && error.is_none() {
            error = Some(if line.trim().is_empty() {
                "a client process exited without a report".to_string()
            } else {
                line.trim().to_string()
            });
        }
    }
    (n, error)
}

/// Opens the connections from client processes of at most [`PER_CLIENT`] each, in two steps
/// (a fifth, then all), and prints the relay's RSS at each.
pub fn run(cfg: &IdleCfg) -> anyhow::Result<bool> {
    let deadline = Instant::now() + cfg.timeout;
    let limit = raise_nofile(4096);
    println!(
        "RLIMIT_NOFILE {limit} per process (the relay's too); clients of at most {PER_CLIENT} \
         connections each; {} source addresses 127.0.0.1-{}",
        cfg.sources, cfg.sources
    );
    let relay = servers::Relay::start(&cfg.relay_bin, &cfg.io, cfg.shards, "")?;
    std::thread::sleep(Duration::from_millis(500));
    let sessions = |r: &servers::Relay| {
        r.metrics_text()
            .map(|t| wire::metric_sum(&t, "relay_chat_sessions"))
            .unwrap_or(0)
    };
    let mut points = vec![Point {
        conns: 0,
        rss: relay.rss()?,
        sessions: sessions(&relay),
        kernel_mib: sockstat_mib(),
    }];
    let mut checkpoints = vec![cfg.conns];
    if cfg.conns >= 10 {
        checkpoints.insert(0, cfg.conns / 5);
    }
    let t0 = Instant::now();
    let mut clients: Vec<ClientProc> = Vec::new();
    let mut opened = 0;
    let mut first_error = None;
    for target in checkpoints {
        let mut step = Vec::new();
        while opened < target {
            let to = (opened + PER_CLIENT).min(target);
            step.push(spawn_client(&relay, cfg, opened, to)?);
            opened = to;
        }
        let (n, error) = wait_clients(&step, deadline);
        clients.extend(step);
        let held = points.last().map_or(0, |p| p.conns) + n;
        // Let the relay settle (its counters are published every 100 ms).
        std::thread::sleep(Duration::from_millis(1000));
        let rss = relay
            .rss()
            .context("reading the relay's RSS (did it exit?)")?;
        points.push(Point {
            conns: held,
            rss,
            sessions: sessions(&relay),
            kernel_mib: sockstat_mib(),
        });
        println!(
            "  {held} connections after {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        if error.is_some() {
            first_error = error;
            break;
        }
    }
    let base = &points[0];
    println!();
    println!(
        "relay: io={}, {} shard(s), default [chat] settings",
        cfg.io, cfg.shards
    );
    println!(
        "{:>8} {:>14} {:>10} {:>22} {:>18}",
        "conns", "relay RSS MiB", "sessions", "user bytes/conn (RSS)", "kernel TCP MiB"
    );
    for p in &points {
        let per = if p.conns > 0 {
            format!("{:.0}", (p.rss as f64 - base.rss as f64) / p.conns as f64)
        } else {
            "-".into()
        };
        println!(
            "{:>8} {:>14.1} {:>10} {:>22} {:>18.1}",
            p.conns,
            p.rss as f64 / (1 << 20) as f64,
            p.sessions,
            per,
            p.kernel_mib
        );
    }
    if points.len() >= 3 {
        let (a, b) = (&points[1], &points[points.len() - 1]);
        if b.conns > a.conns {
            println!(
                "marginal {} -> {}: {:.0} bytes/conn",
                a.conns,
                b.conns,
                (b.rss as f64 - a.rss as f64) / (b.conns - a.conns) as f64
            );
        }
    }
    let last = points.last().expect("at least the baseline");
    let reached = last.conns;
    if let Some(e) = &first_error {
        println!("stopped early: {e}");
    }
    if reached < cfg.conns {
        println!(
            "reached {reached} of {} connections (timeout {} s)",
            cfg.conns,
            cfg.timeout.as_secs()
        );
    }
    let per = if reached > 0 {
        (last.rss as f64 - base.rss as f64) / reached as f64
    } else {
        f64::NAN
    };
    println!(
        "result: {per:.0} user-space bytes per idle authenticated connection at {reached} \
         connections (goal <= 2048; RSS only: kernel socket buffers are not in it, see the \
         kernel TCP column, which counts both ends of every loopback connection)"
    );
    for mut c in clients {
        drop(c.child.stdin.take());
        let _ = c.child.wait();
    }
    drop(relay);
    Ok(reached > 0)
}
