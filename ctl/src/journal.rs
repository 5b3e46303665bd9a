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

/// An open journal of records of type `R`.
pub struct Journal<R> {
    path: PathBuf,
    file: File,
    /// Records appended since the last compaction (or since open, counting replayed ones).
    n_appended: usize,
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
            n_appended: records.len(),
            _records: PhantomData,
        };
        Ok((journal, records))
    }

    /// Appends one record and makes it durable.
    pub fn append(&mut self, record: &R) -> Result<(), JournalError> {
        let line = encode(record);
        self.file.write_all(line.as_bytes())?;
        self.file.sync_data()?;
        self.n_appended += 1;
        Ok(())
    }

    /// Records appended since the last compaction.
    pub fn n_appended(&self) -> usize {
        self.n_appended
    }

    /// Replaces the journal with exactly `live`, atomically.
    pub fn compact<'a>(&mut self, live: impl IntoIterator<Item = &'a R>) -> Result<(), JournalError>
    where
        R: 'a,
    {
        let tmp = self.path.with_extension("tmp");
        let tmp_file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut out = std::io::BufWriter::new(tmp_file);
        let mut n = 0;
        for record in live {
            out.write_all(encode(record).as_bytes())?;
            n += 1;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.n_appended = n;
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

    #[test]
    fn appends_survive_reopen() {
        let path = temp("reopen");
        let (mut j, recs) = Journal::<Rec>::open(&path).unwrap();
        assert!(recs.is_empty());
        j.append(&rec(1)).unwrap();
        j.append(&rec(2)).unwrap();
        drop(j);
        let (j, recs) = Journal::<Rec>::open(&path).unwrap();
        assert_eq!(recs, vec![rec(1), rec(2)]);
        assert_eq!(j.n_appended(), 2);
    }

    #[test]
    fn torn_tail_is_cut_and_appends_continue() {
        let path = temp("torn");
        let (mut j, _) = Journal::<Rec>::open(&path).unwrap();
        j.append(&rec(1)).unwrap();
        drop(j);
        let full = std::fs::read(&path).unwrap();
        let mut torn = full.clone();
        torn.extend_from_slice(&encode(&rec(2)).as_bytes()[..10]);
        std::fs::write(&path, &torn).unwrap();
        let (mut j, recs) = Journal::<Rec>::open(&path).unwrap();
        assert_eq!(recs, vec![rec(1)]);
        assert_eq!(std::fs::read(&path).unwrap(), full);
        j.append(&rec(3)).unwrap();
        drop(j);
        assert_eq!(Journal::<Rec>::open(&path).unwrap().1, vec![rec(1), rec(3)]);
    }

    #[test]
    fn corruption_in_the_middle_refuses_to_open() {
        let path = temp("corrupt");
        let (mut j, _) = Journal::<Rec>::open(&path).unwrap();
        j.append(&rec(1)).unwrap();
        j.append(&rec(2)).unwrap();
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
        for k in 0..10 {
            j.append(&rec(k)).unwrap();
        }
        let live = [rec(7), rec(9)];
        j.compact(live.iter()).unwrap();
        assert_eq!(j.n_appended(), 2);
        j.append(&rec(11)).unwrap();
        drop(j);
        let (_, recs) = Journal::<Rec>::open(&path).unwrap();
        assert_eq!(recs, vec![rec(7), rec(9), rec(11)]);
    }
}
