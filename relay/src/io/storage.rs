//! Where a shard's chat records go: the [`Storage`] contract between the shard's turn
//! ([`super::chat_io::ChatCore`]) and a durable log. Two providers:
//!
//! - [`LogStorage`]: the segment log ([`Log`]) with its fdatasync on the shard's sync thread
//!   ([`Syncer`], pipelined) or inline. What the relay runs.
//! - [`MemStorage`]: records in memory with the real log's deletion rule, a crash model and
//!   seeded faults (slow fsync, failed fsync, a torn tail). What the simulation runs
//!   (`io::sim`).
//!
//! The contract: records are appended to the batch being formed; `start_commit` hands the
//! batch to the disk, at most one at a time; `poll_commit` reports, once, that the batch in
//! flight is durable (or that the storage failed: then it is poisoned and the shard stops).
//! `mark_dead` is a hint that a record is no longer needed; only a prefix of whole dead
//! segments is ever deleted, by `compact`.

use super::syncer::Syncer;
use crate::chat::log::{Log, Lsn, SyncJob};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::io;
use std::rc::Rc;
use std::time::Instant;

/// A commit that became durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// Microseconds the sync itself took.
    pub sync_us: u64,
    /// Microseconds from `start_commit` to this report: what durability added to "sent".
    pub held_us: u64,
}

/// See the module documentation.
pub trait Storage {
    /// Appends a record to the batch being formed.
    fn append(&mut self, kind: u8, payload: &[u8]) -> io::Result<Lsn>;
    /// Starts making everything appended durable, at `now_us` (monotonic). Never while a
    /// commit is in flight.
    fn start_commit(&mut self, now_us: u64) -> io::Result<()>;
    /// The commit in flight, if it has become durable by `now_us`; reported once. An error
    /// means the storage failed and is poisoned.
    fn poll_commit(&mut self, now_us: u64) -> io::Result<Option<Committed>>;
    /// `lsn` is no longer needed.
    fn mark_dead(&mut self, lsn: Lsn);
    /// Deletes what the dead marks allow (a few segments per call).
    fn compact(&mut self) -> io::Result<()>;
    /// Whether `compact` has work left.
    fn compact_pending(&self) -> bool;
    /// Segments held now.
    fn n_segments(&self) -> usize;
    /// Segments created since open.
    fn n_segments_created(&self) -> u64;
    /// The first Lsn of every segment held, oldest first.
    fn segment_starts(&self) -> Vec<u64>;
    /// Bytes held.
    fn disk_bytes(&self) -> u64;
}

/// The relay's storage: see the module documentation.
pub struct LogStorage {
    log: Log,
    /// The sync thread, when `[chat] sync_thread`.
    syncer: Option<Syncer>,
    /// A job to run inline at the next `poll_commit` (no sync thread, or nothing to sync).
    inline: Option<SyncJob>,
    /// When the job on the sync thread was handed to it (monotonic us).
    submitted_us: u64,
}

impl LogStorage {
    /// Wraps `log`; its fdatasyncs run on `syncer` when given, else inline.
    pub fn new(log: Log, syncer: Option<Syncer>) -> Self {
        Self {
            log,
            syncer,
            inline: None,
            submitted_us: 0,
        }
    }
}

impl Storage for LogStorage {
    fn append(&mut self, kind: u8, payload: &[u8]) -> io::Result<Lsn> {
        self.log.append(kind, payload)
    }

    fn start_commit(&mut self, now_us: u64) -> io::Result<()> {
        let Some(job) = self.log.start_commit()? else {
            return Ok(());
        };
        match &self.syncer {
            Some(s) if job.needs_sync() => {
                self.submitted_us = now_us;
                s.submit(job)
            }
            _ => {
                self.inline = Some(job);
                Ok(())
            }
        }
    }

    fn poll_commit(&mut self, now_us: u64) -> io::Result<Option<Committed>> {
        let (job, result, sync_us, held_us) = if let Some(job) = self.inline.take() {
            // Inline, the batch is held exactly as long as its sync.
            let started = Instant::now();
            let result = job.run();
            let us = started.elapsed().as_micros() as u64;
            (job, result, us, us)
        } else {
            match self.syncer.as_ref().map(Syncer::try_finished).transpose()? {
                Some(Some((job, result, us))) => {
                    (job, result, us, now_us.saturating_sub(self.submitted_us))
                }
                _ => return Ok(None),
            }
        };
        self.log.finish_commit(&job, result)?;
        Ok(Some(Committed { sync_us, held_us }))
    }

    fn mark_dead(&mut self, lsn: Lsn) {
        self.log.mark_dead(lsn);
    }

    fn compact(&mut self) -> io::Result<()> {
        self.log.compact().map(drop)
    }

    fn compact_pending(&self) -> bool {
        self.log.compact_pending()
    }

    fn n_segments(&self) -> usize {
        self.log.n_segments()
    }

    fn n_segments_created(&self) -> u64 {
        self.log.stats().n_segments_created
    }

    fn segment_starts(&self) -> Vec<u64> {
        self.log.segment_starts()
    }

    fn disk_bytes(&self) -> u64 {
        self.log.disk_bytes()
    }
}

/// What survives a crash of a [`MemStorage`]: the durable records, lsn -> (kind, payload),
/// and where the deleted prefix ends. Shared between the storage and the simulation that
/// crashes it.
#[derive(Debug, Default)]
pub struct MemDisk {
    /// Durable records not deleted.
    pub records: BTreeMap<u64, (u8, Vec<u8>)>,
    /// Every Lsn below this was deleted (whole segments).
    pub deleted_below: u64,
    /// Appended Lsns at most this one were ever made durable (so the next open continues after it).
    pub high_lsn: u64,
}

/// A shared [`MemDisk`].
pub type SharedDisk = Rc<RefCell<MemDisk>>;

/// A small deterministic generator (xorshift64*) that picks seeded faults: the same seed, the
/// same faults. [`MemStorage`] draws from one, and so does the simulation (`io::sim`).
#[derive(Clone, Debug)]
pub struct FaultRng(u64);

impl FaultRng {
    /// A generator for `seed` (any value; zero is mapped away, xorshift must not hold it).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `per_64k` / 65,536.
    pub fn chance(&mut self, per_64k: u32) -> bool {
        self.next_u64() % 65_536 < u64::from(per_64k)
    }
}

/// Seeded faults of a [`MemStorage`].
#[derive(Clone, Copy, Debug, Default)]
pub struct StorageFaults {
    /// A commit becomes durable after up to this many polls (a slow fsync).
    pub max_sync_polls: u32,
    /// Chance in 1/65,536 that a commit fails (an fsync error: the storage is poisoned).
    pub fail_per_64k: u32,
}

/// In-memory storage: see the module documentation. Segments hold `segment_records` Lsns
/// each; as in the real log, only a prefix of whole segments that are dead and durable is
/// deleted, and dead marks live in memory only (a restart re-derives them by replay).
pub struct MemStorage {
    disk: SharedDisk,
    segment_records: u64,
    next_lsn: u64,
    /// Appended, not yet handed to a commit.
    forming: Vec<(u64, u8, Vec<u8>)>,
    /// The batch in flight and the polls left before it is durable.
    flying: Vec<(u64, u8, Vec<u8>)>,
    polls_left: Option<u32>,
    dead: HashSet<u64>,
    poisoned: bool,
    faults: StorageFaults,
    rng: FaultRng,
    created: u64,
}

impl MemStorage {
    /// Opens `disk` as it survived the last crash: returns the storage and the records to
    /// replay, in Lsn order.
    pub fn open(
        disk: SharedDisk,
        segment_records: u64,
        faults: StorageFaults,
        seed: u64,
    ) -> (Self, Vec<(u64, u8, Vec<u8>)>) {
        let (records, next_lsn) = {
            let d = disk.borrow();
            let records: Vec<_> = d
                .records
                .iter()
                .map(|(&l, (k, p))| (l, *k, p.clone()))
                .collect();
            (records, (d.high_lsn + 1).max(d.deleted_below).max(1))
        };
        let s = Self {
            disk,
            segment_records: segment_records.max(1),
            next_lsn,
            forming: Vec::new(),
            flying: Vec::new(),
            polls_left: None,
            dead: HashSet::new(),
            poisoned: false,
            faults,
            rng: FaultRng::new(seed),
            created: 0,
        };
        (s, records)
    }

    /// Changes the faults from now on.
    pub fn set_faults(&mut self, faults: StorageFaults) {
        self.faults = faults;
    }

    /// A crash: what was appended and not yet durable is lost, except a prefix of the batch in
    /// flight, of a length the seed picks (written before the power went, not yet reported).
    pub fn crash(mut self) {
        let n = self.flying.len();
        let keep = if n == 0 {
            0
        } else {
            self.rng.below(n as u64 + 1) as usize
        };
        let mut d = self.disk.borrow_mut();
        for (lsn, kind, payload) in self.flying.drain(..keep) {
            d.high_lsn = d.high_lsn.max(lsn);
            d.records.insert(lsn, (kind, payload));
        }
    }

    fn check_usable(&self) -> io::Result<()> {
        match self.poisoned {
            true => Err(io::Error::other("storage poisoned by a failed sync")),
            false => Ok(()),
        }
    }

    fn segment_of(&self, lsn: u64) -> u64 {
        (lsn - 1) / self.segment_records
    }
}

impl Storage for MemStorage {
    fn append(&mut self, kind: u8, payload: &[u8]) -> io::Result<Lsn> {
        self.check_usable()?;
        let lsn = self.next_lsn;
        if lsn > 1 && self.segment_of(lsn) != self.segment_of(lsn - 1) {
            self.created += 1;
        }
        self.next_lsn += 1;
        self.forming.push((lsn, kind, payload.to_vec()));
        Ok(Lsn(lsn))
    }

    fn start_commit(&mut self, _now_us: u64) -> io::Result<()> {
        self.check_usable()?;
        if self.polls_left.is_some() {
            return Err(io::Error::other("a commit is already in flight"));
        }
        if self.forming.is_empty() {
            return Ok(());
        }
        self.flying.append(&mut self.forming);
        let max = u64::from(self.faults.max_sync_polls);
        self.polls_left = Some(self.rng.below(max + 1) as u32);
        Ok(())
    }

    fn poll_commit(&mut self, _now_us: u64) -> io::Result<Option<Committed>> {
        self.check_usable()?;
        match self.polls_left {
            None => Ok(None),
            Some(n) if n > 0 => {
                self.polls_left = Some(n - 1);
                Ok(None)
            }
            Some(_) => {
                self.polls_left = None;
                if self.rng.chance(self.faults.fail_per_64k) {
                    // fsyncgate: what the failed sync covered may or may not be on disk. The
                    // batch stays in flight for `crash` to tear.
                    self.poisoned = true;
                    return Err(io::Error::other("injected fsync failure"));
                }
                let mut d = self.disk.borrow_mut();
                for (lsn, kind, payload) in self.flying.drain(..) {
                    d.high_lsn = d.high_lsn.max(lsn);
                    d.records.insert(lsn, (kind, payload));
                }
                Ok(Some(Committed::default()))
            }
        }
    }

    fn mark_dead(&mut self, lsn: Lsn) {
        if lsn.0 < self.next_lsn {
            self.dead.insert(lsn.0);
        }
    }

    fn compact(&mut self) -> io::Result<()> {
        self.check_usable()?;
        // Whole segments from the front, never the one being written, each only when every
        // one of its Lsns is durable and dead.
        let mut d = self.disk.borrow_mut();
        loop {
            let start = d.deleted_below.max(1);
            let seg = self.segment_of(start);
            let end = (seg + 1) * self.segment_records + 1;
            if end > self.next_lsn || end - 1 > d.high_lsn {
                break;
            }
            if !(start..end).all(|l| self.dead.contains(&l)) {
                break;
            }
            for l in start..end {
                d.records.remove(&l);
                self.dead.remove(&l);
            }
            d.deleted_below = end;
        }
        Ok(())
    }

    /// `compact` deletes all it may at once: nothing is ever left pending.
    fn compact_pending(&self) -> bool {
        false
    }

    fn n_segments(&self) -> usize {
        let first = self.segment_of(self.disk.borrow().deleted_below.max(1));
        (self.segment_of(self.next_lsn.max(2) - 1).max(first) - first + 1) as usize
    }

    fn n_segments_created(&self) -> u64 {
        self.created
    }

    fn segment_starts(&self) -> Vec<u64> {
        let first = self.segment_of(self.disk.borrow().deleted_below.max(1));
        let last = self.segment_of(self.next_lsn.max(2) - 1).max(first);
        (first..=last)
            .map(|s| s * self.segment_records + 1)
            .collect()
    }

    fn disk_bytes(&self) -> u64 {
        self.disk
            .borrow()
            .records
            .values()
            .map(|(_, p)| p.len() as u64 + 16)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk() -> SharedDisk {
        Rc::new(RefCell::new(MemDisk::default()))
    }

    #[test]
    fn only_whole_dead_durable_segments_are_deleted_from_the_front() {
        let d = disk();
        let (mut s, recs) = MemStorage::open(d.clone(), 2, StorageFaults::default(), 1);
        assert!(recs.is_empty());
        for i in 0..5u8 {
            s.append(1, &[i]).unwrap();
        }
        s.start_commit(0).unwrap();
        assert_eq!(s.poll_commit(0).unwrap(), Some(Committed::default()));
        assert_eq!(s.segment_starts(), vec![1, 3, 5]);
        // Lsn 2 dead, 1 not: nothing goes.
        s.mark_dead(Lsn(2));
        s.compact().unwrap();
        assert_eq!(d.borrow().records.len(), 5);
        // 1 and 2 dead: the first segment goes; 3 dead alone keeps the second.
        s.mark_dead(Lsn(1));
        s.mark_dead(Lsn(3));
        s.compact().unwrap();
        assert_eq!(
            d.borrow().records.keys().copied().collect::<Vec<_>>(),
            [3, 4, 5]
        );
        assert_eq!(s.segment_starts(), vec![3, 5]);
        // The segment being written is never deleted.
        s.mark_dead(Lsn(4));
        s.mark_dead(Lsn(5));
        s.compact().unwrap();
        assert_eq!(d.borrow().records.keys().copied().collect::<Vec<_>>(), [5]);
    }

    #[test]
    fn a_crash_keeps_what_was_durable_and_at_most_a_prefix_of_the_batch_in_flight() {
        for seed in 1..50 {
            let d = disk();
            let faults = StorageFaults {
                max_sync_polls: 3,
                fail_per_64k: 0,
            };
            let (mut s, _) = MemStorage::open(d.clone(), 4, faults, seed);
            s.append(1, b"a").unwrap();
            s.start_commit(0).unwrap();
            while s.poll_commit(0).unwrap().is_none() {}
            for i in 0..6u8 {
                s.append(1, &[i]).unwrap();
            }
            s.start_commit(0).unwrap();
            s.append(1, b"never").unwrap();
            s.crash();
            let kept: Vec<u64> = d.borrow().records.keys().copied().collect();
            assert_eq!(kept[0], 1);
            assert!(
                kept.windows(2).all(|w| w[1] == w[0] + 1),
                "a prefix: {kept:?}"
            );
            assert!(kept.len() <= 7);
            let (s, recs) = MemStorage::open(d.clone(), 4, faults, seed);
            assert_eq!(recs.len(), kept.len());
            assert_eq!(s.next_lsn, *kept.last().unwrap() + 1);
        }
    }

    #[test]
    fn a_failed_sync_poisons_the_storage() {
        let faults = StorageFaults {
            max_sync_polls: 0,
            fail_per_64k: 65_536,
        };
        let (mut s, _) = MemStorage::open(disk(), 4, faults, 7);
        s.append(1, b"a").unwrap();
        s.start_commit(0).unwrap();
        assert!(s.poll_commit(0).is_err());
        assert!(s.append(1, b"b").is_err());
    }
}
