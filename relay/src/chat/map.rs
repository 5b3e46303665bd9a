//! The hash map of the chat engine and its connection tables.
//!
//! Chat keys are partly chosen by clients (message ids, group chat ids), so the hasher must be
//! seeded per process, which std's SipHash is but FxHash (the media engine's, whose keys exist
//! only after a token check) is not. foldhash is seeded the same way and hashes a `u64` in a
//! multiply and a fold; std's SipHash-1-3 showed at about 4.5 % of the relay's CPU in the
//! profile of `chatperf run --users 200` (`hash_one` and `DefaultHasher::write`).

/// A `HashMap` with foldhash's per-process randomly seeded fast hasher.
pub type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
