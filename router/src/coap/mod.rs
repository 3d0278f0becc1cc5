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

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}
