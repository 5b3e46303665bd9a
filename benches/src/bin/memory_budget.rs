//! What the relay's user space keeps per room, participant, chat session, chat, stored message
//! and remembered request, counted with a counting allocator on the real engines (no sockets,
//! no kernel buffers, no allocator overhead: the RSS of a running relay, which the soak
//! samples, includes those). perf/SOAK.md's memory budget is this program's output:
//!
//! ```text
//! target/release/memory_budget
//! ```
//!
//! Each row is the heap growth of doing something N times, divided by N, after the structures
//! involved have been warmed up once (so that a row does not include a table's first
//! allocation).

use relay::chat::msg::{ChatId, Seq, UserId};
use relay::chat::ChatConfig;
use relay::engine::Now;
use relay::io::chat_io::{ChatCore, ChatOutput};

#[global_allocator]
static ALLOC: benches::CountingBytes = benches::CountingBytes;

fn live() -> usize {
    benches::CountingBytes::live()
}

fn row(what: &str, n: usize, before: usize, bound: &str) {
    let per = (live() as f64 - before as f64) / n as f64;
    println!("| {what} | {n} | {per:.0} | {bound} |");
}

struct Session {
    id: relay::chat::msg::ConnId,
    inbuf: Vec<u8>,
}

/// A chat core with rates out of the way and `dedup` remembered requests.
fn core(dir: &std::path::Path, dedup: usize) -> ChatCore {
    let cfg = ChatConfig {
        msgs_per_s: 1_000_000_000,
        msgs_burst: 1_000_000_000,
        hellos_per_s: 0,
        dedup_capacity: dedup,
        ..ChatConfig::default()
    };
    let log = relay::chat::log::LogConfig {
        sync: relay::chat::log::SyncMode::None,
        ..Default::default()
    };
    benches::chat_core(dir, cfg, log).0
}

fn login(core: &mut ChatCore, now: Now, user: u64) -> Session {
    let ip = std::net::IpAddr::from([127, 0, 0, 1]);
    let mut s = Session {
        id: core.accept(now, ip),
        inbuf: Vec::new(),
    };
    assert!(core.feed(now, s.id, &mut s.inbuf, &benches::chat_hello(user)));
    s
}

/// Ends a turn and writes out every session's output.
fn turn(core: &mut ChatCore, now: Now) {
    core.end_turn(now).expect("turn");
    while let Some(o) = core.poll_output() {
        if let ChatOutput::Transmit(id) = o {
            let len = core.output(id).len();
            core.written(now, id, len);
        }
    }
}

/// `s` sends `n` 100-byte texts, to `to(i)`, in batches of 64, each batch a turn.
fn send(core: &mut ChatCore, now: Now, s: &mut Session, n: usize, to: impl Fn(usize) -> u64) {
    let mut frames = Vec::new();
    let mut next_id = 1u64 << 40 | live() as u64;
    for chunk in (0..n).collect::<Vec<_>>().chunks(64) {
        frames.clear();
        for &i in chunk {
            next_id += 1;
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&next_id.to_le_bytes());
            proto::chat::Encoder::new(&mut frames).send(
                &id,
                0,
                to(i),
                proto::chat::kind::TEXT,
                &[0; 16],
                &[7u8; 100],
            );
        }
        assert!(core.feed(now, s.id, &mut s.inbuf, &frames));
        turn(core, now);
    }
}

/// `s` acknowledges everything in the chats with `peers`.
fn ack(core: &mut ChatCore, now: Now, s: &mut Session, me: u64, peers: &[u64]) {
    let pairs: Vec<(u64, u64)> = peers
        .iter()
        .map(|&p| (proto::chat::ids::direct_chat(me, p), u64::MAX))
        .collect();
    for chunk in pairs.chunks(512) {
        let mut frame = Vec::new();
        proto::chat::Encoder::new(&mut frame).ack(chunk);
        assert!(core.feed(now, s.id, &mut s.inbuf, &frame));
        turn(core, now);
    }
}

fn media() {
    const ROOMS: usize = 2_000;
    let before = live();
    let (shard, _, _) = benches::room(1, 0);
    let one = live() - before;
    drop(shard);
    let before = live();
    let (shard, _, _) = benches::room(1, ROOMS);
    // Each extra room holds two participants.
    let per_room_of_two = (live() - before - one) as f64 / ROOMS as f64;
    drop(shard);
    let (small, _, _) = benches::room(1, 0);
    let at_two = live();
    let (large, _, _) = benches::room(63, 0);
    let per_participant = (live() - at_two) as f64 / 62.0;
    drop((small, large));
    println!(
        "| media: a room of two participants (bindings, fan-out, SSRC tables) | {ROOMS} | \
         {per_room_of_two:.0} | `[limits] max_rooms_per_shard` (4,096) |"
    );
    println!(
        "| media: one more participant in a room (up to 64) | 62 | {per_participant:.0} | \
         `[limits] max_participants_per_room` (64) |"
    );
}

fn main() {
    let now = benches::NOW;
    let dir = std::env::temp_dir().join(format!("memory-budget-{}", std::process::id()));
    println!("| what | count | heap bytes each | bounded by |");
    println!("|---|---:|---:|---|");
    media();

    // Sessions: authenticated and idle.
    const USERS: u64 = 10_000;
    let mut c = core(&dir, 1 << 20);
    let mut alice = login(&mut c, now, 1);
    turn(&mut c, now);
    let before = live();
    let mut others: Vec<Session> = (0..USERS).map(|u| login(&mut c, now, 100 + u)).collect();
    for _ in 0..2 {
        turn(&mut c, now);
    }
    row(
        "chat: an idle authenticated session (without the kernel's socket)",
        USERS as usize,
        before,
        "`[chat] max_conns` per shard (131,072), `max_conns_per_ip`",
    );
    // Chats: one message from alice to each, delivered and acknowledged by both sides, so
    // what is left is the chat itself (its seq, members, delivery state).
    send(&mut c, now, &mut alice, 64, |i| 100 + i as u64);
    for (i, o) in others.iter_mut().take(64).enumerate() {
        ack(&mut c, now, o, 100 + i as u64, &[1]);
    }
    let peers: Vec<u64> = (100..100 + USERS).collect();
    ack(&mut c, now, &mut alice, 1, &peers[..64]);
    let before = live();
    send(&mut c, now, &mut alice, USERS as usize - 64, |i| {
        164 + i as u64
    });
    for (i, o) in others.iter_mut().enumerate().skip(64) {
        ack(&mut c, now, o, 100 + i as u64, &[1]);
    }
    ack(&mut c, now, &mut alice, 1, &peers);
    row(
        "chat: a 1:1 chat whose messages were all delivered and acknowledged \
         (with the request remembered for retries)",
        USERS as usize - 64,
        before,
        "none: chats are kept (the log's snapshots make them durable)",
    );
    drop(others);
    drop(c);

    // Stored messages: to a user who is not connected.
    const STORED: usize = 20_000;
    let mut c = core(&dir, 1 << 20);
    let mut alice = login(&mut c, now, 1);
    turn(&mut c, now);
    send(&mut c, now, &mut alice, 64, |_| 2);
    let before = live();
    send(&mut c, now, &mut alice, STORED, |_| 2);
    row(
        "chat: a stored 100-byte message waiting for an offline recipient \
         (with the request remembered)",
        STORED,
        before,
        "100,000 per recipient and per sender per owner shard; disk: the log",
    );
    drop(c);

    // Remembered requests: the owner's deduplication memory itself, filled to its capacity
    // and past it.
    const CAP: usize = 1 << 18;
    let before = live();
    let mut d = relay::chat::dedup::Dedup::new(CAP);
    let key = |i: usize| {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&(i as u64).to_le_bytes());
        id
    };
    for i in 0..CAP {
        d.insert(UserId(1), key(i), ChatId(7), Seq(i as u64));
    }
    row(
        "chat: a remembered request (sender, message id -> chat, seq), up to the capacity",
        CAP,
        before,
        "`[chat] dedup_capacity` per owner shard (default 1,048,576)",
    );
    let before = live();
    for i in CAP..2 * CAP {
        d.insert(UserId(1), key(i), ChatId(7), Seq(i as u64));
    }
    row(
        "chat: the same past the capacity (the oldest are overwritten)",
        CAP,
        before,
        "-",
    );
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}
