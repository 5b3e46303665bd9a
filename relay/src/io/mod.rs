//! The shard's I/O. [`shard_loop::ShardLoop`] runs one shard's turn on the calling thread,
//! the same for every backend: wait, hand every datagram to the media engine and send what it
//! decided, hand chat's bytes to the chat core, commit, write, fire timers, publish counters,
//! until the stop flag is set. A backend is a [`shard_loop::Transport`]:
//!
//! - [`batch`]: recvmmsg/sendmmsg. Runs everywhere. Chat: [`chat_epoll`].
//! - [`uring`]: io_uring with multishot receive into a provided-buffer ring. Chat runs in the
//!   same ring (`chat_uring.rs`, a private module of `uring`).
//!
//! Chat's core, [`chat_io::ChatCore`], is the loop's and generic over its [`storage::Storage`]
//! (the log with its sync thread in the relay, memory with seeded faults in the simulation,
//! `io/sim.rs`, whose transport plays clients and faults in virtual time); [`mailbox`] carries
//! messages between shards.
//!
//! `unsafe` lives in this module tree only.
//!
//! # Choosing a backend, chat on io_uring, stopping
//!
//! `--io auto|uring|batch`. `auto` selects **batch**, because our benchmark shows it cheaper
//! (perf/RESULTS.md, 1 -> 10 fan-out, medians of 3 runs in one invocation): batch reached 0.96x
//! the ideal forwarder's zero-loss egress against 0.91x for uring, spent 17 ns of user CPU per
//! egress packet against 26, and had a lower p99 at half load (226 us against 526 us); uring made
//! fewer system calls (0.009 against 0.016 per egress packet), which does not pay for itself at
//! these batch sizes. This matches DESIGN.md's warning (mediasoup, liburing#844). `auto` still
//! probes io_uring and logs whether it would have been available and why not (`io_uring_setup`
//! errors: seccomp, the `kernel.io_uring_disabled` sysctl, RLIMIT_MEMLOCK). Both backends serve
//! chat; `auto` picks batch for it too.
//!
//! **Chat on io_uring** (`io/chat_uring.rs`) shares the shard's one ring with the media path: 8
//! single-shot ACCEPTs on the listener (each with its own address buffer, since the socket is a
//! direct descriptor and has no `getpeername`), a multishot RECV per connection into chat's own
//! provided-buffer ring (buffer group 1, 512 buffers of 4 KiB per shard; the datagrams keep group
//! 0), one SEND of at most 64 KiB in flight per connection (copied out of the engine's output, which
//! may grow and move while the kernel reads; the engine learns what was written from the
//! completion; EAGAIN or a zero-length send waits for POLLOUT first), and a multishot POLL_ADD on
//! the shard's waker eventfd. Completions only queue work; once per loop turn, after the
//! datagrams, chat's completions and then the received bytes go to the core in arrival order (the
//! end of a stream after its last bytes), `ChatCore::end_turn` commits, and only then are sends,
//! receive re-arms and cancels queued. A multishot operation that ends (ENOBUFS when the buffer
//! ring runs dry, or the kernel's choice) is re-armed; while cross-shard messages spill, received
//! buffers are held and not re-armed, which is the same backpressure as batch's paused reads. A
//! closed connection stays in the table with its receive and send cancelled until both have
//! completed; only then is its slot closed, so no slot is reused under an operation.
//!
//! Accepted sockets are **direct descriptors**: the accept puts them straight into the ring's
//! registered-file table (`IORING_FILE_INDEX_ALLOC`), every operation names them by slot, and they
//! never enter the process's descriptor table. The table has `max_conns` + 128 slots, capped by
//! `RLIMIT_NOFILE`, which the kernel applies per ring: so a relay of N shards on io_uring holds up
//! to N x (`RLIMIT_NOFILE` - 64) chat connections, where batch holds `RLIMIT_NOFILE` in all (this is how
//! `chatperf idle-memory --io uring --shards 4` reaches 50,000 under a hard limit of 20,000). A slot
//! is closed with IORING_OP_CLOSE among the turn's SQEs (no syscall of its own), after the
//! connections the turn finalized and before the accepts are re-armed. A connection is refused
//! (ERROR 13) when the shard is at `max_conns` or its table is within 64 slots of full; the
//! refused socket is installed as a regular descriptor (IORING_OP_FIXED_FD_INSTALL, Linux 6.8,
//! probed at start; without it the socket is closed without the ERROR) and handed to the same
//! refusal path as batch's. A failed accept (ENFILE, ENOMEM) completes at once, so accepts are
//! re-armed only after 100 ms. TCP_NODELAY is set on the listener and
//! inherited by accepted sockets (tested in `io::sys`). At start the relay raises its soft
//! `RLIMIT_NOFILE` to the hard limit (both backends), so a soft default of 1,024 does not cap chat.
//! Bounds:
//! 131,072 connections per shard (`chat_io::MAX_CONNS`, or fewer by `[chat] max_conns`, both
//! backends; on uring also at most the table less 64; more are accepted, sent ERROR 13, half-closed and drained for up to 1 s),
//! one received entry per buffer plus one end per connection, a to-do queue that holds each
//! connection once, and never the SQ entries the media path may need (`MEDIA_SQ`: chat submits
//! early, and what still does not fit waits a turn). The CQ has room for every chat buffer and
//! 512 more completions; beyond that (a burst of disconnects) completions wait in the kernel's
//! overflow list (IORING_FEAT_NODROP, checked at start-up). At exit one cancel covers every
//! operation in the ring and the memory is freed only after the drain.
//!
//! **Stopping with chat** (both backends). When the stop flag is set, the shard does not leave its
//! loop at once: the first `ChatCore::stop_turn` queues ERROR 13 ("the relay is stopping; reconnect") after
//! every session's output, marks the sessions closing (their input is ignored from then on) and
//! refuses new connections; the loop goes on, committing and writing as usual, until every chat
//! connection has been flushed and closed or `chat_io::STOP_DRAIN_US` (250 ms) has passed. Clients
//! thus tell a planned stop from a crash (PROTOCOL.md 7.2).
//!

pub mod batch;
pub mod chat_epoll;
pub mod chat_io;
pub mod link;
pub mod mailbox;
pub mod shard_loop;
#[cfg(test)]
mod sim;
pub mod storage;
pub mod syncer;
pub mod sys;
pub mod uring;

use crate::engine::{Command, Now, Shard};
use crate::ring::Consumer;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Which backend a shard runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// io_uring.
    Uring,
    /// recvmmsg/sendmmsg.
    Batch,
}

impl Backend {
    /// The name used in flags, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Uring => "uring",
            Self::Batch => "batch",
        }
    }
}

/// Largest datagram the relay receives; longer ones are truncated by the kernel and dropped.
pub const MAX_DATAGRAM: usize = 2048;
/// Datagrams received per batch.
pub const RX_BATCH: usize = 64;
/// Copies queued per send batch (one sendmmsg or one submission).
pub const TX_BATCH: usize = 1024;
/// Receive batches per loop turn before timers and stop are checked again.
pub const MAX_BATCHES_PER_TURN: usize = 16;
/// Longest wait for input, so that stop requests and timers are noticed promptly.
pub const MAX_WAIT_MS: u64 = 50;

/// Driver-side counters that the engine cannot see.
#[derive(Clone, Copy, Debug, Default)]
pub struct IoCounters {
    /// Datagrams sent.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Sends the kernel refused.
    pub tx_errors: u64,
    /// Datagrams dropped because they were longer than [`MAX_DATAGRAM`].
    pub rx_truncated: u64,
    /// System calls made by the loop.
    pub syscalls: u64,
}

/// What a shard thread shares with the control thread: the stop flag and published counters.
pub struct ShardCtx {
    /// Index of the shard.
    pub shard_idx: u16,
    /// Set by the control thread to end the loop.
    pub stop: Arc<AtomicBool>,
    /// Snapshot of counters, written by the shard thread only.
    pub stats: Arc<ShardStats>,
    /// Monotonic origin of the engine's clock.
    pub origin: Instant,
    /// Commands from the control thread, if it sends any.
    commands: Option<RefCell<Consumer<Command>>>,
}

/// Commands applied per loop turn at most; the rest wait for the next turn.
pub const MAX_COMMANDS_PER_TURN: usize = 64;

impl ShardCtx {
    /// A context without a command channel.
    pub fn new(
        shard_idx: u16,
        stop: Arc<AtomicBool>,
        stats: Arc<ShardStats>,
        origin: Instant,
    ) -> Self {
        Self {
            shard_idx,
            stop,
            stats,
            origin,
            commands: None,
        }
    }

    /// Adds the receiving end of the control thread's command ring.
    pub fn with_commands(mut self, commands: Consumer<Command>) -> Self {
        self.commands = Some(RefCell::new(commands));
        self
    }

    /// Once per loop turn, after the datagrams and chat: applies pending commands and fires the
    /// media engine's timers when due.
    pub fn housekeeping(&self, engine: &mut Shard, now: Now) {
        if let Some(commands) = &self.commands {
            let mut commands = commands.borrow_mut();
            for _ in 0..MAX_COMMANDS_PER_TURN {
                let Some(cmd) = commands.pop() else { break };
                engine.handle_command(cmd);
            }
        }
        if now.mono_us >= engine.poll_timeout() {
            engine.handle_timeout(now);
        }
    }

    /// The engine's view of the current time.
    #[inline]
    pub fn now(&self) -> Now {
        let unix_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Now {
            mono_us: self.origin.elapsed().as_micros() as u64,
            unix_s,
        }
    }

    /// Whether the loop should end.
    #[inline]
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// Counters one shard publishes for the metrics endpoint. Written only by the shard thread,
/// every [`PUBLISH_INTERVAL_US`] and at exit, never per packet; padded so that two shards'
/// snapshots never share a cache line.
#[repr(align(128))]
#[derive(Default)]
pub struct ShardStats {
    /// Engine and driver counters, flattened; see [`ShardStats::FIELDS`].
    values: [AtomicU64; ShardStats::FIELDS.len() + crate::engine::DropReason::ALL.len()],
    /// Chat counters; see [`ShardStats::CHAT_FIELDS`].
    chat: [AtomicU64; ShardStats::CHAT_FIELDS.len()],
}

/// The chat counters' values, in [`ShardStats::CHAT_FIELDS`] order.
pub type ChatValues = [u64; ShardStats::CHAT_FIELDS.len()];

/// How often a shard publishes its counters.
pub const PUBLISH_INTERVAL_US: u64 = 100_000;

impl ShardStats {
    /// Names of the scalar counters, in storage order; drops by reason follow them.
    pub const FIELDS: [&'static str; 13] = [
        "rx_packets",
        "rx_bytes",
        "tx_packets",
        "tx_bytes",
        "tx_errors",
        "rx_truncated",
        "syscalls",
        "stun_replies",
        "stun_challenges",
        "bindings_expired",
        "rtcp_consumed",
        "rooms",
        "participants",
    ];

    /// Names of the chat counters, in storage order.
    pub const CHAT_FIELDS: [&'static str; 15] = [
        "chat_sessions",
        "chat_pending",
        "chat_accepted",
        "chat_commits",
        "chat_records",
        "chat_log_bytes",
        "chat_errors",
        "chat_deferred",
        "chat_dedup_early_evictions",
        "chat_refused",
        "chat_spilled",
        "chat_spill_depth",
        "chat_sync_us",
        "chat_commit_us",
        "chat_chats",
    ];

    /// Publishes the chat counters, in [`ShardStats::CHAT_FIELDS`] order.
    pub fn publish_chat(&self, values: ChatValues) {
        for (slot, v) in self.chat.iter().zip(values) {
            slot.store(v, Ordering::Relaxed);
        }
    }

    /// Publishes a snapshot.
    pub fn publish(&self, engine: &Shard, io: &IoCounters) {
        let c = engine.counters();
        let scalars = [
            c.rx_packets,
            c.rx_bytes,
            io.tx_packets,
            io.tx_bytes,
            io.tx_errors,
            io.rx_truncated,
            io.syscalls,
            c.stun_replies,
            c.challenges,
            c.bindings_expired,
            c.rtcp_consumed,
            engine.n_rooms() as u64,
            engine.n_participants() as u64,
        ];
        for (slot, v) in self.values.iter().zip(scalars.iter().chain(c.drops.iter())) {
            slot.store(*v, Ordering::Relaxed);
        }
    }

    /// Publishes the engine's final counters, keeping the driver's last published ones.
    pub fn publish_final(&self, engine: &Shard) {
        let io = IoCounters {
            tx_packets: self.get("tx_packets").unwrap_or(0),
            tx_bytes: self.get("tx_bytes").unwrap_or(0),
            tx_errors: self.get("tx_errors").unwrap_or(0),
            rx_truncated: self.get("rx_truncated").unwrap_or(0),
            syscalls: self.get("syscalls").unwrap_or(0),
        };
        self.publish(engine, &io);
    }

    /// The value of scalar counter `name`.
    pub fn get(&self, name: &str) -> Option<u64> {
        if let Some(i) = Self::CHAT_FIELDS.iter().position(|f| *f == name) {
            return Some(self.chat[i].load(Ordering::Relaxed));
        }
        let i = Self::FIELDS.iter().position(|f| *f == name)?;
        Some(self.values[i].load(Ordering::Relaxed))
    }

    /// Drops published for each reason, in `DropReason::ALL` order.
    pub fn drops(&self) -> impl Iterator<Item = u64> + '_ {
        self.values[Self::FIELDS.len()..]
            .iter()
            .map(|v| v.load(Ordering::Relaxed))
    }
}

/// Probes whether io_uring can be used here; the error says why not.
pub fn probe_uring() -> Result<(), String> {
    uring::probe()
}
