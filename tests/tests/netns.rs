//! The fast path on a real wire: a device namespace and a gateway namespace
//! joined by a veth pair, XDP on the gateway's end, in native and in generic
//! mode. Each test owns its namespaces (removed on drop).
//!
//! Privileged: needs root.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use m2m_router::config::{Config, XdpMode};
use m2m_router::fastpath::{AttachedMode, Fastpath, PolicyTables};
use m2m_router_tests::netns::{drain, wait_for, Topology, DEV_V4, DEV_V6, GW_IF, GW_V4, GW_V6};
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
        assert_eq!(got, want, "attach mode");
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

    fn wait_count(&self, reason: Reason, at_least: u64) -> u64 {
        wait_for(Duration::from_secs(3), || self.count(reason) >= at_least);
        self.count(reason)
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

    fn received(&self) -> usize {
        drain(&self.coap_v4).len() + drain(&self.coap_v6).len()
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
    assert_eq!(gw.received(), 45, "every valid datagram is delivered");
    assert_eq!(gw.wait_count(Reason::Accept, 45), 45);
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
        assert_eq!(gw.wait_count(reason, n), n, "{}", reason.label());
    }
    assert_eq!(gw.received(), 1, "only the one good raw frame is delivered");
    let banned = gw.fp.peer_counters(2).unwrap();
    assert_eq!((banned.accepted.packets, banned.dropped.packets), (0, 6));
}

fn over_rate_traffic_is_dropped(mode: XdpMode) {
    let gw = Gateway::start("rate", mode, "allow");
    let start = Instant::now();
    // Batches well under the veth ring (256), so no packet is lost before XDP.
    for batch in posts(400).chunks(50) {
        gw.send(SLOW, false, 5683, batch);
        std::thread::sleep(Duration::from_millis(1));
    }
    let seen = |gw: &Gateway| {
        let c = gw.fp.peer_counters(3).unwrap();
        c.accepted.packets + c.dropped.packets
    };
    wait_for(Duration::from_secs(3), || seen(&gw) == 400);
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(seen(&gw), 400, "XDP saw every packet of the slow peer");
    let delivered = gw.received() as u64;
    // 5 back to back (burst), then 50/s for as long as it took.
    let allowed = 5 + (50.0 * elapsed).ceil() as u64;
    assert!(
        (5..=allowed).contains(&delivered),
        "delivered {delivered} of 400 in {elapsed:.3}s; the limit allows {allowed}"
    );
    let slow = gw.fp.peer_counters(3).unwrap();
    assert_eq!(slow.accepted.packets, delivered);
    assert_eq!(slow.dropped.packets, 400 - delivered);
    assert_eq!(gw.count(Reason::DropRateLimited), 400 - delivered);
}

fn non_coap_traffic_passes_untouched(mode: XdpMode) {
    let gw = Gateway::start("pass", mode, "drop");
    // UDP to another port, even from a denied peer and an unknown source.
    let other = gw.topo.gateway_socket(SocketAddr::new(GW_V4.into(), 9999));
    let other6 = gw.topo.gateway_socket(SocketAddr::new(GW_V6.into(), 9999));
    gw.send(BANNED, false, 9999, &posts(3));
    gw.send(UNKNOWN, true, 9999, &posts(3));
    assert_eq!(drain(&other).len() + drain(&other6).len(), 6);
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
    assert_eq!(gw.received(), 2, "only the configured peer gets through");
    assert_eq!(gw.wait_count(Reason::DropUnknownPeer, 8), 8);
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
    assert_eq!(gw.received(), 3);
    // Deny: dropped from the next packet on.
    apply(&mut gw, meter("deny = true"));
    gw.send(METER, false, 5683, &posts(3));
    assert_eq!(gw.received(), 0);
    assert_eq!(gw.wait_count(Reason::DropDenied, 3), 3);
    // Removed, unknown sources dropped.
    apply(&mut gw, "[defaults]\nunknown_peers = \"drop\"\n".to_owned());
    gw.send(METER, false, 5683, &posts(2));
    assert_eq!(gw.received(), 0);
    assert_eq!(gw.wait_count(Reason::DropUnknownPeer, 2), 2);
    // Back, with a rate of 10/s and a burst of 2: the rate holds at once, and
    // the peer starts with fresh counters and a full bucket.
    apply(&mut gw, meter("rate = \"10/s\"\nburst = 2"));
    gw.send(METER, false, 5683, &posts(20));
    let delivered = gw.received();
    assert!(
        (2..=4).contains(&delivered),
        "delivered {delivered} of 20 at 10/s, burst 2"
    );
    let id = gw.fp.tables().peer_id("meter").unwrap();
    let c = gw.fp.peer_counters(id).unwrap();
    assert_eq!(
        c.accepted.packets + c.dropped.packets,
        20,
        "counters start from zero: {c:?}"
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
);
