//! Fixtures shared by the criterion benches (`benches/`) and the measuring binaries in
//! `src/bin/` (`count_forward` and `count_chat`, instruction counts under callgrind;
//! `chat_sessions_memory`, heap per chat session; `dedup_growth`, the slowest insert while the
//! deduplication index grows; `checkpoint_cost`, one chat checkpoint's time and bytes;
//! `memory_budget`, heap per room, participant, session, chat and message), so that they
//! measure the same work.

use ed25519_dalek::SigningKey;
use proto::token::{Claims, Permissions, TokenKind, TokenVerifier};
use relay::engine::{EngineConfig, Now, Shard, Verdict};
use std::net::SocketAddr;

/// A global allocator that forwards to the system's and counts the bytes live, for the
/// binaries that measure heap use (`chat_sessions_memory`, `memory_budget`): each declares
/// `#[global_allocator] static ALLOC: benches::CountingBytes = benches::CountingBytes;`.
pub struct CountingBytes;

static LIVE_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl CountingBytes {
    /// Bytes allocated and not yet freed, through this allocator.
    pub fn live() -> usize {
        LIVE_BYTES.load(std::sync::atomic::Ordering::Relaxed)
    }
}

// SAFETY: forwards every call to the system allocator unchanged and only counts.
unsafe impl std::alloc::GlobalAlloc for CountingBytes {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(l.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        LIVE_BYTES.fetch_sub(l.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { std::alloc::System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new, std::sync::atomic::Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(l.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { std::alloc::System.realloc(p, l, new) }
    }
}

/// A fixed key for benchmark tokens.
pub fn key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

/// A fixed time.
pub const NOW: Now = Now {
    mono_us: 1_000_000,
    unix_s: 1_700_000_000,
};

/// A token for `participant` in `room`, signed with [`key`].
pub fn token(room: u64, participant: u64) -> String {
    Claims {
        kind: TokenKind::Room,
        permissions: Permissions::PUBLISH | Permissions::SUBSCRIBE,
        relay_id: 0,
        shard_idx: 0,
        expires_at: NOW.unix_s + 3600,
        scope_id: room,
        participant_id: participant,
    }
    .sign_text(&key())
}

/// A STUN Binding request carrying `token`.
pub fn binding_request(token: &str) -> Vec<u8> {
    binding_request_with(token, None)
}

/// A STUN Binding request carrying `token` and the relay's cookie `nonce`.
pub fn binding_request_with(token: &str, nonce: Option<&[u8]>) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    let k = proto::token::stun_key(token.as_bytes());
    let n = proto::stun::write_binding_request_with_nonce(
        &mut buf,
        &[5; 12],
        token.as_bytes(),
        nonce,
        &k,
    )
    .expect("fits");
    buf.truncate(n);
    buf
}

/// Binds `token` at `src` on `shard` as a client does: the request, then again with the
/// cookie of the relay's challenge. Panics unless it binds.
pub fn bind(shard: &mut Shard, src: SocketAddr, token: &str) {
    let mut reply = [0u8; 512];
    let nonce = match shard.handle_datagram(NOW, src, &binding_request(token), &mut reply) {
        Verdict::Reply(n) => proto::stun::challenge_nonce(&reply[..n]).map(<[u8]>::to_vec),
        other => panic!("no answer to a binding: {other:?}"),
    };
    let req = binding_request_with(token, nonce.as_deref());
    match shard.handle_datagram(NOW, src, &req, &mut reply) {
        Verdict::Reply(n) => {
            let m = proto::stun::StunMessage::parse(&reply[..n]).expect("STUN");
            assert_eq!(m.class(), proto::stun::Class::Success, "bound");
        }
        other => panic!("bind failed: {other:?}"),
    }
}

/// A shard with one room of one publisher and `n_subscribers` subscribers, plus `n_other_rooms`
/// rooms of two participants each so that the address table is not trivially small. Returns
/// the shard, the publisher's address and a 1200-byte RTP packet from it.
pub fn room(n_subscribers: usize, n_other_rooms: usize) -> (Shard, SocketAddr, Vec<u8>) {
    let cfg = EngineConfig {
        max_participants_per_room: n_subscribers + 1,
        participant_pps: 0,
        participant_bps: 0,
        new_binding_rate: 0,
        ..EngineConfig::default()
    };
    let mut shard = Shard::new(cfg, 0, TokenVerifier::new(key().verifying_key(), 0), NOW);
    let mut reply = [0u8; 512];
    let bind = |shard: &mut Shard, port: u16, room: u64, participant: u64| {
        let src = SocketAddr::from(([10, 0, (port >> 8) as u8, port as u8], port));
        self::bind(shard, src, &token(room, participant));
        src
    };
    let publisher = bind(&mut shard, 1000, 1, 1);
    for i in 0..n_subscribers {
        bind(&mut shard, 2000 + i as u16, 1, 2 + i as u64);
    }
    for r in 0..n_other_rooms {
        bind(&mut shard, 10_000 + 2 * r as u16, 100 + r as u64, 1);
        bind(&mut shard, 10_001 + 2 * r as u16, 100 + r as u64, 2);
    }
    let mut packet = vec![0u8; 1200];
    proto::rtp::write_packet(&mut packet, 96, 1, 960, 0x1234_5678, false, &[0x5a; 1188])
        .expect("fits");
    // The first packet teaches the engine the SSRC; later ones take the steady-state path.
    assert!(matches!(
        shard.handle_datagram(NOW, publisher, &packet, &mut reply),
        Verdict::Forward(_) | Verdict::Drop(_)
    ));
    (shard, publisher, packet)
}

/// One forwarding decision: returns the number of destinations.
#[inline]
pub fn forward_once(shard: &mut Shard, src: SocketAddr, packet: &[u8], reply: &mut [u8]) -> usize {
    match shard.handle_datagram(NOW, src, packet, reply) {
        Verdict::Forward(d) => d.len(),
        _ => 0,
    }
}

/// A chat HELLO for `user`, with a user token for shard 0 of a 1-shard relay signed with
/// [`key`], valid for an hour after [`NOW`].
pub fn chat_hello(user: u64) -> Vec<u8> {
    let token = Claims {
        kind: TokenKind::User,
        permissions: Permissions::CHAT,
        relay_id: 0,
        shard_idx: 0,
        expires_at: NOW.unix_s + 3600,
        scope_id: user,
        participant_id: user,
    }
    .sign_text(&key());
    let mut hello = Vec::new();
    proto::chat::Encoder::new(&mut hello).hello(token.as_bytes());
    hello
}

/// One shard's real chat core (engine, log, mailbox) of a 1-shard relay trusting [`key`],
/// over the fresh directory `dir`, with the fdatasync inline (no sync thread). The listener is
/// returned for the caller to keep open; nothing accepts on it.
pub fn chat_core(
    dir: &std::path::Path,
    cfg: relay::chat::ChatConfig,
    log: relay::chat::log::LogConfig,
) -> (relay::io::chat_io::ChatCore, std::net::TcpListener) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("temp dir");
    reopen_chat_core(dir, cfg, log).expect("chat core")
}

/// A shard's `ChatCore` on the log already in `dir` (a restart: the log is recovered and
/// replayed), with a fresh listener and mailbox.
pub fn reopen_chat_core(
    dir: &std::path::Path,
    cfg: relay::chat::ChatConfig,
    log: relay::chat::log::LogConfig,
) -> std::io::Result<(relay::io::chat_io::ChatCore, std::net::TcpListener)> {
    let verifier = TokenVerifier::new(key().verifying_key(), 0);
    let parts = relay::io::chat_io::ChatParts {
        engine: relay::chat::ChatShard::new(0, 1, cfg, verifier),
        dir: dir.to_path_buf(),
        log,
        sync_thread: false,
        max_conns: relay::io::chat_io::MAX_CONNS,
        listener: std::net::TcpListener::bind("127.0.0.1:0").expect("listener"),
        mailbox: relay::io::mailbox::mailboxes(1, relay::io::mailbox::RING_CAPACITY)
            .expect("eventfd")
            .pop()
            .expect("one"),
    };
    relay::io::chat_io::ChatCore::open(parts)
}
