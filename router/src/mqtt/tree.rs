//! A tree of topic levels (MQTT 3.1.1 and 5 section 4.7): the index that
//! finds the subscriptions matching a published topic, and the retained
//! topics matching a new subscription, without looking at the others.
//!
//! Keys are topic names or filters, split at `/`; `+` and `#` are levels
//! like any other, given their meaning only by the two match walks.

use std::collections::HashMap;

pub struct TopicTree<V> {
    root: Node<V>,
    /// Levels below the root, and their names' bytes: what `memory` counts.
    nodes: usize,
    name_bytes: usize,
}

struct Node<V> {
    children: HashMap<Box<[u8]>, Node<V>>,
    value: Option<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            value: None,
        }
    }
}

fn levels(key: &[u8]) -> impl Iterator<Item = &[u8]> {
    key.split(|&b| b == b'/')
}

/// Section 4.7.2: a filter starting with a wildcard does not match a topic
/// starting with `$` (`$SYS/...`).
fn hidden_from_wildcards(topic: &[u8]) -> bool {
    topic.first() == Some(&b'$')
}

impl<V> Default for TopicTree<V> {
    fn default() -> Self {
        TopicTree {
            root: Node::default(),
            nodes: 0,
            name_bytes: 0,
        }
    }
}

impl<V> TopicTree<V> {
    /// What one level costs at most, beside its name: its slot in its
    /// parent's map, which (hashbrown) holds at least 4 slots plus control
    /// bytes even for a single child, and is never more than half empty
    /// otherwise.
    pub const NODE_COST: usize = 4 * (std::mem::size_of::<(Box<[u8]>, Node<V>)>() + 1) + 16;

    /// An upper bound of the heap the tree holds, values' own heap aside.
    pub fn memory(&self) -> usize {
        self.nodes * Self::NODE_COST + self.name_bytes
    }

    /// What adding `key` could add to [`TopicTree::memory`] at most.
    pub fn cost_of(key: &[u8]) -> usize {
        levels(key).count() * Self::NODE_COST + key.len()
    }

    pub fn get_mut(&mut self, key: &[u8]) -> Option<&mut V> {
        let mut node = &mut self.root;
        for level in levels(key) {
            node = node.children.get_mut(level)?;
        }
        node.value.as_mut()
    }

    /// The value of `key`, made with `make` if there is none.
    pub fn entry(&mut self, key: &[u8], make: impl FnOnce() -> V) -> &mut V {
        let mut node = &mut self.root;
        for level in levels(key) {
            if !node.children.contains_key(level) {
                self.nodes += 1;
                self.name_bytes += level.len();
            }
            node = node.children.entry(level.into()).or_default();
        }
        node.value.get_or_insert_with(make)
    }

    /// Removes `key`'s value and the levels nothing else needs.
    pub fn remove(&mut self, key: &[u8]) -> Option<V> {
        let path: Vec<&[u8]> = levels(key).collect();
        let mut pruned = (0, 0);
        let removed = remove_at(&mut self.root, &path, &mut pruned);
        self.nodes -= pruned.0;
        self.name_bytes -= pruned.1;
        removed
    }

    /// Calls `found` with the value of every filter that matches `topic`
    /// (keys are filters; `topic` has no wildcards).
    /// Allocates nothing: it runs for every published message.
    pub fn filters_matching<'a>(&'a self, topic: &[u8], mut found: impl FnMut(&'a V)) {
        filters_at(
            &self.root,
            Some(topic),
            hidden_from_wildcards(topic),
            &mut found,
        );
    }

    /// Calls `found` with the value of every topic that `filter` matches
    /// (keys are topic names; `filter` may have wildcards).
    pub fn topics_matching<'a>(&'a self, filter: &[u8], mut found: impl FnMut(&'a V)) {
        let path: Vec<&[u8]> = levels(filter).collect();
        topics_at(&self.root, &path, true, &mut found);
    }
}

/// `pruned`: levels removed, and their names' bytes.
fn remove_at<V>(node: &mut Node<V>, path: &[&[u8]], pruned: &mut (usize, usize)) -> Option<V> {
    let Some((first, rest)) = path.split_first() else {
        return node.value.take();
    };
    let child = node.children.get_mut(*first)?;
    let removed = remove_at(child, rest, pruned)?;
    if child.value.is_none() && child.children.is_empty() {
        node.children.remove(*first);
        pruned.0 += 1;
        pruned.1 += first.len();
    }
    Some(removed)
}

/// The first level of `levels` and the levels after it (`None` after the
/// last level; `Some(b"")` is an empty level, as in "a/").
fn split_level(levels: &[u8]) -> (&[u8], Option<&[u8]>) {
    match levels.iter().position(|&b| b == b'/') {
        Some(i) => (&levels[..i], Some(&levels[i + 1..])),
        None => (levels, None),
    }
}

/// `topic`: the levels still to match, `None` when all were.
fn filters_at<'a, V>(
    node: &'a Node<V>,
    topic: Option<&[u8]>,
    at_root_of_hidden: bool,
    found: &mut impl FnMut(&'a V),
) {
    // "a/#" matches "a" and everything below it.
    if !at_root_of_hidden {
        if let Some(v) = node.children.get(&b"#"[..]).and_then(|n| n.value.as_ref()) {
            found(v);
        }
    }
    let Some(topic) = topic else {
        if let Some(v) = &node.value {
            found(v);
        }
        return;
    };
    let (level, rest) = split_level(topic);
    if let Some(child) = node.children.get(level) {
        filters_at(child, rest, false, found);
    }
    if !at_root_of_hidden {
        if let Some(child) = node.children.get(&b"+"[..]) {
            filters_at(child, rest, false, found);
        }
    }
}

fn topics_at<'a, V>(
    node: &'a Node<V>,
    filter: &[&[u8]],
    at_root: bool,
    found: &mut impl FnMut(&'a V),
) {
    let Some((level, rest)) = filter.split_first() else {
        if let Some(v) = &node.value {
            found(v);
        }
        return;
    };
    let visible = |name: &[u8]| !(at_root && hidden_from_wildcards(name));
    match *level {
        b"#" => {
            // The parent level itself ("a/#" matches "a"), then every level below.
            if let Some(v) = &node.value {
                if !at_root {
                    found(v);
                }
            }
            for (name, child) in &node.children {
                if visible(name) {
                    subtree(child, found);
                }
            }
        }
        b"+" => {
            for (name, child) in &node.children {
                if visible(name) {
                    topics_at(child, rest, false, found);
                }
            }
        }
        exact => {
            if let Some(child) = node.children.get(exact) {
                topics_at(child, rest, false, found);
            }
        }
    }
}

fn subtree<'a, V>(node: &'a Node<V>, found: &mut impl FnMut(&'a V)) {
    if let Some(v) = &node.value {
        found(v);
    }
    for child in node.children.values() {
        subtree(child, found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::topic;

    const FILTERS: &[&str] = &[
        "a/b", "a/+", "a/#", "#", "+/+", "+", "$SYS/#", "a/b/c", "+/b/#", "/", "a//b", "+/+/+",
        "$SYS/+",
    ];
    const TOPICS: &[&str] = &[
        "a", "a/b", "a/b/c", "/b", "$SYS", "$SYS/x", "b", "/", "a//b", "x/b/y/z", "a/c",
    ];

    fn sorted(mut v: Vec<&str>) -> Vec<&str> {
        v.sort_unstable();
        v
    }

    /// Both walks agree with `topic::matches`, the rule as written in the
    /// specification, on every pair.
    #[test]
    fn both_walks_agree_with_the_matching_rule() {
        let mut filters = TopicTree::default();
        for f in FILTERS {
            *filters.entry(f.as_bytes(), || *f) = *f;
        }
        let mut topics = TopicTree::default();
        for t in TOPICS {
            *topics.entry(t.as_bytes(), || *t) = *t;
        }
        for t in TOPICS {
            let mut got = Vec::new();
            filters.filters_matching(t.as_bytes(), |f| got.push(*f));
            let want: Vec<&str> = FILTERS
                .iter()
                .copied()
                .filter(|f| topic::matches(f.as_bytes(), t.as_bytes()))
                .collect();
            assert_eq!(sorted(got), sorted(want), "filters matching {t}");
        }
        for f in FILTERS {
            let mut got = Vec::new();
            topics.topics_matching(f.as_bytes(), |t| got.push(*t));
            let want: Vec<&str> = TOPICS
                .iter()
                .copied()
                .filter(|t| topic::matches(f.as_bytes(), t.as_bytes()))
                .collect();
            assert_eq!(sorted(got), sorted(want), "topics matched by {f}");
        }
    }

    #[test]
    fn removal_prunes_levels_and_keeps_the_rest() {
        let mut tree = TopicTree::default();
        tree.entry(b"a/b/c", || 1);
        tree.entry(b"a", || 2);
        assert_eq!(tree.remove(b"a/b/c"), Some(1));
        assert_eq!(tree.remove(b"a/b/c"), None);
        assert!(tree.root.children[&b"a"[..]].children.is_empty());
        assert_eq!(tree.get_mut(b"a"), Some(&mut 2));
        assert_eq!((tree.nodes, tree.name_bytes), (1, 1), "only `a` is left");
        assert_eq!(tree.remove(b"a"), Some(2));
        assert!(tree.root.children.is_empty());
        assert_eq!(tree.memory(), 0);
    }
}
