//! A datagram from a device, through everything the uplink does with it:
//! CoAP decoding, the request's options, duplicate detection, Block1
//! reassembly and Block2 answers, mapping, publishing to the embedded
//! broker, and the reply. No input may panic,
//! and a reply is always a CoAP message that decodes.

#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use m2m_router::coap::message::Message;
use m2m_router::coap::request;
use m2m_router::coap::uplink::{Uplink, UplinkConfig, UplinkStats};
use m2m_router::config::Config;
use m2m_router::mapping::{Mapper, SharedMapper};
use m2m_router::mqtt::{Broker, BrokerConfig};

struct Harness {
    uplink: std::sync::Mutex<Uplink>,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let config = Config::parse(
            "[[peer]]\nname = \"meter\"\nprefix = [\"10.0.0.0/8\"]\ntopic = \"m/{peer}/{path}/{path.1}\"\n\
             [[route]]\nname = \"alarms\"\nmatch = \"alarm/*\"\ntopic = \"alarms/{peer}/{path.1}\"\nretain = true\n",
        )
        .expect("the fuzz config is valid");
        let uplink = Uplink::new(
            UplinkConfig {
                max_payload: 512,
                // Small, so that fuzzed Block1 bodies reach the bounds.
                max_body: 4096,
                max_assembly_bytes: 16384,
                dedup_per_peer: 16,
                dedup_total: 1024,
            },
            SharedMapper::new(Mapper::from_config(&config)),
            Broker::new(BrokerConfig::default()),
            Arc::new(UplinkStats::default()),
        );
        Harness {
            uplink: std::sync::Mutex::new(uplink),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = Message::decode(data) {
        let _ = request::parse(&message);
    }
    // The first byte picks the source, so duplicate detection sees both
    // repeats and new endpoints; the rest is the datagram. A datagram over
    // 1,536 bytes stands for one the receive buffer cut short.
    let Some((&who, datagram)) = data.split_first() else {
        return;
    };
    let src = SocketAddr::from(([10, 0, 0, who], 5683));
    let truncated = datagram.len() > 1_536;
    let datagram = &datagram[..datagram.len().min(1_536)];
    let mut reply = Vec::new();
    let mut uplink = harness().uplink.lock().unwrap();
    if uplink.handle(datagram, truncated, src, Instant::now(), &mut reply) {
        assert!(
            Message::decode(&reply).is_ok(),
            "the reply does not decode: {reply:02x?}"
        );
    }
    let _ = uplink.commit(std::slice::from_mut(&mut reply));
});
