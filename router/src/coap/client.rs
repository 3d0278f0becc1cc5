//! The client half of the message layer: requests the gateway sends as
//! confirmable messages, their retransmission, and what comes back matched
//! to them (RFC 7252 sections 4.2, 4.5, 5.2 and 5.3.2). It does no I/O: the
//! caller sends the datagrams it returns and hands it the replies.
//!
//! - An ACK or RST matches an exchange by endpoint and Message ID; a
//!   piggybacked response in the ACK must carry the request's token too.
//! - A separate response (CON or NON) matches by endpoint and token. A CON
//!   one is acknowledged, and acknowledged again if it is retransmitted, but
//!   handed to the caller once (duplicate detection, section 4.5).
//! - A response that matches nothing is rejected with RST (sections 4.2
//!   and 4.3; RFC 7641 section 3.6: it may be a notification of a
//!   relation the gateway forgot); anything else is ignored.
//!
//! - A confirmable message that is not a request (an Observe notification,
//!   RFC 7641 section 4.5) is retransmitted the same way and ends with its
//!   ACK or RST.
//!
//! - An Observe registration's token stays in use after its response
//!   (RFC 7641 section 3.3): later CON or NON responses with it are the
//!   relation's notifications, handed to the caller unacknowledged (the
//!   caller acknowledges a CON one once it has kept it, and recognises a
//!   retransmitted one by its sequence number, section 3.4).
//!
//! Exchanges are keyed by the caller (`K`: e.g. the peer a command goes
//! to), so the caller decides how many may be outstanding per peer
//! (NSTART, section 4.7).

use crate::coap::Endpoint;
use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use super::dedup::{Answer, DedupCache};
use super::ids::{Ids, MidSpace, Token};
use super::message::{self, code, Message, ACK, CON, NON, RST};
use super::params::{OnTimeout, Retransmission, TransmissionParams, EXCHANGE_LIFETIME};
use super::Origin;

/// Separate CON responses remembered per endpoint, and in all.
const TAKEN_PER_PEER: usize = 16;
const TAKEN_TOTAL: usize = 4096;

pub struct Client<K> {
    params: TransmissionParams,
    /// How long a separate response may take after the empty ACK.
    response_timeout: Duration,
    ids: Ids,
    exchanges: HashMap<K, Exchange>,
    by_mid: HashMap<(Endpoint, u16), K>,
    by_token: HashMap<(Endpoint, Token), K>,
    /// Observe registrations: the tokens whose notifications keep coming.
    listening: HashMap<(Endpoint, Token), K>,
    /// Separate CON responses already handed over.
    taken: DedupCache,
    /// The latest Message ID sent to each endpoint, and when. Each endpoint
    /// counts on its own: one counter for all, stepping once per message
    /// to anyone, would bring an ID back to a device within
    /// EXCHANGE_LIFETIME once thousands observe one topic (RFC 7252
    /// section 4.4).
    mids: HashMap<Endpoint, (u16, Instant)>,
}

struct Exchange {
    endpoint: Endpoint,
    mid: u16,
    /// A request's token (its response matches by it); None for a CON
    /// message that is itself a response (a notification).
    token: Option<Token>,
    datagram: Vec<u8>,
    retransmission: Retransmission,
    /// Set by an empty ACK: no more retransmissions, only the separate
    /// response is awaited (until `next_at`).
    acknowledged: bool,
    next_at: Instant,
}

/// What a reply meant.
#[derive(Debug)]
pub enum Reply<'a, K> {
    /// An empty ACK: the response follows separately (section 5.2.2); for
    /// a notification, the exchange is over.
    Acknowledged(K),
    /// A Reset (section 4.2): the exchange is over.
    Reset(K),
    /// The response, piggybacked or separate: the exchange is over.
    Response(K, Message<'a>),
    /// A CON or NON response with a registration's token (RFC 7641
    /// section 3.2), not acknowledged yet: see [`Client::register`].
    Notification(K, Message<'a>),
    /// Nothing for the caller: a stray, a repeated empty ACK, or a
    /// retransmitted separate response already handed over.
    Nothing,
}

/// An exchange that ended without an answer.
#[derive(Debug, PartialEq, Eq)]
pub struct GaveUp<K> {
    pub key: K,
    /// Whether an empty ACK came (and then no separate response).
    pub acknowledged: bool,
    pub transmissions: u32,
}

impl<K: Clone + Eq + Hash> Client<K> {
    pub fn new(params: TransmissionParams, response_timeout: Duration) -> Client<K> {
        Client {
            params,
            response_timeout,
            ids: Ids::new(MidSpace::Client),
            exchanges: HashMap::new(),
            by_mid: HashMap::new(),
            by_token: HashMap::new(),
            listening: HashMap::new(),
            taken: DedupCache::new(TAKEN_PER_PEER, TAKEN_TOTAL),
            mids: HashMap::new(),
        }
    }

    pub fn is_busy(&self, key: &K) -> bool {
        self.exchanges.contains_key(key)
    }

    /// Starts the exchange `key` (ending any earlier one of that key): a
    /// CON request to `endpoint`. Returns the datagram to send.
    pub fn request(
        &mut self,
        key: K,
        endpoint: Endpoint,
        method: u8,
        options: &[(u16, &[u8])],
        payload: &[u8],
        now: Instant,
    ) -> &[u8] {
        self.remove(&key);
        let mid = self.mid(endpoint, now);
        let token = self.new_token(endpoint);
        let mut datagram = Vec::new();
        message::encode(&mut datagram, CON, method, mid, &token, options, payload);
        self.by_token.insert((endpoint, token), key.clone());
        self.start(key, endpoint, mid, Some(token), datagram, now)
    }

    /// Starts the exchange `key` (ending any earlier one of that key): a
    /// CON Observe registration (the caller puts the Observe option in
    /// `options`), with `token` when it renews a relation (RFC 7641 section
    /// 3.3.1: the same token updates it in place) or a new one. Responses
    /// with the token that come separately, now and later, are
    /// [`Reply::Notification`]s until [`Client::forget`]. Returns the token
    /// and the datagram.
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        &mut self,
        key: K,
        endpoint: Endpoint,
        token: Option<Token>,
        method: u8,
        options: &[(u16, &[u8])],
        now: Instant,
    ) -> (Token, &[u8]) {
        self.remove(&key);
        let token = token.unwrap_or_else(|| self.new_token(endpoint));
        let mid = self.mid(endpoint, now);
        let mut datagram = Vec::new();
        message::encode(&mut datagram, CON, method, mid, &token, options, &[]);
        self.listening.insert((endpoint, token), key.clone());
        // The token is kept for the piggybacked response's match, but not
        // indexed: separate responses match through `listening`.
        (
            token,
            self.start(key, endpoint, mid, Some(token), datagram, now),
        )
    }

    /// A token no exchange or registration with `endpoint` uses.
    fn new_token(&mut self, endpoint: Endpoint) -> Token {
        loop {
            let token = self.ids.token();
            let key = (endpoint, token);
            if !self.by_token.contains_key(&key) && !self.listening.contains_key(&key) {
                return token;
            }
        }
    }

    /// Stops listening for `token`'s notifications from `endpoint`: the
    /// next one is rejected with RST, which ends the relation at the
    /// device (RFC 7641 section 3.6).
    pub fn forget(&mut self, endpoint: Endpoint, token: Token) {
        self.listening.remove(&(endpoint, token));
    }

    /// Starts the exchange `key` (ending any earlier one of that key): a
    /// CON response `code` with the client's `token` (an Observe
    /// notification), ended by its ACK or RST. Returns the datagram.
    #[allow(clippy::too_many_arguments)]
    pub fn confirm(
        &mut self,
        key: K,
        endpoint: Endpoint,
        code: u8,
        token: &[u8],
        options: &[(u16, &[u8])],
        payload: &[u8],
        now: Instant,
    ) -> &[u8] {
        self.remove(&key);
        let mid = self.mid(endpoint, now);
        let mut datagram = Vec::new();
        message::encode(&mut datagram, CON, code, mid, token, options, payload);
        self.start(key, endpoint, mid, None, datagram, now)
    }

    /// A Message ID for a message to `endpoint` (a NON the caller sends on
    /// its own, or an exchange's): the endpoint's next one that no exchange
    /// uses. Its counter starts at random in the client's half of the space.
    pub fn mid(&mut self, endpoint: Endpoint, now: Instant) -> u16 {
        let start = self.ids.mid();
        let (last, used) = self.mids.entry(endpoint).or_insert((start, now));
        *used = now;
        for _ in 0..0x8000 {
            *last = (last.wrapping_add(1) & 0x7fff) | 0x8000;
            if !self.by_mid.contains_key(&(endpoint, *last)) {
                break;
            }
        }
        // Every ID of the half in use by exchanges to this endpoint cannot
        // happen: exchanges per endpoint are far fewer (one command, one
        // notification per relation, relations capped per address).
        *last
    }

    fn start(
        &mut self,
        key: K,
        endpoint: Endpoint,
        mid: u16,
        token: Option<Token>,
        datagram: Vec<u8>,
        now: Instant,
    ) -> &[u8] {
        let retransmission = Retransmission::start(&self.params, now, self.ids.fraction());
        self.by_mid.insert((endpoint, mid), key.clone());
        let exchange = self.exchanges.entry(key).insert_entry(Exchange {
            endpoint,
            mid,
            token,
            datagram,
            next_at: retransmission.next_at,
            retransmission,
            acknowledged: false,
        });
        &exchange.into_mut().datagram
    }

    /// Ends the exchange `key` without an answer (the caller gave up on it).
    pub fn cancel(&mut self, key: &K) {
        self.remove(key);
    }

    /// When [`Client::expire`] next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.exchanges.values().map(|e| e.next_at).min()
    }

    /// Retransmits what is due through `send`, and ends the exchanges whose
    /// time is up.
    pub fn expire(
        &mut self,
        now: Instant,
        mut send: impl FnMut(Endpoint, &[u8]),
    ) -> Vec<GaveUp<K>> {
        let due: Vec<K> = self
            .exchanges
            .iter()
            .filter(|(_, e)| e.next_at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        let mut gave_up = Vec::new();
        for key in due {
            let Some(e) = self.exchanges.get_mut(&key) else {
                continue;
            };
            if !e.acknowledged
                && e.retransmission.on_timeout(&self.params, now) == OnTimeout::SendAgain
            {
                e.next_at = e.retransmission.next_at;
                send(e.endpoint, &e.datagram);
                continue;
            }
            if let Some(e) = self.remove(&key) {
                gave_up.push(GaveUp {
                    key,
                    acknowledged: e.acknowledged,
                    transmissions: e.retransmission.transmissions(),
                });
            }
        }
        gave_up
    }

    /// Matches a message from `src`. An empty ACK or RST to send back, if
    /// any, is left in `out` (cleared first).
    pub fn receive<'a>(
        &mut self,
        src: Endpoint,
        msg: &Message<'a>,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Reply<'a, K> {
        out.clear();
        match msg.mtype {
            ACK | RST => {
                let Some(key) = self.by_mid.get(&(src, msg.mid)).cloned() else {
                    return Reply::Nothing;
                };
                let e = self.exchanges.get_mut(&key).expect("indexed exchange");
                if msg.mtype == RST {
                    self.remove(&key);
                    return Reply::Reset(key);
                }
                if msg.code == code::EMPTY {
                    if e.token.is_none() {
                        // A notification: acknowledged is done.
                        self.remove(&key);
                        return Reply::Acknowledged(key);
                    }
                    if e.acknowledged {
                        return Reply::Nothing;
                    }
                    e.acknowledged = true;
                    e.next_at = now + self.response_timeout;
                    return Reply::Acknowledged(key);
                }
                // An ACK carries nothing but a response (section 4.2), which
                // matches by token too (section 5.3.2).
                if !is_response(msg.code) || e.token.is_none_or(|t| msg.token != t) {
                    return Reply::Nothing;
                }
                self.remove(&key);
                Reply::Response(key, *msg)
            }
            CON | NON if is_response(msg.code) => {
                if msg.mtype == CON
                    && self
                        .taken
                        .lookup(&Origin::Address(src.addr), msg.mid, now)
                        .is_some()
                {
                    empty(out, ACK, msg.mid);
                    return Reply::Nothing;
                }
                let token = Token::try_from(msg.token).ok();
                if let Some(key) = token.and_then(|t| self.listening.get(&(src, t))) {
                    let key = key.clone();
                    // A registration answered separately: its exchange is over.
                    if self.exchanges.get(&key).and_then(|e| e.token) == token {
                        self.remove(&key);
                    }
                    return Reply::Notification(key, *msg);
                }
                let found = token.and_then(|t| self.by_token.get(&(src, t)).cloned());
                let Some(key) = found else {
                    // Nobody waits for it: a late answer, or a notification
                    // of a relation forgotten (RFC 7641 section 3.6).
                    empty(out, RST, msg.mid);
                    return Reply::Nothing;
                };
                if msg.mtype == CON {
                    empty(out, ACK, msg.mid);
                    let answer = Answer::new(code::EMPTY, &[], None);
                    self.taken
                        .insert(Origin::Address(src.addr), msg.mid, answer, now);
                }
                self.remove(&key);
                Reply::Response(key, *msg)
            }
            // Neither a response nor a request (reserved classes): a CON
            // is rejected (section 4.2).
            CON => {
                empty(out, RST, msg.mid);
                Reply::Nothing
            }
            _ => Reply::Nothing,
        }
    }

    fn remove(&mut self, key: &K) -> Option<Exchange> {
        let e = self.exchanges.remove(key)?;
        self.by_mid.remove(&(e.endpoint, e.mid));
        if let Some(token) = e.token {
            self.by_token.remove(&(e.endpoint, token));
        }
        Some(e)
    }

    /// Drops expired duplicate-detection state; call now and then.
    pub fn sweep(&mut self, now: Instant) {
        self.taken.sweep(now);
        self.mids
            .retain(|_, (_, used)| now.duration_since(*used) < EXCHANGE_LIFETIME);
    }
}

/// Classes 2, 4 and 5 are responses (section 5.9; 3, 6, 7 are reserved).
fn is_response(code: u8) -> bool {
    matches!(code >> 5, 2 | 4 | 5)
}

/// An empty ACK or RST (section 4.1: code 0.00, no token, no payload).
pub fn empty(out: &mut Vec<u8>, mtype: u8, mid: u16) {
    message::encode(out, mtype, code::EMPTY, mid, &[], &[], &[]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coap::message::option;

    const DEVICE: Endpoint = Endpoint::plain(std::net::SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 7)),
        5683,
    ));

    fn client() -> Client<&'static str> {
        Client::new(TransmissionParams::default(), Duration::from_secs(30))
    }

    /// Sends a POST to /valve; returns its Message ID and token.
    fn post(c: &mut Client<&'static str>, key: &'static str, now: Instant) -> (u16, Vec<u8>) {
        let sent = c
            .request(
                key,
                DEVICE,
                code::POST,
                &[(option::URI_PATH, b"valve")],
                b"open",
                now,
            )
            .to_vec();
        let m = Message::decode(&sent).unwrap();
        assert_eq!(
            (m.mtype, m.code, m.payload),
            (CON, code::POST, &b"open"[..])
        );
        (m.mid, m.token.to_vec())
    }

    fn reply(mtype: u8, code: u8, mid: u16, token: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        message::encode(&mut out, mtype, code, mid, token, &[], b"done");
        out
    }

    #[test]
    fn a_piggybacked_response_ends_the_exchange_once() {
        let mut c = client();
        let now = Instant::now();
        let (mid, token) = post(&mut c, "a", now);
        let mut out = Vec::new();
        let wrong_token = reply(ACK, code::CHANGED, mid, &[0, 0, 0, 0, 0]);
        let got = c.receive(
            DEVICE,
            &Message::decode(&wrong_token).unwrap(),
            now,
            &mut out,
        );
        assert!(
            matches!(got, Reply::Nothing),
            "section 5.3.2: the token must match"
        );
        let other = Endpoint::plain(std::net::SocketAddr::from(([10, 0, 0, 8], 5683)));
        let ack = reply(ACK, code::CHANGED, mid, &token);
        let got = c.receive(other, &Message::decode(&ack).unwrap(), now, &mut out);
        assert!(matches!(got, Reply::Nothing), "another endpoint");
        match c.receive(DEVICE, &Message::decode(&ack).unwrap(), now, &mut out) {
            Reply::Response("a", m) => {
                assert_eq!((m.code, m.payload), (code::CHANGED, &b"done"[..]))
            }
            other => panic!("{other:?}"),
        }
        assert!(out.is_empty(), "an ACK is not answered");
        assert!(!c.is_busy(&"a"));
        let again = c.receive(DEVICE, &Message::decode(&ack).unwrap(), now, &mut out);
        assert!(matches!(again, Reply::Nothing));
    }

    #[test]
    fn a_separate_con_response_is_acknowledged_every_time_and_taken_once() {
        let mut c = client();
        let now = Instant::now();
        let (mid, token) = post(&mut c, "a", now);
        let mut out = Vec::new();
        let empty_ack = reply(ACK, code::EMPTY, mid, &[]);
        let empty_ack = &empty_ack[..4]; // code 0.00 has no payload
        assert!(matches!(
            c.receive(DEVICE, &Message::decode(empty_ack).unwrap(), now, &mut out),
            Reply::Acknowledged("a")
        ));
        // After the empty ACK nothing is retransmitted; the response has
        // until the response timeout.
        let mut resent = 0;
        assert!(c
            .expire(now + Duration::from_secs(29), |_, _| resent += 1)
            .is_empty());
        assert_eq!(resent, 0);
        let separate = reply(CON, code::CONTENT, 0x7777, &token);
        for round in 0..3 {
            let got = c.receive(DEVICE, &Message::decode(&separate).unwrap(), now, &mut out);
            assert_eq!(Message::decode(&out).unwrap().mtype, ACK, "round {round}");
            assert_eq!(Message::decode(&out).unwrap().mid, 0x7777);
            assert_eq!(matches!(got, Reply::Response("a", _)), round == 0);
        }
    }

    #[test]
    fn unmatched_responses_are_reset_and_a_reset_ends_the_exchange() {
        let mut c = client();
        let now = Instant::now();
        let (mid, _) = post(&mut c, "a", now);
        let mut out = Vec::new();
        let stray = reply(CON, code::CONTENT, 9, &[1, 2, 3, 4]);
        assert!(matches!(
            c.receive(DEVICE, &Message::decode(&stray).unwrap(), now, &mut out),
            Reply::Nothing
        ));
        assert_eq!(Message::decode(&out).unwrap().mtype, RST);
        let stray_non = reply(NON, code::CONTENT, 10, &[1, 2, 3, 4]);
        c.receive(DEVICE, &Message::decode(&stray_non).unwrap(), now, &mut out);
        assert_eq!(
            Message::decode(&out).unwrap().mtype,
            RST,
            "a NON that matches nothing is rejected too (RFC 7641 section 3.6: \
             it may be a notification of a relation the gateway forgot)"
        );
        let rst = [0x70, 0, (mid >> 8) as u8, mid as u8];
        assert!(matches!(
            c.receive(DEVICE, &Message::decode(&rst).unwrap(), now, &mut out),
            Reply::Reset("a")
        ));
        assert!(!c.is_busy(&"a"));
    }

    #[test]
    fn retransmits_the_same_datagram_then_gives_up() {
        let mut c = client();
        let t0 = Instant::now();
        let first = c.request("a", DEVICE, code::GET, &[], &[], t0).to_vec();
        post(&mut c, "b", t0 + Duration::from_secs(100));
        let mut sent = Vec::new();
        let mut gave_up = Vec::new();
        let mut now = t0;
        while let Some(at) = c
            .next_deadline()
            .filter(|at| *at < t0 + Duration::from_secs(99))
        {
            now = at;
            gave_up.extend(c.expire(now, |to, d| sent.push((to, d.to_vec()))));
        }
        assert_eq!(sent.len(), 4, "MAX_RETRANSMIT retransmissions");
        assert!(sent.iter().all(|(to, d)| *to == DEVICE && *d == first));
        assert_eq!(
            gave_up,
            vec![GaveUp {
                key: "a",
                acknowledged: false,
                transmissions: 5
            }]
        );
        // 2..3 s x (1 + 2 + 4 + 8 + 16) from the first transmission.
        let span = now - t0;
        assert!(
            span >= Duration::from_secs(62) && span <= Duration::from_secs(93),
            "{span:?}"
        );
        assert!(c.is_busy(&"b") && !c.is_busy(&"a"));
    }

    #[test]
    fn a_notification_ends_with_its_ack_or_rst_and_is_retransmitted_until_then() {
        let mut c = client();
        let t0 = Instant::now();
        let token = [7u8; 8];
        let sent = c
            .confirm(
                "n",
                DEVICE,
                code::CONTENT,
                &token,
                &[(6, &[1][..])],
                b"21.5",
                t0,
            )
            .to_vec();
        let m = Message::decode(&sent).unwrap();
        assert_eq!((m.mtype, m.code, m.token), (CON, code::CONTENT, &token[..]));
        let mut resent = Vec::new();
        let at = c.next_deadline().unwrap();
        c.expire(at, |_, d| resent.push(d.to_vec()));
        assert_eq!(resent, vec![sent.clone()], "the same datagram again");
        let mut out = Vec::new();
        let ack = [0x60, 0, (m.mid >> 8) as u8, m.mid as u8];
        let got = c.receive(DEVICE, &Message::decode(&ack).unwrap(), at, &mut out);
        assert!(matches!(got, Reply::Acknowledged("n")));
        assert!(!c.is_busy(&"n"), "acknowledged is done");
        // A NON's Message ID avoids those in use.
        let busy = Message::decode(c.confirm("m", DEVICE, code::CONTENT, &token, &[], b"", at))
            .unwrap()
            .mid;
        // The whole half of the space comes round without it.
        assert!((0..0x8000).all(|_| c.mid(DEVICE, at) != busy));
        // Each endpoint counts on its own.
        let other = Endpoint::plain(std::net::SocketAddr::from(([10, 0, 0, 9], 5683)));
        let (a, b) = (c.mid(DEVICE, at), c.mid(other, at));
        c.mid(other, at);
        assert_eq!(c.mid(DEVICE, at), (a.wrapping_add(1) & 0x7fff) | 0x8000);
        assert!(b >= 0x8000);
    }

    #[test]
    fn message_ids_and_tokens_differ_between_exchanges() {
        let mut c = client();
        let now = Instant::now();
        let (m1, t1) = post(&mut c, "a", now);
        let (m2, t2) = post(&mut c, "b", now);
        assert_ne!(m1, m2);
        assert_ne!(t1, t2);
        assert_eq!(t1.len(), 4, "32 random bits (section 5.3.1)");
    }

    #[test]
    fn a_registration_keeps_its_token_until_forgotten() {
        let mut c = client();
        let now = Instant::now();
        let observe = [(option::OBSERVE, &[][..]), (option::URI_PATH, b"temp")];
        let (token, sent) = c.register("w", DEVICE, None, code::GET, &observe, now);
        let sent = Message::decode(sent).unwrap();
        assert_eq!((sent.mtype, sent.token), (CON, &token[..]));
        let mut out = Vec::new();
        // An empty ACK, then the registration's answer as a separate CON.
        let ack = [0x60, 0, (sent.mid >> 8) as u8, sent.mid as u8];
        let got = c.receive(DEVICE, &Message::decode(&ack).unwrap(), now, &mut out);
        assert!(matches!(got, Reply::Acknowledged("w")));
        for (mtype, mid) in [(CON, 7), (NON, 8), (CON, 7)] {
            let n = reply(mtype, code::CONTENT, mid, &token);
            let got = c.receive(DEVICE, &Message::decode(&n).unwrap(), now, &mut out);
            assert!(
                matches!(got, Reply::Notification("w", m) if m.mid == mid),
                "every notification, a retransmitted one too, goes to the caller"
            );
            assert!(out.is_empty(), "the caller acknowledges once it kept it");
        }
        assert!(!c.is_busy(&"w"), "the separate answer ended the exchange");
        assert_eq!(c.next_deadline(), None);
        // Renewing with the same token (RFC 7641 section 3.3.1).
        let (again, _) = c.register("w", DEVICE, Some(token), code::GET, &observe, now);
        assert_eq!(again, token);
        c.forget(DEVICE, token);
        for mtype in [CON, NON] {
            let n = reply(mtype, code::CONTENT, 9, &token);
            let got = c.receive(DEVICE, &Message::decode(&n).unwrap(), now, &mut out);
            assert!(matches!(got, Reply::Nothing));
            assert_eq!(
                Message::decode(&out).unwrap().mtype,
                RST,
                "a forgotten relation's notification is rejected (section 3.6)"
            );
        }
    }
}
