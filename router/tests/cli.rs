//! The `m2m-router` binary as a user runs it: `check-config`, and `run` in a
//! network namespace (on its `lo` by default, and on a veth in native mode),
//! counters on SIGUSR1, clean detach on SIGTERM, clear errors.
//!
//! The `run` tests are privileged: they need root.

use std::process::Command;

use m2m_router_tests::daemon::Daemon;
use m2m_router_tests::netns::{Netns, Topology, DEADLINE, DEV_V4, GW_IF, GW_V4};
use m2m_router_tests::{require_root, TempPath};

const BIN: &str = env!("CARGO_BIN_EXE_m2m-router");

/// A config file for one test, removed when it ends.
fn temp_file(name: &str, text: &str) -> TempPath {
    TempPath::with_contents(&format!("cli-{name}"), "toml", text)
}

#[test]
fn check_config_accepts_the_example_and_names_bad_fields() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/example.toml");
    let ok = Command::new(BIN)
        .args(["check-config", example])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("ok: 2 peers, 1 routes, 1 upstreams"));

    for (text, field) in [
        (
            "[[peer]]\nname = \"m\"\nprefix = [\"10.0.0.300/32\"]\n",
            "peer[0].prefix[0]",
        ),
        ("[fastpath]\nmode = \"turbo\"\n", "fastpath.mode"),
        ("[defaults]\nrate = \"fast\"\n", "defaults.rate"),
        ("[coap]\nlisten = \"0.0.0.0:5683\"\n", "listen"),
        ("[[peer]\n", "expected"),
    ] {
        let path = temp_file("bad", text);
        let out = Command::new(BIN)
            .arg("check-config")
            .arg(&*path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text:?}: {stderr}");
        assert!(
            stderr.contains(field),
            "{text:?}: error does not name {field}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let missing = Command::new(BIN)
        .args(["check-config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
}

fn link_show(ns: &Netns, iface: &str) -> String {
    let out = ns
        .command("ip")
        .args(["link", "show", iface])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn coap_client(ns: &Netns, uri: &str) {
    let out = ns
        .command("coap-client-notls")
        .args(["-m", "post", "-e", "21.5", "-B", "2", "-v", "6", uri])
        .output()
        .expect("coap-client-notls (Debian package libcoap3-bin)");
    let trace = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        trace.contains("t:ACK c:2.04"),
        "no 2.04 from the router:\n{trace}"
    );
}

#[test]
fn run_attaches_to_lo_by_default_counts_and_detaches() {
    require_root();
    let ns = Netns::create("cli-lo");
    let mut daemon = Daemon::start(&ns, BIN, &[]);
    let attached = daemon.expect_line("XDP attached");
    assert!(
        attached.contains("lo") && attached.contains("generic"),
        "{attached}"
    );
    daemon.expect_line("m2m-router running");
    assert!(
        link_show(&ns, "lo").contains("xdpgeneric"),
        "{}",
        link_show(&ns, "lo")
    );

    coap_client(&ns, "coap://127.0.0.1/sensors/temp");
    daemon.signal(libc::SIGUSR1);
    let accept = daemon.expect_line("accept");
    let packets: u64 = accept
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(packets >= 1, "{accept}");
    daemon.stop();
    assert!(
        !link_show(&ns, "lo").contains("xdp"),
        "still attached after exit"
    );
}

#[test]
fn run_on_a_veth_in_native_mode_applies_the_config() {
    require_root();
    let topo = Topology::new("cli-veth");
    let config = temp_file(
        "veth",
        &format!(
            "[[peer]]\nname = \"banned\"\nprefix = [\"{}/32\"]\ndeny = true\n",
            DEV_V4[1]
        ),
    );
    let mut daemon = Daemon::start(
        &topo.gw,
        BIN,
        &[
            "--iface",
            GW_IF,
            "--xdp-mode",
            "native",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    let attached = daemon.expect_line("XDP attached");
    assert!(attached.contains("native"), "{attached}");
    daemon.expect_line("m2m-router running");
    let shown = link_show(&topo.gw, GW_IF);
    assert!(
        shown.contains("xdp") && !shown.contains("xdpgeneric"),
        "{shown}"
    );

    // coap-client cannot choose its source address among several, so send
    // from a socket bound to the banned peer's address instead.
    let sock = topo.device_socket(DEV_V4[1].into());
    let msg = m2m_router_tests::packet::coap_post(7, b"21.5");
    sock.send_to(&msg, (GW_V4, 5683)).unwrap();
    // The report only has to show a count known to be final.
    daemon.wait_ctl(&["stats"], DEADLINE, |v| {
        v["verdicts"]["drop_denied"]["packets"] == 1
    });
    daemon.signal(libc::SIGUSR1);
    let denied = daemon.expect_line("drop_denied");
    assert!(denied.contains(" 1 packets"), "{denied}");
    let banned = daemon.expect_line("banned");
    assert!(banned.contains("dropped          1 packets"), "{banned}");
    daemon.stop();
    assert!(
        !link_show(&topo.gw, GW_IF).contains("xdp"),
        "still attached after exit"
    );
}

#[test]
fn run_with_xdp_off_says_so_and_attaches_nothing() {
    require_root();
    let ns = Netns::create("cli-off");
    let mut daemon = Daemon::start(&ns, BIN, &["--xdp-mode", "off"]);
    daemon.expect_line("XDP fast path off");
    daemon.expect_line("m2m-router running");
    assert!(!link_show(&ns, "lo").contains("xdp"));
    daemon.stop();
}

#[test]
fn run_as_an_unprivileged_user_says_what_is_needed() {
    require_root();
    let ns = Netns::create("cli-user");
    let out = ns
        .command("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .args([
            BIN,
            "run",
            "--control-socket",
            &format!("/tmp/{}.sock", ns.name()),
        ])
        .output()
        .expect("setpriv (Debian package util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("needs root"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn run_fails_clearly_on_a_missing_interface_or_an_impossible_mode() {
    require_root();
    let ns = Netns::create("cli-err");
    for (args, needle) in [
        (
            &["--iface", "nope0"][..],
            "interface \"nope0\" does not exist",
        ),
        (&["--xdp-mode", "native"][..], "try --xdp-mode skb"),
        (
            &["--xdp-mode", "sideways"][..],
            "not one of auto, native, skb, off",
        ),
    ] {
        let socket = format!("/tmp/{}.sock", ns.name());
        let out = ns
            .command(BIN)
            .args(["run", "--control-socket", &socket])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    assert!(
        !link_show(&ns, "lo").contains("xdp"),
        "nothing left attached"
    );
}
