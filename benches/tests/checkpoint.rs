//! A shard's chat checkpoints against its real `ChatCore` and log (small segments, no
//! fdatasync), without sockets: entries for a recipient who stays away hold the old log
//! segments, which no checkpoint can free, so the shard must not snapshot its chats again
//! until a new segment exists (it did, every 100 ms housekeeping).

use proto::chat::Encoder;
use relay::chat::log::{LogConfig, SyncMode};
use relay::chat::ChatConfig;
use relay::engine::Now;

#[test]
fn held_segments_do_not_make_the_shard_checkpoint_every_housekeeping() {
    let dir = std::env::temp_dir().join(format!("checkpoint-test-{}", std::process::id()));
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
    let (mut core, _listener) = benches::chat_core(&dir, cfg, log);
    let mut now = benches::NOW;
    let ip = std::net::IpAddr::from([127, 0, 0, 1]);
    let id = core.accept(now, ip);
    let mut inbuf = Vec::new();
    assert!(core.feed(now, id, &mut inbuf, &benches::chat_hello(1)));
    // User 1 writes 300 messages to user 2, who never connects: every segment keeps a live
    // entry. Records of about 200 bytes fill a 4 KiB segment every 20 or so.
    for i in 0..300u64 {
        let mut frame = Vec::new();
        let mut msg_id = [0u8; 16];
        msg_id[..8].copy_from_slice(&(i + 1).to_le_bytes());
        Encoder::new(&mut frame).send(&msg_id, 0, 2, proto::chat::kind::TEXT, &[0; 16], &[7; 100]);
        assert!(core.feed(now, id, &mut inbuf, &frame));
        core.end_turn(now).expect("turn");
        let out = core.output(id).len();
        core.written(now, id, out);
    }
    // Housekeeping runs every 100 ms: 20 rounds, with nothing new to store.
    let records = |core: &relay::io::chat_io::ChatCore| core.stats()[4];
    let mut per_round = Vec::new();
    for _ in 0..20 {
        now = Now {
            mono_us: now.mono_us + 100_000,
            ..now
        };
        let before = records(&core);
        core.end_turn(now).expect("turn");
        core.end_turn(now).expect("turn");
        per_round.push(records(&core) - before);
    }
    let snapshots: u64 = per_round.iter().sum();
    assert!(
        snapshots <= 1,
        "at most the one checkpoint the held segments call for, then none: {per_round:?}"
    );
    drop(core);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_checkpoint_is_spread_over_loop_turns() {
    const CHATS: u64 = 5_000;
    let dir = std::env::temp_dir().join(format!("checkpoint-spread-{}", std::process::id()));
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
    let (mut core, _listener) = benches::chat_core(&dir, cfg, log);
    let mut now = benches::NOW;
    let ip = std::net::IpAddr::from([127, 0, 0, 1]);
    let id = core.accept(now, ip);
    let mut inbuf = Vec::new();
    assert!(core.feed(now, id, &mut inbuf, &benches::chat_hello(1)));
    // User 1 opens 5,000 direct chats, one message each, to users who never connect.
    for i in 0..CHATS {
        let mut frame = Vec::new();
        let mut msg_id = [0u8; 16];
        msg_id[..8].copy_from_slice(&(i + 1).to_le_bytes());
        let to = i + 2;
        Encoder::new(&mut frame).send(&msg_id, 0, to, proto::chat::kind::TEXT, &[0; 16], b"hi");
        assert!(core.feed(now, id, &mut inbuf, &frame));
        if i % 64 == 63 {
            core.end_turn(now).expect("turn");
            let out = core.output(id).len();
            core.written(now, id, out);
        }
    }
    core.end_turn(now).expect("turn");
    assert_eq!(core.stats()[6], 0, "no ERROR frame");
    // The next housekeeping starts the checkpoint; then turn by turn.
    now = Now {
        mono_us: now.mono_us + 100_000,
        ..now
    };
    let records = |core: &relay::io::chat_io::ChatCore| core.stats()[4];
    let mut per_turn = Vec::new();
    for _ in 0..10 {
        let before = records(&core);
        core.end_turn(now).expect("turn");
        per_turn.push(records(&core) - before);
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
    drop(core);
    let _ = std::fs::remove_dir_all(&dir);
}
