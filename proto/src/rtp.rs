//! RTP fixed header (RFC 3550 section 5.1) with CSRCs, padding and header extensions in the
//! one-byte and two-byte forms of RFC 8285. Parsing is a zero-copy view.

/// Why a datagram is not a valid RTP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RtpError {
    /// Shorter than the 12-byte fixed header, or than the header its fields announce.
    Truncated,
    /// Version field is not 2.
    BadVersion,
    /// Padding count is zero or larger than the payload.
    BadPadding,
}

impl std::fmt::Display for RtpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Truncated => "truncated RTP packet",
            Self::BadVersion => "RTP version is not 2",
            Self::BadPadding => "invalid RTP padding",
        })
    }
}

impl std::error::Error for RtpError {}

/// A parsed view of an RTP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtpPacket<'a> {
    buf: &'a [u8],
    /// Offset of the payload.
    payload_start: usize,
    /// End of the payload (before padding).
    payload_end: usize,
    /// Extension block (profile, data) if the X bit is set.
    extension: Option<(u16, &'a [u8])>,
}

/// The fixed header is 12 bytes.
pub const RTP_HEADER_LEN: usize = 12;

impl<'a> RtpPacket<'a> {
    /// Parses `buf`. Never panics.
    #[inline]
    pub fn parse(buf: &'a [u8]) -> Result<Self, RtpError> {
        if buf.len() < RTP_HEADER_LEN {
            return Err(RtpError::Truncated);
        }
        if buf[0] >> 6 != 2 {
            return Err(RtpError::BadVersion);
        }
        let n_csrc = usize::from(buf[0] & 0x0f);
        let mut at = RTP_HEADER_LEN + 4 * n_csrc;
        if buf.len() < at {
            return Err(RtpError::Truncated);
        }
        let mut extension = None;
        if buf[0] & 0x10 != 0 {
            // RFC 3550 section 5.3.1: 16-bit profile, 16-bit length in 32-bit words.
            let hdr = buf.get(at..at + 4).ok_or(RtpError::Truncated)?;
            let profile = u16::from_be_bytes([hdr[0], hdr[1]]);
            let len = 4 * usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
            let data = buf.get(at + 4..at + 4 + len).ok_or(RtpError::Truncated)?;
            extension = Some((profile, data));
            at += 4 + len;
        }
        let mut end = buf.len();
        if buf[0] & 0x20 != 0 {
            // RFC 3550 section 5.1: the last octet counts the padding, itself included.
            let pad = usize::from(buf[end - 1]);
            if pad == 0 || pad > end - at {
                return Err(RtpError::BadPadding);
            }
            end -= pad;
        }
        Ok(Self {
            buf,
            payload_start: at,
            payload_end: end,
            extension,
        })
    }

    /// Marker bit.
    pub fn marker(&self) -> bool {
        self.buf[1] & 0x80 != 0
    }
    /// Payload type.
    pub fn payload_type(&self) -> u8 {
        self.buf[1] & 0x7f
    }
    /// Sequence number.
    pub fn sequence_number(&self) -> u16 {
        u16::from_be_bytes([self.buf[2], self.buf[3]])
    }
    /// RTP timestamp.
    pub fn timestamp(&self) -> u32 {
        u32::from_be_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]])
    }
    /// Synchronisation source.
    #[inline]
    pub fn ssrc(&self) -> u32 {
        u32::from_be_bytes([self.buf[8], self.buf[9], self.buf[10], self.buf[11]])
    }
    /// Contributing sources.
    pub fn csrcs(&self) -> impl Iterator<Item = u32> + 'a {
        let n = usize::from(self.buf[0] & 0x0f);
        self.buf[RTP_HEADER_LEN..RTP_HEADER_LEN + 4 * n]
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
    }
    /// The payload, without padding.
    pub fn payload(&self) -> &'a [u8] {
        &self.buf[self.payload_start..self.payload_end]
    }
    /// Raw extension block: (profile, data), if present.
    pub fn extension(&self) -> Option<(u16, &'a [u8])> {
        self.extension
    }
    /// RFC 8285 header extension elements. Empty when there is no extension block or its
    /// profile is neither the one-byte (0xBEDE) nor the two-byte (0x100x) form.
    pub fn extensions(&self) -> Extensions<'a> {
        match self.extension {
            Some((0xBEDE, data)) => Extensions {
                data,
                two_byte: false,
            },
            Some((p, data)) if p & 0xfff0 == 0x1000 => Extensions {
                data,
                two_byte: true,
            },
            _ => Extensions {
                data: &[],
                two_byte: false,
            },
        }
    }
    /// The first header extension element with `id`, if any.
    pub fn extension_by_id(&self, id: u8) -> Option<&'a [u8]> {
        self.extensions().find(|&(i, _)| i == id).map(|(_, d)| d)
    }
}

/// Iterator over RFC 8285 extension elements: `(id, data)`. Stops at the first malformed
/// element rather than failing the whole packet, so media keeps flowing.
#[derive(Clone, Debug)]
pub struct Extensions<'a> {
    data: &'a [u8],
    two_byte: bool,
}

impl<'a> Iterator for Extensions<'a> {
    type Item = (u8, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (&first, rest) = self.data.split_first()?;
            if first == 0 {
                // Padding byte between elements (RFC 8285 sections 4.2 and 4.3).
                self.data = rest;
                continue;
            }
            let (id, len, hdr) = if self.two_byte {
                (first, usize::from(*rest.first()?), 2)
            } else {
                let id = first >> 4;
                if id == 15 || id == 0 {
                    // RFC 8285 section 4.2: id 15 means stop processing; id 0 is reserved
                    // for padding, which is a whole zero byte, so a 0 id with a non-zero
                    // length is malformed.
                    self.data = &[];
                    return None;
                }
                (id, usize::from(first & 0x0f) + 1, 1)
            };
            let Some(value) = self.data.get(hdr..hdr + len) else {
                self.data = &[];
                return None;
            };
            self.data = &self.data[hdr + len..];
            return Some((id, value));
        }
    }
}

/// Writes a minimal RTP header (no CSRC, no extension) followed by `payload` into `out`.
/// Returns the packet length, or `None` if `out` is too small. For load generators and tests.
pub fn write_packet(
    out: &mut [u8],
    payload_type: u8,
    sequence_number: u16,
    timestamp: u32,
    ssrc: u32,
    marker: bool,
    payload: &[u8],
) -> Option<usize> {
    let len = RTP_HEADER_LEN + payload.len();
    let out = out.get_mut(..len)?;
    out[0] = 0x80;
    out[1] = (payload_type & 0x7f) | if marker { 0x80 } else { 0 };
    out[2..4].copy_from_slice(&sequence_number.to_be_bytes());
    out[4..8].copy_from_slice(&timestamp.to_be_bytes());
    out[8..12].copy_from_slice(&ssrc.to_be_bytes());
    out[RTP_HEADER_LEN..].copy_from_slice(payload);
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_minimal_packet() {
        let mut buf = [0u8; 64];
        let n = write_packet(&mut buf, 111, 7, 960, 0xdead_beef, true, b"opus").unwrap();
        let p = RtpPacket::parse(&buf[..n]).unwrap();
        assert_eq!(p.payload_type(), 111);
        assert!(p.marker());
        assert_eq!(p.sequence_number(), 7);
        assert_eq!(p.timestamp(), 960);
        assert_eq!(p.ssrc(), 0xdead_beef);
        assert_eq!(p.payload(), b"opus");
        assert_eq!(p.csrcs().count(), 0);
        assert!(p.extension().is_none());
    }

    #[test]
    fn parses_csrcs_padding_and_one_byte_extensions() {
        let mut pkt = vec![0x80 | 0x20 | 0x10 | 2, 96, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3];
        pkt.extend_from_slice(&[0, 0, 0, 10, 0, 0, 0, 11]); // two CSRCs
                                                            // RFC 8285 section 4.2 one-byte form: id 1 len 1 (audio level), padding, id 2 len 3.
        pkt.extend_from_slice(&[0xBE, 0xDE, 0, 2, 0x10, 0x85, 0, 0x22, 1, 2, 3, 0]);
        pkt.extend_from_slice(b"payload");
        pkt.extend_from_slice(&[0, 0, 3]); // three bytes of padding
        let p = RtpPacket::parse(&pkt).unwrap();
        assert_eq!(p.csrcs().collect::<Vec<_>>(), vec![10, 11]);
        assert_eq!(p.payload(), b"payload");
        let ext: Vec<_> = p.extensions().collect();
        assert_eq!(ext, vec![(1, &[0x85][..]), (2, &[1, 2, 3][..])]);
        assert_eq!(p.extension_by_id(2), Some(&[1, 2, 3][..]));
    }

    #[test]
    fn one_byte_id_zero_with_length_stops_extensions() {
        // Found by fuzzing: 0x02 is id 0 with L=2 (3 bytes), which must not be yielded.
        let mut pkt = vec![0x90, 96, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3];
        pkt.extend_from_slice(&[0xBE, 0xDE, 0, 2, 0x10, 0x85, 0x02, 1, 2, 3, 0, 0]);
        let p = RtpPacket::parse(&pkt).unwrap();
        assert_eq!(p.extensions().collect::<Vec<_>>(), vec![(1, &[0x85][..])]);
        assert_eq!(p.extension_by_id(0), None);
    }

    #[test]
    fn parses_two_byte_extensions() {
        let mut pkt = vec![0x90, 96, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3];
        pkt.extend_from_slice(&[0x10, 0x00, 0, 2, 5, 0, 0, 7, 2, 9, 9, 0]);
        let p = RtpPacket::parse(&pkt).unwrap();
        let ext: Vec<_> = p.extensions().collect();
        assert_eq!(ext, vec![(5, &[][..]), (7, &[9, 9][..])]);
    }

    #[test]
    fn rejects_truncated_and_bad_padding() {
        assert_eq!(RtpPacket::parse(&[0x80; 11]), Err(RtpError::Truncated));
        assert_eq!(RtpPacket::parse(&[0x40; 12]), Err(RtpError::BadVersion));
        let mut csrc = [0u8; 12];
        csrc[0] = 0x8f;
        assert_eq!(RtpPacket::parse(&csrc), Err(RtpError::Truncated));
        let mut ext = [0u8; 16];
        ext[0] = 0x90;
        ext[15] = 1;
        assert_eq!(RtpPacket::parse(&ext), Err(RtpError::Truncated));
        let mut pad = [0u8; 13];
        pad[0] = 0xa0;
        pad[12] = 5;
        assert_eq!(RtpPacket::parse(&pad), Err(RtpError::BadPadding));
        pad[12] = 0;
        assert_eq!(RtpPacket::parse(&pad), Err(RtpError::BadPadding));
    }
}
