//! `dtls-bench`: the cost of CoAP over DTLS, measured in one run beside
//! plain CoAP and beside libcoap's `coap-server-openssl` terminating the
//! same DTLS load (no MQTT there: DTLS and CoAP alone).
//!
//! - handshakes per second, PSK (TLS_PSK_WITH_AES_128_CCM_8) and
//!   certificates (TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8): each client thread
//!   opens a session from a fresh port, then closes it, for `--seconds`;
//! - messages per second over established sessions: each client thread
//!   sends CON POSTs over its session, one after the other (closed loop),
//!   and the same over plain CoAP.
//!
//! The server process's CPU time (utime + stime, all threads) per
//! handshake or message is its cost; the rates depend on the clients,
//! which share the machine.
//!
//! Usage: dtls-bench [--seconds N] [--clients N]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use benches::cpu::process_seconds;
use benches::systems::start_router;
use clap::Parser;
use m2m_router::coap::message::{code, Message};
use m2m_router_tests::certs::{Issued, Names, Pki};
use m2m_router_tests::dtls::DtlsClient;
use m2m_router_tests::netns::{Topology, DEV_V4, GW_V4};
use m2m_router_tests::packet::coap_post;
use m2m_router_tests::TempPath;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    #[arg(long, default_value_t = 4)]
    clients: usize,
}

const KEY: &[u8] = b"dtls-bench-key-0123";
const COAPS: u16 = 5684;

/// What the clients do.
#[derive(Clone, Copy)]
enum Load<'a> {
    PskHandshakes,
    CertHandshakes(&'a Issued, &'a Pki),
    DtlsMessages,
    PlainMessages,
}

fn main() {
    let args = Args::parse();
    let pki = Pki::new("dtls-bench");
    let gateway = pki.issue(
        &GW_V4.to_string(),
        &Names {
            ip: &[&GW_V4.to_string()],
            ..Names::default()
        },
    );
    let device = pki.issue("bench-device", &Names::default());
    let loads: [(&str, Load); 4] = [
        ("PSK handshakes", Load::PskHandshakes),
        (
            "ECDHE-ECDSA handshakes",
            Load::CertHandshakes(&device, &pki),
        ),
        ("CON messages over DTLS", Load::DtlsMessages),
        ("CON messages, plain CoAP", Load::PlainMessages),
    ];
    println!("| server | load | clients | per second | server CPU us each |");
    println!("|---|---|---:|---:|---:|");
    for system in ["m2m-router", "coap-server-openssl"] {
        let topo = Topology::new("dtlsb");
        let (server, pid) = start(system, &topo, &gateway, &pki, args.clients);
        for (name, load) in loads {
            if system != "m2m-router" && matches!(load, Load::PlainMessages) {
                continue;
            }
            let (count, cpu) = run(&topo, pid, load, &args);
            let seconds = args.seconds as f64;
            println!(
                "| {system} | {name} | {} | {:.0} | {:.0} |",
                args.clients,
                count as f64 / seconds,
                cpu * 1e6 / count.max(1) as f64
            );
        }
        drop(server);
    }
}

/// A running server and what keeps its files alive.
enum Server {
    Router(
        #[allow(dead_code)] m2m_router_tests::daemon::Daemon,
        #[allow(dead_code)] TempPath,
    ),
    Libcoap(Child),
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Server::Libcoap(child) = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start(
    system: &str,
    topo: &Topology,
    gateway: &Issued,
    pki: &Pki,
    clients: usize,
) -> (Server, u32) {
    let hex: String = KEY.iter().map(|b| format!("{b:02x}")).collect();
    if system == "m2m-router" {
        let mut config = format!(
            "[defaults]\nrate = \"unlimited\"\n[coap]\nlisten_dtls = [\"0.0.0.0:{COAPS}\"]\n\
             [dtls]\nhello_rate = \"unlimited\"\ncertificate = \"{}\"\nprivate_key = \"{}\"\nca_file = \"{}\"\n\
             [[peer]]\nname = \"plain\"\nprefix = [\"10.77.0.0/16\"]\n\
             [[peer]]\nname = \"cert\"\ncert_name = \"bench-device\"\n",
            gateway.cert_file.as_str(),
            gateway.key_file.as_str(),
            pki.ca.cert_file.as_str()
        );
        // One identity per client: a peer's new session closes its older.
        for i in 0..clients {
            config += &format!(
                "[[peer]]\nname = \"psk{i}\"\npsk_identity = \"bench-{i}\"\npsk_hex = \"{hex}\"\n"
            );
        }
        let file = TempPath::with_contents("dtls-bench", "toml", config);
        let (daemon, pid) = start_router(topo, "native", file.as_str());
        return (Server::Router(daemon, file), pid);
    }
    let child = topo
        .gw
        .command("coap-server-openssl")
        .args(["-A", &GW_V4.to_string(), "-p", "5683", "-v", "0"])
        .args(["-k", std::str::from_utf8(KEY).unwrap()])
        .args([
            "-c",
            gateway.cert_file.as_str(),
            "-j",
            gateway.key_file.as_str(),
        ])
        .args(["-C", pki.ca.cert_file.as_str()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("coap-server-openssl (Debian package libcoap3-bin)");
    let pid = child.id();
    // Ready when it answers a handshake.
    let deadline = Instant::now() + Duration::from_secs(20);
    while psk_session(topo, 0).is_none() {
        assert!(
            Instant::now() < deadline,
            "coap-server-openssl did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (Server::Libcoap(child), pid)
}

fn device_socket(topo: &Topology, client: usize, port: u16) -> UdpSocket {
    let src = IpAddr::from(DEV_V4[client % DEV_V4.len()]);
    let sock = topo.device_socket(src);
    sock.connect(SocketAddr::new(GW_V4.into(), port)).unwrap();
    sock
}

fn psk_session(topo: &Topology, client: usize) -> Option<DtlsClient> {
    let sock = device_socket(topo, client, COAPS);
    DtlsClient::connect_psk(
        sock,
        &format!("bench-{client}"),
        KEY,
        Duration::from_secs(5),
    )
    .ok()
}

/// Runs `load` on `args.clients` threads for `args.seconds`; how many
/// handshakes or answered messages, and the server's CPU seconds.
fn run(topo: &Topology, pid: u32, load: Load, args: &Args) -> (u64, f64) {
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let cpu_before = process_seconds(pid);
    std::thread::scope(|s| {
        for client in 0..args.clients {
            let (done, stop) = (&done, &stop);
            s.spawn(move || client_loop(topo, client, load, done, stop));
        }
        std::thread::sleep(Duration::from_secs(args.seconds));
        stop.store(true, Ordering::Relaxed);
    });
    (
        done.load(Ordering::Relaxed),
        process_seconds(pid) - cpu_before,
    )
}

fn client_loop(topo: &Topology, client: usize, load: Load, done: &AtomicU64, stop: &AtomicBool) {
    let mut mid: u16 = 0;
    let mut session = match load {
        Load::DtlsMessages => Some(psk_session(topo, client).expect("a session")),
        _ => None,
    };
    let plain = matches!(load, Load::PlainMessages).then(|| {
        let s = device_socket(topo, client, 5683);
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s
    });
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        mid = mid.wrapping_add(1);
        let ok = match load {
            Load::PskHandshakes => psk_session(topo, client).map(DtlsClient::close).is_some(),
            Load::CertHandshakes(device, pki) => {
                let sock = device_socket(topo, client, COAPS);
                DtlsClient::connect_certificate(
                    sock,
                    device,
                    &pki.ca.cert,
                    None,
                    Duration::from_secs(5),
                )
                .map(DtlsClient::close)
                .is_ok()
            }
            Load::DtlsMessages => {
                let s = session.as_mut().unwrap();
                s.exchange(&coap_post(mid, b"21.5"), Duration::from_secs(5))
                    .is_some_and(|a| Message::decode(&a).is_ok_and(|m| m.code >> 5 != 0))
            }
            Load::PlainMessages => {
                let s = plain.as_ref().unwrap();
                s.send(&coap_post(mid, b"21.5")).unwrap();
                s.recv(&mut buf).is_ok_and(|n| {
                    Message::decode(&buf[..n]).is_ok_and(|m| m.code == code::CHANGED)
                })
            }
        };
        if ok && !stop.load(Ordering::Relaxed) {
            done.fetch_add(1, Ordering::Relaxed);
        }
    }
}
