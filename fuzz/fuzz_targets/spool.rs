//! A spool directory whose segment holds arbitrary bytes (a torn write, a
//! flipped bit, another program's file): opening it never panics, replay
//! yields only records that were whole and in sequence, and appending goes
//! on after them.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use m2m_router::bridge::Spool;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("m2m-fuzz-spool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{:020}.seg", 1)), data).unwrap();
    if let Ok(spool) = Spool::open(&dir, 1 << 20) {
        let replayed = spool.pending(0, usize::MAX);
        for pair in replayed.windows(2) {
            assert!(pair[0].seq < pair[1].seq, "replay out of order");
        }
        let last = replayed.last().map_or(0, |r| r.seq);
        spool
            .append(Bytes::from_static(b"t"), Bytes::from_static(b"p"))
            .unwrap();
        let after = spool.pending(last, usize::MAX);
        assert_eq!(after.len(), 1, "the new record follows the replayed ones");
        assert!(after[0].seq > last);
        drop(spool);
        // And it survives a reopen, behind everything replayed before.
        let reopened = Spool::open(&dir, 1 << 20).unwrap();
        let again = reopened.pending(0, usize::MAX);
        assert_eq!(again.len(), replayed.len() + 1);
    }
    let _ = std::fs::remove_dir_all(&dir);
});
