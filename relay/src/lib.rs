//! The relay: a thread-per-core SFU.
//!
//! - [`engine`]: the sans-IO shard engine (rooms, bindings, forwarding, RTCP routing, limits).
//! - [`io`]: the I/O backends (`batch`, `uring`) that drive one engine per thread.
//! - [`runtime`]: binds the shard sockets and starts the pinned shard threads.
//! - [`config`], [`metrics`], [`signals`]: the process around them; [`error`]: why it stops.

pub mod chat;
pub mod config;
pub mod ctl_client;
pub mod engine;
pub mod error;
pub mod io;
pub mod metrics;
pub mod ring;
pub mod runtime;
pub mod signals;
