//! The CoAP server side of the uplink (RFC 7252): what a worker does with
//! each datagram. POST/PUT publish and are answered 2.04 once published;
//! GET reads the last value published on the topic; retransmissions are
//! answered again and never published twice. Bodies larger than one
//! datagram arrive in blocks (RFC 7959 Block1) and are published whole
//! when the last arrives; a GET answer larger than a block is served in
//! blocks (Block2) with an ETag, so a client notices a change between them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::block::{Assemblies, Block, BodyKey, Step};
use super::client::empty;
use super::dedup::{Answer, DedupCache};
use super::downlink::DownlinkHandle;
use super::dtls::Identity;
use super::ids::{Ids, MidSpace};
use super::message::{self, code, option, peek_header, Message, ACK, CON, NON, RST};
use super::observe::{self, ObserveEvent};
use super::request::{self, content_type, RequestError};
use super::{Endpoint, Origin};
use crate::mapping::{self, Access, Delivery, Mapper, SharedMapper};
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
    /// Block1 blocks received, and bodies published from them.
    pub blocks: AtomicU64,
    pub bodies: AtomicU64,
    /// Blocks that did not continue their body (answered 4.08).
    pub blocks_out_of_order: AtomicU64,
    /// Unfinished bodies dropped to stay within max_assembly_bytes, and
    /// forgotten after EXCHANGE_LIFETIME without a block.
    pub assemblies_evicted: AtomicU64,
    pub assemblies_expired: AtomicU64,
    /// Requests under the pubsub prefix for a topic the peer may not use
    /// (answered 4.03).
    pub forbidden: AtomicU64,
    /// Plain CoAP from a peer that must use DTLS, and messages of a DTLS
    /// session whose peer was removed: dropped.
    pub insecure: AtomicU64,
    /// Block1 bodies being assembled by all workers, and their memory.
    pub assemblies: AtomicU64,
    pub assembly_bytes: AtomicU64,
}

impl UplinkStats {
    /// The snapshot's names that are gauges; the rest only grow.
    pub const GAUGES: &'static [&'static str] = &["assemblies", "assembly_bytes"];

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
            ("blocks", f(&self.blocks)),
            ("bodies", f(&self.bodies)),
            ("blocks_out_of_order", f(&self.blocks_out_of_order)),
            ("assemblies_evicted", f(&self.assemblies_evicted)),
            ("assemblies_expired", f(&self.assemblies_expired)),
            ("forbidden", f(&self.forbidden)),
            ("insecure", f(&self.insecure)),
            ("assemblies", f(&self.assemblies)),
            ("assembly_bytes", f(&self.assembly_bytes)),
        ]
    }
}

#[derive(Clone, Debug)]
pub struct UplinkConfig {
    /// Largest payload of one datagram; more is answered 4.13 with Size1.
    pub max_payload: usize,
    /// Largest body assembled from Block1 blocks.
    pub max_body: usize,
    /// All unfinished bodies of this worker together.
    pub max_assembly_bytes: usize,
    pub dedup_per_peer: usize,
    pub dedup_total: usize,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        UplinkConfig {
            max_payload: 4096,
            max_body: 1 << 20,
            max_assembly_bytes: 64 << 20,
            dedup_per_peer: 256,
            dedup_total: 1_000_000,
        }
    }
}

/// The block size of GET answers served in blocks, unless the client asks
/// for smaller: 1024 bytes (SZX 6), the largest RFC 7959 allows over UDP.
const BLOCK2_SZX: u8 = 6;

/// Where a datagram came from and, over DTLS, whom its session's
/// credentials named.
#[derive(Clone, Copy)]
struct Source<'a> {
    addr: SocketAddr,
    identity: Option<&'a Identity>,
}

impl Source<'_> {
    /// Where the downlink answers it: over its session when it has one.
    fn endpoint(&self) -> Endpoint {
        Endpoint {
            addr: self.addr,
            secure: self.identity.is_some(),
        }
    }

    fn origin(&self) -> Origin {
        match self.identity {
            Some(id) => Origin::Peer(id.key),
            None => Origin::Address(self.addr),
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
    assemblies: Assemblies,
    /// This worker's counts already added to the shared counters.
    reported: Reported,
    /// Exchanges remembered since the last commit: if the commit fails,
    /// they are forgotten so a retransmission is processed again rather
    /// than answered from the cache (it was never acknowledged).
    uncommitted: Vec<(Origin, u16)>,
    /// The ticket of the batch's first publish a sink staged (see
    /// `mqtt::sink`): the commit before the batch's replies checks it.
    staged: Option<Ticket>,
    topic: String,
    /// Message IDs for NON responses (section 4.4: ours to choose).
    ids: Ids,
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
            assemblies: Assemblies::new(config.max_body, config.max_assembly_bytes),
            reported: Reported::default(),
            uncommitted: Vec::new(),
            staged: None,
            config,
            mappers,
            mapper,
            mapper_generation,
            broker,
            stats,
            topic: String::with_capacity(256),
            ids: Ids::new(MidSpace::Server),
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
    fn to_downlink(&self, src: Endpoint, dgram: &[u8]) -> bool {
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
        let src = Source {
            addr: src,
            identity: None,
        };
        self.handle_from(dgram, truncated, src, now, out)
    }

    /// Handles one message decrypted from a DTLS session of the peer
    /// `identity` at `src`; the reply, if any, is left in `out` for the
    /// session to encrypt. The peer is who the credentials say, whatever
    /// its address.
    pub fn handle_secure(
        &mut self,
        message: &[u8],
        src: SocketAddr,
        identity: &Identity,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> bool {
        let src = Source {
            addr: src,
            identity: Some(identity),
        };
        self.handle_from(message, false, src, now, out)
    }

    fn handle_from(
        &mut self,
        dgram: &[u8],
        truncated: bool,
        src: Source<'_>,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> bool {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        out.clear();
        if self.mappers.generation() != self.mapper_generation {
            (self.mapper_generation, self.mapper) = self.mappers.load();
        }
        let admitted = match src.identity {
            // A peer removed since its session was made.
            Some(id) => self.mapper.peer_by_name(&id.name).is_some(),
            // Its own address is no proof of who a peer is that must use
            // DTLS (the fast path drops this too, where it is attached).
            None => {
                !self.mapper.requires_dtls()
                    || self
                        .mapper
                        .peer(src.addr.ip())
                        .is_none_or(|p| !p.require_dtls)
            }
        };
        if !admitted {
            self.stats.insecure.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if truncated {
            // Longer than the receive buffer (options or payload): the head
            // is enough to tell a request it is too large.
            if let Ok(head) = Message::decode_head(dgram) {
                if head.is_request() && matches!(head.mtype, CON | NON) {
                    return self.too_large(&head, None, out);
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
                // Commands and watches follow the peer to where it was
                // last heard from: over DTLS, the peer its credentials
                // named, reached through that session.
                if let Some(d) = &self.downlink {
                    let peer = match src.identity {
                        Some(id) => Some(&*id.name),
                        None => self.mapper.peer(src.addr.ip()).map(|p| p.name.as_str()),
                    };
                    if let Some(peer) = peer {
                        if let Some(heard) = d.last_seen.note(peer, src.endpoint(), &self.mapper) {
                            // Commands or watches wait for this peer. News
                            // lost to a full channel: the downlink's 1 s
                            // sweep finds waiting commands, and watches
                            // retry on their own schedule.
                            let _ = d.heard.try_send(heard);
                        }
                    }
                }
                self.request(&msg, src, now, out)
            }
            // ACKs, RSTs and responses answer downlink requests.
            _ if self.to_downlink(src.endpoint(), dgram) => false,
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

    fn request(&mut self, msg: &Message, src: Source<'_>, now: Instant, out: &mut Vec<u8>) -> bool {
        if let Some(answer) = self.dedup.lookup(&src.origin(), msg.mid, now) {
            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            if msg.mtype != CON || answer.code == 0 {
                return false;
            }
            answer.encode(out, ACK, msg.mid);
            return true;
        }
        let parsed = request::parse(msg);
        let blockwise = parsed.as_ref().is_ok_and(|r| r.block1.is_some());
        let (code, option) = match parsed {
            Err(RequestError::BadOption(_)) if msg.mtype == NON => {
                // Section 5.4.1: a NON with an unknown critical option is rejected silently.
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            Err(e) => (e.code(), None),
            Ok(req) => match req.method {
                // A Block1 block fits its block size (at most 1024 bytes)
                // whatever max_payload says: stock clients (aiocoap) send
                // 1024-byte blocks, and some answer a 4.13 with a smaller
                // size by going on at the next block (not restarting), which
                // ends in 4.08. The body is bounded by max_body.
                code::POST | code::PUT
                    if msg.payload.len() > self.config.max_payload
                        && req.block1.is_none_or(|b| msg.payload.len() > b.size()) =>
                {
                    return self.too_large(msg, req.block1, out);
                }
                code::POST | code::PUT => match req.block1 {
                    None => (self.publish(msg.payload, &req, src), None),
                    Some(block) => self.block1(msg.payload, &req, block, src, now),
                },
                code::GET => return self.get(msg, &req, src, out),
                _ => (code::METHOD_NOT_ALLOWED, None),
            },
        };
        if code >> 5 != 2 {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        }
        let reply = msg.mtype == CON;
        // A NON request is answered with nothing (code 0), now and when
        // it is repeated.
        let answer = Answer::new(if reply { code } else { 0 }, msg.token, option);
        self.dedup.insert(src.origin(), msg.mid, answer, now);
        self.uncommitted.push((src.origin(), msg.mid));
        self.report();
        if reply {
            // Piggybacked response (section 5.2.1), sent only now that the
            // message was accepted by the broker (DESIGN.md invariant 1).
            answer.encode(out, ACK, msg.mid);
            return true;
        }
        if blockwise {
            // A block sent as NON still waits for its answer before the
            // next (RFC 7959 section 2.5): a NON response.
            Answer::new(code, msg.token, option).encode(out, NON, self.ids.mid());
            return true;
        }
        false
    }

    /// One block of a request body (RFC 7959 section 2.5): 2.31 Continue
    /// until the last, which publishes the whole body. Returns the code
    /// and the option the answer carries.
    fn block1(
        &mut self,
        payload: &[u8],
        req: &request::Request,
        block: Block,
        src: Source<'_>,
        now: Instant,
    ) -> (u8, Option<(u16, u32)>) {
        self.stats.blocks.fetch_add(1, Ordering::Relaxed);
        let key = BodyKey::new(src.origin(), req.method, req.path.segments());
        // The answer echoes the block (section 2.3).
        let echo = Some((option::BLOCK1, block.value()));
        match self.assemblies.receive(key, block, req.size1, payload, now) {
            Step::Continue => (code::CONTINUE, echo),
            Step::Complete(body) => {
                let code = self.publish(&body, req, src);
                if code == code::CHANGED {
                    self.stats.bodies.fetch_add(1, Ordering::Relaxed);
                }
                (code, echo)
            }
            Step::Incomplete => {
                self.stats
                    .blocks_out_of_order
                    .fetch_add(1, Ordering::Relaxed);
                (code::REQUEST_ENTITY_INCOMPLETE, None)
            }
            Step::TooLarge => {
                self.stats.too_large.fetch_add(1, Ordering::Relaxed);
                let largest = self.assemblies.max_body() as u32;
                (
                    code::REQUEST_ENTITY_TOO_LARGE,
                    Some((option::SIZE1, largest)),
                )
            }
            Step::BadSize => (code::BAD_REQUEST, None),
        }
    }

    /// Writes the topic `req` publishes to or reads into `self.topic`: a
    /// path under the pubsub prefix names it (if the peer may use it: else
    /// 4.03), any other path is mapped, a GET to the topic a POST there
    /// would publish to. Err: the response code.
    fn topic_for(
        &mut self,
        req: &request::Request,
        src: Source<'_>,
        access: Access,
    ) -> Result<Delivery, u8> {
        let path = req.path.segments();
        let identity = src.identity.map(|i| &*i.name);
        match self.mapper.direct_topic(path, &mut self.topic) {
            Some(Ok(()))
                if self
                    .mapper
                    .allows(src.addr.ip(), identity, &self.topic, access) =>
            {
                Ok(Delivery {
                    qos: 0,
                    retain: false,
                })
            }
            Some(Ok(())) => {
                self.stats.forbidden.fetch_add(1, Ordering::Relaxed);
                Err(code::FORBIDDEN)
            }
            Some(Err(_)) => Err(code::BAD_REQUEST),
            None => {
                let method = match access {
                    Access::Publish => req.method,
                    Access::Subscribe => code::POST,
                };
                let mreq = mapping::Request {
                    src: src.addr,
                    identity,
                    method,
                    path,
                };
                self.mapper
                    .map(&mreq, &mut self.topic)
                    .map_err(|_| code::BAD_REQUEST)
            }
        }
    }

    /// Publishes a POST/PUT body; returns the response code.
    fn publish(&mut self, payload: &[u8], req: &request::Request, src: Source<'_>) -> u8 {
        let delivery = match self.topic_for(req, src, Access::Publish) {
            Ok(d) => d,
            Err(code) => return code,
        };
        // One allocation holds topic and payload; subscribers share it.
        let mut buf = BytesMut::with_capacity(self.topic.len() + payload.len());
        buf.extend_from_slice(self.topic.as_bytes());
        buf.extend_from_slice(payload);
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
    /// would publish to (or, under the pubsub prefix, on the topic it
    /// names, else its retained message); in blocks when it is larger than
    /// one (RFC 7959 section 2.4) or the client asks for blocks.
    fn get(
        &mut self,
        msg: &Message,
        req: &request::Request,
        src: Source<'_>,
        out: &mut Vec<u8>,
    ) -> bool {
        let (found, observing) = match self.topic_for(req, src, Access::Subscribe) {
            Ok(_) => {
                let topic = self.topic.as_bytes();
                let m = self
                    .broker
                    .last_value(topic)
                    .or_else(|| self.broker.retained(topic));
                // Only a 2.05 of a first block registers (RFC 7641
                // section 4.1; RFC 7959 section 3.4), and it always is one.
                let first_block = req.block2.is_none_or(|b| b.num == 0);
                let observing = if first_block {
                    self.observe(req.observe, msg.token, src.endpoint(), m.as_ref())
                } else {
                    None
                };
                (Ok(m), observing)
            }
            Err(code::FORBIDDEN) => (Err(code::FORBIDDEN), None),
            Err(_) => (Ok(None), None),
        };
        let (mtype, mid) = match msg.mtype {
            CON => (ACK, msg.mid),
            _ => (NON, self.ids.mid()),
        };
        let m = match found {
            Ok(Some(m)) => Some(m),
            // An observer registers on a topic nothing was published on
            // yet: it gets an empty state now and the first one later.
            Ok(None) if observing.is_some() => None,
            other => {
                let code = other.err().unwrap_or(code::NOT_FOUND);
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                message::encode(out, mtype, code, mid, msg.token, &[], &[]);
                return true;
            }
        };
        let value = m.as_ref().map_or(&[][..], |m| &m.payload[..]);
        let fits = value.len() <= 16 << BLOCK2_SZX;
        let (body, block) = match req.block2 {
            None if fits => (value, None),
            asked => {
                // The client's block size, or ours if it asked for none.
                let szx = asked.map_or(BLOCK2_SZX, |b| b.szx.min(BLOCK2_SZX));
                let num = asked.map_or(0, |b| b.num);
                let Some((range, more)) = Block::slice(num, szx, value.len()) else {
                    // A block beyond the end of the value.
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    message::encode(out, mtype, code::BAD_OPTION, mid, msg.token, &[], &[]);
                    return true;
                };
                (&value[range], Some(Block { num, more, szx }))
            }
        };
        let format = m
            .as_ref()
            .and_then(|m| m.content_type.as_deref())
            .and_then(request::content_format);
        let (mut obs, mut cf, mut age) = ([0u8; 4], [0u8; 4], [0u8; 4]);
        let (mut b2, mut s2) = ([0u8; 4], [0u8; 4]);
        // Blocks of one value share an ETag (RFC 7252 section 5.10.6), so a
        // client notices when the value changed between two of them.
        // (Hashed for each block: a value of N blocks costs N hashes of it,
        // cheap beside the N exchanges at a CRC's gigabytes per second.)
        let etag = block.map(|_| crc32fast::hash(value).to_be_bytes());
        let mut opts: [(u16, &[u8]); 6] = [(0, &[]); 6];
        let mut n = 0;
        if let Some(etag) = &etag {
            opts[n] = (option::ETAG, etag);
            n += 1;
        }
        if let Some(seq) = observing {
            // The registration's answer (RFC 7641 section 4.1), numbered
            // from the counter the notifications share.
            opts[n] = (option::OBSERVE, message::uint_bytes(seq, &mut obs));
            n += 1;
        }
        if let Some(f) = format {
            opts[n] = (
                option::CONTENT_FORMAT,
                message::uint_bytes(u32::from(f), &mut cf),
            );
            n += 1;
        }
        if observing.is_some() {
            let max_age = message::uint_bytes(observe::MAX_AGE, &mut age);
            opts[n] = (option::MAX_AGE, max_age);
            n += 1;
        }
        if let Some(block) = block {
            opts[n] = (option::BLOCK2, message::uint_bytes(block.value(), &mut b2));
            n += 1;
            // The whole size, when asked for (section 4) and with the first block.
            if req.wants_size2 || block.num == 0 {
                opts[n] = (
                    option::SIZE2,
                    message::uint_bytes(value.len() as u32, &mut s2),
                );
                n += 1;
            }
        }
        message::encode(out, mtype, code::CONTENT, mid, msg.token, &opts[..n], body);
        true
    }

    /// Passes an Observe registration (0) or deregistration (1) of the topic
    /// in `self.topic` to the endpoint task (RFC 7641 section 2); the
    /// answer's sequence number if it registers the observer. `sent`: the
    /// state it carries.
    fn observe(
        &mut self,
        observe: Option<u32>,
        token: &[u8],
        src: Endpoint,
        sent: Option<&MqttMessage>,
    ) -> Option<u32> {
        let d = self.downlink.as_ref()?;
        let event = match observe {
            Some(0) => ObserveEvent::Register {
                endpoint: src,
                token: token.to_vec(),
                topic: Bytes::copy_from_slice(self.topic.as_bytes()),
                sent: sent.map(|m| crc32fast::hash(&m.payload)),
            },
            Some(1) => ObserveEvent::Deregister {
                endpoint: src,
                token: token.to_vec(),
            },
            _ => return None,
        };
        let register = matches!(event, ObserveEvent::Register { .. });
        // With the task's queue full the registration is declined: the
        // answer carries no Observe option (section 4.1).
        let passed = d.observe.try_send(event).is_ok();
        (passed && register).then(|| d.sequence.next())
    }

    /// A datagram too large to accept: not published, not remembered (a
    /// retry with the same MID gets the same answer anyway). 4.13 (RFC
    /// 7252 section 5.9.2.9) with a Block1 option of the largest block
    /// size that fits, at the offset of the refused block if it was one,
    /// and Size1 the largest body accepted in such blocks (RFC 7959
    /// section 2.9.3): a client can send it again in blocks.
    fn too_large(&mut self, msg: &Message, block: Option<Block>, out: &mut Vec<u8>) -> bool {
        self.stats.too_large.fetch_add(1, Ordering::Relaxed);
        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        if msg.mtype != CON {
            return false;
        }
        let szx = Block::szx_for(self.config.max_payload);
        let hint = Block {
            num: block.map_or(0, |b| (b.offset() >> (szx + 4)) as u32),
            more: block.is_some_and(|b| b.more),
            szx,
        };
        let (mut b1, mut s1) = ([0u8; 4], [0u8; 4]);
        message::encode(
            out,
            ACK,
            code::REQUEST_ENTITY_TOO_LARGE,
            msg.mid,
            msg.token,
            &[
                (option::BLOCK1, message::uint_bytes(hint.value(), &mut b1)),
                (
                    option::SIZE1,
                    message::uint_bytes(self.config.max_body as u32, &mut s1),
                ),
            ],
            &[],
        );
        true
    }

    fn reset(&mut self, mid: u16, out: &mut Vec<u8>) -> bool {
        self.stats.resets_sent.fetch_add(1, Ordering::Relaxed);
        empty(out, RST, mid);
        true
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
                if message::is_response_with(reply, code::CHANGED) {
                    message::set_code(reply, code::SERVICE_UNAVAILABLE);
                    self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.uncommitted.clear();
        committed
    }

    /// Drops expired duplicate-detection state and stale assemblies; call
    /// about once a second.
    pub fn sweep(&mut self, now: Instant) {
        self.dedup.sweep(now);
        self.assemblies.sweep(now);
        self.report();
    }

    /// Adds this worker's new evictions to the shared counters (each worker
    /// adds its own: the counter is the sum of all).
    fn report(&mut self) {
        let stats = &self.stats;
        let r = &mut self.reported;
        add_new(
            &stats.dedup_evictions,
            self.dedup.evictions,
            &mut r.dedup_evictions,
        );
        add_new(
            &stats.assemblies_evicted,
            self.assemblies.evicted,
            &mut r.assemblies_evicted,
        );
        add_new(
            &stats.assemblies_expired,
            self.assemblies.expired,
            &mut r.assemblies_expired,
        );
        // The gauges: this worker's change since it last reported.
        let (held, bytes) = (self.assemblies.len(), self.assemblies.bytes());
        set_share(&stats.assemblies, held as u64, &mut r.assemblies);
        set_share(&stats.assembly_bytes, bytes as u64, &mut r.assembly_bytes);
    }
}

/// Moves a gauge summed over the workers by this worker's change.
/// (Nothing when it did not change: this runs per request, and a shared
/// atomic written by every worker would bounce its cache line.)
fn set_share(shared: &AtomicU64, now: u64, reported: &mut u64) {
    if now > *reported {
        shared.fetch_add(now - *reported, Ordering::Relaxed);
    } else if now < *reported {
        shared.fetch_sub(*reported - now, Ordering::Relaxed);
    }
    *reported = now;
}

/// A worker's counts already added to the shared counters.
#[derive(Default)]
struct Reported {
    dedup_evictions: u64,
    assemblies_evicted: u64,
    assemblies_expired: u64,
    assemblies: u64,
    assembly_bytes: u64,
}

fn add_new(shared: &AtomicU64, count: u64, reported: &mut u64) {
    if count > *reported {
        shared.fetch_add(count - *reported, Ordering::Relaxed);
        *reported = count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::mapping::Mapper;
    use crate::mqtt::broker::BrokerConfig;

    fn uplink(config: UplinkConfig) -> (Uplink, Arc<UplinkStats>) {
        let stats = Arc::new(UplinkStats::default());
        let mappers = SharedMapper::new(Mapper::from_config(&Config::default()));
        let broker = Broker::new(BrokerConfig::default());
        (Uplink::new(config, mappers, broker, stats.clone()), stats)
    }

    const DEVICE: SocketAddr = SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 9, 0, 1)),
        40000,
    );

    /// Sends a CON request for Uri-Path "log" with one uint option (if
    /// any) and returns the decoded reply's code, options and payload.
    fn exchange(
        u: &mut Uplink,
        mid: u16,
        method: u8,
        options: &[(u16, u32)],
        payload: &[u8],
    ) -> (u8, Vec<(u16, u32)>, Vec<u8>) {
        let mut bufs = vec![[0u8; 4]; options.len()];
        let mut opts: Vec<(u16, &[u8])> = vec![(option::URI_PATH, b"log")];
        for ((number, value), buf) in options.iter().zip(bufs.iter_mut()) {
            opts.push((*number, message::uint_bytes(*value, buf)));
        }
        opts.sort_by_key(|o| o.0);
        let mut datagram = Vec::new();
        message::encode(
            &mut datagram,
            CON,
            method,
            mid,
            &[mid as u8],
            &opts,
            payload,
        );
        let mut out = Vec::new();
        assert!(u.handle(&datagram, false, DEVICE, Instant::now(), &mut out));
        u.commit(std::slice::from_mut(&mut out)).unwrap();
        let reply = Message::decode(&out).unwrap();
        assert_eq!(
            (reply.mtype, reply.mid, reply.token),
            (ACK, mid, &[mid as u8][..])
        );
        let options = reply
            .options()
            .map(|(n, v)| (n, message::uint_option(v).unwrap_or(u32::MAX)))
            .collect();
        (reply.code, options, reply.payload.to_vec())
    }

    fn block(num: u32, more: bool, szx: u8) -> u32 {
        Block { num, more, szx }.value()
    }

    /// Where XDP is off, the uplink itself refuses a require_dtls peer's
    /// plain CoAP; its DTLS session, from any address, is served as it.
    #[test]
    fn a_peer_that_must_use_dtls_is_not_its_address() {
        let config = Config::parse(
            "[[peer]]\nname = \"valve\"\nprefix = [\"10.9.0.1/32\"]\npsk_identity = \"v\"\npsk_hex = \"00\"\nrequire_dtls = true",
        )
        .unwrap();
        let stats = Arc::new(UplinkStats::default());
        let mappers = SharedMapper::new(Mapper::from_config(&config));
        let broker = Broker::new(BrokerConfig::default());
        let mut u = Uplink::new(
            UplinkConfig::default(),
            mappers,
            broker.clone(),
            stats.clone(),
        );
        let mut datagram = Vec::new();
        message::encode(
            &mut datagram,
            CON,
            code::POST,
            1,
            &[1],
            &[(option::URI_PATH, b"log")],
            b"x",
        );
        let mut out = Vec::new();
        assert!(!u.handle(&datagram, false, DEVICE, Instant::now(), &mut out));
        assert_eq!(stats.insecure.load(Ordering::Relaxed), 1);
        assert_eq!(stats.published.load(Ordering::Relaxed), 0);
        let identity = Identity {
            name: Arc::from("valve"),
            key: 0,
        };
        let elsewhere = SocketAddr::from(([192, 0, 2, 9], 5000));
        assert!(u.handle_secure(&datagram, elsewhere, &identity, Instant::now(), &mut out));
        assert!(message::is_response_with(&out, code::CHANGED));
        assert!(
            broker.last_value(b"m2m/valve/log").is_some(),
            "published as the peer"
        );
        // A session of a peer removed since it was made is not served.
        let gone = Identity {
            name: Arc::from("gone"),
            key: 1,
        };
        assert!(!u.handle_secure(&datagram, elsewhere, &gone, Instant::now(), &mut out));
        assert_eq!(stats.insecure.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_body_sent_in_blocks_is_published_whole_and_read_back_in_blocks() {
        let (mut u, stats) = uplink(UplinkConfig::default());
        let body: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        for (i, chunk) in body.chunks(1024).enumerate() {
            let more = (i + 1) * 1024 < body.len();
            let b1 = block(i as u32, more, 6);
            let reply = exchange(
                &mut u,
                100 + i as u16,
                code::POST,
                &[(option::BLOCK1, b1)],
                chunk,
            );
            let expected = if more { code::CONTINUE } else { code::CHANGED };
            assert_eq!(reply.0, expected, "block {i}");
            assert_eq!(reply.1, vec![(option::BLOCK1, b1)], "the block is echoed");
            if i == 2 {
                // A retransmission is answered again, not appended again.
                let again = exchange(&mut u, 102, code::POST, &[(option::BLOCK1, b1)], chunk);
                assert_eq!(again, reply);
                assert_eq!(stats.duplicates.load(Ordering::Relaxed), 1);
            }
        }
        assert_eq!(stats.blocks.load(Ordering::Relaxed), 5);
        assert_eq!(stats.bodies.load(Ordering::Relaxed), 1);
        assert_eq!(
            stats.published.load(Ordering::Relaxed),
            1,
            "published once, whole"
        );
        assert!(u.assemblies.is_empty());

        // Read back: 1024-byte blocks with the ETag, Size2 on the first.
        let (code, opts, first) = exchange(&mut u, 200, code::GET, &[], &[]);
        assert_eq!(code, code::CONTENT);
        let etag = opts
            .iter()
            .find(|o| o.0 == option::ETAG)
            .expect("an ETag")
            .1;
        assert!(opts.contains(&(option::BLOCK2, block(0, true, 6))));
        assert!(opts.contains(&(option::SIZE2, 5000)));
        let mut read = first;
        for num in 1..5 {
            let (code, opts, part) = exchange(
                &mut u,
                200 + num as u16,
                code::GET,
                &[(option::BLOCK2, block(num, false, 6))],
                &[],
            );
            assert_eq!(code, code::CONTENT);
            assert!(opts.contains(&(option::BLOCK2, block(num, num < 4, 6))));
            assert!(opts.contains(&(option::ETAG, etag)), "the same ETag");
            read.extend(part);
        }
        assert_eq!(read, body);
        // A smaller block size on request; beyond the end is a bad option.
        let (_, _, part) = exchange(
            &mut u,
            300,
            code::GET,
            &[(option::BLOCK2, block(3, false, 4))],
            &[],
        );
        assert_eq!(part, body[768..1024]);
        let (code, _, _) = exchange(
            &mut u,
            301,
            code::GET,
            &[(option::BLOCK2, block(5, false, 6))],
            &[],
        );
        assert_eq!(code, code::BAD_OPTION);
    }

    #[test]
    fn block_errors_out_of_order_too_large_and_short() {
        let config = UplinkConfig {
            max_body: 2048,
            ..UplinkConfig::default()
        };
        let (mut u, stats) = uplink(config);
        let kib = [1u8; 1024];
        let b1 = |num, more| (option::BLOCK1, block(num, more, 6));
        let (code, _, _) = exchange(&mut u, 1, code::POST, &[b1(1, true)], &kib);
        assert_eq!(code, code::REQUEST_ENTITY_INCOMPLETE, "block 0 never came");
        let (code, _, _) = exchange(&mut u, 2, code::POST, &[b1(0, true)], &kib);
        assert_eq!(code, code::CONTINUE);
        let (code, _, _) = exchange(&mut u, 3, code::POST, &[b1(2, true)], &kib);
        assert_eq!(code, code::REQUEST_ENTITY_INCOMPLETE, "block 1 is missing");
        assert_eq!(stats.blocks_out_of_order.load(Ordering::Relaxed), 2);
        let (code, _, _) = exchange(&mut u, 4, code::POST, &[b1(1, true)], &kib[..100]);
        assert_eq!(code, code::BAD_REQUEST, "only the last block may be short");
        let (code, _, _) = exchange(&mut u, 5, code::POST, &[b1(1, true)], &kib);
        assert_eq!(code, code::CONTINUE);
        let (code, opts, _) = exchange(&mut u, 6, code::POST, &[b1(2, false)], &kib[..1]);
        assert_eq!(code, code::REQUEST_ENTITY_TOO_LARGE);
        assert_eq!(
            opts,
            vec![(option::SIZE1, 2048)],
            "Size1 tells the largest body"
        );
        let (code, _, _) = exchange(
            &mut u,
            7,
            code::POST,
            &[b1(0, true), (option::SIZE1, 4096)],
            &kib,
        );
        assert_eq!(code, code::REQUEST_ENTITY_TOO_LARGE, "announced too large");
        assert_eq!(
            stats.published.load(Ordering::Relaxed),
            0,
            "nothing in part"
        );
        // SZX 7 is reserved (RFC 7959 section 2.2).
        let (code, _, _) = exchange(&mut u, 8, code::POST, &[(option::BLOCK1, 7)], &kib);
        assert_eq!(code, code::BAD_REQUEST);
    }

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
