//! CoAP over UDP (RFC 7252).
//!
//! The message layer, shared by everything that speaks CoAP:
//! - `message`: the wire format;
//! - `params`: transmission parameters and the retransmission schedule;
//! - `ids`: Message IDs and tokens for what the gateway originates;
//! - `dedup`: duplicate detection;
//! - `client`: CON requests the gateway sends, matched with their answers.
//!
//! On top of it:
//! - `request`: a request's options;
//! - `uplink`: the server side, what a worker does with each datagram;
//! - `dtls`: CoAP over DTLS, the sessions that carry it (RFC 7252 section 9);
//! - `block`: block-wise transfers (RFC 7959);
//! - `observe`: devices observing topics (RFC 7641, the server's side);
//! - `watch`: the gateway observing devices (RFC 7641, the client's side);
//! - `downlink`: the endpoint task: MQTT commands to devices, notifications
//!   to observing devices and watches on devices, through the client.

pub mod block;
pub mod client;
pub mod dedup;
pub mod downlink;
pub mod dtls;
pub mod ids;
pub mod message;
pub mod observe;
pub mod params;
pub mod request;
pub mod uplink;
pub mod watch;

use std::net::SocketAddr;

/// Whom a request came from, as duplicate detection and block assembly
/// tell endpoints apart (RFC 7252 sections 4.5 and RFC 7959 section 2.4).
/// Plain CoAP: its address. DTLS: the peer its credentials named, whatever
/// address it speaks from, so a device whose address changes is still one
/// endpoint (`dtls::Identity::key`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    Address(SocketAddr),
    Peer(u32),
}

/// Where the gateway reaches a device: its address, and whether through
/// the DTLS session the device holds there. A secure endpoint is never
/// sent plain CoAP (a command meant for an authenticated device does not
/// go out in clear, even after its session closed), and a plain answer
/// from its address does not match what was sent to it over DTLS.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub secure: bool,
}

impl Endpoint {
    pub const fn plain(addr: SocketAddr) -> Endpoint {
        Endpoint {
            addr,
            secure: false,
        }
    }

    pub const fn secure(addr: SocketAddr) -> Endpoint {
        Endpoint { addr, secure: true }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.secure {
            write!(f, "coaps://{}", self.addr)
        } else {
            write!(f, "{}", self.addr)
        }
    }
}

/// A device's endpoint as the config writes it: `coaps://ADDRESS[:PORT]`
/// (the gateway opens a DTLS session to it, RFC 7252 section 9.1),
/// `coap://ADDRESS[:PORT]`, or `ADDRESS:PORT` (plain CoAP). The default
/// ports are 5684 and 5683 (section 12.7); an IPv6 address goes in
/// brackets (RFC 3986 section 3.2.2). No host names: the gateway resolves
/// nothing at run time.
impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(text: &str) -> Result<Endpoint, String> {
        let scheme = |name: &str| {
            text.get(..name.len())
                .filter(|s| s.eq_ignore_ascii_case(name))
                .map(|_| &text[name.len()..])
        };
        let (secure, authority) = match (scheme("coaps://"), scheme("coap://")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            (None, None) => {
                return text.parse().map(Endpoint::plain).map_err(|_| {
                    format!(
                        "{text:?} is not an address with a port or a coap:// or coaps:// URI \
                         (e.g. 192.0.2.7:5683, coaps://[2001:db8::7])"
                    )
                })
            }
        };
        let authority = authority.strip_suffix('/').unwrap_or(authority);
        let port = if secure { 5684 } else { 5683 };
        let addr = authority.parse().or_else(|_| {
            let ip = match authority.strip_prefix('[') {
                Some(v6) => v6.strip_suffix(']').and_then(|a| a.parse().ok()),
                None => authority.parse::<std::net::Ipv4Addr>().ok().map(Into::into),
            };
            ip.map(|ip| SocketAddr::new(ip, port)).ok_or_else(|| {
                format!(
                    "{text:?}: the URI's host must be an IP address (IPv6 in brackets), \
                     with an optional port, and nothing after it"
                )
            })
        })?;
        Ok(Endpoint { addr, secure })
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::Endpoint;

    #[test]
    fn endpoints_parse_as_the_config_writes_them_and_print_back() {
        for (text, shown) in [
            ("192.0.2.7:5683", "192.0.2.7:5683"),
            ("coap://192.0.2.7", "192.0.2.7:5683"),
            ("coaps://192.0.2.7", "coaps://192.0.2.7:5684"),
            ("COAPS://192.0.2.7:6000/", "coaps://192.0.2.7:6000"),
            ("coaps://[2001:db8::7]", "coaps://[2001:db8::7]:5684"),
            ("coap://[2001:db8::7]:7000", "[2001:db8::7]:7000"),
        ] {
            let e: Endpoint = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(e.to_string(), shown);
            assert_eq!(e.to_string().parse::<Endpoint>(), Ok(e), "{text}");
        }
        for bad in [
            "",
            "192.0.2.7",
            "coaps://",
            "coaps://meter.example",
            "coaps://2001:db8::7",
            "coaps://[2001:db8::7",
            "coaps://192.0.2.7/path",
            "http://192.0.2.7",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad:?} parsed");
        }
    }
}
