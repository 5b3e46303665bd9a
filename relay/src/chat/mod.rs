//! Chat on the relay: framed TCP sessions, per-chat ordering, receipts and the durable inbox
//! (DESIGN.md section 5, PROTOCOL.md section 7).
//!
//! Every shard plays two roles. As a **home** ([`home`]) it holds the sessions of the users
//! whose `home_shard` it is. As an **owner** ([`owner`]) it sequences and stores the chats whose
//! `owner_shard` it is. The roles talk through [`msg::ShardMsg`]s: within a shard directly,
//! across shards over bounded SPSC rings. [`ChatShard`] is the sans-IO engine a driver runs:
//!
//! 1. feed input: `handle_accept`, `handle_read`, `handle_closed`, `handle_shard_msgs`,
//!    `handle_timeout`;
//! 2. if `has_records()`: append `take_records()` to the log, commit it (one fdatasync), and
//!    call `handle_committed(lsns)`; mark `take_dead()` in the log;
//! 3. deliver `take_outbox()` to the other shards' rings, write `output(conn)` for every
//!    `take_dirty()` connection and close every `take_closing()` connection once flushed.
//!
//! - [`log`]: the per-shard append-only log with CRC per record and group commit.
//! - [`records`]: what the owner role writes to it.

pub mod client;
mod crc32c;
pub mod dedup;
pub mod home;
pub mod log;
pub mod map;
pub mod msg;
pub mod owner;
pub mod pipeline;
pub mod records;

use crate::engine::Now;
use msg::{ConnId, ShardMsg};
use proto::token::TokenVerifier;
use std::collections::VecDeque;
use std::net::IpAddr;

/// Limits and timers of the chat engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatConfig {
    /// A connection must authenticate within this time.
    pub hello_timeout_us: u64,
    /// MSG frames a session may have unacknowledged before the backlog pauses.
    pub window: u16,
    /// Bytes queued to one session at most.
    pub max_out_bytes: usize,
    /// A session whose output makes no progress for this long is disconnected.
    pub slow_reader_timeout_us: u64,
    /// Requests per second per session.
    pub msgs_per_s: u64,
    /// Burst of requests per session.
    pub msgs_burst: u64,
    /// Stored entries per recipient at most (per owner shard).
    pub max_pending_per_user: usize,
    /// Members per group.
    pub max_group_members: usize,
    /// Connections per remote address.
    pub max_conns_per_ip: u32,
    /// Entries per backlog chunk.
    pub backlog_chunk: usize,
    /// Accepted requests whose (sender, msg id) an owner shard remembers (the last ones), to
    /// answer a retry with the original SENT.
    pub dedup_capacity: usize,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            hello_timeout_us: 5_000_000,
            window: 256,
            max_out_bytes: 1 << 20,
            slow_reader_timeout_us: 10_000_000,
            msgs_per_s: 1_000,
            msgs_burst: 2_000,
            max_pending_per_user: 100_000,
            max_group_members: proto::chat::MAX_GROUP_MEMBERS,
            max_conns_per_ip: 100_000,
            backlog_chunk: 128,
            // 40 MiB of entries and 32 MiB of index per owner shard, once that many
            // requests have passed.
            dedup_capacity: 1 << 20,
        }
    }
}

/// The chat engine of one shard: home and owner roles and the messages between them.
pub struct ChatShard {
    shard: u16,
    home: home::Home,
    owner: owner::Owner,
    local: VecDeque<ShardMsg>,
    outbox: Vec<(u16, ShardMsg)>,
    spare: Spare,
}

/// Emptied lists handed back by the driver (`give_back_*`), swapped in by the next `take_*`:
/// the per-turn lists keep their capacity instead of growing again from nothing every turn.
#[derive(Default)]
struct Spare {
    dead: Vec<u64>,
    outbox: Vec<(u16, ShardMsg)>,
    dirty: Vec<ConnId>,
    closing: Vec<ConnId>,
}

/// `v` emptied, for reuse; a list grown past [`MAX_KEPT_LEN`] (a checkpoint's, say) is freed
/// instead, so that one burst does not stay allocated for good.
fn emptied<T>(mut v: Vec<T>) -> Vec<T> {
    if v.capacity() > MAX_KEPT_LEN {
        return Vec::new();
    }
    v.clear();
    v
}

/// Longest per-turn list kept for reuse.
pub(crate) const MAX_KEPT_LEN: usize = 1 << 16;

impl ChatShard {
    /// The engine of shard `shard` of `n_shards`.
    pub fn new(shard: u16, n_shards: u16, cfg: ChatConfig, verifier: TokenVerifier) -> Self {
        Self {
            shard,
            home: home::Home::new(shard, n_shards, cfg.clone(), verifier),
            owner: owner::Owner::new(shard, n_shards, cfg),
            local: VecDeque::new(),
            outbox: Vec::new(),
            spare: Spare::default(),
        }
    }

    /// Moves what the roles produced to the local queue or the outbox, and runs the local queue
    /// to completion (each step is bounded by the work one message causes).
    fn pump(&mut self, now: Now) {
        loop {
            for (dest, m) in self.home.out.drain(..).chain(self.owner.out.drain(..)) {
                if dest == self.shard {
                    self.local.push_back(m);
                } else {
                    self.outbox.push((dest, m));
                }
            }
            let Some(m) = self.local.pop_front() else {
                break;
            };
            if let Some(next) = self.local.front() {
                self.owner.prefetch(next);
            }
            self.dispatch(m, now);
        }
    }

    fn dispatch(&mut self, m: ShardMsg, now: Now) {
        let now_ms = now.unix_s * 1000;
        match m {
            ShardMsg::Submit(s) => {
                // Unless it goes back with the SENT: a refused SEND's box.
                if let Some(spent) = self.owner.submit(s, now_ms) {
                    self.home.submits.give_back(spent);
                }
            }
            ShardMsg::Ack { .. }
            | ShardMsg::CreateGroup { .. }
            | ShardMsg::ChangeMember { .. }
            | ShardMsg::BacklogStart { .. }
            | ShardMsg::BacklogMore { .. }
            | ShardMsg::BacklogCancel { .. }
            | ShardMsg::ListGroups { .. }
            | ShardMsg::Typing { to: 0, .. } => self.owner.handle(m, now_ms),
            _ => self.home.handle(m),
        }
    }

    /// A new connection.
    pub fn handle_accept(&mut self, now: Now, conn: ConnId, ip: IpAddr) -> bool {
        let ok = self.home.accept(now, conn, ip);
        self.pump(now);
        ok
    }

    /// Bytes received; returns how many were consumed.
    pub fn handle_read(&mut self, now: Now, conn: ConnId, data: &[u8]) -> usize {
        let n = self.home.read(now, conn, data);
        self.pump(now);
        n
    }

    /// The connection is closed.
    pub fn handle_closed(&mut self, now: Now, conn: ConnId) {
        self.home.closed(conn);
        self.pump(now);
    }

    /// Messages from other shards, each ring's in its order: queued first and then handled
    /// together, so that handling one can warm the cache for the next (`Owner::prefetch`).
    /// At most `msgs.len()` more queued messages.
    pub fn handle_shard_msgs(&mut self, now: Now, msgs: impl IntoIterator<Item = ShardMsg>) {
        self.local.extend(msgs);
        self.pump(now);
    }

    /// Timers: HELLO deadlines and slow readers.
    pub fn handle_timeout(&mut self, now: Now) {
        self.home.timeout(now);
        self.pump(now);
    }

    /// Whether records wait to be appended and committed.
    pub fn has_records(&self) -> bool {
        self.owner.has_records()
    }

    /// Records to append, in order; then commit and call [`ChatShard::handle_committed`].
    pub fn take_records(&mut self) -> records::Batch {
        self.owner.take_batch()
    }

    /// A batch from [`ChatShard::take_records`], appended: its buffers serve the next one.
    pub fn give_back_records(&mut self, batch: records::Batch) {
        self.owner.give_back_batch(batch);
    }

    /// The records taken last are durable at these LSNs.
    pub fn handle_committed(&mut self, now: Now, lsns: &[u64]) {
        self.owner.handle_committed(lsns);
        self.pump(now);
    }

    /// LSNs of records that became dead.
    pub fn take_dead(&mut self) -> Vec<u64> {
        std::mem::replace(&mut self.owner.dead, std::mem::take(&mut self.spare.dead))
    }

    /// A list from [`ChatShard::take_dead`], done with.
    pub fn give_back_dead(&mut self, v: Vec<u64>) {
        self.spare.dead = emptied(v);
    }

    /// Messages for other shards.
    pub fn take_outbox(&mut self) -> Vec<(u16, ShardMsg)> {
        std::mem::replace(&mut self.outbox, std::mem::take(&mut self.spare.outbox))
    }

    /// A list from [`ChatShard::take_outbox`], drained.
    pub fn give_back_outbox(&mut self, v: Vec<(u16, ShardMsg)>) {
        self.spare.outbox = emptied(v);
    }

    /// Connections with output to write.
    pub fn take_dirty(&mut self) -> Vec<ConnId> {
        std::mem::replace(&mut self.home.dirty, std::mem::take(&mut self.spare.dirty))
    }

    /// A list from [`ChatShard::take_dirty`], done with.
    pub fn give_back_dirty(&mut self, v: Vec<ConnId>) {
        self.spare.dirty = emptied(v);
    }

    /// The relay is stopping: see [`home::Home::stop_sessions`].
    pub fn stop_sessions(&mut self) {
        self.home.stop_sessions();
    }

    /// Connections to close once flushed.
    pub fn take_closing(&mut self) -> Vec<ConnId> {
        std::mem::replace(
            &mut self.home.closing,
            std::mem::take(&mut self.spare.closing),
        )
    }

    /// A list from [`ChatShard::take_closing`], done with.
    pub fn give_back_closing(&mut self, v: Vec<ConnId>) {
        self.spare.closing = emptied(v);
    }

    /// Output queued for `conn`.
    pub fn output(&self, conn: ConnId) -> &[u8] {
        self.home.output(conn)
    }

    /// `n` bytes of `conn`'s output were written.
    pub fn handle_written(&mut self, now: Now, conn: ConnId, n: usize) {
        self.home.written(now, conn, n);
        self.pump(now);
    }

    /// Replays one recovered log record.
    pub fn replay(&mut self, lsn: u64, kind: u8, payload: &[u8]) -> Result<(), String> {
        self.owner.replay(lsn, kind, payload)
    }

    /// Completes recovery; fails if the records replayed are inconsistent.
    pub fn finish_replay(&mut self) -> Result<(), String> {
        self.owner.finish_replay()
    }

    /// Writes fresh chat snapshots (so old segments can be compacted away), all at once.
    pub fn checkpoint(&mut self) {
        self.owner.checkpoint();
    }

    /// Starts a checkpoint of the chats whose snapshots hold back compaction: see
    /// [`owner::Owner::start_selective_checkpoint`]. Returns whether there is anything to
    /// write.
    pub fn start_selective_checkpoint(&mut self, segment_starts: &[u64]) -> bool {
        self.owner.start_selective_checkpoint(segment_starts)
    }

    /// Snapshots up to `budget` chats of the running checkpoint; whether any remain.
    pub fn checkpoint_step(&mut self, budget: usize) -> bool {
        self.owner.checkpoint_step(budget)
    }

    /// This shard's index.
    pub fn shard(&self) -> u16 {
        self.shard
    }

    /// Stored entries not yet acknowledged by all their recipients.
    pub fn n_pending(&self) -> usize {
        self.owner.n_pending()
    }

    /// Chats owned here (direct chats, and groups until their last member leaves).
    pub fn n_chats(&self) -> usize {
        self.owner.n_chats()
    }

    /// Presence watches kept for users homed here.
    pub fn home_watch_entries(&self) -> usize {
        self.home.n_watch_entries()
    }

    /// Open sessions.
    pub fn n_sessions(&self) -> usize {
        self.home.n_sessions()
    }

    /// Entries accepted.
    pub fn n_accepted(&self) -> u64 {
        self.owner.n_accepted
    }

    /// Request ids the deduplication index forgot before their time (see `dedup`).
    pub fn n_dedup_early_evictions(&self) -> u64 {
        self.owner.n_dedup_early_evictions()
    }

    /// Home-role counters.
    pub fn home_counters(&self) -> &home::HomeCounters {
        &self.home.counters
    }

    /// Submit boxes this shard's home role had to allocate (its pool was empty).
    pub fn submit_boxes_made(&self) -> u64 {
        self.home.submits.made()
    }
}

#[cfg(test)]
mod tests;
