//! The daemon's own memory, as `ctl stats` and /metrics show it: the
//! resident set (/proc/self/statm, proc(5)) and the C allocator's heap in
//! use and held free (glibc's mallinfo2(3), over all arenas). A resident
//! set that grows while the heap in use stays flat is the allocator keeping
//! freed memory (fragmentation, arenas per thread), not a leak.

/// Every figure here is a gauge.
pub const GAUGES: &[&str] = &["rss_bytes", "heap_in_use_bytes", "heap_free_bytes"];

/// The figures by name (bytes).
pub fn snapshot() -> Vec<(&'static str, u64)> {
    let (in_use, free) = heap();
    vec![
        ("rss_bytes", rss()),
        ("heap_in_use_bytes", in_use),
        ("heap_free_bytes", free),
    ]
}

fn rss() -> u64 {
    // statm: size resident shared ... in pages.
    let pages: u64 = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(0) as u64
}

/// How often [`release_free_memory`] runs.
pub const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Hands the pages the allocator holds free back to the kernel. glibc
/// keeps freed memory in its arenas (one per thread that allocated, up to
/// 8 per CPU) and returns only what sits at the top of the main heap; a
/// daemon whose clients come and go otherwise sees its resident set creep
/// up to the largest working set each arena once had (the soak showed it:
/// heap in use flat, RSS +6 MiB in 15 minutes, all of it held free).
/// malloc_trim(3) also releases free pages inside every arena (madvise
/// DONTNEED). Runs off the event loop: it takes each arena's lock in turn.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bytes allocated (small chunks and mmapped ones) and bytes free in the
/// arenas.
#[cfg(target_env = "gnu")]
fn heap() -> (u64, u64) {
    // SAFETY: mallinfo2 has no preconditions; it takes each arena's lock
    // while it walks it.
    let m = unsafe { libc::mallinfo2() };
    ((m.uordblks + m.hblkhd) as u64, m.fordblks as u64)
}

#[cfg(not(target_env = "gnu"))]
fn heap() -> (u64, u64) {
    (0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(name: &str) -> u64 {
        snapshot().into_iter().find(|(n, _)| *n == name).unwrap().1
    }

    #[test]
    fn the_heap_in_use_follows_an_allocation() {
        let before = get("heap_in_use_bytes");
        // 64 MiB: far more than the other tests running beside this one
        // allocate or free meanwhile.
        let block = vec![1u8; 64 << 20];
        let during = get("heap_in_use_bytes");
        assert!(during >= before + (60 << 20), "{before} -> {during}");
        assert!(get("rss_bytes") >= 64 << 20, "touched pages are resident");
        drop(block);
        assert!(get("heap_in_use_bytes") < during - (60 << 20));
    }
}
