//! libcoap's example server (Debian package libcoap3-bin) as a device that
//! listens, in a namespace of the test's.

use std::net::SocketAddr;
use std::process::{Child, Stdio};

use crate::netns::{wait_for, Netns, DEADLINE};

/// A running `coap-server-*`, killed on drop.
pub struct CoapServer {
    child: Child,
}

impl CoapServer {
    /// Starts `program` (`coap-server-notls`, `-openssl`, `-gnutls`) in
    /// `ns` with `args`, and waits until it listens on UDP `listening` (a
    /// server with DTLS listens for it on its CoAP port + 1).
    pub fn start(ns: &Netns, program: &str, listening: SocketAddr, args: &[&str]) -> CoapServer {
        let child = ns
            .command(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{program} (Debian package libcoap3-bin): {e}"));
        let server = CoapServer { child };
        let up = || {
            let out = ns
                .command("ss")
                .args(["-Huln", "src", &listening.to_string()])
                .output()
                .expect("ss (Debian package iproute2)");
            !out.stdout.is_empty()
        };
        assert!(
            wait_for(DEADLINE, up),
            "{program} {args:?} did not listen on {listening}"
        );
        server
    }
}

impl Drop for CoapServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
