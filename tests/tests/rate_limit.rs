//! The per-peer rate holds across CPUs: the program runs on every CPU the
//! test may use at once (BPF_PROG_TEST_RUN from one thread pinned per CPU),
//! and the accepted count is held to two bounds that are true on any host.
//!
//! **Upper bound** (the cross-CPU property): a GCRA admits at most
//! `rate x W + burst` packets in any window of length W, so with every CPU
//! offering, the accepted count is at most `rate x (wall time from the first
//! offered packet to the last) + burst`. The window is measured from before
//! the first call to after the last one, so it can only be longer than the
//! real one. The fast path's clock is the coarse one, which advances once a
//! tick: the window it sees is up to a tick longer, and the burst tolerance
//! is a tick wider to make up for it (`router_common::rate`), so the bound
//! grows by `rate x 2 ticks`. Per-CPU buckets would each admit about `rate x` their own
//! offering time; the test checks it offered densely enough on two CPUs that
//! such a limiter would necessarily break this bound (see `assert_has_power`).
//!
//! **Lower bound** (the limiter refills): during any time in which packets
//! are offered back to back, GCRA's theoretical arrival time (TAT) never
//! falls behind the clock by more than one inter-packet gap, and across an
//! idle gap it jumps by at most the gap. Summing over the run, the accepted
//! count is at least `rate x U / (1 + rate x g) - 1`, where U is the time
//! during which some CPU was offering and g the time per offered packet.
//! U is taken from the kernel's own figure: BPF_PROG_TEST_RUN reports the
//! mean time per repeat measured around its loop only, with rescheduling
//! excluded (`bpf_test_timer_continue`, net/bpf/test_run.c). The wall-clock
//! span of the syscall is not used: it also covers the XDP dispatcher update
//! that every call makes (`bpf_prog_change_xdp`, an RCU synchronisation),
//! which takes 14 ms per call on some hosts against 0.9 ms of program time.
//! One CPU's calls never overlap each other, so U is at least the largest
//! per-CPU sum. The tolerance of 3% covers interrupts and hypervisor steal
//! inside the kernel's measured loop, during which nothing is offered.
//!
//! To keep the fixed per-call cost small against the program time, each call
//! repeats the program a million times (26-86 ms on hosts of this kind), and
//! the offering threads run SCHED_FIFO so that a loaded machine (a busy loop
//! on every core) does not take their CPUs away. The run ends when every CPU
//! has offered for `OFFER_PER_CPU` by the kernel's clock, not after a wall
//! time; `DEADLINE` only turns a stuck run into a failure.
//!
//! Privileged: needs root to load the program and to use SCHED_FIFO.

use std::time::{Duration, Instant};

use m2m_router::config::Config;
use m2m_router::fastpath::{coarse_tick_ns, Fastpath, PolicyTables};
use m2m_router_tests::packet::{coap_post, UdpFrame};
use m2m_router_tests::require_root;

const RATE: u64 = 20_000;
const BURST: u64 = 100;
const REPEAT: u32 = 1_000_000;
const OFFER_PER_CPU: Duration = Duration::from_millis(1500);
const DEADLINE: Duration = Duration::from_secs(120);
const TOLERANCE: f64 = 0.03;

/// One BPF_PROG_TEST_RUN call as seen from userspace and by the kernel.
#[derive(Debug, Clone, Copy)]
struct Call {
    /// Wall clock (CLOCK_MONOTONIC, the clock bpf_ktime_get_ns reads) before
    /// and after the syscall, relative to the test's start.
    from: Duration,
    to: Duration,
    /// The kernel's measured loop time: mean per repeat times repeats.
    offering: Duration,
    per_packet: Duration,
}

/// The CPUs this process may run on (not `0..N`: a container or a cgroup
/// cpuset may give it others).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let rc = libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set);
        assert_eq!(
            rc,
            0,
            "sched_getaffinity: {}",
            std::io::Error::last_os_error()
        );
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// Pins the calling thread to `cpu` and makes it SCHED_FIFO, so that a
/// busy machine cannot time-slice it away from the program.
fn pin_and_prioritise(cpu: usize) {
    // SAFETY: cpu_set_t and sched_param are plain data; both calls act on
    // the calling thread only.
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
        let param = libc::sched_param { sched_priority: 1 };
        let rc = libc::sched_setscheduler(0, libc::SCHED_FIFO, &param);
        assert_eq!(
            rc,
            0,
            "SCHED_FIFO for the offering thread on CPU {cpu}: {} (the test needs root and a \
             kernel that grants real-time priority to this cgroup)",
            std::io::Error::last_os_error()
        );
    }
}

/// Offers the frame on `cpu` until the kernel has run the program there for
/// `OFFER_PER_CPU`.
fn offer(fp: &Fastpath, frame: &[u8], cpu: usize, start: Instant) -> Vec<Call> {
    pin_and_prioritise(cpu);
    let mut calls = Vec::new();
    let mut offered = Duration::ZERO;
    while offered < OFFER_PER_CPU {
        assert!(
            start.elapsed() < DEADLINE,
            "CPU {cpu} ran the program for only {offered:?} in {DEADLINE:?} ({} calls)",
            calls.len()
        );
        let from = start.elapsed();
        let run = fp.test_run(frame, REPEAT).expect("BPF_PROG_TEST_RUN");
        let to = start.elapsed();
        // The kernel reports the mean per repeat, rounded down to a whole
        // nanosecond: the product can only understate the offering time,
        // which weakens the lower bound and the power check, never the
        // upper bound.
        let offering = run.duration * REPEAT;
        offered += offering;
        calls.push(Call {
            from,
            to,
            offering,
            per_packet: run.duration,
        });
    }
    calls
}

/// A limiter with one bucket per CPU admits at least `rate x` each CPU's own
/// offering time (the lower-bound argument applied per CPU). If that sum
/// already exceeds the upper bound, a per-CPU limiter would have failed this
/// test: the run had the power to show the cross-CPU property.
fn assert_has_power(per_cpu: &[Vec<Call>], upper: f64) {
    let per_cpu_limiter_floor: f64 = per_cpu
        .iter()
        .map(|calls| lower_bound(calls.iter().map(|c| c.offering).sum(), calls))
        .sum();
    assert!(
        per_cpu_limiter_floor > upper,
        "the CPUs did not offer at the same time long enough for the test to tell a shared \
         limiter from per-CPU ones: per-CPU buckets would admit at least {per_cpu_limiter_floor:.0}, \
         not more than the bound {upper:.0}; per-CPU calls: {:?}",
        per_cpu.iter().map(|c| c.len()).collect::<Vec<_>>()
    );
}

/// `rate x U / (1 + rate x g) - 1`, less the tolerance, for offering time U
/// at the slowest per-packet time `g` seen in `calls`.
fn lower_bound(offering: Duration, calls: &[Call]) -> f64 {
    let gap = calls
        .iter()
        .map(|c| c.per_packet)
        .max()
        .unwrap_or_default()
        .as_secs_f64()
        + 1e-9; // the kernel's figure is rounded down
    let rate = RATE as f64;
    rate * offering.as_secs_f64() / (1.0 + rate * gap) * (1.0 - TOLERANCE) - 1.0
}

#[test]
fn rate_holds_across_all_cpus_between_kernel_measured_bounds() {
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
    let cpus = allowed_cpus();
    assert!(
        cpus.len() >= 2,
        "this test needs two CPUs to show cross-CPU accuracy; the process may use {cpus:?}"
    );

    let start = Instant::now();
    let per_cpu: Vec<Vec<Call>> = std::thread::scope(|s| {
        let handles: Vec<_> = cpus
            .iter()
            .map(|&cpu| {
                let (fp, frame) = (&fp, &frame);
                s.spawn(move || offer(fp, frame, cpu, start))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let total = fp.peer_counters(1).unwrap();
    let accepted = total.accepted.packets as f64;
    let offered = total.accepted.packets + total.dropped.packets;
    let all: Vec<Call> = per_cpu.iter().flatten().copied().collect();
    let window =
        all.iter().map(|c| c.to).max().unwrap() - all.iter().map(|c| c.from).min().unwrap();
    let longest_cpu = per_cpu
        .iter()
        .map(|calls| calls.iter().map(|c| c.offering).sum::<Duration>())
        .max()
        .unwrap();
    let ticks = 2.0 * coarse_tick_ns() as f64 / 1e9;
    let upper = RATE as f64 * (window.as_secs_f64() + ticks) + BURST as f64 + 1.0;
    let lower = lower_bound(longest_cpu, &all);
    eprintln!(
        "offered {offered} on {} CPUs; window {window:?}, longest per-CPU offering {longest_cpu:?}; \
         accepted {accepted}, bounds [{lower:.0}, {upper:.0}]",
        cpus.len()
    );

    assert_eq!(
        offered,
        u64::from(REPEAT) * all.len() as u64,
        "every offered packet is counted for the peer"
    );
    assert_has_power(&per_cpu, upper);
    assert!(
        accepted <= upper,
        "accepted {accepted} > rate x (window + 2 ticks) + burst = {upper:.0}: the CPUs' limiters are not one"
    );
    assert!(
        accepted >= lower,
        "accepted {accepted} < {lower:.0}, the least a limiter that refills at {RATE}/s admits \
         in {longest_cpu:?} of offering (less {TOLERANCE})"
    );
}
