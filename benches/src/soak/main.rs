//! The soak: m2m-router for half an hour at half its capacity while
//! everything around it changes, sampling what would show a leak or a
//! slowdown: the router's resident memory, open descriptors and threads,
//! and the latency of what it delivers.
//!
//!   sudo cargo xtask soak            (or: sudo ./target/release/soak --help)
//!
//! The router runs as an appliance would: XDP native on the gateway veth,
//! its embedded broker, and a disk-durable bridge to a Mosquitto in the
//! gateway namespace. Meanwhile:
//! - the load generator (benches/src/load.rs) offers CON POSTs from 1,000
//!   devices at `--rate`;
//! - every second a peer covering one device is added and the one added
//!   five seconds earlier removed (`ctl peer add/rm`: the fast path's maps
//!   and the mapping change under traffic);
//! - every second an MQTT client connects to the embedded broker for three
//!   seconds, subscribed at QoS 1 to one device's topic; half of them are
//!   persistent sessions from a pool of 50 ids (so their queues fill while
//!   they are away), half clean, and half of all leave without DISCONNECT;
//! - every `--restart-every` seconds the upstream Mosquitto is restarted.
//!
//! Two counting subscribers read everything: one on the embedded broker
//! (clean, QoS 0) and one on the Mosquitto (a persistent QoS 1 session that
//! reconnects after each restart, so every acknowledged message must reach
//! it). Every `--interval` seconds a row goes to `OUT.csv`; at the end the
//! curves are drawn to `OUT.png` and a summary is printed in Markdown.
//! `--replot OUT.csv` redraws a finished run's PNG.

mod plot;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use benches::load::{self, Family, LoadSpec};
use benches::subscriber::{self, percentile_us, Options, Window};
use clap::Parser;
use m2m_router_tests::daemon::{Ctl, Daemon};
use m2m_router_tests::mqtt::Mosquitto;
use m2m_router_tests::netns::{Netns, Topology, GW_V4, GW_V6};

#[derive(Parser, Debug)]
#[command(about = "m2m-router at half capacity for half an hour, with churn")]
struct Args {
    /// Minutes of load.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Offered messages per second: half of the bridged router's capacity
    /// in BENCHMARKS.md (30,000 msg/s at <= 0.1% loss).
    #[arg(long, default_value_t = 15000.0)]
    rate: f64,
    /// Simulated devices.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Seconds between samples.
    #[arg(long, default_value_t = 10.0)]
    interval: f64,
    /// Seconds between restarts of the upstream Mosquitto.
    #[arg(long, default_value_t = 300.0)]
    restart_every: f64,
    /// Where the samples (OUT.csv) and the plot (OUT.png) go.
    #[arg(long, default_value = "docs/soak")]
    out: PathBuf,
    /// Only redraw the PNG of this finished run's CSV.
    #[arg(long)]
    replot: Option<PathBuf>,
}

/// One sampling interval.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// Seconds since the load started, at the end of the interval.
    pub t: f64,
    pub rss_mib: f64,
    /// The C allocator's heap in use and held free (`ctl stats` process
    /// section): RSS growing with these flat is the allocator, not a leak.
    /// Zero in CSVs written before they were sampled.
    pub heap_mib: f64,
    pub heap_free_mib: f64,
    pub fds: u64,
    pub threads: u64,
    /// Messages per second the embedded broker's subscriber received.
    pub local_rate: f64,
    pub local_p50_ms: f64,
    pub local_p99_ms: f64,
    /// Messages per second the upstream subscriber received.
    pub upstream_rate: f64,
    pub upstream_p99_ms: f64,
    /// The bridge's spool at the end of the interval.
    pub spooled: u64,
    /// The embedded broker's sessions and queued bytes.
    pub sessions: u64,
    pub queued_kib: f64,
    /// Whether the upstream was restarted during the interval.
    pub restarted: bool,
}

const CSV_HEADER: &str = "t_s,rss_mib,fds,threads,local_msgs_per_s,local_p50_ms,local_p99_ms,upstream_msgs_per_s,upstream_p99_ms,spooled,sessions,queued_kib,upstream_restarted,heap_mib,heap_free_mib";

impl Sample {
    fn csv(&self) -> String {
        format!(
            "{:.1},{:.2},{},{},{:.0},{:.3},{:.3},{:.0},{:.3},{},{},{:.1},{},{:.2},{:.2}",
            self.t,
            self.rss_mib,
            self.fds,
            self.threads,
            self.local_rate,
            self.local_p50_ms,
            self.local_p99_ms,
            self.upstream_rate,
            self.upstream_p99_ms,
            self.spooled,
            self.sessions,
            self.queued_kib,
            u8::from(self.restarted),
            self.heap_mib,
            self.heap_free_mib,
        )
    }

    fn parse(line: &str) -> Option<Sample> {
        let f: Vec<&str> = line.split(',').collect();
        let num = |i: usize| f.get(i)?.parse::<f64>().ok();
        Some(Sample {
            t: num(0)?,
            rss_mib: num(1)?,
            fds: num(2)? as u64,
            threads: num(3)? as u64,
            local_rate: num(4)?,
            local_p50_ms: num(5)?,
            local_p99_ms: num(6)?,
            upstream_rate: num(7)?,
            upstream_p99_ms: num(8)?,
            spooled: num(9)? as u64,
            sessions: num(10)? as u64,
            queued_kib: num(11)?,
            restarted: num(12)? != 0.0,
            heap_mib: num(13).unwrap_or(0.0),
            heap_free_mib: num(14).unwrap_or(0.0),
        })
    }
}

fn main() {
    let args = Args::parse();
    if let Some(csv) = &args.replot {
        let samples = read_csv(csv);
        let png = csv.with_extension("png");
        plot::draw(&samples, &png, &title(&args)).expect("drawing the plot");
        println!("wrote {}", png.display());
        return;
    }
    let bin = std::env::var("M2M_ROUTER_BIN").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/m2m-router").into()
    });
    let topo = Topology::new("soak");
    load::route_devices(&topo);
    let mut mosquitto = Mosquitto::start(&topo.gw, 1885);
    let spool = PathBuf::from(format!("/var/tmp/m2m-soak-spool-{}", std::process::id()));
    let config = std::env::temp_dir().join(format!("m2m-soak-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "[defaults]\nrate = \"unlimited\"\ntopic = \"load/{{ip}}/{{port}}\"\n\
             [[upstream]]\nname = \"soak\"\nurl = \"mqtt://127.0.0.1:1885\"\ndurability = \"disk\"\nspool_dir = \"{}\"\n",
            spool.display()
        ),
    )
    .unwrap();
    let daemon = Daemon::on_gateway(&topo.gw, &bin, config.to_str().unwrap());
    let ctl = daemon.ctl();
    let pid = daemon.pid();

    let stop_subscribers = Arc::new(AtomicBool::new(false));
    let local_window = Window::default();
    let upstream_window = Window::default();
    let local = topo
        .gw
        .run(|| {
            subscriber::subscribe_with(
                "127.0.0.1:1883".parse().unwrap(),
                args.devices,
                stop_subscribers.clone(),
                Options {
                    persistent_id: None,
                    window: Some(local_window.clone()),
                },
            )
        })
        .expect("subscribe to the embedded broker");
    let upstream = topo
        .gw
        .run(|| {
            subscriber::subscribe_with(
                "127.0.0.1:1885".parse().unwrap(),
                args.devices,
                stop_subscribers.clone(),
                Options {
                    persistent_id: Some("soak-upstream".into()),
                    window: Some(upstream_window.clone()),
                },
            )
        })
        .expect("subscribe to the upstream Mosquitto");
    // The SUBSCRIBEs are processed before the first message arrives.
    std::thread::sleep(Duration::from_millis(500));

    let spec = LoadSpec {
        devices: args.devices,
        family: Family::V4,
        con_percent: 100,
        payload_sizes: vec![32],
        rate: args.rate,
        duration: Duration::from_secs_f64(args.minutes * 60.0),
        per_device: None,
        threads: 1,
        ack_wait: Duration::from_secs(5),
    };
    let csv_path = args.out.with_extension("csv");
    if let Some(dir) = csv_path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    let mut csv = std::fs::File::create(&csv_path).expect("create the CSV");
    writeln!(csv, "{CSV_HEADER}").unwrap();

    let load_done = AtomicBool::new(false);
    let churn = Churn::default();
    let restarts = AtomicU64::new(0);
    let start = Instant::now();
    let (offered, samples) = std::thread::scope(|s| {
        s.spawn(|| churn.peers(&ctl, args.devices, &load_done));
        s.spawn(|| churn.subscribers(&topo.gw, args.devices, &load_done));
        s.spawn(|| {
            let every = Duration::from_secs_f64(args.restart_every);
            let mut next = start + every;
            while sleep_until(next, &load_done) {
                mosquitto.stop();
                mosquitto.restart(&topo.gw);
                restarts.fetch_add(1, Ordering::Relaxed);
                next += every;
            }
        });
        let sampler = s.spawn(|| {
            let mut samples = Vec::new();
            let mut next = start;
            let mut restarts_seen = 0;
            let every = Duration::from_secs_f64(args.interval);
            loop {
                next += every;
                if !sleep_until(next, &load_done) {
                    return samples; // the load ended within this interval
                }
                let restarts_now = restarts.load(Ordering::Relaxed);
                let mut sample = sample(pid, &ctl, &local_window, &upstream_window, every);
                sample.t = start.elapsed().as_secs_f64();
                sample.restarted = restarts_now != restarts_seen;
                restarts_seen = restarts_now;
                writeln!(csv, "{}", sample.csv()).unwrap();
                eprintln!("{}", sample.csv());
                samples.push(sample);
            }
        });
        let offered = load::offer(
            &topo,
            &spec,
            SocketAddr::new(GW_V4.into(), 5683),
            SocketAddr::new(GW_V6.into(), 5683),
            &AtomicBool::new(false),
        );
        load_done.store(true, Ordering::Relaxed);
        (offered, sampler.join().unwrap())
    });
    let offered = offered.expect("offering the load");

    // Everything acknowledged must reach both subscribers; the bridge may
    // still be replaying what it spooled during the last restart.
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let spooled = upstream_field(&ctl, "spooled_messages");
        if spooled == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    stop_subscribers.store(true, Ordering::Relaxed);
    let local = local.join().unwrap();
    let upstream = upstream.join().unwrap();
    let stats = ctl.json(&["stats"]);
    let upstreams = ctl.json(&["upstream", "ls"]);
    daemon.stop();
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_dir_all(&spool);

    let png = args.out.with_extension("png");
    plot::draw(&samples, &png, &title(&args)).expect("drawing the plot");
    let summary = Summary {
        args: &args,
        offered: &offered,
        local: &local,
        upstream: &upstream,
        samples: &samples,
        churn: &churn,
        restarts: restarts.load(Ordering::Relaxed),
        stats: &stats,
        upstreams: &upstreams,
    };
    println!("{}", summary.markdown(&csv_path, &png));
}

fn title(args: &Args) -> String {
    format!(
        "m2m-router soak: {:.0} msg/s offered, peers and subscribers churning every second, upstream restarted every {:.0} s",
        args.rate, args.restart_every
    )
}

fn read_csv(path: &Path) -> Vec<Sample> {
    let text = std::fs::read_to_string(path).expect("read the CSV");
    text.lines().skip(1).filter_map(Sample::parse).collect()
}

/// Sleeps until `at`; false if `done` was set first (checked every 100 ms).
fn sleep_until(at: Instant, done: &AtomicBool) -> bool {
    loop {
        if done.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= at {
            return true;
        }
        std::thread::sleep((at - now).min(Duration::from_millis(100)));
    }
}

/// The router's resources now, and the latencies since the last sample.
fn sample(pid: i32, ctl: &Ctl, local: &Window, upstream: &Window, every: Duration) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    let take = |w: &Window| {
        let mut v = std::mem::take(&mut *w.lock().unwrap());
        v.sort_unstable();
        v
    };
    let (local, upstream) = (take(local), take(upstream));
    let stats = ctl.json(&["stats"]);
    let seconds = every.as_secs_f64();
    Sample {
        t: 0.0,
        rss_mib: field("VmRSS:") as f64 / 1024.0,
        heap_mib: mib(&stats["process"]["heap_in_use_bytes"]),
        heap_free_mib: mib(&stats["process"]["heap_free_bytes"]),
        fds,
        threads: field("Threads:"),
        local_rate: local.len() as f64 / seconds,
        local_p50_ms: percentile_us(&local, 0.5) / 1000.0,
        local_p99_ms: percentile_us(&local, 0.99) / 1000.0,
        upstream_rate: upstream.len() as f64 / seconds,
        upstream_p99_ms: percentile_us(&upstream, 0.99) / 1000.0,
        spooled: upstream_field(ctl, "spooled_messages"),
        sessions: stats["mqtt"]["sessions_kept"].as_u64().unwrap_or(0),
        queued_kib: stats["mqtt"]["queued_bytes"].as_u64().unwrap_or(0) as f64 / 1024.0,
        restarted: false,
    }
}

fn mib(v: &serde_json::Value) -> f64 {
    v.as_u64().unwrap_or(0) as f64 / (1024.0 * 1024.0)
}

fn upstream_field(ctl: &Ctl, name: &str) -> u64 {
    ctl.json(&["upstream", "ls"])["upstreams"][0][name]
        .as_u64()
        .unwrap_or(0)
}

/// The churn around the load, and what it did.
#[derive(Default)]
struct Churn {
    peers_added: AtomicU64,
    peers_removed: AtomicU64,
    peer_errors: Mutex<Vec<String>>,
    clients: AtomicU64,
    client_errors: AtomicU64,
    client_messages: AtomicU64,
}

/// Churn peers alive at once.
const PEERS_ALIVE: u64 = 5;
/// Client ids the persistent churn subscribers take in turn.
const PERSISTENT_IDS: u64 = 50;
/// How long each churn subscriber stays.
const CLIENT_STAYS: Duration = Duration::from_secs(3);

impl Churn {
    /// Every second: a peer for device N, the one for N-5 removed.
    fn peers(&self, ctl: &Ctl, devices: usize, done: &AtomicBool) {
        let mut next = Instant::now();
        for n in 0u64.. {
            next += Duration::from_secs(1);
            if !sleep_until(next, done) {
                return;
            }
            let device = load::device_addr(n as usize % devices, Family::V4);
            let prefix = format!("{device}/32");
            let name = format!("churn-{n}");
            self.note(
                ctl.try_json(&[
                    "peer",
                    "add",
                    &name,
                    "--prefix",
                    &prefix,
                    "--topic",
                    "load/{ip}/{port}",
                ]),
                &self.peers_added,
            );
            if n >= PEERS_ALIVE {
                let old = format!("churn-{}", n - PEERS_ALIVE);
                self.note(ctl.try_json(&["peer", "rm", &old]), &self.peers_removed);
            }
        }
    }

    fn note(&self, result: Result<serde_json::Value, String>, done: &AtomicU64) {
        match result {
            Ok(_) => {
                done.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.peer_errors.lock().unwrap().push(e),
        }
    }

    /// Every second a subscriber to one device's topic, for three seconds.
    fn subscribers(&self, gw: &Netns, devices: usize, done: &AtomicBool) {
        std::thread::scope(|s| {
            let mut next = Instant::now();
            for k in 0u64.. {
                next += Duration::from_secs(1);
                if !sleep_until(next, done) {
                    return;
                }
                let stream = gw.run(|| TcpStream::connect("127.0.0.1:1883"));
                self.clients.fetch_add(1, Ordering::Relaxed);
                match stream {
                    Ok(stream) => {
                        s.spawn(move || match churn_client(stream, k, devices) {
                            Ok(n) => {
                                self.client_messages.fetch_add(n, Ordering::Relaxed);
                            }
                            Err(_) => {
                                self.client_errors.fetch_add(1, Ordering::Relaxed);
                            }
                        });
                    }
                    Err(_) => {
                        self.client_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
}

/// One churn subscriber's visit: persistent (an id from the pool) for even
/// `k`, clean for odd; subscribed at QoS 1 to one device's topic, reading
/// and acknowledging for [`CLIENT_STAYS`], then DISCONNECT or just a close
/// (every other visit of each kind). Returns the PUBLISHes it read.
fn churn_client(mut s: TcpStream, k: u64, devices: usize) -> std::io::Result<u64> {
    let persistent = k.is_multiple_of(2);
    // A persistent id keeps its device, so its session's queue fills while
    // it is away and empties on each visit: a steady state, not a leak.
    let (id, device) = if persistent {
        let n = (k / 2) % PERSISTENT_IDS;
        (format!("churn-{n}"), n * 7919)
    } else {
        (format!("churn-clean-{k}"), k * 7919)
    };
    let device = load::device_addr(device as usize % devices, Family::V4);
    s.write_all(&subscriber::hello(
        &id,
        !persistent,
        &format!("load/{device}/#"),
        1,
    ))?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let leave_at = Instant::now() + CLIENT_STAYS;
    let mut buf = vec![0u8; 64 * 1024];
    let mut filled = 0;
    let mut publishes = 0;
    let mut acks = Vec::new();
    while Instant::now() < leave_at {
        match s.read(&mut buf[filled..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if subscriber::is_timeout(&e) => continue,
            Err(e) => return Err(e),
        }
        let mut at = 0;
        while let Some((header, body, next)) = subscriber::frame(&buf[at..filled]) {
            if header >> 4 == 3 {
                publishes += 1;
                subscriber::publish_payload(body, (header >> 1) & 3, &mut acks);
            }
            at += next;
        }
        s.write_all(&acks)?;
        acks.clear();
        buf.copy_within(at..filled, 0);
        filled -= at;
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
    }
    if (k / 2).is_multiple_of(2) {
        s.write_all(&[0xe0, 0])?; // DISCONNECT
    }
    Ok(publishes)
}

/// One column of the samples.
pub type Measure = fn(&Sample) -> f64;

/// What the run showed, in Markdown.
struct Summary<'a> {
    args: &'a Args,
    offered: &'a load::Offered,
    local: &'a subscriber::Received,
    upstream: &'a subscriber::Received,
    samples: &'a [Sample],
    churn: &'a Churn,
    restarts: u64,
    stats: &'a serde_json::Value,
    upstreams: &'a serde_json::Value,
}

impl Summary<'_> {
    fn markdown(&self, csv: &Path, png: &Path) -> String {
        let mut out = String::new();
        let o = self.offered;
        let lost = |r: &subscriber::Received| {
            o.sent
                .saturating_sub(r.per_device.iter().map(|&n| u64::from(n)).sum())
        };
        out.push_str(&format!(
            "Offered {} CON messages in {:.0} s ({:.0} msg/s), {} acknowledged (ACK within 5 s of the end).\n\n",
            o.sent,
            o.seconds,
            o.sent as f64 / o.seconds.max(1e-9),
            o.acks
        ));
        out.push_str(&format!(
            "- embedded broker subscriber: {} missing, {} lossy devices, {} duplicates\n",
            lost(self.local),
            self.local.lossy_devices(&o.per_device),
            self.local.duplicates
        ));
        out.push_str(&format!(
            "- upstream Mosquitto subscriber (restarted {} times): {} missing, {} lossy devices, {} duplicates (QoS 1 is at least once)\n",
            self.restarts,
            lost(self.upstream),
            self.upstream.lossy_devices(&o.per_device),
            self.upstream.duplicates
        ));
        let churn = self.churn;
        out.push_str(&format!(
            "- churn: {} peers added, {} removed, {} control errors; {} subscriber visits ({} failed), {} messages read by them\n",
            churn.peers_added.load(Ordering::Relaxed),
            churn.peers_removed.load(Ordering::Relaxed),
            churn.peer_errors.lock().unwrap().len(),
            churn.clients.load(Ordering::Relaxed),
            churn.client_errors.load(Ordering::Relaxed),
            churn.client_messages.load(Ordering::Relaxed),
        ));
        if let Some(e) = churn.peer_errors.lock().unwrap().first() {
            out.push_str(&format!("  - first control error: {}\n", e.trim()));
        }
        out.push_str(&format!(
            "- router counters at the end: coap {}; upstream {}\n\n",
            self.stats["coap"], self.upstreams["upstreams"][0]
        ));
        // Medians of the first and the last stretch of `window` seconds,
        // the first after a minute of warm-up.
        let window = 300.0;
        let end = self.samples.last().map_or(0.0, |s| s.t);
        let first: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.t > 60.0 && s.t <= 60.0 + window)
            .collect();
        let last: Vec<&Sample> = self.samples.iter().filter(|s| s.t > end - window).collect();
        out.push_str("| measure | minutes 1-6 (median) | last 5 minutes (median) | last / first | maximum |\n|---|---:|---:|---:|---:|\n");
        let rows: [(&str, Measure); 9] = [
            ("router RSS, MiB", |s| s.rss_mib),
            ("router heap in use, MiB", |s| s.heap_mib),
            ("router heap held free, MiB", |s| s.heap_free_mib),
            ("open descriptors", |s| s.fds as f64),
            ("threads", |s| s.threads as f64),
            ("embedded subscriber p50, ms", |s| s.local_p50_ms),
            ("embedded subscriber p99, ms", |s| s.local_p99_ms),
            ("upstream subscriber p99, ms", |s| s.upstream_p99_ms),
            ("embedded broker queued KiB", |s| s.queued_kib),
        ];
        for (name, get) in rows {
            let a = median(first.iter().map(|s| get(s)));
            let b = median(last.iter().map(|s| get(s)));
            let max = self
                .samples
                .iter()
                .map(get)
                .filter(|v| v.is_finite())
                .fold(f64::NAN, f64::max);
            out.push_str(&format!(
                "| {name} | {a:.2} | {b:.2} | {:.2} | {max:.2} |\n",
                b / a
            ));
        }
        out.push_str(&format!(
            "\nSamples every {:.0} s in `{}`, plotted in `{}`.\n",
            self.args.interval,
            csv.display(),
            png.display()
        ));
        out
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.filter(|v| v.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
