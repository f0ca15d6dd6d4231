//! **Promise: after faults heal, a leader is elected and requests succeed within a stated
//! bound** (DESIGN.md: with no leader or no quorum a call answers UNAVAILABLE within its
//! deadline; once the cluster is whole again it must serve).
//!
//! The bound, in simulated time after the last fault is healed (every partition and network
//! episode cleared, every crashed node restarted, slow disks back to normal): every live node
//! agrees on one leader within [`crate::run::LEADER_WITHIN_MS`], and a request sent to a
//! random node is acknowledged within [`crate::run::REQUEST_WITHIN_MS`].
//!
//! And a node whose Raft stops on its own (openraft `Fatal`) must say so
//! (`Node::raft_failure`), so that its process exits and its service manager restarts it (the
//! simulator restarts it [`crate::run::SUPERVISOR_RESTART_MS`] later). A node that did not
//! report it would live on with a dead Raft: that is a violation. A Raft stopping often is
//! visible in the stats (`raft stops`).

use crate::history::{Evidence, Violation};
use crate::replay::Replay;

pub const NAME: &str = "liveness";

pub fn check(ev: &Evidence, _replay: &Replay) -> Vec<Violation> {
    let Some(l) = ev.liveness else {
        return vec![Violation {
            invariant: NAME,
            message: "the run never reached its healing phase".into(),
        }];
    };
    let mut out: Vec<Violation> = ev
        .stopped
        .iter()
        .filter(|s| !s.reported)
        .map(|s| Violation {
            invariant: NAME,
            message: format!(
                "n{}'s Raft stopped on its own at {}ms (incarnation {}) and the node did not report it: {}",
                s.node, s.at_ms, s.epoch, s.error
            ),
        })
        .collect();
    let late = |at: Option<u64>, within: u64| match at {
        Some(at) => at.saturating_sub(l.healed_at_ms) > within,
        None => true,
    };
    if late(l.leader_at_ms, ev.bounds.leader_within_ms) {
        out.push(Violation {
            invariant: NAME,
            message: format!(
                "no agreed leader within {}ms of healing at {}ms (first at {:?})",
                ev.bounds.leader_within_ms, l.healed_at_ms, l.leader_at_ms
            ),
        });
    }
    if late(l.request_ok_at_ms, ev.bounds.request_within_ms) {
        out.push(Violation {
            invariant: NAME,
            message: format!(
                "no request acknowledged within {}ms of healing at {}ms (first at {:?})",
                ev.bounds.request_within_ms, l.healed_at_ms, l.request_ok_at_ms
            ),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Liveness;
    use crate::invariants::fixtures::*;

    #[test]
    fn a_prompt_recovery_passes() {
        let h = Hist::new();
        assert!(check(&h.ev(), &h.replay()).is_empty());
    }

    #[test]
    fn no_leader_after_healing_fails() {
        let mut h = Hist::new();
        h.liveness = Some(Liveness {
            healed_at_ms: 1_000,
            leader_at_ms: None,
            request_ok_at_ms: None,
        });
        let v = check(&h.ev(), &h.replay());
        assert_eq!(v.len(), 2, "{v:?}");
    }

    #[test]
    fn a_raft_that_stops_itself_unreported_fails() {
        let mut h = Hist::new();
        let stop = crate::history::RaftStopped {
            at_ms: 100,
            node: 2,
            epoch: 0,
            error: "storage error".into(),
            reported: false,
        };
        h.stopped.push(stop.clone());
        let v = check(&h.ev(), &h.replay());
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("did not report it"), "{}", v[0]);

        // Reported (and so restarted by the supervisor), with the cluster live after healing.
        h.stopped = vec![crate::history::RaftStopped {
            reported: true,
            ..stop
        }];
        assert!(check(&h.ev(), &h.replay()).is_empty());
    }

    #[test]
    fn a_slow_recovery_fails() {
        let mut h = Hist::new();
        h.liveness = Some(Liveness {
            healed_at_ms: 1_000,
            leader_at_ms: Some(2_000),
            request_ok_at_ms: Some(30_000),
        });
        let v = check(&h.ev(), &h.replay());
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("no request"), "{}", v[0]);
    }
}
