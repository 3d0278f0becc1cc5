//! Sinks: where the broker hands a message before anyone else sees it (an
//! upstream bridge's spool, say), and the writer thread that makes what
//! they staged durable for async callers.
//!
//! A publish is two steps. `stage` writes the message into every sink that
//! wants it, cheaply (a write to the page cache); `commit` makes everything
//! staged so far durable (fdatasync). Only after the commit is a publisher
//! told its message was accepted (a CoAP 2.04, an MQTT PUBACK).
//!
//! A commit may fail (a full or failing disk). The sink then drops what
//! it had staged and not yet made durable, and counts the failure; so a
//! publisher takes a [`Ticket`] (the count) when it stages, and its commit
//! fails if the count has moved since, whoever's commit failed.
//!
//! Who commits: the CoAP workers call [`Sinks::commit`] on their own
//! threads, once per receive batch. The async side (MQTT connections, the
//! bridges' incoming commands) must never wait for a disk on the runtime's
//! threads, which serve every connection and the control socket: they ask
//! the writer thread, which takes every request queued while it was busy
//! and answers them all with one commit (group commit). About every 200 ms
//! the writer thread also commits what nobody waits for (a will, a downlink
//! response) and runs each sink's `checkpoint`.

use std::io;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tokio::sync::oneshot;

use super::Message;

/// A consumer that gets a message before any subscriber does, and keeps it.
pub trait Sink: Send + Sync {
    /// Stores `message` if this sink wants it (`origin` is the publishing
    /// client, or the broker origin of a bridge). Ok(true): stored, durable
    /// only after the next `commit`; Ok(false): not wanted, or already
    /// durable. An error refuses the message: nobody gets it.
    fn stage(&self, message: &Message, origin: Option<&[u8]>) -> io::Result<bool>;
    /// Makes everything staged so far durable. May block on the disk. If
    /// it fails, what was staged and not yet durable is dropped, and
    /// `failures` grows in the same step.
    fn commit(&self) -> io::Result<()>;
    /// How many commits have failed so far.
    fn failures(&self) -> u64;
    /// Housekeeping that may block on the disk (recording progress,
    /// releasing space); the writer thread calls it about every 200 ms.
    fn checkpoint(&self) -> io::Result<()>;
}

/// The broker's sinks, and the writer thread that commits for async callers.
pub struct Sinks {
    list: Arc<RwLock<Vec<Arc<dyn Sink>>>>,
    /// Started with the first sink.
    writer: RwLock<Option<Sender<Job>>>,
}

/// The sinks' failure count when a publisher staged its messages: they
/// are durable once a later commit succeeds with the count unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct Ticket(u64);

enum Job {
    /// Commit, then answer.
    Commit(Ticket, oneshot::Sender<io::Result<()>>),
}

/// How often the writer thread runs the sinks' checkpoints.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

impl Default for Sinks {
    fn default() -> Sinks {
        Sinks {
            list: Arc::new(RwLock::new(Vec::new())),
            writer: RwLock::new(None),
        }
    }
}

impl Sinks {
    pub fn add(&self, sink: Arc<dyn Sink>) {
        self.list.write().unwrap().push(sink);
        let mut writer = self.writer.write().unwrap();
        if writer.is_none() {
            let (tx, rx) = crossbeam_channel::unbounded();
            let list = self.list.clone();
            std::thread::Builder::new()
                .name("m2m-writer".into())
                .spawn(move || write_loop(&list, &rx))
                .expect("spawning the writer thread");
            *writer = Some(tx);
        }
    }

    /// Stages `message` in every sink that wants it; a ticket if any of
    /// them needs a commit before the message is durable.
    pub fn stage(&self, message: &Message, origin: Option<&[u8]>) -> io::Result<Option<Ticket>> {
        let list = self.list.read().unwrap();
        // Read before staging: a failure after this drops what follows.
        let ticket = ticket(&list);
        let mut staged = false;
        for sink in list.iter() {
            staged |= sink.stage(message, origin)?;
        }
        Ok(staged.then_some(ticket))
    }

    /// Makes everything staged so far durable, on the caller's thread (for
    /// threads that may block: the CoAP workers). An error if a commit
    /// failed since `ticket` was taken: what was staged with it is gone.
    pub fn commit(&self, ticket: Ticket) -> io::Result<()> {
        let list = self.list.read().unwrap();
        commit_all(&list)?;
        check(&list, ticket)
    }

    /// The same from async code: the writer thread commits, grouping
    /// concurrent callers into one commit per sink.
    pub async fn commit_async(&self, ticket: Ticket) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        let sent = match &*self.writer.read().unwrap() {
            Some(writer) => writer.send(Job::Commit(ticket, tx)).is_ok(),
            None => return Ok(()), // no sinks, nothing to commit
        };
        if !sent {
            return Err(io::Error::other("the writer thread has stopped"));
        }
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("the writer thread has stopped")))
    }
}

type List = Vec<Arc<dyn Sink>>;

fn ticket(list: &List) -> Ticket {
    Ticket(list.iter().map(|s| s.failures()).sum())
}

fn commit_all(list: &List) -> io::Result<()> {
    list.iter().try_for_each(|sink| sink.commit())
}

fn check(list: &List, staged: Ticket) -> io::Result<()> {
    if ticket(list) == staged {
        Ok(())
    } else {
        Err(io::Error::other(
            "a commit failed after the message was staged: it was dropped",
        ))
    }
}

fn write_loop(list: &RwLock<Vec<Arc<dyn Sink>>>, jobs: &Receiver<Job>) {
    let mut next_checkpoint = std::time::Instant::now() + CHECKPOINT_EVERY;
    loop {
        match jobs.recv_deadline(next_checkpoint) {
            Ok(first) => {
                // Everyone who asked while the last commit ran shares this one.
                let mut waiting = vec![first];
                waiting.extend(jobs.try_iter());
                let list = list.read().unwrap();
                let result = commit_all(&list);
                for Job::Commit(staged, tx) in waiting {
                    let answer = match &result {
                        Ok(()) => check(&list, staged),
                        Err(err) => Err(io::Error::new(err.kind(), err.to_string())),
                    };
                    let _ = tx.send(answer);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return, // the broker is gone
        }
        let now = std::time::Instant::now();
        if now >= next_checkpoint {
            let list = list.read().unwrap();
            let _ = commit_all(&list);
            for sink in list.iter() {
                // A sink logs its own disk trouble, once per outage.
                let _ = sink.checkpoint();
            }
            next_checkpoint = now + CHECKPOINT_EVERY;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use bytes::Bytes;

    use super::*;

    /// A sink whose commits fail while `failing` is set.
    #[derive(Default)]
    struct Flaky {
        failing: AtomicBool,
        failures: AtomicU64,
    }

    impl Sink for Flaky {
        fn stage(&self, _: &Message, _: Option<&[u8]>) -> io::Result<bool> {
            Ok(true)
        }
        fn commit(&self) -> io::Result<()> {
            if self.failing.load(Ordering::SeqCst) {
                self.failures.fetch_add(1, Ordering::SeqCst);
                return Err(io::Error::other("disk on fire"));
            }
            Ok(())
        }
        fn failures(&self) -> u64 {
            self.failures.load(Ordering::SeqCst)
        }
        fn checkpoint(&self) -> io::Result<()> {
            Ok(())
        }
    }

    fn message() -> Message {
        Message {
            topic: Bytes::from_static(b"t"),
            payload: Bytes::from_static(b"p"),
            qos: 1,
            retain: false,
            content_type: None,
            properties: None,
        }
    }

    /// A message staged before someone else's commit failed was dropped
    /// by that failure: its own later commit must not report it durable,
    /// even though that commit itself succeeds.
    #[test]
    fn a_failure_after_staging_fails_the_commit_that_follows() {
        let sinks = Sinks::default();
        let flaky = Arc::new(Flaky::default());
        sinks.add(flaky.clone());
        let early = sinks.stage(&message(), None).unwrap().expect("staged");
        flaky.failing.store(true, Ordering::SeqCst);
        let failed = sinks.stage(&message(), None).unwrap().expect("staged");
        assert!(sinks.commit(failed).is_err(), "the disk fails");
        flaky.failing.store(false, Ordering::SeqCst);
        assert!(sinks.commit(early).is_err(), "dropped by the failure");
        let late = sinks.stage(&message(), None).unwrap().expect("staged");
        sinks
            .commit(late)
            .expect("staged after the failure, committed after it");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(runtime.block_on(sinks.commit_async(early)).is_err());
        runtime.block_on(sinks.commit_async(late)).unwrap();
    }
}
