//! The embedded store: an fsync'd, append-only journal of JSON records, compacted by rewriting
//! a snapshot and renaming it into place.
//!
//! Why not a database: ctl's durable state is small (meetings and placements, a few hundred
//! bytes each, thousands to a few hundred thousand of them) and is held in memory anyway; the
//! store only has to make each change durable before ctl answers, and give it back at start-up.
//! A journal does exactly that with no dependency and no on-disk format we do not control.
//! (`redb`, the maintained pure-Rust B-tree, was the alternative; its current releases need a
//! newer Rust than this workspace's `rust-version`, and it would add a second copy of the
//! state on disk that ctl never queries.)
//!
//! Format: one record per line, `CRC32-hex TAB JSON LF`, the CRC over the JSON bytes. A record
//! is durable once `append` returns (write, then `fdatasync`). On open, a torn or corrupt final
//! line (a crash in the middle of a write) is cut off; a corrupt line followed by good ones is
//! not a crash artifact, and opening fails rather than silently dropping state.
//!
//! Compaction writes the live records to `NAME.tmp`, fsyncs it, renames it over the journal and
//! fsyncs the directory (POSIX rename is atomic: a crash leaves either the old or the new file).
#![forbid(unsafe_code)]

use serde::{de::DeserializeOwned, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::marker::PhantomData;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why the journal could not be opened or written.
#[derive(Debug)]
#[non_exhaustive]
pub enum JournalError {
    /// The file system refused.
    Io(std::io::Error),
    /// A record in the middle of the journal is damaged (line number, 1-based).
    Corrupt(usize),
}

impl std::fmt::Display for JournalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "journal i/o: {e}"),
            Self::Corrupt(line) => write!(f, "journal record at line {line} is corrupt"),
        }
    }
}

impl std::error::Error for JournalError {}

impl From<std::io::Error> for JournalError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// Encoded records on their way to the file, in commit order: either a tail to append, or a
/// snapshot of the whole live state (with what was committed after it) that replaces the file.
#[derive(Debug, Default)]
pub struct Batch {
    snapshot: bool,
    bytes: Vec<u8>,
    /// The stager's sequence number of the last record this batch makes durable.
    pub seq: u64,
}

impl Batch {
    /// Whether writing this batch replaces the file (a compaction).
    pub fn is_snapshot(&self) -> bool {
        self.snapshot
    }

    /// The encoded records, one line each (newline included), in commit order: what a store
    /// other than the file keeps as one entry per record.
    pub fn lines(&self) -> impl Iterator<Item = &[u8]> {
        self.bytes.split_inclusive(|&b| b == b'\n')
    }
}

/// Decodes records stored one per entry (each as [`Batch::lines`] gave it), in order; the
/// index of the first damaged one (0-based) if any is.
pub fn decode_entries<R: DeserializeOwned>(
    entries: impl IntoIterator<Item = Vec<u8>>,
) -> Result<Vec<R>, usize> {
    entries
        .into_iter()
        .enumerate()
        .map(|(i, e)| decode(&e).ok_or(i))
        .collect()
}

/// The sans-IO half of the journal: encodes records as they are committed and hands them to
/// whoever writes the file, as one [`Batch`] however many were committed meanwhile (a group
/// commit). Sequence numbers count records committed since open; a batch with `seq = n` makes
/// every record up to `n` durable once written.
pub struct Stager<R> {
    pending: Batch,
    seq: u64,
    durable: u64,
    /// Records the file holds (or will, once `pending` is written) since its last rewrite.
    on_file: usize,
    /// Bytes appended since the last rewrite staged here (0 at open), plus that rewrite's.
    bytes: u64,
    /// Bytes of the last rewrite staged here (0 until one is): the live state's size then.
    snapshot_bytes: u64,
    _records: PhantomData<fn(R)>,
}

impl<R: Serialize> Stager<R> {
    /// A stager for a journal that holds `on_file` records.
    pub fn new(on_file: usize) -> Self {
        Self {
            pending: Batch::default(),
            seq: 0,
            durable: 0,
            on_file,
            bytes: 0,
            snapshot_bytes: 0,
            _records: PhantomData,
        }
    }

    /// Adds one record; returns its sequence number.
    pub fn stage(&mut self, record: &R) -> u64 {
        let line = encode(record);
        self.pending.bytes.extend_from_slice(line.as_bytes());
        self.bytes += line.len() as u64;
        self.on_file += 1;
        self.seq += 1;
        self.pending.seq = self.seq;
        self.seq
    }

    /// Replaces everything pending with a snapshot of `live`, the whole state as of now: once
    /// written, the file holds exactly `live` (and what is staged after it).
    pub fn stage_snapshot<'a>(&mut self, live: impl IntoIterator<Item = &'a R>)
    where
        R: 'a,
    {
        let mut batch = Batch {
            snapshot: true,
            seq: self.seq,
            ..Batch::default()
        };
        let mut records = 0;
        for record in live {
            batch.bytes.extend_from_slice(encode(record).as_bytes());
            records += 1;
        }
        self.on_file = records;
        self.bytes = batch.bytes.len() as u64;
        self.snapshot_bytes = self.bytes;
        self.pending = batch;
    }

    /// What is pending, if anything, as one batch to write.
    pub fn take(&mut self) -> Option<Batch> {
        (self.pending.seq > self.durable || self.pending.snapshot)
            .then(|| std::mem::take(&mut self.pending))
    }

    /// A batch up to `seq` was written and synced.
    pub fn written(&mut self, seq: u64) {
        self.durable = self.durable.max(seq);
    }

    /// The sequence number of the last record staged.
    pub fn staged_seq(&self) -> u64 {
        self.seq
    }

    /// The sequence number of the last record known durable.
    pub fn durable_seq(&self) -> u64 {
        self.durable
    }

    /// Records the file will hold once everything staged is written.
    pub fn on_file(&self) -> usize {
        self.on_file
    }

    /// Bytes appended since the last rewrite (since open, before the first), plus that
    /// rewrite's size.
    pub fn bytes_on_file(&self) -> u64 {
        self.bytes
    }

    /// The size of the last rewrite: the live state's, when it was made.
    pub fn snapshot_bytes(&self) -> u64 {
        self.snapshot_bytes
    }
}

/// An open journal of records of type `R`: the file half, which writes [`Batch`]es.
pub struct Journal<R> {
    path: PathBuf,
    file: File,
    /// The file's length after the last successful write: a failed append is cut back to it,
    /// so that a torn line never sits in front of later good ones.
    len: u64,
    _records: PhantomData<fn(R)>,
}

impl<R: Serialize + DeserializeOwned> Journal<R> {
    /// Opens (creating if absent) the journal at `path` and returns it with every durable
    /// record in order.
    pub fn open(path: &Path) -> Result<(Self, Vec<R>), JournalError> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)?;
        let (records, good_len) = replay(&file)?;
        if good_len < file.metadata()?.len() {
            // A torn tail from a crash mid-append: drop it so new records follow good ones.
            file.set_len(good_len)?;
            file.sync_all()?;
        }
        let journal = Self {
            path: path.to_path_buf(),
            file,
            len: good_len,
            _records: PhantomData,
        };
        Ok((journal, records))
    }

    /// Writes `batch` and makes it durable: appends a tail (then `fdatasync`), or rewrites the
    /// file from a snapshot. On an error the file holds what it held before.
    pub fn write(&mut self, batch: &Batch) -> Result<(), JournalError> {
        if batch.snapshot {
            return self.replace(&batch.bytes);
        }
        let appended = self
            .file
            .write_all(&batch.bytes)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = appended {
            // Best effort: the next write starts from a whole line either way if this works,
            // and the next open cuts a torn tail if it does not.
            let _ = self.file.set_len(self.len);
            return Err(e.into());
        }
        self.len += batch.bytes.len() as u64;
        Ok(())
    }

    /// Replaces the file with `bytes`, atomically: a temporary file, fsync'd, renamed over it.
    fn replace(&mut self, bytes: &[u8]) -> Result<(), JournalError> {
        let tmp = self.path.with_extension("tmp");
        let mut tmp_file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        tmp_file.write_all(bytes)?;
        tmp_file.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.len = bytes.len() as u64;
        Ok(())
    }
}

fn encode<R: Serialize>(record: &R) -> String {
    // Serializing our own plain data types to a string cannot fail (no maps with non-string
    // keys, no fallible Serialize impls).
    let json = serde_json::to_string(record).expect("journal records serialize");
    format!("{:08x}\t{json}\n", crc32fast::hash(json.as_bytes()))
}

fn decode<R: DeserializeOwned>(line: &[u8]) -> Option<R> {
    let line = line.strip_suffix(b"\n")?;
    let (crc, json) = (line.get(..8)?, line.get(9..)?);
    if line.get(8) != Some(&b'\t') {
        return None;
    }
    let crc = u32::from_str_radix(std::str::from_utf8(crc).ok()?, 16).ok()?;
    if crc != crc32fast::hash(json) {
        return None;
    }
    serde_json::from_slice(json).ok()
}

/// Reads every good record; returns them and the length of the good prefix of the file.
fn replay<R: DeserializeOwned>(file: &File) -> Result<(Vec<R>, u64), JournalError> {
    let mut reader = BufReader::new(file);
    let mut records = Vec::new();
    let (mut good_len, mut line_no) = (0u64, 0usize);
    let mut line = Vec::new();
    let mut bad_line = None;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        match (bad_line, decode::<R>(&line)) {
            (None, Some(r)) => {
                records.push(r);
                good_len += n as u64;
            }
            (None, None) => bad_line = Some(line_no),
            (Some(bad), _) => return Err(JournalError::Corrupt(bad)),
        }
    }
    Ok((records, good_len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Rec {
        k: u32,
        v: String,
    }

    fn rec(k: u32) -> Rec {
        Rec {
            k,
            v: format!("value {k}"),
        }
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ctl-journal-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("j")
    }

    /// Stages `records` one by one and writes them as one batch.
    fn append(j: &mut Journal<Rec>, st: &mut Stager<Rec>, records: &[Rec]) {
        for r in records {
            st.stage(r);
        }
        let batch = st.take().expect("staged");
        j.write(&batch).unwrap();
        st.written(batch.seq);
    }

    #[test]
    fn appends_survive_reopen() {
        let path = temp("reopen");
        let (mut j, recs) = Journal::<Rec>::open(&path).unwrap();
        assert!(recs.is_empty());
        let mut st = Stager::new(0);
        append(&mut j, &mut st, &[rec(1)]);
        append(&mut j, &mut st, &[rec(2), rec(3)]);
        assert_eq!((st.staged_seq(), st.durable_seq(), st.on_file()), (3, 3, 3));
        assert!(st.take().is_none(), "nothing left to write");
        drop(j);
        let (_, recs) = Journal::<Rec>::open(&path).unwrap();
        assert_eq!(recs, vec![rec(1), rec(2), rec(3)]);
    }

    #[test]
    fn torn_tail_is_cut_and_appends_continue() {
        let path = temp("torn");
        let (mut j, _) = Journal::<Rec>::open(&path).unwrap();
        append(&mut j, &mut Stager::new(0), &[rec(1)]);
        drop(j);
        let full = std::fs::read(&path).unwrap();
        let mut torn = full.clone();
        torn.extend_from_slice(&encode(&rec(2)).as_bytes()[..10]);
        std::fs::write(&path, &torn).unwrap();
        let (mut j, recs) = Journal::<Rec>::open(&path).unwrap();
        assert_eq!(recs, vec![rec(1)]);
        assert_eq!(std::fs::read(&path).unwrap(), full);
        append(&mut j, &mut Stager::new(1), &[rec(3)]);
        drop(j);
        assert_eq!(Journal::<Rec>::open(&path).unwrap().1, vec![rec(1), rec(3)]);
    }

    #[test]
    fn corruption_in_the_middle_refuses_to_open() {
        let path = temp("corrupt");
        let (mut j, _) = Journal::<Rec>::open(&path).unwrap();
        append(&mut j, &mut Stager::new(0), &[rec(1), rec(2)]);
        drop(j);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[12] ^= 0x20; // inside the first record's JSON
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            Journal::<Rec>::open(&path),
            Err(JournalError::Corrupt(1))
        ));
    }

    #[test]
    fn compaction_keeps_exactly_the_live_records() {
        let path = temp("compact");
        let (mut j, _) = Journal::<Rec>::open(&path).unwrap();
        let mut st = Stager::new(0);
        append(&mut j, &mut st, &(0..10).map(rec).collect::<Vec<_>>());
        let live = [rec(7), rec(9)];
        st.stage_snapshot(live.iter());
        assert_eq!(st.on_file(), 2);
        append(&mut j, &mut st, &[rec(11)]);
        assert_eq!(st.on_file(), 3);
        drop(j);
        let (_, recs) = Journal::<Rec>::open(&path).unwrap();
        assert_eq!(recs, vec![rec(7), rec(9), rec(11)]);
    }

    /// Records staged after a snapshot but before it is written go into the new file after it;
    /// records staged before it are dropped (the snapshot holds their effect).
    #[test]
    fn a_snapshot_replaces_what_was_pending_and_keeps_what_follows() {
        let path = temp("snapshot-pending");
        let (mut j, _) = Journal::<Rec>::open(&path).unwrap();
        let mut st = Stager::new(0);
        append(&mut j, &mut st, &[rec(1)]);
        st.stage(&rec(2));
        st.stage_snapshot([rec(1), rec(2)].iter());
        st.stage(&rec(3));
        let batch = st.take().unwrap();
        assert!(batch.is_snapshot());
        assert_eq!(batch.seq, 3);
        j.write(&batch).unwrap();
        st.written(batch.seq);
        drop(j);
        let (_, recs) = Journal::<Rec>::open(&path).unwrap();
        assert_eq!(recs, vec![rec(1), rec(2), rec(3)]);
    }

    /// A store with one entry per record (ctl on Redis) gets back exactly what was staged,
    /// and a damaged entry is named, not skipped.
    #[test]
    fn a_batch_splits_into_entries_that_decode_back() {
        let mut st = Stager::new(0);
        for k in 1..=3 {
            st.stage(&rec(k));
        }
        let batch = st.take().unwrap();
        let entries: Vec<Vec<u8>> = batch.lines().map(<[u8]>::to_vec).collect();
        assert_eq!(entries.len(), 3);
        let back: Vec<Rec> = decode_entries(entries.clone()).unwrap();
        assert_eq!(back, vec![rec(1), rec(2), rec(3)]);
        let mut damaged = entries;
        damaged[1][12] ^= 1;
        assert_eq!(decode_entries::<Rec>(damaged), Err(1));
    }
}
