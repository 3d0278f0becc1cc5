//! libcoap's examples (Debian package libcoap3-bin) as devices in a
//! namespace of the test's: a server that listens, a client that stays.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Instant;

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

/// A libcoap client left running (an observer, `-s`), its output read line
/// by line as it comes; killed on drop.
pub struct CoapClient {
    child: Child,
    lines: Receiver<String>,
}

impl CoapClient {
    /// Starts `program` (`coap-client-notls`, `-openssl`, `-gnutls`) in
    /// `ns` with `args`.
    pub fn spawn(ns: &Netns, program: &str, args: &[&str]) -> CoapClient {
        // stdbuf: one line at a time through the pipe, not at exit.
        let mut child = ns
            .command("stdbuf")
            .arg("-oL")
            .arg(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{program} (Debian package libcoap3-bin): {e}"));
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        CoapClient { child, lines }
    }

    /// The next line it prints that starts with `prefix` (the lines before
    /// it pass); fails the test if none comes within the deadline.
    pub fn next_line_starting(&self, prefix: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        panic!("the client printed no line starting with {prefix:?}");
    }
}

impl Drop for CoapClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
