//! **Promise: every outcome a client saw acknowledged is reflected in the state after
//! recovery — nothing acknowledged is lost** (DESIGN.md, "Durability": nothing is acknowledged
//! as committed before it is fdatasync'd on a majority).
//!
//! Checked two ways:
//! - every acknowledged `strict` decision (and every acknowledged limit change) is in the
//!   committed log, applied once, with the very outcome the client saw (a `fast` answer may be
//!   lost with its leader: that is [`super::fast_bound`]'s business);
//! - after healing and recovery, the final leader's counters reflect what was acknowledged:
//!   for every key of `strict-rpw`, `remaining ≤ capacity − acknowledged admitted hits` in the
//!   leader's current window (probed on a copy of its engine).
//!
//! A call that timed out or failed is "unknown": it may or may not be in the log, and is not
//! held against anything.

use tally_server::engine::limits::LimitSet;
use tally_server::engine::{Command, Descriptor, Engine, Mode, Outcome, RateLimitCommand};

use crate::history::{CallResult, Evidence, Violation};
use crate::invariants::counting::{by_window, window_start};
use crate::replay::Replay;
use crate::workload::{DOMAIN, checked_spec};

pub const NAME: &str = "acked_not_lost";

fn is_fast(o: &Outcome) -> bool {
    matches!(o, Outcome::RateLimit(d) if d.fast)
}

pub fn check(ev: &Evidence, replay: &Replay) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut push = |message: String| {
        out.push(Violation {
            invariant: NAME,
            message,
        })
    };
    for call in &ev.calls {
        let CallResult::Acked(outcome) = &call.result else {
            continue;
        };
        match &call.command {
            Command::RateLimit(_) => match replay.committed.get(&call.id) {
                Some(c) if !is_fast(outcome) && c.outcome != *outcome => push(format!(
                    "call #{} (sent to n{} at {}ms): acknowledged {:?} but committed at index {} as {:?}",
                    call.id, call.node, call.sent_ms, outcome, c.index, c.outcome
                )),
                None if !is_fast(outcome) => push(format!(
                    "call #{} (sent to n{} at {}ms, acknowledged at {}ms): acknowledged {:?} but not in the committed log",
                    call.id, call.node, call.sent_ms, call.done_ms, outcome
                )),
                _ => {}
            },
            Command::ReplaceLimits(set) if !replay.limit_sets.iter().any(|(_, s)| s == set) => {
                push(format!(
                    "call #{}: limit change acknowledged as {:?} but not in the committed log",
                    call.id, outcome
                ));
            }
            _ => {}
        }
    }
    for rid in &replay.duplicates {
        push(format!("call #{rid} was applied more than once"));
    }
    out.extend(check_final_counters(ev, replay));
    out
}

/// The final leader's `strict-rpw` counters against the admissions acknowledged in its
/// current window.
fn check_final_counters(ev: &Evidence, replay: &Replay) -> Vec<Violation> {
    let Some(leader) = ev.finals.iter().find(|f| f.is_leader) else {
        return Vec::new();
    };
    let mut engine = match Engine::restore(&leader.snapshot) {
        Ok(e) => e,
        Err(e) => {
            return vec![Violation {
                invariant: NAME,
                message: format!(
                    "final leader n{}'s snapshot does not restore: {e}",
                    leader.node
                ),
            }];
        }
    };
    let limit = ev.bounds.strict;
    let now = engine.last_ms();
    let window = window_start(now, limit.window_ms);
    // Only `strict-rpw` in force (its counters are kept: same identity), so the probe's
    // `remaining` is that limit's.
    let only = LimitSet {
        limits: vec![checked_spec("probe", limit)],
    };
    engine.apply(now, &[Command::ReplaceLimits(only)]);
    let mut out = Vec::new();
    for ((key, w), count) in by_window(ev, replay, &limit, |_| true) {
        if w != window {
            continue;
        }
        let probe = Command::RateLimit(RateLimitCommand {
            domain: DOMAIN.into(),
            descriptors: vec![Descriptor {
                entries: vec![(limit.entry_key.into(), key.clone())],
                hits: None,
                limit_override: None,
            }],
            hits: 1,
            mode: Mode::CheckOnly,
        });
        let remaining = match engine.apply(now, &[probe]).remove(0) {
            Outcome::RateLimit(d) => d.statuses[0].remaining,
            other => {
                out.push(Violation {
                    invariant: NAME,
                    message: format!("probe of {key} answered {other:?}"),
                });
                continue;
            }
        };
        let allowed = limit.capacity.saturating_sub(count.hits);
        if remaining > allowed {
            out.push(Violation {
                invariant: NAME,
                message: format!(
                    "final leader n{} (applied {:?}, time {now}): {}={key} has {remaining} remaining, but {} hits were acknowledged in window {window} (capacity {}): acknowledged admissions lost (calls {:?})",
                    leader.node, leader.applied, limit.entry_key, count.hits, limit.capacity, count.calls
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
    fn a_clean_history_passes() {
        let mut h = Hist::new();
        h.strict_admitted("s1", 1, 10_100);
        let id = h.strict_admitted("s2", 1, 10_200);
        h.make_unknown(id);
        h.final_now(1, true);
        let v = check(&h.ev(), &h.replay());
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn an_acknowledged_request_missing_from_the_log_fails() {
        let mut h = Hist::new();
        // Acknowledged, but its entry was never committed and got overwritten.
        h.request(rl(STRICT_KEY, "s1", None), 10_100, false);
        h.new_term();
        h.strict_admitted("s2", 1, 10_200);
        let v = check(&h.ev(), &h.replay());
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].message.contains("not in the committed log"),
            "{}",
            v[0]
        );
    }

    #[test]
    fn an_outcome_other_than_the_committed_one_fails() {
        let mut h = Hist::new();
        for _ in 0..4 {
            h.strict_admitted("s1", 1, 10_100); // the 4th is OverLimit in the log
        }
        let v = check(&h.ev(), &h.replay());
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("committed at index"), "{}", v[0]);
    }

    #[test]
    fn a_leader_that_forgot_acknowledged_hits_fails() {
        let mut h = Hist::new();
        h.strict_admitted("s1", 1, 10_100);
        let before = h.engine.snapshot();
        h.strict_admitted("s1", 1, 10_200);
        h.finals.push(FinalState {
            node: 1,
            is_leader: true,
            running: true,
            applied: h.committed_upto,
            snapshot: before,
            archive: Default::default(),
        });
        let v = check(&h.ev(), &h.replay());
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("2 remaining"), "{}", v[0]);
    }

    #[test]
    fn a_request_applied_twice_fails() {
        let mut h = Hist::new();
        let id = h.strict_admitted("s1", 1, 10_100);
        let again = h.calls.iter().find(|c| c.id == id).unwrap().command.clone();
        h.append(10_150, vec![again], true);
        let v = check(&h.ev(), &h.replay());
        assert!(
            v.iter().any(|v| v.message.contains("more than once")),
            "{v:?}"
        );
    }
}
