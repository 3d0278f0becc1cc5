use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use m2m_router::config::{Config, ConfigFile, XdpMode, DEFAULT_CONTROL_SOCKET, DEFAULT_PIN_DIR};
use m2m_router::control::client::{self, Outcome};
use m2m_router::daemon;
use m2m_router::fastpath::{FastpathError, PinDir};
use serde_json::{json, Value};

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
    Run(RunArgs),
    /// Talk to a running router over its control socket.
    Ctl {
        /// Control socket of the daemon.
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
        /// Print the daemon's JSON answer instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// Validate a config file and say what it configures.
    CheckConfig { file: PathBuf },
    /// Remove the XDP program a run with `[fastpath] persist` left attached
    /// in this network namespace (and its maps, once no interface is left).
    Detach {
        /// Only this interface (default: every one).
        #[arg(long, value_name = "IF")]
        iface: Option<String>,
        /// The config whose `[fastpath] pin_dir` to use.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The pin directory (overrides the config's).
        #[arg(long, value_name = "DIR")]
        pin_dir: Option<PathBuf>,
    },
}

#[derive(Args)]
struct RunArgs {
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
    /// CoAP over DTLS listen address (repeatable).
    #[arg(long = "coaps-listen", value_name = "ADDR")]
    coaps_listen: Vec<SocketAddr>,
    /// MQTT broker listen address.
    #[arg(long = "mqtt-listen", value_name = "ADDR")]
    mqtt_listen: Option<SocketAddr>,
    /// Control socket path.
    #[arg(long = "control-socket", value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Prometheus metrics listen address.
    #[arg(long = "metrics-listen", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Version, uptime, XDP mode per interface, totals.
    Status,
    #[command(subcommand)]
    Peer(PeerCommand),
    #[command(subcommand)]
    Route(RouteCommand),
    #[command(subcommand)]
    Upstream(UpstreamCommand),
    #[command(subcommand)]
    Observe(ObserveCommand),
    /// CoAP over DTLS sessions.
    #[command(subcommand)]
    Dtls(DtlsCommand),
    /// Counters by verdict reason, per peer, MQTT and queues.
    Stats {
        #[arg(long)]
        peer: Option<String>,
        /// Print again every second until interrupted.
        #[arg(long)]
        watch: bool,
    },
    #[command(subcommand)]
    Config(ConfigCommand),
}

// Parsed once per command line: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum PeerCommand {
    /// Add a peer; it takes effect on the next packet.
    Add {
        name: String,
        /// Addresses the peer sends from (at least one, unless it has DTLS
        /// credentials).
        #[arg(long = "prefix", value_name = "CIDR")]
        prefixes: Vec<String>,
        #[arg(long)]
        deny: bool,
        /// Packets per second, e.g. 100/s, or "unlimited".
        #[arg(long, value_name = "N/s")]
        rate: Option<String>,
        #[arg(long)]
        burst: Option<u32>,
        #[arg(long, value_name = "TEMPLATE")]
        topic: Option<String>,
        /// A topic filter the peer may publish to through the pubsub prefix.
        #[arg(long = "publish", value_name = "FILTER")]
        publish: Vec<String>,
        /// A topic filter the peer may read and observe through it.
        #[arg(long = "subscribe", value_name = "FILTER")]
        subscribe: Vec<String>,
        /// A path on the device the gateway observes (RFC 7641).
        #[arg(long = "observe", value_name = "PATH")]
        observe: Vec<String>,
        /// Where downlink commands and observations go (default: the
        /// source of the peer's latest uplink); coaps://ADDR[:PORT] for a
        /// device listening on DTLS, which the gateway opens a session to.
        #[arg(long, value_name = "ADDR:PORT|coaps://ADDR")]
        endpoint: Option<String>,
        /// The PSK identity the peer presents over DTLS (coaps).
        #[arg(long, value_name = "IDENTITY")]
        psk_identity: Option<String>,
        /// Its key, in hexadecimal.
        #[arg(long, value_name = "HEX", conflicts_with = "psk_file")]
        psk_hex: Option<String>,
        /// Its key: the raw bytes of a file only its owner (and group) can read.
        #[arg(long, value_name = "PATH")]
        psk_file: Option<PathBuf>,
        /// The name (subject CN, or a DNS, URI or email SAN) of the client
        /// certificate the peer presents over DTLS (certificate mode).
        #[arg(long, value_name = "NAME")]
        cert_name: Option<String>,
        /// Drop the peer's plain CoAP: only its DTLS sessions are it.
        #[arg(long)]
        require_dtls: bool,
    },
    /// Remove a peer.
    Rm { name: String },
    /// List peers with their counters.
    Ls,
    /// Add every [[peer]] of a TOML file in one request.
    Import {
        file: PathBuf,
        /// Replace peers of the same name instead of refusing.
        #[arg(long)]
        replace: bool,
    },
}

#[derive(Subcommand)]
enum RouteCommand {
    Add {
        name: String,
        #[arg(long = "match", value_name = "PATH_GLOB")]
        path_match: String,
        #[arg(long)]
        peer: Option<String>,
        #[arg(long)]
        method: Option<String>,
        #[arg(long, value_name = "TEMPLATE")]
        topic: String,
        #[arg(long, default_value_t = 0)]
        qos: u8,
        #[arg(long)]
        retain: bool,
    },
    Rm {
        name: String,
    },
    Ls,
}

#[derive(Subcommand)]
enum UpstreamCommand {
    /// Upstream bridges: connection, spool, counters.
    Ls,
}

#[derive(Subcommand)]
enum ObserveCommand {
    /// Devices observing topics (RFC 7641): endpoint, token, topic, age,
    /// notifications sent.
    Ls,
}

#[derive(Subcommand)]
enum DtlsCommand {
    /// Established DTLS sessions: peer, address, cipher suite, age.
    Ls,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Write the running config to its file (atomically).
    Save {
        /// Another file to write (and to use from now on).
        #[arg(long)]
        path: Option<PathBuf>,
    },
    /// Re-read the config file and apply it.
    Reload,
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
        Command::Run(args) => run(args),
        Command::Ctl {
            socket,
            json,
            command,
        } => {
            let (name, args) = match ctl_request(command) {
                Ok(request) => request,
                Err(err) => return report(err),
            };
            match client::run(&socket, name, args, json) {
                Ok(Outcome::Done) => return ExitCode::SUCCESS,
                Ok(Outcome::Refused) => return ExitCode::FAILURE,
                Err(err) => Err(err),
            }
        }
        Command::CheckConfig { file } => check_config(&file),
        Command::Detach {
            iface,
            config,
            pin_dir,
        } => detach(iface.as_deref(), config.as_deref(), pin_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => report(err),
    }
}

fn report(err: anyhow::Error) -> ExitCode {
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

fn run(args: RunArgs) -> anyhow::Result<()> {
    let raw = match &args.config {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    let mut c: Config = raw.clone().validate()?;
    if !args.ifaces.is_empty() {
        c.interfaces = args.ifaces;
    }
    if let Some(mode) = args.xdp_mode {
        c.xdp_mode = mode;
    }
    if !args.coap_listen.is_empty() {
        c.coap_listen = args.coap_listen;
    }
    if !args.coaps_listen.is_empty() {
        c.coaps_listen = args.coaps_listen;
    }
    if let Some(port) = c
        .coaps_ports()
        .into_iter()
        .find(|p| c.coap_ports().contains(p))
    {
        anyhow::bail!("port {port} is both a CoAP and a CoAPS listen port");
    }
    if let Some(addr) = args.mqtt_listen {
        c.mqtt.listen = addr;
    }
    if let Some(path) = args.control_socket {
        c.control.socket = path;
    }
    if let Some(addr) = args.metrics_listen {
        c.metrics_listen = addr;
    }
    daemon::run(c, raw, args.config)
}

/// The control request for a `ctl` command line.
fn ctl_request(command: CtlCommand) -> anyhow::Result<(&'static str, Value)> {
    Ok(match command {
        CtlCommand::Status => ("status", Value::Null),
        CtlCommand::Peer(PeerCommand::Add {
            name,
            prefixes,
            deny,
            rate,
            burst,
            topic,
            publish,
            subscribe,
            observe,
            endpoint,
            psk_identity,
            psk_hex,
            psk_file,
            cert_name,
            require_dtls,
        }) => {
            let mut args = json!({ "name": name, "prefix": prefixes, "deny": deny, "require_dtls": require_dtls });
            if let Some(identity) = psk_identity {
                args["psk_identity"] = json!(identity);
            }
            if let Some(hex) = psk_hex {
                args["psk_hex"] = json!(hex);
            }
            if let Some(cert_name) = cert_name {
                args["cert_name"] = json!(cert_name);
            }
            if let Some(file) = psk_file {
                // The daemon reads it: a relative path means nothing there.
                args["psk_file"] = json!(std::path::absolute(&file)?);
            }
            if !publish.is_empty() {
                args["publish"] = json!(publish);
            }
            if !subscribe.is_empty() {
                args["subscribe"] = json!(subscribe);
            }
            if !observe.is_empty() {
                args["observe"] = json!(observe);
            }
            if let Some(endpoint) = endpoint {
                args["endpoint"] = json!(endpoint);
            }
            if let Some(rate) = rate {
                args["rate"] = json!(rate);
            }
            if let Some(burst) = burst {
                args["burst"] = json!(burst);
            }
            if let Some(topic) = topic {
                args["topic"] = json!(topic);
            }
            ("peer.add", args)
        }
        CtlCommand::Peer(PeerCommand::Rm { name }) => ("peer.rm", json!({ "name": name })),
        CtlCommand::Peer(PeerCommand::Ls) => ("peer.ls", Value::Null),
        CtlCommand::Peer(PeerCommand::Import { file, replace }) => {
            // The file is a config fragment: its [[peer]] tables.
            let raw = ConfigFile::load(&file)?;
            (
                "peer.import",
                json!({ "peers": raw.peer, "replace": replace }),
            )
        }
        CtlCommand::Route(RouteCommand::Add {
            name,
            path_match,
            peer,
            method,
            topic,
            qos,
            retain,
        }) => {
            let mut args = json!({ "name": name, "match": path_match, "topic": topic, "qos": qos, "retain": retain });
            if let Some(peer) = peer {
                args["peer"] = json!(peer);
            }
            if let Some(method) = method {
                args["method"] = json!(method);
            }
            ("route.add", args)
        }
        CtlCommand::Route(RouteCommand::Rm { name }) => ("route.rm", json!({ "name": name })),
        CtlCommand::Route(RouteCommand::Ls) => ("route.ls", Value::Null),
        CtlCommand::Upstream(UpstreamCommand::Ls) => ("upstream.ls", Value::Null),
        CtlCommand::Observe(ObserveCommand::Ls) => ("observe.ls", Value::Null),
        CtlCommand::Dtls(DtlsCommand::Ls) => ("dtls.ls", Value::Null),
        CtlCommand::Stats { peer, watch } => {
            let mut args = json!({ "watch": watch });
            if let Some(peer) = peer {
                args["peer"] = json!(peer);
            }
            ("stats", args)
        }
        CtlCommand::Config(ConfigCommand::Save { path }) => match path {
            Some(path) => ("config.save", json!({ "path": path })),
            None => ("config.save", Value::Null),
        },
        CtlCommand::Config(ConfigCommand::Reload) => ("config.reload", Value::Null),
    })
}

fn detach(
    iface: Option<&str>,
    config: Option<&Path>,
    pin_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let root = match (pin_dir, config) {
        (Some(dir), _) => dir,
        (None, Some(file)) => Config::load(file)?.pin_dir,
        (None, None) => PathBuf::from(DEFAULT_PIN_DIR),
    };
    let pins = PinDir::for_this_netns(&root)?;
    let detached = pins.detach(iface)?;
    if detached.is_empty() {
        let which = iface.map_or("any interface".to_owned(), |i| i.to_owned());
        anyhow::bail!(
            "nothing persisted for {which} in {} (this network namespace)",
            pins.path().display()
        );
    }
    for (iface, mode) in detached {
        println!("detached XDP from {iface} ({mode})");
    }
    if !pins.path().exists() {
        println!("removed {} (maps and counters)", pins.path().display());
    }
    Ok(())
}

fn check_config(file: &Path) -> anyhow::Result<()> {
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
