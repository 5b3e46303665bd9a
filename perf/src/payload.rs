//! The load generator's RTP payload: what a subscriber needs to measure loss, duplicates,
//! reordering and one-way latency without trusting anything the relay may rewrite in the RTP
//! header (sequence numbers, SSRC).
//!
//! ```text
//! offset size field (little-endian)
//!      0    8 sequence number of this publisher in this step, from 0
//!      8    8 CLOCK_MONOTONIC send time, ns
//!     16    4 step id, so stragglers of an earlier step are not counted in the next
//!     20    4 publisher index in the harness's participant list
//! ```
//!
//! The rest of the payload is zero padding up to the requested packet size.
#![forbid(unsafe_code)]

/// Bytes the stamp occupies at the start of the payload.
pub const STAMP_LEN: usize = 24;

/// What the publisher writes into every payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// Per-publisher sequence number within the step.
    pub seq: u64,
    /// Send time, CLOCK_MONOTONIC ns.
    pub sent_ns: u64,
    /// Which measurement step the packet belongs to.
    pub step_id: u32,
    /// Index of the publishing participant.
    pub publisher_idx: u32,
}

impl Stamp {
    /// Writes the stamp into the first [`STAMP_LEN`] bytes of `out`; `None` if it is shorter.
    pub fn encode(&self, out: &mut [u8]) -> Option<()> {
        let out = out.get_mut(..STAMP_LEN)?;
        out[0..8].copy_from_slice(&self.seq.to_le_bytes());
        out[8..16].copy_from_slice(&self.sent_ns.to_le_bytes());
        out[16..20].copy_from_slice(&self.step_id.to_le_bytes());
        out[20..24].copy_from_slice(&self.publisher_idx.to_le_bytes());
        Some(())
    }

    /// Reads a stamp from the start of `payload`; `None` if it is too short.
    pub fn decode(payload: &[u8]) -> Option<Self> {
        let p = payload.get(..STAMP_LEN)?;
        let u64_at = |i: usize| u64::from_le_bytes(p[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(p[i..i + 4].try_into().expect("4 bytes"));
        Some(Self {
            seq: u64_at(0),
            sent_ns: u64_at(8),
            step_id: u32_at(16),
            publisher_idx: u32_at(20),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let s = Stamp {
            seq: 0x0102_0304_0506_0708,
            sent_ns: u64::MAX - 5,
            step_id: 7,
            publisher_idx: 199,
        };
        let mut buf = [0xffu8; 40];
        s.encode(&mut buf).unwrap();
        assert_eq!(Stamp::decode(&buf), Some(s));
        assert_eq!(buf[STAMP_LEN], 0xff, "writes nothing past the stamp");
    }

    #[test]
    fn refuses_short_buffers() {
        let s = Stamp {
            seq: 1,
            sent_ns: 2,
            step_id: 3,
            publisher_idx: 4,
        };
        assert!(s.encode(&mut [0u8; STAMP_LEN - 1]).is_none());
        assert!(Stamp::decode(&[0u8; STAMP_LEN - 1]).is_none());
    }
}
