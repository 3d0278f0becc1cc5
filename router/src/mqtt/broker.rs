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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use tokio::sync::Notify;

use super::codec::{Properties, SubscriptionOptions};
use super::queue::{Full, Queue, QueueBudget};
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

#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// Sessions kept, connected or not; past it the offline session that
    /// has waited longest is removed (counted). At least `max_connections`.
    pub max_sessions: usize,
    /// Bytes all session queues together may hold (see `queue`).
    pub max_queued_bytes: usize,
    /// Memory of all sessions' subscriptions: the filter index and each
    /// session's list (see `Sessions::subscription_memory`).
    pub max_subscription_bytes: usize,
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
            max_sessions: 100_000,
            max_queued_bytes: 256 << 20,
            max_subscription_bytes: 256 << 20,
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
    /// Subscriptions refused: the session had max_subscriptions, or all
    /// sessions together max_subscription_bytes.
    pub subscriptions_refused: AtomicU64,
    /// Of the dropped messages, those refused because all queues together
    /// held max_queued_bytes.
    pub dropped_over_budget: AtomicU64,
    /// Offline sessions removed to make room under max_sessions.
    pub sessions_evicted: AtomicU64,
}

impl BrokerStats {
    /// Every counter: the name the control socket and the report use, the
    /// help text of its Prometheus family (`m2m_mqtt_<name>_total`), and
    /// its value. One list, so the three renderings cannot drift apart.
    pub fn counters(&self) -> [(&'static str, &'static str, u64); 13] {
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
                "Subscriptions refused: the session had max_subscriptions filters, or all sessions max_subscription_bytes.",
                f(&self.subscriptions_refused),
            ),
            (
                "dropped_over_budget",
                "Of the dropped messages, those refused because all session queues together held max_queued_bytes.",
                f(&self.dropped_over_budget),
            ),
            (
                "sessions_evicted",
                "Offline sessions removed to make room under max_sessions.",
                f(&self.sessions_evicted),
            ),
        ]
    }
}

pub struct Session {
    pub client_id: Bytes,
    /// What waits for the connection (or the next one, while offline),
    /// QoS 1 messages it never acknowledged first.
    pub queue: Queue,
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
    /// While no connection holds it: when it was let go (its key in
    /// `Sessions::parked`).
    parked_at: Option<u64>,
}

/// Sessions and their subscriptions, indexed by filter so that a publish
/// visits only the filters that can match its topic.
#[derive(Default)]
struct Sessions {
    by_client: HashMap<Bytes, Entry>,
    /// Filter -> client id -> subscription.
    subscriptions: TopicTree<Subscribers>,
    /// Filter bytes plus [`SUBSCRIPTION_COST`] of every subscription; the
    /// tree's levels are counted by the tree.
    subscription_bytes: usize,
    /// Offline sessions, the longest offline first: who goes when
    /// `max_sessions` is reached.
    parked: BTreeMap<u64, Bytes>,
    next_park: u64,
}

type Subscribers = HashMap<Bytes, Subscriber>;

/// What one subscription holds beside its filter's bytes and the tree's
/// levels, at most: its slot in the filter's subscriber map and in its
/// session's filter set (each at least 4 slots plus control bytes).
const SUBSCRIPTION_COST: usize = 4 * (std::mem::size_of::<(Bytes, Subscriber)>() + 1)
    + 16
    + 4 * (std::mem::size_of::<Bytes>() + 1)
    + 16;

fn subscription_cost(filter: &[u8]) -> usize {
    filter.len() + SUBSCRIPTION_COST
}

impl Sessions {
    /// An upper bound of the memory subscriptions hold: what
    /// `max_subscription_bytes` bounds.
    fn subscription_memory(&self) -> usize {
        self.subscriptions.memory() + self.subscription_bytes
    }

    /// Whether subscribing to `filter` (a new subscription) stays within `max`.
    fn subscription_fits(&self, filter: &[u8], max: usize) -> bool {
        let worst = TopicTree::<Subscribers>::cost_of(filter) + subscription_cost(filter);
        self.subscription_memory() + worst <= max
    }

    fn remove(&mut self, client_id: &[u8]) {
        let Some(entry) = self.by_client.remove(client_id) else {
            return;
        };
        if let Some(at) = entry.parked_at {
            self.parked.remove(&at);
        }
        for filter in &entry.filters {
            self.unsubscribe(filter, client_id);
        }
    }

    fn unsubscribe(&mut self, filter: &[u8], client_id: &[u8]) {
        let Some(subscribers) = self.subscriptions.get_mut(filter) else {
            return;
        };
        if subscribers.remove(client_id).is_some() {
            self.subscription_bytes -= subscription_cost(filter);
        }
        if subscribers.is_empty() {
            self.subscriptions.remove(filter);
        }
    }

    /// Removes the session offline longest; false if every one is held.
    fn evict_oldest_parked(&mut self) -> bool {
        let Some((_, client_id)) = self.parked.pop_first() else {
            return false;
        };
        if let Some(entry) = self.by_client.get_mut(&client_id) {
            entry.parked_at = None; // already out of `parked`
        }
        self.remove(&client_id);
        true
    }
}

pub struct Broker {
    pub config: BrokerConfig,
    sessions: RwLock<Sessions>,
    /// Shared by every session's queue.
    queue_budget: Arc<QueueBudget>,
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
}

impl Broker {
    pub fn new(config: BrokerConfig) -> Arc<Broker> {
        let retained = TopicStore::new(config.max_retained, config.max_retained_bytes).indexed();
        Arc::new(Broker {
            queue_budget: QueueBudget::new(config.max_queued_bytes),
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
        match session.queue.push(delivery) {
            Ok(()) => {
                self.stats.enqueued.fetch_add(1, Ordering::Relaxed);
            }
            Err(full) => {
                session.dropped.fetch_add(1, Ordering::Relaxed);
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                if full == Full::Budget {
                    self.stats
                        .dropped_over_budget
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Bytes all session queues hold, as charged against max_queued_bytes.
    pub fn queued_bytes(&self) -> usize {
        self.queue_budget.used()
    }

    /// Sessions kept, and their subscriptions' memory as charged against
    /// max_subscription_bytes.
    pub fn session_usage(&self) -> (usize, usize) {
        let sessions = self.sessions.read().unwrap();
        (sessions.by_client.len(), sessions.subscription_memory())
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
        let mut guard = self.sessions.write().unwrap();
        let sessions = &mut *guard;
        if let Some(entry) = sessions.by_client.get_mut(client_id) {
            let Some(at) = entry.parked_at else {
                // Held by a live connection: ask it to go.
                entry.session.takeover.notify_one();
                return None;
            };
            if !clean_start {
                sessions.parked.remove(&at);
                entry.parked_at = None;
                entry
                    .session
                    .persistent
                    .store(persistent, Ordering::Relaxed);
                return Some(Attached {
                    session: entry.session.clone(),
                    session_present: true,
                });
            }
            sessions.remove(client_id);
        }
        if sessions.by_client.len() >= self.config.max_sessions {
            if !sessions.evict_oldest_parked() {
                return None;
            }
            self.stats.sessions_evicted.fetch_add(1, Ordering::Relaxed);
        }
        // Its own copy: a slice would keep the whole CONNECT packet alive.
        let client_id = Bytes::copy_from_slice(client_id);
        let session = Arc::new(Session {
            client_id: client_id.clone(),
            queue: Queue::new(self.config.session_queue, self.queue_budget.clone()),
            dropped: AtomicU64::new(0),
            takeover: Notify::new(),
            persistent: AtomicBool::new(persistent),
        });
        sessions.by_client.insert(
            client_id,
            Entry {
                session: session.clone(),
                filters: HashSet::new(),
                parked_at: None,
            },
        );
        Some(Attached {
            session,
            session_present: false,
        })
    }

    /// The connection is gone: a persistent session keeps its queue, with
    /// the QoS 1 messages left `unacked` put back first, for the next
    /// connection; any other is removed.
    pub fn detach(&self, session: &Arc<Session>, unacked: Vec<Delivery>) {
        let mut guard = self.sessions.write().unwrap();
        let sessions = &mut *guard;
        let Some(entry) = sessions
            .by_client
            .get_mut(&session.client_id)
            .filter(|e| Arc::ptr_eq(&e.session, session) && e.parked_at.is_none())
        else {
            return;
        };
        if session.persistent.load(Ordering::Relaxed) {
            session.queue.put_back(unacked);
            let at = sessions.next_park;
            sessions.next_park += 1;
            entry.parked_at = Some(at);
            sessions.parked.insert(at, session.client_id.clone());
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
        let fits = sessions.subscription_fits(&filter, self.config.max_subscription_bytes);
        let Sessions {
            by_client,
            subscriptions,
            subscription_bytes,
            ..
        } = &mut *sessions;
        let entry = by_client.get_mut(&session.client_id)?;
        let existed = entry.filters.contains(&filter);
        if !existed {
            if !fits || entry.filters.len() >= self.config.max_subscriptions {
                self.stats
                    .subscriptions_refused
                    .fetch_add(1, Ordering::Relaxed);
                return None;
            }
            *subscription_bytes += subscription_cost(&filter);
        }
        // Its own copy: a slice would keep the whole SUBSCRIBE packet alive.
        let filter = Bytes::copy_from_slice(&filter);
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

    /// What the bounded tables hold now: the name the control socket uses,
    /// the help text of its Prometheus gauge (`m2m_mqtt_<name>`), and its
    /// value. One list for both renderings.
    pub fn gauges(&self) -> [(&'static str, &'static str, usize); 6] {
        let (retained, retained_bytes) = self.retained_usage();
        let subscriptions = self.subscription_count();
        let (sessions, subscription_memory) = self.session_usage();
        [
            ("retained", "Retained messages kept.", retained),
            (
                "retained_bytes",
                "Memory of the retained messages, as bounded by max_retained_bytes.",
                retained_bytes,
            ),
            (
                "sessions_kept",
                "Sessions kept, connected or not (max_sessions).",
                sessions,
            ),
            (
                "subscriptions",
                "Subscriptions held by all sessions.",
                subscriptions,
            ),
            (
                "subscription_bytes",
                "Memory of all subscriptions, as bounded by max_subscription_bytes.",
                subscription_memory,
            ),
            (
                "queued_bytes",
                "Bytes all session queues hold, as bounded by max_queued_bytes.",
                self.queued_bytes(),
            ),
        ]
    }

    /// (client id, queued, dropped) per session, for reports.
    pub fn session_stats(&self) -> Vec<(String, usize, u64)> {
        let sessions = self.sessions.read().unwrap();
        sessions
            .by_client
            .values()
            .map(|e| {
                let s = &e.session;
                (
                    String::from_utf8_lossy(&s.client_id).into_owned(),
                    s.queue.len(),
                    s.dropped.load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}
