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
    /// Bound on the whole measurement.
    pub timeout: Duration,
    /// Logins in flight at once.
    pub concurrency: usize,
    /// Source addresses 127.0.0.1 ..= 127.0.0.`sources`.
    pub sources: u8,
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

/// Opens the connections in two steps (a fifth, then all) and prints the relay's RSS at each.
pub fn run(cfg: &IdleCfg) -> anyhow::Result<bool> {
    let deadline = Instant::now() + cfg.timeout;
    let want = cfg.conns as u64 * 2 + 4096;
    let limit = raise_nofile(want);
    println!(
        "RLIMIT_NOFILE now {limit} (inherited by the relay); {} source addresses 127.0.0.1-{}",
        cfg.sources, cfg.sources
    );
    if limit < cfg.conns as u64 + 64 {
        println!(
            "warning: could not raise RLIMIT_NOFILE to {want} (the hard limit is {limit} and \
             this process lacks CAP_SYS_RESOURCE): the relay and this client can each hold \
             fewer than {limit} descriptors, so about {} connections at most",
            limit.saturating_sub(16)
        );
    }
    let relay = servers::Relay::start(&cfg.relay_bin, &cfg.io, 1, "")?;
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let streams = Arc::new(Mutex::new(Vec::with_capacity(cfg.conns)));
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let mut checkpoints = vec![cfg.conns];
    if cfg.conns >= 10 {
        checkpoints.insert(0, cfg.conns / 5);
    }
    let t0 = Instant::now();
    for target in checkpoints {
        rt.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..cfg.concurrency {
                let (streams, next, stop, first_error) = (
                    streams.clone(),
                    next.clone(),
                    stop.clone(),
                    first_error.clone(),
                );
                let key = relay.key.clone();
                let addr = relay.addr(1);
                let sources = cfg.sources.max(1);
                tasks.push(tokio::spawn(async move {
                    loop {
                        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                            return;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= target {
                            next.fetch_sub(1, Ordering::Relaxed);
                            return;
                        }
                        let user = i as u64 + 1;
                        let src = Ipv4Addr::new(127, 0, 0, 1 + (i % sources as usize) as u8);
                        let token = servers::token(&key, user, 1);
                        let login_deadline =
                            (Instant::now() + Duration::from_secs(10)).min(deadline);
                        match load::relay_idle_login(Some(src), addr, &token, login_deadline).await
                        {
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
        // Let the relay settle (its counters are published every 100 ms).
        std::thread::sleep(Duration::from_millis(1000));
        let rss = relay
            .rss()
            .context("reading the relay's RSS (did it exit?)")?;
        points.push(Point {
            conns: n,
            rss,
            sessions: sessions(&relay),
            kernel_mib: sockstat_mib(),
        });
        println!(
            "  {n} connections after {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        if n < target {
            break;
        }
    }
    let base = &points[0];
    println!();
    println!("relay: io={}, 1 shard, default [chat] settings", cfg.io);
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
    if let Some(e) = first_error.lock().expect("not poisoned").as_ref() {
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
    drop(streams);
    drop(relay);
    Ok(reached > 0)
}
