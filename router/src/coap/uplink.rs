//! The CoAP server side of the uplink (RFC 7252): what a worker does with
//! each datagram. POST/PUT publish and are answered 2.04 once published;
//! GET reads the last value published on the topic; retransmissions are
//! answered again and never published twice.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::dedup::{Answer, DedupCache};
use super::message::{self, code, option, peek_header, Message, ACK, CON, NON, RST};
use super::request::{self, content_type, RequestError};
use crate::downlink::DownlinkHandle;
use crate::mapping::{self, Mapper, SharedMapper};
use crate::mqtt::{Broker, Message as MqttMessage, Ticket};

/// Uplink counters, shared by all workers.
#[derive(Debug, Default)]
pub struct UplinkStats {
    pub received: AtomicU64,
    pub published: AtomicU64,
    pub duplicates: AtomicU64,
    /// Not CoAP at all (bad header, option encoding, ...).
    pub malformed: AtomicU64,
    pub resets_sent: AtomicU64,
    /// Requests answered with a 4.xx/5.xx code.
    pub rejected: AtomicU64,
    pub too_large: AtomicU64,
    /// ACK, RST and responses from devices (downlink traffic, not yet routed).
    pub ignored: AtomicU64,
    pub dedup_evictions: AtomicU64,
    /// Answered 5.03: a bridge's spool could not store the message.
    pub unavailable: AtomicU64,
}

impl UplinkStats {
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let f = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("received", f(&self.received)),
            ("published", f(&self.published)),
            ("duplicates", f(&self.duplicates)),
            ("malformed", f(&self.malformed)),
            ("resets_sent", f(&self.resets_sent)),
            ("rejected", f(&self.rejected)),
            ("too_large", f(&self.too_large)),
            ("ignored", f(&self.ignored)),
            ("dedup_evictions", f(&self.dedup_evictions)),
            ("unavailable", f(&self.unavailable)),
        ]
    }
}

#[derive(Clone, Debug)]
pub struct UplinkConfig {
    /// Largest payload accepted; more is answered 4.13 with Size1.
    pub max_payload: usize,
    pub dedup_per_peer: usize,
    pub dedup_total: usize,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        UplinkConfig {
            max_payload: 4096,
            dedup_per_peer: 256,
            dedup_total: 1_000_000,
        }
    }
}

/// One worker's uplink state.
pub struct Uplink {
    config: UplinkConfig,
    mappers: Arc<SharedMapper>,
    mapper: Arc<Mapper>,
    mapper_generation: u64,
    broker: Arc<Broker>,
    stats: Arc<UplinkStats>,
    dedup: DedupCache,
    /// This worker's evictions already added to the shared counter.
    evictions_reported: u64,
    /// Exchanges remembered since the last commit: if the commit fails,
    /// they are forgotten so a retransmission is processed again rather
    /// than answered from the cache (it was never acknowledged).
    uncommitted: Vec<(SocketAddr, u16)>,
    /// The ticket of the batch's first publish a sink staged (see
    /// `mqtt::sink`): the commit before the batch's replies checks it.
    staged: Option<Ticket>,
    topic: String,
    /// Message IDs for NON responses (section 4.4: ours to choose).
    next_mid: u16,
    downlink: Option<DownlinkHandle>,
}

impl Uplink {
    pub fn new(
        config: UplinkConfig,
        mappers: Arc<SharedMapper>,
        broker: Arc<Broker>,
        stats: Arc<UplinkStats>,
    ) -> Uplink {
        let (mapper_generation, mapper) = mappers.load();
        Uplink {
            dedup: DedupCache::new(config.dedup_per_peer, config.dedup_total),
            evictions_reported: 0,
            uncommitted: Vec::new(),
            staged: None,
            config,
            mappers,
            mapper,
            mapper_generation,
            broker,
            stats,
            topic: String::with_capacity(256),
            next_mid: rand_mid(),
            downlink: None,
        }
    }

    /// Hands ACKs, RSTs and responses from devices to the downlink, and
    /// tells it where each peer was last seen.
    pub fn with_downlink(mut self, handle: DownlinkHandle) -> Uplink {
        self.downlink = Some(handle);
        self
    }

    /// Passes a device's answer to the downlink; whether one is running.
    fn to_downlink(&self, src: SocketAddr, dgram: &[u8]) -> bool {
        match &self.downlink {
            Some(d) => {
                if d.replies
                    .try_send((src, Bytes::copy_from_slice(dgram)))
                    .is_err()
                {
                    self.stats.ignored.fetch_add(1, Ordering::Relaxed);
                }
                true
            }
            None => false,
        }
    }

    /// Handles one datagram from `src`; leaves the reply, if any, in `out`.
    /// `truncated`: the datagram was larger than the receive buffer. Call
    /// `commit` after each receive batch, before sending its replies.
    pub fn handle(
        &mut self,
        dgram: &[u8],
        truncated: bool,
        src: SocketAddr,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> bool {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        out.clear();
        if self.mappers.generation() != self.mapper_generation {
            (self.mapper_generation, self.mapper) = self.mappers.load();
        }
        if truncated {
            // Longer than the receive buffer (options or payload): the head
            // is enough to tell a request it is too large.
            if let Ok(head) = Message::decode_head(dgram) {
                if head.is_request() && matches!(head.mtype, CON | NON) {
                    return self.too_large(&head, out);
                }
            }
        }
        let msg = match Message::decode(dgram) {
            Ok(m) if !truncated => m,
            _ => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                // Section 4.2: a CON that cannot be processed is rejected with RST.
                return match peek_header(dgram) {
                    Some((CON, mid)) => self.reset(mid, out),
                    _ => false,
                };
            }
        };
        match (msg.mtype, msg.code) {
            (CON, code::EMPTY) => self.reset(msg.mid, out), // "CoAP ping", section 4.3
            (CON | NON, _) if msg.is_request() => {
                if let Some(d) = &self.downlink {
                    if let Some(peer) = self.mapper.peer(src.ip()) {
                        d.last_seen.note(&peer.name, src);
                    }
                }
                self.request(&msg, src, now, out)
            }
            // ACKs, RSTs and responses answer downlink requests.
            _ if self.to_downlink(src, dgram) => false,
            (CON, _) => {
                // A response we did not ask for (section 4.2).
                self.stats.ignored.fetch_add(1, Ordering::Relaxed);
                self.reset(msg.mid, out)
            }
            _ => {
                self.stats.ignored.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    fn request(&mut self, msg: &Message, src: SocketAddr, now: Instant, out: &mut Vec<u8>) -> bool {
        if let Some(answer) = self.dedup.lookup(&src, msg.mid, now) {
            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            if msg.mtype != CON || answer.code == 0 {
                return false;
            }
            message::encode(
                out,
                ACK,
                answer.code,
                msg.mid,
                &answer.token[..usize::from(answer.token_len)],
                &[],
                &[],
            );
            return true;
        }
        let (code, cacheable) = match request::parse(msg) {
            Err(RequestError::BadOption(_)) if msg.mtype == NON => {
                // Section 5.4.1: a NON with an unknown critical option is rejected silently.
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            Err(e) => (e.code(), true),
            Ok(req) => match req.method {
                code::POST | code::PUT if msg.payload.len() > self.config.max_payload => {
                    return self.too_large(msg, out);
                }
                code::POST | code::PUT => (self.publish(msg, &req, src), true),
                code::GET => return self.get(msg, &req, src, out),
                _ => (code::METHOD_NOT_ALLOWED, true),
            },
        };
        if code >> 5 != 2 {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        }
        let mut token = [0u8; 8];
        token[..msg.token.len()].copy_from_slice(msg.token);
        let reply = msg.mtype == CON;
        if cacheable {
            let answer = Answer {
                code: if reply { code } else { 0 },
                token_len: msg.token.len() as u8,
                token,
            };
            self.dedup.insert(src, msg.mid, answer, now);
            self.uncommitted.push((src, msg.mid));
            // Every worker adds its own: the counter is the sum of all.
            let new = self.dedup.evictions - self.evictions_reported;
            if new > 0 {
                self.stats.dedup_evictions.fetch_add(new, Ordering::Relaxed);
                self.evictions_reported = self.dedup.evictions;
            }
        }
        if !reply {
            // The uplink answers NON requests with nothing.
            return false;
        }
        // Piggybacked response (section 5.2.1), sent only now that the
        // message was accepted by the broker (DESIGN.md invariant 1).
        message::encode(out, ACK, code, msg.mid, msg.token, &[], &[]);
        true
    }

    /// Publishes a POST/PUT payload; returns the response code.
    fn publish(&mut self, msg: &Message, req: &request::Request, src: SocketAddr) -> u8 {
        let mreq = mapping::Request {
            src,
            method: req.method,
            path: req.path.segments(),
        };
        let delivery = match self.mapper.map(&mreq, &mut self.topic) {
            Ok(d) => d,
            Err(_) => return code::BAD_REQUEST,
        };
        // One allocation holds topic and payload; subscribers share it.
        let mut buf = BytesMut::with_capacity(self.topic.len() + msg.payload.len());
        buf.extend_from_slice(self.topic.as_bytes());
        buf.extend_from_slice(msg.payload);
        let mut all = buf.freeze();
        let topic = all.split_to(self.topic.len());
        let published = self.broker.publish_deferred(
            MqttMessage {
                topic,
                payload: all,
                qos: delivery.qos,
                retain: delivery.retain,
                content_type: req
                    .content_format
                    .and_then(content_type)
                    .map(|t| Bytes::from_static(t.as_bytes())),
                properties: None,
            },
            None,
        );
        match published {
            // The worker's commit makes it durable before the 2.04 leaves.
            Ok(ticket) => self.staged = self.staged.or(ticket),
            // A topic MQTT cannot carry (too long, too many levels).
            Err(err) if err.kind() == std::io::ErrorKind::InvalidInput => return code::BAD_REQUEST,
            // Not stored, so not accepted: 5.03, and the device tries again
            // (DESIGN.md invariant 1). The spool logs the outage.
            Err(_) => {
                self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                return code::SERVICE_UNAVAILABLE;
            }
        }

        self.stats.published.fetch_add(1, Ordering::Relaxed);
        code::CHANGED
    }

    /// GET: the last value published on the topic a POST to this path
    /// would publish to.
    fn get(
        &mut self,
        msg: &Message,
        req: &request::Request,
        src: SocketAddr,
        out: &mut Vec<u8>,
    ) -> bool {
        let mreq = mapping::Request {
            src,
            method: code::POST,
            path: req.path.segments(),
        };
        let found = match self.mapper.map(&mreq, &mut self.topic) {
            Ok(_) => self.broker.last_value(self.topic.as_bytes()),
            Err(_) => None,
        };
        let (mtype, mid) = match msg.mtype {
            CON => (ACK, msg.mid),
            _ => (NON, self.fresh_mid()),
        };
        match found {
            Some(m) => {
                let mut cf = [0u8; 4];
                let format = m.content_type.as_deref().and_then(request::content_format);
                let opts: &[(u16, &[u8])] = match format {
                    Some(f) => &[(
                        option::CONTENT_FORMAT,
                        message::uint_bytes(u32::from(f), &mut cf),
                    )],
                    None => &[],
                };
                message::encode(out, mtype, code::CONTENT, mid, msg.token, opts, &m.payload);
            }
            None => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                message::encode(out, mtype, code::NOT_FOUND, mid, msg.token, &[], &[]);
            }
        }
        true
    }

    /// Too large to accept: not published, not remembered (a retry with the
    /// same MID gets the same answer anyway).
    fn too_large(&mut self, msg: &Message, out: &mut Vec<u8>) -> bool {
        self.stats.too_large.fetch_add(1, Ordering::Relaxed);
        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        if msg.mtype != CON {
            return false;
        }
        // Section 5.9.2.9: 4.13 with Size1 telling the largest we accept.
        let mut size = [0u8; 4];
        let size1 = message::uint_bytes(self.config.max_payload as u32, &mut size);
        message::encode(
            out,
            ACK,
            code::REQUEST_ENTITY_TOO_LARGE,
            msg.mid,
            msg.token,
            &[(option::SIZE1, size1)],
            &[],
        );
        true
    }

    fn reset(&mut self, mid: u16, out: &mut Vec<u8>) -> bool {
        self.stats.resets_sent.fetch_add(1, Ordering::Relaxed);
        message::encode(out, RST, code::EMPTY, mid, &[], &[], &[]);
        true
    }

    fn fresh_mid(&mut self) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid
    }

    /// Makes the messages of the batch handled so far durable (the
    /// bridges' disk spools); the worker calls it before sending the
    /// batch's `replies` (invariant 1: nothing acknowledged is lost). If
    /// that fails, none of them was accepted: every 2.04 among the replies
    /// becomes 5.03, and duplicate detection forgets the batch, so the
    /// devices' retransmissions are processed again. (A 2.04 re-sent for an
    /// earlier, committed message turns 5.03 too: at worst its device sends
    /// it again, and the upstream gets it twice, never zero times.)
    pub fn commit(&mut self, replies: &mut [Vec<u8>]) -> std::io::Result<()> {
        let committed = match self.staged.take() {
            Some(ticket) => self.broker.commit(ticket),
            None => Ok(()),
        };
        if committed.is_err() {
            for (src, mid) in &self.uncommitted {
                self.dedup.forget(src, *mid);
            }
            for reply in replies {
                if message::is_ack_with(reply, code::CHANGED) {
                    message::set_code(reply, code::SERVICE_UNAVAILABLE);
                    self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.uncommitted.clear();
        committed
    }

    /// Drops expired duplicate-detection state; call about once a second.
    pub fn sweep(&mut self, now: Instant) {
        self.dedup.sweep(now);
    }
}

/// A start for our Message IDs that differs between runs (section 4.4
/// recommends randomising it).
fn rand_mid() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.subsec_nanos() ^ std::process::id()) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::mapping::Mapper;
    use crate::mqtt::broker::BrokerConfig;

    /// Issue 11, finding 10: each worker stored its own count into the
    /// shared counter, so with two workers it showed about half.
    #[test]
    fn dedup_evictions_count_every_workers_evictions() {
        let stats = Arc::new(UplinkStats::default());
        let mappers = SharedMapper::new(Mapper::from_config(&Config::default()));
        let broker = Broker::new(BrokerConfig::default());
        let config = UplinkConfig {
            dedup_total: 500,
            ..UplinkConfig::default()
        };
        let mut workers: Vec<Uplink> = (0..2)
            .map(|_| {
                Uplink::new(
                    config.clone(),
                    mappers.clone(),
                    broker.clone(),
                    stats.clone(),
                )
            })
            .collect();
        // CON POST /x, Message ID 1, payload "1".
        let datagram = [0x40, 0x02, 0x00, 0x01, 0xb1, b'x', 0xff, b'1'];
        let mut out = Vec::new();
        let now = Instant::now();
        for (w, worker) in workers.iter_mut().enumerate() {
            for port in 0..2_000u16 {
                let src = SocketAddr::from(([10, 0, w as u8, 1], 10_000 + port));
                assert!(worker.handle(&datagram, false, src, now, &mut out));
                worker.commit(std::slice::from_mut(&mut out)).unwrap();
            }
        }
        let happened: u64 = workers.iter().map(|w| w.dedup.evictions).sum();
        assert_eq!(
            happened,
            2 * (2_000 - 500),
            "each worker keeps 500 endpoints"
        );
        assert_eq!(stats.dedup_evictions.load(Ordering::Relaxed), happened);
    }
}
