//! Servers the harness starts: the relay with chat, nats-server and redis-server. Each is
//! owned by a guard that kills it (and removes its temporary directory) when dropped, also on
//! an error path.

use super::wire;
use anyhow::{bail, Context as _};
use ed25519_dalek::SigningKey;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// The CPUs every server this harness starts is restricted to (`chatperf run --split-cores`);
/// unset, servers inherit the harness's own mask.
static SERVER_CPUS: OnceLock<Vec<usize>> = OnceLock::new();

/// The CPUs the calling thread may run on, in order.
pub fn own_cpus() -> anyhow::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is a plain bit array that sched_getaffinity fills; CPU_ISSET reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect())
    }
}

fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: as in `own_cpus`; CPU_SET writes inside the set for cpu < CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(c, &mut set);
        }
        set
    }
}

/// Restricts the calling thread, and the threads it starts afterwards, to `cpus`.
pub fn pin_self(cpus: &[usize]) -> anyhow::Result<()> {
    let set = cpu_set(cpus);
    // SAFETY: passes a live cpu_set_t and its size.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Starts every later server on `cpus` only (called once, before any server starts).
pub fn set_server_cpus(cpus: Vec<usize>) -> anyhow::Result<()> {
    SERVER_CPUS
        .set(cpus)
        .map_err(|_| anyhow::anyhow!("server CPUs already set"))
}

/// A fresh temporary directory for one server.
pub fn temp_dir(tag: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "chatperf-{}-{tag}-{}",
        std::process::id(),
        NEXT_DIR.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// `n` consecutive free loopback TCP ports (and, with `udp`, UDP ports too).
pub fn free_ports(n: u16, udp: bool) -> anyhow::Result<u16> {
    for _ in 0..200 {
        let probe = TcpListener::bind("127.0.0.1:0")?;
        let p = probe.local_addr()?.port();
        drop(probe);
        if p.checked_add(n).is_none() {
            continue;
        }
        let ok = (p..p + n).all(|q| {
            let t = TcpListener::bind(("127.0.0.1", q)).is_ok();
            let u = !udp || UdpSocket::bind(("127.0.0.1", q)).is_ok();
            t && u
        });
        if ok {
            return Ok(p);
        }
    }
    bail!("no {n} consecutive free loopback ports")
}

/// A child process killed on drop.
pub struct Proc {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
}

impl Proc {
    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of the child's stderr (for error messages).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    /// Fails if the child has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("exited with {status}; log:\n{}", self.log_tail());
        }
        Ok(())
    }

    fn spawn(mut cmd: Command, dir: PathBuf, stdout: Stdio) -> anyhow::Result<Self> {
        let log = dir.join("stderr.log");
        let err = std::fs::File::create(&log)?;
        if let Some(cpus) = SERVER_CPUS.get() {
            let set = cpu_set(cpus);
            // SAFETY: between fork and exec the closure only makes one system call with a
            // set built before the fork (async-signal-safe, no allocation).
            unsafe {
                cmd.pre_exec(move || {
                    if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        Ok(Self { child, dir, log })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The relay's log counters (`relay_chat_*_total`), summed over shards.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogCounters {
    /// Records committed.
    pub records: u64,
    /// Commits (each one fdatasync).
    pub commits: u64,
    /// Entries sequenced (messages and receipts).
    pub accepted: u64,
    /// Microseconds in fdatasync.
    pub sync_us: u64,
    /// Microseconds batches were held from hand-off to the sync thread to release.
    pub commit_us: u64,
}

/// A relay with chat enabled, on a temporary data directory.
pub struct Relay {
    /// The process.
    pub proc: Proc,
    /// Chat port of shard 0.
    pub chat_port: u16,
    /// Shards.
    pub shards: u16,
    /// Prometheus endpoint.
    pub metrics: SocketAddr,
    /// The key tokens are signed with.
    pub key: SigningKey,
}

impl Relay {
    /// Starts `bin` with `shards` shards and the `[chat]` settings of `chat_toml` and waits for
    /// its `ready` line.
    pub fn start(bin: &Path, io: &str, shards: u16, chat_toml: &str) -> anyhow::Result<Self> {
        Self::spawn(bin, io, shards, chat_toml, None)?.ready()
    }

    /// Starts `bin` as one of a cluster when `linked` is given (ctl's address, the relay's id
    /// and its own loopback address); [`Starting::ready`] waits for it.
    pub fn spawn(
        bin: &Path,
        io: &str,
        shards: u16,
        chat_toml: &str,
        linked: Option<(SocketAddr, u32, std::net::Ipv4Addr)>,
    ) -> anyhow::Result<Starting> {
        Self::spawn_in(Command::new(bin), io, shards, chat_toml, linked)
    }

    /// [`Relay::spawn`] with `cmd` running the binary (in a network namespace, say).
    pub fn spawn_in(
        mut cmd: Command,
        io: &str,
        shards: u16,
        chat_toml: &str,
        linked: Option<(SocketAddr, u32, std::net::Ipv4Addr)>,
    ) -> anyhow::Result<Starting> {
        let dir = temp_dir("relay")?;
        let cfg = dir.join("relay.toml");
        std::fs::write(&cfg, format!("[chat]\n{chat_toml}\n"))?;
        let key = test_key();
        let host = linked
            .map_or(std::net::Ipv4Addr::LOCALHOST, |l| l.2)
            .to_string();
        let chat_port = free_ports(shards, false)?;
        let base_port = free_ports(shards, true)?;
        cmd.args(["--config", cfg.to_str().context("utf-8 path")?])
            .args(["--io", io, "--shards", &shards.to_string()])
            .args(["--bind", &host, "--base-port", &base_port.to_string()])
            .args(["--chat-port", &chat_port.to_string()])
            .args([
                "--data-dir",
                dir.join("data").to_str().context("utf-8 path")?,
            ])
            .args([
                "--public-key",
                &proto::token::hex(key.verifying_key().as_bytes()),
            ])
            .args(["--metrics", &format!("{host}:0"), "--no-pin"]);
        if let Some((ctl, id, _)) = linked {
            cmd.args([
                "--ctl",
                &format!("http://{ctl}"),
                "--relay-id",
                &id.to_string(),
            ])
            .args(["--advertise-host", &host])
            .args(["--link-port", &free_ports(1, false)?.to_string()])
            // ctl's key is the harness's: the relay's credential comes from it.
            .env("RELAY_CTL_TOKEN", proto::token::relay_credential(&key, id));
        }
        let proc = Proc::spawn(cmd, dir, Stdio::piped())?;
        Ok(Starting {
            proc,
            chat_port,
            shards,
            key,
        })
    }
}

/// A relay started and not yet ready (a linked one waits for its cluster to form).
pub struct Starting {
    proc: Proc,
    chat_port: u16,
    shards: u16,
    key: SigningKey,
}

impl Starting {
    /// Waits for the relay's `ready` line.
    pub fn ready(self) -> anyhow::Result<Relay> {
        let Self {
            mut proc,
            chat_port,
            shards,
            key,
        } = self;
        let stdout = proc.child.stdout.take().context("relay stdout")?;
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        // Keep draining stdout so that later prints never block or fail.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let Some((metrics, port)) = wire::ready_fields(&line) else {
            bail!(
                "relay did not print a ready line with chat (got {line:?}); log:\n{}",
                proc.log_tail()
            );
        };
        if port != chat_port {
            bail!("relay chat port {port}, asked {chat_port}");
        }
        Ok(Relay {
            proc,
            chat_port,
            shards,
            metrics,
            key,
        })
    }
}

impl Relay {
    /// The Prometheus text.
    pub fn metrics_text(&self) -> anyhow::Result<String> {
        let mut s = TcpStream::connect_timeout(&self.metrics, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    }

    /// The log's counters, summed over shards.
    pub fn log_counters(&self) -> anyhow::Result<LogCounters> {
        let t = self.metrics_text()?;
        Ok(LogCounters {
            records: wire::metric_sum(&t, "relay_chat_records_total"),
            commits: wire::metric_sum(&t, "relay_chat_commits_total"),
            accepted: wire::metric_sum(&t, "relay_chat_accepted_total"),
            sync_us: wire::metric_sum(&t, "relay_chat_sync_us_total"),
            commit_us: wire::metric_sum(&t, "relay_chat_commit_us_total"),
        })
    }

    /// Bytes the relay has caused to be written to storage (`/proc/<pid>/io`).
    pub fn write_bytes(&self) -> anyhow::Result<u64> {
        let io = std::fs::read_to_string(format!("/proc/{}/io", self.proc.pid()))?;
        wire::io_write_bytes(&io).context("no write_bytes")
    }

    /// The relay's resident set, bytes.
    pub fn rss(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid()))?;
        wire::vm_rss(&status).context("no VmRSS")
    }
}

/// ctl, holding the harness's key (so that the tokens the harness signs are ctl's), forming a
/// cluster of `relays` linked relays.
pub struct Ctl {
    /// The process (killed on drop).
    _proc: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Ctl {
    /// Starts `bin` (`ctl serve`) and waits for its `ready` line.
    pub fn start(bin: &Path, relays: usize, ip: std::net::Ipv4Addr) -> anyhow::Result<Self> {
        let dir = temp_dir("ctl")?;
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        let key = data.join("ctl.key");
        std::fs::write(
            &key,
            format!("{}\n", proto::token::hex(&test_key().to_bytes())),
        )?;
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let cfg = dir.join("ctl.toml");
        std::fs::write(&cfg, format!("cluster_relays = {relays}\n"))?;
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--config", cfg.to_str().context("utf-8 path")?])
            .args(["--listen", &format!("{ip}:0")])
            .args(["--data-dir", data.to_str().context("utf-8 path")?]);
        let mut proc = Proc::spawn(cmd, dir, Stdio::piped())?;
        let stdout = proc.child.stdout.take().context("ctl stdout")?;
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("listen=")?.parse().ok())
            .with_context(|| format!("ctl printed {line:?}; log:\n{}", proc.log_tail()))?;
        Ok(Self { _proc: proc, addr })
    }
}

/// The key the harness's relays trust (a fixed test key: the harness and its client processes
/// sign tokens with it).
pub fn test_key() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

/// The chat address of `user`'s home shard on a relay whose shard 0 listens on `chat_port`.
pub fn chat_addr(chat_port: u16, shards: u16, user: u64) -> SocketAddr {
    let shard = proto::chat::ids::home_shard(user, shards);
    SocketAddr::from(([127, 0, 0, 1], chat_port + shard))
}

/// A chat token for `user` on a relay of `shards` shards.
pub fn token(key: &SigningKey, user: u64, shards: u16) -> String {
    use proto::token::{Claims, Permissions, TokenKind};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Claims {
        kind: TokenKind::User,
        permissions: Permissions::CHAT,
        relay_id: 0,
        shard_idx: proto::chat::ids::home_shard(user, shards),
        expires_at: now + 3600,
        scope_id: user,
        participant_id: user,
    }
    .sign_text(key)
}

/// Finds `name` in PATH, /usr/sbin or /usr/bin.
pub fn find_bin(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

/// A pub/sub server (NATS or Redis) on a loopback port.
pub struct PubSub {
    /// The process (killed on drop).
    proc: Proc,
    /// Its port.
    pub port: u16,
}

impl PubSub {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// `nats-server -a 127.0.0.1 -p PORT`.
    pub fn nats(bin: &Path) -> anyhow::Result<Self> {
        let port = free_ports(1, false)?;
        let mut cmd = Command::new(bin);
        cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
        Self::wait(Proc::spawn(cmd, temp_dir("nats")?, Stdio::null())?, port)
    }

    /// `redis-server --port PORT --save '' --appendonly no`.
    pub fn redis(bin: &Path) -> anyhow::Result<Self> {
        let port = free_ports(1, false)?;
        let dir = temp_dir("redis")?;
        let mut cmd = Command::new(bin);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--dir", dir.to_str().context("utf-8 path")?]);
        Self::wait(Proc::spawn(cmd, dir, Stdio::null())?, port)
    }

    /// `redis-server --port PORT --save '' --appendonly yes --appendfsync always`: every write
    /// is fsync'd before it is answered (the durable peer of the relay's chat).
    pub fn redis_durable(bin: &Path) -> anyhow::Result<Self> {
        let port = free_ports(1, false)?;
        let dir = temp_dir("redis-aof")?;
        let mut cmd = Command::new(bin);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args(["--dir", dir.to_str().context("utf-8 path")?]);
        Self::wait(Proc::spawn(cmd, dir, Stdio::null())?, port)
    }

    fn wait(mut proc: Proc, port: u16) -> anyhow::Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            proc.check_alive()?;
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(Self { proc, port });
            }
            if Instant::now() > deadline {
                bail!(
                    "not listening on {port} after 10 s; log:\n{}",
                    proc.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
