//! The relay link frame decoder (PROTOCOL.md section 8): any bytes give frames, "need more" or
//! an error, never a panic; every decoded message encodes to a frame that decodes to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::chat::wire;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while let Ok(Some(n)) = wire::frame_len(&data[at..]) {
        assert!(n > 4 && at + n <= data.len());
        if let Ok((dest, m)) = wire::decode(&data[at..at + n]) {
            let mut out = Vec::new();
            wire::encode(&mut out, dest, &m);
            let (dest2, m2) = wire::decode(&out).expect("what was encoded decodes");
            assert_eq!(dest, dest2);
            assert_eq!(format!("{m:?}"), format!("{m2:?}"));
        }
        at += n;
    }
});
