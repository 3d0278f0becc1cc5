//! The fast path on a real wire: a device namespace and a gateway namespace
//! joined by a veth pair, XDP on the gateway's end, in native and in generic
//! mode. Each test owns its namespaces (removed on drop).
//!
//! No test takes silence as proof: a test waits (with a generous deadline)
//! until the XDP verdict counters have seen every packet it sent, then reads
//! exactly the datagrams the `accept` verdicts let through; a packet that
//! did not arrive is one a drop verdict counted.
//!
//! Privileged: needs root.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use m2m_router::config::{Config, XdpMode};
use m2m_router::fastpath::{AttachedMode, Fastpath, PolicyTables};
use m2m_router_tests::netns::{
    receive, wait_for, Topology, DEADLINE, DEV_V4, DEV_V6, GW_IF, GW_V4, GW_V6,
};
use m2m_router_tests::packet::{coap, coap_post, UdpFrame};
use m2m_router_tests::require_root;
use router_common::reason::Reason;

const METER: usize = 0; // allowed peer "meter" (id 1)
const BANNED: usize = 1; // denied peer "banned" (id 2)
const UNKNOWN: usize = 2; // no peer covers it
const SLOW: usize = 3; // peer "slow" (id 3), 50/s burst 5

fn config(unknown_peers: &str) -> Config {
    Config::parse(&format!(
        r#"
        [defaults]
        unknown_peers = "{unknown_peers}"
        rate = "unlimited"
        [[peer]]
        name = "meter"
        prefix = ["{}/32", "{}/128"]
        rate = "unlimited"
        [[peer]]
        name = "banned"
        prefix = ["{}/32", "{}/128"]
        deny = true
        [[peer]]
        name = "slow"
        prefix = ["{}/32", "{}/128"]
        rate = "50/s"
        burst = 5
        "#,
        DEV_V4[METER], DEV_V6[METER], DEV_V4[BANNED], DEV_V6[BANNED], DEV_V4[SLOW], DEV_V6[SLOW]
    ))
    .unwrap()
}

struct Gateway {
    topo: Topology,
    fp: Fastpath,
    coap_v4: UdpSocket,
    coap_v6: UdpSocket,
}

impl Gateway {
    fn start(tag: &str, mode: XdpMode, unknown_peers: &str) -> Gateway {
        require_root();
        let topo = Topology::new(tag);
        let mut fp = Fastpath::load(PolicyTables::from_config(&config(unknown_peers)).unwrap())
            .expect("load XDP");
        let got = topo.gw.run(|| fp.attach(GW_IF, mode)).expect("attach XDP");
        let want = match mode {
            XdpMode::Native => AttachedMode::Native,
            _ => AttachedMode::Generic,
        };
        assert_eq!(got, (want, false), "attach mode, installed (not adopted)");
        let coap_v4 = topo.gateway_socket(SocketAddr::new(GW_V4.into(), 5683));
        let coap_v6 = topo.gateway_socket(SocketAddr::new(GW_V6.into(), 5683));
        Gateway {
            topo,
            fp,
            coap_v4,
            coap_v6,
        }
    }

    fn count(&self, reason: Reason) -> u64 {
        self.fp.verdicts().unwrap()[&(reason as u32)].1.packets
    }

    /// Waits until `reason` has counted `n` packets, and checks it counted
    /// no more.
    fn expect_count(&self, reason: Reason, n: u64) {
        wait_for(DEADLINE, || self.count(reason) >= n);
        assert_eq!(self.count(reason), n, "{}", reason.label());
    }

    /// Sends each payload from device address `who` (v4 or v6) to `port`.
    fn send(&self, who: usize, v6: bool, port: u16, payloads: &[Vec<u8>]) {
        let (src, dst): (IpAddr, IpAddr) = if v6 {
            (DEV_V6[who].into(), GW_V6.into())
        } else {
            (DEV_V4[who].into(), GW_V4.into())
        };
        let sock = self.topo.device_socket(src);
        for p in payloads {
            sock.send_to(p, SocketAddr::new(dst, port)).unwrap();
        }
    }

    /// Reads the `n` datagrams the CoAP sockets must have received.
    fn expect_delivered(&self, n: usize) {
        receive(&[&self.coap_v4, &self.coap_v6], n);
    }
}

fn posts(n: u16) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| coap_post(i, format!("{i}").as_bytes()))
        .collect()
}

fn allowed_peer_reaches_the_gateway_socket(mode: XdpMode) {
    let gw = Gateway::start("allow", mode, "allow");
    gw.send(METER, false, 5683, &posts(20));
    gw.send(METER, true, 5683, &posts(20));
    gw.send(UNKNOWN, false, 5683, &posts(5));
    gw.expect_count(Reason::Accept, 45);
    gw.expect_delivered(45);
    let meter = gw.fp.peer_counters(1).unwrap();
    assert_eq!(meter.accepted.packets, 40);
    assert_eq!(meter.dropped.packets, 0);
    assert!(meter.accepted.bytes > 40 * 50, "bytes are whole frames");
    assert_eq!(
        gw.fp.peer_counters(0).unwrap().accepted.packets,
        5,
        "unknown bucket"
    );
}

fn bad_and_denied_coap_is_dropped_with_its_reason(mode: XdpMode) {
    let gw = Gateway::start("drop", mode, "allow");
    let token: Vec<u8> = (0..8).collect();
    let mut bad_version = coap_post(1, b"x");
    bad_version[0] ^= 0xc0;
    let mut long_token = coap(0, 0x02, 2, &token, &[], b"x");
    long_token[0] |= 0x0f;
    let malformed = vec![
        bad_version,
        long_token,
        coap(0, 0x21, 3, &[], &[], b""),  // class 1: reserved
        coap(0, 0x00, 4, &[], &[], b"x"), // Empty with a payload
        vec![0x40, 0x01],                 // shorter than the header
        coap(0, 0x01, 5, &token, &[], b"")[..6].to_vec(), // ends in the token
    ];
    for v6 in [false, true] {
        gw.send(METER, v6, 5683, &malformed);
        gw.send(BANNED, v6, 5683, &posts(3));
    }
    // Frames no socket sends: a UDP length that disagrees with IP's, and the
    // first fragment of a datagram to the CoAP port.
    let raw = gw.topo.raw_sender();
    let good = UdpFrame::new(
        DEV_V4[METER].into(),
        GW_V4.into(),
        40000,
        5683,
        coap_post(9, b"x"),
    );
    let mut bad_len = good.clone();
    bad_len.udp_len = Some(200);
    raw.send(&bad_len.build());
    let mut fragment = good.clone();
    fragment.ipv4_fragment = (0, true);
    raw.send(&fragment.build());
    raw.send(&good.build()); // and a good one, so we know raw frames get through

    for (reason, n) in [
        (Reason::DropBadVersion, 2),
        (Reason::DropBadTokenLength, 2),
        (Reason::DropBadCode, 2),
        (Reason::DropBadEmpty, 2),
        (Reason::DropTooShort, 2),
        (Reason::DropTruncated, 2),
        (Reason::DropDenied, 6),
        (Reason::DropBadLength, 1),
        (Reason::DropFragment, 1),
        (Reason::Accept, 1),
    ] {
        gw.expect_count(reason, n);
    }
    // Only the one good raw frame was accepted, and it is delivered.
    gw.expect_delivered(1);
    let banned = gw.fp.peer_counters(2).unwrap();
    assert_eq!((banned.accepted.packets, banned.dropped.packets), (0, 6));
}

/// The slow peer (50/s, burst 5) offers for a second in small rounds; each
/// round waits until XDP has counted it, so no packet is lost in the veth
/// ring before XDP (flow control by the event, not by a sleep).
///
/// Bounds, with T = 20 ms (1/rate): at most `burst + rate x (span of XDP's
/// offering)`; at least `(span - gaps) / T`, where each gap between rounds
/// longer than T may have let the bucket's time fall behind by at most the
/// excess (GCRA, see rate_limit.rs): a limiter that never refills (5)
/// fails it.
fn over_rate_traffic_is_dropped(mode: XdpMode) {
    const T: Duration = Duration::from_millis(20);
    let gw = Gateway::start("rate", mode, "allow");
    let seen = |gw: &Gateway| {
        let c = gw.fp.peer_counters(3).unwrap();
        c.accepted.packets + c.dropped.packets
    };
    let packets = posts(5);
    let mut rounds: Vec<(Instant, Instant)> = Vec::new(); // (sent, counted)
    let mut offered = 0;
    while rounds.len() < 2 || rounds.last().unwrap().0 - rounds[0].1 < Duration::from_secs(1) {
        let sent = Instant::now();
        gw.send(SLOW, false, 5683, &packets);
        offered += packets.len() as u64;
        assert!(
            wait_for(DEADLINE, || seen(&gw) >= offered),
            "XDP counted {} of {offered} packets",
            seen(&gw)
        );
        rounds.push((sent, Instant::now()));
        std::thread::sleep(Duration::from_millis(2)); // a gentle offered load
    }
    assert_eq!(seen(&gw), offered, "XDP saw every packet of the slow peer");
    let slow = gw.fp.peer_counters(3).unwrap();
    let accepted = slow.accepted.packets;
    // XDP handled round i somewhere in [sent_i, counted_i].
    let span_max = rounds.last().unwrap().1 - rounds[0].0;
    let span_min = rounds.last().unwrap().0 - rounds[0].1;
    let gaps: Duration = rounds
        .windows(2)
        .map(|w| (w[1].1 - w[0].0).saturating_sub(T))
        .sum();
    let most = 5 + (span_max.as_secs_f64() / T.as_secs_f64()).ceil() as u64;
    let least = (span_min.saturating_sub(gaps).as_secs_f64() / T.as_secs_f64()).floor() as u64;
    assert!(
        (least..=most).contains(&accepted),
        "accepted {accepted} of {offered} over {span_min:?}..{span_max:?} with {gaps:?} of gaps; \
         50/s, burst 5 allows {least}..={most}"
    );
    assert_eq!(slow.dropped.packets, offered - accepted);
    gw.expect_count(Reason::DropRateLimited, offered - accepted);
    gw.expect_count(Reason::Accept, accepted);
    gw.expect_delivered(accepted as usize);
}

fn non_coap_traffic_passes_untouched(mode: XdpMode) {
    let gw = Gateway::start("pass", mode, "drop");
    // UDP to another port, even from a denied peer and an unknown source.
    let other = gw.topo.gateway_socket(SocketAddr::new(GW_V4.into(), 9999));
    let other6 = gw.topo.gateway_socket(SocketAddr::new(GW_V6.into(), 9999));
    gw.send(BANNED, false, 9999, &posts(3));
    gw.send(UNKNOWN, true, 9999, &posts(3));
    receive(&[&other, &other6], 6);
    // ICMP echo both ways round.
    for (ping, target) in [("ping", GW_V4.to_string()), ("ping", GW_V6.to_string())] {
        let out = gw
            .topo
            .dev
            .command(ping)
            .args(["-c", "2", "-W", "2", &target])
            .output()
            .expect("run ping (Debian package iputils-ping)");
        assert!(
            out.status.success(),
            "ping {target}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(gw.count(Reason::PassNotCoapPort) >= 6);
    assert!(gw.count(Reason::PassNotUdp) >= 4, "ICMP counted as not UDP");
    assert_eq!(
        gw.count(Reason::DropDenied) + gw.count(Reason::DropUnknownPeer),
        0
    );
}

fn unknown_sources_are_dropped_by_policy(mode: XdpMode) {
    let gw = Gateway::start("unknown", mode, "drop");
    gw.send(UNKNOWN, false, 5683, &posts(4));
    gw.send(UNKNOWN, true, 5683, &posts(4));
    gw.send(METER, false, 5683, &posts(2));
    gw.expect_count(Reason::DropUnknownPeer, 8);
    gw.expect_count(Reason::Accept, 2);
    gw.expect_delivered(2);
    assert_eq!(gw.fp.peer_counters(0).unwrap().dropped.packets, 8);
}

fn live_policy_changes_take_effect_at_once(mode: XdpMode) {
    let mut gw = Gateway::start("live", mode, "allow");
    let apply = |gw: &mut Gateway, text: String| {
        let config = Config::parse(&text).unwrap();
        let tables = PolicyTables::build(&config, Some(gw.fp.tables())).unwrap();
        gw.fp.apply(tables).expect("apply");
    };
    let meter = |extra: &str| {
        format!(
            "[defaults]\nrate = \"unlimited\"\nunknown_peers = \"drop\"\n[[peer]]\nname = \"meter\"\nprefix = [\"{}/32\"]\n{extra}\n",
            DEV_V4[METER]
        )
    };
    gw.send(METER, false, 5683, &posts(3));
    gw.expect_count(Reason::Accept, 3);
    gw.expect_delivered(3);
    // Deny: dropped from the next packet on.
    apply(&mut gw, meter("deny = true"));
    gw.send(METER, false, 5683, &posts(3));
    gw.expect_count(Reason::DropDenied, 3);
    // Removed, unknown sources dropped.
    apply(&mut gw, "[defaults]\nunknown_peers = \"drop\"\n".to_owned());
    gw.send(METER, false, 5683, &posts(2));
    gw.expect_count(Reason::DropUnknownPeer, 2);
    gw.expect_count(Reason::Accept, 3);
    // Back, with a rate of 10/s and a burst of 2: the rate holds at once, and
    // the peer starts with fresh counters and a full bucket.
    apply(&mut gw, meter("rate = \"10/s\"\nburst = 2"));
    let id = gw.fp.tables().peer_id("meter").unwrap();
    let start = Instant::now();
    gw.send(METER, false, 5683, &posts(20));
    wait_for(DEADLINE, || {
        let c = gw.fp.peer_counters(id).unwrap();
        c.accepted.packets + c.dropped.packets >= 20
    });
    let elapsed = start.elapsed().as_secs_f64();
    let c = gw.fp.peer_counters(id).unwrap();
    assert_eq!(
        c.accepted.packets + c.dropped.packets,
        20,
        "counters start from zero: {c:?}"
    );
    // A full bucket (2), then 10/s for as long as the sending took.
    let allowed = 2 + (10.0 * elapsed).ceil() as u64;
    assert!(
        (2..=allowed).contains(&c.accepted.packets),
        "accepted {} of 20 in {elapsed:.3} s at 10/s, burst 2",
        c.accepted.packets
    );
    gw.expect_count(Reason::Accept, 3 + c.accepted.packets);
    gw.expect_delivered(c.accepted.packets as usize);
}

/// README: a live change is written into the spare copy of the tables and
/// switched in with one map update, "so no packet sees half of it". Two
/// configurations are applied in turn while frames flow:
///
/// - A: unknown sources dropped; meter allowed, banned denied, slow allowed;
/// - B: unknown sources allowed; meter and banned under new names with
///   their roles swapped; slow not a peer.
///
/// Under either, every frame from these three is accepted or denied; none
/// is an unknown source dropped. A packet that saw half a change can be:
/// slow's prefix already gone but the default still "drop", or a peer's
/// prefix removed before its replacement was written.
fn no_packet_sees_half_of_a_live_change(mode: XdpMode) {
    use std::sync::atomic::{AtomicBool, Ordering};
    const APPLIES: usize = 2000;
    let mut gw = Gateway::start("halves", mode, "drop");
    let peer = |name: &str, who: usize, extra: &str| {
        format!(
            "[[peer]]\nname = \"{name}\"\nprefix = [\"{}/32\"]\n{extra}\n",
            DEV_V4[who]
        )
    };
    let a = format!(
        "[defaults]\nrate = \"unlimited\"\nunknown_peers = \"drop\"\n{}{}{}",
        peer("meter", METER, ""),
        peer("banned", BANNED, "deny = true"),
        peer("slow", SLOW, "")
    );
    let b = format!(
        "[defaults]\nrate = \"unlimited\"\nunknown_peers = \"allow\"\n{}{}",
        peer("meter-2", BANNED, ""),
        peer("banned-2", METER, "deny = true")
    );
    let configs = [Config::parse(&a).unwrap(), Config::parse(&b).unwrap()];
    let frames: Vec<Vec<u8>> = (0..60u16)
        .map(|i| {
            let who = [METER, BANNED, SLOW][usize::from(i % 3)];
            UdpFrame::new(
                DEV_V4[who].into(),
                GW_V4.into(),
                40000 + i,
                5683,
                coap_post(i, b"x"),
            )
            .build()
        })
        .collect();
    let raw = gw.topo.raw_sender();
    let stop = AtomicBool::new(false);
    let sent = std::thread::scope(|s| {
        let sender = s.spawn(|| {
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                sent += raw.send_many(&frames) as u64;
            }
            sent
        });
        for k in 0..APPLIES {
            let tables = PolicyTables::build(&configs[k % 2], Some(gw.fp.tables())).unwrap();
            gw.fp.apply(tables).expect("apply");
        }
        stop.store(true, Ordering::Relaxed);
        sender.join().unwrap()
    });
    // A frame to another port, sent last on the one veth queue: once XDP
    // has counted it, it has counted every frame before it.
    let fence = UdpFrame::new(DEV_V4[METER].into(), GW_V4.into(), 40000, 9, vec![0]).build();
    let passed = gw.count(Reason::PassNotCoapPort);
    raw.send(&fence);
    assert!(
        wait_for(DEADLINE, || gw.count(Reason::PassNotCoapPort) > passed),
        "the fence frame was never counted"
    );
    let (accepted, denied) = (gw.count(Reason::Accept), gw.count(Reason::DropDenied));
    eprintln!("{sent} frames sent, {accepted} accepted, {denied} denied, {APPLIES} applies");
    assert!(
        accepted > 0 && denied > 0,
        "the traffic did not flow while the changes were applied"
    );
    assert_eq!(
        gw.count(Reason::DropUnknownPeer),
        0,
        "frames saw half of a change ({accepted} accepted, {denied} denied)"
    );
}

macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod native {
            $( #[test] fn $name() { super::$name(m2m_router::config::XdpMode::Native) } )*
        }
        mod generic {
            $( #[test] fn $name() { super::$name(m2m_router::config::XdpMode::Skb) } )*
        }
    };
}

in_both_modes!(
    allowed_peer_reaches_the_gateway_socket,
    bad_and_denied_coap_is_dropped_with_its_reason,
    over_rate_traffic_is_dropped,
    non_coap_traffic_passes_untouched,
    unknown_sources_are_dropped_by_policy,
    live_policy_changes_take_effect_at_once,
    no_packet_sees_half_of_a_live_change,
);
