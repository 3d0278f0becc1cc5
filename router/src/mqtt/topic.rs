//! Topic names and filters (MQTT 3.1.1 section 4.7, MQTT 5 section 4.7).

/// Levels a topic name or filter may have. MQTT sets no limit; ours keeps
/// the broker's topic tree (one node per level, walked recursively) shallow
/// and its memory per subscription bounded.
pub const MAX_LEVELS: usize = 64;

/// Whether `topic` has at most [`MAX_LEVELS`] levels.
pub fn within_levels(topic: &[u8]) -> bool {
    topic.iter().filter(|&&b| b == b'/').count() < MAX_LEVELS
}

/// Whether `filter` is a valid topic filter: `#` only as the whole last
/// level, `+` only as a whole level, no NUL, not empty, at most
/// [`MAX_LEVELS`] levels.
pub fn valid_filter(filter: &[u8]) -> bool {
    if filter.is_empty() || filter.contains(&0) || !within_levels(filter) {
        return false;
    }
    let levels: Vec<&[u8]> = filter.split(|&b| b == b'/').collect();
    levels.iter().enumerate().all(|(i, level)| match *level {
        b"#" => i == levels.len() - 1,
        b"+" => true,
        l => !l.contains(&b'#') && !l.contains(&b'+'),
    })
}

/// Whether topic name `topic` matches `filter` (both assumed valid).
/// Filters starting with a wildcard do not match topics starting with `$`
/// (section 4.7.2).
pub fn matches(filter: &[u8], topic: &[u8]) -> bool {
    if topic.first() == Some(&b'$') && matches!(filter.first(), Some(b'+' | b'#')) {
        return false;
    }
    let mut f = filter.split(|&b| b == b'/');
    let mut t = topic.split(|&b| b == b'/');
    loop {
        match (f.next(), t.next()) {
            (Some(b"#"), _) => return true,
            (Some(b"+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        for (f, t, want) in [
            ("a/b", "a/b", true),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/#", "a", true), // "#" also matches the parent level
            ("a/#", "a/b/c", true),
            ("#", "a/b", true),
            ("+/+", "/b", true),
            ("+", "$SYS", false),
            ("#", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("a/b", "a/b/c", false),
            ("a/b/c", "a/b", false),
        ] {
            assert_eq!(matches(f.as_bytes(), t.as_bytes()), want, "{f} ~ {t}");
        }
    }

    #[test]
    fn filter_validity() {
        for ok in ["#", "a/#", "+/b/+", "a//b", "/"] {
            assert!(valid_filter(ok.as_bytes()), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+", "#/a", "a\0"] {
            assert!(!valid_filter(bad.as_bytes()), "{bad}");
        }
    }
}
