//! A CoAP request's options, as the uplink needs them (RFC 7252 section 5.10).

use super::block::Block;
use super::message::{option, uint_option, Message};

/// Uri-Path segments kept per request; more is answered 4.00.
pub const MAX_PATH_SEGMENTS: usize = 16;

/// The Uri-Path, borrowed from the datagram.
#[derive(Clone, Copy, Debug)]
pub struct Path<'a> {
    segments: [&'a str; MAX_PATH_SEGMENTS],
    len: usize,
}

impl<'a> Path<'a> {
    pub fn segments(&self) -> &[&'a str] {
        &self.segments[..self.len]
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub method: u8,
    pub path: Path<'a>,
    pub content_format: Option<u16>,
    /// The block of the request body this request carries (RFC 7959).
    pub block1: Option<Block>,
    /// The block of the response asked for.
    pub block2: Option<Block>,
    /// The size of the whole request body, when announced.
    pub size1: Option<u32>,
    /// Size2 in a request asks for the size of the whole response (RFC
    /// 7959 section 4).
    pub wants_size2: bool,
    /// Observe in a GET: 0 registers, 1 deregisters (RFC 7641 section 2).
    pub observe: Option<u32>,
}

/// Why a request cannot be served, with the response code it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestError {
    /// 4.02: an unrecognised critical option (section 5.4.1).
    BadOption(u16),
    /// 4.00: e.g. a Uri-Path that is not UTF-8 or too deep.
    BadRequest(&'static str),
    /// 5.05: Proxy-Uri / Proxy-Scheme (section 5.7.2); we are no proxy.
    ProxyingNotSupported,
}

impl RequestError {
    pub fn code(&self) -> u8 {
        use super::message::code;
        match self {
            RequestError::BadOption(_) => code::BAD_OPTION,
            RequestError::BadRequest(_) => code::BAD_REQUEST,
            RequestError::ProxyingNotSupported => code::PROXYING_NOT_SUPPORTED,
        }
    }
}

/// Whether an option may occur more than once (RFC 7252 Table 4).
fn repeatable(number: u16) -> bool {
    matches!(
        number,
        option::IF_MATCH
            | option::ETAG
            | option::LOCATION_PATH
            | option::URI_PATH
            | option::URI_QUERY
            | option::LOCATION_QUERY
    )
}

/// The lengths an option's value may have (RFC 7252 Table 4; Observe,
/// RFC 7641 section 2).
fn length_range(number: u16) -> Option<std::ops::RangeInclusive<usize>> {
    Some(match number {
        option::IF_MATCH => 0..=8,
        option::URI_HOST | option::PROXY_SCHEME => 1..=255,
        option::ETAG => 1..=8,
        option::IF_NONE_MATCH => 0..=0,
        option::OBSERVE => 0..=3,
        option::URI_PORT | option::CONTENT_FORMAT | option::ACCEPT => 0..=2,
        option::LOCATION_PATH | option::URI_PATH | option::URI_QUERY | option::LOCATION_QUERY => {
            0..=255
        }
        option::MAX_AGE | option::SIZE1 | option::SIZE2 => 0..=4,
        option::BLOCK1 | option::BLOCK2 => 0..=3,
        option::PROXY_URI => 1..=1034,
        _ => return None,
    })
}

/// Reads the options a request may carry. Elective options we do not know
/// are ignored and critical ones are an error (section 5.4.1); so are the
/// second and later occurrences of a non-repeatable option, and values of
/// a length outside the option's range (sections 5.4.5 and 5.4.3).
pub fn parse<'a>(msg: &Message<'a>) -> Result<Request<'a>, RequestError> {
    let mut path = Path {
        segments: [""; MAX_PATH_SEGMENTS],
        len: 0,
    };
    let mut content_format = None;
    let (mut block1, mut block2, mut size1, mut wants_size2) = (None, None, None, false);
    let mut observe = None;
    let mut previous = None;
    for (number, value) in msg.options() {
        // Options arrive sorted by number (section 3.1): a repeat follows
        // its first occurrence.
        let repeat = previous == Some(number);
        previous = Some(number);
        let bad_length = length_range(number).is_some_and(|r| !r.contains(&value.len()));
        if bad_length || (repeat && !repeatable(number)) {
            // Treated like an unrecognised option (sections 5.4.3, 5.4.5).
            if option::is_critical(number) {
                return Err(RequestError::BadOption(number));
            }
            continue;
        }
        match number {
            option::URI_PATH => {
                if path.len == MAX_PATH_SEGMENTS {
                    return Err(RequestError::BadRequest("Uri-Path too deep"));
                }
                path.segments[path.len] = std::str::from_utf8(value)
                    .map_err(|_| RequestError::BadRequest("Uri-Path is not UTF-8"))?;
                path.len += 1;
            }
            option::CONTENT_FORMAT => {
                content_format = uint_option(value).and_then(|v| u16::try_from(v).ok());
            }
            option::BLOCK1 | option::BLOCK2 => {
                // SZX 7 is reserved: 4.00 (RFC 7959 section 2.2).
                let block = Block::parse(value).ok_or(RequestError::BadRequest(
                    "block size exponent 7 is reserved",
                ))?;
                if number == option::BLOCK1 {
                    block1 = Some(block);
                } else {
                    block2 = Some(block);
                }
            }
            option::SIZE1 => size1 = uint_option(value),
            option::SIZE2 => wants_size2 = true,
            option::OBSERVE => observe = uint_option(value),
            option::PROXY_URI | option::PROXY_SCHEME => {
                return Err(RequestError::ProxyingNotSupported)
            }
            // Understood, and harmless to ignore for a publish endpoint.
            option::IF_MATCH
            | option::URI_HOST
            | option::ETAG
            | option::IF_NONE_MATCH
            | option::URI_PORT
            | option::MAX_AGE
            | option::URI_QUERY
            | option::ACCEPT
            | option::LOCATION_PATH
            | option::LOCATION_QUERY => {}
            n if option::is_critical(n) => return Err(RequestError::BadOption(n)),
            _ => {}
        }
    }
    Ok(Request {
        method: msg.code,
        path,
        content_format,
        block1,
        block2,
        size1,
        wants_size2,
        observe,
    })
}

/// The media type of a CoAP Content-Format (IANA "CoAP Content-Formats"
/// registry), carried to MQTT 5 subscribers as the content type.
pub fn content_type(format: u16) -> Option<&'static str> {
    Some(match format {
        0 => "text/plain; charset=utf-8",
        40 => "application/link-format",
        41 => "application/xml",
        42 => "application/octet-stream",
        47 => "application/exi",
        50 => "application/json",
        51 => "application/json-patch+json",
        52 => "application/merge-patch+json",
        60 => "application/cbor",
        61 => "application/cwt",
        110 => "application/senml+json",
        111 => "application/sensml+json",
        112 => "application/senml+cbor",
        113 => "application/sensml+cbor",
        _ => return None,
    })
}

/// The reverse, for GET responses.
pub fn content_format(media_type: &[u8]) -> Option<u16> {
    [0u16, 40, 41, 42, 47, 50, 51, 52, 60, 61, 110, 111, 112, 113]
        .into_iter()
        .find(|&f| content_type(f).map(str::as_bytes) == Some(media_type))
}

pub fn method_name(code: u8) -> &'static str {
    match code {
        1 => "GET",
        2 => "POST",
        3 => "PUT",
        4 => "DELETE",
        5 => "FETCH",
        6 => "PATCH",
        7 => "iPATCH",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coap::message::{code, encode, CON};

    fn parse_options(options: &[(u16, &[u8])]) -> Result<Option<u16>, RequestError> {
        let mut datagram = Vec::new();
        encode(&mut datagram, CON, code::POST, 1, &[], options, b"x");
        let msg = Message::decode(&datagram).unwrap();
        parse(&msg).map(|r| r.content_format)
    }

    #[test]
    fn a_repeated_elective_option_keeps_its_first_value() {
        // Content-Format is elective and not repeatable: the second is
        // ignored like an unknown elective option (RFC 7252 section 5.4.5).
        let formats = [
            (option::CONTENT_FORMAT, &[][..]),
            (option::CONTENT_FORMAT, &[50][..]),
        ];
        assert_eq!(parse_options(&formats), Ok(Some(0)));
    }

    #[test]
    fn a_repeated_critical_option_is_a_bad_option() {
        let hosts = [(option::URI_HOST, &b"a"[..]), (option::URI_HOST, &b"b"[..])];
        assert_eq!(
            parse_options(&hosts),
            Err(RequestError::BadOption(option::URI_HOST))
        );
        // Repeatable ones may repeat.
        let paths = [(option::URI_PATH, &b"a"[..]), (option::URI_PATH, &b"b"[..])];
        assert_eq!(parse_options(&paths), Ok(None));
    }

    #[test]
    fn option_values_outside_their_length_range() {
        // Uri-Host (critical) is 1-255 bytes, Uri-Port (critical) 0-2.
        assert_eq!(
            parse_options(&[(option::URI_HOST, &[][..])]),
            Err(RequestError::BadOption(option::URI_HOST))
        );
        assert_eq!(
            parse_options(&[(option::URI_PORT, &[1, 2, 3][..])]),
            Err(RequestError::BadOption(option::URI_PORT))
        );
        // Uri-Path (critical): over 255 bytes is 4.02 (section 5.4.3).
        let long = [b'p'; 256];
        assert_eq!(
            parse_options(&[(option::URI_PATH, &long[..])]),
            Err(RequestError::BadOption(option::URI_PATH))
        );
        // Content-Format (elective): over 2 bytes is ignored.
        assert_eq!(
            parse_options(&[(option::CONTENT_FORMAT, &[0, 0, 50][..])]),
            Ok(None)
        );
    }
}
