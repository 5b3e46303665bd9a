//! `checkpoint_cost [CHATS...]`: how long one owner shard's chat checkpoint would keep the
//! shard busy all at once in the worst case, a fresh snapshot of every chat it owns (a
//! checkpoint rewrites only the snapshots that hold back compaction, see
//! `Owner::start_selective_checkpoint`; all of them when every chat's snapshot sits in an old
//! segment with nothing waiting after it), and how many bytes it appends, for a shard owning CHATS direct
//! chats (default 10,000, 100,000 and 1,000,000). The relay spreads it over loop turns
//! (`CHECKPOINT_CHATS_PER_TURN`); this is the figure that sets that budget. Each chat is made by one
//! SEND through the real owner role; the timed part is `Owner::checkpoint` plus taking its
//! records, what the shard does in that turn before the log write. Wall-clock on a shared
//! machine: read the order of magnitude.

use proto::chat::kind;
use relay::chat::msg::{ChatId, Origin, Submit, UserId};
use relay::chat::owner::Owner;
use relay::chat::records::Body;
use relay::chat::ChatConfig;
use std::time::Instant;

/// A log record's header (CRC, length, kind; `relay::chat::log`).
const RECORD_HEADER_LEN: usize = 9;

fn main() {
    let parsed: Result<Vec<u64>, _> = std::env::args().skip(1).map(|a| a.parse()).collect();
    let sizes = match parsed {
        Ok(v) if !v.is_empty() => v,
        Ok(_) => vec![10_000, 100_000, 1_000_000],
        Err(e) => panic!("CHATS must be numbers: {e}"),
    };
    println!("| chats owned | checkpoint (shard busy) | bytes appended | per chat |");
    println!("|---:|---:|---:|---:|");
    for n in sizes {
        // One shard owns everything; every chat is direct, between users 2i+1 and 2i+2.
        let mut owner = Owner::new(0, 1, ChatConfig::default());
        for i in 0..n {
            let (a, b) = (UserId(2 * i + 1), UserId(2 * i + 2));
            let mut msg_id = [0u8; 16];
            msg_id[..8].copy_from_slice(&i.to_le_bytes());
            let s = Submit {
                from: Origin {
                    user: a,
                    home: 0,
                    conn: relay::chat::msg::ConnId(i),
                },
                msg_id,
                chat: ChatId::direct(a, b),
                to: Some(b),
                kind: kind::TEXT,
                ref_id: [0; 16],
                body: Body::from_slice(b"hello"),
            };
            owner.submit(Box::new(s), 1_700_000_000_000);
            if i % 4096 == 4095 {
                // Commit as a shard would, so that the batch does not grow without bound.
                let batch = owner.take_batch();
                let lsns: Vec<relay::chat::log::Lsn> =
                    (0..batch.len() as u64).map(relay::chat::log::Lsn).collect();
                owner.handle_committed(&lsns);
                owner.out.clear();
                owner.dead.clear();
            }
        }
        let batch = owner.take_batch();
        let lsns: Vec<relay::chat::log::Lsn> =
            (0..batch.len() as u64).map(relay::chat::log::Lsn).collect();
        owner.handle_committed(&lsns);
        let t = Instant::now();
        owner.checkpoint();
        let batch = owner.take_batch();
        let took = t.elapsed();
        let bytes: usize = batch.iter().map(|(_, p)| p.len() + RECORD_HEADER_LEN).sum();
        println!(
            "| {n} | {:.1} ms | {:.1} MiB | {:.0} ns |",
            took.as_secs_f64() * 1e3,
            bytes as f64 / (1 << 20) as f64,
            took.as_nanos() as f64 / n as f64
        );
    }
}
