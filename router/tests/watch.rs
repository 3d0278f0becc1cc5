//! The gateway observing devices (RFC 7641, `[[peer]] observe` and the
//! `observe` / `unobserve` command methods): libcoap's coap-server as the
//! observed device, and a raw device socket for the RFC cases (stale and
//! repeated notifications dropped, re-registration with the same token
//! when Max-Age runs out, an error answer ending the relation, a forgotten
//! relation's notification reset). Privileged.

use std::net::{SocketAddr, UdpSocket};

use m2m_router::coap::message::{self, code, option, Message, ACK, CON, NON, RST};
use m2m_router_tests::daemon::Daemon;
use m2m_router_tests::faultfs::FaultFs;
use m2m_router_tests::libcoap::CoapServer;
use m2m_router_tests::mqtt::{mosquitto_pub, MosquittoSub};
use m2m_router_tests::netns::{
    confirm, next_datagram, wait_for, Topology, DEADLINE, DEV_V4, GW_V4,
};
use m2m_router_tests::packet::coap_post;
use m2m_router_tests::{require_root, TempPath};

const BIN: &str = env!("CARGO_BIN_EXE_m2m-router");

struct Gateway {
    topo: Topology,
    daemon: Daemon,
    _config: TempPath,
}

/// Peer "meter" is DEV_V4[0], at the configured endpoint port 5683;
/// `observe` is its `observe` list (TOML). Peer "roamer" (DEV_V4[1]) has
/// no endpoint configured and observes `state`.
fn gateway(tag: &str, observe: &str) -> Gateway {
    gateway_with(tag, observe, "")
}

/// [`gateway`] with `extra` appended to the config.
fn gateway_with(tag: &str, observe: &str, extra: &str) -> Gateway {
    require_root();
    let topo = Topology::new(tag);
    let config = TempPath::with_contents(
        &format!("watch-{tag}"),
        "toml",
        format!(
            "[defaults]\nrate = \"unlimited\"\n[downlink]\nack_timeout_ms = 500\n\
             [[peer]]\nname = \"meter\"\nprefix = [\"{}/32\"]\nendpoint = \"{}:5683\"\n\
             topic = \"dev/{{peer}}/{{path}}\"\nobserve = {observe}\n\
             [[peer]]\nname = \"roamer\"\nprefix = [\"{}/32\"]\n\
             topic = \"dev/{{peer}}/{{path}}\"\nobserve = [\"state\"]\n{extra}",
            DEV_V4[0], DEV_V4[0], DEV_V4[1]
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
    /// The device: a socket at the peer's configured endpoint.
    fn device(&self) -> UdpSocket {
        let at = SocketAddr::new(DEV_V4[0].into(), 5683);
        self.topo
            .dev
            .run(|| UdpSocket::bind(at).expect("bind the device's CoAP port"))
    }

    fn counter(&self, name: &str) -> u64 {
        self.daemon.counter("downlink", name)
    }

    fn wait_counter(&self, name: &str, at_least: u64) {
        self.daemon.wait_ctl(&["stats"], DEADLINE, |v| {
            v["downlink"][name].as_u64() >= Some(at_least)
        });
    }
}

fn gateway_addr() -> SocketAddr {
    SocketAddr::new(GW_V4.into(), 5683)
}

/// A registration the device received: GET, Observe 0, the path.
struct Registration {
    mid: u16,
    token: Vec<u8>,
    path: String,
}

thread_local! {
    /// The registrations each device socket received (its address, the
    /// Message ID): the gateway may have retransmitted one before the test
    /// read it, and a copy is not a new registration.
    static REGISTRATIONS: std::cell::RefCell<std::collections::HashSet<(SocketAddr, u16)>> =
        Default::default();
}

/// The next registration `dev` receives; the answers to its own uplinks
/// (ACK 2.04) and copies of registrations already received may come before.
fn registration(dev: &UdpSocket) -> Registration {
    let here = dev.local_addr().unwrap();
    let datagram = loop {
        let datagram = next_datagram(dev);
        let m = Message::decode(&datagram).expect("a CoAP message");
        if (m.mtype, m.code) == (ACK, code::CHANGED) {
            continue;
        }
        if m.code == code::GET && !REGISTRATIONS.with(|r| r.borrow_mut().insert((here, m.mid))) {
            continue;
        }
        break datagram;
    };
    let m = Message::decode(&datagram).unwrap();
    assert_eq!((m.mtype, m.code), (CON, code::GET), "a CON GET");
    assert_eq!(
        values(&m, option::OBSERVE),
        [&[0u8; 0][..]],
        "Observe 0 (RFC 7641 section 3.1)"
    );
    let path: Vec<String> = values(&m, option::URI_PATH)
        .iter()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    Registration {
        mid: m.mid,
        token: m.token.to_vec(),
        path: path.join("/"),
    }
}

/// The values of option `number` in `m`, in order.
fn values<'a>(m: &Message<'a>, number: u16) -> Vec<&'a [u8]> {
    m.options()
        .filter(|(n, _)| *n == number)
        .map(|(_, v)| v)
        .collect()
}

/// A response or notification from the device: `code`, Observe `seq`
/// (None: no Observe option), Max-Age, payload.
#[allow(clippy::too_many_arguments)]
fn answer(
    dev: &UdpSocket,
    mtype: u8,
    code: u8,
    mid: u16,
    token: &[u8],
    seq: Option<u32>,
    max_age: Option<u32>,
    payload: &str,
) -> Vec<u8> {
    let (mut obs, mut age) = ([0u8; 4], [0u8; 4]);
    let mut opts: Vec<(u16, &[u8])> = Vec::new();
    if let Some(seq) = seq {
        opts.push((option::OBSERVE, message::uint_bytes(seq, &mut obs)));
    }
    if let Some(a) = max_age {
        opts.push((option::MAX_AGE, message::uint_bytes(a, &mut age)));
    }
    let mut out = Vec::new();
    message::encode(&mut out, mtype, code, mid, token, &opts, payload.as_bytes());
    dev.send_to(&out, gateway_addr()).unwrap();
    out
}

/// Answers registration `reg` with a piggybacked 2.05: Observe `seq`,
/// Max-Age `max_age`, the state `payload`.
fn accept(dev: &UdpSocket, reg: &Registration, seq: u32, max_age: u32, payload: &str) {
    answer(
        dev,
        ACK,
        code::CONTENT,
        reg.mid,
        &reg.token,
        Some(seq),
        Some(max_age),
        payload,
    );
}

/// Sends a CON notification and returns the gateway's answer's type (ACK
/// or RST), which must carry its Message ID.
fn notify_con(dev: &UdpSocket, mid: u16, token: &[u8], seq: u32, payload: &str) -> u8 {
    answer(
        dev,
        CON,
        code::CONTENT,
        mid,
        token,
        Some(seq),
        Some(60),
        payload,
    );
    notify_reply(dev, mid)
}

/// The gateway's answer (ACK or RST) to the notification `mid`.
fn notify_reply(dev: &UdpSocket, mid: u16) -> u8 {
    dev.set_read_timeout(Some(DEADLINE)).unwrap();
    loop {
        let reply = next_datagram(dev);
        let m = Message::decode(&reply).unwrap();
        if m.code == code::GET || (m.mtype == ACK && m.mid != mid) {
            continue; // a registration's copy, or the answer to an uplink
        }
        assert_eq!((m.mid, m.code), (mid, code::EMPTY), "an empty ACK or RST");
        return m.mtype;
    }
}

/// The paths watched on "meter", as `ctl observe ls` lists them.
fn meter_paths(gw: &Gateway) -> Vec<String> {
    let ls = gw.daemon.ctl_json(&["observe", "ls"]);
    ls["watches"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["peer"] == "meter")
        .filter_map(|w| w["path"].as_str().map(str::to_owned))
        .collect()
}

fn payloads(sub: &mut MosquittoSub) -> Vec<String> {
    sub.fence().into_iter().map(|r| r.payload).collect()
}

/// A stock device: libcoap's coap-server, whose `time` resource notifies
/// every second. The gateway registers as soon as it starts (the endpoint
/// is configured), and each notification reaches mosquitto_sub on the
/// topic a POST of `time` from the device maps to.
#[test]
fn coap_server_time_notifications_reach_mosquitto_sub() {
    let gw = gateway("watch-libcoap", "[\"time\"]");
    let server = CoapServer::start(
        &gw.topo.dev,
        "coap-server-notls",
        SocketAddr::new(DEV_V4[0].into(), 5683),
        &["-A", &DEV_V4[0].to_string(), "-p", "5683"],
    );
    let sub = MosquittoSub::start(&gw.topo.gw, &["dev/#"], &[]);
    // The gateway's first registration may have gone out before the
    // server listened: it tries again (backoff from 4 s) until answered.
    let got = sub.take(4);
    drop(server);
    assert_eq!(got.len(), 4, "four time notifications, got {got:?}");
    assert!(got.iter().all(|r| r.topic == "dev/meter/time"), "{got:?}");
    let distinct: std::collections::HashSet<&str> =
        got.iter().map(|r| r.payload.as_str()).collect();
    assert!(distinct.len() >= 3, "the time moves on: {got:?}");
    let ls = gw.daemon.ctl_json(&["observe", "ls"]);
    let watch = &ls["watches"][0];
    assert_eq!(watch["peer"], "meter");
    assert_eq!(watch["path"], "time");
    assert_eq!(watch["topic"], "dev/meter/time");
    assert!(watch["notifications"].as_u64() >= Some(4), "{ls}");
    gw.daemon.stop();
}

/// RFC 7641 section 3.4: a notification older than the freshest, or the
/// same one retransmitted, is acknowledged and dropped; section 3.3.1: when
/// Max-Age runs out with no notification the gateway registers again, with
/// the same token; section 3.2: an error answer ends the relation, and the
/// gateway tries again later.
#[test]
fn stale_notifications_are_dropped_and_a_lost_relation_registered_again() {
    let gw = gateway("watch-rfc", "[\"sensors/temp\"]");
    let dev = gw.device();
    let mut sub = MosquittoSub::start(&gw.topo.gw, &["dev/#"], &[]);
    let reg = registration(&dev);
    assert_eq!(reg.path, "sensors/temp");
    // The registration's answer, piggybacked: the first state.
    accept(&dev, &reg, 10, 60, "20.0");
    assert_eq!(notify_con(&dev, 0x100, &reg.token, 12, "20.5"), ACK);
    assert_eq!(notify_con(&dev, 0x101, &reg.token, 11, "stale"), ACK);
    assert_eq!(
        notify_con(&dev, 0x100, &reg.token, 12, "20.5"),
        ACK,
        "retransmitted"
    );
    answer(
        &dev,
        NON,
        code::CONTENT,
        0x102,
        &reg.token,
        Some(13),
        Some(60),
        "21.0",
    );
    gw.wait_counter("watch_notifications", 3);
    assert_eq!(
        payloads(&mut sub),
        ["20.0", "20.5", "21.0"],
        "in order, once each"
    );
    assert_eq!(
        gw.counter("watch_stale"),
        2,
        "the stale one and the repeated one"
    );
    assert_eq!(gw.counter("watching"), 1);

    // Max-Age 1: with no notification after it (plus the margin), the
    // relation counts as lost and the gateway registers again, same token.
    answer(
        &dev,
        NON,
        code::CONTENT,
        0x103,
        &reg.token,
        Some(14),
        Some(1),
        "21.5",
    );
    let again = registration(&dev);
    assert_eq!(
        again.token, reg.token,
        "re-registration keeps the token (3.3.1)"
    );
    assert!(gw.counter("watch_lost") >= 1);
    // The device answers with an error: the relation ends (3.2), and the
    // gateway tries again later (a new token: the old relation is gone).
    answer(
        &dev,
        ACK,
        code::NOT_FOUND,
        again.mid,
        &again.token,
        None,
        None,
        "",
    );
    let third = registration(&dev);
    assert_ne!(third.token, reg.token);
    accept(&dev, &third, 1, 60, "22.0");
    // A notification with the old token is of a relation the gateway no
    // longer has: reset (3.6).
    assert_eq!(notify_con(&dev, 0x104, &reg.token, 15, "old"), RST);
    gw.wait_counter("watch_notifications", 5);
    assert_eq!(payloads(&mut sub), ["21.5", "22.0"]);
    gw.daemon.stop();
}

/// `method` = `observe` on `m2m-cmd/<peer>/<path>` adds a watch at run
/// time, `unobserve` removes it (the device's next notification is reset);
/// a configured watch cannot be removed that way.
#[test]
fn observe_and_unobserve_commands_add_and_remove_a_watch() {
    let gw = gateway("watch-cmd", "[\"config/path\"]");
    let dev = gw.device();
    // %P: the user properties (coap-code) where content types would be.
    let mut sub = MosquittoSub::start(&gw.topo.gw, &["dev/#", "app/#"], &["-F", "%t|%p|%P"]);
    let configured = registration(&dev);
    assert_eq!(configured.path, "config/path");
    accept(&dev, &configured, 1, 600, "c");
    gw.wait_counter("watch_notifications", 1);

    let ns = &gw.topo.gw;
    mosquitto_pub(
        ns,
        "m2m-cmd/meter/level",
        "",
        &["user-property method observe", "response-topic app/r"],
    );
    let reg = registration(&dev);
    assert_eq!(reg.path, "level");
    accept(&dev, &reg, 5, 600, "71%");
    gw.wait_counter("watch_notifications", 2);
    let got: Vec<(String, String)> = sub
        .fence()
        .into_iter()
        .map(|r| (r.payload, r.content_type))
        .collect();
    assert_eq!(got[0].0, "c");
    assert_eq!(got[1].0, "{\"path\":\"level\",\"peer\":\"meter\"}");
    assert!(got[1].1.contains("coap-code:observing"), "{got:?}");
    assert_eq!(got[2].0, "71%");
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(meter_paths(&gw), ["config/path", "level"]);
    assert_eq!(gw.counter("watching"), 2);

    for (path, expect) in [("level", "unobserved"), ("config/path", "error")] {
        let topic = format!("m2m-cmd/meter/{path}");
        mosquitto_pub(
            ns,
            &topic,
            "",
            &["user-property method unobserve", "response-topic app/r"],
        );
        let got = MosquittoSub::take(&sub, 1);
        assert_eq!(got.len(), 1, "an answer to unobserve {path}");
        assert_eq!(got[0].topic, "app/r");
        let code = format!("coap-code:{expect}");
        assert!(got[0].content_type.contains(&code), "{got:?}");
        assert_eq!(
            meter_paths(&gw),
            ["config/path"],
            "{expect}: only the configured watch stays"
        );
    }
    assert!(wait_for(DEADLINE, || gw.counter("watching") == 1));
    assert_eq!(notify_con(&dev, 0x200, &reg.token, 6, "72%"), RST, "3.6");
    assert_eq!(notify_con(&dev, 0x201, &configured.token, 2, "c2"), ACK);
    gw.wait_counter("watch_notifications", 3);
    assert_eq!(payloads(&mut sub), ["c2"]);
    gw.daemon.stop();
}

/// A peer with no configured endpoint is observed where its first uplink
/// came from, and again where it is heard from next (a device restarted
/// on another port): the new relation starts its numbers afresh.
#[test]
fn a_device_is_observed_where_it_is_heard_from() {
    let gw = gateway("watch-roam", "[]");
    let mut sub = MosquittoSub::start(&gw.topo.gw, &["dev/roamer/#"], &[]);
    let mut seen = Vec::new();
    let mut first: Option<(UdpSocket, Vec<u8>)> = None;
    for (round, state) in [(1, "boot-1"), (2, "boot-2")] {
        let dev = gw.topo.device_socket(DEV_V4[1].into());
        dev.set_read_timeout(Some(DEADLINE)).unwrap();
        dev.send_to(&coap_post(round, b"hello"), gateway_addr())
            .unwrap();
        let reg = registration(&dev);
        assert_eq!(reg.path, "state", "round {round}");
        // Sequence numbers restart with the device.
        accept(&dev, &reg, 1, 600, state);
        gw.wait_counter("watch_notifications", round.into());
        seen.extend(payloads(&mut sub));
        let ls = gw.daemon.ctl_json(&["observe", "ls"]);
        let watch = ls["watches"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["peer"] == "roamer")
            .cloned()
            .unwrap();
        assert_eq!(
            watch["endpoint"].as_str(),
            Some(dev.local_addr().unwrap().to_string().as_str())
        );
        assert_eq!(watch["state"], "observing");
        first.get_or_insert((dev, reg.token));
    }
    // The relation at the first address is forgotten: reset (RFC 7641 3.6).
    let (old, token) = first.unwrap();
    assert_eq!(notify_con(&old, 0x300, &token, 2, "boot-1 again"), RST);
    // The uplinks ("hello") go to the same topic space, dev/roamer/...
    let states: Vec<&String> = seen.iter().filter(|p| p.starts_with("boot")).collect();
    assert_eq!(states, ["boot-1", "boot-2"]);

    // A peer added at run time with `--observe` is observed too.
    let prefix = format!("{}/32", DEV_V4[2]);
    let ctl = [
        "peer",
        "add",
        "late",
        "--prefix",
        &prefix,
        "--observe",
        "late/path",
    ];
    gw.daemon.ctl_json(&ctl);
    let dev = gw.topo.device_socket(DEV_V4[2].into());
    let ls = |gw: &Gateway| gw.daemon.ctl_json(&["observe", "ls"]).to_string();
    // The watch exists within a second; the device's uplink gives it an endpoint.
    assert!(
        wait_for(DEADLINE, || ls(&gw).contains("late/path")),
        "{}",
        ls(&gw)
    );
    dev.send_to(&coap_post(9, b"hello"), gateway_addr())
        .unwrap();
    assert_eq!(registration(&dev).path, "late/path");
    gw.daemon.stop();
}

/// With a disk spool (a bridge whose upstream is down), a CON notification
/// is acknowledged only once its message is on disk: not while the fsync
/// is held, not when it fails (then the device's retransmission is taken
/// as fresh and published), and as soon as it succeeds.
#[test]
fn a_con_notification_is_acknowledged_only_once_stored() {
    let disk = FaultFs::mount("watch-disk");
    let upstream = format!(
        "[[upstream]]\nname = \"down\"\nurl = \"mqtt://127.0.0.1:1\"\ndurability = \"disk\"\nspool_dir = \"{}\"\n",
        disk.path().join("spool").display()
    );
    let gw = gateway_with("watch-disk", "[\"temp\"]", &upstream);
    let mut sub = MosquittoSub::start(&gw.topo.gw, &["dev/meter/#"], &[]);
    let dev = gw.device();
    let reg = registration(&dev);
    accept(&dev, &reg, 1, 600, "1");
    gw.wait_counter("watch_notifications", 1);

    disk.faults.hold_syncs();
    answer(
        &dev,
        CON,
        code::CONTENT,
        0x400,
        &reg.token,
        Some(2),
        Some(600),
        "2",
    );
    disk.faults.wait_for_held_sync(DEADLINE);
    // The commit cannot finish while the fsync is held: an ACK now would
    // be one sent before the message was stored.
    dev.set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(
        dev.recv(&mut buf).is_err(),
        "acknowledged before it was stored"
    );
    disk.faults.release_syncs();
    assert_eq!(notify_reply(&dev, 0x400), ACK);

    disk.faults.fail_syncs(true);
    let three = answer(
        &dev,
        CON,
        code::CONTENT,
        0x401,
        &reg.token,
        Some(3),
        Some(600),
        "3",
    );
    gw.wait_counter("watch_unpublished", 1);
    disk.faults.fail_syncs(false);
    // The device retransmits it (same Message ID) as RFC 7252 section 4.2
    // says, while the spool waits out its failure: fresh again, stored,
    // acknowledged.
    let (reply, _) = confirm(&dev, gateway_addr(), &three, 0x401);
    assert_eq!(Message::decode(&reply).unwrap().mtype, ACK);
    gw.wait_counter("watch_notifications", 3);
    let got = payloads(&mut sub);
    assert_eq!(got.iter().filter(|p| *p == "2").count(), 1, "{got:?}");
    assert!(got.iter().any(|p| p == "3"), "{got:?}");
    gw.daemon.stop();
}

/// RFC 7959 section 3.4: a notification larger than a block carries its
/// first Block2 block; the gateway acknowledges it, fetches the rest with
/// GET (no Observe), checks the ETag, and publishes the whole value once.
#[test]
fn a_notification_in_blocks_is_fetched_and_published_whole() {
    let gw = gateway("watch-block2", "[\"image\"]");
    let dev = gw.device();
    let sub = MosquittoSub::start(&gw.topo.gw, &["dev/meter/#"], &[]);
    let reg = registration(&dev);
    accept(&dev, &reg, 1, 600, "small");
    gw.wait_counter("watch_notifications", 1);
    let value: Vec<u8> = (0..2500u32).map(|i| b'a' + (i % 26) as u8).collect();
    let etag: &[u8] = &[7, 7];
    // Block2 value: NUM << 4 | M << 3 | SZX (6: 1024 bytes).
    let block = |num: u8, more: bool| [num << 4 | u8::from(more) << 3 | 6];
    let first = block(0, true);
    let mut notification = Vec::new();
    message::encode(
        &mut notification,
        CON,
        code::CONTENT,
        0x500,
        &reg.token,
        &[
            (option::ETAG, etag),
            (option::OBSERVE, &[2]),
            (option::BLOCK2, &first),
        ],
        &value[..1024],
    );
    dev.send_to(&notification, gateway_addr()).unwrap();
    assert_eq!(notify_reply(&dev, 0x500), ACK);
    for num in 1..=2u8 {
        let get = loop {
            let datagram = next_datagram(&dev);
            let m = Message::decode(&datagram).unwrap();
            if m.code == code::GET && !m.options().any(|(n, _)| n == option::OBSERVE) {
                break datagram;
            }
        };
        let m = Message::decode(&get).unwrap();
        assert_eq!(
            values(&m, option::BLOCK2),
            [&block(num, false)[..]],
            "block {num}, of the same size"
        );
        assert_eq!(values(&m, option::URI_PATH), [b"image"]);
        let end = (usize::from(num) + 1) * 1024;
        let part = &value[usize::from(num) * 1024..end.min(value.len())];
        let this = block(num, end < value.len());
        let mut reply = Vec::new();
        message::encode(
            &mut reply,
            ACK,
            code::CONTENT,
            m.mid,
            m.token,
            &[(option::ETAG, etag), (option::BLOCK2, &this)],
            part,
        );
        dev.send_to(&reply, gateway_addr()).unwrap();
    }
    gw.wait_counter("watch_notifications", 2);
    let got: Vec<String> = sub.take(2).into_iter().map(|r| r.payload).collect();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0], "small");
    assert!(
        got[1].as_bytes() == value,
        "{} bytes published",
        got[1].len()
    );
    assert_eq!(gw.counter("watch_unpublished"), 0);
    gw.daemon.stop();
}
