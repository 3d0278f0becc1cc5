use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use m2m_router::config::{Config, XdpMode};
use m2m_router::daemon;
use m2m_router::fastpath::FastpathError;

/// Routes CoAP from M2M devices to MQTT topics, with an XDP fast path.
#[derive(Parser)]
#[command(name = "m2m-router", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the router (embedded defaults unless --config is given).
    Run {
        /// TOML config file; flags below override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Interface to attach XDP to (repeatable). Default: lo.
        #[arg(long = "iface", value_name = "IF")]
        ifaces: Vec<String>,
        /// auto (native, else generic), native, skb (generic) or off.
        #[arg(long, value_name = "MODE")]
        xdp_mode: Option<XdpMode>,
        /// CoAP listen address (repeatable); its port is guarded by XDP.
        #[arg(long = "coap-listen", value_name = "ADDR")]
        coap_listen: Vec<SocketAddr>,
        /// MQTT broker listen address.
        #[arg(long = "mqtt-listen", value_name = "ADDR")]
        mqtt_listen: Option<SocketAddr>,
    },
    /// Validate a config file and say what it configures.
    CheckConfig { file: PathBuf },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match Cli::parse().command {
        Command::Run {
            config,
            ifaces,
            xdp_mode,
            coap_listen,
            mqtt_listen,
        } => load_config(config.as_deref()).and_then(|mut c| {
            if !ifaces.is_empty() {
                c.interfaces = ifaces;
            }
            if let Some(mode) = xdp_mode {
                c.xdp_mode = mode;
            }
            if !coap_listen.is_empty() {
                c.coap_listen = coap_listen;
            }
            if let Some(addr) = mqtt_listen {
                c.mqtt.listen = addr;
            }
            daemon::run(c)
        }),
        Command::CheckConfig { file } => check_config(&file),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("m2m-router: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            if let Some(hint) = err
                .downcast_ref::<FastpathError>()
                .and_then(FastpathError::hint)
            {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    })
}

fn check_config(file: &std::path::Path) -> anyhow::Result<()> {
    let c = Config::load(file)?;
    let ifaces = if c.interfaces.is_empty() {
        daemon::DEFAULT_INTERFACE.to_owned()
    } else {
        c.interfaces.join(", ")
    };
    println!(
        "{}: ok: {} peers, {} routes, {} upstreams; CoAP ports {:?}; XDP {:?} on {}",
        file.display(),
        c.peers.len(),
        c.routes.len(),
        c.upstreams.len(),
        c.coap_ports(),
        c.xdp_mode,
        ifaces
    );
    Ok(())
}
