//! The gateway observing devices (RFC 7641, the client's side): which
//! paths it observes on which peer, and where each relation stands. The
//! endpoint task (`coap::downlink`) owns it and does the I/O; this keeps
//! the state and the rules:
//!
//! - A watch is registered as soon as its peer has an endpoint, and again
//!   when the relation is lost: no notification for Max-Age plus a margin
//!   (section 3.3.1), an error response ending it (section 3.2), no answer
//!   to the registration, or the device heard from at another endpoint (a
//!   restart or a new address). Failed attempts back off, up to
//!   [`MAX_BACKOFF`]; an uplink from the device tries again at once.
//! - A re-registration reuses the relation's token, so the device updates
//!   the relation in place (section 3.3.1).
//! - A notification older than the freshest one seen since the latest
//!   registration is stale and dropped (section 3.4, [`is_newer`]); so is
//!   a retransmitted one. The answer to a registration is current by
//!   definition, so freshness starts again from it (a device that
//!   restarted numbers from scratch).
//! - A resource the device serves without Observe is read again every
//!   Max-Age (at least [`MIN_POLL`]): the gateway polls what it cannot
//!   observe.

use crate::coap::Endpoint;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::ids::Token;

/// Watches kept in all; runtime additions past it are refused.
pub const MAX_WATCHES: usize = 10_000;
/// Paths one `[[peer]] observe` may list, and command watches one peer
/// may have.
pub const MAX_PER_PEER: usize = 32;
/// How often a watch with no endpoint looks for one (a configured
/// endpoint that appeared, or an uplink whose news was lost).
const UNREACHABLE_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between two registration attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
const FIRST_BACKOFF: Duration = Duration::from_secs(4);
/// The shortest interval between reads of a resource served without Observe.
pub const MIN_POLL: Duration = Duration::from_secs(10);
/// Max-Age when the option is absent (RFC 7252 section 5.10.5).
pub const DEFAULT_MAX_AGE: u32 = 60;
/// Section 3.4: after 128 s a notification is newer whatever its number.
const SEQUENCE_HORIZON: Duration = Duration::from_secs(128);

/// Section 3.4: whether a notification numbered `v2`, arriving at `t2`,
/// is newer than the one numbered `v1` that arrived at `t1` (24-bit
/// numbers that wrap).
pub fn is_newer(v1: u32, t1: Instant, v2: u32, t2: Instant) -> bool {
    const HALF: u32 = 1 << 23;
    (v1 < v2 && v2 - v1 < HALF) || (v1 > v2 && v1 - v2 > HALF) || t2 > t1 + SEQUENCE_HORIZON
}

pub type WatchId = u64;

/// Where a watch comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `[[peer]] observe`: follows the configuration.
    Config,
    /// An MQTT command with method `observe`: lasts until `unobserve`, the
    /// peer's removal, or a restart.
    Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Waiting for an endpoint (`due` None) or for the next attempt.
    Idle,
    /// The registration is on its way.
    Registering,
    /// Notifications come; at `due` the relation counts as lost.
    Observing,
}

pub struct Watch {
    pub peer: String,
    /// The Uri-Path, segments joined by '/'.
    pub path: String,
    pub origin: Origin,
    pub state: State,
    /// Where the relation is (or is being registered).
    pub endpoint: Option<Endpoint>,
    pub token: Option<Token>,
    /// The sequence number and arrival of the freshest notification.
    freshest: Option<(u32, Instant)>,
    pub due: Option<Instant>,
    failures: u32,
    pub registrations: u64,
    pub notifications: u64,
    /// The topic of the latest notification published.
    pub topic: Option<String>,
    pub since: Instant,
}

/// What a 2.xx answer to a registration, or a notification, means.
#[derive(Debug, PartialEq, Eq)]
pub enum Fresh {
    /// Newer than anything seen: publish it. Carries the freshness to go
    /// back to if publishing it fails.
    Yes(Option<(u32, Instant)>),
    /// Stale or repeated: acknowledge it and drop it.
    No,
}

impl Watch {
    fn new(peer: &str, path: &str, origin: Origin, now: Instant) -> Watch {
        Watch {
            peer: peer.to_owned(),
            path: path.to_owned(),
            origin,
            state: State::Idle,
            endpoint: None,
            token: None,
            freshest: None,
            due: Some(now),
            failures: 0,
            registrations: 0,
            notifications: 0,
            topic: None,
            since: now,
        }
    }

    /// The path's segments, for Uri-Path options.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path.split('/').filter(|s| !s.is_empty())
    }

    /// A registration went to `endpoint` with `token`: its answer starts
    /// the sequence afresh (the device may have restarted its numbers).
    pub fn registering(&mut self, endpoint: Endpoint, token: Token) {
        self.freshest = None;
        self.endpoint = Some(endpoint);
        self.token = Some(token);
        self.state = State::Registering;
        self.due = None;
        self.registrations += 1;
    }

    /// No endpoint to register with: look again shortly (the device's
    /// first uplink also registers it at once).
    pub fn unreachable(&mut self, now: Instant) {
        self.state = State::Idle;
        self.due = Some(now + UNREACHABLE_RETRY);
    }

    /// A 2.xx answer or notification with Observe number `seq` (None: the
    /// device does not observe this resource for us) and `max_age`.
    pub fn notified(&mut self, seq: Option<u32>, max_age: u32, now: Instant) -> Fresh {
        self.failures = 0;
        let max_age = Duration::from_secs(u64::from(max_age));
        let Some(seq) = seq else {
            // Not observable: read it again when it gets old.
            self.state = State::Idle;
            self.due = Some(now + max_age.max(MIN_POLL));
            self.notifications += 1;
            return Fresh::Yes(self.freshest);
        };
        self.state = State::Observing;
        // Section 3.3.1: the client may re-register once Max-Age is up; a
        // margin lets a notification sent then arrive first.
        self.due = Some(now + max_age + max_age / 4 + Duration::from_secs(5));
        let before = self.freshest;
        if before.is_some_and(|(v1, t1)| !is_newer(v1, t1, seq, now)) {
            return Fresh::No;
        }
        self.freshest = Some((seq, now));
        self.notifications += 1;
        Fresh::Yes(before)
    }

    /// Publishing the notification numbered `seq` failed: it is fresh again
    /// when the device retransmits it.
    pub fn unpublished(&mut self, seq: u32, before: Option<(u32, Instant)>) {
        if self.freshest.is_some_and(|(v, _)| v == seq) {
            self.freshest = before;
            self.notifications = self.notifications.saturating_sub(1);
        }
    }

    /// The relation ended or could not be made: try again later, waiting
    /// longer after each failure in a row.
    pub fn failed(&mut self, now: Instant) {
        let backoff = FIRST_BACKOFF.saturating_mul(1 << self.failures.min(16));
        self.failures += 1;
        self.state = State::Idle;
        self.due = Some(now + backoff.min(MAX_BACKOFF));
    }

    /// Heard from the device, whose endpoint is now `endpoint`: whether to
    /// register now (it is waiting, or the relation is with another
    /// endpoint).
    pub fn heard_from(&mut self, endpoint: Endpoint) -> bool {
        let moved = self.endpoint.is_some_and(|e| e != endpoint);
        if self.state == State::Idle || moved {
            self.failures = 0;
            return true;
        }
        false
    }
}

/// Why a watch was not added.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

#[derive(Default)]
pub struct Watches {
    watches: HashMap<WatchId, Watch>,
    by_path: HashMap<(String, String), WatchId>,
    next_id: WatchId,
}

/// The watches, owned by the endpoint task and read by the control socket
/// (`observe ls`).
pub type SharedWatches = std::sync::Arc<std::sync::Mutex<Watches>>;

impl Watches {
    /// Adds a watch of `path` on `peer` (due now), or finds the one there
    /// is; a command's watch of a configured path stays the config's.
    pub fn add(
        &mut self,
        peer: &str,
        path: &str,
        origin: Origin,
        now: Instant,
    ) -> Result<WatchId, Full> {
        let key = (peer.to_owned(), path.to_owned());
        if let Some(&id) = self.by_path.get(&key) {
            if origin == Origin::Config {
                self.watches.get_mut(&id).expect("indexed").origin = origin;
            }
            return Ok(id);
        }
        if self.watches.len() >= MAX_WATCHES {
            return Err(Full);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.watches.insert(id, Watch::new(peer, path, origin, now));
        self.by_path.insert(key, id);
        Ok(id)
    }

    /// Watches `peer` has from commands.
    pub fn commanded(&self, peer: &str) -> usize {
        self.watches
            .values()
            .filter(|w| w.peer == peer && w.origin == Origin::Command)
            .count()
    }

    /// Every watch and its peer, to check where each should be.
    pub fn peers(&self) -> Vec<(WatchId, String)> {
        self.watches
            .iter()
            .map(|(id, w)| (*id, w.peer.clone()))
            .collect()
    }

    pub fn find(&self, peer: &str, path: &str) -> Option<WatchId> {
        self.by_path
            .get(&(peer.to_owned(), path.to_owned()))
            .copied()
    }

    pub fn remove(&mut self, id: WatchId) -> Option<Watch> {
        let w = self.watches.remove(&id)?;
        self.by_path.remove(&(w.peer.clone(), w.path.clone()));
        Some(w)
    }

    /// Brings the watches in line with the configuration: `configured` is
    /// every (peer, path) its `observe` lists hold, `peer_exists` whether a
    /// peer is still there (and not denied). Config watches no longer
    /// listed, and any watch of a peer gone, are removed and returned;
    /// listed paths not yet watched are added (the count of those refused
    /// for [`MAX_WATCHES`] is returned beside).
    pub fn sync<'a>(
        &mut self,
        configured: impl Iterator<Item = (&'a str, &'a str)>,
        peer_exists: impl Fn(&str) -> bool,
        now: Instant,
    ) -> (Vec<(WatchId, Watch)>, usize) {
        let listed: std::collections::HashSet<(&str, &str)> = configured.collect();
        let gone: Vec<WatchId> = self
            .watches
            .iter()
            .filter(|(_, w)| {
                !peer_exists(&w.peer)
                    || (w.origin == Origin::Config
                        && !listed.contains(&(w.peer.as_str(), w.path.as_str())))
            })
            .map(|(id, _)| *id)
            .collect();
        let removed = gone
            .into_iter()
            .filter_map(|id| self.remove(id).map(|w| (id, w)))
            .collect();
        let mut refused = 0;
        for (peer, path) in listed {
            if self.add(peer, path, Origin::Config, now).is_err() {
                refused += 1;
            }
        }
        (removed, refused)
    }

    pub fn get_mut(&mut self, id: WatchId) -> Option<&mut Watch> {
        self.watches.get_mut(&id)
    }

    /// The watches of `peer`.
    pub fn of(&self, peer: &str) -> Vec<WatchId> {
        self.watches
            .iter()
            .filter(|(_, w)| w.peer == peer)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Watches whose time came: to register, or lost.
    pub fn due(&self, now: Instant) -> Vec<WatchId> {
        self.watches
            .iter()
            .filter(|(_, w)| w.due.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn next_due(&self) -> Option<Instant> {
        self.watches.values().filter_map(|w| w.due).min()
    }

    /// Relations being observed now (a gauge).
    pub fn observing(&self) -> usize {
        self.watches
            .values()
            .filter(|w| w.state == State::Observing)
            .count()
    }

    /// Every watch as `ctl observe ls` shows it, by peer and path.
    pub fn list(&self, now: Instant) -> Vec<serde_json::Value> {
        let mut watches: Vec<&Watch> = self.watches.values().collect();
        watches.sort_by(|a, b| (&a.peer, &a.path).cmp(&(&b.peer, &b.path)));
        watches
            .into_iter()
            .map(|w| {
                serde_json::json!({
                    "peer": w.peer,
                    "path": w.path,
                    "origin": match w.origin {
                        Origin::Config => "config",
                        Origin::Command => "command",
                    },
                    "state": match w.state {
                        State::Idle => "idle",
                        State::Registering => "registering",
                        State::Observing => "observing",
                    },
                    "endpoint": w.endpoint.map(|e| e.to_string()),
                    "topic": w.topic,
                    "age_s": now.duration_since(w.since).as_secs(),
                    "registrations": w.registrations,
                    "notifications": w.notifications,
                })
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.watches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.watches.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EP: Endpoint = Endpoint::plain(std::net::SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 7)),
        5683,
    ));

    #[test]
    fn newer_by_number_within_half_the_space_or_by_time() {
        let t = Instant::now();
        assert!(is_newer(1, t, 2, t));
        assert!(!is_newer(2, t, 1, t), "older");
        assert!(!is_newer(5, t, 5, t), "the same one again");
        assert!(is_newer(0xff_fff0, t, 3, t), "wrapped");
        assert!(!is_newer(3, t, 0xff_fff0, t), "from before the wrap");
        let later = t + Duration::from_secs(129);
        assert!(is_newer(9, t, 2, later), "128 s later, whatever the number");
    }

    #[test]
    fn stale_and_repeated_notifications_are_dropped_and_a_failed_publish_undone() {
        let now = Instant::now();
        let mut w = Watch::new("meter", "temp", Origin::Config, now);
        w.registering(EP, [1, 2, 3, 4]);
        assert_eq!(w.state, State::Registering);
        assert_eq!(w.notified(Some(10), 60, now), Fresh::Yes(None));
        assert_eq!(w.state, State::Observing);
        assert_eq!(w.due, Some(now + Duration::from_secs(60 + 15 + 5)));
        assert_eq!(w.notified(Some(10), 60, now), Fresh::No, "a retransmission");
        assert_eq!(w.notified(Some(9), 60, now), Fresh::No, "reordered, stale");
        let before = match w.notified(Some(11), 60, now) {
            Fresh::Yes(before) => before,
            Fresh::No => panic!("11 is newer"),
        };
        w.unpublished(11, before);
        assert!(
            matches!(w.notified(Some(11), 60, now), Fresh::Yes(_)),
            "not kept, so fresh when it comes again"
        );
        assert_eq!(w.notifications, 2);
        // Registered again (the relation was lost): its answer is current,
        // whatever its number (the device may have restarted).
        w.registering(EP, [1, 2, 3, 4]);
        assert!(matches!(w.notified(Some(1), 60, now), Fresh::Yes(None)));
        assert_eq!(w.notified(Some(1), 60, now), Fresh::No, "then as before");
        w.registering(
            Endpoint::plain(std::net::SocketAddr::from(([10, 0, 0, 7], 40000))),
            [5; 4],
        );
        assert!(matches!(w.notified(Some(0), 60, now), Fresh::Yes(None)));
    }

    #[test]
    fn failures_back_off_and_hearing_from_the_device_retries_at_once() {
        let now = Instant::now();
        let mut w = Watch::new("meter", "temp", Origin::Config, now);
        let mut waits = Vec::new();
        for _ in 0..10 {
            w.failed(now);
            waits.push(w.due.unwrap() - now);
        }
        assert_eq!(waits[0], FIRST_BACKOFF);
        assert_eq!(waits[1], FIRST_BACKOFF * 2);
        assert_eq!(*waits.last().unwrap(), MAX_BACKOFF);
        assert!(w.heard_from(EP), "idle: register now");
        w.registering(EP, [1; 4]);
        w.notified(Some(1), 60, now);
        assert!(!w.heard_from(EP), "observing there already");
        assert!(
            w.heard_from(Endpoint::plain(std::net::SocketAddr::from((
                [10, 0, 0, 7],
                40000
            )))),
            "moved"
        );
        // Served without Observe: read again after Max-Age, at least MIN_POLL.
        w.notified(None, 1, now);
        assert_eq!((w.state, w.due), (State::Idle, Some(now + MIN_POLL)));
    }

    #[test]
    fn sync_follows_the_configuration_and_keeps_commands_of_present_peers() {
        let now = Instant::now();
        let mut ws = Watches::default();
        let a = ws.add("a", "x", Origin::Config, now).unwrap();
        let cmd = ws.add("a", "y", Origin::Command, now).unwrap();
        ws.add("b", "x", Origin::Command, now).unwrap();
        let (removed, refused) = ws.sync([("a", "z")].into_iter(), |p| p == "a", now);
        let mut removed: Vec<(String, String)> =
            removed.into_iter().map(|(_, w)| (w.peer, w.path)).collect();
        removed.sort();
        assert_eq!(
            removed,
            vec![("a".into(), "x".into()), ("b".into(), "x".into())],
            "a/x is no longer configured, b is gone"
        );
        assert_eq!(refused, 0);
        assert_eq!(ws.find("a", "y"), Some(cmd), "a command's watch stays");
        assert!(ws.find("a", "z").is_some(), "newly configured");
        assert_eq!(ws.find("a", "x"), None);
        assert_ne!(ws.find("a", "z"), Some(a));
        assert_eq!(ws.due(now).len(), 2);
    }

    #[test]
    fn watches_are_bounded() {
        let now = Instant::now();
        let mut ws = Watches::default();
        for i in 0..MAX_WATCHES {
            ws.add("p", &i.to_string(), Origin::Command, now).unwrap();
        }
        assert_eq!(ws.add("p", "one-more", Origin::Command, now), Err(Full));
        assert!(
            ws.add("p", "7", Origin::Command, now).is_ok(),
            "already there"
        );
    }
}
