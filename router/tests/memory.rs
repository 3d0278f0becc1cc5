//! Memory under inputs that grow tables: every table input can grow has a
//! bound, and with the tables driven past their bounds the heap stays
//! within the figure README.md states. Measured with a global allocator
//! that keeps the live heap bytes (exact, unlike RSS, and the same on any
//! host).

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use m2m_router::coap::uplink::{Uplink, UplinkConfig, UplinkStats};
use m2m_router::config::Config;
use m2m_router::mapping::{Mapper, SharedMapper};
use m2m_router::mqtt::codec::SubscriptionOptions;
use m2m_router::mqtt::{Broker, BrokerConfig, Message};
use m2m_router_tests::packet::{coap, coap_post};

struct LiveBytes;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for LiveBytes {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let live = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
        PEAK.fetch_max(live, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: LiveBytes = LiveBytes;

const MIB: usize = 1 << 20;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The counts are process-wide: one measurement at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Starts a measurement: (the guard that keeps others out, live bytes now);
/// the peak restarts from here.
fn measure() -> (MutexGuard<'static, ()>, usize) {
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    PEAK.store(live(), Ordering::Relaxed);
    (guard, live())
}

/// Issue 11, build item 4: a million distinct CoAP sources, each sending
/// one request through the whole uplink (duplicate detection, the mapper,
/// the broker's last values), with the default bounds: duplicate detection
/// keeps its 1,000,000 entries and evicts the oldest beyond, the last values
/// stop at their 256 MiB, and the heap stays within the README's figure.
#[test]
fn a_million_coap_sources_stay_within_the_stated_memory() {
    let (_one, before) = measure();
    let broker = Broker::new(BrokerConfig::default());
    let stats = Arc::new(UplinkStats::default());
    let mut uplink = Uplink::new(
        UplinkConfig::default(),
        SharedMapper::new(Mapper::from_config(&Config::parse("").unwrap())),
        broker.clone(),
        stats.clone(),
    );
    let mut reply = Vec::with_capacity(64);
    let datagram = coap_post(7, b"21.5");
    let now = Instant::now();
    // Past the duplicate-detection bound (1,000,000) and the last values'
    // (1,048,576 topics; their bytes run out first).
    let sources: u32 = 1_100_000;
    for i in 0..sources {
        let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), 5683);
        assert!(uplink.handle(&datagram, false, src, now, &mut reply));
        uplink.commit(std::slice::from_mut(&mut reply)).unwrap();
        assert_eq!(reply[1], 0x44, "2.04 for source {i}");
    }
    let used = live() - before;
    let peak = PEAK.load(Ordering::Relaxed) - before;
    let counter = |name: &str| {
        let counters = broker.stats.counters();
        counters.iter().find(|c| c.0 == name).unwrap().2
    };
    eprintln!(
        "{sources} sources: {} MiB live, peak {} MiB; last values refused {}, dedup evictions {}",
        used / MIB,
        peak / MIB,
        counter("last_values_refused"),
        stats.dedup_evictions.load(Ordering::Relaxed),
    );
    assert_eq!(counter("published"), u64::from(sources));
    assert!(
        counter("last_values_refused") > 0,
        "the last values' bound was never reached"
    );
    assert_eq!(
        stats.dedup_evictions.load(Ordering::Relaxed),
        u64::from(sources) - 1_000_000,
        "duplicate detection keeps exactly dedup_total entries"
    );
    // README.md, "Bounds": duplicate detection 1,000,000 entries at about
    // 300 bytes each, last values 256 MiB; the peak includes a table's
    // growth (its old and new arrays, briefly both).
    assert!(
        peak <= 650 * MIB,
        "{} MiB at the peak for a million sources (README states at most 650)",
        peak / MIB
    );
}

/// Issue 12: 10,000 endpoints each leave an unfinished Block1 body (its
/// first 1 KiB block). The bodies together stay within
/// max_assembly_bytes (4 MiB here: room for 4,096 of them), the oldest
/// evicted and counted, and the rest forgotten after EXCHANGE_LIFETIME.
#[test]
fn ten_thousand_unfinished_block_bodies_stay_within_max_assembly_bytes() {
    let (_one, before) = measure();
    let stats = Arc::new(UplinkStats::default());
    let max_assembly_bytes = 4 * MIB;
    let mut uplink = Uplink::new(
        UplinkConfig {
            max_assembly_bytes,
            ..UplinkConfig::default()
        },
        SharedMapper::new(Mapper::from_config(&Config::parse("").unwrap())),
        Broker::new(BrokerConfig::default()),
        stats.clone(),
    );
    // CON POST to "x", Block1 block 0 of 1024 bytes with more to come
    // (option 27: delta 16 = 13 + 3, value NUM 0, M 1, SZX 6).
    let block0 = coap(
        0,
        0x02,
        1,
        &[],
        &[0xb1, b'x', 0xd1, 0x03, 0x0e],
        &[b'b'; 1024],
    );
    let mut reply = Vec::with_capacity(64);
    let now = Instant::now();
    let sources: u32 = 10_000;
    for i in 0..sources {
        let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), 5683);
        assert!(uplink.handle(&block0, false, src, now, &mut reply));
        uplink.commit(std::slice::from_mut(&mut reply)).unwrap();
        assert_eq!(reply[1], 0x5f, "2.31 Continue for source {i}");
    }
    let peak = PEAK.load(Ordering::Relaxed) - before;
    let kept = (max_assembly_bytes / 1024) as u64;
    eprintln!(
        "{sources} unfinished bodies: peak {} KiB, evicted {}",
        peak / 1024,
        stats.assemblies_evicted.load(Ordering::Relaxed)
    );
    assert_eq!(stats.blocks.load(Ordering::Relaxed), u64::from(sources));
    assert_eq!(
        stats.assemblies_evicted.load(Ordering::Relaxed),
        u64::from(sources) - kept,
        "the bodies that did not fit were evicted, oldest first"
    );
    // The bodies, plus duplicate detection and the bookkeeping of 10,000
    // endpoints (well under 500 bytes each).
    assert!(
        peak <= max_assembly_bytes + sources as usize * 500,
        "{} KiB at the peak",
        peak / 1024
    );
    assert_eq!(stats.assemblies.load(Ordering::Relaxed), kept, "the gauge");
    assert_eq!(
        stats.assembly_bytes.load(Ordering::Relaxed) as usize,
        max_assembly_bytes
    );
    uplink.sweep(now + m2m_router::coap::params::EXCHANGE_LIFETIME);
    assert_eq!(stats.assemblies_expired.load(Ordering::Relaxed), kept);
    assert_eq!(stats.assemblies.load(Ordering::Relaxed), 0);
    assert_eq!(stats.assembly_bytes.load(Ordering::Relaxed), 0);
}

fn options() -> SubscriptionOptions {
    SubscriptionOptions {
        qos: 1,
        no_local: false,
        retain_as_published: false,
        retain_handling: 0,
    }
}

/// Issue 11, build item 4: 150,000 MQTT client ids with persistent
/// sessions, each subscribed twice, then messages to all of them and deep
/// filters until every bound refuses: sessions stop at max_sessions (the
/// longest offline evicted, counted), the queues at max_queued_bytes, the
/// subscription index at max_subscription_bytes, and the heap stays within
/// what those bounds add up to.
#[test]
fn a_hundred_thousand_persistent_sessions_stay_within_their_bounds() {
    let (_one, before) = measure();
    let config = BrokerConfig::default();
    let broker = Broker::new(config.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let counter = |name: &str| {
        let counters = broker.stats.counters();
        counters.iter().find(|c| c.0 == name).unwrap().2
    };
    let ids = 150_000;
    for i in 0..ids {
        let id = Bytes::from(format!("meter-{i:08}"));
        let a = rt.block_on(broker.attach(&id, false, true)).unwrap();
        for filter in [format!("fleet/{i}/cmd"), "fleet/all".to_owned()] {
            broker
                .subscribe(&a.session, Bytes::from(filter), options(), None)
                .expect("room for two filters per session");
        }
        broker.detach(&a.session, Vec::new());
    }
    let (sessions, subscription_memory) = broker.session_usage();
    let per_session = (live() - before) / sessions;
    eprintln!("{sessions} sessions: {per_session} bytes each, subscriptions charged {subscription_memory}");
    assert_eq!(sessions, config.max_sessions);
    assert_eq!(counter("sessions_evicted"), ids as u64 - sessions as u64);
    // The oldest went: the first 50,000 find no session.
    let first = rt
        .block_on(broker.attach(&Bytes::from_static(b"meter-00000000"), false, true))
        .unwrap();
    assert!(
        !first.session_present,
        "the longest offline session was evicted"
    );
    broker.detach(&first.session, Vec::new());
    let last = rt
        .block_on(broker.attach(&Bytes::from(format!("meter-{:08}", ids - 1)), false, true))
        .unwrap();
    assert!(last.session_present, "the newest session was kept");
    broker.detach(&last.session, Vec::new());

    // 1 KiB messages to every session until the queues' budget refuses.
    for _ in 0..4 {
        let message = Message {
            topic: Bytes::from_static(b"fleet/all"),
            payload: Bytes::from(vec![b'x'; 1024]),
            qos: 1,
            retain: false,
            content_type: None,
            properties: None,
        };
        broker.publish_deferred(message, None).unwrap();
    }
    assert!(
        counter("dropped_over_budget") > 0,
        "the queues' budget never refused"
    );
    assert!(broker.queued_bytes() <= config.max_queued_bytes);

    // Deep filters of their own until the subscription index is full.
    let refused_before = counter("subscriptions_refused");
    'filling: for i in 0.. {
        let id = Bytes::from(format!("meter-{:08}", ids - 1 - i % 1000));
        let a = rt.block_on(broker.attach(&id, false, true)).unwrap();
        for j in 0..100 {
            let filter = Bytes::from(format!("site/{i}/{j}/a/b/c/d/e/f/g"));
            if broker
                .subscribe(&a.session, filter, options(), None)
                .is_none()
            {
                broker.detach(&a.session, Vec::new());
                break 'filling;
            }
        }
        broker.detach(&a.session, Vec::new());
    }
    assert_eq!(counter("subscriptions_refused"), refused_before + 1);
    let (_, subscription_memory) = broker.session_usage();
    assert!(subscription_memory <= config.max_subscription_bytes);

    // README.md, "Bounds": sessions at 512 bytes each (438 measured) besides their
    // subscriptions, plus the queues' and the subscriptions' budgets.
    let used = PEAK.load(Ordering::Relaxed) - before;
    let stated =
        config.max_sessions * 512 + config.max_queued_bytes + config.max_subscription_bytes;
    eprintln!(
        "all bounds reached: {} MiB at the peak, stated {} MiB",
        used / MIB,
        stated / MIB
    );
    assert!(
        used <= stated,
        "{} MiB at the peak, more than the {} MiB stated",
        used / MIB,
        stated / MIB
    );
}

/// Issue 11, build item 6 (the soak's RSS creep): peers added and removed
/// through the control plane, one in and one out each time as in the soak,
/// keep no memory once the first rounds are past.
#[test]
fn peers_added_and_removed_keep_no_memory() {
    use m2m_router::config::ConfigFile;
    use m2m_router::control::Control;
    use m2m_router::daemon::Running;
    let (_one, _) = measure();
    let raw = ConfigFile::parse("", std::path::Path::new("churn.toml")).unwrap();
    let config = raw.clone().validate().unwrap();
    let mut control = Control {
        mappers: SharedMapper::new(Mapper::from_config(&config)),
        raw,
        config,
        config_path: None,
        running: Running::detached(Broker::new(BrokerConfig::default())),
        started: Instant::now(),
    };
    let mut round = |n: u32| {
        let add = serde_json::json!({
            "name": format!("churn-{n}"),
            "prefix": [format!("10.78.{}.{}/32", (n / 250) % 250, n % 250 + 1)],
        });
        control
            .execute("peer.add", &add)
            .expect("a new peer is taken");
        if n >= 5 {
            let rm = serde_json::json!({ "name": format!("churn-{}", n - 5) });
            control.execute("peer.rm", &rm).expect("the peer is there");
        }
    };
    for n in 0..1_000 {
        round(n);
    }
    let warm = live();
    for n in 1_000..5_000 {
        round(n);
    }
    let after = live();
    eprintln!("after 1,000 rounds {warm} bytes live, after 5,000 {after}");
    assert!(
        after <= warm + 16 * 1024,
        "4,000 more peer add/rm rounds kept {} bytes",
        after.saturating_sub(warm)
    );
}

/// Issue 11, build item 6 (the soak's RSS creep): MQTT clients visiting as
/// in the soak (half clean, half persistent from a pool of 50 ids, each
/// subscribed to one of 1,000 device topics while 15 messages a visit are
/// published there) keep no memory once every topic has been visited.
#[test]
fn visiting_mqtt_clients_keep_no_memory() {
    let (_one, _) = measure();
    let broker = Broker::new(BrokerConfig::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let visit = |k: u64| {
        let persistent = k.is_multiple_of(2);
        let (id, device) = if persistent {
            let n = (k / 2) % 50;
            (format!("churn-{n}"), n * 7919 % 1000)
        } else {
            (format!("churn-clean-{k}"), k * 7919 % 1000)
        };
        let id = Bytes::from(id);
        let a = rt
            .block_on(broker.attach(&id, !persistent, persistent))
            .unwrap();
        let filter = Bytes::from(format!("load/10.78.3.{device}/#"));
        broker
            .subscribe(&a.session, filter, options(), None)
            .unwrap();
        for i in 0..15u8 {
            let message = Message {
                topic: Bytes::from(format!("load/10.78.3.{device}/x")),
                payload: Bytes::from(vec![i; 32]),
                qos: 1,
                retain: false,
                content_type: None,
                properties: None,
            };
            rt.block_on(broker.publish(message, None)).unwrap();
        }
        while a.session.queue.try_pop().is_some() {}
        broker.detach(&a.session, Vec::new());
    };
    for k in 0..4_000 {
        visit(k);
    }
    let warm = live();
    for k in 4_000..12_000 {
        visit(k);
    }
    let after = live();
    eprintln!("after 4,000 visits {warm} bytes live, after 12,000 {after}");
    assert!(
        after <= warm + 64 * 1024,
        "8,000 more visits kept {} bytes",
        after.saturating_sub(warm)
    );
}

/// Issue 11, build item 6 (the soak's RSS creep): 1,000 devices sending as
/// in the soak through the uplink keep no memory once duplicate detection
/// and the last values are full.
#[test]
fn a_thousand_devices_sending_for_long_keep_no_memory() {
    let (_one, _) = measure();
    let broker = Broker::new(BrokerConfig::default());
    let stats = Arc::new(UplinkStats::default());
    let mut uplink = Uplink::new(
        UplinkConfig::default(),
        SharedMapper::new(Mapper::from_config(&Config::parse("").unwrap())),
        broker,
        stats,
    );
    let mut reply = Vec::with_capacity(64);
    let now = Instant::now();
    let mut send = |rounds: std::ops::Range<u32>| {
        for round in rounds {
            let datagram = coap_post(round as u16, b"21.5");
            for device in 0..1_000u32 {
                let ip = IpAddr::V4(Ipv4Addr::from(0x0a4e_0000 + device));
                let src = SocketAddr::new(ip, 40_000);
                assert!(uplink.handle(&datagram, false, src, now, &mut reply));
                uplink.commit(std::slice::from_mut(&mut reply)).unwrap();
            }
        }
    };
    // Past 256 messages a device, its duplicate-detection log is full.
    send(0..300);
    let warm = live();
    send(300..1_300);
    let after = live();
    eprintln!("after 300,000 messages {warm} bytes live, after 1,300,000 {after}");
    assert!(
        after <= warm + 16 * 1024,
        "a million more messages kept {} bytes",
        after.saturating_sub(warm)
    );
}
