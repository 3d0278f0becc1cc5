//! The CoAPS worker (RFC 7252 section 9): one thread for the sockets of
//! every `listen_dtls` address, so each peer's sessions, whatever address
//! or port they come from, share one duplicate cache and one order
//! (DESIGN.md invariant 2 holds per peer, not per address).
//!
//! Per receive batch, as the plain workers do: decrypt each datagram into
//! its session, handle the messages, commit once (the 2.04s wait for it),
//! then encrypt the replies and send everything with sendmmsg. What the
//! downlink sends to devices with sessions (commands, notifications,
//! watches) arrives through an outbox (`dtls::Outbox`), whose eventfd is
//! polled beside the sockets; answers to it go back to the downlink as a
//! plain worker's do.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{bind_reuseport, probe_free, socket_addr, Batch, BATCH};
use crate::coap::dtls::{Link, OutboxReceiver, Outgoing, Server};
use crate::coap::uplink::Uplink;

pub struct SecureWorker {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl SecureWorker {
    pub fn start(
        addresses: &[SocketAddr],
        max_datagram: usize,
        mut uplink: Uplink,
        mut server: Server,
        downlink: OutboxReceiver,
    ) -> io::Result<SecureWorker> {
        let mut sockets = Vec::new();
        for addr in addresses {
            probe_free(*addr)?;
            sockets.push(bind_reuseport(*addr)?);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("coaps".into())
            .spawn(move || {
                let serving = serve(
                    &sockets,
                    &mut uplink,
                    &mut server,
                    &downlink,
                    max_datagram,
                    &stopping,
                );
                if let Err(err) = serving {
                    tracing::error!(%err, "CoAPS worker stopped");
                }
            })?;
        Ok(SecureWorker { stop, thread })
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// How long poll waits before the worker checks for shutdown and timers.
const IDLE_WAKEUP: Duration = Duration::from_millis(200);
/// DTLS retransmission timers start at 1 s (RFC 6347 section 4.2.4.1).
const SWEEP_EVERY: Duration = Duration::from_millis(500);

fn serve(
    sockets: &[UdpSocket],
    uplink: &mut Uplink,
    server: &mut Server,
    downlink: &OutboxReceiver,
    max_datagram: usize,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut rx = Batch::new(max_datagram);
    let mut tx = Batch::new(0);
    let mut out: Vec<Outgoing> = Vec::new();
    // Plaintext replies of the batch, with the session each goes to.
    let mut replies: Vec<Vec<u8>> = Vec::new();
    let mut reply_links: Vec<Link> = Vec::new();
    let mut reply = Vec::with_capacity(256);
    let mut last_sweep = Instant::now();
    // The sockets, then the downlink's wake-up.
    let mut fds: Vec<libc::pollfd> = sockets
        .iter()
        .map(|s| s.as_raw_fd())
        .chain([downlink.fd()])
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: fds is a live array of pollfd of the length given.
        let ready = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                IDLE_WAKEUP.as_millis() as i32,
            )
        };
        if ready < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        let now = Instant::now();
        if now.duration_since(last_sweep) >= SWEEP_EVERY {
            server.sweep(now, &mut out);
            uplink.sweep(now);
            last_sweep = now;
        }
        for (local, pfd) in fds[..sockets.len()].iter().enumerate() {
            if pfd.revents & libc::POLLIN == 0 {
                continue;
            }
            let n = rx.receive(pfd.fd, max_datagram, libc::MSG_DONTWAIT);
            for i in 0..n.max(0) as usize {
                let len = rx.hdrs[i].msg_len as usize;
                let Some(remote) = socket_addr(&rx.addrs[i]) else {
                    continue;
                };
                let link = Link { local, remote };
                let received = server.receive(link, &rx.bufs[i][..len], now, &mut out);
                let Some(identity) = received.peer else {
                    continue;
                };
                for message in &received.messages {
                    if uplink.handle_secure(message, remote, &identity, now, &mut reply) {
                        replies.push(std::mem::replace(&mut reply, Vec::with_capacity(256)));
                        reply_links.push(link);
                    }
                }
            }
        }
        // One commit for the batch before any of its 2.04s is encrypted
        // (invariant 1); a failed commit turns them into 5.03.
        let _ = uplink.commit(&mut replies);
        for (link, plaintext) in reply_links.drain(..).zip(replies.drain(..)) {
            server.send(link, &plaintext, &mut out);
        }
        // Commands, notifications and watches for devices with sessions.
        if fds[sockets.len()].revents & libc::POLLIN != 0 {
            for (remote, message) in downlink.drain() {
                server.send_downlink(remote, &message, now, &mut out);
            }
        }
        send(sockets, &mut tx, &mut out);
    }
    Ok(())
}

/// Sends the datagrams, each through the socket its session arrived on,
/// up to a batch per sendmmsg.
fn send(sockets: &[UdpSocket], tx: &mut Batch, out: &mut Vec<Outgoing>) {
    // Grouped by socket, in order within each.
    out.sort_by_key(|(link, _)| link.local);
    let mut rest = &mut out[..];
    while let Some(((first, _), _)) = rest.split_first() {
        let local = first.local;
        let n = rest
            .iter()
            .take_while(|(l, _)| l.local == local)
            .count()
            .min(BATCH);
        let (chunk, tail) = rest.split_at_mut(n);
        for (i, (link, datagram)) in chunk.iter_mut().enumerate() {
            tx.point(i, &link.remote, datagram);
        }
        super::send_all(sockets[local].as_raw_fd(), &mut tx.hdrs[..n]);
        rest = tail;
    }
    out.clear();
}
