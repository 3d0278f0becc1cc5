//! ns per packet of the XDP program on each verdict path, measured in the
//! kernel with BPF_PROG_TEST_RUN, beside an empty XDP_PASS program in the
//! same run. Rounds are interleaved across paths so machine noise hits all
//! of them alike; the table reports the median round and the ratio to the
//! empty program.
//!
//!   sudo cargo run --release -p benches --bin xdp-cost [-- ROUNDS REPEAT]
//!
//! Needs root (it loads the program).

use std::net::IpAddr;

use m2m_router::config::Config;
use m2m_router::fastpath::{Fastpath, PolicyTables};
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
    let baseline_frame = &paths[0].1;
    let mut baseline = Vec::new();
    let mut samples = vec![Vec::new(); paths.len()];
    for _ in 0..rounds {
        baseline.push(
            fp.test_run_baseline(baseline_frame, repeat)
                .unwrap()
                .duration
                .as_nanos() as f64,
        );
        for (i, (_, f)) in paths.iter().enumerate() {
            samples[i].push(fp.test_run(f, repeat).unwrap().duration.as_nanos() as f64);
        }
    }
    // TestRunResult::duration is the kernel's time per run (total / repeat),
    // in whole nanoseconds.
    let base = median(baseline);
    println!("BPF_PROG_TEST_RUN, repeat {repeat}, median of {rounds} interleaved rounds");
    println!();
    println!("| path | ns/packet | x empty program |");
    println!("|---|---:|---:|");
    println!("| empty XDP_PASS program (baseline) | {base:.0} | 1.00 |");
    for ((name, _), s) in paths.iter().zip(samples) {
        let m = median(s);
        println!("| {name} | {m:.0} | {:.2} |", m / base.max(1.0));
    }
}
