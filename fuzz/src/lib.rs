//! What more than one fuzz target uses.

/// Nested allow and deny prefixes on both families, unknown sources
/// allowed; no rate limits, so the verdict does not depend on a clock.
pub const POLICY: &str = r#"
[coap]
listen = ["0.0.0.0:5683", "[::]:5684"]
[defaults]
unknown_peers = "allow"
rate = "unlimited"
[[peer]]
name = "site"
prefix = ["10.0.0.0/24", "fd00:1::/64"]
[[peer]]
name = "inner"
prefix = ["10.0.0.128/25", "fd00:1::8000/113"]
[[peer]]
name = "denied"
prefix = ["10.0.0.200/32", "10.9.0.0/16", "fd00:9::/48"]
deny = true
"#;
