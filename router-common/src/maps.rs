//! The BPF maps' names, sizes and value types: the contract between the XDP
//! program and the daemon.

/// The policy tables come in two copies, 0 and 1. The XDP program reads
/// `ACTIVE_TABLES[0]` once per packet and uses that copy; the daemon writes a
/// change into the other copy, then flips the index with one map update, so
/// no packet ever sees half of a change (then it brings the old copy up to
/// date for the next change).
pub const ACTIVE_TABLES: &str = "ACTIVE_TABLES";
/// LPM tries of IPv4 peer prefixes, copies 0 and 1: `Key<[u8; 4]>`
/// (address in network order) -> [`PeerPolicy`].
pub const PEERS_V4: [&str; 2] = ["PEERS_V4_0", "PEERS_V4_1"];
/// LPM tries of IPv6 peer prefixes: `Key<[u8; 16]>` -> [`PeerPolicy`].
pub const PEERS_V6: [&str; 2] = ["PEERS_V6_0", "PEERS_V6_1"];
/// Array of two [`PeerPolicy`], one per copy: what applies to sources in
/// neither trie.
pub const DEFAULT_POLICY: &str = "DEFAULT_POLICY";
/// Array indexed by UDP port (host order): [`PORT_COAP`] or [`PORT_COAPS`]
/// marks a port the fast path guards; 0 any other.
pub const COAP_PORTS: &str = "COAP_PORTS";
pub const PORT_COAP: u32 = 1;
/// CoAP over DTLS: the datagrams are DTLS records.
pub const PORT_COAPS: u32 = 2;
/// Array of one [`PeerPolicy`]: the rate of ClientHellos per source on the
/// CoAPS ports (its `peer_id` and `action` unused).
pub const HELLO_POLICY: &str = "HELLO_POLICY";
/// LRU hash of sources (IPv4 as ::ffff:a.b.c.d) -> GCRA state of their
/// ClientHellos.
pub const HELLO_RATE: &str = "HELLO_RATE";
/// Array indexed by peer id: the peer's GCRA state (see `rate`), shared by
/// all CPUs and updated with compare-and-swap.
pub const PEER_RATE: &str = "PEER_RATE";
/// LRU hash of unknown sources (IPv4 as ::ffff:a.b.c.d) -> GCRA state: the
/// default rate applies to each unknown source separately.
pub const UNKNOWN_RATE: &str = "UNKNOWN_RATE";
/// Per-CPU array indexed by `Reason as u32` -> [`Counter`].
pub const VERDICTS: &str = "VERDICTS";
/// Per-CPU array indexed by peer id -> [`PeerCounters`].
pub const PEER_STATS: &str = "PEER_STATS";

/// Every map above: what a persisted fast path pins and adopts.
pub const ALL: [&str; 13] = [
    ACTIVE_TABLES,
    PEERS_V4[0],
    PEERS_V4[1],
    PEERS_V6[0],
    PEERS_V6[1],
    DEFAULT_POLICY,
    COAP_PORTS,
    PEER_RATE,
    UNKNOWN_RATE,
    VERDICTS,
    PEER_STATS,
    HELLO_POLICY,
    HELLO_RATE,
];

/// Peer ids run from 1 to `MAX_PEERS - 1`; id 0 stands for unknown sources.
pub const MAX_PEERS: u32 = 131_072;
pub const UNKNOWN_PEER_ID: u32 = 0;
/// Prefixes per address family across all peers.
pub const MAX_PREFIXES: u32 = 262_144;
/// Unknown sources whose rate state is kept (least recently seen evicted).
pub const MAX_UNKNOWN_SOURCES: u32 = 65_536;
pub const PORT_COUNT: u32 = 65_536;

/// `PeerPolicy::action` values.
pub const POLICY_ALLOW: u32 = 0;
pub const POLICY_DENY: u32 = 1;
/// Allowed on CoAPS ports only: its plain CoAP is dropped.
pub const POLICY_REQUIRE_DTLS: u32 = 2;

/// What the fast path does with a peer's well-formed CoAP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerPolicy {
    /// GCRA emission interval: 1 s / rate. 0 means no rate limit.
    pub interval_ns: u64,
    /// GCRA burst tolerance: (burst - 1) * interval_ns.
    pub burst_ns: u64,
    /// Index into `PEER_RATE` and `PEER_STATS`.
    pub peer_id: u32,
    /// [`POLICY_ALLOW`], [`POLICY_DENY`] or [`POLICY_REQUIRE_DTLS`].
    pub action: u32,
}

/// Packets and bytes (whole frames, as XDP sees them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

impl Counter {
    #[inline(always)]
    pub fn add(&mut self, bytes: u64) {
        self.packets += 1;
        self.bytes += bytes;
    }

    pub fn merge(&mut self, other: &Counter) {
        self.packets += other.packets;
        self.bytes += other.bytes;
    }
}

/// Per-peer policy verdicts for well-formed CoAP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerCounters {
    pub accepted: Counter,
    /// Denied, unknown-and-dropped or over the rate.
    pub dropped: Counter,
}

impl PeerCounters {
    pub fn merge(&mut self, other: &PeerCounters) {
        self.accepted.merge(&other.accepted);
        self.dropped.merge(&other.dropped);
    }
}

/// IPv4 addresses as keys of the IPv6-sized `UNKNOWN_RATE` map (RFC 4291
/// section 2.5.5.2, IPv4-mapped IPv6 address).
#[inline(always)]
pub const fn v4_mapped(addr: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
    ]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all three are repr(C), made of integers, with no padding
    // (sizes asserted below), so any byte pattern is a valid value.
    unsafe impl aya::Pod for super::PeerPolicy {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::PeerCounters {}
}

const _: () = assert!(core::mem::size_of::<PeerPolicy>() == 24);
const _: () = assert!(core::mem::size_of::<Counter>() == 16);
const _: () = assert!(core::mem::size_of::<PeerCounters>() == 32);
