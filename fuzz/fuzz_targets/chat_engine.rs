//! Random operation sequences against a two-shard relay's real chat turn: each shard runs the
//! relay's own `ShardLoop` with its `ChatCore` (engine, commit pipeline, checkpoints,
//! compaction, mailbox rings of 16) over an in-memory storage with slow syncs and small
//! segments, and the target is the transport: accepts, raw bytes, well-formed requests from
//! authenticated users, acknowledgements, closes, timers, and kill -9 restarts (the batch in
//! flight torn, the shards rebuilt from what their storage kept). The properties: nothing
//! panics, every output is well framed, every engine keeps its invariants, and every restart
//! replays its records without an error.
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use proto::chat::{ids, kind, Encoder};
use proto::token::{Claims, Permissions, TokenKind, TokenVerifier};
use relay::chat::msg::ConnId;
use relay::chat::{ChatConfig, ChatShard};
use relay::engine::{EngineConfig, Now, Shard as MediaShard};
use relay::io::chat_io::{ChatCore, ChatOutput};
use relay::io::mailbox::mailboxes;
use relay::io::shard_loop::{Clock, ShardLoop, Transport};
use relay::io::storage::{MemDisk, MemStorage, SharedDisk, StorageFaults};
use relay::io::{IoCounters, ShardCtx, ShardStats};
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

const N: u16 = 2;

/// One shard: the relay's loop, an idle media engine, and what the target queued for it.
struct Shard {
    lp: ShardLoop<MemStorage>,
    media: MediaShard,
    ctx: ShardCtx,
    io: FuzzIo,
}

/// The target as one shard's transport: what it queued goes in at the next turn; output is
/// checked to be whole frames and written whole.
#[derive(Default)]
struct FuzzIo {
    /// Users to accept, then bytes for a user's connection, then users whose peer hung up.
    accepts: Vec<u64>,
    bytes: Vec<(u64, Vec<u8>)>,
    hangups: Vec<u64>,
    /// Per user: its connection, if open.
    conns: HashMap<u64, ConnId>,
}

impl FuzzIo {
    fn close(&mut self, core: &mut ChatCore<MemStorage>, now: Now, c: ConnId) {
        if self.conns.values().any(|&v| v == c) {
            self.conns.retain(|_, v| *v != c);
            core.closed(now, c);
        }
    }

    fn write(&mut self, core: &mut ChatCore<MemStorage>, now: Now, c: ConnId) {
        let out = core.output(c);
        let mut at = 0;
        while let Ok(Some((_, n))) = proto::chat::decode(&out[at..]) {
            at += n;
        }
        assert_eq!(at, out.len(), "outputs are whole frames");
        if at > 0 {
            core.written(now, c, at);
        }
    }
}

impl Transport<MemStorage> for FuzzIo {
    fn wait(&mut self, _timeout_us: u64) -> std::io::Result<()> {
        Ok(())
    }

    fn media(&mut self, _engine: &mut MediaShard, _clock: &impl Clock) -> std::io::Result<()> {
        Ok(())
    }

    fn chat_input(&mut self, core: &mut ChatCore<MemStorage>, now: Now) {
        core.drain_waker();
        for user in std::mem::take(&mut self.accepts) {
            if !self.conns.contains_key(&user) {
                let c = core.accept(now, [127, 0, 0, 1].into());
                self.conns.insert(user, c);
            }
        }
        for (user, frame) in std::mem::take(&mut self.bytes) {
            if let Some(&c) = self.conns.get(&user) {
                let mut inbuf = Vec::new();
                if !core.feed(now, c, &mut inbuf, &frame) {
                    self.close(core, now, c);
                }
            }
        }
        for user in std::mem::take(&mut self.hangups) {
            if let Some(&c) = self.conns.get(&user) {
                self.close(core, now, c);
            }
        }
    }

    fn chat_output(&mut self, core: &mut ChatCore<MemStorage>, now: Now) -> std::io::Result<()> {
        while let Some(o) = core.poll_output() {
            match o {
                ChatOutput::Transmit(c) => self.write(core, now, c),
                ChatOutput::Close(c) => self.close(core, now, c),
            }
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

/// Starts both shards on what their disks kept.
fn boot(disks: &[SharedDisk], cfg: &ChatConfig, verifier: &TokenVerifier, slow: u32, now: Now) -> Vec<Shard> {
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
            let stop = Arc::new(AtomicBool::new(false));
            Shard {
                lp: ShardLoop::new(Some(core)),
                media: MediaShard::new(EngineConfig::default(), i as u16, verifier.clone(), now),
                ctx: ShardCtx::new(i as u16, stop, Arc::new(ShardStats::default()), std::time::Instant::now()),
                io: FuzzIo::default(),
            }
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_bytes(&[6; 32]);
    let verifier = TokenVerifier::new(key.verifying_key(), 0);
    let cfg = ChatConfig { window: 4, backlog_chunk: 2, max_out_bytes: 4096, ..ChatConfig::default() };
    let slow = u32::from(data.first().copied().unwrap_or(0) % 3);
    let disks: Vec<SharedDisk> = (0..N).map(|_| SharedDisk::new(MemDisk::default().into())).collect();
    let mut now = Now { mono_us: 1_000_000, unix_s: 1_700_000_000 };
    let mut shards = boot(&disks, &cfg, &verifier, slow, now);
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
            0 => shards[shard].io.accepts.push(user),
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
            7 => shards[shard].io.hangups.push(user),
            8 => now.mono_us += u64::from(id[0]) * 100_000,
            9 => e.group_list(),
            11 => {
                // kill -9: connections gone, batches in flight torn, shards rebuilt.
                for s in shards.drain(..) {
                    s.lp.into_chat().expect("a chat shard").into_storage().crash();
                }
                shards = boot(&disks, &cfg, &verifier, slow, now);
            }
            _ => e.presence_watch(&[peer, u64::from(id[0] % 8)]),
        }
        if !frame.is_empty() {
            shards[shard].io.bytes.push((user, frame));
        }
        // Both shards' turns on the relay's loop, a few rounds: rings, commits, output.
        for _ in 0..8 {
            for s in shards.iter_mut() {
                s.lp.turn(&mut s.media, &mut s.io, &now, &s.ctx).expect("in-memory storage without failures");
                s.lp.chat().expect("a chat shard").engine().check_invariants();
            }
        }
    }
});
