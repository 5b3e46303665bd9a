//! A shard's chat checkpoints against its real `ChatCore` and log (small segments, no
//! fdatasync), without sockets: entries for a recipient who stays away hold the old log
//! segments, which no checkpoint can free, so the shard must not snapshot its chats again
//! until a new segment exists (it did, every 100 ms housekeeping).

use proto::chat::Encoder;
use relay::chat::log::{LogConfig, SyncMode};
use relay::chat::ChatConfig;
use relay::engine::Now;
use relay::io::chat_io::ChatCore;

/// One shard's chat with 4 KiB log segments and user 1 logged in, sending to users who never
/// connect.
struct Shard {
    core: ChatCore,
    _listener: std::net::TcpListener,
    dir: std::path::PathBuf,
    now: Now,
    conn: u64,
    inbuf: Vec<u8>,
}

impl Shard {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let cfg = ChatConfig {
            msgs_per_s: 1_000_000,
            msgs_burst: 1_000_000,
            ..ChatConfig::default()
        };
        let log = LogConfig {
            segment_bytes: 4096,
            sync: SyncMode::None,
            ..LogConfig::default()
        };
        let (mut core, listener) = benches::chat_core(&dir, cfg, log);
        let now = benches::NOW;
        let conn = core.accept(now, std::net::IpAddr::from([127, 0, 0, 1]));
        let mut inbuf = Vec::new();
        assert!(core.feed(now, conn, &mut inbuf, &benches::chat_hello(1)));
        Self {
            core,
            _listener: listener,
            dir,
            now,
            conn,
            inbuf,
        }
    }

    /// User 1's message number `n` (its id) to user `to`.
    fn send(&mut self, n: u64, to: u64, body: &[u8]) {
        let mut frame = Vec::new();
        let mut msg_id = [0u8; 16];
        msg_id[..8].copy_from_slice(&n.to_le_bytes());
        Encoder::new(&mut frame).send(&msg_id, 0, to, proto::chat::kind::TEXT, &[0; 16], body);
        assert!(self.core.feed(self.now, self.conn, &mut self.inbuf, &frame));
    }

    /// A loop turn, with user 1's output taken as written.
    fn turn(&mut self) {
        self.core.end_turn(self.now).expect("turn");
        let out = self.core.output(self.conn).len();
        self.core.written(self.now, self.conn, out);
    }

    /// 100 ms on: the next turn runs housekeeping.
    fn next_housekeeping(&mut self) {
        self.now = Now {
            mono_us: self.now.mono_us + 100_000,
            ..self.now
        };
    }

    /// Log records appended so far.
    fn records(&self) -> u64 {
        self.core.stats()[4]
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn held_segments_do_not_make_the_shard_checkpoint_every_housekeeping() {
    let mut s = Shard::new("checkpoint-test");
    // User 1 writes 300 messages to user 2, who never connects: every segment keeps a live
    // entry. Records of about 200 bytes fill a 4 KiB segment every 20 or so.
    for i in 0..300u64 {
        s.send(i + 1, 2, &[7; 100]);
        s.turn();
    }
    // Housekeeping runs every 100 ms: 20 rounds, with nothing new to store.
    let mut per_round = Vec::new();
    for _ in 0..20 {
        s.next_housekeeping();
        let before = s.records();
        s.turn();
        s.turn();
        per_round.push(s.records() - before);
    }
    let snapshots: u64 = per_round.iter().sum();
    assert!(
        snapshots <= 1,
        "at most the one checkpoint the held segments call for, then none: {per_round:?}"
    );
}

#[test]
fn a_checkpoint_is_spread_over_loop_turns() {
    const CHATS: u64 = 5_000;
    let mut s = Shard::new("checkpoint-spread");
    // User 1 opens 5,000 direct chats, one message each, to users who never connect.
    for i in 0..CHATS {
        s.send(i + 1, i + 2, b"hi");
        if i % 64 == 63 {
            s.turn();
        }
    }
    s.turn();
    assert_eq!(s.core.stats()[6], 0, "no ERROR frame");
    // The next housekeeping starts the checkpoint; then turn by turn.
    s.next_housekeeping();
    let mut per_turn = Vec::new();
    for _ in 0..10 {
        let before = s.records();
        s.turn();
        per_turn.push(s.records() - before);
    }
    let budget = relay::io::chat_io::CHECKPOINT_CHATS_PER_TURN as u64;
    assert!(
        budget < CHATS,
        "the test needs more chats than one turn's budget"
    );
    assert!(
        per_turn.iter().filter(|&&n| n > 0).count() >= 2,
        "spread over turns: {per_turn:?}"
    );
    assert!(
        per_turn.iter().all(|&n| n <= budget),
        "at most {budget} snapshots a turn: {per_turn:?}"
    );
    assert_eq!(
        per_turn.iter().sum::<u64>(),
        CHATS,
        "every chat snapshotted once: {per_turn:?}"
    );
}
