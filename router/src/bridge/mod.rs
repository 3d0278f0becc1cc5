//! Upstream bridges (`[[upstream]]`): local messages matching the topic
//! filters are spooled (see `spool`) and forwarded at QoS 1 to an external
//! MQTT broker, reconnecting with capped exponential backoff and jitter.
//! A message leaves the spool only when the upstream has sent its PUBACK,
//! so an outage, a slow upstream or (with the disk spool) a router restart
//! loses nothing the router acknowledged.

pub mod spool;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, Instant};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::config::{Durability, Upstream};
use crate::mapping::MAX_TOPIC_BYTES;
use crate::mqtt::codec::{self, OutPublish, Properties, V311};
use crate::mqtt::topic;
use crate::mqtt::{Broker, Message, Sink, Ticket};
pub use spool::Spool;

/// QoS 1 messages in flight to the upstream.
const WINDOW: usize = 512;
const KEEP_ALIVE: u16 = 30;
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// The broker's handle on a bridge: which messages go, and where they wait.
pub struct Bridge {
    pub name: String,
    /// The broker origin of messages this bridge brings in (commands from
    /// upstream), so they are never sent back up.
    pub origin: Bytes,
    filters: Vec<Bytes>,
    /// `<command_prefix>/#`: downlink commands are for this gateway's
    /// devices and never go up. Forwarded, they came back through the
    /// subscription to upstream commands and ran twice (or, spooled, ran
    /// late whenever the bridge next connected).
    commands: Bytes,
    prefix: Bytes,
    pub spool: Arc<Spool>,
    pub connected: AtomicBool,
    pub connects: AtomicU64,
    pub sent: AtomicU64,
    /// Messages not forwarded: with the prefix, over MQTT's topic length.
    pub too_long: AtomicU64,
    /// For mqtts://: the TLS client and the name the certificate must carry.
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

/// A byte stream to the upstream: plain TCP or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// TLS client settings: the CAs of `ca_file`, else the system's roots.
fn tls_connector(cfg: &Upstream) -> std::io::Result<(TlsConnector, ServerName<'static>)> {
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    match &cfg.ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                std::io::Error::new(e.kind(), format!("reading ca_file {}: {e}", path.display()))
            })?;
            for cert in rustls_pemfile::certs(&mut &pem[..]) {
                roots
                    .add(cert?)
                    .map_err(|e| io_err(format!("ca_file {}: {e}", path.display())))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err(io_err(
            "no CA certificates to verify the upstream with (set ca_file)",
        ));
    }
    let config = tokio_rustls::rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(cfg.host.clone())
        .map_err(|e| io_err(format!("{:?} is not a TLS server name: {e}", cfg.host)))?;
    Ok((TlsConnector::from(Arc::new(config)), name))
}

impl Bridge {
    pub fn open(cfg: &Upstream, command_prefix: &str) -> std::io::Result<Arc<Bridge>> {
        let spool = match cfg.durability {
            Durability::Disk => Spool::open(&cfg.spool_dir, cfg.spool_max_bytes).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("opening the spool {}: {e}", cfg.spool_dir.display()),
                )
            })?,
            Durability::Memory => Spool::memory(cfg.spool_max_bytes),
        };
        let tls = if cfg.tls {
            Some(tls_connector(cfg)?)
        } else {
            None
        };
        Ok(Arc::new(Bridge {
            tls,
            origin: Bytes::from(format!("$bridge/{}", cfg.name)),
            name: cfg.name.clone(),
            filters: cfg.topics.iter().map(|t| Bytes::from(t.clone())).collect(),
            commands: Bytes::from(format!("{command_prefix}/#")),
            prefix: Bytes::from(cfg.prefix.clone()),
            spool: Arc::new(spool),
            connected: AtomicBool::new(false),
            connects: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            too_long: AtomicU64::new(0),
        }))
    }

    pub fn wants(&self, topic_name: &[u8]) -> bool {
        if topic::matches(&self.commands, topic_name)
            || !self.filters.iter().any(|f| topic::matches(f, topic_name))
        {
            return false;
        }
        // An MQTT client's topic may be too long to take the prefix; CoAP
        // topics are kept short enough by the mapping.
        if topic_name.len() + self.prefix.len() > MAX_TOPIC_BYTES {
            self.too_long.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }
}

/// The broker stages every message the bridge wants in its spool; the
/// spool's fdatasync is the commit.
impl Sink for Bridge {
    fn stage(&self, message: &Message, origin: Option<&[u8]>) -> std::io::Result<bool> {
        if origin == Some(&self.origin[..]) || !self.wants(&message.topic) {
            return Ok(false);
        }
        let upstream_topic = if self.prefix.is_empty() {
            message.topic.clone()
        } else {
            let mut t = BytesMut::with_capacity(self.prefix.len() + message.topic.len());
            t.put_slice(&self.prefix);
            t.put_slice(&message.topic);
            t.freeze()
        };
        self.spool
            .append_deferred(upstream_topic, message.payload.clone())?;
        Ok(self.spool.on_disk())
    }

    fn commit(&self) -> std::io::Result<()> {
        self.spool.sync()
    }

    fn failures(&self) -> u64 {
        self.spool.failures()
    }

    fn checkpoint(&self) -> std::io::Result<()> {
        self.spool.checkpoint()
    }
}

/// Keeps the bridge connected and forwarding, forever. Downlink commands
/// published upstream on `<prefix><command_prefix>/#` are brought in and
/// published locally, as if a local client had sent them.
pub async fn run(cfg: Upstream, bridge: Arc<Bridge>, broker: Arc<Broker>, command_prefix: String) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let started = Instant::now();
        match session(&cfg, &bridge, &broker, &command_prefix).await {
            Ok(()) => {}
            Err(err) => tracing::warn!(upstream = %cfg.name, %err, "upstream connection lost"),
        }
        bridge.connected.store(false, Ordering::Relaxed);
        if started.elapsed() > MAX_BACKOFF {
            backoff = FIRST_BACKOFF; // it worked for a while: start over
        }
        sleep(jitter(backoff)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Between 50% and 150% of `d`, so that many gateways do not reconnect in step.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    d.mul_f64(0.5 + f64::from(nanos % 1000) / 1000.0)
}

fn io_err(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::other(msg.into())
}

async fn session(
    cfg: &Upstream,
    bridge: &Bridge,
    broker: &Broker,
    command_prefix: &str,
) -> std::io::Result<()> {
    let tcp = timeout(Duration::from_secs(5), TcpStream::connect(&cfg.address))
        .await
        .map_err(|_| io_err(format!("connecting to {} timed out", cfg.address)))??;
    tcp.set_nodelay(true)?;
    let mut stream: Box<dyn Io> = match &bridge.tls {
        Some((connector, name)) => Box::new(
            timeout(
                Duration::from_secs(10),
                connector.connect(name.clone(), tcp),
            )
            .await
            .map_err(|_| io_err("TLS handshake timed out"))??,
        ),
        None => Box::new(tcp),
    };
    let mut out = BytesMut::with_capacity(64 * 1024);
    connect_packet(&mut out, cfg);
    stream.write_all(&out).await?;
    out.clear();
    let mut inbuf = BytesMut::with_capacity(4096);
    match timeout(
        Duration::from_secs(10),
        read_packet(&mut stream, &mut inbuf),
    )
    .await
    {
        Ok(Ok((0x20, body))) if body.len() >= 2 && body[1] == 0 => {}
        Ok(Ok((0x20, body))) => {
            return Err(io_err(format!(
                "upstream refused the connection (CONNACK code {})",
                body.get(1).copied().unwrap_or(255)
            )))
        }
        Ok(Ok(_)) => return Err(io_err("upstream sent no CONNACK")),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(io_err("no CONNACK within 10 s")),
    }
    bridge.connected.store(true, Ordering::Relaxed);
    bridge.connects.fetch_add(1, Ordering::Relaxed);
    let commands = format!("{}{command_prefix}/#", cfg.prefix);
    subscribe_packet(&mut out, &commands);
    tracing::info!(upstream = %cfg.name, address = %cfg.address, pending = bridge.spool.pending(0, usize::MAX).len(), "upstream connected");

    // Everything not yet acknowledged goes (again) on a new connection.
    let mut last_sent = bridge.spool.done_through();
    let mut inflight: VecDeque<(u16, u64)> = VecDeque::with_capacity(WINDOW);
    let mut next_id: u16 = 1;
    let mut last_traffic = Instant::now();
    let empty = Properties::default();
    loop {
        if inflight.len() < WINDOW {
            let batch = bridge.spool.pending(last_sent, WINDOW - inflight.len());
            bridge.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
            for record in batch {
                let id = next_id;
                next_id = next_id.wrapping_add(1).max(1);
                codec::publish_packet(
                    &mut out,
                    V311,
                    &OutPublish {
                        topic: &record.topic,
                        payload: &record.payload,
                        qos: 1,
                        retain: false,
                        dup: false,
                        packet_id: id,
                        properties: &empty,
                        subscription_id: None,
                    },
                );
                inflight.push_back((id, record.seq));
                last_sent = record.seq;
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
            last_traffic = Instant::now();
        }
        let ping_at = last_traffic + Duration::from_secs(u64::from(KEEP_ALIVE));
        tokio::select! {
            packet = read_packet(&mut stream, &mut inbuf) => {
                let (mut kind, mut body) = packet?;
                // Take every packet already buffered before writing again:
                // one write then carries the publishes they made room for.
                // (A bad one stays in the buffer for read_packet to refuse.)
                let mut staged = None;
                loop {
                    let ticket = on_packet(kind, body, &mut inflight, &mut out, &cfg.prefix, bridge, broker);
                    staged = staged.or(ticket);
                    match next_frame(&mut inbuf) {
                        Frame::Whole(k, b) => (kind, body) = (k, b),
                        _ => break,
                    }
                }
                // The commands' PUBACKs in `out` go only once they are durable.
                if let Some(ticket) = staged {
                    broker.commit_async(ticket).await?;
                }
            }
            _ = bridge.spool.appended.notified(), if inflight.len() < WINDOW => {}
            _ = sleep(Duration::from_millis(200)) => {}
            _ = tokio::time::sleep_until(ping_at) => {
                out.put_slice(&[0xc0, 0]);
            }
        }
    }
}

/// One packet from the upstream: a PUBACK frees its window slot and
/// releases the spool record; a PUBLISH is a command coming in. A ticket
/// if a command was staged in a sink and must be committed before its
/// PUBACK (in `out`) is sent.
fn on_packet(
    kind: u8,
    mut body: Bytes,
    inflight: &mut VecDeque<(u16, u64)>,
    out: &mut BytesMut,
    prefix: &str,
    bridge: &Bridge,
    broker: &Broker,
) -> Option<Ticket> {
    if kind >> 4 == 4 && body.len() >= 2 {
        let id = body.get_u16();
        // The broker acknowledges in order (MQTT 3.1.1 section 4.6), so
        // the match is nearly always at the front.
        if let Some(i) = inflight.iter().position(|(pid, _)| *pid == id) {
            if let Some((_, seq)) = inflight.remove(i) {
                bridge.spool.ack(seq);
            }
        }
    } else if kind >> 4 == 3 {
        if let Some((ack_id, staged)) = bring_in(kind, body, prefix, bridge, broker) {
            if let Some(id) = ack_id {
                out.put_u8(0x40);
                out.put_u8(2);
                out.put_u16(id);
            }
            return staged;
        }
    }
    None
}

/// A PUBLISH from the upstream (a command): published locally without its
/// prefix. Returns the packet id to acknowledge (QoS 1) once it is in, and
/// whether it awaits a commit; None if it was not taken.
fn bring_in(
    first: u8,
    body: Bytes,
    prefix: &str,
    bridge: &Bridge,
    broker: &Broker,
) -> Option<(Option<u16>, Option<Ticket>)> {
    let command = parse_command(first, body, prefix)?;
    let message = crate::mqtt::Message {
        topic: command.topic,
        payload: command.payload,
        qos: command.qos.min(1),
        retain: false,
        content_type: None,
        properties: None,
    };
    match broker.publish_deferred(message, Some(&bridge.origin)) {
        Ok(staged) => Some((command.packet_id, staged)),
        Err(err) => {
            tracing::warn!(%err, "a command from upstream could not be published");
            None
        }
    }
}

/// A command from the upstream, its topic without the bridge's prefix.
#[derive(Debug)]
pub struct Command {
    pub topic: Bytes,
    pub payload: Bytes,
    pub qos: u8,
    pub packet_id: Option<u16>,
}

/// Reads an MQTT 3.1.1 PUBLISH body (section 3.3) from the upstream; None
/// if it is malformed, its topic is not UTF-8, or it lies outside `prefix`.
pub fn parse_command(first: u8, mut body: Bytes, prefix: &str) -> Option<Command> {
    let qos = (first >> 1) & 3;
    if body.len() < 2 {
        return None;
    }
    let tlen = usize::from(body.get_u16());
    if body.len() < tlen + if qos > 0 { 2 } else { 0 } {
        return None;
    }
    let topic_name = body.split_to(tlen);
    let packet_id = if qos > 0 { Some(body.get_u16()) } else { None };
    let topic = topic_name
        .strip_prefix(prefix.as_bytes())
        .map(|t| topic_name.slice_ref(t))?;
    std::str::from_utf8(&topic).ok()?;
    Some(Command {
        topic,
        payload: body,
        qos,
        packet_id,
    })
}

fn subscribe_packet(out: &mut BytesMut, filter: &str) {
    out.put_u8(0x82);
    put_remaining_length(out, 2 + 2 + filter.len() + 1);
    out.put_u16(1);
    out.put_u16(filter.len() as u16);
    out.put_slice(filter.as_bytes());
    out.put_u8(1);
}

fn connect_packet(out: &mut BytesMut, cfg: &Upstream) {
    let mut body = BytesMut::new();
    body.put_slice(&[0, 4, b'M', b'Q', b'T', b'T', V311]);
    let mut flags = 0x02; // clean session: unacknowledged messages come from the spool
    if cfg.username.is_some() {
        flags |= 0x80 | 0x40;
    }
    body.put_u8(flags);
    body.put_u16(KEEP_ALIVE);
    body.put_u16(cfg.client_id.len() as u16);
    body.put_slice(cfg.client_id.as_bytes());
    if let (Some(u), Some(p)) = (&cfg.username, &cfg.password) {
        body.put_u16(u.len() as u16);
        body.put_slice(u.as_bytes());
        body.put_u16(p.len() as u16);
        body.put_slice(p.as_bytes());
    }
    out.put_u8(0x10);
    put_remaining_length(out, body.len());
    out.put_slice(&body);
}

fn put_remaining_length(out: &mut BytesMut, mut len: usize) {
    loop {
        let mut b = (len & 0x7f) as u8;
        len >>= 7;
        if len > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if len == 0 {
            break;
        }
    }
}

/// The largest packet taken from an upstream: a command and its payload.
/// A longer one ends the connection instead of growing the buffer to the
/// 256 MiB MQTT allows.
pub const MAX_UPSTREAM_PACKET: usize = 1 << 20;

/// Reads one packet from the upstream: (first byte, body).
async fn read_packet<S: AsyncRead + Unpin + ?Sized>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> std::io::Result<(u8, Bytes)> {
    loop {
        match next_frame(buf) {
            Frame::Whole(first, body) => return Ok((first, body)),
            Frame::Malformed => return Err(io_err("malformed remaining length from the upstream")),
            Frame::TooLarge(len) => {
                return Err(io_err(format!(
                    "a {len}-byte packet from the upstream (at most {MAX_UPSTREAM_PACKET})"
                )))
            }
            Frame::Partial => {}
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(io_err("upstream closed the connection"));
        }
    }
}

/// What the front of the receive buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A whole packet, taken out of the buffer: first byte and body.
    Whole(u8, Bytes),
    /// Not all of it yet.
    Partial,
    /// A remaining length over 4 bytes (MQTT 3.1.1 section 2.2.3).
    Malformed,
    /// Announces more than [`MAX_UPSTREAM_PACKET`] bytes.
    TooLarge(usize),
}

/// The first packet in `buf`, taken out of it once it is whole.
pub fn next_frame(buf: &mut BytesMut) -> Frame {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Frame::Partial;
        };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if len > MAX_UPSTREAM_PACKET {
                return Frame::TooLarge(len);
            }
            let header = 2 + i;
            if buf.len() < header + len {
                return Frame::Partial;
            }
            let first = buf[0];
            let mut frame = buf.split_to(header + len).freeze();
            frame.advance(header);
            return Frame::Whole(first, frame);
        }
    }
    Frame::Malformed
}
