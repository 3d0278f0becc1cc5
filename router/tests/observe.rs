//! Devices observing topics (RFC 7641) with a raw device socket in the
//! device namespace: registration, notifications in order with increasing
//! sequence numbers, NON for QoS 0 and CON for QoS 1, the latest state for
//! a slow observer, and the relation's end by RST, by deregistration and by
//! a CON notification never acknowledged. Privileged.

use std::net::{IpAddr, SocketAddr, UdpSocket};

use m2m_router::coap::message::{self, code, option, Message, ACK, CON, NON, RST};
use m2m_router_tests::daemon::Daemon;
use m2m_router_tests::libcoap::CoapClient;
use m2m_router_tests::mqtt::RawClient;
use m2m_router_tests::netns::{
    deep_receive_buffer, next_datagram, Topology, DEADLINE, DEV_V4, GW_V4,
};
use m2m_router_tests::{require_root, TempPath};

const BIN: &str = env!("CARGO_BIN_EXE_m2m-router");
const TOKEN: &[u8] = &[0x0b, 0x5e];
/// The token of the relation on [`SENTINEL_TOPIC`].
const SENTINEL: &[u8] = &[0x5e, 0x71];
const SENTINEL_TOPIC: &str = "sentinel";

struct Gateway {
    topo: Topology,
    daemon: Daemon,
    _config: TempPath,
}

/// Device 0 is peer "observer"; it and unknown peers may publish and
/// observe anything under `ps/`.
fn gateway(tag: &str) -> Gateway {
    require_root();
    let topo = Topology::new(tag);
    let config = TempPath::with_contents(
        &format!("observe-{tag}"),
        "toml",
        format!(
            "[defaults]\nrate = \"unlimited\"\npublish = [\"#\"]\nsubscribe = [\"#\"]\n\
             [downlink]\nack_timeout_ms = 200\n\
             [[peer]]\nname = \"observer\"\nprefix = [\"{}/32\"]\n\
             publish = [\"#\"]\nsubscribe = [\"#\"]\n",
            DEV_V4[0]
        ),
    );
    let daemon = Daemon::on_gateway(&topo.gw, BIN, config.as_str());
    Gateway {
        topo,
        daemon,
        _config: config,
    }
}

impl Gateway {
    /// A device socket with a 16 MiB receive buffer (nothing is lost for
    /// being read late).
    fn device(&self, who: usize) -> UdpSocket {
        let sock = self.topo.device_socket(IpAddr::V4(DEV_V4[who]));
        deep_receive_buffer(&sock);
        sock.set_read_timeout(Some(DEADLINE)).unwrap();
        sock
    }

    fn mqtt(&self) -> RawClient {
        let mut c = self
            .topo
            .gw
            .run(|| RawClient::connect("127.0.0.1:1883".parse().unwrap()));
        assert_eq!(c.handshake("publisher"), 0);
        c
    }

    fn counter(&self, name: &str) -> u64 {
        self.daemon.counter("downlink", name)
    }

    fn wait_counter(&self, name: &str, value: u64) {
        self.daemon.wait_ctl(&["stats"], DEADLINE, |v| {
            v["downlink"][name].as_u64() == Some(value)
        });
    }
}

fn gateway_addr() -> SocketAddr {
    SocketAddr::new(GW_V4.into(), 5683)
}

/// GET `ps/<topic>` with Observe `observe` (0 registers, 1 deregisters).
fn observe(dev: &UdpSocket, mid: u16, topic: &str, observe: u32) -> Vec<u8> {
    observe_with(dev, mid, TOKEN, topic, observe)
}

fn observe_with(dev: &UdpSocket, mid: u16, token: &[u8], topic: &str, observe: u32) -> Vec<u8> {
    let mut opts: Vec<(u16, Vec<u8>)> = vec![(
        option::OBSERVE,
        if observe == 0 {
            vec![]
        } else {
            vec![observe as u8]
        },
    )];
    opts.push((option::URI_PATH, b"ps".to_vec()));
    for level in topic.split('/') {
        opts.push((option::URI_PATH, level.as_bytes().to_vec()));
    }
    let opts: Vec<(u16, &[u8])> = opts.iter().map(|(n, v)| (*n, &v[..])).collect();
    let mut get = Vec::new();
    message::encode(&mut get, CON, code::GET, mid, token, &opts, &[]);
    dev.send_to(&get, gateway_addr()).unwrap();
    next_datagram(dev)
}

/// A notification: type, Message ID, Observe sequence number, payload.
fn notification(dev: &UdpSocket) -> (u8, u16, u32, Vec<u8>) {
    notification_but(dev, None)
}

/// [`notification`], passing over retransmissions of Message ID `skip`.
fn notification_but(dev: &UdpSocket, skip: Option<u16>) -> (u8, u16, u32, Vec<u8>) {
    let datagram = loop {
        let d = next_datagram(dev);
        if Some(Message::decode(&d).unwrap().mid) != skip {
            break d;
        }
    };
    let m = Message::decode(&datagram).unwrap();
    assert_eq!((m.code, m.token), (code::CONTENT, TOKEN), "{m:?}");
    let seq = m
        .options()
        .find(|(n, _)| *n == option::OBSERVE)
        .and_then(|(_, v)| message::uint_option(v))
        .expect("an Observe option");
    (m.mtype, m.mid, seq, m.payload.to_vec())
}

fn ack(dev: &UdpSocket, mtype: u8, mid: u16) {
    let [a, b] = mid.to_be_bytes();
    dev.send_to(&[0x40 | (mtype << 4), 0, a, b], gateway_addr())
        .unwrap();
}

/// Registers the device's sentinel relation (for [`nothing_more`]).
fn sentinel(gw: &Gateway, dev: &UdpSocket, observers: u64) {
    observe_with(dev, 700, SENTINEL, SENTINEL_TOPIC, 0);
    gw.wait_counter("observers", observers);
}

/// Nothing more comes for the relation under test: after whatever was
/// published before (`mqtt` waits for each PUBACK), a message on the
/// sentinel topic; the endpoint task takes the broker's deliveries in order,
/// so the sentinel's notification is the next datagram.
fn nothing_more(mqtt: &mut RawClient, dev: &UdpSocket) {
    mqtt.publish_qos1(SENTINEL_TOPIC, b"fence", 600);
    // Earlier PUBACKs come first (the broker answers in order).
    while mqtt.read_puback() != 600 {}
    let next = next_datagram(dev);
    let m = Message::decode(&next).unwrap();
    assert_eq!(
        (m.token, m.payload),
        (SENTINEL, &b"fence"[..]),
        "something else came: {m:?}"
    );
    if m.mtype == CON {
        ack(dev, ACK, m.mid);
    }
}

#[test]
fn an_observer_gets_every_state_in_order_until_it_resets_one() {
    let gw = gateway("obs-order");
    let dev = gw.device(0);
    // Registration on a topic nothing was published on yet: 2.05, empty,
    // with an Observe option.
    let reply = observe(&dev, 1, "plant/temp", 0);
    let m = Message::decode(&reply).unwrap();
    assert_eq!((m.mtype, m.code, m.payload), (ACK, code::CONTENT, &b""[..]));
    assert!(m.options().any(|(n, _)| n == option::OBSERVE), "{m:?}");
    gw.wait_counter("observers", 1);
    sentinel(&gw, &dev, 2);
    // `ctl observe ls` shows both relations, oldest first.
    let listed = gw.daemon.ctl_json(&["observe", "ls"]);
    let topics: Vec<&str> = listed["observers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["topic"].as_str().unwrap())
        .collect();
    assert_eq!(topics, vec!["plant/temp", SENTINEL_TOPIC], "{listed}");
    assert_eq!(listed["observers"][0]["token"], "0b5e");
    assert_eq!(listed["observers"][0]["peer"], "observer");
    let mut mqtt = gw.mqtt();
    // QoS 0 states: NON notifications, all of them, in order.
    let mut last_seq = 0;
    for i in 1..=5u32 {
        mqtt.publish("plant/temp", i.to_string().as_bytes());
        let (mtype, _, seq, payload) = notification(&dev);
        assert_eq!((mtype, payload), (NON, i.to_string().into_bytes()));
        assert!(
            seq > last_seq,
            "sequence numbers increase: {seq} after {last_seq}"
        );
        last_seq = seq;
    }
    // QoS 1: a CON notification, acknowledged.
    mqtt.publish_qos1("plant/temp", b"6", 1);
    let (mtype, mid, seq, payload) = notification(&dev);
    assert_eq!((mtype, payload.as_slice()), (CON, &b"6"[..]));
    assert!(seq > last_seq);
    ack(&dev, ACK, mid);
    // Registering again with the same token is the same relation: its
    // numbers go on.
    let again = observe(&dev, 3, "plant/temp", 0);
    let again = Message::decode(&again).unwrap();
    let again_seq = again
        .options()
        .find(|(n, _)| *n == option::OBSERVE)
        .and_then(|(_, v)| message::uint_option(v))
        .unwrap();
    assert!(again_seq > seq, "{again_seq} after {seq}");
    assert_eq!(again.payload, b"6");
    assert_eq!(gw.counter("observers"), 2);
    // The next one is reset: the relation ends (RFC 7641 section 3.6).
    mqtt.publish_qos1("plant/temp", b"7", 2);
    let (mtype, mid, _, _) = notification(&dev);
    assert_eq!(mtype, CON);
    ack(&dev, RST, mid);
    gw.wait_counter("observers", 1);
    mqtt.publish_qos1("plant/temp", b"8", 3);
    nothing_more(&mut mqtt, &dev);
    assert_eq!(gw.counter("observe_ended"), 1);
    // 7 states and the fence.
    assert_eq!(gw.counter("notifications"), 8);
    gw.daemon.stop();
}

#[test]
fn a_slow_observer_gets_the_latest_state_and_deregistration_ends_the_relation() {
    let gw = gateway("obs-slow");
    let dev = gw.device(0);
    let mut mqtt = gw.mqtt();
    mqtt.publish_qos1("line/state", b"idle", 9);
    assert_eq!(mqtt.read_puback(), 9, "the broker has the state");
    // The registration's answer carries the current state.
    let m = observe(&dev, 1, "line/state", 0);
    assert_eq!(Message::decode(&m).unwrap().payload, b"idle");
    gw.wait_counter("observers", 1);
    sentinel(&gw, &dev, 2);
    mqtt.publish_qos1("line/state", b"a", 1);
    let (mtype, mid, _, payload) = notification(&dev);
    assert_eq!((mtype, payload.as_slice()), (CON, &b"a"[..]));
    // While "a" waits for its ACK, three more states: each replaces the
    // one before (RFC 7641 section 4.5.2).
    for (i, state) in ["b", "c", "d"].iter().enumerate() {
        mqtt.publish_qos1("line/state", state.as_bytes(), 2 + i as u16);
    }
    gw.wait_counter("notifications_skipped", 2);
    ack(&dev, ACK, mid);
    // (Retransmissions of "a" sent before the ACK arrived are passed over.)
    let (mtype, mid, _, payload) = notification_but(&dev, Some(mid));
    assert_eq!(
        (mtype, payload.as_slice()),
        (CON, &b"d"[..]),
        "the latest state"
    );
    ack(&dev, ACK, mid);
    // GET with Observe 1 deregisters (section 3.6).
    let reply = observe(&dev, 2, "line/state", 1);
    let m = Message::decode(&reply).unwrap();
    assert_eq!((m.code, m.payload), (code::CONTENT, &b"d"[..]));
    assert!(!m.options().any(|(n, _)| n == option::OBSERVE));
    gw.wait_counter("observers", 1);
    mqtt.publish("line/state", b"e");
    nothing_more(&mut mqtt, &dev);
    gw.daemon.stop();
}

#[test]
fn a_con_notification_never_acknowledged_ends_the_relation() {
    let gw = gateway("obs-gone");
    let dev = gw.device(0);
    observe(&dev, 1, "valve", 0);
    gw.wait_counter("observers", 1);
    gw.mqtt().publish_qos1("valve", b"open", 1);
    // The first transmission and MAX_RETRANSMIT (4) more, then nothing.
    let first = notification(&dev);
    for _ in 0..4 {
        let again = notification(&dev);
        assert_eq!(
            (again.0, again.1, again.3.as_slice()),
            (CON, first.1, &b"open"[..])
        );
    }
    gw.wait_counter("observe_timeouts", 1);
    assert_eq!(gw.counter("observers"), 0);
    gw.daemon.stop();
}

/// The M2M path: device A POSTs to a topic, device B observing it gets
/// every message, in order.
#[test]
fn ten_thousand_messages_from_device_a_reach_observing_device_b_in_order() {
    let gw = gateway("obs-m2m");
    let b = gw.device(1);
    observe(&b, 1, "m2m/a-to-b", 0);
    gw.wait_counter("observers", 1);
    sentinel(&gw, &b, 2);
    let a = gw.device(0);
    let n = 10_000u32;
    for i in 0..n {
        let mut post = Vec::new();
        let opts: [(u16, &[u8]); 3] = [
            (option::URI_PATH, b"ps"),
            (option::URI_PATH, b"m2m"),
            (option::URI_PATH, b"a-to-b"),
        ];
        message::encode(
            &mut post,
            CON,
            code::POST,
            i as u16,
            &[1],
            &opts,
            i.to_string().as_bytes(),
        );
        a.send_to(&post, gateway_addr()).unwrap();
        let reply = next_datagram(&a);
        assert_eq!(
            Message::decode(&reply).unwrap().code,
            code::CHANGED,
            "POST {i}"
        );
    }
    let mut last_seq = 0;
    for i in 0..n {
        let (mtype, _, seq, payload) = notification(&b);
        assert_eq!(mtype, NON);
        assert_eq!(payload, i.to_string().into_bytes(), "in order");
        assert!(seq > last_seq || (last_seq > 0xff_0000 && seq < 0x1_0000));
        last_seq = seq;
    }
    nothing_more(&mut gw.mqtt(), &b);
    gw.daemon.stop();
}

/// A stock observer: libcoap's coap-client observing `ps/<topic>` (`-s`)
/// prints each state mosquitto_pub publishes there, in order.
#[test]
fn coap_client_observes_a_topic_and_gets_each_state_mosquitto_pub_publishes() {
    let gw = gateway("obs-libcoap");
    let client = CoapClient::spawn(
        &gw.topo.dev,
        "coap-client-notls",
        &[
            "-a",
            &DEV_V4[0].to_string(),
            "-s",
            "120",
            "-w",
            "-m",
            "get",
            &format!("coap://{GW_V4}/ps/plant/valve"),
        ],
    );
    gw.wait_counter("observers", 1);
    for (i, qos) in [(1, "0"), (2, "1"), (3, "0"), (4, "1"), (5, "1")] {
        let state = format!("state-{i}");
        let ok = gw
            .topo
            .gw
            .command("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-q",
                qos,
                "-t",
                "plant/valve",
                "-m",
                &state,
            ])
            .status()
            .expect("mosquitto_pub");
        assert!(ok.success());
        // Lines other than states (the empty registration answer) pass.
        let got = client.next_line_starting("state-");
        assert_eq!(got, state, "in order");
    }
    drop(client);
    gw.daemon.stop();
}
