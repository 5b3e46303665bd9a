//! Placement: which relay shard a room, or a user's chat home, lives on (DESIGN.md section 6).
//!
//! Two layers, both pure (no I/O, no clock, no randomness):
//!
//! - [`Ranker`] ranks the serving nodes for a [`Key`] by weighted rendezvous hashing (HRW). Node
//!   `i` gets the cost `c_i = -ln(h_i) / w_i` and the lowest cost wins (ties: lower id); this is
//!   the score `w_i / -ln(h_i)` of DESIGN.md turned upside down. `h_i` is uniform in (0, 1), so
//!   `-ln(h_i)` is an exponential variable and `c_i` one of rate `w_i`: the first of these races
//!   is won by node `i` with probability exactly `w_i / W` (the logarithmic method of Schindelhauer
//!   and Schomaker, Ceph's straw2). The seed's `h_i * w_i` is not proportional to weight.
//! - [`Placer`] keeps what a ctl knows: the nodes, their last reported load, the placements it made
//!   since that report, and the sticky placements. Load never enters the hash (weights are static
//!   capacity); it is applied after ranking, by a bounded-load cap and by taking the less loaded
//!   of the two best-ranked nodes under the cap.
//!
//! **Node identity.** Placement is flat: every relay shard is a node of its own, named by
//! [`NodeId::shard`] (relay id, shard index). A relay's weight is spread over its shards, so
//! `n_shards` times more nodes are ranked, which is what the benchmarks measure (8,192 nodes is,
//! for instance, 1,024 relays of 8 shards). A two-level choice (relay, then shard) would cost
//! `n_relays + n_shards_per_relay` hashes instead of `n_relays * n_shards`, but it is a tree, and a
//! tree moves more keys than necessary when a node leaves (DESIGN.md section 6.3). The flat scan
//! is pruned instead ([`Ranker::top_k`]: every node is hashed, but only a handful get the exact
//! `ln`), with the same result as the unpruned one, and it stays within the 15 us target at 8,192
//! nodes (`cargo bench -p benches --bench placement`), so there is no tree. At small sizes the
//! cost is those few exact logarithms, which a tree would not remove.
//!
//! **The cross-machine, cross-version contract.** Every ctl replica must rank every key the same
//! way, today and after an upgrade, or rooms move. The ranking depends only on: XXH3-64 (a fixed
//! specification; see [`Key`] and `rank::pair_hash`), the 64-bit to (0, 1) mapping in
//! `rank::unit_open`, the natural logarithm in [`ln`] (written here from IEEE-754 basic
//! operations, which are correctly rounded and therefore give the same bits on every machine), one
//! IEEE division by the weight, and the tie-break by id. A golden-vector test pins the result.

#![forbid(unsafe_code)]

mod placer;
mod rank;

#[cfg(test)]
mod tests;

pub use placer::{Move, Placement, Placer, PlacerConfig};
pub use rank::{ln, Candidates, Ranker, MAX_K};

use std::fmt;

/// A placement key: a room id or a user id, reduced to its 64-bit XXH3 hash.
///
/// Two different keys whose hashes collide are placed together; at 64 bits that needs about 4
/// billion live keys before it becomes likely, and it costs nothing but a shared shard.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Key(u64);

impl Key {
    /// The key of a numeric id: XXH3-64 of its 8 little-endian bytes, so `from_u64(v)` equals
    /// `from_bytes(&v.to_le_bytes())`.
    pub fn from_u64(id: u64) -> Self {
        Self::from_bytes(&id.to_le_bytes())
    }

    /// The key of an opaque id (a room name, a user name): XXH3-64 (seed 0) of the bytes.
    pub fn from_bytes(id: &[u8]) -> Self {
        Self(xxhash_rust::xxh3::xxh3_64(id))
    }

    /// The 64-bit hash everything else is derived from.
    pub fn hash(self) -> u64 {
        self.0
    }
}

/// A node: one relay shard. Stable for the life of the shard (it is an input of the hash).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct NodeId(pub u64);

impl NodeId {
    /// The number of bits of a [`NodeId`] that hold the shard index.
    pub const SHARD_BITS: u32 = 16;

    /// The node of shard `shard_idx` of relay `relay_id`: `relay_id << 16 | shard_idx`.
    ///
    /// # Panics
    /// If `relay_id` does not fit in 48 bits (ctl assigns relay ids; that is our bug).
    pub fn shard(relay_id: u64, shard_idx: u16) -> Self {
        assert!(
            relay_id >> (64 - Self::SHARD_BITS) == 0,
            "relay id {relay_id} over 48 bits"
        );
        Self(relay_id << Self::SHARD_BITS | u64::from(shard_idx))
    }

    /// The relay this node is a shard of.
    pub fn relay_id(self) -> u64 {
        self.0 >> Self::SHARD_BITS
    }

    /// The shard index within its relay.
    pub fn shard_idx(self) -> u16 {
        // Truncation keeps exactly the low SHARD_BITS (16) bits.
        self.0 as u16
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.relay_id(), self.shard_idx())
    }
}

/// Whether a node takes new placements.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum NodeState {
    /// Takes new placements and keeps its current ones.
    Serving,
    /// Keeps its current placements until they end; gets nothing new.
    Draining,
}

/// A node as placement sees it.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Node {
    pub id: NodeId,
    /// Static capacity in any unit shared by all nodes (rooms, cores x Gbit/s); never load.
    /// Finite and positive.
    pub weight: f64,
    pub state: NodeState,
}

impl Node {
    /// A serving node.
    pub fn serving(id: NodeId, weight: f64) -> Self {
        Self {
            id,
            weight,
            state: NodeState::Serving,
        }
    }
}

/// Why a placement call was refused.
#[derive(Clone, Copy, PartialEq, Debug)]
#[non_exhaustive]
pub enum PlacementError {
    /// A weight that is not a finite, positive, normal number.
    InvalidWeight { id: NodeId, weight: f64 },
    /// The same node id twice in one node list.
    DuplicateNode(NodeId),
    /// A node id the placer does not know.
    UnknownNode(NodeId),
    /// No serving node: every node is draining or gone.
    NoServingNode,
    /// A [`PlacerConfig`] out of range (`n_candidates` in 2..=[`MAX_K`], `load_cap` >= 1).
    InvalidConfig,
}

impl fmt::Display for PlacementError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidWeight { id, weight } => write!(f, "node {id}: invalid weight {weight}"),
            Self::DuplicateNode(id) => write!(f, "node {id} given twice"),
            Self::UnknownNode(id) => write!(f, "unknown node {id}"),
            Self::NoServingNode => write!(f, "no serving node"),
            Self::InvalidConfig => write!(
                f,
                "placer config out of range (n_candidates 2..={MAX_K}, load_cap >= 1)"
            ),
        }
    }
}

impl std::error::Error for PlacementError {}
