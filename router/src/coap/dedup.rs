//! Duplicate detection (RFC 7252 section 4.5): a message with the same
//! source endpoint and Message ID seen within EXCHANGE_LIFETIME is a
//! retransmission. It is not processed again; a CON gets the same response.
//!
//! Each worker owns one cache (a peer endpoint always lands on the same
//! worker), so there is no locking. Entries are small and inline (the
//! response is rebuilt from its code and token), and bounded per peer and in
//! total; an entry evicted early is counted, since a retransmission arriving
//! after it would be processed twice.

use super::Origin;
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use super::message;
use super::params::EXCHANGE_LIFETIME;

/// What was answered to a message, enough to send it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Response code; 0 for "nothing was sent" (a NON request), or an
    /// empty ACK.
    pub code: u8,
    token_len: u8,
    token: [u8; 8],
    /// The one uint option the response carried (a Block1 echo, or Size1
    /// with 4.13): its number (0 for none; both fit a byte) and value.
    /// Packed so that an entry stays 16 bytes: there may be a million.
    option_number: u8,
    option_value: u32,
}

impl Answer {
    /// `token` is at most 8 bytes (RFC 7252 section 3).
    pub fn new(code: u8, token: &[u8], option: Option<(u16, u32)>) -> Answer {
        let mut t = [0u8; 8];
        t[..token.len()].copy_from_slice(token);
        let (number, value) = option.unwrap_or((0, 0));
        let option_number = u8::try_from(number).expect("Block1 and Size1 fit a byte");
        Answer {
            code,
            token_len: token.len() as u8,
            token: t,
            option_number,
            option_value: value,
        }
    }

    /// The response as a message of type `mtype` (an ACK piggybacking it
    /// on message `mid`, or a NON of our own `mid`).
    pub fn encode(&self, out: &mut Vec<u8>, mtype: u8, mid: u16) {
        let mut buf = [0u8; 4];
        let option = [(
            u16::from(self.option_number),
            message::uint_bytes(self.option_value, &mut buf),
        )];
        let options = if self.option_number == 0 {
            &[][..]
        } else {
            &option[..]
        };
        message::encode(
            out,
            mtype,
            self.code,
            mid,
            &self.token[..usize::from(self.token_len)],
            options,
            &[],
        );
    }
}

struct Exchange {
    at: Instant,
    answer: Answer,
}

/// One peer's exchanges, oldest first. The Message IDs are kept apart from
/// the rest so the common case, a new MID, is a scan of a few hundred
/// packed u16s that the compiler vectorises.
#[derive(Default)]
struct PeerLog {
    mids: VecDeque<u16>,
    exchanges: VecDeque<Exchange>,
}

impl PeerLog {
    fn may_hold(&self, mid: u16) -> bool {
        let (a, b) = self.mids.as_slices();
        // Branch-free within a chunk: no early exit, so it vectorises.
        let holds = |s: &[u16]| {
            s.chunks(32)
                .any(|c| c.iter().fold(false, |found, &m| found | (m == mid)))
        };
        holds(a) || holds(b)
    }

    fn front_expired(&self, now: Instant) -> bool {
        self.exchanges
            .front()
            .is_some_and(|e| now.duration_since(e.at) >= EXCHANGE_LIFETIME)
    }

    fn pop_front(&mut self) -> Option<Exchange> {
        self.mids.pop_front();
        self.exchanges.pop_front()
    }

    fn len(&self) -> usize {
        self.exchanges.len()
    }

    fn is_empty(&self) -> bool {
        self.exchanges.is_empty()
    }
}

pub struct DedupCache {
    peers: HashMap<Origin, PeerLog>,
    per_peer: usize,
    max_total: usize,
    total: usize,
    /// Entries dropped before their lifetime ended.
    pub evictions: u64,
}

impl DedupCache {
    pub fn new(per_peer: usize, max_total: usize) -> DedupCache {
        DedupCache {
            peers: HashMap::new(),
            per_peer: per_peer.max(1),
            max_total: max_total.max(1),
            total: 0,
            evictions: 0,
        }
    }

    /// The answer given to (`peer`, `mid`) within the exchange lifetime.
    pub fn lookup(&self, peer: &Origin, mid: u16, now: Instant) -> Option<Answer> {
        let log = self.peers.get(peer)?;
        if !log.may_hold(mid) {
            return None;
        }
        log.mids
            .iter()
            .zip(&log.exchanges)
            .rev()
            .find(|(m, e)| **m == mid && now.duration_since(e.at) < EXCHANGE_LIFETIME)
            .map(|(_, e)| e.answer)
    }

    pub fn insert(&mut self, peer: Origin, mid: u16, answer: Answer, now: Instant) {
        if self.total >= self.max_total {
            self.evict_one(&peer, now);
        }
        let log = self.peers.entry(peer).or_default();
        // Expired entries leave from the front (insertion order = age).
        while log.front_expired(now) {
            log.pop_front();
            self.total -= 1;
        }
        if log.len() >= self.per_peer {
            log.pop_front();
            self.total -= 1;
            self.evictions += 1;
        }
        log.mids.push_back(mid);
        log.exchanges.push_back(Exchange { at: now, answer });
        self.total += 1;
    }

    /// Forgets the newest exchange (`peer`, `mid`), so a retransmission of
    /// it is processed as new (used when its batch could not be committed).
    pub fn forget(&mut self, peer: &Origin, mid: u16) {
        let Some(log) = self.peers.get_mut(peer) else {
            return;
        };
        if let Some(i) = log.mids.iter().rposition(|m| *m == mid) {
            log.mids.remove(i);
            log.exchanges.remove(i);
            self.total -= 1;
        }
    }

    /// Makes room under the total bound: the oldest entry of this peer, else
    /// of any peer (expired ones first, which cost no eviction).
    fn evict_one(&mut self, peer: &Origin, now: Instant) {
        let victim = match self.peers.get(peer) {
            Some(log) if !log.is_empty() => *peer,
            _ => match self.peers.iter().find(|(_, log)| !log.is_empty()) {
                Some((p, _)) => *p,
                None => return,
            },
        };
        if let Some(log) = self.peers.get_mut(&victim) {
            if let Some(old) = log.pop_front() {
                self.total -= 1;
                if now.duration_since(old.at) < EXCHANGE_LIFETIME {
                    self.evictions += 1;
                }
            }
            if log.is_empty() {
                self.peers.remove(&victim);
            }
        }
    }

    /// Drops expired entries and forgotten peers; call now and then.
    pub fn sweep(&mut self, now: Instant) {
        let mut removed = 0;
        self.peers.retain(|_, log| {
            while log.front_expired(now) {
                log.pop_front();
                removed += 1;
            }
            !log.is_empty()
        });
        self.total -= removed;
    }

    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const A: Answer = Answer {
        code: 0x44,
        token_len: 1,
        token: [9, 0, 0, 0, 0, 0, 0, 0],
        option_number: 0,
        option_value: 0,
    };

    fn peer(port: u16) -> Origin {
        Origin::Address(std::net::SocketAddr::from(([10, 0, 0, 1], port)))
    }

    #[test]
    fn remembers_for_the_exchange_lifetime_only() {
        let lifetime = EXCHANGE_LIFETIME;
        let mut c = DedupCache::new(8, 100);
        let t0 = Instant::now();
        c.insert(peer(1), 7, A, t0);
        assert_eq!(
            c.lookup(&peer(1), 7, t0 + lifetime - Duration::from_millis(1)),
            Some(A),
            "a duplicate just inside the lifetime is recognised"
        );
        assert_eq!(c.lookup(&peer(2), 7, t0), None, "another endpoint");
        assert_eq!(c.lookup(&peer(1), 8, t0), None, "another MID");
        assert_eq!(
            c.lookup(&peer(1), 7, t0 + lifetime),
            None,
            "and not after it"
        );
        c.sweep(t0 + lifetime);
        assert!(c.is_empty());
        assert_eq!(c.evictions, 0);
    }

    #[test]
    fn an_answer_is_sixteen_bytes_and_rebuilds_its_response() {
        assert_eq!(std::mem::size_of::<Answer>(), 16);
        let answer = Answer::new(0x5f, &[1, 2], Some((27, 0x18)));
        let mut out = Vec::new();
        answer.encode(&mut out, message::ACK, 77);
        let m = message::Message::decode(&out).unwrap();
        assert_eq!(
            (m.mtype, m.code, m.mid, m.token),
            (message::ACK, 0x5f, 77, &[1, 2][..])
        );
        assert_eq!(m.options().collect::<Vec<_>>(), vec![(27, &[0x18][..])]);
    }

    #[test]
    fn bounds_per_peer_and_total_count_evictions() {
        let mut c = DedupCache::new(4, 10);
        let t = Instant::now();
        for mid in 0..6 {
            c.insert(peer(1), mid, A, t);
        }
        assert_eq!(c.len(), 4);
        assert_eq!(c.evictions, 2);
        assert_eq!(c.lookup(&peer(1), 0, t), None);
        assert_eq!(c.lookup(&peer(1), 5, t), Some(A));
        for p in 2..10 {
            c.insert(peer(p), 1, A, t);
        }
        assert_eq!(c.len(), 10);
        assert!(c.evictions >= 4);
    }

    #[test]
    fn finds_every_remembered_mid_across_the_ring_and_chunks() {
        // 100 entries in a ring of 64 wrap the deque (two slices) and span
        // several 32-MID chunks of the vectorised scan.
        let mut c = DedupCache::new(64, 1000);
        let t = Instant::now();
        for mid in 0..100u16 {
            c.insert(peer(1), mid * 3, A, t);
        }
        for mid in 0..100u16 {
            let expected = (mid >= 36).then_some(A);
            assert_eq!(c.lookup(&peer(1), mid * 3, t), expected, "mid {}", mid * 3);
            assert_eq!(c.lookup(&peer(1), mid * 3 + 1, t), None);
        }
    }

    #[test]
    fn forgets_one_exchange() {
        let mut c = DedupCache::new(8, 100);
        let t = Instant::now();
        for mid in [1, 2, 3] {
            c.insert(peer(1), mid, A, t);
        }
        c.forget(&peer(1), 2);
        c.forget(&peer(2), 1); // unknown peer: nothing happens
        assert_eq!(c.lookup(&peer(1), 2, t), None);
        assert_eq!(c.lookup(&peer(1), 1, t), Some(A));
        assert_eq!(c.lookup(&peer(1), 3, t), Some(A));
        assert_eq!(c.len(), 2);
    }
}
