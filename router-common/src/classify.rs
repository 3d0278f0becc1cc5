//! The reference classifier: what the XDP program decides for a frame,
//! written plainly over a byte slice.
//!
//! The XDP program (`router-ebpf`) implements the same steps with the
//! verifier's bounds checks; the differential tests feed both the same frames
//! and compare verdicts (DESIGN.md invariant 6). Keep the two in step: a
//! change here without the same change there fails those tests.
//!
//! The steps, in order:
//! 1. Ethernet, up to two VLAN tags, IPv4 (options skipped) or IPv6 (a
//!    bounded walk of extension headers). Anything else passes.
//! 2. Not UDP, a later fragment, or not to a CoAP port: passes untouched.
//! 3. First fragments and length disagreements are dropped.
//! 4. The CoAP header (RFC 7252 section 3) is validated; on a CoAPS port,
//!    the DTLS records instead (RFC 6347 section 4.1), and a ClientHello is
//!    held to its per-source rate.
//! 5. The source address selects the peer policy: deny, DTLS only, or a
//!    rate limit.

use crate::maps::{
    v4_mapped, PeerPolicy, POLICY_DENY, POLICY_REQUIRE_DTLS, PORT_COAP, PORT_COAPS, UNKNOWN_PEER_ID,
};
use crate::proto::*;
use crate::reason::Reason;

/// Source address of a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    V4([u8; 4]),
    V6([u8; 16]),
}

/// Which rate-limit state a packet is charged to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// A configured peer: one bucket per peer, across all its prefixes.
    Peer(u32),
    /// An unknown source: one bucket per address (IPv4 mapped into IPv6).
    Unknown([u8; 16]),
    /// The ClientHellos of one source address (IPv4 mapped into IPv6).
    Hello([u8; 16]),
}

/// The configuration the classifier consults (the BPF maps, in the kernel).
pub trait Policy {
    /// [`PORT_COAP`], [`PORT_COAPS`], or 0 for a port not guarded.
    fn port_kind(&self, port: u16) -> u32;
    /// Longest-prefix match of the source among configured peers.
    fn lookup(&self, src: Source) -> Option<PeerPolicy>;
    /// Policy for sources no peer prefix covers.
    fn default_policy(&self) -> PeerPolicy;
    /// The rate of ClientHellos per source on CoAPS ports.
    fn hello_policy(&self) -> PeerPolicy;
}

/// The outcome for one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub reason: Reason,
    /// The peer charged with this verdict, for policy verdicts (accept,
    /// denied, unknown, rate limited) only.
    pub peer_id: Option<u32>,
}

impl Verdict {
    const fn of(reason: Reason) -> Verdict {
        Verdict {
            reason,
            peer_id: None,
        }
    }
}

/// Classifies one Ethernet frame. `admit` is the rate limiter: it is asked
/// only for well-formed ClientHellos (their per-source rate) and allowed,
/// well-formed CoAP, and says whether the packet conforms.
pub fn classify(
    frame: &[u8],
    policy: &impl Policy,
    mut admit: impl FnMut(RateKey, &PeerPolicy) -> bool,
) -> Verdict {
    let checked = udp_datagram(frame, policy).and_then(|d| {
        if d.port_kind != PORT_COAPS {
            return check_coap(frame, d);
        }
        let hello = check_dtls(frame, d)?;
        if hello && !admit(RateKey::Hello(mapped(d.src)), &policy.hello_policy()) {
            return Err(Reason::DropHelloRateLimited);
        }
        Ok(d)
    });
    match checked {
        Ok(d) => apply_policy(d, policy, admit),
        Err(reason) => Verdict::of(reason),
    }
}

fn mapped(src: Source) -> [u8; 16] {
    match src {
        Source::V4(a) => v4_mapped(a),
        Source::V6(a) => a,
    }
}

/// A UDP datagram to a CoAP port, lengths checked.
#[derive(Clone, Copy)]
struct Datagram {
    src: Source,
    port_kind: u32,
    udp_off: usize,
    udp_len: usize,
}

fn be16(frame: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]))
}

fn byte(frame: &[u8], off: usize) -> Option<u8> {
    frame.get(off).copied()
}

/// Step 1: the offset and EtherType of the L3 header.
fn l3_header(frame: &[u8]) -> Option<(usize, u16)> {
    let mut off = ETH_HLEN - 2;
    let mut proto = be16(frame, off)?;
    for _ in 0..MAX_VLAN_TAGS {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        off += VLAN_HLEN;
        proto = be16(frame, off)?;
    }
    Some((off + 2, proto))
}

/// What the IP layer says about the transport payload.
struct Transport {
    src: Source,
    proto: u8,
    /// Offset of the transport header.
    l4_off: usize,
    /// Length of the transport payload according to the IP header(s).
    l4_len: Option<usize>,
    first_fragment: bool,
    later_fragment: bool,
}

fn ipv4(frame: &[u8], off: usize) -> Result<Transport, Reason> {
    let b0 = byte(frame, off).ok_or(Reason::PassNotIp)?;
    let hlen = usize::from(b0 & 0x0f) * 4;
    if b0 >> 4 != 4 || hlen < IPV4_MIN_HLEN || frame.len() < off + hlen {
        return Err(Reason::PassNotIp);
    }
    let total_len = usize::from(be16(frame, off + 2).unwrap_or(0));
    let frag = be16(frame, off + 6).unwrap_or(0);
    let src = [
        frame[off + 12],
        frame[off + 13],
        frame[off + 14],
        frame[off + 15],
    ];
    Ok(Transport {
        src: Source::V4(src),
        proto: frame[off + 9],
        l4_off: off + hlen,
        l4_len: total_len
            .checked_sub(hlen)
            .filter(|_| frame.len() >= off + total_len),
        first_fragment: frag & IPV4_MF != 0 && frag & IPV4_OFFSET_MASK == 0,
        later_fragment: frag & IPV4_OFFSET_MASK != 0,
    })
}

fn ipv6(frame: &[u8], off: usize) -> Result<Transport, Reason> {
    if frame.len() < off + IPV6_HLEN || frame[off] >> 4 != 6 {
        return Err(Reason::PassNotIp);
    }
    let payload_len = usize::from(be16(frame, off + 4).unwrap_or(0));
    let mut src = [0u8; 16];
    src.copy_from_slice(&frame[off + 8..off + 24]);
    let mut proto = frame[off + 6];
    let mut cur = off + IPV6_HLEN;
    let (mut first_fragment, mut later_fragment) = (false, false);
    let mut walked = 0;
    loop {
        let len = match proto {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                (usize::from(byte(frame, cur + 1).ok_or(Reason::PassNotIp)?) + 1) * 8
            }
            IPPROTO_AH => (usize::from(byte(frame, cur + 1).ok_or(Reason::PassNotIp)?) + 2) * 4,
            IPPROTO_FRAGMENT => {
                let field = be16(frame, cur + 2).ok_or(Reason::PassNotIp)?;
                later_fragment = field & IPV6_FRAG_OFFSET_MASK != 0;
                first_fragment = !later_fragment && field & IPV6_FRAG_MF != 0;
                8
            }
            _ => break,
        };
        if walked == MAX_IPV6_EXT_HEADERS {
            return Err(Reason::DropHeaderChain);
        }
        walked += 1;
        proto = byte(frame, cur).ok_or(Reason::PassNotIp)?;
        cur += len;
        if later_fragment {
            // What follows is the middle of a payload, not a header.
            break;
        }
    }
    let ext_len = cur - (off + IPV6_HLEN);
    Ok(Transport {
        src: Source::V6(src),
        proto,
        l4_off: cur,
        l4_len: payload_len
            .checked_sub(ext_len)
            .filter(|_| frame.len() >= off + IPV6_HLEN + payload_len),
        first_fragment,
        later_fragment,
    })
}

/// Steps 1 to 3.
fn udp_datagram(frame: &[u8], policy: &impl Policy) -> Result<Datagram, Reason> {
    let (off, ethertype) = l3_header(frame).ok_or(Reason::PassNotIp)?;
    let ip = match ethertype {
        ETH_P_IPV4 => ipv4(frame, off)?,
        ETH_P_IPV6 => ipv6(frame, off)?,
        _ => return Err(Reason::PassNotIp),
    };
    if ip.proto != IPPROTO_UDP {
        return Err(Reason::PassNotUdp);
    }
    if ip.later_fragment {
        return Err(Reason::PassLaterFragment);
    }
    let Some(dst_port) = be16(frame, ip.l4_off + 2) else {
        // Not even the ports are here. A first fragment this small is the
        // tiny-fragment attack of RFC 1858; anything else the kernel drops.
        return Err(if ip.first_fragment {
            Reason::DropFragment
        } else {
            Reason::PassNotIp
        });
    };
    let port_kind = policy.port_kind(dst_port);
    if port_kind != PORT_COAP && port_kind != PORT_COAPS {
        return Err(Reason::PassNotCoapPort);
    }
    if ip.first_fragment {
        return Err(Reason::DropFragment);
    }
    let udp_len = usize::from(be16(frame, ip.l4_off + 4).ok_or(Reason::DropBadLength)?);
    if frame.len() < ip.l4_off + UDP_HLEN || udp_len < UDP_HLEN || ip.l4_len != Some(udp_len) {
        return Err(Reason::DropBadLength);
    }
    Ok(Datagram {
        src: ip.src,
        port_kind,
        udp_off: ip.l4_off,
        udp_len,
    })
}

/// Step 4 on a CoAPS port: DTLS records, RFC 6347 section 4.1. Each record
/// has a content type DTLS knows, version 1.2 (1.0 allowed in a
/// ClientHello's or HelloVerifyRequest's record), and a length within the datagram; the records,
/// at most [`DTLS_MAX_RECORDS`], fill it exactly. A tls12_cid record (RFC
/// 9146) has its length after a connection ID of negotiated size, which the
/// fast path does not know: it must be the datagram's last record. Returns
/// whether the first record is a ClientHello (epoch 0, handshake type 1).
fn check_dtls(frame: &[u8], d: Datagram) -> Result<bool, Reason> {
    let end = d.udp_off + d.udp_len;
    let mut off = d.udp_off + UDP_HLEN;
    let mut hello = false;
    for i in 0..DTLS_MAX_RECORDS {
        if end - off < DTLS_RECORD_HLEN {
            return Err(Reason::DropBadDtlsRecord);
        }
        let ctype = frame[off];
        let version = u16::from_be_bytes([frame[off + 1], frame[off + 2]]);
        let epoch = u16::from_be_bytes([frame[off + 3], frame[off + 4]]);
        let len = usize::from(u16::from_be_bytes([frame[off + 11], frame[off + 12]]));
        if !dtls_content_type_valid(ctype) {
            return Err(Reason::DropBadDtlsRecord);
        }
        // The handshake message type of an epoch-0 handshake record.
        let hello_phase = if ctype == DTLS_HANDSHAKE && epoch == 0 && len > 0 {
            frame.get(off + DTLS_RECORD_HLEN).copied()
        } else {
            None
        };
        let client_hello = hello_phase == Some(DTLS_CLIENT_HELLO);
        if version != DTLS_1_2
            && !(version == DTLS_1_0 && hello_phase.is_some_and(dtls_1_0_allowed))
        {
            return Err(Reason::DropBadDtlsRecord);
        }
        if i == 0 {
            hello = client_hello;
        }
        if ctype == DTLS_CID {
            return Ok(hello);
        }
        if end - off - DTLS_RECORD_HLEN < len {
            return Err(Reason::DropBadDtlsRecord);
        }
        off += DTLS_RECORD_HLEN + len;
        if off == end {
            return Ok(hello);
        }
        // (No frame XDP sees is this long; the kernel side needs the bound.)
        if off > DTLS_MAX_OFFSET {
            return Err(Reason::DropBadDtlsRecord);
        }
    }
    Err(Reason::DropBadDtlsRecord)
}

/// Step 4: the CoAP header, RFC 7252 section 3.
fn check_coap(frame: &[u8], d: Datagram) -> Result<Datagram, Reason> {
    let coap_off = d.udp_off + UDP_HLEN;
    let coap_len = d.udp_len - UDP_HLEN;
    if coap_len < COAP_HLEN {
        return Err(Reason::DropTooShort);
    }
    let b0 = frame[coap_off];
    let code = frame[coap_off + 1];
    let token_len = b0 & 0x0f;
    if b0 >> 6 != COAP_VERSION {
        return Err(Reason::DropBadVersion);
    }
    if token_len > COAP_MAX_TOKEN_LEN {
        return Err(Reason::DropBadTokenLength);
    }
    if !coap_code_class_valid(code) {
        return Err(Reason::DropBadCode);
    }
    if code == 0 && (token_len != 0 || coap_len != COAP_HLEN) {
        return Err(Reason::DropBadEmpty);
    }
    if coap_len < COAP_HLEN + usize::from(token_len) {
        return Err(Reason::DropTruncated);
    }
    Ok(d)
}

/// Step 5.
fn apply_policy(
    d: Datagram,
    policy: &impl Policy,
    mut admit: impl FnMut(RateKey, &PeerPolicy) -> bool,
) -> Verdict {
    let src = d.src;
    let (rule, key, denied) = match policy.lookup(src) {
        Some(p) => (p, RateKey::Peer(p.peer_id), Reason::DropDenied),
        None => {
            let mut p = policy.default_policy();
            p.peer_id = UNKNOWN_PEER_ID;
            let addr = match src {
                Source::V4(a) => v4_mapped(a),
                Source::V6(a) => a,
            };
            (p, RateKey::Unknown(addr), Reason::DropUnknownPeer)
        }
    };
    let reason = if rule.action == POLICY_DENY {
        denied
    } else if rule.action == POLICY_REQUIRE_DTLS && d.port_kind != PORT_COAPS {
        Reason::DropRequiresDtls
    } else if admit(key, &rule) {
        Reason::Accept
    } else {
        Reason::DropRateLimited
    };
    Verdict {
        reason,
        peer_id: Some(rule.peer_id),
    }
}
