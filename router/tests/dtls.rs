//! CoAP over DTLS end to end (RFC 7252 section 9): libcoap's
//! `coap-client-openssl` and `coap-client-gnutls` as devices with pre-shared
//! keys, and the test kit's own DTLS client where the test must choose the
//! messages; `mosquitto_sub` on the embedded broker.
//!
//! Privileged: needs root (network namespaces).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use m2m_router::coap::message::{self, code, option, Message, ACK, CON};
use m2m_router_tests::certs::{Issued, Names, Pki};
use m2m_router_tests::daemon::Daemon;
use m2m_router_tests::dtls::DtlsClient;
use m2m_router_tests::libcoap::{CoapClient, CoapServer};
use m2m_router_tests::mqtt::{mosquitto_pub, MosquittoSub, Received};
use m2m_router_tests::netns::{wait_for, Topology, DEADLINE, DEV_V4, DEV_V6, GW_V4, GW_V6};
use m2m_router_tests::packet::coap_post;
use m2m_router_tests::{require_root, TempPath};

const BIN: &str = env!("CARGO_BIN_EXE_m2m-router");
const IDENTITY: &str = "meter-1";
/// libcoap's `-k` takes the key as text; the config has its bytes in hex.
const KEY: &str = "meter-secret-0123";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Peer "meter" is known by its PSK only (no prefix): whatever address a
/// session comes from, it is "meter". Peer "valve" sends from the device
/// side's address 0 and must use DTLS. `dtls` goes in `[dtls]`, `extra`
/// at the end.
fn config(dtls: &str, extra: &str) -> String {
    format!(
        r#"
        [defaults]
        rate = "unlimited"
        [coap]
        listen_dtls = ["0.0.0.0:5684", "[::]:5684"]
        [dtls]
        handshake_timeout_s = 3
        {dtls}
        [[peer]]
        name = "meter"
        psk_identity = "{IDENTITY}"
        psk_hex = "{}"
        [[peer]]
        name = "valve"
        prefix = ["{}/32"]
        psk_identity = "valve-1"
        psk_hex = "00112233445566778899aabbccddeeff"
        require_dtls = true
        {extra}
        "#,
        hex(KEY.as_bytes()),
        DEV_V4[0],
    )
}

struct Gateway {
    topo: Topology,
    daemon: Daemon,
    _config: TempPath,
}

impl Gateway {
    fn start(tag: &str) -> Gateway {
        Gateway::with(tag, "", "")
    }

    /// A gateway with `dtls` in the `[dtls]` section and `extra` at the end
    /// of the config.
    fn with(tag: &str, dtls: &str, extra: &str) -> Gateway {
        require_root();
        let topo = Topology::new(tag);
        let config = TempPath::with_contents(&format!("dtls-{tag}"), "toml", config(dtls, extra));
        let daemon = Daemon::on_gateway(&topo.gw, BIN, config.as_str());
        Gateway {
            topo,
            daemon,
            _config: config,
        }
    }

    /// libcoap's client `program` in the device namespace, from `src`;
    /// its PDU trace (-v 6).
    fn coap_client(&self, program: &str, src: IpAddr, args: &[&str]) -> String {
        let out = self
            .topo
            .dev
            .command(program)
            .args(["-B", "5", "-v", "6", "-a", &src.to_string()])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program} (Debian package libcoap3-bin): {e}"));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn dtls(&self, name: &str) -> u64 {
        self.daemon.counter("dtls", name)
    }

    /// A session of the test kit's client from `src` to the CoAPS port.
    fn session(&self, src: IpAddr, identity: &str, key: &[u8]) -> Result<DtlsClient, String> {
        DtlsClient::connect_psk(self.coaps_socket(src), identity, key, DEADLINE)
    }

    /// A device socket at `src` connected to the CoAPS port.
    fn coaps_socket(&self, src: IpAddr) -> std::net::UdpSocket {
        let sock = self.topo.device_socket(src);
        let dst: IpAddr = if src.is_ipv4() {
            GW_V4.into()
        } else {
            GW_V6.into()
        };
        sock.connect(SocketAddr::new(dst, 5684)).unwrap();
        sock
    }
}

/// The issue's interop case: both libcoap builds POST over coaps:// with
/// `-u IDENTITY -k KEY`, over IPv4 and IPv6, from addresses no peer has:
/// each message is acknowledged and published under the peer the identity
/// names; a GET over DTLS reads the value back.
#[test]
fn libcoap_psk_clients_publish_under_the_peer_their_identity_names() {
    let gw = Gateway::start("psk");
    let mut sub = MosquittoSub::start(&gw.topo.gw, &["m2m/#"], &[]);
    let cases = [
        (
            "coap-client-openssl",
            IpAddr::from(DEV_V4[1]),
            format!("coaps://{GW_V4}"),
        ),
        (
            "coap-client-gnutls",
            IpAddr::from(DEV_V4[2]),
            format!("coaps://{GW_V4}"),
        ),
        (
            "coap-client-openssl",
            IpAddr::from(DEV_V6[1]),
            format!("coaps://[{GW_V6}]"),
        ),
    ];
    for (i, (program, src, base)) in cases.iter().enumerate() {
        let uri = format!("{base}/sensors/s{i}");
        let payload = format!("{program}-{i}");
        let trace = gw.coap_client(
            program,
            *src,
            &[
                "-u", IDENTITY, "-k", KEY, "-m", "post", "-e", &payload, &uri,
            ],
        );
        assert!(
            trace.contains("t:ACK c:2.04"),
            "{program} from {src}: no 2.04\n{trace}"
        );
    }
    let got = sorted(&sub, cases.len());
    assert_eq!(
        got,
        vec![
            (
                "m2m/meter/sensors/s0".into(),
                "coap-client-openssl-0".into()
            ),
            ("m2m/meter/sensors/s1".into(), "coap-client-gnutls-1".into()),
            (
                "m2m/meter/sensors/s2".into(),
                "coap-client-openssl-2".into()
            ),
        ]
    );
    assert_eq!(sub.fence(), vec![], "published more than once");
    let trace = gw.coap_client(
        "coap-client-gnutls",
        DEV_V4[3].into(),
        &[
            "-u",
            IDENTITY,
            "-k",
            KEY,
            "-m",
            "get",
            &format!("coaps://{GW_V4}/sensors/s0"),
        ],
    );
    assert!(
        trace.contains("c:2.05") && trace.contains("coap-client-openssl-0"),
        "{trace}"
    );
    assert!(gw.dtls("handshakes") >= 4, "{}", gw.dtls("handshakes"));
    assert!(
        gw.dtls("hello_verify") >= 4,
        "every handshake began with a cookie"
    );
    gw.daemon.stop();
}

/// A wrong key fails the handshake and an unknown identity is refused:
/// nothing is published, and each failure is counted.
#[test]
fn a_wrong_key_or_an_unknown_identity_publishes_nothing() {
    let gw = Gateway::start("badkey");
    let mut sub = MosquittoSub::start(&gw.topo.gw, &["m2m/#"], &[]);
    let uri = format!("coaps://{GW_V4}/sensors/temp");
    let src = IpAddr::from(DEV_V4[1]);
    let trace = gw.coap_client(
        "coap-client-openssl",
        src,
        &[
            "-u",
            IDENTITY,
            "-k",
            "not-the-key",
            "-m",
            "post",
            "-e",
            "x",
            &uri,
        ],
    );
    assert!(
        !trace.contains("c:2.04"),
        "a wrong key was accepted:\n{trace}"
    );
    let trace = gw.coap_client(
        "coap-client-gnutls",
        src,
        &["-u", "nobody", "-k", KEY, "-m", "post", "-e", "y", &uri],
    );
    assert!(
        !trace.contains("c:2.04"),
        "an unknown identity was accepted:\n{trace}"
    );
    assert!(
        wait_for(DEADLINE, || gw.dtls("unknown_identity") >= 1),
        "the unknown identity was not counted"
    );
    // A Finished under the wrong key does not decrypt; DTLS drops such
    // records silently (RFC 6347 section 4.1.2.7), so that handshake ends
    // by an alert from the client or at dtls.handshake_timeout_s.
    assert!(
        wait_for(DEADLINE, || gw.dtls("handshake_failures")
            + gw.dtls("handshake_timeouts")
            >= 2),
        "failures {} timeouts {}",
        gw.dtls("handshake_failures"),
        gw.dtls("handshake_timeouts")
    );
    assert_eq!(gw.dtls("handshakes"), 0);
    assert!(wait_for(DEADLINE, || gw.dtls("handshaking") == 0));
    assert_eq!(sub.fence(), vec![], "nothing is published");
    gw.daemon.stop();
}

/// The same identity from a new address (IPv4, then IPv6) and port stays
/// one peer: a message repeated over the second session with the first's
/// Message ID is answered from the duplicate cache, not published again,
/// and the peer's messages arrive in order. The new handshake closes the
/// old session (OpenSSL has no Connection ID to move it); `ctl dtls ls`
/// lists the new one under the peer's name.
#[test]
fn one_identity_from_two_addresses_is_one_peer() {
    let gw = Gateway::start("roam");
    let mut sub = MosquittoSub::start(&gw.topo.gw, &["m2m/meter/#"], &[]);
    let mut first = gw
        .session(DEV_V4[1].into(), IDENTITY, KEY.as_bytes())
        .expect("first session");
    post(&mut first, 7, b"one");
    let mut second = gw
        .session(DEV_V6[1].into(), IDENTITY, KEY.as_bytes())
        .expect("second session");
    let listed = gw.daemon.ctl_json(&["dtls", "ls"]);
    let sessions = listed["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{listed}");
    assert_eq!(sessions[0]["peer"], "meter", "{listed}");
    assert!(
        sessions[0]["address"].as_str().unwrap().starts_with('['),
        "{listed}"
    );
    assert!(
        sessions[0]["cipher"].as_str().unwrap().contains("CCM8"),
        "{listed}"
    );
    assert_eq!(gw.dtls("replaced"), 1);
    assert_eq!(
        first.receive(DEADLINE),
        None,
        "the old session got a close_notify"
    );
    let duplicates = gw.daemon.counter("coap", "duplicates");
    // The device lost the first ACK and moved: it sends MID 7 again.
    post(&mut second, 7, b"one");
    assert_eq!(gw.daemon.counter("coap", "duplicates"), duplicates + 1);
    for (mid, payload) in [(8u16, "two"), (9, "three")] {
        let answer = second
            .exchange(&coap_post(mid, payload.as_bytes()), DEADLINE)
            .expect("an answer");
        assert_eq!(Message::decode(&answer).unwrap().code, code::CHANGED);
    }
    let got: Vec<String> = sub.take(3).into_iter().map(|r| r.payload).collect();
    assert_eq!(got, vec!["one", "two", "three"]);
    assert_eq!(sub.fence(), vec![], "published once each");
    first.close();
    second.close();
    assert!(
        wait_for(DEADLINE, || gw.dtls("sessions") == 0),
        "close_notify ends the sessions"
    );
    gw.daemon.stop();
}

/// A peer with `require_dtls` is not its address: its plain CoAP is
/// dropped by XDP with a reason of its own (never reaching the workers),
/// its DTLS session is served.
#[test]
fn a_peer_that_must_use_dtls_is_not_served_in_plain_coap() {
    let gw = Gateway::start("require");
    let mut sub = MosquittoSub::start(&gw.topo.gw, &["m2m/#"], &[]);
    let sock = gw.topo.device_socket(DEV_V4[0].into());
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let gw_plain = SocketAddr::new(GW_V4.into(), 5683);
    sock.send_to(&coap_post(1, b"plain"), gw_plain).unwrap();
    let dropped = || {
        gw.daemon.ctl_json(&["stats"])["verdicts"]["drop_requires_dtls"]["packets"]
            .as_u64()
            .unwrap_or(0)
    };
    assert!(
        wait_for(DEADLINE, || dropped() >= 1),
        "plain CoAP from a require_dtls peer was not dropped in XDP"
    );
    let mut buf = [0u8; 64];
    assert!(sock.recv_from(&mut buf).is_err(), "no answer in plain CoAP");
    assert_eq!(
        gw.daemon.counter("coap", "received"),
        0,
        "it never reached a worker"
    );
    let mut session = gw
        .session(
            DEV_V4[0].into(),
            "valve-1",
            &[
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff,
            ],
        )
        .expect("session");
    post(&mut session, 2, b"secure");
    let got = sub.take(1);
    assert_eq!(
        (got[0].topic.as_str(), got[0].payload.as_str()),
        ("m2m/valve/sensors/temp", "secure")
    );
    assert_eq!(sub.fence(), vec![]);
    gw.daemon.stop();
}

/// Block-wise over DTLS (RFC 7959 through the same uplink): libcoap sends
/// a 20 KiB body in 256-byte Block1 blocks over one session; it is
/// published once, whole, under the identity's peer.
#[test]
fn a_body_in_blocks_over_dtls_arrives_whole() {
    let gw = Gateway::start("blocks");
    let mut sub = MosquittoSub::start(&gw.topo.gw, &["m2m/meter/#"], &[]);
    let body: String = (0..20 * 1024)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let file = TempPath::with_contents("dtls-body", "txt", body.clone());
    let trace = gw.coap_client(
        "coap-client-openssl",
        DEV_V4[1].into(),
        &[
            "-u",
            IDENTITY,
            "-k",
            KEY,
            "-b",
            "256",
            "-m",
            "post",
            "-f",
            file.as_str(),
            &format!("coaps://{GW_V4}/logs/boot"),
        ],
    );
    assert!(trace.contains("c:2.04"), "{trace}");
    let got = sub.take(1);
    assert_eq!(got[0].topic, "m2m/meter/logs/boot");
    assert!(
        got[0].payload == body,
        "the body arrived whole ({} bytes)",
        got[0].payload.len()
    );
    assert_eq!(sub.fence(), vec![], "published once");
    assert!(gw.daemon.counter("coap", "blocks") >= 80);
    gw.daemon.stop();
}

/// Observe over DTLS with a stock client: libcoap's GnuTLS build observes
/// `ps/<topic>` over IPv6 with its PSK (`-s`), as the peer its identity
/// names (whose `subscribe` lets it read the topic; `ctl observe ls` names
/// it), and prints each state
/// mosquitto_pub publishes there, in order, each sent over its session.
#[test]
fn coap_client_observes_a_topic_over_dtls() {
    let gw = Gateway::with(
        "observe",
        "",
        &format!(
            "[[peer]]\nname = \"watcher\"\npsk_identity = \"watcher-1\"\npsk_hex = \"{}\"\nsubscribe = [\"plant/#\"]\n",
            hex(KEY.as_bytes())
        ),
    );
    let client = CoapClient::spawn(
        &gw.topo.dev,
        "coap-client-gnutls",
        &[
            "-a",
            &DEV_V6[1].to_string(),
            "-u",
            "watcher-1",
            "-k",
            KEY,
            "-s",
            "120",
            "-w",
            "-m",
            "get",
            &format!("coaps://[{GW_V6}]/ps/plant/valve"),
        ],
    );
    gw.daemon.wait_ctl(&["stats"], DEADLINE, |v| {
        v["downlink"]["observers"].as_u64() == Some(1)
    });
    let ls = gw.daemon.ctl_json(&["observe", "ls"]);
    let observer = &ls["observers"][0];
    assert_eq!(
        (&observer["peer"], &observer["topic"]),
        (
            &serde_json::json!("watcher"),
            &serde_json::json!("plant/valve")
        ),
        "the observer is the peer of its session: {ls}"
    );
    let sent = gw.dtls("downlink_sent");
    for i in 1..=3 {
        let state = format!("state-{i}");
        mosquitto_pub(&gw.topo.gw, "plant/valve", &state, &[]);
        assert_eq!(client.next_line_starting("state-"), state, "in order");
    }
    assert!(
        gw.dtls("downlink_sent") >= sent + 3,
        "the notifications went over the session"
    );
    drop(client);
    gw.daemon.stop();
}

/// Certificate mode (RFC 7252 section 9.1.3.3): a device is the peer whose
/// `cert_name` its certificate names (subject CN or a SAN), whatever its
/// address. libcoap's OpenSSL client with `-c -j -C` publishes under its
/// peer over IPv4 and IPv6, checking the gateway's certificate; the kit's
/// client, named by a URI SAN, publishes, and resumes its session from a
/// new address without a new key exchange. A certificate from another CA,
/// or one whose names no peer has, gets no session and publishes nothing;
/// a peer added at run time with `--cert-name` is known at once.
#[test]
fn certificate_mode_names_the_peer_by_its_certificate() {
    let pki = Pki::new("dtls-cert");
    let gateway = pki.issue(
        &GW_V4.to_string(),
        &Names {
            ip: &[&GW_V4.to_string(), &GW_V6.to_string()],
            ..Names::default()
        },
    );
    let sensor = pki.issue("sensor-7.example", &Names::default());
    let valve = pki.issue(
        "valve device",
        &Names {
            uri: &["urn:dev:ops:valve-2"],
            ..Names::default()
        },
    );
    let stranger = pki.issue("stranger.example", &Names::default());
    let late = pki.issue("late.example", &Names::default());
    let foreign = Pki::new("dtls-foreign").issue("sensor-7.example", &Names::default());
    let gw = Gateway::with(
        "cert",
        &certificate_mode(&pki, &gateway),
        r#"
        [[peer]]
        name = "sensor"
        cert_name = "sensor-7.example"
        [[peer]]
        name = "valve2"
        cert_name = "urn:dev:ops:valve-2"
        "#,
    );
    let mut sub = MosquittoSub::start(&gw.topo.gw, &["m2m/#"], &[]);
    for (i, (src, base)) in [
        (IpAddr::from(DEV_V4[1]), format!("coaps://{GW_V4}")),
        (IpAddr::from(DEV_V6[1]), format!("coaps://[{GW_V6}]")),
    ]
    .into_iter()
    .enumerate()
    {
        let trace = gw.coap_client(
            "coap-client-openssl",
            src,
            &[
                "-c",
                sensor.cert_file.as_str(),
                "-j",
                sensor.key_file.as_str(),
                "-C",
                pki.ca.cert_file.as_str(),
                "-m",
                "post",
                "-e",
                &format!("libcoap-{i}"),
                &format!("{base}/temp/t{i}"),
            ],
        );
        assert!(
            trace.contains("t:ACK c:2.04"),
            "from {src}: no 2.04\n{trace}"
        );
    }
    let got = sorted(&sub, 2);
    assert_eq!(
        got,
        vec![
            ("m2m/sensor/temp/t0".into(), "libcoap-0".into()),
            ("m2m/sensor/temp/t1".into(), "libcoap-1".into()),
        ]
    );

    // The kit's client: named by its URI SAN, then resumed elsewhere.
    let ca = &pki.ca.cert;
    let mut first = DtlsClient::connect_certificate(
        gw.coaps_socket(DEV_V4[2].into()),
        &valve,
        ca,
        None,
        DEADLINE,
    )
    .expect("a session for valve2's certificate");
    post(&mut first, 1, b"full");
    let session = first.session().expect("a session to resume");
    first.close();
    let handshakes = gw.dtls("handshakes");
    let mut resumed = DtlsClient::connect_certificate(
        gw.coaps_socket(DEV_V6[2].into()),
        &valve,
        ca,
        Some(&session),
        DEADLINE,
    )
    .expect("a resumed session");
    assert!(resumed.resumed(), "the gateway resumed the session");
    post(&mut resumed, 2, b"resumed");
    assert_eq!(gw.dtls("handshakes"), handshakes + 1);
    let listed = gw.daemon.ctl_json(&["dtls", "ls"]);
    let sessions = listed["sessions"].as_array().unwrap();
    let valve_session = sessions
        .iter()
        .find(|s| s["peer"] == "valve2")
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(valve_session["resumed"], true, "{listed}");
    assert!(
        valve_session["cipher"]
            .as_str()
            .unwrap()
            .starts_with("ECDHE-ECDSA"),
        "{listed}"
    );
    let got = sorted(&sub, 2);
    assert_eq!(
        got,
        vec![
            ("m2m/valve2/sensors/temp".into(), "full".into()),
            ("m2m/valve2/sensors/temp".into(), "resumed".into()),
        ]
    );

    // Refused: a name no peer has, a CA the gateway does not trust.
    let failures = gw.dtls("handshake_failures");
    let unknown = gw.dtls("unknown_identity");
    for (device, src) in [
        (&stranger, IpAddr::from(DEV_V4[3])),
        (&foreign, DEV_V6[3].into()),
    ] {
        let refused =
            DtlsClient::connect_certificate(gw.coaps_socket(src), device, ca, None, DEADLINE);
        assert!(
            refused.is_err(),
            "{} got a session",
            device.cert_file.display()
        );
    }
    assert_eq!(gw.dtls("unknown_identity"), unknown + 1, "the stranger");
    assert!(
        wait_for(DEADLINE, || gw.dtls("handshake_failures") == failures + 2),
        "both refusals counted as failures: {}",
        gw.dtls("handshake_failures") - failures
    );
    // Counted by the alert the gateway sent (RFC 5246 section 7.2).
    let dtls = &gw.daemon.ctl_json(&["stats"])["dtls"];
    assert_eq!(dtls["alert_sent_unknown_ca"], 1, "{dtls}");
    assert_eq!(dtls["alert_sent_handshake_failure"], 1, "{dtls}");

    // A peer added at run time is known at the next handshake.
    gw.daemon
        .ctl_json(&["peer", "add", "latecomer", "--cert-name", "late.example"]);
    let mut client = DtlsClient::connect_certificate(
        gw.coaps_socket(DEV_V4[3].into()),
        &late,
        ca,
        None,
        DEADLINE,
    )
    .expect("a session for the peer added at run time");
    post(&mut client, 1, b"late");
    let got = sub.take(1);
    assert_eq!(got[0].topic, "m2m/latecomer/sensors/temp");
    assert_eq!(sub.fence(), vec![], "nothing else was published");
    gw.daemon.stop();
}

/// The `[dtls]` lines of certificate mode: the gateway shows `gateway`,
/// and trusts `pki`'s CA.
fn certificate_mode(pki: &Pki, gateway: &Issued) -> String {
    format!(
        "certificate = \"{}\"\nprivate_key = \"{}\"\nca_file = \"{}\"",
        gateway.cert_file.as_str(),
        gateway.key_file.as_str(),
        pki.ca.cert_file.as_str()
    )
}

/// The next `n` messages `sub` receives, as (topic, payload), sorted.
fn sorted(sub: &MosquittoSub, n: usize) -> Vec<(String, String)> {
    let mut got: Vec<_> = sub
        .take(n)
        .into_iter()
        .map(|r| (r.topic, r.payload))
        .collect();
    got.sort();
    got
}

/// POSTs `payload` as CON `mid` over `session`; the gateway must answer
/// 2.04 (it published the message).
fn post(session: &mut DtlsClient, mid: u16, payload: &[u8]) {
    let answer = session
        .exchange(&coap_post(mid, payload), DEADLINE)
        .expect("an answer");
    assert_eq!(Message::decode(&answer).unwrap().code, code::CHANGED);
}

/// The next message the gateway sends over `session` that `wanted`
/// accepts (answers to the device's own uplinks come in between).
fn next_from_gateway(session: &mut DtlsClient, wanted: impl Fn(&Message) -> bool) -> Vec<u8> {
    let end = std::time::Instant::now() + DEADLINE;
    while std::time::Instant::now() < end {
        if let Some(m) = session.receive(Duration::from_secs(1)) {
            if wanted(&Message::decode(&m).expect("CoAP over the session")) {
                return m;
            }
        }
    }
    panic!("nothing the test waited for came over the session");
}

fn uri_path(m: &Message) -> String {
    m.options()
        .filter(|(n, _)| *n == option::URI_PATH)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Everything the gateway originates reaches a DTLS device over its
/// session, the device being the peer its PSK names (it has no prefix):
/// the watch the config asks for registers over the session and its
/// notifications are published under the peer; an MQTT command arrives as
/// a CON request and the device's answer is published; the device observes
/// a topic through the pubsub prefix and gets its notification. Once the
/// session is closed, a command is not sent in plain CoAP: it is counted
/// (`dtls.downlink_no_session`) and waits for the device to come back.
#[test]
fn commands_notifications_and_watches_reach_a_dtls_device_over_its_session() {
    const SENSOR_KEY: &[u8] = b"sensor9-secret";
    let gw = Gateway::with(
        "downlink",
        "",
        &format!(
            r#"
            [[peer]]
            name = "sensor9"
            psk_identity = "s9"
            psk_hex = "{}"
            subscribe = ["plant/{{peer}}/#"]
            observe = ["sensors/temp"]
            "#,
            hex(SENSOR_KEY)
        ),
    );
    let data = MosquittoSub::start(&gw.topo.gw, &["m2m/#"], &[]);
    let responses = MosquittoSub::start(&gw.topo.gw, &["m2m-resp/#"], &["-F", "%t|%p|%D %P"]);
    let mut session = gw
        .session(DEV_V4[1].into(), "s9", SENSOR_KEY)
        .expect("a session");
    post(&mut session, 1, b"hello");
    assert_eq!(data.take(1)[0].topic, "m2m/sensor9/sensors/temp");

    // The watch: heard from, the device is registered on over its session.
    let registration = next_from_gateway(&mut session, |m| {
        m.code == code::GET && uri_path(m) == "sensors/temp"
    });
    let reg = Message::decode(&registration).unwrap();
    assert_eq!(reg.mtype, CON);
    let token = reg.token.to_vec();
    let mut out = Vec::new();
    let mut seq = [0u8; 4];
    message::encode(
        &mut out,
        ACK,
        code::CONTENT,
        reg.mid,
        &token,
        &[(option::OBSERVE, message::uint_bytes(1, &mut seq))],
        b"20.5",
    );
    session.send(&out);
    let got = data.take(1);
    assert_eq!(
        (got[0].topic.as_str(), got[0].payload.as_str()),
        ("m2m/sensor9/sensors/temp", "20.5")
    );
    message::encode(
        &mut out,
        CON,
        code::CONTENT,
        0x7001,
        &token,
        &[(option::OBSERVE, message::uint_bytes(2, &mut seq))],
        b"21.0",
    );
    session.send(&out);
    let ack = next_from_gateway(&mut session, |m| m.mtype == ACK && m.mid == 0x7001);
    assert_eq!(Message::decode(&ack).unwrap().code, code::EMPTY);
    assert_eq!(data.take(1)[0].payload, "21.0");

    // A command, and the device's answer.
    mosquitto_pub(&gw.topo.gw, "m2m-cmd/sensor9/actuators/valve", "open", &[]);
    let request = next_from_gateway(&mut session, |m| m.code == code::POST);
    let req = Message::decode(&request).unwrap();
    assert_eq!(
        (req.mtype, uri_path(&req).as_str(), req.payload),
        (CON, "actuators/valve", &b"open"[..])
    );
    message::encode(
        &mut out,
        ACK,
        code::CHANGED,
        req.mid,
        req.token,
        &[],
        b"opened",
    );
    session.send(&out);
    let got = responses.take(1);
    assert_eq!(
        (got[0].topic.as_str(), got[0].payload.as_str()),
        ("m2m-resp/sensor9/actuators/valve", "opened")
    );
    assert!(got[0].content_type.contains("coap-code:2.04"), "{got:?}");

    // The device observes a topic it may read.
    message::encode(
        &mut out,
        CON,
        code::GET,
        0x7002,
        &[0xab; 4],
        &[
            (option::OBSERVE, &[][..]),
            (option::URI_PATH, b"ps"),
            (option::URI_PATH, b"plant"),
            (option::URI_PATH, b"sensor9"),
            (option::URI_PATH, b"setpoint"),
        ],
        b"",
    );
    session.send(&out);
    let registered = next_from_gateway(&mut session, |m| m.mid == 0x7002);
    let registered = Message::decode(&registered).unwrap();
    assert!(
        registered.options().any(|(n, _)| n == option::OBSERVE),
        "registered: the answer carries Observe (RFC 7641 section 4.1)"
    );
    mosquitto_pub(&gw.topo.gw, "plant/sensor9/setpoint", "18", &[]);
    let notification = next_from_gateway(&mut session, |m| m.token == [0xab; 4]);
    let n = Message::decode(&notification).unwrap();
    assert_eq!((n.code, n.payload), (code::CONTENT, &b"18"[..]));
    if n.mtype == CON {
        message::encode(&mut out, ACK, code::EMPTY, n.mid, &[], &[], b"");
        session.send(&out);
    }
    let sent = gw.dtls("downlink_sent");
    assert!(
        sent >= 4,
        "registration, two ACKs, command, notification: {sent}"
    );

    // No session, no plain CoAP: the command is counted and waits.
    session.close();
    assert!(wait_for(DEADLINE, || gw.dtls("sessions") == 0));
    mosquitto_pub(&gw.topo.gw, "m2m-cmd/sensor9/actuators/valve", "close", &[]);
    assert!(
        wait_for(DEADLINE, || gw.dtls("downlink_no_session") >= 1),
        "the command found no session"
    );
    assert_eq!(gw.dtls("downlink_sent"), sent, "nothing else went out");
    gw.daemon.stop();
}

/// The issue's flood: ClientHellos spoofed from 100,000 sources (addresses
/// the gateway has no route back to) while 100 real devices, each its own
/// peer, shake hands and publish 10 CON messages each. A ClientHello gets a
/// stateless cookie and nothing else (RFC 6347 section 4.2.1), so the
/// flood makes no session, evicts none, and leaves memory where it was; the
/// devices publish at least 99.9% of their messages.
#[test]
fn spoofed_client_hellos_do_not_keep_real_devices_out() {
    use m2m_router_tests::dtls::client_hello;
    use m2m_router_tests::packet::UdpFrame;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    const DEVICES: usize = 100;
    const MESSAGES: usize = 10;
    const SOURCES: u32 = 100_000;
    let key = |i: usize| format!("device-{i}-key").into_bytes();
    let mut peers = String::new();
    for i in 0..DEVICES {
        peers += &format!(
            "[[peer]]\nname = \"dev{i}\"\npsk_identity = \"dev-{i}\"\npsk_hex = \"{}\"\n",
            hex(&key(i))
        );
    }
    // Devices share the four device addresses: their handshakes must not
    // trip the per-source ClientHello rate.
    let gw = Gateway::with(
        "flood",
        "hello_rate = \"1000/s\"\nhello_burst = 200",
        &peers,
    );
    let mut sub = MosquittoSub::start(&gw.topo.gw, &["m2m/#"], &[]);
    let rss = || gw.daemon.counter("process", "rss_bytes");
    let rss_before = rss();

    let hello = client_hello("spoofed");
    let frames: Vec<Vec<u8>> = (0..SOURCES)
        .map(|k| {
            let src = std::net::Ipv4Addr::new(10, 200 + (k >> 16) as u8, (k >> 8) as u8, k as u8);
            UdpFrame::new(
                src.into(),
                GW_V4.into(),
                1024 + (k % 60_000) as u16,
                5684,
                hello.clone(),
            )
            .build()
        })
        .collect();
    let raw = gw.topo.raw_sender();
    let devices_done = Arc::new(AtomicBool::new(false));
    let flood_sent = Arc::new(AtomicUsize::new(0));
    let flood = {
        let (done, sent) = (devices_done.clone(), flood_sent.clone());
        std::thread::spawn(move || {
            // Round after round of the 100,000 sources until the devices
            // are through; paced so the test's own threads get the CPU too.
            let mut round = 0;
            while round == 0 || !done.load(Ordering::Relaxed) {
                for batch in frames.chunks(500) {
                    let mut taken = 0;
                    while taken < batch.len() {
                        // A full device queue takes part of a batch.
                        let n = raw.send_many(&batch[taken..]);
                        if n == 0 {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        taken += n;
                    }
                    sent.fetch_add(taken, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
                round += 1;
            }
        })
    };
    while flood_sent.load(Ordering::Relaxed) < 20_000 {
        std::thread::sleep(Duration::from_millis(10));
    }

    let devices: Vec<_> = (0..DEVICES)
        .map(|i| {
            let sock = gw.coaps_socket(DEV_V4[i % DEV_V4.len()].into());
            let key = key(i);
            std::thread::spawn(move || {
                let mut c = DtlsClient::connect_psk(sock, &format!("dev-{i}"), &key, DEADLINE * 3)
                    .unwrap_or_else(|e| panic!("device {i}: {e}"));
                let mut acknowledged = 0;
                for j in 0..MESSAGES {
                    let post = coap_post(j as u16 + 1, format!("{i}-{j}").as_bytes());
                    if let Some(answer) = c.exchange(&post, DEADLINE) {
                        acknowledged +=
                            usize::from(Message::decode(&answer).unwrap().code == code::CHANGED);
                    }
                }
                c.close();
                acknowledged
            })
        })
        .collect();
    let acknowledged: usize = devices.into_iter().map(|d| d.join().unwrap()).sum();
    devices_done.store(true, Ordering::Relaxed);
    flood.join().unwrap();

    let published: std::collections::HashSet<String> = sub
        .fence()
        .into_iter()
        .filter(|r| r.topic.ends_with("/sensors/temp"))
        .map(|r| r.payload)
        .collect();
    let wanted = DEVICES * MESSAGES;
    let stats = gw.daemon.ctl_json(&["stats"]);
    let dtls = &stats["dtls"];
    let growth = rss().saturating_sub(rss_before);
    let report = format!(
        "{} of {wanted} published, {acknowledged} acknowledged; flood: {} ClientHellos sent; \
         RSS grew {} KiB; dtls {dtls}",
        published.len(),
        flood_sent.load(Ordering::Relaxed),
        growth >> 10
    );
    eprintln!("{report}");
    assert!(published.len() * 1000 >= wanted * 999, "{report}");
    // Most of the flood reached the DTLS server (each got a cookie); a
    // loaded host may drop some in the socket buffer.
    assert!(
        dtls["hello_verify"].as_u64().unwrap() >= u64::from(SOURCES / 2),
        "the flood reached the DTLS server: {report}"
    );
    assert_eq!(dtls["evicted"], 0, "no device was evicted: {report}");
    assert_eq!(
        dtls["handshaking"], 0,
        "the flood left no handshake: {report}"
    );
    assert!(growth < 32 << 20, "memory stays bounded: {report}");
    gw.daemon.stop();
}

/// Sends an MQTT command to `peer` (PUT of `payload` to `path`, or GET when
/// `payload` is None) and returns its answer as `responses` got it.
fn command(
    gw: &Gateway,
    responses: &MosquittoSub,
    peer: &str,
    path: &str,
    payload: Option<&str>,
) -> Received {
    let method = if payload.is_some() { "PUT" } else { "GET" };
    mosquitto_pub(
        &gw.topo.gw,
        &format!("m2m-cmd/{peer}/{path}"),
        payload.unwrap_or(""),
        &[&format!("user-property method {method}")],
    );
    let mut got = responses.take(1);
    assert_eq!(got.len(), 1, "no answer to the {method} from {peer}");
    let answer = got.remove(0);
    assert_eq!(answer.topic, format!("m2m-resp/{peer}/{path}"));
    answer
}

/// The DTLS sessions `ctl dtls ls` lists, as (peer, address, opened_by,
/// cipher).
fn sessions(gw: &Gateway) -> Vec<(String, String, String, String)> {
    let listed = gw.daemon.ctl_json(&["dtls", "ls"]);
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    listed["sessions"]
        .as_array()
        .unwrap_or_else(|| panic!("{listed}"))
        .iter()
        .map(|s| {
            (
                text(&s["peer"]),
                text(&s["address"]),
                text(&s["opened_by"]),
                text(&s["cipher"]),
            )
        })
        .collect()
}

/// Devices that listen on DTLS (RFC 7252 section 9.1: either end may open
/// the session), each a peer with `endpoint = "coaps://..."`: libcoap's
/// `coap-server-openssl` over IPv4 and `coap-server-gnutls` over IPv6,
/// knowing the peer's PSK. An MQTT command opens a session from the
/// gateway's CoAPS socket (the devices' HelloVerifyRequests, DTLS 1.0
/// records, pass XDP), creates a resource with PUT and reads it back with
/// GET; the answers are published under the peer. A device that does not
/// know the peer's key gets no command: the handshake times out, and what
/// waited for it is counted.
#[test]
fn devices_listening_on_coaps_are_reached_with_the_peers_psk() {
    let devices = [
        (
            "coap-server-openssl",
            IpAddr::from(DEV_V4[2]),
            "srv-openssl",
            KEY,
        ),
        (
            "coap-server-gnutls",
            IpAddr::from(DEV_V6[2]),
            "srv-gnutls",
            KEY,
        ),
        (
            "coap-server-openssl",
            IpAddr::from(DEV_V4[3]),
            "liar",
            "another-key-0123",
        ),
    ];
    let peers: String = devices
        .iter()
        .map(|(_, ip, name, _)| {
            format!(
                "[[peer]]\nname = \"{name}\"\npsk_identity = \"{name}\"\npsk_hex = \"{}\"\nendpoint = \"coaps://{}\"\n",
                hex(KEY.as_bytes()),
                SocketAddr::new(*ip, 5684)
            )
        })
        .collect();
    let gw = Gateway::with("coaps-psk", "", &peers);
    let _servers: Vec<CoapServer> = devices
        .iter()
        .map(|(program, ip, _, key)| {
            CoapServer::start(
                &gw.topo.dev,
                program,
                SocketAddr::new(*ip, 5684),
                &["-A", &ip.to_string(), "-k", key, "-d", "10"],
            )
        })
        .collect();
    let responses = MosquittoSub::start(&gw.topo.gw, &["m2m-resp/#"], &["-F", "%t|%p|%D %P"]);
    for (_, _, peer, _) in &devices[..2] {
        let body = format!("set by {peer}");
        let created = command(&gw, &responses, peer, "store", Some(&body));
        assert!(
            created.content_type.contains("coap-code:2.01"),
            "{created:?}"
        );
        let read = command(&gw, &responses, peer, "store", None);
        assert!(read.content_type.contains("coap-code:2.05"), "{read:?}");
        assert_eq!(read.payload, body);
    }
    let mut listed = sessions(&gw);
    listed.sort();
    assert_eq!(
        listed
            .iter()
            .map(|(peer, address, by, _)| (peer.as_str(), address.clone(), by.as_str()))
            .collect::<Vec<_>>(),
        vec![
            ("srv-gnutls", format!("[{}]:5684", DEV_V6[2]), "gateway"),
            ("srv-openssl", format!("{}:5684", DEV_V4[2]), "gateway"),
        ]
    );
    assert!(listed.iter().all(|s| s.3.starts_with("PSK-")), "{listed:?}");
    assert_eq!(gw.dtls("connects"), 2, "one session per device");
    assert!(gw.dtls("downlink_sent") >= 4, "two commands to each");

    // The device without the peer's key: the gateway's Finished does not
    // decrypt there, so the handshake ends at its timeout (3 s here).
    mosquitto_pub(
        &gw.topo.gw,
        "m2m-cmd/liar/store",
        "x",
        &["user-property method PUT"],
    );
    assert!(
        wait_for(DEADLINE, || gw.dtls("handshake_timeouts") >= 1
            && gw.dtls("downlink_no_session") >= 1),
        "the failed handshake and the command that waited for it are counted"
    );
    assert!(sessions(&gw).iter().all(|s| s.0 != "liar"));
    gw.daemon.stop();
}

/// Certificate mode with the gateway as the client: it shows its own
/// certificate to `coap-server-openssl -c -j -C`, and takes the device for
/// the peer only if the device's certificate chains to the CA and names
/// the peer's `cert_name`; a device showing another name gets an alert.
#[test]
fn a_device_listening_on_coaps_is_reached_with_the_gateways_certificate() {
    let pki = Pki::new("dtls-cert-client");
    let gateway = pki.issue("gateway.example", &Names::default());
    let device = pki.issue("meter-srv.example", &Names::default());
    let impostor = pki.issue("someone-else.example", &Names::default());
    let gw = Gateway::with(
        "coaps-cert",
        &certificate_mode(&pki, &gateway),
        &format!(
            r#"
            [[peer]]
            name = "metersrv"
            cert_name = "meter-srv.example"
            endpoint = "coaps://{}"
            [[peer]]
            name = "impostor"
            cert_name = "impostor.example"
            endpoint = "coaps://{}"
            "#,
            DEV_V4[2], DEV_V4[3]
        ),
    );
    let _servers: Vec<CoapServer> = [(DEV_V4[2], &device), (DEV_V4[3], &impostor)]
        .into_iter()
        .map(|(ip, cert)| {
            CoapServer::start(
                &gw.topo.dev,
                "coap-server-openssl",
                SocketAddr::new(ip.into(), 5684),
                &[
                    "-A",
                    &ip.to_string(),
                    "-c",
                    cert.cert_file.as_str(),
                    "-j",
                    cert.key_file.as_str(),
                    "-C",
                    pki.ca.cert_file.as_str(),
                    "-d",
                    "10",
                ],
            )
        })
        .collect();
    let responses = MosquittoSub::start(&gw.topo.gw, &["m2m-resp/#"], &["-F", "%t|%p|%D %P"]);
    let created = command(&gw, &responses, "metersrv", "store", Some("42"));
    assert!(
        created.content_type.contains("coap-code:2.01"),
        "{created:?}"
    );
    let listed = sessions(&gw);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        (listed[0].0.as_str(), listed[0].2.as_str()),
        ("metersrv", "gateway")
    );
    assert!(listed[0].3.starts_with("ECDHE-ECDSA"), "{listed:?}");

    mosquitto_pub(
        &gw.topo.gw,
        "m2m-cmd/impostor/store",
        "x",
        &["user-property method PUT"],
    );
    assert!(
        wait_for(DEADLINE, || gw.dtls("unknown_identity") >= 1
            && gw.dtls("handshake_failures") >= 1),
        "the device's certificate does not name the peer: refused and counted"
    );
    assert_eq!(sessions(&gw).len(), 1, "no session with the impostor");
    gw.daemon.stop();
}
