//! The `uring` backend: io_uring with multishot RecvMsg into a provided-buffer ring and fan-out
//! as N SendMsg SQEs over one buffer.
//!
//! The `Driver` is the shard loop's [`Transport`] (`io/shard_loop.rs` has the turn). Its
//! wait re-arms the receive if it ended and makes the turn's one `io_uring_enter`, which
//! submits everything queued and waits for a completion (bounded by the loop's timeout), then
//! reaps every completion: sends release their slot and their reference on the received buffer,
//! receives queue the buffer they filled. Its media step runs up to
//! [`RX_BATCH`] × [`MAX_BATCHES_PER_TURN`] queued datagrams through the engine, queueing one
//! SendMsg per copy.
//!
//! Ownership. A buffer the kernel filled belongs to the driver until its reference count drops
//! to zero: one reference while the datagram is queued or being handled, plus one per SendMsg in
//! flight that points into it. Only then does its descriptor go back into the buffer ring.
//! Every send uses a slot from a preallocated pool (message header, iovec, address); the slot
//! belongs to the kernel from the SQE push until its CQE. On exit every operation on the socket
//! is cancelled and drained before the buffer memory and the slots are freed; if the drain
//! cannot finish, that memory is leaked on purpose rather than freed under the kernel.
//!
//! Sizes are fixed at start-up and tied together by compile-time assertions so that the
//! submission queue can hold every slot's SQE and the completion queue every completion that
//! the media path can have outstanding.
//!
//! When the shard serves chat, the same ring carries its TCP operations (`chat_uring.rs`):
//! their completions are kept in `Driver::reap` and handled in the turn's chat step, after the
//! datagrams. Chat never uses the SQ entries reserved for the media path.

use super::chat_io::{ChatCore, ChatParts};
use super::shard_loop::{Clock, ShardLoop, Transport};
use super::storage::Storage;
use super::sys::{from_sockaddr, sockaddr_storage, to_sockaddr};
use super::{
    IoCounters, ShardCtx, MAX_BATCHES_PER_TURN, MAX_DATAGRAM, MAX_WAIT_MS, RX_BATCH, TX_BATCH,
};
use crate::engine::{Now, Shard, Verdict};
use crate::error::ShardError;
use io_uring::types::{CancelBuilder, Fd, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};
use std::collections::VecDeque;
use std::io;
use std::mem::size_of;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

#[path = "chat_uring.rs"]
mod chat_uring;
use chat_uring::{ChatReport, UringChat};

/// Buffers in the provided-buffer ring (a power of two, at most 32768). About 2 MiB per shard;
/// enough for a full turn of datagrams while the previous turn's fan-out is still in flight.
const BUF_COUNT: u16 = 1024;
/// Buffer group id of the ring; each shard has its own io_uring, so one id suffices.
const BGID: u16 = 0;
/// `struct io_uring_recvmsg_out`, which the kernel writes at the start of every buffer.
const RECVMSG_OUT_LEN: usize = 16;
/// Room reserved for the source address: IPv4 and IPv6 only.
const NAME_LEN: usize = size_of::<libc::sockaddr_in6>();
/// Bytes the kernel may fill in one buffer: header, address, and a datagram of at most
/// [`MAX_DATAGRAM`] bytes (longer ones come back with MSG_TRUNC).
const BUF_LEN: usize = RECVMSG_OUT_LEN + NAME_LEN + MAX_DATAGRAM;
/// Slots for STUN replies; replies are rare next to media.
const REPLY_SLOTS: usize = RX_BATCH;
/// Size of a reply slot; STUN replies are never larger than their request and fit easily.
const REPLY_LEN: usize = 256;
/// SQEs that own no slot: the receive arm and the exit cancel.
const MISC_OPS: usize = 2;
/// SQ entries the media path may need at once; chat never queues into them (see
/// `chat_uring::CHAT_SQ_MIN`).
const MEDIA_SQ: usize = TX_BATCH + REPLY_SLOTS + MISC_OPS;
/// Submission queue: every slot's SendMsg plus the misc operations can be queued at once, and
/// chat gets what is left.
const SQ_ENTRIES: u32 = (MEDIA_SQ + chat_uring::CHAT_SQ_MIN).next_power_of_two() as u32;
/// Completion queue: sends in flight, plus one receive completion per buffer, plus the misc
/// operations' completions, plus chat's (see `chat_uring::CHAT_CQ`).
const CQ_ENTRIES: u32 =
    (TX_BATCH + REPLY_SLOTS + BUF_COUNT as usize + MISC_OPS + chat_uring::CHAT_CQ)
        .next_power_of_two() as u32;
/// Waits for a free slot before a copy is dropped (each at most [`MAX_WAIT_MS`]).
const RECLAIM_TRIES: usize = 8;
/// Waits for outstanding operations at exit (each at most [`MAX_WAIT_MS`]) before the memory
/// they use is leaked instead of freed.
const DRAIN_TRIES: usize = 40;

const _: () = assert!(BUF_COUNT.is_power_of_two() && BUF_COUNT <= 32768);
const _: () = assert!(TX_BATCH + REPLY_SLOTS <= u16::MAX as usize);
const _: () = assert!(SQ_ENTRIES as usize >= TX_BATCH + REPLY_SLOTS + MISC_OPS);
const _: () =
    assert!(CQ_ENTRIES as usize >= TX_BATCH + REPLY_SLOTS + BUF_COUNT as usize + MISC_OPS);
// A buffer is referenced by at most one datagram plus one send per TX slot.
const _: () = assert!(TX_BATCH < u16::MAX as usize);

/// What a completion belongs to: the kind in the upper 8 bits of `user_data`, the slot index
/// (media) or the connection id (chat) in the lower 56.
const UD_KIND: u64 = 0xff << 56;
const UD_RECV: u64 = 1 << 56;
const UD_CANCEL: u64 = 2 << 56;
const UD_SEND: u64 = 3 << 56;
const UD_REPLY: u64 = 4 << 56;
/// Chat's kinds: the listener's accepts (the payload is the accept's address slot), the
/// waker's multishot poll, a connection's multishot receive, its send, its wait for room to
/// send, and cancels of its operations.
const UD_ACCEPT: u64 = 5 << 56;
const UD_WAKE: u64 = 6 << 56;
const UD_CHAT_RECV: u64 = 7 << 56;
const UD_CHAT_SEND: u64 = 8 << 56;
const UD_CHAT_POLL: u64 = 9 << 56;
const UD_CHAT_CANCEL: u64 = 10 << 56;
/// A refused connection's direct descriptor being installed as a regular one, and a direct
/// descriptor's close; the payload is the slot.
const UD_CHAT_INSTALL: u64 = 11 << 56;
const UD_CHAT_CLOSE: u64 = 12 << 56;

/// Pool sizes; the defaults are the constants above, tests shrink them to reach the edges.
#[derive(Clone, Copy, Debug)]
struct Limits {
    n_bufs: u16,
    tx_slots: usize,
    reply_slots: usize,
    /// Chat's receive buffers.
    chat_bufs: u16,
    /// Chat sends with MSG_DONTWAIT, so that a full socket fails them with EAGAIN (tests: the
    /// wait for POLLOUT); by default io_uring waits for room itself.
    chat_send_dontwait: bool,
}

const LIMITS: Limits = Limits {
    n_bufs: BUF_COUNT,
    tx_slots: TX_BATCH,
    reply_slots: REPLY_SLOTS,
    chat_bufs: chat_uring::CHAT_BUF_COUNT,
    chat_send_dontwait: false,
};

/// Driver-side counters specific to this backend (not published; logged and tested).
#[derive(Clone, Copy, Debug, Default)]
struct UringStats {
    /// Receives that ended because the buffer ring ran dry (ENOBUFS).
    rx_nobufs: u64,
    /// Receive completions with another error, or a buffer that did not parse.
    rx_errors: u64,
    /// Times the multishot receive was armed.
    arms: u64,
    /// Waits for a free send slot.
    reclaims: u64,
}

/// What [`run_with`] leaves behind, for tests and the exit log.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(test), allow(dead_code))]
struct Report {
    stats: UringStats,
    io: IoCounters,
    /// Chat's end state, when the shard served chat.
    chat: Option<ChatReport>,
    /// Buffers out of the buffer ring at exit: 0 once drained.
    bufs_outstanding: usize,
    /// Send and reply slots still owned by the kernel at exit: 0 once drained.
    slots_in_use: usize,
    /// Whether every operation completed before the memory was freed.
    drained: bool,
    /// Whether the ring runs with SINGLE_ISSUER | DEFER_TASKRUN.
    defer_taskrun: bool,
}

// ---------------------------------------------------------------------------------------------
// Ring setup and probe

/// Creates a ring with SINGLE_ISSUER | DEFER_TASKRUN, or without them where the kernel refuses
/// them with EINVAL (before 6.1). The flag says which.
fn setup_ring(sq_entries: u32, cq_entries: u32) -> io::Result<(IoUring, bool)> {
    let mut builder = IoUring::builder();
    builder
        .setup_cqsize(cq_entries)
        .setup_single_issuer()
        .setup_defer_taskrun();
    match builder.build(sq_entries) {
        Ok(ring) => Ok((ring, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let mut builder = IoUring::builder();
            builder.setup_cqsize(cq_entries);
            builder.build(sq_entries).map(|ring| (ring, false))
        }
        Err(e) => Err(e),
    }
}

/// The soft RLIMIT_MEMLOCK in bytes.
fn memlock_limit() -> libc::rlim_t {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into one live rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) } != 0 {
        return 0;
    }
    rl.rlim_cur
}

/// Says who is to blame when io_uring_setup fails.
fn explain_setup(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => {
            let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            match disabled.as_str() {
                "2" => "io_uring_setup: EPERM (kernel.io_uring_disabled=2)".into(),
                "1" => "io_uring_setup: EPERM (kernel.io_uring_disabled=1 and this process \
                        is not in kernel.io_uring_group)"
                    .into(),
                _ => "io_uring_setup: EPERM (seccomp? kernel.io_uring_disabled?)".into(),
            }
        }
        Some(libc::ENOSYS) => {
            "io_uring_setup: ENOSYS (kernel without io_uring, or blocked by seccomp)".into()
        }
        Some(libc::ENOMEM) => format!(
            "io_uring_setup: ENOMEM (RLIMIT_MEMLOCK too low? it is {} bytes)",
            memlock_limit()
        ),
        _ => format!("io_uring_setup: {e}"),
    }
}

/// Says who is to blame when the buffer ring cannot be registered.
fn explain_register(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EINVAL) => {
            "kernel lacks provided-buffer rings (IORING_REGISTER_PBUF_RING, Linux 5.19+)".into()
        }
        Some(libc::ENOMEM) => format!(
            "cannot pin the buffer ring: RLIMIT_MEMLOCK too low ({} bytes)",
            memlock_limit()
        ),
        _ => format!("IORING_REGISTER_PBUF_RING: {e}"),
    }
}

/// Checks that an io_uring can be created here and supports what the backend needs: the ring
/// flags (or the fallback), timed waits, the opcodes, a provided-buffer ring, and multishot
/// RecvMsg (armed on a loopback socket, then cancelled).
///
/// Runs on a short-lived thread of its own: tearing a ring down queues task work on the thread
/// that used it, which interrupts that thread's next blocking socket call with EINTR (when the
/// socket has a timeout). The caller's thread is left alone.
pub fn probe() -> Result<(), String> {
    std::thread::Builder::new()
        .name("uring-probe".into())
        .spawn(probe_here)
        .map_err(|e| format!("cannot spawn the io_uring probe thread: {e}"))?
        .join()
        .unwrap_or_else(|_| Err("the io_uring probe panicked".into()))
}

fn probe_here() -> Result<(), String> {
    let (mut ring, _) = setup_ring(8, 16).map_err(|e| explain_setup(&e))?;
    if !ring.params().is_feature_ext_arg() {
        return Err("kernel lacks IORING_FEAT_EXT_ARG (timed waits, Linux 5.11+)".into());
    }
    let mut ops = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut ops)
        .map_err(|e| format!("IORING_REGISTER_PROBE: {e}"))?;
    for (code, name) in [
        (opcode::RecvMsgMulti::CODE, "RECVMSG"),
        (opcode::SendMsg::CODE, "SENDMSG"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
        // Chat: accepts, multishot receive, sends, and the waker's poll.
        (opcode::AcceptMulti::CODE, "ACCEPT"),
        (opcode::RecvMulti::CODE, "RECV"),
        (opcode::Send::CODE, "SEND"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
    ] {
        if !ops.is_supported(code) {
            return Err(format!("kernel lacks IORING_OP_{name}"));
        }
    }
    let bufs =
        BufRing::new(2, BUF_LEN, BGID).map_err(|e| format!("cannot map the buffer ring: {e}"))?;
    bufs.register(&ring).map_err(|e| explain_register(&e))?;
    let socket = UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| UdpSocket::bind("[::1]:0"))
        .map_err(|e| format!("cannot bind a loopback UDP socket for the probe: {e}"))?;
    let result = probe_multishot(&mut ring, socket.as_raw_fd());
    match result {
        ProbeEnd::Done(r) => {
            // Best effort: the ring is dropped right after, which unregisters it too.
            let _ = ring.submitter().unregister_buf_ring(BGID);
            drop(ring);
            drop(bufs);
            r
        }
        ProbeEnd::Stuck(r) => {
            // The receive never completed: the kernel may still use the buffers.
            std::mem::forget(bufs);
            r
        }
    }
}

enum ProbeEnd {
    /// Every operation completed; the memory may be freed.
    Done(Result<(), String>),
    /// An operation is still outstanding.
    Stuck(Result<(), String>),
}

/// Arms a multishot RecvMsg on `fd` and cancels it: a kernel without multishot RecvMsg (before
/// 6.0) fails it with EINVAL, one with it reports the cancel.
fn probe_multishot(ring: &mut IoUring, fd: RawFd) -> ProbeEnd {
    let hdr = recv_msghdr();
    let arm = opcode::RecvMsgMulti::new(Fd(fd), &hdr, BGID)
        .build()
        .user_data(UD_RECV);
    let cancel = opcode::AsyncCancel::new(UD_RECV)
        .build()
        .user_data(UD_CANCEL);
    // SAFETY: the kernel copies `hdr` when it prepares the SQE, during the first submit below,
    // and afterwards writes only into selected buffers; the caller leaks those (`Stuck`) unless
    // the receive's final completion has arrived.
    if unsafe { ring.submission().push_multiple(&[arm, cancel]) }.is_err() {
        return ProbeEnd::Done(Err("io_uring: submission queue full in probe".into()));
    }
    let mut recv_res = None;
    for _ in 0..DRAIN_TRIES {
        let ts = Timespec::from(Duration::from_millis(MAX_WAIT_MS));
        match ring
            .submitter()
            .submit_with_args(1, &SubmitArgs::new().timespec(&ts))
        {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
            Err(e) => return ProbeEnd::Stuck(Err(format!("io_uring_enter: {e}"))),
        }
        for cqe in ring.completion() {
            if cqe.user_data() == UD_RECV && !cqueue::more(cqe.flags()) {
                recv_res = Some(cqe.result());
            }
        }
        if recv_res.is_some() {
            break;
        }
    }
    match recv_res.map(|r| -r) {
        Some(libc::ECANCELED) => ProbeEnd::Done(Ok(())),
        Some(libc::EINVAL) => {
            ProbeEnd::Done(Err("kernel lacks multishot recvmsg (Linux 6.0+)".into()))
        }
        Some(e) => ProbeEnd::Done(Err(format!(
            "multishot recvmsg: {}",
            io::Error::from_raw_os_error(e)
        ))),
        None => ProbeEnd::Stuck(Err("multishot recvmsg could not be cancelled".into())),
    }
}

/// The msghdr a multishot RecvMsg uses as its template: room for the address, no control data.
/// The iovec is ignored; the payload lands in the selected buffer after the address.
fn recv_msghdr() -> libc::msghdr {
    let mut hdr = zeroed_msghdr();
    hdr.msg_namelen = NAME_LEN as libc::socklen_t;
    hdr
}

fn zeroed_msghdr() -> libc::msghdr {
    // SAFETY: all-zero is a valid msghdr (null pointers, zero lengths).
    unsafe { std::mem::zeroed() }
}

// ---------------------------------------------------------------------------------------------
// Memory: anonymous mappings and the provided-buffer ring

/// An anonymous, page-aligned, zero-filled mapping, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Self> {
        // SAFETY: an anonymous private mapping aliases nothing; the result is checked.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast()).expect("invariant: mmap never returns null on success");
        Ok(Self { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours; its owner only drops it once the kernel no longer uses
        // it (see `Driver::shutdown`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// `struct io_uring_buf`, one descriptor in the buffer ring. The `resv` field of descriptor 0
/// is the ring's tail, written by us and read by the kernel.
#[repr(C)]
struct BufDesc {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

const _: () = assert!(size_of::<BufDesc>() == size_of::<io_uring::types::BufRingEntry>());

/// The provided-buffer ring: descriptors the kernel picks from, the buffers they point at, and
/// the driver's reference count on every buffer it holds.
struct BufRing {
    descs: Mapping,
    mem: Mapping,
    n: u16,
    /// Bytes the kernel may fill in one buffer.
    buf_len: u32,
    /// Distance between buffers.
    stride: usize,
    /// Buffer group id the ring is registered as.
    bgid: u16,
    /// Our tail; published to the kernel by [`BufRing::sync`].
    tail: u16,
    /// References the driver holds on each buffer; 0 means the buffer is in the ring.
    refs: Box<[u16]>,
    /// Buffers out of the ring.
    n_held: usize,
}

impl BufRing {
    /// Maps `n` buffers of `buf_len` bytes for buffer group `bgid` and puts them all in the
    /// ring.
    fn new(n: u16, buf_len: usize, bgid: u16) -> io::Result<Self> {
        assert!(
            n.is_power_of_two() && n <= 32768,
            "buffer count is a power of two"
        );
        let stride = buf_len.next_multiple_of(64);
        let mut ring = Self {
            descs: Mapping::new(usize::from(n) * size_of::<BufDesc>())?,
            mem: Mapping::new(usize::from(n) * stride)?,
            n,
            buf_len: u32::try_from(buf_len).expect("invariant: buffers are far below 4 GiB"),
            stride,
            bgid,
            tail: 0,
            refs: vec![0; usize::from(n)].into_boxed_slice(),
            n_held: usize::from(n),
        };
        for bid in 0..n {
            ring.refs[usize::from(bid)] = 1;
            ring.put(bid);
        }
        ring.sync();
        Ok(ring)
    }

    /// Registers the ring with `ring` as its buffer group.
    fn register(&self, ring: &IoUring) -> io::Result<()> {
        // SAFETY: the descriptors stay mapped until this BufRing is dropped, which its owners do
        // only after unregistering it or destroying the io_uring (`Driver` declares the ring
        // first; `probe` drops it first).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                self.descs.ptr.as_ptr() as u64,
                self.n,
                self.bgid,
                0,
            )
        }
    }

    fn tail_atomic(&self) -> &AtomicU16 {
        let desc0 = self.descs.ptr.as_ptr().cast::<BufDesc>();
        // SAFETY: descriptor 0 is mapped while `self` lives; its `resv` field is the ring tail,
        // aligned for u16, and is only accessed atomically (by us and by the kernel).
        unsafe { &*ptr::addr_of!((*desc0).resv).cast::<AtomicU16>() }
    }

    /// Publishes the descriptors written since the last call.
    fn sync(&self) {
        self.tail_atomic().store(self.tail, Ordering::Release);
    }

    /// Takes the reference of a datagram on buffer `bid`, which the kernel just filled.
    fn take(&mut self, bid: u16) {
        let r = &mut self.refs[usize::from(bid)];
        assert_eq!(
            *r, 0,
            "invariant: the kernel hands out only buffers in the ring"
        );
        *r = 1;
        self.n_held += 1;
    }

    /// Adds a reference for a send pointing into buffer `bid`.
    fn get(&mut self, bid: u16) {
        let r = &mut self.refs[usize::from(bid)];
        assert!(*r > 0, "invariant: only a held buffer gains references");
        *r += 1;
    }

    /// Drops a reference; the last one puts the buffer back into the ring.
    fn put(&mut self, bid: u16) {
        let r = &mut self.refs[usize::from(bid)];
        *r = r
            .checked_sub(1)
            .expect("invariant: every put matches a take or a get");
        if *r > 0 {
            return;
        }
        let idx = usize::from(self.tail & (self.n - 1));
        let desc = self.descs.ptr.as_ptr().cast::<BufDesc>();
        // SAFETY: `idx` < n, so the descriptor is mapped. At most n buffers exist, so the slot at
        // our tail has been consumed by the kernel and it does not read it until the tail moves
        // past it (`sync`, with release ordering). Only `addr`, `len` and `bid` are written:
        // `resv` of descriptor 0 is the tail.
        unsafe {
            let d = desc.add(idx);
            ptr::addr_of_mut!((*d).addr).write(self.buf_ptr(bid) as u64);
            ptr::addr_of_mut!((*d).len).write(self.buf_len);
            ptr::addr_of_mut!((*d).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        self.n_held -= 1;
    }

    /// Start of buffer `bid`.
    fn buf_ptr(&self, bid: u16) -> *mut u8 {
        assert!(bid < self.n, "invariant: buffer ids come from our ring");
        // SAFETY: bid < n, so the offset stays inside the mapping of n × stride bytes.
        unsafe { self.mem.ptr.as_ptr().add(usize::from(bid) * self.stride) }
    }
}

// ---------------------------------------------------------------------------------------------
// Send slots

/// What one SendMsg points at. Lives in a boxed slice that never moves, so the pointers in
/// `hdr` stay valid while the kernel owns the slot.
struct SendSlot {
    hdr: libc::msghdr,
    iov: libc::iovec,
    addr: libc::sockaddr_storage,
}

impl SendSlot {
    /// Points the slot at `len` bytes from `data`, to be sent to `dest`.
    fn fill(&mut self, dest: &SocketAddr, data: *const u8, len: usize) {
        let namelen = to_sockaddr(dest, &mut self.addr);
        self.iov = libc::iovec {
            iov_base: data as *mut libc::c_void,
            iov_len: len,
        };
        self.hdr.msg_name = ptr::addr_of_mut!(self.addr).cast();
        self.hdr.msg_namelen = namelen;
        self.hdr.msg_iov = ptr::addr_of_mut!(self.iov);
        self.hdr.msg_iovlen = 1;
        self.hdr.msg_control = ptr::null_mut();
        self.hdr.msg_controllen = 0;
        self.hdr.msg_flags = 0;
    }
}

/// A fixed pool of send slots with a free list.
struct SlotPool {
    slots: Box<[SendSlot]>,
    free: Vec<u16>,
}

impl SlotPool {
    fn new(n: usize) -> Self {
        let slot = || SendSlot {
            hdr: zeroed_msghdr(),
            iov: libc::iovec {
                iov_base: ptr::null_mut(),
                iov_len: 0,
            },
            addr: sockaddr_storage(),
        };
        Self {
            slots: (0..n).map(|_| slot()).collect(),
            free: (0..n as u16).rev().collect(),
        }
    }

    fn alloc(&mut self) -> Option<usize> {
        self.free.pop().map(usize::from)
    }

    fn release(&mut self, i: usize) {
        assert!(
            self.free.len() < self.slots.len(),
            "invariant: a slot is released once per allocation"
        );
        // Never grows: the capacity is the pool size and every slot is free at most once.
        self.free.push(i as u16);
    }

    fn in_use(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

// ---------------------------------------------------------------------------------------------
// The driver

/// One shard's ring and everything the kernel may touch. Field order matters for drop: the ring
/// is closed before the memory it used is freed.
struct Driver {
    ring: IoUring,
    /// Chat's listener, connections and buffers, when the shard serves chat.
    chat: Option<UringChat>,
    fd: RawFd,
    bufs: BufRing,
    /// Template of the multishot receive; kept for its lifetime and for parsing.
    recv_hdr: Box<libc::msghdr>,
    /// Fan-out slots and the buffer each one points into.
    tx: SlotPool,
    tx_bids: Box<[u16]>,
    /// Reply slots and their bytes.
    replies: SlotPool,
    reply_bufs: Box<[[u8; REPLY_LEN]]>,
    /// Where the engine writes a reply before it is copied into a reply slot.
    reply_scratch: [u8; REPLY_LEN],
    /// Filled buffers waiting for the engine: (buffer id, bytes used). Each holds a distinct
    /// buffer, so it never holds more than n_bufs entries.
    rx: VecDeque<(u16, u32)>,
    /// Whether a multishot receive is in flight.
    armed: bool,
    /// A receive error that ends the loop.
    fatal: Option<io::Error>,
    defer_taskrun: bool,
    io: IoCounters,
    stats: UringStats,
}

impl Driver {
    /// A driver for the UDP socket `fd` and, when the shard serves chat, its listener, the
    /// core's waker and its connection limit.
    fn new(
        fd: RawFd,
        shard_idx: u16,
        limits: Limits,
        chat: Option<(TcpListener, RawFd, usize)>,
    ) -> io::Result<Self> {
        let (ring, defer_taskrun) = setup_ring(SQ_ENTRIES, CQ_ENTRIES)
            .map_err(|e| io::Error::new(e.kind(), explain_setup(&e)))?;
        if !defer_taskrun {
            eprintln!(
                "relay: shard {shard_idx}: io_uring_setup refused SINGLE_ISSUER|DEFER_TASKRUN \
                 (EINVAL); running the ring without them"
            );
        }
        if !ring.params().is_feature_ext_arg() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "kernel lacks IORING_FEAT_EXT_ARG (timed waits)",
            ));
        }
        // The SQ and CQ sizes are computed from the maxima; smaller pools (tests) fit in them.
        assert!(
            limits.n_bufs <= BUF_COUNT
                && limits.tx_slots <= TX_BATCH
                && limits.reply_slots <= REPLY_SLOTS,
            "pools larger than the rings were sized for"
        );
        let bufs = BufRing::new(limits.n_bufs, BUF_LEN, BGID)?;
        bufs.register(&ring)
            .map_err(|e| io::Error::new(e.kind(), explain_register(&e)))?;
        let chat = match chat {
            Some((listener, waker_fd, max_conns)) => Some(UringChat::new(
                listener,
                waker_fd,
                max_conns,
                &ring,
                limits.chat_bufs,
                limits.chat_send_dontwait,
            )?),
            None => None,
        };
        Ok(Self {
            ring,
            chat,
            fd,
            bufs,
            recv_hdr: Box::new(recv_msghdr()),
            tx: SlotPool::new(limits.tx_slots),
            tx_bids: vec![0; limits.tx_slots].into_boxed_slice(),
            replies: SlotPool::new(limits.reply_slots),
            reply_bufs: vec![[0; REPLY_LEN]; limits.reply_slots].into_boxed_slice(),
            reply_scratch: [0; REPLY_LEN],
            rx: VecDeque::with_capacity(usize::from(limits.n_bufs)),
            armed: false,
            fatal: None,
            defer_taskrun,
            io: IoCounters::default(),
            stats: UringStats::default(),
        })
    }

    /// Publishes returned buffers, submits everything queued and waits up to `wait_us` for a
    /// completion: the one io_uring_enter of a loop turn.
    fn enter(&mut self, wait_us: u64) -> io::Result<()> {
        self.bufs.sync();
        let ts = Timespec::from(Duration::from_micros(wait_us));
        let args = SubmitArgs::new().timespec(&ts);
        self.io.syscalls += 1;
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            // Timed out, interrupted, or short of memory for requests for now: the next turn
            // reaps what there is and tries again.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Queues the multishot receive if none is in flight and the ring has a buffer to give.
    fn arm_recv(&mut self) {
        if self.armed || self.bufs.n_held == usize::from(self.bufs.n) {
            return;
        }
        let sqe = opcode::RecvMsgMulti::new(Fd(self.fd), &*self.recv_hdr, BGID)
            .build()
            .user_data(UD_RECV);
        self.push(&sqe);
        self.armed = true;
        self.stats.arms += 1;
    }

    /// Queues one SQE. Room is guaranteed: every unsubmitted SQE owns a slot or is one of the
    /// [`MISC_OPS`], and the SQ holds them all.
    fn push(&mut self, sqe: &squeue::Entry) {
        // SAFETY: every SQE this driver builds points at memory that lives until its completion:
        // a send slot (boxed, not reused until its CQE), a buffer held by a reference (released
        // by that CQE), or `recv_hdr` (boxed, lives as long as the driver, which drains all
        // operations before it is dropped).
        let pushed = unsafe { self.ring.submission().push(sqe) };
        pushed.expect("invariant: the SQ has room for every slot and the misc operations");
    }

    /// Handles every completion in the CQ. Sends release their slot and buffer reference at
    /// once; filled buffers are queued for the engine.
    fn reap(&mut self) {
        let Self {
            ring,
            chat,
            bufs,
            tx,
            tx_bids,
            replies,
            rx,
            armed,
            fatal,
            io,
            stats,
            ..
        } = self;
        for cqe in ring.completion() {
            let (ud, res, flags) = (cqe.user_data(), cqe.result(), cqe.flags());
            let idx = (ud & !UD_KIND) as usize;
            match ud & UD_KIND {
                UD_SEND => {
                    count_send(io, res);
                    tx.release(idx);
                    bufs.put(tx_bids[idx]);
                }
                UD_REPLY => {
                    count_send(io, res);
                    replies.release(idx);
                }
                UD_RECV => {
                    if !cqueue::more(flags) {
                        *armed = false;
                    }
                    if let Some(bid) = cqueue::buffer_select(flags) {
                        bufs.take(bid);
                        if res >= 0 {
                            assert!(rx.len() < rx.capacity(), "invariant: one entry per buffer");
                            rx.push_back((bid, res as u32));
                        } else {
                            bufs.put(bid);
                        }
                    }
                    if res < 0 {
                        handle_recv_error(-res, stats, fatal);
                    }
                }
                UD_CANCEL => {}
                // Chat's completions, handled in the chat step of the turn.
                _ => {
                    if let Some(chat) = chat {
                        chat.queue_cqe(ud, res, flags);
                    }
                }
            }
        }
    }

    /// Runs up to one turn's worth of queued datagrams through the engine.
    fn handle_queued(&mut self, engine: &mut Shard, clock: &impl Clock) {
        let mut now = clock.now();
        for i in 0..RX_BATCH * MAX_BATCHES_PER_TURN {
            let Some((bid, used)) = self.rx.pop_front() else {
                break;
            };
            if i > 0 && i % RX_BATCH == 0 {
                now = clock.now();
            }
            self.handle_datagram(engine, now, bid, used as usize);
        }
    }

    /// Hands the datagram in buffer `bid` to the engine and queues what it decides.
    fn handle_datagram(&mut self, engine: &mut Shard, now: Now, bid: u16, used: usize) {
        // SAFETY: the datagram's reference keeps `bid` out of the ring until the `put` at the
        // end of this function, so the kernel does not write it; the mapping lives as long as
        // `self`, and the kernel filled `used` ≤ BUF_LEN bytes of it.
        let buf = unsafe { std::slice::from_raw_parts(self.bufs.buf_ptr(bid), used) };
        let Ok(msg) = RecvMsgOut::parse(buf, &self.recv_hdr) else {
            self.stats.rx_errors += 1;
            self.bufs.put(bid);
            return;
        };
        if msg.is_payload_truncated() {
            self.io.rx_truncated += 1;
            self.bufs.put(bid);
            return;
        }
        let Some(src) = source_addr(&msg) else {
            self.bufs.put(bid);
            return;
        };
        let data = msg.payload_data();
        match engine.handle_datagram(now, src, data, &mut self.reply_scratch) {
            Verdict::Forward(dests) => {
                for dest in dests {
                    self.queue_forward(bid, dest, data);
                }
            }
            Verdict::Reply(n) => self.queue_reply(&src, n),
            Verdict::Consumed | Verdict::Drop(_) => {}
        }
        self.bufs.put(bid);
    }

    /// Queues a SendMsg of `data` (inside buffer `bid`) to `dest`.
    fn queue_forward(&mut self, bid: u16, dest: &SocketAddr, data: &[u8]) {
        let Some(i) = self.alloc_slot(false) else {
            self.io.tx_errors += 1;
            return;
        };
        self.tx.slots[i].fill(dest, data.as_ptr(), data.len());
        self.tx_bids[i] = bid;
        self.bufs.get(bid);
        let sqe = opcode::SendMsg::new(Fd(self.fd), &self.tx.slots[i].hdr)
            .build()
            .user_data(UD_SEND | i as u64);
        self.push(&sqe);
    }

    /// Copies the engine's `n`-byte reply into a reply slot and queues a SendMsg to `dest`.
    fn queue_reply(&mut self, dest: &SocketAddr, n: usize) {
        let Some(i) = self.alloc_slot(true) else {
            self.io.tx_errors += 1;
            return;
        };
        let buf = &mut self.reply_bufs[i];
        buf[..n].copy_from_slice(&self.reply_scratch[..n]);
        self.replies.slots[i].fill(dest, buf.as_ptr(), n);
        let sqe = opcode::SendMsg::new(Fd(self.fd), &self.replies.slots[i].hdr)
            .build()
            .user_data(UD_REPLY | i as u64);
        self.push(&sqe);
    }

    /// A free fan-out (or reply) slot. When the pool is empty, submits what is queued and reaps
    /// completions until one frees, at most [`RECLAIM_TRIES`] waits.
    fn alloc_slot(&mut self, reply: bool) -> Option<usize> {
        let mut waits = 0;
        loop {
            let pool = if reply {
                &mut self.replies
            } else {
                &mut self.tx
            };
            if let Some(i) = pool.alloc() {
                return Some(i);
            }
            if waits == RECLAIM_TRIES {
                return None;
            }
            waits += 1;
            self.stats.reclaims += 1;
            if let Err(e) = self.enter(MAX_WAIT_MS * 1000) {
                self.fatal.get_or_insert(e);
                return None;
            }
            self.reap();
        }
    }

    /// Whether no operation is outstanding.
    fn idle(&self) -> bool {
        !self.armed
            && self.tx.in_use() == 0
            && self.replies.in_use() == 0
            && self.chat.as_ref().is_none_or(UringChat::idle)
    }

    /// Cancels every operation in the ring and waits for all completions, so that the buffer
    /// memory, the slots and chat's connections can be freed. Bounded by [`DRAIN_TRIES`] waits.
    fn shutdown<S: Storage>(&mut self, mut core: Option<&mut ChatCore<S>>) -> Report {
        let mut cancelled = false;
        if let Some(chat) = &mut self.chat {
            chat.stopping();
            // Completions reaped but not yet handled (the loop ended on an error).
            if let Some(core) = core.as_deref_mut() {
                chat.handle_cqes(core);
            }
        }
        for _ in 0..DRAIN_TRIES {
            // Datagrams received but not handled are dropped, and so are chat's bytes.
            while let Some((bid, _)) = self.rx.pop_front() {
                self.bufs.put(bid);
            }
            if let Some(chat) = &mut self.chat {
                chat.drop_received();
            }
            if self.idle() {
                break;
            }
            if !cancelled {
                let cancel = opcode::AsyncCancel2::new(CancelBuilder::any())
                    .build()
                    .user_data(UD_CANCEL);
                self.push(&cancel);
                cancelled = true;
            }
            if self.enter(MAX_WAIT_MS * 1000).is_err() {
                break;
            }
            self.reap();
            if let (Some(chat), Some(core)) = (&mut self.chat, core.as_deref_mut()) {
                chat.handle_cqes(core);
            }
        }
        while let Some((bid, _)) = self.rx.pop_front() {
            self.bufs.put(bid);
        }
        if let Some(chat) = &mut self.chat {
            chat.drop_received();
        }
        let drained = self.idle();
        if drained {
            // Best effort: closing the ring unregisters them too.
            let _ = self.ring.submitter().unregister_buf_ring(BGID);
            if let Some(chat) = &mut self.chat {
                chat.close_all(&self.ring);
            }
        }
        Report {
            stats: self.stats,
            io: self.io,
            chat: self
                .chat
                .as_ref()
                .zip(core)
                .map(|(chat, core)| chat.report(core.counters)),
            bufs_outstanding: self.bufs.n_held,
            slots_in_use: self.tx.in_use() + self.replies.in_use(),
            drained,
            defer_taskrun: self.defer_taskrun,
        }
    }
}

/// Counts one send completion.
fn count_send(io: &mut IoCounters, res: i32) {
    if res < 0 {
        io.tx_errors += 1;
    } else {
        io.tx_packets += 1;
        io.tx_bytes += res as u64;
    }
}

/// Counts a failed receive; errors that will recur on every re-arm end the loop.
fn handle_recv_error(errno: i32, stats: &mut UringStats, fatal: &mut Option<io::Error>) {
    match errno {
        // The buffer ring ran dry; the receive is re-armed once a buffer comes back.
        libc::ENOBUFS => stats.rx_nobufs += 1,
        libc::ECANCELED => {}
        libc::EBADF | libc::ENOTSOCK | libc::EINVAL | libc::EFAULT | libc::EOPNOTSUPP => {
            fatal.get_or_insert(io::Error::from_raw_os_error(errno));
        }
        // Queued ICMP errors and the like: not fatal, re-armed next turn.
        _ => stats.rx_errors += 1,
    }
}

/// The source address the kernel wrote into a received buffer.
fn source_addr(msg: &RecvMsgOut<'_>) -> Option<SocketAddr> {
    if msg.is_name_data_truncated() {
        return None;
    }
    let name = msg.name_data();
    let mut ss = sockaddr_storage();
    // SAFETY: `name` is at most NAME_LEN bytes, less than a sockaddr_storage, and the two do not
    // overlap (the storage is a local).
    unsafe {
        ptr::copy_nonoverlapping(
            name.as_ptr(),
            ptr::addr_of_mut!(ss).cast::<u8>(),
            name.len().min(size_of::<libc::sockaddr_storage>()),
        );
    }
    from_sockaddr(&ss)
}

/// Runs one shard on `socket` (and its chat, if given) until `ctx.stop` is set.
pub fn run(
    engine: &mut Shard,
    socket: &UdpSocket,
    ctx: &ShardCtx,
    chat: Option<ChatParts>,
) -> Result<(), ShardError> {
    let report = run_with(engine, socket, ctx, LIMITS, chat)?;
    let s = report.stats;
    if s.rx_nobufs + s.rx_errors + s.reclaims > 0 {
        eprintln!(
            "relay: shard {}: uring: buffer ring ran dry {} times, {} receive errors, \
             {} waits for a send slot",
            ctx.shard_idx, s.rx_nobufs, s.rx_errors, s.reclaims
        );
    }
    if let Some(c) = report
        .chat
        .filter(|c| c.stats.rx_nobufs + c.stats.accept_errors > 0)
    {
        eprintln!(
            "relay: shard {}: uring chat: receive buffers ran dry {} times, {} failed accepts",
            ctx.shard_idx, c.stats.rx_nobufs, c.stats.accept_errors
        );
    }
    Ok(())
}

fn run_with(
    engine: &mut Shard,
    socket: &UdpSocket,
    ctx: &ShardCtx,
    limits: Limits,
    chat: Option<ChatParts>,
) -> Result<Report, ShardError> {
    let (core, listener) = match chat {
        Some(parts) => {
            let (core, listener) = ChatCore::open(parts).map_err(ShardError::Storage)?;
            (Some(core), Some(listener))
        }
        None => (None, None),
    };
    let chat = listener.zip(core.as_ref().map(|c| (c.waker_fd(), c.max_conns())));
    let chat = chat.map(|(l, (waker, max))| (l, waker, max));
    let mut driver = Driver::new(socket.as_raw_fd(), ctx.shard_idx, limits, chat)
        .map_err(ShardError::Transport)?;
    let mut shard = ShardLoop::new(core);
    let result = shard.run(engine, &mut driver, ctx, ctx);
    let report = driver.shutdown(shard.chat_mut());
    ctx.stats.publish(engine, &driver.io);
    if let Some(chat) = shard.chat() {
        ctx.stats.publish_chat(chat.stats());
    }
    if !report.drained {
        eprintln!(
            "relay: shard {}: io_uring operations still outstanding at exit; leaking the ring \
             and its buffers rather than freeing memory the kernel may use",
            ctx.shard_idx
        );
        std::mem::forget(driver);
    }
    result.map(|()| report)
}

/// The turn's I/O on io_uring: the wait is the one io_uring_enter (submitting what the last
/// turn queued), then every completion is reaped; datagrams go to the engine in the media
/// step, chat's completions and bytes in the chat step.
impl<S: Storage> Transport<S> for Driver {
    fn wait(&mut self, timeout_us: u64) -> io::Result<()> {
        self.arm_recv();
        self.enter(timeout_us)?;
        self.reap();
        match self.fatal.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn media(&mut self, engine: &mut Shard, clock: &impl Clock) -> io::Result<()> {
        self.handle_queued(engine, clock);
        Ok(())
    }

    fn chat_input(&mut self, core: &mut ChatCore<S>, now: Now) {
        if let Some(chat) = &mut self.chat {
            chat.input(core, now);
        }
    }

    fn chat_output(&mut self, core: &mut ChatCore<S>, now: Now) -> io::Result<()> {
        if let Some(chat) = &mut self.chat {
            chat.output(core, &mut self.ring, now, &mut self.io);
        }
        Ok(())
    }

    /// Datagrams left over from a full turn, or chat work that could not be queued or must
    /// not wait: only submit, do not wait.
    fn must_not_sleep(&self) -> bool {
        !self.rx.is_empty() || self.chat.as_ref().is_some_and(UringChat::must_not_sleep)
    }

    fn poll_timeout(&self) -> u64 {
        self.chat.as_ref().map_or(u64::MAX, UringChat::poll_timeout)
    }

    fn counters(&self) -> IoCounters {
        self.io
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineConfig;
    use crate::io::ShardStats;
    use ed25519_dalek::SigningKey;
    use proto::token::{Claims, Permissions, TokenKind, TokenVerifier};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Instant;

    #[test]
    fn recvmsg_out_header_is_sixteen_bytes() {
        let hdr = recv_msghdr();
        let buf = [0u8; RECVMSG_OUT_LEN + NAME_LEN];
        assert!(RecvMsgOut::parse(&buf, &hdr).is_ok());
        assert!(RecvMsgOut::parse(&buf[1..], &hdr).is_err());
    }

    #[test]
    fn buffers_return_to_the_ring_on_the_last_reference() {
        let mut b = BufRing::new(4, BUF_LEN, BGID).expect("mmap");
        assert_eq!((b.n_held, b.tail), (0, 4));
        b.take(2);
        b.get(2);
        b.get(2);
        b.put(2);
        b.put(2);
        assert_eq!((b.n_held, b.tail), (1, 4), "still referenced by one send");
        b.put(2);
        assert_eq!((b.n_held, b.tail), (0, 5));
        let desc = b.descs.ptr.as_ptr().cast::<BufDesc>();
        // SAFETY: descriptor 0 is mapped and the ring is not registered with any kernel ring.
        let d = unsafe { &*desc };
        assert_eq!((d.bid, d.addr), (2, b.buf_ptr(2) as u64));
    }

    #[test]
    #[should_panic(expected = "every put matches")]
    fn a_put_without_a_reference_is_caught() {
        let mut b = BufRing::new(2, BUF_LEN, BGID).expect("mmap");
        b.put(1);
    }

    #[test]
    fn probe_succeeds_or_says_why() {
        match probe() {
            Ok(()) => {}
            Err(e) => {
                assert!(!e.is_empty());
                eprintln!("io_uring unavailable here: {e}");
            }
        }
    }

    /// A relay shard on the uring backend, running on its own thread.
    struct Harness {
        addr: SocketAddr,
        key: SigningKey,
        stop: Arc<AtomicBool>,
        stats: Arc<ShardStats>,
        thread: JoinHandle<Result<Report, crate::error::ShardError>>,
    }

    impl Harness {
        fn start(limits: Limits) -> Option<Self> {
            if let Err(e) = probe() {
                eprintln!("skipping: io_uring unavailable: {e}");
                return None;
            }
            let key = SigningKey::from_bytes(&[9; 32]);
            let verifier = TokenVerifier::new(key.verifying_key(), 0);
            let socket = UdpSocket::bind("127.0.0.1:0").expect("bind relay socket");
            let addr = socket.local_addr().expect("local addr");
            let stop = Arc::new(AtomicBool::new(false));
            let stats = Arc::new(ShardStats::default());
            let ctx = ShardCtx::new(0, stop.clone(), stats.clone(), Instant::now());
            let thread = std::thread::spawn(move || {
                let mut engine = Shard::new(EngineConfig::default(), 0, verifier, ctx.now());
                run_with(&mut engine, &socket, &ctx, limits, None)
            });
            Some(Self {
                addr,
                key,
                stop,
                stats,
                thread,
            })
        }

        fn stop(self) -> Report {
            self.stop.store(true, Ordering::Relaxed);
            self.thread.join().expect("shard thread").expect("run_with")
        }

        /// A client socket bound to the relay with `permissions`.
        fn join(&self, participant: u64, permissions: Permissions) -> UdpSocket {
            let c = UdpSocket::bind("127.0.0.1:0").expect("bind client");
            c.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let token = Claims {
                kind: TokenKind::Room,
                permissions,
                relay_id: 0,
                shard_idx: 0,
                expires_at: unix_now() + 60,
                scope_id: 10,
                participant_id: participant,
            }
            .sign_text(&self.key);
            self.bind(&c, &token);
            c
        }

        /// Binds `token` from `c` (through the relay's challenge) and expects a success.
        fn bind(&self, c: &UdpSocket, token: &str) {
            proto::binding::bind_blocking(c, self.addr, token, Duration::from_secs(5))
                .expect("bound");
        }
    }

    fn unix_now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs()
    }

    fn rtp(seq: u16) -> Vec<u8> {
        let mut buf = vec![0u8; 200];
        let n = proto::rtp::write_packet(&mut buf, 96, seq, 0, 0x1234, false, &[0xab; 100])
            .expect("rtp");
        buf.truncate(n);
        buf
    }

    const N_PACKETS: u16 = 1000;
    const WINDOW: u16 = 50;

    /// One publisher, three subscribers, 1000 RTP packets sent in windows small enough for the
    /// sockets' receive buffers: every subscriber gets every packet exactly once, an oversized
    /// datagram is counted as truncated, and every buffer and slot is back at exit.
    fn fan_out(limits: Limits) -> Option<Report> {
        let h = Harness::start(limits)?;
        let publisher = h.join(1, Permissions::PUBLISH);
        let subs: Vec<UdpSocket> = (2..5)
            .map(|id| h.join(id, Permissions::SUBSCRIBE))
            .collect();
        let mut seen = vec![[0u32; N_PACKETS as usize]; subs.len()];
        let mut buf = [0u8; 4096];
        for start in (0..N_PACKETS).step_by(usize::from(WINDOW)) {
            for seq in start..start + WINDOW {
                publisher.send_to(&rtp(seq), h.addr).expect("send rtp");
            }
            for (s, sub) in subs.iter().enumerate() {
                for _ in 0..WINDOW {
                    let n = sub.recv(&mut buf).expect("forwarded packet within 5 s");
                    let pkt = proto::rtp::RtpPacket::parse(&buf[..n]).expect("rtp");
                    seen[s][usize::from(pkt.sequence_number())] += 1;
                }
            }
        }
        // Oversized: truncated by the kernel, dropped and counted. The STUN refresh after it
        // proves the relay has handled it (one socket, handled in order).
        publisher.send_to(&[0x80; 3000], h.addr).expect("send big");
        let token = Claims {
            kind: TokenKind::Room,
            permissions: Permissions::PUBLISH,
            relay_id: 0,
            shard_idx: 0,
            expires_at: unix_now() + 60,
            scope_id: 10,
            participant_id: 1,
        }
        .sign_text(&h.key);
        h.bind(&publisher, &token);
        let stats = h.stats.clone();
        let report = h.stop();
        for (s, counts) in seen.iter().enumerate() {
            for (seq, &c) in counts.iter().enumerate() {
                assert_eq!(c, 1, "subscriber {s} got seq {seq} {c} times");
            }
        }
        for sub in &subs {
            sub.set_nonblocking(true).expect("nonblocking");
            assert!(sub.recv(&mut buf).is_err(), "no duplicate left over");
        }
        assert!(report.drained, "{report:?}");
        assert_eq!(report.bufs_outstanding, 0, "{report:?}");
        assert_eq!(report.slots_in_use, 0, "{report:?}");
        assert_eq!(report.io.rx_truncated, 1);
        assert_eq!(report.io.tx_errors, 0, "{report:?}");
        // 3 × 1000 copies, 4 joins of two replies each (the challenge, then the success)
        // and 1 refresh reply.
        assert_eq!(report.io.tx_packets, 3 * u64::from(N_PACKETS) + 9);
        assert_eq!(stats.get("rx_truncated"), Some(1));
        assert_eq!(stats.get("tx_packets"), Some(report.io.tx_packets));
        assert!(report.io.syscalls > 0);
        if !report.defer_taskrun {
            eprintln!("note: this kernel refused SINGLE_ISSUER|DEFER_TASKRUN");
        }
        eprintln!("{report:?}");
        Some(report)
    }

    #[test]
    fn fans_out_every_packet_exactly_once_and_returns_every_buffer() {
        fan_out(LIMITS);
    }

    #[test]
    fn tiny_pools_starve_and_recover() {
        // Two buffers and two fan-out slots for a fan-out of three: every forward waits for
        // slots, and the receive runs the buffer ring dry and is re-armed.
        let limits = Limits {
            n_bufs: 2,
            tx_slots: 2,
            reply_slots: 1,
            chat_bufs: 2,
            chat_send_dontwait: false,
        };
        if let Some(report) = fan_out(limits) {
            assert!(report.stats.reclaims > 0, "{report:?}");
            assert!(report.stats.rx_nobufs > 0, "{report:?}");
            assert_eq!(report.stats.arms, report.stats.rx_nobufs + 1, "{report:?}");
        }
    }

    /// A shard serving chat (one shard, no fdatasync) on the uring backend, on its own thread.
    struct ChatHarness {
        addr: SocketAddr,
        key: SigningKey,
        dir: std::path::PathBuf,
        stop: Arc<AtomicBool>,
        stats: Arc<ShardStats>,
        thread: JoinHandle<Result<Report, crate::error::ShardError>>,
    }

    impl ChatHarness {
        fn start(limits: Limits, tag: &str, cfg: crate::chat::ChatConfig) -> Option<Self> {
            if let Err(e) = probe() {
                eprintln!("skipping: io_uring unavailable: {e}");
                return None;
            }
            let key = SigningKey::from_bytes(&[9; 32]);
            let verifier = TokenVerifier::new(key.verifying_key(), 0);
            let socket = UdpSocket::bind("127.0.0.1:0").expect("bind relay socket");
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind chat");
            let addr = listener.local_addr().expect("local addr");
            let dir =
                std::env::temp_dir().join(format!("relay-uring-chat-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("data dir");
            let mailbox = crate::io::mailbox::mailboxes(1, crate::io::mailbox::RING_CAPACITY)
                .expect("eventfd")
                .pop()
                .expect("one mailbox");
            let parts = ChatParts {
                engine: crate::chat::ChatShard::new(0, 1, cfg, verifier.clone()),
                dir: dir.clone(),
                log: crate::chat::log::LogConfig {
                    sync: crate::chat::log::SyncMode::None,
                    ..Default::default()
                },
                sync_thread: false,
                max_conns: crate::io::chat_io::MAX_CONNS,
                listener,
                mailbox,
            };
            let stop = Arc::new(AtomicBool::new(false));
            let stats = Arc::new(ShardStats::default());
            let ctx = ShardCtx::new(0, stop.clone(), stats.clone(), Instant::now());
            let thread = std::thread::spawn(move || {
                let mut engine = Shard::new(EngineConfig::default(), 0, verifier, ctx.now());
                run_with(&mut engine, &socket, &ctx, limits, Some(parts))
            });
            Some(Self {
                addr,
                key,
                dir,
                stop,
                stats,
                thread,
            })
        }

        fn token(&self, user: u64) -> String {
            Claims {
                kind: TokenKind::User,
                permissions: Permissions::CHAT,
                relay_id: 0,
                shard_idx: 0,
                expires_at: unix_now() + 60,
                scope_id: user,
                participant_id: user,
            }
            .sign_text(&self.key)
        }

        fn connect(&self, user: u64) -> crate::chat::client::Client {
            let token = self.token(user);
            crate::chat::client::Client::connect(self.addr, &token, Duration::from_secs(5))
                .expect("chat session")
        }

        fn stop(self) -> Report {
            self.stop.store(true, Ordering::Relaxed);
            let report = self.thread.join().expect("shard thread").expect("run_with");
            let _ = std::fs::remove_dir_all(&self.dir);
            report
        }
    }

    /// Two chat buffers for 300 kB of pipelined messages: the multishot receive runs chat's
    /// buffer ring dry again and again and is re-armed; every message arrives once and in
    /// order, a peer that closes mid-stream is cleaned up, and every buffer and operation is
    /// back at exit.
    #[test]
    fn tiny_chat_buffer_ring_runs_dry_and_recovers() {
        let limits = Limits {
            chat_bufs: 2,
            ..LIMITS
        };
        tiny_chat(limits, "tiny");
    }

    /// The same with sends that may fail with EAGAIN and wait for POLLOUT.
    #[test]
    fn tiny_chat_buffer_ring_with_nonblocking_sends() {
        let limits = Limits {
            chat_bufs: 2,
            chat_send_dontwait: true,
            ..LIMITS
        };
        tiny_chat(limits, "tiny-dontwait");
    }

    fn tiny_chat(limits: Limits, tag: &str) {
        use crate::chat::client::Event;
        let Some(h) = ChatHarness::start(limits, tag, Default::default()) else {
            return;
        };
        let (alice, bob) = (1, 2);
        let mut a = h.connect(alice);
        let mut b = h.connect(bob);
        const N: u64 = 1500;
        let got = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut got = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(20);
                while (got.len() as u64) < N && Instant::now() < deadline {
                    match b.recv(Duration::from_millis(200)).expect("bob's session") {
                        Some(Event::Message(m)) if m.sender == alice => {
                            got.push(u64::from_le_bytes(m.body[..8].try_into().expect("8")));
                        }
                        Some(_) => {}
                        None => b.ack_all().expect("ack"),
                    }
                    if got.len() % 64 == 0 {
                        b.ack_all().expect("ack");
                    }
                }
                got
            });
            // 300 kB in all: less than a session's output limit (1 MiB), so that no delivery
            // is deferred to the inbox even when bob reads slowly.
            let mut body = vec![0u8; 200];
            for i in 0..N {
                body[..8].copy_from_slice(&i.to_le_bytes());
                a.send_direct(bob, &body).expect("send");
            }
            reader.join().expect("reader")
        });
        assert_eq!(
            got,
            (0..N).collect::<Vec<_>>(),
            "every message once, in order"
        );
        // A third session that closes mid-frame.
        {
            use std::io::Write;
            let mut s = std::net::TcpStream::connect(h.addr).expect("connect");
            s.write_all(&[200, 0, 0]).expect("partial frame");
        }
        drop(a);
        // Accepted in order: once this one is welcomed, the one above was accepted.
        drop(h.connect(3));
        let stats = h.stats.clone();
        let report = h.stop();
        // The exit publishes chat's counters too.
        assert_eq!(stats.get("chat_errors"), Some(0));
        assert!(stats.get("chat_commits").is_some_and(|n| n > 0));
        let chat = report.chat.expect("chat report");
        assert!(report.drained, "{report:?}");
        assert_eq!(chat.bufs_outstanding, 0, "{report:?}");
        assert_eq!(chat.ops_in_flight, 0, "{report:?}");
        assert!(chat.stats.rx_nobufs > 0, "{report:?}");
        assert!(chat.stats.recv_arms > chat.stats.rx_nobufs, "{report:?}");
        assert_eq!(chat.counters.accepted, 4, "{report:?}");
    }

    /// A recipient that stops reading: the engine gives up on it (slow reader) and closes it,
    /// but its output cannot be flushed, so after the flush deadline the send in flight is
    /// cancelled and the connection closed anyway; every operation is back at exit.
    #[test]
    fn a_closing_peer_that_does_not_read_is_closed_at_the_flush_deadline() {
        closing_peer_that_does_not_read(LIMITS, "stall");
    }

    /// The same with sends that fail with EAGAIN on a full socket: the connection waits for
    /// POLLOUT, and that wait is what the flush deadline cancels.
    #[test]
    fn a_full_socket_waits_for_pollout_and_the_wait_is_cancelled_at_the_deadline() {
        let limits = Limits {
            chat_send_dontwait: true,
            ..LIMITS
        };
        if let Some(report) = closing_peer_that_does_not_read(limits, "pollout") {
            let chat = report.chat.expect("chat report");
            assert!(chat.stats.send_waits > 0, "{report:?}");
        }
    }

    fn closing_peer_that_does_not_read(limits: Limits, tag: &str) -> Option<Report> {
        use std::io::{Read, Write};
        let cfg = crate::chat::ChatConfig {
            max_out_bytes: 64 << 10,
            slow_reader_timeout_us: 200_000,
            ..Default::default()
        };
        let h = ChatHarness::start(limits, tag, cfg)?;
        let mut a = h.connect(1);
        let mut bob = std::net::TcpStream::connect(h.addr).expect("connect");
        let mut hello = Vec::new();
        proto::chat::Encoder::new(&mut hello).hello(h.token(2).as_bytes());
        bob.write_all(&hello).expect("hello");
        bob.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut welcome = [0u8; 16];
        let n = bob.read(&mut welcome).expect("WELCOME");
        assert!(n > 0);
        let small: libc::c_int = 4096;
        // SAFETY: setsockopt reads one c_int from a live local; the descriptor is bob's.
        unsafe {
            libc::setsockopt(
                bob.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&small as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        // 12 MB for bob, more than the loopback socket buffers hold while he does not read.
        let body = vec![7u8; 60_000];
        for _ in 0..200 {
            a.send_direct(2, &body).expect("send");
        }
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_micros(super::super::chat_io::CLOSE_FLUSH_US * 3);
        while h.stats.get("chat_sessions") != Some(1) {
            assert!(Instant::now() < deadline, "bob's session was never closed");
            std::thread::sleep(Duration::from_millis(50));
        }
        let report = h.stop();
        let chat = report.chat.expect("chat report");
        assert!(report.drained, "{report:?}");
        assert_eq!(chat.ops_in_flight, 0, "{report:?}");
        assert_eq!(chat.bufs_outstanding, 0, "{report:?}");
        // Bob's at the flush deadline, then alice's when the stop closes every session.
        assert_eq!(chat.counters.closed, 2, "{report:?}");
        drop(bob);
        Some(report)
    }

    #[test]
    fn stops_promptly_when_idle() {
        let Some(h) = Harness::start(LIMITS) else {
            return;
        };
        let t = Instant::now();
        let report = h.stop();
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(report.drained && report.bufs_outstanding == 0, "{report:?}");
    }
}
