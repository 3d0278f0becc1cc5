//! The disk spool on a disk that fills up: every message that was stored
//! (its append returned Ok, so its device got 2.04) is replayed after a
//! restart, in order, with sequence numbers never reused, whether it was
//! stored before the disk filled or after space returned; nothing refused
//! is (its device was told 5.03 and sends it again).
//!
//! Privileged: mounts a small tmpfs (root), unmounted when the test ends.

use std::fs;

use bytes::Bytes;
use m2m_router::bridge::Spool;
use m2m_router_tests::disk::SmallDisk;
use m2m_router_tests::require_root;

fn message(i: usize) -> (Bytes, Bytes) {
    // 328-byte records, as in the finding: they straddle tmpfs pages, so
    // the write that meets the full disk is a short one.
    (
        Bytes::from(format!("m2m/meter/{i:06}")),
        Bytes::from(vec![b'0' + (i % 10) as u8; 293]),
    )
}

#[test]
fn a_full_disk_tears_no_record_and_loses_nothing_stored_after_space_returns() {
    require_root();
    let disk = SmallDisk::mount("spool-full", 256 << 10);
    let filler = disk.path().join("filler");
    fs::write(&filler, vec![0u8; 64 << 10]).unwrap();
    let dir = disk.path().join("spool");
    let mut stored = Vec::new();
    let mut next = 0..;
    {
        let spool = Spool::open(&dir, 1 << 30).unwrap();
        let mut append = |stored: &mut Vec<Bytes>| {
            let (topic, payload) = message(next.next().unwrap());
            let result = spool.append(topic.clone(), payload);
            if result.is_ok() {
                stored.push(topic);
            }
            result
        };
        loop {
            if let Err(err) = append(&mut stored) {
                assert_eq!(
                    err.raw_os_error(),
                    Some(libc::ENOSPC),
                    "the disk is full: {err}"
                );
                break;
            }
        }
        assert!(
            stored.len() > 100,
            "only {} stored before ENOSPC",
            stored.len()
        );
        // Refused appends stay refused while the disk is full...
        for _ in 0..5 {
            assert!(append(&mut stored).is_err());
        }
        // ...and succeed again, by themselves, once space returns (the
        // spool tries a disk that failed again after 50 ms).
        fs::remove_file(&filler).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while append(&mut stored).is_err() {
            assert!(std::time::Instant::now() < deadline, "never stored again");
        }
        for _ in 0..100 {
            append(&mut stored).unwrap();
        }
    } // like a kill -9: nothing acknowledged upstream, nothing checkpointed

    let spool = Spool::open(&dir, 1 << 30).unwrap();
    let replayed = spool.pending(0, usize::MAX);
    let topics: Vec<Bytes> = replayed.iter().map(|r| r.topic.clone()).collect();
    assert_eq!(
        topics, stored,
        "every stored message is replayed, in order, and nothing refused (the finding \
         lost those stored after space returned)"
    );
    let seqs: Vec<u64> = replayed.iter().map(|r| r.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "sequence numbers only grow: {seqs:?}"
    );
    // New appends continue after the replayed ones.
    spool.append(message(0).0, message(0).1).unwrap();
    assert!(spool.pending(0, usize::MAX).last().unwrap().seq > *seqs.last().unwrap());
}
