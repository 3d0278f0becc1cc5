//! Downlink commands with a device simulator in the device namespace:
//! MQTT publish -> CoAP CON to the device's last-seen endpoint -> response
//! on the response topic with the correlation data; separate responses,
//! duplicates, the retransmission schedule and refusals. Privileged.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use m2m_router::coap::message::{self, code, Message, ACK, CON, RST};
use m2m_router_tests::daemon::Daemon;
use m2m_router_tests::libcoap::CoapServer;
use m2m_router_tests::mqtt::{mosquitto_pub, MosquittoSub, Received};
use m2m_router_tests::netns::{recv_from, wait_for, Topology, DEADLINE, DEV_V4, GW_V4};
use m2m_router_tests::packet::coap_post;
use m2m_router_tests::{require_root, TempPath};

const BIN: &str = env!("CARGO_BIN_EXE_m2m-router");

struct Setup {
    topo: Topology,
    daemon: Daemon,
    _config: TempPath,
}

fn setup(tag: &str) -> Setup {
    setup_with(tag, "")
}

/// `downlink` is added to the `[downlink]` section.
fn setup_with(tag: &str, downlink: &str) -> Setup {
    require_root();
    let topo = Topology::new(tag);
    let config = TempPath::with_contents(
        &format!("downlink-{tag}"),
        "toml",
        format!(
            r#"
            [defaults]
            rate = "unlimited"
            [downlink]
            ack_timeout_ms = 200
            response_timeout_ms = 2000
            {downlink}
            [[peer]]
            name = "meter"
            prefix = ["{}/32"]
            [[peer]]
            name = "banned"
            prefix = ["{}/32"]
            endpoint = "{}:5683"
            deny = true
            "#,
            DEV_V4[0], DEV_V4[1], DEV_V4[1]
        ),
    );
    let daemon = Daemon::on_gateway(&topo.gw, BIN, config.as_str());
    Setup {
        topo,
        daemon,
        _config: config,
    }
}

/// A device: a socket in the device namespace that has sent one uplink, so
/// the router knows where it is.
fn device(s: &Setup, who: usize) -> UdpSocket {
    let sock = s.topo.device_socket(IpAddr::V4(DEV_V4[who]));
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    sock.send_to(&coap_post(1, b"hello"), SocketAddr::new(GW_V4.into(), 5683))
        .unwrap();
    let mut buf = [0u8; 256];
    if who == 0 {
        let (n, _) = recv_from(&sock, &mut buf).expect("uplink ACK");
        assert_eq!(Message::decode(&buf[..n]).unwrap().code, code::CHANGED);
    }
    sock
}

fn command(s: &Setup, topic: &str, payload: &str, props: &[&str]) {
    mosquitto_pub(&s.topo.gw, topic, payload, props);
}

fn subscriber(s: &Setup, filter: &str) -> MosquittoSub {
    MosquittoSub::start(&s.topo.gw, &[filter], &["-F", "%t|%p|%D %P"])
}

fn recv(sock: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = [0u8; 1500];
    let (n, from) = recv_from(sock, &mut buf).expect("a datagram from the router");
    (buf[..n].to_vec(), from)
}

#[test]
fn a_command_reaches_the_device_and_its_answer_the_response_topic() {
    let s = setup("dl-piggy");
    let dev = device(&s, 0);
    let mut sub = subscriber(&s, "app/#");
    command(
        &s,
        "m2m-cmd/meter/actuators/relay",
        "on",
        &[
            "response-topic app/r1",
            "correlation-data c-1",
            "user-property method PUT",
        ],
    );
    let (req, from) = recv(&dev);
    assert_eq!(from.port(), 5683, "sent from the CoAP port");
    let m = Message::decode(&req).unwrap();
    assert_eq!((m.mtype, m.code, m.payload), (CON, code::PUT, &b"on"[..]));
    let path: Vec<&[u8]> = m
        .options()
        .filter(|(n, _)| *n == 11)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(path, vec![&b"actuators"[..], &b"relay"[..]]);
    let mut ack = Vec::new();
    message::encode(&mut ack, ACK, code::CHANGED, m.mid, m.token, &[], b"done");
    dev.send_to(&ack, from).unwrap();
    let mut got = sub.take(1);
    got.extend(sub.fence());
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].topic.as_str(), got[0].payload.as_str()),
        ("app/r1", "done")
    );
    assert!(
        got[0].content_type.contains("c-1") && got[0].content_type.contains("coap-code:2.04"),
        "{:?}",
        got[0]
    );
    s.daemon.stop();
}

#[test]
fn a_separate_response_is_acknowledged_every_time_and_published_once() {
    let s = setup("dl-separate");
    let dev = device(&s, 0);
    let mut sub = subscriber(&s, "m2m-resp/#");
    command(&s, "m2m-cmd/meter/valve", "open", &[]);
    let (req, from) = recv(&dev);
    let m = Message::decode(&req).unwrap();
    assert_eq!(m.code, code::POST, "POST by default");
    let mut empty = Vec::new();
    message::encode(&mut empty, ACK, 0, m.mid, &[], &[], &[]);
    dev.send_to(&empty, from).unwrap();
    // Later, the response as its own CON, sent twice (its ACK "lost").
    let mut resp = Vec::new();
    message::encode(
        &mut resp,
        CON,
        code::CONTENT,
        0x7777,
        m.token,
        &[],
        b"opened",
    );
    for _ in 0..2 {
        dev.send_to(&resp, from).unwrap();
        let (ack, _) = recv(&dev);
        let a = Message::decode(&ack).unwrap();
        assert_eq!(
            (a.mtype, a.code, a.mid),
            (ACK, 0, 0x7777),
            "empty ACK for the separate response"
        );
    }
    // Both ACKs came back, so both responses have been handled.
    let got: Vec<Received> = sub.fence();
    assert_eq!(got.len(), 1, "published once: {got:?}");
    assert_eq!(
        (got[0].topic.as_str(), got[0].payload.as_str()),
        ("m2m-resp/meter/valve", "opened")
    );
    assert!(got[0].content_type.contains("coap-code:2.05"));
    s.daemon.stop();
}

/// RFC 7252 section 4.2 with ACK_TIMEOUT 200 ms, ACK_RANDOM_FACTOR 1.5 and
/// MAX_RETRANSMIT 4: transmission n (from 0) leaves at t0 + timeout x
/// (2^n - 1), timeout in [200, 300] ms. Arrival times can only be later
/// than that, so each is held to at least 200 ms x (2^n - 1) after the
/// command was published (which a schedule without the doubling breaks from
/// n = 2), and to at most 300 ms x (2^n - 1) plus a generous allowance for
/// a loaded machine (which one that triples breaks by n = 4).
#[test]
fn a_silent_device_gets_the_rfc_retransmissions_then_a_timeout_is_published() {
    const SLACK: Duration = Duration::from_secs(3);
    let s = setup("dl-silent");
    let dev = device(&s, 0);
    dev.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let sub = subscriber(&s, "m2m-resp/#");
    let published = Instant::now();
    command(&s, "m2m-cmd/meter/silent", "x", &["correlation-data q-9"]);
    let mut mid = None;
    for n in 0..5u32 {
        let (req, _) = recv(&dev);
        let at = published.elapsed();
        let m = Message::decode(&req).unwrap();
        assert_eq!(
            *mid.get_or_insert(m.mid),
            m.mid,
            "retransmissions keep the Message ID"
        );
        let steps = 2u32.pow(n) - 1;
        let (earliest, latest) = (
            Duration::from_millis(200) * steps,
            Duration::from_millis(300) * steps + SLACK,
        );
        assert!(
            (earliest..=latest).contains(&at),
            "transmission {n} arrived {at:?} after the command; RFC 7252 4.2 wants \
             {earliest:?}..{:?} (+ {SLACK:?} for a loaded machine)",
            latest - SLACK
        );
    }
    let got = sub.take(1);
    assert_eq!(got.len(), 1);
    // The router's own count: MAX_RETRANSMIT = 4, so five in all.
    assert!(
        got[0].payload.contains("no answer after 5 transmissions")
            && got[0].content_type.contains("q-9")
            && got[0].content_type.contains("coap-code:error"),
        "{:?}",
        got[0]
    );
    let count = |name| s.daemon.counter("downlink", name);
    assert_eq!(
        (count("sent"), count("retransmissions"), count("timeouts")),
        (1, 4, 1)
    );
    s.daemon.stop();
}

/// The denied peer has a configured endpoint where a device listens, so a
/// command could reach it but for the deny: once the deny is lifted, the
/// first request the device sees is the later command, not the refused one.
#[test]
fn commands_to_denied_or_unknown_peers_are_refused_and_not_sent() {
    let s = setup("dl-refuse");
    let banned = s.topo.dev.run(|| {
        UdpSocket::bind(SocketAddr::new(DEV_V4[1].into(), 5683)).expect("bind the banned device")
    });
    banned
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let sub = subscriber(&s, "m2m-resp/#");
    command(&s, "m2m-cmd/banned/x", "1", &[]);
    command(&s, "m2m-cmd/ghost/x", "1", &[]);
    let mut got = sub.take(2);
    got.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].topic, "m2m-resp/banned/x");
    assert!(got[0].payload.contains("denied"), "{:?}", got[0]);
    assert_eq!(got[1].topic, "m2m-resp/ghost/x");
    assert!(got[1].payload.contains("unknown peer"), "{:?}", got[1]);
    // Lift the deny, keep the endpoint.
    let peers = TempPath::with_contents(
        "downlink-unban",
        "toml",
        format!(
            "[[peer]]\nname = \"banned\"\nprefix = [\"{}/32\"]\nendpoint = \"{}:5683\"\n",
            DEV_V4[1], DEV_V4[1]
        ),
    );
    let out = std::process::Command::new(BIN)
        .args(["ctl", "--socket", &s.daemon.socket, "peer", "import"])
        .arg(&*peers)
        .arg("--replace")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    command(&s, "m2m-cmd/banned/x", "2", &[]);
    let (req, _) = recv(&banned);
    assert_eq!(
        Message::decode(&req).unwrap().payload,
        b"2",
        "the refused command was never sent"
    );
    s.daemon.stop();
}

/// Answers the request `req` with a piggybacked 2.04.
fn ack(dev: &UdpSocket, req: &[u8], from: SocketAddr) {
    let m = Message::decode(req).unwrap();
    let mut ack = Vec::new();
    message::encode(&mut ack, ACK, code::CHANGED, m.mid, m.token, &[], b"ok");
    dev.send_to(&ack, from).unwrap();
}

/// The next request other than a retransmission of `mid`.
fn next_request_after(dev: &UdpSocket, mid: u16) -> (Vec<u8>, SocketAddr) {
    loop {
        let (req, from) = recv(dev);
        if Message::decode(&req).unwrap().mid != mid {
            return (req, from);
        }
    }
}

/// Issue 11, finding 0: a command that waited too long must not run late.
/// Commands wait behind the outstanding one (one per peer); while the
/// device sits on the first, the second ages past its time to live.
fn stale_commands_are_answered_expired_and_never_sent(downlink: &str, stale_props: &[&str]) {
    let s = setup_with("dl-ttl", downlink);
    let dev = device(&s, 0);
    let sub = subscriber(&s, "m2m-resp/#");
    command(&s, "m2m-cmd/meter/first", "1", &[]);
    let (first, from) = recv(&dev);
    let first_mid = Message::decode(&first).unwrap().mid;
    command(&s, "m2m-cmd/meter/stale", "2", stale_props);
    // Once the router shows the command waiting, it has held it since
    // before this moment: its time to live (1 s) has surely passed 1.1 s
    // later. (The sleep lets time pass; it synchronises nothing.)
    assert!(
        wait_for(DEADLINE, || s.daemon.counter("downlink", "waiting") == 1),
        "the second command never waited behind the first"
    );
    std::thread::sleep(Duration::from_millis(1100));
    ack(&dev, &first, from);
    let mut got = sub.take(2);
    got.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].topic, "m2m-resp/meter/first");
    assert!(
        got[0].content_type.contains("coap-code:2.04"),
        "{:?}",
        got[0]
    );
    assert_eq!(got[1].topic, "m2m-resp/meter/stale");
    assert!(
        got[1].content_type.contains("coap-code:expired") && got[1].payload.contains("expired"),
        "{:?}",
        got[1]
    );
    // A fresh command goes out next: the stale one was skipped, not sent.
    command(&s, "m2m-cmd/meter/fresh", "3", &[]);
    let (next, _) = next_request_after(&dev, first_mid);
    assert_eq!(
        Message::decode(&next).unwrap().payload,
        b"3",
        "not the stale command"
    );
    let count = |name| s.daemon.counter("downlink", name);
    assert_eq!(
        (
            count("commands"),
            count("sent"),
            count("expired"),
            count("waiting")
        ),
        (3, 2, 1, 0)
    );
    s.daemon.stop();
}

#[test]
fn a_command_older_than_command_ttl_is_expired_not_sent() {
    stale_commands_are_answered_expired_and_never_sent("command_ttl_s = 1", &[]);
}

#[test]
fn a_command_past_its_message_expiry_interval_is_expired_not_sent() {
    stale_commands_are_answered_expired_and_never_sent("", &["message-expiry-interval 1"]);
}

/// RFC 7252 section 4.2: a device that cannot process a request rejects it
/// with RST; the command's answer says so.
#[test]
fn a_device_reset_is_the_commands_answer() {
    let s = setup("dl-rst");
    let dev = device(&s, 0);
    let sub = subscriber(&s, "m2m-resp/#");
    command(&s, "m2m-cmd/meter/valve", "open", &["correlation-data r-1"]);
    let (req, from) = recv(&dev);
    let m = Message::decode(&req).unwrap();
    let mut rst = Vec::new();
    message::encode(&mut rst, RST, code::EMPTY, m.mid, &[], &[], &[]);
    dev.send_to(&rst, from).unwrap();
    let got = sub.take(1);
    assert_eq!(got.len(), 1);
    assert!(
        got[0].payload.contains("reset")
            && got[0].content_type.contains("r-1")
            && got[0].content_type.contains("coap-code:error"),
        "{:?}",
        got[0]
    );
    s.daemon.stop();
}

/// NSTART = 1 (RFC 7252 section 4.7): the second command waits until the
/// first is answered. Both are published before the device answers; what
/// it receives until then is the first request and its retransmission,
/// never the second.
#[test]
fn one_request_per_peer_at_a_time() {
    let s = setup("dl-nstart");
    let dev = device(&s, 0);
    let sub = subscriber(&s, "m2m-resp/#");
    command(&s, "m2m-cmd/meter/one", "1", &[]);
    let (first, from) = recv(&dev);
    command(&s, "m2m-cmd/meter/two", "2", &[]);
    // The retransmission comes at least ACK_TIMEOUT after the first
    // transmission, long after the second command reached the router.
    let (again, _) = recv(&dev);
    let (m1, m1b) = (
        Message::decode(&first).unwrap(),
        Message::decode(&again).unwrap(),
    );
    assert_eq!((m1.payload, m1b.payload), (&b"1"[..], &b"1"[..]));
    assert_eq!(
        m1.mid, m1b.mid,
        "a retransmission of the first, not the second"
    );
    ack(&dev, &first, from);
    let (second, from) = next_request_after(&dev, m1.mid);
    assert_eq!(Message::decode(&second).unwrap().payload, b"2");
    ack(&dev, &second, from);
    let mut got = sub.take(2);
    got.sort_by(|a, b| a.topic.cmp(&b.topic));
    let topics: Vec<&str> = got.iter().map(|r| r.topic.as_str()).collect();
    assert_eq!(topics, ["m2m-resp/meter/one", "m2m-resp/meter/two"]);
    s.daemon.stop();
}

/// A CON response nobody asked for is rejected with RST (section 4.2).
#[test]
fn an_unsolicited_response_gets_rst() {
    let s = setup("dl-unsolicited");
    let dev = device(&s, 0);
    let mut resp = Vec::new();
    message::encode(&mut resp, CON, code::CONTENT, 0x4242, b"tk", &[], b"?");
    dev.send_to(&resp, SocketAddr::new(GW_V4.into(), 5683))
        .unwrap();
    let (reply, _) = recv(&dev);
    let r = Message::decode(&reply).unwrap();
    assert_eq!((r.mtype, r.code, r.mid), (RST, code::EMPTY, 0x4242));
    s.daemon.stop();
}

/// RFC 7959 against a stock device: libcoap's coap-server (`-d`: resources
/// created by PUT) at a configured endpoint. A 5,000-byte command payload
/// goes in 256-byte Block1 blocks and creates the resource; a GET of it is
/// answered in Block2 blocks, fetched and published whole.
#[test]
fn a_large_command_goes_in_blocks_and_a_large_answer_is_fetched_whole() {
    let server_addr = DEV_V4[2];
    // The text lands in [downlink]; the [[peer]] after it is a table of its own.
    let s = setup_with(
        "dl-blocks",
        &format!(
            "block_size = 256\n[[peer]]\nname = \"server\"\nprefix = [\"{server_addr}/32\"]\nendpoint = \"{server_addr}:5683\"\n"
        ),
    );
    let server = CoapServer::start(
        &s.topo.dev,
        "coap-server-notls",
        SocketAddr::new(server_addr.into(), 5683),
        &["-A", &server_addr.to_string(), "-d", "10"],
    );
    let sub = subscriber(&s, "m2m-resp/#");
    let body: String = (0..5000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    command(
        &s,
        "m2m-cmd/server/store",
        &body,
        &["user-property method PUT"],
    );
    let got = sub.take(1);
    assert_eq!(got.len(), 1, "no answer to the PUT");
    assert!(
        got[0].content_type.contains("coap-code:2.01"),
        "the resource was not created: {:?}",
        got[0]
    );
    command(
        &s,
        "m2m-cmd/server/store",
        "",
        &["user-property method GET"],
    );
    let got = sub.take(1);
    assert_eq!(got.len(), 1, "no answer to the GET");
    assert!(
        got[0].content_type.contains("coap-code:2.05"),
        "{:?}",
        got[0].content_type
    );
    assert!(
        got[0].payload == body,
        "{} bytes came back: {:?}",
        got[0].payload.len(),
        &got[0].payload[..got[0].payload.len().min(80)]
    );
    assert_eq!(s.daemon.counter("downlink", "answered"), 2);
    // 20 Block1 blocks of 256 bytes (19 after the first), then the GET's
    // Block2 blocks after its first (libcoap sends at most 1,024 bytes in
    // one: at least 4 more).
    let blocks = s.daemon.counter("downlink", "blocks");
    assert!(blocks >= 19 + 4, "{blocks} further block requests");
    drop(server);
    s.daemon.stop();
}

/// Queue mode (sleepy devices): commands to a peer that has sent nothing
/// yet are held, answered "queued", and sent in order as soon as the
/// device is heard from; a command held past its time to live is answered
/// "expired" without the device ever waking.
#[test]
fn commands_for_a_sleeping_device_wait_until_it_is_heard_from() {
    let s = setup_with(
        "dl-sleepy",
        &format!(
            "[[peer]]\nname = \"sleeper\"\nprefix = [\"{}/32\"]\n",
            DEV_V4[3]
        ),
    );
    let sub = subscriber(&s, "m2m-resp/#");
    command(&s, "m2m-cmd/meter/valve", "open", &[]);
    command(&s, "m2m-cmd/meter/valve", "close", &[]);
    let got = sub.take(2);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got.iter()
            .all(|r| r.content_type.contains("coap-code:queued")),
        "{got:?}"
    );
    // The device wakes up and sends an uplink: its ACK and the first
    // command come back, in either order.
    let dev = s.topo.device_socket(IpAddr::V4(DEV_V4[0]));
    dev.set_read_timeout(Some(DEADLINE)).unwrap();
    dev.send_to(&coap_post(1, b"awake"), SocketAddr::new(GW_V4.into(), 5683))
        .unwrap();
    let mut commands = Vec::new();
    while commands.is_empty() {
        let (datagram, from) = recv(&dev);
        let m = Message::decode(&datagram).unwrap();
        if m.mtype == CON {
            commands.push((datagram.clone(), from));
        }
    }
    let (req, from) = commands.pop().unwrap();
    let open = Message::decode(&req).unwrap().mid;
    assert_eq!(Message::decode(&req).unwrap().payload, b"open", "in order");
    ack(&dev, &req, from);
    // The uplink's ACK may come after "open", and on a loaded machine
    // "open" may have been retransmitted before our ACK got there: skip
    // both.
    let (req, from) = loop {
        let (req, from) = recv(&dev);
        let m = Message::decode(&req).unwrap();
        if m.mtype == CON && m.mid != open {
            break (req, from);
        }
    };
    assert_eq!(Message::decode(&req).unwrap().payload, b"close");
    ack(&dev, &req, from);
    let answers = sub.take(2);
    assert!(
        answers
            .iter()
            .all(|r| r.content_type.contains("coap-code:2.04")),
        "{answers:?}"
    );
    assert_eq!(s.daemon.counter("downlink", "wakes"), 1);
    // A peer never heard from: held, then expired (MQTT 5 expiry 1 s).
    command(&s, "m2m-cmd/sleeper/x", "1", &["message-expiry-interval 1"]);
    let got = sub.take(2);
    let codes: Vec<bool> = got
        .iter()
        .map(|r| r.content_type.contains("coap-code:queued"))
        .collect();
    assert_eq!(codes, vec![true, false], "{got:?}");
    assert!(got[1].content_type.contains("coap-code:expired"), "{got:?}");
    s.daemon.stop();
}
