//! The straightforward relay most people would write first: a current-thread tokio runtime,
//! `recv_from`, then one `send_to` per destination. It is the reference for user-space CPU
//! and system calls per packet.

use std::collections::HashMap;
use std::net::SocketAddr;

/// Runs the relay on `listen` until the process is killed.
pub fn run(listen: SocketAddr, rooms_path: &str) -> anyhow::Result<()> {
    let (sock, rooms) = super::setup(listen, rooms_path)?;
    let routes: HashMap<SocketAddr, Vec<SocketAddr>> = crate::topology::destinations(&rooms)
        .into_iter()
        .map(|(from, to)| (from.into(), to.into_iter().map(Into::into).collect()))
        .collect();
    sock.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async move {
        let sock = tokio::net::UdpSocket::from_std(sock)?;
        super::announce_ready("tokio-relay", sock.local_addr()?, rooms.len())?;
        let mut buf = vec![0u8; crate::sys::MAX_DATAGRAM];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                continue; // an ICMP error from an earlier send; nothing to forward
            };
            for to in routes.get(&from).into_iter().flatten() {
                let _ = sock.send_to(&buf[..n], to).await;
            }
        }
    })
}
