//! Runs N stored 1:1 chat messages through one shard's real chat code (`ChatCore`: engine,
//! log written without fdatasync, commit) without sockets, for instruction counting under callgrind and for counting
//! heap allocations per message:
//!
//! ```text
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null --collect-atstart=no \
//!     --toggle-collect='count_chat::drive' target/release/count_chat 4000
//! valgrind ... target/release/count_chat 20000
//! ```
//!
//! Sender A and recipient B are both connected to the shard. Each turn A sends 32 messages of
//! 100 bytes; the turn commits them (the log is written, not synced: `sync = none`, so that no
//! fdatasync is counted) and delivers them; then B acknowledges everything it holds, which
//! makes a DELIVERED receipt for A, and A acknowledges that. The difference of two totals
//! divided by the difference of N is the instructions per message (`cargo xtask callgrind`
//! runs it): relay code, plus the client's share done in the loop (encoding the SEND frames,
//! splitting the output into frames to count deliveries). It also prints the heap
//! allocations per message (a counting allocator: allocations and reallocations).

use relay::chat::ChatConfig;
use relay::engine::Now;
use relay::io::chat_io::ChatCore;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Messages per turn.
const BATCH: usize = 32;
const ALICE: u64 = 1;
const BOB: u64 = 2;

struct Session {
    id: u64,
    inbuf: Vec<u8>,
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(20_000, |a| a.parse().expect("a number of messages"));
    let dir = std::env::temp_dir().join(format!("count-chat-{}", std::process::id()));
    let now = benches::NOW;
    let cfg = ChatConfig {
        msgs_per_s: 1_000_000_000,
        msgs_burst: 1_000_000_000,
        ..ChatConfig::default()
    };
    let log = relay::chat::log::LogConfig {
        sync: relay::chat::log::SyncMode::None,
        ..Default::default()
    };
    let (mut core, _listener) = benches::chat_core(&dir, cfg, log);
    let ip = std::net::IpAddr::from([127, 0, 0, 1]);
    let mut login = |user: u64| {
        let mut s = Session {
            id: core.accept(now, ip),
            inbuf: Vec::new(),
        };
        assert!(core.feed(now, s.id, &mut s.inbuf, &benches::chat_hello(user)));
        s
    };
    let mut alice = login(ALICE);
    let mut bob = login(BOB);
    // Both sessions' backlogs (empty) round-trip before the first message.
    for _ in 0..2 {
        core.end_turn(now).expect("turn");
        drain(&mut core, now);
    }
    let accepted_before = core.stats()[2];
    let allocs = ALLOCS.load(Ordering::Relaxed);
    let delivered = drive(&mut core, now, &mut alice, &mut bob, n);
    let allocs = ALLOCS.load(Ordering::Relaxed) - allocs;
    assert_eq!(delivered, n, "every message delivered to bob");
    let stats = core.stats();
    assert_eq!(stats[6], 0, "no ERROR frame ({stats:?})");
    println!(
        "messages={n} delivered={delivered} entries accepted={} heap allocations={allocs} \
         per message={:.2}",
        stats[2] - accepted_before,
        allocs as f64 / n.max(1) as f64
    );
    drop(core);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes out every session's output; returns the MSG frames of text messages among it.
fn drain(core: &mut ChatCore, now: Now) -> usize {
    let mut msgs = 0;
    let dirty = core.take_dirty();
    for &id in &dirty {
        let out = core.output(id);
        let mut at = 0;
        while let Ok(Some((frame, len))) = proto::chat::decode(&out[at..]) {
            at += len;
            if let proto::chat::Frame::Msg(e) = frame {
                msgs += usize::from(e.kind == proto::chat::kind::TEXT);
            }
        }
        let len = out.len();
        core.written(now, id, len);
    }
    core.give_back_dirty(dirty);
    msgs
}

/// The measured loop: see the module documentation.
#[inline(never)]
fn drive(core: &mut ChatCore, now: Now, alice: &mut Session, bob: &mut Session, n: usize) -> usize {
    let chat = proto::chat::ids::direct_chat(ALICE, BOB);
    let body = [7u8; 100];
    let mut frames = Vec::with_capacity(BATCH * 160);
    let mut ack = Vec::with_capacity(64);
    proto::chat::Encoder::new(&mut ack).ack(&[(chat, u64::MAX)]);
    let mut delivered = 0;
    let mut sent = 0;
    while sent < n {
        frames.clear();
        let k = BATCH.min(n - sent);
        for i in 0..k {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&((sent + i) as u64 + 1).to_le_bytes());
            proto::chat::Encoder::new(&mut frames).send(
                &id,
                0,
                BOB,
                proto::chat::kind::TEXT,
                &[0; 16],
                &body,
            );
        }
        sent += k;
        assert!(core.feed(now, alice.id, &mut alice.inbuf, &frames));
        core.end_turn(now).expect("turn");
        delivered += drain(core, now);
        // Bob acknowledges all he holds (the relay clamps the seq), then alice her receipt.
        assert!(core.feed(now, bob.id, &mut bob.inbuf, &ack));
        core.end_turn(now).expect("turn");
        drain(core, now);
        assert!(core.feed(now, alice.id, &mut alice.inbuf, &ack));
        core.end_turn(now).expect("turn");
        drain(core, now);
    }
    delivered
}
