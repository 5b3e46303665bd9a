//! The `batch` backend: recvmmsg(2) + sendmmsg(2), two system calls per loop turn.
//!
//! [`Batch`] is the shard loop's [`Transport`] (`io/shard_loop.rs` has the turn). Its media
//! step: the first recvmmsg blocks until a datagram arrives (MSG_WAITFORONE, bounded by a
//! receive timeout; with chat, the turn's epoll_wait does the waiting instead); up to
//! [`MAX_BATCHES_PER_TURN`] times it receives up to [`RX_BATCH`] datagrams with one recvmmsg,
//! runs each through the engine, and sends every copy it asks for with one sendmmsg per batch.
//! A fan-out to N subscribers queues N message headers that all point at the same received
//! buffer: no copy per subscriber.

use super::chat_epoll::EpollChat;
use super::chat_io::{ChatCore, ChatParts};
use super::shard_loop::{Clock, ShardLoop, Transport};
use super::storage::{LogStorage, Storage};
use super::sys::{from_sockaddr, sockaddr_storage, to_sockaddr};
use super::{
    IoCounters, ShardCtx, MAX_BATCHES_PER_TURN, MAX_DATAGRAM, MAX_WAIT_MS, RX_BATCH, TX_BATCH,
};
use crate::engine::{Now, Shard, Verdict};
use crate::error::ShardError;
use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::ptr;
use std::time::Duration;

/// Size of a STUN reply buffer; replies are never larger than their request.
const REPLY_LEN: usize = 256;

/// Receive side: buffers, source addresses and the headers that point at them. Boxed once and
/// never moved, so the raw pointers in `hdrs` stay valid.
struct Rx {
    bufs: [[u8; MAX_DATAGRAM]; RX_BATCH],
    replies: [[u8; REPLY_LEN]; RX_BATCH],
    addrs: [libc::sockaddr_storage; RX_BATCH],
    iovecs: [libc::iovec; RX_BATCH],
    hdrs: [libc::mmsghdr; RX_BATCH],
}

/// Send side: one header, address and iovec per queued copy.
struct Tx {
    addrs: Box<[libc::sockaddr_storage]>,
    iovecs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    len: usize,
}

impl Rx {
    fn new() -> Box<Self> {
        // SAFETY: every field is plain old data for which all-zero bytes are valid (null
        // pointers in iovec and mmsghdr are fixed up by `arm` before any use).
        let mut rx: Box<Self> = unsafe { Box::new_zeroed().assume_init() };
        rx.arm();
        rx
    }

    /// Points every header at its buffer and address slot, and resets the lengths the kernel
    /// overwrote.
    fn arm(&mut self) {
        for i in 0..RX_BATCH {
            self.iovecs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: MAX_DATAGRAM,
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovecs[i];
            h.msg_iovlen = 1;
            h.msg_control = ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
    }
}

impl Tx {
    fn new() -> Self {
        let iov = libc::iovec {
            iov_base: ptr::null_mut(),
            iov_len: 0,
        };
        // SAFETY: all-zero is a valid mmsghdr (null pointers, zero lengths).
        let hdr: libc::mmsghdr = unsafe { std::mem::zeroed() };
        Self {
            addrs: vec![sockaddr_storage(); TX_BATCH].into_boxed_slice(),
            iovecs: vec![iov; TX_BATCH].into_boxed_slice(),
            hdrs: vec![hdr; TX_BATCH].into_boxed_slice(),
            len: 0,
        }
    }

    fn is_full(&self) -> bool {
        self.len == TX_BATCH
    }

    /// Queues a copy of `data` for `dest`. The caller keeps `data` alive and unchanged until
    /// the next `flush`.
    fn push(&mut self, dest: &SocketAddr, data: *const u8, len: usize) {
        debug_assert!(!self.is_full());
        let i = self.len;
        let namelen = to_sockaddr(dest, &mut self.addrs[i]);
        self.iovecs[i] = libc::iovec {
            iov_base: data as *mut libc::c_void,
            iov_len: len,
        };
        let h = &mut self.hdrs[i].msg_hdr;
        h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = namelen;
        h.msg_iov = &mut self.iovecs[i];
        h.msg_iovlen = 1;
        self.len += 1;
    }

    /// Sends everything queued. A message the kernel refuses is counted and skipped; the loop is
    /// bounded by the number of queued messages.
    fn flush(&mut self, fd: RawFd, io: &mut IoCounters) {
        let mut at = 0;
        while at < self.len {
            io.syscalls += 1;
            // SAFETY: hdrs[at..len] point at live addresses, iovecs and buffers (see `push`).
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs[at..].as_mut_ptr(),
                    (self.len - at) as libc::c_uint,
                    0,
                )
            };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The first message failed (an unreachable destination, say): skip it.
                io.tx_errors += 1;
                at += 1;
                continue;
            }
            for h in &self.hdrs[at..at + n as usize] {
                io.tx_packets += 1;
                io.tx_bytes += u64::from(h.msg_len);
            }
            at += n as usize;
        }
        self.len = 0;
    }
}

/// epoll tag of the UDP socket.
const TAG_UDP: u64 = 0;

/// The `batch` backend as a [`Transport`]: the UDP socket's batches and, when the shard serves
/// chat, one epoll set over the UDP socket, the TCP listener and connections, and the
/// cross-shard waker (three system calls per turn for media, epoll_wait, recvmmsg and
/// sendmmsg, instead of two).
pub struct Batch {
    fd: RawFd,
    rx: Box<Rx>,
    tx: Tx,
    io: IoCounters,
    epoll: Option<Epolled>,
}

/// The epoll side of a shard that serves chat.
struct Epolled {
    chat: EpollChat,
    events: Vec<libc::epoll_event>,
    /// Events the last wait returned.
    n_ready: usize,
    /// Owns the set `chat` waits on.
    _epoll: std::os::fd::OwnedFd,
}

impl Batch {
    /// Media only on `socket`: the first receive of a turn blocks (MSG_WAITFORONE) for at most
    /// `WAIT_MS` (10 ms), so that the stop flag and the engine's timers are looked at regularly
    /// without a poll(2) per turn.
    pub fn media_only(socket: &UdpSocket) -> io::Result<Self> {
        socket.set_read_timeout(Some(Duration::from_millis(WAIT_MS)))?;
        Ok(Self::new(socket.as_raw_fd(), None))
    }

    /// Media on `socket` and chat on `listener` for `core`, all on one epoll set.
    pub fn with_chat<S: Storage>(
        socket: &UdpSocket,
        core: &ChatCore<S>,
        listener: TcpListener,
    ) -> io::Result<Self> {
        let fd = socket.as_raw_fd();
        socket.set_nonblocking(true)?;
        let epoll = super::sys::epoll_create()?;
        let epfd = epoll.as_raw_fd();
        super::sys::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32, TAG_UDP)?;
        let chat = EpollChat::new(core, listener, epfd)?;
        // Media goes on while chat's reading is paused.
        chat.also_while_paused(fd, TAG_UDP)?;
        let epolled = Epolled {
            chat,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 256],
            n_ready: 0,
            _epoll: epoll,
        };
        Ok(Self::new(fd, Some(epolled)))
    }

    fn new(fd: RawFd, epoll: Option<Epolled>) -> Self {
        Self {
            fd,
            rx: Rx::new(),
            tx: Tx::new(),
            io: IoCounters::default(),
            epoll,
        }
    }
}

impl<S: Storage> Transport<S> for Batch {
    fn wait(&mut self, timeout_us: u64) -> io::Result<()> {
        let Some(e) = &mut self.epoll else {
            return Ok(());
        };
        let timeout_ms = timeout_us.div_ceil(1000).min(i32::MAX as u64) as libc::c_int;
        self.io.syscalls += 1;
        // SAFETY: `events` has room for `events.len()` entries.
        let n = unsafe {
            libc::epoll_wait(
                e.chat.wait_set(),
                e.events.as_mut_ptr(),
                e.events.len() as libc::c_int,
                timeout_ms,
            )
        };
        e.n_ready = n.max(0) as usize;
        Ok(())
    }

    fn media(&mut self, engine: &mut Shard, clock: &impl Clock) -> io::Result<()> {
        // Media only: the first receive waits. With epoll: only when the socket is ready.
        let first_waits = match &self.epoll {
            None => true,
            Some(e) => {
                if !e.events[..e.n_ready].iter().any(|ev| ev.u64 == TAG_UDP) {
                    return Ok(());
                }
                false
            }
        };
        for turn_batch in 0..MAX_BATCHES_PER_TURN {
            let n = receive(
                self.fd,
                &mut self.rx,
                &mut self.io,
                first_waits && turn_batch == 0,
            )?;
            if n == 0 {
                break;
            }
            process(
                engine,
                clock.now(),
                &mut self.rx,
                &mut self.tx,
                n,
                self.fd,
                &mut self.io,
            );
            self.tx.flush(self.fd, &mut self.io);
            if n < RX_BATCH {
                break;
            }
        }
        Ok(())
    }

    fn chat_input(&mut self, chat: &mut ChatCore<S>, now: Now) {
        let Some(e) = &mut self.epoll else {
            return;
        };
        for ev in &e.events[..e.n_ready] {
            let (tag, flags) = (ev.u64, ev.events);
            if tag != TAG_UDP {
                e.chat.handle_event(chat, now, tag, flags);
            }
        }
        e.n_ready = 0;
    }

    fn chat_output(&mut self, chat: &mut ChatCore<S>, now: Now) -> io::Result<()> {
        if let Some(e) = &mut self.epoll {
            e.chat.output(chat, now);
        }
        Ok(())
    }

    fn must_not_sleep(&self) -> bool {
        false
    }

    fn poll_timeout(&self) -> u64 {
        self.epoll
            .as_ref()
            .map_or(u64::MAX, |e| e.chat.poll_timeout())
    }

    fn counters(&self) -> IoCounters {
        self.io
    }
}

/// Runs one shard on `socket` (and its chat, if given) until `ctx.stop` is set.
pub fn run(
    engine: &mut Shard,
    socket: &UdpSocket,
    ctx: &ShardCtx,
    chat: Option<ChatParts>,
) -> Result<(), ShardError> {
    match chat {
        None => {
            let mut batch = Batch::media_only(socket).map_err(ShardError::Transport)?;
            ShardLoop::<LogStorage>::new(None).run(engine, &mut batch, ctx, ctx)
        }
        Some(parts) => {
            let (core, listener) = ChatCore::open(parts).map_err(ShardError::Storage)?;
            let mut batch =
                Batch::with_chat(socket, &core, listener).map_err(ShardError::Transport)?;
            ShardLoop::new(Some(core)).run(engine, &mut batch, ctx, ctx)
        }
    }
}

/// Longest blocking wait in one receive. Engine timers (binding expiry sweeps) are coarse, so
/// firing them up to this late is harmless; stop requests are noticed within it.
const WAIT_MS: u64 = if MAX_WAIT_MS < 10 { MAX_WAIT_MS } else { 10 };

/// One recvmmsg: blocking until the first datagram (bounded by the socket's receive timeout)
/// when `wait`, else non-blocking. Returns how many datagrams arrived.
fn receive(fd: RawFd, rx: &mut Rx, io: &mut IoCounters, wait: bool) -> io::Result<usize> {
    rx.arm();
    let flags = if wait {
        libc::MSG_WAITFORONE
    } else {
        libc::MSG_DONTWAIT
    };
    loop {
        io.syscalls += 1;
        // SAFETY: the headers point into `rx`, which outlives the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                rx.hdrs.as_mut_ptr(),
                RX_BATCH as libc::c_uint,
                flags,
                ptr::null_mut(),
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            // Timeout of a blocking wait, or nothing queued for a non-blocking one.
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => return Ok(0),
            io::ErrorKind::Interrupted => continue,
            // ICMP errors queued on the socket surface here; they are not fatal.
            io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset => return Ok(0),
            _ => return Err(err),
        }
    }
}

/// Runs the `n` received datagrams through the engine and queues what it decides.
fn process(
    engine: &mut Shard,
    now: Now,
    rx: &mut Rx,
    tx: &mut Tx,
    n: usize,
    fd: RawFd,
    io: &mut IoCounters,
) {
    for i in 0..n {
        let h = &rx.hdrs[i];
        if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            io.rx_truncated += 1;
            continue;
        }
        let Some(src) = from_sockaddr(&rx.addrs[i]) else {
            continue;
        };
        let len = h.msg_len as usize;
        let data = &rx.bufs[i][..len];
        match engine.handle_datagram(now, src, data, &mut rx.replies[i]) {
            Verdict::Forward(dests) => {
                for dest in dests {
                    if tx.is_full() {
                        tx.flush(fd, io);
                    }
                    tx.push(dest, data.as_ptr(), len);
                }
            }
            Verdict::Reply(reply_len) => {
                if tx.is_full() {
                    tx.flush(fd, io);
                }
                tx.push(&src, rx.replies[i].as_ptr(), reply_len);
            }
            Verdict::Consumed | Verdict::Drop(_) => {}
        }
    }
}
