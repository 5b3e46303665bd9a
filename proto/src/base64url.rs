//! Unpadded base64url (RFC 4648 section 5), used to carry join tokens in text fields
//! (STUN USERNAME, JSON, URLs).

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Number of characters `encode` produces for `n` input bytes.
pub const fn encoded_len(n: usize) -> usize {
    (n * 4).div_ceil(3)
}

/// Encodes `input` into `out`, returning the number of bytes written, or `None` when `out` is
/// shorter than [`encoded_len`].
pub fn encode_into(input: &[u8], out: &mut [u8]) -> Option<usize> {
    let n = encoded_len(input.len());
    if out.len() < n {
        return None;
    }
    let mut o = 0;
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out[o] = ALPHABET[((v >> (18 - 6 * i)) & 63) as usize];
            o += 1;
        }
    }
    debug_assert_eq!(o, n);
    Some(o)
}

/// Encodes `input` into a new `String`.
pub fn encode(input: &[u8]) -> String {
    let mut out = vec![0u8; encoded_len(input.len())];
    let n = encode_into(input, &mut out).expect("buffer sized by encoded_len");
    out.truncate(n);
    String::from_utf8(out).expect("alphabet is ASCII")
}

fn value(c: u8) -> Option<u32> {
    Some(match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        b'_' => 63,
        _ => return None,
    } as u32)
}

/// Decodes unpadded base64url into `out`, returning the number of bytes written. Returns `None`
/// on a character outside the alphabet, an impossible length, non-zero trailing bits, or an
/// `out` that is too short.
pub fn decode_into(input: &[u8], out: &mut [u8]) -> Option<usize> {
    if input.len() % 4 == 1 {
        return None;
    }
    let n = input.len() * 3 / 4;
    if out.len() < n {
        return None;
    }
    let mut o = 0;
    for chunk in input.chunks(4) {
        let mut v = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            v |= value(c)? << (18 - 6 * i);
        }
        let bytes = chunk.len() - 1;
        // Canonical encoding: the bits below the last full byte must be zero.
        let used_bits = 8 * bytes;
        if v & ((1u32 << (24 - used_bits)) - 1) != 0 {
            return None;
        }
        for i in 0..bytes {
            out[o] = (v >> (16 - 8 * i)) as u8;
            o += 1;
        }
    }
    Some(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_length() {
        for len in 0..40usize {
            let input: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let text = encode(&input);
            assert_eq!(text.len(), encoded_len(len));
            let mut out = vec![0u8; len + 3];
            let n = decode_into(text.as_bytes(), &mut out).unwrap();
            assert_eq!(&out[..n], &input[..]);
        }
    }

    #[test]
    fn rfc4648_vectors() {
        assert_eq!(encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(encode(b"fooba"), "Zm9vYmE");
        assert_eq!(encode(b"fo"), "Zm8");
        assert_eq!(encode(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn rejects_bad_input() {
        let mut out = [0u8; 16];
        assert_eq!(decode_into(b"Zm9vY", &mut out), None, "length 1 mod 4");
        assert_eq!(decode_into(b"Zm+v", &mut out), None, "standard alphabet");
        assert_eq!(
            decode_into(b"Zm9", &mut out),
            None,
            "non-zero trailing bits"
        );
        assert_eq!(
            decode_into(b"Zm9vYmFy", &mut out[..3]),
            None,
            "short output"
        );
    }
}
