//! Why the fast path let a packet through or dropped it.
//!
//! Every packet the XDP program sees is counted under exactly one reason
//! (the `VERDICTS` per-CPU array is indexed by `Reason as u32`).

/// What XDP does with the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `XDP_PASS`: on to the kernel stack (and, for CoAP, the workers' sockets).
    Pass,
    /// `XDP_DROP`.
    Drop,
}

macro_rules! reasons {
    ($( $(#[$doc:meta])* $name:ident = $value:literal, $label:literal, $action:ident; )*) => {
        /// The verdict reason. The numbers are the index into the kernel's
        /// per-CPU counter array: append, never renumber.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Reason {
            $( $(#[$doc])* $name = $value, )*
        }

        impl Reason {
            /// Every reason, in counter-index order.
            pub const ALL: &'static [Reason] = &[$(Reason::$name),*];

            /// Stable snake_case label for logs, metrics and the CLI.
            pub const fn label(self) -> &'static str {
                match self { $(Reason::$name => $label,)* }
            }

            pub const fn action(self) -> Action {
                match self { $(Reason::$name => Action::$action,)* }
            }

            pub const fn from_index(index: u32) -> Option<Reason> {
                match index { $($value => Some(Reason::$name),)* _ => None }
            }
        }
    };
}

reasons! {
    /// Not an IP packet we can parse (ARP, LLDP, more than two VLAN tags, a
    /// truncated or invalid IP header): left to the kernel, which has its own checks.
    PassNotIp = 0, "pass_not_ip", Pass;
    /// IP, but not UDP (TCP, ICMP, ...).
    PassNotUdp = 1, "pass_not_udp", Pass;
    /// UDP to a port that is not a configured CoAP port.
    PassNotCoapPort = 2, "pass_not_coap_port", Pass;
    /// A non-first IP fragment carries no UDP header, so its port is unknown.
    /// Passing it is safe: the first fragment of a datagram to a CoAP port is
    /// dropped, so the kernel can never reassemble the datagram.
    PassLaterFragment = 3, "pass_later_fragment", Pass;
    /// Well-formed CoAP from a peer that is allowed and within its rate.
    Accept = 4, "accept", Pass;
    /// First fragment of a datagram to a CoAP port. RFC 7252 section 4.6:
    /// a CoAP message should fit in one IP packet; we enforce it.
    DropFragment = 5, "drop_fragment", Drop;
    /// IP, UDP and frame lengths disagree (or the UDP length is under 8).
    DropBadLength = 6, "drop_bad_length", Drop;
    /// Shorter than the 4-byte CoAP header (RFC 7252 section 3).
    DropTooShort = 7, "drop_too_short", Drop;
    /// Version is not 1 (RFC 7252 section 3: "MUST be silently ignored").
    DropBadVersion = 8, "drop_bad_version", Drop;
    /// Token length 9 to 15 is reserved: a message format error (section 3).
    DropBadTokenLength = 9, "drop_bad_token_length", Drop;
    /// Code class 1, 3, 6 or 7: reserved (section 12.1).
    DropBadCode = 10, "drop_bad_code", Drop;
    /// Code 0.00 (Empty) with a token or any byte after the Message ID (section 4.1).
    DropBadEmpty = 11, "drop_bad_empty", Drop;
    /// The datagram ends inside the token.
    DropTruncated = 12, "drop_truncated", Drop;
    /// The source belongs to a peer configured with `deny = true`.
    DropDenied = 13, "drop_denied", Drop;
    /// Unknown source while `[defaults] unknown_peers = "drop"`.
    DropUnknownPeer = 14, "drop_unknown_peer", Drop;
    /// Over the peer's rate (token bucket, see `rate`).
    DropRateLimited = 15, "drop_rate_limited", Drop;
    /// An IPv6 extension header chain longer than the XDP program walks
    /// (`proto::MAX_IPV6_EXT_HEADERS`). Dropped rather than passed: passing it
    /// would let any peer bypass the policy by prepending headers.
    DropHeaderChain = 16, "drop_header_chain", Drop;
    /// Plain CoAP from a peer with `require_dtls`: its address is no proof
    /// of who it is; only its DTLS sessions are it.
    DropRequiresDtls = 17, "drop_requires_dtls", Drop;
    /// On a CoAPS port, not DTLS 1.2 records: an unknown content type, a
    /// version other than 1.2 (1.0 in a ClientHello), or record lengths that
    /// do not add up to the datagram (RFC 6347 section 4.1).
    DropBadDtlsRecord = 18, "drop_bad_dtls_record", Drop;
    /// A ClientHello over the per-source rate (`[dtls] hello_rate`): each
    /// costs the gateway a cookie, and a handshake after it.
    DropHelloRateLimited = 19, "drop_hello_rate_limited", Drop;
}

/// Number of reasons: the size of the `VERDICTS` counter array.
pub const REASON_COUNT: u32 = 20;

const _: () = assert!(Reason::ALL.len() as u32 == REASON_COUNT);
