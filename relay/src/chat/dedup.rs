//! The owner's memory of recently accepted requests: (sender, msg id) -> (chat, seq), for the
//! last `capacity` requests exactly, so that a retry is answered with its original SENT.
//!
//! Nearly every lookup is for a new id and misses, so a miss must be cheap: in a general hash
//! map of a million entries it costs a cache miss for the control bytes, the insert that
//! follows another for the bucket, and the eviction of the oldest entry two more (the profile
//! of `chatperf run` showed 13-16 % of the relay's CPU there). Here:
//!
//! - The entries live in a ring in insertion order: writing one is sequential, and the entry
//!   `capacity` inserts old is overwritten, which is the eviction.
//! - An index of 128-byte buckets (two cache lines, which the adjacent-line prefetcher loads
//!   together) holds 16 slots of (32-bit hash tag, 32-bit insertion number). A slot whose
//!   insertion number is `capacity` or more behind is stale, so evicted entries need no index
//!   update. A lookup reads one bucket and touches the ring only on a tag match, to compare
//!   the full key; an insert writes into the same bucket.
//! - The index grows (rebuilt from the ring) to keep at most 4 live entries per bucket on
//!   average; a bucket whose 16 slots are all live when a key is inserted gives up its oldest
//!   slot, which forgets that entry early and is counted in [`Dedup::early_evictions`]: 6 in
//!   3,145,728 inserts (1.9 in 10^6) at the default capacity of 2^20, by the test
//!   `early_evictions_at_the_default_capacity_are_rare`.
//! - Growing is incremental: the doubled index takes new inserts at once, the previous one
//!   stays readable, and every insert moves `MIGRATE_PER_INSERT` (4) older entries across until
//!   none is left (a lookup meanwhile reads both). Re-placing all 2^19 entries of the last
//!   doubling at once took 54-56 ms on this machine: a stall of the shard, its media
//!   included. The doubled index itself is zeroed two buckets per insert over the inserts
//!   before it is needed. The slowest insert left, 1.3-1.4 ms, frees the old index at the end
//!   of the last migration (`benches/src/bin/dedup_growth.rs` times them).

use crate::chat::msg::{ChatId, Seq, UserId};
use foldhash::fast::SeedableRandomState;
use proto::chat::MsgId;
use std::hash::BuildHasher;

const SLOTS: usize = 16;
/// Entries moved from the previous index per insert while growing.
const MIGRATE_PER_INSERT: u64 = 4;
/// Average live entries per bucket at most, before the index doubles.
const LOAD: usize = 4;

/// One index bucket: 16 slots, each `tag << 32 | stamp`, see [`Dedup::stamp`].
#[derive(Clone, Copy, Default)]
#[repr(C, align(128))]
struct Bucket([u64; SLOTS]);

#[derive(Clone, Copy)]
struct Entry {
    sender: UserId,
    msg_id: MsgId,
    chat: ChatId,
    seq: Seq,
}

/// The previous index during a growth, and the inserts `next..until` not yet placed in the
/// new one.
struct Migration {
    index: Vec<Bucket>,
    next: u64,
    until: u64,
}

/// Starts loading the bucket of hash `h` in `index` into the cache.
fn prefetch_bucket(index: &[Bucket], h: u64) {
    let bucket = &index[(h as usize) & (index.len() - 1)];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: SSE is part of the x86-64 baseline, and a prefetch only hints the cache (it
        // never faults, and `bucket` is a live reference anyway).
        unsafe { _mm_prefetch::<_MM_HINT_T0>((bucket as *const Bucket).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bucket;
}

/// See the module documentation.
pub struct Dedup {
    capacity: u64,
    /// Entry `n` (the n-th insert, from 0) is at `n % capacity`.
    ring: Vec<Entry>,
    index: Vec<Bucket>,
    /// While growing: the previous index and the inserts still to move from it.
    growing: Option<Migration>,
    /// The next, doubled index, zeroed a little per insert ahead of the growth that needs it.
    next_index: Vec<Bucket>,
    /// Inserts so far: the number of the next one.
    inserted: u64,
    /// Seeded per instance at random: the ids are chosen by clients.
    hasher: SeedableRandomState,
    early_evictions: u64,
    /// Index slots written so far (the index's work: one per insert, plus migrations).
    n_placed: u64,
}

impl Dedup {
    /// Remembers the last `capacity` (at least 1, less than 2^31) inserts.
    pub fn new(capacity: usize) -> Self {
        Self::with_hasher(capacity, SeedableRandomState::random())
    }

    fn with_hasher(capacity: usize, hasher: SeedableRandomState) -> Self {
        Self {
            capacity: capacity.clamp(1, (1 << 31) - 1) as u64,
            ring: Vec::new(),
            index: vec![Bucket::default(); 64],
            growing: None,
            next_index: Vec::new(),
            inserted: 0,
            hasher,
            early_evictions: 0,
            n_placed: 0,
        }
    }

    fn hash(&self, sender: UserId, msg_id: &MsgId) -> u64 {
        self.hasher.hash_one((sender, msg_id))
    }

    /// The 32-bit stamp of insert `n`: offset so that a zeroed (never used) slot reads as
    /// older than `capacity` until 2^32 inserts have passed (and then the full key compare
    /// against the ring still rejects it).
    fn stamp(&self, n: u64) -> u32 {
        (n + self.capacity + 1) as u32
    }

    /// How many inserts ago a slot's entry was made (1 for the newest); it is live, and its
    /// entry still in the ring, when this is at most `capacity`.
    fn age(&self, slot: u64) -> u64 {
        u64::from(self.stamp(self.inserted).wrapping_sub(slot as u32))
    }

    fn is_live(&self, age: u64) -> bool {
        (1..=self.capacity).contains(&age)
    }

    /// What `(sender, msg_id)` was given, if it is among the last `capacity` inserts.
    pub fn get(&self, sender: UserId, msg_id: &MsgId) -> Option<(ChatId, Seq)> {
        let h = self.hash(sender, msg_id);
        self.find(&self.index, h, sender, msg_id).or_else(|| {
            let old = &self.growing.as_ref()?.index;
            self.find(old, h, sender, msg_id)
        })
    }

    /// The entry of `(sender, msg_id)` (hash `h`) through `index`.
    fn find(
        &self,
        index: &[Bucket],
        h: u64,
        sender: UserId,
        msg_id: &MsgId,
    ) -> Option<(ChatId, Seq)> {
        let tag = h >> 32;
        let bucket = &index[(h as usize) & (index.len() - 1)];
        for &slot in &bucket.0 {
            if slot >> 32 != tag {
                continue;
            }
            let age = self.age(slot);
            if self.is_live(age) {
                let n = self.inserted - age;
                let e = &self.ring[(n % self.capacity) as usize];
                if e.sender == sender && e.msg_id == *msg_id {
                    return Some((e.chat, e.seq));
                }
            }
        }
        None
    }

    /// Starts loading the bucket of `(sender, msg_id)` into the cache, so that a [`Dedup::get`]
    /// a little later does not wait for memory.
    pub fn prefetch(&self, sender: UserId, msg_id: &MsgId) {
        let h = self.hash(sender, msg_id);
        prefetch_bucket(&self.index, h);
        // While growing a new id misses in the new index and is looked up in the old one too.
        if let Some(m) = &self.growing {
            prefetch_bucket(&m.index, h);
        }
    }

    /// Remembers that `(sender, msg_id)` was given `(chat, seq)`; the entry `capacity` inserts
    /// old is forgotten. The caller has checked with [`Dedup::get`] that it is new.
    pub fn insert(&mut self, sender: UserId, msg_id: MsgId, chat: ChatId, seq: Seq) {
        let n = self.inserted;
        let entry = Entry {
            sender,
            msg_id,
            chat,
            seq,
        };
        let at = (n % self.capacity) as usize;
        if at == self.ring.len() {
            self.ring.push(entry);
        } else {
            self.ring[at] = entry;
        }
        self.inserted += 1;
        let live = self.inserted.min(self.capacity) as usize;
        if live > self.index.len() * LOAD {
            self.start_growing(n);
        } else {
            self.prepare_next_index(live);
        }
        let h = self.hash(sender, &msg_id);
        self.place(h, n);
        self.migrate(MIGRATE_PER_INSERT);
    }

    /// From half-way to the next growth (which a growth leaves the index at), if the index
    /// can still grow, zeroes the next index two buckets per insert: its `2 * len` buckets are
    /// done after `len` inserts, well before the growth `len * LOAD / 2` inserts later.
    fn prepare_next_index(&mut self, live: usize) {
        let len = self.index.len();
        let can_grow = (len * LOAD) < self.capacity as usize;
        if !can_grow || live <= len * LOAD / 2 || self.next_index.len() >= 2 * len {
            return;
        }
        if self.next_index.capacity() < 2 * len {
            self.next_index = Vec::with_capacity(2 * len);
        }
        let to = (self.next_index.len() + 2).min(2 * len);
        self.next_index.resize(to, Bucket::default());
    }

    /// Doubles the index; inserts before `n` move across over the next inserts.
    fn start_growing(&mut self, n: u64) {
        // Rare (a growth takes 4x more inserts than its migration): finish the last one first.
        self.migrate(u64::MAX);
        let len = self.index.len() * 2;
        let mut bigger = std::mem::take(&mut self.next_index);
        // Complete by now (see `prepare_next_index`): `resize` only fills in what is missing.
        bigger.resize(len, Bucket::default());
        let old = std::mem::replace(&mut self.index, bigger);
        self.growing = Some(Migration {
            index: old,
            next: n.saturating_sub(self.capacity),
            until: n,
        });
    }

    /// Moves up to `budget` of the previous index's inserts into the current one (those no
    /// longer live are skipped and cost nothing but the check).
    fn migrate(&mut self, budget: u64) {
        let Some(m) = &mut self.growing else {
            return;
        };
        let first_live = self.inserted.saturating_sub(self.capacity);
        let from = m.next.max(first_live);
        let to = m.until.min(from.saturating_add(budget));
        m.next = to;
        let done = to >= m.until;
        for n in from..to {
            let e = self.ring[(n % self.capacity) as usize];
            let h = self.hash(e.sender, &e.msg_id);
            self.place(h, n);
        }
        if done {
            self.growing = None;
        }
    }

    /// Puts insert `n` (hash `h`) into its bucket: into a stale slot, else over the oldest.
    fn place(&mut self, h: u64, n: u64) {
        self.n_placed += 1;
        let i = (h as usize) & (self.index.len() - 1);
        let mut victim = 0;
        let mut victim_age = 0;
        for (k, &slot) in self.index[i].0.iter().enumerate() {
            let age = self.age(slot);
            if !self.is_live(age) {
                victim = k;
                victim_age = u64::MAX;
                break;
            }
            if age > victim_age {
                victim = k;
                victim_age = age;
            }
        }
        if victim_age != u64::MAX {
            self.early_evictions += 1;
        }
        self.index[i].0[victim] = (h >> 32) << 32 | u64::from(self.stamp(n));
    }

    /// Entries forgotten before `capacity` newer inserts because their bucket was full.
    pub fn early_evictions(&self) -> u64 {
        self.early_evictions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn id(i: u64) -> MsgId {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
        id
    }

    #[test]
    fn remembers_exactly_the_last_capacity_inserts() {
        for capacity in [1usize, 7, 100, 5_000] {
            // A fixed seed: which keys share a bucket, and so any early eviction, is the
            // same on every run.
            let mut d = Dedup::with_hasher(capacity, SeedableRandomState::fixed());
            let mut model: VecDeque<u64> = VecDeque::new();
            let n = capacity as u64 * 5 + 17;
            for i in 0..n {
                let sender = UserId(i % 13);
                assert_eq!(d.get(sender, &id(i)), None, "{i} is new");
                d.insert(sender, id(i), ChatId(i * 3), Seq(i + 1));
                model.push_back(i);
                if model.len() > capacity {
                    model.pop_front();
                }
                // Spot checks every step, a full sweep now and then.
                let probe = [model[0], *model.back().unwrap(), model[model.len() / 2]];
                for j in probe {
                    assert_eq!(
                        d.get(UserId(j % 13), &id(j)),
                        Some((ChatId(j * 3), Seq(j + 1))),
                        "{j} after {i}"
                    );
                }
                if i % 997 == 0 || i + 1 == n {
                    for j in 0..=i {
                        let want = model.contains(&j).then_some((ChatId(j * 3), Seq(j + 1)));
                        assert_eq!(
                            d.get(UserId(j % 13), &id(j)),
                            want,
                            "{j} after {i}, cap {capacity}"
                        );
                    }
                }
            }
            // Same id, other sender: another request.
            let last = n - 1;
            assert_eq!(d.get(UserId(last % 13 + 1), &id(last)), None);
            assert_eq!(d.early_evictions(), 0, "capacity {capacity}");
        }
    }

    #[test]
    fn early_evictions_at_the_default_capacity_are_rare() {
        // The relay's capacity, filled three times over: the index reaches its full size
        // (3.5-4 live entries per bucket on average) and stays there.
        let capacity = 1 << 20;
        let mut d = Dedup::with_hasher(capacity, SeedableRandomState::fixed());
        let n = 3 * capacity as u64;
        for i in 0..n {
            d.insert(UserId(i % 1000), id(i), ChatId(1), Seq(i));
        }
        let rate = d.early_evictions() as f64 / n as f64;
        println!(
            "{} early evictions in {n} inserts at capacity {capacity}: {rate:.2e} per insert",
            d.early_evictions()
        );
        assert!(rate < 1e-5, "{rate:.2e} per insert");
        assert_eq!(
            d.get(UserId((n - 1) % 1000), &id(n - 1)),
            Some((ChatId(1), Seq(n - 1)))
        );
    }

    #[test]
    fn growing_moves_a_few_entries_per_insert_and_loses_none() {
        // Up to the relay's capacity, through every doubling of the index: no insert places
        // more than itself and MIGRATE_PER_INSERT others (re-placing everything at once, as
        // growth used to, placed 2^19 entries in one insert and stalled the shard 40 ms), and
        // every live entry stays findable while the two indexes coexist.
        let capacity = 1 << 20;
        let mut d = Dedup::with_hasher(capacity, SeedableRandomState::fixed());
        let mut worst = 0;
        let mut growths = 0;
        for i in 0..capacity as u64 {
            let before = d.n_placed;
            let was_growing = d.growing.is_some();
            d.insert(UserId(i % 1000), id(i), ChatId(1), Seq(i));
            worst = worst.max(d.n_placed - before);
            growths += u64::from(!was_growing && d.growing.is_some());
            if d.growing.is_some() && i % 4099 == 0 {
                for j in (0..=i).step_by(37) {
                    assert_eq!(
                        d.get(UserId(j % 1000), &id(j)),
                        Some((ChatId(1), Seq(j))),
                        "{j} after {i}"
                    );
                }
            }
        }
        assert_eq!(growths, 12, "64 buckets doubled up to 2^18");
        assert!(
            worst <= 1 + MIGRATE_PER_INSERT,
            "{worst} placements in one insert"
        );
        assert_eq!(d.early_evictions(), 0);
    }

    #[test]
    fn a_full_bucket_gives_up_its_oldest_entry_and_counts_it() {
        let mut d = Dedup::new(1000);
        // Find 17 keys that share a bucket of the initial index (64 buckets).
        let mask = d.index.len() as u64 - 1;
        let want = d.hash(UserId(1), &id(0)) & mask;
        let same: Vec<u64> = (0..)
            .filter(|&i| d.hash(UserId(1), &id(i)) & mask == want)
            .take(SLOTS + 1)
            .collect();
        for &i in &same {
            d.insert(UserId(1), id(i), ChatId(0), Seq(i));
        }
        assert_eq!(d.early_evictions(), 1);
        assert_eq!(d.get(UserId(1), &id(same[0])), None, "the oldest gave way");
        for &i in &same[1..] {
            assert_eq!(d.get(UserId(1), &id(i)), Some((ChatId(0), Seq(i))));
        }
    }
}
