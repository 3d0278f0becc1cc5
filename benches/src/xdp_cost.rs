//! ns per packet of the XDP program on each verdict path, measured in the
//! kernel with BPF_PROG_TEST_RUN, beside an empty XDP_PASS program and
//! beside `xdp-filter` (Debian xdp-tools: a C filter of the same family,
//! by the XDP maintainers) on the accept frame, all in the same run.
//! Rounds are interleaved across programs so machine noise hits all of
//! them alike; the table reports the median round, the ns above the empty
//! program (the program's own cost: BPF_PROG_TEST_RUN's fixed overhead,
//! which differs several-fold between hosts, is what the empty program
//! costs) and the ratio to the empty program.
//!
//!   sudo cargo run --release -p benches --bin xdp-cost [-- ROUNDS REPEAT]
//!
//! Needs root (it loads the programs).

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use aya::programs::{TestRun, TestRunOptions, Xdp};
use aya_obj::programs::XdpAttachType;
use m2m_router::config::Config;
use m2m_router::fastpath::{Fastpath, PolicyTables};
use m2m_router_tests::bpffs::BpfFs;
use m2m_router_tests::netns::Netns;
use m2m_router_tests::packet::{coap_post, UdpFrame};

const CONFIG: &str = r#"
[defaults]
unknown_peers = "allow"
rate = "1000000000/s"      # the unknown-source path keeps LRU rate state
burst = 1000000
[[peer]]
name = "free"
prefix = ["10.0.0.0/24"]
rate = "unlimited"
[[peer]]
name = "metered"
prefix = ["10.0.1.0/24"]
rate = "1000000000/s"      # never reached: measures the CAS on the shared state
burst = 1000000
[[peer]]
name = "banned"
prefix = ["10.0.2.0/24"]
deny = true
[[peer]]
name = "slow"
prefix = ["10.0.3.0/24"]
rate = "1/s"               # everything after the first packet is over the rate
burst = 1
"#;

fn frame(src: &str, port: u16, payload: Vec<u8>) -> Vec<u8> {
    let src: IpAddr = src.parse().unwrap();
    let dst: IpAddr = match src {
        IpAddr::V4(_) => "10.0.0.254".parse().unwrap(),
        IpAddr::V6(_) => "fd00::fffe".parse().unwrap(),
    };
    UdpFrame::new(src, dst, 40000, port, payload).build()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<u32>().expect("ROUNDS REPEAT"));
    let rounds = args.next().unwrap_or(15);
    let repeat = args.next().unwrap_or(1_000_000);
    let config = Config::parse(CONFIG).unwrap();
    let mut fp = Fastpath::load(PolicyTables::from_config(&config).unwrap())
        .expect("load the XDP program (run as root)");

    let post = coap_post(1, b"21.5");
    let mut bad_version = post.clone();
    bad_version[0] ^= 0xc0;
    let paths: Vec<(&str, Vec<u8>)> = vec![
        (
            "accept, peer without rate limit",
            frame("10.0.0.1", 5683, post.clone()),
        ),
        (
            "accept, peer with rate limit (CAS)",
            frame("10.0.1.1", 5683, post.clone()),
        ),
        (
            "accept, unknown IPv6 source (LRU state)",
            frame("2001:db8::1", 5683, post.clone()),
        ),
        (
            "drop malformed (bad version)",
            frame("10.0.0.1", 5683, bad_version),
        ),
        ("drop denied peer", frame("10.0.2.1", 5683, post.clone())),
        ("drop over rate", frame("10.0.3.1", 5683, post.clone())),
        (
            "pass, UDP not to a CoAP port",
            frame("10.0.0.1", 9999, post.clone()),
        ),
    ];
    let accept_frame = &paths[0].1;
    let filter = XdpFilter::load();
    if let Err(why) = &filter {
        eprintln!("xdp-filter not measured: {why}");
    }
    let mut baseline = Vec::new();
    let mut filter_samples = Vec::new();
    let mut samples = vec![Vec::new(); paths.len()];
    for _ in 0..rounds {
        baseline.push(
            fp.test_run_baseline(accept_frame, repeat)
                .unwrap()
                .duration
                .as_nanos() as f64,
        );
        if let Ok(filter) = &filter {
            filter_samples.push(filter.run(accept_frame, repeat));
        }
        for (i, (_, f)) in paths.iter().enumerate() {
            samples[i].push(fp.test_run(f, repeat).unwrap().duration.as_nanos() as f64);
        }
    }
    // TestRunResult::duration is the kernel's time per run (total / repeat),
    // in whole nanoseconds.
    let base = median(baseline);
    let row = |name: &str, ns: f64| {
        println!(
            "| {name} | {ns:.0} | {:.0} | {:.2} |",
            ns - base,
            ns / base.max(1.0)
        )
    };
    println!("BPF_PROG_TEST_RUN, repeat {repeat}, median of {rounds} interleaved rounds");
    println!();
    println!("| path | ns/packet | ns above empty | x empty program |");
    println!("|---|---:|---:|---:|");
    row("empty XDP_PASS program (baseline)", base);
    if !filter_samples.is_empty() {
        row(
            "xdp-filter, deny mode, an address and a port rule, passing the accept frame",
            median(filter_samples),
        );
    }
    for ((name, _), s) in paths.iter().zip(samples) {
        row(name, median(s));
    }
}

/// xdp-filter in deny mode (what no rule allows is dropped) with two allow
/// rules: a source address the accept frame does not have, and the CoAP
/// port it goes to. It checks the frame's MAC addresses, then its IP
/// addresses, then its ports, and passes it at the last check: its longest
/// path for this frame, as ours validates and looks up everything. Loaded on the `lo` of a namespace of its own without
/// libxdp's dispatcher (whose extra call would not be xdp-filter's cost),
/// its state pinned in a bpffs of its own (`LIBXDP_BPFFS`); the program is
/// pinned there too and run with BPF_PROG_TEST_RUN like ours. Unloaded and
/// removed on drop.
struct XdpFilter {
    ns: Netns,
    fs: BpfFs,
    program: Xdp,
}

impl XdpFilter {
    fn load() -> Result<XdpFilter, String> {
        let ns = Netns::create("xdp-filter");
        let fs = BpfFs::mount("xdp-filter");
        xdp_filter(
            &ns,
            fs.path(),
            &["load", "lo", "--mode", "skb", "--policy", "deny"],
        )?;
        let loaded = (|| {
            xdp_filter(&ns, fs.path(), &["ip", "192.0.2.99", "--mode", "src"])?;
            xdp_filter(&ns, fs.path(), &["port", "5683"])?;
            let link = output(ns.command("ip").args(["-j", "link", "show", "lo"]))?;
            let link: serde_json::Value =
                serde_json::from_str(&link).map_err(|e| format!("ip -j link: {e}"))?;
            let id = link[0]["xdp"]["prog"]["id"]
                .as_u64()
                .ok_or_else(|| format!("no XDP program on lo: {link}"))?;
            let pin = fs.path().join("xdp-filter-program");
            output(
                Command::new("bpftool")
                    .args(["prog", "pin", "id", &id.to_string()])
                    .arg(&pin),
            )?;
            Xdp::from_pin(&pin, XdpAttachType::Interface).map_err(|e| format!("{pin:?}: {e}"))
        })();
        match loaded {
            Ok(program) => Ok(XdpFilter { ns, fs, program }),
            Err(why) => {
                let _ = xdp_filter(&ns, fs.path(), &["unload", "lo", "--all"]);
                Err(why)
            }
        }
    }

    fn run(&self, frame: &[u8], repeat: u32) -> f64 {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat;
        let result = self
            .program
            .test_run(opts)
            .expect("BPF_PROG_TEST_RUN on xdp-filter");
        assert_eq!(
            result.return_value, 2,
            "xdp-filter passes the accept frame (XDP_PASS)"
        );
        result.duration.as_nanos() as f64
    }
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        let _ = xdp_filter(&self.ns, self.fs.path(), &["unload", "lo", "--all"]);
    }
}

/// `xdp-filter ARGS` in `ns`, with libxdp's state in `bpffs`.
fn xdp_filter(ns: &Netns, bpffs: &Path, args: &[&str]) -> Result<String, String> {
    output(
        ns.command("xdp-filter")
            .args(args)
            .env("LIBXDP_SKIP_DISPATCHER", "1")
            .env("LIBXDP_BPFFS", bpffs),
    )
    .map_err(|e| format!("{e} (Debian package xdp-tools)"))
}

fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
