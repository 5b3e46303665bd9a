//! Random datagrams from a few sources against the media engine, with a valid binding mixed
//! in: no panic, no reply larger than its request, invariants hold.
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use proto::token::{Claims, Permissions, TokenKind, TokenVerifier};
use relay::engine::{EngineConfig, Now, Shard, Verdict};
use std::net::SocketAddr;

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_bytes(&[5; 32]);
    let now = Now { mono_us: 1_000_000, unix_s: 1_700_000_000 };
    let cfg = EngineConfig { binding_ttl_us: 50_000, ..EngineConfig::default() };
    let mut shard = Shard::new(cfg, 0, TokenVerifier::new(key.verifying_key(), 0), now);
    let token = |p: u64| {
        Claims { kind: TokenKind::Room, permissions: Permissions::ALL, relay_id: 0, shard_idx: 0, expires_at: now.unix_s + 60, scope_id: 1, participant_id: p }
            .sign_text(&key)
    };
    let mut reply = [0u8; 512];
    for p in 1..=2u16 {
        let t = token(u64::from(p));
        let k = proto::token::stun_key(t.as_bytes());
        let mut req = [0u8; 512];
        let src = SocketAddr::from(([10, 0, 0, p as u8], 1000));
        let n = proto::stun::write_binding_request(&mut req, &[p as u8; 12], t.as_bytes(), &k).unwrap();
        // A new address is challenged first; the request goes again with its cookie.
        let nonce = match shard.handle_datagram(now, src, &req[..n], &mut reply) {
            Verdict::Reply(r) => proto::stun::challenge_nonce(&reply[..r]).map(<[u8]>::to_vec),
            _ => None,
        };
        let n = proto::stun::write_binding_request_with_nonce(&mut req, &[p as u8; 12], t.as_bytes(), nonce.as_deref(), &k).unwrap();
        shard.handle_datagram(now, src, &req[..n], &mut reply);
    }
    // Input: records of [source u8][len u8][bytes...].
    let mut at = 0;
    let mut t = now;
    while at + 2 <= data.len() {
        let src = SocketAddr::from(([10, 0, 0, data[at] % 4], 1000));
        let len = usize::from(data[at + 1]).min(data.len() - at - 2);
        let dgram = &data[at + 2..at + 2 + len];
        if let Verdict::Reply(n) = shard.handle_datagram(t, src, dgram, &mut reply) {
            assert!(n <= dgram.len(), "no amplification");
        }
        t.mono_us += 7_000;
        shard.handle_timeout(t);
        at += 2 + len;
    }
    shard.check_invariants();
});
