//! The control plane: the live configuration and the commands that change
//! or read it, served on the control socket (`server`), used by
//! `m2m-router ctl` (`client`), and by SIGHUP (reload).

pub mod client;
pub mod protocol;
pub mod server;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::coap::Endpoint;
use crate::config::{Config, ConfigError, ConfigFile, PeerSection, RouteSection};
use crate::daemon::Running;
use crate::fastpath::PolicyTables;
use crate::mapping::{Mapper, SharedMapper};
use protocol::ApiError;

/// The running configuration and everything a command touches.
pub struct Control {
    /// The config as the user wrote it; what `config save` writes.
    pub raw: ConfigFile,
    /// The validated config in effect.
    pub config: Config,
    pub config_path: Option<PathBuf>,
    pub running: Running,
    pub mappers: Arc<SharedMapper>,
    pub started: Instant,
}

type Outcome = Result<Value, ApiError>;

fn args<T: for<'de> Deserialize<'de>>(value: &Value, command: &str) -> Result<T, ApiError> {
    let value = if value.is_null() {
        json!({})
    } else {
        value.clone()
    };
    serde_json::from_value(value).map_err(|e| ApiError::from_json(&e, command))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameArgs {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportArgs {
    peers: Vec<PeerSection>,
    /// Replace peers of the same name instead of refusing them.
    #[serde(default)]
    replace: bool,
}

/// Named counters as one JSON object.
fn counters_json(
    counters: impl IntoIterator<Item = (&'static str, u64)>,
) -> serde_json::Map<String, serde_json::Value> {
    counters
        .into_iter()
        .map(|(name, value)| (name.to_owned(), json!(value)))
        .collect()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StatsArgs {
    peer: Option<String>,
    #[serde(default)]
    watch: bool,
    interval_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SaveArgs {
    path: Option<PathBuf>,
}

impl Control {
    /// Runs one command. Changes are validated whole, then applied to the
    /// fast path and the mapper, or not at all.
    pub fn execute(&mut self, command: &str, args_value: &Value) -> Outcome {
        match command {
            "status" => {
                let _: Empty = args(args_value, command)?;
                Ok(self.status())
            }
            "peer.add" => {
                let peer: PeerSection = args(args_value, command)?;
                if self.raw.peer.iter().any(|p| p.name == peer.name) {
                    return Err(ApiError::new("conflict", format!("a peer is already named {:?}", peer.name), Some("name")));
                }
                let mut raw = self.raw.clone();
                raw.peer.push(peer);
                let index = raw.peer.len() - 1;
                self.apply(raw, &format!("peer[{index}]."), "")
            }
            "peer.rm" => {
                let NameArgs { name } = args(args_value, command)?;
                let mut raw = self.raw.clone();
                let before = raw.peer.len();
                raw.peer.retain(|p| p.name != name);
                if raw.peer.len() == before {
                    return Err(ApiError::new("not_found", format!("no peer is named {name:?}"), Some("name")));
                }
                self.apply(raw, "", "")
            }
            "peer.import" => {
                let ImportArgs { peers, replace } = args(args_value, command)?;
                let mut raw = self.raw.clone();
                for (i, peer) in peers.iter().enumerate() {
                    if !replace && raw.peer.iter().any(|p| p.name == peer.name) {
                        return Err(ApiError::new(
                            "conflict",
                            format!("a peer is already named {:?} (use replace)", peer.name),
                            Some(&format!("peers[{i}].name")),
                        ));
                    }
                }
                if replace {
                    let names: std::collections::HashSet<&str> = peers.iter().map(|p| p.name.as_str()).collect();
                    raw.peer.retain(|p| !names.contains(p.name.as_str()));
                }
                let offset = raw.peer.len();
                let count = peers.len();
                raw.peer.extend(peers);
                let started = Instant::now();
                let mut result = self.apply_imported(raw, offset)?;
                result["imported"] = json!(count);
                result["apply_ms"] = json!(started.elapsed().as_millis() as u64);
                Ok(result)
            }
            "peer.ls" => {
                let _: Empty = args(args_value, command)?;
                Ok(self.peers())
            }
            "route.add" => {
                let route: RouteSection = args(args_value, command)?;
                if self.raw.route.iter().any(|r| r.name == route.name) {
                    return Err(ApiError::new("conflict", format!("a route is already named {:?}", route.name), Some("name")));
                }
                let mut raw = self.raw.clone();
                raw.route.push(route);
                let index = raw.route.len() - 1;
                self.apply(raw, "", &format!("route[{index}]."))
            }
            "route.rm" => {
                let NameArgs { name } = args(args_value, command)?;
                let mut raw = self.raw.clone();
                let before = raw.route.len();
                raw.route.retain(|r| r.name != name);
                if raw.route.len() == before {
                    return Err(ApiError::new("not_found", format!("no route is named {name:?}"), Some("name")));
                }
                self.apply(raw, "", "")
            }
            "route.ls" => {
                let _: Empty = args(args_value, command)?;
                Ok(json!({ "routes": self.raw.route.iter().map(|r| serde_json::to_value(r).unwrap()).collect::<Vec<_>>() }))
            }
            "observe.ls" => {
                let _: Empty = args(args_value, command)?;
                let now = std::time::Instant::now();
                let relations = &self.running.relations;
                let (_, mapper) = self.mappers.load();
                // A DTLS observer is the peer of its session; a plain one,
                // the peer its address belongs to.
                let sessions = self.running.dtls_sessions.list();
                let peer_of = |e: Endpoint| {
                    if e.secure {
                        sessions.iter().find(|s| s.address == e.addr).map(|s| s.peer.clone())
                    } else {
                        mapper.peer(e.addr.ip()).map(|p| p.name.clone())
                    }
                };
                let observers = relations.observers.lock().unwrap().list(now, peer_of);
                let watches = relations.watches.lock().unwrap().list(now);
                Ok(json!({ "observers": observers, "watches": watches }))
            }
            "dtls.ls" => {
                let _: Empty = args(args_value, command)?;
                let now = std::time::SystemTime::now();
                let sessions: Vec<Value> = self
                    .running
                    .dtls_sessions
                    .list()
                    .into_iter()
                    .map(|s| {
                        let mut v = serde_json::to_value(&s).unwrap();
                        v["age_s"] = json!(now.duration_since(s.since).unwrap_or_default().as_secs());
                        v
                    })
                    .collect();
                Ok(json!({ "sessions": sessions }))
            }
            "upstream.ls" => {
                let _: Empty = args(args_value, command)?;
                Ok(self.upstreams())
            }
            "stats" => {
                let a: StatsArgs = args(args_value, command)?;
                let _ = (a.watch, a.interval_ms); // streaming is the server's job
                self.stats(a.peer.as_deref())
            }
            "config.save" => {
                let SaveArgs { path } = args(args_value, command)?;
                self.save(path)
            }
            "config.reload" => {
                let _: Empty = args(args_value, command)?;
                self.reload()
            }
            other => Err(ApiError::new(
                "unknown_command",
                format!(
                    "unknown command {other:?}; known: status, peer.add, peer.rm, peer.ls, peer.import, \
                     route.add, route.rm, route.ls, upstream.ls, observe.ls, dtls.ls, stats, config.save, config.reload"
                ),
                Some("command"),
            )),
        }
    }

    /// Validates `raw` whole and applies it. `peer_prefix` / `route_prefix`
    /// ("peer[3].") are stripped from error fields so they name the
    /// request's own fields.
    fn apply(&mut self, raw: ConfigFile, peer_prefix: &str, route_prefix: &str) -> Outcome {
        let restart = self.apply_raw(raw).map_err(|mut e| {
            let stripped = e.field.as_deref().and_then(|field| {
                [peer_prefix, route_prefix]
                    .into_iter()
                    .filter(|p| !p.is_empty())
                    .find_map(|p| field.strip_prefix(p).map(str::to_owned))
            });
            if stripped.is_some() {
                e.field = stripped;
            }
            e
        })?;
        Ok(json!({ "applied": true, "restart_required": restart }))
    }

    fn apply_imported(&mut self, raw: ConfigFile, offset: usize) -> Outcome {
        let restart = self.apply_raw(raw).map_err(|mut e| {
            let renamed = e.field.as_deref().and_then(|field| {
                let (n, tail) = field.strip_prefix("peer[")?.split_once(']')?;
                let k = n.parse::<usize>().ok()?.checked_sub(offset)?;
                Some(format!("peers[{k}]{tail}"))
            });
            if renamed.is_some() {
                e.field = renamed;
            }
            e
        })?;
        Ok(json!({ "applied": true, "restart_required": restart }))
    }

    /// Validate, then apply to the kernel and userspace; returns the
    /// settings that only a restart changes.
    pub fn apply_raw(&mut self, raw: ConfigFile) -> Result<Vec<&'static str>, ApiError> {
        let validated = raw.clone().validate().map_err(config_error)?;
        // What needs a restart is judged against the file as it was, not
        // the running config, which carries the command-line overrides.
        let before = self.raw.clone().validate().map_err(config_error)?;
        let restart = restart_only_changes(&before, &validated);
        let effective = keep_restart_only_settings(&self.config, validated);
        if let Some(fastpath) = &mut self.running.fastpath {
            let tables = PolicyTables::build(&effective, Some(fastpath.tables()))
                .map_err(|m| ApiError::new("invalid_config", m, Some("peer")))?;
            fastpath
                .apply(tables)
                .map_err(|e| ApiError::new("apply_failed", format!("{e:#}"), None))?;
        }
        self.mappers.store(Mapper::from_config(&effective));
        let peers = effective.peers.len();
        let routes = effective.routes.len();
        self.config = effective;
        self.raw = raw;
        tracing::info!(peers, routes, "configuration applied");
        Ok(restart)
    }

    fn reload(&mut self) -> Outcome {
        let Some(path) = self.config_path.clone() else {
            return Err(ApiError::new(
                "no_config_file",
                "the daemon was started without --config",
                None,
            ));
        };
        let raw = ConfigFile::load(&path).map_err(config_error)?;
        let restart = self.apply_raw(raw)?;
        tracing::info!(path = %path.display(), "configuration reloaded");
        Ok(json!({ "reloaded": path, "restart_required": restart }))
    }

    /// Writes the running config atomically: a temporary file beside the
    /// target, fsync, rename, fsync of the directory.
    fn save(&mut self, path: Option<PathBuf>) -> Outcome {
        let Some(path) = path.or_else(|| self.config_path.clone()) else {
            return Err(ApiError::new(
                "no_config_file",
                "no --config file to save to; give a path",
                Some("path"),
            ));
        };
        write_atomically(&path, self.raw.to_toml().as_bytes()).map_err(|e| {
            ApiError::new(
                "io",
                format!("saving {}: {e}", path.display()),
                Some("path"),
            )
        })?;
        if self.config_path.is_none() {
            self.config_path = Some(path.clone());
        }
        tracing::info!(path = %path.display(), "configuration saved");
        Ok(json!({ "saved": path }))
    }

    fn status(&self) -> Value {
        let xdp: Vec<Value> = match &self.running.fastpath {
            Some(fp) => fp
                .attached()
                .iter()
                .map(|(iface, mode)| json!({ "interface": iface, "mode": mode.to_string() }))
                .collect(),
            None => Vec::new(),
        };
        let (accepted, dropped) = self.running.fastpath.as_ref().map_or((0, 0), |fp| {
            fp.verdicts().map_or((0, 0), |v| {
                v.values()
                    .fold((0, 0), |(a, d), (reason, c)| match reason.action() {
                        router_common::Action::Pass if *reason == router_common::Reason::Accept => {
                            (a + c.packets, d)
                        }
                        router_common::Action::Drop => (a, d + c.packets),
                        _ => (a, d),
                    })
            })
        });
        let b = &self.running.broker.stats;
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "xdp": if self.running.fastpath.is_some() { json!(xdp) } else { json!("off") },
            "peers": self.config.peers.len(),
            "routes": self.config.routes.len(),
            "config_file": self.config_path,
            "totals": {
                "coap_accepted_by_xdp": accepted,
                "dropped_by_xdp": dropped,
                "published": b.published.load(Ordering::Relaxed),
                "delivered": b.enqueued.load(Ordering::Relaxed),
                "dropped_for_slow_subscribers": b.dropped.load(Ordering::Relaxed),
            },
        })
    }

    fn peers(&self) -> Value {
        let peers: Vec<Value> = self
            .raw
            .peer
            .iter()
            .map(|p| {
                let mut v = serde_json::to_value(p).unwrap();
                // A key never leaves the daemon: `peer ls` says one is set.
                if p.psk_hex.is_some() {
                    v["psk_hex"] = json!("(set)");
                }
                if let Some(fp) = &self.running.fastpath {
                    if let Some(id) = fp.tables().peer_id(&p.name) {
                        if let Ok(c) = fp.peer_counters(id) {
                            v["accepted_packets"] = json!(c.accepted.packets);
                            v["dropped_packets"] = json!(c.dropped.packets);
                        }
                    }
                }
                v
            })
            .collect();
        json!({ "peers": peers })
    }

    fn upstreams(&self) -> Value {
        let bridges = &self.running.bridges;
        let list: Vec<Value> = self
            .config
            .upstreams
            .iter()
            .map(|u| {
                let mut v = json!({
                    "name": u.name, "url": u.url, "durability": format!("{:?}", u.durability).to_lowercase(),
                    "topics": u.topics, "prefix": u.prefix,
                });
                if let Some(b) = bridges.iter().find(|b| b.name == u.name) {
                    let s = &b.spool.stats;
                    v["connected"] = json!(b.connected.load(Ordering::Relaxed));
                    v["connects"] = json!(b.connects.load(Ordering::Relaxed));
                    v["spooled_messages"] = json!(s.records.load(Ordering::Relaxed));
                    v["spooled_bytes"] = json!(s.bytes.load(Ordering::Relaxed));
                    v["appended"] = json!(s.appended.load(Ordering::Relaxed));
                    v["sent"] = json!(b.sent.load(Ordering::Relaxed));
                    v["acked"] = json!(s.acked.load(Ordering::Relaxed));
                    v["evicted"] = json!(s.evicted.load(Ordering::Relaxed));
                    v["sync_failures"] = json!(s.sync_failures.load(Ordering::Relaxed));
                    v["too_long"] = json!(b.too_long.load(Ordering::Relaxed));
                }
                v
            })
            .collect();
        json!({ "upstreams": list })
    }

    pub fn stats(&self, peer: Option<&str>) -> Outcome {
        let mut out = json!({});
        if let Some(fp) = &self.running.fastpath {
            let verdicts = fp
                .verdicts()
                .map_err(|e| ApiError::new("internal", e.to_string(), None))?;
            out["verdicts"] = verdicts
                .values()
                .map(|(r, c)| {
                    (
                        r.label().to_owned(),
                        json!({ "packets": c.packets, "bytes": c.bytes }),
                    )
                })
                .collect::<serde_json::Map<_, _>>()
                .into();
            let tables = fp.tables();
            let names: Vec<&str> = match peer {
                Some(name) => {
                    if tables.peer_id(name).is_none() {
                        return Err(ApiError::new(
                            "not_found",
                            format!("no peer is named {name:?}"),
                            Some("peer"),
                        ));
                    }
                    vec![name]
                }
                None => self.config.peers.iter().map(|p| p.name.as_str()).collect(),
            };
            let mut peers = serde_json::Map::new();
            for name in std::iter::once("(unknown)")
                .filter(|_| peer.is_none())
                .chain(names)
            {
                let id = tables.peer_id(name).unwrap_or(0);
                if let Ok(c) = fp.peer_counters(id) {
                    peers.insert(
                        name.to_owned(),
                        json!({
                            "accepted_packets": c.accepted.packets, "accepted_bytes": c.accepted.bytes,
                            "dropped_packets": c.dropped.packets, "dropped_bytes": c.dropped.bytes,
                        }),
                    );
                }
            }
            out["peers"] = peers.into();
        }
        out["process"] = counters_json(crate::process::snapshot()).into();
        out["coap"] = counters_json(self.running.uplink.snapshot()).into();
        out["downlink"] = counters_json(self.running.downlink.snapshot()).into();
        out["dtls"] = counters_json(self.running.dtls.snapshot()).into();
        for (section, listener) in [
            ("control", &self.running.control_socket),
            ("metrics_http", &self.running.metrics_http),
        ] {
            let mut counters = counters_json(
                listener
                    .counters()
                    .into_iter()
                    .map(|(name, _, value)| (name, value)),
            );
            counters.insert("open".into(), json!(listener.open()));
            out[section] = counters.into();
        }
        let broker = &self.running.broker;
        let mut mqtt = counters_json(
            broker
                .stats
                .counters()
                .into_iter()
                .map(|(name, _, value)| (name, value)),
        );
        for (name, _, value) in broker.gauges() {
            mqtt.insert(name.into(), json!(value));
        }
        mqtt.insert(
            "sessions".into(),
            broker
                .session_stats()
                .into_iter()
                .map(|(id, queued, dropped)| json!({ "client_id": id, "queued": queued, "dropped": dropped }))
                .collect(),
        );
        out["mqtt"] = mqtt.into();
        Ok(out)
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Empty {}

fn config_error(e: ConfigError) -> ApiError {
    match e {
        ConfigError::Invalid { field, message } => {
            ApiError::new("invalid_config", message, Some(&field))
        }
        other => ApiError::new("invalid_config", other.to_string(), None),
    }
}

/// The sections whose changes only a restart applies.
fn restart_only_changes(current: &Config, new: &Config) -> Vec<&'static str> {
    let mut restart = Vec::new();
    if new.coap_listen != current.coap_listen || new.coap != current.coap {
        restart.push("coap");
    }
    if new.coaps_listen != current.coaps_listen || new.dtls != current.dtls {
        restart.push("dtls");
    }
    if new.interfaces != current.interfaces
        || new.xdp_mode != current.xdp_mode
        || new.persist != current.persist
        || new.pin_dir != current.pin_dir
    {
        restart.push("fastpath");
    }
    if new.mqtt != current.mqtt {
        restart.push("mqtt");
    }
    if new.control != current.control {
        restart.push("control");
    }
    if new.metrics_listen != current.metrics_listen {
        restart.push("metrics");
    }
    if new.upstreams.len() != current.upstreams.len()
        || new
            .upstreams
            .iter()
            .zip(&current.upstreams)
            .any(|(a, b)| format!("{a:?}") != format!("{b:?}"))
    {
        restart.push("upstream");
    }
    if new.downlink != current.downlink {
        restart.push("downlink");
    }
    restart
}

/// Takes the live-changeable parts (peers, routes, defaults) from
/// `new` and keeps the rest of `current`.
fn keep_restart_only_settings(current: &Config, new: Config) -> Config {
    Config {
        coap_listen: current.coap_listen.clone(),
        coaps_listen: current.coaps_listen.clone(),
        dtls: current.dtls.clone(),
        coap: current.coap.clone(),
        mqtt: current.mqtt.clone(),
        interfaces: current.interfaces.clone(),
        xdp_mode: current.xdp_mode,
        persist: current.persist,
        pin_dir: current.pin_dir.clone(),
        control: current.control.clone(),
        metrics_listen: current.metrics_listen,
        metrics_peer_series: new.metrics_peer_series,
        defaults: new.defaults,
        peers: new.peers,
        routes: new.routes,
        upstreams: current.upstreams.clone(),
        downlink: current.downlink.clone(),
    }
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("config"),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
