//! Prometheus text exposition (format 0.0.4) on `[metrics] listen`, path
//! `/metrics`. Per-peer series are bounded: the busiest `peer_series` peers.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::coap::downlink::DownlinkStats;
use crate::coap::dtls::DtlsStats;
use crate::coap::uplink::UplinkStats;
use crate::control::Control;
use crate::listener::{AcceptFailures, ListenerStats};

/// Scrapes served at once; a scraper needs one.
const MAX_SCRAPES: usize = 16;
/// A scrape that has not sent its request head and taken its response in
/// this long is dropped.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(listener: TcpListener, control: Arc<Mutex<Control>>, stats: Arc<ListenerStats>) {
    let mut failures = AcceptFailures::new("metrics");
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                failures.accepted();
                let Some(slot) = stats.admit(MAX_SCRAPES) else {
                    continue;
                };
                let control = control.clone();
                let stats = stats.clone();
                tokio::spawn(async move {
                    if tokio::time::timeout(SCRAPE_TIMEOUT, answer(stream, control))
                        .await
                        .is_err()
                    {
                        stats.timed_out.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(slot);
                });
            }
            Err(err) => failures.failed(err, &stats.accept_errors).await,
        }
    }
}

async fn answer(mut stream: TcpStream, control: Arc<Mutex<Control>>) {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    // The request head only; scrapers send nothing else.
    let read = async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        true
    }
    .await;
    if !read {
        return;
    }
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let (status, body) = match (method, path) {
        (Some(b"GET"), Some(p)) if p == b"/metrics" || p.starts_with(b"/metrics?") => {
            ("200 OK", render(&control.lock().unwrap()))
        }
        (Some(b"GET"), _) => ("404 Not Found", "only /metrics is served here\n".to_owned()),
        _ => ("405 Method Not Allowed", "GET /metrics\n".to_owned()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
}

/// Escapes a label value (exposition format: backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

pub fn render(c: &Control) -> String {
    let mut out = String::with_capacity(8192);
    family(
        &mut out,
        "m2m_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
    );
    let _ = writeln!(out, "m2m_uptime_seconds {}", c.started.elapsed().as_secs());

    if let Some(fp) = &c.running.fastpath {
        if let Ok(verdicts) = fp.verdicts() {
            family(
                &mut out,
                "m2m_xdp_packets_total",
                "counter",
                "Packets seen by the XDP program, by verdict reason.",
            );
            for (reason, counter) in verdicts.values() {
                let action = format!("{:?}", reason.action()).to_lowercase();
                let _ = writeln!(
                    out,
                    "m2m_xdp_packets_total{{reason=\"{}\",action=\"{action}\"}} {}",
                    reason.label(),
                    counter.packets
                );
            }
            family(
                &mut out,
                "m2m_xdp_bytes_total",
                "counter",
                "Bytes seen by the XDP program, by verdict reason.",
            );
            for (reason, counter) in verdicts.values() {
                let action = format!("{:?}", reason.action()).to_lowercase();
                let _ = writeln!(
                    out,
                    "m2m_xdp_bytes_total{{reason=\"{}\",action=\"{action}\"}} {}",
                    reason.label(),
                    counter.bytes
                );
            }
        }
        let tables = fp.tables();
        let mut peers: Vec<(String, router_common::PeerCounters)> = (0..tables.peer_names.len()
            as u32)
            .filter(|&id| id == 0 || !tables.peer_names[id as usize].is_empty())
            .filter_map(|id| {
                fp.peer_counters(id)
                    .ok()
                    .map(|c| (tables.peer_name(id).to_owned(), c))
            })
            .collect();
        peers.sort_by_key(|(_, c)| std::cmp::Reverse(c.accepted.packets + c.dropped.packets));
        peers.truncate(c.config.metrics_peer_series);
        family(
            &mut out,
            "m2m_peer_packets_total",
            "counter",
            "Well-formed CoAP packets per peer and policy verdict (the busiest peers only).",
        );
        for (name, pc) in &peers {
            let n = label(name);
            let _ = writeln!(
                out,
                "m2m_peer_packets_total{{peer=\"{n}\",verdict=\"accepted\"}} {}",
                pc.accepted.packets
            );
            let _ = writeln!(
                out,
                "m2m_peer_packets_total{{peer=\"{n}\",verdict=\"dropped\"}} {}",
                pc.dropped.packets
            );
        }
        family(
            &mut out,
            "m2m_peer_bytes_total",
            "counter",
            "Bytes of well-formed CoAP per peer and policy verdict (the busiest peers only).",
        );
        for (name, pc) in &peers {
            let n = label(name);
            let _ = writeln!(
                out,
                "m2m_peer_bytes_total{{peer=\"{n}\",verdict=\"accepted\"}} {}",
                pc.accepted.bytes
            );
            let _ = writeln!(
                out,
                "m2m_peer_bytes_total{{peer=\"{n}\",verdict=\"dropped\"}} {}",
                pc.dropped.bytes
            );
        }
    }

    let uplink_help = |name: &str| match name {
        "duplicates" => {
            "Retransmitted CoAP messages answered from the duplicate cache (dedup hits)."
        }
        "dedup_evictions" => {
            "Duplicate-cache entries evicted before their exchange lifetime ended."
        }
        "assemblies" => "Block1 bodies being assembled.",
        "assembly_bytes" => "Memory of the Block1 bodies being assembled (max_assembly_bytes).",
        _ => "CoAP uplink counter.",
    };
    let downlink_help = |name: &str| match name {
        "waiting" => "Commands waiting behind a peer's outstanding request.",
        "observers" => "Observe relations of devices observing topics.",
        "watching" => "Observe relations of the gateway observing devices.",
        _ => "CoAP downlink (commands and Observe notifications) counter.",
    };
    let dtls_help = |name: &str| match name {
        "hello_verify" => "HelloVerifyRequests sent: ClientHellos without a valid cookie.",
        "handshakes" => "DTLS handshakes completed.",
        "handshake_failures" => "DTLS handshakes ended by an alert or a protocol error.",
        "unknown_identity" => {
            "DTLS handshakes with credentials no peer has (PSK identity, certificate names)."
        }
        "handshake_timeouts" => "DTLS handshakes unfinished at dtls.handshake_timeout_s.",
        "evicted" => "DTLS sessions closed to stay within dtls.max_sessions / max_handshakes.",
        "sessions" => "DTLS sessions established.",
        "handshaking" => "DTLS handshakes under way.",
        "downlink_sent" => {
            "Downlink messages (commands, notifications, watches) sent over a DTLS session."
        }
        "downlink_no_session" => {
            "Downlink messages for a DTLS device whose session is gone (not sent)."
        }
        "outbox_dropped" => "Downlink messages dropped with the CoAPS worker's queue full.",
        n if n.starts_with("alert_sent_") => {
            "Fatal DTLS alerts sent, by description (RFC 5246 section 7.2)."
        }
        n if n.starts_with("alert_received_") => {
            "Fatal DTLS alerts received, by description (RFC 5246 section 7.2)."
        }
        _ => "CoAP over DTLS counter.",
    };
    let process_help = |name: &str| match name {
        "rss_bytes" => "Resident set of the daemon.",
        "heap_in_use_bytes" => "C allocator heap in use (mallinfo2 uordblks + hblkhd).",
        _ => "C allocator heap held free in its arenas (mallinfo2 fordblks).",
    };
    for (section, snapshot, gauges, help) in [
        (
            "coap",
            c.running.uplink.snapshot(),
            UplinkStats::GAUGES,
            &uplink_help as &dyn Fn(&str) -> &'static str,
        ),
        (
            "downlink",
            c.running.downlink.snapshot(),
            DownlinkStats::GAUGES,
            &downlink_help,
        ),
        (
            "dtls",
            c.running.dtls.snapshot(),
            DtlsStats::GAUGES,
            &dtls_help,
        ),
        (
            "process",
            crate::process::snapshot(),
            crate::process::GAUGES,
            &process_help,
        ),
    ] {
        for (name, value) in snapshot {
            let (metric, kind) = if gauges.contains(&name) {
                (format!("m2m_{section}_{name}"), "gauge")
            } else {
                (format!("m2m_{section}_{name}_total"), "counter")
            };
            family(&mut out, &metric, kind, help(name));
            let _ = writeln!(out, "{metric} {value}");
        }
    }

    for (name, help, value) in c.running.broker.stats.counters() {
        let metric = format!("m2m_mqtt_{name}_total");
        family(&mut out, &metric, "counter", help);
        let _ = writeln!(out, "{metric} {value}");
    }
    for (prefix, listener) in [
        ("m2m_control", &c.running.control_socket),
        ("m2m_metrics_http", &c.running.metrics_http),
    ] {
        for (name, help, value) in listener.counters() {
            let metric = format!("{prefix}_{name}_total");
            family(&mut out, &metric, "counter", help);
            let _ = writeln!(out, "{metric} {value}");
        }
        let metric = format!("{prefix}_open_connections");
        family(&mut out, &metric, "gauge", "Connections open now.");
        let _ = writeln!(out, "{metric} {}", listener.open());
    }
    for (name, help, value) in c.running.broker.gauges() {
        let metric = format!("m2m_mqtt_{name}");
        family(&mut out, &metric, "gauge", help);
        let _ = writeln!(out, "{metric} {value}");
    }
    let bridges = &c.running.bridges;
    for (name, kind, help) in [
        (
            "m2m_spool_messages",
            "gauge",
            "Messages waiting in an upstream bridge's spool.",
        ),
        (
            "m2m_spool_bytes",
            "gauge",
            "Bytes waiting in an upstream bridge's spool.",
        ),
        (
            "m2m_spool_evicted_total",
            "counter",
            "Messages evicted from a full spool, oldest first.",
        ),
        (
            "m2m_spool_sync_failures_total",
            "counter",
            "Spool syncs that failed (their messages were refused: 5.03).",
        ),
        (
            "m2m_upstream_acked_total",
            "counter",
            "Messages the upstream broker acknowledged.",
        ),
        (
            "m2m_upstream_connected",
            "gauge",
            "1 while the bridge is connected to its upstream.",
        ),
    ] {
        family(&mut out, name, kind, help);
        for b in bridges {
            let s = &b.spool.stats;
            let value = match name {
                "m2m_spool_messages" => s.records.load(Ordering::Relaxed),
                "m2m_spool_bytes" => s.bytes.load(Ordering::Relaxed),
                "m2m_spool_evicted_total" => s.evicted.load(Ordering::Relaxed),
                "m2m_spool_sync_failures_total" => s.sync_failures.load(Ordering::Relaxed),
                "m2m_upstream_acked_total" => s.acked.load(Ordering::Relaxed),
                _ => u64::from(b.connected.load(Ordering::Relaxed)),
            };
            let _ = writeln!(out, "{name}{{upstream=\"{}\"}} {value}", label(&b.name));
        }
    }
    let mut sessions = c.running.broker.session_stats();
    family(
        &mut out,
        "m2m_mqtt_sessions",
        "gauge",
        "MQTT sessions (connected or persistent).",
    );
    let _ = writeln!(out, "m2m_mqtt_sessions {}", sessions.len());
    sessions.sort_by_key(|(_, queued, _)| std::cmp::Reverse(*queued));
    sessions.truncate(c.config.metrics_peer_series);
    family(
        &mut out,
        "m2m_mqtt_session_queue_depth",
        "gauge",
        "Messages waiting in a session's queue (the deepest queues only).",
    );
    for (client, queued, _) in &sessions {
        let _ = writeln!(
            out,
            "m2m_mqtt_session_queue_depth{{client=\"{}\"}} {queued}",
            label(client)
        );
    }
    out
}
