//! A shard's chat checkpoints against its real `ChatCore` and log (small segments, no
//! fdatasync), without sockets: entries for a recipient who stays away hold the old log
//! segments, which no checkpoint can free, so the shard must not snapshot its chats again
//! until a new segment exists (it did, every 100 ms housekeeping); a checkpoint is spread over
//! loop turns; and the log a checkpoint leaves behind is recovered on restart.

use proto::chat::{Encoder, Frame};
use relay::chat::log::{LogConfig, SyncMode};
use relay::chat::msg::ConnId;
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
    conn: ConnId,
    inbuf: Vec<u8>,
}

impl Shard {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let (mut core, listener) = benches::chat_core(&dir, Self::cfg(), Self::log());
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

    fn cfg() -> ChatConfig {
        ChatConfig {
            msgs_per_s: 1_000_000,
            msgs_burst: 1_000_000,
            // 5,000 sign-ins at one instant of this test's clock.
            hellos_per_s: 0,
            ..ChatConfig::default()
        }
    }

    fn log() -> LogConfig {
        LogConfig {
            segment_bytes: 4096,
            sync: SyncMode::None,
            ..LogConfig::default()
        }
    }

    /// Logs `user` in on a new connection; returns its id.
    fn connect(&mut self, user: u64) -> ConnId {
        let conn = self
            .core
            .accept(self.now, std::net::IpAddr::from([127, 0, 0, 1]));
        let mut inbuf = Vec::new();
        assert!(self
            .core
            .feed(self.now, conn, &mut inbuf, &benches::chat_hello(user)));
        assert!(inbuf.is_empty());
        conn
    }

    /// The frames queued for `conn`, taken as written.
    fn take(&mut self, conn: ConnId) -> Vec<Got> {
        let out = self.core.output(conn).to_vec();
        self.core.written(self.now, conn, out.len());
        let mut got = Vec::new();
        let mut at = 0;
        while let Some((f, n)) = proto::chat::decode(&out[at..]).expect("relay output") {
            at += n;
            got.push(match f {
                Frame::Msg(e) => Got::Msg {
                    chat: e.chat_id,
                    seq: e.seq,
                    body: e.body.to_vec(),
                },
                Frame::Sent { .. } => Got::Sent,
                Frame::BacklogEnd => Got::BacklogEnd,
                _ => Got::Other,
            });
        }
        got
    }

    /// `conn` acknowledges every MSG in `got` (the highest seq of each chat; 1,000 chats a
    /// frame at most).
    fn ack(&mut self, conn: ConnId, got: &[Got]) {
        let mut last = std::collections::BTreeMap::new();
        for g in got {
            if let Got::Msg { chat, seq, .. } = g {
                let e = last.entry(*chat).or_insert(0);
                *e = (*e).max(*seq);
            }
        }
        let pairs: Vec<(u64, u64)> = last.into_iter().collect();
        for chunk in pairs.chunks(1000) {
            let mut frame = Vec::new();
            Encoder::new(&mut frame).ack(chunk);
            let mut inbuf = Vec::new();
            assert!(self.core.feed(self.now, conn, &mut inbuf, &frame));
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

/// A frame a client got, as far as these tests look.
#[derive(Debug, PartialEq)]
enum Got {
    Msg { chat: u64, seq: u64, body: Vec<u8> },
    Sent,
    BacklogEnd,
    Other,
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
    // The oldest segment holds a waiting entry, so no snapshot can free anything: none is
    // written (one per round before e1911b9, one checkpoint after it, none since a checkpoint
    // rewrites only the snapshots that hold back compaction).
    assert_eq!(snapshots, 0, "{per_round:?}");
}

#[test]
fn a_checkpoint_is_spread_over_loop_turns() {
    const CHATS: u64 = 5_000;
    let mut s = Shard::new("checkpoint-spread");
    // User 1 opens 5,000 direct chats, one message each; each recipient comes, acknowledges
    // it, and user 1 acknowledges the DELIVERED receipts. What is left in the log's older
    // segments is the chats' snapshots, which a checkpoint moves to the newest.
    for i in 0..CHATS {
        s.send(i + 1, i + 2, b"hi");
        if i % 64 == 63 {
            s.turn();
        }
    }
    s.turn();
    for i in 0..CHATS {
        let conn = s.connect(i + 2);
        s.core.end_turn(s.now).expect("turn");
        let got = s.take(conn);
        assert!(got.iter().any(|g| matches!(g, Got::Msg { .. })));
        s.ack(conn, &got);
        s.core.closed(s.now, conn);
    }
    s.core.end_turn(s.now).expect("turn");
    let receipts = s.take(s.conn);
    s.ack(s.conn, &receipts);
    s.turn();
    s.turn();
    assert_eq!(s.core.stats()[6], 0, "no ERROR frame");
    assert_eq!(s.core.stats()[1], 0, "nothing waits for anyone");
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
    // Every chat once, but for those whose snapshot is in the newest segment already (a
    // 4 KiB segment holds a few dozen records).
    let total = per_turn.iter().sum::<u64>();
    assert!(
        (CHATS - 100..=CHATS).contains(&total),
        "every chat snapshotted once: {per_turn:?}"
    );
}

/// A checkpoint's snapshot of a chat can follow entries of that chat still waiting for a
/// recipient, once the segment with the chat's previous snapshot is deleted; the shard used to
/// refuse to start on such a log ("entry for unknown chat"), which is the usual state of a
/// messenger's log after a checkpoint (someone is always away).
#[test]
fn a_shard_restarts_on_the_log_a_checkpoint_left() {
    let mut s = Shard::new("checkpoint-restart");
    let bob = s.connect(2);
    s.turn();
    s.take(bob);
    // The chat's snapshot goes into the first segment; then an exchange acknowledged on both
    // sides fills several more segments with dead records.
    for i in 0..200u64 {
        s.send(i + 1, 2, &[7; 100]);
        s.core.end_turn(s.now).expect("turn");
        let got = s.take(bob);
        s.ack(bob, &got);
        s.core.end_turn(s.now).expect("turn");
        let receipts = s.take(s.conn);
        assert!(receipts.iter().any(|g| matches!(g, Got::Msg { .. })));
        s.ack(s.conn, &receipts);
        s.turn();
    }
    // Bob goes away; two messages wait for him.
    s.core.closed(s.now, bob);
    s.send(1001, 2, b"waiting 1");
    s.send(1002, 2, b"waiting 2");
    s.turn();
    // Housekeeping: the log spans 3 segments or more, so a checkpoint writes a new snapshot
    // after the waiting entries; the old one dies, and with it the first segment.
    let segments_before = std::fs::read_dir(&s.dir).unwrap().count();
    for _ in 0..3 {
        s.next_housekeeping();
        s.turn();
        s.turn();
    }
    let segments_after = std::fs::read_dir(&s.dir).unwrap().count();
    assert!(
        segments_after < segments_before,
        "the checkpoint let old segments go: {segments_before} -> {segments_after} files"
    );
    // Restart on the same directory (the old core simply stops, as after kill -9).
    let (core, listener) = benches::reopen_chat_core(&s.dir, Shard::cfg(), Shard::log())
        .expect("the shard restarts on its log");
    s.core = core;
    s._listener = listener;
    // (Connection ids start again: `s.turn` would take Bob's output for Alice's.)
    let bob = s.connect(2);
    s.core.end_turn(s.now).expect("turn");
    let got = s.take(bob);
    let bodies: Vec<&[u8]> = got
        .iter()
        .filter_map(|g| match g {
            Got::Msg { body, .. } => Some(body.as_slice()),
            _ => None,
        })
        .collect();
    assert_eq!(bodies, [&b"waiting 1"[..], &b"waiting 2"[..]]);
    assert!(got.contains(&Got::BacklogEnd));
}
