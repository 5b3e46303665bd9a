//! The per-shard durable log: append-only segment files, a CRC per record and group commit.
//!
//! This is the storage layer only. The chat engine appends its records (messages, tombstones,
//! acknowledgements) through [`Log::append`], makes a whole loop turn durable with one
//! [`Log::commit`], declares records dead with [`Log::mark_dead`] once they are acknowledged or
//! superseded, and calls [`Log::compact`] to delete segments that hold nothing live any more.
//!
//! # Log sequence numbers
//!
//! An [`Lsn`] is a global record number: the first record ever appended gets `Lsn(1)`, each
//! append gets the next number, and numbering continues across reopen and across compaction
//! (a segment file is named by the Lsn of its first record, so the newest file name always
//! carries the numbering forward, even when every record has been deleted). `Lsn(0)` is never
//! assigned, so callers may use it as "none". A record's Lsn is not stored in its frame; it is
//! implied by the segment's first Lsn and the record's position, and it is mixed into the CRC so
//! that a record read at the wrong position fails its check.
//!
//! # On-disk format
//!
//! One directory per shard holding segment files named `{first_lsn:020}.seg`, so that ordering
//! by name is ordering by Lsn. Other files in the directory are ignored. Integers are little
//! endian.
//!
//! ```text
//! segment header (32 bytes):
//!   0  magic      8 bytes  "RELAYLOG"
//!   8  version    u32      2 (1: written by earlier builds, salt 0)
//!  12  first_lsn  u64      must equal the number in the file name
//!  20  salt       u64      random, nonzero, per segment file (0 in version 1)
//!  28  crc        u32      CRC-32C of bytes 0..28
//! record (9-byte header, then the payload):
//!   0  crc        u32      CRC-32C of salt (u64; left out when 0) ++ lsn (u64) ++ len (u32)
//!                          ++ kind (u8) ++ payload
//!   4  len        u32      payload length in bytes
//!   8  kind       u8       the caller's record type
//!   9  payload    len bytes
//! ```
//!
//! A dead segment that compaction removes is renamed to `recycled.spare` instead of deleted
//! when no spare exists and it is full-size; the next roll makes that rename durable, rewrites
//! the header (with a new salt), syncs it, and renames the file to the new segment's name.
//! Appends then overwrite allocated, written blocks, so an fdatasync flushes data without an
//! ext4 journal commit. The old bytes behind the new records are the newest segment's torn
//! tail: an old record, or a record frame planted in an old message body, fails its CRC, which
//! covers the new salt and the Lsn. A roll cuts the file back to its last record first, so no
//! older segment has bytes after its records. Disk use beyond `disk_bytes`: the spare (one
//! segment) and the stale tail of the active segment when it was recycled (at most one more);
//! until then, acknowledged content stays readable in those bytes.
//!
//! Records never straddle segments. A segment is rolled (a new file started) at the first
//! append after the commit that made the active segment reach `segment_bytes`, so a roll
//! normally costs no extra fdatasync; a caller that appends more than `2 * segment_bytes`
//! without committing gets a forced roll, which syncs the old segment first.
//!
//! # Durability and recovery rules
//!
//! - `commit` writes everything buffered with one `pwrite` per segment touched and then issues
//!   one fdatasync ([`SyncMode::Data`]) covering all of it; the directory is fsynced after a
//!   segment file is created or deleted.
//! - **Write-order invariant:** a segment file is created only after every older segment is
//!   durable and complete. Hence after any crash only the *newest* segment can have a torn
//!   tail, and a defect anywhere else is corruption.
//! - On open, in the newest segment, the first record that is short or fails its CRC (a partial
//!   write, a zero-filled preallocated tail, garbage) and everything after it is a torn tail and
//!   is truncated; a torn or empty segment header there is rewritten from the file name. Nothing
//!   committed is lost: a commit returns only after its fdatasync, so a committed record always
//!   precedes the first torn one.
//! - In any older segment, a bad header, a short or CRC-failing record, or trailing bytes, and
//!   any gap or overlap between consecutive segments' Lsn ranges, is reported as an
//!   [`io::ErrorKind::InvalidData`] error carrying a [`LogCorruption`] (never skipped).
//! - Compaction deletes only a dead *prefix* of segments, oldest first, so a crash part-way
//!   through leaves a contiguous suffix that recovers normally. A missing prefix is expected.
//! - After recovery the newest segment and the directory are synced, so records that survived
//!   a process crash only in the page cache are durable before the caller acts on them. A
//!   directory created by `open` has its parent fsynced too.
//! - After any write or sync error the log is poisoned: every later call fails, because the
//!   state of the file after a failed fdatasync is unknown. Reopen to recover.
//!
//! Exclusivity is the caller's: exactly one `Log` per directory (one shard thread owns it).

#![deny(unsafe_code)]

use super::crc32c::crc32c_update;
use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The fdatasync (and directory fsync) half of a pipelined commit, runnable on any thread; see
/// [`Log::start_commit`]. It shares the log's descriptors (no `dup` per commit), and holds
/// them, so segments deleted meanwhile do not matter to it.
#[derive(Debug)]
pub struct SyncJob {
    file: Option<Arc<File>>,
    dir: Option<Arc<File>>,
    upto: u64,
}

impl SyncJob {
    /// Makes the job's records durable.
    pub fn run(&self) -> io::Result<()> {
        if let Some(f) = &self.file {
            f.sync_data()?;
        }
        if let Some(d) = &self.dir {
            d.sync_all()?;
        }
        Ok(())
    }

    /// Whether running it does any I/O (false with [`SyncMode::None`], or when the data was
    /// already synced by a forced roll).
    pub fn needs_sync(&self) -> bool {
        self.file.is_some() || self.dir.is_some()
    }

    /// The highest Lsn the job covers.
    pub fn upto(&self) -> Lsn {
        Lsn(self.upto)
    }
}

/// How `commit` makes data durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// fdatasync the segment file (and fsync the directory after creating or deleting files).
    #[default]
    Data,
    /// No syncs at all: survives a process crash (the page cache keeps written data) but not a
    /// power loss. For tests and benchmarks of the non-durable path.
    None,
}

/// Tunables of a [`Log`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// Roll to a new segment once the active one has reached this size (headers included).
    pub segment_bytes: u64,
    /// The largest payload `append` accepts.
    pub max_record_bytes: u32,
    /// How `commit` makes data durable.
    pub sync: SyncMode,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 64 << 20,
            max_record_bytes: 1 << 20,
            sync: SyncMode::Data,
        }
    }
}

/// A log sequence number: the global, monotonically increasing number of a record, starting at
/// 1 and never reused for a committed record (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

/// A record as recovered by [`Log::open`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub lsn: Lsn,
    pub kind: u8,
    pub payload: Vec<u8>,
}

/// Counters since open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Records accepted by `append`.
    pub n_appended: u64,
    /// Records made durable by `commit` (written, with [`SyncMode::None`]).
    pub n_committed: u64,
    /// `commit` calls that had records to write.
    pub n_commits: u64,
    /// fdatasync calls on segment files (commit, ordering before a roll, recovery).
    pub n_syncs: u64,
    /// fsync calls on the directory.
    pub n_dir_syncs: u64,
    /// pwrite calls (record data and segment headers).
    pub n_writes: u64,
    /// Bytes written to segment files.
    pub bytes_written: u64,
    /// Times `append` wrote its buffer out because it exceeded the spill bound.
    pub n_spills: u64,
    /// Segment files created and deleted since open.
    pub n_segments_created: u64,
    pub n_segments_deleted: u64,
    /// Deleted segment files kept and reused as a new segment (the `recycled.spare` file).
    pub n_segments_recycled: u64,
    /// Records recovered by open, and bytes of torn tail it truncated.
    pub n_recovered: u64,
    pub torn_bytes_truncated: u64,
}

impl LogStats {
    /// Committed records per data fdatasync (0 if there was none).
    pub fn records_per_sync(&self) -> f64 {
        if self.n_syncs == 0 {
            0.0
        } else {
            self.n_committed as f64 / self.n_syncs as f64
        }
    }
}

/// What is wrong with the log on disk; the inner error of an `InvalidData` from [`Log::open`].
#[derive(Debug)]
pub struct LogCorruption {
    /// The segment file concerned.
    pub path: PathBuf,
    /// Byte offset of the defect inside that file (0 for whole-file problems).
    pub offset: u64,
    pub reason: String,
}

impl fmt::Display for LogCorruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "log corruption in {} at offset {}: {} (only the newest segment may have a torn \
             tail; refusing to skip committed data)",
            self.path.display(),
            self.offset,
            self.reason
        )
    }
}

impl std::error::Error for LogCorruption {}

const MAGIC: &[u8; 8] = b"RELAYLOG";
/// Segments written by this build. Version 1 (no salt: reserved bytes zero, record CRCs without
/// it) is still read, and appended to when it is the newest segment at open.
const VERSION: u32 = 2;
const SEGMENT_HEADER_LEN: u64 = 32;
const RECORD_HEADER_LEN: usize = 9;
/// `append` writes (without syncing) once this many bytes are buffered: the bound on the
/// log's memory, far above one loop turn's worth (512 records of 100 bytes are 56 KiB).
const SPILL_BYTES: usize = 4 << 20;
const SEGMENT_SUFFIX: &str = ".seg";
const SEGMENT_NAME_DIGITS: usize = 20;
/// A deleted segment kept for reuse (its blocks are allocated and written): not a segment
/// name, so recovery ignores it.
const SPARE_NAME: &str = "recycled.spare";
/// Segments one [`Log::compact`] deletes at most: each deletion costs a directory fsync on
/// the shard's thread (milliseconds on a busy disk), and a long-absent recipient's
/// acknowledgement can free hundreds at once. The rest go in later calls
/// ([`Log::compact_pending`]).
pub const MAX_DELETIONS_PER_COMPACT: usize = 4;

const _: () = assert!(SEGMENT_HEADER_LEN as usize == 8 + 4 + 8 + 8 + 4);
const _: () = assert!(RECORD_HEADER_LEN == 4 + 4 + 1);
// A u64 in decimal has at most 20 digits, so the zero-padded names sort numerically.
const _: () = assert!(u64::MAX.ilog10() + 1 == SEGMENT_NAME_DIGITS as u32);

/// One segment's bookkeeping. A segment exists on disk once `disk_bytes > 0` (the header is
/// written when the file is created); before that it only holds buffered records.
#[derive(Debug)]
struct Segment {
    first_lsn: u64,
    n_records: u64,
    n_dead: u64,
    /// One bit per record, set when dead: `mark_dead` is idempotent.
    dead: Vec<u64>,
    /// Logical size: header plus every record assigned to this segment (written or buffered).
    bytes: u64,
    /// Bytes in the file.
    disk_bytes: u64,
    /// Mixed into every record CRC of this segment (0: a version 1 segment, no salt).
    salt: u64,
}

impl Segment {
    fn new(first_lsn: u64) -> Self {
        Segment {
            first_lsn,
            n_records: 0,
            n_dead: 0,
            dead: Vec::new(),
            bytes: SEGMENT_HEADER_LEN,
            disk_bytes: 0,
            salt: fresh_salt(first_lsn),
        }
    }

    fn push_record(&mut self, frame_bytes: u64) {
        if self.n_records & 63 == 0 {
            self.dead.push(0);
        }
        self.n_records += 1;
        self.bytes += frame_bytes;
    }

    fn on_disk(&self) -> bool {
        self.disk_bytes > 0
    }

    /// Bytes assigned to this segment but not yet written to its file.
    fn unwritten_bytes(&self) -> u64 {
        if self.on_disk() {
            self.bytes - self.disk_bytes
        } else {
            self.bytes - SEGMENT_HEADER_LEN
        }
    }

    fn fully_dead(&self) -> bool {
        self.n_dead == self.n_records
    }
}

/// The per-shard append-only log. See the module documentation for format and rules.
pub struct Log {
    dir: PathBuf,
    dir_file: Arc<File>,
    cfg: LogConfig,
    /// Oldest first; never empty. The last one receives appends.
    segments: VecDeque<Segment>,
    /// The newest segment file that exists on disk (shared with a [`SyncJob`] in flight).
    file: Arc<File>,
    next_lsn: u64,
    /// Highest committed Lsn, 0 if none ever was.
    committed_lsn: u64,
    /// Encoded records not yet written, in Lsn order, split across the trailing segments by
    /// their `unwritten_bytes`.
    buf: Vec<u8>,
    /// Records appended since the last commit (buffered or spilled).
    n_uncommitted: u64,
    /// Records written by [`Log::start_commit`] whose [`SyncJob`] has not finished yet.
    n_in_flight: u64,
    /// The job in flight carries the directory fsync (a segment file was created).
    dir_sync_in_flight: bool,
    /// `file` has written bytes not yet covered by an fdatasync.
    unsynced: bool,
    /// A segment file was created since the last directory fsync.
    dir_dirty: bool,
    disk_bytes: u64,
    /// Length of `file`, which exceeds the active segment's bytes when it was recycled.
    file_len: u64,
    /// [`SPARE_NAME`] exists in the directory.
    has_spare: bool,
    poisoned: bool,
    stats: LogStats,
}

impl Log {
    /// Opens or creates the log in `dir` (one directory per shard), replays every segment,
    /// truncates a torn tail of the newest segment and returns every record in Lsn order so
    /// the caller can rebuild its state (and re-declare dead records by replaying its own
    /// tombstones). A defect outside the newest segment's tail is an `InvalidData` error whose
    /// inner error is a [`LogCorruption`].
    pub fn open(dir: &Path, cfg: LogConfig) -> io::Result<(Log, Vec<Record>)> {
        if cfg.segment_bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "LogConfig::segment_bytes must be positive",
            ));
        }
        let created = !dir.exists();
        fs::create_dir_all(dir)?;
        if created && cfg.sync == SyncMode::Data {
            // The new directory's own entry must be durable, or its first commits are not.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                File::open(parent)?.sync_all()?;
            }
        }
        let dir_file = File::open(dir)?;
        let (mut segments, records, torn_bytes) = replay(dir)?;
        let has_spare = dir.join(SPARE_NAME).is_file();
        let file = match segments.back() {
            Some(last) => OpenOptions::new()
                .write(true)
                .open(segment_path(dir, last.first_lsn))?,
            None => {
                let mut seg = Segment::new(1);
                let file = create_segment_file(dir, 1, seg.salt)?;
                seg.disk_bytes = SEGMENT_HEADER_LEN;
                segments.push_back(seg);
                file
            }
        };
        let last = segments
            .back()
            .expect("pushed above when the directory had none");
        let next_lsn = last.first_lsn + last.n_records;
        let disk_bytes = segments.iter().map(|s| s.disk_bytes).sum();
        let mut log = Log {
            dir: dir.to_path_buf(),
            dir_file: Arc::new(dir_file),
            cfg,
            segments,
            file: Arc::new(file),
            next_lsn,
            committed_lsn: next_lsn - 1,
            buf: Vec::with_capacity(64 << 10),
            n_uncommitted: 0,
            n_in_flight: 0,
            dir_sync_in_flight: false,
            unsynced: true,
            dir_dirty: true,
            disk_bytes,
            file_len: 0,
            has_spare,
            poisoned: false,
            stats: LogStats {
                n_recovered: records.len() as u64,
                torn_bytes_truncated: torn_bytes,
                ..LogStats::default()
            },
        };
        // Whatever recovery returns must be durable before the caller acts on it: records
        // that survived a process crash only in the page cache, truncations, rewritten headers.
        log.file_len = log.file.metadata()?.len();
        log.sync_file()?;
        log.sync_dir()?;
        Ok((log, records))
    }

    /// Buffers a record and returns its Lsn; it is durable only once `commit` returns. Does
    /// no I/O unless the buffer exceeds its bound (then it writes, but does not sync). Fails
    /// with `InvalidInput` if `payload` is longer than `max_record_bytes`.
    pub fn append(&mut self, kind: u8, payload: &[u8]) -> io::Result<Lsn> {
        self.check_usable()?;
        if payload.len() > self.cfg.max_record_bytes as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "log record of {} bytes exceeds max_record_bytes {}",
                    payload.len(),
                    self.cfg.max_record_bytes
                ),
            ));
        }
        if self.should_roll() {
            self.segments.push_back(Segment::new(self.next_lsn));
        }
        let lsn = self.next_lsn;
        let seg = self
            .segments
            .back_mut()
            .expect("a log always has at least one segment");
        encode_record(&mut self.buf, seg.salt, lsn, kind, payload);
        seg.push_record((RECORD_HEADER_LEN + payload.len()) as u64);
        self.next_lsn += 1;
        self.n_uncommitted += 1;
        self.stats.n_appended += 1;
        if self.buf.len() >= SPILL_BYTES {
            self.stats.n_spills += 1;
            let written = self.write_out();
            self.poison_on_error(written)?;
        }
        Ok(Lsn(lsn))
    }

    /// Group commit: writes everything appended since the last commit (one pwrite per segment
    /// touched, normally one) and then issues ONE fdatasync covering all of it, plus a
    /// directory fsync if a segment file was created. Returns the highest committed Lsn (None
    /// if no record was ever appended). With nothing pending it does no I/O.
    pub fn commit(&mut self) -> io::Result<Option<Lsn>> {
        self.check_usable()?;
        if self.n_in_flight > 0 {
            return Err(io::Error::other("a pipelined commit is in flight"));
        }
        if self.n_uncommitted > 0 {
            let done = self
                .write_out()
                .and_then(|()| self.sync_file())
                .and_then(|()| self.sync_dir());
            self.poison_on_error(done)?;
            self.stats.n_commits += 1;
            self.stats.n_committed += self.n_uncommitted;
            self.n_uncommitted = 0;
            self.committed_lsn = self.next_lsn - 1;
        }
        Ok((self.committed_lsn > 0).then_some(Lsn(self.committed_lsn)))
    }

    /// The first half of a pipelined group commit: writes everything appended since the last
    /// commit, like [`Log::commit`], but leaves the fdatasync to the returned [`SyncJob`],
    /// which may run on another thread while this one goes on appending. The records are
    /// durable only once [`Log::finish_commit`] accepts the job's result. One job at a time:
    /// `None` when nothing is pending; an error while a job is in flight.
    pub fn start_commit(&mut self) -> io::Result<Option<SyncJob>> {
        self.check_usable()?;
        if self.n_in_flight > 0 {
            return Err(io::Error::other("a commit is already in flight"));
        }
        if self.n_uncommitted == 0 {
            return Ok(None);
        }
        let written = self.write_out();
        self.poison_on_error(written)?;
        let sync = self.cfg.sync == SyncMode::Data;
        let file = (sync && self.unsynced).then(|| self.file.clone());
        let dir = (sync && self.dir_dirty).then(|| self.dir_file.clone());
        self.unsynced = false;
        self.dir_dirty = false;
        self.dir_sync_in_flight = dir.is_some();
        self.n_in_flight = self.n_uncommitted;
        self.n_uncommitted = 0;
        Ok(Some(SyncJob {
            file,
            dir,
            upto: self.next_lsn - 1,
        }))
    }

    /// The second half: `result` is what [`SyncJob::run`] returned. On success the job's
    /// records are durable and their highest Lsn is returned; on failure the log is poisoned.
    pub fn finish_commit(&mut self, job: &SyncJob, result: io::Result<()>) -> io::Result<Lsn> {
        self.poison_on_error(result)?;
        self.check_usable()?;
        if job.file.is_some() {
            self.stats.n_syncs += 1;
        }
        if job.dir.is_some() {
            self.stats.n_dir_syncs += 1;
        }
        self.stats.n_commits += 1;
        self.stats.n_committed += self.n_in_flight;
        self.n_in_flight = 0;
        self.dir_sync_in_flight = false;
        self.committed_lsn = job.upto;
        Ok(Lsn(job.upto))
    }

    /// Whether a [`SyncJob`] is in flight.
    pub fn commit_in_flight(&self) -> bool {
        self.n_in_flight > 0
    }

    /// Whether there are appended records not yet committed.
    pub fn has_pending(&self) -> bool {
        self.n_uncommitted > 0
    }

    /// Declares a record dead (acknowledged or superseded). Idempotent; Lsns of deleted
    /// segments or never assigned are ignored. Kept in memory only: after recovery the caller
    /// re-declares dead records by replaying its own tombstones.
    pub fn mark_dead(&mut self, lsn: Lsn) {
        let front_lsn = match self.segments.front() {
            Some(front) => front.first_lsn,
            None => return,
        };
        if lsn.0 < front_lsn || lsn.0 >= self.next_lsn {
            return;
        }
        let idx = self.segments.partition_point(|s| s.first_lsn <= lsn.0) - 1;
        let seg = &mut self.segments[idx];
        let rel = lsn.0 - seg.first_lsn;
        debug_assert!(
            rel < seg.n_records,
            "segments cover [front, next_lsn) contiguously"
        );
        let (word, bit) = ((rel / 64) as usize, 1u64 << (rel % 64));
        if seg.dead[word] & bit == 0 {
            seg.dead[word] |= bit;
            seg.n_dead += 1;
        }
    }

    /// Deletes segments that are entirely dead, oldest first and only as a prefix (so a
    /// tombstone in segment k, which refers to records in segments <= k, outlives them). If
    /// that leaves only the active segment and it is entirely dead, non-empty and fully
    /// committed, starts a fresh segment and deletes the old one too, so that a fully
    /// acknowledged log holds only a segment header (`disk_bytes`; the files may be larger:
    /// the kept spare and a recycled file's stale tail, see the module documentation).
    /// Returns the bytes of the segments deleted or kept as the spare (the fresh segment's
    /// 32-byte header is not subtracted).
    pub fn compact(&mut self) -> io::Result<u64> {
        self.check_usable()?;
        let done = self.compact_inner();
        self.poison_on_error(done)
    }

    /// Bytes in segment files on disk (headers included).
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes
    }

    /// Number of segment files on disk.
    pub fn n_segments(&self) -> usize {
        self.segments.iter().filter(|s| s.on_disk()).count()
    }

    /// The first Lsn of every segment, oldest first (the newest may not be on disk yet).
    pub fn segment_starts(&self) -> Vec<u64> {
        self.segments.iter().map(|s| s.first_lsn).collect()
    }

    /// Counters since open.
    pub fn stats(&self) -> LogStats {
        self.stats
    }

    /// The Lsn the next `append` will return.
    pub fn next_lsn(&self) -> Lsn {
        Lsn(self.next_lsn)
    }

    fn check_usable(&self) -> io::Result<()> {
        if self.poisoned {
            return Err(io::Error::other(
                "log poisoned by an earlier I/O error; reopen it to recover",
            ));
        }
        Ok(())
    }

    fn poison_on_error<T>(&mut self, r: io::Result<T>) -> io::Result<T> {
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    /// Whether the next record starts a new segment. Normally only when the active segment is
    /// full and fully committed, so the roll needs no extra sync to keep the write order.
    fn should_roll(&self) -> bool {
        let seg = self
            .segments
            .back()
            .expect("a log always has at least one segment");
        if seg.n_records == 0 {
            return false;
        }
        let full = seg.bytes >= self.cfg.segment_bytes;
        let far_over = seg.bytes >= self.cfg.segment_bytes.saturating_mul(2);
        (full && self.n_uncommitted == 0 && self.n_in_flight == 0) || far_over
    }

    /// Writes the buffer to the trailing segments, creating their files as needed. Does not
    /// sync, except the old file before a new one is created (the write-order invariant).
    fn write_out(&mut self) -> io::Result<()> {
        let mut first = self.segments.len();
        while first > 0 {
            let s = &self.segments[first - 1];
            if s.on_disk() && s.unwritten_bytes() == 0 {
                break;
            }
            first -= 1;
        }
        let mut off = 0usize;
        for i in first..self.segments.len() {
            if !self.segments[i].on_disk() {
                self.seal_active(i - 1)?;
                self.sync_file()?;
                let (first_lsn, salt) = (self.segments[i].first_lsn, self.segments[i].salt);
                self.file = Arc::new(self.new_segment_file(first_lsn, salt)?);
                self.note_written(SEGMENT_HEADER_LEN);
                self.stats.n_segments_created += 1;
                self.segments[i].disk_bytes = SEGMENT_HEADER_LEN;
                self.disk_bytes += SEGMENT_HEADER_LEN;
                self.dir_dirty = true;
            }
            let seg = &mut self.segments[i];
            let n = seg.unwritten_bytes();
            let end = off + n as usize;
            self.file
                .write_all_at(&self.buf[off..end], seg.disk_bytes)?;
            seg.disk_bytes += n;
            self.disk_bytes += n;
            off = end;
            self.note_written(n);
        }
        debug_assert_eq!(
            off,
            self.buf.len(),
            "segments account for every buffered byte"
        );
        self.buf.clear();
        Ok(())
    }

    /// Cuts a recycled file back to segment `i`'s bytes before a newer segment is created:
    /// only the newest segment may have bytes after its last record (the torn tail rule).
    /// The caller's `sync_file` makes the new length durable.
    fn seal_active(&mut self, i: usize) -> io::Result<()> {
        let bytes = self.segments[i].disk_bytes;
        if self.file_len > bytes {
            self.file.set_len(bytes)?;
            self.file_len = bytes;
            self.unsynced = true;
        }
        Ok(())
    }

    /// A file for a new segment: the spare when there is one, else a new file.
    ///
    /// A recycled file's blocks are allocated and written already, so appending into it
    /// changes no file metadata and each fdatasync is a data flush without an ext4 journal
    /// commit (the reason PostgreSQL recycles its WAL segments): p50 183 against 342 us per
    /// 32 KiB fdatasync with two writers here (`chatperf fsync`, perf/CHAT_RESULTS.md). Its old records
    /// after the new ones are the torn tail for recovery: each record's CRC covers the new
    /// segment's random salt and its Lsn, so neither an old record nor a record frame a peer
    /// planted inside an old message body can pass as one of the new segment's.
    ///
    /// Crash order: the rename that made the spare is made durable (directory fsync) before
    /// the spare's first block is overwritten, and the new header is synced before the rename
    /// that gives the file its new name; so after a power loss every segment name holds that
    /// segment's own header.
    fn new_segment_file(&mut self, first_lsn: u64, salt: u64) -> io::Result<File> {
        if std::mem::take(&mut self.has_spare) {
            // The dead segment renamed to the spare may still have its old name on disk.
            self.sync_dir()?;
            let spare = self.dir.join(SPARE_NAME);
            let opened = OpenOptions::new()
                .write(true)
                .open(&spare)
                .and_then(|file| {
                    file.write_all_at(&segment_header(first_lsn, salt), 0)?;
                    Ok(file)
                });
            match opened {
                Ok(file) => {
                    // A failed sync poisons the log like any other (the caller's error path).
                    if self.cfg.sync == SyncMode::Data {
                        file.sync_data()?;
                        self.stats.n_syncs += 1;
                    }
                    fs::rename(&spare, segment_path(&self.dir, first_lsn))?;
                    self.file_len = file.metadata()?.len();
                    self.stats.n_segments_recycled += 1;
                    return Ok(file);
                }
                // A spare that cannot be opened or written is only disk space: drop it.
                Err(_) => {
                    let _ = fs::remove_file(&spare);
                }
            }
        }
        self.file_len = SEGMENT_HEADER_LEN;
        create_segment_file(&self.dir, first_lsn, salt)
    }

    fn note_written(&mut self, n: u64) {
        self.unsynced = true;
        self.stats.n_writes += 1;
        self.stats.bytes_written += n;
    }

    fn sync_file(&mut self) -> io::Result<()> {
        // Bytes a pipelined job has not synced yet count too: a forced roll must not create a
        // newer file before the older one is durable (the write-order invariant).
        if (self.unsynced || self.n_in_flight > 0) && self.cfg.sync == SyncMode::Data {
            self.file.sync_data()?;
            self.stats.n_syncs += 1;
        }
        self.unsynced = false;
        Ok(())
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        // A directory fsync still to come from the job in flight counts too: deleting an old
        // segment must not become durable before the new segment's directory entry.
        if (self.dir_dirty || self.dir_sync_in_flight) && self.cfg.sync == SyncMode::Data {
            self.dir_file.sync_all()?;
            self.stats.n_dir_syncs += 1;
        }
        self.dir_dirty = false;
        Ok(())
    }

    fn compact_inner(&mut self) -> io::Result<u64> {
        let mut freed = self.delete_dead_prefix()?;
        let only = self
            .segments
            .back()
            .expect("a log always has at least one segment");
        let roll_active = self.segments.len() == 1
            && only.n_records > 0
            && only.fully_dead()
            && self.n_uncommitted == 0
            && self.n_in_flight == 0;
        if roll_active {
            // The fresh segment carries the Lsn numbering; it must be durable (data and
            // directory entry) before the last file that records the numbering goes away.
            let active = self.segments.len() - 1;
            self.seal_active(active)?;
            self.sync_file()?;
            let mut seg = Segment::new(self.next_lsn);
            self.file = Arc::new(self.new_segment_file(seg.first_lsn, seg.salt)?);
            self.note_written(SEGMENT_HEADER_LEN);
            self.stats.n_segments_created += 1;
            self.dir_dirty = true;
            self.sync_file()?;
            self.sync_dir()?;
            seg.disk_bytes = SEGMENT_HEADER_LEN;
            self.segments.push_back(seg);
            self.disk_bytes += SEGMENT_HEADER_LEN;
            freed += self.delete_dead_prefix()?;
        }
        if freed > 0 {
            self.dir_dirty = true;
            self.sync_dir()?;
        }
        Ok(freed)
    }

    /// Whether the oldest segment can be deleted: [`Log::compact`] has work, for instance
    /// what the last call left beyond [`MAX_DELETIONS_PER_COMPACT`].
    pub fn compact_pending(&self) -> bool {
        self.segments.len() > 1 && self.segments[1].on_disk() && {
            let front = &self.segments[0];
            front.fully_dead() && front.on_disk() && front.unwritten_bytes() == 0
        }
    }

    /// Deletes fully dead, fully written segments from the front, at most
    /// [`MAX_DELETIONS_PER_COMPACT`], never the last file on disk: the newest file's name
    /// carries the Lsn numbering across a crash.
    fn delete_dead_prefix(&mut self) -> io::Result<u64> {
        // A successor created since the last directory fsync might vanish in a crash.
        self.sync_dir()?;
        let mut freed = 0;
        for _ in 0..MAX_DELETIONS_PER_COMPACT {
            if !self.compact_pending() {
                break;
            }
            // The deletion before this one is made durable first: a crash must not keep an
            // older segment while a newer one is gone (recovery would see a gap and refuse
            // the log). One directory fsync per deleted segment, on the shard's thread: hence
            // the cap per call.
            if freed > 0 {
                self.sync_dir()?;
            }
            let front = &self.segments[0];
            let path = segment_path(&self.dir, front.first_lsn);
            // One full-size segment is kept as the spare for the next roll.
            if !self.has_spare && front.disk_bytes >= self.cfg.segment_bytes {
                fs::rename(&path, self.dir.join(SPARE_NAME))?;
                self.has_spare = true;
            } else {
                fs::remove_file(&path)?;
            }
            self.dir_dirty = true;
            freed += front.disk_bytes;
            self.disk_bytes -= front.disk_bytes;
            self.stats.n_segments_deleted += 1;
            self.segments.pop_front();
        }
        Ok(freed)
    }
}

/// Reads every segment in `dir` in Lsn order: their bookkeeping, their records, and the
/// bytes of torn tail cut from the newest one.
fn replay(dir: &Path) -> io::Result<(VecDeque<Segment>, Vec<Record>, u64)> {
    let names = list_segments(dir)?;
    if names.first() == Some(&0) {
        let reason = "a segment named Lsn 0, which is never assigned".to_string();
        return Err(corruption(&segment_path(dir, 0), 0, reason));
    }
    let mut records = Vec::new();
    let mut segments: VecDeque<Segment> = VecDeque::with_capacity(names.len().max(1));
    let mut torn_bytes = 0;
    let mut data = Vec::new();
    for (i, &first_lsn) in names.iter().enumerate() {
        let path = segment_path(dir, first_lsn);
        if let Some(prev) = segments.back() {
            let expected = prev.first_lsn + prev.n_records;
            if first_lsn != expected {
                let reason = format!(
                    "segment starts at Lsn {first_lsn} but the previous one ends before Lsn \
                     {expected} (a missing or overlapping segment)"
                );
                return Err(corruption(&path, 0, reason));
            }
        }
        data.clear();
        File::open(&path)?.read_to_end(&mut data)?;
        let newest = i + 1 == names.len();
        let (seg, torn) = recover_segment(&path, first_lsn, &data, newest, &mut records)?;
        torn_bytes += torn;
        segments.push_back(seg);
    }
    Ok((segments, records, torn_bytes))
}

/// Appends one record frame to `buf`.
fn encode_record(buf: &mut Vec<u8>, salt: u64, lsn: u64, kind: u8, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("payload length checked against a u32 bound");
    let crc = record_crc(salt, lsn, len, kind, payload);
    buf.reserve(RECORD_HEADER_LEN + payload.len());
    buf.extend_from_slice(&crc.to_le_bytes());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.push(kind);
    buf.extend_from_slice(payload);
}

/// CRC-32C of `salt ++ lsn ++ len ++ kind ++ payload`; a version 1 segment (salt 0) has no
/// salt in it.
fn record_crc(salt: u64, lsn: u64, len: u32, kind: u8, payload: &[u8]) -> u32 {
    let mut head = [0u8; 13];
    head[..8].copy_from_slice(&lsn.to_le_bytes());
    head[8..12].copy_from_slice(&len.to_le_bytes());
    head[12] = kind;
    let mut crc = !0;
    if salt != 0 {
        crc = crc32c_update(crc, &salt.to_le_bytes());
    }
    !crc32c_update(crc32c_update(crc, &head), payload)
}

/// A segment's salt: unpredictable to peers (std's per-process random SipHash keys over the
/// first Lsn and the clock), never 0.
fn fresh_salt(first_lsn: u64) -> u64 {
    use std::hash::BuildHasher;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::collections::hash_map::RandomState::new()
        .hash_one((first_lsn, now))
        .max(1)
}

/// A segment header: version 2 with `salt`, or version 1 for salt 0 (only tests write those).
fn segment_header(first_lsn: u64, salt: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    let version: u32 = if salt == 0 { 1 } else { VERSION };
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h[12..20].copy_from_slice(&first_lsn.to_le_bytes());
    h[20..28].copy_from_slice(&salt.to_le_bytes());
    let crc = !crc32c_update(!0, &h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

fn segment_path(dir: &Path, first_lsn: u64) -> PathBuf {
    dir.join(format!("{first_lsn:020}{SEGMENT_SUFFIX}"))
}

/// Creates a segment file holding only its header. The caller syncs file and directory.
fn create_segment_file(dir: &Path, first_lsn: u64, salt: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(segment_path(dir, first_lsn))?;
    file.write_all_at(&segment_header(first_lsn, salt), 0)?;
    Ok(file)
}

/// The highest first Lsn a segment's name may carry: far beyond any real log (146 years at
/// 10^9 records a second), and far enough below `u64::MAX` that Lsn arithmetic on what such
/// a segment holds cannot overflow.
const MAX_FIRST_LSN: u64 = 1 << 62;

/// Where recovery keeps the bytes of a newest segment whose header it could not read.
fn damaged_path(segment: &Path) -> PathBuf {
    let mut name = segment.as_os_str().to_owned();
    name.push(".damaged");
    PathBuf::from(name)
}

/// The first Lsns of the segment files in `dir`, ascending.
fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut lsns = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(SEGMENT_SUFFIX)) else {
            continue;
        };
        if stem.len() == SEGMENT_NAME_DIGITS && stem.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(lsn) = stem.parse::<u64>() {
                if lsn > MAX_FIRST_LSN {
                    let reason = format!("segment name beyond Lsn {MAX_FIRST_LSN}");
                    return Err(corruption(&dir.join(&name), 0, reason));
                }
                lsns.push(lsn);
            }
        }
    }
    lsns.sort_unstable();
    Ok(lsns)
}

fn corruption(path: &Path, offset: u64, reason: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        LogCorruption {
            path: path.to_path_buf(),
            offset,
            reason,
        },
    )
}

/// Where a segment's valid content ends.
struct Scan {
    n_records: u64,
    /// Bytes up to the end of the last valid record (or the header).
    valid_len: u64,
    /// Why scanning stopped before the end of the data, if it did.
    defect: Option<String>,
}

/// Checks a segment header and returns its salt (0 for version 1). `Ok(None)` means torn or
/// missing (the data is shorter than a header, or the magic or CRC does not match); a
/// well-formed header that disagrees with this code is an error in any segment.
fn check_header(path: &Path, first_lsn: u64, data: &[u8]) -> io::Result<Option<u64>> {
    let Some(h) = data.get(..SEGMENT_HEADER_LEN as usize) else {
        return Ok(None);
    };
    let crc = u32::from_le_bytes(h[28..32].try_into().expect("4-byte slice"));
    if &h[..8] != MAGIC || crc != !crc32c_update(!0, &h[..28]) {
        return Ok(None);
    }
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4-byte slice"));
    let lsn = u64::from_le_bytes(h[12..20].try_into().expect("8-byte slice"));
    let salt = u64::from_le_bytes(h[20..28].try_into().expect("8-byte slice"));
    if version != 1 && version != VERSION {
        let reason =
            format!("unsupported segment version {version} (this build reads 1 and {VERSION})");
        return Err(corruption(path, 8, reason));
    }
    if lsn != first_lsn || (version == 1) != (salt == 0) {
        let reason = format!(
            "header says first Lsn {lsn}, version {version}, salt {salt:#x} (a version 1 \
             header has salt 0, a version 2 header a nonzero one)"
        );
        return Err(corruption(path, 12, reason));
    }
    Ok(Some(salt))
}

/// Reads records after the header until the data ends or a record is short or fails its CRC.
fn scan_records(data: &[u8], first_lsn: u64, salt: u64, out: &mut Vec<Record>) -> Scan {
    let mut off = SEGMENT_HEADER_LEN as usize;
    let mut lsn = first_lsn;
    let defect = loop {
        let rest = &data[off..];
        if rest.is_empty() {
            break None;
        }
        let Some(head) = rest.get(..RECORD_HEADER_LEN) else {
            break Some(format!(
                "{} bytes, shorter than a record header",
                rest.len()
            ));
        };
        let crc = u32::from_le_bytes(head[..4].try_into().expect("4-byte slice"));
        let len = u32::from_le_bytes(head[4..8].try_into().expect("4-byte slice"));
        let kind = head[8];
        let Some(payload) = rest[RECORD_HEADER_LEN..].get(..len as usize) else {
            break Some(format!(
                "record of {len} bytes runs past the end of the file"
            ));
        };
        if record_crc(salt, lsn, len, kind, payload) != crc {
            break Some(format!("record with Lsn {lsn} fails its CRC"));
        }
        out.push(Record {
            lsn: Lsn(lsn),
            kind,
            payload: payload.to_vec(),
        });
        lsn += 1;
        off += RECORD_HEADER_LEN + len as usize;
    };
    Scan {
        n_records: lsn - first_lsn,
        valid_len: off as u64,
        defect,
    }
}

/// Replays one segment into `out`. In the newest segment a torn tail (or header) is cut off
/// and the file fixed up; anywhere else it is corruption. Returns the bookkeeping and the
/// number of bytes truncated.
fn recover_segment(
    path: &Path,
    first_lsn: u64,
    data: &[u8],
    newest: bool,
    out: &mut Vec<Record>,
) -> io::Result<(Segment, u64)> {
    let mut seg = Segment::new(first_lsn);
    let Some(salt) = check_header(path, first_lsn, data)? else {
        if !newest {
            let reason = format!("torn or missing segment header ({} bytes)", data.len());
            return Err(corruption(path, 0, reason));
        }
        // A crash between creating the file and syncing its header: nothing in it was
        // committed (a segment's header is durable before any record in it is). Start it
        // afresh (with the fresh salt of `seg`). Unless the file is empty, a header's worth
        // or zeros, it could also be a damaged disk: its bytes are then kept aside, under a
        // name recovery ignores, for the operator to look at.
        if data.len() > SEGMENT_HEADER_LEN as usize && data.iter().any(|&b| b != 0) {
            fs::rename(path, damaged_path(path))?;
        }
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.write_all_at(&segment_header(first_lsn, seg.salt), 0)?;
        file.sync_all()?;
        seg.disk_bytes = SEGMENT_HEADER_LEN;
        return Ok((seg, data.len() as u64));
    };
    seg.salt = salt;
    let n_before = out.len();
    let scan = scan_records(data, first_lsn, salt, out);
    let mut torn = 0;
    if let Some(reason) = scan.defect {
        if !newest {
            out.truncate(n_before);
            return Err(corruption(path, scan.valid_len, reason));
        }
        torn = data.len() as u64 - scan.valid_len;
        let file = OpenOptions::new().write(true).open(path)?;
        file.set_len(scan.valid_len)?;
        file.sync_all()?;
    }
    for _ in 0..scan.n_records {
        seg.push_record(0);
    }
    seg.bytes = scan.valid_len;
    seg.disk_bytes = scan.valid_len;
    Ok((seg, torn))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A unique directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let pid = std::process::id();
            let p = std::env::temp_dir().join(format!("relay-log-{name}-{pid}-{n}"));
            let _ = fs::remove_dir_all(&p);
            TempDir(p)
        }

        /// A fresh directory holding a copy of this one's files.
        fn copy(&self, name: &str) -> TempDir {
            let dst = TempDir::new(name);
            fs::create_dir_all(&dst.0).unwrap();
            for e in fs::read_dir(&self.0).unwrap() {
                let e = e.unwrap();
                fs::copy(e.path(), dst.0.join(e.file_name())).unwrap();
            }
            dst
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn cfg(segment_bytes: u64) -> LogConfig {
        LogConfig {
            segment_bytes,
            max_record_bytes: 64 << 10,
            sync: SyncMode::None,
        }
    }

    /// Record `n`'s deterministic kind and payload (0..300 bytes).
    fn rec(n: u64) -> (u8, Vec<u8>) {
        let len = (n * 7919 % 300) as usize;
        let payload = (0..len).map(|i| (n as usize * 31 + i) as u8).collect();
        ((n % 251) as u8, payload)
    }

    /// Appends records `from..to` (numbered so that Lsn == n in a fresh log), committing
    /// every `batch`, and returns them as expected after recovery.
    fn write(log: &mut Log, from: u64, to: u64, batch: u64) -> Vec<Record> {
        let mut out = Vec::new();
        for n in from..to {
            let (kind, payload) = rec(n);
            let lsn = log.append(kind, &payload).unwrap();
            assert_eq!(lsn, Lsn(n), "Lsns are consecutive");
            out.push(Record { lsn, kind, payload });
            if (n + 1 - from).is_multiple_of(batch) {
                assert_eq!(log.commit().unwrap(), Some(lsn));
            }
        }
        assert_eq!(log.commit().unwrap(), Some(Lsn(to - 1)));
        out
    }

    #[test]
    fn compaction_deletes_a_few_segments_per_call() {
        let tmp = TempDir::new("compact-cap");
        let (mut log, _) = Log::open(&tmp.0, cfg(1024)).unwrap();
        write(&mut log, 1, 601, 4);
        let files = seg_files(&tmp.0);
        let n = files.len();
        assert!(n > 12, "{n} segments");
        // Everything but the newest segment's records dead at once.
        let last = files[n - 1].0;
        for lsn in 1..last {
            log.mark_dead(Lsn(lsn));
        }
        let mut calls = 0;
        while log.compact_pending() {
            let before = log.n_segments();
            assert!(log.compact().unwrap() > 0);
            assert!(before - log.n_segments() <= MAX_DELETIONS_PER_COMPACT);
            calls += 1;
        }
        // Spread over calls (one call deleted all of them before the cap).
        assert!(calls > 3, "{calls} calls");
        assert_eq!(calls, (n - 1).div_ceil(MAX_DELETIONS_PER_COMPACT));
        assert_eq!(seg_files(&tmp.0), files[n - 1..].to_vec());
        assert_eq!(log.compact().unwrap(), 0);
        drop(log);
        let (_, recs) = Log::open(&tmp.0, cfg(1024)).unwrap();
        assert_eq!(recs.first().map(|r| r.lsn), Some(Lsn(last)));
    }

    fn seg_files(dir: &Path) -> Vec<(u64, PathBuf)> {
        let lsns = list_segments(dir).unwrap();
        lsns.into_iter()
            .map(|l| (l, segment_path(dir, l)))
            .collect()
    }

    fn corruption_of(r: io::Result<(Log, Vec<Record>)>) -> String {
        let e = r.err().expect("open must fail on corruption");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let inner = e.get_ref().expect("carries a LogCorruption");
        assert!(inner.downcast_ref::<LogCorruption>().is_some());
        e.to_string()
    }

    #[test]
    fn round_trip_across_segments_and_reopen() {
        let tmp = TempDir::new("roundtrip");
        let (mut log, recs) = Log::open(&tmp.0, cfg(4096)).unwrap();
        assert!(recs.is_empty());
        assert_eq!(log.commit().unwrap(), None, "nothing ever committed");
        let mut expected = write(&mut log, 1, 2001, 13);
        assert!(log.n_segments() > 20, "{} segments", log.n_segments());
        let on_disk: u64 = seg_files(&tmp.0)
            .iter()
            .map(|(_, p)| fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!(log.disk_bytes(), on_disk);
        drop(log);

        let files = seg_files(&tmp.0);
        for (i, (lsn, path)) in files.iter().enumerate() {
            // Names are first Lsns; a segment rolls only once it has reached segment_bytes.
            assert!(expected.iter().any(|r| r.lsn.0 == *lsn));
            if i + 1 < files.len() {
                assert!(fs::metadata(path).unwrap().len() >= 4096);
            }
        }

        let (mut log, recs) = Log::open(&tmp.0, cfg(4096)).unwrap();
        assert_eq!(recs, expected);
        assert_eq!(log.stats().n_recovered, 2000);
        assert_eq!(log.stats().torn_bytes_truncated, 0);
        assert_eq!(log.next_lsn(), Lsn(2001));
        assert_eq!(log.commit().unwrap(), Some(Lsn(2000)));
        expected.extend(write(&mut log, 2001, 2500, 50));
        drop(log);
        let (_, recs) = Log::open(&tmp.0, cfg(4096)).unwrap();
        assert_eq!(recs, expected);
    }

    /// Pipelined commits: appends go on while a job is in flight; jobs run on another thread;
    /// segments roll across them; everything recovers in order.
    #[test]
    fn pipelined_commits_recover_everything_in_order() {
        let tmp = TempDir::new("pipelined");
        let data = LogConfig {
            sync: SyncMode::Data,
            ..cfg(4096)
        };
        let (mut log, _) = Log::open(&tmp.0, data).unwrap();
        let mut expected = Vec::new();
        let mut job: Option<SyncJob> = None;
        let mut committed = Vec::new();
        for n in 1..=3000u64 {
            let (kind, payload) = rec(n);
            let lsn = log.append(kind, &payload).unwrap();
            expected.push(Record { lsn, kind, payload });
            if n % 7 == 0 {
                // Finish the job in flight (run on another thread), then start the next.
                if let Some(j) = job.take() {
                    let (j, r) = std::thread::spawn(move || {
                        let r = j.run();
                        (j, r)
                    })
                    .join()
                    .unwrap();
                    committed.push(log.finish_commit(&j, r).unwrap());
                    assert!(!log.commit_in_flight());
                }
                job = log.start_commit().unwrap();
                assert!(log.commit_in_flight());
                assert!(log.start_commit().is_err(), "one job at a time");
                assert!(log.commit().is_err(), "no plain commit over a job");
            }
        }
        let j = job.take().unwrap();
        let r = j.run();
        committed.push(log.finish_commit(&j, r).unwrap());
        assert!(committed.windows(2).all(|w| w[0] < w[1]), "in Lsn order");
        assert_eq!(committed.last(), Some(&Lsn(2996)));
        assert_eq!(
            log.commit().unwrap(),
            Some(Lsn(3000)),
            "the tail after the last job"
        );
        assert!(log.n_segments() > 20, "{} segments", log.n_segments());
        let st = log.stats();
        assert_eq!(st.n_committed, 3000);
        assert!(st.n_syncs >= 428, "one fdatasync per job: {}", st.n_syncs);
        drop(log);
        let (_, recs) = Log::open(&tmp.0, data).unwrap();
        assert_eq!(recs, expected);
    }

    /// Records written by a job that never finished are not committed: a crash there may keep
    /// or lose them, but never the ones committed before.
    #[test]
    fn an_unfinished_job_commits_nothing() {
        let tmp = TempDir::new("unfinished");
        let (mut log, _) = Log::open(&tmp.0, cfg(1 << 20)).unwrap();
        for n in 1..=10 {
            let (k, p) = rec(n);
            log.append(k, &p).unwrap();
        }
        assert_eq!(log.commit().unwrap(), Some(Lsn(10)));
        let (k, p) = rec(11);
        log.append(k, &p).unwrap();
        let job = log.start_commit().unwrap().expect("a record is pending");
        assert_eq!(job.upto(), Lsn(11));
        // Not finished: the committed Lsn is still 10 and the log refuses a second job.
        assert!(log.start_commit().is_err());
        let failed = log.finish_commit(&job, Err(io::Error::other("disk gone")));
        assert!(failed.is_err());
        assert!(log.append(1, b"x").is_err(), "poisoned after a failed sync");
    }

    #[test]
    fn torn_tail_is_truncated_and_log_continues() {
        let tmp = TempDir::new("torn");
        let (mut log, _) = Log::open(&tmp.0, cfg(4096)).unwrap();
        let mut expected = write(&mut log, 1, 300, 7);
        // A last record with a known, long payload.
        let last = log.append(3, &[0x5a; 300]).unwrap();
        log.commit().unwrap();
        drop(log);
        let (_, newest) = seg_files(&tmp.0).pop().unwrap();
        let name = newest.file_name().unwrap().to_owned();
        let intact = fs::read(&newest).unwrap();
        let start = intact.len() - (RECORD_HEADER_LEN + 300);

        let check = |damaged: &[u8], torn: u64| {
            let t = tmp.copy("torn-trial");
            fs::write(t.0.join(&name), damaged).unwrap();
            let (mut log, recs) = Log::open(&t.0, cfg(4096)).unwrap();
            assert_eq!(recs, expected, "exactly the records before the torn one");
            assert_eq!(log.stats().torn_bytes_truncated, torn);
            assert_eq!(fs::metadata(t.0.join(&name)).unwrap().len(), start as u64);
            assert_eq!(log.append(9, b"after recovery").unwrap(), last);
            log.commit().unwrap();
            drop(log);
            let (_, recs) = Log::open(&t.0, cfg(4096)).unwrap();
            assert_eq!(recs.len(), expected.len() + 1);
            assert_eq!(recs.last().unwrap().payload, b"after recovery");
            assert_eq!(recs.last().unwrap().lsn, last);
        };
        for cut in start..intact.len() {
            check(&intact[..cut], (cut - start) as u64);
        }
        for pos in start..intact.len() {
            let mut bad = intact.clone();
            bad[pos] ^= 0x10;
            check(&bad, (intact.len() - start) as u64);
        }
        // A zero-filled (preallocated) tail after the intact record is a torn tail too.
        expected.push(Record {
            lsn: last,
            kind: 3,
            payload: vec![0x5a; 300],
        });
        let t = tmp.copy("zero-tail");
        let mut padded = intact.clone();
        padded.resize(intact.len() + 4096, 0);
        fs::write(t.0.join(&name), &padded).unwrap();
        let (_, recs) = Log::open(&t.0, cfg(4096)).unwrap();
        assert_eq!(recs, expected);
        assert_eq!(
            fs::metadata(t.0.join(&name)).unwrap().len(),
            intact.len() as u64
        );
    }

    #[test]
    fn newest_segment_empty_or_with_torn_header_is_restarted() {
        let tmp = TempDir::new("emptyseg");
        let (mut log, _) = Log::open(&tmp.0, cfg(4096)).unwrap();
        let expected = write(&mut log, 1, 100, 10);
        drop(log);
        let next = segment_path(&tmp.0, 100);
        let header = segment_header(100, 7);
        // A crash right after creating the next segment: empty, partial header, garbage.
        let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 1) as u8).collect();
        for content in [
            &[][..],
            &header[..10],
            &header[..31],
            &[0u8; 4096][..],
            &garbage[..],
        ] {
            let t = tmp.copy("emptyseg-trial");
            let path = t.0.join(next.file_name().unwrap());
            fs::write(&path, content).unwrap();
            let (mut log, recs) = Log::open(&t.0, cfg(4096)).unwrap();
            assert_eq!(recs, expected);
            // Bytes that are more than a torn header (possibly a damaged disk) are kept.
            let kept = fs::read(damaged_path(&path)).ok();
            if content.len() > 32 && content.iter().any(|&b| b != 0) {
                assert_eq!(kept.as_deref(), Some(content));
            } else {
                assert_eq!(kept, None);
            }
            assert_eq!(log.n_segments(), seg_files(&tmp.0).len() + 1);
            assert_eq!(log.append(1, b"x").unwrap(), Lsn(100));
            log.commit().unwrap();
            drop(log);
            let (_, recs) = Log::open(&t.0, cfg(4096)).unwrap();
            assert_eq!(recs.len(), 100);
        }
    }

    #[test]
    fn a_segment_named_beyond_any_real_lsn_is_an_error() {
        let tmp = TempDir::new("hugelsn");
        let (mut log, _) = Log::open(&tmp.0, cfg(4096)).unwrap();
        write(&mut log, 1, 10, 10);
        drop(log);
        let name = segment_path(&tmp.0, u64::MAX - 1);
        fs::write(&name, segment_header(u64::MAX - 1, 7)).unwrap();
        let msg = corruption_of(Log::open(&tmp.0, cfg(4096)));
        assert!(msg.contains("beyond Lsn"), "{msg}");
    }

    #[test]
    fn corruption_in_an_older_segment_is_an_error() {
        let tmp = TempDir::new("corrupt");
        let (mut log, _) = Log::open(&tmp.0, cfg(2048)).unwrap();
        write(&mut log, 1, 400, 5);
        drop(log);
        let files = seg_files(&tmp.0);
        assert!(files.len() >= 4);
        let (_, first) = &files[0];
        let intact = fs::read(first).unwrap();

        // A flipped byte in the middle of a record in the oldest segment.
        let t = tmp.copy("corrupt-flip");
        let mut bad = intact.clone();
        bad[intact.len() / 2] ^= 1;
        fs::write(t.0.join(first.file_name().unwrap()), &bad).unwrap();
        let msg = corruption_of(Log::open(&t.0, cfg(2048)));
        assert!(msg.contains("corruption"), "{msg}");

        // An older segment that lost its tail.
        let t = tmp.copy("corrupt-short");
        fs::write(
            t.0.join(first.file_name().unwrap()),
            &intact[..intact.len() - 3],
        )
        .unwrap();
        corruption_of(Log::open(&t.0, cfg(2048)));

        // An older segment with a torn header.
        let t = tmp.copy("corrupt-header");
        fs::write(t.0.join(first.file_name().unwrap()), &intact[..10]).unwrap();
        corruption_of(Log::open(&t.0, cfg(2048)));

        // A missing middle segment.
        let t = tmp.copy("corrupt-gap");
        fs::remove_file(t.0.join(files[1].1.file_name().unwrap())).unwrap();
        let msg = corruption_of(Log::open(&t.0, cfg(2048)));
        assert!(msg.contains("missing"), "{msg}");

        // A missing prefix is what compaction leaves: fine.
        let t = tmp.copy("prefix-gone");
        fs::remove_file(t.0.join(first.file_name().unwrap())).unwrap();
        let (_, recs) = Log::open(&t.0, cfg(2048)).unwrap();
        assert_eq!(recs.first().unwrap().lsn.0, files[1].0);
        assert_eq!(recs.last().unwrap().lsn, Lsn(399));
    }

    #[test]
    fn each_deletion_is_durable_before_the_next_one() {
        let tmp = TempDir::new("deleteorder");
        let synced = LogConfig {
            sync: SyncMode::Data,
            ..cfg(1024)
        };
        let (mut log, _) = Log::open(&tmp.0, synced).unwrap();
        write(&mut log, 1, 301, 4);
        let files = seg_files(&tmp.0);
        assert!(files.len() >= 6, "{} segments", files.len());
        // The first four segments dead: deleted oldest first, a directory fsync before each
        // but the first (a crash keeping an older one while a newer one is gone would leave a
        // gap, which recovery refuses).
        for lsn in files[0].0..files[4].0 {
            log.mark_dead(Lsn(lsn));
        }
        let before = log.stats();
        log.compact().unwrap();
        let after = log.stats();
        assert_eq!(after.n_segments_deleted - before.n_segments_deleted, 4);
        // One before the loop (a successor's entry), one between each two deletions, one
        // after the last.
        assert!(
            after.n_dir_syncs - before.n_dir_syncs >= 4,
            "{} directory fsyncs",
            after.n_dir_syncs - before.n_dir_syncs
        );
        assert_eq!(seg_files(&tmp.0), files[4..].to_vec());
    }

    #[test]
    fn compact_deletes_only_the_dead_prefix_and_empties_a_dead_log() {
        let tmp = TempDir::new("compact");
        let (mut log, _) = Log::open(&tmp.0, cfg(1024)).unwrap();
        write(&mut log, 1, 301, 4);
        let files = seg_files(&tmp.0);
        assert!(files.len() >= 6, "{} segments", files.len());
        let range = |k: usize| files[k].0..files[k + 1].0;
        let sizes: Vec<u64> = files
            .iter()
            .map(|(_, p)| fs::metadata(p).unwrap().len())
            .collect();
        let size = |k: usize| sizes[k];

        // Segments 0 and 2 dead, 1 live: only 0 goes.
        for lsn in range(0).chain(range(2)) {
            log.mark_dead(Lsn(lsn));
        }
        // Idempotent: marking again, or marking Lsns never assigned, changes nothing.
        log.mark_dead(Lsn(files[0].0));
        log.mark_dead(Lsn(0));
        log.mark_dead(Lsn(10_000));
        assert_eq!(log.compact().unwrap(), size(0));
        assert_eq!(seg_files(&tmp.0), files[1..].to_vec());
        assert_eq!(
            log.compact().unwrap(),
            0,
            "segment 2 is behind live segment 1"
        );

        // Segment 1 dead except one record, marked twice: still live.
        let r1 = range(1);
        for lsn in r1.start..r1.end - 1 {
            log.mark_dead(Lsn(lsn));
            log.mark_dead(Lsn(lsn));
        }
        assert_eq!(log.compact().unwrap(), 0);
        log.mark_dead(Lsn(r1.end - 1));
        assert_eq!(log.compact().unwrap(), size(1) + size(2));
        assert_eq!(seg_files(&tmp.0), files[3..].to_vec());

        // Everything dead, including the active segment, but one record still uncommitted:
        // the active segment stays.
        let pending = log.append(1, b"pending").unwrap();
        for lsn in 1..=pending.0 {
            log.mark_dead(Lsn(lsn));
        }
        while log.compact_pending() {
            log.compact().unwrap();
        }
        assert_eq!(log.n_segments(), 1);
        assert!(log.disk_bytes() > SEGMENT_HEADER_LEN);
        log.commit().unwrap();
        // Fully dead and committed: rolled and deleted, only a header remains.
        let before = log.disk_bytes();
        assert_eq!(log.compact().unwrap(), before);
        assert_eq!(log.n_segments(), 1);
        assert_eq!(log.disk_bytes(), SEGMENT_HEADER_LEN);
        assert_eq!(seg_files(&tmp.0), vec![(302, segment_path(&tmp.0, 302))]);
        assert_eq!(
            log.compact().unwrap(),
            0,
            "an empty active segment is left alone"
        );
        drop(log);

        let (mut log, recs) = Log::open(&tmp.0, cfg(1024)).unwrap();
        assert!(recs.is_empty());
        assert_eq!(log.commit().unwrap(), Some(Lsn(301)), "numbering survives");
        assert_eq!(log.append(1, b"next").unwrap(), Lsn(302));
    }

    #[test]
    fn deleted_segments_are_recycled_without_a_stale_tail_anywhere_but_the_newest() {
        let tmp = TempDir::new("recycle");
        let (mut log, _) = Log::open(&tmp.0, cfg(1024)).unwrap();
        let mut all = write(&mut log, 1, 301, 4);
        let files = seg_files(&tmp.0);
        assert!(files.len() >= 6, "{} segments", files.len());
        for lsn in files[0].0..files[3].0 {
            log.mark_dead(Lsn(lsn));
        }
        log.compact().unwrap();
        assert_eq!(seg_files(&tmp.0), files[3..].to_vec());
        let spare = tmp.0.join(SPARE_NAME);
        let spare_len = fs::metadata(&spare)
            .expect("a full dead segment is kept")
            .len();
        assert!(spare_len >= 1024, "{spare_len}");

        // The next segment reuses the spare; the segment before it was full-size already.
        all.extend(write(&mut log, 301, 601, 4));
        assert_eq!(log.stats().n_segments_recycled, 1);
        assert!(!spare.exists());
        let now = seg_files(&tmp.0);
        // Every older segment, the recycled one too once rolled past, ends at its last record.
        for (first_lsn, path) in &now[..now.len() - 1] {
            let data = fs::read(path).unwrap();
            let salt = check_header(path, *first_lsn, &data)
                .unwrap()
                .expect("a header");
            let scan = scan_records(&data, *first_lsn, salt, &mut Vec::new());
            assert_eq!(scan.defect, None, "{}", path.display());
            assert_eq!(scan.valid_len, data.len() as u64);
        }
        // So recovery (which reports stale bytes there as corruption) returns every record of
        // the remaining segments.
        drop(log);
        let (log, recs) = Log::open(&tmp.0, cfg(1024)).unwrap();
        let expected: Vec<Record> = all.into_iter().filter(|r| r.lsn.0 >= files[3].0).collect();
        assert_eq!(recs, expected);
        assert_eq!(log.next_lsn(), Lsn(601));
    }

    #[test]
    fn a_crash_right_after_recycling_keeps_every_committed_record() {
        let tmp = TempDir::new("recycle-crash");
        let (mut log, _) = Log::open(&tmp.0, cfg(1024)).unwrap();
        let mut all = write(&mut log, 1, 301, 4);
        let files = seg_files(&tmp.0);
        for lsn in files[0].0..files[2].0 {
            log.mark_dead(Lsn(lsn));
        }
        log.compact().unwrap();
        let spare_len = fs::metadata(tmp.0.join(SPARE_NAME)).unwrap().len();
        // Fill the active segment until the next append rolls into the spare, then crash
        // (drop without anything further) with the recycled file as the newest segment,
        // holding its new header, a few new records and the old records behind them.
        let mut n = 301;
        while log.stats().n_segments_recycled == 0 {
            all.extend(write(&mut log, n, n + 1, 1));
            n += 1;
        }
        let newest = seg_files(&tmp.0).pop().unwrap().1;
        assert_eq!(fs::metadata(&newest).unwrap().len(), spare_len);
        drop(log);
        let (log, recs) = Log::open(&tmp.0, cfg(1024)).unwrap();
        let expected: Vec<Record> = all.into_iter().filter(|r| r.lsn.0 >= files[2].0).collect();
        assert_eq!(recs, expected);
        assert!(
            log.stats().torn_bytes_truncated > 0,
            "the old records were cut"
        );
        assert_eq!(log.next_lsn(), Lsn(n));
    }

    #[test]
    fn a_record_frame_planted_in_old_bytes_does_not_pass_without_the_segment_salt() {
        // What a recycled segment's stale tail could hold: a complete record frame a peer put
        // in a message body, placed where the next record would start, for the next Lsn.
        let tmp = TempDir::new("planted");
        let (mut log, _) = Log::open(&tmp.0, cfg(1 << 20)).unwrap();
        let expected = write(&mut log, 1, 11, 5);
        drop(log);
        let (_, path) = seg_files(&tmp.0).pop().unwrap();
        let intact = fs::read(&path).unwrap();
        let salt = check_header(&path, 1, &intact).unwrap().expect("a header");
        assert_ne!(salt, 0, "new segments are salted");
        let forged = |with_salt: u64| {
            let mut f = intact.clone();
            encode_record(&mut f, with_salt, 11, 1, b"forged entry");
            f
        };
        // Without the salt (the unsalted formula, or a guess) it is a torn tail, cut off.
        for guess in [0, salt ^ 1, 0x5eed] {
            let t = tmp.copy("planted-trial");
            fs::write(t.0.join(path.file_name().unwrap()), forged(guess)).unwrap();
            let (log, recs) = Log::open(&t.0, cfg(1 << 20)).unwrap();
            assert_eq!(recs, expected, "salt guess {guess:#x}");
            assert!(log.stats().torn_bytes_truncated > 0);
        }
        // With it, the same bytes are a record: the salt is what stops the forgery.
        let t = tmp.copy("planted-control");
        fs::write(t.0.join(path.file_name().unwrap()), forged(salt)).unwrap();
        let (_, recs) = Log::open(&t.0, cfg(1 << 20)).unwrap();
        assert_eq!(recs.len(), expected.len() + 1);
    }

    #[test]
    fn version_1_segments_are_read_and_appended_to() {
        // A log as the previous build wrote it: version 1 headers, no salt in the CRCs.
        let tmp = TempDir::new("v1");
        fs::create_dir_all(&tmp.0).unwrap();
        let mut data = segment_header(1, 0).to_vec();
        assert_eq!(u32::from_le_bytes(data[8..12].try_into().unwrap()), 1);
        let mut expected = Vec::new();
        for n in 1..=5 {
            let (kind, payload) = rec(n);
            encode_record(&mut data, 0, n, kind, &payload);
            expected.push(Record {
                lsn: Lsn(n),
                kind,
                payload,
            });
        }
        fs::write(segment_path(&tmp.0, 1), &data).unwrap();
        let (mut log, recs) = Log::open(&tmp.0, cfg(1024)).unwrap();
        assert_eq!(recs, expected);
        // Appends continue in the version 1 segment, then roll into salted ones.
        expected.extend(write(&mut log, 6, 200, 4));
        drop(log);
        let files = seg_files(&tmp.0);
        assert!(files.len() > 2);
        let first = fs::read(&files[0].1).unwrap();
        assert_eq!(check_header(&files[0].1, 1, &first).unwrap(), Some(0));
        let last = fs::read(&files[files.len() - 1].1).unwrap();
        assert_ne!(
            check_header(&files[files.len() - 1].1, files[files.len() - 1].0, &last).unwrap(),
            Some(0)
        );
        let (_, recs) = Log::open(&tmp.0, cfg(1024)).unwrap();
        assert_eq!(recs, expected);
    }

    #[test]
    fn uncommitted_appends_are_not_visible_after_reopen() {
        let tmp = TempDir::new("uncommitted");
        let (mut log, _) = Log::open(&tmp.0, cfg(1 << 20)).unwrap();
        let expected = write(&mut log, 1, 11, 10);
        log.append(1, b"never committed").unwrap();
        log.append(2, b"nor this").unwrap();
        assert!(log.has_pending());
        drop(log);
        let (mut log, recs) = Log::open(&tmp.0, cfg(1 << 20)).unwrap();
        assert_eq!(recs, expected);
        assert!(!log.has_pending());
        assert_eq!(log.append(1, b"reused number").unwrap(), Lsn(11));
    }

    #[test]
    fn group_commit_is_one_write_and_one_fdatasync() {
        let tmp = TempDir::new("group");
        let mut c = cfg(8192);
        c.sync = SyncMode::Data;
        let (mut log, _) = Log::open(&tmp.0, c).unwrap();
        for k in [1u64, 64, 100] {
            let s0 = log.stats();
            for _ in 0..k {
                log.append(1, &[7; 20]).unwrap();
            }
            assert_eq!(log.stats().n_writes, s0.n_writes, "append does no I/O");
            assert!(log.has_pending());
            log.commit().unwrap();
            let s1 = log.stats();
            assert_eq!(s1.n_syncs - s0.n_syncs, 1, "{k} records, one fdatasync");
            assert_eq!(s1.n_writes - s0.n_writes, 1, "{k} records, one write");
            assert_eq!(s1.n_dir_syncs, s0.n_dir_syncs);
            assert_eq!(s1.n_committed - s0.n_committed, k);
            assert!(!log.has_pending());
        }
        // Nothing pending: no I/O at all.
        let s0 = log.stats();
        log.commit().unwrap();
        assert_eq!(log.stats(), s0);

        // The first append after the commit that filled the segment rolls: still one
        // fdatasync (the old segment was durable already), plus one directory fsync.
        while log.disk_bytes() < 8192 {
            log.append(1, &[7; 100]).unwrap();
            log.commit().unwrap();
        }
        let s0 = log.stats();
        for _ in 0..10 {
            log.append(1, &[7; 100]).unwrap();
        }
        log.commit().unwrap();
        let s1 = log.stats();
        assert_eq!(log.n_segments(), 2);
        assert_eq!(s1.n_syncs - s0.n_syncs, 1);
        assert_eq!(s1.n_dir_syncs - s0.n_dir_syncs, 1);
        assert_eq!(s1.n_segments_created - s0.n_segments_created, 1);
        assert!(s1.records_per_sync() > 1.0);
    }

    #[test]
    fn oversized_append_is_refused_and_spills_are_bounded() {
        let tmp = TempDir::new("spill");
        let c = LogConfig {
            segment_bytes: 1 << 20,
            sync: SyncMode::None,
            ..LogConfig::default()
        };
        let (mut log, _) = Log::open(&tmp.0, c).unwrap();
        let big = vec![1u8; (1 << 20) + 1];
        let e = log.append(1, &big).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(!log.has_pending());
        assert_eq!(log.next_lsn(), Lsn(1));

        // 12 MiB without a commit: the buffer spills at its bound, and the segment is forced
        // to roll at twice segment_bytes.
        for _ in 0..12 {
            log.append(2, &big[..1 << 20]).unwrap();
        }
        let s = log.stats();
        assert!(s.n_spills >= 2, "{s:?}");
        assert!(log.buf.len() < SPILL_BYTES);
        assert!(log.n_segments() >= 2);
        assert!(log
            .segments
            .iter()
            .all(|s| s.bytes <= 2 * (1 << 20) + (1 << 20) + 64));
        log.commit().unwrap();
        drop(log);
        let (_, recs) = Log::open(&tmp.0, c).unwrap();
        assert_eq!(recs.len(), 12);
        assert!(recs.iter().all(|r| r.payload.len() == 1 << 20));
    }

    /// Random appends, commits, deaths, compactions and crashes (drop without commit) against
    /// a model: recovery returns exactly the committed records minus a dead prefix, and
    /// compaction never removes a live record. Replays from its seed.
    #[test]
    fn random_operations_match_a_model() {
        for seed in 1..=6u64 {
            let tmp = TempDir::new("model");
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let (mut log, _) = Log::open(&tmp.0, cfg(2048)).unwrap();
            let (mut committed, mut pending) = (Vec::<Record>::new(), Vec::<Record>::new());
            let mut dead = std::collections::HashSet::new();
            let mut n_freed = 0;
            for step in 0..2500 {
                match next() % 100 {
                    0..=44 => {
                        let payload = vec![step as u8; (next() % 200) as usize];
                        let kind = (next() % 256) as u8;
                        let lsn = log.append(kind, &payload).unwrap();
                        pending.push(Record { lsn, kind, payload });
                    }
                    45..=64 => {
                        let top = log.commit().unwrap();
                        committed.append(&mut pending);
                        assert_eq!(top, committed.last().map(|r| r.lsn).or(top));
                    }
                    65..=84 => {
                        // Mostly acknowledge a few of the oldest live records (as recipients
                        // do), sometimes any record, live or dead.
                        let all: Vec<Lsn> =
                            committed.iter().chain(&pending).map(|r| r.lsn).collect();
                        for _ in 0..1 + next() % 4 {
                            let oldest: Vec<Lsn> = all
                                .iter()
                                .copied()
                                .filter(|l| !dead.contains(l))
                                .take(8)
                                .collect();
                            let pick = if next() % 4 == 0 { &all } else { &oldest };
                            if !pick.is_empty() {
                                let lsn = pick[(next() % pick.len() as u64) as usize];
                                dead.insert(lsn);
                                log.mark_dead(lsn);
                            }
                        }
                    }
                    85..=92 => {
                        n_freed += log.compact().unwrap();
                        let first_file = seg_files(&tmp.0)[0].0;
                        let live = committed
                            .iter()
                            .chain(&pending)
                            .filter(|r| !dead.contains(&r.lsn));
                        assert!(
                            live.map(|r| r.lsn.0).all(|l| l >= first_file),
                            "seed {seed} step {step}"
                        );
                    }
                    _ => {
                        drop(log);
                        for r in pending.drain(..) {
                            dead.remove(&r.lsn);
                        }
                        let (reopened, recs) = Log::open(&tmp.0, cfg(2048)).unwrap();
                        log = reopened;
                        let cut = committed.len() - recs.len();
                        assert_eq!(recs, committed[cut..], "seed {seed} step {step}");
                        assert!(committed[..cut].iter().all(|r| dead.contains(&r.lsn)));
                        committed.drain(..cut);
                        for r in &recs {
                            if dead.contains(&r.lsn) {
                                log.mark_dead(r.lsn);
                            }
                        }
                        let on_disk: u64 = seg_files(&tmp.0)
                            .iter()
                            .map(|(_, p)| fs::metadata(p).unwrap().len())
                            .sum();
                        assert_eq!(log.disk_bytes(), on_disk);
                    }
                }
            }
            assert!(n_freed > 0, "seed {seed}: compaction was exercised");
        }
    }

    const CHILD_ENV: &str = "RELAY_LOG_CRASH_CHILD_DIR";

    fn crash_cfg() -> LogConfig {
        LogConfig {
            segment_bytes: 16 << 10,
            max_record_bytes: 4096,
            sync: SyncMode::Data,
        }
    }

    /// Record number `n` of the crash test: the number, then `n % 200` derived bytes.
    fn numbered(n: u64) -> Vec<u8> {
        let mut p = n.to_le_bytes().to_vec();
        p.extend((0..n % 200).map(|i| (n + i) as u8));
        p
    }

    fn number_of(payload: &[u8]) -> u64 {
        u64::from_le_bytes(payload[..8].try_into().unwrap())
    }

    /// The child process of `kill_9_loses_nothing_committed`; without its environment
    /// variable this test does nothing.
    #[test]
    fn crash_writer_child() {
        if let Some(dir) = std::env::var_os(CHILD_ENV) {
            crash_writer(Path::new(&dir));
        }
    }

    /// Appends numbered records in batches of 1..=37 and commits each batch, then prints
    /// `C n` (every number <= n is committed). Every 16 commits it prints `D f` and then marks
    /// every number below `f` dead and compacts. Runs until killed (bounded, in case not).
    fn crash_writer(dir: &Path) {
        let (mut log, recovered) = Log::open(dir, crash_cfg()).unwrap();
        let mut live: VecDeque<(u64, Lsn)> = recovered
            .iter()
            .map(|r| (number_of(&r.payload), r.lsn))
            .collect();
        let mut n = live.back().map_or(0, |&(k, _)| k);
        let mut out = io::stdout().lock();
        for round in 0u64..1_000_000 {
            for _ in 0..1 + round % 37 {
                n += 1;
                live.push_back((n, log.append(7, &numbered(n)).unwrap()));
            }
            log.commit().unwrap();
            writeln!(out, "C {n}").unwrap();
            out.flush().unwrap();
            if round % 16 == 15 {
                let floor = n.saturating_sub(1500);
                writeln!(out, "D {floor}").unwrap();
                out.flush().unwrap();
                while live.front().is_some_and(|&(k, _)| k < floor) {
                    let (_, lsn) = live.pop_front().unwrap();
                    log.mark_dead(lsn);
                }
                log.compact().unwrap();
            }
        }
        std::process::exit(0);
    }

    #[test]
    fn kill_9_loses_nothing_committed() {
        let tmp = TempDir::new("crash");
        let exe = std::env::current_exe().unwrap();
        // Numbers below `floor` may have been deleted; every number up to `committed` must
        // be recovered.
        let (mut floor, mut committed) = (1u64, 0u64);
        for round in 0..4u64 {
            let mut child = Command::new(&exe)
                .args(["--exact", "chat::log::tests::crash_writer_child"])
                .args(["--nocapture", "--test-threads=1"])
                .env(CHILD_ENV, &tmp.0)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            let target = committed + 2000 + round * 777;
            let mut killed = false;
            for line in BufReader::new(stdout).lines() {
                let line = line.unwrap();
                if let Some(v) = line.strip_prefix("C ") {
                    committed = committed.max(v.parse().unwrap());
                } else if let Some(v) = line.strip_prefix("D ") {
                    floor = floor.max(v.parse().unwrap());
                }
                if !killed && committed >= target {
                    child.kill().unwrap(); // SIGKILL
                    killed = true;
                }
            }
            let status = child.wait().unwrap();
            assert_eq!(
                status.signal(),
                Some(libc::SIGKILL),
                "child ended with {status}"
            );

            let (log, recs) = Log::open(&tmp.0, crash_cfg()).unwrap();
            let first = number_of(&recs[0].payload);
            assert!(first <= floor, "round {round}: {first} > floor {floor}");
            for (i, r) in recs.iter().enumerate() {
                let n = first + i as u64;
                assert_eq!(r.payload, numbered(n), "round {round}: in order, once");
                assert_eq!(r.kind, 7);
            }
            let last = first + recs.len() as u64 - 1;
            assert!(
                last >= committed,
                "round {round}: lost {last}..={committed}"
            );
            let s = log.stats();
            eprintln!(
                "round {round}: committed {committed}, recovered {first}..={last}, floor \
                 {floor}, {} segments, torn tail {} bytes, spare {}",
                log.n_segments(),
                s.torn_bytes_truncated,
                tmp.0.join(SPARE_NAME).exists()
            );
            drop(log);
        }
        assert!(floor > 1, "compaction ran while the child was being killed");
    }
}
