//! Chat plumbing of the `batch` backend: a non-blocking TCP listener and connections on the
//! shard's epoll, read and written when ready. Everything else (engine, log, mailbox, limits,
//! counters) is [`ChatCore`]'s.

use super::chat_io::{ChatCore, ChatOutput, MAX_ACCEPTS_PER_TURN, MAX_INBUF};
use super::storage::Storage;
use super::sys::epoll_ctl;
use crate::chat::map::Map;
use crate::chat::msg::ConnId;
use crate::engine::Now;

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};

/// epoll tag of the listener.
pub const TAG_LISTENER: u64 = 1;
/// epoll tag of the shard's waker.
pub const TAG_WAKER: u64 = 2;
/// How long the listener's epoll events stay cleared (EPOLL_CTL_MOD, no events) after the
/// process ran out of descriptors (EMFILE or ENFILE): a level-triggered listener with a
/// connection waiting would otherwise wake every wait at once and spin.
const ACCEPT_PAUSE_US: u64 = 100_000;

struct Conn {
    stream: TcpStream,
    inbuf: Vec<u8>,
    /// EPOLLOUT is registered.
    want_write: bool,
}

/// One shard's chat on epoll: its sockets. The [`ChatCore`] they serve is the loop's, passed in.
pub struct EpollChat {
    listener: TcpListener,
    conns: Map<ConnId, Conn>,
    epfd: RawFd,
    /// A descriptor held in reserve (`/dev/null`): at the descriptor limit it is given up to
    /// accept one waiting connection and refuse it with ERROR 13, instead of leaving every
    /// waiting client without an answer. Reopened once a descriptor is free again.
    spare: Option<std::fs::File>,
    /// The listener's epoll events are cleared until this time (after EMFILE or ENFILE).
    accepts_paused_until: Option<u64>,
    /// The epoll set waited on while reading is paused (cross-shard messages spill): the
    /// waker, what the backend adds ([`EpollChat::also_while_paused`]) and, for EPOLLOUT
    /// only, the connections with output waiting for room; not the others, so that the
    /// level-triggered events of unread connections do not make every wait return at once.
    /// New connections wait in the listener's queue until the pause ends.
    paused_set: std::os::fd::OwnedFd,
    /// Reading was paused at the end of the last turn (the core's mailbox spills).
    paused: bool,
}

impl EpollChat {
    /// Registers `listener` and `core`'s waker on `epfd`.
    pub fn new<S: Storage>(
        core: &ChatCore<S>,
        listener: TcpListener,
        epfd: RawFd,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let events = libc::EPOLLIN as u32;
        epoll_ctl(
            epfd,
            libc::EPOLL_CTL_ADD,
            listener.as_raw_fd(),
            events,
            TAG_LISTENER,
        )?;
        epoll_ctl(
            epfd,
            libc::EPOLL_CTL_ADD,
            core.waker_fd(),
            events,
            TAG_WAKER,
        )?;
        let paused_set = super::sys::epoll_create()?;
        epoll_ctl(
            paused_set.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            core.waker_fd(),
            events,
            TAG_WAKER,
        )?;
        Ok(Self {
            listener,
            conns: Map::default(),
            epfd,
            spare: Some(std::fs::File::open("/dev/null")?),
            accepts_paused_until: None,
            paused_set,
            paused: false,
        })
    }

    /// Adds `fd` (readable events, tagged `tag`) to the set waited on while reading is paused.
    pub fn also_while_paused(&self, fd: RawFd, tag: u64) -> io::Result<()> {
        let events = libc::EPOLLIN as u32;
        epoll_ctl(
            self.paused_set.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            fd,
            events,
            tag,
        )
    }

    /// The epoll set to wait on this turn: the shard's whole set, or while reading is paused
    /// only the waker and what [`EpollChat::also_while_paused`] added.
    pub fn wait_set(&self) -> RawFd {
        if self.paused {
            self.paused_set.as_raw_fd()
        } else {
            self.epfd
        }
    }

    /// Handles one epoll event tagged for chat.
    pub fn handle_event<S: Storage>(
        &mut self,
        core: &mut ChatCore<S>,
        now: Now,
        tag: u64,
        events: u32,
    ) {
        match tag {
            TAG_LISTENER => self.accept(core, now),
            TAG_WAKER => core.drain_waker(),
            tag => {
                let id = ConnId(tag);
                if events
                    & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32
                    != 0
                {
                    // Returns at once while reading is paused.
                    self.read(core, now, id);
                }
                // While paused, a hang-up or error comes from the paused set (the connection
                // waits to write): the write fails and closes it, so that it does not end
                // every wait.
                let mut out = libc::EPOLLOUT as u32;
                if core.reading_paused() {
                    out |= (libc::EPOLLHUP | libc::EPOLLERR) as u32;
                }
                if events & out != 0 {
                    self.write(core, now, id);
                }
            }
        }
    }

    fn accept<S: Storage>(&mut self, core: &mut ChatCore<S>, now: Now) {
        for _ in 0..MAX_ACCEPTS_PER_TURN {
            let (stream, peer) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    return self.out_of_descriptors(core, now);
                }
                // The peer gave up before the accept, or a pending network error of the new
                // connection that accept(2) says to retry after.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(
                            libc::ECONNABORTED
                                | libc::EINTR
                                | libc::EPROTO
                                | libc::ENOPROTOOPT
                                | libc::ENETDOWN
                                | libc::ENONET
                                | libc::EHOSTDOWN
                                | libc::EHOSTUNREACH
                                | libc::ENETUNREACH
                                | libc::EOPNOTSUPP
                        )
                    ) =>
                {
                    continue
                }
                // Anything else (ENOMEM, a security module's EPERM) leaves the connection
                // queued: the level-triggered listener would wake every wait at once, so it
                // pauses as when out of descriptors.
                Err(_) => return self.pause_accepts(now),
            };
            if !core.has_room() {
                core.refuse(now, stream);
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let _ = stream.set_nodelay(true);
            let fd = stream.as_raw_fd();
            let id = core.accept(now, peer.ip());
            let events = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
            if epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, fd, events, id.0).is_err() {
                core.closed(now, id);
                continue;
            }
            self.conns.insert(
                id,
                Conn {
                    stream,
                    inbuf: Vec::new(),
                    want_write: false,
                },
            );
        }
    }

    /// The process has no descriptor for a waiting connection: the spare is given up so that
    /// one waiting connection gets ERROR 13 (it then holds that descriptor while it lingers),
    /// and the listener's epoll events are cleared for [`ACCEPT_PAUSE_US`].
    fn out_of_descriptors<S: Storage>(&mut self, core: &mut ChatCore<S>, now: Now) {
        if self.spare.take().is_some() {
            if let Ok((stream, _)) = self.listener.accept() {
                core.refuse(now, stream);
            }
        }
        self.pause_accepts(now);
    }

    /// Clears the listener's epoll events for [`ACCEPT_PAUSE_US`].
    fn pause_accepts(&mut self, now: Now) {
        if self.accepts_paused_until.is_none() {
            let _ = epoll_ctl(
                self.epfd,
                libc::EPOLL_CTL_MOD,
                self.listener.as_raw_fd(),
                0,
                TAG_LISTENER,
            );
        }
        self.accepts_paused_until = Some(now.mono_us + ACCEPT_PAUSE_US);
    }

    /// Restores the listener's epoll events once its pause is over and the spare
    /// descriptor could be reopened (else the pause goes on).
    fn resume_accepts(&mut self, now: Now) {
        let Some(until) = self.accepts_paused_until else {
            return;
        };
        if now.mono_us < until {
            return;
        }
        if self.spare.is_none() {
            self.spare = std::fs::File::open("/dev/null").ok();
            if self.spare.is_none() {
                self.accepts_paused_until = Some(now.mono_us + ACCEPT_PAUSE_US);
                return;
            }
        }
        let events = libc::EPOLLIN as u32;
        let fd = self.listener.as_raw_fd();
        if epoll_ctl(self.epfd, libc::EPOLL_CTL_MOD, fd, events, TAG_LISTENER).is_ok() {
            self.accepts_paused_until = None;
        }
    }

    fn read<S: Storage>(&mut self, core: &mut ChatCore<S>, now: Now, id: ConnId) {
        // Reading stops while cross-shard messages are spilling: that is the backpressure.
        if core.reading_paused() {
            return;
        }
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let mut buf = [0u8; 16 * 1024];
        // The peer's end of stream (or a failed read) closes the connection, but only after
        // what was read before it is handled: frames sent just before a close count.
        let mut eof = false;
        loop {
            if c.inbuf.len() >= MAX_INBUF {
                break;
            }
            let room = buf.len().min(MAX_INBUF - c.inbuf.len());
            match c.stream.read(&mut buf[..room]) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    c.inbuf.extend_from_slice(&buf[..n]);
                    // A short read drained the socket: the epoll registration is level
                    // triggered, so data that arrives later is reported again, and a read
                    // that would only return EAGAIN is saved.
                    if n < room {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        core.input(now, id, &mut c.inbuf);
        if eof {
            self.close(core, now, id);
        }
    }

    fn write<S: Storage>(&mut self, core: &mut ChatCore<S>, now: Now, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let out = core.output(id);
        let mut written = 0;
        while written < out.len() {
            match c.stream.write(&out[written..]) {
                Ok(0) => break,
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    core.written(now, id, written);
                    return self.close(core, now, id);
                }
            }
        }
        let left = out.len() - written;
        // A closing connection flushed now is queued to close (`ChatCore::poll_output`).
        core.written(now, id, written);
        let c = self.conns.get_mut(&id).expect("checked above");
        let want = left > 0;
        if want != c.want_write {
            let mut events = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
            if want {
                events |= libc::EPOLLOUT as u32;
            }
            // The registration changes only if the call succeeds (ENOMEM): the next write
            // tries again.
            let fd = c.stream.as_raw_fd();
            if epoll_ctl(self.epfd, libc::EPOLL_CTL_MOD, fd, events, id.0).is_ok() {
                c.want_write = want;
                // Output waiting for room is written while reading is paused too.
                let paused = self.paused_set.as_raw_fd();
                let _ = if want {
                    epoll_ctl(paused, libc::EPOLL_CTL_ADD, fd, libc::EPOLLOUT as u32, id.0)
                } else {
                    epoll_ctl(paused, libc::EPOLL_CTL_DEL, fd, 0, id.0)
                };
            }
        }
    }

    fn close<S: Storage>(&mut self, core: &mut ChatCore<S>, now: Now, id: ConnId) {
        if let Some(c) = self.conns.remove(&id) {
            let _ = epoll_ctl(
                self.epfd,
                libc::EPOLL_CTL_DEL,
                c.stream.as_raw_fd(),
                0,
                id.0,
            );
            if c.want_write {
                let paused = self.paused_set.as_raw_fd();
                let _ = epoll_ctl(paused, libc::EPOLL_CTL_DEL, c.stream.as_raw_fd(), 0, id.0);
            }
            core.closed(now, id);
            drop(c);
            // The descriptor just freed goes to the spare first, before another shard's
            // listener can take it.
            if self.spare.is_none() {
                self.spare = std::fs::File::open("/dev/null").ok();
            }
        }
    }

    /// After the core's end of turn: what [`ChatCore::poll_output`] says, written to the
    /// sockets or closed.
    pub fn output<S: Storage>(&mut self, core: &mut ChatCore<S>, now: Now) {
        while let Some(o) = core.poll_output() {
            match o {
                ChatOutput::Transmit(id) => self.write(core, now, id),
                ChatOutput::Close(id) => self.close(core, now, id),
            }
        }
        self.resume_accepts(now);
        self.paused = core.reading_paused();
    }

    /// When the listener's pause ends, if it is paused.
    pub fn poll_timeout(&self) -> u64 {
        self.accepts_paused_until.unwrap_or(u64::MAX)
    }
}
