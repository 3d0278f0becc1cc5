//! Block-wise transfers (RFC 7959): the Block1/Block2 option value, and
//! the reassembly of request bodies that arrive in blocks (Block1).
//!
//! A body is assembled per peer endpoint and request (method and Uri-Path;
//! RFC 7959 section 2.5 leaves the matching to the server), block by block
//! in order: a block must start where the body received so far ends. The
//! body is handed over whole when its last block arrives (a retransmission
//! of that block is answered by duplicate detection). Assemblies are
//! bounded in bytes altogether (the oldest is evicted first) and forgotten
//! when no block came for EXCHANGE_LIFETIME.

use super::Origin;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::time::Instant;

use super::message::uint_option;
use super::params::EXCHANGE_LIFETIME;

/// A Block1 or Block2 option value (section 2.2): block number, whether
/// more blocks follow, and the size exponent (size = 2^(SZX + 4)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub num: u32,
    pub more: bool,
    pub szx: u8,
}

/// The largest block number: 20 bits (section 2.2).
const MAX_NUM: u32 = (1 << 20) - 1;

impl Block {
    /// None for a value too long or SZX 7 (reserved over UDP; BERT,
    /// RFC 8323, is for reliable transports).
    pub fn parse(value: &[u8]) -> Option<Block> {
        if value.len() > 3 {
            return None;
        }
        let v = uint_option(value)?;
        let szx = (v & 7) as u8;
        (szx != 7).then_some(Block {
            num: v >> 4,
            more: v & 8 != 0,
            szx,
        })
    }

    /// Whether a value of the right length has the reserved SZX 7, which
    /// a request must be refused 4.00 for (section 2.2).
    pub fn reserved_szx(value: &[u8]) -> bool {
        value.len() <= 3 && value.last().is_some_and(|b| b & 7 == 7)
    }

    pub fn value(&self) -> u32 {
        self.num << 4 | u32::from(self.more) << 3 | u32::from(self.szx)
    }

    pub fn size(&self) -> usize {
        16 << self.szx
    }

    /// Where the block starts in the body.
    pub fn offset(&self) -> usize {
        self.num as usize * self.size()
    }

    /// The SZX of the largest block no longer than `bytes` (at least 16).
    pub fn szx_for(bytes: usize) -> u8 {
        (0..=6u8).rev().find(|s| 16 << s <= bytes).unwrap_or(0)
    }

    /// Block `num` of a `len`-byte representation sent in blocks of
    /// 2^(`szx`+4): its byte range and whether more follow; None when the
    /// block lies beyond the end.
    pub fn slice(num: u32, szx: u8, len: usize) -> Option<(std::ops::Range<usize>, bool)> {
        let size = 16usize << szx;
        let start = (num as usize).checked_mul(size)?;
        if num > MAX_NUM || (start >= len && !(start == 0 && len == 0)) {
            return None;
        }
        let end = (start + size).min(len);
        Some((start..end, end < len))
    }
}

/// Which body a block belongs to: the endpoint, and a hash of the
/// request's method and Uri-Path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BodyKey {
    pub src: Origin,
    request: u64,
}

impl BodyKey {
    pub fn new(src: Origin, method: u8, path: &[&str]) -> BodyKey {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        method.hash(&mut h);
        path.hash(&mut h);
        BodyKey {
            src,
            request: h.finish(),
        }
    }
}

/// What a Block1 block did.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Appended (or a repeat of the block just appended): answer 2.31
    /// Continue.
    Continue,
    /// The last block: here is the whole body.
    Complete(Vec<u8>),
    /// The block does not start where the body received so far ends, or
    /// no body was started: 4.08 Request Entity Incomplete (section 2.9.2).
    Incomplete,
    /// The body would exceed the largest body accepted: 4.13 with Size1
    /// (section 2.9.3). The assembly is dropped.
    TooLarge,
    /// A block longer than its size, or one that is not the last and
    /// shorter (section 2.2): 4.00.
    BadSize,
}

struct Assembly {
    body: Vec<u8>,
    /// Where the latest block started: a repeat of it is recognised.
    last_block_at: usize,
    last_at: Instant,
    /// Its place in `by_age`.
    age: u64,
}

/// One worker's assemblies.
pub struct Assemblies {
    max_body: usize,
    max_bytes: usize,
    bodies: HashMap<BodyKey, Assembly>,
    /// Oldest first: (age, key).
    by_age: BTreeMap<u64, BodyKey>,
    next_age: u64,
    bytes: usize,
    /// Assemblies dropped to make room for others.
    pub evicted: u64,
    /// Assemblies forgotten unfinished after EXCHANGE_LIFETIME.
    pub expired: u64,
}

impl Assemblies {
    pub fn new(max_body: usize, max_bytes: usize) -> Assemblies {
        Assemblies {
            max_body,
            max_bytes: max_bytes.max(max_body),
            bodies: HashMap::new(),
            by_age: BTreeMap::new(),
            next_age: 0,
            bytes: 0,
            evicted: 0,
            expired: 0,
        }
    }

    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// Takes one block of the body `key`. `size1`: the total size the
    /// client announced, if it did (section 4).
    pub fn receive(
        &mut self,
        key: BodyKey,
        block: Block,
        size1: Option<u32>,
        payload: &[u8],
        now: Instant,
    ) -> Step {
        if payload.len() > block.size() || (block.more && payload.len() != block.size()) {
            return Step::BadSize;
        }
        if size1.is_some_and(|s| s as usize > self.max_body) {
            self.remove(&key);
            return Step::TooLarge;
        }
        let offset = block.offset();
        if block.num == 0 {
            self.remove(&key);
            self.start(key, now);
        }
        let Some(a) = self.bodies.get_mut(&key) else {
            return Step::Incomplete;
        };
        let repeat = offset == a.last_block_at && offset + payload.len() == a.body.len();
        if !repeat {
            if offset != a.body.len() {
                return Step::Incomplete;
            }
            if offset + payload.len() > self.max_body {
                self.remove(&key);
                return Step::TooLarge;
            }
            // Capacity is what counts against the bound: grow by doubling
            // after making room for it (not to an announced Size1, which
            // would let one small block claim max_body).
            let (len, capacity) = (a.body.len(), a.body.capacity());
            let needed = len + payload.len();
            if needed > capacity {
                let target = needed.max(capacity * 2).min(self.max_body);
                self.make_room(target - capacity, &key);
                let a = self.bodies.get_mut(&key).expect("kept by make_room");
                a.body.reserve_exact(target - len);
                self.bytes += a.body.capacity() - capacity;
            }
            let a = self.bodies.get_mut(&key).expect("present");
            a.body.extend_from_slice(payload);
            a.last_block_at = offset;
        }
        if block.more {
            self.bodies.get_mut(&key).expect("present").last_at = now;
            return Step::Continue;
        }
        Step::Complete(self.remove(&key).expect("present").body)
    }

    /// Forgets assemblies no block came for in EXCHANGE_LIFETIME.
    pub fn sweep(&mut self, now: Instant) {
        let stale: Vec<BodyKey> = self
            .bodies
            .iter()
            .filter(|(_, a)| now.duration_since(a.last_at) >= EXCHANGE_LIFETIME)
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            self.remove(&key);
            self.expired += 1;
        }
    }

    /// Bytes allocated for all bodies.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.bodies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bodies.is_empty()
    }

    fn start(&mut self, key: BodyKey, now: Instant) {
        let age = self.next_age;
        self.next_age += 1;
        self.by_age.insert(age, key);
        self.bodies.insert(
            key,
            Assembly {
                body: Vec::new(),
                last_block_at: 0,
                last_at: now,
                age,
            },
        );
    }

    /// Evicts the oldest other assemblies until `more` bytes fit.
    fn make_room(&mut self, more: usize, keep: &BodyKey) {
        while self.bytes + more > self.max_bytes {
            let Some(oldest) = self.by_age.values().find(|k| *k != keep).copied() else {
                return; // only `keep` is left, and it fits under max_body
            };
            self.remove(&oldest);
            self.evicted += 1;
        }
    }

    fn remove(&mut self, key: &BodyKey) -> Option<Assembly> {
        let a = self.bodies.remove(key)?;
        self.by_age.remove(&a.age);
        self.bytes -= a.body.capacity();
        Some(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> BodyKey {
        BodyKey::new(
            Origin::Address(std::net::SocketAddr::from(([10, 0, 0, 1], port))),
            2,
            &["log"],
        )
    }

    fn block(num: u32, more: bool, szx: u8) -> Block {
        Block { num, more, szx }
    }

    #[test]
    fn option_values_round_trip_and_szx_7_is_refused() {
        for b in [
            block(0, false, 0),
            block(5, true, 6),
            block(MAX_NUM, false, 2),
        ] {
            let mut buf = [0u8; 4];
            let bytes = super::super::message::uint_bytes(b.value(), &mut buf);
            assert!(bytes.len() <= 3);
            assert_eq!(Block::parse(bytes), Some(b));
        }
        assert_eq!(Block::parse(&[0x07]), None, "SZX 7 is reserved");
        assert_eq!(Block::parse(&[1, 2, 3, 4]), None, "at most 3 bytes");
        assert!(Block::parse(&[0x07]).is_none() && Block::reserved_szx(&[0x07]));
        assert_eq!(block(3, false, 6).offset(), 3 * 1024);
        assert_eq!(Block::szx_for(1024), 6);
        assert_eq!(Block::szx_for(1000), 5);
        assert_eq!(Block::szx_for(5), 0);
    }

    #[test]
    fn slices_of_a_representation() {
        assert_eq!(Block::slice(0, 0, 40), Some((0..16, true)));
        assert_eq!(Block::slice(2, 0, 40), Some((32..40, false)));
        assert_eq!(Block::slice(3, 0, 40), None, "beyond the end");
        assert_eq!(Block::slice(1, 0, 32), Some((16..32, false)));
        assert_eq!(Block::slice(2, 0, 32), None);
        assert_eq!(Block::slice(0, 6, 0), Some((0..0, false)), "an empty one");
    }

    #[test]
    fn a_body_in_order_is_handed_over_once_whole() {
        let mut a = Assemblies::new(1 << 20, 1 << 20);
        let now = Instant::now();
        let body: Vec<u8> = (0..100u8).collect();
        for (i, chunk) in body.chunks(16).enumerate() {
            let more = (i + 1) * 16 < body.len();
            let step = a.receive(key(1), block(i as u32, more, 0), None, chunk, now);
            if more {
                assert_eq!(step, Step::Continue);
                // A repeated block is answered again, not appended twice.
                let again = a.receive(key(1), block(i as u32, more, 0), None, chunk, now);
                assert_eq!(again, Step::Continue);
                // Capacity counts, grown by doubling.
                assert_eq!(a.bytes(), (16 * (i + 1)).next_power_of_two());
            } else {
                assert_eq!(step, Step::Complete(body.clone()));
            }
        }
        assert!(a.is_empty());
        assert_eq!(a.bytes(), 0);
        // Nothing continues it now.
        assert_eq!(
            a.receive(key(1), block(6, false, 0), None, &body[96..], now),
            Step::Incomplete
        );
    }

    #[test]
    fn out_of_order_short_and_too_large_blocks() {
        let mut a = Assemblies::new(64, 1 << 20);
        let now = Instant::now();
        let sixteen = [7u8; 16];
        assert_eq!(
            a.receive(key(1), block(1, true, 0), None, &sixteen, now),
            Step::Incomplete,
            "no body started"
        );
        assert_eq!(
            a.receive(key(1), block(0, true, 0), None, &sixteen, now),
            Step::Continue
        );
        assert_eq!(
            a.receive(key(1), block(2, true, 0), None, &sixteen, now),
            Step::Incomplete,
            "block 1 is missing"
        );
        assert_eq!(
            a.receive(key(1), block(1, true, 0), None, &sixteen[..10], now),
            Step::BadSize
        );
        assert_eq!(
            a.receive(key(1), block(1, true, 0), None, &sixteen, now),
            Step::Continue
        );
        assert_eq!(
            a.receive(key(1), block(4, true, 0), None, &sixteen[..16], now),
            Step::Incomplete
        );
        assert_eq!(
            a.receive(key(1), block(2, true, 0), None, &sixteen, now),
            Step::Continue
        );
        assert_eq!(
            a.receive(key(1), block(3, true, 0), None, &sixteen, now),
            Step::Continue,
            "64 bytes: at the limit"
        );
        assert_eq!(
            a.receive(key(1), block(4, false, 0), None, &[1], now),
            Step::TooLarge
        );
        assert!(a.is_empty(), "a body over the limit is dropped");
        // A smaller block size continues at the same offset (section 2.3):
        // block 2 of 16 bytes follows block 0 of 32.
        let thirty_two = [3u8; 32];
        assert_eq!(
            a.receive(key(3), block(0, true, 1), None, &thirty_two, now),
            Step::Continue
        );
        assert_eq!(
            a.receive(key(3), block(2, false, 0), None, &sixteen, now),
            Step::Complete([&thirty_two[..], &sixteen[..]].concat())
        );
        assert_eq!(
            a.receive(key(2), block(0, true, 0), Some(65), &sixteen, now),
            Step::TooLarge,
            "Size1 says it will not fit"
        );
    }

    #[test]
    fn the_byte_bound_evicts_the_oldest_and_idle_ones_expire() {
        let mut a = Assemblies::new(64, 100);
        let t0 = Instant::now();
        let sixteen = [1u8; 16];
        for port in 0..10 {
            assert_eq!(
                a.receive(key(port), block(0, true, 0), None, &sixteen, t0),
                Step::Continue
            );
        }
        assert!(a.bytes() <= 100);
        assert_eq!(a.len(), 6);
        assert_eq!(a.evicted, 4);
        assert_eq!(
            a.receive(key(0), block(1, true, 0), None, &sixteen, t0),
            Step::Incomplete,
            "the oldest went first"
        );
        // Growing key 9 to 32 bytes evicts one more (key 4).
        let later = t0 + EXCHANGE_LIFETIME;
        assert_eq!(
            a.receive(key(9), block(1, true, 0), None, &sixteen, later),
            Step::Continue
        );
        assert_eq!(a.evicted, 5);
        a.sweep(later);
        assert_eq!(a.len(), 1, "only the one that got a block lately");
        assert_eq!(a.expired, 4);
        assert_eq!(a.bytes(), 32);
    }
}
