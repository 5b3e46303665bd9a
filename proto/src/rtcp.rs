//! RTCP compound packets (RFC 3550 section 6) with the feedback messages of RFC 4585 (generic
//! NACK, PLI), RFC 5104 (FIR), transport-wide congestion control feedback
//! (draft-holmer-rmcat-transport-wide-cc-extensions-01) and REMB
//! (draft-alvestrand-rmcat-remb-03).
//!
//! [`parse_compound`] validates a whole datagram once; [`Compound::iter`] then yields zero-copy
//! typed views whose accessors are total (they never panic). Writers fill a caller-provided
//! buffer and return the written length; a compound packet is the concatenation of written
//! packets.
//!
//! Every RTCP packet starts with the same 32-bit header (RFC 3550 section 6.4.1):
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |V=2|P| RC/FMT  |      PT       |             length            |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! `length` counts 32-bit words minus one, header and padding included.
//!
//! # Validation policy
//!
//! [`parse_compound`] is strict: the whole datagram is refused when any sub-packet is
//! malformed, as RFC 3550 appendix A.2 asks for compound packets. That covers the header chain
//! (version 2, every length field inside the datagram, padding only on the last sub-packet, a
//! padding count between 1 and the packet's body length) and the body of every sub-packet of a
//! type this module decodes (for example an SR shorter than its report count requires, a
//! feedback message shorter than its two SSRCs, a NACK whose FCI is not a whole number of
//! PID/BLP pairs). Unknown packet types and unknown feedback formats are not inspected beyond
//! their header and are passed through as [`Packet::Other`].
//!
//! Two checks of appendix A.2 are deliberately not made: the first sub-packet need not be an SR
//! or RR and may be alone, because WebRTC negotiates reduced-size RTCP (RFC 5506 section 3),
//! where a datagram may carry a single feedback message.

/// Packet types (RFC 3550 section 12.1, RFC 4585 section 6.1, RFC 3611 section 2).
pub mod pt {
    /// Sender report.
    pub const SR: u8 = 200;
    /// Receiver report.
    pub const RR: u8 = 201;
    /// Source description.
    pub const SDES: u8 = 202;
    /// Goodbye.
    pub const BYE: u8 = 203;
    /// Application-defined.
    pub const APP: u8 = 204;
    /// Transport-layer feedback (RFC 4585 section 6.2).
    pub const RTPFB: u8 = 205;
    /// Payload-specific feedback (RFC 4585 section 6.3).
    pub const PSFB: u8 = 206;
    /// Extended reports (RFC 3611); passed through.
    pub const XR: u8 = 207;
}

/// Feedback message types, carried in the 5-bit FMT field of RTPFB and PSFB packets.
pub mod fmt {
    /// RTPFB: generic NACK (RFC 4585 section 6.2.1).
    pub const NACK: u8 = 1;
    /// RTPFB: transport-wide congestion control feedback (draft-holmer, section 3.1).
    pub const TRANSPORT_CC: u8 = 15;
    /// PSFB: picture loss indication (RFC 4585 section 6.3.1).
    pub const PLI: u8 = 1;
    /// PSFB: full intra request (RFC 5104 section 4.3.1).
    pub const FIR: u8 = 4;
    /// PSFB: application layer feedback (RFC 4585 section 6.4), which carries REMB.
    pub const AFB: u8 = 15;
}

/// SDES item types (RFC 3550 section 6.5).
pub mod sdes {
    /// End of the item list of a chunk.
    pub const END: u8 = 0;
    /// Canonical end-point identifier.
    pub const CNAME: u8 = 1;
    /// User name.
    pub const NAME: u8 = 2;
    /// Electronic mail address.
    pub const EMAIL: u8 = 3;
    /// Phone number.
    pub const PHONE: u8 = 4;
    /// Geographic location.
    pub const LOC: u8 = 5;
    /// Application or tool name.
    pub const TOOL: u8 = 6;
    /// Notice/status.
    pub const NOTE: u8 = 7;
    /// Private extension.
    pub const PRIV: u8 = 8;
}

/// Size of the common RTCP header.
pub const HEADER_LEN: usize = 4;
/// Size of one report block (RFC 3550 section 6.4.1).
pub const REPORT_BLOCK_LEN: usize = 24;
/// Size of the sender info that follows the SSRC in an SR.
const SENDER_INFO_LEN: usize = 20;
/// Size of the two SSRCs common to every feedback message (RFC 4585 section 6.1).
const FEEDBACK_COMMON_LEN: usize = 8;
/// The REMB unique identifier.
const REMB_ID: [u8; 4] = *b"REMB";
/// Largest value of the 5-bit RC/SC/FMT field.
const MAX_COUNT: usize = 31;

/// Why a datagram is not a valid RTCP compound packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RtcpError {
    /// The datagram ends inside a sub-packet header, or a length field runs past its end.
    Truncated,
    /// A sub-packet's version field is not 2.
    BadVersion,
    /// A sub-packet's length is inconsistent with its contents: too short for the fixed part
    /// of its type, for the report blocks, chunks or SSRCs its count announces, or for its
    /// FCI entries.
    BadLength,
    /// Padding on a sub-packet other than the last, or a padding count of zero or larger than
    /// the sub-packet's body.
    BadPadding,
    /// The datagram is empty.
    Empty,
}

impl std::fmt::Display for RtcpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Truncated => "truncated RTCP packet",
            Self::BadVersion => "RTCP version is not 2",
            Self::BadLength => "RTCP packet length inconsistent with its contents",
            Self::BadPadding => "invalid RTCP padding",
            Self::Empty => "empty RTCP datagram",
        })
    }
}

impl std::error::Error for RtcpError {}

/// Validates every sub-packet of the compound datagram `buf` and returns a view of it.
///
/// See the module documentation for what is checked. Never panics, never allocates.
pub fn parse_compound(buf: &[u8]) -> Result<Compound<'_>, RtcpError> {
    if buf.is_empty() {
        return Err(RtcpError::Empty);
    }
    let mut rest = buf;
    while !rest.is_empty() {
        let (packet, tail) = split_packet(rest)?;
        // RFC 3550 section 6.4.1: padding may only be present on the last packet.
        if packet[0] & 0x20 != 0 && !tail.is_empty() {
            return Err(RtcpError::BadPadding);
        }
        decode(packet)?;
        rest = tail;
    }
    Ok(Compound { buf })
}

/// Splits the first sub-packet off `buf` after checking its version and length field.
fn split_packet(buf: &[u8]) -> Result<(&[u8], &[u8]), RtcpError> {
    let hdr = buf.get(..HEADER_LEN).ok_or(RtcpError::Truncated)?;
    if hdr[0] >> 6 != 2 {
        return Err(RtcpError::BadVersion);
    }
    let len = 4 * (usize::from(u16::from_be_bytes([hdr[2], hdr[3]])) + 1);
    if len > buf.len() {
        return Err(RtcpError::Truncated);
    }
    Ok(buf.split_at(len))
}

/// Decodes one sub-packet whose header chain is valid (version 2, `packet` exactly as long as
/// its length field says).
fn decode(packet: &[u8]) -> Result<Packet<'_>, RtcpError> {
    let count = packet[0] & 0x1f;
    let packet_type = packet[1];
    let mut end = packet.len();
    if packet[0] & 0x20 != 0 {
        // RFC 3550 section 6.4.1: the last octet counts the padding, itself included.
        let pad = usize::from(packet[end - 1]);
        if pad == 0 || pad > end - HEADER_LEN {
            return Err(RtcpError::BadPadding);
        }
        end -= pad;
    }
    let body = &packet[HEADER_LEN..end];
    let n = usize::from(count);
    let need = |min: usize| {
        if body.len() < min {
            Err(RtcpError::BadLength)
        } else {
            Ok(())
        }
    };
    Ok(match packet_type {
        pt::SR => {
            need(4 + SENDER_INFO_LEN + n * REPORT_BLOCK_LEN)?;
            Packet::SenderReport(SenderReport { count, body })
        }
        pt::RR => {
            need(4 + n * REPORT_BLOCK_LEN)?;
            Packet::ReceiverReport(ReceiverReport { count, body })
        }
        pt::SDES => {
            let mut at = 0;
            for _ in 0..n {
                at = sdes_chunk(body, at).ok_or(RtcpError::BadLength)?.2;
            }
            Packet::Sdes(Sdes { count, body })
        }
        pt::BYE => {
            need(4 * n)?;
            if let Some(&reason_len) = body.get(4 * n) {
                need(4 * n + 1 + usize::from(reason_len))?;
            }
            Packet::Bye(Bye { count, body })
        }
        pt::APP => {
            need(8)?;
            Packet::App(App {
                subtype: count,
                body,
            })
        }
        pt::RTPFB | pt::PSFB => {
            need(FEEDBACK_COMMON_LEN)?;
            let fb = Feedback { body };
            let fci = fb.fci();
            match (packet_type, count) {
                (pt::RTPFB, fmt::NACK) => {
                    if fci.is_empty() || fci.len() & 3 != 0 {
                        return Err(RtcpError::BadLength);
                    }
                    Packet::Nack(Nack { fb })
                }
                (pt::RTPFB, fmt::TRANSPORT_CC) => Packet::TransportCc(fb),
                (pt::PSFB, fmt::PLI) => Packet::Pli(fb),
                (pt::PSFB, fmt::FIR) => {
                    if fci.is_empty() || fci.len() & 7 != 0 {
                        return Err(RtcpError::BadLength);
                    }
                    Packet::Fir(Fir { fb })
                }
                (pt::PSFB, fmt::AFB) if fci.starts_with(&REMB_ID) => {
                    let n_ssrc = fci.get(4).map_or(0, |&b| usize::from(b));
                    if fci.len() < 8 + 4 * n_ssrc {
                        return Err(RtcpError::BadLength);
                    }
                    Packet::Remb(Remb { fb })
                }
                _ => Packet::Other {
                    packet_type,
                    count_or_fmt: count,
                    body,
                },
            }
        }
        _ => Packet::Other {
            packet_type,
            count_or_fmt: count,
            body,
        },
    })
}

/// Reads a big-endian u32 at `at`. Callers guarantee `at + 4 <= b.len()`.
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A validated compound RTCP datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compound<'a> {
    buf: &'a [u8],
}

impl<'a> Compound<'a> {
    /// The sub-packets in order, decoded.
    pub fn iter(&self) -> Iter<'a> {
        Iter { rest: self.buf }
    }
    /// The sub-packets in order as raw bytes, header and padding included (for forwarding a
    /// sub-packet unchanged).
    pub fn raw_packets(&self) -> RawPackets<'a> {
        RawPackets { rest: self.buf }
    }
    /// The whole datagram.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buf
    }
}

impl<'a> IntoIterator for &Compound<'a> {
    type Item = Packet<'a>;
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// Iterator over the raw sub-packets of a [`Compound`].
#[derive(Clone, Debug)]
pub struct RawPackets<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for RawPackets<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        // `parse_compound` proved the chain; on any surprise stop rather than panic.
        let (packet, tail) = split_packet(self.rest).ok()?;
        self.rest = tail;
        Some(packet)
    }
}

/// Iterator over the decoded sub-packets of a [`Compound`].
#[derive(Clone, Debug)]
pub struct Iter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Iter<'a> {
    type Item = Packet<'a>;
    fn next(&mut self) -> Option<Packet<'a>> {
        let (packet, tail) = split_packet(self.rest).ok()?;
        self.rest = tail;
        // Cannot fail: `parse_compound` decoded this very slice. Stop rather than panic.
        match decode(packet) {
            Ok(p) => Some(p),
            Err(_) => {
                self.rest = &[];
                None
            }
        }
    }
}

/// One decoded sub-packet of a compound datagram. Deliberately exhaustive so that code in
/// this workspace matching on it is revisited when a type gains its own variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    /// PT 200 (RFC 3550 section 6.4.1).
    SenderReport(SenderReport<'a>),
    /// PT 201 (RFC 3550 section 6.4.2).
    ReceiverReport(ReceiverReport<'a>),
    /// PT 202 (RFC 3550 section 6.5).
    Sdes(Sdes<'a>),
    /// PT 203 (RFC 3550 section 6.6).
    Bye(Bye<'a>),
    /// PT 204 (RFC 3550 section 6.7).
    App(App<'a>),
    /// PT 205 FMT 1: generic NACK (RFC 4585 section 6.2.1).
    Nack(Nack<'a>),
    /// PT 205 FMT 15: transport-wide congestion control feedback
    /// (draft-holmer-rmcat-transport-wide-cc-extensions-01 section 3.1). Recognised and passed
    /// through; the FCI is not decoded.
    TransportCc(Feedback<'a>),
    /// PT 206 FMT 1: picture loss indication (RFC 4585 section 6.3.1).
    Pli(Feedback<'a>),
    /// PT 206 FMT 4: full intra request (RFC 5104 section 4.3.1).
    Fir(Fir<'a>),
    /// PT 206 FMT 15 with the "REMB" identifier: receiver estimated maximum bitrate
    /// (draft-alvestrand-rmcat-remb-03 section 2.2).
    Remb(Remb<'a>),
    /// Any other packet type (XR, unknown RTPFB/PSFB formats, application layer feedback other
    /// than REMB, ...), passed through.
    Other {
        /// The PT field.
        packet_type: u8,
        /// The 5-bit RC/SC/FMT field.
        count_or_fmt: u8,
        /// Everything after the 4-byte header, padding removed.
        body: &'a [u8],
    },
}

impl Packet<'_> {
    /// The packet type (PT) field of this sub-packet.
    pub fn packet_type(&self) -> u8 {
        match self {
            Self::SenderReport(_) => pt::SR,
            Self::ReceiverReport(_) => pt::RR,
            Self::Sdes(_) => pt::SDES,
            Self::Bye(_) => pt::BYE,
            Self::App(_) => pt::APP,
            Self::Nack(_) | Self::TransportCc(_) => pt::RTPFB,
            Self::Pli(_) | Self::Fir(_) | Self::Remb(_) => pt::PSFB,
            Self::Other { packet_type, .. } => *packet_type,
        }
    }
}

/// One reception report block (RFC 3550 section 6.4.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ReportBlock {
    /// The source this block reports on.
    pub ssrc: u32,
    /// Fraction of packets lost since the previous report, as a fixed point number with the
    /// binary point at the left edge.
    pub fraction_lost: u8,
    /// Cumulative number of packets lost: the raw 24-bit field, `0..=0xFF_FFFF`. RFC 3550
    /// section 6.4.1 makes it a signed (two's complement) integer, negative when duplicates
    /// outnumber losses; [`ReportBlock::cumulative_lost_signed`] sign-extends it and
    /// [`ReportBlock::encode_cumulative_lost`] produces it from a signed count. Writers emit
    /// only the low 24 bits.
    pub cumulative_lost: u32,
    /// Extended highest sequence number received (cycles in the high 16 bits).
    pub highest_seq: u32,
    /// Interarrival jitter, in timestamp units.
    pub jitter: u32,
    /// Middle 32 bits of the NTP timestamp of the last SR received from the source, or 0.
    pub lsr: u32,
    /// Delay since that SR, in units of 1/65536 seconds, or 0.
    pub dlsr: u32,
}

impl ReportBlock {
    /// The cumulative number of packets lost, sign-extended from 24 bits.
    pub fn cumulative_lost_signed(&self) -> i32 {
        ((self.cumulative_lost << 8) as i32) >> 8
    }

    /// The 24-bit field for a signed loss count, clamped to `-0x800000..=0x7FFFFF` as in RFC
    /// 3550 appendix A.3.
    pub fn encode_cumulative_lost(lost: i64) -> u32 {
        (lost.clamp(-0x80_0000, 0x7f_ffff) as u32) & 0xff_ffff
    }

    fn read(b: &[u8]) -> Self {
        Self {
            ssrc: be32(b, 0),
            fraction_lost: b[4],
            cumulative_lost: be32(b, 4) & 0xff_ffff,
            highest_seq: be32(b, 8),
            jitter: be32(b, 12),
            lsr: be32(b, 16),
            dlsr: be32(b, 20),
        }
    }

    fn write(&self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.ssrc.to_be_bytes());
        let lost = (u32::from(self.fraction_lost) << 24) | (self.cumulative_lost & 0xff_ffff);
        out[4..8].copy_from_slice(&lost.to_be_bytes());
        out[8..12].copy_from_slice(&self.highest_seq.to_be_bytes());
        out[12..16].copy_from_slice(&self.jitter.to_be_bytes());
        out[16..20].copy_from_slice(&self.lsr.to_be_bytes());
        out[20..24].copy_from_slice(&self.dlsr.to_be_bytes());
    }
}

/// Iterator over report blocks.
#[derive(Clone, Debug)]
pub struct ReportBlocks<'a> {
    data: &'a [u8],
}

impl Iterator for ReportBlocks<'_> {
    type Item = ReportBlock;
    fn next(&mut self) -> Option<ReportBlock> {
        let (block, rest) = self.data.split_at_checked(REPORT_BLOCK_LEN)?;
        self.data = rest;
        Some(ReportBlock::read(block))
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.data.len() / REPORT_BLOCK_LEN;
        (n, Some(n))
    }
}

impl ExactSizeIterator for ReportBlocks<'_> {}

/// Sender report (RFC 3550 section 6.4.1).
///
/// ```text
/// header |V=2|P|    RC   |   PT=SR=200   |             length            |
///        |                         SSRC of sender                        |
/// sender |              NTP timestamp, most significant word             |
/// info   |             NTP timestamp, least significant word             |
///        |                         RTP timestamp                         |
///        |                     sender's packet count                     |
///        |                      sender's octet count                     |
/// report blocks (RC times 24 bytes), then profile-specific extensions
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SenderReport<'a> {
    count: u8,
    /// At least 24 + 24 * count bytes.
    body: &'a [u8],
}

impl<'a> SenderReport<'a> {
    /// SSRC of the sender.
    pub fn ssrc(&self) -> u32 {
        be32(self.body, 0)
    }
    /// 64-bit NTP timestamp (seconds since 1900 in the high word, fraction in the low word).
    pub fn ntp_timestamp(&self) -> u64 {
        (u64::from(be32(self.body, 4)) << 32) | u64::from(be32(self.body, 8))
    }
    /// RTP timestamp corresponding to the NTP timestamp.
    pub fn rtp_timestamp(&self) -> u32 {
        be32(self.body, 12)
    }
    /// Sender's packet count.
    pub fn packet_count(&self) -> u32 {
        be32(self.body, 16)
    }
    /// Sender's octet count.
    pub fn octet_count(&self) -> u32 {
        be32(self.body, 20)
    }
    /// The report blocks.
    pub fn reports(&self) -> ReportBlocks<'a> {
        let start = 4 + SENDER_INFO_LEN;
        let end = start + usize::from(self.count) * REPORT_BLOCK_LEN;
        ReportBlocks {
            data: &self.body[start..end],
        }
    }
    /// Profile-specific extension after the report blocks (usually empty).
    pub fn extension(&self) -> &'a [u8] {
        &self.body[4 + SENDER_INFO_LEN + usize::from(self.count) * REPORT_BLOCK_LEN..]
    }
}

/// Receiver report (RFC 3550 section 6.4.2): the SSRC of the packet sender, then RC report
/// blocks, then profile-specific extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiverReport<'a> {
    count: u8,
    /// At least 4 + 24 * count bytes.
    body: &'a [u8],
}

impl<'a> ReceiverReport<'a> {
    /// SSRC of the packet sender.
    pub fn ssrc(&self) -> u32 {
        be32(self.body, 0)
    }
    /// The report blocks.
    pub fn reports(&self) -> ReportBlocks<'a> {
        let end = 4 + usize::from(self.count) * REPORT_BLOCK_LEN;
        ReportBlocks {
            data: &self.body[4..end],
        }
    }
    /// Profile-specific extension after the report blocks (usually empty).
    pub fn extension(&self) -> &'a [u8] {
        &self.body[4 + usize::from(self.count) * REPORT_BLOCK_LEN..]
    }
}

/// Finds the SDES chunk starting at `at` in `body` (RFC 3550 section 6.5): returns its SSRC,
/// its items (without the terminating null octet) and where the next chunk starts. Each chunk
/// starts on a 32-bit boundary and its item list ends with a null octet, followed by further
/// null octets up to the next boundary.
fn sdes_chunk(body: &[u8], at: usize) -> Option<(u32, &[u8], usize)> {
    let ssrc = be32(body.get(at..at + 4)?, 0);
    let items_start = at + 4;
    let mut i = items_start;
    loop {
        match *body.get(i)? {
            sdes::END => break,
            _ => i += 2 + usize::from(*body.get(i + 1)?),
        }
    }
    let next = (i + 1).next_multiple_of(4);
    if next > body.len() {
        return None;
    }
    Some((ssrc, &body[items_start..i], next))
}

/// Source description (RFC 3550 section 6.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sdes<'a> {
    count: u8,
    /// Holds `count` well-formed chunks (bytes after them are ignored).
    body: &'a [u8],
}

impl<'a> Sdes<'a> {
    /// The chunks: `(ssrc, items)`.
    pub fn chunks(&self) -> SdesChunks<'a> {
        SdesChunks {
            body: self.body,
            at: 0,
            remaining: self.count,
        }
    }
    /// The first CNAME item of the chunk for `ssrc`, if any.
    pub fn cname(&self, ssrc: u32) -> Option<&'a [u8]> {
        self.chunks()
            .filter(|&(s, _)| s == ssrc)
            .flat_map(|(_, items)| items)
            .find(|&(t, _)| t == sdes::CNAME)
            .map(|(_, v)| v)
    }
}

/// Iterator over the chunks of an SDES packet: `(ssrc, items)`.
#[derive(Clone, Debug)]
pub struct SdesChunks<'a> {
    body: &'a [u8],
    at: usize,
    remaining: u8,
}

impl<'a> Iterator for SdesChunks<'a> {
    type Item = (u32, SdesItems<'a>);
    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let Some((ssrc, items, next)) = sdes_chunk(self.body, self.at) else {
            self.remaining = 0;
            return None;
        };
        self.at = next;
        Some((ssrc, SdesItems { data: items }))
    }
}

/// Iterator over the items of one SDES chunk: `(item_type, value)`. The terminating null item
/// is not yielded.
#[derive(Clone, Debug)]
pub struct SdesItems<'a> {
    data: &'a [u8],
}

impl<'a> Iterator for SdesItems<'a> {
    type Item = (u8, &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        let (&typ, rest) = self.data.split_first()?;
        let (&len, rest) = rest.split_first()?;
        let Some((value, rest)) = rest.split_at_checked(usize::from(len)) else {
            self.data = &[];
            return None;
        };
        self.data = rest;
        Some((typ, value))
    }
}

/// Iterator over a list of SSRCs.
#[derive(Clone, Debug)]
pub struct Ssrcs<'a> {
    data: &'a [u8],
}

impl Iterator for Ssrcs<'_> {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        let (ssrc, rest) = self.data.split_first_chunk::<4>()?;
        self.data = rest;
        Some(u32::from_be_bytes(*ssrc))
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.data.len() / 4;
        (n, Some(n))
    }
}

impl ExactSizeIterator for Ssrcs<'_> {}

/// Goodbye (RFC 3550 section 6.6): SC SSRCs, then optionally a length-prefixed reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bye<'a> {
    count: u8,
    /// At least 4 * count bytes, and the reason, if present, fits.
    body: &'a [u8],
}

impl<'a> Bye<'a> {
    /// The sources leaving.
    pub fn ssrcs(&self) -> Ssrcs<'a> {
        Ssrcs {
            data: &self.body[..4 * usize::from(self.count)],
        }
    }
    /// The reason for leaving, if the packet carries one.
    pub fn reason(&self) -> Option<&'a [u8]> {
        let at = 4 * usize::from(self.count);
        let len = usize::from(*self.body.get(at)?);
        self.body.get(at + 1..at + 1 + len)
    }
}

/// Application-defined packet (RFC 3550 section 6.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct App<'a> {
    subtype: u8,
    /// At least 8 bytes.
    body: &'a [u8],
}

impl<'a> App<'a> {
    /// SSRC (or CSRC) of the sender.
    pub fn ssrc(&self) -> u32 {
        be32(self.body, 0)
    }
    /// The 5-bit subtype (the count field).
    pub fn subtype(&self) -> u8 {
        self.subtype
    }
    /// The four ASCII characters of the name.
    pub fn name(&self) -> [u8; 4] {
        [self.body[4], self.body[5], self.body[6], self.body[7]]
    }
    /// Application-dependent data.
    pub fn data(&self) -> &'a [u8] {
        &self.body[8..]
    }
}

/// The common part of a feedback message (RFC 4585 section 6.1): the two SSRCs, then the
/// feedback control information (FCI).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feedback<'a> {
    /// At least 8 bytes.
    body: &'a [u8],
}

impl<'a> Feedback<'a> {
    /// SSRC of the packet sender.
    pub fn sender_ssrc(&self) -> u32 {
        be32(self.body, 0)
    }
    /// SSRC of the media source the feedback is about.
    pub fn media_ssrc(&self) -> u32 {
        be32(self.body, 4)
    }
    /// Feedback control information, padding removed.
    pub fn fci(&self) -> &'a [u8] {
        &self.body[FEEDBACK_COMMON_LEN..]
    }
}

/// Generic NACK (RFC 4585 section 6.2.1). Each FCI entry is a packet id (PID) and a bitmask
/// of following lost packets (BLP): bit i set means PID + i + 1 is lost too.
///
/// ```text
/// |            PID                |             BLP               |
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nack<'a> {
    /// FCI is a non-empty multiple of 4 bytes.
    fb: Feedback<'a>,
}

impl<'a> Nack<'a> {
    /// SSRC of the packet sender.
    pub fn sender_ssrc(&self) -> u32 {
        self.fb.sender_ssrc()
    }
    /// SSRC of the media source that lost packets.
    pub fn media_ssrc(&self) -> u32 {
        self.fb.media_ssrc()
    }
    /// The raw (PID, BLP) pairs.
    pub fn pairs(&self) -> impl Iterator<Item = (u16, u16)> + 'a {
        self.fb.fci().chunks_exact(4).map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u16::from_be_bytes([c[2], c[3]]),
            )
        })
    }
    /// The lost sequence numbers, expanded from the PID/BLP pairs in wire order (wrapping at
    /// 65535).
    pub fn lost(&self) -> NackLost<'a> {
        NackLost {
            fci: self.fb.fci(),
            pid: 0,
            blp: 0,
        }
    }
}

/// Iterator over the sequence numbers a [`Nack`] reports lost.
#[derive(Clone, Debug)]
pub struct NackLost<'a> {
    fci: &'a [u8],
    pid: u16,
    blp: u16,
}

impl Iterator for NackLost<'_> {
    type Item = u16;
    fn next(&mut self) -> Option<u16> {
        if self.blp != 0 {
            let bit = self.blp.trailing_zeros() as u16;
            self.blp &= self.blp - 1;
            return Some(self.pid.wrapping_add(bit + 1));
        }
        let (pair, rest) = self.fci.split_first_chunk::<4>()?;
        self.fci = rest;
        self.pid = u16::from_be_bytes([pair[0], pair[1]]);
        self.blp = u16::from_be_bytes([pair[2], pair[3]]);
        Some(self.pid)
    }
}

/// Full intra request (RFC 5104 section 4.3.1). Each FCI entry:
///
/// ```text
/// |                              SSRC                             |
/// | Seq nr.       |    Reserved                                   |
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fir<'a> {
    /// FCI is a non-empty multiple of 8 bytes.
    fb: Feedback<'a>,
}

impl<'a> Fir<'a> {
    /// SSRC of the packet sender.
    pub fn sender_ssrc(&self) -> u32 {
        self.fb.sender_ssrc()
    }
    /// The common header's media SSRC, which RFC 5104 section 4.3.1.2 says is 0 and unused.
    pub fn media_ssrc(&self) -> u32 {
        self.fb.media_ssrc()
    }
    /// The requests: (SSRC of the media sender asked for a decoder refresh, command sequence
    /// number).
    pub fn entries(&self) -> impl Iterator<Item = (u32, u8)> + 'a {
        self.fb.fci().chunks_exact(8).map(|c| (be32(c, 0), c[4]))
    }
}

/// Receiver estimated maximum bitrate (draft-alvestrand-rmcat-remb-03 section 2.2):
///
/// ```text
/// |                  SSRC of packet sender                        |
/// |                  SSRC of media source (0)                     |
/// |  Unique identifier 'R' 'E' 'M' 'B'                            |
/// |  Num SSRC     | BR Exp    |  BR Mantissa                      |
/// |   SSRC feedback ... (Num SSRC times)                          |
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Remb<'a> {
    /// FCI starts with "REMB" and holds at least 8 + 4 * Num SSRC bytes.
    fb: Feedback<'a>,
}

impl<'a> Remb<'a> {
    /// SSRC of the packet sender.
    pub fn sender_ssrc(&self) -> u32 {
        self.fb.sender_ssrc()
    }
    /// The common header's media SSRC (0 per the draft).
    pub fn media_ssrc(&self) -> u32 {
        self.fb.media_ssrc()
    }
    /// The estimate, mantissa * 2^exp bits per second, saturated at `u64::MAX` (a 6-bit
    /// exponent with an 18-bit mantissa can express up to 2^81).
    pub fn bitrate_bps(&self) -> u64 {
        let f = self.fb.fci();
        let exp = u32::from(f[5] >> 2);
        let mantissa = (u32::from(f[5] & 3) << 16) | (u32::from(f[6]) << 8) | u32::from(f[7]);
        u64::try_from(u128::from(mantissa) << exp).unwrap_or(u64::MAX)
    }
    /// The media sources the estimate applies to.
    pub fn ssrcs(&self) -> Ssrcs<'a> {
        let f = self.fb.fci();
        Ssrcs {
            data: &f[8..8 + 4 * usize::from(f[4])],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writers
// ---------------------------------------------------------------------------------------------

/// Writes the common header for a packet of `len` bytes (a multiple of 4) into `out` and
/// returns the packet's slice, or `None` if `out` is too small or `len` does not fit the
/// 16-bit length field.
fn begin(out: &mut [u8], count: u8, packet_type: u8, len: usize) -> Option<&mut [u8]> {
    debug_assert!(len & 3 == 0 && len >= HEADER_LEN);
    let words = u16::try_from(len / 4 - 1).ok()?;
    let p = out.get_mut(..len)?;
    p[0] = 0x80 | (count & 0x1f);
    p[1] = packet_type;
    p[2..4].copy_from_slice(&words.to_be_bytes());
    Some(p)
}

/// Writes a sender report without report blocks. Returns the length written, or `None` if
/// `out` is too small.
pub fn write_sr(
    out: &mut [u8],
    ssrc: u32,
    ntp: u64,
    rtp_ts: u32,
    packets: u32,
    octets: u32,
) -> Option<usize> {
    write_sr_with_reports(out, ssrc, ntp, rtp_ts, packets, octets, &[])
}

/// Writes a sender report with up to 31 report blocks. Returns the length written, or `None`
/// if `out` is too small or there are more than 31 blocks.
pub fn write_sr_with_reports(
    out: &mut [u8],
    ssrc: u32,
    ntp: u64,
    rtp_ts: u32,
    packets: u32,
    octets: u32,
    reports: &[ReportBlock],
) -> Option<usize> {
    if reports.len() > MAX_COUNT {
        return None;
    }
    let len = HEADER_LEN + 4 + SENDER_INFO_LEN + reports.len() * REPORT_BLOCK_LEN;
    let p = begin(out, reports.len() as u8, pt::SR, len)?;
    p[4..8].copy_from_slice(&ssrc.to_be_bytes());
    p[8..16].copy_from_slice(&ntp.to_be_bytes());
    p[16..20].copy_from_slice(&rtp_ts.to_be_bytes());
    p[20..24].copy_from_slice(&packets.to_be_bytes());
    p[24..28].copy_from_slice(&octets.to_be_bytes());
    for (r, chunk) in reports
        .iter()
        .zip(p[28..].chunks_exact_mut(REPORT_BLOCK_LEN))
    {
        r.write(chunk);
    }
    Some(len)
}

/// Writes a receiver report with up to 31 report blocks. Returns the length written, or `None`
/// if `out` is too small or there are more than 31 blocks.
pub fn write_rr(out: &mut [u8], ssrc: u32, reports: &[ReportBlock]) -> Option<usize> {
    if reports.len() > MAX_COUNT {
        return None;
    }
    let len = HEADER_LEN + 4 + reports.len() * REPORT_BLOCK_LEN;
    let p = begin(out, reports.len() as u8, pt::RR, len)?;
    p[4..8].copy_from_slice(&ssrc.to_be_bytes());
    for (r, chunk) in reports
        .iter()
        .zip(p[8..].chunks_exact_mut(REPORT_BLOCK_LEN))
    {
        r.write(chunk);
    }
    Some(len)
}

/// Writes an SDES packet with one chunk holding one CNAME item. Returns the length written,
/// or `None` if `out` is too small or `cname` is longer than 255 bytes.
pub fn write_sdes_cname(out: &mut [u8], ssrc: u32, cname: &[u8]) -> Option<usize> {
    let cname_len = u8::try_from(cname.len()).ok()?;
    // SSRC, type, length, value, then at least one null octet up to a 32-bit boundary.
    let chunk_len = (4 + 2 + cname.len() + 1).next_multiple_of(4);
    let len = HEADER_LEN + chunk_len;
    let p = begin(out, 1, pt::SDES, len)?;
    p[4..8].copy_from_slice(&ssrc.to_be_bytes());
    p[8] = sdes::CNAME;
    p[9] = cname_len;
    p[10..10 + cname.len()].copy_from_slice(cname);
    p[10 + cname.len()..].fill(0);
    Some(len)
}

/// Writes a BYE for up to 31 sources with an optional reason of at most 255 bytes. Returns the
/// length written, or `None` if `out` is too small or a limit is exceeded.
pub fn write_bye(out: &mut [u8], ssrcs: &[u32], reason: Option<&[u8]>) -> Option<usize> {
    if ssrcs.len() > MAX_COUNT {
        return None;
    }
    let reason_len = match reason {
        Some(r) => (1 + usize::from(u8::try_from(r.len()).ok()?)).next_multiple_of(4),
        None => 0,
    };
    let len = HEADER_LEN + 4 * ssrcs.len() + reason_len;
    let p = begin(out, ssrcs.len() as u8, pt::BYE, len)?;
    for (s, chunk) in ssrcs.iter().zip(p[4..].chunks_exact_mut(4)) {
        chunk.copy_from_slice(&s.to_be_bytes());
    }
    if let Some(r) = reason {
        let at = HEADER_LEN + 4 * ssrcs.len();
        p[at] = r.len() as u8;
        p[at + 1..at + 1 + r.len()].copy_from_slice(r);
        p[at + 1 + r.len()..].fill(0);
    }
    Some(len)
}

/// Writes an APP packet. Returns the length written, or `None` if `out` is too small, the
/// subtype does not fit 5 bits, or `data` is not a multiple of 4 bytes (RFC 3550 section 6.7).
pub fn write_app(
    out: &mut [u8],
    ssrc: u32,
    subtype: u8,
    name: [u8; 4],
    data: &[u8],
) -> Option<usize> {
    if usize::from(subtype) > MAX_COUNT || data.len() & 3 != 0 {
        return None;
    }
    let len = HEADER_LEN + 8 + data.len();
    let p = begin(out, subtype, pt::APP, len)?;
    p[4..8].copy_from_slice(&ssrc.to_be_bytes());
    p[8..12].copy_from_slice(&name);
    p[12..].copy_from_slice(data);
    Some(len)
}

/// Writes a feedback message (RFC 4585 section 6.1) of `packet_type` ([`pt::RTPFB`] or
/// [`pt::PSFB`]) and format `fmt` with an FCI that the caller has already encoded. Returns the
/// length written, or `None` if `out` is too small, `fmt` does not fit 5 bits or `fci` is not
/// a multiple of 4 bytes.
pub fn write_feedback(
    out: &mut [u8],
    packet_type: u8,
    fmt: u8,
    sender_ssrc: u32,
    media_ssrc: u32,
    fci: &[u8],
) -> Option<usize> {
    if usize::from(fmt) > MAX_COUNT || fci.len() & 3 != 0 {
        return None;
    }
    let len = HEADER_LEN + FEEDBACK_COMMON_LEN + fci.len();
    let p = begin(out, fmt, packet_type, len)?;
    p[4..8].copy_from_slice(&sender_ssrc.to_be_bytes());
    p[8..12].copy_from_slice(&media_ssrc.to_be_bytes());
    p[12..].copy_from_slice(fci);
    Some(len)
}

/// Packs lost sequence numbers into NACK (PID, BLP) pairs, calling `emit` for each. A number
/// within 1..=16 after the current PID (modulo 2^16) sets a BLP bit; any other starts a new
/// pair. Ascending input (modulo wrap-around) gives the most compact result; any order is
/// encoded correctly, and a repeat of the current PID is dropped.
fn pack_nack(lost: &[u16], mut emit: impl FnMut(u16, u16)) {
    let mut current: Option<(u16, u16)> = None;
    for &seq in lost {
        match current {
            Some((pid, ref mut blp)) if seq.wrapping_sub(pid) <= 16 => {
                let diff = seq.wrapping_sub(pid);
                if diff > 0 {
                    *blp |= 1 << (diff - 1);
                }
            }
            _ => {
                if let Some((pid, blp)) = current {
                    emit(pid, blp);
                }
                current = Some((seq, 0));
            }
        }
    }
    if let Some((pid, blp)) = current {
        emit(pid, blp);
    }
}

/// Writes a generic NACK (RFC 4585 section 6.2.1) reporting `lost` sequence numbers, packed
/// into PID/BLP pairs (see [`Nack::lost`]; sorted input packs best). Returns the length
/// written, or `None` if `out` is too small or `lost` is empty.
pub fn write_nack(
    out: &mut [u8],
    sender_ssrc: u32,
    media_ssrc: u32,
    lost: &[u16],
) -> Option<usize> {
    if lost.is_empty() {
        return None;
    }
    let mut pairs = 0usize;
    pack_nack(lost, |_, _| pairs += 1);
    let len = HEADER_LEN + FEEDBACK_COMMON_LEN + 4 * pairs;
    let p = begin(out, fmt::NACK, pt::RTPFB, len)?;
    p[4..8].copy_from_slice(&sender_ssrc.to_be_bytes());
    p[8..12].copy_from_slice(&media_ssrc.to_be_bytes());
    let mut at = HEADER_LEN + FEEDBACK_COMMON_LEN;
    pack_nack(lost, |pid, blp| {
        p[at..at + 2].copy_from_slice(&pid.to_be_bytes());
        p[at + 2..at + 4].copy_from_slice(&blp.to_be_bytes());
        at += 4;
    });
    Some(len)
}

/// Writes a picture loss indication (RFC 4585 section 6.3.1). Returns the length written (12),
/// or `None` if `out` is too small.
pub fn write_pli(out: &mut [u8], sender_ssrc: u32, media_ssrc: u32) -> Option<usize> {
    write_feedback(out, pt::PSFB, fmt::PLI, sender_ssrc, media_ssrc, &[])
}

/// Writes a full intra request (RFC 5104 section 4.3.1) with one FCI entry per
/// `(media_ssrc, seq_nr)`; the header's media SSRC is 0. Returns the length written, or `None`
/// if `out` is too small or `entries` is empty.
pub fn write_fir(out: &mut [u8], sender_ssrc: u32, entries: &[(u32, u8)]) -> Option<usize> {
    if entries.is_empty() {
        return None;
    }
    let len = HEADER_LEN + FEEDBACK_COMMON_LEN + 8 * entries.len();
    let p = begin(out, fmt::FIR, pt::PSFB, len)?;
    p[4..8].copy_from_slice(&sender_ssrc.to_be_bytes());
    p[8..12].fill(0);
    for (&(ssrc, seq), e) in entries.iter().zip(p[12..].chunks_exact_mut(8)) {
        e[..4].copy_from_slice(&ssrc.to_be_bytes());
        e[4] = seq;
        e[5..].fill(0);
    }
    Some(len)
}

/// Writes a REMB for up to 255 sources; the header's media SSRC is 0. The bitrate is stored as
/// an 18-bit mantissa and a 6-bit exponent, so it is rounded down to 18 significant bits.
/// Returns the length written, or `None` if `out` is too small or there are more than 255
/// SSRCs.
pub fn write_remb(
    out: &mut [u8],
    sender_ssrc: u32,
    bitrate_bps: u64,
    ssrcs: &[u32],
) -> Option<usize> {
    let n = u8::try_from(ssrcs.len()).ok()?;
    // At most 64 - 18 = 46, well inside 6 bits.
    let exp = (64 - bitrate_bps.leading_zeros()).saturating_sub(18);
    let mantissa = (bitrate_bps >> exp) as u32;
    let len = HEADER_LEN + FEEDBACK_COMMON_LEN + 8 + 4 * ssrcs.len();
    let p = begin(out, fmt::AFB, pt::PSFB, len)?;
    p[4..8].copy_from_slice(&sender_ssrc.to_be_bytes());
    p[8..12].fill(0);
    p[12..16].copy_from_slice(&REMB_ID);
    p[16] = n;
    p[17] = ((exp as u8) << 2) | ((mantissa >> 16) as u8 & 3);
    p[18] = (mantissa >> 8) as u8;
    p[19] = mantissa as u8;
    for (s, chunk) in ssrcs.iter().zip(p[20..].chunks_exact_mut(4)) {
        chunk.copy_from_slice(&s.to_be_bytes());
    }
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only(buf: &[u8]) -> Packet<'_> {
        let c = parse_compound(buf).unwrap();
        let mut it = c.iter();
        let p = it.next().unwrap();
        assert!(it.next().is_none());
        p
    }

    fn block(i: u32) -> ReportBlock {
        ReportBlock {
            ssrc: 0x1000 + i,
            fraction_lost: 25 + i as u8,
            cumulative_lost: ReportBlock::encode_cumulative_lost(-3 + i64::from(i)),
            highest_seq: 0x0001_fff0 + i,
            jitter: 40 + i,
            lsr: 0xabcd_0000 + i,
            dlsr: 65536 + i,
        }
    }

    fn mix(acc: &mut u64, x: u64) {
        *acc = acc.wrapping_mul(31).wrapping_add(x);
    }

    /// Touches every accessor of every packet, as the fuzz target does.
    fn walk(c: &Compound<'_>) -> u64 {
        let mut n = 0u64;
        let m = &mut n;
        for p in c {
            mix(m, u64::from(p.packet_type()));
            match p {
                Packet::SenderReport(sr) => {
                    mix(m, u64::from(sr.ssrc()) ^ sr.ntp_timestamp());
                    mix(
                        m,
                        u64::from(sr.rtp_timestamp() ^ sr.packet_count() ^ sr.octet_count()),
                    );
                    for r in sr.reports() {
                        mix(m, r.cumulative_lost_signed() as u64 ^ u64::from(r.dlsr));
                    }
                    mix(m, sr.extension().len() as u64);
                }
                Packet::ReceiverReport(rr) => {
                    mix(m, u64::from(rr.ssrc()));
                    for r in rr.reports() {
                        mix(m, u64::from(r.ssrc ^ r.jitter));
                    }
                    mix(m, rr.extension().len() as u64);
                }
                Packet::Sdes(s) => {
                    for (ssrc, items) in s.chunks() {
                        mix(m, u64::from(ssrc));
                        for (t, v) in items {
                            mix(m, u64::from(t) + v.len() as u64);
                        }
                    }
                    mix(m, s.cname(0).map_or(0, <[u8]>::len) as u64);
                }
                Packet::Bye(b) => {
                    mix(m, b.ssrcs().map(u64::from).sum::<u64>());
                    mix(m, b.reason().map_or(0, <[u8]>::len) as u64);
                }
                Packet::App(a) => {
                    mix(m, u64::from(a.ssrc()) + u64::from(a.subtype()));
                    mix(
                        m,
                        u64::from(u32::from_be_bytes(a.name())) + a.data().len() as u64,
                    );
                }
                Packet::Nack(k) => {
                    mix(m, u64::from(k.sender_ssrc() ^ k.media_ssrc()));
                    for (pid, blp) in k.pairs() {
                        mix(m, u64::from(pid) << 16 | u64::from(blp));
                    }
                    for seq in k.lost() {
                        mix(m, u64::from(seq));
                    }
                }
                Packet::TransportCc(f) | Packet::Pli(f) => {
                    mix(
                        m,
                        u64::from(f.sender_ssrc() ^ f.media_ssrc()) + f.fci().len() as u64,
                    );
                }
                Packet::Fir(f) => {
                    mix(m, u64::from(f.sender_ssrc() ^ f.media_ssrc()));
                    for (s, q) in f.entries() {
                        mix(m, u64::from(s) + u64::from(q));
                    }
                }
                Packet::Remb(r) => {
                    mix(
                        m,
                        u64::from(r.sender_ssrc() ^ r.media_ssrc()) ^ r.bitrate_bps(),
                    );
                    mix(m, r.ssrcs().map(u64::from).sum::<u64>());
                }
                Packet::Other { body, .. } => mix(m, body.len() as u64),
            }
        }
        mix(m, c.raw_packets().count() as u64);
        n
    }

    /// Sets the P bit of the single packet in `pkt` and appends `n` bytes of padding.
    fn pad(pkt: &mut Vec<u8>, n: u8) {
        pkt[0] |= 0x20;
        pkt.resize(pkt.len() + usize::from(n) - 1, 0);
        pkt.push(n);
        let words = (pkt.len() / 4 - 1) as u16;
        pkt[2..4].copy_from_slice(&words.to_be_bytes());
    }

    #[test]
    fn sender_report_round_trips() {
        let mut buf = [0u8; 256];
        let n = write_sr(&mut buf, 0xdead_beef, 0x0123_4567_89ab_cdef, 960, 10, 1200).unwrap();
        assert_eq!(n, 28);
        let Packet::SenderReport(sr) = only(&buf[..n]) else {
            panic!()
        };
        assert_eq!(sr.ssrc(), 0xdead_beef);
        assert_eq!(sr.ntp_timestamp(), 0x0123_4567_89ab_cdef);
        assert_eq!(sr.rtp_timestamp(), 960);
        assert_eq!(sr.packet_count(), 10);
        assert_eq!(sr.octet_count(), 1200);
        assert_eq!(sr.reports().len(), 0);
        assert!(sr.extension().is_empty());

        let blocks = [block(0), block(1), block(7)];
        let n = write_sr_with_reports(&mut buf, 1, 2, 3, 4, 5, &blocks).unwrap();
        let Packet::SenderReport(sr) = only(&buf[..n]) else {
            panic!()
        };
        assert_eq!(sr.reports().collect::<Vec<_>>(), blocks);
        assert_eq!(sr.reports().next().unwrap().cumulative_lost_signed(), -3);
        assert!(write_sr_with_reports(&mut buf, 1, 2, 3, 4, 5, &[block(0); 32]).is_none());
        assert!(write_sr(&mut buf[..27], 1, 2, 3, 4, 5).is_none());
    }

    #[test]
    fn receiver_report_round_trips() {
        let mut buf = [0u8; 1024];
        for count in [0usize, 1, 31] {
            let blocks: Vec<_> = (0..count as u32).map(block).collect();
            let n = write_rr(&mut buf, 77, &blocks).unwrap();
            assert_eq!(n, 8 + 24 * count);
            let Packet::ReceiverReport(rr) = only(&buf[..n]) else {
                panic!()
            };
            assert_eq!(rr.ssrc(), 77);
            assert_eq!(rr.reports().collect::<Vec<_>>(), blocks);
        }
        assert!(write_rr(&mut buf, 1, &[block(0); 32]).is_none());
        assert!(write_rr(&mut buf[..31], 1, &[block(0)]).is_none());
    }

    #[test]
    fn cumulative_lost_is_24_bit_signed() {
        assert_eq!(ReportBlock::encode_cumulative_lost(-1), 0xff_ffff);
        assert_eq!(ReportBlock::encode_cumulative_lost(5), 5);
        assert_eq!(ReportBlock::encode_cumulative_lost(1 << 40), 0x7f_ffff);
        assert_eq!(ReportBlock::encode_cumulative_lost(-(1 << 40)), 0x80_0000);
        let b = |lost| ReportBlock {
            cumulative_lost: lost,
            ..ReportBlock::default()
        };
        assert_eq!(b(0xff_ffff).cumulative_lost_signed(), -1);
        assert_eq!(b(0x80_0000).cumulative_lost_signed(), -0x80_0000);
        assert_eq!(b(0x7f_ffff).cumulative_lost_signed(), 0x7f_ffff);
    }

    #[test]
    fn sdes_round_trips_for_every_padding() {
        let mut buf = [0u8; 512];
        for len in [0usize, 1, 2, 3, 4, 5, 16, 255] {
            let cname: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let n = write_sdes_cname(&mut buf, 9, &cname).unwrap();
            assert_eq!(n % 4, 0);
            let Packet::Sdes(s) = only(&buf[..n]) else {
                panic!()
            };
            let chunks: Vec<_> = s
                .chunks()
                .map(|(ssrc, it)| (ssrc, it.collect::<Vec<_>>()))
                .collect();
            assert_eq!(chunks, vec![(9, vec![(sdes::CNAME, &cname[..])])]);
            assert_eq!(s.cname(9), Some(&cname[..]));
            assert_eq!(s.cname(8), None);
        }
        assert!(write_sdes_cname(&mut buf, 9, &[b'x'; 256]).is_none());
    }

    #[test]
    fn sdes_with_several_chunks_and_items() {
        // Two chunks: one with CNAME "ab" and TOOL "x", one with no items (four null octets).
        let mut pkt = vec![0x82, 202, 0, 5];
        pkt.extend_from_slice(&[0, 0, 0, 1, 1, 2, b'a', b'b', 6, 1, b'x', 0]);
        pkt.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0, 0]);
        let Packet::Sdes(s) = only(&pkt) else {
            panic!()
        };
        let chunks: Vec<_> = s
            .chunks()
            .map(|(ssrc, it)| (ssrc, it.collect::<Vec<_>>()))
            .collect();
        assert_eq!(
            chunks,
            vec![(1, vec![(1, &b"ab"[..]), (6, &b"x"[..])]), (2, vec![])]
        );
        // No null terminator before the end of the packet.
        let bad = [0x81, 202, 0, 2, 0, 0, 0, 1, 1, 2, b'a', b'b'];
        assert_eq!(parse_compound(&bad), Err(RtcpError::BadLength));
        // An item overrunning the packet.
        let bad = [0x81, 202, 0, 2, 0, 0, 0, 1, 1, 9, b'a', 0];
        assert_eq!(parse_compound(&bad), Err(RtcpError::BadLength));
        // Two chunks announced, one present.
        let bad = [0x82, 202, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0];
        assert_eq!(parse_compound(&bad), Err(RtcpError::BadLength));
    }

    #[test]
    fn bye_round_trips() {
        let mut buf = [0u8; 512];
        for reason in [None, Some(&b""[..]), Some(&b"bye"[..]), Some(&b"four"[..])] {
            for ssrcs in [&[][..], &[1][..], &[1, 2, 3][..]] {
                let n = write_bye(&mut buf, ssrcs, reason).unwrap();
                let Packet::Bye(b) = only(&buf[..n]) else {
                    panic!()
                };
                assert_eq!(b.ssrcs().collect::<Vec<_>>(), ssrcs);
                assert_eq!(b.reason(), reason);
            }
        }
        assert!(write_bye(&mut buf, &[0; 32], None).is_none());
        assert!(write_bye(&mut buf, &[1], Some(&[b'x'; 256])).is_none());
        // Reason length running past the end.
        let bad = [0x81, 203, 0, 2, 0, 0, 0, 1, 4, b'a', b'b', b'c'];
        assert_eq!(parse_compound(&bad), Err(RtcpError::BadLength));
        // SC larger than the body.
        let bad = [0x82, 203, 0, 1, 0, 0, 0, 1];
        assert_eq!(parse_compound(&bad), Err(RtcpError::BadLength));
    }

    #[test]
    fn app_round_trips() {
        let mut buf = [0u8; 64];
        let n = write_app(&mut buf, 5, 17, *b"TEST", &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        let Packet::App(a) = only(&buf[..n]) else {
            panic!()
        };
        assert_eq!(a.ssrc(), 5);
        assert_eq!(a.subtype(), 17);
        assert_eq!(&a.name(), b"TEST");
        assert_eq!(a.data(), &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(write_app(&mut buf, 5, 32, *b"TEST", &[]).is_none());
        assert!(write_app(&mut buf, 5, 1, *b"TEST", &[1]).is_none());
        assert_eq!(
            parse_compound(&buf[..8]).map(|_| ()),
            Err(RtcpError::Truncated)
        );
        let short = [0x80, 204, 0, 1, 0, 0, 0, 5];
        assert_eq!(parse_compound(&short), Err(RtcpError::BadLength));
    }

    #[test]
    fn nack_packs_and_unpacks() {
        let mut buf = [0u8; 256];
        type Case = (&'static [u16], &'static [(u16, u16)]);
        let cases: &[Case] = &[
            (&[100], &[(100, 0)]),
            (&[100, 101, 116], &[(100, 0x8001)]),
            (&[100, 117], &[(100, 0), (117, 0)]),
            (&[100, 100, 102], &[(100, 0x0002)]),
            // Wrap-around at 65535.
            (&[65534, 65535, 0, 1], &[(65534, 0x0007)]),
            (&[65535, 15], &[(65535, 0x8000)]),
            (&[65535, 16], &[(65535, 0), (16, 0)]),
        ];
        for &(lost, pairs) in cases {
            let n = write_nack(&mut buf, 1, 2, lost).unwrap();
            assert_eq!(n, 12 + 4 * pairs.len());
            let Packet::Nack(k) = only(&buf[..n]) else {
                panic!()
            };
            assert_eq!(k.sender_ssrc(), 1);
            assert_eq!(k.media_ssrc(), 2);
            assert_eq!(k.pairs().collect::<Vec<_>>(), pairs, "{lost:?}");
            let mut dedup = lost.to_vec();
            dedup.dedup();
            assert_eq!(k.lost().collect::<Vec<_>>(), dedup, "{lost:?}");
        }
        // Every sequence number of a long run across the wrap survives, sorted.
        let run: Vec<u16> = (0..300u16).map(|i| 65400u16.wrapping_add(i * 3)).collect();
        let n = write_nack(&mut buf, 1, 2, &run).unwrap();
        let Packet::Nack(k) = only(&buf[..n]) else {
            panic!()
        };
        assert_eq!(k.lost().collect::<Vec<_>>(), run);
        assert!(write_nack(&mut buf, 1, 2, &[]).is_none());
        assert!(write_nack(&mut buf[..15], 1, 2, &[1]).is_none());
        // A NACK without FCI, or with half a pair, is refused.
        assert_eq!(
            parse_compound(&[0x81, 205, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2]),
            Err(RtcpError::BadLength)
        );
        // Padding that leaves a 2-byte FCI: half a pair.
        let odd = [0xa1, 205, 0, 3, 0, 0, 0, 1, 0, 0, 0, 2, 0, 5, 0, 2];
        assert_eq!(parse_compound(&odd), Err(RtcpError::BadLength));
    }

    #[test]
    fn pli_fir_remb_and_transport_cc_round_trip() {
        let mut buf = [0u8; 256];
        let n = write_pli(&mut buf, 3, 4).unwrap();
        assert_eq!(n, 12);
        let Packet::Pli(f) = only(&buf[..n]) else {
            panic!()
        };
        assert_eq!((f.sender_ssrc(), f.media_ssrc(), f.fci()), (3, 4, &[][..]));

        let entries = [(10, 0), (11, 255)];
        let n = write_fir(&mut buf, 3, &entries).unwrap();
        let Packet::Fir(f) = only(&buf[..n]) else {
            panic!()
        };
        assert_eq!(f.sender_ssrc(), 3);
        assert_eq!(f.media_ssrc(), 0);
        assert_eq!(f.entries().collect::<Vec<_>>(), entries);
        assert!(write_fir(&mut buf, 3, &[]).is_none());

        for bitrate in [0u64, 1, 262_143, 1_000_000, 0x3_ffff << 20, 1 << 40] {
            let n = write_remb(&mut buf, 3, bitrate, &[7, 8]).unwrap();
            let Packet::Remb(r) = only(&buf[..n]) else {
                panic!()
            };
            assert_eq!(r.sender_ssrc(), 3);
            assert_eq!(r.media_ssrc(), 0);
            assert_eq!(
                r.bitrate_bps(),
                bitrate,
                "exact: at most 18 significant bits"
            );
            assert_eq!(r.ssrcs().collect::<Vec<_>>(), [7, 8]);
        }
        // Rounded down to 18 significant bits; huge values do not overflow.
        let n = write_remb(&mut buf, 3, 1_000_001, &[]).unwrap();
        let Packet::Remb(r) = only(&buf[..n]) else {
            panic!()
        };
        assert_eq!(r.bitrate_bps(), 1_000_000);
        let n = write_remb(&mut buf, 3, u64::MAX, &[]).unwrap();
        let Packet::Remb(r) = only(&buf[..n]) else {
            panic!()
        };
        assert_eq!(r.bitrate_bps(), 0x3_ffff << 46);
        buf[17] = 0xff; // exp 63, mantissa 0x3ffff: 2^81, saturates
        let Packet::Remb(r) = only(&buf[..n]) else {
            panic!()
        };
        assert_eq!(r.bitrate_bps(), u64::MAX);
        assert!(write_remb(&mut buf, 3, 1, &[0; 256]).is_none());
        // Num SSRC larger than the FCI.
        buf[16] = 1;
        assert_eq!(parse_compound(&buf[..n]), Err(RtcpError::BadLength));
        // Another AFB message is passed through.
        let n = write_feedback(&mut buf, pt::PSFB, fmt::AFB, 3, 0, b"ABCD").unwrap();
        assert!(matches!(
            only(&buf[..n]),
            Packet::Other { packet_type: pt::PSFB, count_or_fmt: fmt::AFB, body } if body.len() == 12
        ));

        let n = write_feedback(
            &mut buf,
            pt::RTPFB,
            fmt::TRANSPORT_CC,
            5,
            6,
            &[1, 2, 3, 4, 5, 6, 7, 8],
        )
        .unwrap();
        let Packet::TransportCc(f) = only(&buf[..n]) else {
            panic!()
        };
        assert_eq!((f.sender_ssrc(), f.media_ssrc()), (5, 6));
        assert_eq!(f.fci(), &[1, 2, 3, 4, 5, 6, 7, 8]);
        // FIR FCI not a multiple of 8.
        let n = write_feedback(&mut buf, pt::PSFB, fmt::FIR, 5, 0, &[0, 0, 0, 1]).unwrap();
        assert_eq!(parse_compound(&buf[..n]), Err(RtcpError::BadLength));
        // Feedback shorter than its two SSRCs, whatever the FMT.
        for (typ, f) in [(205, 1), (205, 3), (206, 1), (206, 31)] {
            let short = [0x80 | f, typ, 0, 1, 0, 0, 0, 1];
            assert_eq!(
                parse_compound(&short),
                Err(RtcpError::BadLength),
                "{typ} {f}"
            );
        }
    }

    #[test]
    fn unknown_types_pass_through() {
        // XR (RFC 3611) with one word of body, and an unknown RTPFB format.
        let mut pkt = vec![0x80, 207, 0, 1, 1, 2, 3, 4];
        pkt.extend_from_slice(&[0x83, 205, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2]);
        let c = parse_compound(&pkt).unwrap();
        let v: Vec<_> = c.iter().collect();
        assert_eq!(
            v,
            vec![
                Packet::Other {
                    packet_type: 207,
                    count_or_fmt: 0,
                    body: &[1, 2, 3, 4]
                },
                Packet::Other {
                    packet_type: 205,
                    count_or_fmt: 3,
                    body: &[0, 0, 0, 1, 0, 0, 0, 2]
                },
            ]
        );
        assert_eq!(
            c.raw_packets().collect::<Vec<_>>(),
            vec![&pkt[..8], &pkt[8..]]
        );
    }

    /// RR with one report block, built by hand after RFC 3550 section 6.4.2:
    ///
    /// ```text
    /// 81 c9 00 07   V=2 P=0 RC=1, PT=201, length=7 (8 words)
    /// 11 22 33 44   SSRC of packet sender
    /// 55 66 77 88   SSRC_1
    /// 40 ff ff fe   fraction lost 64/256, cumulative lost -2
    /// 00 02 10 00   extended highest sequence number: 2 cycles, seq 0x1000
    /// 00 00 01 2c   jitter 300
    /// aa bb cc dd   LSR
    /// 00 01 80 00   DLSR 1.5 s
    /// ```
    #[test]
    fn known_bytes_receiver_report() {
        let bytes = [
            0x81, 0xc9, 0x00, 0x07, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x40, 0xff,
            0xff, 0xfe, 0x00, 0x02, 0x10, 0x00, 0x00, 0x00, 0x01, 0x2c, 0xaa, 0xbb, 0xcc, 0xdd,
            0x00, 0x01, 0x80, 0x00,
        ];
        let Packet::ReceiverReport(rr) = only(&bytes) else {
            panic!()
        };
        assert_eq!(rr.ssrc(), 0x1122_3344);
        let b = rr.reports().next().unwrap();
        let expected = ReportBlock {
            ssrc: 0x5566_7788,
            fraction_lost: 64,
            cumulative_lost: 0xff_fffe,
            highest_seq: 0x0002_1000,
            jitter: 300,
            lsr: 0xaabb_ccdd,
            dlsr: 0x0001_8000,
        };
        assert_eq!(b, expected);
        assert_eq!(b.cumulative_lost_signed(), -2);
        let mut out = [0u8; 32];
        assert_eq!(write_rr(&mut out, 0x1122_3344, &[expected]), Some(32));
        assert_eq!(out, bytes);
    }

    /// Generic NACK after RFC 4585 section 6.2.1, by hand:
    ///
    /// ```text
    /// 81 cd 00 03   V=2 P=0 FMT=1, PT=205, length=3
    /// 00 00 00 01   SSRC of packet sender
    /// 00 00 00 02   SSRC of media source
    /// 03 e8 00 05   PID=1000, BLP=0b101: 1000, 1001 and 1003 lost
    /// ```
    #[test]
    fn known_bytes_nack() {
        let bytes = [
            0x81, 0xcd, 0x00, 0x03, 0, 0, 0, 1, 0, 0, 0, 2, 0x03, 0xe8, 0x00, 0x05,
        ];
        let Packet::Nack(k) = only(&bytes) else {
            panic!()
        };
        assert_eq!(k.lost().collect::<Vec<_>>(), [1000, 1001, 1003]);
        let mut out = [0u8; 16];
        assert_eq!(write_nack(&mut out, 1, 2, &[1000, 1001, 1003]), Some(16));
        assert_eq!(out, bytes);
    }

    fn sr_sdes_nack() -> Vec<u8> {
        let mut buf = [0u8; 256];
        let mut n = write_sr_with_reports(&mut buf, 1, 2, 3, 4, 5, &[block(0)]).unwrap();
        n += write_sdes_cname(&mut buf[n..], 1, b"user@example.org").unwrap();
        n += write_nack(&mut buf[n..], 1, 9, &[10, 12, 40]).unwrap();
        buf[..n].to_vec()
    }

    #[test]
    fn compound_sr_sdes() {
        let pkt = sr_sdes_nack();
        let c = parse_compound(&pkt).unwrap();
        assert_eq!(c.as_bytes(), &pkt[..]);
        let v: Vec<_> = c.iter().collect();
        assert_eq!(v.len(), 3);
        let Packet::SenderReport(sr) = v[0] else {
            panic!()
        };
        assert_eq!(sr.reports().collect::<Vec<_>>(), [block(0)]);
        let Packet::Sdes(s) = v[1] else { panic!() };
        assert_eq!(s.cname(1), Some(&b"user@example.org"[..]));
        let Packet::Nack(k) = v[2] else { panic!() };
        assert_eq!(k.lost().collect::<Vec<_>>(), [10, 12, 40]);
        assert!(walk(&c) > 0);
    }

    #[test]
    fn every_truncation_errs_or_is_a_shorter_compound() {
        let pkt = sr_sdes_nack();
        let boundaries: Vec<usize> = {
            let c = parse_compound(&pkt).unwrap();
            c.raw_packets()
                .scan(0, |end, p| {
                    *end += p.len();
                    Some(*end)
                })
                .collect()
        };
        assert_eq!(parse_compound(&[]), Err(RtcpError::Empty));
        for cut in 1..pkt.len() {
            match parse_compound(&pkt[..cut]) {
                Ok(c) => {
                    let k = boundaries
                        .iter()
                        .position(|&b| b == cut)
                        .expect("cut at a boundary");
                    assert_eq!(c.iter().count(), k + 1);
                    walk(&c);
                }
                Err(e) => {
                    assert_eq!(e, RtcpError::Truncated, "cut at {cut}");
                    assert!(!boundaries.contains(&cut));
                }
            }
        }
    }

    #[test]
    fn padding_rules() {
        let mut buf = [0u8; 64];
        let n = write_pli(&mut buf, 3, 4).unwrap();
        let mut pli = buf[..n].to_vec();
        pad(&mut pli, 4);
        let Packet::Pli(f) = only(&pli) else { panic!() };
        assert!(f.fci().is_empty(), "padding is not FCI");

        // Padding only allowed on the last packet.
        let mut two = pli.clone();
        two.extend_from_slice(&buf[..n]);
        assert_eq!(parse_compound(&two), Err(RtcpError::BadPadding));
        let mut two = buf[..n].to_vec();
        two.extend_from_slice(&pli);
        assert_eq!(parse_compound(&two).unwrap().iter().count(), 2);

        // Count of zero, or larger than the body.
        let mut bad = pli.clone();
        *bad.last_mut().unwrap() = 0;
        assert_eq!(parse_compound(&bad), Err(RtcpError::BadPadding));
        *bad.last_mut().unwrap() = 13;
        assert_eq!(parse_compound(&bad), Err(RtcpError::BadPadding));
        // Count equal to the whole body: the body is empty, too short for a PLI.
        *bad.last_mut().unwrap() = 12;
        assert_eq!(parse_compound(&bad), Err(RtcpError::BadLength));
        // A header-only packet with the P bit cannot hold a count.
        assert_eq!(
            parse_compound(&[0xa0, 207, 0, 0]),
            Err(RtcpError::BadPadding)
        );

        // SR whose padding eats into the sender info.
        let n = write_sr(&mut buf, 1, 2, 3, 4, 5).unwrap();
        let mut sr = buf[..n].to_vec();
        sr[0] |= 0x20;
        sr[n - 1] = 4;
        assert_eq!(parse_compound(&sr), Err(RtcpError::BadLength));
    }

    #[test]
    fn header_errors() {
        assert_eq!(parse_compound(&[0x80, 200, 0]), Err(RtcpError::Truncated));
        assert_eq!(
            parse_compound(&[0x40, 200, 0, 0]),
            Err(RtcpError::BadVersion)
        );
        assert_eq!(
            parse_compound(&[0x80, 200, 0, 6]),
            Err(RtcpError::Truncated)
        );
        let mut buf = [0u8; 64];
        let n = write_pli(&mut buf, 1, 2).unwrap();
        buf[n] = 0x80; // two trailing bytes after a valid packet
        assert_eq!(parse_compound(&buf[..n + 2]), Err(RtcpError::Truncated));
        buf[n] = 0x00;
        assert_eq!(parse_compound(&buf[..n + 4]), Err(RtcpError::BadVersion));
        assert_eq!(
            RtcpError::BadLength.to_string(),
            "RTCP packet length inconsistent with its contents"
        );
    }

    /// A small deterministic stand-in for the fuzz target: every single-byte mutation of a
    /// compound either fails to parse or yields packets whose accessors all work.
    #[test]
    fn single_byte_mutations_never_panic() {
        let mut pkt = sr_sdes_nack();
        let mut more = [0u8; 128];
        let mut n = write_bye(&mut more, &[1, 2], Some(b"gone")).unwrap();
        n += write_app(&mut more[n..], 1, 3, *b"NAME", &[0; 4]).unwrap();
        n += write_fir(&mut more[n..], 1, &[(2, 3)]).unwrap();
        n += write_remb(&mut more[n..], 1, 5_000_000, &[2]).unwrap();
        n += write_rr(&mut more[n..], 1, &[block(3)]).unwrap();
        pkt.extend_from_slice(&more[..n]);
        assert_eq!(parse_compound(&pkt).unwrap().iter().count(), 8);
        for i in 0..pkt.len() {
            for v in [
                0u8,
                1,
                0x1f,
                0x20,
                0x7f,
                0x80,
                0xa0,
                0xff,
                pkt[i] ^ 1,
                pkt[i] ^ 0x20,
            ] {
                let mut m = pkt.clone();
                m[i] = v;
                if let Ok(c) = parse_compound(&m) {
                    walk(&c);
                }
            }
        }
    }
}
