//! Messages the downlink (commands, Observe notifications, watches) sends
//! to devices over their DTLS sessions: it hands the plaintext to the
//! CoAPS worker, which owns the sessions and encrypts each message for the
//! session at its address. An eventfd in the worker's poll set wakes it.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::DtlsStats;

/// Messages waiting for the CoAPS worker; more are dropped (counted) and
/// left to the message layer's retransmission.
pub const OUTBOX_BOUND: usize = 4096;

/// The downlink's side.
#[derive(Clone)]
pub struct Outbox {
    tx: Sender<(SocketAddr, Vec<u8>)>,
    wake: Arc<OwnedFd>,
    stats: Arc<DtlsStats>,
}

/// The CoAPS worker's side.
pub struct OutboxReceiver {
    rx: Receiver<(SocketAddr, Vec<u8>)>,
    wake: Arc<OwnedFd>,
}

pub fn outbox(stats: Arc<DtlsStats>) -> io::Result<(Outbox, OutboxReceiver)> {
    // SAFETY: eventfd takes no pointers; the descriptor is owned below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
    let (tx, rx) = crossbeam_channel::bounded(OUTBOX_BOUND);
    Ok((
        Outbox {
            tx,
            wake: wake.clone(),
            stats,
        },
        OutboxReceiver { rx, wake },
    ))
}

impl Outbox {
    /// Queues `message` for the session at `to`.
    pub fn send(&self, to: SocketAddr, message: &[u8]) {
        match self.tx.try_send((to, message.to_vec())) {
            Ok(()) => {
                let one: u64 = 1;
                // SAFETY: writes 8 bytes from a live u64 to our eventfd. A
                // full counter (EAGAIN) is already a wake-up.
                unsafe {
                    libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8);
                }
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.outbox_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl OutboxReceiver {
    /// The descriptor to poll for messages.
    pub fn fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// The messages queued so far (the wake-up is reset first, so one
    /// queued meanwhile wakes the next poll).
    pub fn drain(&self) -> impl Iterator<Item = (SocketAddr, Vec<u8>)> + '_ {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our eventfd; EAGAIN
        // (nothing queued) leaves it untouched.
        unsafe {
            libc::read(self.wake.as_raw_fd(), (&mut count as *mut u64).cast(), 8);
        }
        self.rx.try_iter()
    }
}
