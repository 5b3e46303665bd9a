//! The proto crate's hot parsers: RTP (plain and with RFC 8285 extensions), RTCP compound
//! parsing and iteration, STUN parse + MESSAGE-INTEGRITY of a token-carrying binding request,
//! and Ed25519 join-token verification.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ed25519_dalek::SigningKey;
use proto::rtcp::{self, Packet, ReportBlock};
use proto::rtp::RtpPacket;
use proto::stun::StunMessage;
use proto::token::{self, Claims, Permissions, TokenKind, TokenVerifier};

/// A fixed instant before every token's expiry.
const NOW: u64 = 1_700_000_000;

fn rtp(c: &mut Criterion) {
    let mut g = c.benchmark_group("rtp_parse");
    g.throughput(Throughput::Elements(1));

    let mut plain = vec![0u8; 1200];
    let n = proto::rtp::write_packet(
        &mut plain,
        96,
        1000,
        90_000,
        0x1234_5678,
        true,
        &[0xab; 1188],
    )
    .expect("1200-byte buffer");
    assert_eq!(n, 1200);
    g.bench_function("plain_1200", |b| {
        b.iter(|| {
            let p = RtpPacket::parse(black_box(&plain)).expect("valid");
            (p.sequence_number(), p.ssrc(), p.payload().len())
        })
    });

    // One-byte extension block (RFC 8285 section 4.2) with audio level (id 1, 1 byte),
    // abs-send-time (id 3, 3 bytes) and transport-wide sequence number (id 5, 2 bytes).
    let mut ext = vec![
        0x90, 111, 0x03, 0xe8, 0, 1, 0x5f, 0x90, 0x12, 0x34, 0x56, 0x78,
    ];
    ext.extend_from_slice(&[0xBE, 0xDE, 0, 3]);
    ext.extend_from_slice(&[
        0x10, 0x85, 0x32, 0x01, 0x02, 0x03, 0x51, 0x00, 0x2a, 0, 0, 0,
    ]);
    ext.extend_from_slice(&[0xcd; 160]);
    assert_eq!(
        RtpPacket::parse(&ext).expect("valid").extensions().count(),
        3
    );
    g.bench_function("one_byte_ext_3", |b| {
        b.iter(|| {
            let p = RtpPacket::parse(black_box(&ext)).expect("valid");
            let mut sum = 0usize;
            for (id, data) in p.extensions() {
                sum += usize::from(id) + data.len();
            }
            (sum, p.payload().len())
        })
    });
    g.finish();
}

fn rtcp(c: &mut Criterion) {
    let mut g = c.benchmark_group("rtcp_parse_iter");
    g.throughput(Throughput::Elements(1));

    let block = ReportBlock {
        ssrc: 0x1111_2222,
        fraction_lost: 12,
        cumulative_lost: 40,
        highest_seq: 0x0001_2345,
        jitter: 120,
        lsr: 0xdead_beef,
        dlsr: 0x0001_0000,
    };
    let mut buf = [0u8; 256];
    let mut n = rtcp::write_sr_with_reports(
        &mut buf,
        0x1234_5678,
        0xe000_0000_8000_0000,
        90_000,
        500,
        600_000,
        &[block],
    )
    .expect("fits");
    n += rtcp::write_sdes_cname(&mut buf[n..], 0x1234_5678, b"4TSchQ9XqYwyLh6r").expect("fits");
    let sr_sdes = buf[..n].to_vec();
    g.bench_function("sr_sdes", |b| {
        b.iter(|| {
            let c = rtcp::parse_compound(black_box(&sr_sdes)).expect("valid");
            let mut acc = 0u64;
            for p in c.iter() {
                match p {
                    Packet::SenderReport(sr) => {
                        acc ^= sr.ntp_timestamp() ^ u64::from(sr.rtp_timestamp());
                        for r in sr.reports() {
                            acc ^= u64::from(r.highest_seq ^ r.jitter);
                        }
                    }
                    Packet::Sdes(s) => {
                        for (ssrc, items) in s.chunks() {
                            acc ^= u64::from(ssrc);
                            for (t, v) in items {
                                acc ^= u64::from(t) + v.len() as u64;
                            }
                        }
                    }
                    _ => {}
                }
            }
            acc
        })
    });

    // A NACK for 12 losses in a burst of 40 packets: three PID/BLP pairs.
    let lost = [
        1000, 1001, 1003, 1007, 1015, 1016, 1020, 1021, 1022, 1030, 1035, 1039,
    ];
    let n = rtcp::write_nack(&mut buf, 0x1234_5678, 0x8765_4321, &lost).expect("fits");
    let nack = buf[..n].to_vec();
    g.bench_function("nack", |b| {
        b.iter(|| {
            let c = rtcp::parse_compound(black_box(&nack)).expect("valid");
            let mut sum = 0u32;
            for p in c.iter() {
                if let Packet::Nack(k) = p {
                    sum += u32::from(k.media_ssrc() as u16);
                    for seq in k.lost() {
                        sum += u32::from(seq);
                    }
                }
            }
            sum
        })
    });
    g.finish();
}

fn signing_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn token_text() -> String {
    Claims {
        kind: TokenKind::Room,
        permissions: Permissions::PUBLISH | Permissions::SUBSCRIBE,
        relay_id: 1,
        shard_idx: 0,
        expires_at: NOW + 3600,
        scope_id: 42,
        participant_id: 9,
    }
    .sign_text(&signing_key())
}

fn stun(c: &mut Criterion) {
    let mut g = c.benchmark_group("stun");
    g.throughput(Throughput::Elements(1));
    let text = token_text();
    assert_eq!(text.len(), token::TOKEN_TEXT_LEN);
    let key = token::stun_key(text.as_bytes());
    let mut buf = [0u8; 512];
    let n = proto::stun::write_binding_request(&mut buf, &[9; 12], text.as_bytes(), &key)
        .expect("fits");
    let req = buf[..n].to_vec();
    g.bench_function("parse_verify_integrity", |b| {
        b.iter(|| {
            let m = StunMessage::parse(black_box(&req)).expect("valid");
            m.verify_integrity(black_box(&key)).is_ok()
        })
    });
    // As the relay does for a binding it already knows: derive the key from USERNAME first.
    g.bench_function("parse_derive_key_verify", |b| {
        b.iter(|| {
            let m = StunMessage::parse(black_box(&req)).expect("valid");
            let key = token::stun_key(m.username().expect("USERNAME"));
            m.verify_integrity(&key).is_ok()
        })
    });
    g.finish();
}

fn token(c: &mut Criterion) {
    let text = token_text();
    let verifier = TokenVerifier::new(signing_key().verifying_key(), 1);
    assert!(verifier.verify_text(text.as_bytes(), NOW).is_ok());
    let mut g = c.benchmark_group("token");
    g.throughput(Throughput::Elements(1));
    g.bench_function("verify_text_ed25519", |b| {
        b.iter(|| {
            verifier
                .verify_text(black_box(text.as_bytes()), NOW)
                .is_ok()
        })
    });
    g.finish();
}

criterion_group!(benches, rtp, rtcp, stun, token);
criterion_main!(benches);
