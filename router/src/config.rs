//! The TOML config file (DESIGN.md, "Config"): parsing and validation.
//!
//! Every key is optional. The file is read into [`ConfigFile`] (serde, with
//! unknown keys rejected), then validated as a whole into [`Config`]; errors
//! name the offending field the way a user writes it, e.g.
//! `peer[1].prefix[0]`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::coap::Endpoint;
use crate::mqtt::BrokerConfig;
use crate::template::Template;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

// ---- The file as written -------------------------------------------------

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfigFile {
    pub coap: CoapSection,
    pub fastpath: FastpathSection,
    pub mqtt: MqttSection,
    pub control: ControlSection,
    pub metrics: MetricsSection,
    pub defaults: DefaultsSection,
    pub peer: Vec<PeerSection>,
    pub route: Vec<RouteSection>,
    pub upstream: Vec<UpstreamSection>,
    pub downlink: DownlinkSection,
    pub dtls: DtlsSection,
}

/// `[dtls]`: CoAP over DTLS (`[coap] listen_dtls`).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DtlsSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_sessions: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_handshakes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshake_timeout_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hello_rate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hello_burst: Option<u32>,
    /// Certificate mode: the gateway's certificate chain and its key (PEM),
    /// and the CAs a device's certificate must chain to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownlinkSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retransmit: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_ttl_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_per_peer: Option<usize>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoapSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<Vec<String>>,
    /// CoAP over DTLS (RFC 7252 section 9, `coaps://`); none by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listen_dtls: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_payload: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pubsub_prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_assembly_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedup_per_peer: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedup_total: Option<usize>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FastpathSection {
    pub interfaces: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persist: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pin_dir: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_packet_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_queue: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_inflight: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retained: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retained_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_subscriptions: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_sessions: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queued_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_subscription_bytes: Option<usize>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// Group allowed on the control socket (besides root and the owner).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Per-peer series exported: the busiest N peers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_series: Option<usize>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DefaultsSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown_peers: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// MQTT topic filters unknown peers may publish to, and read, through
    /// `[coap] pubsub_prefix`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subscribe: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    pub name: String,
    #[serde(default)]
    pub prefix: Vec<String>,
    #[serde(default)]
    pub deny: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Where downlink commands go; default: the peer's last uplink source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// MQTT topic filters the peer may publish to, and read, through
    /// `[coap] pubsub_prefix` (`{peer}` stands for its name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscribe: Vec<String>,
    /// Paths on the device the gateway observes (RFC 7641), each
    /// notification published where a POST of that path would go.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub observe: Vec<String>,
    /// The PSK identity the peer presents over DTLS, and its key: hex, or
    /// the raw bytes of a file only its owner can read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub psk_identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub psk_hex: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub psk_file: Option<PathBuf>,
    /// The name (subject CN or a DNS, URI or email SAN) of the client
    /// certificate the peer presents over DTLS in certificate mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_name: Option<String>,
    /// Plain CoAP from the peer's prefixes is dropped: only its DTLS
    /// sessions are it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub require_dtls: bool,
}

fn is_false(b: &bool) -> bool {
    !b
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub name: String,
    #[serde(rename = "match")]
    pub path_match: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    pub topic: String,
    #[serde(default)]
    pub qos: u8,
    #[serde(default)]
    pub retain: bool,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    pub name: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub durability: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Prepended to every topic forwarded upstream, e.g. "site-7/".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spool_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spool_max_bytes: Option<u64>,
    /// PEM file of CAs to trust for mqtts:// (default: the system's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

// ---- The validated config ------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// Native if the driver supports it, else generic; the result is logged.
    Auto,
    Native,
    /// Generic XDP, in the kernel's receive path (`XDP_FLAGS_SKB_MODE`).
    Skb,
    /// No XDP at all.
    Off,
}

impl FromStr for XdpMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(XdpMode::Auto),
            "native" => Ok(XdpMode::Native),
            "skb" => Ok(XdpMode::Skb),
            "off" => Ok(XdpMode::Off),
            _ => Err(format!("{s:?} is not one of auto, native, skb, off")),
        }
    }
}

/// A packet rate limit. `None` inside means unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate(pub Option<u32>);

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "unlimited" {
            return Ok(Rate(None));
        }
        let per_sec = s
            .strip_suffix("/s")
            .and_then(|n| n.trim().parse::<u32>().ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                format!("{s:?} is not a rate: write \"N/s\" (N >= 1) or \"unlimited\"")
            })?;
        Ok(Rate(Some(per_sec)))
    }
}

/// An IP prefix with its host bits clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl FromStr for Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP prefix (e.g. 10.1.0.0/24, fd00::/64)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|&l| l <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        };
        let prefix = Prefix { addr, len };
        if prefix.network() != addr {
            return Err(format!(
                "{s:?} has host bits set; the network is {}/{len}",
                prefix.network()
            ));
        }
        Ok(prefix)
    }
}

impl Prefix {
    /// The address with everything past `len` bits cleared.
    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4()
            && Prefix {
                addr: ip,
                len: self.len,
            }
            .network()
                == self.addr
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownPeers {
    Allow,
    Drop,
}

#[derive(Clone, Debug)]
pub struct Defaults {
    pub unknown_peers: UnknownPeers,
    pub topic: Template,
    pub rate: Rate,
    pub burst: u32,
    /// What unknown peers may publish to and read through the pubsub
    /// prefix (MQTT topic filters; `{peer}` stands for their address).
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Peer {
    pub name: String,
    pub prefixes: Vec<Prefix>,
    pub deny: bool,
    pub topic: Option<Template>,
    pub rate: Option<Rate>,
    pub burst: Option<u32>,
    /// Where downlink commands go, when configured; a `coaps://` endpoint
    /// is reached through a DTLS session the gateway opens.
    pub endpoint: Option<Endpoint>,
    /// What the peer may publish to and read through the pubsub prefix
    /// (MQTT topic filters; `{peer}` stands for its name).
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// Uri-Paths the gateway observes on the device, segments joined by '/'.
    pub observe: Vec<String>,
    /// Its DTLS pre-shared key: a session that presents the identity is
    /// this peer, whatever its address.
    pub psk: Option<Psk>,
    /// Its client certificate's name, in certificate mode.
    pub cert_name: Option<String>,
    pub require_dtls: bool,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Psk {
    pub identity: Vec<u8>,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for Psk {
    /// Never the key: configs end up in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Psk")
            .field("identity", &String::from_utf8_lossy(&self.identity))
            .finish_non_exhaustive()
    }
}

/// PSK identities up to 128 bytes and keys up to 64 (RFC 7925 section 4.2
/// asks for at least 16-byte keys; OpenSSL takes at most 512).
const MAX_PSK_IDENTITY: usize = 128;
const MAX_PSK_KEY: usize = 64;
/// An X.509 CN is at most 64 characters (RFC 5280 appendix A); a SAN may
/// be longer.
const MAX_CERT_NAME: usize = 255;

#[derive(Clone, Debug)]
pub struct Route {
    pub name: String,
    pub path_match: String,
    pub peer: Option<String>,
    pub method: Option<String>,
    pub topic: Template,
    pub qos: u8,
    pub retain: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    Memory,
    Disk,
}

#[derive(Clone, Debug)]
pub struct Upstream {
    pub name: String,
    pub url: String,
    /// host:port from the URL (default port 1883, or 8883 for mqtts://).
    pub address: String,
    /// The host as written in the URL, for TLS server name checks.
    pub host: String,
    /// mqtts://: TLS (rustls) to the upstream.
    pub tls: bool,
    pub ca_file: Option<PathBuf>,
    pub topics: Vec<String>,
    pub durability: Durability,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub prefix: String,
    /// Where the disk spool lives (durability = "disk").
    pub spool_dir: PathBuf,
    /// Spool bound; past it the oldest messages are evicted (and counted).
    pub spool_max_bytes: u64,
}

/// `[coap]` tuning beyond the listen addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoapTuning {
    /// Largest payload of one datagram; more is answered 4.13.
    pub max_payload: usize,
    /// Largest request body sent in blocks (RFC 7959 Block1).
    pub max_body: usize,
    /// All unfinished block-wise bodies together.
    pub max_assembly_bytes: usize,
    /// A Uri-Path starting with this segment names an MQTT topic directly
    /// (`ps/a/b` is `a/b`); empty: no direct access.
    pub pubsub_prefix: String,
    /// Worker threads (sockets) per listen address; 0 means one per CPU.
    pub workers: usize,
    /// Duplicate-detection entries kept per peer endpoint and in total.
    pub dedup_per_peer: usize,
    pub dedup_total: usize,
}

/// `[mqtt]`: the embedded broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MqttSettings {
    pub listen: SocketAddr,
    /// Credentials and every bound of the embedded broker.
    pub broker: BrokerConfig,
}

/// `[control]`: the control socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlSettings {
    pub socket: PathBuf,
    /// Group allowed on the socket (besides root and the owner).
    pub group: Option<String>,
    /// Open connections; more are refused (counted).
    pub max_connections: usize,
    /// A connection that sends no complete request, or does not take its
    /// response, for this long is closed.
    pub idle_timeout: std::time::Duration,
}

/// `[downlink]`: MQTT commands to CoAP requests (RFC 7252 section 4.8
/// transmission parameters).
#[derive(Clone, Debug, PartialEq)]
pub struct DownlinkSettings {
    /// Commands arrive on `<command_prefix>/<peer>/<path>`.
    pub command_prefix: String,
    /// Responses leave on `<response_prefix>/<peer>/<path>`.
    pub response_prefix: String,
    /// ACK_TIMEOUT.
    pub ack_timeout: std::time::Duration,
    /// ACK_RANDOM_FACTOR.
    pub ack_random_factor: f64,
    /// MAX_RETRANSMIT.
    pub max_retransmit: u32,
    /// How long to wait for a separate response after an empty ACK.
    pub response_timeout: std::time::Duration,
    /// A command that waited longer than this is answered `expired`, never
    /// sent: an actuator must not act on a stale order.
    pub command_ttl: std::time::Duration,
    /// A command payload larger than this goes to the device in Block1
    /// blocks of this size (RFC 7959): 16 to 1024, a power of two.
    pub block_size: usize,
    /// Commands waiting per peer (behind its outstanding request, or for a
    /// sleeping device to be heard from); more are refused.
    pub queue_per_peer: usize,
}

/// `[dtls]`: CoAP over DTLS sessions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DtlsSettings {
    pub max_sessions: usize,
    pub max_handshakes: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    /// Largest datagram a session sends (records of a flight are split to
    /// fit; RFC 6347 section 4.1.1.1).
    pub mtu: u32,
    /// ClientHellos per second from one source on the CoAPS ports, and the
    /// burst: more are dropped in XDP (`drop_hello_rate_limited`).
    pub hello_rate: Rate,
    pub hello_burst: u32,
    /// Certificate mode, when configured.
    pub certificates: Option<Certificates>,
}

/// Certificate mode (RFC 7252 section 9.1.3.3): the gateway's chain and
/// key, and the CAs a device's certificate must chain to. Loaded and
/// checked with the config, so `check-config` finds what a handshake would.
#[derive(Clone)]
pub struct Certificates {
    /// The gateway's certificate first, then its intermediates.
    pub chain: Vec<openssl::x509::X509>,
    pub key: openssl::pkey::PKey<openssl::pkey::Private>,
    pub cas: Vec<openssl::x509::X509>,
    /// The files and their bytes: a reload that finds them changed
    /// restarts the DTLS workers.
    files: Vec<(PathBuf, Vec<u8>)>,
}

impl PartialEq for Certificates {
    fn eq(&self, other: &Self) -> bool {
        self.files == other.files
    }
}

impl Eq for Certificates {}

impl std::fmt::Debug for Certificates {
    /// The files' names, never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.files.iter().map(|(p, _)| p.display()).collect();
        f.debug_struct("Certificates")
            .field("files", &names)
            .finish_non_exhaustive()
    }
}

impl Default for DtlsSettings {
    fn default() -> Self {
        DtlsSettings {
            max_sessions: 10_000,
            max_handshakes: 1_000,
            handshake_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(3600),
            mtu: 1280 - 48,
            hello_rate: Rate(Some(DEFAULT_HELLO_RATE)),
            hello_burst: DEFAULT_HELLO_BURST,
            certificates: None,
        }
    }
}

/// A device's handshake takes two ClientHellos (the second with the
/// cookie), three or four with retransmissions.
pub const DEFAULT_HELLO_RATE: u32 = 10;
pub const DEFAULT_HELLO_BURST: u32 = 20;

#[derive(Clone, Debug)]
pub struct Config {
    pub coap_listen: Vec<SocketAddr>,
    /// CoAP over DTLS; empty: none.
    pub coaps_listen: Vec<SocketAddr>,
    pub dtls: DtlsSettings,
    pub coap: CoapTuning,
    pub mqtt: MqttSettings,
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    /// Leave the XDP program, its links and maps pinned under `pin_dir` on
    /// exit, and adopt them on the next start.
    pub persist: bool,
    pub pin_dir: PathBuf,
    pub control: ControlSettings,
    pub metrics_listen: SocketAddr,
    pub metrics_peer_series: usize,
    pub defaults: Defaults,
    pub peers: Vec<Peer>,
    pub routes: Vec<Route>,
    pub upstreams: Vec<Upstream>,
    pub downlink: DownlinkSettings,
}

pub const DEFAULT_COAP_LISTEN: [&str; 2] = ["0.0.0.0:5683", "[::]:5683"];
/// Where persisted XDP state goes (`[fastpath] persist`): systemd mounts
/// the bpf file system at /sys/fs/bpf.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/m2m-router";
pub const DEFAULT_MQTT_LISTEN: &str = "127.0.0.1:1883";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/m2m-router/control.sock";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9683";
pub const DEFAULT_TOPIC: &str = "m2m/{peer}/{path}";
pub const DEFAULT_RATE: &str = "100/s";
pub const DEFAULT_BURST: u32 = 50;

impl Default for Config {
    fn default() -> Self {
        ConfigFile::default()
            .validate()
            .expect("the built-in defaults are valid")
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        ConfigFile::parse(text, Path::new("<config>"))?.validate()
    }

    /// The CoAP ports the fast path guards: those of the listen addresses.
    /// The CoAPS ports the fast path guards: those of `listen_dtls`.
    pub fn coaps_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.coaps_listen.iter().map(SocketAddr::port).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    pub fn coap_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.coap_listen.iter().map(SocketAddr::port).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

fn parse_field<T: FromStr<Err = String>>(field: &str, value: &str) -> Result<T, ConfigError> {
    value.parse().map_err(|m| invalid(field, m))
}

fn socket_addr(field: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            field,
            format!("{value:?} is not an address with a port (e.g. 0.0.0.0:5683, [::]:5683)"),
        )
    })
}

fn positive(field: &str, value: Option<usize>, default: usize) -> Result<usize, ConfigError> {
    match value {
        Some(0) => Err(invalid(field, "must be at least 1")),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

/// Topic templates and prefixes: far below MQTT's 65,535-byte topics, so
/// that a rendered topic's length is decided by what the device sent.
const MAX_TEMPLATE_BYTES: usize = 1024;

/// MQTT topic filters in which `{peer}` may stand for a peer.
fn topic_filters(field: &str, filters: Vec<String>) -> Result<Vec<String>, ConfigError> {
    for (j, f) in filters.iter().enumerate() {
        let probe = f.replace("{peer}", "p");
        if probe.contains(['{', '}']) || !crate::mqtt::topic::valid_filter(probe.as_bytes()) {
            return Err(invalid(
                format!("{field}[{j}]"),
                format!("{f:?} is not an MQTT topic filter ({{peer}} may stand for the peer)"),
            ));
        }
    }
    Ok(filters)
}

/// Uri-Paths to observe: at most `watch::MAX_PER_PEER`, each an
/// [`observe_path`]; duplicates once.
fn observe_paths(field: &str, paths: Vec<String>) -> Result<Vec<String>, ConfigError> {
    use crate::coap::watch::MAX_PER_PEER;
    if paths.len() > MAX_PER_PEER {
        return Err(invalid(field, format!("at most {MAX_PER_PEER} paths")));
    }
    let mut out: Vec<String> = Vec::with_capacity(paths.len());
    for (j, p) in paths.iter().enumerate() {
        let path = observe_path(p).map_err(|why| invalid(format!("{field}[{j}]"), why))?;
        if !out.contains(&path) {
            out.push(path);
        }
    }
    Ok(out)
}

/// A Uri-Path to observe, as `[[peer]] observe` and the `observe` command
/// take it: segments joined by '/', none empty, each a Uri-Path option (at
/// most 255 bytes, RFC 7252 section 5.10), no query. Leading and trailing
/// slashes are dropped.
pub fn observe_path(p: &str) -> Result<String, String> {
    let path = p.trim_matches('/');
    let bad = path.is_empty()
        || path.contains(['?', '#'])
        || path.split('/').any(|s| s.is_empty() || s.len() > 255);
    if bad {
        return Err(format!(
            "{p:?} is not a path like \"sensors/temp\" (no empty segments, none over 255 bytes, no query)"
        ));
    }
    Ok(path.to_owned())
}

fn template(field: &str, value: &str) -> Result<Template, ConfigError> {
    if value.len() > MAX_TEMPLATE_BYTES {
        return Err(invalid(
            field,
            format!("a topic template of at most {MAX_TEMPLATE_BYTES} bytes"),
        ));
    }
    Template::compile(value).map_err(|m| invalid(field, m))
}

fn name(
    field: &str,
    value: &str,
    seen: &mut HashMap<String, usize>,
    i: usize,
) -> Result<(), ConfigError> {
    let ok = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(invalid(
            field,
            format!("{value:?}: names use letters, digits, '-', '_' and '.'"),
        ));
    }
    if let Some(first) = seen.insert(value.to_owned(), i) {
        return Err(invalid(
            field,
            format!("{value:?} is already the name of entry {first}"),
        ));
    }
    Ok(())
}

impl ConfigFile {
    /// Reads a config file without validating it (see [`ConfigFile::validate`]).
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        ConfigFile::parse(&text, path)
    }

    /// Reads config text without validating it; errors name `path`.
    pub fn parse(text: &str, path: &Path) -> Result<ConfigFile, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// The config as TOML, for `config save`.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a config always serialises")
    }

    pub fn validate(self) -> Result<Config, ConfigError> {
        let coap_listen = match &self.coap.listen {
            None => DEFAULT_COAP_LISTEN
                .iter()
                .map(|a| a.parse().unwrap())
                .collect(),
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(i, a)| socket_addr(&format!("coap.listen[{i}]"), a))
                .collect::<Result<Vec<_>, _>>()?,
        };
        if coap_listen.is_empty() {
            return Err(invalid("coap.listen", "at least one address is needed"));
        }
        let coaps_listen = self
            .coap
            .listen_dtls
            .iter()
            .enumerate()
            .map(|(i, a)| socket_addr(&format!("coap.listen_dtls[{i}]"), a))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, a) in coaps_listen.iter().enumerate() {
            if coap_listen.iter().any(|p| p.port() == a.port()) {
                return Err(invalid(
                    format!("coap.listen_dtls[{i}]"),
                    format!("port {} is a plain CoAP port too (coap.listen)", a.port()),
                ));
            }
        }
        let dtls = dtls_settings(&self.dtls)?;
        for (i, iface) in self.fastpath.interfaces.iter().enumerate() {
            if iface.is_empty() || iface.len() >= libc::IFNAMSIZ || iface.contains(['/', ' ']) {
                return Err(invalid(
                    format!("fastpath.interfaces[{i}]"),
                    format!("{iface:?} is not a valid interface name"),
                ));
            }
        }
        let xdp_mode = parse_field(
            "fastpath.mode",
            self.fastpath.mode.as_deref().unwrap_or("auto"),
        )?;
        let pin_dir = self
            .fastpath
            .pin_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR));
        if !pin_dir.is_absolute() {
            return Err(invalid(
                "fastpath.pin_dir",
                "must be an absolute path (on a bpf file system)",
            ));
        }
        let coap = CoapTuning {
            max_payload: positive("coap.max_payload", self.coap.max_payload, 4096)?,
            max_body: positive("coap.max_body", self.coap.max_body, 1 << 20)?,
            pubsub_prefix: match self.coap.pubsub_prefix {
                None => "ps".to_owned(),
                Some(p) if p.contains(['/', '+', '#', '\0']) => {
                    return Err(invalid(
                        "coap.pubsub_prefix",
                        format!(
                        "{p:?}: one Uri-Path segment, without '/', '+', '#' or NUL (empty: none)"
                    ),
                    ))
                }
                Some(p) => p,
            },
            max_assembly_bytes: positive(
                "coap.max_assembly_bytes",
                self.coap.max_assembly_bytes,
                64 << 20,
            )?,
            workers: self.coap.workers.unwrap_or(0),
            dedup_per_peer: positive("coap.dedup_per_peer", self.coap.dedup_per_peer, 256)?,
            dedup_total: positive("coap.dedup_total", self.coap.dedup_total, 1_000_000)?,
        };
        if coap.max_payload > 65_000 {
            return Err(invalid(
                "coap.max_payload",
                "a UDP datagram holds at most 65,000 bytes of payload",
            ));
        }
        if coap.max_body > coap.max_assembly_bytes {
            return Err(invalid(
                "coap.max_body",
                "larger than coap.max_assembly_bytes, so no such body could be assembled",
            ));
        }
        if self.mqtt.username.is_some() != self.mqtt.password.is_some() {
            return Err(invalid(
                "mqtt.password",
                "set both mqtt.username and mqtt.password, or neither",
            ));
        }
        let defaults = BrokerConfig::default();
        let m = self.mqtt;
        let broker = BrokerConfig {
            username: m.username,
            password: m.password,
            max_packet_size: positive(
                "mqtt.max_packet_size",
                m.max_packet_size,
                defaults.max_packet_size,
            )?,
            session_queue: positive(
                "mqtt.session_queue",
                m.session_queue,
                defaults.session_queue,
            )?,
            max_inflight: positive("mqtt.max_inflight", m.max_inflight, defaults.max_inflight)?,
            max_connections: positive(
                "mqtt.max_connections",
                m.max_connections,
                defaults.max_connections,
            )?,
            max_retained: positive("mqtt.max_retained", m.max_retained, defaults.max_retained)?,
            max_retained_bytes: positive(
                "mqtt.max_retained_bytes",
                m.max_retained_bytes,
                defaults.max_retained_bytes,
            )?,
            max_subscriptions: positive(
                "mqtt.max_subscriptions",
                m.max_subscriptions,
                defaults.max_subscriptions,
            )?,
            max_sessions: positive("mqtt.max_sessions", m.max_sessions, defaults.max_sessions)?,
            max_queued_bytes: positive(
                "mqtt.max_queued_bytes",
                m.max_queued_bytes,
                defaults.max_queued_bytes,
            )?,
            max_subscription_bytes: positive(
                "mqtt.max_subscription_bytes",
                m.max_subscription_bytes,
                defaults.max_subscription_bytes,
            )?,
        };
        // Every connection holds a session, and the downlink one more: with
        // fewer, a new client could find no offline session to make room.
        if broker.max_sessions <= broker.max_connections {
            return Err(invalid(
                "mqtt.max_sessions",
                "must be more than mqtt.max_connections (every connection holds a session)",
            ));
        }
        let mqtt = MqttSettings {
            listen: socket_addr(
                "mqtt.listen",
                m.listen.as_deref().unwrap_or(DEFAULT_MQTT_LISTEN),
            )?,
            broker,
        };
        let metrics_listen = socket_addr(
            "metrics.listen",
            self.metrics
                .listen
                .as_deref()
                .unwrap_or(DEFAULT_METRICS_LISTEN),
        )?;
        let control_socket = self
            .control
            .socket
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET));
        if control_socket.as_os_str().is_empty() {
            return Err(invalid("control.socket", "empty path"));
        }
        let control = ControlSettings {
            socket: control_socket,
            group: self.control.group,
            max_connections: positive("control.max_connections", self.control.max_connections, 64)?,
            idle_timeout: std::time::Duration::from_secs(positive(
                "control.idle_timeout_s",
                self.control.idle_timeout_s.map(|s| s as usize),
                60,
            )? as u64),
        };

        let defaults = Defaults {
            unknown_peers: match self.defaults.unknown_peers.as_deref().unwrap_or("allow") {
                "allow" => UnknownPeers::Allow,
                "drop" => UnknownPeers::Drop,
                other => {
                    return Err(invalid(
                        "defaults.unknown_peers",
                        format!("{other:?} is not one of allow, drop"),
                    ))
                }
            },
            topic: template(
                "defaults.topic",
                self.defaults.topic.as_deref().unwrap_or(DEFAULT_TOPIC),
            )?,
            rate: parse_field(
                "defaults.rate",
                self.defaults.rate.as_deref().unwrap_or(DEFAULT_RATE),
            )?,
            burst: self.defaults.burst.unwrap_or(DEFAULT_BURST),
            publish: topic_filters("defaults.publish", self.defaults.publish)?,
            subscribe: topic_filters("defaults.subscribe", self.defaults.subscribe)?,
        };
        if defaults.burst == 0 {
            return Err(invalid("defaults.burst", "must be at least 1"));
        }

        let peers = validate_peers(self.peer)?;
        if let Some(i) = peers.iter().position(|p| p.cert_name.is_some()) {
            if dtls.certificates.is_none() {
                return Err(invalid(
                    format!("peer[{i}].cert_name"),
                    "certificate mode needs dtls.certificate, dtls.private_key and dtls.ca_file",
                ));
            }
        }
        check_secure_endpoints(&peers, &coaps_listen)?;
        let routes = validate_routes(self.route, &peers)?;
        let upstreams = validate_upstreams(self.upstream)?;
        let d = self.downlink;
        let prefix =
            |field: &str, value: Option<String>, default: &str| -> Result<String, ConfigError> {
                let v = value.unwrap_or_else(|| default.to_owned());
                if v.is_empty() || v.contains(['+', '#', '\0']) || v.ends_with('/') {
                    return Err(invalid(
                        field,
                        format!("{v:?}: a topic level without '+', '#', NUL or a trailing '/'"),
                    ));
                }
                Ok(v)
            };
        let downlink = DownlinkSettings {
            command_prefix: prefix("downlink.command_prefix", d.command_prefix, "m2m-cmd")?,
            response_prefix: prefix("downlink.response_prefix", d.response_prefix, "m2m-resp")?,
            ack_timeout: std::time::Duration::from_millis(positive(
                "downlink.ack_timeout_ms",
                d.ack_timeout_ms.map(|v| v as usize),
                2000,
            )? as u64),
            ack_random_factor: 1.5,
            max_retransmit: d.max_retransmit.unwrap_or(4),
            response_timeout: std::time::Duration::from_millis(positive(
                "downlink.response_timeout_ms",
                d.response_timeout_ms.map(|v| v as usize),
                30_000,
            )? as u64),
            command_ttl: std::time::Duration::from_secs(positive(
                "downlink.command_ttl_s",
                d.command_ttl_s.map(|v| v as usize),
                60,
            )? as u64),
            queue_per_peer: positive("downlink.queue_per_peer", d.queue_per_peer, 16)?,
            block_size: match d.block_size.unwrap_or(1024) {
                n @ (16 | 32 | 64 | 128 | 256 | 512 | 1024) => n,
                n => {
                    return Err(invalid(
                        "downlink.block_size",
                        format!(
                            "{n}: a block is 16, 32, 64, 128, 256, 512 or 1024 bytes (RFC 7959)"
                        ),
                    ))
                }
            },
        };
        Ok(Config {
            coap_listen,
            coaps_listen,
            dtls,
            coap,
            mqtt,
            interfaces: self.fastpath.interfaces,
            xdp_mode,
            persist: self.fastpath.persist.unwrap_or(false),
            pin_dir,
            control,
            metrics_listen,
            metrics_peer_series: self.metrics.peer_series.unwrap_or(100),
            defaults,
            peers,
            routes,
            upstreams,
            downlink,
        })
    }
}

/// A `coaps://` endpoint is reached by a DTLS client session the gateway
/// opens from its CoAPS socket of the same address family (so the device
/// answers the CoAPS port the fast path guards), with the peer's
/// credentials: its PSK, or the gateway's certificate, the device's
/// certificate then naming the peer's `cert_name`. One peer per such
/// endpoint: the session there is that peer.
fn check_secure_endpoints(peers: &[Peer], coaps_listen: &[SocketAddr]) -> Result<(), ConfigError> {
    let mut owners: HashMap<SocketAddr, &str> = HashMap::new();
    for (i, p) in peers.iter().enumerate() {
        let Some(endpoint) = p.endpoint.filter(|e| e.secure) else {
            continue;
        };
        let field = format!("peer[{i}].endpoint");
        if p.psk.is_none() && p.cert_name.is_none() {
            return Err(invalid(
                field,
                "a coaps:// endpoint needs the peer's DTLS credentials (psk_identity or cert_name)",
            ));
        }
        if !coaps_listen
            .iter()
            .any(|l| l.is_ipv4() == endpoint.addr.is_ipv4())
        {
            return Err(invalid(
                field,
                format!(
                    "{endpoint} is reached from a coap.listen_dtls address of its family (IPv{}), and there is none",
                    if endpoint.addr.is_ipv4() { 4 } else { 6 }
                ),
            ));
        }
        if let Some(other) = owners.insert(endpoint.addr, &p.name) {
            return Err(invalid(
                field,
                format!("{endpoint} is already the endpoint of peer {other:?}"),
            ));
        }
    }
    Ok(())
}

fn validate_peers(sections: Vec<PeerSection>) -> Result<Vec<Peer>, ConfigError> {
    let mut names = HashMap::new();
    let mut owners: HashMap<Prefix, String> = HashMap::new();
    let mut identities: HashMap<Vec<u8>, String> = HashMap::new();
    let mut cert_names: HashMap<String, String> = HashMap::new();
    let mut peers = Vec::with_capacity(sections.len());
    for (i, p) in sections.into_iter().enumerate() {
        let at = |key: &str| format!("peer[{i}].{key}");
        name(&at("name"), &p.name, &mut names, i)?;
        let psk = psk(&at, &p)?;
        let credentials = psk.is_some() || p.cert_name.is_some();
        if p.prefix.is_empty() && !credentials {
            return Err(invalid(
                at("prefix"),
                "a peer needs at least one prefix, or DTLS credentials (psk_identity or cert_name)",
            ));
        }
        if p.require_dtls && !credentials {
            return Err(invalid(
                at("require_dtls"),
                "a peer that must use DTLS needs its credentials (psk_identity or cert_name)",
            ));
        }
        if let Some(k) = &psk {
            if let Some(other) = identities.insert(k.identity.clone(), p.name.clone()) {
                return Err(invalid(
                    at("psk_identity"),
                    format!("already the identity of peer {other:?}"),
                ));
            }
        }
        if let Some(cert_name) = &p.cert_name {
            if cert_name.is_empty() || cert_name.len() > MAX_CERT_NAME {
                return Err(invalid(
                    at("cert_name"),
                    format!("1 to {MAX_CERT_NAME} bytes"),
                ));
            }
            if let Some(other) = cert_names.insert(cert_name.clone(), p.name.clone()) {
                return Err(invalid(
                    at("cert_name"),
                    format!("already the certificate name of peer {other:?}"),
                ));
            }
        }
        let mut prefixes = Vec::with_capacity(p.prefix.len());
        for (j, text) in p.prefix.iter().enumerate() {
            let field = format!("peer[{i}].prefix[{j}]");
            let prefix: Prefix = parse_field(&field, text)?;
            if let Some(owner) = owners.insert(prefix, p.name.clone()) {
                return Err(invalid(
                    field,
                    format!("{prefix} already belongs to peer {owner:?}"),
                ));
            }
            prefixes.push(prefix);
        }
        if p.burst == Some(0) {
            return Err(invalid(at("burst"), "must be at least 1"));
        }
        peers.push(Peer {
            endpoint: p
                .endpoint
                .as_deref()
                .map(|e| e.parse().map_err(|m| invalid(at("endpoint"), m)))
                .transpose()?,
            topic: p
                .topic
                .as_deref()
                .map(|t| template(&at("topic"), t))
                .transpose()?,
            rate: p
                .rate
                .as_deref()
                .map(|r| parse_field(&at("rate"), r))
                .transpose()?,
            publish: topic_filters(&at("publish"), p.publish)?,
            subscribe: topic_filters(&at("subscribe"), p.subscribe)?,
            observe: observe_paths(&at("observe"), p.observe)?,
            name: p.name,
            prefixes,
            deny: p.deny,
            burst: p.burst,
            psk,
            cert_name: p.cert_name,
            require_dtls: p.require_dtls,
        });
    }
    Ok(peers)
}

/// A peer's pre-shared key, from `psk_hex` or `psk_file` (exactly one,
/// with `psk_identity`).
fn psk(at: &dyn Fn(&str) -> String, p: &PeerSection) -> Result<Option<Psk>, ConfigError> {
    let Some(identity) = &p.psk_identity else {
        if p.psk_hex.is_some() || p.psk_file.is_some() {
            return Err(invalid(at("psk_identity"), "a key needs its identity"));
        }
        return Ok(None);
    };
    if identity.is_empty() || identity.len() > MAX_PSK_IDENTITY {
        return Err(invalid(
            at("psk_identity"),
            format!("1 to {MAX_PSK_IDENTITY} bytes"),
        ));
    }
    let key = match (&p.psk_hex, &p.psk_file) {
        (Some(hex), None) => decode_hex(hex)
            .ok_or_else(|| invalid(at("psk_hex"), "hexadecimal digits, two per byte"))?,
        (None, Some(path)) => read_key_file(path).map_err(|m| invalid(at("psk_file"), m))?,
        _ => {
            return Err(invalid(
                at("psk_hex"),
                "the identity needs its key: psk_hex or psk_file, one of them",
            ))
        }
    };
    if key.is_empty() || key.len() > MAX_PSK_KEY {
        return Err(invalid(
            at(if p.psk_hex.is_some() {
                "psk_hex"
            } else {
                "psk_file"
            }),
            format!("a key of 1 to {MAX_PSK_KEY} bytes"),
        ));
    }
    Ok(Some(Psk {
        identity: identity.as_bytes().to_vec(),
        key,
    }))
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A key file's raw bytes; refused when users other than its owner and
/// group may read it, or its group may write it (as ssh refuses keys).
fn read_key_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o027 != 0 {
        return Err(format!(
            "{} has mode {mode:o}: other users could read or change the key; chmod 600 (or 640 for a group)",
            path.display()
        ));
    }
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn dtls_settings(d: &DtlsSection) -> Result<DtlsSettings, ConfigError> {
    let defaults = DtlsSettings::default();
    let secs = |field: &str, v: Option<u64>, default: std::time::Duration| {
        positive(field, v.map(|v| v as usize), default.as_secs() as usize)
            .map(|s| std::time::Duration::from_secs(s as u64))
    };
    let max_sessions = positive("dtls.max_sessions", d.max_sessions, defaults.max_sessions)?;
    let max_handshakes = positive(
        "dtls.max_handshakes",
        d.max_handshakes,
        defaults.max_handshakes,
    )?;
    if max_handshakes > max_sessions {
        return Err(invalid(
            "dtls.max_handshakes",
            "more than dtls.max_sessions, which counts handshakes too",
        ));
    }
    if d.hello_burst == Some(0) {
        return Err(invalid("dtls.hello_burst", "must be at least 1"));
    }
    Ok(DtlsSettings {
        max_sessions,
        max_handshakes,
        handshake_timeout: secs(
            "dtls.handshake_timeout_s",
            d.handshake_timeout_s,
            defaults.handshake_timeout,
        )?,
        idle_timeout: secs(
            "dtls.idle_timeout_s",
            d.idle_timeout_s,
            defaults.idle_timeout,
        )?,
        mtu: defaults.mtu,
        hello_rate: d
            .hello_rate
            .as_deref()
            .map(|r| parse_field("dtls.hello_rate", r))
            .transpose()?
            .unwrap_or(defaults.hello_rate),
        hello_burst: d.hello_burst.unwrap_or(defaults.hello_burst),
        certificates: certificates(d)?,
    })
}

/// `[dtls] certificate`, `private_key` and `ca_file`: all three or none.
fn certificates(d: &DtlsSection) -> Result<Option<Certificates>, ConfigError> {
    use openssl::pkey::{Id, PKey};
    use openssl::x509::X509;
    let (cert, key, ca) = match (&d.certificate, &d.private_key, &d.ca_file) {
        (None, None, None) => return Ok(None),
        (Some(c), Some(k), Some(a)) => (c, k, a),
        (c, k, _) => {
            let missing = if c.is_none() {
                "dtls.certificate"
            } else if k.is_none() {
                "dtls.private_key"
            } else {
                "dtls.ca_file"
            };
            return Err(invalid(
                missing,
                "certificate mode needs dtls.certificate, dtls.private_key and dtls.ca_file",
            ));
        }
    };
    let read = |field: &str, path: &Path| {
        std::fs::read(path).map_err(|e| invalid(field, format!("{}: {e}", path.display())))
    };
    let pem_certs = |field: &str, path: &Path, bytes: &[u8]| match X509::stack_from_pem(bytes) {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(invalid(
            field,
            format!("{}: no PEM certificate in it", path.display()),
        )),
        Err(e) => Err(invalid(field, format!("{}: {e}", path.display()))),
    };
    let cert_bytes = read("dtls.certificate", cert)?;
    let chain = pem_certs("dtls.certificate", cert, &cert_bytes)?;
    let key_bytes = read_key_file(key).map_err(|m| invalid("dtls.private_key", m))?;
    let private = PKey::private_key_from_pem(&key_bytes)
        .map_err(|e| invalid("dtls.private_key", format!("{}: {e}", key.display())))?;
    // The suites of certificate mode sign with ECDSA (RFC 7252 section
    // 9.1.3.3: TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8).
    if private.id() != Id::EC {
        return Err(invalid(
            "dtls.private_key",
            format!(
                "{}: an ECDSA key is needed (TLS_ECDHE_ECDSA suites, RFC 7252 section 9.1.3.3)",
                key.display()
            ),
        ));
    }
    let matches = chain[0]
        .public_key()
        .is_ok_and(|public| public.public_eq(&private));
    if !matches {
        return Err(invalid(
            "dtls.private_key",
            format!("{}: not the key of {}", key.display(), cert.display()),
        ));
    }
    let ca_bytes = read("dtls.ca_file", ca)?;
    let cas = pem_certs("dtls.ca_file", ca, &ca_bytes)?;
    Ok(Some(Certificates {
        chain,
        key: private,
        cas,
        files: vec![
            (cert.clone(), cert_bytes),
            (key.clone(), key_bytes),
            (ca.clone(), ca_bytes),
        ],
    }))
}

fn validate_routes(sections: Vec<RouteSection>, peers: &[Peer]) -> Result<Vec<Route>, ConfigError> {
    let mut names = HashMap::new();
    let mut routes = Vec::with_capacity(sections.len());
    for (i, r) in sections.into_iter().enumerate() {
        let at = |key: &str| format!("route[{i}].{key}");
        name(&at("name"), &r.name, &mut names, i)?;
        if r.path_match.is_empty() {
            return Err(invalid(at("match"), "empty Uri-Path glob"));
        }
        if let Some(peer) = &r.peer {
            if !peers.iter().any(|p| &p.name == peer) {
                return Err(invalid(at("peer"), format!("no peer is named {peer:?}")));
            }
        }
        if let Some(m) = &r.method {
            if !matches!(
                m.as_str(),
                "GET" | "POST" | "PUT" | "DELETE" | "FETCH" | "PATCH" | "iPATCH"
            ) {
                return Err(invalid(at("method"), format!("{m:?} is not a CoAP method")));
            }
        }
        if r.qos > 1 {
            return Err(invalid(at("qos"), format!("{} is not 0 or 1", r.qos)));
        }
        routes.push(Route {
            topic: template(&at("topic"), &r.topic)?,
            name: r.name,
            path_match: r.path_match,
            peer: r.peer,
            method: r.method,
            qos: r.qos,
            retain: r.retain,
        });
    }
    Ok(routes)
}

fn validate_upstreams(sections: Vec<UpstreamSection>) -> Result<Vec<Upstream>, ConfigError> {
    let mut names = HashMap::new();
    let mut upstreams = Vec::with_capacity(sections.len());
    for (i, u) in sections.into_iter().enumerate() {
        let at = |key: &str| format!("upstream[{i}].{key}");
        name(&at("name"), &u.name, &mut names, i)?;
        let (rest, tls, default_port) = if let Some(r) = u.url.strip_prefix("mqtt://") {
            (r, false, 1883)
        } else if let Some(r) = u.url.strip_prefix("mqtts://") {
            (r, true, 8883)
        } else {
            return Err(invalid(
                at("url"),
                format!("{:?} must start with mqtt:// or mqtts://", u.url),
            ));
        };
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains('/') || rest.contains('@') {
            return Err(invalid(
                at("url"),
                format!("{:?}: expected mqtt[s]://host[:port]", u.url),
            ));
        }
        // host, [v6 host], host:port or [v6 host]:port
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && (!h.contains(':') || h.ends_with(']')) => {
                let port = p
                    .parse::<u16>()
                    .map_err(|_| invalid(at("url"), format!("{p:?} is not a port")))?;
                (h, port)
            }
            _ => (rest, default_port),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let address = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        if u.username.is_some() != u.password.is_some() {
            return Err(invalid(
                at("password"),
                "set both username and password, or neither",
            ));
        }
        if u.spool_max_bytes == Some(0) {
            return Err(invalid(at("spool_max_bytes"), "must be at least 1"));
        }
        for (j, filter) in u.topics.iter().enumerate() {
            if filter.is_empty() || filter.contains('\0') {
                return Err(invalid(
                    format!("upstream[{i}].topics[{j}]"),
                    "invalid topic filter",
                ));
            }
        }
        let durability = match u.durability.as_deref().unwrap_or("memory") {
            "memory" => Durability::Memory,
            "disk" => Durability::Disk,
            other => {
                return Err(invalid(
                    at("durability"),
                    format!("{other:?} is not one of memory, disk"),
                ))
            }
        };
        let prefix = u.prefix.unwrap_or_default();
        if prefix.contains(['+', '#', '\0']) {
            return Err(invalid(
                at("prefix"),
                "a topic prefix cannot contain '+', '#' or NUL",
            ));
        }
        if prefix.len() > MAX_TEMPLATE_BYTES {
            return Err(invalid(
                at("prefix"),
                format!("at most {MAX_TEMPLATE_BYTES} bytes"),
            ));
        }
        upstreams.push(Upstream {
            topics: if u.topics.is_empty() {
                vec!["#".into()]
            } else {
                u.topics
            },
            client_id: u
                .client_id
                .unwrap_or_else(|| format!("m2m-router-{}", u.name)),
            spool_dir: u
                .spool_dir
                .unwrap_or_else(|| PathBuf::from("/var/lib/m2m-router/spool").join(&u.name)),
            spool_max_bytes: u.spool_max_bytes.unwrap_or(64 << 20),
            username: u.username,
            password: u.password,
            prefix,
            address,
            host,
            tls,
            ca_file: u.ca_file,
            name: u.name,
            url: u.url,
            durability,
        });
    }
    Ok(upstreams)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(text: &str) -> String {
        match Config::parse(text) {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.coap_ports(), vec![5683]);
        assert_eq!(c.xdp_mode, XdpMode::Auto);
        assert!(c.interfaces.is_empty());
        assert_eq!(c.defaults.unknown_peers, UnknownPeers::Allow);
        assert_eq!(c.defaults.rate, Rate(Some(100)));
        assert_eq!(c.defaults.burst, 50);
        assert_eq!(c.defaults.topic.as_str(), "m2m/{peer}/{path}");
        assert_eq!(c.mqtt.listen.to_string(), "127.0.0.1:1883");
        assert_eq!(c.coap.max_payload, 4096);
    }

    #[test]
    fn the_design_example_parses() {
        let c = Config::parse(include_str!("../../docs/example.toml")).unwrap();
        assert_eq!(c.peers[0].name, "meter-17");
        assert_eq!(c.peers[0].prefixes.len(), 2);
        assert_eq!(c.peers[0].rate, Some(Rate(Some(200))));
        assert_eq!(c.routes[0].qos, 1);
        assert_eq!(c.upstreams[0].durability, Durability::Disk);
        assert_eq!(c.peers[0].observe, ["sensors/temp"]);
    }

    #[test]
    fn dtls_credentials_are_checked_and_name_their_peer() {
        let c = Config::parse(
            "[coap]\nlisten_dtls = [\"0.0.0.0:5684\"]\n[[peer]]\nname = \"m\"\npsk_identity = \"m-1\"\npsk_hex = \"0A0b\"\nrequire_dtls = true",
        )
        .unwrap();
        assert_eq!(c.coaps_listen, vec!["0.0.0.0:5684".parse().unwrap()]);
        let psk = c.peers[0].psk.as_ref().unwrap();
        assert_eq!(
            (psk.identity.as_slice(), psk.key.as_slice()),
            (&b"m-1"[..], &[10u8, 11][..])
        );
        assert!(
            !format!("{psk:?}").contains("0a"),
            "Debug never shows the key"
        );
        let peer = |keys: &str| format!("[[peer]]\nname = \"m\"\n{keys}");
        for (keys, field) in [
            ("", "peer[0].prefix"),
            ("psk_identity = \"a\"", "peer[0].psk_hex"),
            ("psk_hex = \"00\"", "peer[0].psk_identity"),
            ("psk_identity = \"a\"\npsk_hex = \"0g\"", "peer[0].psk_hex"),
            ("psk_identity = \"a\"\npsk_hex = \"000\"", "peer[0].psk_hex"),
            (
                "psk_identity = \"\"\npsk_hex = \"00\"",
                "peer[0].psk_identity",
            ),
            (
                "prefix = [\"10.0.0.1/32\"]\nrequire_dtls = true",
                "peer[0].require_dtls",
            ),
        ] {
            assert_eq!(field_of(&peer(keys)), field, "{keys}");
        }
        let two = "[[peer]]\nname = \"a\"\npsk_identity = \"x\"\npsk_hex = \"00\"\n[[peer]]\nname = \"b\"\npsk_identity = \"x\"\npsk_hex = \"01\"";
        assert_eq!(
            field_of(two),
            "peer[1].psk_identity",
            "one identity, one peer"
        );
        assert_eq!(
            field_of("[coap]\nlisten_dtls = [\"0.0.0.0:5683\"]"),
            "coap.listen_dtls[0]",
            "a port is plain or DTLS"
        );
    }

    #[test]
    fn a_coaps_endpoint_needs_credentials_a_socket_of_its_family_and_one_peer() {
        let listen = "[coap]\nlisten_dtls = [\"0.0.0.0:5684\"]\n";
        let psk = "psk_identity = \"m\"\npsk_hex = \"00\"";
        let good =
            format!("{listen}[[peer]]\nname = \"m\"\n{psk}\nendpoint = \"coaps://192.0.2.7\"\n");
        let c = Config::parse(&good).unwrap();
        assert_eq!(
            c.peers[0].endpoint,
            Some(Endpoint::secure("192.0.2.7:5684".parse().unwrap()))
        );
        for (text, why) in [
            (
                format!("{listen}[[peer]]\nname = \"m\"\nprefix = [\"192.0.2.7/32\"]\nendpoint = \"coaps://192.0.2.7\""),
                "no credentials",
            ),
            (
                format!("{listen}[[peer]]\nname = \"m\"\n{psk}\nendpoint = \"coaps://[2001:db8::7]\""),
                "no IPv6 CoAPS socket",
            ),
            (
                format!("[[peer]]\nname = \"m\"\n{psk}\nendpoint = \"coaps://192.0.2.7\""),
                "no CoAPS socket",
            ),
            (
                format!("{listen}[[peer]]\nname = \"m\"\n{psk}\nendpoint = \"coaps://meter.example\""),
                "a host name",
            ),
        ] {
            assert_eq!(field_of(&text), "peer[0].endpoint", "{why}");
        }
        let twice = format!(
            "{good}[[peer]]\nname = \"n\"\npsk_identity = \"n\"\npsk_hex = \"00\"\nendpoint = \"coaps://192.0.2.7:5684\"\n"
        );
        assert_eq!(
            field_of(&twice),
            "peer[1].endpoint",
            "one peer per endpoint"
        );
        // An endpoint is a peer's: `[defaults]` has none to ignore.
        let defaults = Config::parse("[defaults]\nendpoint = \"192.0.2.7:5683\"");
        assert!(
            matches!(&defaults, Err(ConfigError::Syntax { message, .. }) if message.contains("unknown field `endpoint`")),
            "{defaults:?}"
        );
    }

    #[test]
    fn a_key_file_others_can_read_is_refused_by_name() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("m2m-psk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("meter.key");
        std::fs::write(&file, b"raw key bytes").unwrap();
        let text = format!(
            "[[peer]]\nname = \"m\"\npsk_identity = \"m\"\npsk_file = \"{}\"",
            file.display()
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        match Config::parse(&text) {
            Err(ConfigError::Invalid { field, message }) => {
                assert_eq!(field, "peer[0].psk_file");
                assert!(
                    message.contains("meter.key") && message.contains("644"),
                    "{message}"
                );
            }
            other => panic!("a world-readable key was taken: {other:?}"),
        }
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.peers[0].psk.as_ref().unwrap().key, b"raw key bytes");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A self-signed certificate for `cn` and its key, as PEM.
    fn self_signed(cn: &str, key: &openssl::pkey::PKey<openssl::pkey::Private>) -> Vec<u8> {
        let mut name = openssl::x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", cn).unwrap();
        let name = name.build();
        let mut b = openssl::x509::X509::builder().unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(key).unwrap();
        b.set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&openssl::asn1::Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        b.sign(key, openssl::hash::MessageDigest::sha256()).unwrap();
        b.build().to_pem().unwrap()
    }

    #[test]
    fn certificate_mode_is_checked_before_any_handshake() {
        use openssl::ec::{EcGroup, EcKey};
        use openssl::pkey::PKey;
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("m2m-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let group = EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
        let ec = || PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
        let (key, other) = (ec(), ec());
        let rsa = PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
        let file = |name: &str, bytes: &[u8], mode: u32| {
            let path = dir.join(name);
            std::fs::write(&path, bytes).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path.display().to_string()
        };
        let cert = file("gw.crt", &self_signed("gw", &key), 0o644);
        let good_key = file("gw.key", &key.private_key_to_pem_pkcs8().unwrap(), 0o600);
        let open_key = file("open.key", &key.private_key_to_pem_pkcs8().unwrap(), 0o644);
        let wrong_key = file(
            "other.key",
            &other.private_key_to_pem_pkcs8().unwrap(),
            0o600,
        );
        let rsa_cert = file("rsa.crt", &self_signed("gw", &rsa), 0o644);
        let rsa_key = file("rsa.key", &rsa.private_key_to_pem_pkcs8().unwrap(), 0o600);
        let empty = file("empty.pem", b"no PEM here", 0o644);
        let dtls = |c: &str, k: &str, ca: &str| {
            format!("[dtls]\ncertificate = \"{c}\"\nprivate_key = \"{k}\"\nca_file = \"{ca}\"\n")
        };
        let peer = "[[peer]]\nname = \"s\"\ncert_name = \"s.example\"\nrequire_dtls = true\n";
        let c = Config::parse(&(dtls(&cert, &good_key, &cert) + peer)).unwrap();
        let certificates = c.dtls.certificates.as_ref().unwrap();
        assert_eq!((certificates.chain.len(), certificates.cas.len()), (1, 1));
        assert_eq!(c.peers[0].cert_name.as_deref(), Some("s.example"));
        assert!(
            !format!("{certificates:?}").contains("PRIVATE"),
            "Debug never shows the key"
        );
        let error = |text: String| match Config::parse(&text) {
            Err(ConfigError::Invalid { field, message }) => (field, message),
            other => panic!("expected an error, got {other:?}"),
        };
        for (text, field, says) in [
            (
                format!("[dtls]\ncertificate = \"{cert}\""),
                "dtls.private_key",
                "needs",
            ),
            (dtls(&cert, &open_key, &cert), "dtls.private_key", "644"),
            (
                dtls(&cert, &wrong_key, &cert),
                "dtls.private_key",
                "not the key of",
            ),
            (
                dtls(&rsa_cert, &rsa_key, &cert),
                "dtls.private_key",
                "ECDSA",
            ),
            (dtls(&empty, &good_key, &cert), "dtls.certificate", "no PEM"),
            (dtls(&cert, &good_key, &empty), "dtls.ca_file", "empty.pem"),
            (
                dtls(&cert, &good_key, "/nonexistent.pem"),
                "dtls.ca_file",
                "nonexistent",
            ),
            (
                peer.to_string(),
                "peer[0].cert_name",
                "certificate mode needs",
            ),
            (
                dtls(&cert, &good_key, &cert) + peer + &peer.replace("\"s\"", "\"t\""),
                "peer[1].cert_name",
                "already",
            ),
        ] {
            let (got_field, message) = error(text.clone());
            assert_eq!(got_field, field, "{text}");
            assert!(message.contains(says), "{field}: {message}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn observe_paths_are_uri_paths() {
        let peer = |observe: &str| {
            format!("[[peer]]\nname = \"a\"\nprefix = [\"10.0.0.0/8\"]\nobserve = {observe}")
        };
        let c = Config::parse(&peer(r#"["/sensors/temp/", "sensors/temp", "x"]"#)).unwrap();
        assert_eq!(
            c.peers[0].observe,
            ["sensors/temp", "x"],
            "trimmed, once each"
        );
        for bad in [r#"[""]"#, r#"["a//b"]"#, r#"["a?b=1"]"#] {
            assert_eq!(field_of(&peer(bad)), "peer[0].observe[0]", "{bad}");
        }
        let long = format!("[\"{}\"]", "x".repeat(256));
        assert_eq!(field_of(&peer(&long)), "peer[0].observe[0]");
        let many: Vec<String> = (0..33).map(|i| format!("\"p{i}\"")).collect();
        let many = format!("[{}]", many.join(","));
        assert_eq!(field_of(&peer(&many)), "peer[0].observe");
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field_of("[fastpath]\nmode = \"fast\""), "fastpath.mode");
        assert_eq!(field_of("[coap]\nlisten = [\"0.0.0.0\"]"), "coap.listen[0]");
        assert_eq!(field_of("[defaults]\nrate = \"lots\""), "defaults.rate");
        assert_eq!(
            field_of("[defaults]\nunknown_peers = \"maybe\""),
            "defaults.unknown_peers"
        );
        assert_eq!(
            field_of("[[peer]]\nname = \"a\"\nprefix = [\"10.0.0.0/8\", \"10.0.0.300/32\"]"),
            "peer[0].prefix[1]"
        );
        assert_eq!(
            field_of("[[peer]]\nname = \"a\"\nprefix = [\"10.0.0.1/8\"]"),
            "peer[0].prefix[0]"
        );
        assert_eq!(
            field_of("[[peer]]\nname = \"a\"\nprefix = [\"10.0.0.0/8\"]\n[[peer]]\nname = \"a\"\nprefix = [\"10.1.0.0/16\"]"),
            "peer[1].name"
        );
        assert_eq!(
            field_of("[[peer]]\nname = \"a\"\nprefix = [\"10.0.0.0/8\"]\n[[peer]]\nname = \"b\"\nprefix = [\"10.0.0.0/8\"]"),
            "peer[1].prefix[0]"
        );
        assert_eq!(
            field_of("[[peer]]\nname = \"a\"\nprefix = [\"::1\"]\ntopic = \"x/#\""),
            "peer[0].topic"
        );
        assert_eq!(
            field_of("[mqtt]\nmax_connections = 500\nmax_sessions = 500"),
            "mqtt.max_sessions"
        );
        assert_eq!(
            field_of("[mqtt]\nmax_queued_bytes = 0"),
            "mqtt.max_queued_bytes"
        );
        assert_eq!(
            field_of("[[route]]\nname = \"r\"\nmatch = \"a/*\"\ntopic = \"t\"\nqos = 2"),
            "route[0].qos"
        );
        assert_eq!(
            field_of("[[route]]\nname = \"r\"\nmatch = \"a/*\"\ntopic = \"t\"\npeer = \"ghost\""),
            "route[0].peer"
        );
        assert_eq!(
            field_of("[[upstream]]\nname = \"u\"\nurl = \"http://x\""),
            "upstream[0].url"
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_syntax_errors_naming_the_key() {
        for (text, key) in [
            ("[fastpath]\nmodes = \"auto\"", "modes"),
            ("[defaults]\nburst = \"x\"", "burst"),
        ] {
            match Config::parse(text) {
                Err(ConfigError::Syntax { message, .. }) => {
                    assert!(message.contains(key), "{message}")
                }
                other => panic!("expected a syntax error, got {other:?}"),
            }
        }
    }

    #[test]
    fn prefixes() {
        let p: Prefix = "10.1.0.0/16".parse().unwrap();
        assert!(p.contains("10.1.200.3".parse().unwrap()));
        assert!(!p.contains("10.2.0.1".parse().unwrap()));
        assert!(!p.contains("::1".parse().unwrap()));
        let host: Prefix = "fd00::17".parse().unwrap();
        assert_eq!(host.len, 128);
        assert!("0.0.0.0/0".parse::<Prefix>().is_ok());
        assert!("10.0.0.0/33".parse::<Prefix>().is_err());
    }
}
