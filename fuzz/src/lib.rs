//! Shared walkers for the fuzz targets: each parses its input and, when that succeeds, calls
//! every accessor and iterator of the result and checks invariants that must hold for any
//! input. The `demux` target reuses them after classifying the datagram.

use std::hint::black_box;

use proto::rtcp::{self, Packet};
use proto::rtp::{RtpPacket, RTP_HEADER_LEN};
use proto::stun::{self, StunError, StunMessage};

/// The fixed MESSAGE-INTEGRITY key the `stun` and `demux` targets verify with.
pub const STUN_KEY: &[u8] = b"fuzz-stun-key";

/// Whether `inner` lies within `outer` (zero-copy views must not point anywhere else).
fn within(outer: &[u8], inner: &[u8]) -> bool {
    let o = outer.as_ptr_range();
    let i = inner.as_ptr_range();
    o.start <= i.start && i.end <= o.end
}

/// Parses `data` as RTP and walks every accessor and extension iterator.
pub fn rtp(data: &[u8]) {
    let Ok(p) = RtpPacket::parse(data) else {
        return;
    };
    let mut acc = u64::from(p.marker()) ^ u64::from(p.payload_type());
    acc ^= u64::from(p.sequence_number()) ^ u64::from(p.timestamp()) ^ u64::from(p.ssrc());
    assert!(p.payload_type() < 128);
    assert_eq!(p.csrcs().count(), usize::from(data[0] & 0x0f));
    for c in p.csrcs() {
        acc = acc.wrapping_add(u64::from(c));
    }
    let payload = p.payload();
    assert!(within(data, payload));
    assert!(payload.len() + RTP_HEADER_LEN <= data.len());
    if let Some((profile, ext)) = p.extension() {
        assert!(within(data, ext));
        assert_eq!(ext.len() % 4, 0);
        acc ^= u64::from(profile);
    }
    for (id, value) in p.extensions() {
        assert_ne!(id, 0);
        assert!(value.len() <= 255);
        if let Some((_, ext)) = p.extension() {
            assert!(within(ext, value));
        }
        acc = acc.wrapping_add(u64::from(id) + value.len() as u64);
    }
    for id in 0..=16u8 {
        if let Some(v) = p.extension_by_id(id) {
            acc = acc.wrapping_add(v.len() as u64);
        }
    }
    if let Some(v) = p.extension_by_id(255) {
        acc = acc.wrapping_add(v.len() as u64);
    }
    black_box(acc);
}

/// Parses `data` as an RTCP compound packet and walks every accessor of every sub-packet.
pub fn rtcp(data: &[u8]) {
    let Ok(c) = rtcp::parse_compound(data) else {
        return;
    };
    assert_eq!(c.as_bytes(), data);
    let raw: Vec<&[u8]> = c.raw_packets().collect();
    assert_eq!(raw.concat(), data, "sub-packets tile the datagram");
    let packets: Vec<Packet<'_>> = c.iter().collect();
    assert_eq!(
        packets.len(),
        raw.len(),
        "every validated sub-packet decodes"
    );
    let mut acc = 0u64;
    let mut mix = |x: u64| acc = acc.wrapping_mul(31).wrapping_add(x);
    for (p, raw) in packets.iter().zip(&raw) {
        assert_eq!(p.packet_type(), raw[1]);
        assert_eq!(raw.len() % 4, 0);
        let count = usize::from(raw[0] & 0x1f);
        match *p {
            Packet::SenderReport(sr) => {
                mix(u64::from(sr.ssrc()) ^ sr.ntp_timestamp());
                mix(u64::from(
                    sr.rtp_timestamp() ^ sr.packet_count() ^ sr.octet_count(),
                ));
                assert_eq!(sr.reports().len(), count);
                for r in sr.reports() {
                    assert!(r.cumulative_lost <= 0xff_ffff);
                    mix(r.cumulative_lost_signed() as u64 ^ u64::from(r.ssrc ^ r.jitter));
                    mix(u64::from(r.fraction_lost) ^ u64::from(r.highest_seq ^ r.lsr ^ r.dlsr));
                }
                assert!(within(raw, sr.extension()));
            }
            Packet::ReceiverReport(rr) => {
                mix(u64::from(rr.ssrc()));
                assert_eq!(rr.reports().count(), count);
                for r in rr.reports() {
                    mix(r.cumulative_lost_signed() as u64 ^ u64::from(r.dlsr));
                }
                assert!(within(raw, rr.extension()));
            }
            Packet::Sdes(s) => {
                assert_eq!(s.chunks().count(), count);
                for (ssrc, items) in s.chunks() {
                    mix(u64::from(ssrc));
                    for (t, v) in items {
                        assert_ne!(t, rtcp::sdes::END);
                        assert!(within(raw, v));
                        mix(u64::from(t) + v.len() as u64);
                    }
                    mix(s.cname(ssrc).map_or(0, <[u8]>::len) as u64);
                }
            }
            Packet::Bye(b) => {
                assert_eq!(b.ssrcs().count(), count);
                mix(b.ssrcs().map(u64::from).sum::<u64>());
                if let Some(r) = b.reason() {
                    assert!(within(raw, r));
                    mix(r.len() as u64);
                }
            }
            Packet::App(a) => {
                assert_eq!(usize::from(a.subtype()), count);
                mix(u64::from(a.ssrc()) ^ u64::from(u32::from_be_bytes(a.name())));
                assert!(within(raw, a.data()));
            }
            Packet::Nack(k) => {
                mix(u64::from(k.sender_ssrc() ^ k.media_ssrc()));
                let expected: usize = k
                    .pairs()
                    .map(|(_, blp)| 1 + blp.count_ones() as usize)
                    .sum();
                assert_eq!(k.lost().count(), expected);
                for seq in k.lost() {
                    mix(u64::from(seq));
                }
            }
            Packet::TransportCc(f) | Packet::Pli(f) => {
                mix(u64::from(f.sender_ssrc() ^ f.media_ssrc()));
                assert!(within(raw, f.fci()));
            }
            Packet::Fir(f) => {
                mix(u64::from(f.sender_ssrc() ^ f.media_ssrc()));
                for (ssrc, seq) in f.entries() {
                    mix(u64::from(ssrc) + u64::from(seq));
                }
            }
            Packet::Remb(r) => {
                mix(u64::from(r.sender_ssrc() ^ r.media_ssrc()) ^ r.bitrate_bps());
                mix(r.ssrcs().map(u64::from).sum::<u64>());
            }
            Packet::Other {
                packet_type,
                count_or_fmt,
                body,
            } => {
                assert_eq!(packet_type, raw[1]);
                assert_eq!(usize::from(count_or_fmt), count);
                assert!(within(raw, body));
            }
        }
    }
    black_box(acc);
}

/// Parses `data` as STUN and walks every accessor, verifying integrity with [`STUN_KEY`].
pub fn stun(data: &[u8]) {
    let Ok(m) = StunMessage::parse(data) else {
        return;
    };
    let bytes = m.as_bytes();
    assert!(within(data, bytes));
    assert_eq!(bytes.len() % 4, 0);
    assert!(bytes.len() >= stun::HEADER_LEN);
    let mut acc = u64::from(m.method()) ^ m.class() as u64;
    assert!(m.method() < 0x1000);
    acc ^= u64::from(m.transaction_id()[11]);
    for (typ, value) in m.attributes() {
        assert!(within(bytes, value));
        acc = acc.wrapping_add(u64::from(typ) + value.len() as u64);
    }
    for typ in [stun::attr::USERNAME, stun::attr::SOFTWARE, 0xffff] {
        acc ^= m.attribute(typ).map_or(0, <[u8]>::len) as u64;
    }
    acc ^= m.username().map_or(0, <[u8]>::len) as u64;
    let verdict = m.verify_integrity(STUN_KEY);
    if !m.has_integrity() {
        assert_eq!(verdict, Err(StunError::NoIntegrity));
    }
    acc ^= u64::from(verdict.is_ok());
    if let Some(addr) = m.xor_mapped_address() {
        acc ^= u64::from(addr.port());
    }
    if let Some((code, reason)) = m.error_code() {
        assert!(code <= 7 * 100 + 255);
        acc ^= u64::from(code) + reason.len() as u64;
    }
    black_box(acc);
}
