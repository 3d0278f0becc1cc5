//! CoAP over DTLS 1.2 (RFC 7252 section 9, RFC 6347): the sessions of one
//! worker, each the peer whose credentials it presented, whatever its
//! address.
//!
//! The library is OpenSSL 3 (Debian's, through the `openssl` crate): it has
//! the mandatory PSK and ECDHE-ECDSA CCM_8 suites, certificates with chain
//! checks, session resumption, and `DTLSv1_listen`, which answers a
//! ClientHello with a stateless cookie (RFC 6347 section 4.2.1) on one
//! shared object, so nothing is kept for a source until it proved it
//! receives at its address. Each session is an `SslStream` over a [`Wire`]:
//! the worker's batched socket does the I/O, the sessions are found by the
//! datagram's source address (no socket per session).
//!
//! The gateway is also a DTLS client: a downlink message for a device the
//! config reaches at `coaps://ADDRESS` opens a session to it from the
//! CoAPS socket of the address's family (RFC 7252 section 9.1: either end
//! may start one), and waits in it until the handshake is done.
//!
//! Bounds: at most `max_sessions` sessions and `max_handshakes` of them
//! unfinished; past either, the least recently active is closed (counted).
//! A handshake unfinished after `handshake_timeout` and a session idle for
//! `idle_timeout` are closed too. At most `MAX_WAITING` downlink messages
//! wait in a handshake the gateway opened.

mod alerts;
mod context;
mod outbox;
mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::raw::c_int;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use foreign_types::ForeignTypeRef;
use openssl::ssl::{ErrorCode, Ssl, SslContext, SslStream};
use serde::Serialize;

use crate::config::DtlsSettings;
use crate::mapping::{Mapper, PeerInfo, SharedMapper};
pub use outbox::{outbox, Outbox, OutboxReceiver};
pub use wire::Wire;

/// Record content type of a handshake (RFC 5246 section 6.2.1).
const HANDSHAKE: u8 = 22;
/// Largest plaintext of one record (RFC 6347 section 4.1.1).
const MAX_PLAINTEXT: usize = 16384;
/// Downlink messages that wait in one handshake the gateway opened; more
/// are dropped (counted), as CoAP's retransmission covers (the client
/// resends a CON request after 2 to 3 s, RFC 7252 section 4.2).
pub const MAX_WAITING: usize = 16;

/// DTLS counters, shared by the workers.
#[derive(Debug, Default)]
pub struct DtlsStats {
    /// HelloVerifyRequests sent: ClientHellos without a valid cookie.
    pub hello_verify: AtomicU64,
    pub handshakes: AtomicU64,
    /// Handshakes that ended in an alert or a protocol error.
    pub handshake_failures: AtomicU64,
    /// Credentials no peer has: a PSK identity, or a client certificate
    /// none of whose names is a peer's `cert_name` (a subset of the
    /// failures).
    pub unknown_identity: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    /// Sessions closed to stay within the bounds.
    pub evicted: AtomicU64,
    pub idle_closed: AtomicU64,
    /// Sessions closed because their peer or its key changed.
    pub revoked: AtomicU64,
    /// Sessions closed because their peer shook hands again from another
    /// address (no Connection ID in OpenSSL 3: a device whose address
    /// changed comes back with a fresh handshake).
    pub replaced: AtomicU64,
    /// Closed by the device (close_notify) or by a fatal alert after the
    /// handshake.
    pub closed_by_peer: AtomicU64,
    /// Datagrams from a source with no session that were not a
    /// ClientHello (a session closed on our side, or noise).
    pub no_session: AtomicU64,
    /// Sessions the gateway opened to devices at `coaps://` endpoints.
    pub connects: AtomicU64,
    /// Downlink messages (commands, notifications, watches) sent over a
    /// session; those for an address where no session was to be had (it
    /// closed, and the device is reached again once it shakes hands; or
    /// the gateway's handshake to it failed); those dropped with the
    /// worker's queue full, or with `MAX_WAITING` already waiting for a
    /// handshake.
    pub downlink_sent: AtomicU64,
    pub downlink_no_session: AtomicU64,
    pub outbox_dropped: AtomicU64,
    pub waiting_dropped: AtomicU64,
    pub sessions: AtomicU64,
    pub handshaking: AtomicU64,
    /// Fatal alerts sent and received, by description.
    pub alerts: alerts::Alerts,
}

impl DtlsStats {
    /// The snapshot's names that are gauges; the rest only grow (the
    /// alerts, `alert_sent_<description>` and `alert_received_...`, appear
    /// once seen).
    pub const GAUGES: &'static [&'static str] = &["sessions", "handshaking"];

    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let f = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("hello_verify", f(&self.hello_verify)),
            ("handshakes", f(&self.handshakes)),
            ("handshake_failures", f(&self.handshake_failures)),
            ("unknown_identity", f(&self.unknown_identity)),
            ("handshake_timeouts", f(&self.handshake_timeouts)),
            ("evicted", f(&self.evicted)),
            ("idle_closed", f(&self.idle_closed)),
            ("revoked", f(&self.revoked)),
            ("replaced", f(&self.replaced)),
            ("closed_by_peer", f(&self.closed_by_peer)),
            ("no_session", f(&self.no_session)),
            ("connects", f(&self.connects)),
            ("downlink_sent", f(&self.downlink_sent)),
            ("downlink_no_session", f(&self.downlink_no_session)),
            ("outbox_dropped", f(&self.outbox_dropped)),
            ("waiting_dropped", f(&self.waiting_dropped)),
            ("sessions", f(&self.sessions)),
            ("handshaking", f(&self.handshaking)),
        ]
        .into_iter()
        .chain(self.alerts.snapshot())
        .collect()
    }
}

/// One side of a session: the worker's socket it arrived on (an index into
/// the worker's sockets) and the device's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Link {
    pub local: usize,
    pub remote: SocketAddr,
}

/// A datagram to send, and where.
pub type Outgoing = (Link, Vec<u8>);

/// An established session, as `ctl dtls ls` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct SessionInfo {
    pub peer: String,
    pub address: SocketAddr,
    /// "device", or "gateway" for a session to a `coaps://` endpoint.
    pub opened_by: &'static str,
    pub cipher: String,
    pub resumed: bool,
    #[serde(skip)]
    pub since: SystemTime,
}

/// The established sessions of all workers, by address.
#[derive(Debug, Default)]
pub struct Sessions(Mutex<HashMap<Link, SessionInfo>>);

impl Sessions {
    pub fn list(&self) -> Vec<SessionInfo> {
        let mut all: Vec<_> = self.0.lock().unwrap().values().cloned().collect();
        all.sort_by(|a, b| a.peer.cmp(&b.peer).then(a.address.cmp(&b.address)));
        all
    }
}

/// The peer a session's credentials named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub name: Arc<str>,
    /// The same number for every session of the peer on this worker, so
    /// duplicate detection and block assembly follow the peer across
    /// addresses (`coap::Origin::Peer`).
    pub key: u32,
}

struct Session {
    stream: SslStream<Wire>,
    /// The peer its credentials named, once the handshake is done.
    peer: Option<Identity>,
    /// What it was admitted with, to notice a change of its peer's; for a
    /// session the gateway opened, what it presented.
    credential: Credential,
    /// The gateway opened it, to a `coaps://` endpoint.
    opened_by_gateway: bool,
    /// Downlink messages for its device, until the handshake is done.
    waiting: Vec<Vec<u8>>,
    started: Instant,
    /// When its device was last heard from (and, for a session the device
    /// opened, last sent to: it cannot be reached without it).
    last_active: Instant,
}

/// What one received datagram gave.
#[derive(Debug, Default)]
pub struct Received {
    /// Decrypted application data (CoAP messages), in order, from the peer.
    pub messages: Vec<Vec<u8>>,
    /// The session's peer, when it is established.
    pub peer: Option<Identity>,
}

/// The DTLS sessions of one worker.
pub struct Server {
    ctx: SslContext,
    /// For sessions the gateway opens.
    client_ctx: SslContext,
    /// The worker's socket addresses, by index (`Link::local`).
    locals: Vec<SocketAddr>,
    /// The object `DTLSv1_listen` runs on; it becomes the session of the
    /// first source that returns a valid cookie, and a fresh one replaces it.
    listener: SslStream<Wire>,
    sessions: HashMap<Link, Session>,
    /// The socket of each device address's established session, for the
    /// downlink, which knows devices by address.
    by_remote: HashMap<SocketAddr, usize>,
    handshaking: usize,
    settings: DtlsSettings,
    mappers: Arc<SharedMapper>,
    mapper_generation: u64,
    stats: Arc<DtlsStats>,
    registry: Arc<Sessions>,
    /// Peer names numbered for `Identity::key`. Only configured peers
    /// authenticate, so it grows with the operator's peers, not with input.
    keys: HashMap<Arc<str>, u32>,
    /// Sessions established by the current datagram: older sessions of
    /// their peers are closed.
    established: Vec<(Link, u32)>,
    plaintext: Vec<u8>,
}

/// OpenSSL's `BIO_ADDR`, opaque here.
#[repr(C)]
struct BioAddr {
    _opaque: [u8; 0],
}

// The calls the openssl crate does not wrap (libssl and libcrypto, which
// openssl-sys links).
extern "C" {
    fn DTLSv1_listen(s: *mut openssl_sys::SSL, client: *mut BioAddr) -> c_int;
    fn BIO_ADDR_new() -> *mut BioAddr;
    fn BIO_ADDR_free(a: *mut BioAddr);
}
/// `DTLSv1_handle_timeout` is this `SSL_ctrl` (openssl/ssl.h).
const DTLS_CTRL_HANDLE_TIMEOUT: c_int = 74;

impl Server {
    pub fn new(
        settings: DtlsSettings,
        locals: Vec<SocketAddr>,
        mappers: Arc<SharedMapper>,
        stats: Arc<DtlsStats>,
        registry: Arc<Sessions>,
    ) -> anyhow::Result<Server> {
        let ctx = context::server(
            mappers.clone(),
            stats.clone(),
            settings.certificates.as_ref(),
        )?;
        let client_ctx = context::client(stats.clone(), settings.certificates.as_ref())?;
        let listener = new_stream(&ctx, settings.mtu)?;
        let mapper_generation = mappers.generation();
        Ok(Server {
            ctx,
            client_ctx,
            locals,
            listener,
            sessions: HashMap::new(),
            by_remote: HashMap::new(),
            handshaking: 0,
            settings,
            mappers,
            mapper_generation,
            stats,
            registry,
            keys: HashMap::new(),
            established: Vec::new(),
            plaintext: vec![0; MAX_PLAINTEXT],
        })
    }

    /// Handles one datagram from `src`: datagrams to send back go to `out`
    /// (with their destination), decrypted messages to the result.
    pub fn receive(
        &mut self,
        src: Link,
        dgram: &[u8],
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) -> Received {
        self.revalidate();
        let mut received = Received::default();
        let Some(session) = self.sessions.get_mut(&src) else {
            if dgram.first() == Some(&HANDSHAKE) {
                self.listen(src, dgram, now, out);
            } else {
                self.stats.no_session.fetch_add(1, Ordering::Relaxed);
            }
            return received;
        };
        session.last_active = now;
        if !session.stream.get_mut().push(dgram) {
            return received;
        }
        let outcome = self.advance(src, &mut received);
        self.flush(src, out);
        if let Err(reason) = outcome {
            self.close(src, reason);
        }
        self.close_replaced(out);
        received
    }

    /// Closes the older sessions of a peer that just shook hands again,
    /// with a close_notify in case the device is still there. Only among
    /// the sessions its device opened: one the gateway opened to the
    /// device's own server lives beside them.
    fn close_replaced(&mut self, out: &mut Vec<Outgoing>) {
        while let Some((fresh, key)) = self.established.pop() {
            let older: Vec<Link> = self
                .sessions
                .iter()
                .filter(|(link, s)| {
                    **link != fresh
                        && !s.opened_by_gateway
                        && s.peer.as_ref().is_some_and(|p| p.key == key)
                })
                .map(|(link, _)| *link)
                .collect();
            for link in older {
                if let Some(s) = self.sessions.get_mut(&link) {
                    let _ = s.stream.shutdown();
                }
                self.flush(link, out);
                self.close(link, Close::Replaced);
            }
        }
    }

    /// Encrypts `message` for the session at `dst`; false when there is no
    /// established session there.
    pub fn send(&mut self, dst: Link, message: &[u8], out: &mut Vec<Outgoing>) -> bool {
        let Some(s) = self.sessions.get_mut(&dst) else {
            return false;
        };
        if s.peer.is_none() || s.stream.ssl_write(message).is_err() {
            return false;
        }
        self.flush(dst, out);
        true
    }

    /// Encrypts a downlink message for the established session at device
    /// address `remote`. Without one, the message waits in the handshake
    /// under way there, or in one the gateway opens if the config reaches
    /// a peer at `coaps://remote`; else it is counted and dropped.
    pub fn send_downlink(
        &mut self,
        remote: SocketAddr,
        message: &[u8],
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let link = match self.by_remote.get(&remote) {
            Some(&local) => Some(Link { local, remote }),
            None => self.link_to(remote),
        };
        let Some(link) = link else {
            count(&self.stats.downlink_no_session);
            return;
        };
        if !self.sessions.contains_key(&link) && !self.connect(link, now, out) {
            count(&self.stats.downlink_no_session);
            return;
        }
        let s = self.sessions.get_mut(&link).expect("found or opened");
        if s.peer.is_none() {
            if s.waiting.len() < MAX_WAITING {
                s.waiting.push(message.to_vec());
            } else {
                count(&self.stats.waiting_dropped);
            }
            return;
        }
        if !s.opened_by_gateway {
            s.last_active = now;
        }
        let sent = self.send(link, message, out);
        count(if sent {
            &self.stats.downlink_sent
        } else {
            &self.stats.downlink_no_session
        });
    }

    /// The socket a session to `remote` goes from: the first of its
    /// address family (config checks a `coaps://` endpoint has one).
    fn link_to(&self, remote: SocketAddr) -> Option<Link> {
        let local = self
            .locals
            .iter()
            .position(|l| l.is_ipv4() == remote.is_ipv4())?;
        Some(Link { local, remote })
    }

    /// Opens a session to the device of the peer whose endpoint is
    /// `coaps://link.remote`: its ClientHello goes to `out`. False when no
    /// peer is reached there.
    fn connect(&mut self, link: Link, now: Instant, out: &mut Vec<Outgoing>) -> bool {
        let (_, mapper) = self.mappers.load();
        let Some(peer) = mapper.peer_at_secure_endpoint(link.remote) else {
            return false;
        };
        let credential = match (&peer.psk, &peer.cert_name) {
            (Some(psk), _) => Credential::Psk(psk.identity.clone()),
            (None, Some(name)) => Credential::Certificate(vec![name.clone()]),
            (None, None) => return false,
        };
        let stream = context::connect(
            &self.client_ctx,
            peer,
            self.settings.mtu,
            self.stats.clone(),
        )
        .and_then(|ssl| SslStream::new(ssl, Wire::default()));
        let Ok(stream) = stream else {
            return false;
        };
        self.make_room();
        self.sessions.insert(
            link,
            Session {
                stream,
                peer: None,
                credential,
                opened_by_gateway: true,
                waiting: Vec::new(),
                started: now,
                last_active: now,
            },
        );
        self.handshaking += 1;
        self.stats.handshaking.fetch_add(1, Ordering::Relaxed);
        count(&self.stats.connects);
        tracing::debug!(dst = %link.remote, peer = %peer.name, "opening a DTLS session");
        let outcome = self.advance(link, &mut Received::default());
        self.flush(link, out);
        if let Err(reason) = outcome {
            self.close(link, reason);
            return false;
        }
        true
    }

    /// Retransmits handshake flights whose timer ran out (RFC 6347 section
    /// 4.2.4), and closes handshakes past their timeout and idle sessions.
    /// Call about once a second.
    pub fn sweep(&mut self, now: Instant, out: &mut Vec<Outgoing>) {
        self.revalidate();
        let mut closing = Vec::new();
        for (addr, s) in &mut self.sessions {
            if s.peer.is_none() {
                if now.duration_since(s.started) > self.settings.handshake_timeout {
                    closing.push((*addr, Close::HandshakeTimeout));
                    continue;
                }
                // SAFETY: a valid SSL object; the call takes no pointer.
                unsafe {
                    openssl_sys::SSL_ctrl(
                        s.stream.ssl().as_ptr(),
                        DTLS_CTRL_HANDLE_TIMEOUT,
                        0,
                        std::ptr::null_mut(),
                    );
                }
                out.extend(s.stream.get_mut().take_output().map(|d| (*addr, d)));
            } else if now.duration_since(s.last_active) > self.settings.idle_timeout {
                closing.push((*addr, Close::Idle));
            }
        }
        for (addr, reason) in closing {
            if reason == Close::Idle {
                // A close_notify, so the device knows to shake hands again
                // rather than send into a session we forgot.
                if let Some(s) = self.sessions.get_mut(&addr) {
                    let _ = s.stream.shutdown();
                }
                self.flush(addr, out);
            }
            self.close(addr, reason);
        }
    }

    /// The peer of the established session at `addr`.
    pub fn peer(&self, link: &Link) -> Option<&Identity> {
        self.sessions.get(link).and_then(|s| s.peer.as_ref())
    }

    /// Runs `DTLSv1_listen` on a ClientHello from a source without a
    /// session: a HelloVerifyRequest without a valid cookie, a new session
    /// with one.
    fn listen(&mut self, src: Link, dgram: &[u8], now: Instant, out: &mut Vec<Outgoing>) {
        let wire = self.listener.get_mut();
        wire.clear();
        wire.push(dgram);
        // SAFETY: the listener's SSL object is valid and owned here; the
        // cookie callbacks read this address from it.
        let ssl = unsafe { openssl::ssl::SslRef::from_ptr_mut(self.listener.ssl().as_ptr()) };
        ssl.set_ex_data(context::peer_index(), src.remote);
        // SAFETY: valid SSL object and BIO_ADDR, freed below.
        let verified = unsafe {
            let client = BIO_ADDR_new();
            let r = DTLSv1_listen(self.listener.ssl().as_ptr(), client);
            BIO_ADDR_free(client);
            r
        };
        out.extend(self.listener.get_mut().take_output().map(|d| (src, d)));
        match verified {
            1 => {}
            0 => return, // answered with a HelloVerifyRequest, or noise
            _ => {
                // A fatal error leaves the object unusable.
                openssl::error::ErrorStack::get();
                if let Ok(fresh) = new_stream(&self.ctx, self.settings.mtu) {
                    self.listener = fresh;
                }
                return;
            }
        }
        let Ok(fresh) = new_stream(&self.ctx, self.settings.mtu) else {
            return;
        };
        let mut stream = std::mem::replace(&mut self.listener, fresh);
        stream.get_mut().unread(dgram.to_vec());
        self.make_room();
        self.sessions.insert(
            src,
            Session {
                stream,
                peer: None,
                credential: Credential::None,
                opened_by_gateway: false,
                waiting: Vec::new(),
                started: now,
                last_active: now,
            },
        );
        self.handshaking += 1;
        self.stats.handshaking.fetch_add(1, Ordering::Relaxed);
        let mut ignored = Received::default();
        let outcome = self.advance(src, &mut ignored);
        self.flush(src, out);
        if let Err(reason) = outcome {
            self.close(src, reason);
        }
        self.close_replaced(out);
    }

    /// Moves the session at `src` on with what its wire holds: the
    /// handshake, then application data.
    fn advance(&mut self, src: Link, received: &mut Received) -> Result<(), Close> {
        let s = self.sessions.get_mut(&src).expect("the caller found it");
        if s.peer.is_none() {
            match s.stream.do_handshake() {
                Ok(()) => {
                    let (_, mapper) = self.mappers.load();
                    // A device's credentials name its peer; the gateway's
                    // own session presented the peer's, and checked the
                    // device's (context::connect).
                    if !s.opened_by_gateway {
                        s.credential = Credential::of(s.stream.ssl());
                    }
                    let Some(peer) = s.credential.peer(&mapper) else {
                        return Err(Close::Revoked);
                    };
                    let name: Arc<str> = Arc::from(peer.name.as_str());
                    let next = self.keys.len() as u32;
                    let key = *self.keys.entry(name.clone()).or_insert(next);
                    let peer = Identity { name, key };
                    s.peer = Some(peer.clone());
                    if !s.opened_by_gateway {
                        self.established.push((src, key));
                    }
                    for message in std::mem::take(&mut s.waiting) {
                        count(if s.stream.ssl_write(&message).is_ok() {
                            &self.stats.downlink_sent
                        } else {
                            &self.stats.downlink_no_session
                        });
                    }
                    self.by_remote.insert(src.remote, src.local);
                    self.handshaking -= 1;
                    self.stats.handshaking.fetch_sub(1, Ordering::Relaxed);
                    self.stats.handshakes.fetch_add(1, Ordering::Relaxed);
                    self.stats.sessions.fetch_add(1, Ordering::Relaxed);
                    let ssl = s.stream.ssl();
                    let info = SessionInfo {
                        peer: peer.name.to_string(),
                        address: src.remote,
                        opened_by: if s.opened_by_gateway {
                            "gateway"
                        } else {
                            "device"
                        },
                        cipher: ssl
                            .current_cipher()
                            .map_or_else(String::new, |c| c.name().to_owned()),
                        resumed: ssl.session_reused(),
                        since: SystemTime::now(),
                    };
                    self.registry.0.lock().unwrap().insert(src, info);
                    tracing::debug!(src = %src.remote, peer = %peer.name, "DTLS session established");
                }
                Err(e) if e.code() == ErrorCode::WANT_READ => return Ok(()),
                Err(e) => {
                    tracing::debug!(src = %src.remote, error = %e, "DTLS handshake failed");
                    return Err(Close::HandshakeFailed);
                }
            }
        }
        received.peer = s.peer.clone();
        loop {
            match s.stream.ssl_read(&mut self.plaintext) {
                Ok(n) => received.messages.push(self.plaintext[..n].to_vec()),
                Err(e) if e.code() == ErrorCode::WANT_READ => return Ok(()),
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => return Err(Close::ByPeer),
                Err(_) => return Err(Close::ByPeer),
            }
        }
    }

    fn flush(&mut self, addr: Link, out: &mut Vec<Outgoing>) {
        if let Some(s) = self.sessions.get_mut(&addr) {
            out.extend(s.stream.get_mut().take_output().map(|d| (addr, d)));
        }
    }

    /// Closes the least recently active session when a new one would pass
    /// a bound (a handshake only displaces handshakes while they are at
    /// their own bound).
    fn make_room(&mut self) {
        let victim = if self.handshaking >= self.settings.max_handshakes {
            self.sessions
                .iter()
                .filter(|(_, s)| s.peer.is_none())
                .min_by_key(|(_, s)| s.last_active)
        } else if self.sessions.len() >= self.settings.max_sessions {
            self.sessions.iter().min_by_key(|(_, s)| s.last_active)
        } else {
            None
        };
        if let Some((&addr, _)) = victim {
            self.close(addr, Close::Evicted);
        }
    }

    /// After a config change: a session whose peer is gone, or whose key
    /// or identity changed, is closed (the device shakes hands again).
    fn revalidate(&mut self) {
        let generation = self.mappers.generation();
        if generation == self.mapper_generation {
            return;
        }
        self.mapper_generation = generation;
        let (_, mapper) = self.mappers.load();
        let stale: Vec<Link> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.peer.as_ref().is_some_and(|peer| {
                    s.credential
                        .peer(&mapper)
                        .is_none_or(|p| *p.name != *peer.name)
                })
            })
            .map(|(a, _)| *a)
            .collect();
        for addr in stale {
            self.close(addr, Close::Revoked);
        }
    }

    fn close(&mut self, addr: Link, reason: Close) {
        if !self.forget(addr) {
            return;
        }
        let counter = match reason {
            Close::HandshakeFailed => &self.stats.handshake_failures,
            Close::HandshakeTimeout => &self.stats.handshake_timeouts,
            Close::Evicted => &self.stats.evicted,
            Close::Idle => &self.stats.idle_closed,
            Close::Revoked => &self.stats.revoked,
            Close::ByPeer => &self.stats.closed_by_peer,
            Close::Replaced => &self.stats.replaced,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Removes a session and its share of the gauges and the registry;
    /// whether there was one.
    fn forget(&mut self, addr: Link) -> bool {
        let Some(s) = self.sessions.remove(&addr) else {
            return false;
        };
        // What waited for a handshake that did not finish.
        self.stats
            .downlink_no_session
            .fetch_add(s.waiting.len() as u64, Ordering::Relaxed);
        if s.peer.is_some() {
            if self.by_remote.get(&addr.remote) == Some(&addr.local) {
                self.by_remote.remove(&addr.remote);
            }
            self.stats.sessions.fetch_sub(1, Ordering::Relaxed);
            self.registry.0.lock().unwrap().remove(&addr);
        } else {
            self.handshaking -= 1;
            self.stats.handshaking.fetch_sub(1, Ordering::Relaxed);
        }
        true
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let addrs: Vec<_> = self.sessions.keys().copied().collect();
        for addr in addrs {
            self.forget(addr);
        }
    }
}

/// What a session presented in its handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Credential {
    /// Still shaking hands.
    None,
    Psk(Vec<u8>),
    /// A client certificate's names (`context::certificate_names`).
    Certificate(Vec<String>),
}

impl Credential {
    fn of(ssl: &openssl::ssl::SslRef) -> Credential {
        if let Some(identity) = ssl.psk_identity() {
            return Credential::Psk(identity.to_vec());
        }
        match ssl.peer_certificate() {
            Some(cert) => Credential::Certificate(context::certificate_names(&cert)),
            None => Credential::None,
        }
    }

    /// The peer these credentials name in `mapper`.
    fn peer<'m>(&self, mapper: &'m Mapper) -> Option<&'m PeerInfo> {
        match self {
            Credential::None => None,
            Credential::Psk(identity) => mapper.psk(identity).map(|(p, _)| p),
            Credential::Certificate(names) => mapper.certificate(names.iter().map(String::as_str)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Close {
    HandshakeFailed,
    HandshakeTimeout,
    Evicted,
    Idle,
    Revoked,
    ByPeer,
    Replaced,
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn new_stream(ctx: &SslContext, mtu: u32) -> Result<SslStream<Wire>, openssl::error::ErrorStack> {
    let mut ssl = Ssl::new(ctx)?;
    ssl.set_mtu(mtu)?;
    ssl.set_accept_state();
    SslStream::new(ssl, Wire::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use openssl::ssl::SslMethod;

    const DEVICE: &str = "10.0.0.7:40000";
    const GATEWAY: &str = "10.0.0.1:5684";

    const KEY_HEX: &str = "00112233445566778899aabbccddeeff";

    fn server(settings: DtlsSettings) -> (Server, Arc<DtlsStats>, Arc<Sessions>) {
        // "meter" is meter-1; "m2" to "m5" are m2 to m5, all with one key.
        let mut text = format!(
            "[[peer]]\nname = \"meter\"\npsk_identity = \"meter-1\"\npsk_hex = \"{KEY_HEX}\"\n",
        );
        for i in 2..=5 {
            text += &format!(
                "[[peer]]\nname = \"m{i}\"\npsk_identity = \"m{i}\"\npsk_hex = \"{KEY_HEX}\"\n"
            );
        }
        server_of(&text, settings)
    }

    fn server_of(config: &str, settings: DtlsSettings) -> (Server, Arc<DtlsStats>, Arc<Sessions>) {
        let config = Config::parse(config).unwrap();
        let mappers = SharedMapper::new(Mapper::from_config(&config));
        let stats = Arc::new(DtlsStats::default());
        let registry = Arc::new(Sessions::default());
        let s = Server::new(
            settings,
            vec!["0.0.0.0:5684".parse().unwrap()],
            mappers,
            stats.clone(),
            registry.clone(),
        )
        .unwrap();
        (s, stats, registry)
    }

    /// A gateway that reaches peer "meter" at `coaps://DEVICE`, presenting
    /// identity meter-1 and `key_hex`.
    fn gateway(key_hex: &str) -> (Server, Arc<DtlsStats>, Arc<Sessions>) {
        server_of(
            &format!(
                "[coap]\nlisten_dtls = [\"0.0.0.0:5684\"]\n[[peer]]\nname = \"meter\"\n\
                 psk_identity = \"meter-1\"\npsk_hex = \"{key_hex}\"\nendpoint = \"coaps://{DEVICE}\"\n"
            ),
            DtlsSettings::default(),
        )
    }

    /// Delivers datagrams between a gateway and a device listening on
    /// DTLS (a `Server` of its own) until neither has more to send; what
    /// the device decrypted, and from whom.
    fn pump(gw: &mut Server, device: &mut Server, mut to_device: Vec<Outgoing>) -> Received {
        let gateway_side = link(GATEWAY);
        let mut got = Received::default();
        let now = Instant::now();
        for _ in 0..20 {
            let mut to_gateway = Vec::new();
            for (to, d) in to_device.drain(..) {
                assert_eq!(to, link(DEVICE));
                let r = device.receive(gateway_side, &d, now, &mut to_gateway);
                got.messages.extend(r.messages);
                got.peer = got.peer.or(r.peer);
            }
            for (to, d) in to_gateway {
                assert_eq!(to, gateway_side);
                gw.receive(link(DEVICE), &d, now, &mut to_device);
            }
            if to_device.is_empty() {
                break;
            }
        }
        got
    }

    /// An OpenSSL PSK client over a wire of its own.
    fn client(identity: &'static str, key: &'static [u8]) -> SslStream<Wire> {
        let mut b = SslContext::builder(SslMethod::dtls()).unwrap();
        b.set_security_level(0);
        b.set_cipher_list("PSK-AES128-CCM8").unwrap();
        b.set_options(openssl::ssl::SslOptions::NO_QUERY_MTU);
        b.set_psk_client_callback(move |_, _, id_out, key_out| {
            id_out[..identity.len()].copy_from_slice(identity.as_bytes());
            id_out[identity.len()] = 0;
            key_out[..key.len()].copy_from_slice(key);
            Ok(key.len())
        });
        let mut ssl = Ssl::new(&b.build()).unwrap();
        ssl.set_mtu(1200).unwrap();
        ssl.set_connect_state();
        SslStream::new(ssl, Wire::default()).unwrap()
    }

    /// Runs the handshake, each side's datagrams delivered to the other,
    /// until the client is done or gives up; the datagrams the client sent.
    fn link(addr: &str) -> Link {
        Link {
            local: 0,
            remote: addr.parse().unwrap(),
        }
    }

    fn handshake(server: &mut Server, c: &mut SslStream<Wire>, src: Link) -> bool {
        let now = Instant::now();
        for _ in 0..10 {
            let done = c.do_handshake();
            let sent: Vec<_> = c.get_mut().take_output().collect();
            let mut back = Vec::new();
            for d in &sent {
                server.receive(src, d, now, &mut back);
            }
            for (to, d) in back {
                assert_eq!(to, src);
                c.get_mut().push(&d);
            }
            match done {
                Ok(()) => return true,
                Err(e) if e.code() == ErrorCode::WANT_READ => continue,
                Err(_) => return false,
            }
        }
        false
    }

    #[test]
    fn a_psk_client_gets_a_cookie_then_a_session_named_by_its_identity() {
        let (mut s, stats, registry) = server(DtlsSettings::default());
        let mut c = client(
            "meter-1",
            &[
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff,
            ],
        );
        let src = link(DEVICE);
        assert!(handshake(&mut s, &mut c, src), "the handshake completes");
        // The client's first flight may still be in flight: pump once more.
        let mut back = Vec::new();
        c.ssl_write(b"coap message").unwrap();
        let mut got = Received::default();
        for d in c.get_mut().take_output().collect::<Vec<_>>() {
            let r = s.receive(src, &d, Instant::now(), &mut back);
            got.messages.extend(r.messages);
            got.peer = got.peer.or(r.peer);
        }
        assert_eq!(got.messages, vec![b"coap message".to_vec()]);
        assert_eq!(got.peer.map(|p| p.name), Some(Arc::from("meter")));
        assert_eq!(
            stats.hello_verify.load(Ordering::Relaxed),
            1,
            "one cookie round"
        );
        assert_eq!(stats.handshakes.load(Ordering::Relaxed), 1);
        assert_eq!(stats.sessions.load(Ordering::Relaxed), 1);
        let listed = registry.list();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].peer, "meter");
        assert!(listed[0].cipher.contains("CCM8"), "{}", listed[0].cipher);
        // And back: the answer is encrypted for the device.
        let mut out = Vec::new();
        assert!(s.send(src, b"answer", &mut out));
        for (_, d) in out {
            c.get_mut().push(&d);
        }
        let mut buf = [0u8; 64];
        let n = c.ssl_read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"answer");
    }

    #[test]
    fn a_wrong_key_or_an_unknown_identity_gets_no_session() {
        let (mut s, stats, _) = server(DtlsSettings::default());
        let src = link(DEVICE);
        let mut wrong = client("meter-1", &[1; 16]);
        assert!(!handshake(&mut s, &mut wrong, src));
        assert!(s.peer(&src).is_none());
        let mut unknown = client("nobody", &[1; 16]);
        let other = link("10.0.0.8:40000");
        assert!(!handshake(&mut s, &mut unknown, other));
        assert!(s.peer(&other).is_none());
        assert_eq!(stats.unknown_identity.load(Ordering::Relaxed), 1);
        assert_eq!(stats.handshake_failures.load(Ordering::Relaxed), 1);
        let alerts: Vec<_> = stats
            .snapshot()
            .into_iter()
            .filter(|(name, _)| name.starts_with("alert_"))
            .collect();
        assert_eq!(
            alerts,
            vec![("alert_sent_unknown_psk_identity", 1)],
            "the unknown identity's alert, and none for the wrong key"
        );
        // A Finished under the wrong key does not decrypt, and DTLS drops
        // such records silently (RFC 6347 section 4.1.2.7): the handshake
        // ends at its timeout.
        assert_eq!(stats.handshaking.load(Ordering::Relaxed), 1);
        let later = Instant::now() + DtlsSettings::default().handshake_timeout * 2;
        s.sweep(later, &mut Vec::new());
        assert_eq!(stats.handshake_timeouts.load(Ordering::Relaxed), 1);
        assert_eq!(stats.handshakes.load(Ordering::Relaxed), 0);
        assert_eq!(stats.handshaking.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_client_hello_without_cookie_keeps_no_state() {
        let (mut s, stats, _) = server(DtlsSettings::default());
        for port in 0..1000u16 {
            let mut c = client("meter-1", &[1; 16]);
            let _ = c.do_handshake();
            let hello = c.get_mut().take_output().next().unwrap();
            let mut back = Vec::new();
            s.receive(
                link(&format!("10.1.0.1:{port}")),
                &hello,
                Instant::now(),
                &mut back,
            );
            assert_eq!(back.len(), 1, "a HelloVerifyRequest");
        }
        assert_eq!(s.sessions.len(), 0);
        assert_eq!(stats.hello_verify.load(Ordering::Relaxed), 1000);
    }

    /// Garbage from many sources: truncated and oversized records,
    /// handshake records that are no ClientHello, a ClientHello with a
    /// forged cookie. Nothing panics, no state is kept, nothing decrypts.
    #[test]
    fn garbage_keeps_no_state() {
        let (mut s, stats, _) = server(DtlsSettings::default());
        let mut c = client("meter-1", &[1; 16]);
        let _ = c.do_handshake();
        let hello = c.get_mut().take_output().next().unwrap();
        let mut forged = hello.clone();
        // The cookie length follows version, random and session id (RFC
        // 6347 section 4.2.1): say 16 bytes of cookie that are not ours.
        let cookie_at = 13 + 12 + 2 + 32;
        let sid = forged[cookie_at] as usize;
        forged[cookie_at + 1 + sid] = 16;
        forged.splice(cookie_at + 2 + sid..cookie_at + 2 + sid, [0u8; 16]);
        // Lengths grown to match: the record's, the message's, the fragment's.
        let grow = |bytes: &mut [u8]| {
            let n = bytes.iter().fold(0u32, |n, b| n << 8 | u32::from(*b)) + 16;
            let len = bytes.len();
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = (n >> (8 * (len - 1 - i))) as u8;
            }
        };
        grow(&mut forged[11..13]);
        grow(&mut forged[14..17]);
        grow(&mut forged[22..25]);
        let mut back = Vec::new();
        s.receive(link("10.2.0.9:9"), &forged, Instant::now(), &mut back);
        assert_eq!(
            back.len(),
            1,
            "a forged cookie is answered with a fresh one"
        );
        assert_eq!(
            back[0].1[13], 3,
            "HelloVerifyRequest (RFC 6347 section 4.2.1)"
        );
        let mut inputs: Vec<Vec<u8>> = vec![vec![], vec![22], vec![23; 13], vec![22; 2000], forged];
        inputs.extend((1..hello.len()).map(|n| hello[..n].to_vec()));
        let mut x: u32 = 1;
        for len in [1usize, 14, 100, 1500, 70_000] {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            inputs.push(junk.clone());
            let mut typed = junk;
            typed[0] = 22;
            inputs.push(typed);
        }
        let mut out = Vec::new();
        for (i, dgram) in inputs.iter().enumerate() {
            let r = s.receive(
                link(&format!("10.2.0.1:{}", 1000 + i)),
                dgram,
                Instant::now(),
                &mut out,
            );
            assert!(r.messages.is_empty() && r.peer.is_none());
        }
        assert_eq!(s.sessions.len(), 0, "nothing without a valid cookie");
        assert_eq!(stats.handshaking.load(Ordering::Relaxed), 0);
        assert!(
            stats.no_session.load(Ordering::Relaxed) >= 2,
            "non-handshake records are counted"
        );
    }

    #[test]
    fn sessions_stay_within_their_bounds() {
        let settings = DtlsSettings {
            max_sessions: 3,
            max_handshakes: 2,
            ..DtlsSettings::default()
        };
        let (mut s, stats, _) = server(settings);
        let key: &'static [u8] = &[
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff,
        ];
        // Five peers, one session each: the two least recently active go.
        for (port, identity) in ["meter-1", "m2", "m3", "m4", "m5"].into_iter().enumerate() {
            let mut c = client(identity, key);
            assert!(handshake(&mut s, &mut c, link(&format!("10.0.0.7:{port}"))));
            assert!(s.sessions.len() <= 3);
        }
        assert_eq!(stats.evicted.load(Ordering::Relaxed), 2);
        assert_eq!(stats.sessions.load(Ordering::Relaxed), 3);
        assert_eq!(stats.replaced.load(Ordering::Relaxed), 0);
    }

    /// A downlink message for a peer reached at `coaps://` opens a session
    /// to its device with the peer's PSK; what waited goes out once the
    /// handshake is done, in order; the device's answers come back as from
    /// the peer.
    #[test]
    fn the_gateway_opens_a_session_to_a_coaps_endpoint_and_sends_what_waited() {
        let (mut gw, stats, registry) = gateway(KEY_HEX);
        let (mut device, device_stats, _) = server(DtlsSettings::default());
        let device_addr: SocketAddr = DEVICE.parse().unwrap();
        let now = Instant::now();
        let mut out = Vec::new();
        gw.send_downlink(device_addr, b"first", now, &mut out);
        assert_eq!(out.len(), 1, "a ClientHello");
        assert_eq!(out[0].0, link(DEVICE));
        gw.send_downlink(device_addr, b"second", now, &mut out);
        assert_eq!(out.len(), 1, "the second message waits too");
        assert_eq!(stats.connects.load(Ordering::Relaxed), 1);
        assert_eq!(stats.handshaking.load(Ordering::Relaxed), 1);

        let got = pump(&mut gw, &mut device, out);
        assert_eq!(got.messages, vec![b"first".to_vec(), b"second".to_vec()]);
        assert_eq!(got.peer.map(|p| p.name), Some(Arc::from("meter")));
        assert_eq!(device_stats.hello_verify.load(Ordering::Relaxed), 1);
        assert_eq!(stats.handshakes.load(Ordering::Relaxed), 1);
        assert_eq!(stats.downlink_sent.load(Ordering::Relaxed), 2);
        assert_eq!(gw.peer(&link(DEVICE)).map(|p| &*p.name), Some("meter"));
        let listed = registry.list();
        assert_eq!(
            (listed.len(), listed[0].opened_by),
            (1, "gateway"),
            "{listed:?}"
        );

        // Once established, a message goes straight out; the answer is
        // the peer's.
        let mut out = Vec::new();
        gw.send_downlink(device_addr, b"third", now, &mut out);
        assert_eq!(
            pump(&mut gw, &mut device, out).messages,
            vec![b"third".to_vec()]
        );
        let mut back = Vec::new();
        assert!(device.send(link(GATEWAY), b"answer", &mut back));
        let (to, answer) = back.pop().unwrap();
        assert_eq!(to, link(GATEWAY));
        let r = gw.receive(link(DEVICE), &answer, now, &mut Vec::new());
        assert_eq!(r.messages, vec![b"answer".to_vec()]);
        assert_eq!(r.peer.map(|p| p.name), Some(Arc::from("meter")));
        assert_eq!(stats.connects.load(Ordering::Relaxed), 1, "one session");
    }

    /// A device that does not know the key never completes the handshake:
    /// what waited is counted as finding no session when it times out, and
    /// at most `MAX_WAITING` messages wait. An address no peer is reached
    /// at gets no session at all.
    #[test]
    fn a_failed_handshake_to_a_device_drops_what_waited_counted() {
        let (mut gw, stats, _) = gateway("ffeeddccbbaa99887766554433221100");
        let (mut device, _, _) = server(DtlsSettings::default());
        let device_addr: SocketAddr = DEVICE.parse().unwrap();
        let now = Instant::now();
        let mut out = Vec::new();
        for _ in 0..MAX_WAITING + 4 {
            gw.send_downlink(device_addr, b"command", now, &mut out);
        }
        assert_eq!(stats.waiting_dropped.load(Ordering::Relaxed), 4);
        let got = pump(&mut gw, &mut device, out);
        assert!(got.messages.is_empty());
        assert!(gw.peer(&link(DEVICE)).is_none());
        gw.sweep(
            now + DtlsSettings::default().handshake_timeout * 2,
            &mut Vec::new(),
        );
        assert_eq!(stats.handshake_timeouts.load(Ordering::Relaxed), 1);
        assert_eq!(
            stats.downlink_no_session.load(Ordering::Relaxed),
            MAX_WAITING as u64
        );
        assert_eq!(stats.handshaking.load(Ordering::Relaxed), 0);

        let mut out = Vec::new();
        gw.send_downlink("10.0.0.9:5684".parse().unwrap(), b"x", now, &mut out);
        assert!(out.is_empty(), "no peer is reached there");
        assert_eq!(
            stats.downlink_no_session.load(Ordering::Relaxed),
            MAX_WAITING as u64 + 1
        );
        assert_eq!(stats.connects.load(Ordering::Relaxed), 1);
    }
}
