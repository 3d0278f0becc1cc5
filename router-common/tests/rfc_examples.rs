//! The reference classifier against frames written from the RFCs by hand,
//! so the oracle of the differential test is not only checked against
//! itself (the test kit's frame builder and the XDP program share its
//! authors' reading). Each case names the text it follows.
//!
//! Checksums are left zero: neither the classifier nor the XDP program
//! verifies them (the kernel does, after XDP_PASS).

use router_common::classify::{classify, Policy, RateKey, Source, Verdict};
use router_common::maps::{
    PeerPolicy, POLICY_ALLOW, POLICY_DENY, POLICY_REQUIRE_DTLS, PORT_COAP, PORT_COAPS,
    UNKNOWN_PEER_ID,
};
use router_common::reason::Reason;

/// 192.0.2.1 and 2001:db8::1 are peer 1 (allowed), 192.0.2.66 is peer 3
/// (denied), 192.0.2.77 is peer 4 (DTLS only); other sources are unknown
/// and allowed. CoAP on 5683, CoAP
/// over DTLS on 5684.
struct TestPolicy;

impl Policy for TestPolicy {
    fn port_kind(&self, port: u16) -> u32 {
        match port {
            5683 => PORT_COAP,
            5684 => PORT_COAPS,
            _ => 0,
        }
    }

    fn hello_policy(&self) -> PeerPolicy {
        self.default_policy()
    }

    fn lookup(&self, src: Source) -> Option<PeerPolicy> {
        let peer = |peer_id, action| PeerPolicy {
            interval_ns: 0,
            burst_ns: 0,
            peer_id,
            action,
        };
        match src {
            Source::V4([192, 0, 2, 1]) => Some(peer(1, POLICY_ALLOW)),
            Source::V4([192, 0, 2, 66]) => Some(peer(3, POLICY_DENY)),
            Source::V4([192, 0, 2, 77]) => Some(peer(4, POLICY_REQUIRE_DTLS)),
            Source::V6(a) if a == V6_SRC => Some(peer(1, POLICY_ALLOW)),
            _ => None,
        }
    }

    fn default_policy(&self) -> PeerPolicy {
        PeerPolicy {
            interval_ns: 0,
            burst_ns: 0,
            peer_id: UNKNOWN_PEER_ID,
            action: POLICY_ALLOW,
        }
    }
}

/// 2001:db8::1 (RFC 3849 documentation prefix).
const V6_SRC: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// 2001:db8::fe.
const V6_DST: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfe,
];

/// RFC 7252 Appendix A, Figure 16: "CON [0x7d34] GET /temperature", the
/// Uri-Path option with delta 11 and length 11 (0xbb).
const GET_TEMPERATURE: &[u8] = &[
    0x40, 0x01, 0x7d, 0x34, 0xbb, b't', b'e', b'm', b'p', b'e', b'r', b'a', b't', b'u', b'r', b'e',
];

fn run(frame: &[u8]) -> Verdict {
    classify(frame, &TestPolicy, |_: RateKey, _: &PeerPolicy| true)
}

fn verdict(reason: Reason, peer_id: Option<u32>) -> Verdict {
    Verdict { reason, peer_id }
}

/// Ethernet II (IEEE 802.3 clause 3.2.6): destination, source, EtherType.
fn ethernet(ethertype: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0xfe, 0x02, 0, 0, 0, 0, 0x01];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// UDP header (RFC 768) from port 40000 to `dst_port`, length `len` (the
/// header's 8 bytes included).
fn udp(dst_port: u16, len: usize, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0x9c, 0x40];
    u.extend_from_slice(&dst_port.to_be_bytes());
    u.extend_from_slice(&(len as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// An IPv4 header (RFC 791 section 3.1) from `src` to 192.0.2.254: IHL
/// from the options' length, Flags and Fragment Offset as given.
fn ipv4(
    src: [u8; 4],
    protocol: u8,
    total_len: usize,
    flags_offset: u16,
    options: &[u8],
) -> Vec<u8> {
    let ihl = 5 + options.len() / 4;
    let mut h = vec![0x40 | ihl as u8, 0];
    h.extend_from_slice(&(total_len as u16).to_be_bytes());
    h.extend_from_slice(&[0xab, 0xcd]);
    h.extend_from_slice(&flags_offset.to_be_bytes());
    h.extend_from_slice(&[64, protocol, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&[192, 0, 2, 254]);
    h.extend_from_slice(options);
    h
}

/// IPv4/UDP to `port` carrying `coap`, every length consistent.
fn v4_frame(src: [u8; 4], port: u16, coap: &[u8]) -> Vec<u8> {
    let mut f = ethernet(0x0800);
    f.extend(ipv4(src, 17, 28 + coap.len(), 0, &[]));
    f.extend(udp(port, 8 + coap.len(), coap));
    f
}

/// The IPv6 fixed header (RFC 8200 section 3) from 2001:db8::1.
fn ipv6(payload_len: usize, next_header: u8) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload_len as u16).to_be_bytes());
    h.extend_from_slice(&[next_header, 64]);
    h.extend_from_slice(&V6_SRC);
    h.extend_from_slice(&V6_DST);
    h
}

/// IPv6 with the extension headers `ext` (the first one's type is
/// `first`), then UDP to 5683 with GET /temperature.
fn v6_frame(first: u8, ext: &[u8]) -> Vec<u8> {
    let udp = udp(5683, 8 + GET_TEMPERATURE.len(), GET_TEMPERATURE);
    let mut f = ethernet(0x86dd);
    f.extend(ipv6(ext.len() + udp.len(), first));
    f.extend_from_slice(ext);
    f.extend(udp);
    f
}

#[test]
fn rfc7252_appendix_a_get_is_accepted_for_its_peer() {
    let frame = v4_frame([192, 0, 2, 1], 5683, GET_TEMPERATURE);
    assert_eq!(run(&frame), verdict(Reason::Accept, Some(1)));
    // A source no prefix covers is charged to the unknown bucket.
    let frame = v4_frame([198, 51, 100, 7], 5683, GET_TEMPERATURE);
    assert_eq!(run(&frame), verdict(Reason::Accept, Some(UNKNOWN_PEER_ID)));
    let frame = v4_frame([192, 0, 2, 66], 5683, GET_TEMPERATURE);
    assert_eq!(run(&frame), verdict(Reason::DropDenied, Some(3)));
}

#[test]
fn rfc7252_section_3_header_rules() {
    let with = |coap: &[u8]| run(&v4_frame([192, 0, 2, 1], 5683, coap)).reason;
    // "ACK [0x7d34] 2.05 Content" with payload "22.3 C" (Figure 16's answer).
    let mut content = vec![0x60, 0x45, 0x7d, 0x34, 0xff];
    content.extend_from_slice(b"22.3 C");
    assert_eq!(with(&content), Reason::Accept);
    // Section 4.3: a CON Empty message is a ping; section 4.2: RST is Empty.
    assert_eq!(with(&[0x40, 0x00, 0x12, 0x34]), Reason::Accept);
    assert_eq!(with(&[0x70, 0x00, 0x12, 0x34]), Reason::Accept);
    // Version: "Messages with unknown version numbers MUST be silently
    // ignored" (Ver = 2 here).
    assert_eq!(with(&[0x80, 0x01, 0x7d, 0x34]), Reason::DropBadVersion);
    // TKL: "Lengths 9-15 are reserved ... MUST be processed as a message
    // format error."
    let mut long_token = vec![0x49, 0x01, 0x7d, 0x34];
    long_token.extend_from_slice(&[7; 9]);
    assert_eq!(with(&long_token), Reason::DropBadTokenLength);
    // Section 4.1: an Empty message has TKL 0 and nothing after the
    // Message ID; "If there are any bytes, they MUST be processed as a
    // message format error."
    assert_eq!(with(&[0x41, 0x00, 0x12, 0x34, 0xaa]), Reason::DropBadEmpty);
    assert_eq!(with(&[0x40, 0x00, 0x12, 0x34, 0xff]), Reason::DropBadEmpty);
    // Section 12.1: classes 1, 3, 6 and 7 are reserved (0.01 is GET).
    for code in [0x21, 0x61, 0xc1, 0xe1] {
        assert_eq!(
            with(&[0x40, code, 0x12, 0x34]),
            Reason::DropBadCode,
            "{code:#x}"
        );
    }
    // Section 3: the header is 4 bytes; the token follows it.
    assert_eq!(with(&[0x40, 0x01, 0x12]), Reason::DropTooShort);
    assert_eq!(
        with(&[0x48, 0x01, 0x12, 0x34, 1, 2, 3]),
        Reason::DropTruncated
    );
}

/// RFC 894 / IEEE 802.3: a frame carries at least 46 bytes of data, so a
/// short IPv4 datagram is followed by padding; the datagram ends where
/// the IP Total Length says (RFC 791), not where the frame does.
#[test]
fn ethernet_padding_after_a_short_datagram_is_not_part_of_it() {
    let ping = [0x40, 0x00, 0x12, 0x34];
    let mut frame = v4_frame([192, 0, 2, 1], 5683, &ping);
    assert_eq!(frame.len(), 14 + 32);
    frame.resize(60, 0);
    assert_eq!(run(&frame), verdict(Reason::Accept, Some(1)));
    // Some NICs leave the frame check sequence too: 4 more bytes.
    frame.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    assert_eq!(run(&frame), verdict(Reason::Accept, Some(1)));
}

#[test]
fn ieee_802_1q_tagged_frames_are_classified_by_their_payload() {
    let plain = v4_frame([192, 0, 2, 1], 5683, GET_TEMPERATURE);
    let mut tagged = plain[..12].to_vec();
    tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x2a]); // TPID, VID 42
    tagged.extend_from_slice(&plain[12..]);
    assert_eq!(run(&tagged), verdict(Reason::Accept, Some(1)));
}

#[test]
fn rfc791_options_and_fragments() {
    // IHL 6: one word of options (Router Alert, RFC 2113: 0x94 0x04 0 0).
    let mut frame = ethernet(0x0800);
    let coap = GET_TEMPERATURE;
    frame.extend(ipv4(
        [192, 0, 2, 1],
        17,
        32 + coap.len(),
        0,
        &[0x94, 4, 0, 0],
    ));
    frame.extend(udp(5683, 8 + coap.len(), coap));
    assert_eq!(run(&frame).reason, Reason::Accept);
    // More Fragments set, offset 0: the first fragment of a datagram the
    // fast path cannot see whole.
    let mut first = ethernet(0x0800);
    first.extend(ipv4([192, 0, 2, 1], 17, 28 + coap.len(), 0x2000, &[]));
    first.extend(udp(5683, 8 + coap.len() + 100, coap));
    assert_eq!(run(&first).reason, Reason::DropFragment);
    // A later fragment has no UDP header: the kernel reassembles it.
    let mut later = ethernet(0x0800);
    later.extend(ipv4([192, 0, 2, 1], 17, 20 + 16, 0x0002, &[]));
    later.extend_from_slice(&[0x55; 16]);
    assert_eq!(run(&later).reason, Reason::PassLaterFragment);
}

#[test]
fn rfc768_lengths_must_agree_with_ip() {
    let coap = GET_TEMPERATURE;
    let mut frame = ethernet(0x0800);
    frame.extend(ipv4([192, 0, 2, 1], 17, 28 + coap.len(), 0, &[]));
    frame.extend(udp(5683, 8 + coap.len() + 1, coap));
    assert_eq!(run(&frame).reason, Reason::DropBadLength);
    // Another port is not the fast path's business.
    let other = v4_frame([192, 0, 2, 1], 5690, coap);
    assert_eq!(run(&other).reason, Reason::PassNotCoapPort);
}

/// RFC 8200 section 4: extension headers are walked by their lengths.
#[test]
fn rfc8200_extension_headers() {
    // Hop-by-Hop (4.3): Hdr Ext Len 1 = 16 bytes ("in 8-octet units, not
    // including the first 8 octets"), filled by a PadN option (4.2).
    let mut hbh = vec![17, 1, 1, 12];
    hbh.extend_from_slice(&[0; 12]);
    assert_eq!(run(&v6_frame(0, &hbh)), verdict(Reason::Accept, Some(1)));
    // Destination Options (4.6) after Routing (4.4, Segments Left 0).
    let mut chain = vec![60, 0, 2, 0, 0, 0, 0, 0]; // Routing, next: DestOpts
    chain.extend_from_slice(&[17, 2, 1, 20]); // DestOpts, 24 bytes
    chain.extend_from_slice(&[0; 20]);
    assert_eq!(run(&v6_frame(43, &chain)).reason, Reason::Accept);
    // AH (RFC 4302 section 2.2): Payload Len is the length in 4-octet
    // units minus 2; 12 bytes of header and a 96-bit ICV: 24 bytes, 4.
    let mut ah = vec![17, 4, 0, 0];
    ah.extend_from_slice(&[0, 0, 0x10, 0x01]); // SPI
    ah.extend_from_slice(&[0, 0, 0, 1]); // Sequence Number
    ah.extend_from_slice(&[0xa5; 12]); // ICV
    assert_eq!(run(&v6_frame(51, &ah)), verdict(Reason::Accept, Some(1)));
    // Fragment header (4.5): offset 0 and M = 0 is an atomic fragment,
    // processed as a whole datagram (RFC 6946).
    let atomic = [17, 0, 0, 0, 0, 0, 0, 9];
    assert_eq!(run(&v6_frame(44, &atomic)).reason, Reason::Accept);
    let first = [17, 0, 0, 1, 0, 0, 0, 9];
    assert_eq!(run(&v6_frame(44, &first)).reason, Reason::DropFragment);
    let later = [17, 0, 0, 8, 0, 0, 0, 9]; // offset 1 (8 bytes)
    assert_eq!(run(&v6_frame(44, &later)).reason, Reason::PassLaterFragment);
}

/// A DTLS record (RFC 6347 section 4.1): type, version, epoch, 48-bit
/// sequence number, length, fragment.
fn record(content_type: u8, version: u16, epoch: u16, fragment: &[u8]) -> Vec<u8> {
    let mut r = vec![content_type];
    r.extend_from_slice(&version.to_be_bytes());
    r.extend_from_slice(&epoch.to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0, 0, 1]);
    r.extend_from_slice(&(fragment.len() as u16).to_be_bytes());
    r.extend_from_slice(fragment);
    r
}

/// The start of a ClientHello handshake message (RFC 6347 section 4.2.2):
/// msg_type 1, then the length, message_seq, fragment offset and length.
const CLIENT_HELLO: &[u8] = &[1, 0, 0, 0x2f, 0, 0, 0, 0, 0, 0, 0, 0x2f, 0xfe, 0xfd];

#[test]
fn rfc6347_records_on_a_coaps_port() {
    let dtls = |records: &[Vec<u8>]| v4_frame([192, 0, 2, 1], 5684, &records.concat());
    let accepted = verdict(Reason::Accept, Some(1));
    // A ClientHello in DTLS 1.0 and 1.2 records (section 4.2.1 allows either
    // before the version is negotiated); application data in 1.2.
    for version in [0xfeff, 0xfefd] {
        assert_eq!(
            run(&dtls(&[record(22, version, 0, CLIENT_HELLO)])),
            accepted
        );
    }
    assert_eq!(run(&dtls(&[record(23, 0xfefd, 1, &[0xaa; 40])])), accepted);
    // A HelloVerifyRequest in a 1.0 record, as servers send it whatever
    // they negotiate (section 4.2.1): a device's, when the gateway opens
    // the session.
    const HELLO_VERIFY_REQUEST: &[u8] = &[3, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 3, 0xfe, 0xff, 0];
    assert_eq!(
        run(&dtls(&[record(22, 0xfeff, 0, HELLO_VERIFY_REQUEST)])),
        accepted
    );
    // A flight: several records in one datagram (section 4.1.1).
    let flight = [
        record(22, 0xfefd, 0, &[2; 20]),
        record(20, 0xfefd, 0, &[1]),
        record(22, 0xfefd, 1, &[0x55; 30]),
    ];
    assert_eq!(run(&dtls(&flight)), accepted);
    // A tls12_cid record (RFC 9146 section 4): its length follows a
    // connection ID of negotiated size, so it ends the datagram.
    assert_eq!(run(&dtls(&[record(25, 0xfefd, 1, &[7; 24])])), accepted);
    let bad = verdict(Reason::DropBadDtlsRecord, None);
    // Only the hello exchange may say DTLS 1.0 (not a ServerHello, type 2,
    // nor application data); TLS 1.2 (0x0303) is not DTLS.
    assert_eq!(run(&dtls(&[record(23, 0xfeff, 1, &[0; 8])])), bad);
    assert_eq!(run(&dtls(&[record(22, 0xfeff, 0, &[2; 20])])), bad);
    assert_eq!(run(&dtls(&[record(22, 0x0303, 0, CLIENT_HELLO)])), bad);
    // Content types DTLS does not have (24 heartbeat is not one we take).
    for t in [0, 19, 24, 26, 255] {
        assert_eq!(
            run(&dtls(&[record(t, 0xfefd, 0, &[0; 8])])),
            bad,
            "type {t}"
        );
    }
    // Lengths that do not add up: a record longer than the datagram, bytes
    // after the last record, a header cut short.
    let mut long = record(23, 0xfefd, 1, &[0; 8]);
    long[12] = 9;
    assert_eq!(run(&dtls(&[long])), bad);
    let mut trailing = record(23, 0xfefd, 1, &[0; 8]);
    trailing.push(0);
    assert_eq!(run(&dtls(&[trailing])), bad);
    assert_eq!(
        run(&dtls(&[record(23, 0xfefd, 1, &[])[..12].to_vec()])),
        bad
    );
    assert_eq!(run(&dtls(&[])), bad, "an empty datagram is no record");
    // Plain CoAP on the CoAPS port is not DTLS; DTLS on the CoAP port is
    // not CoAP (its first byte 22 says CoAP version 0).
    assert_eq!(run(&v4_frame([192, 0, 2, 1], 5684, GET_TEMPERATURE)), bad);
    assert_eq!(
        run(&v4_frame(
            [192, 0, 2, 1],
            5683,
            &record(22, 0xfefd, 0, CLIENT_HELLO)
        )),
        verdict(Reason::DropBadVersion, None)
    );
    // The per-source ClientHello rate is asked of ClientHellos only.
    let mut asked = Vec::new();
    let over = classify(
        &dtls(&[record(22, 0xfefd, 0, CLIENT_HELLO)]),
        &TestPolicy,
        |key, _| {
            asked.push(key);
            !matches!(key, RateKey::Hello(_))
        },
    );
    assert_eq!(over, verdict(Reason::DropHelloRateLimited, None));
    let mut mapped = [0u8; 16];
    mapped[10..].copy_from_slice(&[0xff, 0xff, 192, 0, 2, 1]);
    assert_eq!(asked, vec![RateKey::Hello(mapped)]);
}

#[test]
fn a_peer_that_must_use_dtls_is_dropped_in_plain_coap_only() {
    let src = [192, 0, 2, 77];
    assert_eq!(
        run(&v4_frame(src, 5683, GET_TEMPERATURE)),
        verdict(Reason::DropRequiresDtls, Some(4))
    );
    let hello = record(22, 0xfefd, 0, CLIENT_HELLO);
    assert_eq!(
        run(&v4_frame(src, 5684, &hello)),
        verdict(Reason::Accept, Some(4))
    );
}
