//! End-to-end load through one system under test, in a topology of two
//! network namespaces joined by a veth (devices -> gateway). The generator
//! (benches/src/load.rs: simulated devices with their own addresses and
//! ports, sendmmsg, CON/NON mix, payload sizes, IPv4/IPv6) offers CoAP
//! POSTs; the counting subscriber (benches/src/subscriber.rs) reads where the
//! system delivers. Prints one Markdown table row: offered and delivered
//! msgs/s, loss (overall, and how many devices lost any), latency
//! percentiles (send time carried in the payload; both namespaces share
//! CLOCK_MONOTONIC), and CPU per delivered message: the machine's busy time
//! minus this process's own (generator and subscriber), and the system's
//! main process alone (benches/src/cpu.rs says what tick accounting hides).
//!
//!   cargo build --release && sudo ./target/release/e2e --help
//!
//! Systems (`--sink`): `embedded` (m2m-router, XDP native on the gateway
//! veth, its own broker), `bridge-memory` / `bridge-disk` (m2m-router
//! bridging into a Mosquitto in the gateway namespace; subscribe there),
//! `aiocoap` (the Python aiocoap + paho-mqtt bridge of benches/peers/ into
//! that Mosquitto) and `node-red` (a Node-RED 4 flow, node-red-contrib-coap
//! -> function -> mqtt out). Their runtimes come from `cargo xtask
//! bench-peers`. Needs root (namespaces, XDP).
//!
//! `--flood xdp|nft|none`: a junk flood runs flat out beside the load (see
//! `load::flood`); the legitimate devices are a configured peer prefix and
//! unknown peers are dropped. `xdp`: the router's fast path drops the junk;
//! `nft`: the same policy as nftables rules, router with --xdp-mode off;
//! `none`: no filtering.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use benches::cpu::Sample;
use benches::load::{self, Family, LoadSpec, LEGIT_V4_PREFIX};
use benches::subscriber;
use benches::systems::{start_aiocoap, start_router};
use clap::Parser;
use m2m_router_tests::netns::{Topology, DEV_IF, GW_V4, GW_V6};

#[derive(Parser, Debug)]
#[command(about = "End-to-end CoAP -> MQTT load through one system under test")]
struct Args {
    /// Seconds of offered load.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Simulated devices, each with its own source address and port.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Offered messages per second over all devices; 0 = flat out.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Share of confirmable messages in percent (the rest NON).
    #[arg(long, default_value_t = 100)]
    con: u32,
    /// Payload sizes in bytes, used in turn (each 16..=1200).
    #[arg(long, value_delimiter = ',', default_value = "32")]
    sizes: Vec<usize>,
    /// v4, v6 or mixed (even devices IPv4, odd IPv6).
    #[arg(long, default_value = "v4")]
    family: Family,
    /// Generator threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// embedded, bridge-memory, bridge-disk, aiocoap or node-red.
    #[arg(long, default_value = "embedded")]
    sink: String,
    /// Junk flood beside the load, filtered by: xdp, nft or none.
    #[arg(long)]
    flood: Option<String>,
    /// Junk sender threads.
    #[arg(long, default_value_t = 1)]
    flood_threads: usize,
    /// Router worker threads (default: the router's own, one per CPU).
    #[arg(long)]
    workers: Option<usize>,
    /// Record a perf profile (call graphs) of the system's process into
    /// this file, for 2 s from 1 s into the load.
    #[arg(long)]
    perf: Option<std::path::PathBuf>,
    /// Show the router's log and final counters.
    #[arg(long)]
    verbose: bool,
}

/// Node-RED's user directory for this run (removed at the end).
fn node_red_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("m2m-e2e-node-red-{}", std::process::id()))
}

/// The Node-RED flow in the gateway namespace, once it runs and is
/// connected to the Mosquitto.
fn start_node_red(topo: &Topology) -> std::process::Child {
    let home = std::env::var("HOME").unwrap_or_default();
    let bin = format!("{home}/.cache/m2m-router/peers/node-red/node_modules/.bin/node-red");
    let user_dir = node_red_dir();
    let _ = std::fs::remove_dir_all(&user_dir);
    std::fs::create_dir_all(&user_dir).unwrap();
    let flow = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/node-red-flow.json");
    let mut child = topo
        .gw
        .command(&bin)
        .args(["-u", user_dir.to_str().unwrap(), flow])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("Node-RED (cargo xtask bench-peers)");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "Node-RED did not connect to the broker"
        );
        match lines.next() {
            Some(Ok(line)) if line.contains("Connected to broker") => break,
            Some(Ok(_)) => {}
            _ => panic!("Node-RED exited"),
        }
    }
    // Keep reading its log so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    child
}

/// The fast path's policy written as nftables rules in the gateway
/// namespace: CoAP only from the configured peer, and only version 1 (the
/// first two bits after the 8-byte UDP header).
fn nft_policy(topo: &Topology) {
    let rules = format!(
        "table inet m2m {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  udp dport 5683 ip saddr != {} drop\n  udp dport 5683 @th,64,2 != 1 drop\n }}\n}}\n",
        LEGIT_V4_PREFIX
    );
    let mut nft = topo
        .gw
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft (Debian package nftables)");
    std::io::Write::write_all(&mut nft.stdin.take().unwrap(), rules.as_bytes()).unwrap();
    assert!(
        nft.wait().unwrap().success(),
        "loading the nftables rules failed"
    );
}

/// Datagrams the device veth could not hand to the gateway end: with XDP
/// attached there, a veth queues frames in a 256-entry ring per queue and
/// drops what does not fit (drivers/net/veth.c), before XDP sees them.
fn veth_drops(topo: &Topology) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["-n", topo.dev.name(), "-s", "-j", "link", "show", DEV_IF])
        .output()
        .expect("ip -s link");
    let json = String::from_utf8_lossy(&out.stdout);
    // {"stats64":{"rx":{..},"tx":{"bytes":..,"dropped":N,..}}}
    json.split_once("\"tx\":")
        .and_then(|(_, tx)| tx.split_once("\"dropped\":"))
        .and_then(|(_, v)| v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or(0)
}

/// UDP datagrams the gateway's kernel dropped for a full socket receive
/// buffer (/proc/net/snmp `Udp: RcvbufErrors`, per namespace).
fn udp_rcvbuf_errors(topo: &Topology) -> u64 {
    let out = topo
        .gw
        .command("cat")
        .arg("/proc/net/snmp")
        .output()
        .expect("cat /proc/net/snmp");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// The router's configuration for this run.
fn router_config(args: &Args, spool: &std::path::Path) -> String {
    let mut text = String::from("[defaults]\nrate = \"unlimited\"\ntopic = \"load/{ip}/{port}\"\n");
    if args.flood.is_some() {
        text.push_str("unknown_peers = \"drop\"\n");
        text.push_str(&format!(
            "[[peer]]\nname = \"legit\"\nprefix = [\"{LEGIT_V4_PREFIX}\"]\ntopic = \"load/{{ip}}/{{port}}\"\n"
        ));
    }
    if let Some(workers) = args.workers {
        text.push_str(&format!("[coap]\nworkers = {workers}\n"));
    }
    text.push_str("[mqtt]\nsession_queue = 1000000\n");
    if let Some(durability) = args.sink.strip_prefix("bridge-") {
        text.push_str(&format!(
            "[[upstream]]\nname = \"bench\"\nurl = \"mqtt://127.0.0.1:1885\"\ndurability = \"{durability}\"\nspool_dir = \"{}\"\nspool_max_bytes = 1000000000\n",
            spool.display()
        ));
    }
    text
}

fn main() {
    let args = Args::parse();
    let sink = args.sink.as_str();
    let topo = Topology::new("e2e");
    load::route_devices(&topo);
    let config = std::env::temp_dir().join(format!("m2m-e2e-{}.toml", std::process::id()));
    let spool = std::path::PathBuf::from(format!("/var/tmp/m2m-e2e-spool-{}", std::process::id()));
    let xdp_mode = match args.flood.as_deref() {
        None | Some("xdp") => "native",
        Some("nft") => {
            nft_policy(&topo);
            "off"
        }
        Some("none") => "off",
        Some(other) => panic!("--flood {other:?}: xdp, nft or none"),
    };
    let _mosquitto = match sink {
        "embedded" => None,
        "aiocoap" | "node-red" | "bridge-memory" | "bridge-disk" => {
            Some(m2m_router_tests::mqtt::Mosquitto::start(&topo.gw, 1885))
        }
        other => panic!("unknown sink {other:?}"),
    };
    std::fs::write(&config, router_config(&args, &spool)).unwrap();
    let (daemon, mut peer, pid) = match sink {
        "aiocoap" | "node-red" => {
            let peer = if sink == "aiocoap" {
                start_aiocoap(&topo, 1885)
            } else {
                start_node_red(&topo)
            };
            let pid = peer.id();
            (None, Some(peer), pid)
        }
        _ => {
            let (daemon, pid) = start_router(&topo, xdp_mode, config.to_str().unwrap());
            (Some(daemon), None, pid)
        }
    };
    // The subscriber reads where the system under test delivers: the
    // embedded broker, or the Mosquitto the bridge (or the peer) feeds.
    let broker: SocketAddr = if sink == "embedded" {
        "127.0.0.1:1883"
    } else {
        "127.0.0.1:1885"
    }
    .parse()
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = topo
        .gw
        .run(|| subscriber::subscribe(broker, args.devices, stop.clone()))
        .expect("subscribe to the broker");
    std::thread::sleep(Duration::from_millis(300));

    let spec = LoadSpec {
        devices: args.devices,
        family: args.family,
        con_percent: args.con,
        payload_sizes: args.sizes.clone(),
        rate: args.rate,
        duration: Duration::from_secs_f64(args.seconds),
        per_device: None,
        threads: args.threads,
        // ACKs later than this count as missing in the figures.
        ack_wait: Duration::from_millis(50),
    };
    let v4 = SocketAddr::new(GW_V4.into(), 5683);
    let v6 = SocketAddr::new(GW_V6.into(), 5683);
    let drops_before = veth_drops(&topo);
    let rcvbuf_before = udp_rcvbuf_errors(&topo);
    let before = Sample::take(pid);
    let junk_stop = AtomicBool::new(false);
    let (offered, junk) = std::thread::scope(|s| {
        let junk = args
            .flood
            .as_ref()
            .map(|_| s.spawn(|| load::flood(&topo, GW_V4, args.flood_threads, &junk_stop)));
        let profile = args.perf.as_ref().map(|path| {
            s.spawn(move || {
                std::thread::sleep(Duration::from_secs(1));
                std::process::Command::new("perf")
                    .args(["record", "-q", "-g", "-p", &pid.to_string(), "-o"])
                    .arg(path)
                    .args(["--", "sleep", "2"])
                    .status()
            })
        });
        let offered = load::offer(&topo, &spec, v4, v6, &AtomicBool::new(false));
        if let Some(profile) = profile {
            let status = profile
                .join()
                .unwrap()
                .expect("perf (Debian package linux-perf)");
            assert!(status.success(), "perf record failed: {status}");
        }
        junk_stop.store(true, Ordering::Relaxed);
        (offered, junk.map(|j| j.join().unwrap()))
    });
    let offered = offered.expect("offering the load");
    let junk_sent = junk.unwrap_or(0);
    // Let queues drain: what arrives late still counts, its latency shows it.
    std::thread::sleep(Duration::from_secs(if sink == "embedded" { 1 } else { 3 }));
    let used = Sample::take(pid).since(&before);
    let drops = veth_drops(&topo) - drops_before;
    let rcvbuf_drops = udp_rcvbuf_errors(&topo) - rcvbuf_before;
    stop.store(true, Ordering::Relaxed);
    let got = receiver.join().unwrap();
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_dir_all(&spool);
    if args.verbose {
        eprintln!("cpu seconds: {used:?}");
    }
    if let Some(daemon) = daemon {
        if args.verbose {
            daemon.signal(libc::SIGUSR1);
            std::thread::sleep(Duration::from_millis(300));
        }
        daemon.stop_and_show(args.verbose);
    }
    if let Some(peer) = &mut peer {
        let _ = peer.kill();
        let _ = peer.wait();
        let _ = std::fs::remove_dir_all(node_red_dir());
    }

    let seconds = offered.seconds.max(1e-9);
    let delivered = got.count;
    let per_msg = |cpu: f64| cpu * 1e6 / delivered.max(1) as f64;
    let lossy_devices = got.lossy_devices(&offered.per_device);
    let loss = 100.0 * offered.sent.saturating_sub(delivered) as f64 / offered.sent.max(1) as f64;
    if let Some(mode) = &args.flood {
        println!(
            "| flood, {mode} | {:.0} | {:.0} | {:.2}% | {drops} | {rcvbuf_drops} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
            offered.sent as f64 / seconds,
            junk_sent as f64 / seconds,
            100.0 * delivered as f64 / offered.sent.max(1) as f64,
            got.percentile_us(0.5),
            got.percentile_us(0.99),
            used.machine_minus_harness(),
            used.system,
            used.softirq,
        );
        return;
    }
    println!(
        "| {sink} | {:?} | {} | {}% | {} | {:.0} | {:.0} | {:.2}% | {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {} |",
        args.family,
        args.devices,
        args.con,
        args.sizes.iter().map(ToString::to_string).collect::<Vec<_>>().join("/"),
        offered.sent as f64 / seconds,
        delivered as f64 / seconds,
        loss,
        lossy_devices,
        got.percentile_us(0.5),
        got.percentile_us(0.99),
        got.percentile_us(0.999),
        per_msg(used.machine_minus_harness()),
        per_msg(used.system),
        got.out_of_order,
    );
}
