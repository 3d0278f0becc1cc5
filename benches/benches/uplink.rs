//! Userspace data-plane micro-benchmarks (criterion): CoAP decode, topic
//! rendering, peer lookup and mapping with 100,000 peers, and a whole
//! `Uplink::handle` (decode, dedup, map, publish to one subscriber, ACK).
//!
//!   cargo bench -p benches --bench uplink

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use m2m_router::coap::message::Message;
use m2m_router::coap::request;
use m2m_router::coap::uplink::{Uplink, UplinkConfig, UplinkStats};
use m2m_router::config::Config;
use m2m_router::mapping::{Mapper, Request, SharedMapper};
use m2m_router::mqtt::codec::SubscriptionOptions;
use m2m_router::mqtt::{Broker, BrokerConfig};
use m2m_router_tests::packet::coap_post;

/// 100,000 peers (one /32 each in 10.0.0.0/8, every tenth also with an IPv6
/// /128) and a few routes.
fn big_config() -> Config {
    let mut text = String::from(
        "[[route]]\nname = \"alarms\"\nmatch = \"alarm/*\"\ntopic = \"alarms/{peer}/{path.1}\"\nqos = 1\n",
    );
    for i in 0..100_000u32 {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
        let _ = write!(text, "[[peer]]\nname = \"dev-{i}\"\nprefix = [\"{ip}/32\"");
        if i % 10 == 0 {
            let _ = write!(text, ", \"fd00::{:x}:{:x}/128\"", i >> 16, i & 0xffff);
        }
        text.push_str("]\n");
    }
    Config::parse(&text).unwrap()
}

fn benches(c: &mut Criterion) {
    let datagram = coap_post(7, b"{\"t\":21.5}");
    c.bench_function("coap decode + request options", |b| {
        b.iter(|| {
            let m = Message::decode(black_box(&datagram)).unwrap();
            black_box(request::parse(&m).unwrap());
        })
    });

    let config = big_config();
    let mapper = Mapper::from_config(&config);
    let path = ["sensors", "temp"];
    let mut topic = String::with_capacity(128);
    let src: SocketAddr = "10.1.134.100:5683".parse().unwrap();
    c.bench_function("peer lookup, 100k peers", |b| {
        b.iter(|| black_box(mapper.peer(black_box(src.ip()))))
    });
    c.bench_function("map + render topic, 100k peers", |b| {
        b.iter(|| {
            let req = Request {
                src,
                identity: None,
                method: 2,
                path: &path,
            };
            mapper.map(black_box(&req), &mut topic).unwrap();
            black_box(&topic);
        })
    });
    let unknown: IpAddr = "192.0.2.1".parse().unwrap();
    c.bench_function("peer lookup miss, 100k peers", |b| {
        b.iter(|| black_box(mapper.peer(black_box(unknown))))
    });

    // The whole per-datagram path with one subscriber.
    let broker = Broker::new(BrokerConfig::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let attached = rt
        .block_on(broker.attach(&Bytes::from_static(b"s"), true, false))
        .unwrap();
    let queue = &attached.session.queue;
    broker.subscribe(
        &attached.session,
        Bytes::from_static(b"#"),
        SubscriptionOptions {
            qos: 0,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
        },
        None,
    );
    let mut uplink = Uplink::new(
        UplinkConfig::default(),
        SharedMapper::new(mapper),
        broker.clone(),
        Arc::new(UplinkStats::default()),
    );
    let mut reply = Vec::with_capacity(64);
    let mut dgram = datagram.clone();
    let mut mid = 0u16;
    c.bench_function("uplink handle: decode, dedup, map, publish, ACK", |b| {
        b.iter(|| {
            mid = mid.wrapping_add(1);
            dgram[2..4].copy_from_slice(&mid.to_be_bytes());
            uplink.handle(&dgram, false, src, Instant::now(), &mut reply);
            uplink.commit(std::slice::from_mut(&mut reply)).unwrap(); // a batch of one, as the worker would
            black_box(queue.try_pop().unwrap());
        })
    });
}

/// Routing a publish among 10,000 subscriptions (issue 11, finding 5):
/// through the broker's filter index, beside the linear walk over every
/// filter that it replaced, measured in the same run.
fn subscriptions(c: &mut Criterion) {
    let broker = Broker::new(BrokerConfig::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let options = SubscriptionOptions {
        qos: 0,
        no_local: false,
        retain_as_published: false,
        retain_handling: 0,
    };
    let filters: Vec<Bytes> = (0..10_000)
        .map(|i| Bytes::from(format!("site/{}/dev-{i}/+", i % 100)))
        .collect();
    // 100 sessions of 100 filters each.
    let mut queues = Vec::new();
    for (s, chunk) in filters.chunks(100).enumerate() {
        let attached = rt
            .block_on(broker.attach(&Bytes::from(format!("s{s}")), true, false))
            .unwrap();
        for filter in chunk {
            broker
                .subscribe(&attached.session, filter.clone(), options, None)
                .unwrap();
        }
        queues.push(attached.session);
    }
    let topic = Bytes::from_static(b"site/42/dev-4242/temp");
    let matching_queue = &queues[42].queue;
    c.bench_function("publish among 10,000 subscriptions (filter index)", |b| {
        b.iter(|| {
            broker
                .publish_deferred(
                    m2m_router::mqtt::Message {
                        topic: topic.clone(),
                        payload: Bytes::from_static(b"21.5"),
                        qos: 0,
                        retain: false,
                        content_type: None,
                        properties: None,
                    },
                    None,
                )
                .unwrap();
            black_box(matching_queue.try_pop().unwrap());
        })
    });
    c.bench_function(
        "match one topic against 10,000 filters (linear, before)",
        |b| {
            b.iter(|| {
                black_box(
                    filters
                        .iter()
                        .filter(|f| m2m_router::mqtt::topic::matches(f, black_box(&topic)))
                        .count(),
                )
            })
        },
    );
}

criterion_group!(uplink, benches, subscriptions);
criterion_main!(uplink);
