//! The XDP fast path: guards the gateway's CoAP ports at the driver.
//!
//! It mirrors `router_common::classify` step for step (the reference the
//! differential tests hold it to); read that module first. This file adds
//! what only the kernel side has: bounds checks the verifier can follow, the
//! BPF maps, the shared rate-limit state and the counters.
#![no_std]
#![no_main]
// The BPF target has no compare-and-swap in `core::sync::atomic` (rustc marks
// it `atomic_cas: false`), but the kernel has BPF_CMPXCHG since 5.12 and LLVM
// emits it for the intrinsic. RUSTC_BOOTSTRAP is set by the build already.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{atomic_cxchg, AtomicOrdering};
use core::mem::size_of;

use aya_ebpf::bindings::{xdp_action, BPF_NOEXIST};
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{Array, LpmTrie, LruHashMap, PerCpuArray};
use aya_ebpf::programs::XdpContext;
use router_common::maps::{
    v4_mapped, Counter, PeerCounters, PeerPolicy, MAX_PEERS, MAX_PREFIXES, MAX_UNKNOWN_SOURCES,
    POLICY_DENY, POLICY_REQUIRE_DTLS, PORT_COAP, PORT_COAPS, PORT_COUNT, UNKNOWN_PEER_ID,
};
use router_common::proto::*;
use router_common::rate::gcra_admit;
use router_common::reason::{Action, Reason, REASON_COUNT};

// Two copies of the policy tables; see `router_common::maps::ACTIVE_TABLES`.
#[map(name = "ACTIVE_TABLES")]
static ACTIVE_TABLES: Array<u32> = Array::with_max_entries(1, 0);
#[map(name = "PEERS_V4_0")]
static PEERS_V4_0: LpmTrie<[u8; 4], PeerPolicy> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map(name = "PEERS_V4_1")]
static PEERS_V4_1: LpmTrie<[u8; 4], PeerPolicy> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map(name = "PEERS_V6_0")]
static PEERS_V6_0: LpmTrie<[u8; 16], PeerPolicy> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map(name = "PEERS_V6_1")]
static PEERS_V6_1: LpmTrie<[u8; 16], PeerPolicy> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map(name = "DEFAULT_POLICY")]
static DEFAULT_POLICY: Array<PeerPolicy> = Array::with_max_entries(2, 0);
#[map(name = "COAP_PORTS")]
static COAP_PORTS: Array<u32> = Array::with_max_entries(PORT_COUNT, 0);
#[map(name = "PEER_RATE")]
static PEER_RATE: Array<u64> = Array::with_max_entries(MAX_PEERS, 0);
#[map(name = "UNKNOWN_RATE")]
static UNKNOWN_RATE: LruHashMap<[u8; 16], u64> =
    LruHashMap::with_max_entries(MAX_UNKNOWN_SOURCES, 0);
#[map(name = "HELLO_POLICY")]
static HELLO_POLICY: Array<PeerPolicy> = Array::with_max_entries(1, 0);
#[map(name = "HELLO_RATE")]
static HELLO_RATE: LruHashMap<[u8; 16], u64> = LruHashMap::with_max_entries(MAX_UNKNOWN_SOURCES, 0);
#[map(name = "VERDICTS")]
static VERDICTS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(REASON_COUNT, 0);
#[map(name = "PEER_STATS")]
static PEER_STATS: PerCpuArray<PeerCounters> = PerCpuArray::with_max_entries(MAX_PEERS, 0);

/// Compare-and-swap attempts on a rate-limit state before the packet is
/// treated as over the rate. Each failed attempt means another CPU admitted a
/// packet of the same peer in between, so giving up errs on the strict side.
const CAS_ATTEMPTS: usize = 4;

/// Marks "no peer" in the verdict (policy verdicts carry a real id).
const NO_PEER: u32 = u32::MAX;

#[xdp]
pub fn m2m_router(ctx: XdpContext) -> u32 {
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    let (reason, peer_id) = match classify(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => (reason, NO_PEER),
    };
    count(reason, peer_id, frame_len);
    match reason.action() {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
    }
}

/// An empty program that passes everything: the baseline the benchmarks
/// measure beside `m2m_router` in the same run. Never attached.
#[xdp]
pub fn xdp_pass_baseline(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn count(reason: Reason, peer_id: u32, frame_len: u64) {
    if let Some(counter) = VERDICTS.get_ptr_mut(reason as u32) {
        // Per-CPU: no other CPU writes this slot, so no atomics needed.
        unsafe { (*counter).add(frame_len) };
    }
    if peer_id == NO_PEER {
        return;
    }
    if let Some(stats) = PEER_STATS.get_ptr_mut(peer_id) {
        let stats = unsafe { &mut *stats };
        match reason {
            Reason::Accept => stats.accepted.add(frame_len),
            _ => stats.dropped.add(frame_len),
        }
    }
}

/// The one bounds check: a pointer to a `T` at `off`, if it lies inside the
/// packet. Checked right before each read so the verifier sees it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn load<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    ptr_at::<T>(ctx, off).map(|p| unsafe { p.read_unaligned() })
}

#[inline(always)]
fn be16(ctx: &XdpContext, off: usize) -> Option<u16> {
    load::<[u8; 2]>(ctx, off).map(u16::from_be_bytes)
}

#[derive(Clone, Copy)]
enum Source {
    V4([u8; 4]),
    V6([u8; 16]),
}

struct Transport {
    src: Source,
    proto: u8,
    l4_off: usize,
    /// Transport length per the IP header; `usize::MAX` when the IP header's
    /// lengths are inconsistent or run past the frame.
    l4_len: usize,
    first_fragment: bool,
    later_fragment: bool,
}

/// Returns `(reason, peer_id)` for well-formed CoAP, `Err(reason)` otherwise.
#[inline(always)]
fn classify(ctx: &XdpContext) -> Result<(Reason, u32), Reason> {
    let frame_len = ctx.data_end() - ctx.data();
    let (off, ethertype) = l3_header(ctx).ok_or(Reason::PassNotIp)?;
    let ip = match ethertype {
        ETH_P_IPV4 => ipv4(ctx, off, frame_len)?,
        ETH_P_IPV6 => ipv6(ctx, off, frame_len)?,
        _ => return Err(Reason::PassNotIp),
    };
    if ip.proto != IPPROTO_UDP {
        return Err(Reason::PassNotUdp);
    }
    if ip.later_fragment {
        return Err(Reason::PassLaterFragment);
    }
    let Some(dst_port) = be16(ctx, ip.l4_off + 2) else {
        return Err(if ip.first_fragment {
            Reason::DropFragment
        } else {
            Reason::PassNotIp
        });
    };
    let port_kind = match COAP_PORTS.get(u32::from(dst_port)) {
        Some(&kind) if kind == PORT_COAP || kind == PORT_COAPS => kind,
        _ => return Err(Reason::PassNotCoapPort),
    };
    if ip.first_fragment {
        return Err(Reason::DropFragment);
    }
    let udp_len = usize::from(be16(ctx, ip.l4_off + 4).ok_or(Reason::DropBadLength)?);
    if frame_len < ip.l4_off + UDP_HLEN || udp_len < UDP_HLEN || ip.l4_len != udp_len {
        return Err(Reason::DropBadLength);
    }
    if port_kind == PORT_COAPS {
        let hello = check_dtls(ctx, ip.l4_off + UDP_HLEN, ip.l4_off + udp_len)?;
        if hello && !admit_hello(&mapped(ip.src)) {
            return Err(Reason::DropHelloRateLimited);
        }
    } else {
        check_coap(ctx, ip.l4_off + UDP_HLEN, udp_len - UDP_HLEN)?;
    }
    Ok(apply_policy(ip.src, port_kind))
}

#[inline(always)]
fn mapped(src: Source) -> [u8; 16] {
    match src {
        Source::V4(a) => v4_mapped(a),
        Source::V6(a) => a,
    }
}

/// DTLS records from `off` to `end` (the reference's `check_dtls`); whether
/// the first is a ClientHello.
#[inline(always)]
fn check_dtls(ctx: &XdpContext, mut off: usize, end: usize) -> Result<bool, Reason> {
    let mut hello = false;
    for i in 0..DTLS_MAX_RECORDS {
        if end - off < DTLS_RECORD_HLEN {
            return Err(Reason::DropBadDtlsRecord);
        }
        let h: [u8; DTLS_RECORD_HLEN] = load(ctx, off).ok_or(Reason::DropBadDtlsRecord)?;
        let version = u16::from_be_bytes([h[1], h[2]]);
        let len = usize::from(u16::from_be_bytes([h[11], h[12]]));
        if !dtls_content_type_valid(h[0]) {
            return Err(Reason::DropBadDtlsRecord);
        }
        let hello_phase = if h[0] == DTLS_HANDSHAKE && h[3] == 0 && h[4] == 0 && len > 0 {
            load::<u8>(ctx, off + DTLS_RECORD_HLEN)
        } else {
            None
        };
        let client_hello = hello_phase == Some(DTLS_CLIENT_HELLO);
        if version != DTLS_1_2
            && !(version == DTLS_1_0 && hello_phase.is_some_and(dtls_1_0_allowed))
        {
            return Err(Reason::DropBadDtlsRecord);
        }
        if i == 0 {
            hello = client_hello;
        }
        if h[0] == DTLS_CID {
            return Ok(hello);
        }
        if end - off - DTLS_RECORD_HLEN < len {
            return Err(Reason::DropBadDtlsRecord);
        }
        off += DTLS_RECORD_HLEN + len;
        if off == end {
            return Ok(hello);
        }
        // The verifier learns a packet pointer's range only for offsets
        // below 64 KiB (MAX_PACKET_OFF); the reference has the same check.
        if off > DTLS_MAX_OFFSET {
            return Err(Reason::DropBadDtlsRecord);
        }
    }
    Err(Reason::DropBadDtlsRecord)
}

#[inline(always)]
fn l3_header(ctx: &XdpContext) -> Option<(usize, u16)> {
    let mut off = ETH_HLEN - 2;
    let mut proto = be16(ctx, off)?;
    for _ in 0..MAX_VLAN_TAGS {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        off += VLAN_HLEN;
        proto = be16(ctx, off)?;
    }
    Some((off + 2, proto))
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, off: usize, frame_len: usize) -> Result<Transport, Reason> {
    let b0: u8 = load(ctx, off).ok_or(Reason::PassNotIp)?;
    let hlen = usize::from(b0 & 0x0f) * 4;
    if b0 >> 4 != 4 || hlen < IPV4_MIN_HLEN || frame_len < off + hlen {
        return Err(Reason::PassNotIp);
    }
    // The fixed 20 bytes: bounds-checked as one read for the verifier.
    let hdr: [u8; IPV4_MIN_HLEN] = load(ctx, off).ok_or(Reason::PassNotIp)?;
    let total_len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    let l4_len = if total_len >= hlen && frame_len >= off + total_len {
        total_len - hlen
    } else {
        usize::MAX
    };
    Ok(Transport {
        src: Source::V4([hdr[12], hdr[13], hdr[14], hdr[15]]),
        proto: hdr[9],
        l4_off: off + hlen,
        l4_len,
        first_fragment: frag & IPV4_MF != 0 && frag & IPV4_OFFSET_MASK == 0,
        later_fragment: frag & IPV4_OFFSET_MASK != 0,
    })
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, off: usize, frame_len: usize) -> Result<Transport, Reason> {
    let fixed: [u8; 8] = load(ctx, off).ok_or(Reason::PassNotIp)?;
    let src: [u8; 16] = load(ctx, off + 8).ok_or(Reason::PassNotIp)?;
    // The whole fixed header must be present (the reference checks 40 bytes).
    if frame_len < off + IPV6_HLEN || fixed[0] >> 4 != 6 {
        return Err(Reason::PassNotIp);
    }
    let payload_len = usize::from(u16::from_be_bytes([fixed[4], fixed[5]]));
    let mut proto = fixed[6];
    let mut cur = off + IPV6_HLEN;
    let (mut first_fragment, mut later_fragment) = (false, false);
    // Bounded walk (the verifier needs a bound; RFC 8200 section 4.1 allows
    // each extension header about once). The last round only detects that
    // the chain is longer than the walk.
    for walked in 0..=MAX_IPV6_EXT_HEADERS {
        let (next, len) = match proto {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let h: [u8; 2] = load(ctx, cur).ok_or(Reason::PassNotIp)?;
                (h[0], (usize::from(h[1]) + 1) * 8)
            }
            IPPROTO_AH => {
                let h: [u8; 2] = load(ctx, cur).ok_or(Reason::PassNotIp)?;
                (h[0], (usize::from(h[1]) + 2) * 4)
            }
            IPPROTO_FRAGMENT => {
                let h: [u8; 4] = load(ctx, cur).ok_or(Reason::PassNotIp)?;
                let field = u16::from_be_bytes([h[2], h[3]]);
                later_fragment = field & IPV6_FRAG_OFFSET_MASK != 0;
                first_fragment = !later_fragment && field & IPV6_FRAG_MF != 0;
                (h[0], 8)
            }
            _ => break,
        };
        if walked == MAX_IPV6_EXT_HEADERS {
            return Err(Reason::DropHeaderChain);
        }
        proto = next;
        cur += len;
        if later_fragment {
            break;
        }
    }
    let ext_len = cur - (off + IPV6_HLEN);
    let l4_len = if payload_len >= ext_len && frame_len >= off + IPV6_HLEN + payload_len {
        payload_len - ext_len
    } else {
        usize::MAX
    };
    Ok(Transport {
        src: Source::V6(src),
        proto,
        l4_off: cur,
        l4_len,
        first_fragment,
        later_fragment,
    })
}

/// RFC 7252 section 3: the fixed header and the token length.
#[inline(always)]
fn check_coap(ctx: &XdpContext, off: usize, coap_len: usize) -> Result<(), Reason> {
    if coap_len < COAP_HLEN {
        return Err(Reason::DropTooShort);
    }
    let hdr: [u8; 2] = load(ctx, off).ok_or(Reason::DropTooShort)?;
    let token_len = hdr[0] & 0x0f;
    if hdr[0] >> 6 != COAP_VERSION {
        return Err(Reason::DropBadVersion);
    }
    if token_len > COAP_MAX_TOKEN_LEN {
        return Err(Reason::DropBadTokenLength);
    }
    if !coap_code_class_valid(hdr[1]) {
        return Err(Reason::DropBadCode);
    }
    if hdr[1] == 0 && (token_len != 0 || coap_len != COAP_HLEN) {
        return Err(Reason::DropBadEmpty);
    }
    if coap_len < COAP_HLEN + usize::from(token_len) {
        return Err(Reason::DropTruncated);
    }
    Ok(())
}

#[inline(always)]
fn apply_policy(src: Source, port_kind: u32) -> (Reason, u32) {
    // Read once: every lookup of this packet uses the same copy.
    let copy = ACTIVE_TABLES.get(0).map_or(0, |&c| c & 1);
    let found = match (src, copy) {
        (Source::V4(addr), 0) => PEERS_V4_0.get(Key::new(32, addr)),
        (Source::V4(addr), _) => PEERS_V4_1.get(Key::new(32, addr)),
        (Source::V6(addr), 0) => PEERS_V6_0.get(Key::new(128, addr)),
        (Source::V6(addr), _) => PEERS_V6_1.get(Key::new(128, addr)),
    };
    if let Some(rule) = found {
        let reason = if rule.action == POLICY_DENY {
            Reason::DropDenied
        } else if rule.action == POLICY_REQUIRE_DTLS && port_kind != PORT_COAPS {
            Reason::DropRequiresDtls
        } else if admit_peer(rule) {
            Reason::Accept
        } else {
            Reason::DropRateLimited
        };
        return (reason, rule.peer_id);
    }
    let reason = match DEFAULT_POLICY.get(copy) {
        Some(rule) if rule.action != POLICY_DENY => {
            let addr = match src {
                Source::V4(a) => v4_mapped(a),
                Source::V6(a) => a,
            };
            if admit_unknown(rule, &addr) {
                Reason::Accept
            } else {
                Reason::DropRateLimited
            }
        }
        _ => Reason::DropUnknownPeer,
    };
    (reason, UNKNOWN_PEER_ID)
}

#[inline(always)]
fn admit_peer(rule: &PeerPolicy) -> bool {
    if rule.interval_ns == 0 {
        return true;
    }
    match PEER_RATE.get_ptr_mut(rule.peer_id) {
        Some(state) => admit(state, rule),
        None => false,
    }
}

#[inline(always)]
fn admit_unknown(rule: &PeerPolicy, addr: &[u8; 16]) -> bool {
    admit_source(&UNKNOWN_RATE, rule, addr)
}

#[inline(always)]
fn admit_hello(addr: &[u8; 16]) -> bool {
    match HELLO_POLICY.get(0) {
        Some(rule) => admit_source(&HELLO_RATE, rule, addr),
        None => true,
    }
}

/// The rate of one source, its state in `states`.
#[inline(always)]
fn admit_source(states: &LruHashMap<[u8; 16], u64>, rule: &PeerPolicy, addr: &[u8; 16]) -> bool {
    if rule.interval_ns == 0 {
        return true;
    }
    let state = match states.get_ptr_mut(addr) {
        Some(state) => state,
        None => {
            // A new source starts with TAT 0: a full burst. NOEXIST keeps a
            // concurrent insert by another CPU from being overwritten.
            let _ = states.insert(addr, &0, u64::from(BPF_NOEXIST));
            match states.get_ptr_mut(addr) {
                Some(state) => state,
                None => return false,
            }
        }
    };
    admit(state, rule)
}

/// GCRA (see `router_common::rate`) on a TAT shared by all CPUs: the CAS
/// makes the check and the update one step, so two CPUs can never both take
/// the last token. This is what keeps the rate exact with both cores busy.
///
/// The clock is `bpf_ktime_get_coarse_ns` (kernel 5.11+): ~25 ns cheaper
/// per packet than `bpf_ktime_get_ns` on these hosts (`xdp-cost`), and
/// exact enough because every burst tolerance spans one of its ticks
/// (`PolicyTables`, `router_common::rate::with_clock_tick`); without that,
/// it admitted 2-9% under the rate with both CPUs busy.
#[inline(always)]
fn admit(state: *mut u64, rule: &PeerPolicy) -> bool {
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let mut seen = unsafe { core::ptr::read_volatile(state) };
    for _ in 0..CAS_ATTEMPTS {
        let Some(next) = gcra_admit(seen, now, rule.interval_ns, rule.burst_ns) else {
            return false;
        };
        let (current, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                state, seen, next,
            )
        };
        if swapped {
            return true;
        }
        seen = current;
    }
    false
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
