//! The XDP program's verdict for one frame, as BPF_PROG_TEST_RUN and the
//! counters show it, checked against the reference classifier's: the
//! action returned, the one reason counter that moved, and the peer counter
//! (accepted or dropped) that moved. Used by the differential test and the
//! `xdp` fuzz target.

use m2m_router::fastpath::Fastpath;
use router_common::classify::Verdict;
use router_common::reason::{Action, Reason};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// Packets per reason, and (accepted, dropped) packets per peer id.
type Snapshot = (Vec<u64>, Vec<(u64, u64)>);

fn snapshot(fp: &Fastpath, peers: u32) -> Snapshot {
    let reasons = fp
        .verdicts()
        .expect("read the verdict counters")
        .values()
        .map(|(_, c)| c.packets)
        .collect();
    let peers = (0..peers)
        .map(|id| {
            let c = fp.peer_counters(id).expect("read a peer's counters");
            (c.accepted.packets, c.dropped.packets)
        })
        .collect();
    (reasons, peers)
}

/// Watches the counters of peers `0..peers` across frames.
pub struct Observer {
    peers: u32,
    before: Snapshot,
}

impl Observer {
    pub fn new(fp: &Fastpath, peers: u32) -> Observer {
        Observer {
            peers,
            before: snapshot(fp, peers),
        }
    }

    /// Runs `frame` through the kernel program once; a description of the
    /// difference if it did not do what `expected` says.
    pub fn check(&mut self, fp: &Fastpath, frame: &[u8], expected: &Verdict) -> Result<(), String> {
        let run = fp.test_run(frame, 1).expect("BPF_PROG_TEST_RUN");
        let after = snapshot(fp, self.peers);
        let moved_reasons: Vec<Reason> = Reason::ALL
            .iter()
            .copied()
            .filter(|r| after.0[*r as usize] != self.before.0[*r as usize])
            .collect();
        // (peer, accepted?) for each peer counter that moved.
        let moved_peers: Vec<(u32, bool)> = (0..self.peers)
            .flat_map(|id| {
                let (a, b) = (after.1[id as usize], self.before.1[id as usize]);
                [(id, true, a.0 != b.0), (id, false, a.1 != b.1)]
            })
            .filter(|&(_, _, moved)| moved)
            .map(|(id, accepted, _)| (id, accepted))
            .collect();
        self.before = after;
        let expected_ret = match expected.reason.action() {
            Action::Pass => XDP_PASS,
            Action::Drop => XDP_DROP,
        };
        let expected_peers: Vec<(u32, bool)> = expected
            .peer_id
            .map(|id| (id, expected.reason == Reason::Accept))
            .into_iter()
            .collect();
        if run.return_value == expected_ret
            && moved_reasons == [expected.reason]
            && moved_peers == expected_peers
        {
            return Ok(());
        }
        Err(format!(
            "reference {expected:?} / kernel returned {} counted {moved_reasons:?} peers (id, accepted) {moved_peers:?}\n  frame {}",
            run.return_value,
            hex(frame)
        ))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
