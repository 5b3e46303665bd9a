//! Joining the real relay: mint a room token for each participant and bind its UDP address
//! with a STUN Binding request that carries the token (USERNAME) and MESSAGE-INTEGRITY keyed
//! by [`proto::token::stun_key`]. The baselines need none of this.
#![forbid(unsafe_code)]

use std::net::UdpSocket;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use proto::token::{Claims, Permissions, TokenKind};

/// How long to wait for each Binding success before retrying.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(250);
/// Binding attempts per participant before the join is declared failed.
const ATTEMPTS: u32 = 6;

/// A participant's token and the STUN key derived from it.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// Token in base64url text, as carried in STUN USERNAME.
    pub token: String,
    /// MESSAGE-INTEGRITY key of the binding.
    pub key: [u8; 20],
    /// Participant id, also the prefix of every transaction id it uses.
    pub participant_id: u64,
}

/// What a participant may do and where its room lives.
#[derive(Clone, Copy, Debug)]
pub struct Grant {
    /// Room id (nonzero).
    pub room_id: u64,
    /// Shard that owns the room: `room_id % n_shards`.
    pub shard_idx: u16,
    /// Participant id (nonzero, unique).
    pub participant_id: u64,
    /// Whether it may publish (everyone may subscribe).
    pub publishes: bool,
}

/// Signs a room token for `grant`, valid for an hour from `unix_now_s`.
pub fn mint(key: &SigningKey, grant: Grant, unix_now_s: u64) -> Credentials {
    let mut permissions = Permissions::SUBSCRIBE;
    if grant.publishes {
        permissions = permissions | Permissions::PUBLISH;
    }
    let token = Claims {
        kind: TokenKind::Room,
        permissions,
        relay_id: 0,
        shard_idx: grant.shard_idx,
        expires_at: unix_now_s + 3600,
        scope_id: grant.room_id,
        participant_id: grant.participant_id,
    }
    .sign_text(key);
    let key = proto::token::stun_key(token.as_bytes());
    Credentials {
        token,
        key,
        participant_id: grant.participant_id,
    }
}

/// A transaction id unique per (participant, attempt): the participant id then a counter.
pub fn transaction_id(participant_id: u64, counter: u32) -> [u8; 12] {
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&participant_id.to_le_bytes());
    t[8..].copy_from_slice(&counter.to_le_bytes());
    t
}

/// Writes a Binding request for `creds` into `buf`; returns its length.
pub fn binding_request(creds: &Credentials, counter: u32, buf: &mut [u8]) -> usize {
    let txid = transaction_id(creds.participant_id, counter);
    proto::stun::write_binding_request(buf, &txid, creds.token.as_bytes(), &creds.key)
        .expect("a 2 KiB buffer holds a request with a 134-byte token")
}

/// Whether `datagram` is the relay's Binding success for transaction `txid`, authenticated
/// with `key`.
#[cfg(test)]
pub fn is_binding_success(datagram: &[u8], txid: &[u8; 12], key: &[u8]) -> bool {
    use proto::stun::{Class, StunMessage};
    let Ok(msg) = StunMessage::parse(datagram) else {
        return false;
    };
    msg.class() == Class::Success
        && msg.method() == proto::stun::METHOD_BINDING
        && msg.transaction_id() == txid
        && msg.verify_integrity(key).is_ok()
}

/// Binds `sock` (connected to the relay shard), through the relay's return-routability
/// challenge, within a bounded time.
pub fn bind(sock: &UdpSocket, creds: &Credentials) -> anyhow::Result<()> {
    let relay = sock.peer_addr()?;
    let within = RESPONSE_TIMEOUT * ATTEMPTS;
    proto::binding::bind_blocking(sock, relay, &creds.token, within)
        .map_err(|e| anyhow::anyhow!("binding participant {}: {e}", creds.participant_id))?;
    sock.set_read_timeout(None)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_token_verifies_and_request_authenticates() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let grant = Grant {
            room_id: 7,
            shard_idx: 1,
            participant_id: 3,
            publishes: false,
        };
        let creds = mint(&key, grant, 1_000);
        let v = proto::token::TokenVerifier::new(key.verifying_key(), 0);
        let claims = v.verify_text(creds.token.as_bytes(), 1_000).unwrap();
        assert_eq!((claims.scope_id, claims.shard_idx), (7, 1));
        assert_eq!(claims.permissions, Permissions::SUBSCRIBE);

        let mut buf = [0u8; 512];
        let n = binding_request(&creds, 5, &mut buf);
        let msg = proto::stun::StunMessage::parse(&buf[..n]).unwrap();
        assert_eq!(msg.username(), Some(creds.token.as_bytes()));
        assert!(msg.verify_integrity(&creds.key).is_ok());
        assert_eq!(msg.transaction_id(), &transaction_id(3, 5));
    }

    #[test]
    fn recognises_only_the_matching_success() {
        let key = [1u8; 20];
        let txid = transaction_id(1, 0);
        let mapped = "127.0.0.1:9".parse().unwrap();
        let mut buf = [0u8; 256];
        let n = proto::stun::write_binding_success(&mut buf, &txid, mapped, &key).unwrap();
        assert!(is_binding_success(&buf[..n], &txid, &key));
        assert!(!is_binding_success(&buf[..n], &transaction_id(1, 1), &key));
        assert!(!is_binding_success(&buf[..n], &txid, &[2u8; 20]));
        assert!(!is_binding_success(b"\x80\x60rtp", &txid, &key));
    }
}
