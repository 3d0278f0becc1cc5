//! Downlink: an MQTT publish on `<command_prefix>/<peer>/<path>` becomes a
//! CoAP CON request to the peer (RFC 7252), and the answer, or the reason
//! there is none, is published on `<response_prefix>/<peer>/<path>` (or the
//! MQTT 5 Response Topic, with the Correlation Data).
//!
//! - The request goes to the peer's configured `endpoint`, else to the
//!   source of its latest uplink datagram (so NAT rebinding follows), from
//!   the CoAP listen socket itself (port 5683 stays the device's peer port);
//!   to a device last heard from over DTLS, through its session
//!   ([`Transport`], never in plain CoAP).
//! - The message layer's client (`coap::client`) sends it as a CON,
//!   retransmits it (section 4.2) and matches the answer: piggybacked, or
//!   an empty ACK and a separate response (section 5.2.2). No answer after
//!   MAX_RETRANSMIT retransmissions, or no separate response within
//!   `response_timeout` of the empty ACK, is a timeout response.
//! - A payload larger than `[downlink] block_size` goes in Block1 blocks
//!   (RFC 7959 section 2.5), each sent when the device answered the one
//!   before with 2.31 Continue (in the smaller size it may ask for); a
//!   response in Block2 blocks is fetched block by block, checked against
//!   its ETag, and published whole (at most 1 MiB).
//! - One outstanding request per peer (NSTART = 1, section 4.7); more wait
//!   in a short queue (`[downlink] queue_per_peer`).
//! - Sleepy devices (queue mode): a command to a peer with no endpoint yet,
//!   or whose last request timed out, is held (answered `coap-code`
//!   "queued") and sent, in order, as soon as the device is heard from.
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
//! Method `observe` / `unobserve` adds or removes a watch of the path on
//! the device instead (`watching`: the gateway observing devices).
//!
//! The same task sends devices observing topics their notifications
//! (`coap::observe`): one message layer, one Message ID counter per device.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::UdpSocket;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::block::Block;
use super::client::{Client, GaveUp, Reply};
use super::dtls::Outbox;
use super::message::{self, code, option, Message};
use super::observe::{self, Full, ObserveEvent, Observers, RelationId, Sequence, SharedObservers};
use super::params::TransmissionParams;
use super::request::{content_format, content_type};
use super::watch::{SharedWatches, WatchId};
use super::Endpoint;
use crate::config::DownlinkSettings;
use crate::mapping::{Mapper, SharedMapper};
use crate::mqtt::broker::{Broker, Delivery, Session};
use crate::mqtt::codec::{Properties, SubscriptionOptions};
use crate::mqtt::Message as MqttMessage;

/// The largest response fetched in Block2 blocks.
const MAX_RESPONSE_BODY: usize = 1 << 20;
/// Observe relations kept; registrations past it are declined (counted).
pub const MAX_OBSERVERS: usize = 100_000;
/// A notification larger than this carries its first Block2 block; the
/// observer fetches the rest with GET (RFC 7959 section 3.4).
const NOTIFICATION_BLOCK: usize = 1024;

/// The exchanges of the gateway's CoAP client side, in one message layer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// The outstanding request of a command to this peer.
    Command(String),
    /// The CON notification of an Observe relation.
    Notification(RelationId),
    /// The registration of a watch: the gateway observing a device.
    Watch(WatchId),
    /// A GET for the next Block2 block of a watch's notification (RFC 7959
    /// section 3.4).
    WatchBlock(WatchId),
}

mod watching;
pub use watching::Committed;
use watching::Fetch;

/// Downlink counters: what happened to each command taken from the broker.
#[derive(Debug, Default)]
pub struct DownlinkStats {
    /// Commands taken from the broker.
    pub commands: AtomicU64,
    /// First transmissions of a request to a device.
    pub sent: AtomicU64,
    /// Further requests of block-wise transfers: the next Block1 block of
    /// a payload, or the next Block2 block of a response (RFC 7959).
    pub blocks: AtomicU64,
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
    /// Commands waiting behind a peer's outstanding request, or for the
    /// peer to be heard from (a gauge).
    pub waiting: AtomicU64,
    /// Commands held for a peer with no endpoint or whose last request
    /// timed out (answered "queued"), and the times such a peer was heard
    /// from again.
    pub queued: AtomicU64,
    pub wakes: AtomicU64,
    /// Observe (RFC 7641): relations registered, registrations declined
    /// (MAX_OBSERVERS, or the broker's subscription bounds), notifications
    /// sent, relations ended by the observer (deregistration, RST) or by a
    /// CON notification never acknowledged, and the relations now (a gauge).
    pub observe_registrations: AtomicU64,
    pub observe_refused: AtomicU64,
    pub notifications: AtomicU64,
    pub observe_ended: AtomicU64,
    pub observe_timeouts: AtomicU64,
    /// States never sent because a newer one replaced them while a CON
    /// notification was in flight (RFC 7641 section 4.5.2).
    pub notifications_skipped: AtomicU64,
    /// Messages for observed topics the broker dropped because the
    /// endpoint task's session queue was full (its observers missed them).
    pub notifications_dropped: AtomicU64,
    pub observers: AtomicU64,
    /// The gateway observing devices (`[[peer]] observe`, method
    /// `observe`): registrations sent, notifications published, stale or
    /// repeated ones dropped, relations lost (no notification within
    /// Max-Age and a margin, an error answer, no answer, another endpoint),
    /// notifications not published (no topic, storage refused), watches
    /// refused (MAX_WATCHES), and the relations established now (a gauge).
    pub watch_registrations: AtomicU64,
    pub watch_notifications: AtomicU64,
    pub watch_stale: AtomicU64,
    pub watch_lost: AtomicU64,
    pub watch_unpublished: AtomicU64,
    pub watch_refused: AtomicU64,
    pub watching: AtomicU64,
}

impl DownlinkStats {
    /// The snapshot's names that are gauges; the rest only grow.
    pub const GAUGES: &'static [&'static str] = &["waiting", "observers", "watching"];

    /// Every counter by name; [`Self::GAUGES`] are gauges, the rest only grow.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let f = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("commands", f(&self.commands)),
            ("sent", f(&self.sent)),
            ("blocks", f(&self.blocks)),
            ("retransmissions", f(&self.retransmissions)),
            ("answered", f(&self.answered)),
            ("refused", f(&self.refused)),
            ("expired", f(&self.expired)),
            ("timeouts", f(&self.timeouts)),
            ("waiting", f(&self.waiting)),
            ("queued", f(&self.queued)),
            ("wakes", f(&self.wakes)),
            ("observe_registrations", f(&self.observe_registrations)),
            ("observe_refused", f(&self.observe_refused)),
            ("notifications", f(&self.notifications)),
            ("observe_ended", f(&self.observe_ended)),
            ("observe_timeouts", f(&self.observe_timeouts)),
            ("notifications_skipped", f(&self.notifications_skipped)),
            ("notifications_dropped", f(&self.notifications_dropped)),
            ("observers", f(&self.observers)),
            ("watch_registrations", f(&self.watch_registrations)),
            ("watch_notifications", f(&self.watch_notifications)),
            ("watch_stale", f(&self.watch_stale)),
            ("watch_lost", f(&self.watch_lost)),
            ("watch_unpublished", f(&self.watch_unpublished)),
            ("watch_refused", f(&self.watch_refused)),
            ("watching", f(&self.watching)),
        ]
    }
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The latest uplink source of each configured peer, and whether the
/// downlink holds commands until it is heard from.
#[derive(Default)]
pub struct LastSeen(RwLock<HashMap<String, Seen>>);

#[derive(Clone, Copy, Default, PartialEq)]
struct Seen {
    addr: Option<Endpoint>,
    asleep: bool,
    /// A watch of the peer failed: its next uplink is news.
    watches_waiting: bool,
}

impl LastSeen {
    /// Cheap when nothing changed: a read lock and a compare. Peers that
    /// `mapper` no longer has are forgotten once the map holds more entries
    /// than there are peers (so peers added and removed at run time do not
    /// pile up).
    ///
    /// Returns news for the downlink when the peer was asleep (commands
    /// wait for it), its watches wait for it, or it is heard from at a new
    /// address (watches register there); None when nothing changed.
    pub fn note(&self, peer: &str, addr: Endpoint, mapper: &Mapper) -> Option<Heard> {
        let awake = Seen {
            addr: Some(addr),
            asleep: false,
            watches_waiting: false,
        };
        if self.0.read().unwrap().get(peer) == Some(&awake) {
            return None;
        }
        let mut seen = self.0.write().unwrap();
        let was = seen.insert(peer.to_owned(), awake);
        if seen.len() > mapper.peer_count() {
            seen.retain(|name, _| mapper.peer_by_name(name).is_some());
        }
        Some(Heard {
            peer: peer.to_owned(),
            woke: was.is_some_and(|w| w.asleep),
        })
    }

    /// Holds commands for `peer` until it is heard from.
    pub fn sleep(&self, peer: &str) {
        self.mark(peer, |s| s.asleep = true);
    }

    /// Makes `peer`'s next uplink news, even from the same address (its
    /// failed watches register again at once).
    pub fn await_uplink(&self, peer: &str) {
        self.mark(peer, |s| s.watches_waiting = true);
    }

    fn mark(&self, peer: &str, set: impl FnOnce(&mut Seen)) {
        set(self.0.write().unwrap().entry(peer.to_owned()).or_default());
    }

    pub fn is_asleep(&self, peer: &str) -> bool {
        self.0.read().unwrap().get(peer).is_some_and(|s| s.asleep)
    }

    pub fn len(&self) -> usize {
        self.0.read().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, peer: &str) -> Option<Endpoint> {
        self.0.read().unwrap().get(peer).and_then(|s| s.addr)
    }
}

/// A peer heard from at a new address, or after it slept.
#[derive(Debug)]
pub struct Heard {
    pub peer: String,
    /// The downlink held commands for it.
    pub woke: bool,
}

/// Devices observing topics and the gateway observing devices, as the
/// endpoint task keeps them and `ctl observe ls` shows them.
#[derive(Clone)]
pub struct Relations {
    pub observers: SharedObservers,
    pub watches: SharedWatches,
}

impl Default for Relations {
    fn default() -> Relations {
        Relations {
            observers: Arc::new(std::sync::Mutex::new(Observers::new(MAX_OBSERVERS))),
            watches: Default::default(),
        }
    }
}

/// What the CoAP workers share with the downlink.
#[derive(Clone)]
pub struct DownlinkHandle {
    pub last_seen: Arc<LastSeen>,
    /// ACKs, RSTs and responses the workers received.
    pub replies: mpsc::Sender<(Endpoint, Bytes)>,
    /// Observe registrations and deregistrations.
    pub observe: mpsc::Sender<ObserveEvent>,
    /// Peers heard from again, or at a new address.
    pub heard: mpsc::Sender<Heard>,
    pub sequence: Arc<Sequence>,
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

/// A command on its way, and its block-wise transfer if it is one.
struct InFlight {
    command: Command,
    endpoint: Endpoint,
    /// The Block1 block of the payload last sent.
    block1: Option<Block>,
    /// The response so far when it comes in Block2 blocks, and its ETag.
    body: Vec<u8>,
    etag: Option<Vec<u8>>,
}

pub struct Downlink {
    settings: DownlinkSettings,
    stats: Arc<DownlinkStats>,
    broker: Arc<Broker>,
    mappers: Arc<SharedMapper>,
    last_seen: Arc<LastSeen>,
    transport: Transport,
    /// Commands' requests (one outstanding per peer, NSTART = 1) and CON
    /// notifications.
    client: Client<Key>,
    /// The command of each peer's outstanding request.
    in_flight: HashMap<String, InFlight>,
    waiting: HashMap<String, VecDeque<Command>>,
    last_sweep: Instant,
    observers: SharedObservers,
    /// The broker session the observed topics are subscribed in.
    observed: Option<Arc<Session>>,
    /// Observe sequence numbers, shared with the workers.
    sequence: Arc<Sequence>,
    /// The watches: the gateway observing devices.
    watches: SharedWatches,
    /// The mapper generation the watches follow.
    watches_generation: Option<u64>,
    /// CON notifications from watched devices whose publication is being
    /// made durable: acknowledged once it is (never before, so a device
    /// retransmits what was not kept), and not handled twice meanwhile.
    committing: HashSet<(Endpoint, u16)>,
    committed: mpsc::UnboundedSender<Committed>,
    committed_rx: Option<mpsc::UnboundedReceiver<Committed>>,
    /// Notifications larger than a block, their rest being fetched.
    fetches: HashMap<WatchId, Fetch>,
}

impl Downlink {
    /// `shared`: what the workers share with it (the last-seen endpoints,
    /// the Observe sequence).
    pub fn new(
        settings: DownlinkSettings,
        broker: Arc<Broker>,
        mappers: Arc<SharedMapper>,
        shared: &DownlinkHandle,
        transport: Transport,
        stats: Arc<DownlinkStats>,
        relations: Relations,
    ) -> Downlink {
        let params = TransmissionParams {
            ack_timeout: settings.ack_timeout,
            ack_random_factor: settings.ack_random_factor,
            max_retransmit: settings.max_retransmit,
        };
        let (committed, committed_rx) = mpsc::unbounded_channel();
        Downlink {
            client: Client::new(params, settings.response_timeout),
            settings,
            stats,
            broker,
            mappers,
            last_seen: shared.last_seen.clone(),
            transport,
            in_flight: HashMap::new(),
            waiting: HashMap::new(),
            last_sweep: Instant::now(),
            observers: relations.observers,
            observed: None,
            sequence: shared.sequence.clone(),
            watches: relations.watches,
            watches_generation: None,
            committing: HashSet::new(),
            committed,
            committed_rx: Some(committed_rx),
            fetches: HashMap::new(),
        }
    }

    pub async fn run(
        mut self,
        mut replies: mpsc::Receiver<(Endpoint, Bytes)>,
        mut observe: mpsc::Receiver<ObserveEvent>,
        mut heard: mpsc::Receiver<Heard>,
    ) {
        let mut committed = self.committed_rx.take().expect("run once");
        let client_id = Bytes::from_static(b"$m2m-router/downlink");
        let Some(attached) = self.broker.attach(&client_id, true, false).await else {
            tracing::error!("downlink: could not attach to the broker");
            return;
        };
        let observed_id = Bytes::from_static(b"$m2m-router/observe");
        let Some(observed) = self.broker.attach(&observed_id, true, false).await else {
            tracing::error!("observe: could not attach to the broker");
            return;
        };
        let observed = observed.session;
        self.observed = Some(observed.clone());
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
        // Held commands expire even while nothing else happens.
        let mut expiry = tokio::time::interval(Duration::from_secs(1));
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.sync_watches();
        loop {
            let next = match (self.client.next_deadline(), self.next_watch_due()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let wake = tokio::time::Instant::from_std(
                next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
            );
            tokio::select! {
                d = commands.pop() => self.command(d),
                Some((src, datagram)) = replies.recv() => self.reply(src, &datagram),
                Some(event) = observe.recv() => self.observe_event(event),
                Some(heard) = heard.recv() => {
                    if heard.woke {
                        count(&self.stats.wakes);
                        self.next_of(&heard.peer);
                    }
                    self.watch_heard_from(&heard.peer);
                }
                Some(c) = committed.recv() => self.watch_committed(c),
                _ = expiry.tick() => {
                    self.expire_waiting();
                    self.sync_watches();
                }
                d = observed.queue.pop() => {
                    self.dispatch(d);
                    let dropped = observed.dropped.load(Ordering::Relaxed);
                    self.stats.notifications_dropped.store(dropped, Ordering::Relaxed);
                }
                _ = tokio::time::sleep_until(wake), if next.is_some() => {
                    self.timeouts();
                    self.watches_due();
                }
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
        if let Some(m @ ("OBSERVE" | "UNOBSERVE")) = method_name.as_deref() {
            return self.watch_command(&command, m == "OBSERVE");
        }
        command.method = match method_name.as_deref() {
            None | Some("POST") => code::POST,
            Some("GET") => code::GET,
            Some("PUT") => code::PUT,
            Some("DELETE") => code::DELETE,
            Some(other) => {
                let why = format!(
                    "method {other:?} is not one of GET, POST, PUT, DELETE, OBSERVE, UNOBSERVE"
                );
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
            Some(_) => self.endpoint_of(&mapper, peer),
        };
        // Queue mode: no endpoint yet, or the last request timed out.
        let asleep = endpoint.is_none() || self.last_seen.is_asleep(peer);
        let busy = self.client.is_busy(&Key::Command(command.peer.clone()));
        match endpoint {
            Some(endpoint) if !asleep && !busy => self.start(command, endpoint),
            _ => {
                if self.waiting.get(peer).map_or(0, VecDeque::len) >= self.settings.queue_per_peer {
                    return self.refuse(&command, "too many commands waiting for this peer");
                }
                if asleep {
                    self.last_seen.sleep(peer);
                    self.held(&command);
                }
                let peer = peer.to_owned();
                self.waiting.entry(peer).or_default().push_back(command);
                count(&self.stats.waiting);
            }
        }
    }

    /// Tells a command's response topic it is held until the device is
    /// heard from.
    fn held(&self, command: &Command) {
        count(&self.stats.queued);
        let body = serde_json::json!({
            "queued": "the device is asleep or unreachable: the command goes when it is heard from",
            "peer": command.peer,
        });
        self.respond(
            command,
            "queued",
            Bytes::from(body.to_string()),
            Some("application/json"),
        );
    }

    /// Answers `expired` to every waiting command past its time to live.
    fn expire_waiting(&mut self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        for queue in self.waiting.values_mut() {
            let (stale, fresh): (VecDeque<Command>, VecDeque<Command>) =
                queue.drain(..).partition(|c| now > c.expires_at);
            *queue = fresh;
            expired.extend(stale);
        }
        self.waiting.retain(|_, q| !q.is_empty());
        for command in expired {
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            self.expire(&command);
        }
        // A wake lost to a full channel: a peer awake and idle with commands
        // waiting gets them now.
        let ready: Vec<String> = self
            .waiting
            .keys()
            .filter(|p| {
                !self.last_seen.is_asleep(p) && !self.client.is_busy(&Key::Command((*p).clone()))
            })
            .cloned()
            .collect();
        for peer in ready {
            self.next_of(&peer);
        }
    }

    fn expire(&self, command: &Command) {
        count(&self.stats.expired);
        self.respond(
            command,
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
    }

    /// Where `peer`'s device is: its configured endpoint, else where its
    /// latest uplink came from, over DTLS if it did (None if denied or
    /// never heard from).
    fn endpoint_of(&self, mapper: &Mapper, peer: &str) -> Option<Endpoint> {
        mapper
            .peer_by_name(peer)
            .filter(|p| !p.deny)
            .and_then(|p| p.endpoint.or_else(|| self.last_seen.get(peer)))
    }

    fn start(&mut self, command: Command, endpoint: Endpoint) {
        let size = self.settings.block_size;
        let block1 = (command.payload.len() > size).then(|| Block {
            num: 0,
            more: true,
            szx: Block::szx_for(size),
        });
        let flight = InFlight {
            command,
            endpoint,
            block1,
            body: Vec::new(),
            etag: None,
        };
        self.request(&flight, None);
        count(&self.stats.sent);
        self.in_flight.insert(flight.command.peer.clone(), flight);
    }

    /// Sends the command's request: whole, or its current Block1 block, or
    /// (asking for block `block2` of the response) without a payload.
    fn request(&mut self, flight: &InFlight, block2: Option<Block>) {
        let c = &flight.command;
        let mut opts: Vec<(u16, &[u8])> = c
            .path
            .iter()
            .map(|s| (option::URI_PATH, s.as_bytes()))
            .collect();
        let (mut cf, mut b1, mut b2, mut s1) = ([0u8; 4], [0u8; 4], [0u8; 4], [0u8; 4]);
        let mut payload = &c.payload[..];
        if let Some(b) = block2 {
            payload = &[];
            opts.push((option::BLOCK2, message::uint_bytes(b.value(), &mut b2)));
        } else {
            if let Some(f) = c.content_format {
                opts.push((
                    option::CONTENT_FORMAT,
                    message::uint_bytes(u32::from(f), &mut cf),
                ));
            }
            if let Some(b) = flight.block1 {
                let end = (b.offset() + b.size()).min(payload.len());
                payload = &payload[b.offset()..end];
                opts.push((option::BLOCK1, message::uint_bytes(b.value(), &mut b1)));
                if b.num == 0 {
                    // The whole size, so the device can refuse it at once
                    // (RFC 7959 section 4).
                    let total = c.payload.len() as u32;
                    opts.push((option::SIZE1, message::uint_bytes(total, &mut s1)));
                }
            }
        }
        // Options in ascending order (RFC 7252 section 3.1).
        opts.sort_by_key(|o| o.0);
        let datagram = self.client.request(
            Key::Command(c.peer.clone()),
            flight.endpoint,
            c.method,
            &opts,
            payload,
            Instant::now(),
        );
        self.transport.send(flight.endpoint, datagram);
    }

    /// A response to one block: asks for the next one if the transfer goes
    /// on (Ok(true)); Ok(false) when the command is answered.
    fn proceed(&mut self, flight: &mut InFlight, response: &Message) -> Result<bool, String> {
        let block_option = |number| {
            response
                .options()
                .find(|(n, _)| *n == number)
                .and_then(|(_, v)| Block::parse(v))
        };
        // RFC 7959 section 2.5: 2.31 Continue asks for the next block of
        // the payload, in the size the device prefers if it is smaller.
        if let Some(sent) = flight.block1 {
            // A success to a block that is not the last goes on too if it
            // echoes the block with more to come (a device that processes
            // blocks as they come, section 2.5).
            let echoed_more = block_option(option::BLOCK1).is_some_and(|b| b.more);
            let success = response.code >> 5 == 2;
            if sent.more && success && response.code != code::CONTINUE && !echoed_more {
                return Err(format!(
                    "the device ended the transfer with {} after block {} of the payload",
                    coap_code(response.code),
                    sent.num
                ));
            }
            if response.code == code::CONTINUE || (sent.more && success) {
                if !sent.more {
                    return Err("the device answered 2.31 Continue to the last block".into());
                }
                let szx = block_option(option::BLOCK1).map_or(sent.szx, |b| b.szx.min(sent.szx));
                let offset = sent.offset() + sent.size();
                let size = 16usize << szx;
                flight.block1 = Some(Block {
                    num: (offset / size) as u32,
                    more: offset + size < flight.command.payload.len(),
                    szx,
                });
                self.request(flight, None);
                count(&self.stats.blocks);
                return Ok(true);
            }
        }
        // Section 2.4: a response in Block2 blocks is fetched whole.
        let Some(b2) = block_option(option::BLOCK2) else {
            if !flight.body.is_empty() {
                return Err(format!(
                    "the device broke off its block-wise response with {}",
                    coap_code(response.code)
                ));
            }
            return Ok(false);
        };
        if b2.offset() != flight.body.len() {
            return Err(format!(
                "the device sent response block {} where block {} was due",
                b2.num,
                flight.body.len() / b2.size()
            ));
        }
        let etag = response
            .options()
            .find(|(n, _)| *n == option::ETAG)
            .map(|(_, v)| v.to_vec());
        if flight.body.is_empty() {
            flight.etag = etag;
        } else if flight.etag != etag {
            return Err("the response changed while it was fetched in blocks (ETag)".into());
        }
        flight.body.extend_from_slice(response.payload);
        if flight.body.len() > MAX_RESPONSE_BODY {
            return Err(format!(
                "the response is larger than {MAX_RESPONSE_BODY} bytes"
            ));
        }
        if !b2.more {
            return Ok(false);
        }
        let next = Block {
            num: b2.num + 1,
            more: false,
            szx: b2.szx,
        };
        self.request(flight, Some(next));
        count(&self.stats.blocks);
        Ok(true)
    }

    /// Drops the client's expired state, at most once a second.
    fn sweep(&mut self, now: Instant) {
        if now.duration_since(self.last_sweep) > Duration::from_secs(1) {
            self.client.sweep(now);
            self.last_sweep = now;
        }
    }

    fn timeouts(&mut self) {
        self.sweep(Instant::now());
        let (transport, stats) = (&self.transport, &self.stats);
        let gave_up = self.client.expire(Instant::now(), |to, datagram| {
            transport.send(to, datagram);
            count(&stats.retransmissions);
        });
        for GaveUp {
            key,
            acknowledged,
            transmissions,
        } in gave_up
        {
            let peer = match key {
                Key::Command(peer) => peer,
                Key::Watch(id) => {
                    self.watch_failed(id, "no answer to the registration");
                    continue;
                }
                Key::WatchBlock(id) => {
                    self.abandon_fetch(id, "no answer to a Block2 GET");
                    continue;
                }
                Key::Notification(id) => {
                    // RFC 7641 section 4.5: an observer that does not
                    // acknowledge a CON notification is gone.
                    count(&self.stats.observe_timeouts);
                    self.end_relation(id);
                    continue;
                }
            };
            count(&self.stats.timeouts);
            let why = if acknowledged {
                "timeout: the peer acknowledged but sent no response".to_owned()
            } else {
                format!("timeout: no answer after {transmissions} transmissions")
            };
            if let Some(flight) = self.in_flight.remove(&peer) {
                self.fail(&flight.command, &why);
            }
            // Queue mode: what waits for this peer is held until it is
            // heard from.
            self.last_seen.sleep(&peer);
            if let Some(queue) = self.waiting.get(&peer) {
                for command in queue {
                    self.held(command);
                }
            }
        }
    }

    fn reply(&mut self, src: Endpoint, datagram: &[u8]) {
        let Ok(msg) = Message::decode(datagram) else {
            return;
        };
        let now = Instant::now();
        self.sweep(now);
        let mut out = Vec::new();
        let reply = self.client.receive(src, &msg, now, &mut out);
        if !out.is_empty() {
            self.transport.send(src, &out);
        }
        let (peer, answer) = match reply {
            Reply::Response(Key::Watch(id), m) => return self.watched(id, src, &m, false),
            Reply::Notification(Key::Watch(id), m) => return self.watched(id, src, &m, true),
            Reply::Reset(Key::Watch(id)) => {
                return self.watch_failed(id, "the device reset the registration (RST)")
            }
            Reply::Response(Key::WatchBlock(id), m) => return self.watch_block(id, &m),
            Reply::Reset(Key::WatchBlock(id)) => {
                return self.abandon_fetch(id, "the device reset a Block2 GET (RST)")
            }
            Reply::Acknowledged(Key::Watch(_) | Key::WatchBlock(_)) | Reply::Notification(..) => {
                return
            }
            Reply::Acknowledged(Key::Notification(id)) => return self.acknowledged(id),
            Reply::Reset(Key::Notification(id)) => {
                count(&self.stats.observe_ended);
                return self.end_relation(id);
            }
            Reply::Nothing if msg.mtype == message::RST => {
                // An RST to a NON notification ends its relation (RFC 7641
                // section 3.6).
                let found = self.relations().by_non_mid(src, msg.mid);
                if let Some(id) = found {
                    count(&self.stats.observe_ended);
                    self.end_relation(id);
                }
                return;
            }
            Reply::Acknowledged(_) | Reply::Nothing | Reply::Response(Key::Notification(_), _) => {
                return
            }
            Reply::Reset(Key::Command(peer)) => (peer, None),
            Reply::Response(Key::Command(peer), response) => (peer, Some(response)),
        };
        let Some(mut flight) = self.in_flight.remove(&peer) else {
            return self.next_of(&peer);
        };
        let Some(response) = answer else {
            count(&self.stats.answered);
            self.fail(&flight.command, "the peer reset the request (RST)");
            return self.next_of(&peer);
        };
        match self.proceed(&mut flight, &response) {
            // The next block is on its way.
            Ok(true) => {
                self.in_flight.insert(peer, flight);
                return;
            }
            Ok(false) => {
                count(&self.stats.answered);
                let format = response
                    .options()
                    .find(|(n, _)| *n == option::CONTENT_FORMAT)
                    .and_then(|(_, v)| message::uint_option(v));
                let payload = if flight.body.is_empty() {
                    Bytes::copy_from_slice(response.payload)
                } else {
                    Bytes::from(std::mem::take(&mut flight.body))
                };
                self.respond(
                    &flight.command,
                    &coap_code(response.code),
                    payload,
                    format.and_then(|f| content_type(f as u16)),
                );
            }
            Err(why) => {
                count(&self.stats.answered);
                self.fail(&flight.command, &why);
            }
        }
        self.next_of(&peer);
    }

    /// An Observe registration or deregistration a worker passed on.
    fn observe_event(&mut self, event: ObserveEvent) {
        let broker = self.broker.clone();
        let Some(session) = self.observed.clone() else {
            return;
        };
        match event {
            ObserveEvent::Register {
                endpoint,
                token,
                topic,
                sent,
            } => {
                // What was published before this registration goes to the
                // relations that existed then: the new observer must not
                // get a state older than its registration's answer.
                while let Some(d) = session.queue.try_pop() {
                    self.dispatch(d);
                }
                let now = Instant::now();
                let result = self
                    .relations()
                    .register(endpoint, &token, topic.clone(), now);
                let registered = match result {
                    Ok(registered) => registered,
                    Err(Full) => return self.decline(endpoint, &token),
                };
                let id = registered.id;
                if let Some(replaced) = registered.replaced {
                    self.client.cancel(&Key::Notification(replaced));
                }
                if let Some(left) = registered.unsubscribe {
                    broker.unsubscribe(&session, &left);
                }
                if registered.subscribe {
                    let options = SubscriptionOptions {
                        qos: 1,
                        no_local: false,
                        retain_as_published: false,
                        retain_handling: 2,
                    };
                    if broker
                        .subscribe(&session, topic.clone(), options, None)
                        .is_none()
                    {
                        self.relations().remove(id);
                        return self.decline(endpoint, &token);
                    }
                }
                count(&self.stats.observe_registrations);
                self.stats
                    .observers
                    .store(self.relations().len() as u64, Ordering::Relaxed);
                // A state published after the worker answered and before
                // the subscription took effect is notified now.
                let current = broker
                    .last_value(&topic)
                    .or_else(|| broker.retained(&topic));
                if let Some(m) = current {
                    if Some(crc32fast::hash(&m.payload)) != sent {
                        self.notify(id, m, 0);
                    }
                }
            }
            ObserveEvent::Deregister { endpoint, token } => {
                let found = self.relations().find(endpoint, &token);
                if let Some(id) = found {
                    count(&self.stats.observe_ended);
                    self.end_relation(id);
                }
            }
        }
    }

    /// A message published on an observed topic, to each of its observers.
    fn dispatch(&mut self, d: Delivery) {
        let observing = self.relations().on(&d.message.topic);
        for id in observing {
            self.notify(id, d.message.clone(), d.qos);
        }
    }

    /// A registration the worker answered but that cannot be kept (too many
    /// relations, or the broker's subscription bounds): a 5.03 response
    /// with its token ends the observation at the device (RFC 7641 section
    /// 3.2: a notification that is not 2.xx ends it).
    fn decline(&mut self, endpoint: Endpoint, token: &[u8]) {
        count(&self.stats.observe_refused);
        let mid = self.client.mid(endpoint, Instant::now());
        let mut datagram = Vec::with_capacity(16);
        message::encode(
            &mut datagram,
            message::NON,
            code::SERVICE_UNAVAILABLE,
            mid,
            token,
            &[],
            &[],
        );
        self.transport.send(endpoint, &datagram);
    }

    /// Sends relation `id` the state `m` (published at `qos`): CON for QoS
    /// 1 and up and once a day, NON otherwise; while a CON is in flight the
    /// newest state waits in its place.
    fn notify(&mut self, id: RelationId, m: crate::mqtt::Message, qos: u8) {
        let now = Instant::now();
        let mut relations = self.observers.lock().unwrap();
        let Some(r) = relations.get_mut(id) else {
            return;
        };
        if r.in_flight {
            let qos = r.pending.as_ref().map_or(qos, |(_, q)| qos.max(*q));
            if r.pending.replace((m, qos)).is_some() {
                count(&self.stats.notifications_skipped);
            }
            return;
        }
        let confirmable = r.next(qos, now);
        let seq = self.sequence.next();
        let value = &m.payload[..];
        let (mut obs, mut cf, mut age, mut b2, mut s2) =
            ([0u8; 4], [0u8; 4], [0u8; 4], [0u8; 4], [0u8; 4]);
        let etag;
        let mut opts: Vec<(u16, &[u8])> = Vec::with_capacity(6);
        let mut payload = value;
        let large = value.len() > NOTIFICATION_BLOCK;
        if large {
            etag = crc32fast::hash(value).to_be_bytes();
            opts.push((option::ETAG, &etag));
        }
        opts.push((option::OBSERVE, message::uint_bytes(seq, &mut obs)));
        if let Some(f) = m.content_type.as_deref().and_then(content_format) {
            opts.push((
                option::CONTENT_FORMAT,
                message::uint_bytes(u32::from(f), &mut cf),
            ));
        }
        opts.push((
            option::MAX_AGE,
            message::uint_bytes(observe::MAX_AGE, &mut age),
        ));
        if large {
            let first = Block {
                num: 0,
                more: true,
                szx: Block::szx_for(NOTIFICATION_BLOCK),
            };
            payload = &value[..first.size()];
            opts.push((option::BLOCK2, message::uint_bytes(first.value(), &mut b2)));
            opts.push((
                option::SIZE2,
                message::uint_bytes(value.len() as u32, &mut s2),
            ));
        }
        let endpoint = r.endpoint;
        if confirmable {
            r.in_flight = true;
            let datagram = self.client.confirm(
                Key::Notification(id),
                endpoint,
                code::CONTENT,
                &r.token,
                &opts,
                payload,
                now,
            );
            self.transport.send(endpoint, datagram);
        } else {
            let mid = self.client.mid(endpoint, now);
            let mut datagram = Vec::with_capacity(64 + payload.len());
            message::encode(
                &mut datagram,
                message::NON,
                code::CONTENT,
                mid,
                &r.token,
                &opts,
                payload,
            );
            self.transport.send(endpoint, &datagram);
            relations.sent_non(id, mid);
        }
        count(&self.stats.notifications);
    }

    /// A CON notification was acknowledged: the state that waited, if any,
    /// goes now.
    fn acknowledged(&mut self, id: RelationId) {
        let pending = {
            let mut relations = self.relations();
            let Some(r) = relations.get_mut(id) else {
                return;
            };
            r.in_flight = false;
            r.pending.take()
        };
        if let Some((m, qos)) = pending {
            self.notify(id, m, qos);
        }
    }

    /// The relations, shared with the control socket (`observe ls`): locked
    /// for one statement at a time, never across a call that locks again.
    fn relations(&self) -> std::sync::MutexGuard<'_, Observers> {
        self.observers.lock().unwrap()
    }

    fn end_relation(&mut self, id: RelationId) {
        self.client.cancel(&Key::Notification(id));
        let left = self.relations().remove(id);
        if let Some(topic) = left {
            if let Some(session) = &self.observed {
                self.broker.unsubscribe(session, &topic);
            }
        }
        self.stats
            .observers
            .store(self.relations().len() as u64, Ordering::Relaxed);
    }

    fn next_of(&mut self, peer: &str) {
        if self.last_seen.is_asleep(peer) || self.client.is_busy(&Key::Command(peer.to_owned())) {
            return; // held until it is heard from, or its request is answered
        }
        while let Some(command) = self.waiting.get_mut(peer).and_then(VecDeque::pop_front) {
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            if Instant::now() > command.expires_at {
                self.expire(&command);
                continue;
            }
            let (_, mapper) = self.mappers.load();
            match self.endpoint_of(&mapper, peer) {
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

/// Sends from the CoAP socket of `to`'s address family.
/// How the downlink reaches devices: plain CoAP from the CoAP listen
/// sockets (port 5683 stays the device's peer port), and DTLS sessions
/// through the CoAPS worker that holds them.
pub struct Transport {
    pub sockets: Vec<UdpSocket>,
    pub secure: Option<Outbox>,
}

impl Transport {
    fn send(&self, to: Endpoint, datagram: &[u8]) {
        if to.secure {
            match &self.secure {
                Some(outbox) => outbox.send(to.addr, datagram),
                None => tracing::warn!(%to, "downlink: no CoAPS worker"),
            }
            return;
        }
        let socket = self.sockets.iter().find(|s| {
            s.local_addr()
                .is_ok_and(|a| a.is_ipv4() == to.addr.is_ipv4())
        });
        match socket {
            Some(s) => {
                if let Err(err) = s.send_to(datagram, to.addr) {
                    tracing::warn!(%to, %err, "downlink send failed");
                }
            }
            None => tracing::warn!(%to, "downlink: no CoAP socket of this address family"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn mapper(names: &[&str]) -> Mapper {
        let text: String = names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("[[peer]]\nname = \"{n}\"\nprefix = [\"10.0.0.{i}/32\"]\n"))
            .collect();
        Mapper::from_config(&Config::parse(&text).unwrap())
    }

    /// Peers added and removed at run time (the soak adds and removes one
    /// every second) must not pile up in the last-seen map.
    #[test]
    fn last_seen_forgets_removed_peers() {
        let seen = LastSeen::default();
        let addr = Endpoint::plain("10.0.0.1:5683".parse().unwrap());
        let before = mapper(&["a", "b"]);
        seen.note("a", addr, &before);
        seen.note("b", addr, &before);
        let after = mapper(&["b", "c"]);
        seen.note("c", addr, &after);
        assert_eq!(seen.len(), 2);
        assert_eq!(seen.get("a"), None);
        assert_eq!(seen.get("b"), Some(addr));
    }
}
