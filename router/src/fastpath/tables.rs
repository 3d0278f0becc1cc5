//! The policy tables as the BPF maps hold them, computed from the config.
//!
//! Kept separate from the loader so the differential tests can hand the very
//! same tables to the reference classifier (through [`Policy`]) and to the
//! kernel (through the maps).

use std::net::IpAddr;

use router_common::classify::{Policy, Source};
use router_common::maps::{PeerPolicy, MAX_PEERS, POLICY_ALLOW, POLICY_DENY, UNKNOWN_PEER_ID};
use router_common::rate::gcra_params;

use crate::config::{Config, Prefix, Rate, UnknownPeers};

#[derive(Clone, Debug, Default)]
pub struct PolicyTables {
    /// UDP ports the fast path treats as CoAP.
    pub coap_ports: Vec<u16>,
    /// Applies to sources no peer prefix covers.
    pub default_policy: PeerPolicy,
    /// Every peer prefix with its policy.
    pub prefixes: Vec<(Prefix, PeerPolicy)>,
    /// Peer names indexed by peer id; index 0 is the unknown-sources bucket.
    pub peer_names: Vec<String>,
}

fn rate_params(rate: Rate, burst: u32) -> (u64, u64) {
    gcra_params(rate.0.unwrap_or(0), burst)
}

impl PolicyTables {
    pub fn from_config(config: &Config) -> Result<PolicyTables, String> {
        if config.peers.len() >= MAX_PEERS as usize {
            return Err(format!(
                "{} peers configured; the fast path holds at most {}",
                config.peers.len(),
                MAX_PEERS - 1
            ));
        }
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
        let mut peer_names = vec!["(unknown)".to_owned()];
        let mut prefixes = Vec::new();
        for (i, peer) in config.peers.iter().enumerate() {
            let (interval_ns, burst_ns) =
                rate_params(peer.rate.unwrap_or(d.rate), peer.burst.unwrap_or(d.burst));
            let policy = PeerPolicy {
                interval_ns,
                burst_ns,
                peer_id: i as u32 + 1,
                action: if peer.deny { POLICY_DENY } else { POLICY_ALLOW },
            };
            prefixes.extend(peer.prefixes.iter().map(|p| (*p, policy)));
            peer_names.push(peer.name.clone());
        }
        Ok(PolicyTables {
            coap_ports: config.coap_ports(),
            default_policy,
            prefixes,
            peer_names,
        })
    }

    pub fn peer_name(&self, peer_id: u32) -> &str {
        self.peer_names
            .get(peer_id as usize)
            .map_or("(gone)", String::as_str)
    }
}

/// The reference side of the differential tests: a linear longest-prefix
/// match, as obviously right as it is slow.
impl Policy for PolicyTables {
    fn is_coap_port(&self, port: u16) -> bool {
        self.coap_ports.contains(&port)
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
