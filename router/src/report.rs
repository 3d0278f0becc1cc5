//! Human-readable counter reports (printed on SIGUSR1 and at shutdown until
//! the control socket's `stats` command exists).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use router_common::maps::UNKNOWN_PEER_ID;

use crate::daemon::Running;
use crate::fastpath::{Fastpath, FastpathError};

pub fn render(running: &Running) -> Result<String, FastpathError> {
    let mut out = match &running.fastpath {
        Some(fastpath) => fastpath_stats(fastpath)?,
        None => String::from("fast path off: no verdict counters\n"),
    };
    out.push_str("coap uplink:\n");
    for (name, value) in running.uplink.snapshot() {
        let _ = writeln!(out, "  {name:<22} {value:>12}");
    }
    out.push_str("coaps (dtls):\n");
    for (name, value) in running.dtls.snapshot() {
        let _ = writeln!(out, "  {name:<22} {value:>12}");
    }
    out.push_str("coap downlink:\n");
    for (name, value) in running.downlink.snapshot() {
        let _ = writeln!(out, "  {name:<22} {value:>12}");
    }
    for (title, listener) in [
        ("control socket", &running.control_socket),
        ("metrics endpoint", &running.metrics_http),
    ] {
        let _ = writeln!(out, "{title}:");
        for (name, _, value) in listener.counters() {
            let _ = writeln!(out, "  {name:<22} {value:>12}");
        }
    }
    out.push_str("mqtt broker:\n");
    for (name, _, value) in running.broker.stats.counters() {
        let _ = writeln!(out, "  {name:<22} {value:>12}");
    }
    for bridge in &running.bridges {
        let s = &bridge.spool.stats;
        let _ = writeln!(
            out,
            "  upstream {:<20} connected {} spooled {} ({} bytes) sent {} acked {} evicted {}",
            bridge.name,
            bridge.connected.load(Ordering::Relaxed),
            s.records.load(Ordering::Relaxed),
            s.bytes.load(Ordering::Relaxed),
            bridge.sent.load(Ordering::Relaxed),
            s.acked.load(Ordering::Relaxed),
            s.evicted.load(Ordering::Relaxed),
        );
    }
    for (client, queued, dropped) in running.broker.session_stats() {
        let _ = writeln!(
            out,
            "  session {client:<30} queued {queued:>8} dropped {dropped:>10}"
        );
    }
    Ok(out)
}

/// The verdict counters (nonzero only) and each peer's policy counters.
pub fn fastpath_stats(fastpath: &Fastpath) -> Result<String, FastpathError> {
    let mut out = String::from("fast path verdicts:\n");
    let mut any = false;
    for (reason, counter) in fastpath.verdicts()?.values() {
        if counter.packets > 0 {
            any = true;
            let _ = writeln!(
                out,
                "  {:<22} {:>12} packets {:>14} bytes",
                reason.label(),
                counter.packets,
                counter.bytes
            );
        }
    }
    if !any {
        out.push_str("  (no packets seen yet)\n");
    }
    out.push_str("peers (well-formed CoAP):\n");
    let tables = fastpath.tables();
    for peer_id in 0..tables.peer_names.len() as u32 {
        let c = fastpath.peer_counters(peer_id)?;
        if peer_id != UNKNOWN_PEER_ID || c.accepted.packets + c.dropped.packets > 0 {
            let _ = writeln!(
                out,
                "  {:<22} accepted {:>10} packets {:>12} bytes   dropped {:>10} packets {:>12} bytes",
                tables.peer_name(peer_id),
                c.accepted.packets,
                c.accepted.bytes,
                c.dropped.packets,
                c.dropped.bytes
            );
        }
    }
    Ok(out)
}
