//! Connection floods against the real binary: the control socket bounds its
//! connections, their idle time and the bytes they make it hold; a daemon out
//! of descriptors refuses new MQTT clients cleanly, counts it, keeps serving
//! the established ones and recovers by itself. Privileged: needs root.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use m2m_router_tests::daemon::Daemon;
use m2m_router_tests::mqtt::RawClient;
use m2m_router_tests::netns::{Netns, DEADLINE};
use m2m_router_tests::{require_root, TempPath};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_m2m-router");

/// A daemon without XDP (these tests are about its listeners) in its own
/// namespace, with `config` as its config file.
fn start(tag: &str, config: &str) -> (Netns, Daemon, TempPath) {
    require_root();
    let ns = Netns::create(tag);
    let file = TempPath::with_contents(&format!("floods-{tag}"), "toml", config);
    let daemon = Daemon::running(&ns, BIN, &["--xdp-mode", "off", "--config", file.as_str()]);
    (ns, daemon, file)
}

fn connect(socket: &str) -> UnixStream {
    let s = UnixStream::connect(socket).expect("connect to the control socket");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s
}

/// The next response line on `s`, as JSON.
fn read_response(s: &UnixStream) -> Value {
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .expect("a response line");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// Whether the daemon has closed `s` (read returns 0 before the deadline).
fn closed_by_daemon(s: &mut UnixStream) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match std::io::Read::read(s, &mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// A connection admitted by the daemon: it has answered a `status` on it.
/// Retries while slots freed by earlier clients are still being given back.
fn admitted(socket: &str) -> UnixStream {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut s = connect(socket);
        s.write_all(b"{\"id\":1,\"version\":1,\"command\":\"status\"}\n")
            .unwrap();
        let answer = read_response(&s);
        if answer["result"].is_object() {
            return s;
        }
        assert_eq!(error_code(&answer), "busy", "{answer}");
        assert!(Instant::now() < deadline, "no control slot came free");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn control_connections_and_request_bytes_are_bounded() {
    let (_ns, daemon, _config) = start("ctl-bound", "[control]\nmax_connections = 4\n");
    let socket = daemon.socket.clone();

    // Bytes: two clients each hold 60 MiB of an unfinished request (the
    // daemon has read all but a socket buffer of it when write_all returns);
    // a third pushes the total past 128 MiB and is refused.
    let chunk = vec![b' '; 60 << 20];
    let mut holders: Vec<UnixStream> = (0..2).map(|_| connect(&socket)).collect();
    for s in &mut holders {
        s.write_all(&chunk).unwrap();
    }
    let mut greedy = connect(&socket);
    let _ = greedy.write_all(&chunk); // cut short when the daemon closes it
    let refusal = read_response(&greedy);
    assert_eq!(error_code(&refusal), "busy", "{refusal}");
    assert!(closed_by_daemon(&mut greedy));
    // The holders' requests were not harmed: each completes and is answered.
    for s in &mut holders {
        s.write_all(b"{\"id\":2,\"version\":1,\"command\":\"status\"}\n")
            .unwrap();
        let answer = read_response(s);
        assert!(answer["result"].is_object(), "{answer}");
    }
    drop(holders);
    drop(greedy);

    // Connections: four are served, the fifth gets `busy` and is closed.
    let open: Vec<UnixStream> = (0..4).map(|_| admitted(&socket)).collect();
    let mut fifth = connect(&socket);
    let refusal = read_response(&fifth);
    assert_eq!(error_code(&refusal), "busy", "{refusal}");
    assert!(closed_by_daemon(&mut fifth));
    drop(open);
    let stats = daemon.wait_ctl(&["stats"], DEADLINE, |v| {
        v["control"]["open"] == 1 // this request's own connection
    });
    assert_eq!(stats["control"]["refused_connections"], 1, "{stats}");
    daemon.stop();
}

#[test]
fn idle_control_clients_are_disconnected() {
    let (_ns, daemon, _config) = start("ctl-idle", "[control]\nidle_timeout_s = 1\n");
    let socket = daemon.socket.clone();
    let mut silent = connect(&socket);
    // A client that trickles a request without ever finishing it is idle
    // too: the timeout runs from the last response, not the last byte.
    let mut trickler = connect(&socket);
    let trickling = {
        let mut s = trickler.try_clone().unwrap();
        std::thread::spawn(move || {
            while s.write_all(b" ").is_ok() {
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    for s in [&mut silent, &mut trickler] {
        let answer = read_response(s);
        assert_eq!(error_code(&answer), "timeout", "{answer}");
        assert!(closed_by_daemon(s));
    }
    trickling.join().unwrap();
    let stats = daemon.ctl_json(&["stats"]);
    assert_eq!(stats["control"]["timeouts"], 2, "{stats}");
    daemon.stop();
}

/// Sets the soft RLIMIT_NOFILE of `pid`, returning the old limits.
fn set_descriptor_limit(pid: i32, soft: u64) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit reads `new` and writes `old`, both valid.
    unsafe {
        assert_eq!(
            libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old),
            0
        );
        let new = libc::rlimit {
            rlim_cur: soft,
            rlim_max: old.rlim_max,
        };
        assert_eq!(
            libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()),
            0
        );
    }
    old
}

#[test]
fn out_of_descriptors_the_broker_refuses_new_clients_and_serves_the_others() {
    let (ns, mut daemon, _config) = start("mqtt-emfile", "");
    let broker: SocketAddr = "127.0.0.1:1883".parse().unwrap();
    let (mut subscriber, mut publisher) = ns.run(|| {
        let mut sub = RawClient::connect(broker);
        assert_eq!(sub.handshake("flood-sub"), 0);
        assert_eq!(sub.subscribe("flood/#", 0), 0);
        let mut publisher = RawClient::connect(broker);
        assert_eq!(publisher.handshake("flood-pub"), 0);
        (sub, publisher)
    });

    // Leave the daemon four descriptors, then open fifty connections.
    let pid = daemon.pid();
    let in_use = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    let old = set_descriptor_limit(pid, in_use + 4);
    let flood: Vec<TcpStream> = ns.run(|| {
        (0..50)
            .map(|_| TcpStream::connect(broker).expect("the backlog takes the connection"))
            .collect()
    });
    daemon.expect_line("accept failing");

    // Established clients are served while new ones wait.
    publisher.publish("flood/still-served", b"yes");
    let (_, _, _, topic, payload) = subscriber.read_publish();
    assert_eq!(
        (topic.as_str(), &payload[..]),
        ("flood/still-served", &b"yes"[..])
    );

    // The flood leaves; the daemon accepts again by itself, and says so once.
    drop(flood);
    daemon.expect_line("accepting again");
    set_descriptor_limit(pid, old.rlim_cur);
    ns.run(|| {
        let mut late = RawClient::connect(broker);
        assert_eq!(late.handshake("flood-late"), 0);
    });
    let failing_lines = daemon
        .seen
        .iter()
        .filter(|l| l.contains("accept failing"))
        .count();
    assert_eq!(failing_lines, 1, "{}", daemon.seen.join("\n"));
    assert!(daemon.counter("mqtt", "accept_errors") > 0);
    daemon.stop();
}
