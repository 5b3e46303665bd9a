//! Heap bytes per idle authenticated chat session at up to 50,000 sessions, in one process
//! and without sockets (the RSS measurement with real sockets, `chatperf idle-memory`, reaches
//! 50,000 only on the uring backend on a machine whose descriptor limit is 20,000; see
//! perf/CHAT_RESULTS.md). It counts, with a counting allocator, what the relay's user space
//! holds per session: the engine's session
//! (home role, backlog bookkeeping), `ChatCore`'s, and a backend table entry shaped like
//! `chat_epoll`'s (descriptor, empty read buffer, flags). It leaves out the kernel (socket
//! buffers) and the allocator's own overhead, which the RSS measurement of
//! `chatperf idle-memory` includes.
//!
//! ```text
//! target/release/chat_sessions_memory 50000
//! ```

use relay::chat::ChatConfig;
use relay::io::chat_io::ChatOutput;
use std::collections::HashMap;

#[global_allocator]
static ALLOC: benches::CountingBytes = benches::CountingBytes;

/// What `chat_epoll` keeps per connection, with the descriptor as an integer.
#[allow(dead_code)]
struct ConnSlot {
    fd: i32,
    inbuf: Vec<u8>,
    want_write: bool,
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(50_000, |a| a.parse().expect("a number of sessions"));
    let dir = std::env::temp_dir().join(format!("chat-sessions-memory-{}", std::process::id()));
    let now = benches::NOW;
    // Tokens first: they are the clients' memory, not the relay's.
    let hellos: Vec<Vec<u8>> = (1..=n as u64).map(benches::chat_hello).collect();
    // Sessions opened as fast as the loop runs: the sign-in budget out of the way.
    let (mut core, _listener) = benches::chat_core(
        &dir,
        ChatConfig {
            hellos_per_s: 0,
            ..ChatConfig::default()
        },
        relay::chat::log::LogConfig::default(),
    );
    let mut table: HashMap<relay::chat::msg::ConnId, ConnSlot> = HashMap::new();
    let ip = std::net::IpAddr::from([127, 0, 0, 1]);
    let base = benches::CountingBytes::live();
    println!("| sessions | heap bytes | bytes per session | marginal bytes per session |");
    println!("|---:|---:|---:|---:|");
    let mut last = (0usize, base);
    let mut closes = 0;
    for (i, hello) in hellos.iter().enumerate() {
        let id = core.accept(now, ip);
        let mut slot = ConnSlot {
            fd: i as i32,
            inbuf: Vec::new(),
            want_write: false,
        };
        assert!(core.feed(now, id, &mut slot.inbuf, hello));
        table.insert(id, slot);
        // A turn per 256 sessions, as a loaded shard would: the backlog round trip, then
        // WELCOME and BACKLOG_END written out.
        if (i + 1) % 256 == 0 || i + 1 == n {
            core.end_turn(now).expect("turn");
            core.end_turn(now).expect("turn");
            while let Some(o) = core.poll_output() {
                match o {
                    ChatOutput::Transmit(id) => {
                        let len = core.output(id).len();
                        core.written(now, id, len);
                    }
                    ChatOutput::Close(_) => closes += 1,
                }
            }
        }
        let k = i + 1;
        if k == n / 5 || k == n / 2 || k == n {
            let live = benches::CountingBytes::live();
            println!(
                "| {k} | {} | {:.0} | {:.0} |",
                live - base,
                (live - base) as f64 / k as f64,
                (live - last.1) as f64 / (k - last.0) as f64
            );
            last = (k, live);
        }
    }
    let stats = core.stats();
    assert_eq!(closes, 0, "no session refused ({stats:?})");
    // `stats()` is in ShardStats::CHAT_FIELDS order: sessions first.
    assert_eq!(stats[0], n as u64, "every session open ({stats:?})");
    assert_eq!(
        stats[6], 0,
        "no ERROR frame: every HELLO was accepted ({stats:?})"
    );
    drop(core);
    let _ = std::fs::remove_dir_all(&dir);
}
