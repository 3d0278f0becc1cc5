//! Upstream bridges against a real Mosquitto started by the test: messages
//! from CoAP devices reach an upstream subscriber; an outage with a router
//! crash in the middle loses nothing with the disk spool; a full spool
//! evicts the oldest and the router keeps serving. Privileged: needs root.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use m2m_router::coap::message::{code, Message};
use m2m_router_tests::daemon::Daemon;
use m2m_router_tests::disk::SmallDisk;
use m2m_router_tests::faultfs::FaultFs;
use m2m_router_tests::mqtt::{Mosquitto, MosquittoSub, RawClient};
use m2m_router_tests::netns::{confirm, wait_for, Netns, Topology, DEADLINE, DEV_V4, GW_V4};
use m2m_router_tests::packet::coap;
use m2m_router_tests::require_root;

const BIN: &str = env!("CARGO_BIN_EXE_m2m-router");
const UPSTREAM_PORT: u16 = 1885;
/// The longest a bridge may wait before reconnecting (MAX_BACKOFF x 1.5).
const RECONNECT: Duration = Duration::from_secs(45);

fn router_config(extra_upstream: &str, spool: &std::path::Path) -> String {
    format!(
        r#"
        [defaults]
        rate = "unlimited"
        topic = "m2m/{{peer}}/{{path}}"
        [mqtt]
        session_queue = 100000
        [[upstream]]
        name = "cloud"
        url = "mqtt://127.0.0.1:{UPSTREAM_PORT}"
        prefix = "site-7/"
        spool_dir = "{}"
        {extra_upstream}
        "#,
        spool.display()
    )
}

struct Setup {
    topo: Topology,
    dir: std::path::PathBuf,
    config: std::path::PathBuf,
}

impl Setup {
    fn new(tag: &str, extra_upstream: &str) -> Setup {
        Setup::with_spool_dir(tag, extra_upstream, None)
    }

    /// With a disk spool on a fresh fault-injecting filesystem.
    fn on_faulty_disk(tag: &str) -> (FaultFs, Setup) {
        let disk = FaultFs::mount(tag);
        let spool = disk.path().join("spool");
        let setup = Setup::with_spool_dir(tag, "durability = \"disk\"", Some(&spool));
        (disk, setup)
    }

    /// With the spool in `spool_dir` instead of the test's directory.
    fn with_spool_dir(tag: &str, extra_upstream: &str, spool_dir: Option<&Path>) -> Setup {
        require_root();
        let topo = Topology::new(tag);
        let dir = m2m_router_tests::unique_temp_path(&format!("bridge-{tag}"), "");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("router.toml");
        let spool = spool_dir.map_or_else(|| dir.join("spool"), Path::to_path_buf);
        std::fs::write(&config, router_config(extra_upstream, &spool)).unwrap();
        Setup { topo, dir, config }
    }

    fn router(&self) -> Daemon {
        Daemon::on_gateway(&self.topo.gw, BIN, self.config.to_str().unwrap())
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Upstream messages as "topic payload" lines, from a persistent QoS 1
/// session `client_id` (mosquitto_sub -c).
fn upstream_sub(ns: &Netns, client_id: &str, count: usize, wait_s: u32) -> Vec<String> {
    upstream_sub_on(ns, client_id, &[], count, wait_s)
}

/// Like [`upstream_sub`], subscribed to `more` filters beside `site-7/#`.
fn upstream_sub_on(
    ns: &Netns,
    client_id: &str,
    more: &[&str],
    count: usize,
    wait_s: u32,
) -> Vec<String> {
    let mut cmd = ns.command("mosquitto_sub");
    cmd.args(["-h", "127.0.0.1", "-p", &UPSTREAM_PORT.to_string()])
        .args(["-c", "-i", client_id, "-q", "1", "-t", "site-7/#"]);
    for filter in more {
        cmd.args(["-t", filter]);
    }
    let out = cmd
        .args(["-v", "-C", &count.to_string(), "-W", &wait_s.to_string()])
        .output()
        .expect("mosquitto_sub");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Registers the persistent upstream subscriber `client_id` on `site-7/#`.
/// The retained probe on a second filter arrives only once Mosquitto has
/// processed the whole SUBSCRIBE, so its arrival (not silence, which a
/// failed connection also gives) shows the subscription exists.
fn register_upstream_sub(ns: &Netns, client_id: &str) {
    let probe = ns
        .command("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &UPSTREAM_PORT.to_string()])
        .args(["-r", "-t", "m2m-test/registered", "-m", "1"])
        .status()
        .unwrap();
    assert!(probe.success());
    let got = upstream_sub_on(
        ns,
        client_id,
        &["m2m-test/registered"],
        1,
        DEADLINE.as_secs() as u32,
    );
    assert_eq!(got, vec!["m2m-test/registered 1"]);
}

/// Sends `per_peer` CON POSTs from each of `peers` sockets, payload
/// "peer:seq"; returns how many were acknowledged 2.04.
fn send(topo: &Topology, peers: &[UdpSocket], from_seq: u32, per_peer: u32) -> usize {
    let mut acked = 0;
    for seq in from_seq..from_seq + per_peer {
        for (p, sock) in peers.iter().enumerate() {
            if post(sock, seq as u16, &format!("{p}:{seq}")) == code::CHANGED {
                acked += 1;
            }
        }
    }
    let _ = topo;
    acked
}

fn peers(topo: &Topology, n: usize) -> Vec<UdpSocket> {
    (0..n)
        .map(|i| topo.device_socket(IpAddr::V4(DEV_V4[i % 4])))
        .collect()
}

#[test]
fn coap_messages_reach_an_upstream_mosquitto() {
    let setup = Setup::new("br-up", "durability = \"memory\"");
    let _mosquitto = Mosquitto::start(&setup.topo.gw, UPSTREAM_PORT);
    // Register the upstream subscriber first (persistent, so nothing is missed).
    register_upstream_sub(&setup.topo.gw, "up-sub");
    let router = setup.router();
    let out = setup
        .topo
        .dev
        .command("coap-client-notls")
        .args([
            "-a",
            &DEV_V4[0].to_string(),
            "-B",
            "3",
            "-v",
            "6",
            "-m",
            "post",
            "-e",
            "21.5",
        ])
        .arg(format!("coap://{GW_V4}/sensors/temp"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("c:2.04")
            || String::from_utf8_lossy(&out.stdout).contains("c:2.04")
    );
    let got = upstream_sub(&setup.topo.gw, "up-sub", 1, DEADLINE.as_secs() as u32);
    assert_eq!(got, vec!["site-7/m2m/10.77.0.1/sensors/temp 21.5"]);
    // `ctl upstream ls` shows the bridge's state (the PUBACK may reach the
    // bridge after the subscriber has the message: wait for it).
    let state = router.wait_ctl(&["upstream", "ls"], DEADLINE, |v| {
        v["upstreams"][0]["acked"] == 1
    });
    let cloud = &state["upstreams"][0];
    assert_eq!(
        (cloud["name"].as_str(), cloud["connected"].as_bool()),
        (Some("cloud"), Some(true)),
        "{state}"
    );
    assert_eq!(cloud["spooled_messages"], 0);
    router.stop();
}

#[test]
fn an_outage_and_a_router_crash_lose_nothing_with_the_disk_spool() {
    let setup = Setup::new("br-outage", "durability = \"disk\"");
    let mut mosquitto = Mosquitto::start(&setup.topo.gw, UPSTREAM_PORT);
    register_upstream_sub(&setup.topo.gw, "keeper");
    mosquitto.stop();

    let sockets = peers(&setup.topo, 10);
    let router = setup.router();
    assert_eq!(
        send(&setup.topo, &sockets, 0, 250),
        2_500,
        "every CON acknowledged while upstream is down"
    );
    // Crash: SIGKILL, no shutdown. The page cache survives a process kill,
    // so this shows write-before-ACK and replay; that the write reached
    // the disk before the ACK is the next test's.
    drop(router);
    let router = setup.router();
    assert_eq!(send(&setup.topo, &sockets, 250, 250), 2_500);

    mosquitto.restart(&setup.topo.gw);
    // The bridge's reconnect backoff reaches 30 s x 1.5 (jitter) while the
    // upstream is away: allow for that, then the drain.
    router.wait_ctl(&["upstream", "ls"], RECONNECT + DEADLINE, |v| {
        v["upstreams"][0]["acked"] == 5_000
    });
    let got = upstream_sub(&setup.topo.gw, "keeper", 5_000, DEADLINE.as_secs() as u32);
    let mut per_peer: HashMap<u32, Vec<u32>> = HashMap::new();
    for line in &got {
        let payload = line.rsplit(' ').next().unwrap();
        let (p, seq) = payload.split_once(':').unwrap();
        per_peer
            .entry(p.parse().unwrap())
            .or_default()
            .push(seq.parse().unwrap());
    }
    let mut duplicates = 0;
    for (peer, seqs) in &per_peer {
        let mut unique = seqs.clone();
        unique.dedup();
        duplicates += seqs.len() - unique.len();
        assert!(
            unique.windows(2).all(|w| w[0] < w[1]),
            "peer {peer} out of order"
        );
        assert_eq!(
            unique,
            (0..500).collect::<Vec<u32>>(),
            "peer {peer} lost messages"
        );
    }
    eprintln!("received {} upstream, {duplicates} duplicates", got.len());
    assert_eq!(per_peer.len(), 10);
    // The upstream was down for the router's whole life: nothing was ever
    // sent before the crash, so nothing can come twice.
    assert_eq!(duplicates, 0);
    router.stop();
}

/// An ext4 file system (no journal) on a loop device over an image file,
/// unmounted and detached on drop.
struct LoopDisk {
    image: std::path::PathBuf,
    mount: std::path::PathBuf,
    device: String,
}

impl LoopDisk {
    fn new(dir: &std::path::Path) -> LoopDisk {
        let run = |cmd: &str, args: &[&str]| {
            let out = Command::new(cmd).args(args).output().expect(cmd);
            assert!(
                out.status.success(),
                "{cmd} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        let image = dir.join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        // No journal: with one, a journal commit could write the data out.
        run(
            "mkfs.ext4",
            &["-q", "-F", "-O", "^has_journal", image.to_str().unwrap()],
        );
        let device = run("losetup", &["--find", "--show", image.to_str().unwrap()]);
        let mount = dir.join("mnt");
        std::fs::create_dir_all(&mount).unwrap();
        run("mount", &[&device, mount.to_str().unwrap()]);
        LoopDisk {
            image,
            mount,
            device,
        }
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// With the disk spool a CON is acknowledged only after fdatasync: each
/// acknowledged message is already on the block device when the router is
/// killed. Read from the loop device's backing image, not through the
/// mounted file system: a write that was not synced sits in the file
/// system's page cache until writeback (after `vm.dirty_expire_centisecs`,
/// 30 s by default), where a power cut would take it.
#[test]
fn acknowledged_messages_are_on_the_block_device_before_the_ack() {
    let setup = Setup::new("br-fsync", "durability = \"disk\"");
    let disk = LoopDisk::new(&setup.dir);
    let text = std::fs::read_to_string(&setup.config).unwrap().replace(
        &setup.dir.join("spool").display().to_string(),
        &disk.mount.join("spool").display().to_string(),
    );
    std::fs::write(&setup.config, text).unwrap();
    // No upstream: everything stays in the spool.
    let sockets = peers(&setup.topo, 2);
    let router = setup.router();
    let started = std::time::Instant::now();
    assert_eq!(
        send(&setup.topo, &sockets, 0, 10),
        20,
        "every CON acknowledged"
    );
    drop(router); // SIGKILL
    let image = std::fs::read(&disk.image).unwrap();
    let elapsed = started.elapsed();
    for p in 0..2 {
        for seq in 0..10 {
            let payload = format!("{p}:{seq}");
            let record = [b"m2m/10.77.0.1/x".as_slice(), payload.as_bytes()].concat();
            let record_v2 = [b"m2m/10.77.1.1/x".as_slice(), payload.as_bytes()].concat();
            let needle = if p == 0 { &record } else { &record_v2 };
            assert!(
                image.windows(needle.len()).any(|w| w == &needle[..]),
                "message {payload} was acknowledged but is not on the device \
                 {elapsed:?} after the first send"
            );
        }
    }
    let expire: u64 = std::fs::read_to_string("/proc/sys/vm/dirty_expire_centisecs")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        elapsed < Duration::from_millis(expire * 10),
        "the run took {elapsed:?}, longer than vm.dirty_expire_centisecs ({expire}): \
         periodic writeback may have written the data, so the check above proves nothing"
    );
}

#[test]
fn a_full_spool_evicts_the_oldest_and_the_router_keeps_serving() {
    let setup = Setup::new("br-full", "durability = \"disk\"\nspool_max_bytes = 20000");
    let sockets = peers(&setup.topo, 1);
    let router = setup.router();
    // No upstream at all: everything waits in the spool, which holds ~20 KB.
    assert_eq!(
        send(&setup.topo, &sockets, 0, 1_000),
        1_000,
        "every CON still acknowledged"
    );
    let evicted = upstream_state(&router)["evicted"].as_u64().unwrap();
    assert!(evicted >= 500, "evictions counted: {evicted}");
    // Once the upstream is back, what was kept drains and is acknowledged.
    let _mosquitto = Mosquitto::start(&setup.topo.gw, UPSTREAM_PORT);
    router.wait_ctl(&["upstream", "ls"], RECONNECT + DEADLINE, |v| {
        let u = &v["upstreams"][0];
        u["spooled_messages"] == 0 && u["acked"].as_u64() == Some(1_000 - evicted)
    });
    router.stop();
}

/// A CON POST to Uri-Path "x" (token: the Message ID).
fn post_x(mid: u16, payload: &str) -> Vec<u8> {
    coap(
        0,
        code::POST,
        mid,
        &mid.to_be_bytes(),
        &[0xb1, b'x'],
        payload.as_bytes(),
    )
}

/// The code of the answer to one CON POST "x" from `sock`, payload `payload`.
fn post(sock: &UdpSocket, mid: u16, payload: &str) -> u8 {
    let dst = SocketAddr::new(GW_V4.into(), 5683);
    let msg = post_x(mid, payload);
    let (answer, _) = confirm(sock, dst, &msg, mid);
    Message::decode(&answer).expect("a CoAP answer").code
}

/// Asserts the spool logged `outages` outages, one line each.
fn assert_outages_logged(router: &Daemon, outages: usize) {
    let lines = router
        .seen
        .iter()
        .filter(|l| l.contains("refuses messages"))
        .count();
    assert_eq!(
        lines,
        outages,
        "one line per outage:\n{}",
        router.seen.join("\n")
    );
}

/// Brings the upstream back (with its persistence, so the subscriber
/// `keeper` registered before gets every message, however soon the bridge
/// reconnects) and asserts it gets exactly the `acknowledged` payloads of
/// the first device's POSTs to "x", in order: nothing lost, nothing refused.
fn assert_upstream_gets_exactly(
    setup: &Setup,
    mosquitto: &mut Mosquitto,
    router: &Daemon,
    keeper: &str,
    acknowledged: &[String],
) {
    mosquitto.restart(&setup.topo.gw);
    let got = upstream_sub(
        &setup.topo.gw,
        keeper,
        acknowledged.len(),
        (RECONNECT + DEADLINE).as_secs() as u32,
    );
    let topic = format!("site-7/m2m/{}/x", DEV_V4[0]);
    let expected: Vec<String> = acknowledged
        .iter()
        .map(|p| format!("{topic} {p}"))
        .collect();
    assert_eq!(got, expected, "the acknowledged messages, in order");
    let sent = acknowledged.len() as u64;
    router.wait_ctl(&["upstream", "ls"], DEADLINE, |v| {
        let u = &v["upstreams"][0];
        u["spooled_messages"] == 0 && u["acked"].as_u64() == Some(sent)
    });
}

#[test]
fn a_full_spool_disk_answers_5_03_logs_once_and_recovers_by_itself() {
    let disk = SmallDisk::mount("br-disk", 64 << 10);
    let setup = Setup::with_spool_dir(
        "br-disk",
        "durability = \"disk\"",
        Some(&disk.path().join("spool")),
    );
    let mut mosquitto = Mosquitto::start(&setup.topo.gw, UPSTREAM_PORT);
    register_upstream_sub(&setup.topo.gw, "keeper");
    mosquitto.stop();
    let sock = &peers(&setup.topo, 1)[0];
    let mut router = setup.router();

    // Until the disk is full, every CON is acknowledged; then 5.03.
    let mut acknowledged = Vec::new();
    let mut mid = 0u16;
    loop {
        mid += 1;
        let payload = format!("m{mid}");
        match post(sock, mid, &payload) {
            code::CHANGED => acknowledged.push(payload),
            code::SERVICE_UNAVAILABLE => break,
            other => panic!("CON {mid} answered {other:#x}"),
        }
        assert!(mid < 10_000, "a 64 KiB disk never filled");
    }
    assert!(
        acknowledged.len() > 100,
        "{} acknowledged",
        acknowledged.len()
    );
    router.expect_line("refuses messages");
    // It stays full: more 5.03s, logged no more.
    for _ in 0..50 {
        mid += 1;
        assert_eq!(post(sock, mid, "refused"), code::SERVICE_UNAVAILABLE);
    }

    // Room returns: service resumes by itself (the spool retries its disk
    // at most every 50 ms after a failure), and the log says so once.
    disk.resize(1 << 20);
    let mut refused = 51;
    let resumed_by = Instant::now() + DEADLINE;
    loop {
        mid += 1;
        let payload = format!("m{mid}");
        match post(sock, mid, &payload) {
            code::CHANGED => break acknowledged.push(payload),
            code::SERVICE_UNAVAILABLE => refused += 1,
            other => panic!("CON {mid} answered {other:#x}"),
        }
        assert!(Instant::now() < resumed_by, "no 2.04 since the disk grew");
    }
    for _ in 0..100 {
        mid += 1;
        let payload = format!("m{mid}");
        assert_eq!(post(sock, mid, &payload), code::CHANGED);
        acknowledged.push(payload);
    }
    router.expect_line("accepts messages again");
    assert_outages_logged(&router, 1);
    assert_eq!(router.counter("coap", "unavailable"), refused);
    assert_upstream_gets_exactly(&setup, &mut mosquitto, &router, "keeper", &acknowledged);
    router.stop();
}

/// Issue 11, build item 2: an fdatasync that takes long (here: held by
/// the fault-injecting filesystem until the test lets it go) delays the
/// publisher waiting for it, and nobody else: other MQTT clients, the
/// message's local delivery and the control socket are served meanwhile.
#[test]
fn a_slow_disk_delays_only_the_publisher_waiting_for_it() {
    let (disk, setup) = Setup::on_faulty_disk("br-slow");
    let router = setup.router();
    let broker: SocketAddr = "127.0.0.1:1883".parse().unwrap();
    let (mut publisher, mut other) = setup.topo.gw.run(|| {
        let mut publisher = RawClient::connect(broker);
        assert_eq!(publisher.handshake("slow-publisher"), 0);
        let mut other = RawClient::connect(broker);
        assert_eq!(other.handshake("other"), 0);
        assert_eq!(other.subscribe("plant/#", 0), 0);
        (publisher, other)
    });

    disk.faults.hold_syncs();
    publisher.publish_qos1("plant/valve", b"durable", 7);
    disk.faults.wait_for_held_sync(DEADLINE);

    // While the disk holds that fsync, everyone else is served: the message
    // reaches local subscribers, another client publishes and pings...
    let (_, _, _, topic, payload) = other.read_publish();
    assert_eq!(
        (topic.as_str(), &payload[..]),
        ("plant/valve", &b"durable"[..])
    );
    other.publish("plant/other", b"x");
    assert_eq!(other.read_publish().3, "plant/other");
    other.ping();
    // ...and the control socket answers.
    assert_eq!(
        router.ctl_json(&["upstream", "ls"])["upstreams"][0]["name"],
        "cloud"
    );
    // The publisher alone waits: no PUBACK while its message is not on disk.
    assert!(disk.faults.held() > 0, "the fsync is still held");
    assert!(
        publisher.nothing_to_read(),
        "PUBACK before the message was on disk"
    );
    disk.faults.release_syncs();
    assert_eq!(publisher.read_puback(), 7);
    router.stop();
}

/// Issue 11, build item 3: write and fsync errors (the fault-injecting
/// filesystem answers EIO): devices get 5.03, duplicate detection forgets
/// the refused exchange so its retransmission is processed again, an MQTT
/// publisher is disconnected unacknowledged, each outage is logged once, and
/// the upstream gets exactly what was acknowledged.
#[test]
fn write_and_fsync_errors_answer_5_03_and_lose_nothing() {
    let (disk, setup) = Setup::on_faulty_disk("br-eio");
    let mut mosquitto = Mosquitto::start(&setup.topo.gw, UPSTREAM_PORT);
    register_upstream_sub(&setup.topo.gw, "keeper-eio");
    mosquitto.stop();
    let sock = &peers(&setup.topo, 1)[0];
    let mut router = setup.router();

    assert_eq!(post(sock, 1, "m1"), code::CHANGED);
    let mut acknowledged = vec!["m1".to_string()];
    let faults = &disk.faults;
    let outages: [(&str, &dyn Fn(bool)); 2] = [
        ("fsync", &|on| faults.fail_syncs(on)),
        ("write", &|on| faults.fail_writes(on)),
    ];
    for (mid, (what, fail)) in (2u16..).zip(outages) {
        let payload = format!("m{mid}");
        fail(true);
        assert_eq!(
            post(sock, mid, &payload),
            code::SERVICE_UNAVAILABLE,
            "a failing {what}"
        );
        router.expect_line("refuses messages");
        // An MQTT publisher is not acknowledged either: disconnected, it
        // will send again when it reconnects.
        setup.topo.gw.run(|| {
            let mut client = RawClient::connect("127.0.0.1:1883".parse().unwrap());
            assert_eq!(client.handshake(&format!("eio-{what}")), 0);
            client.publish_qos1("plant/valve", b"refused", 1);
            assert!(client.closed_by_server(), "closed, unacknowledged");
        });
        fail(false);
        // The same exchange again (same Message ID): processed anew, not
        // answered from the cache, once the disk is retried (50 ms).
        let deadline = Instant::now() + DEADLINE;
        while post(sock, mid, &payload) != code::CHANGED {
            assert!(Instant::now() < deadline, "CON {mid} never accepted");
        }
        acknowledged.push(payload);
        router.expect_line("accepts messages again");
    }
    assert_outages_logged(&router, 2);
    let upstream = router.ctl_json(&["upstream", "ls"])["upstreams"][0].clone();
    assert!(
        upstream["sync_failures"].as_u64().unwrap() >= 2,
        "{upstream}"
    );
    assert!(router.counter("coap", "unavailable") >= 2);

    assert_upstream_gets_exactly(&setup, &mut mosquitto, &router, "keeper-eio", &acknowledged);
    router.stop();
}

/// A device under load: CON POSTs "peer:seq" from `sock`, each sent again
/// until answered, until `stop`; once stopped, a CON left unanswered (the
/// router was killed) ends it. Returns the sequence numbers answered 2.04,
/// counting them in `acked` as they come. `pause` between messages keeps
/// the volume within what the test's upstream queues hold.
fn load(
    sock: &UdpSocket,
    peer: usize,
    pause: Duration,
    stop: &AtomicBool,
    acked: &AtomicUsize,
) -> Vec<u32> {
    let dst = SocketAddr::new(GW_V4.into(), 5683);
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut answered = Vec::new();
    let mut buf = [0u8; 512];
    'next: for seq in 0u32.. {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        std::thread::sleep(pause);
        let mid = seq as u16;
        let payload = format!("{peer}:{seq}");
        let msg = post_x(mid, &payload);
        loop {
            let _ = sock.send_to(&msg, dst);
            match sock.recv(&mut buf) {
                Ok(n) if n >= 4 && u16::from_be_bytes([buf[2], buf[3]]) == mid => {
                    if buf[1] == code::CHANGED {
                        answered.push(seq);
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                    continue 'next;
                }
                Ok(_) => {} // a late answer to an earlier CON
                Err(_) if stop.load(Ordering::SeqCst) => break 'next,
                Err(_) => {} // lost or slow: send it again
            }
        }
    }
    answered
}

/// Runs [`load`] from every socket (peer = its index) while `meanwhile`
/// runs, given the count of 2.04s so far; stops the devices when it
/// returns, and returns each one's acknowledged sequence numbers.
fn under_load(
    sockets: &[UdpSocket],
    pause: Duration,
    meanwhile: impl FnOnce(&AtomicUsize),
) -> Vec<Vec<u32>> {
    let stop = AtomicBool::new(false);
    let acked = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let senders: Vec<_> = sockets
            .iter()
            .enumerate()
            .map(|(peer, sock)| {
                let (stop, acked) = (&stop, &acked);
                scope.spawn(move || load(sock, peer, pause, stop, acked))
            })
            .collect();
        meanwhile(&acked);
        stop.store(true, Ordering::SeqCst);
        senders.into_iter().map(|s| s.join().unwrap()).collect()
    })
}

/// Waits until the bridge is connected and its spool empty: everything
/// it took is acknowledged upstream.
fn wait_drained(router: &Daemon, limit: Duration) {
    router.wait_ctl(&["upstream", "ls"], limit, |v| {
        let u = &v["upstreams"][0];
        u["connected"] == true && u["spooled_messages"] == 0
    });
}

/// Waits until the bridge has drained, then checks that every acknowledged
/// "peer:seq" of `acked` reached the `upstream` subscriber (at least once:
/// more, or twice, is allowed).
fn assert_all_delivered(router: &Daemon, upstream: &mut MosquittoSub, acked: &[Vec<u32>]) {
    wait_drained(router, RECONNECT + DEADLINE);
    let got = upstream.fence();
    let delivered: HashSet<&str> = got.iter().map(|m| m.payload.as_str()).collect();
    for (peer, seqs) in acked.iter().enumerate() {
        let lost: Vec<u32> = seqs
            .iter()
            .copied()
            .filter(|seq| !delivered.contains(format!("{peer}:{seq}").as_str()))
            .collect();
        assert!(
            lost.is_empty(),
            "peer {peer}: acknowledged but never delivered: {lost:?}"
        );
    }
}

/// Issue 11, build item 3: SIGKILL while devices are sending and the bridge
/// is forwarding; after the restart and replay, the upstream has every
/// message a device was acknowledged for.
#[test]
fn a_kill_under_load_loses_nothing_acknowledged() {
    let setup = Setup::new("br-kill", "durability = \"disk\"");
    let _mosquitto = Mosquitto::start(&setup.topo.gw, UPSTREAM_PORT);
    let mut upstream =
        MosquittoSub::start_on(&setup.topo.gw, UPSTREAM_PORT, &["site-7/#"], &["-q", "1"]);
    let sockets = peers(&setup.topo, 8);
    let router = setup.router();
    let acked = under_load(&sockets, Duration::ZERO, |acked| {
        wait_for(DEADLINE, || acked.load(Ordering::SeqCst) >= 2_000);
        drop(router); // SIGKILL, mid-load
    });

    let router = setup.router();
    assert_all_delivered(&router, &mut upstream, &acked);
    router.stop();
}

/// Issue 11, build item 3: the upstream broker goes away and comes back
/// every second for a minute while devices send: every acknowledged
/// message arrives once it stays up, and the router stays up.
#[test]
fn a_flapping_upstream_under_load_loses_nothing_acknowledged() {
    let setup = Setup::new("br-flap", "durability = \"disk\"");
    let mut mosquitto = Mosquitto::start(&setup.topo.gw, UPSTREAM_PORT);
    // A persistent session (kept across the restarts): what is published
    // while it reconnects waits for it.
    let mut upstream = MosquittoSub::start_on(
        &setup.topo.gw,
        UPSTREAM_PORT,
        &["site-7/#"],
        &["-q", "1", "-c", "-i", "flap-keeper"],
    );
    let sockets = peers(&setup.topo, 4);
    let router = setup.router();
    // ~200 messages a second each: Mosquitto keeps at most 100,000 for an
    // offline session (its max_queued_messages).
    let acked = under_load(&sockets, Duration::from_millis(5), |_| {
        for _ in 0..30 {
            std::thread::sleep(Duration::from_secs(1));
            mosquitto.stop();
            std::thread::sleep(Duration::from_secs(1));
            mosquitto.restart(&setup.topo.gw);
        }
    });
    let total: usize = acked.iter().map(Vec::len).sum();
    assert!(total > 100, "only {total} acknowledged in a minute");
    assert_all_delivered(&router, &mut upstream, &acked);
    router.stop();
}

#[test]
fn commands_from_upstream_reach_the_device_and_responses_go_back_up() {
    let setup = setup_with_meter("br-cmd");
    let _mosquitto = Mosquitto::start(&setup.topo.gw, UPSTREAM_PORT);
    register_upstream_sub(&setup.topo.gw, "cloud-app");
    let router = setup.router();
    // The device says hello (so the router knows where it is).
    let dev = &peers(&setup.topo, 1)[0];
    assert_eq!(send(&setup.topo, std::slice::from_ref(dev), 0, 1), 1);
    // The hello's PUBACK means the bridge's connection is past its
    // SUBSCRIBE to upstream commands (sent first; Mosquitto handles a
    // connection's packets in order): command from the cloud side now.
    router.wait_ctl(&["upstream", "ls"], DEADLINE, |v| {
        v["upstreams"][0]["acked"] == 1
    });
    let ok = setup
        .topo
        .gw
        .command("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &UPSTREAM_PORT.to_string(),
            "-q",
            "1",
        ])
        .args(["-t", "site-7/m2m-cmd/meter/relay", "-m", "on"])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    assert_eq!(answer_command(dev, b"done"), b"on");
    // The response (and the uplink hello) went up through the bridge, and
    // nothing else: the bridge spooled exactly those two, so it did not echo
    // the command back up (an echo would be spooled before the command
    // even reached the device).
    router.wait_ctl(&["upstream", "ls"], DEADLINE, |v| {
        v["upstreams"][0]["acked"] == 2
    });
    assert_eq!(upstream_state(&router)["appended"], 2);
    // The command is there once: Mosquitto's own delivery to this subscriber.
    let got = upstream_sub(&setup.topo.gw, "cloud-app", 3, DEADLINE.as_secs() as u32);
    assert!(
        got.contains(&"site-7/m2m-resp/meter/relay done".to_owned()),
        "{got:?}"
    );
    assert_eq!(
        got.iter().filter(|l| l.contains("m2m-cmd")).count(),
        1,
        "{got:?}"
    );
    router.stop();
}

fn upstream_state(router: &Daemon) -> serde_json::Value {
    router.ctl_json(&["upstream", "ls"])["upstreams"][0].clone()
}

/// Setup with the peer "meter" (the first device address) configured.
fn setup_with_meter(tag: &str) -> Setup {
    let setup = Setup::new(tag, "durability = \"memory\"");
    std::fs::write(
        &setup.config,
        std::fs::read_to_string(&setup.config).unwrap()
            + &format!(
                "\n[[peer]]\nname = \"meter\"\nprefix = [\"{}/32\"]\n",
                DEV_V4[0]
            ),
    )
    .unwrap();
    setup
}

/// The device's next request, answered with a piggybacked 2.04 carrying
/// `answer`; returns the request's payload.
fn answer_command(dev: &UdpSocket, answer: &[u8]) -> Vec<u8> {
    let mut buf = [0u8; 512];
    dev.set_read_timeout(Some(DEADLINE)).unwrap();
    let (n, from) = dev
        .recv_from(&mut buf)
        .expect("the command reaches the device");
    let m = Message::decode(&buf[..n]).unwrap();
    let mut ack = Vec::new();
    m2m_router::coap::message::encode(
        &mut ack,
        m2m_router::coap::message::ACK,
        code::CHANGED,
        m.mid,
        m.token,
        &[],
        answer,
    );
    dev.send_to(&ack, from).unwrap();
    m.payload.to_vec()
}

/// Issue 11, finding 0: a command published on the embedded broker was
/// forwarded up by a `#` bridge and came back down through the bridge's
/// subscription to upstream commands, so the device received it twice.
#[test]
fn a_local_command_is_not_forwarded_upstream_and_runs_once() {
    let setup = setup_with_meter("br-loop");
    let _mosquitto = Mosquitto::start(&setup.topo.gw, UPSTREAM_PORT);
    register_upstream_sub(&setup.topo.gw, "cloud-app");
    let router = setup.router();
    let dev = &peers(&setup.topo, 1)[0];
    assert_eq!(send(&setup.topo, std::slice::from_ref(dev), 0, 1), 1);
    // The uplink reaching the upstream shows the bridge is connected and
    // subscribed to upstream commands, so an echo would come back.
    assert_eq!(
        upstream_sub(&setup.topo.gw, "cloud-app", 1, DEADLINE.as_secs() as u32),
        vec!["site-7/m2m/meter/x 0:0"]
    );
    let ok = setup
        .topo
        .gw
        .command("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", "1883", "-q", "1"])
        .args(["-t", "m2m-cmd/meter/valve", "-m", "open"])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    assert_eq!(answer_command(dev, b"opened"), b"open");
    // The response goes up (the upstream application wants it) ...
    assert_eq!(
        upstream_sub(&setup.topo.gw, "cloud-app", 1, DEADLINE.as_secs() as u32),
        vec!["site-7/m2m-resp/meter/valve opened"]
    );
    // ... and the command never did: the bridge spooled the uplink and the
    // response, nothing else. The command was published before the device
    // saw it, so had the bridge taken it, it would be counted by now.
    let cloud = upstream_state(&router);
    assert_eq!(cloud["appended"], 2, "{cloud}");
    router.stop();
}

/// A CA and a server certificate for 127.0.0.1, made with openssl.
fn make_certs(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ca_key = format!("{name}-ca.key");
    let ca = format!("{name}-ca.pem");
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &ca_key,
        "-out",
        &ca,
        "-days",
        "2",
        "-subj",
        &format!("/CN={name} test CA"),
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    dir.join(ca)
}

#[test]
fn mqtts_upstream_is_verified_against_the_configured_ca() {
    let setup = Setup::new("br-tls", "durability = \"memory\"");
    let ca = make_certs(&setup.dir, "good");
    let other_dir = setup.dir.join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let wrong_ca = make_certs(&other_dir, "wrong");
    let conf = setup.dir.join("mosquitto-tls.conf");
    std::fs::write(
        &conf,
        format!(
            "user root\nper_listener_settings false\nallow_anonymous true\nlog_dest none\nlistener {UPSTREAM_PORT} 127.0.0.1\nlistener 8884 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
            ca.display(),
            setup.dir.join("server.pem").display(),
            setup.dir.join("server.key").display()
        ),
    )
    .unwrap();
    let mut mosquitto = setup
        .topo
        .gw
        .command("mosquitto")
        .args(["-c", conf.to_str().unwrap()])
        .spawn()
        .unwrap();
    let listening = |port: u16| {
        setup
            .topo
            .gw
            .run(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
    };
    assert!(
        wait_for(DEADLINE, || listening(UPSTREAM_PORT) && listening(8884)),
        "Mosquitto never listened"
    );
    register_upstream_sub(&setup.topo.gw, "tls-sub");
    for (seq, ca_file, should_arrive) in [(0, &wrong_ca, false), (1, &ca, true)] {
        let text = std::fs::read_to_string(&setup.config)
            .unwrap()
            .replace(
                &format!("mqtt://127.0.0.1:{UPSTREAM_PORT}"),
                "mqtts://127.0.0.1:8884",
            )
            .lines()
            .filter(|l| !l.trim_start().starts_with("ca_file"))
            .collect::<Vec<_>>()
            .join("\n");
        let text = text.replace(
            "durability = \"memory\"",
            &format!(
                "durability = \"memory\"\nca_file = \"{}\"",
                ca_file.display()
            ),
        );
        std::fs::write(&setup.config, text).unwrap();
        let mut router = setup.router();
        let sockets = peers(&setup.topo, 1);
        assert_eq!(send(&setup.topo, &sockets, seq, 1), 1);
        if should_arrive {
            router.wait_ctl(&["upstream", "ls"], DEADLINE, |v| {
                v["upstreams"][0]["acked"] == 1
            });
            let got = upstream_sub(&setup.topo.gw, "tls-sub", 1, DEADLINE.as_secs() as u32);
            assert_eq!(got, vec!["site-7/m2m/10.77.0.1/x 0:1"]);
        } else {
            // Refused for the reason under test, not any failure.
            let line = router.expect_line("upstream connection lost");
            assert!(
                line.contains("invalid peer certificate") && line.contains("UnknownIssuer"),
                "{line}"
            );
            let u = upstream_state(&router);
            assert_eq!(
                (
                    u["connects"].as_u64(),
                    u["acked"].as_u64(),
                    u["spooled_messages"].as_u64()
                ),
                (Some(0), Some(0), Some(1)),
                "{u}"
            );
        }
        router.stop();
    }
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(mosquitto.id() as i32, libc::SIGTERM) };
    let _ = mosquitto.wait();
}
