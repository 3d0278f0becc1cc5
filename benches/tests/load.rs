//! The load generator offers what it says: every datagram from the device's
//! own address, per-device sequence numbers from 1, the CON share and the
//! payload sizes asked, over IPv4 and IPv6, never faster than the rate.
//! A gateway-side socket pair stands in for the router and ACKs every CON.
//! Each device sends a fixed count, so what is checked does not depend on
//! how fast the machine is; how close to the rate a loaded machine gets is
//! for the benchmarks. Needs root (namespaces).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use benches::load::{device_addr, offer, route_devices, Family, LoadSpec};
use m2m_router_tests::netns::{Topology, DEADLINE, GW_V4, GW_V6};

#[test]
fn offers_each_device_from_its_own_address_in_sequence() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "this test creates network namespaces: run it as root (cargo xtask test does)"
    );
    let topo = Topology::new("load");
    route_devices(&topo);
    let v4 = topo.gateway_socket(SocketAddr::new(GW_V4.into(), 5683));
    let v6 = topo.gateway_socket(SocketAddr::new(GW_V6.into(), 5683));
    let spec = LoadSpec {
        devices: 200,
        family: Family::Mixed,
        con_percent: 50,
        payload_sizes: vec![16, 100],
        rate: 4000.0,
        duration: DEADLINE,
        per_device: Some(4),
        threads: 2,
        ack_wait: DEADLINE,
    };
    // The "router": answer every CON with an ACK (RFC 7252 section 4.2),
    // until both sockets together have seen all that was sent.
    let stop = AtomicBool::new(false);
    let (seen_total, sent_total) = (AtomicU64::new(0), AtomicU64::new(u64::MAX));
    let serve = |sock: &UdpSocket| {
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let deadline = Instant::now() + spec.duration + 2 * DEADLINE;
        let mut seen = Vec::new();
        let mut buf = [0u8; 2048];
        while seen_total.load(Ordering::Acquire) < sent_total.load(Ordering::Acquire) {
            assert!(
                Instant::now() < deadline,
                "the datagrams sent did not all arrive"
            );
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            if buf[0] >> 4 & 3 == 0 {
                let ack = [0x60, 0, buf[2], buf[3]];
                sock.send_to(&ack, from).unwrap();
            }
            seen.push((from, buf[..n].to_vec()));
            seen_total.fetch_add(1, Ordering::AcqRel);
        }
        seen
    };
    let (offered, seen) = std::thread::scope(|s| {
        let a = s.spawn(|| serve(&v4));
        let b = s.spawn(|| serve(&v6));
        let offered = offer(
            &topo,
            &spec,
            v4.local_addr().unwrap(),
            v6.local_addr().unwrap(),
            &stop,
        )
        .unwrap();
        sent_total.store(offered.sent, Ordering::Release);
        let mut seen = a.join().unwrap();
        seen.extend(b.join().unwrap());
        (offered, seen)
    });

    // Paced: never ahead of the rate (one batch of slack per thread).
    let allowed = spec.rate * offered.seconds + 64.0 * spec.threads as f64;
    assert!(
        offered.sent as f64 <= allowed,
        "sent {} in {:.3} s at {}/s",
        offered.sent,
        offered.seconds,
        spec.rate
    );
    assert_eq!(offered.send_errors, 0, "the kernel refused datagrams");
    assert_eq!(
        offered.per_device,
        vec![4; 200],
        "each device sent its count"
    );
    assert_eq!(seen.len() as u64, offered.sent, "every datagram arrived");
    let mut next_seq: HashMap<u32, u32> = HashMap::new();
    let mut endpoints: HashMap<u32, SocketAddr> = HashMap::new();
    let mut sizes = HashSet::new();
    let mut con = 0;
    for (from, d) in &seen {
        let p = &d[9..];
        let device = u32::from_be_bytes(p[0..4].try_into().unwrap());
        let seq = u32::from_be_bytes(p[4..8].try_into().unwrap());
        assert_eq!(from.ip(), device_addr(device as usize, Family::Mixed));
        assert_eq!(
            *endpoints.entry(device).or_insert(*from),
            *from,
            "a device keeps its endpoint"
        );
        let expected = next_seq.entry(device).or_insert(1);
        assert_eq!(seq, *expected, "device {device} in order without gaps");
        *expected += 1;
        sizes.insert(p.len());
        con += usize::from(d[0] >> 4 & 3 == 0);
    }
    assert_eq!(endpoints.len(), 200, "every device sent");
    assert!(endpoints.values().any(|e| matches!(e.ip(), IpAddr::V6(_))));
    assert!(endpoints.values().any(|e| matches!(e.ip(), IpAddr::V4(_))));
    assert_eq!(sizes, HashSet::from([16, 100]));
    let share = con as f64 / seen.len() as f64;
    assert!((0.4..0.6).contains(&share), "CON share {share}");
    for (device, seq) in next_seq {
        assert_eq!(offered.per_device[device as usize], seq - 1);
    }
    assert_eq!(offered.cons, con as u64, "the generator counts its CONs");
    assert_eq!(offered.acks, con as u64, "the devices read every ACK");
}
