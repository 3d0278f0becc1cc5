//! The load generator: many simulated CoAP devices, each with its own
//! source address and port, sending POSTs with sendmmsg(2) at a target rate
//! or flat out, over IPv4, IPv6 or both.
//!
//! Addresses: the simulated devices live in 10.78.0.0/16 and fd78::/64. The
//! device namespace holds those prefixes as `local` routes on `lo` (Linux
//! "AnyIP": every address of a local route is local, so it may be a source
//! and replies to it are delivered) and the gateway routes them back through
//! the veth. One socket sends for many devices: the source address of each
//! datagram is chosen with IP_PKTINFO / IPV6_PKTINFO (ip(7), ipv6(7)), so a
//! batch of 64 datagrams goes out from 64 devices in one system call.
//! IP_FREEBIND lets the IPv6 socket use addresses that only a route, not an
//! interface, makes local (the IPv6 pktinfo check otherwise refuses them).
//!
//! Each datagram is a CoAP POST (RFC 7252 §3) to Uri-Path "x" whose payload
//! starts with the device number, its per-device sequence number (from 1)
//! and the CLOCK_MONOTONIC send time in nanoseconds, then padding up to the
//! chosen size: the subscriber derives latency and per-device loss from it.
//! The CoAP Message ID is the sequence number's low 16 bits, so a device
//! may send up to 65,535 messages per run before the router's duplicate
//! detection (RFC 7252 §4.5, 247 s) would rightly drop one.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use m2m_router_tests::netns::{RawSender, Topology, DEV_V4, DEV_V6};
use m2m_router_tests::packet::UdpFrame;

/// The simulated devices' IPv4 prefix (/16).
pub const SIM_V4: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 0);
/// The simulated devices' IPv6 prefix (/64).
pub const SIM_V6: Ipv6Addr = Ipv6Addr::new(0xfd78, 0, 0, 0, 0, 0, 0, 0);
/// Datagrams per sendmmsg(2) call.
const BATCH: usize = 64;
/// Sockets (source ports) per address family and sender thread.
const SOCKETS: usize = 16;
/// Largest payload: the datagram stays within the IPv6 minimum MTU.
pub const MAX_PAYLOAD: usize = 1200;
/// Header of every payload: device u32, sequence u32, send time u64.
pub const STAMP_LEN: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
    /// Even devices IPv4, odd devices IPv6.
    Mixed,
}

impl std::str::FromStr for Family {
    type Err = String;
    fn from_str(s: &str) -> Result<Family, String> {
        match s {
            "v4" => Ok(Family::V4),
            "v6" => Ok(Family::V6),
            "mixed" => Ok(Family::Mixed),
            other => Err(format!("{other:?}: v4, v6 or mixed")),
        }
    }
}

/// What to offer.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub devices: usize,
    pub family: Family,
    /// Share of confirmable messages, in percent; the rest are NON.
    pub con_percent: u32,
    /// Payload sizes in bytes (each at least STAMP_LEN), used in turn.
    pub payload_sizes: Vec<usize>,
    /// Messages per second over all devices; 0 for flat out.
    pub rate: f64,
    /// The longest the run lasts.
    pub duration: Duration,
    /// Messages each device sends, if the run is to end on a count (a test
    /// decides what is sent, not how fast the machine is) rather than on
    /// the duration.
    pub per_device: Option<u32>,
    pub threads: usize,
    /// After the last send, how long to wait for the ACKs of the CONs still
    /// unanswered (the wait ends early when every CON has its ACK).
    pub ack_wait: Duration,
}

/// What was offered.
#[derive(Debug, Default)]
pub struct Offered {
    pub sent: u64,
    /// Messages sent by each device (its last sequence number).
    pub per_device: Vec<u32>,
    /// Confirmable messages among those sent.
    pub cons: u64,
    /// CoAP ACKs the devices received (answers to their CON messages).
    pub acks: u64,
    /// Datagrams the kernel refused (e.g. a full socket buffer).
    pub send_errors: u64,
    pub seconds: f64,
}

/// The source address of device `i`.
pub fn device_addr(i: usize, family: Family) -> IpAddr {
    let v6 = match family {
        Family::V4 => false,
        Family::V6 => true,
        Family::Mixed => i % 2 == 1,
    };
    // Host numbers from 1: avoid the subnet-router anycast / network address.
    let host = i as u32 + 1;
    if v6 {
        IpAddr::V6(Ipv6Addr::from(u128::from(SIM_V6) | u128::from(host)))
    } else {
        IpAddr::V4(Ipv4Addr::from(u32::from(SIM_V4) | (host & 0xffff)))
    }
}

/// Routes the simulated prefixes: local in the device namespace, via the
/// device's first address in the gateway namespace (whose neighbour entry
/// the topology made static).
pub fn route_devices(topo: &Topology) {
    topo.dev.ip(&[
        "route",
        "add",
        "local",
        &format!("{SIM_V4}/16"),
        "dev",
        "lo",
    ]);
    topo.dev.ip(&[
        "-6",
        "route",
        "add",
        "local",
        &format!("{SIM_V6}/64"),
        "dev",
        "lo",
    ]);
    topo.gw.ip(&[
        "route",
        "add",
        &format!("{SIM_V4}/16"),
        "via",
        &DEV_V4[0].to_string(),
    ]);
    topo.gw.ip(&[
        "-6",
        "route",
        "add",
        &format!("{SIM_V6}/64"),
        "via",
        &DEV_V6[0].to_string(),
    ]);
}

pub fn monotonic_ns() -> u64 {
    // SAFETY: clock_gettime writes the timespec we own.
    let mut ts: libc::timespec = unsafe { zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Offers `spec` to `v4`/`v6` (the router's CoAP endpoints) from the device
/// namespace until the duration passes or `stop` is set.
pub fn offer(
    topo: &Topology,
    spec: &LoadSpec,
    v4: SocketAddr,
    v6: SocketAddr,
    stop: &AtomicBool,
) -> io::Result<Offered> {
    let sizes = STAMP_LEN..=MAX_PAYLOAD;
    if spec.payload_sizes.is_empty() || !spec.payload_sizes.iter().all(|s| sizes.contains(s)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("payload sizes must be {STAMP_LEN}..={MAX_PAYLOAD} bytes"),
        ));
    }
    if spec.devices == 0 || spec.devices > 0xffff {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "devices: 1..=65535 (one IPv4 /16)",
        ));
    }
    let threads = spec.threads.clamp(1, spec.devices.max(1));
    let senders = (0..threads)
        .map(|t| {
            let devices: Vec<usize> = (t..spec.devices).step_by(threads).collect();
            topo.dev.run(|| Sender::new(spec, devices, v4, v6))
        })
        .collect::<io::Result<Vec<Sender>>>()?;
    let start = Instant::now();
    let results: Vec<Offered> = std::thread::scope(|s| {
        let handles: Vec<_> = senders
            .into_iter()
            .map(|sender| s.spawn(move || sender.run(spec, threads, start, stop)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut total = Offered {
        per_device: vec![0; spec.devices],
        ..Offered::default()
    };
    for (t, r) in results.into_iter().enumerate() {
        total.sent += r.sent;
        total.acks += r.acks;
        total.cons += r.cons;
        total.send_errors += r.send_errors;
        for (k, n) in r.per_device.into_iter().enumerate() {
            total.per_device[t + k * threads] = n;
        }
        total.seconds = total.seconds.max(r.seconds);
    }
    Ok(total)
}

/// One device's state.
struct Device {
    number: u32,
    addr: IpAddr,
    seq: u32,
}

/// The devices one socket sends for, taken in turn.
struct Port {
    fd: OwnedFd,
    dst: SocketAddr,
    devices: Vec<Device>,
    next: usize,
}

struct Sender {
    ports: Vec<Port>,
}

impl Sender {
    fn new(
        spec: &LoadSpec,
        devices: Vec<usize>,
        v4: SocketAddr,
        v6: SocketAddr,
    ) -> io::Result<Sender> {
        let mut by_family: [Vec<Device>; 2] = [Vec::new(), Vec::new()];
        for i in devices {
            let addr = device_addr(i, spec.family);
            by_family[usize::from(addr.is_ipv6())].push(Device {
                number: i as u32,
                addr,
                seq: 0,
            });
        }
        let mut ports = Vec::new();
        for (is_v6, devices) in by_family.into_iter().enumerate() {
            let n = SOCKETS.min(devices.len());
            let mut groups: Vec<Vec<Device>> = (0..n).map(|_| Vec::new()).collect();
            for (k, d) in devices.into_iter().enumerate() {
                groups[k % n].push(d);
            }
            for devices in groups {
                ports.push(Port {
                    fd: device_socket(is_v6 == 1)?,
                    dst: if is_v6 == 1 { v6 } else { v4 },
                    devices,
                    next: 0,
                });
            }
        }
        Ok(Sender { ports })
    }

    fn run(
        mut self,
        spec: &LoadSpec,
        threads: usize,
        start: Instant,
        stop: &AtomicBool,
    ) -> Offered {
        let rate = spec.rate / threads as f64;
        let mut out = Offered::default();
        let mut batch = Batch::new();
        let mut acks = AckReader::new();
        let mut turn = 0usize;
        let devices: usize = self.ports.iter().map(|p| p.devices.len()).sum();
        let mut unsent = spec.per_device.map(|m| u64::from(m) * devices as u64);
        let ended = loop {
            let elapsed = start.elapsed();
            if elapsed >= spec.duration || stop.load(Ordering::Relaxed) || unsent == Some(0) {
                break elapsed.min(spec.duration);
            }
            let due = if rate > 0.0 {
                (rate * elapsed.as_secs_f64()) as u64
            } else {
                u64::MAX
            };
            if out.sent + out.send_errors >= due {
                // Sleep rather than spin while ahead of schedule: a spinning
                // generator would take a core from the system under test.
                std::thread::sleep(Duration::from_micros(100));
                continue;
            }
            let n = (due - out.sent - out.send_errors).min(BATCH as u64) as usize;
            let ports = self.ports.len();
            let port = &mut self.ports[turn];
            turn = (turn + 1) % ports;
            batch.fill(port, n, spec);
            let n = batch.count;
            if n == 0 {
                continue; // this port's devices have all sent their count
            }
            if let Some(unsent) = &mut unsent {
                *unsent -= n as u64;
            }
            match batch.send(&port.fd, port.dst) {
                Ok(k) => {
                    out.sent += k as u64;
                    out.cons += batch.con[..k].iter().filter(|&&c| c).count() as u64;
                    // Datagrams after the first refused one were not sent;
                    // count them as errors so pacing moves on.
                    out.send_errors += (n - k) as u64;
                }
                Err(_) => out.send_errors += n as u64,
            }
            out.acks += acks.drain(&port.fd);
        };
        // Late ACKs for the last batches.
        let ack_deadline = Instant::now() + spec.ack_wait;
        while out.acks < out.cons && Instant::now() < ack_deadline {
            for port in &self.ports {
                out.acks += acks.drain(&port.fd);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        out.seconds = ended.as_secs_f64();
        let mut per_device: Vec<(u32, u32)> = self
            .ports
            .iter()
            .flat_map(|p| p.devices.iter().map(|d| (d.number, d.seq)))
            .collect();
        per_device.sort_unstable();
        out.per_device = per_device.into_iter().map(|(_, seq)| seq).collect();
        out
    }
}

/// The prefix of the devices a flood run configures as legitimate peers:
/// the flood's unknown sources lie in the simulated /16 but outside it.
pub const LEGIT_V4_PREFIX: &str = "10.78.0.0/17";

/// Sends junk flat out from `threads` threads until `stop`: valid CoAP from
/// unknown sources (10.78.200.x), CoAP with a bad version from legitimate
/// devices' own addresses, and 3-byte garbage (10.78.201.x), all to `dst`
/// port 5683. The frames are prebuilt and sent with sendmmsg on an
/// AF_PACKET socket that bypasses the qdisc (packet(7),
/// PACKET_QDISC_BYPASS): a flood needs no socket, route or neighbour of
/// its own, so the generator spends its time where the gateway receives.
/// Returns how many frames went out.
pub fn flood(topo: &Topology, dst: Ipv4Addr, threads: usize, stop: &AtomicBool) -> u64 {
    let frames: Vec<Vec<u8>> = (0..BATCH)
        .map(|k| {
            let (src, datagram): (Ipv4Addr, &[u8]) = match k % 3 {
                0 => (
                    Ipv4Addr::new(10, 78, 200, k as u8),
                    b"\x50\x02\x00\x01\xb1x\xffjunk",
                ),
                1 => (
                    Ipv4Addr::new(10, 78, 0, 1 + k as u8),
                    b"\x90\x02\x00\x01\xb1x\xffjunk",
                ),
                _ => (Ipv4Addr::new(10, 78, 201, k as u8), b"\xff\x00\x01"),
            };
            UdpFrame::new(
                src.into(),
                dst.into(),
                40000 + k as u16,
                5683,
                datagram.to_vec(),
            )
            .build()
        })
        .collect();
    let senders: Vec<RawSender> = (0..threads).map(|_| topo.raw_sender()).collect();
    let frames = &frames;
    std::thread::scope(|s| {
        let handles: Vec<_> = senders
            .into_iter()
            .map(|raw| {
                s.spawn(move || {
                    let mut sent = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        sent += raw.send_many(frames) as u64;
                    }
                    sent
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    })
}

/// A UDP socket bound to the wildcard address and a kernel-chosen port,
/// allowed to send from any address a local route covers.
fn device_socket(v6: bool) -> io::Result<OwnedFd> {
    let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket syscalls on a descriptor we own; results checked.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let set = |level, name| {
            let rc = libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as u32,
            );
            if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        set(libc::SOL_IP, libc::IP_FREEBIND)?;
        let rc = if v6 {
            set(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)?;
            let addr: libc::sockaddr_in6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                ..zeroed()
            };
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_in6).cast(),
                size_of::<libc::sockaddr_in6>() as u32,
            )
        } else {
            let addr: libc::sockaddr_in = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                ..zeroed()
            };
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// Room for one IP_PKTINFO or IPV6_PKTINFO control message.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Control([u8; 64]);

/// The sendmmsg(2) arrays, reused from batch to batch.
struct Batch {
    datagrams: Vec<[u8; 1280]>,
    lens: Vec<usize>,
    sources: Vec<IpAddr>,
    con: Vec<bool>,
    control: Vec<Control>,
    iov: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    count: usize,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            datagrams: vec![[0; 1280]; BATCH],
            lens: vec![0; BATCH],
            sources: vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED); BATCH],
            con: vec![false; BATCH],
            control: vec![Control([0; 64]); BATCH],
            // SAFETY: iovec and mmsghdr are plain C structs; all-zero is valid.
            iov: vec![unsafe { zeroed() }; BATCH],
            headers: vec![unsafe { zeroed() }; BATCH],
            count: 0,
        }
    }

    /// The next `n` datagrams of `port`'s devices, in turn.
    /// Up to `n` datagrams from the port's devices in turn, skipping those
    /// that have sent `spec.per_device` already.
    fn fill(&mut self, port: &mut Port, n: usize, spec: &LoadSpec) {
        let devices = port.devices.len();
        let mut k = 0;
        let mut passed_over = 0;
        while k < n && passed_over < devices {
            let device = &mut port.devices[port.next];
            port.next = (port.next + 1) % devices;
            if spec.per_device.is_some_and(|limit| device.seq >= limit) {
                passed_over += 1;
                continue;
            }
            passed_over = 0;
            device.seq += 1;
            let seq = device.seq;
            let size = spec.payload_sizes
                [(seq as usize + device.number as usize) % spec.payload_sizes.len()];
            // Spread CON and NON evenly over devices and time.
            let con = (seq.wrapping_mul(37).wrapping_add(device.number) % 100) < spec.con_percent;
            let buf = &mut self.datagrams[k];
            // RFC 7252 §3: version 1, type, token length 2; POST; Message ID.
            buf[0] = 0x40 | if con { 0x00 } else { 0x10 } | 2;
            buf[1] = 0x02;
            buf[2..4].copy_from_slice(&(seq as u16).to_be_bytes());
            buf[4..6].copy_from_slice(&(device.number as u16).to_be_bytes());
            // Uri-Path (option 11) "x", then the payload marker.
            buf[6] = 0xb1;
            buf[7] = b'x';
            buf[8] = 0xff;
            let p = &mut buf[9..9 + size];
            p[0..4].copy_from_slice(&device.number.to_be_bytes());
            p[4..8].copy_from_slice(&seq.to_be_bytes());
            p[8..16].copy_from_slice(&monotonic_ns().to_be_bytes());
            self.lens[k] = 9 + size;
            self.sources[k] = device.addr;
            self.con[k] = con;
            k += 1;
        }
        self.count = k;
    }

    /// sendmmsg of the filled datagrams; how many the kernel took.
    fn send(&mut self, fd: &OwnedFd, dst: SocketAddr) -> io::Result<usize> {
        let (dst, dst_len) = sockaddr(dst);
        for k in 0..self.count {
            self.iov[k] = libc::iovec {
                iov_base: self.datagrams[k].as_mut_ptr().cast(),
                iov_len: self.lens[k],
            };
            let control_len = pktinfo(&mut self.control[k], self.sources[k]);
            // SAFETY: msghdr is a plain C struct; the pointers set below
            // stay valid until sendmmsg returns.
            let mut h: libc::msghdr = unsafe { zeroed() };
            h.msg_name = (&dst as *const libc::sockaddr_storage).cast_mut().cast();
            h.msg_namelen = dst_len;
            h.msg_iov = &mut self.iov[k];
            h.msg_iovlen = 1;
            h.msg_control = self.control[k].0.as_mut_ptr().cast();
            h.msg_controllen = control_len;
            self.headers[k] = libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            };
        }
        // SAFETY: headers[..count] point into buffers owned by self and dst.
        let rc = unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                self.headers.as_mut_ptr(),
                self.count as u32,
                0,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc as usize)
        }
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, u32) {
    // SAFETY: sockaddr_storage is large enough and aligned for both kinds.
    unsafe {
        let mut s: libc::sockaddr_storage = zeroed();
        match addr {
            SocketAddr::V4(a) => {
                let sin = &mut *(&mut s as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                sin.sin_family = libc::AF_INET as u16;
                sin.sin_port = a.port().to_be();
                sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
                (s, size_of::<libc::sockaddr_in>() as u32)
            }
            SocketAddr::V6(a) => {
                let sin6 =
                    &mut *(&mut s as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                sin6.sin6_family = libc::AF_INET6 as u16;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_addr.s6_addr = a.ip().octets();
                (s, size_of::<libc::sockaddr_in6>() as u32)
            }
        }
    }
}

/// Writes the control message choosing `src` as the source address; its length.
fn pktinfo(control: &mut Control, src: IpAddr) -> usize {
    // SAFETY: the CMSG_* arithmetic stays inside the 64-byte buffer, which
    // is aligned for cmsghdr; both pktinfo structs fit in it.
    unsafe {
        let (level, kind, len) = match src {
            IpAddr::V4(_) => (
                libc::SOL_IP,
                libc::IP_PKTINFO,
                size_of::<libc::in_pktinfo>(),
            ),
            IpAddr::V6(_) => (
                libc::SOL_IPV6,
                libc::IPV6_PKTINFO,
                size_of::<libc::in6_pktinfo>(),
            ),
        };
        let space = libc::CMSG_SPACE(len as u32) as usize;
        let mut h: libc::msghdr = zeroed();
        h.msg_control = control.0.as_mut_ptr().cast();
        h.msg_controllen = space;
        let c = libc::CMSG_FIRSTHDR(&h);
        (*c).cmsg_level = level;
        (*c).cmsg_type = kind;
        (*c).cmsg_len = libc::CMSG_LEN(len as u32) as usize;
        let data = libc::CMSG_DATA(c);
        match src {
            IpAddr::V4(a) => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(a).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(data.cast(), info);
            }
            IpAddr::V6(a) => {
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: a.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                std::ptr::write_unaligned(data.cast(), info);
            }
        }
        space
    }
}

/// Reads the devices' answers without blocking: every CoAP ACK counts.
struct AckReader {
    buffers: Vec<[u8; 64]>,
    iov: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl AckReader {
    fn new() -> AckReader {
        let mut r = AckReader {
            buffers: vec![[0; 64]; BATCH],
            // SAFETY: plain C structs; all-zero is valid.
            iov: vec![unsafe { zeroed() }; BATCH],
            headers: vec![unsafe { zeroed() }; BATCH],
        };
        for k in 0..BATCH {
            r.iov[k] = libc::iovec {
                iov_base: r.buffers[k].as_mut_ptr().cast(),
                iov_len: 64,
            };
            r.headers[k].msg_hdr.msg_iov = &mut r.iov[k];
            r.headers[k].msg_hdr.msg_iovlen = 1;
        }
        r
    }

    fn drain(&mut self, fd: &OwnedFd) -> u64 {
        let mut acks = 0;
        loop {
            // SAFETY: headers point at iov/buffers owned by self (their heap
            // storage does not move).
            let rc = unsafe {
                libc::recvmmsg(
                    fd.as_raw_fd(),
                    self.headers.as_mut_ptr(),
                    BATCH as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if rc <= 0 {
                return acks;
            }
            for k in 0..rc as usize {
                // RFC 7252 §3: type in bits 4-5; 2 = ACK.
                if self.headers[k].msg_len >= 4 && (self.buffers[k][0] >> 4) & 3 == 2 {
                    acks += 1;
                }
            }
            if (rc as usize) < BATCH {
                return acks;
            }
        }
    }
}
