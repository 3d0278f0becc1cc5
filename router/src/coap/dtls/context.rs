//! The OpenSSL contexts the DTLS sessions of a worker are made from: the
//! cipher suites, the pre-shared keys of the configured peers, the
//! gateway's certificate and the CAs of its devices' certificates, and the
//! stateless cookies of RFC 6347 section 4.2.1. The server context answers
//! devices that connect; the client context opens sessions to devices that
//! listen (`endpoint = "coaps://..."`).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::memcmp;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::sign::Signer;
use openssl::ssl::{
    Ssl, SslContext, SslContextBuilder, SslMethod, SslMode, SslOptions, SslRef,
    SslSessionCacheMode, SslVerifyMode, SslVersion,
};
use openssl::x509::{X509Ref, X509StoreContextRef, X509VerifyResult};

use super::DtlsStats;
use crate::config::{Certificates, Psk};
use crate::mapping::{PeerInfo, SharedMapper};

/// AEAD suites only, the mandatory one first: RFC 7252 section 9.1.3.1
/// makes TLS_PSK_WITH_AES_128_CCM_8 mandatory in PreSharedKey mode (RFC
/// 7925 section 4.2 for constrained devices); section 9.1.3.2 makes
/// TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 mandatory with certificates.
const PSK_CIPHERS: &str =
    "PSK-AES128-CCM8:PSK-AES128-CCM:PSK-AES128-GCM-SHA256:ECDHE-PSK-CHACHA20-POLY1305";
const ECDSA_CIPHERS: &str =
    "ECDHE-ECDSA-AES128-CCM8:ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305";

/// Cookie length: a truncated HMAC-SHA256 (RFC 6347 allows up to 255).
const COOKIE_LEN: usize = 16;

/// The address the listener is answering, for the cookie callbacks (set on
/// the listener before each `DTLSv1_listen`).
pub fn peer_index() -> openssl::ex_data::Index<Ssl, SocketAddr> {
    static INDEX: OnceLock<openssl::ex_data::Index<Ssl, SocketAddr>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().expect("OpenSSL ex_data index"))
}

/// The index of the pre-shared key a client session presents.
fn psk_index() -> openssl::ex_data::Index<Ssl, Psk> {
    static INDEX: OnceLock<openssl::ex_data::Index<Ssl, Psk>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().expect("OpenSSL ex_data index"))
}

/// What the server and client contexts share.
fn builder(stats: &Arc<DtlsStats>) -> Result<SslContextBuilder, ErrorStack> {
    let mut b = SslContext::builder(SslMethod::dtls())?;
    b.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
    // CCM_8's 64-bit tag puts the mandatory suites below OpenSSL 3's
    // default security level 1.
    b.set_security_level(0);
    b.set_cipher_list(&format!("{PSK_CIPHERS}:{ECDSA_CIPHERS}"))?;
    // The MTU is set per object: the BIO is not a socket to ask.
    b.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_RENEGOTIATION);
    // Sessions at rest keep no read/write buffers (~34 KiB each otherwise).
    b.set_mode(SslMode::RELEASE_BUFFERS);
    super::alerts::count_into(&mut b, stats.clone());
    Ok(b)
}

/// Builds the server context. Pre-shared keys and certificate names are
/// looked up in the current mapper at each handshake, so peers added or
/// changed at run time are known at once.
pub fn server(
    mappers: Arc<SharedMapper>,
    stats: Arc<DtlsStats>,
    certificates: Option<&Certificates>,
) -> Result<SslContext, ErrorStack> {
    let mut b = builder(&stats)?;
    if let Some(certificates) = certificates {
        own_certificate(&mut b, certificates)?;
        certificate_mode(&mut b, mappers.clone(), stats.clone());
    }
    let stats_psk = stats.clone();
    b.set_psk_server_callback(move |_ssl, identity, key_out| {
        let (_, mapper) = mappers.load();
        match identity.and_then(|id| mapper.psk(id)) {
            Some((_, key)) if key.len() <= key_out.len() => {
                key_out[..key.len()].copy_from_slice(key);
                Ok(key.len())
            }
            // OpenSSL answers unknown_psk_identity (RFC 4279 section 2).
            _ => {
                stats_psk.unknown_identity.fetch_add(1, Ordering::Relaxed);
                Err(ErrorStack::get())
            }
        }
    });
    // The cookie binds the client's address (RFC 6347 section 4.2.1): a
    // spoofed source never sees it, so it never gets a session.
    let key = cookie_key()?;
    let verify_key = key.clone();
    b.set_cookie_generate_cb(move |ssl, out| {
        let n = cookie(&key, ssl, out)?;
        stats.hello_verify.fetch_add(1, Ordering::Relaxed);
        Ok(n)
    });
    b.set_cookie_verify_cb(move |ssl, given| {
        let mut expected = [0u8; COOKIE_LEN];
        matches!(cookie(&verify_key, ssl, &mut expected), Ok(n) if n == given.len() && memcmp::eq(&expected, given))
    });
    // Resumption by session ID (RFC 5246 section 7.4.1.2): a device back
    // within the cache's lifetime skips the key exchange.
    b.set_session_id_context(b"m2m-router coaps")?;
    b.set_session_cache_mode(SslSessionCacheMode::SERVER);
    Ok(b.build())
}

/// Builds the client context: a session to a device presents the peer's
/// pre-shared key (`connect` names it), or in certificate mode the
/// gateway's chain.
pub fn client(
    stats: Arc<DtlsStats>,
    certificates: Option<&Certificates>,
) -> Result<SslContext, ErrorStack> {
    let mut b = builder(&stats)?;
    if let Some(certificates) = certificates {
        own_certificate(&mut b, certificates)?;
    }
    b.set_psk_client_callback(|ssl, _hint, identity_out, key_out| {
        let Some(psk) = ssl.ex_data(psk_index()) else {
            return Err(ErrorStack::get());
        };
        // The identity goes out NUL-terminated.
        let n = psk.identity.len();
        if n >= identity_out.len() || psk.key.len() > key_out.len() {
            return Err(ErrorStack::get());
        }
        identity_out[..n].copy_from_slice(&psk.identity);
        identity_out[n] = 0;
        key_out[..psk.key.len()].copy_from_slice(&psk.key);
        Ok(psk.key.len())
    });
    Ok(b.build())
}

/// A client object for a session to `peer`'s device: with its PSK if it
/// has one; else with certificates, the device's having to chain to one
/// of the CAs and to name the peer's `cert_name` (RFC 7252 section
/// 9.1.3.3), checked during the handshake.
pub fn connect(
    ctx: &SslContext,
    peer: &PeerInfo,
    mtu: u32,
    stats: Arc<DtlsStats>,
) -> Result<Ssl, ErrorStack> {
    let mut ssl = Ssl::new(ctx)?;
    ssl.set_mtu(mtu)?;
    match (&peer.psk, &peer.cert_name) {
        (Some(psk), _) => {
            ssl.set_cipher_list(PSK_CIPHERS)?;
            ssl.set_ex_data(psk_index(), psk.clone());
        }
        (None, Some(name)) => {
            ssl.set_cipher_list(ECDSA_CIPHERS)?;
            let name = name.clone();
            ssl.set_verify_callback(SslVerifyMode::PEER, move |chain_ok, ctx| {
                verify_device(chain_ok, ctx, &stats, |names| names.contains(&name))
            });
        }
        // Config refuses a coaps:// endpoint without credentials.
        (None, None) => return Err(ErrorStack::get()),
    }
    ssl.set_connect_state();
    Ok(ssl)
}

/// The gateway's certificate chain and key, and the CAs its devices'
/// certificates must chain to.
fn own_certificate(
    b: &mut SslContextBuilder,
    certificates: &Certificates,
) -> Result<(), ErrorStack> {
    let (leaf, intermediates) = certificates
        .chain
        .split_first()
        .expect("config checks the chain has a certificate");
    b.set_certificate(leaf)?;
    for cert in intermediates {
        b.add_extra_chain_cert(cert.clone())?;
    }
    b.set_private_key(&certificates.key)?;
    b.check_private_key()?;
    for ca in &certificates.cas {
        b.cert_store_mut().add_cert(ca.clone())?;
    }
    Ok(())
}

/// Certificate mode (RFC 7252 section 9.1.3.3): a device must show a
/// certificate that chains to one of the CAs and whose name is some
/// peer's `cert_name` (checked during the handshake, so a device no peer
/// has gets an alert, not a session).
fn certificate_mode(b: &mut SslContextBuilder, mappers: Arc<SharedMapper>, stats: Arc<DtlsStats>) {
    b.set_verify_callback(
        SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
        move |chain_ok, ctx| {
            verify_device(chain_ok, ctx, &stats, |names| {
                let (_, mapper) = mappers.load();
                mapper
                    .certificate(names.iter().map(String::as_str))
                    .is_some()
            })
        },
    );
}

/// OpenSSL's verify callback for a device's certificate chain: the CAs
/// above the device's own certificate (depth 0) only need OpenSSL's
/// verdict; the device's must also have names `accepts`, else it is an
/// unknown identity (counted) and the handshake fails.
fn verify_device(
    chain_ok: bool,
    ctx: &mut X509StoreContextRef,
    stats: &DtlsStats,
    accepts: impl Fn(&[String]) -> bool,
) -> bool {
    if !chain_ok || ctx.error_depth() > 0 {
        return chain_ok;
    }
    let named = ctx
        .current_cert()
        .is_some_and(|cert| accepts(&certificate_names(cert)));
    if !named {
        stats.unknown_identity.fetch_add(1, Ordering::Relaxed);
        ctx.set_error(X509VerifyResult::APPLICATION_VERIFICATION);
    }
    named
}

/// The names a certificate gives its subject, as `[[peer]] cert_name`
/// matches them: the subject's common names, then the DNS, URI and email
/// subject alternative names (RFC 5280 section 4.2.1.6). IP addresses are
/// left out: an address is what a certificate is there to replace.
pub fn certificate_names(cert: &X509Ref) -> Vec<String> {
    let mut names: Vec<String> = cert
        .subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .filter_map(|e| e.data().to_string().ok())
        .collect();
    for alt in cert.subject_alt_names().into_iter().flatten() {
        if let Some(n) = alt.dnsname().or(alt.uri()).or(alt.email()) {
            names.push(n.to_owned());
        }
    }
    names
}

fn cookie_key() -> Result<PKey<Private>, ErrorStack> {
    let mut secret = [0u8; 32];
    openssl::rand::rand_bytes(&mut secret)?;
    PKey::hmac(&secret)
}

fn cookie(key: &PKey<Private>, ssl: &SslRef, out: &mut [u8]) -> Result<usize, ErrorStack> {
    let Some(addr) = ssl.ex_data(peer_index()) else {
        return Err(ErrorStack::get());
    };
    let mut signer = Signer::new(MessageDigest::sha256(), key)?;
    match addr {
        SocketAddr::V4(a) => signer.update(&a.ip().octets())?,
        SocketAddr::V6(a) => signer.update(&a.ip().octets())?,
    }
    signer.update(&addr.port().to_be_bytes())?;
    let mac = signer.sign_to_vec()?;
    let n = COOKIE_LEN.min(out.len());
    out[..n].copy_from_slice(&mac[..n]);
    Ok(n)
}
