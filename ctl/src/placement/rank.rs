//! Weighted rendezvous ranking: the hash, the (0, 1) mapping, the deterministic `ln`, and the
//! pruned top-k scan.

#![forbid(unsafe_code)]

use super::{Key, Node, NodeId, NodeState, PlacementError};
use std::ops::Deref;

/// The most candidates a lookup returns.
pub const MAX_K: usize = 8;

/// The 64-bit hash of (key, node): XXH3-64, seed 0, of the 16 bytes `key.hash()` (little-endian)
/// followed by `node` (little-endian), i.e. `xxh3_64(&[key_le, node_le].concat())`.
///
/// The key is hashed once, so that the per-node cost does not grow with the key's length, and the
/// 16-byte input takes XXH3's 9-to-16-byte path. That path is written out here (XXH3 spec,
/// `XXH3_len_9to16_64b`) so that the ranking loop can precompute each node's half of it once
/// ([`node_half`]) and each key's half once per lookup ([`KeyHalf`]); a test checks it against
/// the `xxhash-rust` crate bit for bit.
#[cfg(test)]
pub(crate) fn pair_hash(key_hash: u64, node: u64) -> u64 {
    finish(hash_mul(KeyHalf::new(key_hash), node_half(node)))
}

// XXH3's default secret folded into the two "bitflip" words of the 9-to-16-byte path with seed 0:
// (secret[24..32] ^ secret[32..40]) + seed and (secret[40..48] ^ secret[48..56]) - seed, as
// little-endian u64s.
const XXH3_BITFLIP_LO: u64 = 0x6782_737b_ea42_39b9;
const XXH3_BITFLIP_HI: u64 = 0xaf56_bc3b_0996_523a;
/// XXH3's avalanche multiplier (`0x165667919E3779F9`).
const XXH3_AVALANCHE: u64 = 0x1656_6791_9e37_79f9;

/// The key's half of [`pair_hash`]: its input word and the part of the accumulator that does not
/// depend on the node.
#[derive(Clone, Copy)]
struct KeyHalf {
    lo: u64,
    acc: u64,
}

impl KeyHalf {
    #[inline]
    fn new(key_hash: u64) -> Self {
        let lo = key_hash ^ XXH3_BITFLIP_LO;
        // 16 is the input length.
        let acc = 16u64.wrapping_add(lo.swap_bytes());
        Self { lo, acc }
    }
}

/// The node's half of [`pair_hash`]; invertible (`node_half(node_half(id)) == id`).
#[inline]
fn node_half(id: u64) -> u64 {
    id ^ XXH3_BITFLIP_HI
}

/// [`pair_hash`] up to, not including, the final `h ^ (h >> 32)`: its top 32 bits are already
/// the hash's, which is all the pruning test needs.
#[inline]
fn hash_mul(key: KeyHalf, hi: u64) -> u64 {
    let product = u128::from(key.lo) * u128::from(hi);
    // Truncations keep the low and high 64-bit halves of the product.
    let fold = (product as u64) ^ ((product >> 64) as u64);
    let acc = key.acc.wrapping_add(hi).wrapping_add(fold);
    (acc ^ (acc >> 37)).wrapping_mul(XXH3_AVALANCHE)
}

#[inline]
fn finish(h: u64) -> u64 {
    h ^ (h >> 32)
}

/// Maps a 64-bit hash to `h` in (0, 1), both ends excluded: `(x >> 12) + 0.5` over `2^52`.
///
/// Only the top 52 bits are used so that every step is exact: `x >> 12` is below `2^52`, adding
/// `0.5` needs 53 significant bits (exactly an `f64`'s) and the scaling is by a power of two. The
/// 53-bit version, `((x >> 11) + 0.5) / 2^53`, needs 54 bits: for the largest `x` it rounds to
/// exactly 1.0, `ln` gives 0 and the cost divides by zero. Here `h` lies in
/// `[2^-53, 1 - 2^-53]`.
#[inline]
pub(crate) fn unit_open(x: u64) -> f64 {
    const SCALE: f64 = 1.0 / (1u64 << 52) as f64;
    ((x >> 12) as f64 + 0.5) * SCALE
}

// ln 2 split so that `e * LN2_HI` is exact for every binary exponent `e` of an `f64` (|e| < 2^11):
// LN2_HI keeps the top 21 significant bits of ln 2, LN2_LO = ln 2 - LN2_HI rounded to nearest.
const LN2_HI: f64 = 0.693_146_705_627_441_4;
const LN2_LO: f64 = 4.749_325_039_031_672_6e-7;

/// The natural logarithm of a positive, normal, finite `x`, computed from IEEE-754 basic
/// operations only (`+ - * /` and bit manipulation), each correctly rounded, in a fixed order.
/// The result is therefore the same bits on every machine and with every compiler version, which
/// the platform's `libm` (and so `f64::ln`) does not promise. (Rust never fuses `a * b + c` into
/// an FMA on its own, and its x86 targets use SSE2, not the x87 unit.) Error: within a few ulps
/// of the true value; the unit test measures it against `f64::ln`.
///
/// Method: `x = 2^e * m` with `m` in `(sqrt(2)/2, sqrt(2)]`, `f = m - 1` (exact, Sterbenz),
/// `s = f / (2 + f)`, and `ln(m) = 2 atanh(s) = 2s + 2s^3/3 + 2s^5/5 + ...`, written as
/// `f - (f^2/2 - s (f^2/2 + R))` with `R = 2/3 s^2 + 2/5 s^4 + ...` so that the large terms are
/// exact. `|s| <= 0.1716`, and ten terms of `R` leave a truncation error below `2^-60` relative.
/// Rather than fitted (minimax) coefficients this uses the Taylor ones, `2 / (2j + 1)`, each a
/// correctly rounded constant division folded at compile time.
///
/// Changing anything here (a coefficient, the evaluation order) can change the last bit of some
/// results and so the ranking of some keys: the golden-vector test pins it.
pub fn ln(x: f64) -> f64 {
    debug_assert!(x.is_normal() && x > 0.0, "ln({x})");
    const MANTISSA: u64 = (1 << 52) - 1;
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i32 - 1023;
    let mut m = f64::from_bits((bits & MANTISSA) | (1023 << 52));
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let f = m - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    // R = z * (c1 + c2 z + ... + c10 z^9), c_j = 2 / (2j + 1), by Estrin's scheme (the same
    // fixed order every time; shallower than Horner, which matters when a lookup waits for it).
    let (z2, z4) = (z * z, (z * z) * (z * z));
    let p01 = 2.0 / 3.0 + 2.0 / 5.0 * z;
    let p23 = 2.0 / 7.0 + 2.0 / 9.0 * z;
    let p45 = 2.0 / 11.0 + 2.0 / 13.0 * z;
    let p67 = 2.0 / 15.0 + 2.0 / 17.0 * z;
    let p89 = 2.0 / 19.0 + 2.0 / 21.0 * z;
    let r = z * ((p01 + p23 * z2) + (p45 + p67 * z2) * z4 + p89 * (z4 * z4));
    let hfsq = 0.5 * f * f;
    let ln_m = f - (hfsq - s * (hfsq + r));
    let e = f64::from(e);
    e * LN2_HI + (ln_m + e * LN2_LO)
}

/// Whether `w` can weigh a node: finite, positive and normal (a subnormal weight would lose
/// precision in the cost division).
pub(crate) fn valid_weight(w: f64) -> bool {
    w.is_normal() && w > 0.0
}

/// The rendezvous cost of a node for a key: `-ln(h) / w`; the lowest cost ranks first.
#[inline]
fn cost_of(h: f64, weight: f64) -> f64 {
    -ln(h) / weight
}

/// The total order of the ranking: by cost, then by node id.
#[inline]
fn ranks_before(a: (f64, u64), b: (f64, u64)) -> bool {
    a.0 < b.0 || (a.0 == b.0 && a.1 < b.1)
}

/// The relative slack of the pruning bound. Any value far above `ln`'s error (a few times 2^-53)
/// keeps the pruned scan exact; see [`Ranker::top_k`].
const PRUNE_SLACK: f64 = 1.0 + 1.0 / (1u64 << 30) as f64;

const TWO_52: f64 = (1u64 << 52) as f64;

/// Nodes per block of the scan; each block gets its own coarse threshold from its heaviest node.
const BLOCK: usize = 32;

/// Up to [`MAX_K`] node ids, best first.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Candidates {
    ids: [NodeId; MAX_K],
    len: u8,
}

impl Candidates {
    const EMPTY: Self = Self {
        ids: [NodeId(0); MAX_K],
        len: 0,
    };

    /// The ids as a slice, best first.
    pub fn as_slice(&self) -> &[NodeId] {
        &self.ids[..usize::from(self.len)]
    }

    /// Candidates from a ranked list: its first [`MAX_K`] entries.
    pub fn from_ranked(ids: &[NodeId]) -> Self {
        let mut out = Self::EMPTY;
        let n = ids.len().min(MAX_K);
        out.ids[..n].copy_from_slice(&ids[..n]);
        // n <= MAX_K = 8 fits in a u8.
        out.len = n as u8;
        out
    }
}

impl Deref for Candidates {
    type Target = [NodeId];
    fn deref(&self) -> &[NodeId] {
        self.as_slice()
    }
}

/// The serving nodes, ready to rank keys. Immutable: a membership change builds a new one.
#[derive(Clone, Debug)]
pub struct Ranker {
    /// `node_half(id)` of every serving node, sorted by weight descending, then id ascending.
    /// Heavy nodes first make the pruning bound tight early and let a block's first node stand
    /// for its heaviest; the fixed order makes the scan independent of how the node list was
    /// given (the result is independent of it anyway: the order is total).
    halves: Vec<u64>,
    /// The weights, in the same order.
    weights: Vec<f64>,
    /// `1 / w`, in the same order: only to choose which nodes to look at first.
    inv_weights: Vec<f64>,
    total_weight: f64,
}

impl Ranker {
    /// Ranks the serving nodes of `nodes`; draining ones are left out. Every node, draining or
    /// not, must have a valid weight and an id of its own.
    pub fn new(nodes: &[Node]) -> Result<Self, PlacementError> {
        let mut all: Vec<&Node> = nodes.iter().collect();
        all.sort_by_key(|n| n.id);
        for pair in all.windows(2) {
            if pair[0].id == pair[1].id {
                return Err(PlacementError::DuplicateNode(pair[0].id));
            }
        }
        if let Some(n) = nodes.iter().find(|n| !valid_weight(n.weight)) {
            return Err(PlacementError::InvalidWeight {
                id: n.id,
                weight: n.weight,
            });
        }
        let mut serving: Vec<(u64, f64)> = nodes
            .iter()
            .filter(|n| n.state == NodeState::Serving)
            .map(|n| (n.id.0, n.weight))
            .collect();
        serving.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        Ok(Self {
            halves: serving.iter().map(|n| node_half(n.0)).collect(),
            weights: serving.iter().map(|n| n.1).collect(),
            inv_weights: serving.iter().map(|n| 1.0 / n.1).collect(),
            // Summed in the sorted order, so the total is the same whatever the input order.
            total_weight: serving.iter().map(|n| n.1).sum(),
        })
    }

    /// The number of serving nodes.
    pub fn len(&self) -> usize {
        self.halves.len()
    }

    /// Whether there is no serving node.
    pub fn is_empty(&self) -> bool {
        self.halves.is_empty()
    }

    /// The sum of the serving nodes' weights.
    pub fn total_weight(&self) -> f64 {
        self.total_weight
    }

    /// The weight of a serving node.
    pub fn weight(&self, id: NodeId) -> Option<f64> {
        let half = node_half(id.0);
        let i = self.halves.iter().position(|&h| h == half)?;
        Some(self.weights[i])
    }

    /// The best node for `key`, or `None` if there is no serving node.
    pub fn top1(&self, key: Key) -> Option<NodeId> {
        self.top_k(key, 1).first().copied()
    }

    /// The `k` best nodes for `key` (fewer if there are fewer nodes), best first.
    ///
    /// Pruned, and exact. With `m` the k-th best cost so far, a node can only enter the top k if
    /// `-ln(h) / w <= m`. Every node is hashed, but `ln` and the division run only for the few
    /// nodes that pass two necessary tests: an integer compare of the top 32 bits of the
    /// not-yet-finished hash against a threshold per block of `BLOCK` nodes (from
    /// `-ln(h) >= 1 - h` and the block's heaviest node; see `coarse_floor`), then
    /// `2 (1 - h) < m w (1 + h)` (from `-ln(h) >= 2 (1 - h) / (1 + h)`, the first term of
    /// `2 atanh((1 - h) / (1 + h))`). So that `m` is nearly final from the start, the exact costs
    /// of the k most promising of the `BLOCK` heaviest nodes are computed first. The bound
    /// carries a relative slack (`PRUNE_SLACK`, 2^-30) that dwarfs the rounding of `ln` and of
    /// the tests, so a node is skipped only if its computed cost is strictly above `m`: the
    /// result is bit-for-bit that of [`Self::top_k_unpruned`], which the tests check.
    ///
    /// # Panics
    /// If `k` is 0 or above [`MAX_K`] (a caller's bug).
    pub fn top_k(&self, key: Key, k: usize) -> Candidates {
        assert!((1..=MAX_K).contains(&k), "k = {k} out of 1..={MAX_K}");
        let mut top = TopK::new(k);
        if self.is_empty() {
            return top.candidates();
        }
        let key = KeyHalf::new(key.hash());
        // The head, the BLOCK heaviest nodes, is hashed first. The k of them with the smallest
        // (1 - h) / w (a lower bound of the cost, and nearly always in the same order) get their
        // exact costs computed first, independently of each other, which sets a bound close to
        // the final one before anything else is looked at.
        let n_head = self.len().min(BLOCK);
        let mut head = [0u64; BLOCK];
        let mut seeds = Seeds::new(k.min(n_head));
        for (i, (&half, &inv_w)) in self.halves[..n_head]
            .iter()
            .zip(&self.inv_weights)
            .enumerate()
        {
            let hm = hash_mul(key, half);
            head[i] = hm;
            // 2^52 (1 - h), less a half, over w.
            seeds.offer(((!finish(hm)) >> 12) as f64 * inv_w, i);
        }
        let mut costs = [0.0f64; MAX_K];
        for (c, i) in costs.iter_mut().zip(seeds.indices()) {
            *c = cost_of(unit_open(finish(head[i])), self.weights[i]);
        }
        let mut seeded = 0u64;
        for (&c, i) in costs.iter().zip(seeds.indices()) {
            top.insert((c, node_half(self.halves[i])));
            seeded |= 1 << i;
        }
        // Then the rest of the head: a branch-free pass computes which nodes pass the coarse
        // test, and only those are looked at further.
        let floor = coarse_floor(top.bound, self.weights[0]);
        let mut mask = 0u64;
        for (i, &hm) in head[..n_head].iter().enumerate() {
            mask |= u64::from(hm >= floor) << i;
        }
        self.offer_masked(&mut top, mask & !seeded, 0, |i| head[i]);
        // Past the head, passing the coarse test is rare enough that a predicted branch beats
        // the branch-free pass.
        let rest = self.halves[n_head..].chunks(BLOCK);
        for (halves, weights) in rest.zip(self.weights[n_head..].chunks(BLOCK)) {
            let mut floor = coarse_floor(top.bound, weights[0]);
            for (&half, &w) in halves.iter().zip(weights) {
                let hm = hash_mul(key, half);
                if hm >= floor && top.offer(unit_open(finish(hm)), w, node_half(half)) {
                    floor = coarse_floor(top.bound, weights[0]);
                }
            }
        }
        top.candidates()
    }

    /// Offers the nodes `start + i` for the bits `i` set in `mask`; `hm(i)` is their unfinished
    /// hash.
    #[inline]
    fn offer_masked(&self, top: &mut TopK, mut mask: u64, start: usize, hm: impl Fn(usize) -> u64) {
        while mask != 0 {
            let i = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            let j = start + i;
            top.offer(
                unit_open(finish(hm(i))),
                self.weights[j],
                node_half(self.halves[j]),
            );
        }
    }

    /// [`Self::top_k`] without pruning: computes every node's cost. The reference the pruned scan
    /// is tested against, and the benchmarks' baseline.
    ///
    /// # Panics
    /// If `k` is 0 or above [`MAX_K`].
    pub fn top_k_unpruned(&self, key: Key, k: usize) -> Candidates {
        assert!((1..=MAX_K).contains(&k), "k = {k} out of 1..={MAX_K}");
        let key = KeyHalf::new(key.hash());
        let mut top = TopK::new(k);
        for (&half, &w) in self.halves.iter().zip(&self.weights) {
            let h = unit_open(finish(hash_mul(key, half)));
            top.insert((cost_of(h, w), node_half(half)));
        }
        top.candidates()
    }

    /// Every serving node ranked for `key`, best first. `O(n log n)`: for the rare case where
    /// the first [`MAX_K`] are not enough.
    pub fn ranking(&self, key: Key) -> Vec<NodeId> {
        let key = KeyHalf::new(key.hash());
        let mut all: Vec<(f64, u64)> = self
            .halves
            .iter()
            .zip(&self.weights)
            .map(|(&half, &w)| {
                let h = unit_open(finish(hash_mul(key, half)));
                (cost_of(h, w), node_half(half))
            })
            .collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        all.into_iter().map(|(_, id)| NodeId(id)).collect()
    }
}

/// The smallest unfinished hash ([`hash_mul`]) a node of weight at most `w_max` can have and
/// still have `1 - h < bound * w`, rounded down to a multiple of 2^32 so that the comparison
/// only involves the top 32 bits, which [`finish`] leaves alone. Passing this test is necessary
/// (`-ln(h) >= 1 - h`), not sufficient: the tighter test follows.
#[inline]
fn coarse_floor(bound: f64, w_max: f64) -> u64 {
    // With d = (!x) >> 12 = 2^52 - 1 - (x >> 12), 2^52 (1 - h) = d + 0.5 > d; so a node with
    // d >= 2^52 * bound * w (= t, or less for a lighter node: float multiplication is
    // monotone) has 1 - h > bound * w and cannot pass. d >= ceil(t) is x >> 12 < 2^52 - ceil(t).
    let t = bound * w_max * TWO_52;
    if t >= TWO_52 || t.is_nan() {
        return 0;
    }
    // Truncating and adding one rounds up or goes one above: only ever more conservative.
    let d_min = t as u64 + 1;
    (((1u64 << 52) - d_min) << 12) & !0xffff_ffff
}

/// The k nodes of the head with the smallest `(1 - h) / w`, where to start.
///
/// Kept branch-free, since which node comes in is random: each entry is the value's bits (a
/// non-negative `f64` orders like its bits) with the head index in the low 5 bits, and an offer
/// runs through a min/max network. Clearing those 5 bits can reorder values within 2^-47 of each
/// other, which only changes where the scan starts, not its result.
struct Seeds {
    best: [u64; MAX_K],
    k: usize,
}

const SEED_INDEX_BITS: u64 = BLOCK as u64 - 1;

impl Seeds {
    fn new(k: usize) -> Self {
        Self {
            best: [u64::MAX; MAX_K],
            k,
        }
    }

    #[inline]
    fn offer(&mut self, v: f64, i: usize) {
        let mut entry = (v.to_bits() & !SEED_INDEX_BITS) | i as u64;
        for slot in &mut self.best[..self.k] {
            let lo = entry.min(*slot);
            entry = entry.max(*slot);
            *slot = lo;
        }
    }

    fn indices(&self) -> impl Iterator<Item = usize> + '_ {
        // The low bits hold an index below BLOCK.
        self.best[..self.k]
            .iter()
            .map(|&e| (e & SEED_INDEX_BITS) as usize)
    }
}

const _: () = assert!(
    BLOCK.is_power_of_two() && BLOCK <= 64,
    "head indices and masks"
);

/// The k best (cost, id) seen so far, and the pruning bound they set.
struct TopK {
    /// Sorted by [`ranks_before`]; the first `len` are valid.
    best: [(f64, u64); MAX_K],
    len: usize,
    k: usize,
    /// The k-th best cost times [`PRUNE_SLACK`] once there are k; infinite (prune nothing)
    /// before.
    bound: f64,
}

impl TopK {
    fn new(k: usize) -> Self {
        debug_assert!((1..=MAX_K).contains(&k));
        Self {
            best: [(0.0, 0); MAX_K],
            len: 0,
            k,
            bound: f64::INFINITY,
        }
    }

    /// Offers a node whose exact cost is not known yet; it is computed only if the node can
    /// enter. Returns whether the bound changed.
    #[inline]
    fn offer(&mut self, h: f64, w: f64, id: u64) -> bool {
        // -ln(h) >= 2 (1 - h) / (1 + h): much tighter than 1 - h while the bound is large.
        if 2.0 * (1.0 - h) >= self.bound * w * (1.0 + h) {
            return false;
        }
        self.insert((cost_of(h, w), id))
    }

    /// Inserts `entry` if it ranks among the k best. Returns whether the bound changed.
    #[inline]
    fn insert(&mut self, entry: (f64, u64)) -> bool {
        let k = self.k;
        if self.len == k && !ranks_before(entry, self.best[k - 1]) {
            return false;
        }
        let mut i = self.len.min(k - 1);
        while i > 0 && ranks_before(entry, self.best[i - 1]) {
            self.best[i] = self.best[i - 1];
            i -= 1;
        }
        self.best[i] = entry;
        if self.len < k {
            self.len += 1;
        }
        if self.len == k {
            self.bound = self.best[k - 1].0 * PRUNE_SLACK;
            return true;
        }
        false
    }

    fn candidates(&self) -> Candidates {
        let mut out = Candidates::EMPTY;
        for (slot, &(_, id)) in out.ids.iter_mut().zip(&self.best[..self.len]) {
            *slot = NodeId(id);
        }
        // len <= MAX_K = 8 fits in a u8.
        out.len = self.len as u8;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_open_excludes_both_ends_and_is_exact() {
        let lo = unit_open(0);
        let hi = unit_open(u64::MAX);
        assert_eq!(lo, 2f64.powi(-53));
        assert_eq!(hi, 1.0 - 2f64.powi(-53));
        assert!(lo > 0.0 && hi < 1.0);
        // The 53-bit mapping would round the top value to 1.0: the trap the 52-bit one avoids.
        let h53 = ((u64::MAX >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        assert_eq!(h53, 1.0);
    }

    #[test]
    fn ln_matches_std_within_a_few_ulps() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut worst_ulps = 0u64;
        let mut check = |v: f64| {
            let ours = ln(v);
            let std = v.ln();
            let ulps = if ours == std {
                0
            } else {
                ours.to_bits().abs_diff(std.to_bits())
            };
            worst_ulps = worst_ulps.max(ulps);
            assert!(ulps <= 2, "ln({v:e}) = {ours:e}, std {std:e}");
        };
        for _ in 0..1_000_000 {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            check(unit_open(z));
        }
        for v in [
            unit_open(0),
            unit_open(u64::MAX),
            0.5,
            1.0,
            2.0,
            1e300,
            1e-300,
            0.75,
        ] {
            check(v);
        }
        assert_eq!(ln(1.0), 0.0);
        eprintln!("ln vs f64::ln over 1M values in (0, 1): worst {worst_ulps} ulp");
    }

    #[test]
    fn pair_hash_is_xxh3_of_the_16_bytes() {
        let mut x = 1u64;
        let mut pairs = vec![(0, 0), (u64::MAX, u64::MAX), (0, u64::MAX), (1, 1 << 63)];
        for _ in 0..1_000_000 {
            x = x
                .wrapping_mul(0x5851_f42d_4c95_7f2d)
                .wrapping_add(0x1405_7b7e_f767_814f);
            let y = x.rotate_left(29).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            pairs.push((x, y));
        }
        for (key_hash, node) in pairs {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&key_hash.to_le_bytes());
            bytes[8..].copy_from_slice(&node.to_le_bytes());
            let expected = xxhash_rust::xxh3::xxh3_64(&bytes);
            assert_eq!(
                pair_hash(key_hash, node),
                expected,
                "{key_hash:#x} {node:#x}"
            );
            // The pruning test reads the top 32 bits before `finish`.
            let hm = hash_mul(KeyHalf::new(key_hash), node_half(node));
            assert_eq!(hm >> 32, expected >> 32);
        }
    }

    #[test]
    fn coarse_floor_never_rejects_what_the_exact_test_accepts() {
        let mut x = 7u64;
        for _ in 0..1_000_000 {
            x = x
                .wrapping_mul(0x5851_f42d_4c95_7f2d)
                .wrapping_add(0x1405_7b7e_f767_814f);
            let bound = (x >> 40) as f64 * 1e-8;
            let w = ((x >> 20) & 0xfff) as f64 * 0.01 + 0.01;
            let hm = x.rotate_left(17);
            let exact_pass = 1.0 - unit_open(finish(hm)) < bound * w;
            if exact_pass {
                assert!(hm >= coarse_floor(bound, w) && hm >= coarse_floor(bound, w * 2.0));
            }
        }
        assert_eq!(coarse_floor(f64::INFINITY, 1.0), 0);
    }

    #[test]
    fn xxh3_is_the_specified_function() {
        // The XXH3-64 of the empty input with seed 0, from the xxHash specification's test
        // vectors: if the crate ever computed something else, every key would move.
        assert_eq!(xxhash_rust::xxh3::xxh3_64(b""), 0x2d06_8005_38d3_94c2);
    }

    #[test]
    fn top_k_keeps_the_k_best_in_order() {
        let mut top = TopK::new(3);
        for (c, id) in [(5.0, 1), (3.0, 2), (4.0, 3), (3.0, 1), (9.0, 9), (1.0, 7)] {
            top.insert((c, id));
        }
        assert_eq!(&top.best[..top.len], &[(1.0, 7), (3.0, 1), (3.0, 2)]);
        assert_eq!(top.bound, 3.0 * PRUNE_SLACK);
    }
}
