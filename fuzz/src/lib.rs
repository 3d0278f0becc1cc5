//! What more than one fuzz target uses.

/// Nested allow and deny prefixes on both families, unknown sources
/// allowed; no rate limits, so the verdict does not depend on a clock.
pub const POLICY: &str = r#"
[coap]
listen = ["0.0.0.0:5683", "[::]:5684"]
listen_dtls = ["0.0.0.0:5690"]
[dtls]
hello_rate = "unlimited"
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
[[peer]]
name = "secure"
prefix = ["10.0.0.9/32", "fd00:1::9/128"]
psk_identity = "secure"
psk_hex = "00112233445566778899aabbccddeeff"
require_dtls = true
"#;
