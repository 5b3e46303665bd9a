//! RTCP: parse arbitrary bytes as a compound packet and walk every accessor of every
//! sub-packet; and check writer properties on fuzzer-chosen values (NACK packing covers
//! exactly the given sequence numbers in any order, REMB rounds down to 18 significant bits).
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use proto::rtcp::{self, Packet};

fuzz_target!(|data: &[u8]| {
    proto_fuzz::rtcp(data);

    // NACK: any list of sequence numbers, in any order, with repeats.
    let lost: Vec<u16> = data
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    let mut out = vec![0u8; 12 + 4 * lost.len()];
    match rtcp::write_nack(&mut out, 1, 2, &lost) {
        None => assert!(lost.is_empty()),
        Some(n) => {
            let c = rtcp::parse_compound(&out[..n]).expect("written NACK parses");
            let Some(Packet::Nack(k)) = c.iter().next() else {
                panic!("not a NACK")
            };
            let got: BTreeSet<u16> = k.lost().collect();
            let want: BTreeSet<u16> = lost.iter().copied().collect();
            assert_eq!(got, want);
            assert!(k.pairs().count() <= lost.len());
        }
    }

    // REMB: the bitrate survives rounded down to 18 significant bits.
    if let Some(b) = data.first_chunk::<8>() {
        let bitrate = u64::from_be_bytes(*b);
        let mut out = [0u8; 64];
        let n = rtcp::write_remb(&mut out, 1, bitrate, &[3, 4]).expect("fits");
        let c = rtcp::parse_compound(&out[..n]).expect("written REMB parses");
        let Some(Packet::Remb(r)) = c.iter().next() else {
            panic!("not a REMB")
        };
        let exp = (64 - bitrate.leading_zeros()).saturating_sub(18);
        assert_eq!(r.bitrate_bps(), bitrate >> exp << exp);
        assert_eq!(r.ssrcs().collect::<Vec<_>>(), [3, 4]);
    }
});
