//! Random operation sequences against the sans-IO chat engine of a two-shard relay: accepts,
//! raw bytes, well-formed requests from authenticated users, acknowledgements, closes, timers,
//! commits, checkpoints and restarts (the shards rebuilt from what their logs keep, records
//! deleted only as a dead prefix as the real log does). The properties: nothing panics, every
//! output is well framed, and every restart replays its logs without an error.
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use proto::chat::{ids, kind, Encoder};
use proto::token::{Claims, Permissions, TokenKind, TokenVerifier};
use relay::chat::{ChatConfig, ChatShard};
use relay::engine::Now;

const N: u16 = 2;

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_bytes(&[6; 32]);
    let verifier = TokenVerifier::new(key.verifying_key(), 0);
    let cfg = ChatConfig { window: 4, backlog_chunk: 2, max_out_bytes: 4096, ..ChatConfig::default() };
    let mut shards: Vec<ChatShard> = (0..N).map(|i| ChatShard::new(i, N, cfg.clone(), verifier.clone())).collect();
    let mut now = Now { mono_us: 1_000_000, unix_s: 1_700_000_000 };
    let mut lsn = 1u64;
    // Per shard: committed records still kept (lsn -> kind, payload) and those marked dead.
    let mut logs: Vec<std::collections::BTreeMap<u64, (u8, Vec<u8>)>> = (0..N).map(|_| Default::default()).collect();
    let mut dead: Vec<std::collections::HashSet<u64>> = (0..N).map(|_| Default::default()).collect();
    let token = |user: u64| {
        Claims { kind: TokenKind::User, permissions: Permissions::CHAT, relay_id: 0, shard_idx: ids::home_shard(user, N), expires_at: now.unix_s + 60, scope_id: user, participant_id: user }
            .sign_text(&key)
    };
    let mut it = data.iter().copied();
    while let Some(op) = it.next() {
        let user = u64::from(it.next().unwrap_or(0) % 6) + 1;
        let conn = user; // one connection slot per user
        let shard = usize::from(ids::home_shard(user, N));
        let mut frame = Vec::new();
        let mut e = Encoder::new(&mut frame);
        let peer = u64::from(it.next().unwrap_or(0) % 6) + 1;
        let mut id = [0u8; 16];
        id[0] = it.next().unwrap_or(0);
        match op % 13 {
            0 => {
                shards[shard].handle_accept(now, conn, [127, 0, 0, 1].into());
            }
            1 => e.hello(token(user).as_bytes()),
            2 => e.send(&id, 0, peer, kind::TEXT, &[0; 16], b"x"),
            3 => e.ack(&[(ids::direct_chat(user, peer), u64::from(id[0]))]),
            4 => e.group_create(&id, &[peer]),
            5 => e.group_add(&id, ids::group_chat(peer, &id), user),
            6 => {
                let n = usize::from(id[0] % 32);
                let raw: Vec<u8> = it.by_ref().take(n).collect();
                frame.extend_from_slice(&raw);
            }
            7 => shards[shard].handle_closed(now, conn),
            8 => {
                now.mono_us += u64::from(id[0]) * 100_000;
                shards.iter_mut().for_each(|s| s.handle_timeout(now));
            }
            9 => e.group_list(),
            11 => shards.iter_mut().for_each(ChatShard::checkpoint),
            12 => {
                // A restart: every connection is gone, the engines are rebuilt from the logs.
                shards = (0..N).map(|i| ChatShard::new(i, N, cfg.clone(), verifier.clone())).collect();
                for (i, shard) in shards.iter_mut().enumerate() {
                    for (&l, (k, p)) in &logs[i] {
                        shard.replay(l, *k, p).expect("a log the engine wrote replays");
                    }
                    shard.finish_replay().expect("a log the engine wrote recovers");
                    shard.check_invariants();
                    for l in shard.take_dead() {
                        dead[i].insert(l);
                    }
                }
            }
            _ => e.presence_watch(&[peer, u64::from(id[0] % 8)]),
        }
        if !frame.is_empty() {
            shards[shard].handle_read(now, conn, &frame);
        }
        // Deliver cross-shard messages and commit everything, a few rounds.
        for _ in 0..8 {
            for i in 0..usize::from(N) {
                if shards[i].has_records() {
                    let records = shards[i].take_records();
                    let mut lsns = Vec::new();
                    for (k, p) in records.iter() {
                        logs[i].insert(lsn, (k, p.to_vec()));
                        lsns.push(lsn);
                        lsn += 1;
                    }
                    shards[i].handle_committed(now, &lsns);
                }
                dead[i].extend(shards[i].take_dead());
                // Deleted only as a dead prefix, as the real log deletes segments.
                while let Some((&first, _)) = logs[i].first_key_value() {
                    if !dead[i].remove(&first) {
                        break;
                    }
                    logs[i].remove(&first);
                }
                // Each destination's messages together, in order, as the driver hands a ring's.
                let mut by_dest: Vec<Vec<_>> = (0..N).map(|_| Vec::new()).collect();
                for (to, m) in shards[i].take_outbox() {
                    by_dest[usize::from(to)].push(m);
                }
                for (to, msgs) in by_dest.into_iter().enumerate() {
                    if !msgs.is_empty() {
                        shards[to].handle_shard_msgs(now, msgs);
                    }
                }
                for c in shards[i].take_dirty() {
                    let out = shards[i].output(c).to_vec();
                    let mut at = 0;
                    while let Ok(Some((_, n))) = proto::chat::decode(&out[at..]) {
                        at += n;
                    }
                    assert_eq!(at, out.len(), "outputs are whole frames");
                    shards[i].handle_written(now, c, out.len());
                }
                for c in shards[i].take_closing() {
                    shards[i].handle_closed(now, c);
                }
                shards[i].check_invariants();
            }
        }
    }
});
