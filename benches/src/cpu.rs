//! CPU time from /proc (proc(5)), in seconds.
//!
//! This kernel accounts CPU time by ticks (CONFIG_TICK_CPU_ACCOUNTING,
//! no IRQ_TIME_ACCOUNTING): softirq work is charged to whichever task was
//! running when it ran. On a veth the receive path of a datagram (XDP, IP,
//! UDP enqueue) often runs in the sender's softirq, so "machine minus
//! generator" leaves some kernel receive work out, the same for every
//! system measured.
//!
//! The machine's busy time is taken as wall time x CPUs minus idle, iowait
//! and steal: with NO_HZ the idle counters come from the precise idle
//! clock, while the busy fields of /proc/stat are tick samples, too coarse
//! beside the processes' own times (scaled to the scheduler's nanosecond
//! runtime) for a difference of the two to mean anything.

/// A snapshot of the counters a run is measured by.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// All CPUs' busy time (not idle, iowait or steal: time the hypervisor
    /// gave to others is not ours).
    pub machine_busy: f64,
    pub softirq: f64,
    /// This process (the generator and subscriber threads).
    pub harness: f64,
    /// The system under test's main process.
    pub system: f64,
}

impl Sample {
    pub fn take(system_pid: u32) -> Sample {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        let field = |i: usize| ticks.get(i).copied().unwrap_or(0) as f64 / clock_ticks();
        // SAFETY: sysconf has no preconditions.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } as f64;
        let wall = crate::load::monotonic_ns() as f64 / 1e9;
        Sample {
            // user nice system idle iowait irq softirq steal
            machine_busy: wall * cpus - field(3) - field(4) - field(7),
            softirq: field(6),
            harness: process_seconds(std::process::id()),
            system: process_seconds(system_pid),
        }
    }

    /// What happened between `before` and this sample.
    pub fn since(&self, before: &Sample) -> Sample {
        Sample {
            machine_busy: self.machine_busy - before.machine_busy,
            softirq: self.softirq - before.softirq,
            harness: self.harness - before.harness,
            system: self.system - before.system,
        }
    }

    /// Busy CPU of the machine that the harness did not spend itself.
    pub fn machine_minus_harness(&self) -> f64 {
        (self.machine_busy - self.harness).max(0.0)
    }
}

/// utime + stime of `pid` (all its threads), in seconds.
pub fn process_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces: fields count from after its ')'.
    let after_comm = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / clock_ticks()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}
