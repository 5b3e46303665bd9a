//! Random operation sequences against a two-shard relay's real chat turn: each shard is a
//! `ChatCore` (engine, commit pipeline, checkpoints, compaction, mailbox rings of 16) over an
//! in-memory storage with slow syncs and small segments, and the target plays the transport:
//! accepts, raw bytes, well-formed requests from authenticated users, acknowledgements,
//! closes, timers, and kill -9 restarts (the batch in flight torn, the shards rebuilt from what
//! their storage kept). The properties: nothing panics, every output is well framed, every
//! engine keeps its invariants, and every restart replays its records without an error.
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use proto::chat::{ids, kind, Encoder};
use proto::token::{Claims, Permissions, TokenKind, TokenVerifier};
use relay::chat::{ChatConfig, ChatShard};
use relay::engine::Now;
use relay::io::chat_io::ChatCore;
use relay::io::mailbox::mailboxes;
use relay::io::storage::{MemDisk, MemStorage, SharedDisk, StorageFaults};
use std::collections::HashMap;

const N: u16 = 2;

type Core = ChatCore<MemStorage>;

/// Starts both shards on what their disks kept.
fn boot(disks: &[SharedDisk], cfg: &ChatConfig, verifier: &TokenVerifier, slow: u32) -> Vec<Core> {
    let boxes = mailboxes(usize::from(N), 16).expect("eventfd");
    boxes
        .into_iter()
        .enumerate()
        .map(|(i, mailbox)| {
            let faults = StorageFaults { max_sync_polls: slow, fail_per_64k: 0 };
            let (storage, records) = MemStorage::open(disks[i].clone(), 4, faults, 1 + i as u64);
            let engine = ChatShard::new(i as u16, N, cfg.clone(), verifier.clone());
            let core = ChatCore::new(engine, storage, records.iter().map(|(l, k, p)| (*l, *k, &p[..])), mailbox, 64)
                .expect("records the engine wrote replay");
            core.engine().check_invariants();
            core
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_bytes(&[6; 32]);
    let verifier = TokenVerifier::new(key.verifying_key(), 0);
    let cfg = ChatConfig { window: 4, backlog_chunk: 2, max_out_bytes: 4096, ..ChatConfig::default() };
    let slow = u32::from(data.first().copied().unwrap_or(0) % 3);
    let disks: Vec<SharedDisk> = (0..N).map(|_| SharedDisk::new(MemDisk::default().into())).collect();
    let mut cores = boot(&disks, &cfg, &verifier, slow);
    let mut now = Now { mono_us: 1_000_000, unix_s: 1_700_000_000 };
    // Per user: its shard's connection, if open.
    let mut conns: HashMap<u64, relay::chat::msg::ConnId> = HashMap::new();
    let token = |user: u64, now: Now| {
        Claims { kind: TokenKind::User, permissions: Permissions::CHAT, relay_id: 0, shard_idx: ids::home_shard(user, N), expires_at: now.unix_s + 60, scope_id: user, participant_id: user }
            .sign_text(&key)
    };
    let mut it = data.iter().copied().skip(1);
    while let Some(op) = it.next() {
        let user = u64::from(it.next().unwrap_or(0) % 6) + 1;
        let shard = usize::from(ids::home_shard(user, N));
        let mut frame = Vec::new();
        let mut e = Encoder::new(&mut frame);
        let peer = u64::from(it.next().unwrap_or(0) % 6) + 1;
        let mut id = [0u8; 16];
        id[0] = it.next().unwrap_or(0);
        match op % 13 {
            0 => {
                if !conns.contains_key(&user) {
                    let c = cores[shard].accept(now, [127, 0, 0, 1].into());
                    conns.insert(user, c);
                }
            }
            1 => e.hello(token(user, now).as_bytes()),
            2 => e.send(&id, 0, peer, kind::TEXT, &[0; 16], b"x"),
            3 => e.ack(&[(ids::direct_chat(user, peer), u64::from(id[0]))]),
            4 => e.group_create(&id, &[peer]),
            5 => e.group_add(&id, ids::group_chat(peer, &id), user),
            6 => {
                let n = usize::from(id[0] % 32);
                let raw: Vec<u8> = it.by_ref().take(n).collect();
                frame.extend_from_slice(&raw);
            }
            7 => {
                if let Some(c) = conns.remove(&user) {
                    cores[shard].closed(now, c);
                }
            }
            8 => now.mono_us += u64::from(id[0]) * 100_000,
            9 => e.group_list(),
            11 => {
                // kill -9: connections gone, batches in flight torn, shards rebuilt.
                for core in cores.drain(..) {
                    core.into_storage().crash();
                }
                conns.clear();
                cores = boot(&disks, &cfg, &verifier, slow);
            }
            _ => e.presence_watch(&[peer, u64::from(id[0] % 8)]),
        }
        if !frame.is_empty() {
            if let Some(&c) = conns.get(&user) {
                let mut inbuf = Vec::new();
                if !cores[shard].feed(now, c, &mut inbuf, &frame) {
                    conns.remove(&user);
                    cores[shard].closed(now, c);
                }
            }
        }
        // Run both shards' turns a few rounds: rings, commits, output written whole.
        for _ in 0..8 {
            for i in 0..usize::from(N) {
                cores[i].end_turn(now).expect("in-memory storage without failures");
                let mut dirty = cores[i].take_dirty();
                let mut closing = cores[i].take_closing(now);
                for &c in dirty.iter().chain(&closing) {
                    let out = cores[i].output(c).to_vec();
                    let mut at = 0;
                    while let Ok(Some((_, n))) = proto::chat::decode(&out[at..]) {
                        at += n;
                    }
                    assert_eq!(at, out.len(), "outputs are whole frames");
                    if !out.is_empty() {
                        cores[i].written(now, c, out.len());
                    }
                }
                for &c in &closing {
                    if conns.values().any(|&v| v == c) {
                        conns.retain(|_, v| *v != c);
                        cores[i].closed(now, c);
                    }
                }
                dirty.clear();
                closing.clear();
                cores[i].give_back_dirty(dirty);
                cores[i].give_back_closing(closing);
                cores[i].engine().check_invariants();
            }
        }
    }
});
