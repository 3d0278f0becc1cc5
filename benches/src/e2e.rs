//! End-to-end load: CoAP datagrams offered from a device namespace, through
//! m2m-router (XDP native on the gateway veth, workers, embedded broker), to
//! one MQTT subscriber in the gateway namespace. Reports offered and
//! delivered msgs/s, loss, latency percentiles (send timestamp carried in the
//! payload; both namespaces share CLOCK_MONOTONIC) and the router's own CPU
//! time per delivered message (utime + stime from /proc/PID/stat).
//!
//!   cargo build --release && sudo ./target/release/e2e [SECONDS] [PEERS] [RATE] [con|non] [SINK]
//!
//! With `E2E_FLOOD=xdp|nft|none`, a junk flood runs flat out beside the
//! legitimate load (which then all comes from one configured peer): valid
//! CoAP from unknown sources, CoAP with a bad version from the peer's own
//! address, and short garbage datagrams, all to port 5683. `xdp`: the
//! router drops them in XDP (unknown_peers = "drop"); `nft`: the same policy
//! as nftables rules, router with --xdp-mode off; `none`: no filtering.
//! The row reports the share of legitimate messages delivered.
//!
//! RATE 0 means flat out. SINK: `embedded` (subscribe to the router's own
//! broker, default), `bridge-memory` or `bridge-disk` (the router bridges
//! to a Mosquitto in the gateway namespace; subscribe there), or `aiocoap`:
//! no m2m-router, but the Python aiocoap + paho-mqtt bridge of
//! benches/peers/ publishing into that Mosquitto (its venv comes from
//! `cargo xtask bench-peers`); "router CPU" is then the Python process's.
//! `node-red`: likewise with a Node-RED 4 flow (node-red-contrib-coap ->
//! function -> mqtt out, benches/peers/node-red-flow.json).
//! Needs root (namespaces, XDP).

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use m2m_router_tests::daemon::Daemon;
use m2m_router_tests::netns::{Topology, DEV_V4, GW_IF, GW_V4};
use m2m_router_tests::packet::coap;

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

struct Received {
    count: u64,
    latencies_ns: Vec<u64>,
    out_of_order: u64,
}

/// A minimal MQTT 3.1.1 subscriber to "load/#" that decodes PUBLISH frames
/// from a buffered stream until `stop` and no data for a while.
fn subscribe(
    addr: SocketAddr,
    peers: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Received> {
    let mut s = TcpStream::connect(addr).expect("connect to the embedded broker");
    s.write_all(&[
        0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 0, 0, 4, b'l', b'o', b'a', b'd',
    ])
    .unwrap();
    s.write_all(&[0x82, 11, 0, 1, 0, 6, b'l', b'o', b'a', b'd', b'/', b'#', 0])
        .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    std::thread::spawn(move || {
        let mut r = BufReader::with_capacity(1 << 20, s);
        let mut last_seq = vec![0u32; peers];
        let mut got = Received {
            count: 0,
            latencies_ns: Vec::with_capacity(1 << 20),
            out_of_order: 0,
        };
        let mut head = [0u8; 1];
        let mut body = Vec::new();
        loop {
            if r.read_exact(&mut head).is_err() {
                if stop.load(Ordering::Relaxed) {
                    return got;
                }
                continue;
            }
            let mut len = 0usize;
            for i in 0..4 {
                let mut b = [0u8; 1];
                r.read_exact(&mut b).unwrap();
                len |= usize::from(b[0] & 0x7f) << (7 * i);
                if b[0] & 0x80 == 0 {
                    break;
                }
            }
            body.resize(len, 0);
            r.read_exact(&mut body).unwrap();
            if head[0] >> 4 != 3 {
                continue; // CONNACK, SUBACK
            }
            let now = monotonic_ns();
            let tlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let p = &body[2 + tlen..];
            if p.len() < 16 {
                continue;
            }
            let peer = u32::from_be_bytes(p[0..4].try_into().unwrap()) as usize;
            let seq = u32::from_be_bytes(p[4..8].try_into().unwrap());
            let sent = u64::from_be_bytes(p[8..16].try_into().unwrap());
            if seq <= last_seq[peer] && last_seq[peer] != 0 {
                got.out_of_order += 1;
            }
            last_seq[peer] = seq;
            got.count += 1;
            got.latencies_ns.push(now.saturating_sub(sent));
        }
    })
}

/// The Python aiocoap bridge in the gateway namespace, once it says ready.
fn start_aiocoap(topo: &Topology) -> std::process::Child {
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
        .args([script, "0.0.0.0", "5683", "1885"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the aiocoap venv (cargo xtask bench-peers)");
    let mut line = String::new();
    let stdout = child.stdout.take().unwrap();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    assert_eq!(line.trim(), "ready", "the aiocoap bridge did not start");
    child
}

/// The Node-RED flow in the gateway namespace, once it runs and is
/// connected to the Mosquitto.
fn start_node_red(topo: &Topology) -> std::process::Child {
    let home = std::env::var("HOME").unwrap_or_default();
    let bin = format!("{home}/.cache/m2m-router/peers/node-red/node_modules/.bin/node-red");
    let user_dir = std::env::temp_dir().join(format!("m2m-e2e-node-red-{}", std::process::id()));
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
        DEV_V4[0]
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

/// Machine-wide softirq time so far, in seconds (/proc/stat): where XDP and
/// the kernel's receive path spend their time, whichever process is current.
fn softirq_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu = stat.lines().next().unwrap_or_default();
    let softirq: u64 = cpu
        .split_whitespace()
        .nth(7)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    softirq as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Sends junk flat out from `E2E_JUNK_THREADS` threads (default 2) until
/// `stop`; returns how many datagrams they sent.
fn start_junk(topo: &Topology, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let threads: usize = std::env::var("E2E_JUNK_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let senders: Vec<_> = (0..threads)
        .map(|_| {
            let unknown = [
                topo.device_socket(DEV_V4[2].into()),
                topo.device_socket(DEV_V4[3].into()),
            ];
            let same_address = topo.device_socket(DEV_V4[0].into());
            let stop = stop.clone();
            junk_thread(unknown, same_address, stop)
        })
        .collect();
    std::thread::spawn(move || senders.into_iter().map(|t| t.join().unwrap()).sum())
}

fn junk_thread(
    unknown: [UdpSocket; 2],
    same_address: UdpSocket,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let dst = SocketAddr::new(GW_V4.into(), 5683);
        let valid_unknown = coap(0, 0x02, 1, &[], &[0xb1, b'x'], b"junk");
        let mut bad_version = valid_unknown.clone();
        bad_version[0] ^= 0xc0;
        let garbage = [0xffu8, 0, 1];
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..64 {
                let _ = unknown[0].send_to(&valid_unknown, dst);
                let _ = same_address.send_to(&bad_version, dst);
                let _ = unknown[1].send_to(&garbage, dst);
                sent += 3;
            }
        }
        sent
    })
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p) as usize] as f64 / 1000.0
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seconds: f64 = args.first().map_or(5.0, |a| a.parse().unwrap());
    let peers: usize = args.get(1).map_or(100, |a| a.parse().unwrap());
    let rate: f64 = args.get(2).map_or(0.0, |a| a.parse().unwrap());
    let con = args.get(3).is_none_or(|m| m == "con");
    let sink = args.get(4).map_or("embedded", String::as_str).to_owned();
    let bin = std::env::var("M2M_ROUTER_BIN").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/m2m-router").into()
    });

    let topo = Topology::new("e2e");
    let config = std::env::temp_dir().join(format!("m2m-e2e-{}.toml", std::process::id()));
    let spool = std::path::PathBuf::from(format!("/var/tmp/m2m-e2e-spool-{}", std::process::id()));
    let flood = std::env::var("E2E_FLOOD").ok();
    let mut text = "[defaults]\nrate = \"unlimited\"\ntopic = \"load/{port}\"\n[mqtt]\nsession_queue = 1000000\n".to_owned();
    if flood.is_some() {
        text.push_str(&format!(
            "[[peer]]\nname = \"legit\"\nprefix = [\"{}/32\"]\n",
            DEV_V4[0]
        ));
        text = text.replace("[defaults]\n", "[defaults]\nunknown_peers = \"drop\"\n");
    }
    let xdp_mode = match flood.as_deref() {
        None | Some("xdp") => "native",
        Some("nft") => {
            nft_policy(&topo);
            "off"
        }
        Some("none") => "off",
        Some(other) => panic!("E2E_FLOOD={other:?}: xdp, nft or none"),
    };
    let _mosquitto = match sink.as_str() {
        "embedded" => None,
        "aiocoap" | "node-red" => Some(m2m_router_tests::mqtt::Mosquitto::start(&topo.gw, 1885)),
        "bridge-memory" | "bridge-disk" => {
            let durability = sink.trim_start_matches("bridge-");
            text.push_str(&format!(
                "[[upstream]]\nname = \"bench\"\nurl = \"mqtt://127.0.0.1:1885\"\ndurability = \"{durability}\"\nspool_dir = \"{}\"\nspool_max_bytes = 1000000000\n",
                spool.display()
            ));
            Some(m2m_router_tests::mqtt::Mosquitto::start(&topo.gw, 1885))
        }
        other => panic!("unknown sink {other:?}"),
    };
    std::fs::write(&config, text).unwrap();
    let (daemon, mut peer, pid) = if sink == "aiocoap" || sink == "node-red" {
        let peer = if sink == "aiocoap" {
            start_aiocoap(&topo)
        } else {
            start_node_red(&topo)
        };
        let pid = peer.id();
        (None, Some(peer), pid)
    } else {
        let daemon = Daemon::running(
            &topo.gw,
            &bin,
            &[
                "--iface",
                GW_IF,
                "--xdp-mode",
                xdp_mode,
                "--config",
                config.to_str().unwrap(),
            ],
        );
        let pid_line = daemon
            .seen
            .iter()
            .find(|l| l.contains("pid="))
            .cloned()
            .unwrap_or_default();
        let pid: u32 = pid_line
            .rsplit("pid=")
            .next()
            .and_then(|p| p.trim().parse().ok())
            .expect("daemon pid");
        (Some(daemon), None, pid)
    };
    let stop = Arc::new(AtomicBool::new(false));
    // The subscriber reads where the system under test delivers: the
    // embedded broker, or the Mosquitto the bridge (or the peer) feeds.
    let broker_addr = if sink == "embedded" {
        "127.0.0.1:1883"
    } else {
        "127.0.0.1:1885"
    };
    let receiver = topo
        .gw
        .run(|| subscribe(broker_addr.parse().unwrap(), peers, stop.clone()));
    std::thread::sleep(Duration::from_millis(300));

    let sockets: Vec<UdpSocket> = (0..peers)
        .map(|i| {
            let src = if flood.is_some() { 0 } else { i % 4 };
            topo.device_socket(DEV_V4[src].into())
        })
        .collect();
    let junk_stop = Arc::new(AtomicBool::new(false));
    let junk = flood.as_ref().map(|_| start_junk(&topo, junk_stop.clone()));
    let dst = SocketAddr::new(GW_V4.into(), 5683);
    let cpu_before = cpu_seconds(pid);
    let softirq_before = softirq_seconds();
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut seq = 0u32;
    let mut payload = [0u8; 16];
    'send: loop {
        seq += 1;
        for (i, sock) in sockets.iter().enumerate() {
            let elapsed = start.elapsed().as_secs_f64();
            if elapsed >= seconds {
                break 'send;
            }
            if rate > 0.0 {
                // Sleep rather than spin while ahead of schedule: a spinning
                // generator would take a whole core from the router.
                while (sent as f64) > rate * start.elapsed().as_secs_f64() {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            payload[0..4].copy_from_slice(&(i as u32).to_be_bytes());
            payload[4..8].copy_from_slice(&seq.to_be_bytes());
            payload[8..16].copy_from_slice(&monotonic_ns().to_be_bytes());
            let msg = coap(
                if con { 0 } else { 1 },
                0x02,
                seq as u16,
                &[],
                &[0xb1, b'x'],
                &payload,
            );
            if sock.send_to(&msg, dst).is_ok() {
                sent += 1;
            }
        }
    }
    let send_time = start.elapsed().as_secs_f64();
    junk_stop.store(true, Ordering::Relaxed);
    let junk_sent = junk.map_or(0, |j| j.join().unwrap());
    std::thread::sleep(Duration::from_secs(if sink == "embedded" { 1 } else { 3 }));
    let cpu = cpu_seconds(pid) - cpu_before;
    let softirq = softirq_seconds() - softirq_before;
    stop.store(true, Ordering::Relaxed);
    let mut got = receiver.join().unwrap();
    got.latencies_ns.sort_unstable();
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_dir_all(&spool);
    if let Some(daemon) = daemon {
        if std::env::var_os("E2E_VERBOSE").is_some() {
            daemon.signal(libc::SIGUSR1);
            std::thread::sleep(Duration::from_millis(300));
        }
        daemon.stop_and_show(std::env::var_os("E2E_VERBOSE").is_some());
    }
    if let Some(peer) = &mut peer {
        let _ = peer.kill();
        let _ = peer.wait();
    }

    if let Some(mode) = &flood {
        println!(
            "| flood, {mode} | {:.0} | {:.0} | {:.2}% | {:.0} | {:.0} | {:.2} | {:.2} |",
            sent as f64 / send_time,
            junk_sent as f64 / send_time,
            100.0 * got.count as f64 / sent.max(1) as f64,
            percentile(&got.latencies_ns, 0.5),
            percentile(&got.latencies_ns, 0.99),
            cpu,
            softirq,
        );
        return;
    }
    println!(
        "| {} {sink} | {peers} | {:.0} | {:.0} | {:.2}% | {:.0} | {:.0} | {:.0} | {:.2} | {} |",
        if con { "CON" } else { "NON" },
        sent as f64 / send_time,
        got.count as f64 / send_time,
        100.0 * (sent.saturating_sub(got.count)) as f64 / sent.max(1) as f64,
        percentile(&got.latencies_ns, 0.5),
        percentile(&got.latencies_ns, 0.99),
        percentile(&got.latencies_ns, 0.999),
        cpu * 1e6 / got.count.max(1) as f64,
        got.out_of_order,
    );
}
