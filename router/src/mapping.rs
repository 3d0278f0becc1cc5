//! From an M2M peer and a CoAP request to an IoT topic (DESIGN.md, topic
//! templates): the first matching `[[route]]`, else the peer's template,
//! else `[defaults] topic`. Templates are compiled once; rendering writes
//! into a caller's reusable `String`, so the hot path allocates nothing.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::coap::request::method_name;
use crate::coap::Endpoint;
use crate::config::{Config, Prefix};
use crate::mqtt::topic;
use crate::template::{Part, Template};

/// A peer as the data plane knows it.
#[derive(Debug)]
pub struct PeerInfo {
    pub name: String,
    pub topic: Option<Template>,
    pub deny: bool,
    /// Where downlink commands go, when configured (`coaps://`: over a
    /// DTLS session the gateway opens).
    pub endpoint: Option<Endpoint>,
    /// Topic filters it may publish to and read through the pubsub prefix,
    /// `{peer}` replaced by its name.
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// Uri-Paths the gateway observes on it.
    pub observe: Vec<String>,
    /// Its DTLS pre-shared key, if it has one.
    pub psk: Option<crate::config::Psk>,
    /// Its client certificate's name, in certificate mode.
    pub cert_name: Option<String>,
    /// Its plain CoAP is dropped; only its DTLS sessions are it.
    pub require_dtls: bool,
}

/// What a request under the pubsub prefix does with its topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// POST, PUT.
    Publish,
    /// GET, and Observe.
    Subscribe,
}

/// Longest-prefix match over peer prefixes: one hash map per prefix length,
/// longest first, so a lookup is a handful of hash probes however many
/// peers there are.
#[derive(Debug, Default)]
pub struct PeerIndex {
    v4: Vec<(u8, HashMap<u32, u32>)>,
    v6: Vec<(u8, HashMap<u128, u32>)>,
}

fn mask_v4(addr: u32, len: u8) -> u32 {
    addr & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask_v6(addr: u128, len: u8) -> u128 {
    addr & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

impl PeerIndex {
    pub fn insert(&mut self, prefix: Prefix, peer: u32) {
        match prefix.addr {
            IpAddr::V4(a) => {
                table(&mut self.v4, prefix.len).insert(mask_v4(a.into(), prefix.len), peer)
            }
            IpAddr::V6(a) => {
                table(&mut self.v6, prefix.len).insert(mask_v6(a.into(), prefix.len), peer)
            }
        };
    }

    pub fn lookup(&self, ip: IpAddr) -> Option<u32> {
        match ip {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4
                    .iter()
                    .find_map(|(len, t)| t.get(&mask_v4(a, *len)).copied())
            }
            IpAddr::V6(a) => {
                if let Some(v4) = a.to_ipv4_mapped() {
                    return self.lookup(IpAddr::V4(v4));
                }
                let a = u128::from(a);
                self.v6
                    .iter()
                    .find_map(|(len, t)| t.get(&mask_v6(a, *len)).copied())
            }
        }
    }
}

fn table<K>(tables: &mut Vec<(u8, HashMap<K, u32>)>, len: u8) -> &mut HashMap<K, u32> {
    let i = match tables.iter().position(|(l, _)| *l <= len) {
        Some(i) if tables[i].0 == len => i,
        Some(i) => {
            tables.insert(i, (len, HashMap::new()));
            i
        }
        None => {
            tables.push((len, HashMap::new()));
            tables.len() - 1
        }
    };
    &mut tables[i].1
}

/// One level of a route's Uri-Path glob.
#[derive(Debug)]
enum Glob {
    Literal(String),
    /// `*`: exactly one segment.
    One,
    /// `**` (last only): any number of segments, none included.
    Rest,
}

#[derive(Debug)]
struct Route {
    glob: Vec<Glob>,
    peer: Option<u32>,
    method: Option<u8>,
    topic: Template,
    qos: u8,
    retain: bool,
}

impl Route {
    fn matches(&self, peer: Option<u32>, method: u8, path: &[&str]) -> bool {
        if self.peer.is_some() && self.peer != peer {
            return false;
        }
        if self.method.is_some_and(|m| m != method) {
            return false;
        }
        let mut segs = path.iter();
        for g in &self.glob {
            match g {
                Glob::Rest => return true,
                Glob::One => {
                    if segs.next().is_none() {
                        return false;
                    }
                }
                Glob::Literal(l) => {
                    if segs.next() != Some(&l.as_str()) {
                        return false;
                    }
                }
            }
        }
        segs.next().is_none()
    }
}

/// Delivery options of a mapped message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub qos: u8,
    pub retain: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// `{path.N}` with fewer than N+1 segments.
    MissingSegment(usize),
    /// A value would put `+`, `#` or NUL into the topic name.
    InvalidCharacter,
    EmptyTopic,
    /// Longer than MQTT's 65,535-byte strings allow (less the longest
    /// upstream prefix, so a bridge can still prepend it).
    TopicTooLong,
}

/// MQTT strings carry a two-byte length (MQTT 3.1.1 section 1.5.3).
pub const MAX_TOPIC_BYTES: usize = u16::MAX as usize;

impl MapError {
    pub fn message(&self) -> &'static str {
        match self {
            MapError::MissingSegment(_) => "the topic template needs more Uri-Path segments",
            MapError::InvalidCharacter => {
                "a Uri-Path segment contains '/', '+', '#' or NUL, not allowed in a topic level"
            }
            MapError::EmptyTopic => "the topic would be empty",
            MapError::TopicTooLong => "the topic would be longer than an MQTT topic can be",
        }
    }
}

#[derive(Debug)]
pub struct Mapper {
    peers: PeerIndex,
    infos: Vec<PeerInfo>,
    by_name: HashMap<String, u32>,
    by_psk_identity: HashMap<Vec<u8>, u32>,
    by_cert_name: HashMap<String, u32>,
    by_secure_endpoint: HashMap<SocketAddr, u32>,
    requires_dtls: bool,
    routes: Vec<Route>,
    default_topic: Template,
    /// `[defaults] publish` / `subscribe`, `{peer}` still in them (an
    /// unknown peer is its address, known per request).
    default_publish: Vec<String>,
    default_subscribe: Vec<String>,
    pubsub_prefix: String,
    /// The longest topic a request may map to.
    max_topic: usize,
}

/// What the mapping knows of a request.
pub struct Request<'a> {
    pub src: SocketAddr,
    /// The peer a DTLS session's credentials named: it, not the address,
    /// says who sent the request.
    pub identity: Option<&'a str>,
    pub method: u8,
    pub path: &'a [&'a str],
}

impl Mapper {
    pub fn from_config(config: &Config) -> Mapper {
        let mut peers = PeerIndex::default();
        let mut infos = Vec::with_capacity(config.peers.len());
        for (i, p) in config.peers.iter().enumerate() {
            for prefix in &p.prefixes {
                peers.insert(*prefix, i as u32);
            }
            infos.push(PeerInfo {
                name: p.name.clone(),
                topic: p.topic.clone(),
                deny: p.deny,
                endpoint: p.endpoint,
                publish: with_peer(&p.publish, &p.name),
                subscribe: with_peer(&p.subscribe, &p.name),
                observe: p.observe.clone(),
                psk: p.psk.clone(),
                cert_name: p.cert_name.clone(),
                require_dtls: p.require_dtls,
            });
        }
        let routes = config
            .routes
            .iter()
            .map(|r| Route {
                glob: r
                    .path_match
                    .trim_matches('/')
                    .split('/')
                    .map(|s| match s {
                        "*" => Glob::One,
                        "**" => Glob::Rest,
                        l => Glob::Literal(l.to_owned()),
                    })
                    .collect(),
                peer: r
                    .peer
                    .as_ref()
                    .and_then(|n| config.peers.iter().position(|p| &p.name == n))
                    .map(|i| i as u32),
                method: r
                    .method
                    .as_deref()
                    .and_then(|m| (1..=7).find(|&c| method_name(c) == m)),
                topic: r.topic.clone(),
                qos: r.qos,
                retain: r.retain,
            })
            .collect();
        let by_name = infos
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i as u32))
            .collect();
        let by_psk_identity = infos
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((p.psk.as_ref()?.identity.clone(), i as u32)))
            .collect();
        let by_cert_name = infos
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((p.cert_name.clone()?, i as u32)))
            .collect();
        let by_secure_endpoint = infos
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((p.endpoint.filter(|e| e.secure)?.addr, i as u32)))
            .collect();
        Mapper {
            requires_dtls: infos.iter().any(|p| p.require_dtls),
            peers,
            infos,
            by_name,
            by_psk_identity,
            by_cert_name,
            by_secure_endpoint,
            routes,
            default_topic: config.defaults.topic.clone(),
            default_publish: config.defaults.publish.clone(),
            default_subscribe: config.defaults.subscribe.clone(),
            pubsub_prefix: config.coap.pubsub_prefix.clone(),
            max_topic: MAX_TOPIC_BYTES
                - config
                    .upstreams
                    .iter()
                    .map(|u| u.prefix.len())
                    .max()
                    .unwrap_or(0),
        }
    }

    /// The topic a Uri-Path under the pubsub prefix names (`ps/a/b` names
    /// `a/b`), written into `out` (cleared first); None for any other path.
    pub fn direct_topic(&self, path: &[&str], out: &mut String) -> Option<Result<(), MapError>> {
        let (first, levels) = path.split_first()?;
        if self.pubsub_prefix.is_empty() || *first != self.pubsub_prefix {
            return None;
        }
        out.clear();
        for (i, level) in levels.iter().enumerate() {
            if i > 0 {
                out.push('/');
            }
            if let Err(e) = push_segment(out, level) {
                return Some(Err(e));
            }
        }
        Some(if out.is_empty() {
            Err(MapError::EmptyTopic)
        } else if out.len() > self.max_topic {
            Err(MapError::TopicTooLong)
        } else {
            Ok(())
        })
    }

    /// Whether the peer at `ip` may publish to (or read) `topic` through
    /// the pubsub prefix: its `publish` (`subscribe`) filters, or the
    /// defaults' for an unknown peer.
    pub fn allows(
        &self,
        ip: IpAddr,
        identity: Option<&str>,
        topic_name: &str,
        access: Access,
    ) -> bool {
        let topic_name = topic_name.as_bytes();
        if let Some(peer) = self.peer_id(ip, identity).map(|i| &self.infos[i as usize]) {
            let filters = match access {
                Access::Publish => &peer.publish,
                Access::Subscribe => &peer.subscribe,
            };
            return filters
                .iter()
                .any(|f| topic::matches(f.as_bytes(), topic_name));
        }
        let filters = match access {
            Access::Publish => &self.default_publish,
            Access::Subscribe => &self.default_subscribe,
        };
        if filters.is_empty() {
            return false;
        }
        let mut address = String::new();
        write_ip(&mut address, ip);
        filters
            .iter()
            .any(|f| topic::matches(f.replace("{peer}", &address).as_bytes(), topic_name))
    }

    /// Configured peers.
    pub fn peer_count(&self) -> usize {
        self.infos.len()
    }

    pub fn peers(&self) -> impl Iterator<Item = &PeerInfo> {
        self.infos.iter()
    }

    pub fn peer_by_name(&self, name: &str) -> Option<&PeerInfo> {
        self.by_name.get(name).map(|&i| &self.infos[i as usize])
    }

    /// The peer a DTLS PSK identity names, and its key.
    pub fn psk(&self, identity: &[u8]) -> Option<(&PeerInfo, &[u8])> {
        let peer = &self.infos[*self.by_psk_identity.get(identity)? as usize];
        Some((peer, &peer.psk.as_ref()?.key))
    }

    /// The peer one of a client certificate's names names (the first
    /// that does).
    pub fn certificate<'n>(&self, names: impl IntoIterator<Item = &'n str>) -> Option<&PeerInfo> {
        names
            .into_iter()
            .find_map(|n| self.by_cert_name.get(n))
            .map(|&i| &self.infos[i as usize])
    }

    /// The peer whose endpoint is `coaps://addr` (config checks there is
    /// at most one).
    pub fn peer_at_secure_endpoint(&self, addr: SocketAddr) -> Option<&PeerInfo> {
        self.by_secure_endpoint
            .get(&addr)
            .map(|&i| &self.infos[i as usize])
    }

    /// Whether some peer must use DTLS (its plain CoAP is dropped).
    pub fn requires_dtls(&self) -> bool {
        self.requires_dtls
    }

    /// The peer a request is from: the one its DTLS credentials named, else
    /// the one whose prefix holds its address.
    fn peer_id(&self, ip: IpAddr, identity: Option<&str>) -> Option<u32> {
        match identity {
            Some(name) => self.by_name.get(name).copied(),
            None => self.peers.lookup(ip),
        }
    }

    pub fn peer(&self, ip: IpAddr) -> Option<&PeerInfo> {
        self.peers.lookup(ip).map(|i| &self.infos[i as usize])
    }

    /// Renders the topic for `req` into `out` (cleared first).
    pub fn map(&self, req: &Request, out: &mut String) -> Result<Delivery, MapError> {
        let peer_id = self.peer_id(req.src.ip(), req.identity);
        let peer = peer_id.map(|i| &self.infos[i as usize]);
        let (template, delivery) = match self
            .routes
            .iter()
            .find(|r| r.matches(peer_id, req.method, req.path))
        {
            Some(r) => (
                &r.topic,
                Delivery {
                    qos: r.qos,
                    retain: r.retain,
                },
            ),
            None => (
                peer.and_then(|p| p.topic.as_ref())
                    .unwrap_or(&self.default_topic),
                Delivery {
                    qos: 0,
                    retain: false,
                },
            ),
        };
        out.clear();
        for part in template.parts() {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Peer => match peer {
                    Some(p) => out.push_str(&p.name),
                    None => write_ip(out, req.src.ip()),
                },
                Part::Ip => write_ip(out, req.src.ip()),
                Part::Port => {
                    let _ = write!(out, "{}", req.src.port());
                }
                Part::Path => {
                    for (i, seg) in req.path.iter().enumerate() {
                        if i > 0 {
                            out.push('/');
                        }
                        push_segment(out, seg)?;
                    }
                }
                Part::PathSegment(n) => {
                    push_segment(out, req.path.get(*n).ok_or(MapError::MissingSegment(*n))?)?
                }
                Part::Method => out.push_str(method_name(req.method)),
            }
        }
        if out.is_empty() {
            return Err(MapError::EmptyTopic);
        }
        if out.len() > self.max_topic {
            return Err(MapError::TopicTooLong);
        }
        Ok(delivery)
    }
}

/// The current mapper, replaced whole on a config change. Workers check the
/// generation (one atomic load) per datagram and take the new mapper when it
/// moved, so a datagram is mapped entirely by the old or the new config.
pub struct SharedMapper {
    current: RwLock<Arc<Mapper>>,
    generation: AtomicU64,
}

impl SharedMapper {
    pub fn new(mapper: Mapper) -> Arc<SharedMapper> {
        Arc::new(SharedMapper {
            current: RwLock::new(Arc::new(mapper)),
            generation: AtomicU64::new(0),
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn load(&self) -> (u64, Arc<Mapper>) {
        let current = self.current.read().unwrap();
        (self.generation(), current.clone())
    }

    pub fn store(&self, mapper: Mapper) {
        let mut current = self.current.write().unwrap();
        *current = Arc::new(mapper);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

fn write_ip(out: &mut String, ip: IpAddr) {
    let ip = match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let _ = write!(out, "{ip}");
}

/// `filters` with `{peer}` replaced by `name`.
fn with_peer(filters: &[String], name: &str) -> Vec<String> {
    filters.iter().map(|f| f.replace("{peer}", name)).collect()
}

/// One Uri-Path segment as one topic level. A segment may hold any byte
/// (RFC 7252 section 6.4 percent-decodes `%2F` into it), but a `/` would
/// make it two levels: `/a%2Fb` and `/a/b` would share a topic.
fn push_segment(out: &mut String, seg: &str) -> Result<(), MapError> {
    if seg.contains(['/', '+', '#', '\0']) {
        return Err(MapError::InvalidCharacter);
    }
    out.push_str(seg);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapper() -> Mapper {
        Mapper::from_config(
            &Config::parse(
                r#"
                [defaults]
                topic = "m2m/{peer}/{path}"
                [[peer]]
                name = "meter-17"
                prefix = ["10.1.0.0/24", "fd00::/64"]
                topic = "plant/{peer}/{path}"
                [[peer]]
                name = "meter-18"
                prefix = ["10.1.0.18/32"]
                [[route]]
                name = "alarms"
                match = "alarm/*"
                peer = "meter-17"
                topic = "alarms/{peer}/{path.1}"
                qos = 1
                retain = true
                [[route]]
                name = "gets"
                match = "cfg/**"
                method = "PUT"
                topic = "cfg/{method}/{ip}/{port}"
                "#,
            )
            .unwrap(),
        )
    }

    fn render(
        m: &Mapper,
        src: &str,
        method: u8,
        path: &[&str],
    ) -> Result<(String, Delivery), MapError> {
        let mut out = String::new();
        let req = Request {
            src: src.parse().unwrap(),
            identity: None,
            method,
            path,
        };
        m.map(&req, &mut out).map(|d| (out, d))
    }

    #[test]
    fn first_route_then_peer_then_default() {
        let m = mapper();
        let (t, d) = render(&m, "10.1.0.5:5683", 2, &["alarm", "fire"]).unwrap();
        assert_eq!(
            (t.as_str(), d),
            (
                "alarms/meter-17/fire",
                Delivery {
                    qos: 1,
                    retain: true
                }
            )
        );
        let (t, _) = render(&m, "10.1.0.5:5683", 2, &["sensors", "temp"]).unwrap();
        assert_eq!(t, "plant/meter-17/sensors/temp");
        // Longest prefix: .18 is its own peer, which has no template.
        let (t, _) = render(&m, "10.1.0.18:5683", 2, &["alarm", "fire"]).unwrap();
        assert_eq!(t, "m2m/meter-18/alarm/fire");
        let (t, _) = render(&m, "[fd00::9]:1", 2, &["x"]).unwrap();
        assert_eq!(t, "plant/meter-17/x");
        let (t, _) = render(&m, "192.0.2.1:40000", 3, &["cfg", "a", "b"]).unwrap();
        assert_eq!(t, "cfg/PUT/192.0.2.1/40000");
        let (t, _) = render(&m, "[::ffff:192.0.2.1]:9", 2, &["t"]).unwrap();
        assert_eq!(t, "m2m/192.0.2.1/t", "v4-mapped sources show as IPv4");
    }

    #[test]
    fn invalid_topics_are_refused() {
        let m = mapper();
        let (t, _) = render(&m, "10.1.0.5:1", 2, &["alarm"]).unwrap();
        assert_eq!(t, "plant/meter-17/alarm", "alarm/* needs two segments");
        let short =
            Mapper::from_config(&Config::parse("[defaults]\ntopic = \"x/{path.2}\"").unwrap());
        assert_eq!(
            render(&short, "10.9.0.5:1", 2, &["a", "b"]).unwrap_err(),
            MapError::MissingSegment(2)
        );
        assert_eq!(
            render(&m, "10.9.0.5:1", 2, &["a+b"]).unwrap_err(),
            MapError::InvalidCharacter
        );
        assert_eq!(
            render(&m, "10.9.0.5:1", 2, &["#"]).unwrap_err(),
            MapError::InvalidCharacter
        );
    }

    #[test]
    fn index_scales_to_many_peers() {
        let mut idx = PeerIndex::default();
        for i in 0..100_000u32 {
            idx.insert(
                Prefix {
                    addr: IpAddr::V4((0x0a00_0000 + i).into()),
                    len: 32,
                },
                i,
            );
        }
        idx.insert(
            Prefix {
                addr: "10.0.0.0".parse().unwrap(),
                len: 8,
            },
            999_999,
        );
        assert_eq!(idx.lookup("10.0.0.5".parse().unwrap()), Some(5));
        assert_eq!(idx.lookup("10.1.134.159".parse().unwrap()), Some(99_999));
        assert_eq!(idx.lookup("10.200.0.1".parse().unwrap()), Some(999_999));
        assert_eq!(idx.lookup("11.0.0.1".parse().unwrap()), None);
    }
}

#[cfg(test)]
mod pubsub {
    use super::*;

    fn mapper() -> Mapper {
        let config = r#"
            [defaults]
            publish = ["open/{peer}/#"]
            subscribe = ["open/#"]
            [[peer]]
            name = "meter"
            prefix = ["10.1.0.1/32"]
            publish = ["plant/{peer}/#"]
            subscribe = ["plant/+/state", "alarms/#"]
            [[peer]]
            name = "mute"
            prefix = ["10.1.0.2/32"]
        "#;
        Mapper::from_config(&Config::parse(config).unwrap())
    }

    fn allows(m: &Mapper, ip: &str, topic: &str, access: Access) -> bool {
        m.allows(ip.parse().unwrap(), None, topic, access)
    }

    #[test]
    fn a_peer_uses_its_own_filters_with_its_name_and_unknown_peers_the_defaults() {
        let m = mapper();
        let (p, s) = (Access::Publish, Access::Subscribe);
        assert!(allows(&m, "10.1.0.1", "plant/meter/valve", p));
        assert!(
            !allows(&m, "10.1.0.1", "plant/other/valve", p),
            "{{peer}} is its own name"
        );
        assert!(!allows(&m, "10.1.0.1", "plant/meter/valve", s));
        assert!(allows(&m, "10.1.0.1", "plant/line1/state", s));
        assert!(allows(&m, "10.1.0.1", "alarms/a/b", s));
        assert!(
            !allows(&m, "10.1.0.2", "plant/mute/x", p),
            "no filters: nothing"
        );
        assert!(
            !allows(&m, "10.1.0.2", "open/x", s),
            "the defaults are for unknown peers"
        );
        assert!(
            allows(&m, "10.9.9.9", "open/10.9.9.9/temp", p),
            "{{peer}}: its address"
        );
        assert!(!allows(&m, "10.9.9.9", "open/10.9.9.8/temp", p));
        assert!(allows(&m, "10.9.9.9", "open/anything", s));
    }

    #[test]
    fn the_prefix_names_a_topic() {
        let m = mapper();
        let mut out = String::new();
        assert!(m.direct_topic(&["sensors", "temp"], &mut out).is_none());
        assert_eq!(
            m.direct_topic(&["ps", "plant", "line1", "valve"], &mut out),
            Some(Ok(()))
        );
        assert_eq!(out, "plant/line1/valve");
        assert_eq!(
            m.direct_topic(&["ps"], &mut out),
            Some(Err(MapError::EmptyTopic))
        );
        assert_eq!(
            m.direct_topic(&["ps", "a", "#"], &mut out),
            Some(Err(MapError::InvalidCharacter))
        );
        let none = Config::parse("[coap]\npubsub_prefix = \"\"\n").unwrap();
        assert!(Mapper::from_config(&none)
            .direct_topic(&["ps", "a"], &mut out)
            .is_none());
    }

    #[test]
    fn filters_are_checked_when_the_config_is() {
        for bad in [
            "[[peer]]\nname = \"a\"\nprefix = [\"10.0.0.1/32\"]\npublish = [\"a/#/b\"]\n",
            "[defaults]\nsubscribe = [\"{name}/x\"]\n",
            "[coap]\npubsub_prefix = \"a/b\"\n",
        ] {
            assert!(Config::parse(bad).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod limits {
    use super::*;

    fn map(config: &str, path: &[&str]) -> Result<String, MapError> {
        let m = Mapper::from_config(&Config::parse(config).unwrap());
        let mut out = String::new();
        let req = Request {
            src: "10.9.0.1:5683".parse().unwrap(),
            identity: None,
            method: 2,
            path,
        };
        m.map(&req, &mut out).map(|_| out)
    }

    /// Issue 11, finding 4: a template repeating `{path}` and a long
    /// Uri-Path made a 70,021-byte topic, whose length field then wrapped.
    #[test]
    fn a_topic_longer_than_mqtt_allows_is_refused_not_cut() {
        let repeated = format!("[defaults]\ntopic = \"{}\"\n", "{path}/".repeat(20) + "x");
        let segment = "a".repeat(3_500);
        assert_eq!(map(&repeated, &[&segment]), Err(MapError::TopicTooLong));
        // Just within the limit is fine: 18 x 3,501 + 1 = 63,019 bytes.
        let fits = format!("[defaults]\ntopic = \"{}\"\n", "{path}/".repeat(18) + "x");
        assert_eq!(map(&fits, &[&segment]).unwrap().len(), 18 * 3_501 + 1);
        // An upstream prefix takes its length off the limit, so the bridge
        // can always prepend it.
        let prefixed = format!(
            "{fits}[[upstream]]\nname = \"c\"\nurl = \"mqtt://127.0.0.1\"\nprefix = \"{}\"\n",
            "p".repeat(1_000)
        );
        let long = "a".repeat(3_600); // 18 x 3,601 + 1 = 64,819: fits 65,535, not 64,535
        assert!(map(&fits, &[&long]).is_ok());
        assert_eq!(map(&prefixed, &[&long]), Err(MapError::TopicTooLong));
    }

    /// Issue 11, finding 11: `/a%2Fb` (one segment "a/b") and `/a/b` (two)
    /// published to the same topic, and `{path.N}` could span levels.
    #[test]
    fn a_segment_holding_a_slash_is_refused() {
        let config = "[defaults]\ntopic = \"m2m/{path.0}\"\n";
        assert_eq!(map(config, &["a/b"]), Err(MapError::InvalidCharacter));
        assert_eq!(map(config, &["a", "b"]).unwrap(), "m2m/a");
    }

    #[test]
    fn templates_and_prefixes_are_bounded_in_the_config() {
        let long = format!("[defaults]\ntopic = \"{}\"\n", "t".repeat(1_025));
        assert!(Config::parse(&long).is_err());
        let prefix = format!(
            "[[upstream]]\nname = \"c\"\nurl = \"mqtt://127.0.0.1\"\nprefix = \"{}\"\n",
            "p".repeat(1_025)
        );
        assert!(Config::parse(&prefix).is_err());
    }
}
