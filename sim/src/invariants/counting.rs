//! Shared counting for the capacity invariants: acknowledged admissions per counter and
//! window, placed in the window of the time the engine applied them.

use std::collections::BTreeMap;

use tally_server::engine::{Code, Command, Decision, Mode, Outcome, RateLimitCommand};

use crate::history::{Call, CallResult, Evidence};
use crate::replay::Replay;
use crate::workload::{CheckedLimit, hits_by_value};

/// An acknowledged admission (ShouldRateLimit answered OK).
pub struct Admission<'a> {
    pub call: &'a Call,
    pub command: &'a RateLimitCommand,
    pub decision: &'a Decision,
}

/// Every acknowledged `Enforce` request that was admitted.
pub fn admissions(ev: &Evidence) -> Vec<Admission<'_>> {
    ev.calls
        .iter()
        .filter_map(|call| match (&call.command, &call.result) {
            (Command::RateLimit(cmd), CallResult::Acked(Outcome::RateLimit(d)))
                if cmd.mode == Mode::Enforce && d.code == Code::Ok =>
            {
                Some(Admission {
                    call,
                    command: cmd,
                    decision: d,
                })
            }
            _ => None,
        })
        .collect()
}

/// Hits and calls in one counter's window.
#[derive(Default, Debug)]
pub struct WindowCount {
    pub hits: u64,
    pub calls: Vec<u64>,
}

/// Acknowledged admitted hits on `limit`'s counters by (counter value, window start ms),
/// for the admissions found in the committed log; `keep` selects which admissions count.
pub fn by_window(
    ev: &Evidence,
    replay: &Replay,
    limit: &CheckedLimit,
    keep: impl Fn(&Admission<'_>) -> bool,
) -> BTreeMap<(String, i64), WindowCount> {
    let mut out: BTreeMap<(String, i64), WindowCount> = BTreeMap::new();
    for a in admissions(ev) {
        if !keep(&a) {
            continue;
        }
        let Some(c) = replay.committed.get(&a.call.id) else {
            continue;
        };
        let window = window_start(c.applied_ms, limit.window_ms);
        for (value, hits) in hits_by_value(a.command, limit.entry_key) {
            let w = out.entry((value, window)).or_default();
            w.hits += hits;
            w.calls.push(a.call.id);
        }
    }
    out
}

/// The start of the fixed window (aligned to the epoch) holding `ms`.
pub fn window_start(ms: i64, window_ms: u64) -> i64 {
    let w = window_ms as i64;
    ms.div_euclid(w) * w
}
