//! A DTLS 1.2 client, with a PSK or a certificate, over a UDP socket
//! (OpenSSL, as the router uses):
//! a device the tests fully control, to send chosen CoAP messages over a
//! session (the same Message ID from two sessions, for one).

use std::io::{self, Read, Write};
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use foreign_types::ForeignTypeRef;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslSession, SslStream,
    SslVerifyMode,
};
use openssl::x509::X509;

use crate::certs::Issued;

/// A connected UDP socket as OpenSSL's datagram BIO: one datagram per read
/// and per write.
struct Udp(UdpSocket);

impl Read for Udp {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.recv(buf) {
            // A read timeout is "nothing yet" to OpenSSL (WANT_READ).
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(io::ErrorKind::WouldBlock.into()),
            other => other,
        }
    }
}

impl Write for Udp {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub struct DtlsClient {
    stream: SslStream<Udp>,
}

/// `DTLSv1_handle_timeout` (openssl/ssl.h).
const DTLS_CTRL_HANDLE_TIMEOUT: i32 = 74;

impl DtlsClient {
    /// Shakes hands over `sock` (connected to the server) with a PSK, the
    /// mandatory TLS_PSK_WITH_AES_128_CCM_8 suite; Err with OpenSSL's
    /// reason if it fails or has not finished within `deadline`.
    pub fn connect_psk(
        sock: UdpSocket,
        identity: &str,
        key: &[u8],
        deadline: Duration,
    ) -> Result<DtlsClient, String> {
        let mut b = builder("PSK-AES128-CCM8")?;
        let (identity, key) = (identity.to_owned(), key.to_vec());
        b.set_psk_client_callback(move |_, _, id_out, key_out| {
            id_out[..identity.len()].copy_from_slice(identity.as_bytes());
            id_out[identity.len()] = 0;
            key_out[..key.len()].copy_from_slice(&key);
            Ok(key.len())
        });
        Self::handshake(sock, b.build(), None, deadline)
    }

    /// Shakes hands with the device certificate `mine` and the mandatory
    /// TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 suite, checking the gateway's
    /// certificate against `ca`; resumes `session` when given (RFC 5246
    /// section 7.4.1.2).
    pub fn connect_certificate(
        sock: UdpSocket,
        mine: &Issued,
        ca: &X509,
        session: Option<&SslSession>,
        deadline: Duration,
    ) -> Result<DtlsClient, String> {
        let mut b = builder("ECDHE-ECDSA-AES128-CCM8")?;
        b.set_certificate(&mine.cert).map_err(|e| e.to_string())?;
        b.set_private_key(&mine.key).map_err(|e| e.to_string())?;
        b.cert_store_mut()
            .add_cert(ca.clone())
            .map_err(|e| e.to_string())?;
        b.set_verify(SslVerifyMode::PEER);
        Self::handshake(sock, b.build(), session, deadline)
    }

    fn handshake(
        sock: UdpSocket,
        ctx: SslContext,
        session: Option<&SslSession>,
        deadline: Duration,
    ) -> Result<DtlsClient, String> {
        let mut ssl = Ssl::new(&ctx).map_err(|e| e.to_string())?;
        ssl.set_mtu(1200).map_err(|e| e.to_string())?;
        if let Some(session) = session {
            // SAFETY: the session comes from a context with the same
            // settings, as SSL_set_session asks.
            unsafe { ssl.set_session(session) }.map_err(|e| e.to_string())?;
        }
        ssl.set_connect_state();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| e.to_string())?;
        let mut stream = SslStream::new(ssl, Udp(sock)).map_err(|e| e.to_string())?;
        let end = Instant::now() + deadline;
        loop {
            match stream.do_handshake() {
                Ok(()) => return Ok(DtlsClient { stream }),
                Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < end => {
                    // Retransmits the flight when its timer ran out.
                    // SAFETY: a valid SSL object; the call takes no pointer.
                    unsafe {
                        openssl_sys::SSL_ctrl(
                            stream.ssl().as_ptr(),
                            DTLS_CTRL_HANDLE_TIMEOUT,
                            0,
                            std::ptr::null_mut(),
                        );
                    }
                }
                Err(e) => return Err(format!("DTLS handshake: {e}")),
            }
        }
    }

    /// The session, to resume it from a new socket.
    pub fn session(&self) -> Option<SslSession> {
        self.stream.ssl().session().map(|s| s.to_owned())
    }

    /// Whether the handshake resumed an earlier session.
    pub fn resumed(&self) -> bool {
        self.stream.ssl().session_reused()
    }

    pub fn send(&mut self, message: &[u8]) {
        self.stream.ssl_write(message).expect("DTLS write");
    }

    /// The next message of the session, within `deadline`.
    pub fn receive(&mut self, deadline: Duration) -> Option<Vec<u8>> {
        let end = Instant::now() + deadline;
        let mut buf = vec![0u8; 2048];
        while Instant::now() < end {
            match self.stream.ssl_read(&mut buf) {
                Ok(n) => return Some(buf[..n].to_vec()),
                Err(e) if e.code() == ErrorCode::WANT_READ => continue,
                Err(_) => return None,
            }
        }
        None
    }

    /// Sends a CON request and returns the answer, sending it again every
    /// 2 s as a device would (RFC 7252 section 4.2) until `deadline`.
    pub fn exchange(&mut self, request: &[u8], deadline: Duration) -> Option<Vec<u8>> {
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            self.send(request);
            if let Some(answer) = self.receive(Duration::from_secs(2)) {
                return Some(answer);
            }
        }
        None
    }

    /// Ends the session with a close_notify.
    pub fn close(mut self) {
        let _ = self.stream.shutdown();
    }
}

/// A DTLS client context offering only `cipher` (CCM_8 needs security
/// level 0 in OpenSSL 3).
fn builder(cipher: &str) -> Result<SslContextBuilder, String> {
    let mut b = SslContext::builder(SslMethod::dtls()).map_err(|e| e.to_string())?;
    b.set_security_level(0);
    b.set_cipher_list(cipher).map_err(|e| e.to_string())?;
    b.set_options(SslOptions::NO_QUERY_MTU);
    Ok(b)
}

/// A PSK client's first ClientHello (no cookie yet), as it goes on the
/// wire: the datagram floods are made of.
pub fn client_hello(identity: &str) -> Vec<u8> {
    /// A wire that keeps what is written and has nothing to read.
    #[derive(Default)]
    struct Capture(Vec<Vec<u8>>);
    impl Read for Capture {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut b = builder("PSK-AES128-CCM8").expect("a DTLS context");
    let identity = identity.to_owned();
    b.set_psk_client_callback(move |_, _, id_out, key_out| {
        id_out[..identity.len()].copy_from_slice(identity.as_bytes());
        id_out[identity.len()] = 0;
        key_out[0] = 0;
        Ok(1)
    });
    let mut ssl = Ssl::new(&b.build()).expect("an SSL object");
    ssl.set_mtu(1200).expect("an MTU");
    ssl.set_connect_state();
    let mut stream = SslStream::new(ssl, Capture::default()).expect("a stream");
    let _ = stream.do_handshake();
    stream.get_mut().0.remove(0)
}
