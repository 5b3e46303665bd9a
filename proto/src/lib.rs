//! Wire formats shared by the relay, ctl, the perf harness and clients.
//!
//! Everything here is pure: parsers are zero-copy views over `&[u8]` that never allocate and
//! never panic on any input, writers fill caller-provided buffers. No I/O, no clocks.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod base64url;
pub mod binding;
pub mod chat;
pub mod demux;
pub mod rtcp;
pub mod rtp;
pub mod stun;
pub mod token;
