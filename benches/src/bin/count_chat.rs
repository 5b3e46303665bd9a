//! Runs N stored 1:1 chat messages through one shard's real turn (`ShardLoop` with its
//! `ChatCore`: engine, log written without fdatasync, commit) with this program as the
//! transport instead of sockets, for instruction counting under callgrind and for counting heap
//! allocations per message:
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

use relay::chat::msg::ConnId;
use relay::chat::ChatConfig;
use relay::engine::{EngineConfig, Now, Shard as MediaShard};
use relay::io::chat_io::{ChatCore, ChatOutput};
use relay::io::shard_loop::{Clock, ShardLoop, Transport};
use relay::io::storage::LogStorage;
use relay::io::{IoCounters, ShardCtx, ShardStats};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

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

/// This program as the shard's transport: the bytes of one client's next write, and every
/// output written whole, its text MSG frames counted.
struct BenchIo {
    /// Where `pending` goes, and each session's read buffer.
    to: ConnId,
    pending: Vec<u8>,
    inbufs: Vec<(ConnId, Vec<u8>)>,
    /// Text MSG frames written since the last [`BenchIo::take_msgs`].
    msgs: usize,
}

impl BenchIo {
    fn take_msgs(&mut self) -> usize {
        std::mem::take(&mut self.msgs)
    }
}

impl Transport<LogStorage> for BenchIo {
    fn wait(&mut self, _timeout_us: u64) -> std::io::Result<()> {
        Ok(())
    }

    fn media(&mut self, _engine: &mut MediaShard, _clock: &impl Clock) -> std::io::Result<()> {
        Ok(())
    }

    fn chat_input(&mut self, core: &mut ChatCore, now: Now) {
        if self.pending.is_empty() {
            return;
        }
        let to = self.to;
        let inbuf = &mut self
            .inbufs
            .iter_mut()
            .find(|(id, _)| *id == to)
            .expect("a session")
            .1;
        assert!(core.feed(now, to, inbuf, &self.pending));
        self.pending.clear();
    }

    fn chat_output(&mut self, core: &mut ChatCore, now: Now) -> std::io::Result<()> {
        while let Some(o) = core.poll_output() {
            let id = match o {
                ChatOutput::Transmit(id) => id,
                ChatOutput::Close(id) => {
                    panic!("the core closed session {id}: the bench sent a bad frame")
                }
            };
            let out = core.output(id);
            let mut at = 0;
            while let Ok(Some((frame, len))) = proto::chat::decode(&out[at..]) {
                at += len;
                if let proto::chat::Frame::Msg(e) = frame {
                    self.msgs += usize::from(e.kind == proto::chat::kind::TEXT);
                }
            }
            let len = out.len();
            core.written(now, id, len);
        }
        Ok(())
    }

    fn must_not_sleep(&self) -> bool {
        false
    }

    fn counters(&self) -> IoCounters {
        IoCounters::default()
    }
}

/// One shard: the relay's loop, its idle media engine and its context.
struct Bench {
    lp: ShardLoop<LogStorage>,
    media: MediaShard,
    ctx: ShardCtx,
    io: BenchIo,
}

impl Bench {
    /// One turn with `bytes` (written by `encode`) from connection `from`; returns the text
    /// messages delivered.
    fn turn(&mut self, from: ConnId, encode: impl FnOnce(&mut Vec<u8>)) -> usize {
        self.io.to = from;
        encode(&mut self.io.pending);
        self.lp
            .turn(&mut self.media, &mut self.io, &benches::NOW, &self.ctx)
            .expect("turn");
        self.io.take_msgs()
    }
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
    let (alice, bob) = (core.accept(now, ip), core.accept(now, ip));
    let verifier = proto::token::TokenVerifier::new(benches::key().verifying_key(), 0);
    let mut b = Bench {
        lp: ShardLoop::new(Some(core)),
        media: MediaShard::new(EngineConfig::default(), 0, verifier, now),
        ctx: ShardCtx::new(
            0,
            Arc::new(AtomicBool::new(false)),
            Arc::new(ShardStats::default()),
            std::time::Instant::now(),
        ),
        io: BenchIo {
            to: alice,
            pending: Vec::with_capacity(BATCH * 160),
            inbufs: vec![(alice, Vec::new()), (bob, Vec::new())],
            msgs: 0,
        },
    };
    // Both sessions' HELLOs, and their backlogs (empty) round-trip before the first message.
    b.turn(alice, |buf| {
        buf.extend_from_slice(&benches::chat_hello(ALICE))
    });
    b.turn(bob, |buf| buf.extend_from_slice(&benches::chat_hello(BOB)));
    for _ in 0..2 {
        b.turn(alice, |_| {});
    }
    let stats = || b.lp.chat().expect("chat").stats();
    let accepted_before = stats()[2];
    let allocs = ALLOCS.load(Ordering::Relaxed);
    let delivered = drive(&mut b, alice, bob, n);
    let allocs = ALLOCS.load(Ordering::Relaxed) - allocs;
    assert_eq!(delivered, n, "every message delivered to bob");
    let stats = b.lp.chat().expect("chat").stats();
    assert_eq!(stats[6], 0, "no ERROR frame ({stats:?})");
    println!(
        "messages={n} delivered={delivered} entries accepted={} heap allocations={allocs} \
         per message={:.2}",
        stats[2] - accepted_before,
        allocs as f64 / n.max(1) as f64
    );
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The measured loop: see the module documentation.
#[inline(never)]
fn drive(b: &mut Bench, alice: ConnId, bob: ConnId, n: usize) -> usize {
    let chat = proto::chat::ids::direct_chat(ALICE, BOB);
    let body = [7u8; 100];
    let mut ack = Vec::with_capacity(64);
    proto::chat::Encoder::new(&mut ack).ack(&[(chat, u64::MAX)]);
    let mut delivered = 0;
    let mut sent = 0;
    while sent < n {
        let k = BATCH.min(n - sent);
        delivered += b.turn(alice, |frames| {
            for i in 0..k {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&((sent + i) as u64 + 1).to_le_bytes());
                proto::chat::Encoder::new(frames).send(
                    &id,
                    0,
                    BOB,
                    proto::chat::kind::TEXT,
                    &[0; 16],
                    &body,
                );
            }
        });
        sent += k;
        // Bob acknowledges all he holds (the relay clamps the seq), then alice her receipt.
        delivered += b.turn(bob, |buf| buf.extend_from_slice(&ack));
        delivered += b.turn(alice, |buf| buf.extend_from_slice(&ack));
    }
    delivered
}
