//! The disk spool on a disk that fills up: every message that was stored
//! (its append returned Ok, so its device got 2.04) is replayed after a
//! restart, in order, with sequence numbers never reused, whether it was
//! stored before the disk filled or after space returned.
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
    {
        let spool = Spool::open(&dir, 1 << 30).unwrap();
        let mut i = 0;
        loop {
            let (topic, payload) = message(i);
            match spool.append(topic.clone(), payload) {
                Ok(()) => stored.push(topic),
                Err(err) => {
                    assert_eq!(
                        err.raw_os_error(),
                        Some(libc::ENOSPC),
                        "the disk is full: {err}"
                    );
                    break;
                }
            }
            i += 1;
        }
        assert!(
            stored.len() > 100,
            "only {} stored before ENOSPC",
            stored.len()
        );
        // Refused appends stay refused while the disk is full...
        for _ in 0..5 {
            i += 1;
            assert!(spool.append(message(i).0, message(i).1).is_err());
        }
        // ...and succeed again, by themselves, once space returns.
        fs::remove_file(&filler).unwrap();
        for _ in 0..100 {
            i += 1;
            let (topic, payload) = message(i);
            spool.append(topic.clone(), payload).unwrap();
            stored.push(topic);
        }
    } // like a kill -9: nothing acknowledged upstream, nothing checkpointed

    let spool = Spool::open(&dir, 1 << 30).unwrap();
    let replayed = spool.pending(0, usize::MAX);
    let topics: Vec<Bytes> = replayed.iter().map(|r| r.topic.clone()).collect();
    assert_eq!(
        topics.len(),
        stored.len(),
        "every stored message is replayed (the finding lost those stored after space returned)"
    );
    assert_eq!(topics, stored, "in the order they were stored");
    let seqs: Vec<u64> = replayed.iter().map(|r| r.seq).collect();
    assert_eq!(
        seqs,
        (1..=stored.len() as u64).collect::<Vec<_>>(),
        "sequence numbers are contiguous and never reused"
    );
    // New appends continue after the replayed ones.
    spool.append(message(0).0, message(0).1).unwrap();
    assert_eq!(
        spool.pending(0, usize::MAX).last().unwrap().seq,
        stored.len() as u64 + 1
    );
}
