//! Fatal DTLS alerts, sent and received, counted by description (RFC 5246
//! section 7.2, RFC 4279 section 2): why handshakes fail, as the operator
//! needs to tell a wrong key from an unknown CA.

use std::os::raw::c_int;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use foreign_types::ForeignTypeRef;
use openssl::ssl::{SslContext, SslContextBuilder, SslContextRef};

use super::DtlsStats;

macro_rules! alerts {
    ($($code:literal $name:ident),* $(,)?) => {
        /// Each alert's code and its counters' names, sent and received.
        const ALERTS: &[(u8, &str, &str)] = &[
            $(($code, concat!("alert_sent_", stringify!($name)),
                      concat!("alert_received_", stringify!($name)))),*
        ];
    };
}

alerts! {
    10 unexpected_message, 20 bad_record_mac, 22 record_overflow,
    40 handshake_failure, 42 bad_certificate, 43 unsupported_certificate,
    44 certificate_revoked, 45 certificate_expired, 46 certificate_unknown,
    47 illegal_parameter, 48 unknown_ca, 49 access_denied, 50 decode_error,
    51 decrypt_error, 70 protocol_version, 71 insufficient_security,
    80 internal_error, 90 user_canceled, 110 unsupported_extension,
    115 unknown_psk_identity,
}

/// Codes not in the table.
const OTHER: (&str, &str) = ("alert_sent_other", "alert_received_other");

/// Fatal alerts by direction and description.
#[derive(Debug, Default)]
pub struct Alerts {
    sent: [AtomicU64; ALERTS.len() + 1],
    received: [AtomicU64; ALERTS.len() + 1],
}

impl Alerts {
    fn count(&self, sent: bool, code: u8) {
        let i = ALERTS
            .iter()
            .position(|(c, _, _)| *c == code)
            .unwrap_or(ALERTS.len());
        let side = if sent { &self.sent } else { &self.received };
        side[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The alerts seen so far (those never seen are left out).
    pub fn snapshot(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        let names = ALERTS
            .iter()
            .map(|(_, s, r)| (*s, *r))
            .chain(std::iter::once(OTHER));
        names
            .zip(self.sent.iter().zip(&self.received))
            .flat_map(|((s, r), (sent, received))| {
                [
                    (s, sent.load(Ordering::Relaxed)),
                    (r, received.load(Ordering::Relaxed)),
                ]
            })
            .filter(|(_, n)| *n > 0)
    }
}

// libssl's info callback, which the openssl crate does not wrap.
extern "C" {
    fn SSL_CTX_set_info_callback(
        ctx: *mut openssl_sys::SSL_CTX,
        cb: Option<unsafe extern "C" fn(*const openssl_sys::SSL, c_int, c_int)>,
    );
}
/// openssl/ssl.h: an alert, read or written; its level is the high byte
/// of `ret`, its description the low byte.
const SSL_CB_READ: c_int = 0x04;
const SSL_CB_WRITE: c_int = 0x08;
const SSL_CB_ALERT: c_int = 0x4000;
const FATAL: c_int = 2;

fn stats_index() -> openssl::ex_data::Index<SslContext, Arc<DtlsStats>> {
    static INDEX: OnceLock<openssl::ex_data::Index<SslContext, Arc<DtlsStats>>> = OnceLock::new();
    *INDEX.get_or_init(|| SslContext::new_ex_index().expect("OpenSSL ex_data index"))
}

/// Counts the fatal alerts of every session made from `b` in `stats`.
pub fn count_into(b: &mut SslContextBuilder, stats: Arc<DtlsStats>) {
    b.set_ex_data(stats_index(), stats);
    // SAFETY: a valid SSL_CTX under construction; the callback is a plain
    // function that only reads the context's ex_data.
    unsafe { SSL_CTX_set_info_callback(b.as_ptr(), Some(on_info)) };
}

unsafe extern "C" fn on_info(ssl: *const openssl_sys::SSL, what: c_int, ret: c_int) {
    if what & SSL_CB_ALERT == 0 || ret >> 8 != FATAL {
        return;
    }
    // SAFETY: OpenSSL passes a live SSL object whose context outlives it.
    let ctx = unsafe { SslContextRef::from_ptr(openssl_sys::SSL_get_SSL_CTX(ssl)) };
    if let Some(stats) = ctx.ex_data(stats_index()) {
        let sent = what & SSL_CB_WRITE != 0;
        debug_assert!(sent || what & SSL_CB_READ != 0);
        stats.alerts.count(sent, (ret & 0xff) as u8);
    }
}
