//! The embedded broker's shared state: sessions, their subscriptions and
//! bounded delivery queues, and retained messages.
//!
//! Publishing (from a CoAP worker or an MQTT client) is synchronous and
//! never waits on a subscriber: each matching session gets the message on
//! its own bounded queue, or, when that queue is full, the message is
//! dropped for that session alone and counted. A slow subscriber therefore
//! cannot stall the data plane or anyone else.
//!
//! Sinks (see `sink`: the upstream bridges' spools) get a message before
//! any session does; a publisher is acknowledged only once the sinks have
//! committed it, which the caller waits for on a thread that may block.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};

use super::codec::{Properties, SubscriptionOptions};
use super::sink::{Sink, Sinks, Ticket};
use super::store::TopicStore;
use super::topic;
use super::tree::TopicTree;
use crate::mapping::MAX_TOPIC_BYTES;

/// A message as the broker routes it. Cloning shares the bytes.
#[derive(Clone, Debug)]
pub struct Message {
    pub topic: Bytes,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 content type (a CoAP Content-Format travels here).
    pub content_type: Option<Bytes>,
    /// Other MQTT 5 properties, from MQTT publishers only.
    pub properties: Option<Arc<Properties>>,
}

/// One message on its way to one session.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub message: Message,
    /// Granted QoS: the lower of the message's and the subscription's.
    pub qos: u8,
    pub retain: bool,
    pub subscription_id: Option<u32>,
    /// Set when the message is sent again after a reconnect.
    pub dup: bool,
}

#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Messages queued per session before drops (also while offline).
    pub session_queue: usize,
    /// QoS 1 messages in flight per connection, unacknowledged.
    pub max_inflight: usize,
    pub max_packet_size: usize,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Open client connections; more are refused (counted).
    pub max_connections: usize,
    /// Retained messages kept: topics, and topic plus payload bytes.
    pub max_retained: usize,
    pub max_retained_bytes: usize,
    /// Filters one session may subscribe to; more are refused (counted).
    pub max_subscriptions: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            session_queue: 10_000,
            max_inflight: 64,
            max_packet_size: 1 << 20,
            username: None,
            password: None,
            max_connections: 1000,
            max_retained: 100_000,
            max_retained_bytes: 64 << 20,
            max_subscriptions: 10_000,
        }
    }
}

#[derive(Debug, Default)]
pub struct BrokerStats {
    /// Messages published into the broker.
    pub published: AtomicU64,
    /// Messages put on a session queue.
    pub enqueued: AtomicU64,
    /// Messages dropped because a session's queue was full.
    pub dropped: AtomicU64,
    pub connections: AtomicU64,
    /// Connections ended (their session detached), for whatever reason.
    pub closed: AtomicU64,
    /// Connections closed for a protocol violation or malformed packet.
    pub protocol_errors: AtomicU64,
    /// Connections refused because `max_connections` were open.
    pub refused_connections: AtomicU64,
    /// Accepts that failed (descriptors exhausted).
    pub accept_errors: AtomicU64,
    /// Retained messages not kept: the retained store was full.
    pub retained_refused: AtomicU64,
    /// Last values (for CoAP GET) not kept: their store was full.
    pub last_values_refused: AtomicU64,
    /// Subscriptions refused: the session had max_subscriptions.
    pub subscriptions_refused: AtomicU64,
}

impl BrokerStats {
    /// Every counter: the name the control socket and the report use, the
    /// help text of its Prometheus family (`m2m_mqtt_<name>_total`), and
    /// its value. One list, so the three renderings cannot drift apart.
    pub fn counters(&self) -> [(&'static str, &'static str, u64); 11] {
        let f = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            (
                "published",
                "Messages published into the embedded broker.",
                f(&self.published),
            ),
            (
                "delivered",
                "Messages queued for delivery to a subscriber session.",
                f(&self.enqueued),
            ),
            (
                "dropped",
                "Messages dropped because a session's queue was full.",
                f(&self.dropped),
            ),
            (
                "connections",
                "MQTT connections accepted.",
                f(&self.connections),
            ),
            ("closed", "MQTT connections ended.", f(&self.closed)),
            (
                "protocol_errors",
                "MQTT connections closed for a protocol error.",
                f(&self.protocol_errors),
            ),
            (
                "refused_connections",
                "MQTT connections refused: max_connections were open.",
                f(&self.refused_connections),
            ),
            (
                "accept_errors",
                "MQTT accepts that failed (descriptors exhausted, or out of memory).",
                f(&self.accept_errors),
            ),
            (
                "retained_refused",
                "Retained messages not kept: the retained store was full.",
                f(&self.retained_refused),
            ),
            (
                "last_values_refused",
                "Last values for CoAP GET not kept: their store was full.",
                f(&self.last_values_refused),
            ),
            (
                "subscriptions_refused",
                "Subscriptions refused: the session had max_subscriptions filters.",
                f(&self.subscriptions_refused),
            ),
        ]
    }
}

pub struct Session {
    pub client_id: Bytes,
    tx: mpsc::Sender<Delivery>,
    /// The queue's receiving end while no connection holds it.
    parked: Mutex<Option<mpsc::Receiver<Delivery>>>,
    /// QoS 1 deliveries unacknowledged when the last connection ended.
    unacked: Mutex<Vec<Delivery>>,
    /// Messages dropped for this session (queue full).
    pub dropped: AtomicU64,
    /// Wakes the connection holding the session when another takes it over.
    pub takeover: Notify,
    persistent: AtomicBool,
}

/// One session's subscription with one filter.
struct Subscriber {
    session: Arc<Session>,
    options: SubscriptionOptions,
    id: Option<u32>,
}

struct Entry {
    session: Arc<Session>,
    /// Its filters, to find them in the tree when it goes.
    filters: HashSet<Bytes>,
}

/// Sessions and their subscriptions, indexed by filter so that a publish
/// visits only the filters that can match its topic.
#[derive(Default)]
struct Sessions {
    by_client: HashMap<Bytes, Entry>,
    /// Filter -> client id -> subscription.
    subscriptions: TopicTree<HashMap<Bytes, Subscriber>>,
}

impl Sessions {
    fn remove(&mut self, client_id: &[u8]) {
        let Some(entry) = self.by_client.remove(client_id) else {
            return;
        };
        for filter in &entry.filters {
            self.unsubscribe(filter, client_id);
        }
    }

    fn unsubscribe(&mut self, filter: &[u8], client_id: &[u8]) {
        let Some(subscribers) = self.subscriptions.get_mut(filter) else {
            return;
        };
        subscribers.remove(client_id);
        if subscribers.is_empty() {
            self.subscriptions.remove(filter);
        }
    }
}

pub struct Broker {
    pub config: BrokerConfig,
    sessions: RwLock<Sessions>,
    retained: Mutex<TopicStore>,
    /// The newest message of every topic, retained or not, for CoAP GET.
    /// Sharded by topic so the workers seldom meet on one lock.
    last_values: Vec<Mutex<TopicStore>>,
    /// Where a message is stored before anyone else sees it (upstream
    /// bridges' spools), and the writer thread that commits for async callers.
    sinks: Sinks,
    pub stats: BrokerStats,
}

const LAST_VALUE_SHARDS: usize = 16;
/// Topics whose last value is kept, and their bytes (topic and payload);
/// past either, new values are not remembered (counted).
const MAX_LAST_VALUES: usize = 1 << 20;
const MAX_LAST_VALUE_BYTES: usize = 256 << 20;

fn shard_of(topic: &[u8]) -> usize {
    // FNV-1a: cheap and good enough to spread topics over the shards.
    let h = topic.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (h % LAST_VALUE_SHARDS as u64) as usize
}

/// What a connection gets when it attaches to a session.
pub struct Attached {
    pub session: Arc<Session>,
    pub session_present: bool,
    pub queue: mpsc::Receiver<Delivery>,
    pub unacked: Vec<Delivery>,
}

impl Broker {
    pub fn new(config: BrokerConfig) -> Arc<Broker> {
        let retained = TopicStore::new(config.max_retained, config.max_retained_bytes).indexed();
        Arc::new(Broker {
            config,
            sessions: RwLock::new(Sessions::default()),
            retained: Mutex::new(retained),
            last_values: (0..LAST_VALUE_SHARDS)
                .map(|_| {
                    Mutex::new(TopicStore::new(
                        MAX_LAST_VALUES / LAST_VALUE_SHARDS,
                        MAX_LAST_VALUE_BYTES / LAST_VALUE_SHARDS,
                    ))
                })
                .collect(),
            sinks: Sinks::default(),
            stats: BrokerStats::default(),
        })
    }

    /// Adds a sink: from now on every message it wants is staged in it
    /// before any subscriber sees it.
    pub fn add_sink(&self, sink: Arc<dyn Sink>) {
        self.sinks.add(sink);
    }

    /// [`Broker::publish_deferred`], then waits (off the runtime's threads)
    /// until the sinks hold the message durably: what a publisher must wait
    /// for before it is told the message was accepted.
    pub async fn publish(&self, message: Message, origin: Option<&[u8]>) -> std::io::Result<()> {
        match self.publish_deferred(message, origin)? {
            Some(ticket) => self.sinks.commit_async(ticket).await,
            None => Ok(()),
        }
    }

    /// Makes everything staged since `ticket` was taken durable, blocking
    /// this thread (the CoAP workers commit a receive batch this way).
    pub fn commit(&self, ticket: Ticket) -> std::io::Result<()> {
        self.sinks.commit(ticket)
    }

    /// [`Broker::commit`] for async code: the writer thread does it.
    pub async fn commit_async(&self, ticket: Ticket) -> std::io::Result<()> {
        self.sinks.commit_async(ticket).await
    }

    /// Routes `message` to the sinks that want it, then to every matching
    /// session. Never blocks on a subscriber or a disk. Returns a ticket if
    /// a sink staged it: it is durable only after a commit with that ticket
    /// (or an earlier one) succeeds ([`Broker::commit`]); wait for that
    /// before telling the publisher it was accepted. An error (a sink could not store it) means nobody got
    /// the message. `origin` is the publishing client (for MQTT 5 No Local,
    /// and so that a bridge never takes back what it brought in).
    pub fn publish_deferred(
        &self,
        message: Message,
        origin: Option<&[u8]>,
    ) -> std::io::Result<Option<Ticket>> {
        // The one gate every message passes: what the MQTT wire cannot carry
        // is refused here, before anyone is handed it.
        if message.topic.len() > MAX_TOPIC_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a topic longer than 65,535 bytes",
            ));
        }
        if !topic::within_levels(&message.topic) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a topic of more than {} levels", topic::MAX_LEVELS),
            ));
        }
        let staged = self.sinks.stage(&message, origin)?;
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        if message.retain {
            let mut retained = self.retained.lock().unwrap();
            if message.payload.is_empty() {
                retained.remove(&message.topic);
            } else if !retained.put(&message) {
                self.stats.retained_refused.fetch_add(1, Ordering::Relaxed);
            }
        }
        let kept = self.last_values[shard_of(&message.topic)]
            .lock()
            .unwrap()
            .put(&message);
        if !kept {
            self.stats
                .last_values_refused
                .fetch_add(1, Ordering::Relaxed);
        }
        let sessions = self.sessions.read().unwrap();
        // A session with several matching filters gets the message once, at
        // the highest QoS among them (MQTT 5 section 3.3.4). The usual single
        // match needs no list (this runs for every message).
        let mut first: Option<&Subscriber> = None;
        let mut more: Vec<&Subscriber> = Vec::new();
        sessions
            .subscriptions
            .filters_matching(&message.topic, |subscribers| {
                for sub in subscribers.values() {
                    if sub.options.no_local && origin == Some(&sub.session.client_id[..]) {
                        continue;
                    }
                    match first {
                        None => first = Some(sub),
                        Some(_) => more.push(sub),
                    }
                }
            });
        if !more.is_empty() {
            more.extend(first.take());
            more.sort_unstable_by_key(|sub| (Arc::as_ptr(&sub.session), u8::MAX - sub.options.qos));
            more.dedup_by_key(|sub| Arc::as_ptr(&sub.session));
        }
        for sub in first.into_iter().chain(more) {
            let delivery = Delivery {
                qos: message.qos.min(sub.options.qos),
                retain: message.retain && sub.options.retain_as_published,
                subscription_id: sub.id,
                dup: false,
                message: message.clone(),
            };
            self.enqueue(&sub.session, delivery);
        }
        Ok(staged)
    }

    fn enqueue(&self, session: &Session, delivery: Delivery) {
        match session.tx.try_send(delivery) {
            Ok(()) => {
                self.stats.enqueued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                session.dropped.fetch_add(1, Ordering::Relaxed);
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The newest message published on `topic`, retained or not.
    pub fn last_value(&self, topic: &[u8]) -> Option<Message> {
        self.last_values[shard_of(topic)]
            .lock()
            .unwrap()
            .get(topic)
            .cloned()
    }

    /// Retained messages kept, and their topic and payload bytes.
    pub fn retained_usage(&self) -> (usize, usize) {
        let retained = self.retained.lock().unwrap();
        (retained.len(), retained.bytes())
    }

    /// The newest retained message of `topic`, if any.
    pub fn retained(&self, topic: &[u8]) -> Option<Message> {
        self.retained.lock().unwrap().get(topic).cloned()
    }

    /// Attaches a connection to the session `client_id`, creating or (with
    /// `clean_start`) replacing it. If another connection holds it, that one
    /// is told to close and this waits (up to 2 s) for it to let go.
    pub async fn attach(
        &self,
        client_id: &Bytes,
        clean_start: bool,
        persistent: bool,
    ) -> Option<Attached> {
        for _ in 0..200 {
            if let Some(attached) = self.try_attach(client_id, clean_start, persistent) {
                return Some(attached);
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        None
    }

    fn try_attach(
        &self,
        client_id: &Bytes,
        clean_start: bool,
        persistent: bool,
    ) -> Option<Attached> {
        let mut sessions = self.sessions.write().unwrap();
        if let Some(entry) = sessions.by_client.get(client_id) {
            let parked = entry.session.parked.lock().unwrap().take();
            let Some(queue) = parked else {
                // Held by a live connection: ask it to go.
                entry.session.takeover.notify_one();
                return None;
            };
            if !clean_start {
                entry
                    .session
                    .persistent
                    .store(persistent, Ordering::Relaxed);
                let unacked = std::mem::take(&mut *entry.session.unacked.lock().unwrap());
                return Some(Attached {
                    session: entry.session.clone(),
                    session_present: true,
                    queue,
                    unacked,
                });
            }
            sessions.remove(client_id);
        }
        let (tx, queue) = mpsc::channel(self.config.session_queue.max(1));
        let session = Arc::new(Session {
            client_id: client_id.clone(),
            tx,
            parked: Mutex::new(None),
            unacked: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
            takeover: Notify::new(),
            persistent: AtomicBool::new(persistent),
        });
        sessions.by_client.insert(
            client_id.clone(),
            Entry {
                session: session.clone(),
                filters: HashSet::new(),
            },
        );
        Some(Attached {
            session,
            session_present: false,
            queue,
            unacked: Vec::new(),
        })
    }

    /// The connection is gone: a persistent session keeps its queue and
    /// unacknowledged messages for the next connection; any other is removed.
    pub fn detach(
        &self,
        session: &Arc<Session>,
        queue: mpsc::Receiver<Delivery>,
        unacked: Vec<Delivery>,
    ) {
        let mut sessions = self.sessions.write().unwrap();
        let current = sessions
            .by_client
            .get(&session.client_id)
            .is_some_and(|e| Arc::ptr_eq(&e.session, session));
        if !current {
            return;
        }
        if session.persistent.load(Ordering::Relaxed) {
            *session.unacked.lock().unwrap() = unacked;
            *session.parked.lock().unwrap() = Some(queue);
        } else {
            sessions.remove(&session.client_id);
        }
    }

    /// Adds or replaces a subscription; returns the matching retained
    /// messages to send (per the retain handling option), or `None` when
    /// the session has `max_subscriptions` other filters already.
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        filter: Bytes,
        options: SubscriptionOptions,
        id: Option<u32>,
    ) -> Option<Vec<Message>> {
        let mut sessions = self.sessions.write().unwrap();
        let Sessions {
            by_client,
            subscriptions,
        } = &mut *sessions;
        let entry = by_client.get_mut(&session.client_id)?;
        let existed = entry.filters.contains(&filter);
        if !existed && entry.filters.len() >= self.config.max_subscriptions {
            self.stats
                .subscriptions_refused
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        entry.filters.insert(filter.clone());
        subscriptions.entry(&filter, HashMap::new).insert(
            session.client_id.clone(),
            Subscriber {
                session: session.clone(),
                options,
                id,
            },
        );
        drop(sessions);
        let send_retained = match options.retain_handling {
            0 => true,
            1 => !existed,
            _ => false,
        };
        if !send_retained {
            return Some(Vec::new());
        }
        Some(self.retained.lock().unwrap().matching(&filter))
    }

    /// Removes a subscription; whether it existed.
    pub fn unsubscribe(&self, session: &Arc<Session>, filter: &[u8]) -> bool {
        let mut sessions = self.sessions.write().unwrap();
        let Some(entry) = sessions.by_client.get_mut(&session.client_id) else {
            return false;
        };
        if !entry.filters.remove(filter) {
            return false;
        }
        sessions.unsubscribe(filter, &session.client_id);
        true
    }

    /// Subscriptions held by all sessions.
    pub fn subscription_count(&self) -> usize {
        let sessions = self.sessions.read().unwrap();
        sessions.by_client.values().map(|e| e.filters.len()).sum()
    }

    /// (client id, queued, dropped) per session, for reports.
    pub fn session_stats(&self) -> Vec<(String, usize, u64)> {
        let sessions = self.sessions.read().unwrap();
        sessions
            .by_client
            .values()
            .map(|e| {
                let s = &e.session;
                let queued = s.tx.max_capacity() - s.tx.capacity();
                (
                    String::from_utf8_lossy(&s.client_id).into_owned(),
                    queued,
                    s.dropped.load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}
