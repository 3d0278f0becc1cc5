//! The embedded MQTT broker on loopback, with stock clients (mosquitto_sub,
//! mosquitto_pub) and a raw one: retained messages, QoS 1 with PUBACK and
//! redelivery, persistent sessions, keep-alive, MQTT 3.1.1 and 5 side by side.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use m2m_router::mqtt::{self, Broker, BrokerConfig, Message};
use m2m_router_tests::mqtt::RawClient;
use m2m_router_tests::netns::{wait_for, DEADLINE};

/// Waits until `n` connections have ended (their sessions detached), so a
/// test never takes a sleep as "the disconnect was processed".
fn wait_closed(broker: &Broker, n: u64) {
    let closed = || {
        broker
            .stats
            .closed
            .load(std::sync::atomic::Ordering::Acquire)
    };
    assert!(
        wait_for(DEADLINE, || closed() >= n),
        "{} of {n} connections ended within {DEADLINE:?}",
        closed()
    );
}

/// A broker on 127.0.0.1:<free port>, served by its own runtime thread.
fn start_broker(config: BrokerConfig) -> (Arc<Broker>, SocketAddr) {
    let broker = Broker::new(config);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let b = broker.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            mqtt::serve(listener, b).await;
        });
    });
    (broker, addr)
}

fn message(topic: &'static str, payload: &'static str, qos: u8, retain: bool) -> Message {
    Message {
        topic: Bytes::from_static(topic.as_bytes()),
        payload: Bytes::from_static(payload.as_bytes()),
        qos,
        retain,
        content_type: None,
        properties: None,
    }
}

/// mosquitto_sub that exits after `count` messages; returns its lines.
fn sub(addr: SocketAddr, args: &[&str], count: usize) -> Vec<String> {
    let out = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &addr.port().to_string(),
            "-v",
            "-W",
            &DEADLINE.as_secs().to_string(),
        ])
        .args(["-C", &count.to_string()])
        .args(args)
        .output()
        .expect("mosquitto_sub (Debian package mosquitto-clients)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn publish(addr: SocketAddr, args: &[&str]) {
    let ok = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(args)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mosquitto_pub {args:?}");
}

#[test]
fn retained_messages_reach_later_subscribers_of_both_versions() {
    let (broker, addr) = start_broker(BrokerConfig::default());
    publish(addr, &["-r", "-t", "plant/m1/temp", "-m", "old"]);
    publish(addr, &["-r", "-t", "plant/m1/temp", "-m", "new"]);
    broker
        .publish_deferred(message("plant/m2/temp", "coap", 0, true), None)
        .unwrap();
    for version in ["mqttv311", "mqttv5"] {
        let mut got = sub(addr, &["-V", version, "-t", "plant/+/temp"], 2);
        got.sort();
        assert_eq!(
            got,
            vec!["plant/m1/temp new", "plant/m2/temp coap"],
            "{version}"
        );
    }
    // An empty retained payload clears it (MQTT 3.3.1.3).
    // The retained fence on a second filter comes after every retained
    // message of the first, so its arrival ends the list without waiting
    // for silence.
    publish(addr, &["-r", "-t", "plant/m1/temp", "-n"]);
    publish(addr, &["-r", "-t", "zz/fence", "-m", "1"]);
    let mut got = sub(addr, &["-t", "plant/+/temp", "-t", "zz/fence"], 2);
    got.sort();
    assert_eq!(got, vec!["plant/m2/temp coap", "zz/fence 1"]);
}

#[test]
fn qos1_is_redelivered_to_a_persistent_session_until_acknowledged() {
    let (broker, addr) = start_broker(BrokerConfig::default());
    let mut c = RawClient::connect(addr);
    assert_eq!(c.mqtt_connect("keeper", false, 60), (false, 0));
    assert_eq!(c.subscribe("q/#", 1), 1);
    broker
        .publish_deferred(message("q/a", "one", 1, false), None)
        .unwrap();
    let (dup, qos, id, topic, payload) = c.read_publish();
    assert_eq!(
        (dup, qos, topic.as_str(), &payload[..]),
        (false, 1, "q/a", &b"one"[..])
    );
    // Gone without a PUBACK; more arrives while offline.
    drop(c);
    wait_closed(&broker, 1);
    broker
        .publish_deferred(message("q/b", "two", 1, false), None)
        .unwrap();
    let mut c = RawClient::connect(addr);
    assert_eq!(
        c.mqtt_connect("keeper", false, 60),
        (true, 0),
        "session present"
    );
    let (dup, _, id_again, topic, _) = c.read_publish();
    assert_eq!(
        (dup, id_again, topic.as_str()),
        (true, id, "q/a"),
        "unacknowledged one again, DUP set"
    );
    c.puback(id_again);
    let (dup, _, id2, topic, _) = c.read_publish();
    assert_eq!(
        (dup, topic.as_str()),
        (false, "q/b"),
        "then what was queued offline"
    );
    c.puback(id2);
    c.disconnect();
    wait_closed(&broker, 2);
    // Acknowledged: nothing comes back on the next connection. Redeliveries
    // are written right after CONNACK, before anything queued, so a message
    // published now is the first thing the session gets.
    let mut c = RawClient::connect(addr);
    assert_eq!(c.mqtt_connect("keeper", false, 60), (true, 0));
    broker
        .publish_deferred(message("q/fence", "f", 1, false), None)
        .unwrap();
    let (dup, _, id, topic, _) = c.read_publish();
    assert_eq!(
        (dup, topic.as_str()),
        (false, "q/fence"),
        "nothing redelivered before it"
    );
    c.puback(id);
    drop(c);
    wait_closed(&broker, 3);
    // A clean session starts empty.
    let mut c = RawClient::connect(addr);
    assert_eq!(c.mqtt_connect("keeper", true, 60), (false, 0));
}

#[test]
fn mosquitto_persistent_session_gets_what_was_published_while_away() {
    let (broker, addr) = start_broker(BrokerConfig::default());
    // Subscribe once with a persistent session, then leave. The retained
    // probe comes only once the whole SUBSCRIBE (both filters) is in place;
    // silence would also be what a failed connection gives.
    broker
        .publish_deferred(message("ready/away", "1", 0, true), None)
        .unwrap();
    let got = sub(
        addr,
        &[
            "-c",
            "-i",
            "away",
            "-q",
            "1",
            "-t",
            "away/#",
            "-t",
            "ready/away",
        ],
        1,
    );
    assert_eq!(got, vec!["ready/away 1"]);
    wait_closed(&broker, 1);
    for topic in ["away/1", "away/2", "away/3"] {
        broker
            .publish_deferred(message(topic, "x", 1, false), None)
            .unwrap();
    }
    let got = sub(addr, &["-c", "-i", "away", "-q", "1", "-t", "away/#"], 3);
    assert_eq!(got, vec!["away/1 x", "away/2 x", "away/3 x"]);
}

#[test]
fn a_silent_client_is_dropped_after_one_and_a_half_keep_alives() {
    let (broker, addr) = start_broker(BrokerConfig::default());
    // The clock starts before CONNECT: the server's 1.5 x keep-alive starts
    // after it, so 1.5 s is a lower bound on any machine (MQTT 3.1.1
    // section 3.1.2.10). The upper bound is the read deadline: closed, not
    // kept open.
    let start = Instant::now();
    let mut c = RawClient::connect(addr);
    c.stream.set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(c.mqtt_connect("sleepy", true, 1), (false, 0));
    assert!(c.closed_by_server(), "still open after {DEADLINE:?}");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "closed after {waited:?}"
    );
    wait_closed(&broker, 1);
    assert_eq!(
        broker
            .stats
            .protocol_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "a keep-alive timeout, not a protocol error"
    );
}

#[test]
fn a_full_queue_drops_for_that_session_only() {
    let (broker, addr) = start_broker(BrokerConfig {
        session_queue: 10,
        ..BrokerConfig::default()
    });
    // A persistent session that is offline: its queue holds 10.
    let mut c = RawClient::connect(addr);
    c.mqtt_connect("offline", false, 60);
    c.subscribe("f/#", 1);
    c.disconnect();
    wait_closed(&broker, 1);
    for _ in 0..25 {
        broker
            .publish_deferred(message("f/x", "m", 1, false), None)
            .unwrap();
    }
    let stats = broker.session_stats();
    let (_, queued, dropped) = stats.iter().find(|(id, _, _)| id == "offline").unwrap();
    assert_eq!((*queued, *dropped), (10, 15));
}

#[test]
fn packets_pipelined_behind_connect_are_not_left_waiting() {
    use std::io::{Read, Write};
    let (_broker, addr) = start_broker(BrokerConfig::default());
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    // CONNECT and SUBSCRIBE in one write, as fast clients send them.
    let mut both = vec![0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 0];
    both.extend_from_slice(&[0x82, 6, 0, 9, 0, 1, b'#', 0]);
    s.write_all(&both).unwrap();
    let mut acks = [0u8; 9];
    s.read_exact(&mut acks)
        .expect("CONNACK and SUBACK without sending anything more");
    assert_eq!(acks, [0x20, 2, 0, 0, 0x90, 3, 0, 9, 0]);
}

/// Reads one fixed-header-plus-two-byte packet (PUBREC, PUBCOMP, ...).
fn read_ack(c: &mut RawClient) -> [u8; 4] {
    let mut ack = [0u8; 4];
    std::io::Read::read_exact(&mut c.stream, &mut ack).expect("an acknowledgement");
    ack
}

/// A QoS 2 publisher gets the four-packet handshake (MQTT 3.1.1 section
/// 4.3.3): PUBREC, then PUBCOMP for its PUBREL; the message reaches a
/// subscriber once (at QoS 1, as the README says), even though the
/// publisher sent it twice (DUP) before releasing it.
#[test]
fn a_qos2_publisher_gets_pubrec_and_pubcomp_and_the_message_goes_out_once() {
    let (_broker, addr) = start_broker(BrokerConfig::default());
    let mut subscriber = RawClient::connect(addr);
    assert_eq!(subscriber.handshake("q2-sub"), 0);
    assert_eq!(subscriber.subscribe("q2/#", 2), 1, "granted QoS 1");
    let mut publisher = RawClient::connect(addr);
    assert_eq!(publisher.handshake("q2-pub"), 0);
    // PUBLISH QoS 2, packet id 7, topic q2/t, payload "x"; then again, DUP.
    let body = [&[0, 4][..], b"q2/t", &[0, 7], b"x"].concat();
    for first in [0x34u8, 0x3c] {
        let mut packet = vec![first, body.len() as u8];
        packet.extend_from_slice(&body);
        std::io::Write::write_all(&mut publisher.stream, &packet).unwrap();
        assert_eq!(read_ack(&mut publisher), [0x50, 2, 0, 7], "PUBREC");
    }
    std::io::Write::write_all(&mut publisher.stream, &[0x62, 2, 0, 7]).unwrap();
    assert_eq!(read_ack(&mut publisher), [0x70, 2, 0, 7], "PUBCOMP");
    let (_, qos, id, topic, payload) = subscriber.read_publish();
    assert_eq!((qos, topic.as_str(), &payload[..]), (1, "q2/t", &b"x"[..]));
    subscriber.puback(id);
    // A marker published after the handshake is the next delivery: the
    // duplicate PUBLISH was not delivered a second time.
    std::io::Write::write_all(
        &mut publisher.stream,
        &[0x30, 8, 0, 4, b'q', b'2', b'/', b'm', b'!', b'!'],
    )
    .unwrap();
    let (_, _, _, topic, _) = subscriber.read_publish();
    assert_eq!(
        topic, "q2/m",
        "the next delivery is the marker, not a duplicate"
    );
}

/// A client that disappears without DISCONNECT has its will published
/// (MQTT 3.1.1 section 3.1.2.5).
#[test]
fn a_client_that_vanishes_has_its_will_published() {
    let (broker, addr) = start_broker(BrokerConfig::default());
    let mut watcher = RawClient::connect(addr);
    assert_eq!(watcher.handshake("watcher"), 0);
    assert_eq!(watcher.subscribe("wills/#", 1), 1);
    let connections = broker
        .stats
        .connections
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut doomed = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args([
            "-t",
            "anything",
            "--will-topic",
            "wills/m1",
            "--will-payload",
            "gone",
            "--will-qos",
            "1",
        ])
        .spawn()
        .expect("mosquitto_sub");
    // Its connection has been accepted and its CONNECT taken: a
    // subscription to "anything" proves the session is live.
    let deadline = Instant::now() + Duration::from_secs(20);
    while broker
        .stats
        .connections
        .load(std::sync::atomic::Ordering::Relaxed)
        <= connections
    {
        assert!(Instant::now() < deadline, "mosquitto_sub never connected");
        std::thread::sleep(Duration::from_millis(5));
    }
    loop {
        publish(addr, &["-t", "anything", "-m", "ping"]);
        if broker
            .stats
            .enqueued
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
        {
            break;
        }
        assert!(Instant::now() < deadline, "mosquitto_sub never subscribed");
        std::thread::sleep(Duration::from_millis(20));
    }
    doomed.kill().unwrap(); // SIGKILL: no DISCONNECT
    doomed.wait().unwrap();
    let (_, _, _, topic, payload) = watcher.read_publish();
    assert_eq!((topic.as_str(), &payload[..]), ("wills/m1", &b"gone"[..]));
}

/// Subscribes `client_id` to `#` with `keep_alive`, then never reads again,
/// while 40 MB are published: its 4 KiB receive buffer, the kernel's send
/// buffer and the broker's output (64 KiB) fill, and the rest is dropped
/// from its queue. Returns the silent client (kept open by the caller).
fn stop_reading(broker: &Broker, addr: SocketAddr, client_id: &str, keep_alive: u16) -> RawClient {
    let mut c = RawClient::connect_with_receive_buffer(addr, 4096);
    assert_eq!(c.mqtt_connect(client_id, true, keep_alive), (false, 0));
    assert_eq!(c.subscribe("#", 0), 0);
    let payload = Bytes::from(vec![b'z'; 100_000]);
    for _ in 0..400 {
        let mut m = message("flood/x", "", 0, false);
        m.payload = payload.clone();
        broker.publish_deferred(m, None).unwrap();
    }
    let dropped = || {
        broker
            .stats
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert!(
        wait_for(DEADLINE, || dropped() > 0),
        "the silent client's queue never filled"
    );
    c
}

/// Issue 11, finding 6: a client that stops reading still has its
/// keep-alive enforced (MQTT 3.1.1 section 3.1.2.10): its packets go
/// unanswered once its output is full, and it is closed.
#[test]
fn a_subscriber_that_stops_reading_is_closed_when_its_keep_alive_runs_out() {
    let (broker, addr) = start_broker(BrokerConfig {
        session_queue: 100,
        ..BrokerConfig::default()
    });
    let c = stop_reading(&broker, addr, "deaf", 1);
    wait_closed(&broker, 1);
    drop(c);
    // The client id is free again.
    let mut again = RawClient::connect(addr);
    assert_eq!(again.mqtt_connect("deaf", true, 60), (false, 0));
}

/// A client that stops reading, with keep-alive off, can still be taken
/// over by a new connection with its client id (MQTT 3.1.1 section
/// 3.1.4): the old connection is closed, the new one accepted.
#[test]
fn a_subscriber_that_stops_reading_can_be_taken_over() {
    let (broker, addr) = start_broker(BrokerConfig {
        session_queue: 100,
        ..BrokerConfig::default()
    });
    let _deaf = stop_reading(&broker, addr, "stuck-id", 0);
    let mut new = RawClient::connect(addr);
    assert_eq!(new.mqtt_connect("stuck-id", true, 60), (false, 0));
    wait_closed(&broker, 1);
    // The new connection is served: it gets what is published now.
    assert_eq!(new.subscribe("after/#", 0), 0);
    broker
        .publish_deferred(message("after/x", "hello", 0, false), None)
        .unwrap();
    let (_, _, _, topic, payload) = new.read_publish();
    assert_eq!((topic.as_str(), &payload[..]), ("after/x", &b"hello"[..]));
}

fn stat(broker: &Broker, name: &str) -> u64 {
    broker
        .stats
        .counters()
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, _, v)| *v)
        .unwrap()
}

/// Issue 11, finding 8: connections past `max_connections` are closed at
/// once and counted, and a CONNECT larger than 64 KiB is refused before
/// it is read whole; established clients keep being served.
#[test]
fn connections_are_bounded_before_and_after_connect() {
    use std::io::Write;
    let (broker, addr) = start_broker(BrokerConfig {
        max_connections: 3,
        ..BrokerConfig::default()
    });
    let mut open: Vec<RawClient> = (0..3)
        .map(|i| {
            let mut c = RawClient::connect(addr);
            assert_eq!(c.handshake(&format!("c{i}")), 0);
            c
        })
        .collect();
    let mut extra = RawClient::connect(addr);
    assert!(extra.closed_by_server(), "a fourth connection was kept");
    assert_eq!(stat(&broker, "refused_connections"), 1);
    // One leaves: there is room again.
    open.pop().unwrap().disconnect();
    wait_closed(&broker, 1);
    let mut big = RawClient::connect(addr);
    // A CONNECT announcing 100,000 bytes: refused at its header.
    big.stream
        .write_all(&[0x10, 0xa0, 0x8d, 0x06, 0, 4, b'M', b'Q', b'T', b'T', 4, 2])
        .unwrap();
    assert!(big.closed_by_server(), "a 100 kB CONNECT was waited for");
    assert_eq!(stat(&broker, "protocol_errors"), 1);
    // The established clients are still served.
    assert_eq!(open[0].subscribe("still/#", 0), 0);
    broker
        .publish_deferred(message("still/here", "yes", 0, false), None)
        .unwrap();
    assert_eq!(open[0].read_publish().3, "still/here");
}

/// Issue 11, finding 7: the retained store keeps at most `max_retained`
/// topics and `max_retained_bytes`; what does not fit is counted, and a
/// later subscriber gets exactly what was kept.
#[test]
fn the_retained_store_is_bounded_and_counts_what_it_refuses() {
    let (broker, addr) = start_broker(BrokerConfig {
        max_retained: 3,
        max_retained_bytes: 1 << 20,
        ..BrokerConfig::default()
    });
    for topic in ["r/1", "r/2", "r/3", "r/4"] {
        broker
            .publish_deferred(message(topic, "v", 0, true), None)
            .unwrap();
    }
    assert_eq!(stat(&broker, "retained_refused"), 1);
    let (kept, bytes_of_three) = broker.retained_usage();
    assert_eq!(kept, 3);
    // Too big for the bytes left: refused, and r/1's older value removed.
    let mut big = message("r/1", "", 0, true);
    big.payload = Bytes::from(vec![b'x'; 1 << 20]);
    broker.publish_deferred(big, None).unwrap();
    assert_eq!(stat(&broker, "retained_refused"), 2);
    let (kept, bytes) = broker.retained_usage();
    assert_eq!(kept, 2);
    assert!(bytes < bytes_of_three, "r/1's bytes were given back");
    let mut got = sub(addr, &["-t", "r/#"], 2);
    got.sort();
    assert_eq!(got, vec!["r/2 v", "r/3 v"]);
}

/// Issue 11, finding 5: a session holds at most `max_subscriptions`
/// filters (the rest refused in the SUBACK and counted, the session kept);
/// the index routes each publish to exactly the sessions whose filters
/// match, once per session at its highest QoS, and forgets a session's
/// filters when it goes.
#[test]
fn subscriptions_are_bounded_per_session_and_indexed_exactly() {
    use std::io::Write;
    let (broker, addr) = start_broker(BrokerConfig {
        max_subscriptions: 1_000,
        ..BrokerConfig::default()
    });
    let mut greedy = RawClient::connect(addr);
    assert_eq!(greedy.handshake("greedy"), 0);
    // 20 SUBSCRIBEs of 100 distinct filters each: the first 1,000 granted.
    let mut codes = Vec::new();
    for packet in 0..20u16 {
        let filters: Vec<String> = (0..100)
            .map(|i| format!("dev/{}/+", packet * 100 + i))
            .collect();
        codes.extend(greedy.subscribe_all(packet + 1, &filters, 0));
    }
    assert!(codes[..1_000].iter().all(|&c| c == 0), "granted first");
    assert!(codes[1_000..].iter().all(|&c| c == 0x80), "then refused");
    assert_eq!(stat(&broker, "subscriptions_refused"), 1_000);
    assert_eq!(broker.subscription_count(), 1_000);
    // Re-subscribing to a filter it holds is a replacement, not one more;
    // it raises the QoS of "dev/7/+" to 1.
    assert_eq!(greedy.subscribe("dev/7/+", 1), 1);
    assert_eq!(greedy.subscribe("dev/#", 0), 0x80);

    // Overlapping filters: one copy, at the highest QoS among them.
    let mut watcher = RawClient::connect(addr);
    assert_eq!(watcher.handshake("watcher"), 0);
    assert_eq!(watcher.subscribe("dev/#", 0), 0);
    assert_eq!(watcher.subscribe("+/7/temp", 0), 0);
    for (topic, payload) in [
        ("dev/7/temp", "a"),
        ("dev/1500/temp", "b"),
        ("other/7/temp", "c"),
    ] {
        broker
            .publish_deferred(message(topic, payload, 1, false), None)
            .unwrap();
    }
    let (_, qos, id, topic, payload) = greedy.read_publish();
    assert_eq!(
        (qos, topic.as_str(), &payload[..]),
        (1, "dev/7/temp", &b"a"[..])
    );
    greedy.puback(id);
    let got: Vec<(String, Vec<u8>)> = (0..3)
        .map(|_| {
            let (_, _, _, topic, payload) = watcher.read_publish();
            (topic, payload)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("dev/7/temp".into(), b"a".to_vec()),
            ("dev/1500/temp".into(), b"b".to_vec()),
            ("other/7/temp".into(), b"c".to_vec()),
        ]
    );
    // A fence: the next message each gets is this one, so greedy got
    // nothing for the unsubscribed-to topics and nobody got a second copy.
    broker
        .publish_deferred(message("dev/1/fence", "f", 0, false), None)
        .unwrap();
    assert_eq!(greedy.read_publish().3, "dev/1/fence");
    assert_eq!(watcher.read_publish().3, "dev/1/fence");

    // Unsubscribing makes room; a session that goes takes its filters.
    greedy
        .stream
        .write_all(&[
            0xa2, 11, 0, 99, 0, 7, b'd', b'e', b'v', b'/', b'7', b'/', b'+',
        ])
        .unwrap();
    let mut unsuback = [0u8; 4];
    std::io::Read::read_exact(&mut greedy.stream, &mut unsuback).unwrap();
    assert_eq!(unsuback, [0xb0, 2, 0, 99]);
    assert_eq!(greedy.subscribe("dev/#", 0), 0);
    greedy.disconnect();
    wait_closed(&broker, 1);
    assert_eq!(
        broker.subscription_count(),
        2,
        "only the watcher's are left"
    );
    // And the index forgot them too: a topic greedy matched goes to the
    // watcher alone.
    let delivered = stat(&broker, "delivered");
    broker
        .publish_deferred(message("dev/1/x", "y", 0, false), None)
        .unwrap();
    assert_eq!(watcher.read_publish().3, "dev/1/x");
    assert_eq!(stat(&broker, "delivered"), delivered + 1);
}

/// Topics and filters are bounded in levels (the topic tree recurses once
/// per level): a deeper filter is refused in the SUBACK, a deeper topic is
/// refused at the broker's gate, and the broker keeps serving.
#[test]
fn topics_and_filters_deeper_than_the_bound_are_refused() {
    let (broker, addr) = start_broker(BrokerConfig::default());
    let mut client = RawClient::connect(addr);
    assert_eq!(client.handshake("deep"), 0);
    let deep = "a/".repeat(mqtt::topic::MAX_LEVELS) + "a";
    assert_eq!(client.subscribe(&deep, 0), 0x80);
    let mut too_deep = message("x", "y", 0, false);
    too_deep.topic = Bytes::from(deep);
    assert!(broker.publish_deferred(too_deep, None).is_err());
    let within = "a/".repeat(mqtt::topic::MAX_LEVELS - 1) + "a";
    assert_eq!(client.subscribe(&within, 0), 0);
}
