//! STUN: parse arbitrary bytes and walk attributes, XOR-MAPPED-ADDRESS, ERROR-CODE and
//! MESSAGE-INTEGRITY (with a fixed key); and check that messages written from fuzzer-chosen
//! fields parse back and verify.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use proto::stun::{self, StunError, StunMessage};
use proto_fuzz::STUN_KEY;

fuzz_target!(|data: &[u8]| {
    proto_fuzz::stun(data);

    let Some((txid, rest)) = data.split_first_chunk::<12>() else {
        return;
    };
    let mut out = [0u8; 1024];

    // Binding request with an arbitrary USERNAME (a token in practice).
    let username = &rest[..rest.len().min(512)];
    let n = stun::write_binding_request(&mut out, txid, username, STUN_KEY).expect("fits");
    let m = StunMessage::parse(&out[..n]).expect("written request parses");
    assert_eq!(m.transaction_id(), txid);
    assert_eq!(m.username(), Some(username));
    assert_eq!(m.verify_integrity(STUN_KEY), Ok(()));
    assert_eq!(m.verify_integrity(b"other"), Err(StunError::BadIntegrity));
    proto_fuzz::stun(&out[..n]);

    // Binding success with an arbitrary mapped address.
    if let Some(a) = rest.first_chunk::<18>() {
        let port = u16::from_be_bytes([a[0], a[1]]);
        let ip = if a[0] & 1 == 0 {
            IpAddr::V4(Ipv4Addr::new(a[2], a[3], a[4], a[5]))
        } else {
            let mut o = [0u8; 16];
            o.copy_from_slice(&a[2..18]);
            IpAddr::V6(Ipv6Addr::from(o))
        };
        let addr = SocketAddr::new(ip, port);
        let n = stun::write_binding_success(&mut out, txid, addr, STUN_KEY).expect("fits");
        let m = StunMessage::parse(&out[..n]).expect("written success parses");
        assert_eq!(m.xor_mapped_address(), Some(addr));
        assert_eq!(m.verify_integrity(STUN_KEY), Ok(()));
    }

    // Binding error with an arbitrary code and reason.
    if let Some((c, reason)) = rest.split_first_chunk::<2>() {
        let code = 300 + u16::from_be_bytes(*c) % 400;
        let reason = String::from_utf8_lossy(reason);
        let n = stun::write_binding_error(&mut out, txid, code, &reason).expect("fits");
        let m = StunMessage::parse(&out[..n]).expect("written error parses");
        let (got_code, got_reason) = m.error_code().expect("ERROR-CODE present");
        assert_eq!(got_code, code);
        let bytes = reason.as_bytes();
        assert_eq!(got_reason, &bytes[..bytes.len().min(128)]);
    }
});
