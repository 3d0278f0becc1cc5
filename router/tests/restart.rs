//! Issue 11, build item 5: hitless restarts. With `[fastpath] persist` the
//! XDP link and maps are pinned and the next run adopts them, so filtering
//! never stops: junk and a denied peer's CoAP are sent the whole time the
//! daemon is restarted ten times, and not one such packet reaches the
//! gateway's IP stack (an nftables counter in the gateway namespace), while
//! the verdict counters only grow and account for every packet sent.

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use m2m_router_tests::bpffs::BpfFs;
use m2m_router_tests::daemon::Daemon;
use m2m_router_tests::netns::{wait_for, Netns, Topology, DEADLINE, DEV_IF, DEV_V4, GW_IF, GW_V4};
use m2m_router_tests::packet::coap_post;
use m2m_router_tests::require_root;

const BIN: &str = env!("CARGO_BIN_EXE_m2m-router");
const RESTARTS: usize = 10;

fn run_in(ns: &Netns, program: &str, args: &[&str]) -> String {
    let out = ns.command(program).args(args).output().expect(program);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An nftables counter of the CoAP the fast path must drop, in the
/// gateway's input hook (after XDP, before any socket).
fn count_leaks(gw: &Netns) {
    let denied = DEV_V4[1];
    let script = format!(
        "table inet m2m_leaks {{
            counter leaked {{}}
            chain input {{
                type filter hook input priority 0;
                ip saddr {denied} udp dport 5683 counter name leaked
                udp dport 5683 udp length < 12 counter name leaked
            }}
        }}"
    );
    let mut child = gw
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft (package nftables)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "nft -f: the leak counter");
}

fn leaked(gw: &Netns) -> u64 {
    let out = run_in(
        gw,
        "nft",
        &["-j", "list", "counter", "inet", "m2m_leaks", "leaked"],
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("nft -j prints JSON");
    v["nftables"]
        .as_array()
        .and_then(|items| items.iter().find_map(|i| i["counter"]["packets"].as_u64()))
        .unwrap_or_else(|| panic!("no counter in {out}"))
}

/// The id of the XDP program on the gateway's interface (`ip link`).
fn xdp_program(gw: &Netns) -> Option<u64> {
    let out = run_in(gw, "ip", &["-d", "-j", "link", "show", "dev", GW_IF]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["xdp"]["prog"]["id"].as_u64()
}

/// Packets the device's veth could not hand to the gateway side (its ring
/// was full): sent, but never seen by XDP.
fn veth_drops(dev: &Netns) -> u64 {
    let out = run_in(dev, "ip", &["-s", "-j", "link", "show", "dev", DEV_IF]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["stats64"]["tx"]["dropped"].as_u64().unwrap_or(0)
}

fn verdict(d: &Daemon, reason: &str) -> u64 {
    d.ctl_json(&["stats"])["verdicts"][reason]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no verdict {reason}"))
}

#[test]
fn ten_restarts_leave_no_packet_unfiltered() {
    require_root();
    let topo = Topology::new("restart");
    let bpffs = BpfFs::mount("restart");
    let pin_dir = bpffs.path().join("m2m-router");
    // Halfway, a peer is added in front of the others: the adopted maps
    // get the new policy, and the peers already there keep their ids (and
    // so their counters).
    let config = |newcomer: bool| {
        format!(
            "[coap]\nlisten = [\"{GW_V4}:5683\"]\n\
             [fastpath]\ninterfaces = [\"{GW_IF}\"]\npersist = true\npin_dir = \"{}\"\n\
             {}\
             [[peer]]\nname = \"meter\"\nprefix = [\"{}/32\"]\n\
             [[peer]]\nname = \"intruder\"\nprefix = [\"{}/32\"]\ndeny = true\n",
            pin_dir.display(),
            if newcomer {
                format!(
                    "[[peer]]\nname = \"newcomer\"\nprefix = [\"{}/32\"]\n",
                    DEV_V4[2]
                )
            } else {
                String::new()
            },
            DEV_V4[0],
            DEV_V4[1],
        )
    };
    let config_file = std::env::temp_dir().join(format!("m2m-restart-{}.toml", std::process::id()));
    std::fs::write(&config_file, config(false)).unwrap();
    let args = ["--config", config_file.to_str().unwrap()];
    count_leaks(&topo.gw);

    let mut daemon = Daemon::running(&topo.gw, BIN, &args);
    assert!(
        daemon.seen.iter().any(|l| l.contains("XDP attached")),
        "the first run installs: {:?}",
        daemon.seen
    );
    let mut program = xdp_program(&topo.gw).expect("XDP attached to the gateway's veth");
    let drops_before = veth_drops(&topo.dev);

    // Junk (2 bytes: shorter than a CoAP header) from the meter, and
    // well-formed CoAP from the denied peer, for as long as the test runs.
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let junk = topo.device_socket(DEV_V4[0].into());
        let denied = topo.device_socket(DEV_V4[1].into());
        let (sent, stop) = (sent.clone(), stop.clone());
        std::thread::spawn(move || send_until(&junk, &denied, &sent, &stop))
    };

    let mut seen = (0, 0);
    let mut intruder_dropped = 0;
    for restart in 1..=RESTARTS {
        if restart == RESTARTS / 2 {
            std::fs::write(&config_file, config(true)).unwrap();
        }
        daemon.stop();
        // Traffic arrives while no daemon runs at all.
        let at_stop = sent.load(Ordering::Relaxed);
        assert!(
            wait_for(DEADLINE, || sent.load(Ordering::Relaxed) > at_stop + 100),
            "the sender stalled"
        );
        assert_eq!(
            xdp_program(&topo.gw),
            Some(program),
            "XDP stayed while no daemon ran"
        );
        daemon = Daemon::running(&topo.gw, BIN, &args);
        assert!(
            daemon.seen.iter().any(|l| l.contains("XDP adopted")),
            "restart {restart} adopts: {:?}",
            daemon.seen
        );
        let now = xdp_program(&topo.gw).expect("XDP attached");
        assert_ne!(
            now, program,
            "restart {restart}: the new program replaced the old one"
        );
        program = now;
        let counts = (
            verdict(&daemon, "drop_too_short"),
            verdict(&daemon, "drop_denied"),
        );
        assert!(
            counts.0 >= seen.0 && counts.1 >= seen.1,
            "restart {restart}: the verdict counters went from {seen:?} to {counts:?}"
        );
        seen = counts;
        let dropped = daemon.ctl_json(&["stats", "--peer", "intruder"])["peers"]["intruder"]
            ["dropped_packets"]
            .as_u64()
            .expect("the intruder's counters");
        assert!(
            dropped >= intruder_dropped,
            "restart {restart}: the intruder's drops went from {intruder_dropped} to {dropped}"
        );
        intruder_dropped = dropped;
    }
    assert!(intruder_dropped > 0);
    let peers = daemon.ctl_json(&["peer", "ls"]);
    assert!(
        peers.to_string().contains("newcomer"),
        "the new policy was adopted: {peers}"
    );
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    let sent = sent.load(Ordering::Relaxed);

    // Every packet sent was either dropped by XDP and counted, or never
    // left the device's veth.
    let lost_on_veth = veth_drops(&topo.dev) - drops_before;
    assert!(
        wait_for(DEADLINE, || {
            verdict(&daemon, "drop_too_short") + verdict(&daemon, "drop_denied") + lost_on_veth
                == sent
        }),
        "sent {sent} ({lost_on_veth} lost on the veth), counted {} too short and {} denied",
        verdict(&daemon, "drop_too_short"),
        verdict(&daemon, "drop_denied"),
    );
    assert_eq!(
        leaked(&topo.gw),
        0,
        "packets reached the gateway's IP stack"
    );
    assert!(
        seen.0 > 0 && seen.1 > 0,
        "both kinds were counted: {seen:?}"
    );

    // `detach` removes what persist left: the program and the pins.
    daemon.stop();
    assert!(
        xdp_program(&topo.gw).is_some(),
        "persisted after the last stop"
    );
    let out = run_in(
        &topo.gw,
        BIN,
        &["detach", "--pin-dir", pin_dir.to_str().unwrap()],
    );
    assert!(out.contains(&format!("detached XDP from {GW_IF}")), "{out}");
    assert_eq!(xdp_program(&topo.gw), None, "detach removed the program");
    assert_eq!(
        std::fs::read_dir(&pin_dir).unwrap().count(),
        0,
        "detach removed the pins"
    );
    let again = topo
        .gw
        .command(BIN)
        .args(["detach", "--pin-dir", pin_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "a second detach finds nothing and says so"
    );
    let _ = std::fs::remove_file(&config_file);
}

/// Sends the two kinds in turn, a few at a time, counting what was sent.
fn send_until(junk: &UdpSocket, denied: &UdpSocket, sent: &AtomicU64, stop: &AtomicBool) {
    let gw = SocketAddr::new(GW_V4.into(), 5683);
    let coap = coap_post(1, b"open");
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..16 {
            junk.send_to(b"\x40\x01", gw).expect("send junk");
            denied.send_to(&coap, gw).expect("send denied CoAP");
            sent.fetch_add(2, Ordering::Relaxed);
        }
        // Pacing, not synchronisation: leave the CPUs to the restarts.
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_stale_or_foreign_pin_dir_is_refused_clearly() {
    require_root();
    let ns = Netns::create("pins");
    // Not a bpf file system: refused before anything is attached.
    let dir = std::env::temp_dir().join(format!("m2m-not-bpffs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!(
        "[fastpath]\npersist = true\npin_dir = \"{}\"\n",
        dir.join("m2m").display()
    );
    let file = dir.join("c.toml");
    std::fs::write(&file, config).unwrap();
    let out = ns
        .command(BIN)
        .args(["run", "--config", file.to_str().unwrap()])
        .args(["--control-socket", dir.join("s").to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("is not on a bpf file system"), "{err}");
    assert!(
        !Command::new("ip")
            .args(["netns", "exec", ns.name(), "ip", "link", "show", "lo"])
            .output()
            .unwrap()
            .stdout
            .windows(3)
            .any(|w| w == b"xdp"),
        "nothing attached"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
