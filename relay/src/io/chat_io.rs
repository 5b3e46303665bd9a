//! The transport-neutral half of a shard's chat I/O: the engine, the storage with its group
//! commit, the cross-shard mailbox, connection ids, the read-buffer handling, the limits and the
//! counters. The core is the shard loop's ([`super::shard_loop`]); transports add only their
//! readiness or completion plumbing: `chat_epoll` (readiness on the `batch` backend's epoll),
//! `chat_uring` (completions on the `uring` backend's ring) and the simulation's. The protocol
//! logic is in [`crate::chat::ChatShard`]; this file only moves bytes and records.
//!
//! Per loop turn a transport hands received bytes to [`ChatCore::feed`] (or
//! [`ChatCore::input`]) and accepted or closed connections to [`ChatCore::accept`] and
//! [`ChatCore::closed`]; then the loop calls [`ChatCore::end_turn`], which takes messages from
//! the other shards, appends the engine's records and commits them with one fdatasync (by
//! default on the shard's [`Syncer`] thread while the shard serves on, one batch in flight,
//! released by a later turn; with `[chat] sync_thread = false` inline, released in the same
//! turn), and passes on the engine's ring messages; then the transport does what
//! [`ChatCore::poll_output`] says: [`ChatOutput::Transmit`] for every connection with output
//! (never before the commit that covers it: "sent" and deliveries are released by it), and
//! [`ChatOutput::Close`] for a connection the engine closed once its output is flushed, or once
//! it had [`CLOSE_FLUSH_US`] to flush.

use super::mailbox::Mailbox;
use super::storage::{Committed, LogStorage, Storage};
use super::syncer::Syncer;
use crate::chat::log::{Log, LogConfig, Lsn};
use crate::chat::map::Map;
use crate::chat::msg::{ConnId, ShardMsg};
use crate::chat::pipeline::CommitPipeline;
use crate::chat::ChatShard;
use crate::engine::Now;
use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, TcpListener};
use std::path::PathBuf;

/// Connection ids start here (epoll tags and io_uring user data below it are the shard's own).
pub const FIRST_CONN_ID: ConnId = ConnId(16);
/// Largest read buffer per connection: a whole frame and a bit. The engine consumes every whole
/// frame, so what stays between reads is less than one frame.
pub const MAX_INBUF: usize = proto::chat::MAX_FRAME + proto::chat::LEN_BYTES + 4096;
/// Connections accepted per loop turn at most (batch; the uring backend accepts as completions
/// arrive, bounded by [`MAX_CONNS`]).
pub const MAX_ACCEPTS_PER_TURN: usize = 256;
/// Open connections per shard at most (`[chat] max_conns` may set fewer); further ones are
/// accepted, sent ERROR 13 and closed at once. The engine's per-address cap
/// (`max_conns_per_ip`) applies below this.
pub const MAX_CONNS: usize = 1 << 17;
/// How long a connection the engine closes may take to flush its last output (an ERROR frame);
/// then it is closed anyway, so that a peer that stops reading cannot hold it open.
pub const CLOSE_FLUSH_US: u64 = 5_000_000;
/// How long a stopping shard keeps serving its chat connections so that they get their ERROR 13
/// and what was queued before it (usually one or two loop turns); then the rest are closed.
pub const STOP_DRAIN_US: u64 = 250_000;
/// How long a refused connection may linger after its ERROR, and how many may at once.
pub const LINGER_US: u64 = 1_000_000;
/// See [`LINGER_US`].
pub const MAX_LINGERING: usize = 64;
/// How often timers, compaction and checkpoints run.
const HOUSEKEEPING_US: u64 = 100_000;
/// A checkpoint (fresh chat snapshots) is written when the log spans this many segments.
const CHECKPOINT_SEGMENTS: usize = 3;

/// Whether to write a checkpoint, with the log spanning `n_segments` segments of which
/// `created` were created since start, the last checkpoint having been written when `created`
/// was `last`. Only once a segment was created since the last one: until then every chat's
/// snapshot is in the newest segment already, and the old segments that remain are held by
/// live entries (a recipient who is away), which a checkpoint cannot free. Without this, such
/// a recipient made the shard snapshot every chat every 100 ms (`checkpoint_cost`: 37 ms and
/// 8 MiB for 100,000 chats).
fn checkpoint_due(n_segments: usize, created: u64, last: Option<u64>) -> bool {
    n_segments >= CHECKPOINT_SEGMENTS && last.is_none_or(|l| created > l)
}

/// Chats a running checkpoint snapshots per loop turn: about 1-2 ms of the shard's time
/// (`checkpoint_cost` gives 300-800 ns a chat), so that a shard owning a million chats is not
/// stopped for most of a second.
pub const CHECKPOINT_CHATS_PER_TURN: usize = 2048;

/// Where the shard is in a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Checkpoint {
    Idle,
    /// Snapshots are being written, [`CHECKPOINT_CHATS_PER_TURN`] a turn.
    Running,
    /// All written; waiting for the append that takes the last of them.
    Unwritten,
}

/// What the transport does for chat next ([`ChatCore::poll_output`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChatOutput {
    /// The connection has output: write (or start writing) what [`ChatCore::output`] holds
    /// and report it with [`ChatCore::written`]; what does not fit waits for room.
    Transmit(ConnId),
    /// Close the connection now, if still open, and report it with [`ChatCore::closed`]: the
    /// engine closed it and its output is flushed, or its time to flush is up.
    Close(ConnId),
}

/// What a shard needs to serve chat besides its UDP socket.
pub struct ChatParts {
    /// The chat engine.
    pub engine: ChatShard,
    /// The shard's log directory.
    pub dir: PathBuf,
    /// Log settings.
    pub log: LogConfig,
    /// fdatasync on a sync thread (pipelined, the default) rather than inline; see
    /// `[chat] sync_thread`.
    pub sync_thread: bool,
    /// Open connections at most (at most [`MAX_CONNS`]); see `[chat] max_conns`.
    pub max_conns: usize,
    /// The shard's TCP listener.
    pub listener: TcpListener,
    /// The shard's mailbox.
    pub mailbox: Mailbox,
}

/// Counters of the chat I/O.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChatIoCounters {
    /// Log commits (each one fdatasync).
    pub commits: u64,
    /// Records committed.
    pub records: u64,
    /// Connections accepted.
    pub accepted: u64,
    /// Connections closed.
    pub closed: u64,
    /// Connections closed at once because the shard had `max_conns` open.
    pub refused: u64,
    /// Microseconds spent in the commits' fdatasyncs (on the sync thread or inline).
    pub sync_us: u64,
    /// Microseconds the commits held their batches: from handing a batch to the sync thread
    /// to releasing it in a later loop turn (inline: the fdatasync). Divided by `commits`,
    /// the time durability adds to "sent" and to delivery.
    pub commit_us: u64,
}

/// The engine, the storage and the mailbox of one shard, and the bookkeeping both backends
/// share. Generic over its [`Storage`]: the relay's log, or memory in the simulation.
pub struct ChatCore<S: Storage = LogStorage> {
    engine: ChatShard,
    storage: S,
    mailbox: Mailbox,
    next_id: ConnId,
    n_conns: usize,
    max_conns: usize,
    /// The stop has begun ([`ChatCore::stop_turn`]): until when its drain may last.
    stopping: Option<u64>,
    next_housekeeping_us: u64,
    /// `n_segments_created` of the log once the last checkpoint's records were appended (so
    /// that segments the checkpoint itself fills do not call for another).
    checkpointed_at_segment: Option<u64>,
    checkpoint: Checkpoint,
    /// Connections the engine closes, with the time by which they must be gone, in that
    /// order; at most [`MAX_CONNS`] (ids are never reused, so entries of connections that
    /// closed in time are harmless until they expire).
    flush_deadlines: VecDeque<(ConnId, u64)>,
    /// Connections the engine closes, until the transport has closed them.
    closing: Map<ConnId, ()>,
    /// What the transport does next ([`ChatCore::poll_output`]); emptied every turn.
    outputs: VecDeque<ChatOutput>,
    pipeline: CommitPipeline,
    /// Refused connections waiting for their peer to close, with their deadlines.
    lingering: VecDeque<(std::net::TcpStream, u64)>,
    /// Messages taken from the rings this turn (at most `MAX_RECV_PER_TURN`), reused.
    received: Vec<ShardMsg>,
    /// Counters.
    pub counters: ChatIoCounters,
}

impl ChatCore {
    /// Opens the shard's log, replays it into the engine, and returns the core and the
    /// listener for the backend to serve.
    pub fn open(parts: ChatParts) -> io::Result<(Self, TcpListener)> {
        let ChatParts {
            engine,
            dir,
            log,
            sync_thread,
            max_conns,
            listener,
            mailbox,
        } = parts;
        let (log, records) = Log::open(&dir, log)?;
        let recovered = log.stats();
        eprintln!(
            "relay: shard {}: chat log in {} recovered: {} records in {} segments{}",
            engine.shard(),
            dir.display(),
            recovered.n_recovered,
            log.n_segments(),
            match recovered.torn_bytes_truncated {
                0 => String::new(),
                n => format!(
                    "; {n} bytes cut from the end of the newest segment (not yet durable at a \
                     crash, or a damaged disk: a *.damaged file holds a segment whose header \
                     could not be read)"
                ),
            }
        );
        let syncer = match sync_thread {
            true => Some(Syncer::spawn(engine.shard(), mailbox.waker().fd())?),
            false => None,
        };
        let core = Self::new(
            engine,
            LogStorage::new(log, syncer),
            records.iter().map(|r| (r.lsn.0, r.kind, &r.payload[..])),
            mailbox,
            max_conns,
        )?;
        Ok((core, listener))
    }
}

impl<S: Storage> ChatCore<S> {
    /// A core over `storage`, whose surviving `records` (Lsn, kind, payload, in Lsn order) are
    /// replayed into `engine` first. An error when they do not replay (a corrupt log).
    pub fn new<'a>(
        mut engine: ChatShard,
        mut storage: S,
        records: impl IntoIterator<Item = (u64, u8, &'a [u8])>,
        mailbox: Mailbox,
        max_conns: usize,
    ) -> io::Result<Self> {
        for (lsn, kind, payload) in records {
            engine
                .replay(Lsn(lsn), kind, payload)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
        engine
            .finish_replay()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        for lsn in engine.take_dead() {
            storage.mark_dead(lsn);
        }
        Ok(Self {
            engine,
            storage,
            pipeline: CommitPipeline::new(),
            mailbox,
            next_id: FIRST_CONN_ID,
            n_conns: 0,
            max_conns: max_conns.clamp(1, MAX_CONNS),
            stopping: None,
            next_housekeeping_us: 0,
            checkpointed_at_segment: None,
            checkpoint: Checkpoint::Idle,
            flush_deadlines: VecDeque::new(),
            closing: Map::default(),
            outputs: VecDeque::new(),
            received: Vec::new(),
            lingering: VecDeque::new(),
            counters: ChatIoCounters::default(),
        })
    }

    /// Whether the shard has room for another connection. When it has not, the backend hands
    /// the new socket to [`ChatCore::refuse`]. A stopping shard has none.
    pub fn has_room(&self) -> bool {
        self.n_conns < self.max_conns && self.stopping.is_none()
    }

    /// Called by a stopping shard at the start of each loop turn; true once the loop may end.
    /// The first call begins the stop: every session gets ERROR 13 after its queued output and
    /// is closed once flushed, and new connections are refused. The loop then keeps turning
    /// (committing and writing as usual) until every connection is closed or
    /// [`STOP_DRAIN_US`] has passed.
    pub fn stop_turn(&mut self, now: Now) -> bool {
        match self.stopping {
            None => {
                self.stopping = Some(now.mono_us + STOP_DRAIN_US);
                self.engine.stop_sessions();
                false
            }
            Some(until) => self.n_conns == 0 || now.mono_us >= until,
        }
    }

    /// Follows ctl's drain (the media engine's state): sessions end and HELLOs are refused
    /// while it lasts ([`ChatShard::set_draining`]). Returns whether that changed anything.
    pub fn set_draining(&mut self, now: Now, on: bool) -> bool {
        self.engine.set_draining(now, on)
    }

    /// Open connections at most (`[chat] max_conns`, clamped to [`MAX_CONNS`]).
    pub fn max_conns(&self) -> usize {
        self.max_conns
    }

    /// Refuses a connection beyond `max_conns`: one ERROR 13 ("unavailable, retry") written
    /// without waiting (a new socket's send buffer has room for it) and the write side shut
    /// (a FIN after it). The socket then lingers for up to [`LINGER_US`] among at most
    /// [`MAX_LINGERING`], its input (typically the peer's HELLO) read and dropped, so that
    /// closing it with unread input does not reset the connection before the peer has read
    /// the ERROR. Counted.
    pub fn refuse(&mut self, now: Now, stream: std::net::TcpStream) {
        use std::io::Write as _;
        self.counters.refused += 1;
        let mut frame = Vec::with_capacity(64);
        proto::chat::Encoder::new(&mut frame).error(
            proto::chat::code::UNAVAILABLE,
            &[0; 16],
            "the shard is at its connection limit",
        );
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let _ = (&stream).write(&frame);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        if !peer_done(&stream) {
            // Full: the oldest goes, its peer has had the longest to read its ERROR.
            if self.lingering.len() >= MAX_LINGERING {
                self.lingering.pop_front();
            }
            self.lingering.push_back((stream, now.mono_us + LINGER_US));
        }
    }

    /// A new connection from `ip`: returns its id. The engine may already have queued an
    /// error and a close for it (the per-address cap).
    pub fn accept(&mut self, now: Now, ip: IpAddr) -> ConnId {
        let id = self.next_id;
        self.next_id.0 += 1;
        self.n_conns += 1;
        self.counters.accepted += 1;
        self.engine.handle_accept(now, id, ip);
        id
    }

    /// Hands `inbuf` to the engine and keeps what it did not consume (less than one frame).
    pub fn input(&mut self, now: Now, id: ConnId, inbuf: &mut Vec<u8>) {
        let used = self.engine.handle_read(now, id, inbuf);
        inbuf.drain(..used);
    }

    /// `data` arrived on `id`, after what `inbuf` holds. When `inbuf` is empty the engine reads
    /// `data` in place and only an incomplete frame is copied. Returns false when the bytes
    /// would exceed [`MAX_INBUF`] (which a correct engine never lets happen): close then.
    pub fn feed(&mut self, now: Now, id: ConnId, inbuf: &mut Vec<u8>, data: &[u8]) -> bool {
        if inbuf.is_empty() {
            let used = self.engine.handle_read(now, id, data);
            inbuf.extend_from_slice(&data[used.min(data.len())..]);
        } else {
            if inbuf.len() + data.len() > MAX_INBUF {
                return false;
            }
            inbuf.extend_from_slice(data);
            self.input(now, id, inbuf);
        }
        inbuf.len() <= MAX_INBUF
    }

    /// Output queued for `id`.
    pub fn output(&self, id: ConnId) -> &[u8] {
        self.engine.output(id)
    }

    /// `n` bytes of `id`'s output were written. A closing connection whose output is now
    /// flushed is queued to close ([`ChatCore::poll_output`]).
    pub fn written(&mut self, now: Now, id: ConnId, n: usize) {
        self.engine.handle_written(now, id, n);
        if !self.closing.is_empty()
            && self.closing.contains_key(&id)
            && self.engine.output(id).is_empty()
        {
            self.outputs.push_back(ChatOutput::Close(id));
        }
    }

    /// `id` is closed (by the peer or by us); the transport forgets it.
    pub fn closed(&mut self, now: Now, id: ConnId) {
        self.closing.remove(&id);
        self.n_conns -= 1;
        self.counters.closed += 1;
        self.engine.handle_closed(now, id);
    }

    /// Whether reading clients must pause: cross-shard messages are spilling.
    pub fn reading_paused(&self) -> bool {
        self.mailbox.backlogged()
    }

    /// The end of a loop turn: cross-shard input, timers, group commit, and the messages the
    /// commit released to other shards; then what the transport must do is queued for
    /// [`ChatCore::poll_output`]. Returns an error only when the log fails (the shard must
    /// stop: acknowledging without durability is not an option).
    pub fn end_turn(&mut self, now: Now) -> io::Result<()> {
        let received = &mut self.received;
        self.mailbox.receive(|m| received.push(m));
        self.engine.handle_shard_msgs(now, self.received.drain(..));
        if now.mono_us >= self.next_housekeeping_us {
            self.next_housekeeping_us = now.mono_us + HOUSEKEEPING_US;
            self.housekeeping(now);
        }
        if self.checkpoint == Checkpoint::Running
            && !self.engine.checkpoint_step(CHECKPOINT_CHATS_PER_TURN)
        {
            self.checkpoint = Checkpoint::Unwritten;
        }
        // A finished sync releases its batch.
        let mut compact = self.poll_batch(now)?;
        let waiting = self.engine.has_records();
        let mut dead = self.engine.take_dead();
        self.pipeline.dead(&mut dead, waiting);
        for &lsn in &dead {
            self.storage.mark_dead(lsn);
            compact = true;
        }
        self.engine.give_back_dead(dead);
        // The next batch goes to the disk while the shard serves on: one sync in flight. An
        // inline storage is durable at once: released in this turn.
        if waiting && !self.pipeline.in_flight() {
            self.start_batch(now)?;
            compact |= self.poll_batch(now)?;
        }
        // Also when an earlier compaction left dead segments (it deletes a few per turn).
        if compact || self.storage.compact_pending() {
            self.storage.compact()?;
        }
        let mut outbox = self.engine.take_outbox();
        for (to, m) in outbox.drain(..) {
            self.mailbox.send_to(to, m);
        }
        self.engine.give_back_outbox(outbox);
        self.mailbox.flush();
        self.queue_outputs(now);
        Ok(())
    }

    /// Every [`HOUSEKEEPING_US`]: refused sockets, the engine's timers, and whether a
    /// checkpoint is due.
    fn housekeeping(&mut self, now: Now) {
        self.lingering
            .retain(|(s, until)| now.mono_us < *until && !peer_done(s));
        self.engine.handle_timeout(now);
        if self.checkpoint == Checkpoint::Idle
            && checkpoint_due(
                self.storage.n_segments(),
                self.storage.n_segments_created(),
                self.checkpointed_at_segment,
            )
        {
            if self
                .engine
                .start_selective_checkpoint(&self.storage.segment_starts())
            {
                self.checkpoint = Checkpoint::Running;
            } else {
                // Nothing a checkpoint could free: wait for the next segment.
                self.checkpointed_at_segment = Some(self.storage.n_segments_created());
            }
        }
    }

    /// Appends the engine's records and starts their commit when none is in flight.
    fn start_batch(&mut self, now: Now) -> io::Result<()> {
        let records = self.engine.take_records();
        let mut lsns = self.pipeline.lsn_list();
        for (kind, payload) in records.iter() {
            lsns.push(self.storage.append(kind, payload)?);
        }
        self.counters.records += records.len() as u64;
        self.engine.give_back_records(records);
        if self.checkpoint == Checkpoint::Unwritten {
            self.checkpoint = Checkpoint::Idle;
            self.checkpointed_at_segment = Some(self.storage.n_segments_created());
        }
        self.storage.start_commit(now.mono_us)?;
        self.pipeline.started(lsns);
        Ok(())
    }

    /// Whether the batch in flight became durable: then it is released ("sent", deliveries,
    /// then its dead marks). An error when the storage failed (it is poisoned and the error
    /// stops the shard). Returns whether dead marks were applied.
    fn poll_batch(&mut self, now: Now) -> io::Result<bool> {
        let Some(Committed { sync_us, held_us }) = self.storage.poll_commit(now.mono_us)? else {
            return Ok(false);
        };
        self.counters.sync_us += sync_us;
        self.counters.commit_us += held_us;
        let (lsns, dead) = self
            .pipeline
            .finished()
            .expect("a finished commit has its batch in flight");
        self.counters.commits += 1;
        self.engine.handle_committed(now, &lsns);
        let any = !dead.is_empty();
        for &lsn in &dead {
            self.storage.mark_dead(lsn);
        }
        self.pipeline.give_back(lsns, dead);
        Ok(any)
    }

    /// What the transport does next, until `None`: queued by the end of the turn (output the
    /// turn released, connections the engine closed or whose time to flush is up) and by
    /// [`ChatCore::written`] (a closing connection flushed).
    pub fn poll_output(&mut self) -> Option<ChatOutput> {
        self.outputs.pop_front()
    }

    /// After the end of turn: a [`ChatOutput::Transmit`] for every connection with new output,
    /// the engine's closes (a close at once when there is nothing to flush), and a
    /// [`ChatOutput::Close`] for every closing connection still open whose [`CLOSE_FLUSH_US`]
    /// is up (or the oldest ones, beyond [`MAX_CONNS`] deadlines).
    fn queue_outputs(&mut self, now: Now) {
        let dirty = self.engine.take_dirty();
        self.outputs
            .extend(dirty.iter().map(|&id| ChatOutput::Transmit(id)));
        self.engine.give_back_dirty(dirty);
        let closing = self.engine.take_closing();
        for &id in &closing {
            self.flush_deadlines
                .push_back((id, now.mono_us + CLOSE_FLUSH_US));
            self.closing.insert(id, ());
            self.outputs
                .push_back(if self.engine.output(id).is_empty() {
                    ChatOutput::Close(id)
                } else {
                    ChatOutput::Transmit(id)
                });
        }
        self.engine.give_back_closing(closing);
        while let Some(&(id, at)) = self.flush_deadlines.front() {
            if at > now.mono_us && self.flush_deadlines.len() <= MAX_CONNS {
                break;
            }
            self.flush_deadlines.pop_front();
            if self.closing.contains_key(&id) {
                self.outputs.push_back(ChatOutput::Close(id));
            }
        }
    }

    /// The descriptor that wakes this shard when another one sends to it.
    pub fn waker_fd(&self) -> std::os::fd::RawFd {
        self.mailbox.waker().fd()
    }

    /// Clears pending wake-ups.
    pub fn drain_waker(&self) {
        self.mailbox.waker().drain();
    }

    /// Prepares to block: false when there is already work, so the wait must not block.
    /// Records waiting while a batch is in flight are no reason to stay awake: they go with
    /// the next batch, and the sync thread wakes the shard when the one in flight is done.
    /// Neither is a spill to a full ring: the receiving shard wakes this one when it takes
    /// from it (the backend then waits only for what it serves while reading is paused).
    pub fn prepare_sleep(&mut self) -> bool {
        !self.commit_due() && self.mailbox.prepare_sleep()
    }

    /// When the core next has timed work, in the clock's microseconds: housekeeping (the
    /// engine's timers, checkpoints, compaction, lingering refusals), the oldest close's flush
    /// deadline, the end of a stop's drain. A commit in flight needs no timer: its completion
    /// wakes the shard.
    pub fn poll_timeout(&self) -> u64 {
        let flush = self.flush_deadlines.front().map_or(u64::MAX, |&(_, at)| at);
        self.next_housekeeping_us
            .min(flush)
            .min(self.stopping.unwrap_or(u64::MAX))
    }

    /// Records wait and no commit is in flight: the next turn starts one.
    fn commit_due(&self) -> bool {
        self.engine.has_records() && !self.pipeline.in_flight()
    }

    /// After the wait.
    pub fn woke(&self) {
        self.mailbox.woke();
    }

    /// The engine, for checks and counters.
    pub fn engine(&self) -> &ChatShard {
        &self.engine
    }

    /// The storage.
    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.storage
    }

    /// The storage, given up (a simulated crash takes it to tear its tail).
    pub fn into_storage(self) -> S {
        self.storage
    }

    /// Whether the shard has work that must not wait for a wake-up: records to commit with
    /// none in flight, or mailbox work ([`Mailbox::work_waiting`]).
    pub fn work_waiting(&self) -> bool {
        self.commit_due() || self.mailbox.work_waiting()
    }

    /// Whether a commit is in flight (its completion wakes the shard).
    pub fn commit_in_flight(&self) -> bool {
        self.pipeline.in_flight()
    }

    /// The values of [`super::ShardStats::CHAT_FIELDS`].
    pub fn stats(&self) -> super::ChatValues {
        let h = self.engine.home_counters();
        [
            self.engine.n_sessions() as u64,
            self.engine.n_pending() as u64,
            self.engine.n_accepted(),
            self.counters.commits,
            self.counters.records,
            self.storage.disk_bytes(),
            h.errors.iter().sum(),
            h.deferred,
            self.engine.n_dedup_early_evictions(),
            self.counters.refused,
            self.mailbox.spilled(),
            self.mailbox.spill_depth() as u64,
            self.counters.sync_us,
            self.counters.commit_us,
            self.engine.n_chats() as u64,
        ]
    }
}

/// Reads and drops what a refused peer sent (non-blocking); true once it has closed (or the
/// socket failed), false while it may still send.
fn peer_done(stream: &std::net::TcpStream) -> bool {
    use std::io::Read as _;
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        match (&mut &*stream).read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_waits_for_a_new_segment_after_the_last_one() {
        // Below 3 segments: never.
        assert!(!checkpoint_due(2, 5, None));
        // The first time the log spans 3: at once.
        assert!(checkpoint_due(3, 2, None));
        // Old segments held by live entries keep it at 3: no new checkpoint (each was a
        // snapshot of every chat, every 100 ms) until a segment has been created since.
        assert!(!checkpoint_due(3, 2, Some(2)));
        assert!(!checkpoint_due(4, 2, Some(2)));
        assert!(checkpoint_due(4, 3, Some(2)));
    }
}
