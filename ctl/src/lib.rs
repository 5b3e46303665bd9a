//! `ctl`'s library: the parts of the control daemon that are pure functions of their inputs, kept
//! apart from the daemon's I/O so that they can be tested and benchmarked on their own.
//!
//! - [`placement`]: on which relay shard every room and every user's chat home lives (weighted
//!   rendezvous hashing with static capacity weights, load handled after ranking).
//! - [`core`]: the control state machine (membership, placements, meetings, tokens, command
//!   queues), driven with explicit time; [`membership`], [`meetings`], [`commands`] and
//!   [`journal`] (the fsync'd store) are its parts.
//! - [`server`] and [`listener`]: the HTTP driver (axum routes over hyper, one `Core` behind a
//!   mutex, relays' long polls, the periodic tick); [`api_types`] and [`error`] are the wire.
//! - [`client`]: the std-only HTTP client of the admin subcommands and the tests.

#![forbid(unsafe_code)]

pub mod placement;

// The daemon (see `core` for the state machine and `server` for its HTTP driver).
pub mod accounts;
pub mod api_types;
pub mod client;
pub mod commands;
pub mod config;
pub mod core;
pub mod error;
pub mod guard;
pub mod ha;
pub mod journal;
pub mod keys;
pub mod listener;
pub mod meetings;
pub mod membership;
pub mod metrics;
pub mod server;
pub mod sms;
pub mod views;
