//! The fast path's first promise: the XDP program's verdict for a frame
//! equals the reference classifier's (`router_common::classify`), reason
//! and peer included. The kernel side runs through
//! BPF_PROG_TEST_RUN; its reason and peer are read back from the verdict and
//! per-peer counters (accepted and dropped apart), which the program bumps
//! for every packet, so the counters are tested as well.
//!
//! The policy changes under the corpus: four configurations in turn, the
//! first loaded, the others applied live (so both copies of the tables are
//! read): nested allow/deny prefixes, /0, a peer that must use DTLS (and
//! DTLS records on a CoAPS port, ClientHellos rate-limited per source),
//! peers removed and their ids given
//! to new ones, rate-limited peers and unknown sources.
//!
//! The rate limiter is compared under a clock both sides agree on: every
//! limited policy here refills one packet an hour, so during the test a
//! bucket admits exactly its burst and then nothing, whatever the machine's
//! speed. The reference counts admissions per bucket.
//!
//! Privileged: needs root to load the program.

use std::collections::{BTreeMap, HashMap};

use m2m_router::config::Config;
use m2m_router::fastpath::{Fastpath, PolicyTables};
use m2m_router_tests::frames::corpus;
use m2m_router_tests::require_root;
use m2m_router_tests::verdict::Observer;
use router_common::classify::{classify, RateKey, Verdict};
use router_common::maps::PeerPolicy;
use router_common::reason::Reason;

/// One packet an hour: the refill of every rate-limited policy here.
const HOUR_NS: u64 = 3_600 * 1_000_000_000;

fn peer(name: &str, prefixes: &[&str], extra: &str) -> String {
    let list: Vec<String> = prefixes.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "[[peer]]\nname = \"{name}\"\nprefix = [{}]\n{extra}\n",
        list.join(", ")
    )
}

/// The configurations, in the order they are applied. Prefixes nest for
/// longest-prefix match: a /24 with a nested /25 and a denied host, a
/// denied /24, a rate-limited /24; later /0 and ::/0.
fn configs() -> Vec<Config> {
    let head = |unknown: &str, rate: &str| {
        format!(
            "[coap]\nlisten = [\"0.0.0.0:5683\", \"[::]:5684\"]\nlisten_dtls = [\"0.0.0.0:5690\"]\n\
             [dtls]\nhello_rate = \"1/s\"\nhello_burst = 3\n\
             [defaults]\nunknown_peers = \"{unknown}\"\nrate = \"{rate}\"\nburst = 2\n"
        )
    };
    let allowed = peer(
        "allowed",
        &["10.0.0.0/24", "fd00:1::/64"],
        "rate = \"unlimited\"",
    );
    let nested = |name: &str| {
        peer(
            name,
            &["10.0.0.128/25", "fd00:1:0:0:8000::/65"],
            "rate = \"unlimited\"",
        )
    };
    let denied_host = peer(
        "denied-host",
        &["10.0.0.7/32", "fd00:1::7/128"],
        "deny = true",
    );
    let denied = peer("denied", &["10.0.1.0/24", "fd00:2::/64"], "deny = true");
    // DTLS only: its plain CoAP is dropped with a reason of its own.
    let secure = peer(
        "secure",
        &["10.0.0.1/32", "fd00:1::1/128"],
        "psk_identity = \"secure\"\npsk_hex = \"0011\"\nrequire_dtls = true",
    );
    let metered = |rate: &str, burst: u32| {
        peer(
            "metered",
            &["10.0.3.0/24", "fd00:3::/64"],
            &format!("rate = \"{rate}\"\nburst = {burst}"),
        )
    };
    let first = format!(
        "{}{allowed}{}{denied_host}{denied}{secure}{}",
        head("allow", "1/s"),
        nested("nested"),
        metered("1/s", 3)
    );
    let texts = [
        first.clone(),
        // Nested peers removed, their ids free for "late"; everything
        // else in IPv4 denied by /0; the metered burst raised.
        format!(
            "{}{allowed}{denied}{}{}{}",
            head("drop", "unlimited"),
            metered("1/s", 5),
            nested("late"),
            peer("all-v4", &["0.0.0.0/0"], "deny = true")
        ),
        // /0 gone, the nested peers back under new ids, metered unlimited,
        // all of IPv6 one rate-limited peer.
        format!(
            "{}{allowed}{}{denied_host}{denied}{}{}",
            head("allow", "unlimited"),
            nested("nested"),
            metered("unlimited", 1),
            peer("all-v6", &["::/0"], "rate = \"1/s\"\nburst = 1")
        ),
        first,
    ];
    texts
        .iter()
        .map(|t| Config::parse(t).expect("test config is valid"))
        .collect()
}

/// `tables` with every limited policy's refill slowed to one packet an
/// hour, its burst kept.
fn hourly(mut tables: PolicyTables) -> PolicyTables {
    let slow = |p: &mut PeerPolicy| {
        // Unlimited (interval 0) stays unlimited.
        if let Some(extra) = p.burst_ns.checked_div(p.interval_ns) {
            p.interval_ns = HOUR_NS;
            p.burst_ns = extra * HOUR_NS;
        }
    };
    slow(&mut tables.default_policy);
    slow(&mut tables.hello_policy);
    for (_, p) in &mut tables.prefixes {
        slow(p);
    }
    tables
}

/// The reference rate limiter under the hourly clock: a bucket admits
/// `burst` packets, then none.
#[derive(Default)]
struct Buckets(HashMap<RateKey, u64>);

impl Buckets {
    fn admit(&mut self, key: RateKey, policy: &PeerPolicy) -> bool {
        let Some(extra) = policy.burst_ns.checked_div(policy.interval_ns) else {
            return true; // unlimited: the state is not touched
        };
        let burst = extra + 1;
        let admitted = self.0.entry(key).or_default();
        *admitted < burst && {
            *admitted += 1;
            true
        }
    }

    /// A peer id given to another peer starts with a full bucket (README:
    /// a peer that comes back "starts with fresh counters and a full
    /// bucket").
    fn reassigned(&mut self, old: &PolicyTables, new: &PolicyTables) {
        for (id, name) in new.peer_names.iter().enumerate().skip(1) {
            if !name.is_empty() && old.peer_names.get(id) != Some(name) {
                self.0.remove(&RateKey::Peer(id as u32));
            }
        }
    }
}

/// Runs every frame through the kernel and the reference under `tables`;
/// returns the mismatches, and counts each verdict in `seen`.
fn compare(
    fp: &Fastpath,
    tables: &PolicyTables,
    buckets: &mut Buckets,
    frames: &[Vec<u8>],
    seen: &mut BTreeMap<&'static str, usize>,
) -> Vec<String> {
    let mut observer = Observer::new(fp, tables.peer_names.len() as u32);
    let mut mismatches = Vec::new();
    for frame in frames {
        let expected: Verdict = classify(frame, tables, |key, policy| buckets.admit(key, policy));
        if let Err(mismatch) = observer.check(fp, frame, &expected) {
            mismatches.push(mismatch);
        }
        *seen.entry(expected.reason.label()).or_default() += 1;
    }
    mismatches
}

/// Loads the first configuration, applies the others live in turn, and
/// compares the whole corpus under each.
#[test]
fn kernel_agrees_with_reference_across_live_changes() {
    require_root();
    let frames = corpus();
    assert!(frames.len() >= 10_000, "corpus too small: {}", frames.len());
    let configs = configs();
    let mut tables = hourly(PolicyTables::from_config(&configs[0]).unwrap());
    let mut fp = Fastpath::load(tables.clone()).expect("load the XDP program");
    let mut buckets = Buckets::default();
    let mut seen_everywhere: BTreeMap<&str, usize> = BTreeMap::new();
    for (step, config) in configs.iter().enumerate() {
        if step > 0 {
            let next = hourly(PolicyTables::build(config, Some(&tables)).unwrap());
            fp.apply(next.clone()).expect("apply the policy live");
            buckets.reassigned(&tables, &next);
            tables = next;
        }
        let mut seen = BTreeMap::new();
        let mismatches = compare(&fp, &tables, &mut buckets, &frames, &mut seen);
        assert!(
            mismatches.is_empty(),
            "configuration {step}: {} of {} frames disagree; first ones:\n{}",
            mismatches.len(),
            frames.len(),
            mismatches[..mismatches.len().min(10)].join("\n")
        );
        eprintln!(
            "configuration {step}: {} frames agree; verdicts: {seen:?}",
            frames.len()
        );
        assert!(
            seen.contains_key(Reason::DropRateLimited.label()),
            "configuration {step} never reached its rate limits: {seen:?}"
        );
        for (reason, n) in seen {
            *seen_everywhere.entry(reason).or_default() += n;
        }
    }
    for reason in Reason::ALL {
        assert!(
            seen_everywhere.contains_key(reason.label()),
            "no frame reached {} ({seen_everywhere:?})",
            reason.label()
        );
    }
}
