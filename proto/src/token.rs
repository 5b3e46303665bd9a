//! Join tokens: compact, Ed25519-signed grants issued by ctl and checked by relays.
//!
//! A relay holds only ctl's public key, so a compromised relay cannot mint tokens
//! (DESIGN.md section 7). The binary layout is fixed, little-endian, 100 bytes:
//!
//! ```text
//! offset size field
//!      0    1 version (1)
//!      1    1 kind: 1 = media room, 2 = chat user
//!      2    1 permissions: bit 0 publish, 1 subscribe, 2 chat, 3 host
//!      3    1 reserved, must be 0
//!      4    4 relay_id (0 = valid on any relay)
//!      8    2 shard_idx the room or user lives on
//!     10    2 reserved, must be 0
//!     12    8 expires_at, unix seconds
//!     20    8 scope_id: the room id (media) or the user id (chat)
//!     28    8 participant_id (for chat tokens, equal to the user id)
//!     36   64 Ed25519 signature over bytes 0..36
//! ```
//!
//! In text (STUN USERNAME, JSON, URLs) a token is unpadded base64url: 134 characters.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier as _, VerifyingKey};

/// Size of an encoded token in bytes.
pub const TOKEN_LEN: usize = 100;
/// Size of the signed part of a token.
const BODY_LEN: usize = 36;
/// Size of a token in base64url text.
pub const TOKEN_TEXT_LEN: usize = crate::base64url::encoded_len(TOKEN_LEN);
/// The only token version this build understands.
pub const TOKEN_VERSION: u8 = 1;

/// What a token grants access to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// Media in a room (`scope_id` is the room id).
    Room,
    /// A user's chat home (`scope_id` is the user id).
    User,
    /// A relay's link credential (`scope_id` is the relay's number in its cluster): presented
    /// when it dials another relay (PROTOCOL.md section 8).
    Relay,
}

/// Permission bits carried by a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Permissions(pub u8);

impl Permissions {
    /// May send media into the room.
    pub const PUBLISH: Self = Self(1);
    /// May receive media from the room.
    pub const SUBSCRIBE: Self = Self(2);
    /// May use chat.
    pub const CHAT: Self = Self(4);
    /// May administer the meeting (remove participants, end it).
    pub const HOST: Self = Self(8);
    /// Every permission defined by version 1.
    pub const ALL: Self = Self(15);

    /// Whether every bit of `other` is set in `self`.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Permissions {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// The claims of a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Claims {
    /// What the token is for.
    pub kind: TokenKind,
    /// What the bearer may do.
    pub permissions: Permissions,
    /// Relay the token is valid on; 0 for any.
    pub relay_id: u32,
    /// Shard that owns the room or user.
    pub shard_idx: u16,
    /// Expiry, unix seconds; the token is invalid at and after this instant.
    pub expires_at: u64,
    /// Room id or user id.
    pub scope_id: u64,
    /// Participant id inside the room (equal to the user id for chat).
    pub participant_id: u64,
}

/// Why a token was refused. Every variant is the peer's fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenError {
    /// Not exactly [`TOKEN_LEN`] bytes (or not valid base64url of them).
    Malformed,
    /// A version this build does not understand.
    UnknownVersion(u8),
    /// An unknown kind, or reserved bits set.
    InvalidField,
    /// The signature does not verify under the configured public key.
    BadSignature,
    /// `expires_at` is not after the current time.
    Expired,
    /// Signed for a different relay.
    WrongRelay,
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Malformed => f.write_str("malformed token"),
            Self::UnknownVersion(v) => write!(f, "unknown token version {v}"),
            Self::InvalidField => f.write_str("invalid token field"),
            Self::BadSignature => f.write_str("bad token signature"),
            Self::Expired => f.write_str("token expired"),
            Self::WrongRelay => f.write_str("token issued for another relay"),
        }
    }
}

impl std::error::Error for TokenError {}

impl Claims {
    fn encode_body(&self) -> [u8; BODY_LEN] {
        let mut b = [0u8; BODY_LEN];
        b[0] = TOKEN_VERSION;
        b[1] = match self.kind {
            TokenKind::Room => 1,
            TokenKind::User => 2,
            TokenKind::Relay => 3,
        };
        b[2] = self.permissions.0;
        b[4..8].copy_from_slice(&self.relay_id.to_le_bytes());
        b[8..10].copy_from_slice(&self.shard_idx.to_le_bytes());
        b[12..20].copy_from_slice(&self.expires_at.to_le_bytes());
        b[20..28].copy_from_slice(&self.scope_id.to_le_bytes());
        b[28..36].copy_from_slice(&self.participant_id.to_le_bytes());
        b
    }

    fn decode_body(b: &[u8; BODY_LEN]) -> Result<Self, TokenError> {
        if b[0] != TOKEN_VERSION {
            return Err(TokenError::UnknownVersion(b[0]));
        }
        let kind = match b[1] {
            1 => TokenKind::Room,
            2 => TokenKind::User,
            3 => TokenKind::Relay,
            _ => return Err(TokenError::InvalidField),
        };
        if b[2] & !Permissions::ALL.0 != 0 || b[3] != 0 || b[10] != 0 || b[11] != 0 {
            return Err(TokenError::InvalidField);
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8-byte slice"));
        Ok(Self {
            kind,
            permissions: Permissions(b[2]),
            relay_id: u32::from_le_bytes(b[4..8].try_into().expect("4-byte slice")),
            shard_idx: u16::from_le_bytes([b[8], b[9]]),
            expires_at: u64_at(12),
            scope_id: u64_at(20),
            participant_id: u64_at(28),
        })
    }

    /// Signs these claims, producing the binary token.
    pub fn sign(&self, key: &SigningKey) -> [u8; TOKEN_LEN] {
        let body = self.encode_body();
        let sig = key.sign(&body);
        let mut out = [0u8; TOKEN_LEN];
        out[..BODY_LEN].copy_from_slice(&body);
        out[BODY_LEN..].copy_from_slice(&sig.to_bytes());
        out
    }

    /// Signs these claims, producing the base64url text form.
    pub fn sign_text(&self, key: &SigningKey) -> String {
        crate::base64url::encode(&self.sign(key))
    }
}

/// Checks tokens against ctl's public key. Cheap to clone; holds no mutable state.
#[derive(Clone, Debug)]
pub struct TokenVerifier {
    key: VerifyingKey,
    relay_id: u32,
}

impl TokenVerifier {
    /// A verifier for tokens signed by `key`, accepted on relay `relay_id` (tokens naming relay
    /// 0 are accepted everywhere; a verifier with `relay_id` 0 accepts tokens for any relay).
    pub fn new(key: VerifyingKey, relay_id: u32) -> Self {
        Self { key, relay_id }
    }

    /// Parses and verifies a binary token at unix time `now_unix_s`. Never panics.
    pub fn verify(&self, token: &[u8], now_unix_s: u64) -> Result<Claims, TokenError> {
        let token: &[u8; TOKEN_LEN] = token.try_into().map_err(|_| TokenError::Malformed)?;
        let body: &[u8; BODY_LEN] = token[..BODY_LEN].try_into().expect("prefix of fixed array");
        // Field checks first: they are cheap and reject garbage before the signature check.
        let claims = Claims::decode_body(body)?;
        let sig = Signature::from_bytes(token[BODY_LEN..].try_into().expect("64-byte suffix"));
        self.key
            .verify(body, &sig)
            .map_err(|_| TokenError::BadSignature)?;
        if claims.expires_at <= now_unix_s {
            return Err(TokenError::Expired);
        }
        if self.relay_id != 0 && claims.relay_id != 0 && claims.relay_id != self.relay_id {
            return Err(TokenError::WrongRelay);
        }
        Ok(claims)
    }

    /// The claims of a token in base64url text form, without checking its signature, expiry or
    /// relay: a cheap look at what it claims, to refuse what can never pass before spending
    /// a signature check on it. Never trust its answer alone.
    pub fn peek_text(text: &[u8]) -> Result<Claims, TokenError> {
        if text.len() != TOKEN_TEXT_LEN {
            return Err(TokenError::Malformed);
        }
        let mut raw = [0u8; TOKEN_LEN];
        match crate::base64url::decode_into(text, &mut raw) {
            Some(TOKEN_LEN) => {
                let body: &[u8; BODY_LEN] = raw[..BODY_LEN].try_into().expect("prefix");
                Claims::decode_body(body)
            }
            _ => Err(TokenError::Malformed),
        }
    }

    /// Verifies a token in base64url text form.
    pub fn verify_text(&self, text: &[u8], now_unix_s: u64) -> Result<Claims, TokenError> {
        if text.len() != TOKEN_TEXT_LEN {
            return Err(TokenError::Malformed);
        }
        let mut raw = [0u8; TOKEN_LEN];
        match crate::base64url::decode_into(text, &mut raw) {
            Some(TOKEN_LEN) => self.verify(&raw, now_unix_s),
            _ => Err(TokenError::Malformed),
        }
    }
}

/// Derives the STUN MESSAGE-INTEGRITY key of a media binding from its token text: the first 20
/// bytes of SHA-256("relay-stun-v1" || token text). The token is a bearer credential, so
/// whoever holds it can compute the key; the integrity check binds each request to the token
/// and protects it from modification in flight.
pub fn stun_key(token_text: &[u8]) -> [u8; 20] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"relay-stun-v1");
    h.update(token_text);
    let digest = h.finalize();
    digest[..20].try_into().expect("SHA-256 is 32 bytes")
}

/// Parses a 32-byte public key, hex encoded (as relays read it from configuration).
pub fn public_key_from_hex(hex: &str) -> Option<VerifyingKey> {
    let bytes = hex_decode::<32>(hex.trim())?;
    VerifyingKey::from_bytes(&bytes).ok()
}

/// Parses a 32-byte secret key seed, hex encoded.
pub fn signing_key_from_hex(hex: &str) -> Option<SigningKey> {
    hex_decode::<32>(hex.trim()).map(|b| SigningKey::from_bytes(&b))
}

/// ctl's admin credential when it has no configured `admin_token`: derived from ctl's key, so
/// it exists from ctl's first start and every ctl process sharing the key accepts it, and
/// nobody without the key can compute it (`ctl credential admin` prints it).
pub fn admin_credential(key: &SigningKey) -> String {
    derive_credential(key, b"ctl admin credential v1")
}

/// Relay `relay_id`'s credential at ctl, bound to its id: with it a relay can heartbeat and
/// poll commands as itself and as no other relay (`ctl credential relay ID` prints it; the
/// relay sends it as its `ctl_token`).
pub fn relay_credential(key: &SigningKey, relay_id: u32) -> String {
    let mut msg = *b"ctl relay credential v1 ....";
    msg[24..].copy_from_slice(&relay_id.to_be_bytes());
    derive_credential(key, &msg)
}

/// HMAC-SHA256 keyed with the key's secret seed, as 64 hex digits.
fn derive_credential(key: &SigningKey, msg: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key.to_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(msg);
    hex(&mac.finalize().into_bytes())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `N` bytes from `2 * N` hex digits (either case).
pub fn hex_decode<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks(2).enumerate() {
        let d = |c: u8| (c as char).to_digit(16);
        out[i] = (d(pair[0])? * 16 + d(pair[1])?) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn claims() -> Claims {
        Claims {
            kind: TokenKind::Room,
            permissions: Permissions::PUBLISH | Permissions::SUBSCRIBE,
            relay_id: 7,
            shard_idx: 1,
            expires_at: 1_000,
            scope_id: 42,
            participant_id: 9,
        }
    }

    #[test]
    fn sign_then_verify_round_trips() {
        let k = key(1);
        let v = TokenVerifier::new(k.verifying_key(), 7);
        let t = claims().sign(&k);
        assert_eq!(v.verify(&t, 999), Ok(claims()));
        let text = claims().sign_text(&k);
        assert_eq!(text.len(), TOKEN_TEXT_LEN);
        assert_eq!(v.verify_text(text.as_bytes(), 999), Ok(claims()));
    }

    #[test]
    fn refuses_forged_expired_and_foreign() {
        let k = key(1);
        let v = TokenVerifier::new(k.verifying_key(), 7);
        let mut t = claims().sign(&k);
        assert_eq!(v.verify(&t, 1_000), Err(TokenError::Expired));
        let other = TokenVerifier::new(k.verifying_key(), 8);
        assert_eq!(other.verify(&t, 0), Err(TokenError::WrongRelay));
        let forged = claims().sign(&key(2));
        assert_eq!(v.verify(&forged, 0), Err(TokenError::BadSignature));
        t[20] ^= 1; // another room
        assert_eq!(v.verify(&t, 0), Err(TokenError::BadSignature));
        t[20] ^= 1;
        t[0] = 2;
        assert_eq!(v.verify(&t, 0), Err(TokenError::UnknownVersion(2)));
        assert_eq!(v.verify(&t[..99], 0), Err(TokenError::Malformed));
        assert_eq!(v.verify_text(b"!!", 0), Err(TokenError::Malformed));
    }

    #[test]
    fn hex_keys_round_trip() {
        let k = key(3);
        let pk = public_key_from_hex(&hex(k.verifying_key().as_bytes())).unwrap();
        assert_eq!(pk, k.verifying_key());
        assert!(public_key_from_hex("zz").is_none());
        assert_eq!(
            signing_key_from_hex(&hex(&k.to_bytes()))
                .unwrap()
                .to_bytes(),
            k.to_bytes()
        );
    }
}
