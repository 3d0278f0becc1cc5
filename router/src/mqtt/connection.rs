//! One MQTT client connection: CONNECT, then packets in and deliveries out
//! until the client leaves, breaks the protocol, misses its keep-alive or is
//! taken over by a newer connection with the same client id.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use super::broker::{Attached, Broker, BrokerStats, Delivery, Message};
use super::codec::{self, CodecError, Connect, OutProps, OutPublish, Packet, Publish, V311, V5};
use super::topic;

/// How long a new connection has to send CONNECT, and the most it may
/// send before it: memory a client holds before it has authenticated is
/// bounded by `max_connections` x this (MQTT 3.1.1 section 3.1.4 lets
/// the server close a connection that does not CONNECT in reasonable time).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECT_BYTES: usize = 64 * 1024;
/// Output a connection may hold before it stops taking deliveries and
/// reading requests: a client that does not read cannot grow it further,
/// and its unanswered packets let its keep-alive run out.
const OUT_HIGH_WATER: usize = 64 * 1024;
static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

/// Why a connection ended.
enum End {
    /// DISCONNECT with reason 0: no will message.
    Normal,
    Closed,
    Error(CodecError),
    KeepAlive,
    TakenOver,
    /// A publish could not be stored (a sink refused it or its commit
    /// failed): the client is disconnected unacknowledged, so that it
    /// reconnects and sends it again (MQTT 4.4), and nothing is lost.
    Unavailable,
}

pub async fn serve(mut stream: TcpStream, broker: Arc<Broker>) {
    let _ = stream.set_nodelay(true);
    // Counted when this task ends, however it ends, after the session was
    // detached (locals drop in reverse order): tests and operators can wait
    // for "the connection is gone" instead of guessing.
    struct Ended<'a>(&'a BrokerStats);
    impl Drop for Ended<'_> {
        fn drop(&mut self) {
            self.0.closed.fetch_add(1, Ordering::Release);
        }
    }
    let _ended = Ended(&broker.stats);
    let mut inbuf = BytesMut::with_capacity(4096);
    let mut out = BytesMut::with_capacity(4096);
    let connect = match timeout(
        CONNECT_TIMEOUT,
        read_connect(&mut stream, &mut inbuf, &broker),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(err)) => {
            broker.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            // A bad protocol version still gets its CONNACK (3.1.1: 0x01).
            if let CodecError::UnsupportedVersion(v) = err {
                let (version, code) = if v == V5 { (V5, 0x84) } else { (V311, 0x01) };
                codec::connack(&mut out, version, false, code, &OutProps::default());
                let _ = stream.write_all(&out).await;
            }
            return;
        }
        Err(_) => return,
    };
    let version = connect.version;
    if let Some(code) = refuse(&connect, &broker) {
        codec::connack(&mut out, version, false, code, &OutProps::default());
        let _ = stream.write_all(&out).await;
        return;
    }
    let (client_id, assigned) = if connect.client_id.is_empty() {
        let id = format!("m2m-auto-{}", NEXT_CLIENT.fetch_add(1, Ordering::Relaxed));
        (Bytes::from(id), true)
    } else {
        (connect.client_id.clone(), false)
    };
    // 3.1.1: Clean Session 0 keeps the session; 5: a Session Expiry > 0 does.
    let persistent = match version {
        V5 => connect.properties.session_expiry.unwrap_or(0) > 0,
        _ => !connect.clean_start,
    };
    let Some(attached) = broker
        .attach(&client_id, connect.clean_start, persistent)
        .await
    else {
        codec::connack(
            &mut out,
            version,
            false,
            if version == V5 { 0x89 } else { 0x03 },
            &OutProps::default(),
        );
        let _ = stream.write_all(&out).await;
        return;
    };
    let mut props = OutProps::default();
    if assigned {
        props.bytes(0x12, &client_id);
    }
    props.byte(0x24, 1); // Maximum QoS 1
    props.u32(0x27, broker.config.max_packet_size as u32);
    props.byte(0x2A, 0); // no shared subscriptions
    codec::connack(&mut out, version, attached.session_present, 0, &props);
    drop(props);
    let mut conn = Connection {
        version,
        broker: broker.clone(),
        keep_alive: Duration::from_secs(u64::from(connect.keep_alive)),
        client_max_packet: connect.properties.maximum_packet_size.unwrap_or(u32::MAX) as usize,
        receive_max: usize::from(connect.properties.receive_maximum.unwrap_or(u16::MAX))
            .min(broker.config.max_inflight)
            .max(1),
        inflight: VecDeque::new(),
        next_id: 1,
        qos2_received: HashSet::new(),
        out,
        staged: None,
    };
    let Attached { session, .. } = attached;
    let end = conn.run(&mut stream, &mut inbuf, &session).await;
    // The last DISCONNECT is written only if the socket takes it now: a
    // client that does not read must not hold this task and its session.
    if let End::Error(e) = &end {
        broker.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
        if version == V5 {
            conn.out.clear();
            codec::disconnect(&mut conn.out, e.reason_code());
            let _ = stream.try_write(&conn.out);
        }
    }
    let reason = match end {
        End::TakenOver => Some(0x8E),   // session taken over
        End::Unavailable => Some(0x89), // server busy
        _ => None,
    };
    if let (Some(reason), V5) = (reason, version) {
        conn.out.clear();
        codec::disconnect(&mut conn.out, reason);
        let _ = stream.try_write(&conn.out);
    }
    if !matches!(end, End::Normal) {
        if let Some(will) = &connect.will {
            // Nobody waits for a will: the writer thread commits it.
            let _ = broker.publish_deferred(
                Message {
                    topic: will.topic.clone(),
                    payload: will.payload.clone(),
                    qos: will.qos.min(1),
                    retain: will.retain,
                    content_type: will.properties.content_type.clone(),
                    properties: None,
                },
                Some(&client_id),
            );
        }
    }
    let unacked = conn.inflight.into_iter().map(|(_, d)| d).collect();
    broker.detach(&session, unacked);
}

async fn read_connect(
    stream: &mut TcpStream,
    inbuf: &mut BytesMut,
    broker: &Broker,
) -> Result<Connect, CodecError> {
    loop {
        let limit = broker.config.max_packet_size.min(MAX_CONNECT_BYTES);
        if let Some(packet) = codec::decode(inbuf, 0, limit)? {
            return match packet {
                Packet::Connect(c) => Ok(*c),
                _ => Err(CodecError::Protocol("the first packet must be CONNECT")),
            };
        }
        match stream.read_buf(inbuf).await {
            Ok(0) | Err(_) => return Err(CodecError::Protocol("closed before CONNECT")),
            Ok(_) => {}
        }
    }
}

/// A CONNACK refusal code, if the client may not connect.
fn refuse(c: &Connect, broker: &Broker) -> Option<u8> {
    let v5 = c.version == V5;
    if c.client_id.is_empty() && !c.clean_start && !v5 {
        return Some(0x02); // 3.1.1: identifier rejected
    }
    if c.properties.authentication_method.is_some() {
        return Some(0x8C); // v5: bad authentication method
    }
    if let Some(want) = &broker.config.username {
        let user_ok = c.username.as_deref() == Some(want.as_bytes());
        let pass_ok = c.password.as_deref() == broker.config.password.as_deref().map(str::as_bytes);
        if !(user_ok && pass_ok) {
            return Some(if v5 { 0x86 } else { 0x04 });
        }
    }
    None
}

struct Connection {
    version: u8,
    broker: Arc<Broker>,
    keep_alive: Duration,
    client_max_packet: usize,
    receive_max: usize,
    inflight: VecDeque<(u16, Delivery)>,
    next_id: u16,
    qos2_received: HashSet<u16>,
    out: BytesMut,
    /// A publish acknowledged in `out` was staged in a sink: `out` waits
    /// for the commit.
    staged: Option<super::Ticket>,
}

impl Connection {
    async fn run(
        &mut self,
        stream: &mut TcpStream,
        inbuf: &mut BytesMut,
        session: &Arc<super::broker::Session>,
    ) -> End {
        // Section 3.1.2.10 (both versions): 1.5 keep-alive periods of silence.
        let grace = self.keep_alive + self.keep_alive / 2;
        let mut deadline = Instant::now() + grace;
        loop {
            // Packets already buffered come first: CONNECT may have arrived
            // together with what followed it.
            loop {
                match codec::decode(inbuf, self.version, self.broker.config.max_packet_size) {
                    Ok(Some(packet)) => {
                        if let Some(end) = self.handle(packet, session) {
                            return end;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return End::Error(e),
                }
            }
            // One commit for every publish just read, on the writer thread:
            // a slow disk delays this client's acknowledgements, nobody else.
            if let Some(ticket) = self.staged.take() {
                if self.broker.commit_async(ticket).await.is_err() {
                    return End::Unavailable;
                }
            }
            // Writing is one branch among the others, never a wait of its
            // own: a client that stops reading still meets its keep-alive
            // and can be taken over (a blocked write_all would hold both).
            let writing = !self.out.is_empty();
            let room = self.out.len() < OUT_HIGH_WATER;
            let can_send = room && self.inflight.len() < self.receive_max;
            let (mut reader, mut writer) = stream.split();
            tokio::select! {
                written = writer.write_buf(&mut self.out), if writing => {
                    if matches!(written, Ok(0) | Err(_)) {
                        return End::Closed;
                    }
                }
                read = reader.read_buf(inbuf), if room => {
                    match read {
                        Ok(0) | Err(_) => return End::Closed,
                        Ok(_) => {}
                    }
                    deadline = Instant::now() + grace;
                }
                delivery = session.queue.pop(), if can_send => {
                    self.send(delivery);
                    // Drain what is already queued into the same write.
                    while self.inflight.len() < self.receive_max && self.out.len() < OUT_HIGH_WATER {
                        match session.queue.try_pop() {
                            Some(d) => self.send(d),
                            None => break,
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline), if !self.keep_alive.is_zero() => return End::KeepAlive,
                _ = session.takeover.notified() => return End::TakenOver,
            }
        }
    }

    /// Handles one packet; `Some` ends the connection.
    fn handle(&mut self, packet: Packet, session: &Arc<super::broker::Session>) -> Option<End> {
        let v = self.version;
        match packet {
            Packet::Publish(p) => return self.publish(p, session),
            Packet::PubAck(id) => {
                if let Some(i) = self.inflight.iter().position(|(pid, _)| *pid == id) {
                    self.inflight.remove(i);
                }
            }
            Packet::PubRel(id) => {
                self.qos2_received.remove(&id);
                codec::ack_packet(&mut self.out, v, 7, id, 0);
            }
            // We never send QoS 2, so PUBREC/PUBCOMP from a client are stray.
            Packet::PubRec(_) | Packet::PubComp(_) => {}
            Packet::Subscribe {
                packet_id,
                subscription_id,
                filters,
            } => {
                let mut codes = Vec::with_capacity(filters.len());
                let mut retained = Vec::new();
                for (filter, mut options) in filters {
                    if !topic::valid_filter(&filter) {
                        codes.push(if v == V5 { 0x8F } else { 0x80 });
                    } else if filter.starts_with(b"$share/") {
                        codes.push(if v == V5 { 0x9E } else { 0x80 });
                    } else {
                        options.qos = options.qos.min(1);
                        let granted = options.qos;
                        match self
                            .broker
                            .subscribe(session, filter, options, subscription_id)
                        {
                            Some(messages) => {
                                codes.push(granted);
                                retained.extend(messages.into_iter().map(|m| (m, granted)));
                            }
                            // MQTT 5: 0x97 Quota exceeded.
                            None => codes.push(if v == V5 { 0x97 } else { 0x80 }),
                        }
                    }
                }
                codec::suback(&mut self.out, v, packet_id, &codes);
                for (message, granted) in retained {
                    self.send(Delivery {
                        qos: message.qos.min(granted),
                        retain: true,
                        subscription_id,
                        dup: false,
                        message,
                    });
                }
            }
            Packet::Unsubscribe { packet_id, filters } => {
                let codes: Vec<u8> = filters
                    .iter()
                    .map(|f| {
                        if self.broker.unsubscribe(session, f) {
                            0x00
                        } else {
                            0x11
                        }
                    })
                    .collect();
                codec::unsuback(&mut self.out, v, packet_id, &codes);
            }
            Packet::PingReq => codec::pingresp(&mut self.out),
            Packet::Disconnect { reason, .. } => {
                return Some(if reason == 0 {
                    End::Normal
                } else {
                    End::Closed
                });
            }
            Packet::Auth => return Some(End::Error(CodecError::Protocol("AUTH without a method"))),
            Packet::Connect(_) => return Some(End::Error(CodecError::Protocol("second CONNECT"))),
        }
        None
    }

    fn publish(&mut self, p: Publish, session: &Arc<super::broker::Session>) -> Option<End> {
        if p.properties.topic_alias.is_some() {
            // We announce Topic Alias Maximum 0 (the default).
            return Some(End::Error(CodecError::Protocol("topic alias not allowed")));
        }
        if p.qos == 2 && !self.qos2_received.insert(p.packet_id) {
            // Retransmitted QoS 2 publish: already routed, only re-acknowledge.
            codec::ack_packet(&mut self.out, self.version, 5, p.packet_id, 0);
            return None;
        }
        let has_props = p.properties != Default::default();
        let message = Message {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos.min(1),
            retain: p.retain,
            content_type: p.properties.content_type.clone(),
            properties: has_props.then(|| Arc::new(p.properties)),
        };
        match self
            .broker
            .publish_deferred(message, Some(&session.client_id))
        {
            // Only an acknowledgement waits for the disk: a QoS 0 message is
            // committed by the writer thread's next round.
            Ok(ticket) if p.qos > 0 => self.staged = self.staged.or(ticket),
            Ok(_) => {}
            // Not stored (the sink logs why): unacknowledged, see End::Unavailable.
            Err(_) => return Some(End::Unavailable),
        }
        match p.qos {
            1 => codec::ack_packet(&mut self.out, self.version, 4, p.packet_id, 0),
            2 => codec::ack_packet(&mut self.out, self.version, 5, p.packet_id, 0),
            _ => {}
        }
        None
    }

    /// Encodes a delivery; QoS 1 ones wait in `inflight` for their PUBACK.
    fn send(&mut self, d: Delivery) {
        let packet_id = if d.qos > 0 { self.next_packet_id() } else { 0 };
        let empty = Default::default();
        let properties = d.message.properties.as_deref().unwrap_or(&empty);
        let merged;
        let properties = match (&d.message.content_type, properties.content_type.is_none()) {
            (Some(ct), true) => {
                merged = codec::Properties {
                    content_type: Some(ct.clone()),
                    ..properties.clone()
                };
                &merged
            }
            _ => properties,
        };
        let before = self.out.len();
        codec::publish_packet(
            &mut self.out,
            self.version,
            &OutPublish {
                topic: &d.message.topic,
                payload: &d.message.payload,
                qos: d.qos,
                retain: d.retain,
                dup: d.dup,
                packet_id,
                properties,
                subscription_id: d.subscription_id,
            },
        );
        if self.out.len() - before > self.client_max_packet {
            // MQTT 5 section 3.1.2.11.4: too big for the client: discard.
            self.out.truncate(before);
            return;
        }
        if d.qos > 0 {
            self.inflight.push_back((packet_id, d));
        }
    }

    fn next_packet_id(&mut self) -> u16 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if !self.inflight.iter().any(|(pid, _)| *pid == id) {
                return id;
            }
        }
    }
}
