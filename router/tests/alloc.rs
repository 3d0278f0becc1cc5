//! The CoAP-to-MQTT hot path allocates nothing per message but the bytes of
//! the message itself, shown with a counting global allocator around
//! `Uplink::handle` with a subscriber attached to the broker: topic and
//! payload share one buffer, plus the `bytes` crate's shared header that
//! lets every subscriber hold them without a copy. Two allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use m2m_router::coap::uplink::{Uplink, UplinkConfig, UplinkStats};
use m2m_router::config::Config;
use m2m_router::mapping::{Mapper, SharedMapper};
use m2m_router::mqtt::codec::SubscriptionOptions;
use m2m_router::mqtt::{Broker, BrokerConfig};
use m2m_router_tests::packet::coap_post;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn only_the_message_bytes_are_allocated() {
    let config = Config::parse(
        "[[peer]]\nname = \"meter\"\nprefix = [\"10.0.0.0/24\"]\ntopic = \"plant/{peer}/{path}\"\n",
    )
    .unwrap();
    let broker = Broker::new(BrokerConfig::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let attached = rt
        .block_on(broker.attach(&Bytes::from_static(b"sub"), true, false))
        .unwrap();
    let queue = &attached.session.queue;
    broker.subscribe(
        &attached.session,
        Bytes::from_static(b"plant/#"),
        SubscriptionOptions {
            qos: 1,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
        },
        None,
    );
    let mut uplink = Uplink::new(
        UplinkConfig::default(),
        SharedMapper::new(Mapper::from_config(&config)),
        broker.clone(),
        Arc::new(UplinkStats::default()),
    );
    let src: SocketAddr = "10.0.0.5:40000".parse().unwrap();
    let mut reply = Vec::with_capacity(64);
    let mut datagram = coap_post(0, b"21.5");
    let mut run = |from: u32, to: u32, reply: &mut Vec<u8>| {
        for i in from..to {
            datagram[2..4].copy_from_slice(&(i as u16).to_be_bytes());
            assert!(uplink.handle(&datagram, false, src, Instant::now(), reply));
            uplink.commit(std::slice::from_mut(reply)).unwrap(); // a batch of one, as the worker would
            assert_eq!(reply[1], 0x44, "2.04");
            // The subscriber takes the delivery (a connection task would).
            assert_eq!(&queue.try_pop().unwrap().message.payload[..], b"21.5");
        }
    };
    // Warm up: per-peer state, the reply and topic buffers, queue blocks.
    run(0, 20_000, &mut reply);
    let n = 10_000;
    COUNTING.store(true, Ordering::Relaxed);
    run(20_000, 20_000 + n, &mut reply);
    COUNTING.store(false, Ordering::Relaxed);
    let per_message = ALLOCATIONS.load(Ordering::Relaxed) as f64 / f64::from(n);
    eprintln!("{per_message:.3} allocations per message");
    assert!(per_message <= 2.0, "{per_message} allocations per message");
}
