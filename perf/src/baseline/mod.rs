//! The two baselines every relay contender is measured against, in the same run:
//! the ideal batched forwarder (the kernel's own limit) and a straightforward tokio relay.
//! Both learn the rooms from a rooms file written by the harness, print one `ready` line on
//! stdout when their socket is bound, and run until killed (SIGTERM's default action suffices:
//! they hold no state worth flushing).
#![forbid(unsafe_code)]

pub mod ideal;
pub mod tokio_relay;

use std::io::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

/// Socket buffer size the baselines ask for. Not forced past net.core.rmem_max, the same
/// limit an unprivileged relay would meet.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Binds the forwarding socket and reads the rooms file.
fn setup(
    listen: SocketAddr,
    rooms_path: &str,
) -> anyhow::Result<(UdpSocket, Vec<Vec<std::net::SocketAddrV4>>)> {
    let text = std::fs::read_to_string(rooms_path)
        .map_err(|e| anyhow::anyhow!("reading rooms file {rooms_path}: {e}"))?;
    let rooms = crate::topology::parse_rooms_file(&text)?;
    let sock = UdpSocket::bind(listen)?;
    crate::sys::set_socket_buffers(sock.as_raw_fd(), SOCKET_BUFFER_BYTES, false)?;
    Ok((sock, rooms))
}

/// Tells the harness the socket is bound.
fn announce_ready(kind: &str, listen: SocketAddr, n_rooms: usize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {kind} listen={listen} rooms={n_rooms}")?;
    out.flush()?;
    Ok(())
}
