//! DESIGN.md invariant 6: the XDP program's verdict for a frame equals the
//! reference classifier's (`router_common::classify`), reason and peer
//! included. The kernel side runs through BPF_PROG_TEST_RUN; its reason and
//! peer are read back from the verdict and per-peer counters, which the
//! program bumps for every packet (so the counters are tested as well).
//!
//! Privileged: needs root to load the program.

use std::collections::BTreeMap;
use std::net::IpAddr;

use m2m_router::config::Config;
use m2m_router::fastpath::{Fastpath, PolicyTables};
use m2m_router_tests::packet::{self, coap, coap_post, ExtHeader, UdpFrame};
use m2m_router_tests::{require_root, Rng};
use router_common::classify::{classify, Verdict};
use router_common::reason::{Action, Reason};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// Peers chosen to exercise longest-prefix match: a /24, a nested /25, a
/// denied host inside the /24, a denied /24. Rates are unlimited here: the
/// rate limiter is stateful and has its own tests.
fn config(unknown_peers: &str) -> Config {
    Config::parse(&format!(
        r#"
        [coap]
        listen = ["0.0.0.0:5683", "[::]:5684"]
        [defaults]
        unknown_peers = "{unknown_peers}"
        rate = "unlimited"
        [[peer]]
        name = "allowed"
        prefix = ["10.0.0.0/24", "fd00:1::/64"]
        rate = "unlimited"
        [[peer]]
        name = "nested"
        prefix = ["10.0.0.128/25", "fd00:1:0:0:8000::/65"]
        rate = "unlimited"
        [[peer]]
        name = "denied-host"
        prefix = ["10.0.0.7/32", "fd00:1::7/128"]
        deny = true
        [[peer]]
        name = "denied"
        prefix = ["10.0.1.0/24", "fd00:2::/64"]
        deny = true
        "#
    ))
    .expect("test config is valid")
}

const SOURCES: &[&str] = &[
    "10.0.0.1",
    "10.0.0.200",
    "10.0.0.7",
    "10.0.1.5",
    "192.0.2.1",
    "fd00:1::1",
    "fd00:1::8000:0:0:1",
    "fd00:1::7",
    "fd00:2::5",
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

/// Ways of carrying the datagram: plain, VLAN, Q-in-Q, IPv4 options, IPv6
/// extension headers.
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

fn corpus() -> Vec<Vec<u8>> {
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
        for (i, msg) in messages().into_iter().enumerate() {
            let port = [5683, 5684][i % 2];
            let base = UdpFrame::new(src, dst_for(src), 40000 + i as u16, port, msg);
            for f in encapsulations(&base) {
                valid.push(f.build());
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

/// Counter snapshot: packets per reason and per peer id.
fn snapshot(fp: &Fastpath, peers: u32) -> (Vec<u64>, Vec<u64>) {
    let reasons = fp
        .verdicts()
        .unwrap()
        .values()
        .map(|(_, c)| c.packets)
        .collect();
    let peers = (0..peers)
        .map(|id| {
            let c = fp.peer_counters(id).unwrap();
            c.accepted.packets + c.dropped.packets
        })
        .collect();
    (reasons, peers)
}

/// `live`: load with no peers, then apply the test policy as a live change,
/// so the program reads the second copy of the tables (maps::ACTIVE_TABLES).
fn differential(unknown_peers: &str, live: bool) {
    require_root();
    let (tables, fp) = if live {
        let empty = Config::parse("[coap]\nlisten = [\"0.0.0.0:5683\", \"[::]:5684\"]").unwrap();
        let empty = PolicyTables::from_config(&empty).unwrap();
        let mut fp = Fastpath::load(empty.clone()).expect("load the XDP program");
        let tables = PolicyTables::build(&config(unknown_peers), Some(&empty)).unwrap();
        fp.apply(tables.clone()).expect("apply the policy live");
        (tables, fp)
    } else {
        let tables = PolicyTables::from_config(&config(unknown_peers)).unwrap();
        let fp = Fastpath::load(tables.clone()).expect("load the XDP program");
        (tables, fp)
    };
    let peers = tables.peer_names.len() as u32;
    let frames = corpus();
    assert!(frames.len() >= 10_000, "corpus too small: {}", frames.len());

    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut mismatches = Vec::new();
    let mut before = snapshot(&fp, peers);
    for frame in &frames {
        let expected: Verdict = classify(frame, &tables, |_, _| true);
        let run = fp.test_run(frame, 1).expect("BPF_PROG_TEST_RUN");
        let after = snapshot(&fp, peers);
        let moved_reasons: Vec<Reason> = Reason::ALL
            .iter()
            .copied()
            .filter(|r| after.0[*r as usize] != before.0[*r as usize])
            .collect();
        let moved_peers: Vec<u32> = (0..peers)
            .filter(|&id| after.1[id as usize] != before.1[id as usize])
            .collect();
        let expected_ret = match expected.reason.action() {
            Action::Pass => XDP_PASS,
            Action::Drop => XDP_DROP,
        };
        let expected_peers: Vec<u32> = expected.peer_id.into_iter().collect();
        if run.return_value != expected_ret
            || moved_reasons != [expected.reason]
            || moved_peers != expected_peers
        {
            mismatches.push(format!(
                "reference {:?} / kernel returned {} counted {:?} peers {:?}\n  frame {}",
                expected,
                run.return_value,
                moved_reasons,
                moved_peers,
                hex(frame)
            ));
        }
        *seen.entry(expected.reason.label()).or_default() += 1;
        before = after;
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} frames disagree; first ones:\n{}",
        mismatches.len(),
        frames.len(),
        mismatches[..mismatches.len().min(10)].join("\n")
    );
    // The corpus must reach every verdict but the stateful rate limit (and the
    // unknown-peer drop, which only the "drop" config can reach).
    for reason in Reason::ALL {
        let reachable = match reason {
            Reason::DropRateLimited => false,
            Reason::DropUnknownPeer => unknown_peers == "drop",
            _ => true,
        };
        assert_eq!(
            seen.contains_key(reason.label()),
            reachable,
            "coverage of {} ({seen:?})",
            reason.label()
        );
    }
    eprintln!("{} frames agree; verdicts: {seen:?}", frames.len());
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn kernel_agrees_with_reference_unknown_allowed() {
    differential("allow", false);
}

#[test]
fn kernel_agrees_with_reference_unknown_dropped_after_a_live_apply() {
    differential("drop", true);
}
