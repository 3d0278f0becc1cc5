//! Per-peer rate limiting: the Generic Cell Rate Algorithm (GCRA), which is a
//! token bucket stored as one number.
//!
//! The state is a single u64, the theoretical arrival time (TAT) of the next
//! packet in nanoseconds. A packet conforms when it arrives no earlier than
//! `TAT - burst_ns`; it then moves TAT one `interval_ns` (= 1 s / rate) on.
//! `burst_ns = (burst - 1) * interval_ns` lets `burst` packets through back to
//! back after an idle period, exactly like a bucket of `burst` tokens refilled
//! at `rate` per second.
//!
//! Why one number: with both cores receiving, per-CPU buckets would let
//! through up to (number of CPUs) x rate. A single shared TAT updated with an
//! atomic compare-and-swap is exact across CPUs without a lock, and costs one
//! CAS per accepted packet.

//!
//! The fast path's clock is the kernel's coarse one (`bpf_ktime_get_coarse_ns`,
//! CLOCK_MONOTONIC_COARSE): it advances once per tick (1/HZ, 1 to 10 ms) and
//! costs a fraction of the precise clock's read. Every packet within a tick
//! sees the same time, so a burst tolerance below one tick would admit one
//! packet per tick whatever the rate; [`with_clock_tick`] widens it by a
//! tick, which keeps the long-run rate exact and lets at most one tick's worth
//! of packets more through after an idle period.

/// The TAT after admitting a packet at `now_ns`, or `None` if the packet is
/// over the rate. `interval_ns == 0` means unlimited.
#[inline(always)]
pub fn gcra_admit(tat_ns: u64, now_ns: u64, interval_ns: u64, burst_ns: u64) -> Option<u64> {
    let start = if tat_ns > now_ns { tat_ns } else { now_ns };
    if start - now_ns > burst_ns {
        None
    } else {
        Some(start + interval_ns)
    }
}

/// `(interval_ns, burst_ns)` for a rate in packets per second and a burst in
/// packets. A rate of 0 means unlimited; a burst of 0 is treated as 1.
pub const fn gcra_params(rate_per_sec: u32, burst: u32) -> (u64, u64) {
    if rate_per_sec == 0 {
        return (0, 0);
    }
    let interval = 1_000_000_000 / rate_per_sec as u64;
    let burst = if burst == 0 { 1 } else { burst as u64 };
    (interval, (burst - 1) * interval)
}

/// `(interval_ns, burst_ns)` for a clock that advances every `tick_ns`: the
/// burst tolerance one tick wider (unlimited stays unlimited).
pub const fn with_clock_tick(params: (u64, u64), tick_ns: u64) -> (u64, u64) {
    let (interval, burst) = params;
    if interval == 0 {
        return params;
    }
    (interval, burst + tick_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Like [`offered`], with the clock read advancing only every
    /// `tick_ns` (a coarse clock).
    fn offered_coarse(params: (u64, u64), gap_ns: u64, duration_ns: u64, tick_ns: u64) -> u64 {
        let (interval, tolerance) = params;
        let (mut tat, mut now, mut passed) = (0, 1_000_000_000, 0);
        let end = now + duration_ns;
        while now < end {
            let coarse = now - now % tick_ns;
            if let Some(next) = gcra_admit(tat, coarse, interval, tolerance) {
                tat = next;
                passed += 1;
            }
            now += gap_ns;
        }
        passed
    }

    #[test]
    fn a_coarse_clock_keeps_the_rate_once_the_tolerance_spans_a_tick() {
        // 1000/s, burst 1, offered at 100k/s for 10 s on a 4 ms clock.
        let tick = 4_000_000;
        let params = gcra_params(1000, 1);
        let starved = offered_coarse(params, 10_000, 10_000_000_000, tick);
        assert!(
            (2_400..=2_600).contains(&starved),
            "one per tick without the tick's tolerance: {starved}"
        );
        let passed = offered_coarse(with_clock_tick(params, tick), 10_000, 10_000_000_000, tick);
        // The rate, plus at most one tick's worth (4 packets) more.
        assert!((10_000..=10_005).contains(&passed), "passed {passed}");
        assert_eq!(
            with_clock_tick(gcra_params(0, 5), tick),
            (0, 0),
            "unlimited"
        );
    }

    /// Offers packets every `gap_ns` for `duration_ns`; returns how many pass.
    fn offered(rate: u32, burst: u32, gap_ns: u64, duration_ns: u64) -> u64 {
        let (interval, tolerance) = gcra_params(rate, burst);
        let (mut tat, mut now, mut passed) = (0, 1_000_000_000, 0);
        let end = now + duration_ns;
        while now < end {
            if let Some(next) = gcra_admit(tat, now, interval, tolerance) {
                tat = next;
                passed += 1;
            }
            now += gap_ns;
        }
        passed
    }

    #[test]
    fn burst_passes_back_to_back_then_rate_applies() {
        // 10 packets at the same instant with burst 4: exactly 4 pass.
        let (interval, tolerance) = gcra_params(100, 4);
        let mut tat = 0;
        let passed = (0..10)
            .filter(|_| match gcra_admit(tat, 5_000, interval, tolerance) {
                Some(next) => {
                    tat = next;
                    true
                }
                None => false,
            })
            .count();
        assert_eq!(passed, 4);
    }

    #[test]
    fn long_run_matches_rate_plus_burst() {
        // 1000/s for 10 s offered at 100k/s: 10_000 + burst (100) - 1 at most.
        let passed = offered(1000, 100, 10_000, 10_000_000_000);
        assert!((10_000..=10_100).contains(&passed), "passed {passed}");
    }

    #[test]
    fn under_rate_everything_passes() {
        assert_eq!(offered(1000, 1, 2_000_000, 1_000_000_000), 500);
    }

    #[test]
    fn zero_rate_is_unlimited() {
        assert_eq!(offered(0, 0, 1, 10_000), 10_000);
    }
}
