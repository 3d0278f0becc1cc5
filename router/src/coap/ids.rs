//! Message IDs and tokens for the messages the gateway originates.
//!
//! Message IDs follow one another from a random start (RFC 7252 section
//! 4.4: randomised so that a restart does not reuse the IDs a device may
//! still remember). The uplink's responses and the client's requests reach
//! the same devices from the same endpoint but count separately, so each
//! has half of the 16-bit space and they never collide. Tokens are random
//! (section 5.3.1: at least 32 random bits for requests sent over an
//! unsecured transport, so an off-path attacker cannot guess one and spoof
//! a response): each is a keyed hash (SipHash, with keys from the operating
//! system's random source) of a counter, so seeing some tokens tells
//! nothing of the next.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

/// A token the gateway chose.
pub type Token = [u8; 4];

/// Which half of the Message ID space a generator uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MidSpace {
    /// Responses of the uplink server (NON answers to NON requests).
    Server,
    /// Requests of the client (downlink commands, notifications).
    Client,
}

pub struct Ids {
    high_bit: u16,
    next_mid: u16,
    keys: RandomState,
    counter: u64,
}

impl Ids {
    pub fn new(space: MidSpace) -> Ids {
        let mut ids = Ids {
            high_bit: match space {
                MidSpace::Server => 0,
                MidSpace::Client => 0x8000,
            },
            next_mid: 0,
            keys: RandomState::new(),
            counter: 0,
        };
        ids.next_mid = ids.random() as u16;
        ids
    }

    pub fn mid(&mut self) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid & 0x7fff | self.high_bit
    }

    pub fn token(&mut self) -> Token {
        (self.random() as u32).to_be_bytes()
    }

    /// Uniform in [0, 1): where a first retransmission timeout falls.
    pub fn fraction(&mut self) -> f64 {
        (self.random() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn random(&mut self) -> u64 {
        self.counter += 1;
        self.keys.hash_one(self.counter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn mids_follow_each_other_from_a_random_start_in_their_half() {
        let mut server = Ids::new(MidSpace::Server);
        let first = server.mid();
        assert_eq!(server.mid(), (first + 1) & 0x7fff);
        let mut client = Ids::new(MidSpace::Client);
        assert!((0..70_000).all(|_| server.mid() < 0x8000 && client.mid() >= 0x8000));
        // Two generators (two runs) start apart, almost always.
        let starts: HashSet<u16> = (0..8).map(|_| Ids::new(MidSpace::Client).mid()).collect();
        assert!(starts.len() > 1, "{starts:?}");
    }

    #[test]
    fn tokens_and_fractions_vary() {
        let mut ids = Ids::new(MidSpace::Client);
        let tokens: HashSet<Token> = (0..1000).map(|_| ids.token()).collect();
        assert!(tokens.len() >= 999, "{} distinct", tokens.len());
        let fractions: Vec<f64> = (0..1000).map(|_| ids.fraction()).collect();
        assert!(fractions.iter().all(|f| (0.0..1.0).contains(f)));
        let mean = fractions.iter().sum::<f64>() / 1000.0;
        assert!((0.4..0.6).contains(&mean), "{mean}");
    }
}
