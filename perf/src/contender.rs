//! Starting, pinning, observing and stopping a contender process: the relay with one of its
//! backends, or one of the baselines (this same binary with a baseline subcommand).
#![forbid(unsafe_code)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a contender may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a contender may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The four contenders of every run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The relay with `--io uring`.
    RelayUring,
    /// The relay with `--io batch`.
    RelayBatch,
    /// The ideal batched forwarder baseline.
    Ideal,
    /// The tokio recv_from/send_to baseline.
    Tokio,
}

impl Kind {
    /// All contenders, in the order they run: the ideal forwarder first, because its
    /// zero-loss rate sets the load at which every contender's latency is measured.
    pub const ALL: [Kind; 4] = [Kind::Ideal, Kind::Tokio, Kind::RelayUring, Kind::RelayBatch];

    /// Name used in tables, JSON and `--contenders`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::RelayUring => "relay/uring",
            Kind::RelayBatch => "relay/batch",
            Kind::Ideal => "ideal",
            Kind::Tokio => "tokio",
        }
    }

    /// Whether this is the real relay (joins by STUN, exposes metrics).
    pub fn is_relay(self) -> bool {
        matches!(self, Kind::RelayUring | Kind::RelayBatch)
    }

    /// Parses a name as printed by [`Kind::name`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// What is needed to start any contender.
pub struct Launch<'a> {
    /// The relay binary.
    pub relay_bin: &'a Path,
    /// This binary, which serves the baselines.
    pub perf_bin: &'a Path,
    /// Relay shards (one UDP port each).
    pub relay_shards: u16,
    /// Hex Ed25519 public key the relay verifies tokens with.
    pub public_key_hex: &'a str,
    /// Rooms file for the baselines.
    pub rooms_file: &'a Path,
    /// Relay configuration file (limits raised so they are never the bottleneck).
    pub relay_config: &'a Path,
    /// Where the contender's stderr goes.
    pub stderr_file: PathBuf,
    /// CPU the contender is confined to, if pinning.
    pub cpu: Option<usize>,
}

/// A contender that printed its ready line.
pub struct Running {
    child: Child,
    /// Its process id.
    pub pid: u32,
    /// The ready line it printed.
    pub ready_line: String,
    /// Address of shard 0 (relay) or of the forwarding socket (baselines).
    pub base: SocketAddrV4,
    /// Number of consecutive ports starting at `base` (relay shards; 1 for baselines).
    pub n_shards: u16,
    /// Prometheus endpoint, for the relay.
    pub metrics: Option<SocketAddr>,
}

/// Relay configuration for benchmarking: every per-participant limit stays in the packet path
/// (its cost is measured) but is set far above the offered load, so a drop is a capacity
/// limit and not policy.
pub const RELAY_CONFIG: &str = "[limits]
participant_pps = 10000000
participant_bps = 100000000000
";

/// Starts `kind`. `Err` carries the reason it is unavailable.
pub fn start(kind: Kind, l: &Launch) -> Result<Running, String> {
    let mut cmd;
    let mut metrics = None;
    let mut base = SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 0);
    let mut n_shards = 1;
    if kind.is_relay() {
        let (port, m) = free_ports(l.relay_shards).map_err(|e| format!("finding ports: {e}"))?;
        base.set_port(port);
        n_shards = l.relay_shards;
        metrics = Some(m);
        cmd = Command::new(l.relay_bin);
        // --no-pin: the relay would pin shard i to the i-th allowed CPU, i.e. onto the load generator's core;
        // the harness places every contender itself.
        cmd.arg("--config").arg(l.relay_config).arg("--no-pin");
        let io = if kind == Kind::RelayUring {
            "uring"
        } else {
            "batch"
        };
        cmd.args(["--io", io, "--shards", &l.relay_shards.to_string()])
            .args(["--bind", "127.0.0.1", "--base-port", &port.to_string()])
            .args([
                "--metrics",
                &m.to_string(),
                "--public-key",
                l.public_key_hex,
            ]);
    } else {
        cmd = Command::new(l.perf_bin);
        let sub = if kind == Kind::Ideal {
            "ideal-forwarder"
        } else {
            "tokio-relay"
        };
        cmd.args([sub, "--listen", "127.0.0.1:0", "--rooms"])
            .arg(l.rooms_file);
    }
    let stderr = std::fs::File::create(&l.stderr_file).map_err(|e| e.to_string())?;
    crate::sys::die_with_parent(&mut cmd);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", cmd.get_program().to_string_lossy()))?;
    let mut running = Running {
        pid: child.id(),
        child,
        ready_line: String::new(),
        base,
        n_shards,
        metrics,
    };
    if let Some(cpu) = l.cpu {
        let _ = crate::sys::pin(running.pid as i32, cpu);
    }
    running.await_ready(kind, &l.stderr_file)?;
    if let Some(cpu) = l.cpu {
        // The relay may pin its own shard threads; the harness's placement wins so that
        // every contender gets the same single core.
        pin_all_threads(running.pid, cpu);
    }
    Ok(running)
}

impl Running {
    fn await_ready(&mut self, kind: Kind, stderr_file: &Path) -> Result<(), String> {
        let stdout = self.child.stdout.take().expect("stdout was piped");
        let (tx, rx) = mpsc::channel();
        // Keeps reading after the ready line so the contender never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("ready") => {
                    self.ready_line = line;
                    break;
                }
                Ok(_) => continue,
                Err(e) => {
                    let why = match e {
                        mpsc::RecvTimeoutError::Timeout => "no ready line within 10 s".to_string(),
                        mpsc::RecvTimeoutError::Disconnected => self.exit_reason(stderr_file),
                    };
                    self.stop();
                    return Err(why);
                }
            }
        }
        if !kind.is_relay() {
            self.base = parse_listen(&self.ready_line)
                .ok_or_else(|| format!("unparseable ready line {:?}", self.ready_line))?;
        }
        Ok(())
    }

    fn exit_reason(&mut self, stderr_file: &Path) -> String {
        let status = self
            .child
            .wait()
            .map_or("unknown status".into(), |s| s.to_string());
        let stderr = std::fs::read_to_string(stderr_file).unwrap_or_default();
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        format!("exited ({status}) before ready: {}", last.trim())
    }

    /// Address of the shard that owns `room_id`.
    pub fn target(&self, room_id: u64) -> SocketAddrV4 {
        let shard = (room_id % u64::from(self.n_shards)) as u16;
        SocketAddrV4::new(*self.base.ip(), self.base.port() + shard)
    }

    /// SIGTERM, then SIGKILL if it does not exit in time. Returns how it ended.
    pub fn stop(&mut self) -> String {
        let _ = crate::sys::kill(self.pid, libc::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.to_string();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        "killed after SIGTERM timeout".into()
    }
}

fn parse_listen(ready: &str) -> Option<SocketAddrV4> {
    ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("listen="))?
        .parse()
        .ok()
}

/// Finds `n` consecutive free UDP ports on loopback and a free TCP port for metrics. They are
/// released before the relay binds them; the race with other programs is accepted.
fn free_ports(n: u16) -> std::io::Result<(u16, SocketAddr)> {
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    for _ in 0..50 {
        let first = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let p = first.local_addr()?.port();
        if p.checked_add(n).is_none() {
            continue;
        }
        let rest: Result<Vec<_>, _> = (1..n)
            .map(|i| std::net::UdpSocket::bind(("127.0.0.1", p + i)))
            .collect();
        if rest.is_ok() {
            return Ok((p, metrics));
        }
    }
    Err(std::io::Error::other("no run of free ports"))
}

fn pin_all_threads(pid: u32, cpu: usize) {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for tid in dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
    {
        let _ = crate::sys::pin(tid, cpu);
    }
}

pub use crate::procstat::{cpu_ticks, cpu_total_ns};

/// Receive-buffer drops of every UDP socket, by local port, from /proc/net/udp: where a loss
/// happened (the contender's socket overflowing, or a subscriber's).
pub fn udp_drops_by_port() -> std::collections::HashMap<u16, u64> {
    let text = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    parse_udp_drops(&text)
}

/// Parses /proc/net/udp: `local_address` is `HEXIP:HEXPORT`, `drops` is the last column.
fn parse_udp_drops(text: &str) -> std::collections::HashMap<u16, u64> {
    let mut out = std::collections::HashMap::new();
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let port = fields
            .get(1)
            .and_then(|a| a.split_once(':'))
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
        let drops = fields.last().and_then(|d| d.parse::<u64>().ok());
        if let (Some(port), Some(drops)) = (port, drops) {
            *out.entry(port).or_insert(0) += drops;
        }
    }
    out
}

/// Fetches the relay's Prometheus text.
pub fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: relay\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body
        .split_once("\r\n\r\n")
        .map_or(body.clone(), |(_, b)| b.to_string()))
}

/// Sum of every sample of metric `name` (all label sets) in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue; // a longer metric name sharing the prefix
        }
        let value = rest
            .rsplit('}')
            .next()
            .unwrap_or(rest)
            .split_whitespace()
            .next();
        if let Some(v) = value.and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_udp_drops_by_port() {
        let text = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
            4958: 0100007F:C36F 0100007F:898F 01 00000000:00001B00 00:00000000 00000000     0        0 67546 2 000000008a522242 7\n\
            5586: 0100007F:85E3 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 67538 2 00000000c7bc852b 0\n";
        let d = parse_udp_drops(text);
        assert_eq!(d.get(&0xC36F), Some(&7));
        assert_eq!(d.get(&0x85E3), Some(&0));
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn sums_metrics_over_label_sets() {
        let text = "# TYPE relay_tx_packets_total counter\n\
            relay_tx_packets_total{shard=\"0\"} 10\n\
            relay_tx_packets_total{shard=\"1\"} 5\n\
            relay_tx_packets_total_extra 99\n\
            relay_drops_total{shard=\"0\",reason=\"rate {x}\"} 2\n\
            relay_up 1\n";
        assert_eq!(metric_sum(text, "relay_tx_packets_total"), Some(15.0));
        assert_eq!(metric_sum(text, "relay_drops_total"), Some(2.0));
        assert_eq!(metric_sum(text, "relay_up"), Some(1.0));
        assert_eq!(metric_sum(text, "relay_rx_packets_total"), None);
    }

    #[test]
    fn reads_the_baseline_ready_line_and_names() {
        let a = parse_listen("ready ideal-forwarder listen=127.0.0.1:4000 rooms=1");
        assert_eq!(a, Some("127.0.0.1:4000".parse().unwrap()));
        assert_eq!(Kind::parse("relay/batch"), Some(Kind::RelayBatch));
        assert!(Kind::ALL.iter().all(|k| Kind::parse(k.name()) == Some(*k)));
    }
}
