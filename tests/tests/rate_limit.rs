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

/// Total length of the union of the spans.
fn covered(mut spans: Vec<(Duration, Duration)>) -> Duration {
    spans.sort();
    let mut total = Duration::ZERO;
    let mut current: Option<(Duration, Duration)> = None;
    for (a, b) in spans {
        current = match current {
            Some((s, e)) if a <= e => Some((s, e.max(b))),
            Some((s, e)) => {
                total += e - s;
                Some((a, b))
            }
            None => Some((a, b)),
        };
    }
    total + current.map_or(Duration::ZERO, |(s, e)| e - s)
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

    // Each thread records when it was offering packets. On a shared machine
    // a thread can be off its CPU for a while; what the rate limiter can be
    // held to is the time during which at least one CPU was offering.
    let start = Instant::now();
    let intervals: Vec<Vec<(Duration, Duration)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..cpus)
            .map(|cpu| {
                let (fp, frame) = (&fp, &frame);
                s.spawn(move || {
                    pin_to_cpu(cpu);
                    let mut spans = Vec::new();
                    while start.elapsed() < RUN_FOR {
                        let from = start.elapsed();
                        fp.test_run(frame, 20_000).expect("BPF_PROG_TEST_RUN");
                        spans.push((from, start.elapsed()));
                    }
                    spans
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = covered(intervals.into_iter().flatten().collect());

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
        "offered {offered} over {elapsed:?} of offering on {busy_cpus} CPUs; accepted {accepted}, expected {expected:.0}"
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
