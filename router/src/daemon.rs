//! `m2m-router run`: the fast path, the CoAP workers and the embedded MQTT
//! broker, until SIGINT/SIGTERM.

use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::coap::uplink::{Uplink, UplinkConfig, UplinkStats};
use crate::config::{Config, XdpMode};
use crate::fastpath::{Fastpath, PolicyTables};
use crate::mapping::Mapper;
use crate::mqtt::{self, Broker, BrokerConfig};
use crate::report;
use crate::worker::Workers;

/// The interface XDP attaches to when none is named (DESIGN.md invariant 4).
pub const DEFAULT_INTERFACE: &str = "lo";

/// Room for the CoAP header, token and options around the largest payload.
const DATAGRAM_OVERHEAD: usize = 1024;

/// Everything the reports read.
pub struct Running {
    pub fastpath: Option<Fastpath>,
    pub uplink: Arc<UplinkStats>,
    pub broker: Arc<Broker>,
}

pub fn run(config: Config) -> anyhow::Result<()> {
    let fastpath = start_fastpath(&config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let broker = Broker::new(BrokerConfig {
        session_queue: config.mqtt.session_queue,
        max_inflight: config.mqtt.max_inflight,
        max_packet_size: config.mqtt.max_packet_size,
        username: config.mqtt.username.clone(),
        password: config.mqtt.password.clone(),
    });
    let listener = runtime
        .block_on(TcpListener::bind(config.mqtt.listen))
        .with_context(|| format!("MQTT listen address {}", config.mqtt.listen))?;
    tracing::info!(addr = %config.mqtt.listen, "MQTT broker listening");

    let uplink_stats = Arc::new(UplinkStats::default());
    let mapper = Arc::new(Mapper::from_config(&config));
    let per_address = match config.coap.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let uplink_config = UplinkConfig {
        max_payload: config.coap.max_payload,
        dedup_per_peer: config.coap.dedup_per_peer,
        dedup_total: config.coap.dedup_total,
    };
    let workers = Workers::start(
        &config.coap_listen,
        per_address,
        config.coap.max_payload + DATAGRAM_OVERHEAD,
        || {
            Uplink::new(
                uplink_config.clone(),
                mapper.clone(),
                broker.clone(),
                uplink_stats.clone(),
            )
        },
    )?;
    tracing::info!(addrs = ?config.coap_listen, workers_per_addr = per_address, "CoAP workers listening");

    runtime.spawn(mqtt::serve(listener, broker.clone()));
    let running = Running {
        fastpath,
        uplink: uplink_stats,
        broker,
    };
    runtime.block_on(serve(&running))?;
    workers.stop();
    print!("{}", report::render(&running)?);
    if let Some(fastpath) = &running.fastpath {
        for (iface, _) in fastpath.attached() {
            tracing::info!(iface = %iface, "XDP detached");
        }
    }
    // Dropping the Fastpath detaches every link.
    drop(running);
    drop(runtime);
    tracing::info!("m2m-router stopped");
    Ok(())
}

fn start_fastpath(config: &Config) -> anyhow::Result<Option<Fastpath>> {
    if config.xdp_mode == XdpMode::Off {
        tracing::warn!("XDP fast path off (--xdp-mode off): CoAP traffic is not filtered or counted in the kernel");
        return Ok(None);
    }
    let tables = PolicyTables::from_config(config).map_err(|e| anyhow::anyhow!(e))?;
    let peers = tables.peer_names.len() - 1;
    let mut fastpath = Fastpath::load(tables)?;
    tracing::info!(
        peers,
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
        let mode = fastpath.attach(iface, config.xdp_mode)?;
        tracing::info!(iface = %iface, mode = %mode, "XDP attached");
    }
    Ok(Some(fastpath))
}

async fn serve(running: &Running) -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut user1 =
        signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;
    tracing::info!(
        pid = std::process::id(),
        "m2m-router running; SIGUSR1 prints counters"
    );
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = user1.recv() => print!("{}", report::render(running)?),
        }
    }
    tracing::info!("shutting down");
    Ok(())
}
