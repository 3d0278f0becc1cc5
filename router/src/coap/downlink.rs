//! Downlink: an MQTT publish on `<command_prefix>/<peer>/<path>` becomes a
//! CoAP CON request to the peer (RFC 7252), and the answer, or the reason
//! there is none, is published on `<response_prefix>/<peer>/<path>` (or the
//! MQTT 5 Response Topic, with the Correlation Data).
//!
//! - The request goes to the peer's configured `endpoint`, else to the
//!   source of its latest uplink datagram (so NAT rebinding follows), from
//!   the CoAP listen socket itself (port 5683 stays the device's peer port).
//! - Retransmission per section 4.2: first timeout random in
//!   [ACK_TIMEOUT, ACK_TIMEOUT x ACK_RANDOM_FACTOR], doubled each time,
//!   MAX_RETRANSMIT retransmissions, then a timeout response.
//! - Piggybacked responses and empty ACK + separate response (section
//!   5.2.2; a CON separate response is acknowledged, and again if repeated,
//!   but published once) are both handled.
//! - One outstanding request per peer (NSTART = 1, section 4.7); more wait
//!   in a short queue.
//! - The fast-path policy applies: a denied or unknown peer is refused with
//!   an error response, nothing is sent.
//! - A command is sent only while it is fresh: one that waited longer than
//!   `[downlink] command_ttl_s`, or than its MQTT 5 Message Expiry
//!   Interval, is answered with `coap-code` "expired" and never sent (the
//!   wait is counted from when the downlink took it from the broker).
//!
//! Method: POST, or the MQTT 5 user property `method` (GET, POST, PUT,
//! DELETE). Responses carry the user property `coap-code` ("2.05", or
//! "error" for a refusal or timeout, whose payload explains in JSON).

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::coap::message::{self, code, option, Message, ACK, CON, NON, RST};
use crate::coap::request::{content_format, content_type};
use crate::config::DownlinkSettings;
use crate::mapping::SharedMapper;
use crate::mqtt::broker::{Broker, Delivery};
use crate::mqtt::codec::{Properties, SubscriptionOptions};
use crate::mqtt::Message as MqttMessage;

/// Commands waiting per peer behind the outstanding one.
const QUEUE_PER_PEER: usize = 16;

/// Downlink counters: what happened to each command taken from the broker.
#[derive(Debug, Default)]
pub struct DownlinkStats {
    /// Commands taken from the broker.
    pub commands: AtomicU64,
    /// First transmissions of a request to a device.
    pub sent: AtomicU64,
    pub retransmissions: AtomicU64,
    /// Requests a device answered (a response or RST).
    pub answered: AtomicU64,
    /// Commands refused without being sent (policy, unknown peer, a full
    /// queue, a bad method).
    pub refused: AtomicU64,
    /// Commands that waited past their time to live and were not sent.
    pub expired: AtomicU64,
    /// Requests no answer came for.
    pub timeouts: AtomicU64,
    /// Commands waiting behind a peer's outstanding request (a gauge).
    pub waiting: AtomicU64,
}

impl DownlinkStats {
    /// Every counter by name; `waiting` is a gauge, the rest only grow.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let f = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("commands", f(&self.commands)),
            ("sent", f(&self.sent)),
            ("retransmissions", f(&self.retransmissions)),
            ("answered", f(&self.answered)),
            ("refused", f(&self.refused)),
            ("expired", f(&self.expired)),
            ("timeouts", f(&self.timeouts)),
            ("waiting", f(&self.waiting)),
        ]
    }
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The latest uplink source of each named peer.
#[derive(Default)]
pub struct LastSeen(RwLock<HashMap<String, SocketAddr>>);

impl LastSeen {
    /// Cheap when nothing changed: a read lock and a compare.
    pub fn note(&self, peer: &str, addr: SocketAddr) {
        if self.0.read().unwrap().get(peer) == Some(&addr) {
            return;
        }
        self.0.write().unwrap().insert(peer.to_owned(), addr);
    }

    pub fn get(&self, peer: &str) -> Option<SocketAddr> {
        self.0.read().unwrap().get(peer).copied()
    }
}

/// What the CoAP workers share with the downlink.
#[derive(Clone)]
pub struct DownlinkHandle {
    pub last_seen: Arc<LastSeen>,
    /// ACKs, RSTs and responses the workers received.
    pub replies: mpsc::Sender<(SocketAddr, Bytes)>,
}

struct Command {
    peer: String,
    path: Vec<String>,
    method: u8,
    payload: Bytes,
    content_format: Option<u16>,
    response_topic: Bytes,
    correlation: Option<Bytes>,
    /// After this it is answered "expired" instead of being sent.
    expires_at: Instant,
}

struct Exchange {
    command: Command,
    endpoint: SocketAddr,
    mid: u16,
    token: [u8; 4],
    datagram: Vec<u8>,
    retransmissions: u32,
    timeout: Duration,
    next_at: Instant,
    /// Set by an empty ACK: now only the separate response is awaited.
    acked: bool,
}

pub struct Downlink {
    settings: DownlinkSettings,
    stats: Arc<DownlinkStats>,
    broker: Arc<Broker>,
    mappers: Arc<SharedMapper>,
    last_seen: Arc<LastSeen>,
    sockets: Vec<UdpSocket>,
    outstanding: HashMap<String, Exchange>,
    waiting: HashMap<String, VecDeque<Command>>,
    /// Recently answered separate CON responses, to re-ACK duplicates.
    answered: VecDeque<(SocketAddr, u16)>,
    next_mid: u16,
    next_token: u32,
}

impl Downlink {
    pub fn new(
        settings: DownlinkSettings,
        broker: Arc<Broker>,
        mappers: Arc<SharedMapper>,
        last_seen: Arc<LastSeen>,
        sockets: Vec<UdpSocket>,
        stats: Arc<DownlinkStats>,
    ) -> Downlink {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        Downlink {
            settings,
            stats,
            broker,
            mappers,
            last_seen,
            sockets,
            outstanding: HashMap::new(),
            waiting: HashMap::new(),
            answered: VecDeque::new(),
            next_mid: seed as u16,
            next_token: seed,
        }
    }

    pub async fn run(mut self, mut replies: mpsc::Receiver<(SocketAddr, Bytes)>) {
        let client_id = Bytes::from_static(b"$m2m-router/downlink");
        let Some(attached) = self.broker.attach(&client_id, true, false).await else {
            tracing::error!("downlink: could not attach to the broker");
            return;
        };
        let filter = Bytes::from(format!("{}/#", self.settings.command_prefix));
        let options = SubscriptionOptions {
            qos: 1,
            no_local: false,
            retain_as_published: false,
            retain_handling: 2,
        };
        self.broker
            .subscribe(&attached.session, filter, options, None);
        let commands = &attached.session.queue;
        tracing::info!(prefix = %self.settings.command_prefix, "downlink commands enabled");
        loop {
            let next = self.outstanding.values().map(|e| e.next_at).min();
            tokio::select! {
                d = commands.pop() => self.command(d),
                Some((src, datagram)) = replies.recv() => self.reply(src, &datagram),
                _ = tokio::time::sleep_until(next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))), if next.is_some() => self.timeouts(),
            }
        }
    }

    fn command(&mut self, d: Delivery) {
        count(&self.stats.commands);
        let props = d.message.properties.clone();
        let topic = String::from_utf8_lossy(&d.message.topic).into_owned();
        let rest = topic
            .strip_prefix(&self.settings.command_prefix)
            .and_then(|r| r.strip_prefix('/'))
            .unwrap_or("");
        let (peer, path) = rest.split_once('/').unwrap_or((rest, ""));
        let path: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let response_topic = props
            .as_ref()
            .and_then(|p| p.response_topic.clone())
            .unwrap_or_else(|| {
                let mut t = format!("{}/{peer}", self.settings.response_prefix);
                for seg in &path {
                    t.push('/');
                    t.push_str(seg);
                }
                Bytes::from(t)
            });
        let method_name = props.as_ref().and_then(|p| {
            p.user_properties
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(b"method"))
                .map(|(_, v)| String::from_utf8_lossy(v).to_ascii_uppercase())
        });
        let mut command = Command {
            peer: peer.to_owned(),
            path,
            method: code::POST,
            payload: d.message.payload.clone(),
            content_format: d.message.content_type.as_deref().and_then(content_format),
            response_topic,
            correlation: props.as_ref().and_then(|p| p.correlation_data.clone()),
            expires_at: Instant::now()
                + props
                    .as_ref()
                    .and_then(|p| p.message_expiry)
                    .map(|s| Duration::from_secs(u64::from(s)))
                    .map_or(self.settings.command_ttl, |e| {
                        e.min(self.settings.command_ttl)
                    }),
        };
        command.method = match method_name.as_deref() {
            None | Some("POST") => code::POST,
            Some("GET") => code::GET,
            Some("PUT") => code::PUT,
            Some("DELETE") => code::DELETE,
            Some(other) => {
                let why = format!("method {other:?} is not one of GET, POST, PUT, DELETE");
                return self.refuse(&command, &why);
            }
        };
        if peer.is_empty() {
            return self.refuse(&command, "the command topic names no peer");
        }
        let (_, mapper) = self.mappers.load();
        let endpoint = match mapper.peer_by_name(peer) {
            None => {
                return self.refuse(
                    &command,
                    "unknown peer: commands go only to configured peers",
                )
            }
            Some(info) if info.deny => {
                return self.refuse(&command, "the peer is denied by policy")
            }
            Some(info) => info.endpoint.or_else(|| self.last_seen.get(peer)),
        };
        let Some(endpoint) = endpoint else {
            return self.refuse(
                &command,
                "the peer has sent no uplink yet and has no endpoint configured",
            );
        };
        if self.outstanding.contains_key(peer) {
            let queue = self.waiting.entry(peer.to_owned()).or_default();
            if queue.len() >= QUEUE_PER_PEER {
                return self.refuse(&command, "too many commands waiting for this peer");
            }
            queue.push_back(command);
            count(&self.stats.waiting);
            return;
        }
        self.start(command, endpoint);
    }

    fn start(&mut self, command: Command, endpoint: SocketAddr) {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_token = self
            .next_token
            .wrapping_mul(1_103_515_245)
            .wrapping_add(12_345);
        let (mid, token) = (self.next_mid, self.next_token.to_be_bytes());
        let mut opts: Vec<(u16, &[u8])> = command
            .path
            .iter()
            .map(|s| (option::URI_PATH, s.as_bytes()))
            .collect();
        let mut cf = [0u8; 4];
        if let Some(f) = command.content_format {
            opts.push((
                option::CONTENT_FORMAT,
                message::uint_bytes(u32::from(f), &mut cf),
            ));
        }
        let mut datagram = Vec::new();
        message::encode(
            &mut datagram,
            CON,
            command.method,
            mid,
            &token,
            &opts,
            &command.payload,
        );
        // Section 4.2: the first timeout is random in [T, T x factor].
        let spread =
            f64::from(self.next_token % 1000) / 1000.0 * (self.settings.ack_random_factor - 1.0);
        let timeout = self.settings.ack_timeout.mul_f64(1.0 + spread);
        let exchange = Exchange {
            endpoint,
            mid,
            token,
            datagram,
            retransmissions: 0,
            timeout,
            next_at: Instant::now() + timeout,
            acked: false,
            command,
        };
        self.send(endpoint, &exchange.datagram);
        count(&self.stats.sent);
        self.outstanding
            .insert(exchange.command.peer.clone(), exchange);
    }

    fn send(&self, to: SocketAddr, datagram: &[u8]) {
        let socket = self
            .sockets
            .iter()
            .find(|s| s.local_addr().is_ok_and(|a| a.is_ipv4() == to.is_ipv4()));
        match socket {
            Some(s) => {
                if let Err(err) = s.send_to(datagram, to) {
                    tracing::warn!(%to, %err, "downlink send failed");
                }
            }
            None => tracing::warn!(%to, "downlink: no CoAP socket of this address family"),
        }
    }

    fn timeouts(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .outstanding
            .iter()
            .filter(|(_, e)| e.next_at <= now)
            .map(|(p, _)| p.clone())
            .collect();
        for peer in due {
            let e = self.outstanding.get_mut(&peer).unwrap();
            if !e.acked && e.retransmissions < self.settings.max_retransmit {
                e.retransmissions += 1;
                e.timeout *= 2;
                e.next_at = now + e.timeout;
                let (to, datagram) = (e.endpoint, e.datagram.clone());
                self.send(to, &datagram);
                count(&self.stats.retransmissions);
                continue;
            }
            let e = self.outstanding.remove(&peer).unwrap();
            count(&self.stats.timeouts);
            let why = if e.acked {
                "timeout: the peer acknowledged but sent no response".to_owned()
            } else {
                format!(
                    "timeout: no answer after {} transmissions",
                    e.retransmissions + 1
                )
            };
            self.fail(&e.command, &why);
            self.next_of(&peer);
        }
    }

    fn reply(&mut self, src: SocketAddr, datagram: &[u8]) {
        let Ok(msg) = Message::decode(datagram) else {
            return;
        };
        // A repeated separate response we answered already: ACK it again.
        if msg.mtype == CON && self.answered.contains(&(src, msg.mid)) {
            self.empty(ACK, src, msg.mid);
            return;
        }
        let found = self.outstanding.iter().find(|(_, e)| {
            e.endpoint == src
                && match msg.mtype {
                    ACK | RST => e.mid == msg.mid,
                    _ => msg.token == e.token,
                }
        });
        let Some(peer) = found.map(|(p, _)| p.clone()) else {
            if msg.mtype == CON {
                self.empty(RST, src, msg.mid); // section 4.2: nothing to match
            }
            return;
        };
        match (msg.mtype, msg.code) {
            (ACK, code::EMPTY) => {
                let e = self.outstanding.get_mut(&peer).unwrap();
                e.acked = true;
                e.next_at = Instant::now() + self.settings.response_timeout;
            }
            (RST, _) => {
                count(&self.stats.answered);
                let e = self.outstanding.remove(&peer).unwrap();
                self.fail(&e.command, "the peer reset the request (RST)");
                self.next_of(&peer);
            }
            (ACK | CON | NON, c) if c >> 5 >= 2 => {
                if msg.mtype == CON {
                    self.empty(ACK, src, msg.mid);
                    self.answered.push_back((src, msg.mid));
                    if self.answered.len() > 256 {
                        self.answered.pop_front();
                    }
                }
                count(&self.stats.answered);
                let e = self.outstanding.remove(&peer).unwrap();
                let format = msg
                    .options()
                    .find(|(n, _)| *n == option::CONTENT_FORMAT)
                    .and_then(|(_, v)| message::uint_option(v));
                self.respond(
                    &e.command,
                    &coap_code(c),
                    Bytes::copy_from_slice(msg.payload),
                    format.and_then(|f| content_type(f as u16)),
                );
                self.next_of(&peer);
            }
            _ => {}
        }
    }

    fn empty(&self, mtype: u8, to: SocketAddr, mid: u16) {
        let mut out = Vec::with_capacity(4);
        message::encode(&mut out, mtype, code::EMPTY, mid, &[], &[], &[]);
        self.send(to, &out);
    }

    fn next_of(&mut self, peer: &str) {
        while let Some(command) = self.waiting.get_mut(peer).and_then(VecDeque::pop_front) {
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            if Instant::now() > command.expires_at {
                count(&self.stats.expired);
                self.respond(
                    &command,
                    "expired",
                    Bytes::from(
                        serde_json::json!({
                            "error": "expired: the command waited longer than its time to live and was not sent",
                            "peer": command.peer,
                        })
                        .to_string(),
                    ),
                    Some("application/json"),
                );
                continue;
            }
            let (_, mapper) = self.mappers.load();
            let endpoint = mapper
                .peer_by_name(peer)
                .filter(|i| !i.deny)
                .and_then(|i| i.endpoint.or_else(|| self.last_seen.get(peer)));
            match endpoint {
                Some(ep) => return self.start(command, ep),
                None => self.refuse(&command, "the peer is no longer reachable by policy"),
            }
        }
        // Nothing waits for this peer: its (empty) queue goes too, so the
        // map holds only peers with commands waiting.
        self.waiting.remove(peer);
    }

    /// Answers a command that will not be sent.
    fn refuse(&self, command: &Command, why: &str) {
        count(&self.stats.refused);
        self.fail(command, why);
    }

    /// Answers a command with an error.
    fn fail(&self, command: &Command, why: &str) {
        let body = serde_json::json!({ "error": why, "peer": command.peer }).to_string();
        self.respond(
            command,
            "error",
            Bytes::from(body),
            Some("application/json"),
        );
    }

    fn respond(
        &self,
        command: &Command,
        coap_code: &str,
        payload: Bytes,
        media_type: Option<&'static str>,
    ) {
        let properties = Properties {
            correlation_data: command.correlation.clone(),
            user_properties: vec![(
                Bytes::from_static(b"coap-code"),
                Bytes::from(coap_code.to_owned()),
            )],
            ..Properties::default()
        };
        let message = MqttMessage {
            topic: command.response_topic.clone(),
            payload,
            qos: 1,
            retain: false,
            content_type: media_type.map(|t| Bytes::from_static(t.as_bytes())),
            properties: Some(Arc::new(properties)),
        };
        // Nobody waits for a response: the writer thread commits it.
        if let Err(err) = self.broker.publish_deferred(message, None) {
            tracing::warn!(%err, "downlink: publishing a response failed");
        }
    }
}

/// "2.05" for 0x45.
fn coap_code(c: u8) -> String {
    format!("{}.{:02}", c >> 5, c & 0x1f)
}
