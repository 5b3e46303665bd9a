//! The per-shard durable log (being written).
