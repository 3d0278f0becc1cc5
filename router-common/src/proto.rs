//! Wire constants for the headers the fast path parses.

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
/// IEEE 802.1Q customer VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// IEEE 802.1ad service VLAN tag (the outer tag of Q-in-Q).
pub const ETH_P_8021AD: u16 = 0x88A8;
pub const VLAN_HLEN: usize = 4;
/// VLAN tags the parser walks (Q-in-Q). A third tag is left to the kernel.
pub const MAX_VLAN_TAGS: usize = 2;

pub const IPV4_MIN_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
/// IPv4 flags/fragment-offset field: More Fragments bit and offset mask.
pub const IPV4_MF: u16 = 0x2000;
pub const IPV4_OFFSET_MASK: u16 = 0x1FFF;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_DSTOPTS: u8 = 60;
/// IPv6 extension headers walked before giving up (RFC 8200 section 4.1
/// recommends at most one of each, in a fixed order: this is ample).
pub const MAX_IPV6_EXT_HEADERS: usize = 8;
/// IPv6 fragment header: offset mask and More Fragments bit of its second u16.
pub const IPV6_FRAG_OFFSET_MASK: u16 = 0xFFF8;
pub const IPV6_FRAG_MF: u16 = 0x0001;

pub const UDP_HLEN: usize = 8;

/// CoAP over UDP (RFC 7252 section 3).
pub const COAP_HLEN: usize = 4;
pub const COAP_VERSION: u8 = 1;
pub const COAP_MAX_TOKEN_LEN: u8 = 8;
pub const COAP_DEFAULT_PORT: u16 = 5683;

/// DTLS 1.2 records (RFC 6347 section 4.1): type, version, epoch, sequence
/// number, length.
pub const DTLS_RECORD_HLEN: usize = 13;
/// Records the fast path walks in one datagram (a handshake flight packs a
/// few; more is not a device's traffic).
pub const DTLS_MAX_RECORDS: usize = 8;
/// Where in a frame the next record may start (the verifier's bound on
/// packet offsets is 64 KiB).
pub const DTLS_MAX_OFFSET: usize = 0xfff0;
pub const DTLS_1_2: u16 = 0xfefd;
/// DTLS 1.0: what the records of the hello exchange may carry before the
/// version is negotiated (RFC 6347 section 4.2.1): a client's ClientHello,
/// and the HelloVerifyRequest that servers SHOULD send as 1.0 whatever
/// they will negotiate (a device's, when the gateway opens a session).
pub const DTLS_1_0: u16 = 0xfeff;
/// Content types: change_cipher_spec, alert, handshake, application_data
/// (RFC 5246 section 6.2.1), and tls12_cid (RFC 9146).
pub const DTLS_HANDSHAKE: u8 = 22;
pub const DTLS_CID: u8 = 25;
/// Handshake types of a ClientHello (RFC 5246 section 7.4) and a
/// HelloVerifyRequest (RFC 6347 section 4.3.2).
pub const DTLS_CLIENT_HELLO: u8 = 1;
pub const DTLS_HELLO_VERIFY_REQUEST: u8 = 3;

/// Whether an epoch-0 handshake record holding message `msg_type` may
/// carry version [`DTLS_1_0`].
pub const fn dtls_1_0_allowed(msg_type: u8) -> bool {
    matches!(msg_type, DTLS_CLIENT_HELLO | DTLS_HELLO_VERIFY_REQUEST)
}

pub const fn dtls_content_type_valid(t: u8) -> bool {
    matches!(t, 20..=23 | DTLS_CID)
}

/// Whether a CoAP code class (the top 3 bits of the Code byte) can occur:
/// 0 request/Empty, 2 success, 4 client error, 5 server error (section 12.1).
pub const fn coap_code_class_valid(code: u8) -> bool {
    matches!(code >> 5, 0 | 2 | 4 | 5)
}
