//! Chat on the `uring` backend, in the shard's one ring beside the media: [`N_ACCEPTS`] accepts
//! on the listener, a multishot receive per connection into chat's own provided-buffer ring
//! (buffer group [`CHAT_BGID`], separate from the datagrams' group 0), at most one send (or one
//! wait for room to send) in flight per connection, and a multishot poll on the shard's waker
//! eventfd. Everything else (engine, log and group commit, mailbox, limits, counters) is
//! [`ChatCore`]'s, shared with the `batch` backend.
//!
//! Direct descriptors. Accepted sockets go straight into the ring's table of registered files
//! (a direct descriptor, `IORING_FILE_INDEX_ALLOC`) and never into the process's descriptor
//! table: every operation names them by slot (no descriptor lookup and reference count per
//! operation), and a shard holds as many connections as its table has slots, which is
//! `max_conns` plus twice [`SLOT_RESERVE`], capped by `RLIMIT_NOFILE` per ring rather than per
//! process. A connection is refused (ERROR 13, see [`ChatCore::refuse`]) when the shard is at
//! `max_conns` or its table is within [`SLOT_RESERVE`] of full; the refused socket is first
//! installed as a regular descriptor (`IORING_OP_FIXED_FD_INSTALL`) so that the shared refusal
//! path can write and linger on it. The peer's address comes with the accept (each of the
//! [`N_ACCEPTS`] accepts has its own address buffer), since a direct descriptor has no
//! `getpeername`. TCP_NODELAY is set on the listener and inherited by every accepted socket.
//!
//! Completions are handled as they are reaped ([`UringChat::handle_cqe`]): received buffers
//! are queued in arrival order (with the end of each stream after its last bytes), sends and
//! polls finish. Once per loop turn, after the datagrams, [`UringChat::turn`] hands the queued
//! bytes to the engine (unless cross-shard messages are spilling: then they wait, the buffer
//! ring runs dry and the receives end with ENOBUFS until reading resumes), runs the core's end
//! of turn (one fdatasync for the records the turn accepted, before any "sent" or delivery is
//! written), and queues the SQEs the connections need: receive re-arms, sends, cancels.
//!
//! Ownership. A received buffer belongs to the driver from its completion until the engine has
//! read it. A send's bytes are copied out of the engine's output (which may grow and move) into
//! the connection's own buffer, which the kernel owns until the send completes; only then does
//! the engine learn how much was written. A closed connection stays in the table, its
//! operations cancelled, until its receive and its send have both completed; only then is its
//! slot closed (`IORING_OP_CLOSE`, batched with the turn's other SQEs) and its buffer freed, so
//! a slot is never reused under an operation. An accept's address buffer belongs to the kernel
//! while that accept is armed.
//!
//! Bounds. Connections: [`MAX_CONNS`] open, plus closed ones whose cancels are in flight.
//! Received entries: one per buffer plus one end per connection. The to-do queue holds each
//! connection once. Chat never takes the SQ entries the media path may need
//! ([`super::MEDIA_SQ`]): when the rest is full it submits early, and what still does not fit
//! waits in the to-do queue. The CQ has room for one completion per chat buffer and
//! [`CHAT_CQ`] beyond; a burst of per-connection completions past that (mass disconnects)
//! waits in the kernel's overflow list (IORING_FEAT_NODROP, required) until the next enter.

use super::{
    BufRing, MEDIA_SQ, UD_ACCEPT, UD_CHAT_CANCEL, UD_CHAT_CLOSE, UD_CHAT_INSTALL, UD_CHAT_POLL,
    UD_CHAT_RECV, UD_CHAT_SEND, UD_KIND, UD_WAKE,
};
use crate::chat::map::Map;
use crate::chat::msg::ConnId;
use crate::engine::Now;
use crate::io::chat_io::{ChatCore, ChatIoCounters, ChatOutput, MAX_CONNS};
use crate::io::storage::Storage;
use crate::io::IoCounters;
use io_uring::types::{DestinationSlot, Fd, Fixed};
use io_uring::{cqueue, opcode, squeue, IoUring};
use std::collections::VecDeque;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Chat's receive buffers per shard (a power of two): 2 MiB with [`CHAT_BUF_LEN`].
pub(super) const CHAT_BUF_COUNT: u16 = 512;
/// Size of one receive buffer; a frame longer than this arrives in several.
const CHAT_BUF_LEN: usize = 4096;
/// Buffer group of chat's receive buffers (the datagrams use group 0).
const CHAT_BGID: u16 = 1;
/// Bytes one send carries at most; the rest of the output follows when it completes.
const SEND_CHUNK: usize = 64 * 1024;
/// Idle send buffers kept for reuse; the others are freed.
const SPARE_SEND_BUFS: usize = 64;
/// SQ entries chat can always use beside the media path's.
pub(super) const CHAT_SQ_MIN: usize = 256;
/// CQ entries reserved for chat: one per receive buffer, and room for per-connection
/// completions (accepts, sends, ends of receives).
pub(super) const CHAT_CQ: usize = CHAT_BUF_COUNT as usize + 512;
/// Accepts armed at once, each with its own address buffer; each is re-armed once per turn, so
/// a turn takes at most this many new connections.
const N_ACCEPTS: usize = 8;
/// The margin below a full table at which connections are refused: room for the accepts and
/// refusals of a few turns. The table has twice this beyond `max_conns`, so that slots of
/// connections that have closed but whose close has not completed yet do not count against
/// `max_conns`.
const SLOT_RESERVE: usize = 8 * N_ACCEPTS;
/// How long accepts wait after one failed (ENFILE, ENOMEM): a failing accept completes at
/// once, and re-arming it every turn would spin.
const ACCEPT_BACKOFF_US: u64 = 100_000;
/// The kernel's bound on one ring's registered files (`IORING_MAX_FIXED_FILES`).
const MAX_FIXED_FILES: usize = 1 << 20;

const _: () = assert!(CHAT_BUF_COUNT.is_power_of_two());
// Connection ids (one per accepted connection, never reused) stay below the kind bits: 2^56
// connections take millennia at any accept rate.
const _: () = assert!(MAX_CONNS as u64 <= !UD_KIND);

/// Counters of this plumbing (logged at exit and tested; not published).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct ChatUringStats {
    /// Multishot receives that ended because chat's buffer ring ran dry (then re-armed).
    pub rx_nobufs: u64,
    /// Receives armed.
    pub recv_arms: u64,
    /// Accepts armed (single-shot; counted per arming).
    pub accept_arms: u64,
    /// Accepts that failed (ENFILE when the table is full, and the like), and refusals whose
    /// socket could not be installed (closed without the ERROR).
    pub accept_errors: u64,
    /// Closes of direct descriptors that failed (none expected).
    pub close_errors: u64,
    /// Sends that found no room (EAGAIN or nothing written) and waited for POLLOUT.
    pub send_waits: u64,
    /// Times chat found its share of the SQ full and submitted early.
    pub sq_full: u64,
}

/// Chat's end state, for the exit log and tests.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(test), allow(dead_code))]
pub(super) struct ChatReport {
    pub stats: ChatUringStats,
    pub counters: ChatIoCounters,
    /// Chat buffers out of the ring at exit: 0 once drained.
    pub bufs_outstanding: usize,
    /// Operations still in flight at exit: 0 once drained.
    pub ops_in_flight: usize,
}

struct Conn {
    /// The socket's direct descriptor.
    slot: u32,
    inbuf: Vec<u8>,
    /// The bytes of the send in flight: the kernel reads them until the send completes.
    out: Vec<u8>,
    recv_armed: bool,
    /// user_data of the send or POLLOUT wait in flight (at most one).
    send_ud: Option<u64>,
    want_recv: bool,
    want_send: bool,
    /// The last send found no room: wait for POLLOUT before the next.
    wait_writable: bool,
    /// Closed for the engine; waits for its operations to end.
    dead: bool,
    recv_cancelled: bool,
    send_cancelled: bool,
    /// In the to-do queue.
    queued: bool,
}

/// Bytes or an end of stream, in arrival order.
enum Received {
    Data { id: ConnId, bid: u16, len: u32 },
    End { id: ConnId },
}

/// What [`UringChat::service`] left to do.
enum Service {
    Done,
    /// A receive waits for buffers or for reading to resume.
    Wait,
    /// The SQ had no room.
    SqFull,
}

/// Where an accept's kernel writes the peer's address.
#[derive(Clone, Copy)]
struct AcceptAddr {
    addr: libc::sockaddr_storage,
    len: libc::socklen_t,
}

/// One shard's chat on io_uring.
pub(super) struct UringChat {
    listener: TcpListener,
    /// The shard's waker (the core's eventfd), polled by a multishot POLL_ADD.
    waker_fd: std::os::fd::RawFd,
    /// Chat's completions, reaped with the media path's and handled in the chat step of the
    /// turn, in order. At most one per operation in flight and per buffer of chat's ring.
    cqes: Vec<(u64, i32, u32)>,
    /// Received bytes are held back while reading is paused, and reading resumed at the end of
    /// the last turn: they must be handled without waiting for a completion.
    held: bool,
    /// The SQ had no room for everything chat queued in the last turn.
    sq_full: bool,
    bufs: BufRing,
    conns: Map<ConnId, Conn>,
    received: VecDeque<Received>,
    todo: VecDeque<ConnId>,
    /// Address buffers of the accepts; the kernel writes one while its accept is armed.
    accept_addrs: Box<[AcceptAddr; N_ACCEPTS]>,
    /// Bit `k`: accept `k` is armed.
    accepts_armed: u32,
    wake_armed: bool,
    /// Slots of the registered-file table.
    table: usize,
    /// Slots holding a socket (accepted and not yet closed).
    slots_used: usize,
    /// Slots to close (their connection is gone, or their refusal is done).
    to_close: Vec<u32>,
    /// Slots of refused connections, to install as regular descriptors.
    to_refuse: Vec<u32>,
    /// The kernel has IORING_OP_FIXED_FD_INSTALL (Linux 6.8); without it a refused connection
    /// is closed without its ERROR.
    can_install: bool,
    /// No accept is armed before this time (after a failed accept).
    accept_backoff_until: Option<u64>,
    /// Receives, sends, installs and closes in flight over all connections.
    n_ops: usize,
    spare: Vec<Vec<u8>>,
    now: Now,
    stopping: bool,
    /// Flags of every send (MSG_DONTWAIT in tests only).
    send_flags: i32,
    stats: ChatUringStats,
}

impl UringChat {
    /// Chat on `listener` for a core with `max_conns` and waker `waker_fd`; registers chat's
    /// buffer ring with `n_bufs` buffers on `ring`.
    pub(super) fn new(
        listener: TcpListener,
        waker_fd: std::os::fd::RawFd,
        max_conns: usize,
        ring: &IoUring,
        n_bufs: u16,
        send_dontwait: bool,
    ) -> io::Result<Self> {
        if !ring.params().is_feature_nodrop() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "kernel lacks IORING_FEAT_NODROP (chat on io_uring needs Linux 5.5+)",
            ));
        }
        // Blocking: io_uring then waits for readiness itself instead of failing with EAGAIN.
        listener.set_nonblocking(false)?;
        // Accepted sockets inherit it; a direct descriptor has no setsockopt of its own here.
        crate::io::sys::set_tcp_nodelay(listener.as_raw_fd())?;
        let table = (max_conns + 2 * SLOT_RESERVE)
            .min(crate::io::sys::nofile_limit())
            .min(MAX_FIXED_FILES);
        if table <= SLOT_RESERVE {
            return Err(io::Error::other(format!(
                "RLIMIT_NOFILE ({table}) leaves chat on io_uring no room for connections"
            )));
        }
        let mut probe = io_uring::Probe::new();
        let can_install = ring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::FixedFdInstall::CODE);
        ring.submitter()
            .register_files_sparse(table as u32)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("registering {table} direct descriptors for chat: {e}"),
                )
            })?;
        let bufs = BufRing::new(n_bufs, CHAT_BUF_LEN, CHAT_BGID)?;
        bufs.register(ring)
            .map_err(|e| io::Error::new(e.kind(), super::explain_register(&e)))?;
        Ok(Self {
            listener,
            waker_fd,
            cqes: Vec::with_capacity(usize::from(n_bufs) + 2 * N_ACCEPTS),
            held: false,
            sq_full: false,
            bufs,
            conns: Map::default(),
            received: VecDeque::with_capacity(usize::from(n_bufs)),
            todo: VecDeque::new(),
            accept_addrs: Box::new(
                [AcceptAddr {
                    addr: crate::io::sys::sockaddr_storage(),
                    len: 0,
                }; N_ACCEPTS],
            ),
            accepts_armed: 0,
            wake_armed: false,
            table,
            slots_used: 0,
            to_close: Vec::new(),
            to_refuse: Vec::new(),
            can_install,
            accept_backoff_until: None,
            n_ops: 0,
            spare: Vec::new(),
            now: Now {
                mono_us: 0,
                unix_s: 0,
            },
            stopping: false,
            send_flags: if send_dontwait { libc::MSG_DONTWAIT } else { 0 },
            stats: ChatUringStats::default(),
        })
    }

    /// Keeps one of chat's completions for [`UringChat::input`].
    pub(super) fn queue_cqe(&mut self, ud: u64, res: i32, flags: u32) {
        self.cqes.push((ud, res, flags));
    }

    /// The chat step of the turn: the completions reaped since the last one, then (unless
    /// reading is paused) the received bytes, handed to `core` in order.
    pub(super) fn input<S: Storage>(&mut self, core: &mut ChatCore<S>, now: Now) {
        self.now = now;
        self.handle_cqes(core);
        if !core.reading_paused() {
            self.handle_received(core, now);
        }
    }

    /// Handles the completions kept by [`UringChat::queue_cqe`].
    pub(super) fn handle_cqes<S: Storage>(&mut self, core: &mut ChatCore<S>) {
        let mut cqes = std::mem::take(&mut self.cqes);
        for &(ud, res, flags) in &cqes {
            self.handle_cqe(core, ud, res, flags);
        }
        cqes.clear();
        self.cqes = cqes;
    }

    /// Handles one of chat's completions.
    fn handle_cqe<S: Storage>(&mut self, core: &mut ChatCore<S>, ud: u64, res: i32, flags: u32) {
        let id = ud & !UD_KIND;
        match ud & UD_KIND {
            UD_ACCEPT => self.accepted(core, id as usize, res),
            UD_CHAT_INSTALL => self.installed(core, id as u32, res),
            UD_CHAT_CLOSE => {
                self.n_ops -= 1;
                self.slots_used -= 1;
                if res < 0 {
                    self.stats.close_errors += 1;
                }
            }
            UD_WAKE => {
                if res >= 0 {
                    core.drain_waker();
                }
                if !cqueue::more(flags) {
                    self.wake_armed = false;
                }
            }
            UD_CHAT_RECV => self.received(ConnId(id), res, flags),
            UD_CHAT_SEND => self.sent(core, ConnId(id), res),
            UD_CHAT_POLL => self.writable(core, ConnId(id), res),
            // A cancel's own result (done, or already finished) needs nothing.
            _ => debug_assert_eq!(ud & UD_KIND, UD_CHAT_CANCEL),
        }
    }

    fn accepted<S: Storage>(&mut self, core: &mut ChatCore<S>, k: usize, res: i32) {
        self.accepts_armed &= !(1 << k);
        if res < 0 {
            if res != -libc::ECANCELED && res != -libc::ECONNABORTED {
                self.stats.accept_errors += 1;
                self.accept_backoff_until = Some(self.now.mono_us + ACCEPT_BACKOFF_US);
            }
            return;
        }
        // A successful accept into the table returns the slot it took.
        let slot = res as u32;
        self.slots_used += 1;
        let peer = crate::io::sys::from_sockaddr(&self.accept_addrs[k].addr);
        let Some(peer) = peer.filter(|_| !self.stopping) else {
            self.to_close.push(slot);
            return;
        };
        if !core.has_room() || self.slots_used + SLOT_RESERVE > self.table {
            if self.can_install {
                self.to_refuse.push(slot);
            } else {
                self.stats.accept_errors += 1;
                self.to_close.push(slot);
            }
            return;
        }
        let id = core.accept(self.now, peer.ip());
        debug_assert_eq!(id.0 & UD_KIND, 0, "connection ids stay below the kind bits");
        let conn = Conn {
            slot,
            inbuf: Vec::new(),
            out: Vec::new(),
            recv_armed: false,
            send_ud: None,
            want_recv: true,
            want_send: false,
            wait_writable: false,
            dead: false,
            recv_cancelled: false,
            send_cancelled: false,
            queued: false,
        };
        self.conns.insert(id, conn);
        self.enqueue(id);
    }

    /// A refused connection's socket, installed as a regular descriptor (`res`), gets the
    /// refusal; its slot is closed either way.
    fn installed<S: Storage>(&mut self, core: &mut ChatCore<S>, slot: u32, res: i32) {
        self.n_ops -= 1;
        self.to_close.push(slot);
        if res < 0 {
            self.stats.accept_errors += 1;
            return;
        }
        // SAFETY: a successful install returns a new descriptor that nothing else owns.
        let stream = TcpStream::from(unsafe { OwnedFd::from_raw_fd(res) });
        if !self.stopping {
            core.refuse(self.now, stream);
        }
    }

    fn received(&mut self, id: ConnId, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        if let Some(bid) = bid {
            self.bufs.take(bid);
        }
        let Some(c) = self.conns.get_mut(&id) else {
            // Not reached: a connection stays in the table until its receive has ended.
            if let Some(bid) = bid {
                self.bufs.put(bid);
            }
            return;
        };
        // One terminal completion per armed receive (checked, not assumed).
        if !more && std::mem::take(&mut c.recv_armed) {
            self.n_ops -= 1;
        }
        match bid {
            Some(bid) if res > 0 && !c.dead && !self.stopping => {
                self.received.push_back(Received::Data {
                    id,
                    bid,
                    len: res as u32,
                });
            }
            Some(bid) => self.bufs.put(bid),
            None => {}
        }
        if more || self.stopping {
            return;
        }
        if c.dead {
            return self.maybe_finalize(id);
        }
        match res {
            // The buffer ring ran dry: re-armed once buffers are back. A multishot receive
            // may also end after data (the kernel's choice): re-armed as well.
            r if r == -libc::ENOBUFS || r > 0 => {
                if r < 0 {
                    self.stats.rx_nobufs += 1;
                }
                c.want_recv = true;
                self.enqueue(id);
            }
            // End of stream or an error: closed after the bytes before it.
            _ => self.received.push_back(Received::End { id }),
        }
    }

    fn sent<S: Storage>(&mut self, core: &mut ChatCore<S>, id: ConnId, res: i32) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.send_ud.take().is_some() {
            self.n_ops -= 1;
        }
        if c.dead {
            return self.maybe_finalize(id);
        }
        if self.stopping {
            return;
        }
        match res {
            n if n > 0 => {
                core.written(self.now, id, n as usize);
                if core.output(id).is_empty() {
                    // Idle: the buffer goes back to the spares (or is freed).
                    let out = std::mem::take(&mut c.out);
                    if self.spare.len() < SPARE_SEND_BUFS {
                        self.spare.push(out);
                    }
                }
            }
            0 => c.wait_writable = true,
            e if e == -libc::EAGAIN || e == -libc::EINTR => {
                c.wait_writable = e == -libc::EAGAIN;
            }
            _ => return self.close(core, id),
        }
        if c.wait_writable {
            self.stats.send_waits += 1;
        }
        c.want_send = true;
        self.enqueue(id);
    }

    fn writable<S: Storage>(&mut self, core: &mut ChatCore<S>, id: ConnId, res: i32) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        c.wait_writable = false;
        if c.send_ud.take().is_some() {
            self.n_ops -= 1;
        }
        if c.dead {
            return self.maybe_finalize(id);
        }
        if self.stopping {
            return;
        }
        // Errors on the socket (POLLERR, POLLHUP) show in the send that follows.
        if res < 0 {
            return self.close(core, id);
        }
        c.want_send = true;
        self.enqueue(id);
    }

    fn enqueue(&mut self, id: ConnId) {
        if let Some(c) = self.conns.get_mut(&id) {
            if !c.queued {
                c.queued = true;
                self.todo.push_back(id);
            }
        }
    }

    /// Closes `id` for the engine; its operations are cancelled and its socket closed once
    /// they have ended.
    fn close<S: Storage>(&mut self, core: &mut ChatCore<S>, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.dead {
            return;
        }
        c.dead = true;
        core.closed(self.now, id);
        self.enqueue(id);
    }

    /// Drops a closed connection whose operations have all ended.
    fn maybe_finalize(&mut self, id: ConnId) {
        let done = self
            .conns
            .get(&id)
            .is_some_and(|c| c.dead && !c.recv_armed && c.send_ud.is_none());
        if done {
            let c = self.conns.remove(&id).expect("checked above");
            self.to_close.push(c.slot);
            if self.spare.len() < SPARE_SEND_BUFS && c.out.capacity() > 0 {
                self.spare.push(c.out);
            }
        }
    }

    /// After the core's end of turn: sends for what it released, closes, re-arms, accepts;
    /// see the module documentation.
    pub(super) fn output<S: Storage>(
        &mut self,
        core: &mut ChatCore<S>,
        ring: &mut IoUring,
        now: Now,
        io: &mut IoCounters,
    ) {
        self.now = now;
        while let Some(o) = core.poll_output() {
            match o {
                ChatOutput::Transmit(id) => {
                    if let Some(c) = self.conns.get_mut(&id) {
                        c.want_send = true;
                        self.enqueue(id);
                    }
                }
                // Flushed after the engine closed it, or a closing peer that does not read:
                // its send in flight is cancelled.
                ChatOutput::Close(id) => self.close(core, id),
            }
        }
        // Publish the buffers the engine is done with before receives are re-armed.
        self.bufs.sync();
        self.sq_full = !self.submit(core, ring, io);
        // Bytes held back while the rings spilled, and the spill is over: they are handled
        // next turn, not after a wait (if the pause held every receive buffer, no receive
        // completion would come to end it).
        self.held = !self.received.is_empty() && !core.reading_paused();
    }

    /// Whether chat has work that must not wait for a completion.
    pub(super) fn must_not_sleep(&self) -> bool {
        self.sq_full || self.held || !self.cqes.is_empty()
    }

    /// When accepts are re-armed after a failed one, if they wait.
    pub(super) fn poll_timeout(&self) -> u64 {
        self.accept_backoff_until.unwrap_or(u64::MAX)
    }

    /// Hands the received bytes to the engine, in order, and closes streams that ended.
    fn handle_received<S: Storage>(&mut self, core: &mut ChatCore<S>, now: Now) {
        while let Some(r) = self.received.pop_front() {
            match r {
                Received::Data { id, bid, len } => {
                    // SAFETY: the completion's reference keeps `bid` out of the ring until the
                    // `put` below, so the kernel does not write it; the kernel filled `len` ≤
                    // CHAT_BUF_LEN bytes of it, and the mapping lives as long as `self`.
                    let data =
                        unsafe { std::slice::from_raw_parts(self.bufs.buf_ptr(bid), len as usize) };
                    let ok = match self.conns.get_mut(&id) {
                        Some(c) if !c.dead => core.feed(now, id, &mut c.inbuf, data),
                        _ => true,
                    };
                    self.bufs.put(bid);
                    if !ok {
                        self.close(core, id);
                    }
                }
                Received::End { id } => self.close(core, id),
            }
        }
    }

    /// Queues what the connections in the to-do queue need, then the closes and refusals, then
    /// the accepts (unless backing off) and the waker's poll if they are not armed. Returns
    /// false when the SQ had no room for everything.
    fn submit<S: Storage>(
        &mut self,
        core: &mut ChatCore<S>,
        ring: &mut IoUring,
        io: &mut IoCounters,
    ) -> bool {
        let mut room = true;
        for _ in 0..self.todo.len() {
            let Some(id) = self.todo.pop_front() else {
                break;
            };
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            c.queued = false;
            match self.service(core, ring, io, id) {
                Service::Done => {}
                Service::Wait => self.enqueue(id),
                Service::SqFull => {
                    self.enqueue(id);
                    room = false;
                    break;
                }
            }
        }
        // After the to-do queue, which finalizes connections: their slots are closed in this
        // submission, before the accepts below can fill the table.
        room &= self.close_and_refuse(ring, io);
        let backing_off = self
            .accept_backoff_until
            .is_some_and(|t| self.now.mono_us < t);
        for k in 0..N_ACCEPTS {
            if backing_off {
                break;
            }
            if self.accepts_armed & (1 << k) != 0 {
                continue;
            }
            let a = &mut self.accept_addrs[k];
            a.len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            let sqe = opcode::Accept::new(
                Fd(self.listener.as_raw_fd()),
                (&raw mut a.addr).cast::<libc::sockaddr>(),
                &raw mut a.len,
            )
            .file_index(Some(DestinationSlot::auto_target()))
            .build()
            .user_data(UD_ACCEPT | k as u64);
            if !self.push(ring, io, &sqe) {
                room = false;
                break;
            }
            self.accepts_armed |= 1 << k;
            self.stats.accept_arms += 1;
        }
        if !self.wake_armed {
            let sqe = opcode::PollAdd::new(Fd(self.waker_fd), libc::POLLIN as u32)
                .multi(true)
                .build()
                .user_data(UD_WAKE);
            if self.push(ring, io, &sqe) {
                self.wake_armed = true;
            } else {
                room = false;
            }
        }
        room
    }

    /// Queues the closes of slots no longer used and the installs of refused connections.
    /// Returns false when the SQ had no room for all of them.
    fn close_and_refuse(&mut self, ring: &mut IoUring, io: &mut IoCounters) -> bool {
        while let Some(&slot) = self.to_close.last() {
            let sqe = opcode::Close::new(Fixed(slot))
                .build()
                .user_data(UD_CHAT_CLOSE | u64::from(slot));
            if !self.push(ring, io, &sqe) {
                return false;
            }
            self.to_close.pop();
            self.n_ops += 1;
        }
        while let Some(&slot) = self.to_refuse.last() {
            let sqe = opcode::FixedFdInstall::new(Fixed(slot), 0)
                .build()
                .user_data(UD_CHAT_INSTALL | u64::from(slot));
            if !self.push(ring, io, &sqe) {
                return false;
            }
            self.to_refuse.pop();
            self.n_ops += 1;
        }
        true
    }

    /// Queues the operations connection `id` needs.
    fn service<S: Storage>(
        &mut self,
        core: &mut ChatCore<S>,
        ring: &mut IoUring,
        io: &mut IoCounters,
        id: ConnId,
    ) -> Service {
        let paused = core.reading_paused();
        let free = self.bufs.n_held < usize::from(self.bufs.n);
        let Some(c) = self.conns.get_mut(&id) else {
            return Service::Done;
        };
        let fd = Fixed(c.slot);
        if c.dead {
            let recv = (c.recv_armed && !c.recv_cancelled).then_some(UD_CHAT_RECV | id.0);
            let send = c.send_ud.filter(|_| !c.send_cancelled);
            for target in [recv, send].into_iter().flatten() {
                let sqe = opcode::AsyncCancel::new(target)
                    .build()
                    .user_data(UD_CHAT_CANCEL | id.0);
                if !self.push(ring, io, &sqe) {
                    return Service::SqFull;
                }
                let c = self.conns.get_mut(&id).expect("checked above");
                if target & UD_KIND == UD_CHAT_RECV {
                    c.recv_cancelled = true;
                } else {
                    c.send_cancelled = true;
                }
            }
            self.maybe_finalize(id);
            return Service::Done;
        }
        let mut wait = false;
        if c.want_recv && !c.recv_armed {
            if paused || !free {
                wait = true;
            } else {
                let sqe = opcode::RecvMulti::new(fd, CHAT_BGID)
                    .build()
                    .user_data(UD_CHAT_RECV | id.0);
                if !self.push(ring, io, &sqe) {
                    return Service::SqFull;
                }
                let c = self.conns.get_mut(&id).expect("checked above");
                c.recv_armed = true;
                c.want_recv = false;
                self.n_ops += 1;
                self.stats.recv_arms += 1;
            }
        }
        let c = self.conns.get_mut(&id).expect("checked above");
        if c.want_send && c.send_ud.is_none() && !self.start_send(core, ring, io, id) {
            return Service::SqFull;
        }
        if wait {
            Service::Wait
        } else {
            Service::Done
        }
    }

    /// Queues a send of the start of `id`'s output, or a wait for room to send after a send
    /// that found none. Returns false when the SQ had no room.
    fn start_send<S: Storage>(
        &mut self,
        core: &mut ChatCore<S>,
        ring: &mut IoUring,
        io: &mut IoCounters,
        id: ConnId,
    ) -> bool {
        let Some(c) = self.conns.get_mut(&id) else {
            return true;
        };
        let fd = Fixed(c.slot);
        let (sqe, ud) = if c.wait_writable {
            let ud = UD_CHAT_POLL | id.0;
            let sqe = opcode::PollAdd::new(fd, libc::POLLOUT as u32).build();
            (sqe.user_data(ud), ud)
        } else {
            let out = core.output(id);
            if out.is_empty() {
                c.want_send = false;
                return true;
            }
            let n = out.len().min(SEND_CHUNK);
            if c.out.capacity() == 0 {
                c.out = self.spare.pop().unwrap_or_default();
            }
            c.out.clear();
            c.out.extend_from_slice(&out[..n]);
            let ud = UD_CHAT_SEND | id.0;
            let sqe = opcode::Send::new(fd, c.out.as_ptr(), n as u32)
                .flags(self.send_flags)
                .build();
            (sqe.user_data(ud), ud)
        };
        if !self.push(ring, io, &sqe) {
            return false;
        }
        let c = self.conns.get_mut(&id).expect("checked above");
        c.want_send = false;
        c.send_ud = Some(ud);
        self.n_ops += 1;
        true
    }

    /// Queues one SQE in chat's share of the SQ, submitting early once when that share is full.
    fn push(&mut self, ring: &mut IoUring, io: &mut IoCounters, sqe: &squeue::Entry) -> bool {
        for attempt in 0..2 {
            let mut sq = ring.submission();
            if sq.len() + MEDIA_SQ < sq.capacity() {
                // SAFETY: every chat SQE points at memory that outlives its operation: a
                // connection's send buffer (kept, with the connection, until the send's
                // completion), an accept's address buffer (boxed in the driver, not re-armed
                // until that accept's completion), chat's buffer ring (registered for the
                // driver's lifetime, which drains every operation before freeing it), or
                // nothing.
                return unsafe { sq.push(sqe) }.is_ok();
            }
            drop(sq);
            if attempt == 0 {
                self.stats.sq_full += 1;
                io.syscalls += 1;
                if ring.submit().is_err() {
                    return false;
                }
            }
        }
        false
    }

    /// The shard is stopping: completions from now on only release what they held.
    pub(super) fn stopping(&mut self) {
        self.stopping = true;
    }

    /// Returns the buffers of bytes not handed to the engine (at exit).
    pub(super) fn drop_received(&mut self) {
        while let Some(r) = self.received.pop_front() {
            if let Received::Data { bid, .. } = r {
                self.bufs.put(bid);
            }
        }
    }

    /// Whether no chat operation is in flight.
    pub(super) fn idle(&self) -> bool {
        self.accepts_armed == 0 && !self.wake_armed && self.n_ops == 0
    }

    /// Closes every socket (unregistering the table closes the direct descriptors) and
    /// unregisters the buffer ring, once [`UringChat::idle`].
    pub(super) fn close_all(&mut self, ring: &IoUring) {
        self.conns.clear();
        let _ = ring.submitter().unregister_files();
        let _ = ring.submitter().unregister_buf_ring(CHAT_BGID);
    }

    /// The end state.
    pub(super) fn report(&self, counters: ChatIoCounters) -> ChatReport {
        ChatReport {
            stats: self.stats,
            counters,
            bufs_outstanding: self.bufs.n_held,
            ops_in_flight: self.n_ops
                + self.accepts_armed.count_ones() as usize
                + usize::from(self.wake_armed),
        }
    }
}
