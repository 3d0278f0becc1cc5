//! Disk spool write and replay rates (the upstream bridge's store-and-
//! forward), beside the memory spool in the same run.
//!
//!   cargo build --release && ./target/release/spool-rate [MESSAGES] [DIR]
//!
//! Writers: 1 and 2 threads (group commit shares fdatasync between them).
//! Payload 64 bytes, topic ~20 bytes. DIR defaults to /var/tmp.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use m2m_router::bridge::Spool;

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(20_000, |a| a.parse().unwrap());
    let base = PathBuf::from(args.next().unwrap_or_else(|| "/var/tmp".into()));
    let payload = Bytes::from(vec![b'p'; 64]);
    println!("| spool | writers | messages | write msgs/s | replay msgs/s |");
    println!("|---|---:|---:|---:|---:|");
    for threads in [1usize, 2] {
        let memory = Arc::new(Spool::memory(1 << 30));
        let write = run(&memory, threads, n, &payload);
        println!("| memory | {threads} | {n} | {write:.0} | - |");

        let dir = base.join(format!("m2m-spool-rate-{}-{threads}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let disk = Arc::new(Spool::open(&dir, 1 << 30).unwrap());
        let write = run(&disk, threads, n, &payload);
        drop(disk);
        let start = Instant::now();
        let reopened = Spool::open(&dir, 1 << 30).unwrap();
        let pending = reopened.pending(0, usize::MAX).len();
        let replay = pending as f64 / start.elapsed().as_secs_f64();
        assert_eq!(pending, n, "every message replayed");
        println!(
            "| disk ({}) | {threads} | {n} | {write:.0} | {replay:.0} |",
            base.display()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn run(spool: &Arc<Spool>, threads: usize, n: usize, payload: &Bytes) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let spool = spool.clone();
            s.spawn(move || {
                for i in 0..n / threads {
                    let topic = Bytes::from(format!("load/{t}/{i}"));
                    spool.append(topic, payload.clone()).unwrap();
                }
            });
        }
    });
    n as f64 / start.elapsed().as_secs_f64()
}
