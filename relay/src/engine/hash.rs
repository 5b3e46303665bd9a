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

/// A transport address as a hash key: hashes as one or two machine words instead of the
/// byte-by-byte walk of `SocketAddr`'s derived `Hash`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrKey(pub std::net::SocketAddr);

impl std::hash::Hash for AddrKey {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self.0 {
            std::net::SocketAddr::V4(a) => {
                state.write_u64((u64::from(a.ip().to_bits()) << 16) | u64::from(a.port()));
            }
            std::net::SocketAddr::V6(a) => {
                let ip = a.ip().to_bits();
                state.write_u64((ip >> 64) as u64 ^ u64::from(a.port()) << 48);
                state.write_u64(ip as u64);
            }
        }
    }
}
