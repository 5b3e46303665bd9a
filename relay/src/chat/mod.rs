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
//! The outputs are batches, each list handed back for reuse (`give_back_*`), not one event per
//! `poll_output` call as in str0m or quinn-proto: a group commit takes all of a turn's records
//! at once, and reused lists keep a steady load from allocating (`count_chat`: 0.01 allocations
//! per message). [`crate::io::chat_io::ChatCore`] drives these calls, commits, and turns the
//! result into the transport's one-at-a-time `poll_output` (`Transmit`, `Close`).
//!
//! - [`log`]: the per-shard append-only log with CRC per record and group commit.
//! - [`records`]: what the owner role writes to it.
//!
//! # How it works
//!
//! A user's home shard and a chat's owner shard are fixed functions of their ids
//! (`proto::chat::ids`, PROTOCOL.md section 7.6). A SEND goes from the home shard to the owner
//! (a local queue or a ring), which assigns the next seq, appends an ENTRY record and, once the
//! loop turn's group commit (one fdatasync) returns, releases SENT to the author's home and the
//! entry to each recipient's home. Acknowledgements go back to the owner, which appends an ACK
//! record and a DELIVERED entry for the authors; an entry acknowledged by its whole audience is
//! dead. Segments are deleted only as a dead prefix, oldest first with a directory fsync between
//! two deletions, at most 4 per loop turn (`MAX_DELETIONS_PER_COMPACT`;
//! `compaction_deletes_a_few_segments_per_call`): an acknowledgement from a user away for long
//! can free hundreds at once, and each fsync runs on the shard's thread. An idle shard deletes
//! the next 4 after each wait (at most 50 ms: 300 dead segments take up to 4 s). Because only a prefix goes, a CHAT snapshot (membership, next seq) in
//! an old segment pins everything after it until a checkpoint rewrites the snapshots. A
//! checkpoint is considered when the log spans 3 segments, and again only once a segment has been
//! created since the last one's records were appended (it had been rewritten every 100 ms). It
//! rewrites only the snapshots that hold back compaction: those of chats whose committed snapshot
//! lies in a segment older than both the newest one and the one holding the oldest entry still
//! waiting for a recipient (from that segment on nothing can be deleted anyway), 2,048 chats a
//! loop turn; with a recipient away since the start it writes nothing (`benches/tests/checkpoint.rs`;
//! `Owner::start_selective_checkpoint`). Replay accepts a chat's entries before its snapshot,
//! which is what a checkpoint leaves once the segment with the previous snapshot is gone (a shard
//! refused to start on such a log until 6e9cbbb; `kill_9_after_a_checkpoint_restarts_and_delivers_what_waits`
//! in `relay/tests/relay/chat.rs`). Its cost grows with the chats it rewrites, at worst every chat
//! the shard owns (`target/release/checkpoint_cost`, all at once, 2 runs: 2-3 ms for 10,000,
//! 37-41 ms for 100,000, 0.56-0.79 s and 80 MiB for 1,000,000 on this machine), hence the 2,048 a
//! turn (`CHECKPOINT_CHATS_PER_TURN`, about 1-2 ms; `a_checkpoint_is_spread_over_loop_turns`). One deleted
//! full-size segment is kept as `recycled.spare` and becomes the next segment (header written and
//! synced before the rename, the rename that made the spare synced before that; the file cut
//! back to its last record when it is rolled past), so appends overwrite written blocks and an
//! fdatasync needs no ext4 journal commit, as PostgreSQL does with WAL segments. Its stale bytes
//! behind the new records are the torn tail: every record CRC covers the segment's random salt
//! (header format version 2; version 1 segments, unsalted, are still read) and its Lsn, so
//! neither an old record nor a record frame a peer planted in an old message body can pass. Deduplication (`chat::dedup`) keeps (sender, msg id) -> (chat, seq) for the last
//! `dedup_capacity` (2^20) accepted requests in a ring, indexed by 128-byte buckets of 16
//! (hash tag, insertion stamp) slots: a new id costs one bucket read (prefetched while the previous
//! message is handled) and a write to the same bucket, and eviction is the ring overwrite, since a
//! slot whose stamp is 2^20 inserts old reads as free. A full bucket gives up its oldest slot
//! (1.9 inserts in 10^6 at 2^20, `cargo test --release -p relay --lib early_evictions -- --nocapture`;
//! counted as `relay_chat_dedup_early_evictions_total`). The index doubles as requests arrive,
//! up to 2^18 buckets, without a stall: the doubled index is zeroed two buckets per insert ahead
//! of time, and the old one stays readable while each insert moves 4 of its entries across
//! (`growing_moves_a_few_entries_per_insert_and_loses_none`; all at once, the last doubling
//! had stalled the shard, media included, for 54-56 ms; the slowest insert is now 1.3-1.4 ms,
//! where a migration ends and the old index is freed: `target/release/dedup_growth`). Offline
//! recipients are served by a per-user stream from every owner, in chunks paced by the client's
//! acknowledgements; live entries for a user whose stream is running are held back so that
//! per-chat order holds.
//!
//! **Commit, pipelined or inline.** By default (`[chat] sync_thread = true`) the group commit is
//! pipelined: a turn writes the batch (`Log::start_commit`), the shard's sync thread
//! (`io::syncer`, on the process's CPUs rather than the shard's) runs the fdatasync
//! (`SyncJob::run`) and wakes the shard through its mailbox eventfd, and a later turn releases the
//! batch (`Log::finish_commit`, then the engine's `handle_committed`); one batch is in flight and
//! the next accumulates meanwhile, and a shard with only that to wait for sleeps. This departs
//! from DESIGN.md section 5's "one fdatasync per loop turn": one fdatasync covers everything
//! accepted since the previous one started, and still nothing is acknowledged before it returns.
//! `sync_thread = false` gives the inline commit of the design. The engine already supported one
//! batch in flight (records taken meanwhile belong to the next; a retried SEND whose original is
//! in flight is answered with that batch). Dead marks wait in `chat::pipeline::CommitPipeline`
//! until every record produced before them is durable, so a crash can never delete an entry
//! whose acknowledgement was not yet on disk. Both modes pass the kill -9 test on both backends
//! and the crash simulation. The thread measured 19% more throughput at saturation and equal or
//! lower latency (perf/CHAT_RESULTS.md, "Inline or pipelined fdatasync"). Two counters show what
//! durability costs in time: `relay_chat_sync_us_total` (in fdatasync) and
//! `relay_chat_commit_us_total` (batches held from hand-off to release); per commit at half load
//! here, 384 and 1,258 us. Releasing a batch the moment its sync is done, mid-turn, cut the hold
//! by a third but cost 12 % of the throughput and no latency was gained (perf/CHAT_RESULTS.md,
//! "Where the half-load latency goes").
//!
//! Presence is home-to-home and never stored: a session's PRESENCE_WATCH set (at most 256) is
//! registered on each watched user's home shard, which keeps up to 4,096 (watcher, home) pairs per
//! user, answers with the current state and announces the first session opening and the session
//! closing. A watcher's session takes its watches with it when it closes or is replaced.
//!
//!
//! # Allocation and bounds
//!
//! - Chat entries are released (SENT, deliveries) only after the log commit that made them
//!   durable; the chat engine performs no I/O either (`ChatShard` returns records and messages).
//!   A message crosses the rings and waits for its acknowledgement without a heap allocation of
//!   its own in a steady load: a SEND's submit travels in a box from the home shard's
//!   `msg::SubmitPool`, and goes back to that pool with the SENT (`ToHome::Sent`'s `spent`),
//!   so one-way traffic between shards reuses the same boxes (bounded at 1,024 kept; test
//!   `submit_boxes_go_back_to_the_home_shard_that_made_them`), and its
//!   encoded MSG frame is one buffer (`records::MsgFrame`, an `Arc`) shared by the stored entry
//!   and every recipient's delivery, taken from the owner's `records::FramePool` and given back
//!   when the entry is settled at the front of its chat's queue and no home still holds it
//!   (bounded at 1,024 buffers of at most 1 KiB; otherwise it is freed). The lists the engine
//!   hands its driver every turn (`take_*`) are handed back (`give_back_*`) and reused, up to
//!   65,536 entries. So a steady 1:1 load on one shard allocates nothing per message
//!   (`count_chat`: 0.01 allocations per message, and `cargo xtask callgrind` fails above 0.05);
//!   what still allocates is a new chat, group or session, a long body, a list growing past its
//!   largest size so far, and more boxes or buffers in flight than the pools have kept.
//!   Every queue is bounded (ring capacity `[chat] ring_capacity`, default 4,096; n_shards x
//!   (n_shards - 1) rings of that many messages, each slot a `ShardMsg` of 80 bytes, at most
//!   96 by the test `a_message_fits_in_a_ring_slot_of_at_most_96_bytes`: 320 KiB a ring, 640
//!   KiB for 2 shards, 17.5 MiB for 8); each shard takes at most 4,096 messages a turn
//!   from its rings, starting with a different ring each turn. Beyond a full ring messages wait
//!   in a spill queue while the shard stops reading its clients: that pause is the spill queue's
//!   only bound, since messages from other shards are still handled and may add to it (a group
//!   SEND fans out to up to 1,024 members); `relay_chat_spill_depth` shows its depth,
//!   `relay_chat_spilled_total` its traffic, and the test
//!   `cross_shard_burst_spills_then_delivers_everything_in_order` forces it. A spilling shard
//!   sleeps rather than spins: it flags the full ring, and the receiver wakes it after taking
//!   from a flagged ring (`a_spilling_shard_sleeps_and_the_receiver_wakes_it_when_it_makes_room`);
//!   while paused, batch waits on a second epoll set holding only the UDP socket and the waker
//!   (level-triggered unread connections would end every wait at once). 1 MiB of output per
//!   session for entries (once one is deferred, every later one is too, until the session's
//!   resync from its inbox: a later entry queued ahead would pass the deferred one's seq and the
//!   client would drop it; a deferral during a backlog restarts it once the output drains), and
//!   1 MiB of errors and ephemeral frames queued while the peer does not read, where the session
//!   is closed with ERROR 11; every request a peer can repeat costs from its session's rate
//!   (PROTOCOL 7.5), TYPING and PING included, but an ACK of what the session was sent always
//!   goes; 100,000 stored entries per recipient and
//!   100,000 undelivered messages per sender, each per owner shard; a backlog's chunks keep to
//!   the session's window whatever the number of owner shards (the owners still streaming share
//!   half the window: all of them in the first round, then only those that said they hold more,
//!   so one owner with the whole backlog gets the whole half; `home::chunk_budget`,
//!   `a_backlog_from_one_owner_takes_the_whole_half_window`); `[chat] max_conns` (131,072)
//!   connections per shard,
//!   refused ones lingering at most 64 at a time; on
//!   uring 512 receive buffers of 4 KiB and one 64 KiB send in flight per connection). A
//!   connection the engine closes gets 5 s to flush its last frames (`chat_io::CLOSE_FLUSH_US`),
//!   then is closed anyway: a peer that stops reading cannot hold it open.

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
pub mod wire;

use crate::engine::Now;
use log::Lsn;
use msg::{ConnId, ShardMsg, ToOwner};
pub use owner::ReplayError;
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
    /// Chats (direct and groups) one user may be in, per owner shard: a new chat beyond it
    /// is refused (INBOX_FULL, "too many chats"), so that one session cannot fill an owner
    /// with chats to made-up users, nor add a victim to endless groups.
    pub max_chats_per_user: usize,
    /// Connections per remote address.
    pub max_conns_per_ip: u32,
    /// HELLO signature checks per second on one shard (and its burst): the Ed25519 check
    /// runs on the shard thread that also forwards media, so a flood of sign-ins gets
    /// ERROR 13 (retry) beyond this instead of the media's time. 0: no limit.
    pub hellos_per_s: u64,
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
            max_chats_per_user: 10_000,
            max_conns_per_ip: 100_000,
            hellos_per_s: 2_000,
            backlog_chunk: 128,
            // 40 MiB of entries and 32 MiB of index per owner shard, once that many
            // requests have passed.
            dedup_capacity: 1 << 20,
        }
    }
}

/// The chat engine of one shard: home and owner roles and the messages between them.
pub struct ChatShard {
    place: msg::Place,
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
    dead: Vec<Lsn>,
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
        Self::at(msg::Place::standalone(shard, n_shards), cfg, verifier)
    }

    /// The engine of the shard at `place` in a cluster of linked relays.
    pub fn at(place: msg::Place, cfg: ChatConfig, verifier: TokenVerifier) -> Self {
        Self {
            home: home::Home::new(&place, cfg.clone(), verifier),
            owner: owner::Owner::at(&place, cfg),
            place,
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
                // The owner role is addressed by owner index, the home role by address.
                let dest = match m {
                    ShardMsg::ToOwner(_) => self.place.owners[usize::from(dest)],
                    ShardMsg::ToHome(_) => dest,
                };
                if dest == self.place.addr {
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
            ShardMsg::ToOwner(ToOwner::Submit(s)) => {
                // Unless it goes back with the SENT: a refused SEND's box.
                if let Some(spent) = self.owner.submit(s, now_ms) {
                    self.home.submits.give_back(spent);
                }
            }
            ShardMsg::ToOwner(ToOwner::PresenceWatch {
                watcher,
                watcher_home,
                target,
                watch,
            }) => self.home.watch(watcher, watcher_home, target, watch),
            ShardMsg::ToOwner(ToOwner::PresenceState { user, home, online }) => {
                self.home.presence_state(user, home, online)
            }
            ShardMsg::ToOwner(m) => self.owner.handle(m, now_ms),
            ShardMsg::ToHome(m) => self.home.handle(m),
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
    pub fn handle_committed(&mut self, now: Now, lsns: &[Lsn]) {
        self.owner.handle_committed(lsns);
        self.pump(now);
    }

    /// LSNs of records that became dead.
    pub fn take_dead(&mut self) -> Vec<Lsn> {
        std::mem::replace(&mut self.owner.dead, std::mem::take(&mut self.spare.dead))
    }

    /// A list from [`ChatShard::take_dead`], done with.
    pub fn give_back_dead(&mut self, v: Vec<Lsn>) {
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

    /// The relay is draining (or not any more): sessions end, HELLOs are refused. Returns
    /// whether that changed anything.
    pub fn set_draining(&mut self, now: Now, on: bool) -> bool {
        let changed = self.home.set_draining(on);
        self.pump(now);
        changed
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
    pub fn replay(&mut self, lsn: Lsn, kind: u8, payload: &[u8]) -> Result<(), ReplayError> {
        self.owner.replay(lsn, kind, payload)
    }

    /// Completes recovery; fails if the records replayed are inconsistent.
    pub fn finish_replay(&mut self) -> Result<(), ReplayError> {
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
        self.place.shard()
    }

    /// Where this shard sits in its cluster.
    pub fn place(&self) -> &msg::Place {
        &self.place
    }

    /// Stored entries not yet acknowledged by all their recipients.
    pub fn n_pending(&self) -> usize {
        self.owner.n_pending()
    }

    /// Chats owned here (direct chats, and groups until their last member leaves).
    pub fn n_chats(&self) -> usize {
        self.owner.n_chats()
    }

    /// Checks the engine's internal invariants (the owner role's: chats, stored entries,
    /// memberships and counts); for tests, the simulation and fuzzing.
    pub fn check_invariants(&self) {
        self.owner.check_invariants();
    }

    /// The owner role's durable state in a canonical form (tests).
    #[cfg(test)]
    pub(crate) fn owner_digest(&self) -> String {
        self.owner.digest()
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
