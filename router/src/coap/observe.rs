//! Devices observing topics (RFC 7641): who observes which topic, and what
//! each relation has been sent. The endpoint task (`coap::downlink`) owns
//! it: it registers the relations the workers report, turns each message
//! published on a topic into notifications, and ends relations.
//!
//! A relation is one endpoint and token (section 3.1: a registration with
//! the same endpoint and token replaces the earlier one). Its notifications
//! carry increasing sequence numbers (section 4.4). At most one CON
//! notification per relation is in flight; a state published meanwhile
//! waits, and a newer one replaces it (section 4.5.2: a slow observer gets
//! the latest state, not a queue).

use std::collections::HashMap;
use std::net::IpAddr;

use super::Endpoint;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::mqtt::Message;

/// Max-Age of a registration's answer and of notifications: a topic's
/// state holds until the next one (section 4.3.1), and a quiet topic does
/// not make observers re-register; the daily CON checks they are there.
pub const MAX_AGE: u32 = 24 * 3600;

/// Section 4.5: at least one notification in 24 hours is confirmable, so
/// a relation to an observer that went away is found out.
pub const CON_AT_LEAST_EVERY: Duration = Duration::from_secs(24 * 3600);

pub type RelationId = u64;

/// The relations, owned by the endpoint task and read by the control
/// socket (`observe ls`); both run on the daemon's one event-loop thread.
pub type SharedObservers = std::sync::Arc<std::sync::Mutex<Observers>>;

/// Relations one address may hold: without a cap, one source (or one
/// spoofing a victim's address) could register thousands of tokens and
/// turn each publish into as many datagrams (RFC 7641 section 7).
pub const MAX_PER_ADDRESS: usize = 64;

/// Observe sequence numbers (RFC 7641 section 4.4): one counter for the
/// registration answers the workers send and for every notification, so a
/// relation's numbers increase whoever sends them, across re-registrations
/// too. 24 bits wrap after 2^23 numbers; within 128 s of each other two
/// notifications compare right (section 3.4) unless more than 65,000 a
/// second are sent in all.
#[derive(Debug, Default)]
pub struct Sequence(AtomicU32);

impl Sequence {
    pub fn next(&self) -> u32 {
        self.0.fetch_add(1, Ordering::Relaxed).wrapping_add(1) & 0xff_ffff
    }
}

pub struct Relation {
    pub endpoint: Endpoint,
    pub token: Vec<u8>,
    pub topic: Bytes,
    last_con: Instant,
    /// A CON notification of this relation awaits its ACK.
    pub in_flight: bool,
    /// The newest state published while one was in flight, and its QoS.
    pub pending: Option<(Message, u8)>,
    /// The Message ID of the latest NON notification: an RST to it ends
    /// the relation (section 3.6).
    pub last_non_mid: Option<u16>,
    pub notifications: u64,
    pub since: Instant,
}

impl Relation {
    /// Whether the next notification must be confirmable (`qos` 1 and up,
    /// or the 24 hours are up).
    pub fn next(&mut self, qos: u8, now: Instant) -> bool {
        self.notifications += 1;
        let confirmable = qos > 0 || now.duration_since(self.last_con) >= CON_AT_LEAST_EVERY;
        if confirmable {
            self.last_con = now;
        }
        confirmable
    }
}

/// What a registration changed.
#[derive(Debug, PartialEq, Eq)]
pub struct Registered {
    pub id: RelationId,
    /// The topic had no observer: subscribe to it.
    pub subscribe: bool,
    /// The relation this one replaced (same endpoint and token, another
    /// topic): its CON in flight, if any, is to be cancelled.
    pub replaced: Option<RelationId>,
    /// A topic the replaced relation left without observers.
    pub unsubscribe: Option<Bytes>,
}

/// What a worker tells the endpoint task about an observer's GET.
#[derive(Debug)]
pub enum ObserveEvent {
    Register {
        endpoint: Endpoint,
        token: Vec<u8>,
        topic: Bytes,
        /// A CRC-32 of the state the registration's response carried
        /// (None: none): a state published before the subscription took
        /// effect is notified at once.
        sent: Option<u32>,
    },
    Deregister {
        endpoint: Endpoint,
        token: Vec<u8>,
    },
}

/// Why a registration was not taken.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

pub struct Observers {
    relations: HashMap<RelationId, Relation>,
    by_observer: HashMap<(Endpoint, Vec<u8>), RelationId>,
    by_topic: HashMap<Bytes, Vec<RelationId>>,
    /// The latest NON notification of each relation, by where it went.
    by_non_mid: HashMap<(Endpoint, u16), RelationId>,
    per_address: HashMap<IpAddr, usize>,
    next_id: RelationId,
    max: usize,
}

impl Observers {
    pub fn new(max: usize) -> Observers {
        Observers {
            relations: HashMap::new(),
            by_observer: HashMap::new(),
            by_topic: HashMap::new(),
            by_non_mid: HashMap::new(),
            per_address: HashMap::new(),
            next_id: 0,
            max,
        }
    }

    /// Registers `endpoint`/`token` on `topic`. The same endpoint and token
    /// again on the same topic is the same relation (section 4.1: its
    /// numbers go on); on another topic it replaces the earlier relation.
    pub fn register(
        &mut self,
        endpoint: Endpoint,
        token: &[u8],
        topic: Bytes,
        now: Instant,
    ) -> Result<Registered, Full> {
        let (mut replaced, mut unsubscribe) = (None, None);
        if let Some(id) = self.find(endpoint, token) {
            if self.relations[&id].topic == topic {
                return Ok(Registered {
                    id,
                    subscribe: false,
                    replaced: None,
                    unsubscribe: None,
                });
            }
            replaced = Some(id);
            unsubscribe = self.remove(id);
        }
        let held = self
            .per_address
            .get(&endpoint.addr.ip())
            .copied()
            .unwrap_or(0);
        if self.relations.len() >= self.max || held >= MAX_PER_ADDRESS {
            return Err(Full);
        }
        let id = self.next_id;
        self.next_id += 1;
        let observers = self.by_topic.entry(topic.clone()).or_default();
        let subscribe = observers.is_empty();
        observers.push(id);
        self.by_observer.insert((endpoint, token.to_vec()), id);
        *self.per_address.entry(endpoint.addr.ip()).or_default() += 1;
        self.relations.insert(
            id,
            Relation {
                endpoint,
                token: token.to_vec(),
                topic,
                last_con: now,
                in_flight: false,
                pending: None,
                last_non_mid: None,
                notifications: 0,
                since: now,
            },
        );
        Ok(Registered {
            id,
            subscribe,
            replaced,
            unsubscribe,
        })
    }

    /// Notes the Message ID of relation `id`'s latest NON notification.
    pub fn sent_non(&mut self, id: RelationId, mid: u16) {
        let Some(r) = self.relations.get_mut(&id) else {
            return;
        };
        if let Some(old) = r.last_non_mid.replace(mid) {
            self.by_non_mid.remove(&(r.endpoint, old));
        }
        self.by_non_mid.insert((r.endpoint, mid), id);
    }

    /// Ends the relation of `endpoint`/`token`, if there is one; the topic
    /// it leaves without observers, if any.
    pub fn deregister(&mut self, endpoint: Endpoint, token: &[u8]) -> Option<Bytes> {
        let id = self.find(endpoint, token)?;
        self.remove(id)
    }

    pub fn find(&self, endpoint: Endpoint, token: &[u8]) -> Option<RelationId> {
        self.by_observer.get(&(endpoint, token.to_vec())).copied()
    }

    /// Ends relation `id`; the topic it leaves without observers, if any.
    pub fn remove(&mut self, id: RelationId) -> Option<Bytes> {
        let r = self.relations.remove(&id)?;
        if let Some(mid) = r.last_non_mid {
            self.by_non_mid.remove(&(r.endpoint, mid));
        }
        if let Some(held) = self.per_address.get_mut(&r.endpoint.addr.ip()) {
            *held -= 1;
            if *held == 0 {
                self.per_address.remove(&r.endpoint.addr.ip());
            }
        }
        self.by_observer.remove(&(r.endpoint, r.token));
        let observers = self.by_topic.get_mut(&r.topic)?;
        observers.retain(|&o| o != id);
        if observers.is_empty() {
            self.by_topic.remove(&r.topic);
            return Some(r.topic);
        }
        None
    }

    /// The relations on `topic`.
    pub fn on(&self, topic: &[u8]) -> Vec<RelationId> {
        self.by_topic.get(topic).cloned().unwrap_or_default()
    }

    /// The relation whose latest NON notification to `endpoint` had `mid`.
    pub fn by_non_mid(&self, endpoint: Endpoint, mid: u16) -> Option<RelationId> {
        self.by_non_mid.get(&(endpoint, mid)).copied()
    }

    pub fn get_mut(&mut self, id: RelationId) -> Option<&mut Relation> {
        self.relations.get_mut(&id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Relation> {
        self.relations.values()
    }

    /// Every relation as `ctl observe ls` shows it, oldest first;
    /// `peer_of` names the peer an observer's endpoint is.
    pub fn list(
        &self,
        now: Instant,
        peer_of: impl Fn(Endpoint) -> Option<String>,
    ) -> Vec<serde_json::Value> {
        let mut relations: Vec<(&RelationId, &Relation)> = self.relations.iter().collect();
        relations.sort_by_key(|(id, _)| **id);
        relations
            .into_iter()
            .map(|(_, r)| {
                let token: String = r.token.iter().map(|b| format!("{b:02x}")).collect();
                serde_json::json!({
                    "peer": peer_of(r.endpoint),
                    "endpoint": r.endpoint.to_string(),
                    "token": token,
                    "topic": String::from_utf8_lossy(&r.topic),
                    "age_s": now.duration_since(r.since).as_secs(),
                    "notifications": r.notifications,
                    "awaiting_ack": r.in_flight,
                })
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.relations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.relations.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16) -> Endpoint {
        Endpoint::plain(std::net::SocketAddr::from(([10, 0, 0, 1], port)))
    }

    #[test]
    fn relations_by_endpoint_and_token_and_the_topics_they_leave() {
        let mut o = Observers::new(10);
        let now = Instant::now();
        let t = |s: &'static str| Bytes::from_static(s.as_bytes());
        let a = o.register(ep(1), b"x", t("a"), now).unwrap();
        assert!(a.subscribe && a.replaced.is_none());
        let b = o.register(ep(2), b"x", t("a"), now).unwrap();
        assert!(!b.subscribe, "a second observer of the topic");
        assert_eq!(o.on(b"a"), vec![a.id, b.id]);
        // Same endpoint, token and topic: the same relation.
        let again = o.register(ep(1), b"x", t("a"), now).unwrap();
        assert_eq!(
            (again.id, again.subscribe, again.replaced),
            (a.id, false, None)
        );
        assert_eq!(o.len(), 2);
        // Another topic: it replaces the relation.
        let moved = o.register(ep(2), b"x", t("b"), now).unwrap();
        assert_eq!(
            (moved.subscribe, moved.replaced, moved.unsubscribe),
            (true, Some(b.id), None)
        );
        assert_eq!(
            o.deregister(ep(1), b"x"),
            Some(t("a")),
            "a has no observer left"
        );
        assert_eq!(o.deregister(ep(1), b"x"), None);
        assert_eq!(o.len(), 1);
    }

    #[test]
    fn bounded_in_all_and_per_address() {
        let now = Instant::now();
        let topic = Bytes::from_static(b"t");
        let mut o = Observers::new(2);
        o.register(ep(1), b"1", topic.clone(), now).unwrap();
        o.register(ep(2), b"2", topic.clone(), now).unwrap();
        assert_eq!(o.register(ep(3), b"3", topic.clone(), now), Err(Full));
        let mut o = Observers::new(1000);
        for i in 0..MAX_PER_ADDRESS {
            o.register(ep(i as u16), &i.to_be_bytes(), topic.clone(), now)
                .unwrap();
        }
        assert_eq!(o.register(ep(9999), b"more", topic.clone(), now), Err(Full));
        let other = Endpoint::plain(std::net::SocketAddr::from(([10, 0, 0, 2], 1)));
        assert!(
            o.register(other, b"x", topic.clone(), now).is_ok(),
            "another address"
        );
    }

    #[test]
    fn the_daily_con_and_the_sequence() {
        let mut o = Observers::new(2);
        let now = Instant::now();
        let id = o
            .register(ep(1), b"1", Bytes::from_static(b"t"), now)
            .unwrap()
            .id;
        let r = o.get_mut(id).unwrap();
        assert!(!r.next(0, now));
        assert!(r.next(1, now), "QoS 1: confirmable");
        assert!(r.next(0, now + CON_AT_LEAST_EVERY), "the daily CON");
        assert!(!r.next(0, now + CON_AT_LEAST_EVERY));
        let seq = Sequence(AtomicU32::new(0xff_fffe));
        assert_eq!(
            (seq.next(), seq.next(), seq.next()),
            (0xff_ffff, 0, 1),
            "24 bits"
        );
        o.sent_non(id, 7);
        assert_eq!(o.by_non_mid(ep(1), 7), Some(id));
        o.sent_non(id, 8);
        assert_eq!(o.by_non_mid(ep(1), 7), None, "only the latest");
        o.remove(id);
        assert_eq!(o.by_non_mid(ep(1), 8), None);
    }
}
