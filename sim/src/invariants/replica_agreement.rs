//! **Promise: replicas that applied the same log index have byte-identical engine snapshots**
//! (ARCHITECTURE.md, "determinism": same log ⇒ same state, on every replica).
//!
//! Checked against the replayed committed log, which is stronger than comparing replicas
//! with each other: every sample of a replica's engine (taken every 100 ms of simulated time,
//! on every live node) must be byte-identical — by digest — to the replayed engine at some
//! committed index at or after the applied index the node's Raft metrics reported just
//! before (metrics are published after apply, so the engine may be ahead of them, never
//! behind). Two replicas at one index therefore hold the same bytes. After recovery, when
//! every node is quiet, the check is exact: nodes at the same applied index hold the same
//! snapshot bytes, equal to the replay's at that index (nodes whose Raft stopped on its own
//! are left to the samples: their metrics may lag their engine for good).
//!
//! Underneath it, Raft's own promise: no two nodes commit different entries at one index
//! (recorded by the simulated log stores when each node commits).

use std::collections::BTreeMap;

use crate::history::{Evidence, Violation, digest};
use crate::replay::Replay;

pub const NAME: &str = "replica_agreement";

/// Reports at most this many bad samples per node.
const MAX_REPORTS_PER_NODE: usize = 3;

pub fn check(ev: &Evidence, replay: &Replay) -> Vec<Violation> {
    let mut out = Vec::new();
    for c in ev.conflicts.iter().take(5) {
        out.push(Violation {
            invariant: NAME,
            message: format!("committed logs diverge: {c}"),
        });
    }
    for f in &ev.finals {
        if f.applied > replay.last_index {
            out.push(Violation {
                invariant: "oracle",
                message: format!(
                    "n{} applied {:?} but the audit's committed log ends at {:?} (simulator bug)",
                    f.node, f.applied, replay.last_index
                ),
            });
        }
    }
    let mut reported: BTreeMap<u64, usize> = BTreeMap::new();
    for s in &ev.samples {
        let problem = match (
            replay.digest_valid_upto.get(&s.snapshot_hash),
            s.applied_floor,
        ) {
            (Some(_), None) => None,
            (Some(upto), Some(floor)) if *upto >= floor => None,
            (Some(upto), Some(floor)) => Some(format!(
                "engine holds the state of committed index ≤ {upto}, behind the applied index {floor} its metrics reported"
            )),
            (None, floor) => Some(format!(
                "engine state (applied ≥ {floor:?}, time {}) matches no prefix of the committed log",
                s.last_ms
            )),
        };
        if let Some(problem) = problem {
            let n = reported.entry(s.node).or_default();
            *n += 1;
            if *n <= MAX_REPORTS_PER_NODE {
                out.push(Violation {
                    invariant: NAME,
                    message: format!(
                        "n{} (incarnation {}) at {}ms: {problem}",
                        s.node, s.incarnation, s.at_ms
                    ),
                });
            }
        }
    }
    let mut by_index: BTreeMap<u64, Vec<&crate::history::FinalState>> = BTreeMap::new();
    for f in ev.finals.iter().filter(|f| f.running) {
        if let Some(i) = f.applied {
            by_index.entry(i).or_default().push(f);
        }
    }
    for (index, finals) in by_index {
        let first = finals[0];
        for other in &finals[1..] {
            if other.snapshot != first.snapshot {
                out.push(Violation {
                    invariant: NAME,
                    message: format!(
                        "n{} and n{} both applied index {index} but their engine snapshots differ ({} vs {} bytes)",
                        first.node,
                        other.node,
                        first.snapshot.len(),
                        other.snapshot.len()
                    ),
                });
            }
        }
        if let Some(expected) = replay.digest_at.get(&index)
            && *expected != digest(&first.snapshot)
        {
            out.push(Violation {
                invariant: NAME,
                message: format!(
                    "n{} at rest at index {index}: snapshot differs from the replayed committed log's",
                    first.node
                ),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::FinalState;
    use crate::invariants::fixtures::*;
    use crate::workload::STRICT_KEY;

    #[test]
    fn replicas_on_the_log_pass() {
        let mut h = Hist::new();
        h.sample_now(2, 0, 50);
        h.strict_admitted("s1", 1, 10_100);
        h.sample_now(1, 0, 100);
        h.sample_now(2, 0, 100);
        h.final_now(1, true);
        h.final_now(2, false);
        let v = check(&h.ev(), &h.replay());
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn a_diverged_replica_fails() {
        let mut h = Hist::new();
        h.strict_admitted("s1", 1, 10_100);
        h.final_now(1, true);
        // Replica 2 applied one more hit at the same index (say, a non-deterministic apply).
        let mut diverged = tally_server::engine::Engine::restore(&h.engine.snapshot()).unwrap();
        diverged.apply(
            10_100,
            &[tally_server::engine::Command::RateLimit(rl(
                STRICT_KEY, "s9", None,
            ))],
        );
        h.finals.push(FinalState {
            node: 2,
            is_leader: false,
            running: true,
            applied: h.committed_upto,
            snapshot: diverged.snapshot(),
            archive: Default::default(),
        });
        h.samples.push(crate::history::Sample {
            node: 2,
            incarnation: 0,
            at_ms: 100,
            applied_floor: h.committed_upto,
            snapshot_hash: digest(&diverged.snapshot()),
            last_ms: diverged.last_ms(),
        });
        let v = check(&h.ev(), &h.replay());
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].message.contains("matches no prefix"), "{}", v[0]);
        assert!(v[1].message.contains("differ"), "{}", v[1]);
    }

    #[test]
    fn two_nodes_committing_different_entries_fails() {
        let mut h = Hist::new();
        h.strict_admitted("s1", 1, 10_100);
        h.conflicts
            .push("index 2: n2 committed 2-2 but n1 committed 1-1".into());
        let v = check(&h.ev(), &h.replay());
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("diverge"), "{}", v[0]);
    }

    #[test]
    fn a_replica_behind_its_metrics_fails() {
        let mut h = Hist::new();
        h.sample_now(2, 0, 50);
        h.strict_admitted("s1", 1, 10_100);
        h.samples[0].applied_floor = h.committed_upto;
        let v = check(&h.ev(), &h.replay());
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("behind"), "{}", v[0]);
    }
}
