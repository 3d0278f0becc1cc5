//! Ethernet frames for the fast path's tests and fuzzing: valid CoAP of
//! every kind on every encapsulation the program walks, and broken framing.

use std::net::IpAddr;

use crate::packet::{self, coap, coap_post, ExtHeader, UdpFrame};
use crate::Rng;

const SOURCES: &[&str] = &[
    "10.0.0.1",
    "10.0.0.200",
    "10.0.0.7",
    "10.0.1.5",
    "10.0.3.9",
    "192.0.2.1",
    "fd00:1::1",
    "fd00:1::8000:0:0:1",
    "fd00:1::7",
    "fd00:2::5",
    "fd00:3::9",
    "2001:db8::1",
];

fn dst_for(src: IpAddr) -> IpAddr {
    match src {
        IpAddr::V4(_) => "10.0.0.254".parse().unwrap(),
        IpAddr::V6(_) => "fd00:1::fffe".parse().unwrap(),
    }
}

/// CoAP messages: valid ones of every type and code class, then each of the
/// header errors the fast path must catch.
fn messages() -> Vec<Vec<u8>> {
    let token: Vec<u8> = (1..=8).collect();
    let mut m = vec![
        coap_post(1, b"21.5"),
        coap(
            1,
            0x03,
            2,
            &token[..4],
            &[0xb4, b't', b'e', b'm', b'p'],
            b"{\"v\":1}",
        ),
        coap(0, 0x01, 3, &[], &[], b""),
        coap(2, 0x44, 4, &token[..2], &[], b""),
        coap(3, 0x00, 5, &[], &[], b""),
        coap(0, 0x00, 6, &[], &[], b""),
        coap(1, 0xa0, 7, &token, &[], b"oops"),
        coap(0, 0x84, 8, &token[..1], &[], b""),
        coap(0, 0x02, 9, &token, &[], &[0x55; 300]),
    ];
    for tkl in 0..=8 {
        m.push(coap(0, 0x01, 100 + tkl as u16, &token[..tkl], &[], b""));
    }
    // Header errors.
    let mut bad_version = coap_post(10, b"x");
    bad_version[0] = (bad_version[0] & 0x3f) | 0x80;
    m.push(bad_version);
    for tkl in 9..=15u8 {
        let mut t = coap(0, 0x02, 11, &token, &[], b"x");
        t[0] = (t[0] & 0xf0) | tkl;
        m.push(t);
    }
    for class in [1u8, 3, 6, 7] {
        m.push(coap(0, class << 5 | 1, 12, &[], &[], b""));
    }
    m.push(coap(0, 0x00, 13, &[0xaa], &[], b""));
    m.push(coap(0, 0x00, 14, &[], &[], b"x"));
    let mut truncated = coap(0, 0x01, 15, &token, &[], b"");
    truncated.truncate(7);
    m.push(truncated);
    m.push(vec![0x40, 0x01]);
    m.push(vec![]);
    m
}

/// The CoAPS port of the differential test's configs (`listen_dtls`).
pub const COAPS_PORT: u16 = 5690;

/// A DTLS record (RFC 6347 section 4.1).
fn dtls_record(content_type: u8, version: u16, epoch: u16, fragment: &[u8]) -> Vec<u8> {
    let mut r = vec![content_type];
    r.extend_from_slice(&version.to_be_bytes());
    r.extend_from_slice(&epoch.to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0, 0, 7]);
    r.extend_from_slice(&(fragment.len() as u16).to_be_bytes());
    r.extend_from_slice(fragment);
    r
}

/// DTLS datagrams: ClientHellos (record versions 1.0 and 1.2), application
/// data, a flight of several records, a tls12_cid record, and each record
/// error the fast path must catch.
fn dtls_datagrams() -> Vec<Vec<u8>> {
    let hello: Vec<u8> = [
        &[1u8, 0, 0, 0x30, 0, 0, 0, 0, 0, 0, 0, 0x30, 0xfe, 0xfd][..],
        &[0x11; 48],
    ]
    .concat();
    let mut d = vec![
        dtls_record(22, 0xfeff, 0, &hello),
        dtls_record(22, 0xfefd, 0, &hello),
        // A HelloVerifyRequest (type 3) as servers send it, in 1.0.
        dtls_record(
            22,
            0xfeff,
            0,
            &[3, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 3, 0xfe, 0xff, 0],
        ),
        dtls_record(23, 0xfefd, 1, &[0x42; 64]),
        [
            dtls_record(22, 0xfefd, 0, &[2; 40]),
            dtls_record(20, 0xfefd, 0, &[1]),
            dtls_record(22, 0xfefd, 1, &[0x33; 40]),
        ]
        .concat(),
        dtls_record(21, 0xfefd, 1, &[0x44; 26]),
        dtls_record(25, 0xfefd, 1, &[0x66; 30]),
        // Errors: 1.0 outside the hello exchange (a ServerHello, application
        // data), not DTLS at all, unknown types,
        // lengths over and under the datagram, too many records, empty.
        dtls_record(23, 0xfeff, 1, &[0; 16]),
        dtls_record(22, 0xfeff, 0, &[2; 40]),
        dtls_record(22, 0x0303, 0, &hello),
        dtls_record(24, 0xfefd, 1, &[0; 8]),
        dtls_record(26, 0xfefd, 1, &[0; 8]),
        (0..9)
            .flat_map(|_| dtls_record(23, 0xfefd, 1, &[1]))
            .collect(),
        vec![],
    ];
    let mut over = dtls_record(23, 0xfefd, 1, &[0; 16]);
    over[12] = 17;
    d.push(over);
    let mut under = dtls_record(23, 0xfefd, 1, &[0; 16]);
    under[12] = 15;
    d.push(under);
    d.push(dtls_record(23, 0xfefd, 1, &[])[..10].to_vec());
    d
}

/// Ways of carrying the datagram: plain, VLAN, Q-in-Q, IPv4 options, IPv6
/// extension headers (of the minimum and longer lengths, AH among them).
fn encapsulations(frame: &UdpFrame) -> Vec<UdpFrame> {
    let mut out = vec![frame.clone()];
    let mut vlan = frame.clone();
    vlan.vlans = vec![(0x8100, 42)];
    out.push(vlan);
    let mut qinq = frame.clone();
    qinq.vlans = vec![(0x88a8, 7), (0x8100, 42)];
    out.push(qinq);
    match frame.src {
        IpAddr::V4(_) => {
            let mut opts = frame.clone();
            opts.ipv4_options = vec![0x94, 0x04, 0, 0]; // Router Alert
            out.push(opts);
        }
        IpAddr::V6(_) => {
            for chain in [
                vec![ExtHeader::HopByHop],
                vec![ExtHeader::HopByHop, ExtHeader::Routing, ExtHeader::DestOpts],
                vec![ExtHeader::Fragment(0, false)], // atomic fragment, RFC 6946
                vec![ExtHeader::Ah],
                vec![
                    ExtHeader::HopByHop,
                    ExtHeader::LongDestOpts(3),
                    ExtHeader::Ah,
                ],
                vec![ExtHeader::LongDestOpts(31)],
            ] {
                let mut ext = frame.clone();
                ext.ipv6_ext = chain;
                out.push(ext);
            }
        }
    }
    out
}

/// Frames whose IP or UDP framing is wrong or unusual.
fn framing_cases(src: IpAddr) -> Vec<Vec<u8>> {
    let dst = dst_for(src);
    let base = UdpFrame::new(src, dst, 40000, 5683, coap_post(20, b"x"));
    let mut out = Vec::new();
    let mut other_port = base.clone();
    other_port.dst_port = 9999;
    out.push(other_port.build());
    for delta in [-9i32, -1, 1, 100] {
        let mut f = base.clone();
        f.udp_len = Some((8 + f.payload.len() as i32 + delta).max(0) as u16);
        out.push(f.build());
        let mut f = base.clone();
        let natural = match src {
            IpAddr::V4(_) => 28 + f.payload.len() as i32,
            IpAddr::V6(_) => 8 + f.payload.len() as i32,
        };
        f.ip_len = Some((natural + delta).max(0) as u16);
        out.push(f.build());
    }
    let mut zero = base.clone();
    zero.ip_len = Some(0); // an IPv6 jumbogram's marker; IPv4: shorter than its header
    out.push(zero.build());
    match src {
        IpAddr::V4(_) => {
            // AH in IPv4 (RFC 4302): not UDP as far as IPv4 says.
            let mut ah = base.clone();
            ah.protocol = 51;
            out.push(ah.build());
            for frag in [(0, true), (1, false), (185, true)] {
                let mut f = base.clone();
                f.ipv4_fragment = frag;
                out.push(f.build());
                f.dst_port = 9999;
                out.push(f.build());
            }
        }
        IpAddr::V6(_) => {
            for frag in [ExtHeader::Fragment(0, true), ExtHeader::Fragment(1, false)] {
                let mut f = base.clone();
                f.ipv6_ext = vec![ExtHeader::HopByHop, frag];
                out.push(f.build());
            }
            // Longer chains than the program walks, and exactly as long.
            for n in [8, 9, 12] {
                let mut f = base.clone();
                f.ipv6_ext = vec![ExtHeader::DestOpts; n];
                out.push(f.build());
                f.ipv6_ext = vec![ExtHeader::LongDestOpts(2); n - 1];
                f.ipv6_ext.push(ExtHeader::Ah);
                out.push(f.build());
            }
            let mut tcp = base.clone();
            tcp.protocol = 6;
            out.push(tcp.build());
            let mut icmp6 = base.clone();
            icmp6.protocol = 58;
            out.push(icmp6.build());
        }
    }
    let mut three_tags = base.clone();
    three_tags.vlans = vec![(0x88a8, 1), (0x8100, 2), (0x8100, 3)];
    out.push(three_tags.build());
    out
}

/// The differential test's frames (about 63,000): every message on every
/// encapsulation from every source, with Ethernet padding and FCS, every
/// truncation of a sample, and random mutations. The sources fall inside
/// and outside the test's allowed, nested, denied and metered prefixes.
pub fn corpus() -> Vec<Vec<u8>> {
    let mut rng = Rng::new(0x6d32_6d72);
    let mut valid = Vec::new();
    let mut frames = vec![
        packet::arp_request(),
        packet::tcp_syn([10, 0, 0, 1], [10, 0, 0, 254], 5683),
        packet::icmp_echo([10, 0, 0, 1], [10, 0, 0, 254]),
    ];
    for src in SOURCES {
        let src: IpAddr = src.parse().unwrap();
        frames.extend(framing_cases(src));
        // DTLS on the CoAPS port, and on a CoAP port (where it is no CoAP);
        // CoAP on the CoAPS port.
        let crossed = dtls_datagrams()
            .into_iter()
            .map(|d| (d, COAPS_PORT))
            .chain(dtls_datagrams().into_iter().take(3).map(|d| (d, 5683)))
            .chain(messages().into_iter().take(3).map(|m| (m, COAPS_PORT)));
        for (i, (datagram, port)) in crossed.enumerate() {
            let base = UdpFrame::new(src, dst_for(src), 41000 + i as u16, port, datagram);
            for f in encapsulations(&base) {
                valid.push(f.build());
            }
        }
        for (i, msg) in messages().into_iter().enumerate() {
            let port = [5683, 5684][i % 2];
            let base = UdpFrame::new(src, dst_for(src), 40000 + i as u16, port, msg);
            for (k, f) in encapsulations(&base).iter().enumerate() {
                let frame = f.build();
                // Ethernet pads frames to 60 bytes (RFC 894), and some
                // NICs leave the 4-byte FCS on: bytes after the datagram.
                if frame.len() < 60 {
                    let mut padded = frame.clone();
                    padded.resize(60, 0);
                    valid.push(padded);
                }
                if k % 3 == 0 {
                    let mut fcs = frame.clone();
                    fcs.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
                    valid.push(fcs);
                }
                valid.push(frame);
            }
        }
    }
    // Every truncation (down to the 14 bytes BPF_PROG_TEST_RUN requires of an
    // XDP frame) of a sample of the frames above.
    for (i, f) in valid.iter().enumerate() {
        if i % 9 == 0 {
            frames.extend((14..f.len()).map(|len| f[..len].to_vec()));
        }
    }
    // Random mutations: 1 to 4 bytes changed anywhere in the frame.
    for f in &valid {
        for _ in 0..6 {
            let mut m = f.clone();
            for _ in 0..=rng.below(4) {
                let at = rng.below(m.len());
                m[at] = rng.next_u64() as u8;
            }
            frames.push(m);
        }
    }
    frames.extend(valid);
    frames
}
