//! A session's delivery queue: bounded per session by a count, and all
//! sessions' queues together by a byte budget, so neither one subscriber
//! that stops reading nor a hundred thousand offline persistent sessions can
//! grow the broker without bound.
//!
//! A queue costs nothing while empty (no block is kept allocated), which is
//! what most of a large number of persistent sessions are.

use std::collections::VecDeque;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::broker::Delivery;

/// The bytes all queues together may hold.
#[derive(Debug)]
pub struct QueueBudget {
    used: AtomicUsize,
    max: usize,
}

impl QueueBudget {
    pub fn new(max: usize) -> Arc<QueueBudget> {
        Arc::new(QueueBudget {
            used: AtomicUsize::new(0),
            max,
        })
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_charge(&self, bytes: usize) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if used + bytes > self.max {
                return false;
            }
            match self.used.compare_exchange_weak(
                used,
                used + bytes,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// What a queued delivery is charged: its slot, twice (a queue is up to
/// half empty after it grows), and its topic and payload. Subscribers share
/// a message's bytes, so this overstates the memory when many queue the
/// same message: the bound errs on the safe side.
fn cost(d: &Delivery) -> usize {
    2 * std::mem::size_of::<Delivery>() + d.message.topic.len() + d.message.payload.len()
}

/// Which bound refused a delivery.
#[derive(Debug, PartialEq, Eq)]
pub enum Full {
    /// The session's own queue held its `session_queue` messages.
    Session,
    /// All queues together held `max_queued_bytes`.
    Budget,
}

pub struct Queue {
    deliveries: Mutex<VecDeque<Delivery>>,
    ready: Notify,
    capacity: usize,
    budget: Arc<QueueBudget>,
}

/// An emptied queue gives its block back past this many slots: a burst
/// must not leave every session it reached holding the memory it needed.
const KEEP_SLOTS: usize = 64;

impl Queue {
    pub fn new(capacity: usize, budget: Arc<QueueBudget>) -> Queue {
        Queue {
            deliveries: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            capacity: capacity.max(1),
            budget,
        }
    }

    /// Appends `d`, or refuses it when either bound is reached.
    pub fn push(&self, d: Delivery) -> Result<(), Full> {
        let mut deliveries = self.deliveries.lock().unwrap();
        if deliveries.len() >= self.capacity {
            return Err(Full::Session);
        }
        if !self.budget.try_charge(cost(&d)) {
            return Err(Full::Budget);
        }
        deliveries.push_back(d);
        drop(deliveries);
        // Stores a permit if the consumer is not waiting yet.
        self.ready.notify_one();
        Ok(())
    }

    /// Puts deliveries a connection sent but never saw acknowledged back at
    /// the front, for the next connection to send first (MQTT section
    /// 4.4). They were admitted once: neither bound refuses them now, so
    /// the budget may be exceeded by what was in flight.
    pub fn put_back(&self, unacked: Vec<Delivery>) {
        let mut deliveries = self.deliveries.lock().unwrap();
        for mut d in unacked.into_iter().rev() {
            d.dup = true; // section 3.3.1.1: sent again
            self.budget.used.fetch_add(cost(&d), Ordering::Relaxed);
            deliveries.push_front(d);
        }
    }

    pub fn try_pop(&self) -> Option<Delivery> {
        let mut deliveries = self.deliveries.lock().unwrap();
        let d = deliveries.pop_front()?;
        if deliveries.is_empty() && deliveries.capacity() > KEEP_SLOTS {
            *deliveries = VecDeque::new();
        }
        drop(deliveries);
        self.budget.release(cost(&d));
        Some(d)
    }

    /// The next delivery, waiting for one. Cancel-safe: dropped before it
    /// completes, it takes nothing off the queue.
    pub async fn pop(&self) -> Delivery {
        loop {
            // Registered before looking, so a push between the look and the
            // wait still wakes it.
            let mut notified = pin!(self.ready.notified());
            notified.as_mut().enable();
            if let Some(d) = self.try_pop() {
                return d;
            }
            notified.await;
        }
    }

    pub fn len(&self) -> usize {
        self.deliveries.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        let deliveries = self.deliveries.get_mut().unwrap();
        let bytes: usize = deliveries.iter().map(cost).sum();
        self.budget.release(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::Message;
    use bytes::Bytes;

    fn delivery(payload: &'static [u8]) -> Delivery {
        Delivery {
            message: Message {
                topic: Bytes::from_static(b"t"),
                payload: Bytes::from_static(payload),
                qos: 1,
                retain: false,
                content_type: None,
                properties: None,
            },
            qos: 1,
            retain: false,
            subscription_id: None,
            dup: false,
        }
    }

    #[test]
    fn both_bounds_refuse_and_the_budget_is_given_back() {
        let one = cost(&delivery(b"x"));
        let budget = QueueBudget::new(3 * one);
        let a = Queue::new(2, budget.clone());
        let b = Queue::new(10, budget.clone());
        a.push(delivery(b"x")).unwrap();
        a.push(delivery(b"x")).unwrap();
        assert_eq!(a.push(delivery(b"x")), Err(Full::Session));
        b.push(delivery(b"x")).unwrap();
        assert_eq!(b.push(delivery(b"x")), Err(Full::Budget));
        assert_eq!(budget.used(), 3 * one);
        a.try_pop().unwrap();
        b.push(delivery(b"x")).unwrap();
        drop(b); // a removed session gives its queue's bytes back
        assert_eq!(budget.used(), one);
        let d = a.try_pop().unwrap();
        assert_eq!(budget.used(), 0);
        a.put_back(vec![d]);
        assert_eq!((a.len(), budget.used()), (1, one));
    }

    #[tokio::test]
    async fn pop_waits_for_a_push() {
        let q = Arc::new(Queue::new(4, QueueBudget::new(1 << 20)));
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.pop().await }
        });
        tokio::task::yield_now().await;
        q.push(delivery(b"late")).unwrap();
        assert_eq!(&waiter.await.unwrap().message.payload[..], b"late");
        assert!(q.is_empty());
    }
}
