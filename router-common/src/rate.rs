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

#[cfg(test)]
mod tests {
    use super::*;

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
