//! **Promise: for `fast` limits, any over-admission is within the documented in-flight bound**
//! (ARCHITECTURE.md, "Acknowledgement modes": a leader crash loses at most the in-flight
//! batches and the one being gathered — (`max_inflight_batches` (≤ 32) + 1) ×
//! `max_batch_commands` commands — of fast-acknowledged hits, which can only under-count).
//!
//! Checked three ways:
//! - a fast answer that was committed agrees with the committed outcome (the speculative
//!   engine never told a client something the log does not say);
//! - fast answers that never reached the committed log (lost with their leader) number at most
//!   (`max_inflight_batches` + 1) × `max_batch_commands` per leader term (the term of the entry that carried them, or,
//!   for an answer whose batch never reached the log, the newest term seen when it was given);
//! - on `fast-rpw`, the committed admissions clients saw admitted stay within capacity in
//!   every window, so over-admission comes only from lost answers.

use std::collections::BTreeMap;

use tally_server::engine::{Command, Outcome};

use crate::history::{CallResult, Evidence, Violation};
use crate::invariants::counting::by_window;
use crate::replay::Replay;
use crate::workload::rid_of;

pub const NAME: &str = "fast_bound";

pub fn check(ev: &Evidence, replay: &Replay) -> Vec<Violation> {
    let mut out = Vec::new();
    let bound = (ev.bounds.max_inflight_batches + 1) * ev.bounds.max_batch_commands;
    // The leadership (term, node, epoch) that created the entry carrying each rid.
    let mut created_by: BTreeMap<u64, (u64, u64, u64)> = BTreeMap::new();
    let mut carried: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for c in &ev.created {
        let Some(batch) = &c.batch else { continue };
        for command in &batch.commands {
            if let Command::RateLimit(rl) = command
                && let Some(rid) = rid_of(rl)
            {
                let l = created_by.entry(rid).or_insert((c.term, c.leader, c.epoch));
                *l = (*l).max((c.term, c.leader, c.epoch));
                carried
                    .entry(rid)
                    .or_default()
                    .push(format!("T{}-N{}-{}", c.term, c.leader, c.index));
            }
        }
    }
    let leadership_at = |(node, epoch): (u64, u64), ms: u64| {
        ev.leaders
            .iter()
            .filter(|l| l.at_ms <= ms && l.node == node && l.epoch == epoch)
            .max_by_key(|l| (l.term, l.at_ms))
            .map_or((0, node, epoch), |l| (l.term, l.node, l.epoch))
    };
    let mut lost_by_leader: BTreeMap<(u64, u64, u64), Vec<u64>> = BTreeMap::new();
    for call in &ev.calls {
        let CallResult::Acked(Outcome::RateLimit(d)) = &call.result else {
            continue;
        };
        if !d.fast || !matches!(call.command, Command::RateLimit(_)) {
            continue;
        }
        match replay.committed.get(&call.id) {
            Some(c) => {
                if c.outcome != Outcome::RateLimit(d.clone()) {
                    out.push(Violation {
                        invariant: NAME,
                        message: format!(
                            "call #{}: fast answer {:?} disagrees with the committed outcome {:?} (index {})",
                            call.id, d, c.outcome, c.index
                        ),
                    });
                }
            }
            None => {
                let leadership = created_by
                    .get(&call.id)
                    .copied()
                    .unwrap_or_else(|| leadership_at(call.served_by, call.done_ms));
                lost_by_leader.entry(leadership).or_default().push(call.id);
            }
        }
    }
    for ((term, node, epoch), ids) in &lost_by_leader {
        if ids.len() > bound {
            let calls: Vec<String> = ids
                .iter()
                .take(20)
                .map(|id| match carried.get(id) {
                    Some(entries) => format!("#{id} in {}", entries.join("/")),
                    None => format!("#{id} never in the log"),
                })
                .collect();
            out.push(Violation {
                invariant: NAME,
                message: format!(
                    "leader n{node} of term {term} (incarnation {epoch}): {} fast answers lost > bound {bound} (({} in-flight batches + 1 gathering) × {} commands): {}",
                    ids.len(),
                    ev.bounds.max_inflight_batches,
                    ev.bounds.max_batch_commands,
                    calls.join(", ")
                ),
            });
        }
    }
    let limit = ev.bounds.fast;
    for ((key, window), count) in by_window(ev, replay, &limit, |_| true) {
        if count.hits > limit.capacity {
            out.push(Violation {
                invariant: NAME,
                message: format!(
                    "{}={key} window [{window}, +{}ms): {} committed hits acknowledged as admitted > capacity {} (calls {:?})",
                    limit.entry_key, limit.window_ms, count.hits, limit.capacity, count.calls
                ),
            });
        }
    }
    out
}

/// Fast answers the committed log does not hold (for the run's statistics).
pub fn lost_fast_answers(ev: &Evidence, replay: &Replay) -> usize {
    ev.calls
        .iter()
        .filter(|c| {
            matches!(&c.result, CallResult::Acked(Outcome::RateLimit(d)) if d.fast)
                && !replay.committed.contains_key(&c.id)
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invariants::fixtures::*;

    #[test]
    fn lost_answers_within_the_bound_pass() {
        // Bound in the fixture: (2 in flight + 1 gathering) batches × 2 commands = 6 per term.
        let mut h = Hist::new();
        for _ in 0..6 {
            h.fast_admitted("f1", 10_100, false);
        }
        h.new_term();
        h.fast_admitted("f1", 10_200, true);
        let v = check(&h.ev(), &h.replay());
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn more_lost_answers_than_in_flight_fails() {
        let mut h = Hist::new();
        for _ in 0..7 {
            h.fast_admitted("f1", 10_100, false);
        }
        h.new_term();
        let v = check(&h.ev(), &h.replay());
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("7 fast answers lost"), "{}", v[0]);
    }

    #[test]
    fn committed_fast_answers_must_agree_and_fit() {
        let mut h = Hist::new();
        for _ in 0..4 {
            // The fourth is refused by the engine; the client was told OK.
            h.fast_admitted("f1", 10_100, true);
        }
        let v = check(&h.ev(), &h.replay());
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].message.contains("disagrees"), "{}", v[0]);
        assert!(v[1].message.contains("4 committed hits"), "{}", v[1]);
    }
}
