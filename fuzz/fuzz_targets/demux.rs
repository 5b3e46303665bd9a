//! Demultiplexing: classify arbitrary datagrams and hand them to the parser the relay would
//! use, walking the result as the per-protocol targets do.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::demux::{classify, PacketKind};

fuzz_target!(|data: &[u8]| {
    let kind = classify(data);
    match kind {
        PacketKind::Stun => {
            assert!(data[0] <= 3);
            proto_fuzz::stun(data);
        }
        PacketKind::Rtp => {
            assert!((128..=191).contains(&data[0]));
            proto_fuzz::rtp(data);
        }
        PacketKind::Rtcp => {
            assert!((192..=223).contains(&data[1]));
            proto_fuzz::rtcp(data);
        }
        PacketKind::Dtls => assert!((20..=63).contains(&data[0])),
        PacketKind::Unknown => {}
    }
});
