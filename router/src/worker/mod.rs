//! The data-plane workers: one thread per CoAP socket, batched receive and
//! send (recvmmsg / sendmmsg, Linux 2.6.33 / 3.0).
//!
//! Each listen address gets one socket per worker, all bound with
//! SO_REUSEPORT. The kernel picks the socket of a datagram by a hash of its
//! 4-tuple (`reuseport_select_sock`), which is fixed while the group of
//! sockets is: so every datagram of one peer endpoint is handled by the same
//! thread, in arrival order. That thread publishes and acknowledges in that
//! order too, which is DESIGN.md invariant 2 (per-peer order), and it owns
//! the duplicate-detection state of its peers without any lock.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::coap::uplink::Uplink;

mod secure;
pub use secure::SecureWorker;

/// Datagrams per recvmmsg/sendmmsg call.
const BATCH: usize = 32;
/// How often a worker wakes up to check for shutdown when idle.
const IDLE_WAKEUP: Duration = Duration::from_millis(200);

pub struct Workers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// A second handle on one socket per address, for sending only (the
    /// downlink): it sends from the CoAP port without joining the group.
    senders: Vec<UdpSocket>,
}

impl Workers {
    /// Binds `per_address` sockets on each address and starts a thread per
    /// socket. `uplink` makes each thread's handler.
    pub fn start(
        addresses: &[SocketAddr],
        per_address: usize,
        max_datagram: usize,
        uplink: impl Fn() -> Uplink,
    ) -> io::Result<Workers> {
        let mut sockets = Vec::new();
        for addr in addresses {
            probe_free(*addr)?;
            for _ in 0..per_address.max(1) {
                sockets.push((*addr, bind_reuseport(*addr)?));
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut senders = Vec::new();
        for addr in addresses {
            if let Some((_, s)) = sockets.iter().find(|(a, _)| a == addr) {
                senders.push(s.try_clone()?);
            }
        }
        for (i, (addr, socket)) in sockets.into_iter().enumerate() {
            let stop = stop.clone();
            let mut handler = uplink();
            let thread = std::thread::Builder::new()
                .name(format!("coap-{i}"))
                .spawn(move || {
                    if let Err(err) = serve(&socket, &mut handler, max_datagram, &stop) {
                        tracing::error!(%addr, %err, "CoAP worker stopped");
                    }
                })?;
            threads.push(thread);
        }
        Ok(Workers {
            stop,
            threads,
            senders,
        })
    }

    pub fn senders(&self) -> io::Result<Vec<UdpSocket>> {
        self.senders.iter().map(UdpSocket::try_clone).collect()
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Fails clearly if something outside our group already holds `addr`: a
/// socket without SO_REUSEPORT cannot bind next to it. (Without this check
/// a second daemon of the same user would silently share the traffic.)
fn probe_free(addr: SocketAddr) -> io::Result<()> {
    let probe = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        probe.set_only_v6(true)?;
    }
    probe
        .bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("CoAP address {addr} is not free: {e}")))
}

fn bind_reuseport(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // [::]:5683 and 0.0.0.0:5683 are separate groups.
        socket.set_only_v6(true)?;
    }
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.set_read_timeout(Some(IDLE_WAKEUP))?;
    socket
        .bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("binding CoAP socket {addr}: {e}")))?;
    Ok(socket.into())
}

/// Receive buffers, addresses and headers for one batch, allocated once.
struct Batch {
    bufs: Vec<Vec<u8>>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl Batch {
    fn new(buf_len: usize) -> Batch {
        // SAFETY: all-zero sockaddr_storage / mmsghdr are valid values.
        let mut b = Batch {
            bufs: (0..BATCH).map(|_| vec![0u8; buf_len]).collect(),
            addrs: vec![unsafe { zeroed() }; BATCH],
            iovs: Vec::with_capacity(BATCH),
            hdrs: vec![unsafe { zeroed() }; BATCH],
        };
        for buf in &mut b.bufs {
            b.iovs.push(libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            });
        }
        b
    }

    /// Points header `i` at buffer `i` (length `len`) and address `i`.
    fn arm(&mut self, i: usize, len: usize) {
        self.iovs[i].iov_len = len;
        let h = &mut self.hdrs[i].msg_hdr;
        h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
        h.msg_iov = &mut self.iovs[i];
        h.msg_iovlen = 1;
        h.msg_control = std::ptr::null_mut();
        h.msg_controllen = 0;
        h.msg_flags = 0;
        self.hdrs[i].msg_len = 0;
    }
}

impl Batch {
    /// One recvmmsg into buffers of `len` bytes: the datagrams received, or
    /// -1 (errno says why).
    fn receive(&mut self, fd: i32, len: usize, flags: i32) -> isize {
        for i in 0..BATCH {
            self.arm(i, len);
        }
        // SAFETY: every header points at live buffers of the lengths given.
        unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                BATCH as u32,
                flags,
                std::ptr::null_mut(),
            ) as isize
        }
    }

    /// Points header `i` at `datagram`, to be sent to `to`.
    fn point(&mut self, i: usize, to: &SocketAddr, datagram: &mut [u8]) {
        let len = write_addr(to, &mut self.addrs[i]);
        self.iovs[i] = libc::iovec {
            iov_base: datagram.as_mut_ptr().cast(),
            iov_len: datagram.len(),
        };
        let h = &mut self.hdrs[i].msg_hdr;
        h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = len;
        h.msg_iov = &mut self.iovs[i];
        h.msg_iovlen = 1;
        h.msg_control = std::ptr::null_mut();
        h.msg_controllen = 0;
        h.msg_flags = 0;
    }
}

fn serve(
    socket: &UdpSocket,
    uplink: &mut Uplink,
    max_datagram: usize,
    stop: &AtomicBool,
) -> io::Result<()> {
    let fd = socket.as_raw_fd();
    let mut rx = Batch::new(max_datagram);
    let mut tx = Batch::new(0);
    let mut replies: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(256)).collect();
    let mut last_sweep = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let n = rx.receive(fd, max_datagram, libc::MSG_WAITFORONE);
        let now = Instant::now();
        if now.duration_since(last_sweep) > Duration::from_secs(1) {
            uplink.sweep(now);
            last_sweep = now;
        }
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => continue,
                _ => return Err(err),
            }
        }
        let mut out = 0;
        for i in 0..n as usize {
            let len = rx.hdrs[i].msg_len as usize;
            let truncated = rx.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            let Some(src) = socket_addr(&rx.addrs[i]) else {
                continue;
            };
            if uplink.handle(&rx.bufs[i][..len], truncated, src, now, &mut replies[out]) {
                tx.addrs[out] = rx.addrs[i];
                tx.iovs[out] = libc::iovec {
                    iov_base: replies[out].as_mut_ptr().cast(),
                    iov_len: replies[out].len(),
                };
                let h = &mut tx.hdrs[out].msg_hdr;
                h.msg_name = (&mut tx.addrs[out] as *mut libc::sockaddr_storage).cast();
                h.msg_namelen = rx.hdrs[i].msg_hdr.msg_namelen;
                h.msg_iov = &mut tx.iovs[out];
                h.msg_iovlen = 1;
                out += 1;
            }
        }
        // One fdatasync for the whole batch, before any of its ACKs leaves.
        // If it fails (the spool logs it, once per outage), the batch's
        // 2.04s go out as 5.03 and its retransmissions are processed again.
        let _ = uplink.commit(&mut replies[..out]);
        send_all(fd, &mut tx.hdrs[..out]);
    }
    Ok(())
}

/// sendmmsg until every reply is out; a reply the kernel refuses (e.g. no
/// route back) is skipped rather than retried forever.
fn send_all(fd: i32, hdrs: &mut [libc::mmsghdr]) {
    let mut sent = 0;
    while sent < hdrs.len() {
        let rest = &mut hdrs[sent..];
        // SAFETY: headers point at live reply buffers and addresses.
        let n = unsafe { libc::sendmmsg(fd, rest.as_mut_ptr(), rest.len() as u32, 0) };
        if n > 0 {
            sent += n as usize;
        } else if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        } else {
            sent += 1;
        }
    }
}

fn socket_addr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Writes `addr` into `s`; the length of the sockaddr written.
fn write_addr(addr: &SocketAddr, s: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            let sin =
                unsafe { &mut *(s as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above.
            let sin6 =
                unsafe { &mut *(s as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}
