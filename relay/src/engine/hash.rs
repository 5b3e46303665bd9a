//! A small, fast, non-cryptographic hasher for the shard's lookup tables (the FxHash mixing
//! step). Keys in these tables are inserted only after a token check, so a peer cannot flood
//! them to provoke collisions; the speed matters on every packet.

use std::hash::{BuildHasherDefault, Hasher};

/// Multiply-rotate hasher over 64-bit words.
#[derive(Default, Clone, Copy)]
pub struct FxHasher {
    state: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.state = (self.state.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("chunks_exact(8)")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.state
    }
}

/// `HashMap` with [`FxHasher`].
pub type FxHashMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// A transport address as a hash key: two integers, so that hashing is one multiply and
/// equality two compares, instead of the field-by-field walk of `SocketAddr`. The IPv6 flow
/// label is not part of a peer's identity and is left out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrKey {
    /// IPv6 address bits; 0 for IPv4.
    ip6: u128,
    /// Family tag (bits 48..50), IPv4 address (16..48) or IPv6 scope id (16..48), port (0..16).
    rest: u64,
}

impl AddrKey {
    /// The key of `addr`.
    #[inline]
    pub fn new(addr: std::net::SocketAddr) -> Self {
        match addr {
            std::net::SocketAddr::V4(a) => Self {
                ip6: 0,
                rest: (1 << 48) | (u64::from(a.ip().to_bits()) << 16) | u64::from(a.port()),
            },
            std::net::SocketAddr::V6(a) => Self {
                ip6: a.ip().to_bits(),
                rest: (2 << 48) | (u64::from(a.scope_id()) << 16) | u64::from(a.port()),
            },
        }
    }
}

impl std::hash::Hash for AddrKey {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.rest ^ (self.ip6 as u64) ^ ((self.ip6 >> 64) as u64).rotate_left(17));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    fn keys_distinguish_families_ports_and_addresses() {
        let k = |s: &str| AddrKey::new(s.parse::<SocketAddr>().unwrap());
        assert_eq!(k("1.2.3.4:5"), k("1.2.3.4:5"));
        assert_ne!(k("1.2.3.4:5"), k("1.2.3.4:6"));
        assert_ne!(k("1.2.3.4:5"), k("1.2.3.5:5"));
        assert_ne!(k("0.0.0.0:5"), k("[::]:5"));
        assert_ne!(k("[::1]:5"), k("[::2]:5"));
        assert_ne!(k("[fe80::1%1]:5"), k("[fe80::1%2]:5"));
    }
}
