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
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::mqtt::Message;

/// Section 4.5: at least one notification in 24 hours is confirmable, so
/// a relation to an observer that went away is found out.
pub const CON_AT_LEAST_EVERY: Duration = Duration::from_secs(24 * 3600);

pub type RelationId = u64;

pub struct Relation {
    pub endpoint: SocketAddr,
    pub token: Vec<u8>,
    pub topic: Bytes,
    /// The sequence number of the latest notification (24 bits).
    seq: u32,
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
    /// The next notification's sequence number, and whether it must be
    /// confirmable (`qos` 1 and up, or the 24 hours are up).
    pub fn next(&mut self, qos: u8, now: Instant) -> (u32, bool) {
        self.seq = (self.seq + 1) & 0xff_ffff;
        self.notifications += 1;
        let confirmable = qos > 0 || now.duration_since(self.last_con) >= CON_AT_LEAST_EVERY;
        if confirmable {
            self.last_con = now;
        }
        (self.seq, confirmable)
    }
}

/// What a worker tells the endpoint task about an observer's GET.
#[derive(Debug)]
pub enum ObserveEvent {
    Register {
        endpoint: SocketAddr,
        token: Vec<u8>,
        topic: Bytes,
        /// A CRC-32 of the state the registration's response carried
        /// (None: none): a state published before the subscription took
        /// effect is notified at once.
        sent: Option<u32>,
    },
    Deregister {
        endpoint: SocketAddr,
        token: Vec<u8>,
    },
}

/// Why a registration was not taken.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

pub struct Observers {
    relations: HashMap<RelationId, Relation>,
    by_observer: HashMap<(SocketAddr, Vec<u8>), RelationId>,
    by_topic: HashMap<Bytes, Vec<RelationId>>,
    next_id: RelationId,
    max: usize,
}

impl Observers {
    pub fn new(max: usize) -> Observers {
        Observers {
            relations: HashMap::new(),
            by_observer: HashMap::new(),
            by_topic: HashMap::new(),
            next_id: 0,
            max,
        }
    }

    /// Registers `endpoint`/`token` on `topic`, replacing its earlier
    /// relation. Returns the relation, and whether the topic had no
    /// observer before (so it must be subscribed to); also the topic the
    /// replaced relation left without observers, if any.
    pub fn register(
        &mut self,
        endpoint: SocketAddr,
        token: &[u8],
        topic: Bytes,
        now: Instant,
    ) -> Result<(RelationId, bool, Option<Bytes>), Full> {
        let left = self.deregister(endpoint, token);
        if self.relations.len() >= self.max {
            return Err(Full);
        }
        let id = self.next_id;
        self.next_id += 1;
        let observers = self.by_topic.entry(topic.clone()).or_default();
        let first = observers.is_empty();
        observers.push(id);
        self.by_observer.insert((endpoint, token.to_vec()), id);
        self.relations.insert(
            id,
            Relation {
                endpoint,
                token: token.to_vec(),
                topic: topic.clone(),
                seq: 0,
                last_con: now,
                in_flight: false,
                pending: None,
                last_non_mid: None,
                notifications: 0,
                since: now,
            },
        );
        // Re-registering on the same topic leaves nothing unobserved.
        let left = left.filter(|t| *t != topic);
        Ok((id, first, left))
    }

    /// Ends the relation of `endpoint`/`token`, if there is one; the topic
    /// it leaves without observers, if any.
    pub fn deregister(&mut self, endpoint: SocketAddr, token: &[u8]) -> Option<Bytes> {
        let id = self.find(endpoint, token)?;
        self.remove(id)
    }

    pub fn find(&self, endpoint: SocketAddr, token: &[u8]) -> Option<RelationId> {
        self.by_observer.get(&(endpoint, token.to_vec())).copied()
    }

    /// Ends relation `id`; the topic it leaves without observers, if any.
    pub fn remove(&mut self, id: RelationId) -> Option<Bytes> {
        let r = self.relations.remove(&id)?;
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
    pub fn by_non_mid(&self, endpoint: SocketAddr, mid: u16) -> Option<RelationId> {
        self.relations
            .iter()
            .find(|(_, r)| r.endpoint == endpoint && r.last_non_mid == Some(mid))
            .map(|(id, _)| *id)
    }

    pub fn get_mut(&mut self, id: RelationId) -> Option<&mut Relation> {
        self.relations.get_mut(&id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Relation> {
        self.relations.values()
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

    fn ep(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn relations_by_endpoint_and_token_and_the_topics_they_leave() {
        let mut o = Observers::new(10);
        let now = Instant::now();
        let t = |s: &'static str| Bytes::from_static(s.as_bytes());
        let (a, first, left) = o.register(ep(1), b"x", t("a"), now).unwrap();
        assert!(first && left.is_none());
        let (b, first, _) = o.register(ep(2), b"x", t("a"), now).unwrap();
        assert!(!first, "a second observer of the topic");
        assert_eq!(o.on(b"a"), vec![a, b]);
        // Same endpoint and token again: replaced, not added.
        let (a2, first, left) = o.register(ep(1), b"x", t("a"), now).unwrap();
        assert!(!first && left.is_none());
        assert_eq!(o.len(), 2);
        assert_eq!(o.on(b"a"), vec![b, a2]);
        // Moving to another topic: it is new, the old one still observed.
        let (_, first, left) = o.register(ep(2), b"x", t("b"), now).unwrap();
        assert!(first && left.is_none());
        assert_eq!(
            o.deregister(ep(1), b"x"),
            Some(t("a")),
            "a has no observer left"
        );
        assert_eq!(o.deregister(ep(1), b"x"), None);
        assert_eq!(o.len(), 1);
    }

    #[test]
    fn bounded_and_sequence_numbers_increase() {
        let mut o = Observers::new(2);
        let now = Instant::now();
        let topic = Bytes::from_static(b"t");
        let (id, ..) = o.register(ep(1), b"1", topic.clone(), now).unwrap();
        o.register(ep(1), b"2", topic.clone(), now).unwrap();
        assert_eq!(o.register(ep(1), b"3", topic.clone(), now), Err(Full));
        let r = o.get_mut(id).unwrap();
        assert_eq!(r.next(0, now), (1, false));
        assert_eq!(r.next(1, now), (2, true), "QoS 1: confirmable");
        assert_eq!(
            r.next(0, now + CON_AT_LEAST_EVERY),
            (3, true),
            "the daily CON"
        );
        assert_eq!(r.next(0, now + CON_AT_LEAST_EVERY), (4, false));
    }
}
