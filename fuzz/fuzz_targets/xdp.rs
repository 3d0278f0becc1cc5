//! The differential test as a fuzz target: every frame the fuzzer makes
//! goes through the XDP program (BPF_PROG_TEST_RUN) and the reference
//! classifier, and both must give the same action, reason and peer.
//! Needs root (it loads the program; nothing is attached anywhere).

#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use m2m_router::config::Config;
use m2m_router::fastpath::{Fastpath, PolicyTables};
use m2m_router_tests::verdict::Observer;
use router_common::classify::classify;

struct Kernel {
    fastpath: Fastpath,
    tables: PolicyTables,
    observer: Observer,
}

fn kernel() -> &'static Mutex<Kernel> {
    static KERNEL: OnceLock<Mutex<Kernel>> = OnceLock::new();
    KERNEL.get_or_init(|| {
        let config = Config::parse(m2m_router_fuzz::POLICY).unwrap();
        let tables = PolicyTables::from_config(&config).unwrap();
        let fastpath = Fastpath::load(tables.clone())
            .expect("load the XDP program (the xdp target needs root)");
        let observer = Observer::new(&fastpath, tables.peer_names.len() as u32);
        Mutex::new(Kernel {
            fastpath,
            tables,
            observer,
        })
    })
}

fuzz_target!(|frame: &[u8]| {
    // BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header
    // (EINVAL); no NIC delivers one.
    if frame.len() < 14 {
        return;
    }
    let mut guard = kernel().lock().unwrap();
    let Kernel {
        fastpath,
        tables,
        observer,
    } = &mut *guard;
    let expected = classify(frame, &*tables, |_, _| true);
    if let Err(mismatch) = observer.check(fastpath, frame, &expected) {
        panic!("the kernel and the reference disagree: {mismatch}");
    }
});
