//! The uplink end to end, with real clients: `coap-client` (libcoap) as the
//! device in a device namespace, `m2m-router` with XDP on the gateway's veth,
//! `mosquitto_sub` subscribed to the embedded broker in the gateway namespace.
//!
//! Privileged: needs root.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use m2m_router::coap::message::{self, code, Message};
use m2m_router_tests::daemon::Daemon;
use m2m_router_tests::mqtt::{MosquittoSub, RawClient};
use m2m_router_tests::netns::{Topology, DEV_V4, DEV_V6, GW_IF, GW_V4, GW_V6};
use m2m_router_tests::packet::coap;
use m2m_router_tests::{require_root, TempPath};

const BIN: &str = env!("CARGO_BIN_EXE_m2m-router");

/// The device side's address 0 is peer "meter"; the others are unknown.
fn config(extra: &str) -> String {
    format!(
        r#"
        [defaults]
        rate = "unlimited"
        [coap]
        max_payload = 512
        [[peer]]
        name = "meter"
        prefix = ["{}/32", "{}/128"]
        {extra}
        "#,
        DEV_V4[0], DEV_V6[0]
    )
}

struct Gateway {
    topo: Topology,
    daemon: Daemon,
    _config: TempPath,
}

impl Gateway {
    fn start(tag: &str, config_text: &str) -> Gateway {
        require_root();
        let topo = Topology::new(tag);
        let config = TempPath::with_contents(&format!("uplink-{tag}"), "toml", config_text);
        let daemon = Daemon::running(
            &topo.gw,
            BIN,
            &[
                "--iface",
                GW_IF,
                "--xdp-mode",
                "native",
                "--config",
                config.as_str(),
            ],
        );
        Gateway {
            topo,
            daemon,
            _config: config,
        }
    }

    /// coap-client in the device namespace; returns its PDU trace (-v 6).
    fn coap_client(&self, args: &[&str]) -> String {
        let out = self
            .topo
            .dev
            .command("coap-client-notls")
            .args(["-B", "3", "-v", "6"])
            .args(args)
            .output()
            .expect("coap-client-notls (Debian package libcoap3-bin)");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// A UDP socket of the device side, talking to the gateway's CoAP port.
    fn device(&self, src: IpAddr) -> (UdpSocket, SocketAddr) {
        let sock = self.topo.device_socket(src);
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let dst: IpAddr = if src.is_ipv4() {
            GW_V4.into()
        } else {
            GW_V6.into()
        };
        (sock, SocketAddr::new(dst, 5683))
    }
}

fn exchange(sock: &UdpSocket, dst: SocketAddr, request: &[u8]) -> Option<Vec<u8>> {
    sock.send_to(request, dst).unwrap();
    let mut buf = [0u8; 2048];
    sock.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

#[test]
fn coap_client_messages_reach_mosquitto_sub_exactly_once() {
    let gw = Gateway::start("e2e", &config(""));
    let sub = MosquittoSub::start(&gw.topo.gw, &["m2m/#"], &[]);
    let v4 = format!("coap://{GW_V4}");
    let v6 = format!("coap://[{GW_V6}]");
    // -a: the device side has several addresses; send from the peer's own.
    let (a4, a6) = (DEV_V4[0].to_string(), DEV_V6[0].to_string());
    let cases = [
        (
            vec!["-a", &a4, "-m", "post", "-e", "21.5", "-t", "50"],
            format!("{v4}/sensors/temp"),
        ),
        (
            vec!["-a", &a6, "-m", "put", "-e", "on", "-t", "0"],
            format!("{v6}/actuators/relay"),
        ),
        (
            vec!["-a", &a4, "-N", "-m", "post", "-e", "7"],
            format!("{v4}/counters/a"),
        ),
        (
            vec!["-a", &a6, "-N", "-m", "put", "-e", "8"],
            format!("{v6}/counters/b"),
        ),
    ];
    for (args, uri) in &cases {
        let mut all = args.clone();
        all.push(uri);
        let trace = gw.coap_client(&all);
        if !args.contains(&"-N") {
            assert!(
                trace.contains("t:ACK c:2.04"),
                "no piggybacked 2.04 for {uri}:\n{trace}"
            );
        }
    }
    let mut got = sub.collect(4, Duration::from_secs(5), Duration::from_millis(500));
    got.sort_by(|a, b| a.topic.cmp(&b.topic));
    let summary: Vec<(&str, &str, &str)> = got
        .iter()
        .map(|r| {
            (
                r.topic.as_str(),
                r.payload.as_str(),
                r.content_type.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "m2m/meter/actuators/relay",
                "on",
                "text/plain; charset=utf-8"
            ),
            ("m2m/meter/counters/a", "7", ""),
            ("m2m/meter/counters/b", "8", ""),
            ("m2m/meter/sensors/temp", "21.5", "application/json"),
        ]
    );
    // GET returns the last value published there, with its Content-Format.
    let trace = gw.coap_client(&["-m", "get", &format!("{v4}/sensors/temp")]);
    assert!(
        trace.contains("c:2.05") && trace.contains("Content-Format:application/json"),
        "{trace}"
    );
    assert!(trace.contains("21.5"), "{trace}");
    let trace = gw.coap_client(&["-m", "get", &format!("{v6}/no/such/path")]);
    assert!(trace.contains("c:4.04"), "{trace}");
    // An unknown source publishes under its IP.
    let unknown_sub = MosquittoSub::start(&gw.topo.gw, &["m2m/10.77.2.1/#"], &[]);
    let (sock, dst) = gw.device(DEV_V4[2].into());
    let reply = exchange(&sock, dst, &m2m_router_tests::packet::coap_post(1, b"u")).expect("reply");
    assert_eq!(Message::decode(&reply).unwrap().code, code::CHANGED);
    let got = unknown_sub.collect(1, Duration::from_secs(5), Duration::from_millis(200));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].topic, "m2m/10.77.2.1/sensors/temp");
    gw.daemon.stop();
}

#[test]
fn a_retransmission_is_published_once_and_answered_twice() {
    let gw = Gateway::start("dup", &config(""));
    let sub = MosquittoSub::start(&gw.topo.gw, &["m2m/#"], &[]);
    let (sock, dst) = gw.device(DEV_V4[0].into());
    let con = m2m_router_tests::packet::coap_post(0x4242, b"once");
    let first = exchange(&sock, dst, &con).expect("first ACK");
    let second = exchange(&sock, dst, &con).expect("second ACK");
    assert_eq!(first, second, "the same response both times");
    let ack = Message::decode(&first).unwrap();
    assert_eq!(
        (ack.mtype, ack.code, ack.mid, ack.token),
        (message::ACK, code::CHANGED, 0x4242, &[0xca, 0xfe][..])
    );
    // NON: published once, never answered.
    let mut non = con.clone();
    non[0] = (non[0] & 0xcf) | 0x10;
    non[2] = 0x43;
    assert_eq!(exchange(&sock, dst, &non), None);
    assert_eq!(exchange(&sock, dst, &non), None);
    let got = sub.collect(2, Duration::from_secs(5), Duration::from_secs(1));
    assert_eq!(got.len(), 2, "one CON and one NON: {got:?}");
    let daemon = gw.daemon;
    assert_eq!(daemon.counter("coap", "duplicates"), 2);
    daemon.stop();
}

#[test]
fn ten_thousand_messages_from_a_hundred_peers_arrive_in_order() {
    let gw = Gateway::start(
        "load",
        &config("[mqtt]\nsession_queue = 100000\n")
            .replace("[defaults]", "[defaults]\ntopic = \"load/{ip}/{port}\""),
    );
    let sub = MosquittoSub::start(&gw.topo.gw, &["load/#"], &[]);
    let peers: Vec<(UdpSocket, SocketAddr)> =
        (0..100).map(|i| gw.device(DEV_V4[i % 4].into())).collect();
    // Each round, all 100 peers send their next CON at once; then each waits
    // for its ACK and, like a real device (RFC 7252 section 4.2),
    // retransmits the same message if the ACK does not come. A datagram the
    // test environment drops (a full veth ring under load) is thus resent,
    // and duplicate detection must keep it from being published twice.
    let mut retransmissions = 0;
    for seq in 0..100u16 {
        let msg = |seq: u16| {
            coap(
                0,
                code::POST,
                seq,
                &[],
                &[0xb1, b'x'],
                format!("{seq}").as_bytes(),
            )
        };
        for (sock, dst) in &peers {
            sock.send_to(&msg(seq), dst).unwrap();
        }
        for (sock, dst) in &peers {
            sock.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut buf = [0u8; 64];
            let mut tries = 0;
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) if Message::decode(&buf[..n]).is_ok_and(|m| m.mid == seq) => break,
                    Ok(_) => continue,
                    Err(_) => {
                        tries += 1;
                        assert!(
                            tries <= 4,
                            "no ACK for message {seq} after 4 retransmissions"
                        );
                        retransmissions += 1;
                        sock.send_to(&msg(seq), dst).unwrap();
                    }
                }
            }
        }
    }
    eprintln!("{retransmissions} retransmissions");
    let got = sub.collect(10_000, Duration::from_secs(30), Duration::from_millis(500));
    let mut per_peer: HashMap<&str, Vec<u16>> = HashMap::new();
    for r in &got {
        per_peer
            .entry(r.topic.as_str())
            .or_default()
            .push(r.payload.parse().unwrap());
    }
    assert_eq!(got.len(), 10_000, "all received exactly once");
    assert_eq!(per_peer.len(), 100);
    for (topic, seqs) in per_peer {
        assert_eq!(seqs, (0..100).collect::<Vec<u16>>(), "order of {topic}");
    }
    gw.daemon.stop();
}

#[test]
fn a_subscriber_that_stops_reading_slows_nobody_and_its_drops_are_counted() {
    let gw = Gateway::start("slow", &config("[mqtt]\nsession_queue = 2000\n"));
    let stuck = gw.topo.gw.run(|| {
        let mut c = RawClient::connect("127.0.0.1:1883".parse().unwrap());
        assert_eq!(c.handshake("stuck"), 0);
        assert_eq!(c.subscribe("m2m/#", 0), 0);
        c.stream.set_nonblocking(true).unwrap();
        c
    });
    let sub = MosquittoSub::start(&gw.topo.gw, &["m2m/#"], &[]);
    let (sock, dst) = gw.device(DEV_V4[0].into());
    // 30 MB in all, at about 20,000 messages/s: far more than the stuck
    // client's TCP buffers and queue (2,000) hold, well within what the
    // reading one keeps up with.
    let payload = vec![b'p'; 500];
    let total = 60_000u16;
    for seq in 0..total {
        let msg = coap(1, code::POST, seq, &[], &[0xb1, b'x'], &payload);
        sock.send_to(&msg, dst).unwrap();
        if seq % 100 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let got = sub.collect(
        usize::from(total),
        Duration::from_secs(30),
        Duration::from_millis(300),
    );
    assert_eq!(
        got.len(),
        usize::from(total),
        "the reading subscriber got everything"
    );
    let mut daemon = gw.daemon;
    daemon.signal(libc::SIGUSR1);
    let line = daemon.expect_line("session stuck");
    let dropped: u64 = line.split_whitespace().last().unwrap().parse().unwrap();
    assert!(
        dropped > 20_000,
        "the stuck subscriber's drops are counted: {line}"
    );
    drop(stuck);
    daemon.stop();
}

#[test]
fn bad_requests_get_the_rfc_answer_and_the_router_keeps_serving() {
    let gw = Gateway::start("bad", &config(""));
    let (sock, dst) = gw.device(DEV_V6[0].into());
    let answer = |req: &[u8]| {
        exchange(&sock, dst, req).map(|r| {
            let m = Message::decode(&r).unwrap();
            (
                m.mtype,
                m.code,
                m.mid,
                m.options()
                    .collect::<Vec<_>>()
                    .iter()
                    .map(|(n, v)| (*n, v.to_vec()))
                    .collect::<Vec<_>>(),
            )
        })
    };
    // Option 9 is critical and unknown: 4.02 (RFC 7252 section 5.4.1).
    assert_eq!(
        answer(&coap(0, code::POST, 1, &[7], &[0x91, 1], b"x")).map(|a| a.1),
        Some(code::BAD_OPTION)
    );
    // Option delta 15 is a format error: a CON gets RST (section 4.2).
    assert_eq!(
        answer(&coap(0, code::POST, 2, &[], &[0xf1], b"")).map(|a| (a.0, a.1, a.2)),
        Some((message::RST, 0, 2))
    );
    // A ping (Empty CON) gets RST (section 4.3).
    assert_eq!(
        answer(&[0x40, 0, 0, 3]).map(|a| (a.0, a.2)),
        Some((message::RST, 3))
    );
    // DELETE is not a publish: 4.05.
    assert_eq!(
        answer(&coap(0, code::DELETE, 4, &[], &[0xb1, b'x'], b"")).map(|a| a.1),
        Some(code::METHOD_NOT_ALLOWED)
    );
    // Proxy-Uri: 5.05.
    assert_eq!(
        answer(&coap(0, code::GET, 5, &[], &[0xd1, 0x16, b'x'], b"")).map(|a| a.1),
        Some(code::PROXYING_NOT_SUPPORTED)
    );
    // Oversized payload (limit 512): 4.13 with Size1 = 512 (section 5.9.2.9).
    let (t, c, _, opts) =
        answer(&coap(0, code::POST, 6, &[], &[0xb1, b'x'], &[b'z'; 600])).unwrap();
    assert_eq!((t, c), (message::ACK, code::REQUEST_ENTITY_TOO_LARGE));
    assert_eq!(opts, vec![(60, vec![2, 0])]);
    // A Uri-Path with '#' cannot become a topic: 4.00.
    assert_eq!(
        answer(&coap(0, code::POST, 7, &[], &[0xb1, b'#'], b"x")).map(|a| a.1),
        Some(code::BAD_REQUEST)
    );
    // A NON with an unknown critical option is dropped silently.
    assert_eq!(answer(&coap(1, code::POST, 8, &[], &[0x91, 1], b"x")), None);
    // Still serving.
    assert_eq!(
        answer(&coap(0, code::POST, 9, &[], &[0xb1, b'x'], b"ok")).map(|a| a.1),
        Some(code::CHANGED)
    );
    let daemon = gw.daemon;
    assert_eq!(daemon.counter("coap", "malformed"), 1);
    assert_eq!(daemon.counter("coap", "too_large"), 1);
    daemon.stop();
}

#[test]
fn mqtt_garbage_is_refused_and_the_broker_keeps_serving() {
    use std::io::Write as _;
    let gw = Gateway::start("mqttbad", &config(""));
    let broker: SocketAddr = "127.0.0.1:1883".parse().unwrap();
    let errors_before = gw.daemon.counter("mqtt", "protocol_errors");
    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],            // not MQTT
        &[0x10, 0xff, 0xff, 0xff, 0xff, 0x7f][..], // 5-byte remaining length
        &[0x30, 0x03, 0x00, 0x01, b'a'][..],       // PUBLISH before CONNECT
        &[
            0x10, 0x0c, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 60,
        ][..], // MQTT 3.1
    ] {
        let closed = gw.topo.gw.run(|| {
            let mut c = RawClient::connect(broker);
            c.stream.write_all(garbage).unwrap();
            c.closed_by_server()
        });
        assert!(closed, "connection kept open after {garbage:?}");
    }
    // A packet over the maximum size (1 MiB default) closes the connection too.
    let closed = gw.topo.gw.run(|| {
        let mut c = RawClient::connect(broker);
        assert_eq!(c.handshake("big"), 0);
        let _ = c.stream.write_all(&[0x30, 0xff, 0xff, 0x7f]);
        c.closed_by_server()
    });
    assert!(closed);
    // Each of the five was counted before its connection was closed.
    assert_eq!(
        gw.daemon.counter("mqtt", "protocol_errors"),
        errors_before + 5
    );
    // The broker still serves: a CoAP publish reaches a subscriber.
    let sub = MosquittoSub::start(&gw.topo.gw, &["m2m/#"], &[]);
    let (sock, dst) = gw.device(DEV_V4[0].into());
    assert!(exchange(
        &sock,
        dst,
        &m2m_router_tests::packet::coap_post(1, b"alive")
    )
    .is_some());
    assert_eq!(
        sub.collect(1, Duration::from_secs(5), Duration::from_millis(100))
            .len(),
        1
    );
    gw.daemon.stop();
}

#[test]
fn broker_credentials_are_enforced() {
    let gw = Gateway::start(
        "auth",
        &config("[mqtt]\nusername = \"app\"\npassword = \"s3cret\"\n"),
    );
    let code = |user: &str, pass: &str| {
        let out = gw
            .topo
            .gw
            .command("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-t",
                "x",
                "-m",
                "y",
                "-u",
                user,
                "-P",
                pass,
            ])
            .output()
            .unwrap();
        out.status.success()
    };
    assert!(code("app", "s3cret"));
    assert!(!code("app", "wrong"));
    assert!(!code("eve", "s3cret"));
    gw.daemon.stop();
}
