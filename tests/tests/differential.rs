//! The fast path's first promise: the XDP program's verdict for a frame
//! equals the reference classifier's (`router_common::classify`), reason
//! and peer included. The kernel side runs through
//! BPF_PROG_TEST_RUN; its reason and peer are read back from the verdict and
//! per-peer counters (accepted and dropped apart), which the program bumps
//! for every packet, so the counters are tested as well.
//!
//! The policy changes under the corpus: four configurations in turn, the
//! first loaded, the others applied live (so both copies of the tables are
//! read): nested allow/deny prefixes, /0, peers removed and their ids given
//! to new ones, rate-limited peers and unknown sources.
//!
//! The rate limiter is compared under a clock both sides agree on: every
//! limited policy here refills one packet an hour, so during the test a
//! bucket admits exactly its burst and then nothing, whatever the machine's
//! speed. The reference counts admissions per bucket.
//!
//! Privileged: needs root to load the program.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use m2m_router::config::Config;
use m2m_router::fastpath::{Fastpath, PolicyTables};
use m2m_router_tests::packet::{self, coap, coap_post, ExtHeader, UdpFrame};
use m2m_router_tests::{require_root, Rng};
use router_common::classify::{classify, RateKey, Verdict};
use router_common::maps::PeerPolicy;
use router_common::reason::{Action, Reason};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// One packet an hour: the refill of every rate-limited policy here.
const HOUR_NS: u64 = 3_600 * 1_000_000_000;

fn peer(name: &str, prefixes: &[&str], extra: &str) -> String {
    let list: Vec<String> = prefixes.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "[[peer]]\nname = \"{name}\"\nprefix = [{}]\n{extra}\n",
        list.join(", ")
    )
}

/// The configurations, in the order they are applied. Prefixes nest for
/// longest-prefix match: a /24 with a nested /25 and a denied host, a
/// denied /24, a rate-limited /24; later /0 and ::/0.
fn configs() -> Vec<Config> {
    let head = |unknown: &str, rate: &str| {
        format!(
            "[coap]\nlisten = [\"0.0.0.0:5683\", \"[::]:5684\"]\n\
             [defaults]\nunknown_peers = \"{unknown}\"\nrate = \"{rate}\"\nburst = 2\n"
        )
    };
    let allowed = peer(
        "allowed",
        &["10.0.0.0/24", "fd00:1::/64"],
        "rate = \"unlimited\"",
    );
    let nested = |name: &str| {
        peer(
            name,
            &["10.0.0.128/25", "fd00:1:0:0:8000::/65"],
            "rate = \"unlimited\"",
        )
    };
    let denied_host = peer(
        "denied-host",
        &["10.0.0.7/32", "fd00:1::7/128"],
        "deny = true",
    );
    let denied = peer("denied", &["10.0.1.0/24", "fd00:2::/64"], "deny = true");
    let metered = |rate: &str, burst: u32| {
        peer(
            "metered",
            &["10.0.3.0/24", "fd00:3::/64"],
            &format!("rate = \"{rate}\"\nburst = {burst}"),
        )
    };
    let first = format!(
        "{}{allowed}{}{denied_host}{denied}{}",
        head("allow", "1/s"),
        nested("nested"),
        metered("1/s", 3)
    );
    let texts = [
        first.clone(),
        // Nested peers removed, their ids free for "late"; everything
        // else in IPv4 denied by /0; the metered burst raised.
        format!(
            "{}{allowed}{denied}{}{}{}",
            head("drop", "unlimited"),
            metered("1/s", 5),
            nested("late"),
            peer("all-v4", &["0.0.0.0/0"], "deny = true")
        ),
        // /0 gone, the nested peers back under new ids, metered unlimited,
        // all of IPv6 one rate-limited peer.
        format!(
            "{}{allowed}{}{denied_host}{denied}{}{}",
            head("allow", "unlimited"),
            nested("nested"),
            metered("unlimited", 1),
            peer("all-v6", &["::/0"], "rate = \"1/s\"\nburst = 1")
        ),
        first,
    ];
    texts
        .iter()
        .map(|t| Config::parse(t).expect("test config is valid"))
        .collect()
}

/// `tables` with every limited policy's refill slowed to one packet an
/// hour, its burst kept.
fn hourly(mut tables: PolicyTables) -> PolicyTables {
    let slow = |p: &mut PeerPolicy| {
        // Unlimited (interval 0) stays unlimited.
        if let Some(extra) = p.burst_ns.checked_div(p.interval_ns) {
            p.interval_ns = HOUR_NS;
            p.burst_ns = extra * HOUR_NS;
        }
    };
    slow(&mut tables.default_policy);
    for (_, p) in &mut tables.prefixes {
        slow(p);
    }
    tables
}

/// The reference rate limiter under the hourly clock: a bucket admits
/// `burst` packets, then none.
#[derive(Default)]
struct Buckets(HashMap<RateKey, u64>);

impl Buckets {
    fn admit(&mut self, key: RateKey, policy: &PeerPolicy) -> bool {
        let Some(extra) = policy.burst_ns.checked_div(policy.interval_ns) else {
            return true; // unlimited: the state is not touched
        };
        let burst = extra + 1;
        let admitted = self.0.entry(key).or_default();
        *admitted < burst && {
            *admitted += 1;
            true
        }
    }

    /// A peer id given to another peer starts with a full bucket (README:
    /// a peer that comes back "starts with fresh counters and a full
    /// bucket").
    fn reassigned(&mut self, old: &PolicyTables, new: &PolicyTables) {
        for (id, name) in new.peer_names.iter().enumerate().skip(1) {
            if !name.is_empty() && old.peer_names.get(id) != Some(name) {
                self.0.remove(&RateKey::Peer(id as u32));
            }
        }
    }
}

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

/// Counter snapshot: packets per reason, and (accepted, dropped) packets
/// per peer id.
fn snapshot(fp: &Fastpath, peers: u32) -> (Vec<u64>, Vec<(u64, u64)>) {
    let reasons = fp
        .verdicts()
        .unwrap()
        .values()
        .map(|(_, c)| c.packets)
        .collect();
    let peers = (0..peers)
        .map(|id| {
            let c = fp.peer_counters(id).unwrap();
            (c.accepted.packets, c.dropped.packets)
        })
        .collect();
    (reasons, peers)
}

/// Runs every frame through the kernel and the reference under `tables`;
/// returns the mismatches, and counts each verdict in `seen`.
fn compare(
    fp: &Fastpath,
    tables: &PolicyTables,
    buckets: &mut Buckets,
    frames: &[Vec<u8>],
    seen: &mut BTreeMap<&'static str, usize>,
) -> Vec<String> {
    let peers = tables.peer_names.len() as u32;
    let mut mismatches = Vec::new();
    let mut before = snapshot(fp, peers);
    for frame in frames {
        let expected: Verdict = classify(frame, tables, |key, policy| buckets.admit(key, policy));
        let run = fp.test_run(frame, 1).expect("BPF_PROG_TEST_RUN");
        let after = snapshot(fp, peers);
        let moved_reasons: Vec<Reason> = Reason::ALL
            .iter()
            .copied()
            .filter(|r| after.0[*r as usize] != before.0[*r as usize])
            .collect();
        // (peer, accepted?) for each peer counter that moved.
        let moved_peers: Vec<(u32, bool)> = (0..peers)
            .flat_map(|id| {
                let (a, b) = (after.1[id as usize], before.1[id as usize]);
                [(id, true, a.0 != b.0), (id, false, a.1 != b.1)]
            })
            .filter(|&(_, _, moved)| moved)
            .map(|(id, accepted, _)| (id, accepted))
            .collect();
        let expected_ret = match expected.reason.action() {
            Action::Pass => XDP_PASS,
            Action::Drop => XDP_DROP,
        };
        let expected_peers: Vec<(u32, bool)> = expected
            .peer_id
            .map(|id| (id, expected.reason == Reason::Accept))
            .into_iter()
            .collect();
        if run.return_value != expected_ret
            || moved_reasons != [expected.reason]
            || moved_peers != expected_peers
        {
            mismatches.push(format!(
                "reference {:?} / kernel returned {} counted {:?} peers (id, accepted) {:?}\n  frame {}",
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
    mismatches
}

/// Loads the first configuration, applies the others live in turn, and
/// compares the whole corpus under each.
#[test]
fn kernel_agrees_with_reference_across_live_changes() {
    require_root();
    let frames = corpus();
    assert!(frames.len() >= 10_000, "corpus too small: {}", frames.len());
    let configs = configs();
    let mut tables = hourly(PolicyTables::from_config(&configs[0]).unwrap());
    let mut fp = Fastpath::load(tables.clone()).expect("load the XDP program");
    let mut buckets = Buckets::default();
    let mut seen_everywhere: BTreeMap<&str, usize> = BTreeMap::new();
    for (step, config) in configs.iter().enumerate() {
        if step > 0 {
            let next = hourly(PolicyTables::build(config, Some(&tables)).unwrap());
            fp.apply(next.clone()).expect("apply the policy live");
            buckets.reassigned(&tables, &next);
            tables = next;
        }
        let mut seen = BTreeMap::new();
        let mismatches = compare(&fp, &tables, &mut buckets, &frames, &mut seen);
        assert!(
            mismatches.is_empty(),
            "configuration {step}: {} of {} frames disagree; first ones:\n{}",
            mismatches.len(),
            frames.len(),
            mismatches[..mismatches.len().min(10)].join("\n")
        );
        eprintln!(
            "configuration {step}: {} frames agree; verdicts: {seen:?}",
            frames.len()
        );
        assert!(
            seen.contains_key(Reason::DropRateLimited.label()),
            "configuration {step} never reached its rate limits: {seen:?}"
        );
        for (reason, n) in seen {
            *seen_everywhere.entry(reason).or_default() += n;
        }
    }
    for reason in Reason::ALL {
        assert!(
            seen_everywhere.contains_key(reason.label()),
            "no frame reached {} ({seen_everywhere:?})",
            reason.label()
        );
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
