//! `dedup_growth [N]`: N (default 2^21) new request ids into one owner shard's deduplication
//! index at the relay's capacity (2^20), each insert timed; prints the slowest inserts. The
//! index doubles 12 times on the way to its full size: a doubling that re-places every entry
//! at once shows up here as an insert of tens of milliseconds (a stall of the shard's loop).
//! Wall-clock times on a shared machine: read the slowest few, not the exact figures.

use relay::chat::dedup::Dedup;
use relay::chat::msg::{ChatId, Seq, UserId};
use std::time::{Duration, Instant};

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("N must be a number"))
        .unwrap_or(1 << 21);
    let mut d = Dedup::new(1 << 20);
    let mut slowest: Vec<(Duration, u64)> = Vec::new();
    let started = Instant::now();
    for i in 0..n {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
        let t = Instant::now();
        d.insert(UserId(i % 1000), id, ChatId(1), Seq(i));
        let took = t.elapsed();
        if slowest.len() < 8 || took > slowest[slowest.len() - 1].0 {
            slowest.push((took, i));
            slowest.sort_by_key(|s| std::cmp::Reverse(s.0));
            slowest.truncate(8);
        }
    }
    let total = started.elapsed();
    println!(
        "{n} inserts in {:.1} ms ({:.0} ns each on average); the slowest:",
        total.as_secs_f64() * 1e3,
        total.as_nanos() as f64 / n as f64
    );
    for (took, i) in slowest {
        println!("  insert {i}: {:.3} ms", took.as_secs_f64() * 1e3);
    }
}
