//! The counting MQTT subscriber: subscribes to `load/#` (MQTT 3.1.1, QoS 0)
//! and, for every PUBLISH whose payload carries the generator's stamp
//! (device, sequence, send time), records the latency and the device's
//! count, so loss is known per device.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::load::{monotonic_ns, STAMP_LEN};

#[derive(Debug, Default)]
pub struct Received {
    pub count: u64,
    /// One entry per message, in nanoseconds; sorted by `finish`.
    pub latencies_ns: Vec<u64>,
    /// Messages whose sequence number was not above the device's last one.
    pub out_of_order: u64,
    pub per_device: Vec<u32>,
}

impl Received {
    /// Latency percentile `p` (0..1) in microseconds.
    pub fn percentile_us(&self, p: f64) -> f64 {
        let sorted = &self.latencies_ns;
        if sorted.is_empty() {
            return f64::NAN;
        }
        sorted[((sorted.len() - 1) as f64 * p) as usize] as f64 / 1000.0
    }

    /// How many devices lost at least one message, given what each sent.
    pub fn lossy_devices(&self, sent: &[u32]) -> usize {
        sent.iter()
            .enumerate()
            .filter(|&(i, &s)| self.per_device.get(i).copied().unwrap_or(0) < s)
            .count()
    }
}

/// Connects to `addr`, subscribes, and counts on a thread until `stop` is
/// set and the connection has been quiet for half a second.
pub fn subscribe(
    addr: SocketAddr,
    devices: usize,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<Received>> {
    let mut s = TcpStream::connect(addr)?;
    // CONNECT: protocol "MQTT" level 4, clean session, keep-alive 0, client "load".
    s.write_all(&[
        0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 0, 0, 4, b'l', b'o', b'a', b'd',
    ])?;
    // SUBSCRIBE packet id 1 to "load/#" at QoS 0.
    s.write_all(&[0x82, 11, 0, 1, 0, 6, b'l', b'o', b'a', b'd', b'/', b'#', 0])?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    Ok(std::thread::spawn(move || {
        let mut got = Received {
            latencies_ns: Vec::with_capacity(1 << 22),
            per_device: vec![0; devices],
            ..Received::default()
        };
        let mut last_seq = vec![0u32; devices];
        let mut buf = vec![0u8; 1 << 20];
        let mut filled = 0;
        loop {
            match s.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(_) if stop.load(Ordering::Relaxed) => break,
                Err(_) => continue,
            }
            let now = monotonic_ns();
            let mut at = 0;
            while let Some((kind, body, next)) = frame(&buf[at..filled]) {
                if kind == 3 {
                    count(&mut got, &mut last_seq, body, now);
                }
                at += next;
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

/// The first whole MQTT frame of `b`: packet type, body, bytes used.
fn frame(b: &[u8]) -> Option<(u8, &[u8], usize)> {
    let mut len = 0usize;
    for i in 0..4 {
        let byte = *b.get(1 + i)?;
        len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let start = 2 + i;
            let body = b.get(start..start + len)?;
            return Some((b[0] >> 4, body, start + len));
        }
    }
    None
}

fn count(got: &mut Received, last_seq: &mut [u32], publish: &[u8], now: u64) {
    let Some(topic_len) = publish
        .get(..2)
        .map(|t| usize::from(u16::from_be_bytes([t[0], t[1]])))
    else {
        return;
    };
    let Some(p) = publish.get(2 + topic_len..2 + topic_len + STAMP_LEN) else {
        return;
    };
    let device = u32::from_be_bytes(p[0..4].try_into().unwrap()) as usize;
    let seq = u32::from_be_bytes(p[4..8].try_into().unwrap());
    let sent = u64::from_be_bytes(p[8..16].try_into().unwrap());
    let Some(last) = last_seq.get_mut(device) else {
        return;
    };
    if seq <= *last {
        got.out_of_order += 1;
    }
    *last = seq;
    got.per_device[device] += 1;
    got.count += 1;
    got.latencies_ns.push(now.saturating_sub(sent));
}
