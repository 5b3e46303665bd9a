//! STUN messages (RFC 8489) as the relay uses them: Binding requests, success and error
//! responses, with MESSAGE-INTEGRITY (HMAC-SHA1, section 14.5) and FINGERPRINT (section 14.7).
//! Parsing is a zero-copy view; writing fills a caller-provided buffer.

use hmac::{Hmac, Mac};
use std::net::{IpAddr, SocketAddr};

/// RFC 8489 section 5: the magic cookie.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Size of the STUN header.
pub const HEADER_LEN: usize = 20;
/// Binding method.
pub const METHOD_BINDING: u16 = 0x001;

/// Attribute types (RFC 8489 section 18.3).
pub mod attr {
    /// MAPPED-ADDRESS.
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    /// USERNAME.
    pub const USERNAME: u16 = 0x0006;
    /// MESSAGE-INTEGRITY.
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    /// ERROR-CODE.
    pub const ERROR_CODE: u16 = 0x0009;
    /// NONCE: the relay's return-routability cookie (PROTOCOL.md section 3).
    pub const NONCE: u16 = 0x0015;
    /// XOR-MAPPED-ADDRESS.
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    /// SOFTWARE.
    pub const SOFTWARE: u16 = 0x8022;
    /// FINGERPRINT.
    pub const FINGERPRINT: u16 = 0x8028;
}

const FINGERPRINT_XOR: u32 = 0x5354_554e;
const INTEGRITY_LEN: usize = 20;

/// The class of a STUN message (RFC 8489 section 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A request.
    Request,
    /// An indication.
    Indication,
    /// A success response.
    Success,
    /// An error response.
    Error,
}

/// Why a datagram is not an acceptable STUN message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StunError {
    /// Shorter than its header or its declared length, or an attribute overruns the message.
    Truncated,
    /// The two top bits are not zero, the cookie is wrong, or the length is not a multiple of 4.
    NotStun,
    /// An attribute follows FINGERPRINT, or something other than FINGERPRINT follows
    /// MESSAGE-INTEGRITY.
    Misordered,
    /// FINGERPRINT does not match.
    BadFingerprint,
    /// MESSAGE-INTEGRITY is absent.
    NoIntegrity,
    /// MESSAGE-INTEGRITY does not match.
    BadIntegrity,
    /// The output buffer is too small.
    BufferTooSmall,
}

impl std::fmt::Display for StunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Truncated => "truncated STUN message",
            Self::NotStun => "not a STUN message",
            Self::Misordered => "misordered STUN attributes",
            Self::BadFingerprint => "bad STUN FINGERPRINT",
            Self::NoIntegrity => "missing STUN MESSAGE-INTEGRITY",
            Self::BadIntegrity => "bad STUN MESSAGE-INTEGRITY",
            Self::BufferTooSmall => "STUN output buffer too small",
        })
    }
}

impl std::error::Error for StunError {}

/// A parsed, structurally valid STUN message. FINGERPRINT, when present, has been checked.
#[derive(Clone, Copy, Debug)]
pub struct StunMessage<'a> {
    buf: &'a [u8],
    /// Offset of the MESSAGE-INTEGRITY attribute header, if present.
    integrity_at: Option<usize>,
}

impl<'a> StunMessage<'a> {
    /// Parses `buf` as one STUN message. Never panics.
    pub fn parse(buf: &'a [u8]) -> Result<Self, StunError> {
        let hdr = buf.get(..HEADER_LEN).ok_or(StunError::Truncated)?;
        let len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
        if hdr[0] & 0xc0 != 0 || read_u32(hdr, 4) != MAGIC_COOKIE || len % 4 != 0 {
            return Err(StunError::NotStun);
        }
        let buf = buf.get(..HEADER_LEN + len).ok_or(StunError::Truncated)?;
        let mut integrity_at = None;
        let mut at = HEADER_LEN;
        let mut seen_fingerprint = false;
        while at < buf.len() {
            if seen_fingerprint {
                return Err(StunError::Misordered);
            }
            let a = buf.get(at..at + 4).ok_or(StunError::Truncated)?;
            let typ = u16::from_be_bytes([a[0], a[1]]);
            let alen = usize::from(u16::from_be_bytes([a[2], a[3]]));
            let end = at + 4 + alen;
            if end > buf.len() {
                return Err(StunError::Truncated);
            }
            if integrity_at.is_some() && typ != attr::FINGERPRINT {
                // RFC 8489 section 14.5: only FINGERPRINT may follow MESSAGE-INTEGRITY.
                return Err(StunError::Misordered);
            }
            match typ {
                attr::MESSAGE_INTEGRITY => {
                    if alen != INTEGRITY_LEN {
                        return Err(StunError::BadIntegrity);
                    }
                    integrity_at = Some(at);
                }
                attr::FINGERPRINT => {
                    if alen != 4 {
                        return Err(StunError::BadFingerprint);
                    }
                    let expected = fingerprint(buf, at);
                    if read_u32(buf, at + 4) != expected {
                        return Err(StunError::BadFingerprint);
                    }
                    seen_fingerprint = true;
                }
                _ => {}
            }
            at = end.next_multiple_of(4);
        }
        Ok(Self { buf, integrity_at })
    }

    /// The whole message, exactly as long as its header says.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buf
    }
    /// The method (12 bits).
    pub fn method(&self) -> u16 {
        let t = u16::from_be_bytes([self.buf[0], self.buf[1]]);
        (t & 0x000f) | ((t & 0x00e0) >> 1) | ((t & 0x3e00) >> 2)
    }
    /// The class.
    pub fn class(&self) -> Class {
        let t = u16::from_be_bytes([self.buf[0], self.buf[1]]);
        match ((t >> 7) & 2) | ((t >> 4) & 1) {
            0 => Class::Request,
            1 => Class::Indication,
            2 => Class::Success,
            _ => Class::Error,
        }
    }
    /// The 96-bit transaction id.
    pub fn transaction_id(&self) -> &'a [u8; 12] {
        self.buf[8..20].try_into().expect("header is 20 bytes")
    }
    /// The value of the first attribute of type `typ`.
    pub fn attribute(&self, typ: u16) -> Option<&'a [u8]> {
        self.attributes().find(|&(t, _)| t == typ).map(|(_, v)| v)
    }
    /// All attributes in order: (type, value without padding).
    pub fn attributes(&self) -> impl Iterator<Item = (u16, &'a [u8])> + 'a {
        let buf = self.buf;
        let mut at = HEADER_LEN;
        std::iter::from_fn(move || {
            // `parse` proved every attribute lies inside `buf`.
            let a = buf.get(at..at + 4)?;
            let typ = u16::from_be_bytes([a[0], a[1]]);
            let alen = usize::from(u16::from_be_bytes([a[2], a[3]]));
            let value = buf.get(at + 4..at + 4 + alen)?;
            at = (at + 4 + alen).next_multiple_of(4);
            Some((typ, value))
        })
    }
    /// USERNAME, if present.
    pub fn username(&self) -> Option<&'a [u8]> {
        self.attribute(attr::USERNAME)
    }
    /// Whether a MESSAGE-INTEGRITY attribute is present.
    pub fn has_integrity(&self) -> bool {
        self.integrity_at.is_some()
    }
    /// Checks MESSAGE-INTEGRITY with the short-term credential `key` (RFC 8489 section 14.5).
    pub fn verify_integrity(&self, key: &[u8]) -> Result<(), StunError> {
        let at = self.integrity_at.ok_or(StunError::NoIntegrity)?;
        let mac = integrity(self.buf, at, key);
        // Constant time comparison: `hmac`'s verify would need the Mac again; compare manually.
        let got = &self.buf[at + 4..at + 4 + INTEGRITY_LEN];
        let diff = mac.iter().zip(got).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 {
            Ok(())
        } else {
            Err(StunError::BadIntegrity)
        }
    }
    /// XOR-MAPPED-ADDRESS decoded, if present and well formed.
    pub fn xor_mapped_address(&self) -> Option<SocketAddr> {
        let v = self.attribute(attr::XOR_MAPPED_ADDRESS)?;
        let port = u16::from_be_bytes([*v.get(2)?, *v.get(3)?]) ^ (MAGIC_COOKIE >> 16) as u16;
        let mut mask = [0u8; 16];
        mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        mask[4..].copy_from_slice(self.transaction_id());
        let ip = match (*v.get(1)?, v.len()) {
            (1, 8) => {
                let a: [u8; 4] = std::array::from_fn(|i| v[4 + i] ^ mask[i]);
                IpAddr::from(a)
            }
            (2, 20) => {
                let a: [u8; 16] = std::array::from_fn(|i| v[4 + i] ^ mask[i]);
                IpAddr::from(a)
            }
            _ => return None,
        };
        Some(SocketAddr::new(ip, port))
    }
    /// ERROR-CODE as (code, reason), if present and well formed.
    pub fn error_code(&self) -> Option<(u16, &'a [u8])> {
        let v = self.attribute(attr::ERROR_CODE)?;
        let code = u16::from(*v.get(2)? & 7) * 100 + u16::from(*v.get(3)?);
        Some((code, &v[4..]))
    }
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// HMAC-SHA1 over the message up to the attribute at `at`, with the header length rewritten to
/// end after a MESSAGE-INTEGRITY attribute placed there (RFC 8489 section 14.5).
fn integrity(buf: &[u8], at: usize, key: &[u8]) -> [u8; INTEGRITY_LEN] {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(key).expect("HMAC takes keys of any length");
    let len = (at + 4 + INTEGRITY_LEN - HEADER_LEN) as u16;
    mac.update(&buf[..2]);
    mac.update(&len.to_be_bytes());
    mac.update(&buf[4..at]);
    mac.finalize().into_bytes().into()
}

/// CRC-32 over the message up to the attribute at `at`, with the header length rewritten to end
/// after a FINGERPRINT attribute placed there, XOR 0x5354554e (RFC 8489 section 14.7).
fn fingerprint(buf: &[u8], at: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let len = (at + 8 - HEADER_LEN) as u16;
    h.update(&buf[..2]);
    h.update(&len.to_be_bytes());
    h.update(&buf[4..at]);
    h.finalize() ^ FINGERPRINT_XOR
}

/// Builds a STUN message in a caller-provided buffer.
pub struct StunWriter<'b> {
    buf: &'b mut [u8],
    len: usize,
}

impl<'b> StunWriter<'b> {
    /// Starts a message of `class` and `method` with `transaction_id`.
    pub fn new(
        buf: &'b mut [u8],
        class: Class,
        method: u16,
        transaction_id: &[u8; 12],
    ) -> Result<Self, StunError> {
        if buf.len() < HEADER_LEN {
            return Err(StunError::BufferTooSmall);
        }
        let c = match class {
            Class::Request => 0u16,
            Class::Indication => 0x0010,
            Class::Success => 0x0100,
            Class::Error => 0x0110,
        };
        let m = (method & 0x000f) | ((method & 0x0070) << 1) | ((method & 0x0f80) << 2);
        buf[..2].copy_from_slice(&(m | c).to_be_bytes());
        buf[2..4].fill(0);
        buf[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf[8..20].copy_from_slice(transaction_id);
        Ok(Self {
            buf,
            len: HEADER_LEN,
        })
    }

    fn set_length(&mut self) {
        let body = (self.len - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&body.to_be_bytes());
    }

    /// Appends an attribute with padding.
    pub fn attribute(&mut self, typ: u16, value: &[u8]) -> Result<&mut Self, StunError> {
        let padded = value.len().next_multiple_of(4);
        let end = self.len + 4 + padded;
        if value.len() > usize::from(u16::MAX) || end > self.buf.len() {
            return Err(StunError::BufferTooSmall);
        }
        self.buf[self.len..self.len + 2].copy_from_slice(&typ.to_be_bytes());
        self.buf[self.len + 2..self.len + 4].copy_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf[self.len + 4..self.len + 4 + value.len()].copy_from_slice(value);
        self.buf[self.len + 4 + value.len()..end].fill(0);
        self.len = end;
        self.set_length();
        Ok(self)
    }

    /// Appends XOR-MAPPED-ADDRESS for `addr`.
    pub fn xor_mapped_address(&mut self, addr: SocketAddr) -> Result<&mut Self, StunError> {
        let mut mask = [0u8; 16];
        mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        mask[4..].copy_from_slice(&self.buf[8..20]);
        let mut v = [0u8; 20];
        v[2..4].copy_from_slice(&(addr.port() ^ (MAGIC_COOKIE >> 16) as u16).to_be_bytes());
        let n = match addr.ip() {
            IpAddr::V4(ip) => {
                v[1] = 1;
                for (i, b) in ip.octets().iter().enumerate() {
                    v[4 + i] = b ^ mask[i];
                }
                8
            }
            IpAddr::V6(ip) => {
                v[1] = 2;
                for (i, b) in ip.octets().iter().enumerate() {
                    v[4 + i] = b ^ mask[i];
                }
                20
            }
        };
        self.attribute(attr::XOR_MAPPED_ADDRESS, &v[..n])
    }

    /// Appends ERROR-CODE (RFC 8489 section 14.8).
    pub fn error_code(&mut self, code: u16, reason: &str) -> Result<&mut Self, StunError> {
        let mut v = [0u8; 4 + 128];
        let reason = &reason.as_bytes()[..reason.len().min(128)];
        v[2] = (code / 100) as u8 & 7;
        v[3] = (code % 100) as u8;
        v[4..4 + reason.len()].copy_from_slice(reason);
        self.attribute(attr::ERROR_CODE, &v[..4 + reason.len()])
    }

    /// Appends MESSAGE-INTEGRITY keyed with `key`.
    pub fn integrity(&mut self, key: &[u8]) -> Result<&mut Self, StunError> {
        let at = self.len;
        if at + 4 + INTEGRITY_LEN > self.buf.len() {
            return Err(StunError::BufferTooSmall);
        }
        let mac = integrity(self.buf, at, key);
        self.attribute(attr::MESSAGE_INTEGRITY, &mac)
    }

    /// Appends FINGERPRINT and returns the finished length.
    pub fn finish_with_fingerprint(mut self) -> Result<usize, StunError> {
        let at = self.len;
        if at + 8 > self.buf.len() {
            return Err(StunError::BufferTooSmall);
        }
        let fp = fingerprint(self.buf, at);
        self.attribute(attr::FINGERPRINT, &fp.to_be_bytes())?;
        Ok(self.len)
    }

    /// Returns the finished length without FINGERPRINT.
    pub fn finish(self) -> usize {
        self.len
    }
}

/// Writes a Binding request carrying `username` with MESSAGE-INTEGRITY and FINGERPRINT.
pub fn write_binding_request(
    out: &mut [u8],
    transaction_id: &[u8; 12],
    username: &[u8],
    key: &[u8],
) -> Result<usize, StunError> {
    write_binding_request_with_nonce(out, transaction_id, username, None, key)
}

/// [`write_binding_request`] echoing the relay's `nonce` (its return-routability cookie,
/// from a 401 or 438 answer) when one is given; MESSAGE-INTEGRITY covers it.
pub fn write_binding_request_with_nonce(
    out: &mut [u8],
    transaction_id: &[u8; 12],
    username: &[u8],
    nonce: Option<&[u8]>,
    key: &[u8],
) -> Result<usize, StunError> {
    let mut w = StunWriter::new(out, Class::Request, METHOD_BINDING, transaction_id)?;
    w.attribute(attr::USERNAME, username)?;
    if let Some(n) = nonce {
        w.attribute(attr::NONCE, n)?;
    }
    w.integrity(key)?;
    w.finish_with_fingerprint()
}

/// Length of the relay's return-routability cookie.
pub const COOKIE_LEN: usize = 16;

/// The return-routability cookie of `addr` in time window `epoch`: HMAC-SHA256 under the
/// relay's `secret`, truncated. Only whoever receives datagrams at `addr` learns it.
pub fn address_cookie(secret: &[u8; 32], addr: SocketAddr, epoch: u64) -> [u8; COOKIE_LEN] {
    let mut mac =
        Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(&epoch.to_be_bytes());
    match addr.ip() {
        std::net::IpAddr::V4(ip) => mac.update(&ip.octets()),
        std::net::IpAddr::V6(ip) => mac.update(&ip.octets()),
    }
    mac.update(&addr.port().to_be_bytes());
    let tag = mac.finalize().into_bytes();
    tag[..COOKIE_LEN].try_into().expect("SHA-256 is 32 bytes")
}

/// The cookie of a relay's challenge (a Binding error 401 or 438 carrying a NONCE), if
/// `reply` is one: the request goes again with it.
pub fn challenge_nonce(reply: &[u8]) -> Option<&[u8]> {
    let m = StunMessage::parse(reply).ok()?;
    let code = m.error_code()?.0;
    if m.class() != Class::Error || !matches!(code, 401 | 438) {
        return None;
    }
    m.attribute(attr::NONCE).filter(|n| !n.is_empty())
}

/// Whether `a` and `b` are equal, in time that depends on their lengths only.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Writes a Binding error response with ERROR-CODE, NONCE and FINGERPRINT: the relay's
/// challenge (401) or its renewal (438) of the return-routability cookie.
pub fn write_binding_challenge(
    out: &mut [u8],
    transaction_id: &[u8; 12],
    code: u16,
    reason: &str,
    nonce: &[u8],
) -> Result<usize, StunError> {
    let mut w = StunWriter::new(out, Class::Error, METHOD_BINDING, transaction_id)?;
    w.error_code(code, reason)?.attribute(attr::NONCE, nonce)?;
    w.finish_with_fingerprint()
}

/// Writes a Binding success response with XOR-MAPPED-ADDRESS, MESSAGE-INTEGRITY and
/// FINGERPRINT.
pub fn write_binding_success(
    out: &mut [u8],
    transaction_id: &[u8; 12],
    mapped: SocketAddr,
    key: &[u8],
) -> Result<usize, StunError> {
    let mut w = StunWriter::new(out, Class::Success, METHOD_BINDING, transaction_id)?;
    w.xor_mapped_address(mapped)?.integrity(key)?;
    w.finish_with_fingerprint()
}

/// Writes a Binding error response with ERROR-CODE and FINGERPRINT (no integrity: the request
/// failed authentication, so there is no key to use; RFC 8489 section 9.1.3).
pub fn write_binding_error(
    out: &mut [u8],
    transaction_id: &[u8; 12],
    code: u16,
    reason: &str,
) -> Result<usize, StunError> {
    let mut w = StunWriter::new(out, Class::Error, METHOD_BINDING, transaction_id)?;
    w.error_code(code, reason)?;
    w.finish_with_fingerprint()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TXID: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    #[test]
    fn request_round_trips_with_integrity() {
        let mut buf = [0u8; 256];
        let n = write_binding_request(&mut buf, &TXID, b"alice", b"secret").unwrap();
        let m = StunMessage::parse(&buf[..n]).unwrap();
        assert_eq!(m.class(), Class::Request);
        assert_eq!(m.method(), METHOD_BINDING);
        assert_eq!(m.transaction_id(), &TXID);
        assert_eq!(m.username(), Some(&b"alice"[..]));
        assert_eq!(m.verify_integrity(b"secret"), Ok(()));
        assert_eq!(m.verify_integrity(b"other"), Err(StunError::BadIntegrity));
    }

    #[test]
    fn success_and_error_round_trip() {
        let mut buf = [0u8; 256];
        for addr in ["192.0.2.1:32853", "[2001:db8::1]:5000"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let n = write_binding_success(&mut buf, &TXID, addr, b"k").unwrap();
            let m = StunMessage::parse(&buf[..n]).unwrap();
            assert_eq!(m.class(), Class::Success);
            assert_eq!(m.xor_mapped_address(), Some(addr));
            assert_eq!(m.verify_integrity(b"k"), Ok(()));
        }
        let n = write_binding_error(&mut buf, &TXID, 401, "Unauthorized").unwrap();
        let m = StunMessage::parse(&buf[..n]).unwrap();
        assert_eq!(m.class(), Class::Error);
        assert_eq!(m.error_code(), Some((401, &b"Unauthorized"[..])));
        assert_eq!(m.verify_integrity(b"k"), Err(StunError::NoIntegrity));
    }

    /// RFC 5769 section 2.1 sample request (short-term credentials, password "VOkJxbRl1RmTxUk/WvJxBt").
    #[test]
    fn rfc5769_sample_request() {
        let hex = "000100582112a442b7e7a701bc34d686fa87dfae80220010\
                   5354554e207465737420636c69656e74\
                   002400046e0001ff80290008932ff9b151263b36\
                   000600096576746a3a68367659202020\
                   000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2\
                   80280004e57a3bcf";
        let bytes: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let m = StunMessage::parse(&bytes).unwrap();
        assert_eq!(m.username(), Some(&b"evtj:h6vY"[..]));
        assert_eq!(m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"), Ok(()));
    }

    #[test]
    fn rejects_damaged_messages() {
        let mut buf = [0u8; 256];
        let n = write_binding_request(&mut buf, &TXID, b"alice", b"secret").unwrap();
        for cut in 0..n {
            assert!(StunMessage::parse(&buf[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = buf;
        bad[n - 1] ^= 1;
        assert_eq!(
            StunMessage::parse(&bad[..n]).unwrap_err(),
            StunError::BadFingerprint
        );
        let mut bad = buf;
        bad[4] ^= 1;
        assert_eq!(
            StunMessage::parse(&bad[..n]).unwrap_err(),
            StunError::NotStun
        );
        let mut bad = buf;
        bad[25] ^= 1; // inside USERNAME: fingerprint catches it first
        assert!(StunMessage::parse(&bad[..n]).is_err());
    }
}
