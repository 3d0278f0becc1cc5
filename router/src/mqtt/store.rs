//! Messages kept by topic within a count and a byte bound: the retained
//! store and the last values CoAP GET reads.
//!
//! A message that does not fit is not kept, and the topic's older message
//! goes too: a subscriber or a GET then sees nothing rather than a value
//! that is no longer the newest. The caller counts the refusal.

use std::collections::HashMap;

use bytes::Bytes;

use super::broker::Message;

pub struct TopicStore {
    messages: HashMap<Bytes, Message>,
    /// Topic and payload bytes of everything kept.
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
}

fn size(m: &Message) -> usize {
    m.topic.len() + m.payload.len()
}

impl TopicStore {
    pub fn new(max_messages: usize, max_bytes: usize) -> TopicStore {
        TopicStore {
            messages: HashMap::new(),
            bytes: 0,
            max_messages,
            max_bytes,
        }
    }

    /// Keeps `message` as its topic's; false if it does not fit.
    pub fn put(&mut self, message: &Message) -> bool {
        let old = self.remove(&message.topic);
        let fits =
            self.messages.len() < self.max_messages && self.bytes + size(message) <= self.max_bytes;
        if fits {
            self.bytes += size(message);
            self.messages.insert(message.topic.clone(), message.clone());
        }
        drop(old);
        fits
    }

    pub fn remove(&mut self, topic: &[u8]) -> Option<Message> {
        let old = self.messages.remove(topic)?;
        self.bytes -= size(&old);
        Some(old)
    }

    pub fn get(&self, topic: &[u8]) -> Option<&Message> {
        self.messages.get(topic)
    }

    pub fn messages(&self) -> impl Iterator<Item = &Message> {
        self.messages.values()
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(topic: &'static str, payload: &'static str) -> Message {
        Message {
            topic: Bytes::from_static(topic.as_bytes()),
            payload: Bytes::from_static(payload.as_bytes()),
            qos: 0,
            retain: true,
            content_type: None,
            properties: None,
        }
    }

    #[test]
    fn count_and_bytes_are_bounded_and_a_refused_update_leaves_no_stale_value() {
        let mut store = TopicStore::new(2, 20);
        assert!(store.put(&message("a", "123456789")));
        assert!(store.put(&message("b", "1")));
        assert!(!store.put(&message("c", "1")), "a third topic");
        assert_eq!((store.len(), store.bytes()), (2, 12));
        // Replacing within the bound works; beyond it, the old value goes.
        assert!(store.put(&message("a", "12345")));
        assert_eq!(store.bytes(), 8);
        assert!(!store.put(&message("a", "0123456789012345678")));
        assert!(store.get(b"a").is_none(), "no stale value left");
        assert_eq!((store.len(), store.bytes()), (1, 2));
        assert!(store.remove(b"b").is_some());
        assert_eq!((store.len(), store.bytes()), (0, 0));
    }
}
