//! `ctl`'s library: the parts of the control daemon that are pure functions of their inputs, kept
//! apart from the daemon's I/O so that they can be tested and benchmarked on their own.
//!
//! - [`placement`]: on which relay shard every room and every user's chat home lives (weighted
//!   rendezvous hashing with static capacity weights, load handled after ranking).

#![forbid(unsafe_code)]

pub mod placement;
