//! Any frame through the reference classifier (the model the XDP program is
//! checked against): no panic, and a peer named only when the frame came
//! from one.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use m2m_router::config::Config;
use m2m_router::fastpath::PolicyTables;
use router_common::classify::classify;
use router_common::reason::Reason;

fn tables() -> &'static PolicyTables {
    static TABLES: OnceLock<PolicyTables> = OnceLock::new();
    TABLES.get_or_init(|| {
        PolicyTables::from_config(&Config::parse(m2m_router_fuzz::POLICY).unwrap()).unwrap()
    })
}

fuzz_target!(|frame: &[u8]| {
    let tables = tables();
    let verdict = classify(frame, tables, |_, _| true);
    if let Some(peer) = verdict.peer_id {
        assert!((peer as usize) < tables.peer_names.len());
        assert!(
            matches!(
                verdict.reason,
                Reason::Accept
                    | Reason::DropDenied
                    | Reason::DropUnknownPeer
                    | Reason::DropRequiresDtls
            ),
            "{verdict:?} names a peer"
        );
    }
});
