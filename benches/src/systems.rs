//! Starting the systems the benchmarks measure, in the gateway namespace:
//! m2m-router (its pid read from its log, for the CPU accounting) and the
//! Python aiocoap peer of `benches/peers/` (from `cargo xtask bench-peers`).

use m2m_router_tests::daemon::Daemon;
use m2m_router_tests::netns::{Topology, GW_IF};

/// The release router binary (`M2M_ROUTER_BIN` overrides it).
pub fn router_bin() -> String {
    std::env::var("M2M_ROUTER_BIN").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/m2m-router").into()
    })
}

/// m2m-router on the gateway veth in `xdp_mode` with the config file
/// `config`; returns it and its pid.
pub fn start_router(topo: &Topology, xdp_mode: &str, config: &str) -> (Daemon, u32) {
    let daemon = Daemon::running(
        &topo.gw,
        &router_bin(),
        &["--iface", GW_IF, "--xdp-mode", xdp_mode, "--config", config],
    );
    let pid: u32 = daemon
        .seen
        .iter()
        .find_map(|l| {
            l.rsplit_once("pid=")
                .and_then(|(_, p)| p.trim().parse().ok())
        })
        .expect("daemon pid");
    (daemon, pid)
}

/// The Python aiocoap bridge (benches/peers/aiocoap_bridge.py) on CoAP port
/// 5683, publishing to (and observing topics of) the Mosquitto on
/// `mqtt_port`, once it says ready.
pub fn start_aiocoap(topo: &Topology, mqtt_port: u16) -> std::process::Child {
    let venv = std::env::var("M2M_PEERS_VENV").unwrap_or_else(|_| {
        format!(
            "{}/.cache/m2m-router/peers/venv",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/aiocoap_bridge.py");
    let mut child = topo
        .gw
        .command(&format!("{venv}/bin/python"))
        .args([script, "0.0.0.0", "5683", &mqtt_port.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the aiocoap venv (cargo xtask bench-peers)");
    let mut line = String::new();
    let stdout = child.stdout.take().unwrap();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    assert_eq!(line.trim(), "ready", "the aiocoap bridge did not start");
    child
}
