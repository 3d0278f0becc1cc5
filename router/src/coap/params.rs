//! Transmission parameters (RFC 7252 section 4.8) and the retransmission
//! schedule of a confirmable message (section 4.2), for every CON the
//! gateway sends: downlink requests, and later notifications and blocks.

use std::time::{Duration, Instant};

/// EXCHANGE_LIFETIME (section 4.8.2) with the default parameters: how long
/// a Message ID is remembered. Devices retransmit by their own parameters,
/// and the defaults are what a device is assumed to use.
pub const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);

/// MAX_LATENCY (section 4.8.2).
const MAX_LATENCY: Duration = Duration::from_secs(100);

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TransmissionParams {
    pub ack_timeout: Duration,
    pub ack_random_factor: f64,
    pub max_retransmit: u32,
}

impl Default for TransmissionParams {
    /// Section 4.8.
    fn default() -> Self {
        TransmissionParams {
            ack_timeout: Duration::from_secs(2),
            ack_random_factor: 1.5,
            max_retransmit: 4,
        }
    }
}

impl TransmissionParams {
    /// MAX_TRANSMIT_SPAN: from the first transmission to the last.
    pub fn max_transmit_span(&self) -> Duration {
        let doublings = (1u32 << self.max_retransmit.min(20)) - 1;
        (self.ack_timeout * doublings).mul_f64(self.ack_random_factor)
    }

    /// EXCHANGE_LIFETIME: MAX_TRANSMIT_SPAN + 2 x MAX_LATENCY +
    /// PROCESSING_DELAY (which is ACK_TIMEOUT).
    pub fn exchange_lifetime(&self) -> Duration {
        self.max_transmit_span() + 2 * MAX_LATENCY + self.ack_timeout
    }
}

/// When a CON message is sent again, and when it is given up (section 4.2):
/// the first timeout is random in [ACK_TIMEOUT, ACK_TIMEOUT x
/// ACK_RANDOM_FACTOR], each later one twice the one before, and after
/// MAX_RETRANSMIT retransmissions the last timeout ends the exchange.
#[derive(Clone, Copy, Debug)]
pub struct Retransmission {
    timeout: Duration,
    retransmissions: u32,
    pub next_at: Instant,
}

/// What to do when a CON message's timeout runs out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnTimeout {
    SendAgain,
    GiveUp,
}

impl Retransmission {
    /// `random` in [0, 1) picks the first timeout within its range.
    pub fn start(params: &TransmissionParams, now: Instant, random: f64) -> Retransmission {
        let spread = random.clamp(0.0, 1.0) * (params.ack_random_factor - 1.0).max(0.0);
        let timeout = params.ack_timeout.mul_f64(1.0 + spread);
        Retransmission {
            timeout,
            retransmissions: 0,
            next_at: now + timeout,
        }
    }

    /// Called at `next_at`.
    pub fn on_timeout(&mut self, params: &TransmissionParams, now: Instant) -> OnTimeout {
        if self.retransmissions >= params.max_retransmit {
            return OnTimeout::GiveUp;
        }
        self.retransmissions += 1;
        self.timeout *= 2;
        self.next_at = now + self.timeout;
        OnTimeout::SendAgain
    }

    /// Transmissions so far, the first included.
    pub fn transmissions(&self) -> u32 {
        self.retransmissions + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Section 4.8.2 from the defaults of section 4.8: MAX_TRANSMIT_SPAN =
    /// 2 x 15 x 1.5 = 45 s; EXCHANGE_LIFETIME = 45 + 2 x 100 + 2 = 247 s.
    #[test]
    fn derived_times_match_rfc_7252_section_4_8_2() {
        let p = TransmissionParams::default();
        assert_eq!(p.max_transmit_span(), Duration::from_secs(45));
        assert_eq!(p.exchange_lifetime(), Duration::from_secs(247));
        assert_eq!(p.exchange_lifetime(), EXCHANGE_LIFETIME);
    }

    #[test]
    fn timeouts_double_and_end_after_max_retransmit() {
        let p = TransmissionParams::default();
        let t0 = Instant::now();
        // The lowest and highest first timeouts.
        assert_eq!(
            Retransmission::start(&p, t0, 0.0).next_at,
            t0 + p.ack_timeout
        );
        let highest = Retransmission::start(&p, t0, 0.999_999).next_at - t0;
        assert!(highest > Duration::from_millis(2999) && highest < Duration::from_secs(3));
        let mut r = Retransmission::start(&p, t0, 0.0);
        let mut now = t0;
        let mut waits = Vec::new();
        loop {
            let waited = r.next_at - now;
            now = r.next_at;
            waits.push(waited.as_secs());
            if r.on_timeout(&p, now) == OnTimeout::GiveUp {
                break;
            }
        }
        // Four retransmissions after 2, 4, 8 and 16 s; given up 32 s later.
        assert_eq!(waits, vec![2, 4, 8, 16, 32]);
        assert_eq!(r.transmissions(), 5);
        // The last retransmission is within MAX_TRANSMIT_SPAN of the first.
        assert!(Duration::from_secs(2 + 4 + 8 + 16) <= p.max_transmit_span());
    }
}
