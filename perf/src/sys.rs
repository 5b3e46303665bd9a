//! The only module with `unsafe`: thin wrappers over the Linux syscalls the load generator and
//! the ideal forwarder need (recvmmsg/sendmmsg, epoll, CPU affinity, clocks, fifos).
//!
//! IPv4 only: the harness runs over loopback and every address it handles is 127.0.0.1.

use std::ffi::CString;
use std::io;
use std::mem::zeroed;
use std::net::SocketAddrV4;
use std::os::fd::RawFd;

/// Largest datagram the harness sends or forwards (RTP packets here are at most 1200 bytes).
pub const MAX_DATAGRAM: usize = 2048;

/// Linux caps one sendmmsg/recvmmsg call at UIO_MAXIOV messages.
const UIO_MAXIOV: usize = 1024;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// CLOCK_MONOTONIC in nanoseconds. It is system-wide, so a timestamp taken in one process can be
/// subtracted from one taken in another: this is what makes one-way latency measurable.
pub fn now_ns() -> u64 {
    // SAFETY: clock_gettime only writes the timespec we own; CLOCK_MONOTONIC always exists.
    let mut ts: libc::timespec = unsafe { zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Restricts thread or process `tid` (0 = the calling thread) to the single CPU `cpu`.
pub fn pin(tid: i32, cpu: usize) -> io::Result<()> {
    // SAFETY: the cpu_set_t is a plain bitmap owned by this frame; CPU_SET bounds-checks `cpu`.
    unsafe {
        let mut set: libc::cpu_set_t = zeroed();
        libc::CPU_SET(cpu, &mut set);
        check(libc::sched_setaffinity(
            tid,
            std::mem::size_of::<libc::cpu_set_t>(),
            &set,
        ))?;
    }
    Ok(())
}

/// Sets the nice value of the calling thread; threads and processes it creates inherit it.
pub fn set_nice(nice: i32) -> io::Result<()> {
    // SAFETY: setpriority has no memory effects.
    check(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) }).map(drop)
}

/// Switches the calling thread to SCHED_FIFO at `priority`; threads and processes it creates
/// inherit the policy. The kernel's RT throttling (sched_rt_runtime_us) still leaves other
/// tasks 5% of each CPU, so a spinning contender cannot lock the machine.
pub fn set_fifo(priority: i32) -> io::Result<()> {
    let p = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `p` lives for the duration of the call; the kernel copies it.
    check(unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) }).map(drop)
}

/// Number of CPUs online (not just those this process may run on: the harness pins itself).
pub fn n_cpus() -> usize {
    // SAFETY: sysconf has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

pub use crate::procstat::clock_ticks_per_s;

/// Shrinks the calling thread's timer slack so that the publisher's short sleeps end on time
/// (the default slack of 50 us would make pacing bursty).
pub fn set_timer_slack_ns(ns: u64) {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0) };
}

/// Sends `sig` to process `pid`.
pub fn kill(pid: u32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill has no memory effects.
    check(unsafe { libc::kill(pid as libc::pid_t, sig) }).map(drop)
}

/// Makes the child that `cmd` will start receive SIGTERM when the thread that started it
/// exits, so contenders and perf never outlive an interrupted harness.
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs between fork and exec and only calls prctl, which is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0);
            Ok(())
        });
    }
}

/// Sets the socket buffer sizes. With `force` (root only) it uses SO_RCVBUFFORCE so the load
/// generator's own sockets are never the bottleneck; without, the kernel caps at rmem_max.
pub fn set_socket_buffers(fd: RawFd, bytes: usize, force: bool) -> io::Result<()> {
    let (rcv, snd) = if force {
        (libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE)
    } else {
        (libc::SO_RCVBUF, libc::SO_SNDBUF)
    };
    let v = bytes as libc::c_int;
    for opt in [rcv, snd] {
        // SAFETY: the option value is a c_int that lives for the duration of the call.
        let ret = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if check(ret).is_err() && force {
            return set_socket_buffers(fd, bytes, false);
        }
        check(ret)?;
    }
    Ok(())
}

/// Creates a named pipe (used to drive `perf stat --control`).
pub fn mkfifo(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    check(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }).map(drop)
}

/// Waits up to `timeout_ms` for `fd` to become readable.
pub fn wait_readable(fd: RawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd owned by this frame.
    let n = check(unsafe { libc::poll(&mut p, 1, timeout_ms) })?;
    Ok(n > 0)
}

/// A socket address in the kernel's layout.
pub fn to_sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut s: libc::sockaddr_in = unsafe { zeroed() };
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    s.sin_addr.s_addr = u32::from(*a.ip()).to_be();
    s
}

/// A reusable recvmmsg batch: `cap` buffers of [`MAX_DATAGRAM`] bytes with their source
/// addresses. The kernel writes into memory this struct owns, and the header array points into
/// it, so the struct is boxed in place and never moved after construction.
pub struct RecvBatch {
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_in>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl RecvBatch {
    /// A batch of `cap` messages.
    pub fn new(cap: usize) -> Self {
        // SAFETY: sockaddr_in and mmsghdr are plain old data; zero is a valid value for both.
        let mut b = Self {
            bufs: vec![0u8; cap * MAX_DATAGRAM],
            addrs: vec![unsafe { zeroed() }; cap],
            iovs: Vec::with_capacity(cap),
            hdrs: vec![unsafe { zeroed() }; cap],
        };
        for i in 0..cap {
            let base = b.bufs[i * MAX_DATAGRAM..].as_mut_ptr();
            b.iovs.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: MAX_DATAGRAM,
            });
        }
        // The Vecs' heap buffers never move after this point (no push beyond capacity), so
        // the pointers below stay valid for the life of the struct.
        for i in 0..cap {
            let h = &mut b.hdrs[i].msg_hdr;
            h.msg_name = (&mut b.addrs[i] as *mut libc::sockaddr_in).cast();
            h.msg_iov = &mut b.iovs[i];
            h.msg_iovlen = 1;
        }
        b
    }

    /// Receives up to `cap` datagrams. `flags` is MSG_WAITFORONE for a blocking socket that
    /// should return as soon as one arrived, or MSG_DONTWAIT to drain without blocking.
    /// Returns 0 on EAGAIN.
    pub fn recv(&mut self, fd: RawFd, flags: libc::c_int) -> io::Result<usize> {
        for (h, a) in self.hdrs.iter_mut().zip(&self.addrs) {
            h.msg_hdr.msg_namelen = std::mem::size_of_val(a) as libc::socklen_t;
            h.msg_len = 0;
        }
        // SAFETY: every header points at a buffer and address slot owned by `self`, which
        // outlives the call; the kernel writes at most iov_len / msg_namelen bytes.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                self.hdrs.len() as libc::c_uint,
                flags,
                std::ptr::null_mut(),
            )
        };
        match check(n) {
            Ok(n) => Ok(n as usize),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Payload of message `i` of the last [`RecvBatch::recv`].
    pub fn data(&self, i: usize) -> &[u8] {
        let len = self.hdrs[i].msg_len as usize;
        &self.bufs[i * MAX_DATAGRAM..i * MAX_DATAGRAM + len.min(MAX_DATAGRAM)]
    }

    /// Source address of message `i` in the kernel's layout.
    pub fn source(&self, i: usize) -> &libc::sockaddr_in {
        &self.addrs[i]
    }
}

/// Scratch arrays for sendmmsg, kept between calls so the steady state allocates nothing.
#[derive(Default)]
pub struct SendBatch {
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl SendBatch {
    /// Sends every `(payload, destination)` pair (destination `None` on a connected socket),
    /// in as few sendmmsg calls as the kernel allows. Returns (messages sent, syscalls made).
    /// A message the kernel refuses (for example ECONNREFUSED left by an earlier ICMP error)
    /// is skipped rather than retried: a forwarder must not stall on one bad destination.
    pub fn send<'a>(
        &mut self,
        fd: RawFd,
        msgs: impl Iterator<Item = (&'a [u8], Option<&'a libc::sockaddr_in>)>,
    ) -> (usize, usize) {
        self.iovs.clear();
        self.hdrs.clear();
        for (data, dest) in msgs {
            self.iovs.push(libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: data.len(),
            });
            // SAFETY: mmsghdr is plain old data; zero is a valid value.
            let mut h: libc::mmsghdr = unsafe { zeroed() };
            if let Some(d) = dest {
                h.msg_hdr.msg_name = (d as *const libc::sockaddr_in).cast_mut().cast();
                h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            }
            h.msg_hdr.msg_iovlen = 1;
            self.hdrs.push(h);
        }
        // Point each header at its iovec only now: pushing may have moved the iovec array.
        for (h, iov) in self.hdrs.iter_mut().zip(self.iovs.iter_mut()) {
            h.msg_hdr.msg_iov = iov;
        }
        self.flush(fd)
    }

    fn flush(&mut self, fd: RawFd) -> (usize, usize) {
        let (mut at, mut sent, mut calls) = (0, 0, 0);
        while at < self.hdrs.len() {
            let n = (self.hdrs.len() - at).min(UIO_MAXIOV);
            // SAFETY: headers [at, at+n) point at iovecs in `self.iovs` and at payloads and
            // addresses borrowed for 'a by `send`, all alive during the call; the kernel only
            // reads them (and writes msg_len, which we own).
            let r = unsafe { libc::sendmmsg(fd, self.hdrs[at..].as_mut_ptr(), n as u32, 0) };
            calls += 1;
            if r > 0 {
                at += r as usize;
                sent += r as usize;
            } else {
                at += 1; // the first message failed: skip it, keep going
            }
        }
        (sent, calls)
    }
}

/// A level-triggered epoll set over sockets, each registered with its index as the token.
pub struct Epoll {
    fd: RawFd,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    /// An empty set able to report `cap` ready sockets per wait.
    pub fn new(cap: usize) -> io::Result<Self> {
        // SAFETY: epoll_create1 has no memory effects.
        let fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        let events = vec![libc::epoll_event { events: 0, u64: 0 }; cap.max(1)];
        Ok(Self { fd, events })
    }

    /// Watches `fd` for input, reporting it as `token`.
    pub fn add(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: `ev` lives for the duration of the call; the kernel copies it.
        check(unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(drop)
    }

    /// Waits up to `timeout_ms` and returns the tokens of the ready sockets.
    pub fn wait(&mut self, timeout_ms: i32) -> io::Result<impl Iterator<Item = u64> + '_> {
        // SAFETY: the kernel writes at most `events.len()` entries into our buffer.
        let n = unsafe {
            libc::epoll_wait(
                self.fd,
                self.events.as_mut_ptr(),
                self.events.len() as libc::c_int,
                timeout_ms,
            )
        };
        let n = match check(n) {
            Ok(n) => n as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        Ok(self.events[..n].iter().map(|e| e.u64))
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor and close it exactly once.
        unsafe { libc::close(self.fd) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, UdpSocket};
    use std::os::fd::AsRawFd;

    /// The inverse of `to_sockaddr`.
    pub fn from_sockaddr(s: &libc::sockaddr_in) -> SocketAddrV4 {
        SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr)),
            u16::from_be(s.sin_port),
        )
    }

    #[test]
    fn sockaddr_round_trips() {
        let a = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 4242);
        assert_eq!(from_sockaddr(&to_sockaddr(a)), a);
    }

    #[test]
    fn sendmmsg_then_recvmmsg_over_loopback() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let std::net::SocketAddr::V4(to) = rx.local_addr().unwrap() else {
            panic!("bound to IPv4")
        };
        let dest = to_sockaddr(to);
        let msgs: [&[u8]; 3] = [b"a", b"bb", b"ccc"];
        let (sent, calls) =
            SendBatch::default().send(tx.as_raw_fd(), msgs.iter().map(|m| (*m, Some(&dest))));
        assert_eq!((sent, calls), (3, 1));
        let mut batch = RecvBatch::new(8);
        let mut got = Vec::new();
        while got.len() < 3 {
            let n = batch.recv(rx.as_raw_fd(), libc::MSG_WAITFORONE).unwrap();
            got.extend((0..n).map(|i| batch.data(i).to_vec()));
            let src = from_sockaddr(batch.source(0));
            assert_eq!(std::net::SocketAddr::V4(src), tx.local_addr().unwrap());
        }
        assert_eq!(got, vec![b"a".to_vec(), b"bb".to_vec(), b"ccc".to_vec()]);
    }
}
