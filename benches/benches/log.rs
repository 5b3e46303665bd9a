//! The per-shard chat log's group commit: records/s with 1, 64 and 512 100-byte records per
//! commit, with one fdatasync per commit (`SyncMode::Data`) and without syncing
//! (`SyncMode::None`, the CPU cost of framing, CRC and write(2)). Beside them the baseline: a
//! bare `pwrite` + fdatasync of the same bytes, which is what the disk allows.
//!
//! The log lives under the system temp dir; after every measurement all records are marked
//! dead and compacted, so the disk use stays at about one segment.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use relay::chat::log::{Log, LogConfig, Lsn, SyncMode};

const PAYLOAD_BYTES: usize = 100;
/// The on-disk frame: a 9-byte record header, then the payload.
const FRAME_BYTES: usize = 9 + PAYLOAD_BYTES;
const BATCHES: [u64; 3] = [1, 64, 512];

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("relay-log-bench-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("temp dir is writable");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn group_commit(c: &mut Criterion) {
    for (sync, name) in [
        (SyncMode::Data, "log_commit_fdatasync"),
        (SyncMode::None, "log_commit_nosync"),
    ] {
        let mut g = c.benchmark_group(name);
        g.sample_size(10).measurement_time(Duration::from_secs(3));
        for k in BATCHES {
            g.throughput(Throughput::Elements(k));
            g.bench_with_input(BenchmarkId::new("records_per_commit", k), &k, |b, &k| {
                let tmp = TempDir::new(name);
                let cfg = LogConfig {
                    sync,
                    ..LogConfig::default()
                };
                let (mut log, _) = Log::open(&tmp.0, cfg).expect("open a fresh log");
                let payload = [0xab_u8; PAYLOAD_BYTES];
                b.iter_custom(|iters| {
                    let first = log.next_lsn();
                    let start = Instant::now();
                    for _ in 0..iters {
                        for _ in 0..k {
                            log.append(1, &payload).expect("append");
                        }
                        log.commit().expect("commit");
                    }
                    let elapsed = start.elapsed();
                    for lsn in first.0..log.next_lsn().0 {
                        log.mark_dead(Lsn(lsn));
                    }
                    log.compact().expect("compact");
                    elapsed
                });
                let s = log.stats();
                assert_eq!(s.n_committed, s.n_commits * k, "one commit per batch");
                if sync == SyncMode::Data {
                    // One fdatasync per commit; the rest are open's and compaction's.
                    assert!(s.n_syncs >= s.n_commits, "{s:?}");
                }
            });
        }
        g.finish();
    }
}

fn raw_fdatasync(c: &mut Criterion) {
    let mut g = c.benchmark_group("baseline_pwrite_fdatasync");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for k in BATCHES {
        g.throughput(Throughput::Elements(k));
        g.bench_with_input(BenchmarkId::new("records_per_commit", k), &k, |b, &k| {
            let tmp = TempDir::new("raw");
            let buf = vec![0xab_u8; FRAME_BYTES * k as usize];
            let path = tmp.0.join("raw");
            b.iter_custom(|iters| {
                let file: File = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .expect("create the baseline file");
                let start = Instant::now();
                let mut off = 0;
                for _ in 0..iters {
                    file.write_all_at(&buf, off).expect("pwrite");
                    file.sync_data().expect("fdatasync");
                    off += buf.len() as u64;
                }
                start.elapsed()
            });
        });
    }
    g.finish();
}

criterion_group!(benches, group_commit, raw_fdatasync);
criterion_main!(benches);
