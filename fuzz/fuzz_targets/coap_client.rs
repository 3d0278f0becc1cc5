//! Datagrams from a device to the gateway's CoAP client side: answers to a
//! command, and the notifications of a relation the gateway observes, in
//! any order and shape. The message layer (`coap::client`) matches them,
//! and each 2.xx answer goes through the watch's freshness rule
//! (`coap::watch`). No input may panic, and what the client sends back
//! (an empty ACK or RST) always decodes as CoAP.

#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use m2m_router::coap::client::{Client, Reply};
use m2m_router::coap::message::{self, code, option, Message};
use m2m_router::coap::params::TransmissionParams;
use m2m_router::coap::watch::{Origin, Watches};
use m2m_router::coap::Endpoint;

const DEVICE: Endpoint = Endpoint::plain(SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 7)),
    5683,
));

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut client: Client<u8> =
        Client::new(TransmissionParams::default(), Duration::from_secs(30));
    let mut watches = Watches::default();
    let id = watches
        .add("meter", "sensors/temp", Origin::Config, start)
        .unwrap();
    let observe = [(option::OBSERVE, &[][..]), (option::URI_PATH, &b"temp"[..])];
    // The tokens are random: the first input bytes stand in for them by
    // being echoed where a datagram carries the token 0xfeed0001 / 2.
    let (token, _) = client.register(
        1,
        DEVICE,
        Some([0xfe, 0xed, 0, 1]),
        code::GET,
        &observe,
        start,
    );
    watches.get_mut(id).unwrap().registering(DEVICE, token);
    client.request(
        2,
        DEVICE,
        code::POST,
        &[(option::URI_PATH, &b"valve"[..])],
        b"open",
        start,
    );
    let mut out = Vec::new();
    let mut now = start;
    // Each datagram: a length byte, then that many bytes.
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let (datagram, after) = tail.split_at(usize::from(len).min(tail.len()));
        rest = after;
        now += Duration::from_millis(u64::from(len) * 10);
        let Ok(msg) = Message::decode(datagram) else {
            continue;
        };
        let reply = client.receive(DEVICE, &msg, now, &mut out);
        if !out.is_empty() {
            assert!(
                Message::decode(&out).is_ok(),
                "an answer that does not decode: {out:02x?}"
            );
        }
        let answered = match reply {
            Reply::Response(1, m) | Reply::Notification(1, m) => Some(m),
            _ => None,
        };
        if let Some(m) = answered.filter(|m| m.code >> 5 == 2) {
            let value = |n| {
                m.options()
                    .find(|(o, _)| *o == n)
                    .and_then(|(_, v)| message::uint_option(v))
            };
            let seq = value(option::OBSERVE).map(|v| v & 0xff_ffff);
            let max_age = value(option::MAX_AGE).unwrap_or(60);
            let _ = watches.get_mut(id).unwrap().notified(seq, max_age, now);
        }
        let _ = client.expire(now, |_, d| assert!(Message::decode(d).is_ok()));
        let _ = watches.due(now);
    }
});
