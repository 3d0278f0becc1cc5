//! A DTLS 1.2 PSK client over a UDP socket (OpenSSL, as the router uses):
//! a device the tests fully control, to send chosen CoAP messages over a
//! session (the same Message ID from two sessions, for one).

use std::io::{self, Read, Write};
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use foreign_types::ForeignTypeRef;
use openssl::ssl::{ErrorCode, Ssl, SslContext, SslMethod, SslOptions, SslStream};

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
        let mut b = SslContext::builder(SslMethod::dtls()).map_err(|e| e.to_string())?;
        b.set_security_level(0);
        b.set_cipher_list("PSK-AES128-CCM8")
            .map_err(|e| e.to_string())?;
        b.set_options(SslOptions::NO_QUERY_MTU);
        let (identity, key) = (identity.to_owned(), key.to_vec());
        b.set_psk_client_callback(move |_, _, id_out, key_out| {
            id_out[..identity.len()].copy_from_slice(identity.as_bytes());
            id_out[identity.len()] = 0;
            key_out[..key.len()].copy_from_slice(&key);
            Ok(key.len())
        });
        let mut ssl = Ssl::new(&b.build()).map_err(|e| e.to_string())?;
        ssl.set_mtu(1200).map_err(|e| e.to_string())?;
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
