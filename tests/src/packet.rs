//! Builds Ethernet frames carrying UDP (usually CoAP) over IPv4 or IPv6,
//! with the options the fast path must handle: VLAN tags, IPv4 options,
//! IPv6 extension headers, fragments. Checksums are computed, so the frames
//! are deliverable when sent on a real interface.

use std::net::IpAddr;

pub const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const DEV_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// A CoAP message (RFC 7252 section 3): header, token, options, payload.
pub fn coap(
    msg_type: u8,
    code: u8,
    mid: u16,
    token: &[u8],
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut m = vec![0x40 | (msg_type << 4) | token.len() as u8, code];
    m.extend_from_slice(&mid.to_be_bytes());
    m.extend_from_slice(token);
    m.extend_from_slice(options);
    if !payload.is_empty() {
        m.push(0xff);
        m.extend_from_slice(payload);
    }
    m
}

/// A CON POST to Uri-Path "sensors/temp" with `payload`.
pub fn coap_post(mid: u16, payload: &[u8]) -> Vec<u8> {
    // Option 11 (Uri-Path), delta 11 length 7 "sensors"; delta 0 length 4 "temp".
    let mut opts = vec![0xb7];
    opts.extend_from_slice(b"sensors");
    opts.push(0x04);
    opts.extend_from_slice(b"temp");
    coap(0, 0x02, mid, &[0xca, 0xfe], &opts, payload)
}

/// An IPv6 extension header to insert before UDP.
#[derive(Clone, Copy, Debug)]
pub enum ExtHeader {
    HopByHop,
    DestOpts,
    Routing,
    /// Fragment header: (offset in 8-byte units, more fragments).
    Fragment(u16, bool),
    /// Destination Options with Hdr Ext Len n: (n + 1) x 8 bytes, one PadN.
    LongDestOpts(u8),
    /// Authentication Header (RFC 4302) with a 96-bit ICV: 24 bytes.
    Ah,
}

/// A UDP datagram in an Ethernet frame. Fields are public so tests can
/// break exactly one thing.
#[derive(Clone, Debug)]
pub struct UdpFrame {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: Vec<u8>,
    /// VLAN tags, outermost first: (TPID, VLAN id).
    pub vlans: Vec<(u16, u16)>,
    /// IPv4 option bytes (padded to a multiple of 4 with NOPs).
    pub ipv4_options: Vec<u8>,
    pub ipv6_ext: Vec<ExtHeader>,
    /// IPv4 fragment: (offset in 8-byte units, more fragments).
    pub ipv4_fragment: (u16, bool),
    /// Overrides the UDP length field.
    pub udp_len: Option<u16>,
    /// Overrides the IPv4 total length / IPv6 payload length.
    pub ip_len: Option<u16>,
    /// The IP protocol / last next-header; 17 (UDP) unless changed.
    pub protocol: u8,
}

impl UdpFrame {
    pub fn new(
        src: IpAddr,
        dst: IpAddr,
        src_port: u16,
        dst_port: u16,
        payload: Vec<u8>,
    ) -> UdpFrame {
        UdpFrame {
            src,
            dst,
            src_port,
            dst_port,
            payload,
            vlans: Vec::new(),
            ipv4_options: Vec::new(),
            ipv6_ext: Vec::new(),
            ipv4_fragment: (0, false),
            udp_len: None,
            ip_len: None,
            protocol: 17,
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut udp = Vec::with_capacity(8 + self.payload.len());
        let udp_len = self.udp_len.unwrap_or((8 + self.payload.len()) as u16);
        udp.extend_from_slice(&self.src_port.to_be_bytes());
        udp.extend_from_slice(&self.dst_port.to_be_bytes());
        udp.extend_from_slice(&udp_len.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&self.payload);
        let sum = udp_checksum(self.src, self.dst, &udp);
        udp[6..8].copy_from_slice(&sum.to_be_bytes());

        let mut frame = Vec::with_capacity(64 + udp.len());
        frame.extend_from_slice(&GW_MAC);
        frame.extend_from_slice(&DEV_MAC);
        for &(tpid, vid) in &self.vlans {
            frame.extend_from_slice(&tpid.to_be_bytes());
            frame.extend_from_slice(&vid.to_be_bytes());
        }
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                frame.extend_from_slice(&0x0800u16.to_be_bytes());
                let mut opts = self.ipv4_options.clone();
                while !opts.len().is_multiple_of(4) {
                    opts.push(1); // NOP
                }
                let hlen = 20 + opts.len();
                let total = self.ip_len.unwrap_or((hlen + udp.len()) as u16);
                let (off, mf) = self.ipv4_fragment;
                let frag = off | if mf { 0x2000 } else { 0 };
                let mut ip = vec![0x40 | (hlen / 4) as u8, 0];
                ip.extend_from_slice(&total.to_be_bytes());
                ip.extend_from_slice(&[0x12, 0x34]);
                ip.extend_from_slice(&frag.to_be_bytes());
                ip.extend_from_slice(&[64, self.protocol, 0, 0]);
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                ip.extend_from_slice(&opts);
                let sum = checksum(&ip, 0);
                ip[10..12].copy_from_slice(&sum.to_be_bytes());
                frame.extend_from_slice(&ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                frame.extend_from_slice(&0x86DDu16.to_be_bytes());
                let ext = self.ipv6_ext_bytes();
                let payload_len = self.ip_len.unwrap_or((ext.len() + udp.len()) as u16);
                let first_next = match self.ipv6_ext.first() {
                    Some(h) => ext_proto(*h),
                    None => self.protocol,
                };
                frame.extend_from_slice(&[0x60, 0, 0, 0]);
                frame.extend_from_slice(&payload_len.to_be_bytes());
                frame.extend_from_slice(&[first_next, 64]);
                frame.extend_from_slice(&s.octets());
                frame.extend_from_slice(&d.octets());
                frame.extend_from_slice(&ext);
            }
            _ => panic!("source and destination must be the same IP version"),
        }
        frame.extend_from_slice(&udp);
        frame
    }

    fn ipv6_ext_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, h) in self.ipv6_ext.iter().enumerate() {
            let next = match self.ipv6_ext.get(i + 1) {
                Some(n) => ext_proto(*n),
                None => self.protocol,
            };
            match h {
                ExtHeader::HopByHop | ExtHeader::DestOpts => {
                    // 8 bytes: next, len 0, PadN option of 4 bytes of padding.
                    out.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
                }
                ExtHeader::Routing => {
                    // Type 0 is deprecated; use segments left 0 of a type-2-like header.
                    out.extend_from_slice(&[next, 0, 2, 0, 0, 0, 0, 0]);
                }
                ExtHeader::Fragment(off, mf) => {
                    let field = (off << 3) | u16::from(*mf);
                    out.extend_from_slice(&[next, 0]);
                    out.extend_from_slice(&field.to_be_bytes());
                    out.extend_from_slice(&[0, 0, 0, 1]);
                }
                ExtHeader::LongDestOpts(n) => {
                    let total = (usize::from(*n) + 1) * 8;
                    out.extend_from_slice(&[next, *n, 1, (total - 4) as u8]);
                    out.extend(std::iter::repeat_n(0, total - 4));
                }
                ExtHeader::Ah => {
                    // Payload Len: 24 bytes in 4-octet units, minus 2.
                    out.extend_from_slice(&[next, 4, 0, 0, 0, 0, 0x10, 0x01, 0, 0, 0, 7]);
                    out.extend_from_slice(&[0xa5; 12]);
                }
            }
        }
        out
    }
}

fn ext_proto(h: ExtHeader) -> u8 {
    match h {
        ExtHeader::HopByHop => 0,
        ExtHeader::DestOpts => 60,
        ExtHeader::Routing => 43,
        ExtHeader::Fragment(..) => 44,
        ExtHeader::LongDestOpts(_) => 60,
        ExtHeader::Ah => 51,
    }
}

/// The Internet checksum (RFC 1071) of `data`, starting from `sum`.
pub fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn udp_checksum(src: IpAddr, dst: IpAddr, udp: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 17]);
            pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&(udp.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 17]);
        }
        _ => return 0,
    }
    pseudo.extend_from_slice(udp);
    match checksum(&pseudo, 0) {
        0 => 0xffff, // RFC 768: a computed zero is sent as all ones
        s => s,
    }
}

/// A frame that is not IP at all: an ARP request.
pub fn arp_request() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&DEV_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&DEV_MAC);
    f.extend_from_slice(&[10, 77, 0, 1, 0, 0, 0, 0, 0, 0, 10, 77, 0, 2]);
    f
}

/// An IPv4 TCP SYN to `port` (the CoAP port included: TCP is not CoAP over UDP).
pub fn tcp_syn(src: [u8; 4], dst: [u8; 4], port: u16) -> Vec<u8> {
    let mut f = UdpFrame::new(src.into(), dst.into(), 40000, port, vec![0; 12]);
    f.protocol = 6;
    f.build()
}

/// An ICMPv4 echo request carried in an IPv4 header.
pub fn icmp_echo(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut f = UdpFrame::new(src.into(), dst.into(), 0x0800, 0, vec![0; 8]);
    f.protocol = 1;
    f.build()
}
