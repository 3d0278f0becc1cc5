//! The datagram side of one OpenSSL object: what OpenSSL reads and writes
//! through its BIO, kept in memory so the worker's batched socket does the
//! real I/O.
//!
//! OpenSSL's DTLS record layer expects datagram semantics from its BIO: a
//! read returns one whole datagram, and each write is one datagram (a record
//! or a flight's worth of records that fits the MTU set on the object). The
//! openssl crate's stream BIO gives exactly that over `Read`/`Write`: one
//! call each way per BIO call.

use std::collections::VecDeque;
use std::io::{self, Read, Write};

/// Datagrams a session may hold unread. OpenSSL drains its input on every
/// call, so more than one only waits when a call failed; the bound keeps a
/// misbehaving session from growing.
const MAX_INBOX: usize = 8;

#[derive(Debug, Default)]
pub struct Wire {
    inbox: VecDeque<Vec<u8>>,
    outbox: Vec<Vec<u8>>,
}

impl Wire {
    /// A datagram received for this object; false if its inbox is full.
    pub fn push(&mut self, dgram: &[u8]) -> bool {
        if self.inbox.len() >= MAX_INBOX {
            return false;
        }
        self.inbox.push_back(dgram.to_vec());
        true
    }

    /// Gives a datagram back to the front of the inbox: `DTLSv1_listen`
    /// means to leave a ClientHello with a valid cookie in its BIO for the
    /// handshake to read again (it sets the BIO to peek, which this one,
    /// like a memory BIO, does not do).
    pub fn unread(&mut self, dgram: Vec<u8>) {
        self.inbox.push_front(dgram);
    }

    /// The datagrams OpenSSL wrote since the last call.
    pub fn take_output(&mut self) -> std::vec::Drain<'_, Vec<u8>> {
        self.outbox.drain(..)
    }

    pub fn clear(&mut self) {
        self.inbox.clear();
        self.outbox.clear();
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inbox.pop_front() {
            Some(dgram) => {
                // OpenSSL reads with a buffer of the largest record; a
                // datagram longer than that is cut, as a socket would.
                let n = dgram.len().min(buf.len());
                buf[..n].copy_from_slice(&dgram[..n]);
                Ok(n)
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outbox.push(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_one_datagram_per_call_and_writes_one_per_call() {
        let mut w = Wire::default();
        assert!(w.push(b"one"));
        assert!(w.push(b"two"));
        let mut buf = [0u8; 16];
        assert_eq!(w.read(&mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], b"one");
        w.unread(b"one".to_vec());
        assert_eq!(w.read(&mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], b"one");
        assert_eq!(w.read(&mut buf).unwrap(), 3);
        assert_eq!(
            w.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        w.write_all(b"a").unwrap();
        w.write_all(b"bc").unwrap();
        let out: Vec<_> = w.take_output().collect();
        assert_eq!(out, vec![b"a".to_vec(), b"bc".to_vec()]);
        for _ in 0..MAX_INBOX {
            assert!(w.push(b"x"));
        }
        assert!(!w.push(b"x"), "the inbox is bounded");
    }
}
