//! What the daemon's listeners (control socket, metrics, MQTT) share: a
//! bound on open connections, and accept failures that are counted and
//! logged when they begin and end instead of once each.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Counters of one listener.
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub timed_out: AtomicU64,
    pub accept_errors: AtomicU64,
    open: AtomicUsize,
}

impl ListenerStats {
    /// Takes one of `max` connection slots, or counts a refusal. The slot
    /// is given back when the returned guard drops.
    pub fn admit(self: &Arc<Self>, max: usize) -> Option<Slot> {
        // Only the accept loop takes slots, so load-then-add cannot race
        // past the bound; releases only make room.
        if self.open.load(Ordering::Acquire) >= max {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.open.fetch_add(1, Ordering::AcqRel);
        self.accepted.fetch_add(1, Ordering::Relaxed);
        Some(Slot(self.clone()))
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Name, help text and value of each counter, for every renderer.
    pub fn counters(&self) -> [(&'static str, &'static str, u64); 4] {
        let f = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("connections", "Connections accepted.", f(&self.accepted)),
            (
                "refused_connections",
                "Connections closed at once: max_connections were open.",
                f(&self.refused),
            ),
            (
                "timeouts",
                "Connections closed for idling past their timeout.",
                f(&self.timed_out),
            ),
            (
                "accept_errors",
                "Accepts that failed (descriptors exhausted, or out of memory).",
                f(&self.accept_errors),
            ),
        ]
    }
}

/// One open connection's place in its listener's bound.
#[derive(Debug)]
pub struct Slot(Arc<ListenerStats>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Handles accept errors for one listener. EMFILE and ENFILE leave the
/// connection in the kernel's backlog and the listener readable, so the
/// loop must pause, not spin; and a process out of descriptors fails every
/// accept, so the log says when that starts and when it ends.
pub struct AcceptFailures {
    listener: &'static str,
    failing: u64,
}

/// Pause after a failed accept: long enough not to spin, short enough that
/// service resumes soon after descriptors are freed.
const BACKOFF: Duration = Duration::from_millis(50);

impl AcceptFailures {
    pub fn new(listener: &'static str) -> Self {
        AcceptFailures {
            listener,
            failing: 0,
        }
    }

    pub async fn failed(&mut self, err: std::io::Error, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
        if self.failing == 0 {
            tracing::warn!(listener = self.listener, %err, "accept failing; new connections wait in the backlog");
        }
        self.failing += 1;
        tokio::time::sleep(BACKOFF).await;
    }

    pub fn accepted(&mut self) {
        if self.failing > 0 {
            tracing::info!(
                listener = self.listener,
                failed = self.failing,
                "accepting again"
            );
            self.failing = 0;
        }
    }
}

/// Raises the soft limit on open descriptors to the hard limit: every
/// connection and spool segment costs one, and the usual soft limit of
/// 1024 is below what `[mqtt] max_connections` allows.
pub fn raise_descriptor_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read or write `limit`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let previous = limit.rlim_cur;
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                tracing::debug!(
                    from = previous,
                    to = limit.rlim_max,
                    "raised the open descriptor limit"
                );
            }
        }
    }
}
