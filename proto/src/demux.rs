//! Demultiplexing of a shared UDP port by the first byte (RFC 7983 section 7), with the RTP/RTCP
//! split of RFC 5761 section 4.

/// What a datagram is, judged from its first two bytes only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketKind {
    /// First byte 0..=3: STUN.
    Stun,
    /// First byte 20..=63: DTLS (not served yet, counted and dropped).
    Dtls,
    /// First byte 128..=191 and payload type outside 64..=95: RTP.
    Rtp,
    /// First byte 128..=191 and second byte 192..=223 (RTCP packet types 192..=223).
    Rtcp,
    /// Anything else (including TURN channel data, 64..=79, and empty datagrams).
    Unknown,
}

/// Classifies a datagram. Never panics; an empty or one-byte datagram is `Unknown` unless its
/// first byte alone decides.
#[inline]
pub fn classify(datagram: &[u8]) -> PacketKind {
    let Some(&b0) = datagram.first() else {
        return PacketKind::Unknown;
    };
    match b0 {
        0..=3 => PacketKind::Stun,
        20..=63 => PacketKind::Dtls,
        128..=191 => match datagram.get(1) {
            // RFC 5761 section 4: RTCP packet types 192..=223 occupy the second byte; RTP
            // payload types 64..=95 are therefore not used when muxing.
            Some(192..=223) => PacketKind::Rtcp,
            Some(_) => PacketKind::Rtp,
            None => PacketKind::Unknown,
        },
        _ => PacketKind::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_first_bytes() {
        assert_eq!(classify(&[]), PacketKind::Unknown);
        assert_eq!(classify(&[0, 1]), PacketKind::Stun);
        assert_eq!(classify(&[22]), PacketKind::Dtls);
        assert_eq!(classify(&[0x80, 96]), PacketKind::Rtp);
        assert_eq!(classify(&[0x80, 200]), PacketKind::Rtcp);
        assert_eq!(classify(&[0x81, 206]), PacketKind::Rtcp);
        assert_eq!(classify(&[0x80]), PacketKind::Unknown);
        assert_eq!(classify(&[64, 0]), PacketKind::Unknown);
        assert_eq!(classify(&[0xff, 0]), PacketKind::Unknown);
    }
}
