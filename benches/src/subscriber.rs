//! The counting MQTT subscriber: subscribes to `load/#` (MQTT 3.1.1) and,
//! for every PUBLISH whose payload carries the generator's stamp (device,
//! sequence, send time), records the latency and which of the device's
//! messages arrived, so loss and duplicates are known per device.
//!
//! By default it is a clean session at QoS 0 on one connection (the e2e
//! runs). With [`Options::persistent_id`] it is a persistent session at
//! QoS 1 that acknowledges every message and reconnects whenever the broker
//! goes away: the broker keeps its messages meanwhile (MQTT 3.1.1 §3.1.2.4),
//! so a broker restarted under load (the soak) loses nothing for it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::load::{monotonic_ns, STAMP_LEN};

#[derive(Debug, Default)]
pub struct Received {
    /// Messages received, duplicates included.
    pub count: u64,
    /// One entry per message, in nanoseconds; sorted by `finish`. Empty
    /// when the latencies went to [`Options::window`].
    pub latencies_ns: Vec<u64>,
    /// Messages whose sequence number was not above the device's last one.
    pub out_of_order: u64,
    /// Messages received again (QoS 1 is at least once).
    pub duplicates: u64,
    /// Distinct messages received from each device.
    pub per_device: Vec<u32>,
}

impl Received {
    /// Latency percentile `p` (0..1) in microseconds.
    pub fn percentile_us(&self, p: f64) -> f64 {
        percentile_us(&self.latencies_ns, p)
    }

    /// How many devices lost at least one message, given what each sent.
    pub fn lossy_devices(&self, sent: &[u32]) -> usize {
        sent.iter()
            .enumerate()
            .filter(|&(i, &s)| self.per_device.get(i).copied().unwrap_or(0) < s)
            .count()
    }
}

/// Percentile `p` (0..1) of sorted nanoseconds, in microseconds.
pub fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return f64::NAN;
    }
    sorted_ns[((sorted_ns.len() - 1) as f64 * p) as usize] as f64 / 1000.0
}

/// Latencies shared with whoever samples them while the subscriber runs.
pub type Window = Arc<Mutex<Vec<u64>>>;

#[derive(Clone, Debug, Default)]
pub struct Options {
    /// A persistent QoS 1 session under this client id, reconnecting after
    /// the broker goes away.
    pub persistent_id: Option<String>,
    /// Latencies go here instead of into `Received::latencies_ns`.
    pub window: Option<Window>,
}

/// Connects to `addr`, subscribes, and counts on a thread until `stop` is
/// set and the connection has been quiet for half a second.
pub fn subscribe(
    addr: SocketAddr,
    devices: usize,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<Received>> {
    subscribe_with(addr, devices, stop, Options::default())
}

/// [`subscribe`] with `options`. The first connection is made before this
/// returns (so nothing published afterwards is missed); reconnections, if
/// any, happen on the thread.
pub fn subscribe_with(
    addr: SocketAddr,
    devices: usize,
    stop: Arc<AtomicBool>,
    options: Options,
) -> std::io::Result<std::thread::JoinHandle<Received>> {
    let mut s = connect(addr, options.persistent_id.as_deref())?;
    Ok(std::thread::spawn(move || {
        let mut got = Received {
            per_device: vec![0; devices],
            ..Received::default()
        };
        if options.window.is_none() {
            got.latencies_ns.reserve(1 << 22);
        }
        let mut seen: Vec<Vec<u64>> = vec![Vec::new(); devices];
        let mut last_seq = vec![0u32; devices];
        let mut buf = vec![0u8; 1 << 20];
        let mut filled = 0;
        let mut latencies = Vec::new();
        let mut acks = Vec::new();
        loop {
            match s.read(&mut buf[filled..]) {
                Ok(n) if n > 0 => filled += n,
                Err(e) if is_timeout(&e) => {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    continue;
                }
                // The broker went away (or closed the connection).
                _ => match &options.persistent_id {
                    Some(id) => match reconnect(addr, id, &stop) {
                        Some(again) => {
                            s = again;
                            // A partial frame is not acknowledged, so the
                            // broker sends it again.
                            filled = 0;
                            continue;
                        }
                        None => break,
                    },
                    None => break,
                },
            }
            let now = monotonic_ns();
            let mut at = 0;
            while let Some((header, body, next)) = frame(&buf[at..filled]) {
                if header >> 4 == 3 {
                    let qos = (header >> 1) & 3;
                    if let Some(stamp) = publish_payload(body, qos, &mut acks) {
                        let mark = Mark {
                            seen: &mut seen,
                            last_seq: &mut last_seq,
                        };
                        if let Some(latency) = count(&mut got, mark, stamp, now) {
                            latencies.push(latency);
                        }
                    }
                }
                at += next;
            }
            if !acks.is_empty() {
                // A lost PUBACK only means a duplicate later.
                let _ = s.write_all(&acks);
                acks.clear();
            }
            match &options.window {
                Some(window) => window.lock().unwrap().append(&mut latencies),
                None => got.latencies_ns.append(&mut latencies),
            }
            buf.copy_within(at..filled, 0);
            filled -= at;
            if filled == buf.len() {
                buf.resize(buf.len() * 2, 0); // one frame larger than the buffer
            }
        }
        got.latencies_ns.sort_unstable();
        got
    }))
}

pub fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// CONNECT and SUBSCRIBE to `load/#`: a clean session at QoS 0 named
/// "load", or the persistent session `id` at QoS 1.
fn connect(addr: SocketAddr, persistent_id: Option<&str>) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let packets = match persistent_id {
        Some(id) => hello(id, false, "load/#", 1),
        None => hello("load", true, "load/#", 0),
    };
    s.write_all(&packets)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    Ok(s)
}

/// CONNECT (MQTT 3.1.1, keep-alive 0: never pinged) and SUBSCRIBE (packet
/// id 1) to `filter` at `qos`, to send in one write.
pub fn hello(id: &str, clean: bool, filter: &str, qos: u8) -> Vec<u8> {
    assert!(
        id.len() < 100 && filter.len() < 100,
        "one-byte remaining lengths"
    );
    // Clean session is flag bit 1 (MQTT 3.1.1 §3.1.2.4).
    let flags = if clean { 2 } else { 0 };
    let mut p = vec![0x10, 12 + id.len() as u8, 0, 4, b'M', b'Q', b'T', b'T', 4];
    p.extend_from_slice(&[flags, 0, 0, 0, id.len() as u8]);
    p.extend_from_slice(id.as_bytes());
    p.extend_from_slice(&[0x82, 5 + filter.len() as u8, 0, 1, 0, filter.len() as u8]);
    p.extend_from_slice(filter.as_bytes());
    p.push(qos);
    p
}

/// Connects again every 100 ms until it works or `stop` is set.
fn reconnect(addr: SocketAddr, id: &str, stop: &AtomicBool) -> Option<TcpStream> {
    while !stop.load(Ordering::Relaxed) {
        if let Ok(s) = connect(addr, Some(id)) {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// The first whole MQTT frame of `b`: fixed header byte, body, bytes used.
pub fn frame(b: &[u8]) -> Option<(u8, &[u8], usize)> {
    let mut len = 0usize;
    for i in 0..4 {
        let byte = *b.get(1 + i)?;
        len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let start = 2 + i;
            let body = b.get(start..start + len)?;
            return Some((b[0], body, start + len));
        }
    }
    None
}

/// The stamp at the start of a PUBLISH body's payload; queues the PUBACK
/// a QoS 1 message needs (MQTT 3.1.1 §3.3.2.2, §3.4).
pub fn publish_payload<'a>(publish: &'a [u8], qos: u8, acks: &mut Vec<u8>) -> Option<&'a [u8]> {
    let topic_len = usize::from(u16::from_be_bytes([*publish.first()?, *publish.get(1)?]));
    let mut at = 2 + topic_len;
    if qos > 0 {
        let id = publish.get(at..at + 2)?;
        acks.extend_from_slice(&[0x40, 2, id[0], id[1]]);
        at += 2;
    }
    publish.get(at..at + STAMP_LEN)
}

/// What the subscriber remembers per device.
struct Mark<'a> {
    /// A bit per sequence number received.
    seen: &'a mut [Vec<u64>],
    last_seq: &'a mut [u32],
}

/// Counts one stamped message; its latency, unless the stamp is foreign.
fn count(got: &mut Received, mark: Mark, stamp: &[u8], now: u64) -> Option<u64> {
    let device = u32::from_be_bytes(stamp[0..4].try_into().unwrap()) as usize;
    let seq = u32::from_be_bytes(stamp[4..8].try_into().unwrap());
    let sent = u64::from_be_bytes(stamp[8..16].try_into().unwrap());
    let last = mark.last_seq.get_mut(device)?;
    if seq <= *last {
        got.out_of_order += 1;
    }
    *last = seq;
    got.count += 1;
    let bits = &mut mark.seen[device];
    let (word, bit) = (seq as usize / 64, 1u64 << (seq % 64));
    if bits.len() <= word {
        bits.resize(word + 1, 0);
    }
    if bits[word] & bit != 0 {
        got.duplicates += 1;
    } else {
        bits[word] |= bit;
        got.per_device[device] += 1;
    }
    Some(now.saturating_sub(sent))
}
