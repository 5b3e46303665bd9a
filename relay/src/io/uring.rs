//! The `uring` backend (being written): io_uring with multishot RecvMsg into a provided-buffer
//! ring and fan-out as N SendMsg SQEs over one buffer.

use super::ShardCtx;
use crate::engine::Shard;
use std::io;
use std::net::UdpSocket;

/// Checks that an io_uring can be created here and supports what the backend needs.
pub fn probe() -> Result<(), String> {
    match io_uring::IoUring::new(8) {
        Ok(_) => Err("the uring backend is not built yet".into()),
        Err(e) => Err(format!("io_uring_setup failed: {e}")),
    }
}

/// Runs one shard on `socket` until `ctx.stop` is set.
pub fn run(_engine: &mut Shard, _socket: &UdpSocket, _ctx: &ShardCtx) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "the uring backend is not built yet",
    ))
}
