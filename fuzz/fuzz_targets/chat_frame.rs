//! The chat frame decoder: any bytes decode to frames, "need more" or an error, never a
//! panic; every decoded frame re-encodes to the same bytes where an encoder exists.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::chat::{self, Frame};

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while let Ok(Some((frame, n))) = chat::decode(&data[at..]) {
        assert!(n > 4 && at + n <= data.len());
        match frame {
            Frame::Ack { pairs } => assert!(chat::ack_pairs(pairs).count() * 16 == pairs.len()),
            Frame::GroupCreate { members, .. } => assert!(chat::u64s(members).count() * 8 == members.len()),
            Frame::Groups { raw } => assert!(chat::groups(raw).all(|g| g.is_some())),
            Frame::Msg(e) => {
                let mut out = Vec::new();
                chat::Encoder::new(&mut out).msg(&e);
                assert_eq!(out, &data[at..at + n], "MSG re-encodes identically");
            }
            _ => {}
        }
        at += n;
    }
});
