//! The ideal batched forwarder: one thread, a blocking recvmmsg of up to 64 datagrams, then
//! one sendmmsg carrying every (datagram, destination) pair to precomputed addresses. No
//! parsing, no state, no timers: what is left is the kernel's own cost of moving the packets,
//! the floor any relay on this machine is compared with.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use crate::sys::{self, RecvBatch, SendBatch};

/// Datagrams per recvmmsg.
const BATCH: usize = 64;

/// Key of a source address: IPv4 and port packed, to keep the per-packet lookup cheap.
fn key(a: &libc::sockaddr_in) -> u64 {
    (u64::from(a.sin_addr.s_addr) << 16) | u64::from(a.sin_port)
}

/// Runs the forwarder on `listen` until the process is killed.
pub fn run(listen: SocketAddr, rooms_path: &str) -> anyhow::Result<()> {
    let (sock, rooms) = super::setup(listen, rooms_path)?;
    let routes: HashMap<u64, Vec<libc::sockaddr_in>> = crate::topology::destinations(&rooms)
        .into_iter()
        .map(|(from, to)| {
            let from = sys::to_sockaddr(from);
            (key(&from), to.into_iter().map(sys::to_sockaddr).collect())
        })
        .collect();
    super::announce_ready("ideal-forwarder", sock.local_addr()?, rooms.len())?;
    let fd = sock.as_raw_fd();
    let mut rx = RecvBatch::new(BATCH);
    let mut tx = SendBatch::default();
    let none = Vec::new();
    loop {
        // MSG_WAITFORONE: block for the first datagram, then take whatever else is queued.
        let n = match rx.recv(fd, libc::MSG_WAITFORONE) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // ECONNREFUSED and the like are reports of earlier sends, not fatal here.
            Err(_) => continue,
        };
        let rx = &rx;
        let msgs = (0..n).flat_map(|i| {
            let dests = routes.get(&key(rx.source(i))).unwrap_or(&none);
            dests.iter().map(move |d| (rx.data(i), Some(d)))
        });
        tx.send(fd, msgs);
    }
}
