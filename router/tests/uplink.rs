//! The uplink end to end, with real clients: `coap-client` (libcoap) as the
//! device in a device namespace, `m2m-router` with XDP on the gateway's veth,
//! `mosquitto_sub` subscribed to the embedded broker in the gateway namespace.
//!
//! Privileged: needs root.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};

use m2m_router::coap::message::{self, code, Message};
use m2m_router_tests::daemon::Daemon;
use m2m_router_tests::mqtt::{MosquittoSub, RawClient};
use m2m_router_tests::netns::{
    await_answer, confirm, next_datagram, wait_for, Topology, DEADLINE, DEV_V4, DEV_V6, GW_V4,
    GW_V6,
};
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
        let daemon = Daemon::on_gateway(&topo.gw, BIN, config.as_str());
        Gateway {
            topo,
            daemon,
            _config: config,
        }
    }

    /// coap-client in the device namespace; returns its PDU trace (-v 6).
    fn coap_client(&self, args: &[&str]) -> String {
        self.coap_client_for(3, args)
    }

    /// [`Gateway::coap_client`], giving up after `seconds` (`-B`).
    fn coap_client_for(&self, seconds: u32, args: &[&str]) -> String {
        let out = self
            .topo
            .dev
            .command("coap-client-notls")
            .args(["-B", &seconds.to_string(), "-v", "6"])
            .args(args)
            .output()
            .expect("coap-client-notls (Debian package libcoap3-bin)");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// mosquitto_sub, subscribed (the broker counts it) to `topic`: it
    /// prints the first message's payload raw (-N: no newline) and exits;
    /// -W bounds its wait.
    fn first_message_raw(&self, topic: &str) -> std::process::Child {
        let subscriptions = |d: &Daemon| d.counter("mqtt", "subscriptions");
        let before = subscriptions(&self.daemon);
        let sub = self
            .topo
            .gw
            .command("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-t", topic, "-C", "1", "-N", "-W", "120"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("mosquitto_sub (Debian package mosquitto-clients)");
        assert!(
            wait_for(DEADLINE, || subscriptions(&self.daemon) > before),
            "mosquitto_sub did not subscribe"
        );
        sub
    }

    /// aiocoap (`tests/peers/aiocoap_transfer.py`) in the device namespace:
    /// `method` "post" sends `file`, "get" writes the answer to it. Returns
    /// the response code it printed.
    fn aiocoap(&self, method: &str, uri: &str, file: &str) -> String {
        let out = self
            .topo
            .dev
            .command(&m2m_router_tests::aiocoap_python())
            .arg(m2m_router_tests::kit_file("peers/aiocoap_transfer.py"))
            .args([method, uri, file])
            .output()
            .expect("running aiocoap");
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            out.status.success(),
            "aiocoap {method} {uri}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// A UDP socket of the device side, talking to the gateway's CoAP port.
    fn device(&self, src: IpAddr) -> (UdpSocket, SocketAddr) {
        let sock = self.topo.device_socket(src);
        let dst: IpAddr = if src.is_ipv4() {
            GW_V4.into()
        } else {
            GW_V6.into()
        };
        (sock, SocketAddr::new(dst, 5683))
    }
}

/// A CON request's answer, retransmitted as a device would.
fn exchange(sock: &UdpSocket, dst: SocketAddr, request: &[u8]) -> Vec<u8> {
    // The Message ID is read raw: malformed requests are exchanged too.
    let mid = u16::from_be_bytes([request[2], request[3]]);
    confirm(sock, dst, request, mid).0
}

/// Sends `datagram`, which must go unanswered, then a CON ping as a fence:
/// the router handles one source's datagrams in order on one worker
/// (README, invariant 2), so if the next datagram that comes back is the
/// ping's RST, nothing was sent in answer to `datagram`.
fn expect_no_answer(sock: &UdpSocket, dst: SocketAddr, datagram: &[u8], ping_mid: u16) {
    sock.send_to(datagram, dst).unwrap();
    let [m0, m1] = ping_mid.to_be_bytes();
    sock.send_to(&[0x40, 0, m0, m1], dst).unwrap();
    let next = next_datagram(sock);
    let next = Message::decode(&next).unwrap();
    assert_eq!(
        (next.mtype, next.mid),
        (message::RST, ping_mid),
        "{datagram:?} was answered"
    );
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
    let mut sub = sub;
    let mut got = sub.take(4);
    assert_eq!(sub.fence(), vec![], "published more than once");
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
    let mut unknown_sub = MosquittoSub::start(&gw.topo.gw, &["m2m/10.77.2.1/#"], &[]);
    let (sock, dst) = gw.device(DEV_V4[2].into());
    let reply = exchange(&sock, dst, &m2m_router_tests::packet::coap_post(1, b"u"));
    assert_eq!(Message::decode(&reply).unwrap().code, code::CHANGED);
    let got = unknown_sub.fence();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].topic, "m2m/10.77.2.1/sensors/temp");
    gw.daemon.stop();
}

/// RFC 7959 with a stock client: libcoap sends a 100 KiB file in 64-byte
/// Block1 blocks (the issue's "coap-client -b 64 -m post -f"), the body is
/// published once, byte for byte, and libcoap reads it back in Block2
/// blocks from GET.
#[test]
fn a_body_in_64_byte_blocks_arrives_whole_and_reads_back_in_blocks() {
    let gw = Gateway::start("blocks", &config(""));
    let body: Vec<u8> = (0..100 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let file = TempPath::with_contents("block1", "bin", &body);
    let sub = gw.first_message_raw("m2m/meter/log");
    let a4 = DEV_V4[0].to_string();
    let uri = format!("coap://{GW_V4}/log");
    let trace = gw.coap_client_for(
        120,
        &[
            "-a",
            &a4,
            "-m",
            "post",
            "-b",
            "64",
            "-f",
            file.as_str(),
            &uri,
        ],
    );
    // libcoap traces the first request and the final answer only: the
    // 2.31s in between show in the block counter below.
    assert!(
        trace.contains("c:2.04") && trace.contains("Block1:1599/_/64"),
        "no final 2.04 for block 1599:\n{}",
        tail(&trace)
    );
    let out = sub.wait_with_output().unwrap();
    assert!(out.status.success(), "mosquitto_sub got nothing");
    assert!(
        out.stdout == body,
        "the body differs: {} bytes arrived",
        out.stdout.len()
    );
    assert_eq!(gw.daemon.counter("coap", "blocks"), 1600);
    assert_eq!(gw.daemon.counter("coap", "bodies"), 1);
    assert_eq!(gw.daemon.counter("coap", "published"), 1);
    // Read back: the value is larger than a block, so it comes in Block2
    // blocks, which libcoap reassembles.
    let back = TempPath::with_contents("block2", "bin", "");
    let trace = gw.coap_client_for(120, &["-a", &a4, "-m", "get", "-o", back.as_str(), &uri]);
    let read = std::fs::read(&*back).unwrap();
    assert!(
        read == body,
        "GET read {} bytes:\n{}",
        read.len(),
        tail(&trace)
    );
    gw.daemon.stop();
}

/// aiocoap, a stock client that sends bodies over 1024 bytes in Block1
/// blocks (RFC 7959), uploads one whole, its 1024-byte blocks taken
/// although `max_payload` is 512 here; and reads a retained value larger
/// than a block through the pubsub prefix, in Block2 blocks it reassembles.
#[test]
fn aiocoap_uploads_in_block1_and_reads_a_large_retained_value_in_block2() {
    let gw = Gateway::start(
        "aiocoap",
        &config("publish = [\"big/#\"]\nsubscribe = [\"big/#\"]"),
    );
    let body: Vec<u8> = (0..20_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let file = TempPath::with_contents("aiocoap-up", "bin", &body);
    let sub = gw.first_message_raw("big/upload");
    let code = gw.aiocoap(
        "post",
        &format!("coap://{GW_V4}/ps/big/upload"),
        file.as_str(),
    );
    assert_eq!(code, "2.04 Changed");
    let out = sub.wait_with_output().unwrap();
    assert!(
        out.stdout == body,
        "the body differs: {} bytes arrived",
        out.stdout.len()
    );
    assert!(gw.daemon.counter("coap", "blocks") >= 20, "sent in blocks");
    assert_eq!(gw.daemon.counter("coap", "bodies"), 1);

    // A retained value of 100 KB, published by an MQTT client.
    let value: Vec<u8> = body
        .iter()
        .cycle()
        .take(100 * 1024)
        .map(|b| b ^ 0x5a)
        .collect();
    let value_file = TempPath::with_contents("aiocoap-retained", "bin", &value);
    let published = gw
        .topo
        .gw
        .command("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-q", "1", "-r", "-t", "big/retained"])
        .args(["-f", value_file.as_str()])
        .status()
        .expect("mosquitto_pub");
    assert!(published.success());
    let back = TempPath::with_contents("aiocoap-back", "bin", "");
    let code = gw.aiocoap(
        "get",
        &format!("coap://{GW_V4}/ps/big/retained"),
        back.as_str(),
    );
    assert_eq!(code, "2.05 Content");
    let read = std::fs::read(&*back).unwrap();
    assert!(read == value, "GET read {} bytes", read.len());
    gw.daemon.stop();
}

/// `[coap] pubsub_prefix` ("ps"): a Uri-Path under it names an MQTT topic,
/// which the peer may publish to and read only as its `publish` and
/// `subscribe` filters (`{peer}` its name) allow; unknown peers as the
/// `[defaults]` ones do (none unless configured). Refusals are 4.03.
#[test]
fn the_pubsub_prefix_names_topics_within_each_peers_allow_lists() {
    let gw = Gateway::start(
        "pubsub",
        &config(
            r#"publish = ["plant/{peer}/#"]
        subscribe = ["plant/+/state"]"#,
        ),
    );
    let mut sub = MosquittoSub::start(&gw.topo.gw, &["plant/#", "m2m/#"], &[]);
    let (a4, unknown) = (DEV_V4[0].to_string(), DEV_V4[2].to_string());
    let uri = |path: &str| format!("coap://{GW_V4}/{path}");
    let post = |from: &str, path: &str| {
        gw.coap_client(&["-a", from, "-m", "post", "-e", "open", &uri(path)])
    };
    let trace = post(&a4, "ps/plant/meter/valve");
    assert!(trace.contains("c:2.04"), "{trace}");
    let trace = post(&a4, "ps/plant/other/valve");
    assert!(trace.contains("c:4.03"), "another peer's topic: {trace}");
    let trace = post(&unknown, "ps/plant/meter/valve");
    assert!(
        trace.contains("c:4.03"),
        "unknown peers may not by default: {trace}"
    );
    let got = sub.fence();
    let topics: Vec<&str> = got.iter().map(|r| r.topic.as_str()).collect();
    assert_eq!(topics, vec!["plant/meter/valve"], "only the allowed one");
    assert_eq!(got[0].payload, "open");
    // GET reads a topic's retained message (here published over MQTT).
    let status = gw
        .topo
        .gw
        .command("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-q",
            "1",
            "-r",
            "-t",
            "plant/line1/state",
            "-m",
            "running",
        ])
        .status()
        .expect("mosquitto_pub");
    assert!(status.success());
    let trace = gw.coap_client(&["-a", &a4, "-m", "get", &uri("ps/plant/line1/state")]);
    assert!(
        trace.contains("c:2.05") && trace.contains("running"),
        "{trace}"
    );
    let trace = gw.coap_client(&["-a", &a4, "-m", "get", &uri("ps/plant/meter/valve")]);
    assert!(
        trace.contains("c:4.03"),
        "not in its subscribe filters: {trace}"
    );
    assert_eq!(gw.daemon.counter("coap", "forbidden"), 3);
    gw.daemon.stop();
}

/// The end of a long trace.
fn tail(trace: &str) -> &str {
    let mut start = trace.len().saturating_sub(3000);
    while !trace.is_char_boundary(start) {
        start += 1;
    }
    &trace[start..]
}

#[test]
fn a_retransmission_is_published_once_and_answered_twice() {
    let gw = Gateway::start("dup", &config(""));
    let mut sub = MosquittoSub::start(&gw.topo.gw, &["m2m/#"], &[]);
    let (sock, dst) = gw.device(DEV_V4[0].into());
    let con = m2m_router_tests::packet::coap_post(0x4242, b"once");
    let first = exchange(&sock, dst, &con);
    // Sent again as if the ACK had been lost.
    let second = exchange(&sock, dst, &con);
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
    expect_no_answer(&sock, dst, &non, 0x5000);
    expect_no_answer(&sock, dst, &non, 0x5001);
    let got = sub.fence();
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
    let mut sub = MosquittoSub::start(&gw.topo.gw, &["load/#"], &[]);
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
            retransmissions += await_answer(sock, *dst, &msg(seq), seq).1 - 1;
        }
    }
    eprintln!("{retransmissions} retransmissions");
    let mut got = sub.take(10_000);
    got.extend(sub.fence());
    let mut per_peer: HashMap<&str, Vec<u16>> = HashMap::new();
    for r in &got {
        per_peer
            .entry(r.topic.as_str())
            .or_default()
            .push(r.payload.parse().unwrap());
    }
    assert_eq!(got.len(), 10_000, "all received, exactly once");
    assert_eq!(per_peer.len(), 100);
    for (topic, seqs) in per_peer {
        assert_eq!(seqs, (0..100).collect::<Vec<u16>>(), "order of {topic}");
    }
    gw.daemon.stop();
}

/// A subscriber that stops reading fills its TCP buffers and its session
/// queue; from then on its messages are dropped and counted, and neither the
/// devices (every CON acknowledged) nor the subscriber that reads (every
/// message, in order) notice. Afterwards the stuck client's account is
/// exact: what it received plus what was counted dropped is what was sent.
#[test]
fn a_subscriber_that_stops_reading_slows_nobody_and_its_drops_are_counted() {
    const TOTAL: u16 = 60_000;
    let gw = Gateway::start("slow", &config("[mqtt]\nsession_queue = 2000\n"));
    let mut stuck = gw.topo.gw.run(|| {
        let mut c = RawClient::connect_with_receive_buffer("127.0.0.1:1883".parse().unwrap(), 4096);
        assert_eq!(c.handshake("stuck"), 0);
        assert_eq!(c.subscribe("m2m/#", 0), 0);
        c
    });
    let mut sub = MosquittoSub::start(&gw.topo.gw, &["m2m/#"], &[]);
    let (sock, dst) = gw.device(DEV_V4[0].into());
    // 30 MB in all, far more than the stuck client's buffers (its own few
    // KiB, the kernel's send buffer of at most tcp_wmem's 4 MiB) and its
    // queue (2,000 messages) hold. Sent as CONs, 64 in flight: the router
    // paces the test, and a datagram lost on the veth is retransmitted.
    let msg = |seq: u16| {
        let payload = format!("{seq:05}{}", "p".repeat(495));
        coap(0, code::POST, seq, &[], &[0xb1, b'x'], payload.as_bytes())
    };
    let mut retransmissions = 0;
    for window in (0..TOTAL).collect::<Vec<_>>().chunks(64) {
        for &seq in window {
            sock.send_to(&msg(seq), dst).unwrap();
        }
        for &seq in window {
            let (ack, sent) = await_answer(&sock, dst, &msg(seq), seq);
            assert_eq!(Message::decode(&ack).unwrap().code, code::CHANGED);
            retransmissions += sent - 1;
        }
    }
    eprintln!("{retransmissions} retransmissions");
    // The reader got everything, in order, while the stuck client was full.
    let mut got = sub.take(usize::from(TOTAL));
    got.extend(sub.fence());
    let seqs: Vec<u16> = got
        .iter()
        .map(|r| r.payload[..5].parse().unwrap())
        .collect();
    assert!(
        seqs == (0..TOTAL).collect::<Vec<_>>(),
        "the reading subscriber got everything once, in order ({} messages)",
        seqs.len()
    );
    let stuck_session = |field: &str| {
        let stats = gw.daemon.ctl_json(&["stats"]);
        stats["mqtt"]["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["client_id"] == "stuck")
            .map(|s| s[field].as_u64().unwrap())
            .unwrap_or_else(|| panic!("the stuck session is not listed: {stats}"))
    };
    let dropped = stuck_session("dropped");
    assert!(dropped > 0, "the stuck client's queue never filled");
    // Now the stuck client reads all it was sent, up to a fence published
    // once its queue has room (else the fence would be dropped too).
    let fence = "m2m/meter/fence";
    let reader = std::thread::spawn(move || {
        let mut received = 0u64;
        while stuck.read_publish().3 != fence {
            received += 1;
        }
        (received, stuck)
    });
    assert!(
        wait_for(DEADLINE, || stuck_session("queued") == 0),
        "the stuck client's queue did not drain once it read"
    );
    let published = gw
        .topo
        .gw
        .command("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-q", "1", "-t", fence, "-m", "f"])
        .status()
        .unwrap();
    assert!(published.success());
    let (received, _stuck) = reader
        .join()
        .expect("the stuck client read up to the fence");
    assert_eq!(
        received + dropped,
        u64::from(TOTAL),
        "every message to the stuck client was either delivered or counted dropped \
         ({received} received, {dropped} dropped)"
    );
    assert_eq!(
        stuck_session("dropped"),
        dropped,
        "none dropped once it read"
    );
    gw.daemon.stop();
}

#[test]
fn bad_requests_get_the_rfc_answer_and_the_router_keeps_serving() {
    let gw = Gateway::start("bad", &config(""));
    let (sock, dst) = gw.device(DEV_V6[0].into());
    let answer = |req: &[u8]| {
        let r = exchange(&sock, dst, req);
        let m = Message::decode(&r).unwrap();
        let options = m
            .options()
            .map(|(n, v)| (n, v.to_vec()))
            .collect::<Vec<_>>();
        (m.mtype, m.code, m.mid, options)
    };
    // Option 9 is critical and unknown: 4.02 (RFC 7252 section 5.4.1).
    assert_eq!(
        answer(&coap(0, code::POST, 1, &[7], &[0x91, 1], b"x")).1,
        code::BAD_OPTION
    );
    // Option delta 15 is a format error: a CON gets RST (section 4.2).
    assert_eq!(
        answer(&coap(0, code::POST, 2, &[], &[0xf1], b"")).0,
        message::RST
    );
    // A ping (Empty CON) gets RST (section 4.3).
    assert_eq!(answer(&[0x40, 0, 0, 3]).0, message::RST);
    // DELETE is not a publish: 4.05.
    assert_eq!(
        answer(&coap(0, code::DELETE, 4, &[], &[0xb1, b'x'], b"")).1,
        code::METHOD_NOT_ALLOWED
    );
    // Proxy-Uri: 5.05.
    assert_eq!(
        answer(&coap(0, code::GET, 5, &[], &[0xd1, 0x16, b'x'], b"")).1,
        code::PROXYING_NOT_SUPPORTED
    );
    // Oversized payload (limit 512): 4.13 (section 5.9.2.9) with a Block1
    // of the block size that fits (512: SZX 5) and Size1, the largest body
    // it may send in such blocks (1 MiB; RFC 7959 section 2.9.3).
    let (t, c, _, opts) = answer(&coap(0, code::POST, 6, &[], &[0xb1, b'x'], &[b'z'; 600]));
    assert_eq!((t, c), (message::ACK, code::REQUEST_ENTITY_TOO_LARGE));
    assert_eq!(opts, vec![(27, vec![5]), (60, vec![0x10, 0, 0])]);
    // A Uri-Path with '#' cannot become a topic: 4.00.
    assert_eq!(
        answer(&coap(0, code::POST, 7, &[], &[0xb1, b'#'], b"x")).1,
        code::BAD_REQUEST
    );
    // A 6,000-byte Uri-Path does not fit the receive buffer: 4.13, not RST.
    // Sent over the gateway's loopback: on the veth it would be fragmented,
    // and the fast path drops fragments.
    let local = gw.topo.gw.run(|| UdpSocket::bind("127.0.0.1:0")).unwrap();
    let mut long_path = vec![0xbe];
    long_path.extend_from_slice(&(6_000u16 - 269).to_be_bytes());
    long_path.extend_from_slice(&[b'p'; 6_000]);
    let reply = exchange(
        &local,
        "127.0.0.1:5683".parse().unwrap(),
        &coap(0, code::POST, 11, &[1], &long_path, b"x"),
    );
    let reply = Message::decode(&reply).unwrap();
    assert_eq!(
        (reply.mtype, reply.code, reply.token),
        (message::ACK, code::REQUEST_ENTITY_TOO_LARGE, &[1][..])
    );
    // A 300-byte segment fits but Uri-Path holds 0-255 bytes: like an
    // unknown critical option, 4.02 (section 5.4.3).
    let mut wide_segment = vec![0xbd, (300 - 13) as u8];
    wide_segment.extend_from_slice(&[b'p'; 300]);
    assert_eq!(
        answer(&coap(0, code::POST, 12, &[], &wide_segment, b"x")).1,
        code::BAD_OPTION
    );
    // 18 Uri-Host options: the second is a supernumerary critical option,
    // 4.02 (section 5.4.5).
    let mut hosts = vec![0x31, b'h'];
    for _ in 1..18 {
        hosts.extend_from_slice(&[0x01, b'h']);
    }
    hosts.extend_from_slice(&[0x81, b'x']);
    assert_eq!(
        answer(&coap(0, code::POST, 13, &[], &hosts, b"x")).1,
        code::BAD_OPTION
    );
    // A NON with an unknown critical option is dropped silently.
    expect_no_answer(
        &sock,
        dst,
        &coap(1, code::POST, 8, &[], &[0x91, 1], b"x"),
        10,
    );
    // Still serving.
    assert_eq!(
        answer(&coap(0, code::POST, 9, &[], &[0xb1, b'x'], b"ok")).1,
        code::CHANGED
    );
    let daemon = gw.daemon;
    assert_eq!(daemon.counter("coap", "malformed"), 1);
    assert_eq!(daemon.counter("coap", "too_large"), 2);
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
    let mut sub = MosquittoSub::start(&gw.topo.gw, &["m2m/#"], &[]);
    let (sock, dst) = gw.device(DEV_V4[0].into());
    exchange(
        &sock,
        dst,
        &m2m_router_tests::packet::coap_post(1, b"alive"),
    );
    assert_eq!(sub.fence().len(), 1);
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
