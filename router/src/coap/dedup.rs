//! Duplicate detection (RFC 7252 section 4.5): a message with the same
//! source endpoint and Message ID seen within EXCHANGE_LIFETIME is a
//! retransmission. It is not processed again; a CON gets the same response.
//!
//! Each worker owns one cache (a peer endpoint always lands on the same
//! worker), so there is no locking. Entries are small and inline (the
//! response is rebuilt from its code and token), and bounded per peer and in
//! total; an entry evicted early is counted, since a retransmission arriving
//! after it would be processed twice.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// RFC 7252 section 4.8.2 with the default transmission parameters.
pub const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);

/// What was answered to a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Response code; 0 for "nothing was sent" (a NON request).
    pub code: u8,
    pub token_len: u8,
    pub token: [u8; 8],
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
    peers: HashMap<SocketAddr, PeerLog>,
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
    pub fn lookup(&self, peer: &SocketAddr, mid: u16, now: Instant) -> Option<Answer> {
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

    pub fn insert(&mut self, peer: SocketAddr, mid: u16, answer: Answer, now: Instant) {
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
    pub fn forget(&mut self, peer: &SocketAddr, mid: u16) {
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
    fn evict_one(&mut self, peer: &SocketAddr, now: Instant) {
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

    const A: Answer = Answer {
        code: 0x44,
        token_len: 1,
        token: [9, 0, 0, 0, 0, 0, 0, 0],
    };

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    /// RFC 7252 section 4.8.2, from the default transmission parameters of
    /// section 4.8: MAX_TRANSMIT_SPAN = ACK_TIMEOUT x (2^MAX_RETRANSMIT - 1)
    /// x ACK_RANDOM_FACTOR = 2 x 15 x 1.5 = 45 s; EXCHANGE_LIFETIME =
    /// MAX_TRANSMIT_SPAN + 2 x MAX_LATENCY (100 s) + PROCESSING_DELAY
    /// (ACK_TIMEOUT, 2 s) = 247 s.
    #[test]
    fn remembers_for_rfc_7252_exchange_lifetime_only() {
        let (ack_timeout, max_retransmit, ack_random_factor) = (2.0, 4, 1.5);
        let max_transmit_span =
            ack_timeout * f64::from((1u32 << max_retransmit) - 1) * ack_random_factor;
        let rfc_lifetime = max_transmit_span + 2.0 * 100.0 + ack_timeout;
        assert_eq!(rfc_lifetime, 247.0);
        let lifetime = Duration::from_secs_f64(rfc_lifetime);
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
