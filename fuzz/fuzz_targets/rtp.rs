//! RTP: parse arbitrary bytes and walk every accessor and extension iterator; and check that
//! a packet written from fuzzer-chosen fields parses back to the same fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::rtp::{write_packet, RtpPacket, RTP_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    proto_fuzz::rtp(data);

    if let Some((hdr, payload)) = data.split_first_chunk::<11>() {
        let pt = hdr[0] & 0x7f;
        let marker = hdr[0] & 0x80 != 0;
        let seq = u16::from_be_bytes([hdr[1], hdr[2]]);
        let ts = u32::from_be_bytes([hdr[3], hdr[4], hdr[5], hdr[6]]);
        let ssrc = u32::from_be_bytes([hdr[7], hdr[8], hdr[9], hdr[10]]);
        let len = RTP_HEADER_LEN + payload.len();
        let mut out = vec![0u8; len];
        assert!(write_packet(&mut out[..len - 1], pt, seq, ts, ssrc, marker, payload).is_none());
        let n = write_packet(&mut out, pt, seq, ts, ssrc, marker, payload).expect("sized buffer");
        let p = RtpPacket::parse(&out[..n]).expect("written packet parses");
        assert_eq!(
            (
                p.payload_type(),
                p.marker(),
                p.sequence_number(),
                p.timestamp(),
                p.ssrc()
            ),
            (pt, marker, seq, ts, ssrc)
        );
        assert_eq!(p.payload(), payload);
        assert!(p.extension().is_none());
    }
});
