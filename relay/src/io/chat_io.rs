//! The chat side of a shard's loop for the `batch` backend: a non-blocking TCP listener and
//! connections on the shard's epoll, the shard's log with group commit, and the cross-shard
//! mailbox. The protocol logic is in [`crate::chat::ChatShard`]; this file only moves bytes.
//!
//! Per loop turn (after the epoll wait): accept, read, hand bytes to the engine; take messages
//! from the other shards; append the engine's records and commit them with one fdatasync; then
//! send what the engine released: "sent" acknowledgements and deliveries (never before the
//! commit), ring messages, and socket writes.

use super::mailbox::Mailbox;
use crate::chat::log::{Log, Lsn};
use crate::chat::msg::ConnId;
use crate::chat::ChatShard;
use crate::engine::Now;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};

/// epoll tags below this are the shard's own descriptors; connections use their id.
pub const FIRST_CONN_ID: u64 = 16;
/// Largest read buffer per connection: a whole frame and a bit.
const MAX_INBUF: usize = proto::chat::MAX_FRAME + proto::chat::LEN_BYTES + 4096;
/// Connections accepted per loop turn at most.
const MAX_ACCEPTS_PER_TURN: usize = 256;
/// How often timers, compaction and checkpoints run.
const HOUSEKEEPING_US: u64 = 100_000;
/// A checkpoint (fresh chat snapshots) is written when the log spans this many segments.
const CHECKPOINT_SEGMENTS: usize = 3;

struct Conn {
    stream: TcpStream,
    inbuf: Vec<u8>,
    /// EPOLLOUT is registered.
    want_write: bool,
    /// Close once the output is flushed.
    closing: bool,
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
}

/// One shard's chat I/O.
pub struct ChatIo {
    engine: ChatShard,
    log: Log,
    listener: TcpListener,
    mailbox: Mailbox,
    conns: HashMap<ConnId, Conn>,
    next_id: ConnId,
    epfd: RawFd,
    next_housekeeping_us: u64,
    /// Counters.
    pub counters: ChatIoCounters,
}

/// epoll tag of the listener.
pub const TAG_LISTENER: u64 = 1;
/// epoll tag of the shard's waker.
pub const TAG_WAKER: u64 = 2;

fn epoll_ctl(epfd: RawFd, op: libc::c_int, fd: RawFd, events: u32, tag: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: tag };
    // SAFETY: a live epoll_event for the duration of the call.
    if unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl ChatIo {
    /// Opens the shard's log in `dir`, replays it into `engine` and registers the listener and
    /// waker on `epfd`.
    pub fn new(
        mut engine: ChatShard,
        dir: &std::path::Path,
        log_cfg: crate::chat::log::LogConfig,
        listener: TcpListener,
        mailbox: Mailbox,
        epfd: RawFd,
    ) -> io::Result<Self> {
        let (log, records) = Log::open(dir, log_cfg)?;
        for r in &records {
            engine
                .replay(r.lsn.0, r.kind, &r.payload)
                .map_err(io::Error::other)?;
        }
        engine.finish_replay();
        let mut log = log;
        for lsn in engine.take_dead() {
            log.mark_dead(Lsn(lsn));
        }
        listener.set_nonblocking(true)?;
        epoll_ctl(
            epfd,
            libc::EPOLL_CTL_ADD,
            listener.as_raw_fd(),
            libc::EPOLLIN as u32,
            TAG_LISTENER,
        )?;
        epoll_ctl(
            epfd,
            libc::EPOLL_CTL_ADD,
            mailbox.waker().fd(),
            libc::EPOLLIN as u32,
            TAG_WAKER,
        )?;
        Ok(Self {
            engine,
            log,
            listener,
            mailbox,
            conns: HashMap::new(),
            next_id: FIRST_CONN_ID,
            epfd,
            next_housekeeping_us: 0,
            counters: ChatIoCounters::default(),
        })
    }

    /// Handles one epoll event tagged for chat.
    pub fn handle_event(&mut self, now: Now, tag: u64, events: u32) {
        match tag {
            TAG_LISTENER => self.accept(now),
            TAG_WAKER => self.mailbox.waker().drain(),
            id => {
                if events
                    & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32
                    != 0
                {
                    self.read(now, id);
                }
                if events & libc::EPOLLOUT as u32 != 0 {
                    self.write(now, id);
                }
            }
        }
    }

    fn accept(&mut self, now: Now) {
        for _ in 0..MAX_ACCEPTS_PER_TURN {
            let (stream, peer) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => return,
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let _ = stream.set_nodelay(true);
            let id = self.next_id;
            self.next_id += 1;
            let fd = stream.as_raw_fd();
            let events = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
            if epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, fd, events, id).is_err() {
                continue;
            }
            self.conns.insert(
                id,
                Conn {
                    stream,
                    inbuf: Vec::new(),
                    want_write: false,
                    closing: false,
                },
            );
            self.counters.accepted += 1;
            self.engine.handle_accept(now, id, peer.ip());
        }
    }

    fn read(&mut self, now: Now, id: ConnId) {
        // Reading stops while cross-shard messages are spilling: that is the backpressure.
        if self.mailbox.backlogged() {
            return;
        }
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let mut buf = [0u8; 16 * 1024];
        loop {
            if c.inbuf.len() >= MAX_INBUF {
                break;
            }
            let room = buf.len().min(MAX_INBUF - c.inbuf.len());
            match c.stream.read(&mut buf[..room]) {
                Ok(0) => return self.close(now, id),
                Ok(n) => c.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.close(now, id),
            }
        }
        let used = self.engine.handle_read(now, id, &c.inbuf);
        if let Some(c) = self.conns.get_mut(&id) {
            c.inbuf.drain(..used);
        }
    }

    fn write(&mut self, now: Now, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let out = self.engine.output(id);
        let mut written = 0;
        while written < out.len() {
            match c.stream.write(&out[written..]) {
                Ok(0) => break,
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.engine.handle_written(now, id, written);
                    return self.close(now, id);
                }
            }
        }
        let left = out.len() - written;
        self.engine.handle_written(now, id, written);
        let c = self.conns.get_mut(&id).expect("checked above");
        if left == 0 && c.closing {
            return self.close(now, id);
        }
        let want = left > 0;
        if want != c.want_write {
            c.want_write = want;
            let mut events = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
            if want {
                events |= libc::EPOLLOUT as u32;
            }
            let _ = epoll_ctl(
                self.epfd,
                libc::EPOLL_CTL_MOD,
                c.stream.as_raw_fd(),
                events,
                id,
            );
        }
    }

    fn close(&mut self, now: Now, id: ConnId) {
        if let Some(c) = self.conns.remove(&id) {
            let _ = epoll_ctl(self.epfd, libc::EPOLL_CTL_DEL, c.stream.as_raw_fd(), 0, id);
            self.counters.closed += 1;
            self.engine.handle_closed(now, id);
        }
    }

    /// The end of a loop turn: cross-shard input, group commit, then everything the commit
    /// released. Returns an error only when the log fails (the shard must stop: acknowledging
    /// without durability is not an option).
    pub fn end_turn(&mut self, now: Now) -> io::Result<()> {
        let engine = &mut self.engine;
        self.mailbox.receive(|m| engine.handle_shard_msg(now, m));
        if now.mono_us >= self.next_housekeeping_us {
            self.next_housekeeping_us = now.mono_us + HOUSEKEEPING_US;
            self.engine.handle_timeout(now);
            if self.log.n_segments() >= CHECKPOINT_SEGMENTS {
                self.engine.checkpoint();
            }
        }
        if self.engine.has_records() {
            let records = self.engine.take_records();
            let mut lsns = Vec::with_capacity(records.len());
            for (kind, payload) in &records {
                lsns.push(self.log.append(*kind, payload)?.0);
            }
            self.log.commit()?;
            self.counters.commits += 1;
            self.counters.records += records.len() as u64;
            self.engine.handle_committed(now, &lsns);
        }
        let dead = self.engine.take_dead();
        if !dead.is_empty() {
            dead.into_iter().for_each(|l| self.log.mark_dead(Lsn(l)));
            self.log.compact()?;
        }
        for (to, m) in self.engine.take_outbox() {
            self.mailbox.send(to, m);
        }
        self.mailbox.flush();
        for id in self.engine.take_dirty() {
            self.write(now, id);
        }
        for id in self.engine.take_closing() {
            if let Some(c) = self.conns.get_mut(&id) {
                c.closing = true;
            }
            self.write(now, id);
        }
        Ok(())
    }

    /// Prepares to block in epoll: false when there is already work, so the wait must not
    /// block.
    pub fn prepare_sleep(&mut self) -> bool {
        !self.engine.has_records() && !self.mailbox.backlogged() && self.mailbox.prepare_sleep()
    }

    /// After the wait.
    pub fn woke(&self) {
        self.mailbox.woke();
    }

    /// The values of [`super::ShardStats::CHAT_FIELDS`].
    pub fn stats(&self) -> [u64; 8] {
        let h = self.engine.home_counters();
        [
            self.engine.n_sessions() as u64,
            self.engine.n_pending() as u64,
            self.engine.n_accepted(),
            self.counters.commits,
            self.counters.records,
            self.log.disk_bytes(),
            h.errors.iter().sum(),
            h.deferred,
        ]
    }

    /// Open connections.
    pub fn n_conns(&self) -> usize {
        self.conns.len()
    }

    /// The engine, for counters.
    pub fn engine(&self) -> &ChatShard {
        &self.engine
    }
}
