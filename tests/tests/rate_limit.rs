//! The per-peer rate is exact with both cores sending: the program runs on
//! every CPU at once (BPF_PROG_TEST_RUN from one thread pinned per CPU) and
//! the accepted count must be within 10% of rate x time + burst.
//!
//! Privileged: needs root to load the program.

use std::time::{Duration, Instant};

use m2m_router::config::Config;
use m2m_router::fastpath::{Fastpath, PolicyTables};
use m2m_router_tests::packet::{coap_post, UdpFrame};
use m2m_router_tests::require_root;

const RATE: u64 = 20_000;
const BURST: u64 = 100;
const RUN_FOR: Duration = Duration::from_millis(1500);

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity on the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "pin to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn rate_holds_within_ten_percent_across_all_cpus() {
    require_root();
    let config = Config::parse(&format!(
        "[[peer]]\nname = \"limited\"\nprefix = [\"10.0.0.0/24\"]\nrate = \"{RATE}/s\"\nburst = {BURST}\n"
    ))
    .unwrap();
    let fp = Fastpath::load(PolicyTables::from_config(&config).unwrap()).unwrap();
    let frame = UdpFrame::new(
        "10.0.0.1".parse().unwrap(),
        "10.0.0.254".parse().unwrap(),
        40000,
        5683,
        coap_post(1, b"21.5"),
    )
    .build();
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert!(
        cpus >= 2,
        "this test needs two CPUs to show cross-CPU accuracy"
    );

    let start = Instant::now();
    std::thread::scope(|s| {
        for cpu in 0..cpus {
            let (fp, frame) = (&fp, &frame);
            s.spawn(move || {
                pin_to_cpu(cpu);
                while start.elapsed() < RUN_FOR {
                    fp.test_run(frame, 20_000).expect("BPF_PROG_TEST_RUN");
                }
            });
        }
    });
    let elapsed = start.elapsed();

    let per_cpu = fp.peer_counters_per_cpu(1).unwrap();
    let busy_cpus = per_cpu
        .iter()
        .filter(|c| c.accepted.packets + c.dropped.packets > 0)
        .count();
    assert!(
        busy_cpus >= 2,
        "only {busy_cpus} CPU(s) ran the program: {per_cpu:?}"
    );
    let total = fp.peer_counters(1).unwrap();
    let offered = total.accepted.packets + total.dropped.packets;
    let expected = RATE as f64 * elapsed.as_secs_f64() + BURST as f64;
    let accepted = total.accepted.packets as f64;
    eprintln!(
        "offered {offered} in {elapsed:?} on {busy_cpus} CPUs; accepted {accepted}, expected {expected:.0}"
    );
    assert!(
        offered as f64 > 10.0 * expected,
        "the offered load ({offered}) must far exceed the rate for the test to mean anything"
    );
    assert!(
        (accepted - expected).abs() <= 0.1 * expected,
        "accepted {accepted} is not within 10% of {expected:.0}"
    );
}
