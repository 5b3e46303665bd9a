//! Chat on the relay: framed TCP sessions, per-chat ordering, receipts and the durable inbox.
//!
//! - [`log`]: the per-shard append-only log with CRC per record and group commit.

pub mod log;
