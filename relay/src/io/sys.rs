//! Thin, safe wrappers over the socket-address, socket-option and epoll syscalls the backends
//! use.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Writes `addr` into `out`, returning the length to pass as `socklen_t`.
pub fn to_sockaddr(addr: &SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in.
            let sin =
                unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            sin.sin_zero = [0; 8];
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in6.
            let sin6 =
                unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Reads a socket address written by the kernel; `None` for families other than IPv4/IPv6.
pub fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let port = u16::from_be(sin6.sin6_port);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                port,
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// A zeroed sockaddr_storage.
pub fn sockaddr_storage() -> libc::sockaddr_storage {
    // SAFETY: all-zero is a valid sockaddr_storage (family AF_UNSPEC).
    unsafe { zeroed() }
}

/// Sets an integer socket option; returns the value the kernel reports afterwards.
pub fn set_buffer(fd: RawFd, opt: libc::c_int, bytes: usize) -> io::Result<usize> {
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    set_int_opt(fd, libc::SOL_SOCKET, opt, v)?;
    Ok(get_int_opt(fd, libc::SOL_SOCKET, opt)? as usize)
}

/// Sets an integer socket option.
fn set_int_opt(fd: RawFd, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&raw const v).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads an integer socket option.
fn get_int_opt(fd: RawFd, level: libc::c_int, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut got: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: passes a pointer to a live c_int and its size.
    let rc = unsafe { libc::getsockopt(fd, level, opt, (&raw mut got).cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(got)
}

/// The CPUs the process may run on: its main thread's affinity mask (e.g. systemd's
/// `CPUAffinity=`, taskset), which no shard changes, in order; shard i is pinned to the i-th.
/// Falls back to `0..available_cpus()` if the mask cannot be read.
/// The process's heap as the C allocator sees it: (bytes in use, bytes free inside the heap),
/// the in-use figure including blocks mapped on their own. RSS mixes this with fragmentation,
/// code and kernel-side memory; this is what the program itself holds. `None` where the
/// allocator is not glibc's.
pub fn heap_bytes() -> Option<(u64, u64)> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no arguments and only reads the allocator's statistics
        // (under its own locks); it returns a plain struct by value.
        let m = unsafe { libc::mallinfo2() };
        Some(((m.uordblks + m.hblkhd) as u64, m.fordblks as u64))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

pub fn process_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is a plain bit array that sched_getaffinity fills for the main thread
    // (tid = pid); CPU_ISSET reads it.
    let cpus: Vec<usize> = unsafe {
        let mut set: libc::cpu_set_t = zeroed();
        if libc::sched_getaffinity(libc::getpid(), size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            Vec::new()
        } else {
            (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| libc::CPU_ISSET(c, &set))
                .collect()
        }
    };
    if cpus.is_empty() {
        (0..available_cpus()).collect()
    } else {
        cpus
    }
}

/// Restricts the calling thread to `cpus` (nothing happens for an empty list).
pub fn pin_to_cpus(cpus: &[usize]) -> io::Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    // SAFETY: cpu_set_t is a plain bit array; CPU_SET writes inside it for cpu < CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = zeroed();
        for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Number of CPUs this process may run on.
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Sets TCP_NODELAY on `fd` (on a listener: inherited by the sockets it accepts).
pub fn set_tcp_nodelay(fd: RawFd) -> io::Result<()> {
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)
}

/// The soft RLIMIT_NOFILE: descriptors per process, and registered files per io_uring.
pub fn nofile_limit() -> usize {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return 1024;
    }
    usize::try_from(rl.rlim_cur).unwrap_or(usize::MAX)
}

/// Raises the soft RLIMIT_NOFILE to the hard one (the soft default, often 1,024, is meant for
/// programs that use `select`); returns the soft limit now in force.
pub fn raise_nofile_limit() -> usize {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0 && rl.rlim_cur < rl.rlim_max {
        rl.rlim_cur = rl.rlim_max;
        // SAFETY: a valid pointer; raising the soft limit up to the hard one needs no privilege,
        // and a failure leaves the limit as it was.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) };
    }
    nofile_limit()
}

/// A new epoll instance (close-on-exec), owned.
pub fn epoll_create() -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: epoll_create1 returns a new descriptor or -1.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned from here on.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// `epoll_ctl(epfd, op, fd)` with `events` and the tag `tag`.
pub fn epoll_ctl(epfd: RawFd, op: libc::c_int, fd: RawFd, events: u32, tag: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: tag };
    // SAFETY: a live epoll_event for the duration of the call.
    if unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn the_heap_in_use_follows_what_is_allocated() {
        // Large against what tests running beside this one allocate and free meanwhile.
        const BLOCK: u64 = 256 << 20;
        let (before, _) = heap_bytes().expect("glibc");
        let block = std::hint::black_box(vec![1u8; BLOCK as usize]);
        let (during, _) = heap_bytes().expect("glibc");
        assert!(during > before + BLOCK / 2, "{before} -> {during}");
        drop(block);
        let (after, _) = heap_bytes().expect("glibc");
        assert!(after + BLOCK / 2 < during, "{during} -> {after}");
    }

    #[test]
    fn process_cpus_are_the_affinity_mask() {
        let cpus = process_cpus();
        assert!(!cpus.is_empty());
        assert!(cpus.windows(2).all(|w| w[0] < w[1]), "in order, no repeats");
        // available_parallelism also applies cgroup CPU quotas, so it may be smaller.
        assert!(available_cpus() <= cpus.len());
    }

    #[test]
    fn sockaddr_round_trips() {
        for a in ["127.0.0.1:4000", "[::1]:5000", "[fe80::1%2]:6000"] {
            let a: SocketAddr = a.parse().unwrap();
            let mut ss = sockaddr_storage();
            let len = to_sockaddr(&a, &mut ss);
            assert!(len > 0);
            assert_eq!(from_sockaddr(&ss), Some(a));
        }
        assert_eq!(from_sockaddr(&sockaddr_storage()), None);
    }

    /// The uring backend relies on it: its sockets are direct descriptors, set up only through
    /// the listener.
    #[test]
    fn accepted_sockets_inherit_tcp_nodelay_from_the_listener() {
        use std::os::fd::AsRawFd;
        for set in [false, true] {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            if set {
                set_tcp_nodelay(l.as_raw_fd()).unwrap();
            }
            let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (s, _) = l.accept().unwrap();
            assert_eq!(
                get_int_opt(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_NODELAY).unwrap() != 0,
                set,
                "listener nodelay {set}"
            );
        }
    }
}
