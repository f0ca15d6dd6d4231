//! **Promise: time in applied batches never goes backwards** (ARCHITECTURE.md: only the leader
//! stamps batches, with `max(last_stamp, now)`; the engine applies `max(batch_ms, last_ms)`).
//!
//! Checked two ways:
//! - on every replica, within one incarnation, the engine's `last_ms` never decreases between
//!   samples, whatever the clocks did (skew between leaders, jumps backwards);
//! - in the log, the batches one leader stamped in one term and one incarnation carry
//!   non-decreasing stamps (the proposer's `max(last_stamp, now)`; a new leader with a slower
//!   clock may stamp earlier, and so may a leader restarted into the same term after a
//!   backwards clock jump, since `last_stamp` lives in memory: the engine clamps both).

use std::collections::BTreeMap;

use crate::history::{Evidence, Violation};
use crate::replay::Replay;

pub const NAME: &str = "batch_time";

pub fn check(ev: &Evidence, _replay: &Replay) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut last: BTreeMap<(u64, u32), (u64, i64)> = BTreeMap::new();
    for s in &ev.samples {
        let key = (s.node, s.incarnation);
        if let Some((at, ms)) = last.get(&key)
            && s.last_ms < *ms
        {
            out.push(Violation {
                invariant: NAME,
                message: format!(
                    "n{} (incarnation {}): engine time went back from {ms} (at {at}ms) to {} (at {}ms)",
                    s.node, s.incarnation, s.last_ms, s.at_ms
                ),
            });
        }
        let entry = last.entry(key).or_insert((s.at_ms, s.last_ms));
        if s.last_ms >= entry.1 {
            *entry = (s.at_ms, s.last_ms);
        }
    }
    let mut stamps: BTreeMap<(u64, u64, u64), (u64, i64)> = BTreeMap::new();
    for c in &ev.created {
        let Some(batch) = &c.batch else { continue };
        let key = (c.term, c.leader, c.epoch);
        for (stamp_ms, _) in batch.parts() {
            if let Some((index, stamp)) = stamps.get(&key)
                && stamp_ms < *stamp
            {
                out.push(Violation {
                    invariant: NAME,
                    message: format!(
                        "term {} (leader n{}): batch (part) at index {} stamped {stamp_ms} after index {index} stamped {stamp}",
                        c.term, c.leader, c.index
                    ),
                });
            }
            stamps.insert(key, (c.index, stamp_ms));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invariants::fixtures::*;

    #[test]
    fn monotone_time_passes() {
        let mut h = Hist::new();
        h.sample_now(1, 0, 10);
        h.strict_admitted("s1", 1, 10_100);
        h.sample_now(1, 0, 20);
        // A restart may restore an older snapshot: a new incarnation starts over.
        h.samples.push(crate::history::Sample {
            last_ms: 0,
            incarnation: 1,
            ..h.samples[0].clone()
        });
        h.new_term();
        h.strict_admitted("s1", 1, 9_000); // a new leader's slower clock
        assert!(check(&h.ev(), &h.replay()).is_empty());
    }

    #[test]
    fn engine_time_going_back_fails() {
        let mut h = Hist::new();
        h.strict_admitted("s1", 1, 10_100);
        h.sample_now(1, 0, 10);
        let mut s = h.samples[0].clone();
        s.last_ms -= 1;
        s.at_ms = 20;
        h.samples.push(s);
        let v = check(&h.ev(), &h.replay());
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("went back"), "{}", v[0]);
    }

    #[test]
    fn a_leader_stamping_backwards_fails() {
        let mut h = Hist::new();
        h.strict_admitted("s1", 1, 10_100);
        h.strict_admitted("s1", 1, 10_050);
        let v = check(&h.ev(), &h.replay());
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("stamped 10050"), "{}", v[0]);
    }
}
