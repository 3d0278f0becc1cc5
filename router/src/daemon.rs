//! `m2m-router run`: the fast path, the CoAP workers and the embedded MQTT
//! broker, until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::bridge::{self, Bridge};
use crate::coap::downlink::{
    Downlink, DownlinkHandle, DownlinkStats, LastSeen, Relations, Transport,
};
use crate::coap::dtls::{self, DtlsStats, Sessions};
use crate::coap::observe::Sequence;
use crate::coap::uplink::{Uplink, UplinkConfig, UplinkStats};
use crate::config::{Config, ConfigFile, XdpMode};
use crate::control::{self, Control};
use crate::fastpath::{Fastpath, PinDir, PolicyTables};
use crate::listener::{self, ListenerStats};
use crate::mapping::{Mapper, SharedMapper};
use crate::metrics;
use crate::mqtt::{self, Broker};
use crate::report;
use crate::worker::{SecureWorker, Workers};

/// The interface XDP attaches to when none is named (DESIGN.md invariant 4).
pub const DEFAULT_INTERFACE: &str = "lo";

/// Room for the CoAP header, token and options around the largest payload.
const DATAGRAM_OVERHEAD: usize = 1024;

/// Everything the reports read.
pub struct Running {
    pub fastpath: Option<Fastpath>,
    pub uplink: Arc<UplinkStats>,
    pub downlink: Arc<DownlinkStats>,
    /// CoAP over DTLS: its counters and its established sessions.
    pub dtls: Arc<DtlsStats>,
    pub dtls_sessions: Arc<Sessions>,
    /// Devices observing topics and the gateway observing devices (`ctl
    /// observe ls`).
    pub relations: Relations,
    pub broker: Arc<Broker>,
    /// Upstream bridges, one per `[[upstream]]`.
    pub bridges: Vec<Arc<Bridge>>,
    /// The control socket's and the metrics endpoint's connections.
    pub control_socket: Arc<ListenerStats>,
    pub metrics_http: Arc<ListenerStats>,
}

impl Running {
    /// What a control plane runs against without a daemon around it: no
    /// fast path, fresh counters, `broker` alone (the control fuzz target,
    /// tests).
    pub fn detached(broker: Arc<Broker>) -> Running {
        Running {
            fastpath: None,
            uplink: Arc::new(UplinkStats::default()),
            downlink: Arc::new(DownlinkStats::default()),
            dtls: Default::default(),
            dtls_sessions: Default::default(),
            relations: Relations::default(),
            broker,
            bridges: Vec::new(),
            control_socket: Default::default(),
            metrics_http: Default::default(),
        }
    }
}

pub fn run(config: Config, raw: ConfigFile, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    // The control socket first: a second daemon stops here, before it
    // touches XDP or the CoAP ports.
    let (control_listener, access) = {
        let _guard = runtime.enter();
        control::server::bind(&config.control.socket, config.control.group.as_deref())?
    };
    let _socket_file = RemoveOnDrop(config.control.socket.clone());
    tracing::info!(path = %config.control.socket.display(), "control socket listening");
    listener::raise_descriptor_limit();
    let fastpath = start_fastpath(&config)?;
    let broker = Broker::new(config.mqtt.broker.clone());
    let listener = runtime
        .block_on(TcpListener::bind(config.mqtt.listen))
        .with_context(|| format!("MQTT listen address {}", config.mqtt.listen))?;
    tracing::info!(addr = %config.mqtt.listen, "MQTT broker listening");

    let mut bridges = Vec::new();
    for upstream in &config.upstreams {
        let bridge = Bridge::open(upstream, &config.downlink.command_prefix)
            .with_context(|| format!("upstream {:?}", upstream.name))?;
        broker.add_sink(bridge.clone());
        bridges.push((upstream.clone(), bridge));
        tracing::info!(upstream = %upstream.name, url = %upstream.url, durability = ?upstream.durability, "upstream bridge configured");
    }
    let uplink_stats = Arc::new(UplinkStats::default());
    let mapper = SharedMapper::new(Mapper::from_config(&config));
    let per_address = match config.coap.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    // The bounds are for all workers together; each has its own share
    // (the CoAPS worker is one more).
    let secure = usize::from(!config.coaps_listen.is_empty());
    let workers = (per_address * config.coap_listen.len() + secure).max(1);
    let uplink_config = UplinkConfig {
        max_payload: config.coap.max_payload,
        max_body: config.coap.max_body,
        max_assembly_bytes: config.coap.max_assembly_bytes / workers,
        dedup_per_peer: config.coap.dedup_per_peer,
        dedup_total: (config.coap.dedup_total / workers).max(1),
    };
    let last_seen = Arc::new(LastSeen::default());
    let (replies_tx, replies_rx) = tokio::sync::mpsc::channel(4096);
    // Observe registrations wait here for the endpoint task; when it is
    // full, a registration is declined (the response has no Observe).
    let (observe_tx, observe_rx) = tokio::sync::mpsc::channel(4096);
    let sequence = Arc::new(Sequence::default());
    let relations = Relations::default();
    // Peers heard from again, or at a new address.
    let (heard_tx, heard_rx) = tokio::sync::mpsc::channel(4096);
    let downlink_handle = DownlinkHandle {
        heard: heard_tx,
        observe: observe_tx,
        sequence: sequence.clone(),
        last_seen: last_seen.clone(),
        replies: replies_tx,
    };
    let uplink = || {
        Uplink::new(
            uplink_config.clone(),
            mapper.clone(),
            broker.clone(),
            uplink_stats.clone(),
        )
        .with_downlink(downlink_handle.clone())
    };
    // A Block1 block may carry 1024 bytes whatever max_payload says.
    let max_datagram = config.coap.max_payload.max(1024) + DATAGRAM_OVERHEAD;
    let workers = Workers::start(&config.coap_listen, per_address, max_datagram, uplink)?;
    tracing::info!(addrs = ?config.coap_listen, workers_per_addr = per_address, "CoAP workers listening");
    let dtls_stats = Arc::new(DtlsStats::default());
    let dtls_sessions = Arc::new(Sessions::default());
    let (secure_worker, outbox) = if config.coaps_listen.is_empty() {
        (None, None)
    } else {
        let (outbox, inbox) =
            dtls::outbox(dtls_stats.clone()).context("the CoAPS worker's downlink queue")?;
        let server = dtls::Server::new(
            config.dtls.clone(),
            config.coaps_listen.clone(),
            mapper.clone(),
            dtls_stats.clone(),
            dtls_sessions.clone(),
        )
        .context("setting up DTLS")?;
        // DTLS records add at most a header, an explicit nonce and a tag.
        let worker = SecureWorker::start(
            &config.coaps_listen,
            max_datagram + 64,
            uplink(),
            server,
            inbox,
        )?;
        tracing::info!(addrs = ?config.coaps_listen, "CoAPS (DTLS) worker listening");
        (Some(worker), Some(outbox))
    };

    let metrics_listener = runtime
        .block_on(TcpListener::bind(config.metrics_listen))
        .with_context(|| format!("metrics listen address {}", config.metrics_listen))?;
    tracing::info!(addr = %config.metrics_listen, "metrics at /metrics");
    runtime.spawn(mqtt::serve(listener, broker.clone()));
    let downlink_stats = Arc::new(DownlinkStats::default());
    let downlink = Downlink::new(
        config.downlink.clone(),
        broker.clone(),
        mapper.clone(),
        &downlink_handle,
        Transport {
            sockets: workers
                .senders()
                .context("cloning the CoAP sockets for the downlink")?,
            secure: outbox,
        },
        downlink_stats.clone(),
        relations.clone(),
    );
    runtime.spawn(downlink.run(replies_rx, observe_rx, heard_rx));
    for (upstream, bridge) in &bridges {
        runtime.spawn(bridge::run(
            upstream.clone(),
            bridge.clone(),
            broker.clone(),
            config.downlink.command_prefix.clone(),
        ));
    }
    let control_limits = control::server::Limits {
        max_connections: config.control.max_connections,
        idle_timeout: config.control.idle_timeout,
    };
    let control_socket = Arc::new(ListenerStats::default());
    let metrics_http = Arc::new(ListenerStats::default());
    let control = Arc::new(Mutex::new(Control {
        raw,
        config,
        config_path,
        running: Running {
            fastpath,
            uplink: uplink_stats,
            downlink: downlink_stats,
            dtls: dtls_stats,
            dtls_sessions,
            relations,
            broker,
            bridges: bridges.into_iter().map(|(_, bridge)| bridge).collect(),
            control_socket: control_socket.clone(),
            metrics_http: metrics_http.clone(),
        },
        mappers: mapper,
        started: Instant::now(),
    }));
    runtime.spawn(control::server::serve(
        control_listener,
        control.clone(),
        access,
        control_limits,
        control_socket,
    ));
    runtime.spawn(metrics::serve(
        metrics_listener,
        control.clone(),
        metrics_http,
    ));
    runtime.block_on(serve(&control))?;
    workers.stop();
    if let Some(w) = secure_worker {
        w.stop();
    }
    let control = Arc::try_unwrap(control)
        .ok()
        .map(|m| m.into_inner().unwrap());
    if let Some(control) = &control {
        print!("{}", report::render(&control.running)?);
        if let Some(fastpath) = &control.running.fastpath {
            for (iface, _) in fastpath.attached() {
                match fastpath.persisted() {
                    Some(pins) => tracing::info!(
                        iface = %iface,
                        pins = %pins.display(),
                        "XDP left in place (persist): the next run adopts it; `m2m-router detach` removes it"
                    ),
                    None => tracing::info!(iface = %iface, "XDP detached"),
                }
            }
        }
    }
    // Dropping the Fastpath detaches every link it did not pin.
    drop(control);
    drop(runtime);
    tracing::info!("m2m-router stopped");
    Ok(())
}

/// Removes the control socket file however `run` ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn start_fastpath(config: &Config) -> anyhow::Result<Option<Fastpath>> {
    if config.xdp_mode == XdpMode::Off {
        tracing::warn!("XDP fast path off (--xdp-mode off): CoAP traffic is not filtered or counted in the kernel");
        return Ok(None);
    }
    let mut fastpath = if config.persist {
        let (fastpath, adopted) = Fastpath::load_persisted(config, &config.pin_dir)?;
        let pins = fastpath
            .persisted()
            .unwrap_or(&config.pin_dir)
            .display()
            .to_string();
        if adopted {
            tracing::info!(pins = %pins, "XDP maps adopted (policy, rate state and counters kept); new program loaded");
        } else {
            tracing::info!(pins = %pins, "XDP program loaded, its maps pinned (persist)");
        }
        fastpath
    } else {
        // A run with persist left pins here: this one does not keep them.
        if let Ok(pins) = PinDir::for_this_netns(&config.pin_dir) {
            for (iface, _) in pins.detach(None).unwrap_or_default() {
                tracing::info!(iface = %iface, "removed the XDP program an earlier run persisted (persist is off)");
            }
        }
        let tables = PolicyTables::from_config(config).map_err(|e| anyhow::anyhow!(e))?;
        Fastpath::load(tables)?
    };
    tracing::info!(
        peers = fastpath.tables().peer_names.len() - 1,
        coap_ports = ?config.coap_ports(),
        "XDP program loaded and policy installed"
    );
    let default = [DEFAULT_INTERFACE.to_owned()];
    let interfaces = if config.interfaces.is_empty() {
        &default[..]
    } else {
        &config.interfaces[..]
    };
    for iface in interfaces {
        match fastpath.attach(iface, config.xdp_mode)? {
            (mode, true) => {
                tracing::info!(iface = %iface, mode = %mode, "XDP adopted: the new program replaced the old one in its link")
            }
            (mode, false) => tracing::info!(iface = %iface, mode = %mode, "XDP attached"),
        }
    }
    if config.persist {
        // Interfaces an earlier run attached that the config no longer names.
        let pins = PinDir::for_this_netns(&config.pin_dir)?;
        for (iface, _) in pins.interfaces() {
            if !interfaces.contains(&iface) {
                pins.detach(Some(&iface))?;
                tracing::info!(iface = %iface, "XDP detached: the config no longer names this interface");
            }
        }
    }
    Ok(Some(fastpath))
}

async fn serve(control: &Arc<Mutex<Control>>) -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut user1 =
        signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tracing::info!(
        pid = std::process::id(),
        "m2m-router running; SIGUSR1 prints counters, SIGHUP reloads"
    );
    let mut trim = tokio::time::interval(crate::process::TRIM_EVERY);
    trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = trim.tick() => {
                tokio::task::spawn_blocking(crate::process::release_free_memory);
            }
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = user1.recv() => print!("{}", report::render(&control.lock().unwrap().running)?),
            _ = hangup.recv() => {
                // A bad file keeps the running config; say why.
                if let Err(err) = control.lock().unwrap().execute("config.reload", &serde_json::Value::Null) {
                    tracing::error!(error = %err, "reload refused; the running configuration is unchanged");
                }
            }
        }
    }
    tracing::info!("shutting down");
    Ok(())
}
