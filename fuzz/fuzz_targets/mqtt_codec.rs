//! Bytes from an MQTT client, in both protocol versions and in arbitrary
//! pieces, through the codec; and back: a decoded PUBLISH re-encoded as the
//! broker sends it decodes to the same message.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use m2m_router::mqtt::codec::{self, OutPublish, Packet, V311, V5};

fuzz_target!(|data: &[u8]| {
    // The first byte: version, and where the stream is cut into two reads.
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    let version = if control & 1 == 0 { V311 } else { V5 };
    let cut = usize::from(control >> 1).min(stream.len());
    let mut buf = BytesMut::new();
    for piece in [&stream[..cut], &stream[cut..]] {
        buf.extend_from_slice(piece);
        while let Ok(Some(packet)) = codec::decode(&mut buf, version, 64 << 10) {
            // An empty topic uses an MQTT 5 Topic Alias, which the
            // connection resolves before anything is delivered.
            if let Packet::Publish(p) = packet {
                if !p.topic.is_empty() {
                    round_trip(version, &p);
                }
            }
        }
    }
});

fn round_trip(version: u8, p: &codec::Publish) {
    let mut out = BytesMut::new();
    codec::publish_packet(
        &mut out,
        version,
        &OutPublish {
            topic: &p.topic,
            payload: &p.payload,
            qos: p.qos.min(1),
            retain: p.retain,
            dup: false,
            packet_id: if p.qos > 0 { p.packet_id.max(1) } else { 0 },
            properties: &p.properties,
            subscription_id: None,
        },
    );
    match codec::decode(&mut out, version, usize::MAX) {
        Ok(Some(Packet::Publish(again))) => {
            assert_eq!((&again.topic, &again.payload), (&p.topic, &p.payload));
            if version == V5 {
                // What a delivery forwards of the publisher's properties.
                let forwarded = |q: &codec::Properties| {
                    (
                        q.payload_format,
                        q.message_expiry,
                        q.content_type.clone(),
                        q.response_topic.clone(),
                        q.correlation_data.clone(),
                        q.user_properties.clone(),
                    )
                };
                assert_eq!(forwarded(&again.properties), forwarded(&p.properties));
            }
            assert!(out.is_empty(), "bytes left after the PUBLISH");
        }
        other => panic!("an encoded PUBLISH decodes as {other:?}"),
    }
}
