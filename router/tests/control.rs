//! The control plane with the real binary: `m2m-router ctl` against a
//! daemon in a gateway namespace, changes checked by traffic from the
//! device namespace through XDP. Privileged: needs root.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::unix::net::UnixStream;
use std::process::{Command, Output};
use std::time::Instant;

use m2m_router_tests::daemon::Daemon;
use m2m_router_tests::netns::{confirm, wait_for, Topology, DEADLINE, DEV_V4, GW_IF, GW_V4};
use m2m_router_tests::packet::coap_post;
use m2m_router_tests::{require_root, TempPath};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_m2m-router");

struct Gateway {
    topo: Topology,
    daemon: Daemon,
    config: TempPath,
}

impl Gateway {
    fn start(tag: &str, config_text: &str) -> Gateway {
        require_root();
        let topo = Topology::new(tag);
        let config = TempPath::with_contents(&format!("control-{tag}"), "toml", config_text);
        let daemon = Daemon::running(&topo.gw, BIN, &Self::args(&config));
        Gateway {
            topo,
            daemon,
            config,
        }
    }

    fn args(config: &std::path::Path) -> Vec<&str> {
        vec![
            "--iface",
            GW_IF,
            "--xdp-mode",
            "native",
            "--config",
            config.to_str().unwrap(),
        ]
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(["ctl", "--socket", &self.daemon.socket])
            .args(args)
            .output()
            .unwrap()
    }

    /// `ctl --json ARGS`, which must succeed; its JSON answer.
    fn ctl_json(&self, args: &[&str]) -> Value {
        self.daemon.ctl_json(args)
    }

    fn verdict(&self, reason: &str) -> u64 {
        self.ctl_json(&["stats"])["verdicts"][reason]["packets"]
            .as_u64()
            .unwrap()
    }

    /// One CON POST from device address `who`, acknowledged: retransmitted
    /// as a device would until its ACK comes (the deadline fails the test).
    /// Returns how many transmissions it took.
    fn expect_acked(&self, who: usize) -> u64 {
        let sock: UdpSocket = self.topo.device_socket(IpAddr::V4(DEV_V4[who]));
        let dst = SocketAddr::new(GW_V4.into(), 5683);
        u64::from(confirm(&sock, dst, &coap_post(1, b"x"), 1).1)
    }

    /// One CON POST from `who`, dropped by XDP for `reason`: shown by that
    /// verdict counter (and no new accept), not by silence.
    fn expect_dropped(&self, who: usize, reason: &str) {
        let (before, accepted) = (self.verdict(reason), self.verdict("accept"));
        let sock: UdpSocket = self.topo.device_socket(IpAddr::V4(DEV_V4[who]));
        sock.send_to(&coap_post(1, b"x"), SocketAddr::new(GW_V4.into(), 5683))
            .unwrap();
        assert!(
            wait_for(DEADLINE, || self.verdict(reason) > before),
            "{reason} never counted the packet"
        );
        assert_eq!(
            (self.verdict(reason), self.verdict("accept")),
            (before + 1, accepted)
        );
    }
}

const DROP_UNKNOWN: &str = "[defaults]\nunknown_peers = \"drop\"\nrate = \"unlimited\"\n";

#[test]
fn peer_changes_take_effect_on_the_next_packet() {
    let gw = Gateway::start("ctl-live", DROP_UNKNOWN);
    gw.expect_dropped(1, "drop_unknown_peer");
    let dev = format!("{}/32", DEV_V4[1]);
    let out = gw.ctl(&["peer", "add", "dev1", "--prefix", &dev]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Passes at once after peer add: the first packet is not dropped.
    let unknown = gw.verdict("drop_unknown_peer");
    gw.expect_acked(1);
    assert_eq!(gw.verdict("drop_unknown_peer"), unknown);
    // Removed: dropped at once.
    assert!(gw.ctl(&["peer", "rm", "dev1"]).status.success());
    gw.expect_dropped(1, "drop_unknown_peer");
    // Denied.
    assert!(gw
        .ctl(&["peer", "add", "dev1", "--prefix", &dev, "--deny"])
        .status
        .success());
    gw.expect_dropped(1, "drop_denied");
    // A rate of 1/s with a burst of 1 holds at once: of 20 back to back,
    // one passes, plus one per second the sending took.
    assert!(gw.ctl(&["peer", "rm", "dev1"]).status.success());
    assert!(gw
        .ctl(&["peer", "add", "dev1", "--prefix", &dev, "--rate", "1/s", "--burst", "1"])
        .status
        .success());
    let limited = gw.verdict("drop_rate_limited");
    let sock: UdpSocket = gw.topo.device_socket(IpAddr::V4(DEV_V4[1]));
    let start = Instant::now();
    for mid in 0..20 {
        sock.send_to(&coap_post(mid, b"x"), SocketAddr::new(GW_V4.into(), 5683))
            .unwrap();
    }
    let counts = || {
        let p = &gw.ctl_json(&["stats", "--peer", "dev1"])["peers"]["dev1"];
        (
            p["accepted_packets"].as_u64().unwrap(),
            p["dropped_packets"].as_u64().unwrap(),
        )
    };
    assert!(wait_for(DEADLINE, || {
        let (a, d) = counts();
        a + d >= 20
    }));
    let elapsed = start.elapsed().as_secs_f64();
    let (accepted, dropped) = counts();
    assert_eq!(accepted + dropped, 20);
    assert!(
        (1..=1 + elapsed.ceil() as u64).contains(&accepted),
        "{accepted} of 20 passed in {elapsed:.3} s at 1/s, burst 1"
    );
    assert_eq!(gw.verdict("drop_rate_limited") - limited, dropped);
    let peers = gw.ctl_json(&["peer", "ls"]);
    assert_eq!(peers["peers"][0]["name"], "dev1");
    assert_eq!(peers["peers"][0]["rate"], "1/s");
    gw.daemon.stop();
}

#[test]
fn a_hundred_thousand_peers_in_one_request() {
    let gw = Gateway::start("ctl-bulk", DROP_UNKNOWN);
    let mut file = String::new();
    for i in 0..100_000u32 {
        let ip = std::net::Ipv4Addr::from(0x0a64_0000 + i); // 10.100.0.0 onwards
        file.push_str(&format!(
            "[[peer]]\nname = \"bulk-{i}\"\nprefix = [\"{ip}/32\"]\n"
        ));
    }
    file.push_str(&format!(
        "[[peer]]\nname = \"dev2\"\nprefix = [\"{}/32\"]\n",
        DEV_V4[2]
    ));
    let path = m2m_router_tests::unique_temp_path("bulk", ".toml");
    std::fs::write(&path, file).unwrap();
    let start = Instant::now();
    let answer = gw.ctl_json(&["peer", "import", path.to_str().unwrap()]);
    let took = start.elapsed();
    let _ = std::fs::remove_file(&path);
    eprintln!(
        "imported 100,001 peers in {took:?} (daemon apply {} ms)",
        answer["apply_ms"]
    );
    assert_eq!(answer["imported"], 100_001);
    let sent = gw.expect_acked(2); // a peer from the import passes
    gw.expect_dropped(3, "drop_unknown_peer"); // a source outside it does not
    assert_eq!(
        gw.ctl_json(&["peer", "ls"])["peers"]
            .as_array()
            .unwrap()
            .len(),
        100_001
    );
    let stats = gw.ctl_json(&["stats", "--peer", "dev2"]);
    assert_eq!(stats["peers"]["dev2"]["accepted_packets"], sent);
    gw.daemon.stop();
}

#[test]
fn a_saved_config_survives_a_restart() {
    let gw = Gateway::start("ctl-save", DROP_UNKNOWN);
    let dev = format!("{}/32", DEV_V4[1]);
    assert!(gw
        .ctl(&["peer", "add", "dev1", "--prefix", &dev, "--rate", "50/s"])
        .status
        .success());
    assert!(gw
        .ctl(&[
            "route",
            "add",
            "alarms",
            "--match",
            "alarm/*",
            "--topic",
            "alarms/{peer}",
            "--qos",
            "1"
        ])
        .status
        .success());
    assert!(gw.ctl(&["config", "save"]).status.success());
    let Gateway {
        topo,
        daemon,
        config,
    } = gw;
    daemon.stop();
    let saved = std::fs::read_to_string(&*config).unwrap();
    assert!(
        saved.contains("dev1") && saved.contains("alarms"),
        "{saved}"
    );
    let daemon = Daemon::running(&topo.gw, BIN, &Gateway::args(&config));
    let gw = Gateway {
        topo,
        daemon,
        config,
    };
    let peers = gw.ctl_json(&["peer", "ls"]);
    assert_eq!(peers["peers"][0]["name"], "dev1");
    assert_eq!(peers["peers"][0]["rate"], "50/s");
    assert_eq!(gw.ctl_json(&["route", "ls"])["routes"][0]["name"], "alarms");
    // Same behaviour after the restart.
    gw.expect_acked(1);
    gw.expect_dropped(2, "drop_unknown_peer");
    gw.daemon.stop();
}

/// Sends raw lines to the control socket; returns each response.
fn raw_requests(socket: &str, lines: &[&[u8]]) -> Vec<Value> {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    lines
        .iter()
        .map(|line| {
            s.write_all(line).unwrap();
            s.write_all(b"\n").unwrap();
            let mut answer = String::new();
            reader.read_line(&mut answer).unwrap();
            serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
        })
        .collect()
}

#[test]
fn bad_requests_get_clear_errors_and_change_nothing() {
    let gw = Gateway::start("ctl-bad", DROP_UNKNOWN);
    let answers = raw_requests(
        &gw.daemon.socket,
        &[
            b"garbage",
            br#"{"id":1,"version":1,"command":"launch"}"#,
            br#"{"id":2,"version":9,"command":"status"}"#,
            br#"{"id":3,"version":1,"command":"status","extra":true}"#,
            br#"{"id":4,"version":1,"command":"peer.add","args":{"name":"p","prefix":["10.0.0.300/32"]}}"#,
            br#"{"id":5,"version":1,"command":"peer.add","args":{"name":"p","prefix":["10.0.0.1/32"],"topic":"a/#"}}"#,
            br#"{"id":6,"version":1,"command":"peer.add","args":{"name":"p","prefix":["10.0.0.1/32"],"colour":"red"}}"#,
            br#"{"id":7,"version":1,"command":"peer.import","args":{"peers":[{"name":"a","prefix":["10.9.0.1/32"]},{"name":"b","prefix":["nope"]}]}}"#,
            br#"{"id":8,"version":1,"command":"peer.rm","args":{"name":"ghost"}}"#,
            br#"{"id":9,"version":1,"command":"status"}"#,
        ],
    );
    let error = |i: usize| {
        (
            answers[i]["error"]["code"]
                .as_str()
                .unwrap_or("-")
                .to_owned(),
            answers[i]["error"]["field"]
                .as_str()
                .unwrap_or("-")
                .to_owned(),
        )
    };
    assert_eq!(error(0).0, "invalid_json");
    assert_eq!(error(1), ("unknown_command".into(), "command".into()));
    assert_eq!(error(2), ("unsupported_version".into(), "version".into()));
    assert_eq!(error(3), ("invalid_request".into(), "extra".into()));
    assert_eq!(error(4), ("invalid_config".into(), "prefix[0]".into()));
    assert_eq!(error(5), ("invalid_config".into(), "topic".into()));
    assert_eq!(error(6), ("invalid_request".into(), "colour".into()));
    assert_eq!(
        error(7),
        ("invalid_config".into(), "peers[1].prefix[0]".into())
    );
    assert_eq!(error(8), ("not_found".into(), "name".into()));
    assert_eq!(answers[9]["id"], 9);
    assert_eq!(answers[9]["result"]["peers"], 0, "nothing was half-applied");
    // stats --watch streams a response per interval on one request.
    let mut s = UnixStream::connect(&gw.daemon.socket).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"{\"id\":\"w\",\"version\":1,\"command\":\"stats\",\"args\":{\"watch\":true,\"interval_ms\":100}}\n").unwrap();
    let mut reader = BufReader::new(s);
    for _ in 0..3 {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["id"], "w");
        assert!(v["result"]["verdicts"].is_object());
    }
    drop(reader);
    // An oversized line is refused and the connection closed; the daemon serves on.
    let mut s = UnixStream::connect(&gw.daemon.socket).unwrap();
    let big = vec![b'x'; (64 << 20) + 16];
    let _ = s.write_all(&big);
    let mut answer = String::new();
    let _ = BufReader::new(&s).read_line(&mut answer);
    assert!(answer.contains("too_large"), "{answer}");
    assert!(gw.ctl(&["status"]).status.success());
    // The CLI: refused -> 1, usage -> 2.
    assert_eq!(gw.ctl(&["peer", "rm", "ghost"]).status.code(), Some(1));
    assert_eq!(gw.ctl(&["peer", "frobnicate"]).status.code(), Some(2));
    gw.daemon.stop();
}

#[test]
fn other_users_are_refused() {
    let gw = Gateway::start("ctl-uid", DROP_UNKNOWN);
    let as_nobody = |socket: &str| {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                BIN,
                "ctl",
                "--socket",
                socket,
                "status",
            ])
            .output()
            .unwrap()
    };
    // Mode 0660: the file system refuses first...
    let out = as_nobody(&gw.daemon.socket);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
    // ...and with the file opened up, SO_PEERCRED still does.
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&gw.daemon.socket).unwrap().permissions(),
        0o666,
    );
    std::fs::set_permissions(
        &gw.daemon.socket,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    let out = as_nobody(&gw.daemon.socket);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("forbidden"),
        "{out:?}"
    );
    assert!(gw.ctl(&["status"]).status.success(), "root still gets in");
    gw.daemon.stop();
}

#[test]
fn reload_applies_a_good_file_and_keeps_running_on_a_bad_one() {
    let mut gw = Gateway::start("ctl-reload", DROP_UNKNOWN);
    std::fs::write(
        &*gw.config,
        format!(
            "{DROP_UNKNOWN}[[peer]]\nname = \"dev1\"\nprefix = [\"{}/32\"]\n",
            DEV_V4[1]
        ),
    )
    .unwrap();
    gw.daemon.signal(libc::SIGHUP);
    gw.daemon.expect_line("configuration reloaded");
    gw.expect_acked(1); // SIGHUP applied the file
    std::fs::write(
        &*gw.config,
        "[[peer]]\nname = \"dev1\"\nprefix = [\"not-an-ip\"]\n",
    )
    .unwrap();
    gw.daemon.signal(libc::SIGHUP);
    let line = gw.daemon.expect_line("reload refused");
    assert!(line.contains("peer[0].prefix[0]"), "{line}");
    gw.expect_acked(1); // the running config is unchanged
    let out = gw.ctl(&["config", "reload"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("peer[0].prefix[0]"));
    gw.daemon.stop();
}

#[test]
fn one_daemon_per_control_socket_and_stale_ones_are_replaced() {
    require_root();
    let topo = Topology::new("ctl-sock");
    let socket = format!("/tmp/{}-shared.sock", topo.gw.name());
    // A stale socket file (no one listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(std::path::Path::new(&socket).exists());
    let first = Daemon::running(
        &topo.gw,
        BIN,
        &["--iface", GW_IF, "--control-socket", &socket],
    );
    // A second daemon on the same path refuses to start.
    let out = topo
        .dev
        .command(BIN)
        .args(["run", "--xdp-mode", "off", "--control-socket", &socket])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another m2m-router is serving"),
        "{out:?}"
    );
    first.stop();
}

#[test]
fn metrics_are_valid_prometheus_text() {
    let gw = Gateway::start("ctl-metrics", DROP_UNKNOWN);
    assert!(gw
        .ctl(&[
            "peer",
            "add",
            "dev1",
            "--prefix",
            &format!("{}/32", DEV_V4[1])
        ])
        .status
        .success());
    let n = gw.expect_acked(1);
    let body = gw.topo.gw.run(|| {
        let mut s = std::net::TcpStream::connect("127.0.0.1:9683").unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut all = String::new();
        std::io::Read::read_to_string(&mut s, &mut all).unwrap();
        all
    });
    let (head, metrics) = body.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200") && head.contains("version=0.0.4"),
        "{head}"
    );
    assert!(
        metrics.contains(&format!(
            "m2m_xdp_packets_total{{reason=\"accept\",action=\"pass\"}} {n}"
        )),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        "m2m_peer_packets_total{{peer=\"dev1\",verdict=\"accepted\"}} {n}"
    )));
    assert!(metrics.contains("m2m_coap_published_total 1"));
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    gw.daemon.stop();
}
