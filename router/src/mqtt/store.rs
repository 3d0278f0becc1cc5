//! Messages kept by topic within a count and a byte bound: the retained
//! store and the last values CoAP GET reads.
//!
//! A message that does not fit is not kept, and the topic's older message
//! goes too: a subscriber or a GET then sees nothing rather than a value
//! that is no longer the newest. The caller counts the refusal.

use std::collections::HashMap;

use bytes::Bytes;

use super::broker::Message;
use super::topic;
use super::tree::TopicTree;

pub struct TopicStore {
    messages: HashMap<Bytes, Message>,
    /// The topics by level, when subscriptions look them up by filter.
    index: Option<TopicTree<Bytes>>,
    /// [`size`] of everything kept (the index counts its own).
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
}

/// What a kept message holds: its topic and payload, and its slot in the
/// map (counted twice: a map is up to half empty after it grows).
fn size(m: &Message) -> usize {
    m.topic.len() + m.payload.len() + 2 * (std::mem::size_of::<(Bytes, Message)>() + 1)
}

impl TopicStore {
    pub fn new(max_messages: usize, max_bytes: usize) -> TopicStore {
        TopicStore {
            messages: HashMap::new(),
            index: None,
            bytes: 0,
            max_messages,
            max_bytes,
        }
    }

    /// Also indexes the topics by level, for [`TopicStore::matching`].
    pub fn indexed(mut self) -> TopicStore {
        self.index = Some(TopicTree::default());
        self
    }

    /// Keeps `message` as its topic's; false if it does not fit.
    pub fn put(&mut self, message: &Message) -> bool {
        let old = self.remove(&message.topic);
        let index_growth = self
            .index
            .as_ref()
            .map_or(0, |_| TopicTree::<Bytes>::cost_of(&message.topic));
        let fits = self.messages.len() < self.max_messages
            && self.bytes() + size(message) + index_growth <= self.max_bytes;
        if fits {
            self.bytes += size(message);
            self.messages.insert(message.topic.clone(), message.clone());
            if let Some(index) = &mut self.index {
                index.entry(&message.topic, || message.topic.clone());
            }
        }
        drop(old);
        fits
    }

    pub fn remove(&mut self, topic: &[u8]) -> Option<Message> {
        let old = self.messages.remove(topic)?;
        self.bytes -= size(&old);
        if let Some(index) = &mut self.index {
            index.remove(topic);
        }
        Some(old)
    }

    pub fn get(&self, topic: &[u8]) -> Option<&Message> {
        self.messages.get(topic)
    }

    /// The messages whose topics `filter` matches: through the index when
    /// there is one, else by looking at every topic.
    pub fn matching(&self, filter: &[u8]) -> Vec<Message> {
        let mut found = Vec::new();
        match &self.index {
            Some(index) => index.topics_matching(filter, |topic| {
                found.extend(self.messages.get(topic).cloned());
            }),
            None => found.extend(
                self.messages
                    .values()
                    .filter(|m| topic::matches(filter, &m.topic))
                    .cloned(),
            ),
        }
        found
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// An upper bound of the memory held: what `max_bytes` bounds.
    pub fn bytes(&self) -> usize {
        self.bytes + self.index.as_ref().map_or(0, TopicTree::memory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(topic: &'static str, payload: &str) -> Message {
        Message {
            topic: Bytes::from_static(topic.as_bytes()),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            qos: 0,
            retain: true,
            content_type: None,
            properties: None,
        }
    }

    #[test]
    fn the_index_finds_what_a_scan_finds() {
        let mut plain = TopicStore::new(100, 100_000);
        let mut indexed = TopicStore::new(100, 100_000).indexed();
        for t in ["a", "a/b", "a/b/c", "$SYS/x", "b/b", "/"] {
            for store in [&mut plain, &mut indexed] {
                assert!(store.put(&message(t, "1")));
            }
        }
        indexed.remove(b"a/b");
        plain.remove(b"a/b");
        for filter in ["#", "a/#", "+/b", "+/+", "$SYS/#", "a/b", "+"] {
            let topics = |store: &TopicStore| {
                let mut t: Vec<Bytes> = store
                    .matching(filter.as_bytes())
                    .into_iter()
                    .map(|m| m.topic)
                    .collect();
                t.sort();
                t
            };
            assert_eq!(topics(&indexed), topics(&plain), "{filter}");
        }
    }

    #[test]
    fn count_and_bytes_are_bounded_and_a_refused_update_leaves_no_stale_value() {
        // Each message is charged its slot in the map besides its bytes.
        let slot = size(&message("", ""));
        let mut store = TopicStore::new(2, 2 * slot + 20);
        assert!(store.put(&message("a", "123456789")));
        assert!(store.put(&message("b", "1")));
        assert!(!store.put(&message("c", "1")), "a third topic");
        assert_eq!((store.len(), store.bytes()), (2, 2 * slot + 12));
        // Replacing within the bound works; beyond it, the old value goes.
        assert!(store.put(&message("a", "12345")));
        assert_eq!(store.bytes(), 2 * slot + 8);
        assert!(!store.put(&message("a", &"x".repeat(slot + 19))));
        assert!(store.get(b"a").is_none(), "no stale value left");
        assert_eq!((store.len(), store.bytes()), (1, slot + 2));
        assert!(store.remove(b"b").is_some());
        assert_eq!((store.len(), store.bytes()), (0, 0));
    }
}
