//! MQTT clients for tests: a real `mosquitto_sub` (Debian mosquitto-clients)
//! whose output lines are collected, and a raw TCP client for the cases no
//! well-behaved client produces (garbage, a subscriber that never reads).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use crate::netns::{Netns, DEADLINE};

/// A message as mosquitto_sub printed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub topic: String,
    pub payload: String,
    /// MQTT 5 content type, empty when absent.
    pub content_type: String,
}

/// Probes and fences are published here; every subscriber also subscribes
/// to it, and its messages are never returned as received.
const PROBE_TOPIC: &str = "m2m-test/probe";

pub struct MosquittoSub {
    child: Child,
    lines: Receiver<String>,
    /// `ip netns exec <ns>`, to publish probes and fences from inside it.
    ns: String,
    port: u16,
    probes: u32,
}

impl MosquittoSub {
    /// Subscribes (MQTT 5) to `filters` on 127.0.0.1:1883 inside `ns` and
    /// returns once the subscription demonstrably works (a probe published
    /// after it came back through it).
    pub fn start(ns: &Netns, filters: &[&str], extra: &[&str]) -> MosquittoSub {
        MosquittoSub::start_on(ns, 1883, filters, extra)
    }

    /// [`MosquittoSub::start`] against the broker on 127.0.0.1:`port`.
    pub fn start_on(ns: &Netns, port: u16, filters: &[&str], extra: &[&str]) -> MosquittoSub {
        let mut cmd = ns.command("mosquitto_sub");
        let port_arg = port.to_string();
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &port_arg,
            "-V",
            "mqttv5",
            "-v",
            "-F",
            "%t|%p|%C",
        ]);
        for f in filters.iter().chain(std::iter::once(&PROBE_TOPIC)) {
            cmd.args(["-t", f]);
        }
        cmd.args(extra);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub (Debian package mosquitto-clients)");
        let (tx, lines) = channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let mut sub = MosquittoSub {
            child,
            lines,
            ns: ns.name().to_owned(),
            port,
            probes: 0,
        };
        // mosquitto_sub may not have subscribed yet when a probe is
        // published, so a probe can be missed: publish another until one
        // comes back. Missed probes that come late are skipped by `parse`.
        let deadline = Instant::now() + DEADLINE;
        loop {
            assert!(
                Instant::now() < deadline,
                "mosquitto_sub never received a readiness probe within {DEADLINE:?}"
            );
            if let Some(probe) = sub.publish_probe() {
                if sub
                    .until_probe(&probe, Duration::from_millis(300))
                    .is_some()
                {
                    return sub;
                }
            } else {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Waits (up to [`DEADLINE`]) for `n` messages and returns them; fewer
    /// if they did not all come. Whether more follow is [`Self::fence`]'s
    /// to show.
    pub fn take(&self, n: usize) -> Vec<Received> {
        let mut got = Vec::new();
        let deadline = Instant::now() + DEADLINE;
        while got.len() < n {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            match self.lines.recv_timeout(left) {
                Ok(line) => got.extend(parse(&line)),
                Err(_) => break,
            }
        }
        got
    }

    /// Every message delivered to this subscriber before a fence published
    /// now. The broker forwards one session's messages in the order it
    /// accepted them (MQTT 3.1.1 section 4.6), so whatever was published
    /// before the fence comes before it: "nothing more arrived" is shown
    /// without taking a quiet period as proof.
    pub fn fence(&mut self) -> Vec<Received> {
        let probe = self
            .publish_probe()
            .expect("mosquitto_pub could not publish a fence");
        self.until_probe(&probe, DEADLINE)
            .unwrap_or_else(|| panic!("the fence did not come back within {DEADLINE:?}"))
    }

    /// Publishes a probe with a payload of its own (QoS 1: the broker has
    /// accepted it when mosquitto_pub exits successfully).
    fn publish_probe(&mut self) -> Option<String> {
        self.probes += 1;
        let payload = format!("probe-{}", self.probes);
        let ok = Command::new("ip")
            .args(["netns", "exec", &self.ns, "mosquitto_pub"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q", "1"])
            .args(["-t", PROBE_TOPIC, "-m", &payload])
            .status()
            .expect("mosquitto_pub")
            .success();
        ok.then_some(payload)
    }

    /// The messages before the probe `payload`, or None if it did not come
    /// within `limit`.
    fn until_probe(&self, payload: &str, limit: Duration) -> Option<Vec<Received>> {
        let fence = format!("{PROBE_TOPIC}|{payload}|");
        let deadline = Instant::now() + limit;
        let mut got = Vec::new();
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = self.lines.recv_timeout(left).ok()?;
            if line.starts_with(&fence) {
                return Some(got);
            }
            got.extend(parse(&line));
        }
    }
}

fn parse(line: &str) -> Option<Received> {
    let mut parts = line.splitn(3, '|');
    let topic = parts.next()?.to_owned();
    if topic == PROBE_TOPIC {
        return None;
    }
    Some(Received {
        topic,
        payload: parts.next().unwrap_or("").to_owned(),
        content_type: parts.next().unwrap_or("").to_owned(),
    })
}

impl Drop for MosquittoSub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Publishes `payload` on `topic` with mosquitto_pub (MQTT 5, QoS 1: the
/// broker took it when this returns) from inside `ns`; each of `props` is a
/// PUBLISH property as mosquitto_pub's `-D publish` takes it, e.g.
/// "user-property method PUT" or "response-topic app/r1".
pub fn mosquitto_pub(ns: &Netns, topic: &str, payload: &str, props: &[&str]) {
    let mut cmd = ns.command("mosquitto_pub");
    cmd.args(["-h", "127.0.0.1", "-V", "mqttv5", "-q", "1"])
        .args(["-t", topic, "-m", payload]);
    for p in props {
        cmd.args(["-D", "publish"]).args(p.split(' '));
    }
    let status = cmd
        .status()
        .expect("mosquitto_pub (Debian package mosquitto-clients)");
    assert!(
        status.success(),
        "mosquitto_pub -t {topic} failed: {status}"
    );
}

/// An MQTT 3.1.1 client speaking raw bytes.
/// An MQTT packet: first byte, remaining length, body (section 2.2).
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    let mut len = body.len();
    loop {
        let mut b = (len & 0x7f) as u8;
        len >>= 7;
        if len > 0 {
            b |= 0x80;
        }
        p.push(b);
        if len == 0 {
            break;
        }
    }
    p.extend_from_slice(body);
    p
}

pub struct RawClient {
    pub stream: TcpStream,
}

impl RawClient {
    pub fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).expect("connect to the broker");
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        RawClient { stream }
    }

    /// A client whose receive buffer is `bytes` (set before connecting, so
    /// TCP autotuning is off): one that stops reading backs up at once,
    /// whatever the host's tcp_rmem.
    pub fn connect_with_receive_buffer(addr: SocketAddr, bytes: usize) -> RawClient {
        let domain = socket2::Domain::for_address(addr);
        let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(bytes).unwrap();
        socket.connect(&addr.into()).expect("connect to the broker");
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        RawClient { stream }
    }

    /// CONNECT (clean session, keep-alive 60 s) and read the CONNACK return code.
    pub fn handshake(&mut self, client_id: &str) -> u8 {
        self.mqtt_connect(client_id, true, 60).1
    }

    /// CONNECT with the given Clean Session flag and keep-alive; returns
    /// (session present, return code).
    pub fn mqtt_connect(&mut self, client_id: &str, clean: bool, keep_alive: u16) -> (bool, u8) {
        let ka = keep_alive.to_be_bytes();
        let flags = if clean { 0x02 } else { 0x00 };
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, ka[0], ka[1]];
        body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
        body.extend_from_slice(client_id.as_bytes());
        self.send_packet(0x10, &body);
        let mut ack = [0u8; 4];
        self.stream.read_exact(&mut ack).expect("CONNACK");
        assert_eq!(ack[0], 0x20, "CONNACK expected, got {ack:?}");
        (ack[2] & 1 == 1, ack[3])
    }

    /// Reads one PUBLISH: (DUP, QoS, packet id, topic, payload).
    pub fn read_publish(&mut self) -> (bool, u8, u16, String, Vec<u8>) {
        let (first, body) = self.read_packet("PUBLISH");
        assert_eq!(first >> 4, 3, "PUBLISH expected, got {first:#x}");
        let qos = (first >> 1) & 3;
        let tlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let topic = String::from_utf8(body[2..2 + tlen].to_vec()).unwrap();
        let mut at = 2 + tlen;
        let id = if qos > 0 {
            at += 2;
            u16::from_be_bytes([body[at - 2], body[at - 1]])
        } else {
            0
        };
        (first & 0x08 != 0, qos, id, topic, body[at..].to_vec())
    }

    /// Reads one packet: its first byte and its body.
    fn read_packet(&mut self, expected: &str) -> (u8, Vec<u8>) {
        let mut first = [0u8; 1];
        self.stream.read_exact(&mut first).expect(expected);
        let mut len = 0usize;
        for i in 0..4 {
            let mut b = [0u8; 1];
            self.stream.read_exact(&mut b).unwrap();
            len |= usize::from(b[0] & 0x7f) << (7 * i);
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).unwrap();
        (first[0], body)
    }

    /// PUBLISH at QoS 0.
    pub fn publish(&mut self, topic: &str, payload: &[u8]) {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(payload);
        self.send_packet(0x30, &body);
    }

    /// PUBLISH at QoS 1 with packet id `id` (the PUBACK is not read).
    pub fn publish_qos1(&mut self, topic: &str, payload: &[u8], id: u16) {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(&id.to_be_bytes());
        body.extend_from_slice(payload);
        self.send_packet(0x32, &body);
    }

    /// Reads a PUBACK; returns its packet id.
    pub fn read_puback(&mut self) -> u16 {
        let (first, body) = self.read_packet("PUBACK");
        assert_eq!(first, 0x40, "PUBACK expected, got {first:#x}");
        u16::from_be_bytes([body[0], body[1]])
    }

    /// PINGREQ, and waits for the PINGRESP.
    pub fn ping(&mut self) {
        self.send_packet(0xc0, &[]);
        let (first, _) = self.read_packet("PINGRESP");
        assert_eq!(first, 0xd0, "PINGRESP expected, got {first:#x}");
    }

    /// Whether nothing from the server is waiting to be read right now.
    pub fn nothing_to_read(&mut self) -> bool {
        self.stream.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        let idle = matches!(self.stream.peek(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        self.stream.set_nonblocking(false).unwrap();
        idle
    }

    pub fn puback(&mut self, id: u16) {
        self.send_packet(0x40, &id.to_be_bytes());
    }

    pub fn disconnect(&mut self) {
        self.send_packet(0xe0, &[]);
    }

    /// SUBSCRIBE to one filter at `qos`; returns the SUBACK code.
    pub fn subscribe(&mut self, filter: &str, qos: u8) -> u8 {
        let mut body = vec![0, 1];
        body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
        body.extend_from_slice(filter.as_bytes());
        body.push(qos);
        self.send_packet(0x82, &body);
        let mut ack = [0u8; 5];
        self.stream.read_exact(&mut ack).expect("SUBACK");
        assert_eq!(ack[0], 0x90, "SUBACK expected, got {ack:?}");
        ack[4]
    }

    /// One SUBSCRIBE of every filter at `qos` (packet id `id`); the SUBACK's
    /// return codes, one per filter.
    pub fn subscribe_all(&mut self, id: u16, filters: &[String], qos: u8) -> Vec<u8> {
        let mut body = id.to_be_bytes().to_vec();
        for filter in filters {
            body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
            body.extend_from_slice(filter.as_bytes());
            body.push(qos);
        }
        self.send_packet(0x82, &body);
        let (first, mut ack) = self.read_packet("SUBACK");
        assert_eq!(first, 0x90, "SUBACK expected, got {first:#x}");
        assert_eq!(&ack[..2], &id.to_be_bytes(), "SUBACK for another packet");
        ack.split_off(2)
    }

    fn send_packet(&mut self, first: u8, body: &[u8]) {
        self.stream
            .write_all(&packet(first, body))
            .expect("write to the broker");
    }

    /// Whether the server has closed the connection (read returns 0 or an error).
    pub fn closed_by_server(&mut self) -> bool {
        let mut buf = [0u8; 256];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => {
                    return e.kind() != std::io::ErrorKind::WouldBlock
                        && e.kind() != std::io::ErrorKind::TimedOut
                }
            }
        }
    }
}

/// A real Mosquitto broker inside a namespace, on 127.0.0.1:`port`, with
/// persistence in its own directory (so persistent sessions survive a stop).
/// `user root`: started as root, Mosquitto would otherwise switch to the
/// `mosquitto` user, which cannot write the test's directory.
pub struct Mosquitto {
    child: Option<Child>,
    dir: std::path::PathBuf,
    ns_name: String,
    pub port: u16,
}

impl Mosquitto {
    pub fn start(ns: &Netns, port: u16) -> Mosquitto {
        let dir = std::env::temp_dir().join(format!("m2m-mosquitto-{}-{port}", ns.name()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut m = Mosquitto {
            child: None,
            dir,
            ns_name: ns.name().to_owned(),
            port,
        };
        m.restart(ns);
        m
    }

    /// The broker's process id (for CPU accounting).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("mosquitto runs").id()
    }

    /// (Re)starts the broker with the same persistence directory.
    pub fn restart(&mut self, ns: &Netns) {
        assert_eq!(ns.name(), self.ns_name);
        let conf = self.dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "user root\nlistener {} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 100000\nlog_dest none\n",
                self.port,
                self.dir.display()
            ),
        )
        .unwrap();
        let child = ns
            .command("mosquitto")
            .args(["-c", conf.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (Debian package mosquitto)");
        self.child = Some(child);
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let deadline = Instant::now() + Duration::from_secs(10);
        while ns.run(|| TcpStream::connect(addr).is_err()) {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM (Mosquitto saves its sessions) and wait.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
