//! The policy tables as the BPF maps hold them, computed from the config.
//!
//! Kept separate from the loader so the differential tests can hand the very
//! same tables to the reference classifier (through [`Policy`]) and to the
//! kernel (through the maps).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use router_common::classify::{Policy, Source};
use router_common::maps::{
    PeerPolicy, MAX_PEERS, POLICY_ALLOW, POLICY_DENY, POLICY_REQUIRE_DTLS, PORT_COAP, PORT_COAPS,
    UNKNOWN_PEER_ID,
};
use router_common::rate::{gcra_params, with_clock_tick};

use crate::config::{Config, Prefix, Rate, UnknownPeers};

#[derive(Clone, Debug, Default)]
pub struct PolicyTables {
    /// UDP ports the fast path treats as CoAP, and as CoAP over DTLS.
    pub coap_ports: Vec<u16>,
    pub coaps_ports: Vec<u16>,
    /// The rate of ClientHellos per source on the CoAPS ports.
    pub hello_policy: PeerPolicy,
    /// Applies to sources no peer prefix covers.
    pub default_policy: PeerPolicy,
    /// Every peer prefix with its policy.
    pub prefixes: Vec<(Prefix, PeerPolicy)>,
    /// Peer names indexed by peer id; index 0 is the unknown-sources bucket,
    /// free ids hold "".
    pub peer_names: Vec<String>,
    /// The reverse of `peer_names`.
    ids: HashMap<String, u32>,
}

/// GCRA parameters for the fast path, whose clock is the coarse one: the
/// burst tolerance spans one more of its ticks (`router_common::rate`).
fn rate_params(rate: Rate, burst: u32) -> (u64, u64) {
    with_clock_tick(gcra_params(rate.0.unwrap_or(0), burst), coarse_tick_ns())
}

/// The resolution of CLOCK_MONOTONIC_COARSE, which is what
/// `bpf_ktime_get_coarse_ns` reads: one tick (1/HZ).
pub fn coarse_tick_ns() -> u64 {
    static TICK: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICK.get_or_init(|| {
        let mut res = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_getres writes one timespec into a live one.
        let ok = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) } == 0;
        if ok {
            res.tv_sec as u64 * 1_000_000_000 + res.tv_nsec as u64
        } else {
            // The coarsest tick Linux has (HZ=100).
            10_000_000
        }
    })
}

impl PolicyTables {
    pub fn from_config(config: &Config) -> Result<PolicyTables, String> {
        PolicyTables::build(config, None)
    }

    /// Tables for `config`. Peers already in `previous` keep their ids (and
    /// so their rate state and counters); new peers get unused ids.
    pub fn build(config: &Config, previous: Option<&PolicyTables>) -> Result<PolicyTables, String> {
        let d = &config.defaults;
        let (interval_ns, burst_ns) = rate_params(d.rate, d.burst);
        let default_policy = PeerPolicy {
            interval_ns,
            burst_ns,
            peer_id: UNKNOWN_PEER_ID,
            action: match d.unknown_peers {
                UnknownPeers::Allow => POLICY_ALLOW,
                UnknownPeers::Drop => POLICY_DENY,
            },
        };
        let ids = assign_ids(config, previous)?;
        let mut peer_names =
            vec![String::new(); ids.iter().copied().max().unwrap_or(0) as usize + 1];
        peer_names[0] = "(unknown)".to_owned();
        let mut prefixes = Vec::new();
        for (peer, &id) in config.peers.iter().zip(&ids) {
            let (interval_ns, burst_ns) =
                rate_params(peer.rate.unwrap_or(d.rate), peer.burst.unwrap_or(d.burst));
            let policy = PeerPolicy {
                interval_ns,
                burst_ns,
                peer_id: id,
                action: if peer.deny {
                    POLICY_DENY
                } else if peer.require_dtls {
                    POLICY_REQUIRE_DTLS
                } else {
                    POLICY_ALLOW
                },
            };
            prefixes.extend(peer.prefixes.iter().map(|p| (*p, policy)));
            peer_names[id as usize] = peer.name.clone();
        }
        let ids = config
            .peers
            .iter()
            .map(|p| p.name.clone())
            .zip(ids)
            .collect();
        let (interval_ns, burst_ns) = rate_params(config.dtls.hello_rate, config.dtls.hello_burst);
        Ok(PolicyTables {
            coap_ports: config.coap_ports(),
            coaps_ports: config.coaps_ports(),
            hello_policy: PeerPolicy {
                interval_ns,
                burst_ns,
                peer_id: UNKNOWN_PEER_ID,
                action: POLICY_ALLOW,
            },
            default_policy,
            prefixes,
            peer_names,
            ids,
        })
    }

    pub fn peer_name(&self, peer_id: u32) -> &str {
        match self.peer_names.get(peer_id as usize) {
            Some(name) if !name.is_empty() => name,
            _ => "(gone)",
        }
    }

    /// The id of the peer called `name`.
    pub fn peer_id(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }
}

/// Ids for the config's peers, in order: kept from `previous` by name, else
/// fresh ones past the highest in use, else (when the array is full) ids
/// freed by removed peers.
fn assign_ids(config: &Config, previous: Option<&PolicyTables>) -> Result<Vec<u32>, String> {
    let known: HashMap<&str, u32> = previous
        .map(|p| {
            p.peer_names
                .iter()
                .enumerate()
                .skip(1)
                .filter(|(_, n)| !n.is_empty())
                .map(|(i, n)| (n.as_str(), i as u32))
                .collect()
        })
        .unwrap_or_default();
    let kept: HashSet<u32> = config
        .peers
        .iter()
        .filter_map(|p| known.get(p.name.as_str()).copied())
        .collect();
    let mut next = previous.map_or(1, |p| p.peer_names.len() as u32).max(1);
    let mut recycled = (1..next).filter(|id| !kept.contains(id));
    config
        .peers
        .iter()
        .map(|p| {
            if let Some(&id) = known.get(p.name.as_str()) {
                return Ok(id);
            }
            if next < MAX_PEERS {
                next += 1;
                return Ok(next - 1);
            }
            recycled
                .next()
                .ok_or_else(|| format!("the fast path holds at most {} peers", MAX_PEERS - 1))
        })
        .collect()
}

/// The reference side of the differential tests: a linear longest-prefix
/// match, as obviously right as it is slow.
impl Policy for PolicyTables {
    fn port_kind(&self, port: u16) -> u32 {
        if self.coap_ports.contains(&port) {
            PORT_COAP
        } else if self.coaps_ports.contains(&port) {
            PORT_COAPS
        } else {
            0
        }
    }

    fn hello_policy(&self) -> PeerPolicy {
        self.hello_policy
    }

    fn lookup(&self, src: Source) -> Option<PeerPolicy> {
        let ip = match src {
            Source::V4(a) => IpAddr::from(a),
            Source::V6(a) => IpAddr::from(a),
        };
        self.prefixes
            .iter()
            .filter(|(prefix, _)| prefix.contains(ip))
            .max_by_key(|(prefix, _)| prefix.len)
            .map(|(_, policy)| *policy)
    }

    fn default_policy(&self) -> PeerPolicy {
        self.default_policy
    }
}
