//! CoAP message encoding and decoding (RFC 7252 section 3), without
//! allocation: a decoded [`Message`] borrows the datagram.

use std::fmt;

pub const CON: u8 = 0;
pub const NON: u8 = 1;
pub const ACK: u8 = 2;
pub const RST: u8 = 3;

/// Codes as `class << 5 | detail` (section 12.1).
pub mod code {
    pub const EMPTY: u8 = 0x00;
    pub const GET: u8 = 0x01;
    pub const POST: u8 = 0x02;
    pub const PUT: u8 = 0x03;
    pub const DELETE: u8 = 0x04;
    pub const CHANGED: u8 = 0x44; // 2.04
    pub const CONTENT: u8 = 0x45; // 2.05
    pub const CONTINUE: u8 = 0x5f; // 2.31 (RFC 7959)
    pub const BAD_REQUEST: u8 = 0x80; // 4.00
    pub const BAD_OPTION: u8 = 0x82; // 4.02
    pub const FORBIDDEN: u8 = 0x83; // 4.03
    pub const NOT_FOUND: u8 = 0x84; // 4.04
    pub const METHOD_NOT_ALLOWED: u8 = 0x85; // 4.05
    pub const REQUEST_ENTITY_INCOMPLETE: u8 = 0x88; // 4.08 (RFC 7959)
    pub const REQUEST_ENTITY_TOO_LARGE: u8 = 0x8d; // 4.13
    pub const INTERNAL_SERVER_ERROR: u8 = 0xa0; // 5.00
    pub const SERVICE_UNAVAILABLE: u8 = 0xa3; // 5.03
    pub const PROXYING_NOT_SUPPORTED: u8 = 0xa5; // 5.05
}

/// Option numbers (section 12.2).
pub mod option {
    pub const IF_MATCH: u16 = 1;
    pub const URI_HOST: u16 = 3;
    pub const ETAG: u16 = 4;
    pub const IF_NONE_MATCH: u16 = 5;
    pub const OBSERVE: u16 = 6;
    pub const URI_PORT: u16 = 7;
    pub const LOCATION_PATH: u16 = 8;
    pub const URI_PATH: u16 = 11;
    pub const CONTENT_FORMAT: u16 = 12;
    pub const MAX_AGE: u16 = 14;
    pub const URI_QUERY: u16 = 15;
    pub const ACCEPT: u16 = 17;
    /// RFC 7959 section 2.1.
    pub const BLOCK2: u16 = 23;
    pub const BLOCK1: u16 = 27;
    pub const SIZE2: u16 = 28;
    pub const LOCATION_QUERY: u16 = 20;
    pub const PROXY_URI: u16 = 35;
    pub const PROXY_SCHEME: u16 = 39;
    pub const SIZE1: u16 = 60;

    /// Section 5.4.6: odd option numbers are critical.
    pub const fn is_critical(number: u16) -> bool {
        number & 1 == 1
    }
}

/// Why a datagram is not a CoAP message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatError {
    TooShort,
    BadVersion,
    BadTokenLength,
    Truncated,
    /// Option delta or length nibble 15 outside the payload marker, or an
    /// option running past the end (section 3.1).
    BadOption,
    /// A payload marker followed by nothing (section 3).
    EmptyPayload,
    /// Code 0.00 with a token or more bytes (section 4.1).
    BadEmpty,
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A decoded message borrowing its datagram.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    pub mtype: u8,
    pub code: u8,
    pub mid: u16,
    pub token: &'a [u8],
    /// The raw option bytes, already validated; walk them with [`Message::options`].
    options: &'a [u8],
    pub payload: &'a [u8],
}

impl<'a> Message<'a> {
    /// Decodes and validates the header, token and option framing. The
    /// message ID is readable even when this fails (see [`peek_header`]).
    pub fn decode(buf: &'a [u8]) -> Result<Message<'a>, FormatError> {
        let head = Message::decode_head(buf)?;
        if head.code == code::EMPTY && buf.len() != 4 {
            return Err(FormatError::BadEmpty);
        }
        let rest = &buf[4 + head.token.len()..];
        let mut iter = OptionIter { rest, number: 0 };
        for item in &mut iter {
            item?;
        }
        let options_len = rest.len() - iter.rest.len();
        let payload = match iter.rest {
            [] => &[][..],
            [0xff] => return Err(FormatError::EmptyPayload),
            [0xff, payload @ ..] => payload,
            _ => unreachable!("the option walk stops only at the end or a marker"),
        };
        Ok(Message {
            options: &rest[..options_len],
            payload,
            ..head
        })
    }

    /// Decodes the header and token alone: all that is needed to answer
    /// a datagram whose options and payload were cut off by the receive
    /// buffer (4.13, section 5.9.2.9).
    pub fn decode_head(buf: &'a [u8]) -> Result<Message<'a>, FormatError> {
        if buf.len() < 4 {
            return Err(FormatError::TooShort);
        }
        if buf[0] >> 6 != 1 {
            return Err(FormatError::BadVersion);
        }
        let tkl = usize::from(buf[0] & 0x0f);
        if tkl > 8 {
            return Err(FormatError::BadTokenLength);
        }
        if buf.len() < 4 + tkl {
            return Err(FormatError::Truncated);
        }
        Ok(Message {
            mtype: (buf[0] >> 4) & 0x03,
            code: buf[1],
            mid: u16::from_be_bytes([buf[2], buf[3]]),
            token: &buf[4..4 + tkl],
            options: &[],
            payload: &[],
        })
    }

    pub fn options(&self) -> impl Iterator<Item = (u16, &'a [u8])> {
        OptionIter {
            rest: self.options,
            number: 0,
        }
        .map_while(Result::ok)
    }

    pub fn is_request(&self) -> bool {
        self.code >> 5 == 0 && self.code != code::EMPTY
    }
}

/// Type and message ID of anything with a 4-byte header, so a malformed CON
/// can still be answered with a Reset (section 4.2).
pub fn peek_header(buf: &[u8]) -> Option<(u8, u16)> {
    if buf.len() < 4 || buf[0] >> 6 != 1 {
        return None;
    }
    Some(((buf[0] >> 4) & 0x03, u16::from_be_bytes([buf[2], buf[3]])))
}

/// Whether an encoded message is a response `code`, piggybacked in an ACK
/// or sent as a NON.
pub fn is_response_with(buf: &[u8], response: u8) -> bool {
    peek_header(buf).is_some_and(|(mtype, _)| mtype == ACK || mtype == NON) && buf[1] == response
}

/// Rewrites the code of an encoded message (header byte 1, section 3).
pub fn set_code(buf: &mut [u8], new: u8) {
    if buf.len() >= 4 {
        buf[1] = new;
    }
}

struct OptionIter<'a> {
    rest: &'a [u8],
    number: u16,
}

impl<'a> Iterator for OptionIter<'a> {
    type Item = Result<(u16, &'a [u8]), FormatError>;

    fn next(&mut self) -> Option<Self::Item> {
        let (&first, tail) = self.rest.split_first()?;
        if first == 0xff {
            return None;
        }
        let mut tail = tail;
        let mut extended = |nibble: u8| -> Result<u16, FormatError> {
            match nibble {
                0..=12 => Ok(u16::from(nibble)),
                13 => {
                    let (&b, t) = tail.split_first().ok_or(FormatError::BadOption)?;
                    tail = t;
                    Ok(u16::from(b) + 13)
                }
                14 => {
                    if tail.len() < 2 {
                        return Err(FormatError::BadOption);
                    }
                    let v = u16::from_be_bytes([tail[0], tail[1]]);
                    tail = &tail[2..];
                    v.checked_add(269).ok_or(FormatError::BadOption)
                }
                _ => Err(FormatError::BadOption),
            }
        };
        let step = (|| {
            let delta = extended(first >> 4)?;
            let len = usize::from(extended(first & 0x0f)?);
            Ok((delta, len))
        })();
        let (delta, len) = match step {
            Ok(v) => v,
            Err(e) => {
                self.rest = &[];
                return Some(Err(e));
            }
        };
        let Some(number) = self.number.checked_add(delta) else {
            self.rest = &[];
            return Some(Err(FormatError::BadOption));
        };
        if tail.len() < len {
            self.rest = &[];
            return Some(Err(FormatError::BadOption));
        }
        self.number = number;
        let value = &tail[..len];
        self.rest = &tail[len..];
        Some(Ok((number, value)))
    }
}

/// Decodes a uint option value (section 3.2): big-endian, leading zeros dropped.
pub fn uint_option(value: &[u8]) -> Option<u32> {
    if value.len() > 4 {
        return None;
    }
    Some(value.iter().fold(0u32, |acc, &b| acc << 8 | u32::from(b)))
}

/// Writes a message into `out` (cleared first). Options must be given in
/// ascending number order.
pub fn encode(
    out: &mut Vec<u8>,
    mtype: u8,
    code: u8,
    mid: u16,
    token: &[u8],
    options: &[(u16, &[u8])],
    payload: &[u8],
) {
    out.clear();
    out.push(0x40 | (mtype << 4) | token.len() as u8);
    out.push(code);
    out.extend_from_slice(&mid.to_be_bytes());
    out.extend_from_slice(token);
    let mut last = 0u16;
    for &(number, value) in options {
        let delta = number - last;
        last = number;
        let (dn, dext) = nibble(delta);
        let (ln, lext) = nibble(value.len() as u16);
        out.push(dn << 4 | ln);
        out.extend_from_slice(&dext[..ext_len(dn)]);
        out.extend_from_slice(&lext[..ext_len(ln)]);
        out.extend_from_slice(value);
    }
    if !payload.is_empty() {
        out.push(0xff);
        out.extend_from_slice(payload);
    }
}

fn nibble(v: u16) -> (u8, [u8; 2]) {
    match v {
        0..=12 => (v as u8, [0, 0]),
        13..=268 => (13, [(v - 13) as u8, 0]),
        _ => (14, (v - 269).to_be_bytes()),
    }
}

fn ext_len(nibble: u8) -> usize {
    match nibble {
        13 => 1,
        14 => 2,
        _ => 0,
    }
}

/// The shortest big-endian encoding of a uint option value.
pub fn uint_bytes(v: u32, buf: &mut [u8; 4]) -> &[u8] {
    *buf = v.to_be_bytes();
    let skip = (v.leading_zeros() / 8) as usize;
    &buf[skip..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_extended_options() {
        let long = [b'x'; 300];
        let mut out = Vec::new();
        encode(
            &mut out,
            CON,
            code::POST,
            0x1234,
            &[1, 2, 3],
            &[
                (option::URI_PATH, b"a"),
                (option::URI_PATH, &long[..20]),
                (option::SIZE1, &long),
            ],
            b"payload",
        );
        let m = Message::decode(&out).unwrap();
        assert_eq!(
            (m.mtype, m.code, m.mid, m.token),
            (CON, code::POST, 0x1234, &[1, 2, 3][..])
        );
        let opts: Vec<_> = m.options().map(|(n, v)| (n, v.len())).collect();
        assert_eq!(opts, vec![(11, 1), (11, 20), (60, 300)]);
        assert_eq!(m.payload, b"payload");
    }

    #[test]
    fn format_errors() {
        assert_eq!(
            Message::decode(&[0x40, 1]).unwrap_err(),
            FormatError::TooShort
        );
        assert_eq!(
            Message::decode(&[0x80, 1, 0, 0]).unwrap_err(),
            FormatError::BadVersion
        );
        assert_eq!(
            Message::decode(&[0x49, 1, 0, 0]).unwrap_err(),
            FormatError::BadTokenLength
        );
        assert_eq!(
            Message::decode(&[0x42, 1, 0, 0, 1]).unwrap_err(),
            FormatError::Truncated
        );
        assert_eq!(
            Message::decode(&[0x40, 1, 0, 0, 0xf0]).unwrap_err(),
            FormatError::BadOption
        );
        assert_eq!(
            Message::decode(&[0x40, 1, 0, 0, 0x13, b'a']).unwrap_err(),
            FormatError::BadOption
        );
        assert_eq!(
            Message::decode(&[0x40, 1, 0, 0, 0xff]).unwrap_err(),
            FormatError::EmptyPayload
        );
        assert_eq!(
            Message::decode(&[0x40, 0, 0, 0, 0]).unwrap_err(),
            FormatError::BadEmpty
        );
        assert!(Message::decode(&[0x40, 0, 0, 0]).is_ok());
    }

    #[test]
    fn uint_options() {
        let mut buf = [0; 4];
        assert_eq!(uint_bytes(0, &mut buf), &[] as &[u8]);
        assert_eq!(uint_bytes(50, &mut buf), &[50]);
        assert_eq!(uint_option(&[1, 0]), Some(256));
        assert_eq!(uint_option(&[1, 0, 0, 0, 0]), None);
    }
}
