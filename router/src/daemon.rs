//! `m2m-router run`: load and attach the fast path, then serve until
//! SIGINT/SIGTERM.

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::{Config, XdpMode};
use crate::fastpath::{Fastpath, PolicyTables};
use crate::report;

/// The interface XDP attaches to when none is named (DESIGN.md invariant 4).
pub const DEFAULT_INTERFACE: &str = "lo";

pub fn run(config: Config) -> anyhow::Result<()> {
    let fastpath = start_fastpath(&config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(serve(fastpath.as_ref()))?;
    if let Some(fastpath) = &fastpath {
        print!("{}", report::stats(fastpath)?);
        for (iface, _) in fastpath.attached() {
            tracing::info!(iface = %iface, "XDP detached");
        }
    }
    // Dropping the Fastpath detaches every link.
    drop(fastpath);
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

async fn serve(fastpath: Option<&Fastpath>) -> anyhow::Result<()> {
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
            _ = user1.recv() => match fastpath {
                Some(fastpath) => print!("{}", report::stats(fastpath)?),
                None => println!("fast path off: no counters"),
            },
        }
    }
    tracing::info!("shutting down");
    Ok(())
}
