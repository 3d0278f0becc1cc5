//! MQTT 3.1.1 and 5.0 wire format, server side: decodes what clients send,
//! encodes what a broker sends. Payloads and strings are `Bytes` slices of
//! the received frame (no copy).
//!
//! Written here rather than taken from a crate: the codecs on crates.io
//! either cover one version only, are unmaintained, or own their strings
//! (`String` topics), which would cost an allocation per delivery; the
//! broker encodes one shared `Message` for every subscriber.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

pub const V311: u8 = 4;
pub const V5: u8 = 5;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("packet of {0} bytes exceeds the maximum packet size")]
    TooLarge(usize),
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
}

impl CodecError {
    /// MQTT 5 reason code for a DISCONNECT or CONNACK (section 2.4).
    pub fn reason_code(&self) -> u8 {
        match self {
            CodecError::Malformed(_) => 0x81,
            CodecError::Protocol(_) => 0x82,
            CodecError::TooLarge(_) => 0x95,
            CodecError::UnsupportedVersion(_) => 0x84,
        }
    }
}

type Result<T> = std::result::Result<T, CodecError>;

/// MQTT 5 properties the broker understands or forwards.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format: Option<u8>,
    pub message_expiry: Option<u32>,
    pub content_type: Option<Bytes>,
    pub response_topic: Option<Bytes>,
    pub correlation_data: Option<Bytes>,
    pub subscription_ids: Vec<u32>,
    pub session_expiry: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_packet_size: Option<u32>,
    pub user_properties: Vec<(Bytes, Bytes)>,
    pub authentication_method: Option<Bytes>,
    pub reason_string: Option<Bytes>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Will {
    pub topic: Bytes,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    pub version: u8,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub client_id: Bytes,
    pub username: Option<Bytes>,
    pub password: Option<Bytes>,
    pub will: Option<Will>,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    pub topic: Bytes,
    pub packet_id: u16,
    pub properties: Properties,
    pub payload: Bytes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubscriptionOptions {
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
}

// Publish is by far the most frequent packet: boxing it to shrink the enum
// would add an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    Publish(Publish),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        packet_id: u16,
        subscription_id: Option<u32>,
        filters: Vec<(Bytes, SubscriptionOptions)>,
    },
    Unsubscribe {
        packet_id: u16,
        filters: Vec<Bytes>,
    },
    PingReq,
    Disconnect {
        reason: u8,
        session_expiry: Option<u32>,
    },
    Auth,
}

/// Decodes one client-to-server packet from the front of `buf`.
/// `version` is 0 until CONNECT has been read. `Ok(None)`: need more bytes.
pub fn decode(buf: &mut BytesMut, version: u8, max_size: usize) -> Result<Option<Packet>> {
    // Refuse a wrong first packet at its first byte: garbage (an HTTP request,
    // say) could otherwise announce a length and keep us waiting for it.
    if version == 0 && buf.first().is_some_and(|b| b >> 4 != 1) {
        return Err(CodecError::Protocol("the first packet must be CONNECT"));
    }
    let Some((header_len, body_len)) = frame_length(buf)? else {
        return Ok(None);
    };
    let total = header_len + body_len;
    if total > max_size {
        return Err(CodecError::TooLarge(total));
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let first = buf[0];
    // A copy of its own: what outlives the packet (a retained payload, a
    // queued message) must not keep the whole receive buffer alive.
    let mut frame = Bytes::copy_from_slice(&buf[..total]);
    buf.advance(total);
    frame.advance(header_len);
    let mut r = Reader(frame);
    let (kind, flags) = (first >> 4, first & 0x0f);
    if version == 0 && kind != 1 {
        return Err(CodecError::Protocol("the first packet must be CONNECT"));
    }
    let fixed_flags = |expected: u8| {
        if flags == expected {
            Ok(())
        } else {
            Err(CodecError::Malformed("reserved fixed-header flags"))
        }
    };
    let packet = match kind {
        1 => {
            fixed_flags(0)?;
            if version != 0 {
                return Err(CodecError::Protocol("second CONNECT"));
            }
            Packet::Connect(Box::new(connect(&mut r)?))
        }
        3 => Packet::Publish(publish(&mut r, flags, version)?),
        4 | 5 | 7 => {
            fixed_flags(0)?;
            let id = ack(&mut r, version)?;
            match kind {
                4 => Packet::PubAck(id),
                5 => Packet::PubRec(id),
                _ => Packet::PubComp(id),
            }
        }
        6 => {
            fixed_flags(2)?;
            Packet::PubRel(ack(&mut r, version)?)
        }
        8 => {
            fixed_flags(2)?;
            subscribe(&mut r, version)?
        }
        10 => {
            fixed_flags(2)?;
            let packet_id = r.u16()?;
            if version == V5 {
                read_properties(&mut r)?;
            }
            let mut filters = Vec::new();
            while r.remaining() > 0 {
                filters.push(r.string()?);
            }
            if filters.is_empty() {
                return Err(CodecError::Protocol("UNSUBSCRIBE without topic filters"));
            }
            Packet::Unsubscribe { packet_id, filters }
        }
        12 => {
            fixed_flags(0)?;
            Packet::PingReq
        }
        14 => {
            fixed_flags(0)?;
            let (reason, props) = if version == V5 && r.remaining() > 0 {
                let reason = r.u8()?;
                let props = if r.remaining() > 0 {
                    read_properties(&mut r)?
                } else {
                    Properties::default()
                };
                (reason, props)
            } else {
                (0, Properties::default())
            };
            Packet::Disconnect {
                reason,
                session_expiry: props.session_expiry,
            }
        }
        15 if version == V5 => Packet::Auth,
        _ => return Err(CodecError::Protocol("packet type not sent by clients")),
    };
    if r.remaining() != 0 && !matches!(packet, Packet::Publish(_)) {
        return Err(CodecError::Malformed("bytes after the end of the packet"));
    }
    Ok(Some(packet))
}

/// (fixed header length, remaining length), or None if incomplete.
fn frame_length(buf: &[u8]) -> Result<Option<(usize, usize)>> {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((2 + i, len)));
        }
    }
    Err(CodecError::Malformed(
        "remaining length longer than 4 bytes",
    ))
}

struct Reader(Bytes);

impl Reader {
    fn remaining(&self) -> usize {
        self.0.len()
    }

    fn need(&self, n: usize) -> Result<()> {
        if self.0.len() < n {
            Err(CodecError::Malformed("packet shorter than its fields"))
        } else {
            Ok(())
        }
    }

    fn u8(&mut self) -> Result<u8> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }

    fn u16(&mut self) -> Result<u16> {
        self.need(2)?;
        Ok(self.0.get_u16())
    }

    fn u32(&mut self) -> Result<u32> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }

    fn varint(&mut self) -> Result<u32> {
        let mut v = 0u32;
        for i in 0..4 {
            let b = self.u8()?;
            v |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(CodecError::Malformed(
            "variable byte integer longer than 4 bytes",
        ))
    }

    fn binary(&mut self) -> Result<Bytes> {
        let len = usize::from(self.u16()?);
        self.need(len)?;
        Ok(self.0.split_to(len))
    }

    /// A UTF-8 string without NUL (sections 1.5.4 of both versions).
    fn string(&mut self) -> Result<Bytes> {
        let s = self.binary()?;
        if std::str::from_utf8(&s).is_err() || s.contains(&0) {
            return Err(CodecError::Malformed("invalid UTF-8 string"));
        }
        Ok(s)
    }

    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.0)
    }
}

fn read_properties(r: &mut Reader) -> Result<Properties> {
    let len = r.varint()? as usize;
    r.need(len)?;
    let mut p = Reader(r.0.split_to(len));
    let mut props = Properties::default();
    while p.remaining() > 0 {
        match p.varint()? {
            0x01 => props.payload_format = Some(p.u8()?),
            0x02 => props.message_expiry = Some(p.u32()?),
            0x03 => props.content_type = Some(p.string()?),
            0x08 => props.response_topic = Some(p.string()?),
            0x09 => props.correlation_data = Some(p.binary()?),
            0x0B => props.subscription_ids.push(p.varint()?),
            0x11 => props.session_expiry = Some(p.u32()?),
            0x15 => props.authentication_method = Some(p.string()?),
            0x16 => {
                p.binary()?;
            }
            0x17 | 0x19 => {
                p.u8()?;
            }
            0x18 => {
                p.u32()?;
            }
            0x1F => props.reason_string = Some(p.string()?),
            0x21 => props.receive_maximum = Some(p.u16()?),
            0x22 => props.topic_alias_maximum = Some(p.u16()?),
            0x23 => props.topic_alias = Some(p.u16()?),
            0x26 => {
                let k = p.string()?;
                let v = p.string()?;
                props.user_properties.push((k, v));
            }
            0x27 => props.maximum_packet_size = Some(p.u32()?),
            _ => return Err(CodecError::Malformed("unknown property")),
        }
    }
    Ok(props)
}

fn connect(r: &mut Reader) -> Result<Connect> {
    let name = r.binary()?;
    let version = r.u8()?;
    if &name[..] != b"MQTT" {
        // MQTT 3.1 says "MQIsdp"; answered with "unacceptable protocol version".
        return Err(CodecError::UnsupportedVersion(version));
    }
    if version != V311 && version != V5 {
        return Err(CodecError::UnsupportedVersion(version));
    }
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(CodecError::Malformed("reserved CONNECT flag set"));
    }
    let keep_alive = r.u16()?;
    let properties = if version == V5 {
        read_properties(r)?
    } else {
        Properties::default()
    };
    let client_id = r.string()?;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(CodecError::Malformed("will QoS or retain without a will"));
    }
    if will_qos > 2 {
        return Err(CodecError::Malformed("will QoS 3"));
    }
    let will = if will_flag {
        let properties = if version == V5 {
            read_properties(r)?
        } else {
            Properties::default()
        };
        let topic = r.string()?;
        if topic.is_empty()
            || topic.iter().any(|&b| b == b'+' || b == b'#')
            || !super::topic::within_levels(&topic)
        {
            return Err(CodecError::Malformed("invalid will topic"));
        }
        Some(Will {
            topic,
            payload: r.binary()?,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if flags & 0x80 != 0 {
        Some(r.string()?)
    } else {
        None
    };
    let password = if flags & 0x40 != 0 {
        Some(r.binary()?)
    } else {
        None
    };
    if version == V311 && password.is_some() && username.is_none() {
        return Err(CodecError::Malformed("password without user name"));
    }
    Ok(Connect {
        version,
        clean_start: flags & 0x02 != 0,
        keep_alive,
        client_id,
        username,
        password,
        will,
        properties,
    })
}

fn publish(r: &mut Reader, flags: u8, version: u8) -> Result<Publish> {
    let qos = (flags >> 1) & 0x03;
    if qos == 3 {
        return Err(CodecError::Malformed("QoS 3"));
    }
    let dup = flags & 0x08 != 0;
    if qos == 0 && dup {
        return Err(CodecError::Malformed("DUP set on QoS 0"));
    }
    let topic = r.string()?;
    if topic.iter().any(|&b| b == b'+' || b == b'#') {
        return Err(CodecError::Malformed("wildcard in a topic name"));
    }
    if !super::topic::within_levels(&topic) {
        return Err(CodecError::Malformed("a topic name with too many levels"));
    }
    let packet_id = if qos > 0 {
        match r.u16()? {
            0 => return Err(CodecError::Malformed("packet identifier 0")),
            id => id,
        }
    } else {
        0
    };
    let properties = if version == V5 {
        read_properties(r)?
    } else {
        Properties::default()
    };
    if topic.is_empty() && properties.topic_alias.is_none() {
        return Err(CodecError::Malformed("empty topic name"));
    }
    Ok(Publish {
        dup,
        qos,
        retain: flags & 0x01 != 0,
        topic,
        packet_id,
        properties,
        payload: r.rest(),
    })
}

fn ack(r: &mut Reader, version: u8) -> Result<u16> {
    let id = r.u16()?;
    if version == V5 && r.remaining() > 0 {
        r.u8()?; // reason code
        if r.remaining() > 0 {
            read_properties(r)?;
        }
    }
    Ok(id)
}

fn subscribe(r: &mut Reader, version: u8) -> Result<Packet> {
    let packet_id = r.u16()?;
    let subscription_id = if version == V5 {
        read_properties(r)?.subscription_ids.first().copied()
    } else {
        None
    };
    let mut filters = Vec::new();
    while r.remaining() > 0 {
        let filter = r.string()?;
        let o = r.u8()?;
        let reserved = if version == V5 { 0xc0 } else { 0xfc };
        if o & reserved != 0 || o & 0x03 == 3 || (o >> 4) & 0x03 == 3 {
            return Err(CodecError::Malformed("reserved subscription option bits"));
        }
        filters.push((
            filter,
            SubscriptionOptions {
                qos: o & 0x03,
                no_local: version == V5 && o & 0x04 != 0,
                retain_as_published: version == V5 && o & 0x08 != 0,
                retain_handling: if version == V5 { (o >> 4) & 0x03 } else { 0 },
            },
        ));
    }
    if filters.is_empty() {
        return Err(CodecError::Protocol("SUBSCRIBE without topic filters"));
    }
    Ok(Packet::Subscribe {
        packet_id,
        subscription_id,
        filters,
    })
}

// ---- Encoding --------------------------------------------------------------

fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_varint(out: &mut BytesMut, mut v: usize) {
    loop {
        let mut b = (v & 0x7f) as u8;
        v >>= 7;
        if v > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if v == 0 {
            break;
        }
    }
}

/// A length-prefixed string or binary (MQTT 5 section 1.5.4/1.5.6). Every
/// producer bounds its strings at 65,535 bytes (the mapping, the config,
/// the decoder); a longer one is a bug, never to be cut silently.
fn put_binary(out: &mut BytesMut, b: &[u8]) {
    let len = u16::try_from(b.len()).expect("MQTT strings are at most 65,535 bytes");
    out.put_u16(len);
    out.put_slice(b);
}

/// Properties the broker sends, as (id, value) encoders.
#[derive(Default)]
pub struct OutProps<'a> {
    items: Vec<(u8, OutValue<'a>)>,
}

enum OutValue<'a> {
    Byte(u8),
    U16(u16),
    U32(u32),
    Var(u32),
    Str(&'a [u8]),
    Pair(&'a [u8], &'a [u8]),
}

impl<'a> OutProps<'a> {
    pub fn byte(&mut self, id: u8, v: u8) -> &mut Self {
        self.items.push((id, OutValue::Byte(v)));
        self
    }
    pub fn u16(&mut self, id: u8, v: u16) -> &mut Self {
        self.items.push((id, OutValue::U16(v)));
        self
    }
    pub fn u32(&mut self, id: u8, v: u32) -> &mut Self {
        self.items.push((id, OutValue::U32(v)));
        self
    }
    pub fn varint(&mut self, id: u8, v: u32) -> &mut Self {
        self.items.push((id, OutValue::Var(v)));
        self
    }
    pub fn bytes(&mut self, id: u8, v: &'a [u8]) -> &mut Self {
        self.items.push((id, OutValue::Str(v)));
        self
    }

    fn len(&self) -> usize {
        self.items
            .iter()
            .map(|(_, v)| {
                1 + match v {
                    OutValue::Byte(_) => 1,
                    OutValue::U16(_) => 2,
                    OutValue::U32(_) => 4,
                    OutValue::Var(x) => varint_len(*x as usize),
                    OutValue::Str(s) => 2 + s.len(),
                    OutValue::Pair(k, v) => 4 + k.len() + v.len(),
                }
            })
            .sum()
    }

    fn put(&self, out: &mut BytesMut) {
        put_varint(out, self.len());
        for (id, v) in &self.items {
            out.put_u8(*id);
            match v {
                OutValue::Byte(x) => out.put_u8(*x),
                OutValue::U16(x) => out.put_u16(*x),
                OutValue::U32(x) => out.put_u32(*x),
                OutValue::Var(x) => put_varint(out, *x as usize),
                OutValue::Str(s) => put_binary(out, s),
                OutValue::Pair(k, v) => {
                    put_binary(out, k);
                    put_binary(out, v);
                }
            }
        }
    }

    fn encoded_len(&self) -> usize {
        let l = self.len();
        varint_len(l) + l
    }
}

pub fn connack(out: &mut BytesMut, version: u8, session_present: bool, code: u8, props: &OutProps) {
    let body = 2 + if version == V5 {
        props.encoded_len()
    } else {
        0
    };
    out.put_u8(0x20);
    put_varint(out, body);
    out.put_u8(u8::from(session_present));
    out.put_u8(code);
    if version == V5 {
        props.put(out);
    }
}

/// What a delivered PUBLISH carries (shared by every subscriber).
pub struct OutPublish<'a> {
    pub topic: &'a [u8],
    pub payload: &'a [u8],
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub packet_id: u16,
    pub properties: &'a Properties,
    pub subscription_id: Option<u32>,
}

pub fn publish_packet(out: &mut BytesMut, version: u8, p: &OutPublish) {
    let mut props = OutProps::default();
    if version == V5 {
        let m = p.properties;
        if let Some(v) = m.payload_format {
            props.byte(0x01, v);
        }
        if let Some(v) = m.message_expiry {
            props.u32(0x02, v);
        }
        if let Some(v) = &m.content_type {
            props.bytes(0x03, v);
        }
        if let Some(v) = &m.response_topic {
            props.bytes(0x08, v);
        }
        if let Some(v) = &m.correlation_data {
            props.bytes(0x09, v);
        }
        if let Some(id) = p.subscription_id {
            props.varint(0x0B, id);
        }
        for (k, v) in &m.user_properties {
            props.items.push((0x26, OutValue::Pair(k, v)));
        }
    }
    let body = 2
        + p.topic.len()
        + if p.qos > 0 { 2 } else { 0 }
        + if version == V5 {
            props.encoded_len()
        } else {
            0
        }
        + p.payload.len();
    out.reserve(5 + body);
    out.put_u8(0x30 | u8::from(p.dup) << 3 | p.qos << 1 | u8::from(p.retain));
    put_varint(out, body);
    put_binary(out, p.topic);
    if p.qos > 0 {
        out.put_u16(p.packet_id);
    }
    if version == V5 {
        props.put(out);
    }
    out.put_slice(p.payload);
}

/// PUBACK (4), PUBREC (5), PUBREL (6, flags 2) or PUBCOMP (7).
pub fn ack_packet(out: &mut BytesMut, version: u8, kind: u8, packet_id: u16, reason: u8) {
    let flags = if kind == 6 { 2 } else { 0 };
    out.put_u8(kind << 4 | flags);
    if version == V5 && reason != 0 {
        out.put_u8(3);
        out.put_u16(packet_id);
        out.put_u8(reason);
    } else {
        out.put_u8(2);
        out.put_u16(packet_id);
    }
}

pub fn suback(out: &mut BytesMut, version: u8, packet_id: u16, codes: &[u8]) {
    let body = 2 + codes.len() + usize::from(version == V5);
    out.put_u8(0x90);
    put_varint(out, body);
    out.put_u16(packet_id);
    if version == V5 {
        out.put_u8(0);
    }
    out.put_slice(codes);
}

pub fn unsuback(out: &mut BytesMut, version: u8, packet_id: u16, codes: &[u8]) {
    if version == V5 {
        out.put_u8(0xb0);
        put_varint(out, 3 + codes.len());
        out.put_u16(packet_id);
        out.put_u8(0);
        out.put_slice(codes);
    } else {
        out.put_u8(0xb0);
        out.put_u8(2);
        out.put_u16(packet_id);
    }
}

pub fn pingresp(out: &mut BytesMut) {
    out.put_slice(&[0xd0, 0]);
}

/// MQTT 5 DISCONNECT from the server, with a reason code.
pub fn disconnect(out: &mut BytesMut, reason: u8) {
    out.put_slice(&[0xe0, 1, reason]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_bytes(version: u8, client_id: &str, flags: u8) -> BytesMut {
        let mut body = BytesMut::new();
        put_binary(&mut body, b"MQTT");
        body.put_u8(version);
        body.put_u8(flags);
        body.put_u16(30);
        if version == V5 {
            body.put_u8(0);
        }
        put_binary(&mut body, client_id.as_bytes());
        let mut out = BytesMut::new();
        out.put_u8(0x10);
        put_varint(&mut out, body.len());
        out.put_slice(&body);
        out
    }

    #[test]
    fn decodes_connect_in_pieces() {
        let full = connect_bytes(V5, "dev-1", 0x02);
        let mut buf = BytesMut::new();
        for (i, b) in full.iter().enumerate() {
            buf.put_u8(*b);
            let got = decode(&mut buf, 0, 1 << 20).unwrap();
            if i + 1 < full.len() {
                assert!(got.is_none());
            } else {
                match got {
                    Some(Packet::Connect(c)) => {
                        assert_eq!(
                            (c.version, c.clean_start, &c.client_id[..]),
                            (V5, true, &b"dev-1"[..])
                        )
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn publish_round_trip_v5_with_properties() {
        let props = Properties {
            content_type: Some(Bytes::from_static(b"application/json")),
            correlation_data: Some(Bytes::from_static(b"\x01\x02")),
            user_properties: vec![(Bytes::from_static(b"k"), Bytes::from_static(b"v"))],
            ..Properties::default()
        };
        let mut out = BytesMut::new();
        publish_packet(
            &mut out,
            V5,
            &OutPublish {
                topic: b"a/b",
                payload: b"{}",
                qos: 1,
                retain: true,
                dup: false,
                packet_id: 7,
                properties: &props,
                subscription_id: None,
            },
        );
        match decode(&mut out, V5, 1 << 20).unwrap() {
            Some(Packet::Publish(p)) => {
                assert_eq!(
                    (&p.topic[..], &p.payload[..], p.qos, p.retain, p.packet_id),
                    (&b"a/b"[..], &b"{}"[..], 1, true, 7)
                );
                assert_eq!(p.properties, props);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            &[0x00, 0x00][..],                         // type 0 first
            &[0x10, 0xff, 0xff, 0xff, 0xff, 0x01][..], // 5-byte length
            &[0x32, 0x03, 0x00, 0x01, b'a'][..],       // CONNECT missing: protocol error
        ] {
            let mut buf = BytesMut::from(bad);
            assert!(decode(&mut buf, 0, 1 << 20).is_err(), "{bad:?}");
        }
        let mut big = connect_bytes(V311, &"x".repeat(2000), 0x02);
        assert_eq!(decode(&mut big, 0, 1000), Err(CodecError::TooLarge(2015)));
        let mut mqisdp = BytesMut::new();
        mqisdp.put_slice(&[0x10, 12, 0, 6]);
        mqisdp.put_slice(b"MQIsdp");
        mqisdp.put_slice(&[3, 2, 0, 30]);
        assert_eq!(
            decode(&mut mqisdp, 0, 1 << 20),
            Err(CodecError::UnsupportedVersion(3))
        );
        // Wildcards in a PUBLISH topic, reserved SUBSCRIBE flags.
        let mut wild = BytesMut::from(&[0x30, 0x05, 0x00, 0x01, b'#', b'x', b'y'][..]);
        assert!(decode(&mut wild, V311, 1 << 20).is_err());
        let mut sub = BytesMut::from(&[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00][..]);
        assert!(decode(&mut sub, V311, 1 << 20).is_err());
    }
}
