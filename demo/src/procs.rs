//! The real ctl and relay processes the demo runs: started from the release binaries beside
//! the demo's own, each with its log in the temporary directory, and stopped with SIGTERM
//! (then SIGKILL after a bound) so that the relay flushes its chat log as it would in service.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a process may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a process may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A started process and the `key=value` fields of its ready line.
pub struct Proc {
    name: String,
    child: Child,
    ready: String,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stderr to `log`, and waits for its first stdout line, `ready ...`.
    pub fn start(name: &str, mut cmd: Command, log: &Path) -> Result<Self, String> {
        let err = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        // Its own process group: a Ctrl-C reaches only the demo, which stops the processes in
        // order and reports how they exited.
        let mut child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {name} ({cmd:?}): {e}"))?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the ready line, then drains stdout so the process never blocks on it.
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        let mut p = Self {
            name: name.to_string(),
            child,
            ready: String::new(),
            log: log.to_path_buf(),
        };
        match rx.recv_timeout(READY_TIMEOUT) {
            Ok(Some(Ok(line))) if line.starts_with("ready ") => {
                p.ready = line;
                Ok(p)
            }
            other => {
                p.stop();
                Err(format!(
                    "{name} did not start ({other:?}); its log:\n{}",
                    p.log_tail(20)
                ))
            }
        }
    }

    /// Field `key` of the ready line.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    }

    /// The ready line.
    pub fn ready_line(&self) -> &str {
        &self.ready
    }

    /// The last `n` lines of the process's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Whether it is still running.
    /// The process id.
    /// The name it was started with.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]; returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        if !self.alive() {
            return self
                .child
                .try_wait()
                .ok()
                .flatten()
                .is_some_and(|s| s.success());
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "demo: {} ignored SIGTERM for {STOP_TIMEOUT:?}; killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The directory the demo's binaries live in (the demo's own, i.e. `target/release`).
pub fn bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target/release"))
}

/// A binary beside the demo, or a clear error naming the build command.
pub fn binary(name: &str) -> Result<PathBuf, String> {
    let p = bin_dir().join(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "{} not found; build it with `cargo build --release -p {name}` (or run `cargo xtask demo`)",
            p.display()
        ))
    }
}

/// A base port such that `n` consecutive UDP ports and `n` consecutive TCP ports right above
/// them are free on `ip` now. Starts from a pid-dependent place so that parallel demos differ.
pub fn free_ports(ip: &str, n: u16) -> Result<(u16, u16), String> {
    let start = 41_000 + (std::process::id() % 200) as u16 * 40;
    for k in 0..200u16 {
        let base = 41_000 + (start - 41_000 + k * 40) % 8_000;
        let chat = base + n;
        let udp_free = (0..n).all(|i| UdpSocket::bind((ip, base + i)).is_ok());
        let tcp_free = (0..n).all(|i| TcpListener::bind((ip, chat + i)).is_ok());
        if udp_free && tcp_free {
            return Ok((base, chat));
        }
    }
    Err(format!(
        "no {n} free UDP and TCP ports on {ip} between 41000 and 49000"
    ))
}

/// Parses a `host:port` field of a ready line.
pub fn addr(p: &Proc, key: &str) -> Result<SocketAddr, String> {
    p.field(key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no {key}=ADDR in {:?}", p.ready_line()))
}

/// A fresh temporary directory for this run; removed by [`TempDir`]'s drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/relay-demo-<pid>`.
    pub fn new() -> Result<Self, String> {
        let p = std::env::temp_dir().join(format!("relay-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
