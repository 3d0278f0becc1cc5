//! Network namespaces for privileged tests: a device namespace and a gateway
//! namespace joined by a veth pair, both removed when the guard drops.
//! Nothing here touches the root namespace's interfaces.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::packet::{DEV_MAC, GW_MAC};

/// The veth end in the device namespace.
pub const DEV_IF: &str = "vd";
/// The veth end in the gateway namespace (XDP attaches here).
pub const GW_IF: &str = "vg";

pub const GW_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 255, 254);
pub const GW_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0xfffe);
/// Source addresses on the device side. Tests give them roles through the
/// config: e.g. `DEV_V4[0]` an allowed peer, `DEV_V4[1]` a denied one.
pub const DEV_V4: [Ipv4Addr; 4] = [
    Ipv4Addr::new(10, 77, 0, 1),
    Ipv4Addr::new(10, 77, 1, 1),
    Ipv4Addr::new(10, 77, 2, 1),
    Ipv4Addr::new(10, 77, 3, 1),
];
pub const DEV_V6: [Ipv6Addr; 4] = [
    Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 1, 1),
    Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 2, 1),
    Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 3, 1),
];

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running `ip` (Debian package iproute2)");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `m2m-<tag>-<pid>-<n>` with its loopback up.
    pub fn create(tag: &str) -> Netns {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "m2m-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <this namespace> ARGS`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// A command run inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets it
    /// creates stay in the namespace and may be used from any thread after.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter();
                f()
            })
            .join()
            .expect("the thread inside the namespace panicked")
        })
    }

    fn enter(&self) {
        let path = format!("/var/run/netns/{}", self.name);
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on a namespace fd moves only the calling thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Device namespace --veth-- gateway namespace.
pub struct Topology {
    pub dev: Netns,
    pub gw: Netns,
}

impl Topology {
    pub fn new(tag: &str) -> Topology {
        let dev = Netns::create(tag);
        let gw = Netns::create(tag);
        let dev_mac = mac(DEV_MAC);
        let gw_mac = mac(GW_MAC);
        dev.ip(&[
            "link",
            "add",
            DEV_IF,
            "address",
            &dev_mac,
            "type",
            "veth",
            "peer",
            "name",
            GW_IF,
            "address",
            &gw_mac,
            "netns",
            gw.name(),
        ]);
        for (v4, v6) in DEV_V4.iter().zip(DEV_V6.iter()) {
            dev.ip(&["addr", "add", &format!("{v4}/16"), "dev", DEV_IF]);
            dev.ip(&["addr", "add", &format!("{v6}/64"), "dev", DEV_IF, "nodad"]);
        }
        gw.ip(&["addr", "add", &format!("{GW_V4}/16"), "dev", GW_IF]);
        gw.ip(&["addr", "add", &format!("{GW_V6}/64"), "dev", GW_IF, "nodad"]);
        // Static neighbours: no ARP/ND round trips, no lost first packets.
        dev.ip(&[
            "neigh",
            "add",
            &GW_V4.to_string(),
            "lladdr",
            &gw_mac,
            "dev",
            DEV_IF,
        ]);
        dev.ip(&[
            "neigh",
            "add",
            &GW_V6.to_string(),
            "lladdr",
            &gw_mac,
            "dev",
            DEV_IF,
        ]);
        for (v4, v6) in DEV_V4.iter().zip(DEV_V6.iter()) {
            gw.ip(&[
                "neigh",
                "add",
                &v4.to_string(),
                "lladdr",
                &dev_mac,
                "dev",
                GW_IF,
            ]);
            gw.ip(&[
                "neigh",
                "add",
                &v6.to_string(),
                "lladdr",
                &dev_mac,
                "dev",
                GW_IF,
            ]);
        }
        dev.ip(&["link", "set", DEV_IF, "up"]);
        gw.ip(&["link", "set", GW_IF, "up"]);
        Topology { dev, gw }
    }

    /// A UDP socket in the device namespace bound to `src` (port chosen by the kernel).
    pub fn device_socket(&self, src: IpAddr) -> UdpSocket {
        self.dev
            .run(|| UdpSocket::bind(SocketAddr::new(src, 0)).expect("bind device socket"))
    }

    /// A UDP socket in the gateway namespace on `addr` (read it with
    /// [`receive`]), with a [`deep_receive_buffer`].
    pub fn gateway_socket(&self, addr: SocketAddr) -> UdpSocket {
        let sock = self
            .gw
            .run(|| UdpSocket::bind(addr).expect("bind gateway socket"));
        deep_receive_buffer(&sock);
        sock
    }

    /// An AF_PACKET socket on the device's veth, for frames no UDP socket
    /// would send (bad lengths, fragments, VLAN tags).
    pub fn raw_sender(&self) -> RawSender {
        self.dev.run(RawSender::open)
    }
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Sends whole Ethernet frames out of the device veth.
pub struct RawSender {
    fd: OwnedFd,
    ifindex: i32,
}

impl RawSender {
    fn open() -> RawSender {
        let name = std::ffi::CString::new(DEV_IF).unwrap();
        // SAFETY: plain syscalls with checked results.
        unsafe {
            let ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            assert!(ifindex > 0, "no interface {DEV_IF} in the device namespace");
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let fd = OwnedFd::from_raw_fd(fd);
            // Straight to the driver (packet(7)): no qdisc between a test
            // or a flood and the veth.
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            );
            RawSender { fd, ifindex }
        }
    }

    /// The gateway end of the veth, as a packet(7) address.
    fn gateway(&self) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain data, zeroed then filled.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&GW_MAC);
        addr
    }

    /// Sends `frames` with one sendmmsg(2); how many the kernel took.
    pub fn send_many(&self, frames: &[Vec<u8>]) -> usize {
        let mut addr = self.gateway();
        let mut iov: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr().cast_mut().cast(),
                iov_len: f.len(),
            })
            .collect();
        let mut headers: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|iov| {
                // SAFETY: mmsghdr is plain data; all-zero is valid.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_iov = iov;
                h.msg_hdr.msg_iovlen = 1;
                h.msg_hdr.msg_name = (&mut addr as *mut libc::sockaddr_ll).cast();
                h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                h
            })
            .collect();
        // SAFETY: the headers point at `frames`, `iov` and `addr`, all alive
        // until sendmmsg returns.
        let rc = unsafe {
            libc::sendmmsg(
                self.fd.as_raw_fd(),
                headers.as_mut_ptr(),
                headers.len() as u32,
                0,
            )
        };
        rc.max(0) as usize
    }

    pub fn send(&self, frame: &[u8]) {
        let addr = self.gateway();
        // SAFETY: plain sendto on our socket with a filled sockaddr_ll.
        unsafe {
            let rc = libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(
                rc as usize,
                frame.len(),
                "sendto: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// How long a test waits for an event before it fails: generous, because a
/// loaded machine can be slow, and never a reason to pass.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `check` until it returns true or `timeout` passes.
/// Gives `sock` a 16 MiB receive buffer, set with SO_RCVBUFFORCE
/// (socket(7); root may exceed rmem_max): what a test is sent is never
/// lost because the test read it late.
pub fn deep_receive_buffer(sock: &UdpSocket) {
    let size: libc::c_int = 16 << 20;
    // SAFETY: setsockopt reads one c_int we own, on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
}

pub fn wait_for(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads exactly `n` datagrams from any of `socks`, failing the test if they
/// have not all arrived within [`DEADLINE`]. That nothing more arrives is for
/// the caller to show with a counter (the verdict that dropped the rest).
pub fn receive(socks: &[&UdpSocket], n: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + DEADLINE;
    for s in socks {
        s.set_nonblocking(true).expect("non-blocking socket");
    }
    while got.len() < n {
        let mut any = false;
        for s in socks {
            if let Ok(len) = s.recv(&mut buf) {
                got.push(buf[..len].to_vec());
                any = true;
            }
        }
        if !any {
            assert!(
                Instant::now() < deadline,
                "received {} of {n} datagrams within {DEADLINE:?}",
                got.len()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    got
}

/// A CON exchange as a device does it: `msg` (Message ID `mid`) is
/// retransmitted with a doubling timeout from 1 s (RFC 7252 section 4.2;
/// the router deduplicates retransmissions) until the answer with that
/// Message ID comes; late answers to earlier exchanges are skipped. Returns
/// the answer and how many transmissions it took; fails after [`DEADLINE`].
pub fn confirm(sock: &UdpSocket, dst: SocketAddr, msg: &[u8], mid: u16) -> (Vec<u8>, u32) {
    sock.send_to(msg, dst).expect("send a CON");
    await_answer(sock, dst, msg, mid)
}

/// [`confirm`] for a CON already sent once: so a test can send many at
/// once, then collect their answers.
pub fn await_answer(sock: &UdpSocket, dst: SocketAddr, msg: &[u8], mid: u16) -> (Vec<u8>, u32) {
    let deadline = Instant::now() + DEADLINE;
    let mut wait = Duration::from_secs(1);
    let mut buf = [0u8; 2048];
    sock.set_nonblocking(false).expect("blocking socket");
    for sent in 1.. {
        let round = Instant::now() + wait;
        while let Some(left) = round.checked_duration_since(Instant::now()) {
            sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let Ok(n) = sock.recv(&mut buf) else {
                break;
            };
            if n >= 4 && u16::from_be_bytes([buf[2], buf[3]]) == mid {
                return (buf[..n].to_vec(), sent);
            }
        }
        assert!(
            Instant::now() < deadline,
            "CON {mid} unanswered after {sent} transmissions in {DEADLINE:?}"
        );
        wait *= 2;
        sock.send_to(msg, dst).expect("retransmit a CON");
    }
    unreachable!()
}

/// The next datagram on `sock`, failing the test after [`DEADLINE`].
pub fn next_datagram(sock: &UdpSocket) -> Vec<u8> {
    let mut buf = [0u8; 2048];
    sock.set_nonblocking(false).expect("blocking socket");
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    let (n, _) = recv_from(sock, &mut buf)
        .unwrap_or_else(|e| panic!("no datagram within {DEADLINE:?}: {e}"));
    buf[..n].to_vec()
}

/// `recv_from`, again when a signal interrupted it (EINTR: a wait with a
/// receive timeout can return it even without a handler, e.g. when the
/// process is stopped and continued).
pub fn recv_from(sock: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    loop {
        match sock.recv_from(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}
