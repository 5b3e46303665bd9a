//! Thread-per-core runtime: one pinned thread per shard, each with its own UDP socket
//! (`base_port + shard_idx`), its own engine and its own I/O backend instance.

use crate::chat::msg::Place;
use crate::config::{Config, IoChoice};
use crate::ctl_client::ClusterView;
use crate::engine::{Command, EngineConfig, Shard};
use crate::error::{Error, ShardError};
use crate::io::{self, Backend, ShardCtx, ShardStats};
use crate::ring::{self, Producer};
use proto::token::TokenVerifier;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// A running relay: its shard threads and what they share with the control thread.
pub struct Relay {
    /// The backend every shard runs.
    pub backend: Backend,
    /// Why that backend was chosen.
    pub backend_reason: String,
    /// Each shard's published counters.
    pub stats: Vec<Arc<ShardStats>>,
    /// Each shard's bound UDP address.
    pub addrs: Vec<SocketAddr>,
    /// Command rings to each shard, in shard order; taken by the control-plane client.
    pub commands: Vec<Producer<Command>>,
    /// The origin of the shards' monotonic clock (`engine::Now::mono_us` counts from it).
    pub origin: Instant,
    /// The link thread's directory (kept current by the control thread) and counters, when
    /// the relay is one of a cluster.
    pub links: Option<(Arc<Mutex<io::link::Directory>>, Arc<io::link::LinkStats>)>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<(), ShardError>>>,
}

/// Commands queued per shard at most; a full ring makes the sender retry on its next round.
pub const COMMAND_RING_CAPACITY: usize = 1024;

/// Chooses the backend: an explicit choice must work; `auto` takes `batch`, the faster one on
/// our benchmark (perf/RESULTS.md), and says whether io_uring would have been available.
pub fn choose_backend(choice: IoChoice) -> Result<(Backend, String), Error> {
    match choice {
        IoChoice::Batch => Ok((Backend::Batch, "requested with --io batch".into())),
        IoChoice::Uring => match io::probe_uring() {
            Ok(()) => Ok((Backend::Uring, "requested with --io uring".into())),
            Err(e) => Err(Error::host(
                "--io uring: io_uring unavailable",
                std::io::Error::new(std::io::ErrorKind::Unsupported, e),
            )),
        },
        IoChoice::Auto => {
            let uring = match io::probe_uring() {
                Ok(()) => "io_uring available".to_string(),
                Err(e) => format!("io_uring unavailable: {e}"),
            };
            Ok((
                Backend::Batch,
                format!("auto: batch is the default backend ({uring})"),
            ))
        }
    }
}

impl Relay {
    /// Binds every shard's socket and starts the shard threads; with `cluster` (a linked
    /// relay), the link thread too.
    pub fn start(cfg: &Config, cluster: Option<&ClusterView>) -> Result<Self, Error> {
        let (backend, backend_reason) = choose_backend(cfg.io)?;
        let key_hex = cfg.public_key.as_deref().ok_or_else(|| {
            Error::Config("no public key configured (public_key or --public-key)".into())
        })?;
        let key = proto::token::public_key_from_hex(key_hex).ok_or_else(|| {
            Error::Config("public key is not 64 hex digits of a valid Ed25519 key".into())
        })?;
        let verifier = TokenVerifier::new(key, cfg.relay_id);
        let n_shards = if cfg.shards == 0 {
            io::sys::available_cpus()
        } else {
            cfg.shards
        };
        if n_shards > usize::from(u16::MAX) || usize::from(cfg.base_port) + n_shards > 65_536 {
            return Err(Error::Config(format!(
                "{n_shards} shards do not fit above port {}",
                cfg.base_port
            )));
        }
        let mut mailboxes = match cfg.chat.port {
            Some(_) => io::mailbox::mailboxes(n_shards, cfg.chat.ring_capacity)
                .map_err(|e| Error::host("eventfd", e))?,
            None => Vec::new(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        // A linked relay: its number is its id; the link thread takes the other relays' chat.
        let (places, links) = match (cluster, cfg.chat.link_port, cfg.chat.port) {
            (Some(c), Some(port), Some(_)) => {
                let me = u8::try_from(cfg.relay_id)
                    .map_err(|_| Error::Config("a linked relay's id is 1 to 255".into()))?;
                // The owner list names this relay's shards as they were when the cluster
                // formed: a relay restarted with fewer cannot serve the chats it owns.
                if let Some(a) = c.owners.iter().find(|&&a| {
                    crate::chat::msg::addr_relay(a) == me
                        && usize::from(crate::chat::msg::addr_shard(a)) >= n_shards
                }) {
                    return Err(Error::Config(format!(
                        "this relay owns the chats of its shard {} (ctl fixed the cluster's \
                         owners), but runs {n_shards} shards: give it at least {}",
                        crate::chat::msg::addr_shard(*a),
                        crate::chat::msg::addr_shard(*a) + 1
                    )));
                }
                let owners: Arc<[u16]> = c.owners.iter().copied().collect();
                let hub = io::mailbox::link_ports(&mut mailboxes, me, cfg.chat.ring_capacity)
                    .map_err(|e| Error::host("eventfd", e))?;
                let addr = SocketAddr::new(cfg.bind, port);
                let listener = std::net::TcpListener::bind(addr)
                    .map_err(|e| Error::host(format!("cannot bind TCP {addr}"), e))?;
                let dir = Arc::new(Mutex::new(c.directory()));
                let link_stats = Arc::new(io::link::LinkStats::default());
                let links = io::link::Links::new(
                    hub,
                    listener,
                    dir.clone(),
                    verifier.clone(),
                    me,
                    owners.clone(),
                    link_stats.clone(),
                    stop.clone(),
                )
                .map_err(|e| Error::host("link listener", e))?;
                std::thread::Builder::new()
                    .name("links".into())
                    .spawn(move || links.run())
                    .map_err(|e| Error::host("cannot spawn the link thread", e))?;
                let places = (0..n_shards)
                    .map(|s| Place {
                        addr: crate::chat::msg::addr(me, s as u16),
                        n_local: n_shards as u16,
                        owners: owners.clone(),
                    })
                    .collect();
                (places, Some((dir, link_stats)))
            }
            _ => (
                (0..n_shards)
                    .map(|s| Place::standalone(s as u16, n_shards as u16))
                    .collect::<Vec<_>>(),
                None,
            ),
        };
        let mut places = places.into_iter();
        let mut mailboxes = mailboxes.into_iter();
        let origin = Instant::now();
        let allowed = io::sys::process_cpus();
        let mut relay = Relay {
            backend,
            backend_reason,
            stats: Vec::new(),
            addrs: Vec::new(),
            commands: Vec::new(),
            origin,
            links,
            stop: stop.clone(),
            threads: Vec::new(),
        };
        for shard_idx in 0..n_shards {
            let port = cfg.base_port + shard_idx as u16;
            let socket = bind(SocketAddr::new(cfg.bind, port), cfg.socket_buffer_bytes)?;
            relay.addrs.push(
                socket
                    .local_addr()
                    .map_err(|e| Error::host("getsockname", e))?,
            );
            let stats = Arc::new(ShardStats::default());
            relay.stats.push(stats.clone());
            let (producer, consumer) = ring::ring(COMMAND_RING_CAPACITY);
            relay.commands.push(producer);
            let ctx = ShardCtx::new(shard_idx as u16, stop.clone(), stats, origin)
                .with_commands(consumer);
            let chat = match cfg.chat.port {
                Some(base) => Some(chat_parts(
                    cfg,
                    &verifier,
                    base,
                    shard_idx,
                    places.next().expect("one place per shard"),
                    mailboxes.next().expect("one mailbox per shard"),
                )?),
                None => None,
            };
            let engine_cfg = cfg.engine();
            let verifier = verifier.clone();
            // Within the CPUs the process may use (systemd's CPUAffinity=, taskset).
            let pin = cfg.pin.then(|| allowed[shard_idx % allowed.len()]);
            let thread = std::thread::Builder::new()
                .name(format!("shard-{shard_idx}"))
                .spawn(move || run_shard(backend, engine_cfg, verifier, socket, ctx, pin, chat))
                .map_err(|e| Error::host("cannot spawn shard thread", e))?;
            relay.threads.push(thread);
        }
        Ok(relay)
    }

    /// Asks every shard to stop and waits for them. Returns the first shard error.
    pub fn shutdown(self) -> Result<(), Error> {
        self.stop.store(true, Ordering::Relaxed);
        let mut result = Ok(());
        for (i, t) in self.threads.into_iter().enumerate() {
            let r = match t.join() {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.into_error(i as u16)),
                Err(_) => Err(Error::Bug(format!("shard {i} panicked"))),
            };
            result = result.and(r);
        }
        result
    }

    /// Whether any shard thread has ended (which only happens on error or stop).
    pub fn any_shard_finished(&self) -> bool {
        self.threads.iter().any(JoinHandle::is_finished)
    }
}

/// Binds shard `shard_idx`'s chat listener and prepares its log directory.
fn chat_parts(
    cfg: &Config,
    verifier: &TokenVerifier,
    base: u16,
    shard_idx: usize,
    place: Place,
    mailbox: io::mailbox::Mailbox,
) -> Result<io::chat_io::ChatParts, Error> {
    let port = usize::from(base) + shard_idx;
    let port =
        u16::try_from(port).map_err(|_| Error::Config(format!("chat port {port} out of range")))?;
    let addr = SocketAddr::new(cfg.bind, port);
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| Error::host(format!("cannot bind TCP {addr}"), e))?;
    let dir = cfg.chat.data_dir.join(format!("shard-{shard_idx}"));
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::host(format!("cannot create {}", dir.display()), e))?;
    let engine = crate::chat::ChatShard::at(place, cfg.chat.engine(), verifier.clone());
    let sync = if cfg.chat.sync {
        crate::chat::log::SyncMode::Data
    } else {
        crate::chat::log::SyncMode::None
    };
    let log = crate::chat::log::LogConfig {
        sync,
        segment_bytes: cfg.chat.segment_bytes,
        ..Default::default()
    };
    Ok(io::chat_io::ChatParts {
        engine,
        dir,
        log,
        sync_thread: cfg.chat.sync_thread,
        max_conns: cfg.chat.max_conns,
        listener,
        mailbox,
    })
}

fn bind(addr: SocketAddr, buffer_bytes: usize) -> Result<UdpSocket, Error> {
    let socket =
        UdpSocket::bind(addr).map_err(|e| Error::host(format!("cannot bind UDP {addr}"), e))?;
    let fd = socket.as_raw_fd();
    // Best effort: the kernel caps these at net.core.{r,w}mem_max (see `cargo xtask tune`).
    for (opt, name) in [
        (libc::SO_RCVBUF, "SO_RCVBUF"),
        (libc::SO_SNDBUF, "SO_SNDBUF"),
    ] {
        if let Err(e) = io::sys::set_buffer(fd, opt, buffer_bytes) {
            eprintln!("relay: warning: {name} on {addr}: {e}");
        }
    }
    Ok(socket)
}

fn run_shard(
    backend: Backend,
    cfg: EngineConfig,
    verifier: TokenVerifier,
    socket: UdpSocket,
    ctx: ShardCtx,
    pin: Option<usize>,
    chat: Option<io::chat_io::ChatParts>,
) -> Result<(), ShardError> {
    if let Some(cpu) = pin {
        if let Err(e) = io::sys::pin_to_cpus(&[cpu]) {
            eprintln!(
                "relay: warning: shard {} not pinned to CPU {cpu}: {e}",
                ctx.shard_idx
            );
        }
    }
    let mut engine = Shard::new(cfg, ctx.shard_idx, verifier, ctx.now());
    let result = match backend {
        Backend::Batch => io::batch::run(&mut engine, &socket, &ctx, chat),
        Backend::Uring => io::uring::run(&mut engine, &socket, &ctx, chat),
    };
    ctx.stats.publish_final(&engine);
    result
}
