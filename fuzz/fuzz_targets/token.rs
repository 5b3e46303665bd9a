//! Join tokens: verify arbitrary bytes (binary and text forms) with a fixed key — never a
//! panic, and an accepted token's body is exactly the encoding of the claims returned; and
//! sign fuzzer-chosen claims, check they verify, and that flipping any one bit is refused.
#![no_main]

use std::sync::OnceLock;

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use proto::token::{Claims, Permissions, TokenKind, TokenVerifier, TOKEN_LEN};

const RELAY_ID: u32 = 7;

fn key() -> &'static (SigningKey, TokenVerifier) {
    static KEY: OnceLock<(SigningKey, TokenVerifier)> = OnceLock::new();
    KEY.get_or_init(|| {
        let sk = SigningKey::from_bytes(&[7; 32]);
        let v = TokenVerifier::new(sk.verifying_key(), RELAY_ID);
        (sk, v)
    })
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fuzz_target!(|data: &[u8]| {
    let (sk, verifier) = key();
    let now = data
        .first_chunk::<8>()
        .map_or(0, |b| u64::from_le_bytes(*b));

    // Arbitrary input, as bytes and as text, at a fixed and at a fuzzer-chosen time.
    for t in [0, now] {
        if let Ok(claims) = verifier.verify(data, t) {
            // Forging is out of reach of a fuzzer, but the property is cheap to state.
            assert_eq!(data.len(), TOKEN_LEN);
            assert_eq!(&claims.sign(sk)[..36], &data[..36]);
        }
        if let Ok(claims) = verifier.verify_text(data, t) {
            assert_eq!(
                verifier.verify_text(claims.sign_text(sk).as_bytes(), t),
                Ok(claims)
            );
        }
    }

    // Claims chosen by the fuzzer round-trip through sign/verify; any flipped bit is refused.
    let Some(b) = data.first_chunk::<40>() else {
        return;
    };
    let claims = Claims {
        kind: if b[0] & 1 == 0 {
            TokenKind::Room
        } else {
            TokenKind::User
        },
        permissions: Permissions(b[1] & Permissions::ALL.0),
        relay_id: u32::from_le_bytes([b[2], b[3], b[4], b[5]]) % 16,
        shard_idx: u16::from_le_bytes([b[6], b[7]]),
        expires_at: u64_at(b, 8),
        scope_id: u64_at(b, 16),
        participant_id: u64_at(b, 24),
    };
    let now = u64_at(b, 32);
    let token = claims.sign(sk);
    let text = claims.sign_text(sk);
    let expected = verifier.verify(&token, now);
    assert_eq!(verifier.verify_text(text.as_bytes(), now), expected);
    if claims.expires_at > now && (claims.relay_id == 0 || claims.relay_id == RELAY_ID) {
        assert_eq!(expected, Ok(claims));
    } else {
        assert!(expected.is_err());
    }
    // Only the signature and field checks can refuse a token for relay 0 at time 0.
    let any_relay = TokenVerifier::new(sk.verifying_key(), 0);
    if claims.expires_at > 0 {
        assert_eq!(any_relay.verify(&token, 0), Ok(claims));
    }
    let byte = usize::from(data.get(40).copied().unwrap_or(0)) % TOKEN_LEN;
    let bit = data.get(41).copied().unwrap_or(0) % 8;
    let mut forged = token;
    forged[byte] ^= 1 << bit;
    assert!(
        any_relay.verify(&forged, 0).is_err(),
        "token with bit {bit} of byte {byte} flipped accepted"
    );
});
