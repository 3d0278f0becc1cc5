//! Block-wise upload and Observe fan-out, each system measured the same
//! way in the two-namespace topology (devices -> gateway):
//!
//! - `upload`: libcoap's coap-client POSTs a body (1 MiB by default) in
//!   1024-byte Block1 blocks (RFC 7959); the time runs from its start to
//!   the whole body arriving at an MQTT subscriber. Systems: m2m-router
//!   (its embedded broker) and the aiocoap peer (benches/peers, publishing
//!   into a Mosquitto). MB/s, and CPU per MB: the machine's (less this
//!   harness, so the client's is in it) and the system process's.
//! - `fanout`: N devices (own address each) observe one resource; an MQTT
//!   client publishes on its topic at a fixed rate for some seconds; every
//!   notification is counted, acknowledged when CON, and timed (the send
//!   time rides in the payload). Systems: m2m-router (`ps/fanout`, the
//!   devices observing a topic), the aiocoap peer (an observable resource
//!   fed from the Mosquitto topic) and Mosquitto delivering the same stream
//!   to N MQTT subscribers. Notifications delivered per second, loss, p50
//!   and p99, CPU per notification.
//!
//!   cargo build --release && sudo ./target/release/coap-bench --help

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use benches::cpu::Sample;
use benches::load::{self, device_addr, monotonic_ns, Family};
use benches::subscriber::{self, frame, hello, percentile_us};
use benches::systems::{start_aiocoap, start_router};
use clap::{Parser, Subcommand};
use m2m_router::coap::message::{self, code, option, Message, ACK, CON};
use m2m_router_tests::daemon::Daemon;
use m2m_router_tests::mqtt::Mosquitto;
use m2m_router_tests::netns::{Topology, GW_V4};

#[derive(Parser)]
#[command(about = "Block-wise upload and Observe fan-out, m2m-router beside its peers")]
struct Args {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// A body POSTed in Block1 blocks, until a subscriber has it whole.
    Upload {
        /// router or aiocoap.
        #[arg(long, default_value = "router")]
        sink: String,
        #[arg(long, default_value_t = 1024 * 1024)]
        bytes: usize,
        /// Uploads; the row shows their medians.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// One topic, many observers, publishes at a fixed rate.
    Fanout {
        /// router, aiocoap or mosquitto.
        #[arg(long, default_value = "router")]
        sink: String,
        #[arg(long, default_value_t = 1000)]
        observers: usize,
        /// Publishes per second on the topic.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
}

/// The system under test, running until dropped.
struct System {
    pid: u32,
    /// Where it delivers (uploads) or takes publishes (fan-out).
    mqtt: SocketAddr,
    _router: Option<Daemon>,
    _mosquitto: Option<Mosquitto>,
    peer: Option<std::process::Child>,
    config: Option<std::path::PathBuf>,
}

impl Drop for System {
    fn drop(&mut self) {
        if let Some(peer) = &mut self.peer {
            let _ = peer.kill();
            let _ = peer.wait();
        }
        if let Some(config) = &self.config {
            let _ = std::fs::remove_file(config);
        }
    }
}

fn start(topo: &Topology, sink: &str, router_config: &str) -> System {
    let mosquitto_port = 1885;
    match sink {
        "router" => {
            let config =
                std::env::temp_dir().join(format!("m2m-coap-bench-{}.toml", std::process::id()));
            std::fs::write(&config, router_config).unwrap();
            let (daemon, pid) = start_router(topo, "native", config.to_str().unwrap());
            System {
                pid,
                mqtt: "127.0.0.1:1883".parse().unwrap(),
                _router: Some(daemon),
                _mosquitto: None,
                peer: None,
                config: Some(config),
            }
        }
        "aiocoap" | "mosquitto" => {
            let mosquitto = Mosquitto::start(&topo.gw, mosquitto_port);
            let peer = (sink == "aiocoap").then(|| start_aiocoap(topo, mosquitto_port));
            let pid = match &peer {
                Some(p) => p.id(),
                None => mosquitto.pid(),
            };
            System {
                pid,
                mqtt: SocketAddr::from(([127, 0, 0, 1], mosquitto_port)),
                _router: None,
                _mosquitto: Some(mosquitto),
                peer,
                config: None,
            }
        }
        other => panic!("unknown sink {other:?}"),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// An MQTT 3.1.1 connection in the gateway namespace, subscribed to
/// `filter` (its SUBACK read) when one is given.
fn mqtt_client(topo: &Topology, addr: SocketAddr, id: &str, filter: Option<&str>) -> TcpStream {
    let mut s = topo
        .gw
        .run(|| TcpStream::connect(addr))
        .expect("connect to the broker");
    s.set_nodelay(true).unwrap();
    match filter {
        Some(f) => s.write_all(&hello(id, true, f, 0)).unwrap(),
        None => {
            let connect = hello(id, true, "x", 0);
            s.write_all(&connect[..connect[1] as usize + 2]).unwrap();
        }
    }
    let mut buf = Vec::new();
    let want = if filter.is_some() { 0x90 } else { 0x20 };
    read_frame(&mut s, &mut buf, |kind, _| kind & 0xf0 == want);
    s
}

/// Reads frames into `buf` until `done(kind, body)` says so.
fn read_frame(s: &mut TcpStream, buf: &mut Vec<u8>, mut done: impl FnMut(u8, &[u8]) -> bool) {
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        while let Some((kind, body, used)) = frame(buf) {
            let stop = done(kind, body);
            buf.drain(..used);
            if stop {
                return;
            }
        }
        let n = s.read(&mut chunk).expect("read from the broker");
        assert!(n > 0, "the broker closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn upload(sink: &str, bytes: usize, runs: usize) {
    let topo = Topology::new("cbup");
    let config = format!(
        "[defaults]\nrate = \"unlimited\"\ntopic = \"upload/{{path}}\"\n[coap]\nmax_body = {}\n",
        bytes.max(1 << 20)
    );
    let system = start(&topo, sink, &config);
    let body: Vec<u8> = (0..bytes as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let file = std::env::temp_dir().join(format!("m2m-coap-bench-body-{}", std::process::id()));
    std::fs::write(&file, &body).unwrap();
    let filter = if sink == "router" {
        "upload/#"
    } else {
        "load/#"
    };
    let (mut rates, mut machine, mut process) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let mut sub = mqtt_client(&topo, system.mqtt, &format!("up-{run}"), Some(filter));
        let before = Sample::take(system.pid);
        let t0 = Instant::now();
        let client = topo
            .dev
            .command("coap-client-notls")
            .args(["-B", "300", "-b", "1024", "-m", "post", "-f"])
            .arg(&file)
            .arg(format!("coap://{GW_V4}/x"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("coap-client-notls (Debian package libcoap3-bin)");
        let mut buf = Vec::new();
        let mut got = Vec::new();
        read_frame(&mut sub, &mut buf, |kind, publish| {
            if kind & 0xf0 != 0x30 {
                return false;
            }
            let topic_len = usize::from(u16::from_be_bytes([publish[0], publish[1]]));
            got = publish[2 + topic_len..].to_vec();
            true
        });
        let took = t0.elapsed().as_secs_f64();
        let used = Sample::take(system.pid).since(&before);
        let mut client = client;
        let _ = client.wait();
        assert!(
            got == body,
            "run {run}: {} bytes arrived, not the body",
            got.len()
        );
        let mb = bytes as f64 / 1e6;
        rates.push(mb / took);
        machine.push(used.machine_minus_harness() * 1e3 / mb);
        process.push(used.system * 1e3 / mb);
    }
    let _ = std::fs::remove_file(&file);
    println!(
        "| {sink} | {bytes} | {runs} | {:.2} | {:.1} | {:.1} |",
        median(rates),
        median(machine),
        median(process)
    );
}

/// The stamp every published state carries: device 0, sequence number,
/// send time (benches::subscriber's layout).
fn stamp(seq: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[4..8].copy_from_slice(&seq.to_be_bytes());
    s[8..16].copy_from_slice(&monotonic_ns().to_be_bytes());
    s
}

/// What the observers received.
struct Tally {
    /// A bit per (observer, sequence number).
    seen: Vec<Vec<u64>>,
    unique: u64,
    latencies_ns: Vec<u64>,
}

impl Tally {
    fn new(observers: usize, published: usize) -> Tally {
        Tally {
            seen: vec![vec![0; published.div_ceil(64) + 1]; observers],
            unique: 0,
            latencies_ns: Vec::new(),
        }
    }

    fn count(&mut self, observer: usize, stamp: &[u8], now: u64) {
        let Some(seq) = stamp
            .get(4..8)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
        else {
            return;
        };
        let sent = u64::from_be_bytes(stamp[8..16].try_into().unwrap());
        let (word, bit) = (seq as usize / 64, seq % 64);
        let Some(w) = self.seen[observer].get_mut(word) else {
            return;
        };
        if *w & (1 << bit) == 0 {
            *w |= 1 << bit;
            self.unique += 1;
            self.latencies_ns.push(now.saturating_sub(sent));
        }
    }
}

/// Waits on every descriptor at once; the indices of the readable ones.
fn readable(fds: &mut [libc::pollfd], timeout_ms: i32) -> Vec<usize> {
    // SAFETY: fds is a valid array of pollfd of that length.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if n <= 0 {
        return Vec::new();
    }
    (0..fds.len())
        .filter(|&i| fds[i].revents & libc::POLLIN != 0)
        .collect()
}

fn raise_fd_limit() {
    let limit = libc::rlimit {
        rlim_cur: 65536,
        rlim_max: 65536,
    };
    // SAFETY: setrlimit reads a valid rlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
}

/// CoAP observers: one socket per device address, registered with GET
/// Observe 0 on `path` (answer awaited, retransmitted after a second).
fn coap_observers(topo: &Topology, n: usize, path: &[&str]) -> Vec<UdpSocket> {
    let gw = SocketAddr::new(GW_V4.into(), 5683);
    let socks: Vec<UdpSocket> = (0..n)
        .map(|i| {
            let s = topo
                .dev
                .run(|| UdpSocket::bind(SocketAddr::new(device_addr(i, Family::V4), 0)))
                .expect("bind an observer");
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            s
        })
        .collect();
    let mut opts: Vec<(u16, &[u8])> = vec![(option::OBSERVE, &[])];
    opts.extend(path.iter().map(|p| (option::URI_PATH, p.as_bytes())));
    let mut buf = [0u8; 1500];
    for (i, s) in socks.iter().enumerate() {
        let mut get = Vec::new();
        let token = (i as u32).to_be_bytes();
        message::encode(&mut get, CON, code::GET, i as u16, &token, &opts, &[]);
        let answered = (0..10).any(|_| {
            s.send_to(&get, gw).unwrap();
            matches!(s.recv(&mut buf), Ok(n) if Message::decode(&buf[..n]).is_ok_and(|m| m.token == token))
        });
        assert!(answered, "observer {i}: no answer to the registration");
        s.set_nonblocking(true).unwrap();
    }
    socks
}

fn fanout(sink: &str, observers: usize, rate: f64, seconds: f64) {
    raise_fd_limit();
    let topo = Topology::new("cbfan");
    load::route_devices(&topo);
    let config =
        "[defaults]\nrate = \"unlimited\"\nsubscribe = [\"#\"]\n[mqtt]\nsession_queue = 1000000\n";
    let system = start(&topo, sink, config);
    let published = (rate * seconds).round() as usize;
    let mut tally = Tally::new(observers, published);
    // The observers: CoAP devices, or MQTT subscribers of Mosquitto.
    let (coap, mut mqtt): (Vec<UdpSocket>, Vec<TcpStream>) = match sink {
        "router" => (
            coap_observers(&topo, observers, &["ps", "fanout"]),
            Vec::new(),
        ),
        "aiocoap" => (coap_observers(&topo, observers, &["obs"]), Vec::new()),
        _ => {
            let subs = (0..observers)
                .map(|i| {
                    let s = mqtt_client(&topo, system.mqtt, &format!("fan-{i}"), Some("fanout"));
                    s.set_nonblocking(true).unwrap();
                    s
                })
                .collect();
            (Vec::new(), subs)
        }
    };
    let mut fds: Vec<libc::pollfd> = coap
        .iter()
        .map(|s| s.as_raw_fd())
        .chain(mqtt.iter().map(|s| s.as_raw_fd()))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut publisher = mqtt_client(&topo, system.mqtt, "fan-publisher", None);
    let before = Sample::take(system.pid);
    let start_at = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut next_publish = start_at;
    let mut sent = 0usize;
    let mut buf = [0u8; 2048];
    let mut mqtt_bufs: Vec<Vec<u8>> = vec![Vec::new(); mqtt.len()];
    let mut acks = Vec::new();
    let drain = Duration::from_secs(3);
    let mut last_sent_at = None;
    loop {
        let now = Instant::now();
        if sent < published && now >= next_publish {
            let payload = stamp(sent as u32);
            // PUBLISH QoS 0 "fanout" (MQTT 3.1.1 section 3.3).
            let mut p = vec![0x30, (2 + 6 + payload.len()) as u8, 0, 6];
            p.extend_from_slice(b"fanout");
            p.extend_from_slice(&payload);
            publisher.write_all(&p).unwrap();
            sent += 1;
            next_publish += interval;
            if sent == published {
                last_sent_at = Some(Instant::now());
            }
        }
        let all_in = tally.unique == (observers * published) as u64;
        if last_sent_at.is_some_and(|t| t.elapsed() > drain) || (sent == published && all_in) {
            break;
        }
        let wait = next_publish.saturating_duration_since(Instant::now());
        let timeout = if sent < published {
            wait.as_millis().min(50) as i32
        } else {
            50
        };
        for i in readable(&mut fds, timeout) {
            let now_ns = monotonic_ns();
            if i < coap.len() {
                while let Ok((n, from)) = coap[i].recv_from(&mut buf) {
                    let Ok(m) = Message::decode(&buf[..n]) else {
                        continue;
                    };
                    if m.mtype == CON {
                        let mut ack = Vec::new();
                        message::encode(&mut ack, ACK, code::EMPTY, m.mid, &[], &[], &[]);
                        let _ = coap[i].send_to(&ack, from);
                    }
                    tally.count(i, m.payload, now_ns);
                }
            } else {
                let j = i - coap.len();
                while let Ok(n) = mqtt[j].read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    mqtt_bufs[j].extend_from_slice(&buf[..n]);
                }
                while let Some((kind, body, used)) = frame(&mqtt_bufs[j]) {
                    if kind & 0xf0 == 0x30 {
                        if let Some(s) = subscriber::publish_payload(body, 0, &mut acks) {
                            tally.count(j, s, now_ns);
                        }
                    }
                    mqtt_bufs[j].drain(..used);
                }
            }
        }
    }
    let used = Sample::take(system.pid).since(&before);
    let expected = (observers * published) as u64;
    let delivered = tally.unique;
    let mut lat = std::mem::take(&mut tally.latencies_ns);
    lat.sort_unstable();
    let per = |cpu: f64| cpu * 1e6 / delivered.max(1) as f64;
    println!(
        "| {sink} | {observers} | {rate:.0} | {:.0} | {:.2}% | {:.0} | {:.0} | {:.2} | {:.2} |",
        // Per second of the nominal publishing time (`seconds`).
        delivered as f64 / seconds,
        100.0 * expected.saturating_sub(delivered) as f64 / expected.max(1) as f64,
        percentile_us(&lat, 0.5),
        percentile_us(&lat, 0.99),
        per(used.machine_minus_harness()),
        per(used.system),
    );
    drop(mqtt.drain(..));
}

fn main() {
    match Args::parse().bench {
        Bench::Upload { sink, bytes, runs } => upload(&sink, bytes, runs),
        Bench::Fanout {
            sink,
            observers,
            rate,
            seconds,
        } => fanout(&sink, observers, rate, seconds),
    }
}
