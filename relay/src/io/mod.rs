//! I/O backends behind one driver contract. Each backend runs one shard's loop on the calling
//! thread: receive a batch, hand every datagram to the engine, send what it decided, fire
//! timers, publish counters, until the stop flag is set.
//!
//! - [`batch`]: recvmmsg/sendmmsg. Runs everywhere. Chat: [`chat_epoll`].
//! - [`uring`]: io_uring with multishot receive into a provided-buffer ring. Chat runs in the
//!   same ring (`chat_uring.rs`, a private module of `uring`).
//!
//! Both backends' chat plumbing shares [`chat_io::ChatCore`]; [`mailbox`] carries messages
//! between shards.
//!
//! `unsafe` lives in this module tree only.

pub mod batch;
pub mod chat_epoll;
pub mod chat_io;
pub mod mailbox;
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

    /// Once per loop turn, after the datagrams: applies pending commands, fires the engine's
    /// timers when due and publishes counters every [`PUBLISH_INTERVAL_US`].
    pub fn housekeeping(&self, engine: &mut Shard, io: &IoCounters, next_publish_us: &mut u64) {
        if let Some(commands) = &self.commands {
            let mut commands = commands.borrow_mut();
            for _ in 0..MAX_COMMANDS_PER_TURN {
                let Some(cmd) = commands.pop() else { break };
                engine.handle_command(cmd);
            }
        }
        let now = self.now();
        if now.mono_us >= engine.poll_timeout() {
            engine.handle_timeout(now);
        }
        if now.mono_us >= *next_publish_us {
            self.stats.publish(engine, io);
            *next_publish_us = now.mono_us + PUBLISH_INTERVAL_US;
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
    pub const FIELDS: [&'static str; 12] = [
        "rx_packets",
        "rx_bytes",
        "tx_packets",
        "tx_bytes",
        "tx_errors",
        "rx_truncated",
        "syscalls",
        "stun_replies",
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
