//! **Promise: per window, admitted ≤ capacity for every `strict` limit, across every leader
//! change** (DESIGN.md, "exact limits across a cluster"; ARCHITECTURE.md, strict
//! acknowledgement).
//!
//! Checked on the `strict-rpw` limit (a fixed window on `skey` that never changes): the hits
//! of every ShouldRateLimit call a client saw admitted, placed in the window of the time the
//! engine applied it (from the committed log), must not exceed the capacity in any window of
//! any key — whichever leader decided them, whatever the leaders' clocks said.

use crate::history::{Evidence, Violation};
use crate::invariants::counting::by_window;
use crate::replay::Replay;

pub const NAME: &str = "strict_capacity";

pub fn check(ev: &Evidence, replay: &Replay) -> Vec<Violation> {
    let limit = ev.bounds.strict;
    let mut out = Vec::new();
    for ((key, window), count) in by_window(ev, replay, &limit, |_| true) {
        if count.hits > limit.capacity {
            out.push(Violation {
                invariant: NAME,
                message: format!(
                    "{}={key} window [{window}, +{}ms): {} hits acknowledged as admitted > capacity {} (calls {:?})",
                    limit.entry_key, limit.window_ms, count.hits, limit.capacity, count.calls
                ),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invariants::fixtures::*;

    #[test]
    fn passes_within_capacity() {
        let mut h = Hist::new();
        for _ in 0..3 {
            h.strict_admitted("s1", 1, 10_100);
        }
        assert!(check(&h.ev(), &h.replay()).is_empty());
    }

    #[test]
    fn fails_when_acknowledged_admissions_exceed_capacity() {
        // Capacity 3 per window: two leaders each admit 2 in the same window (say, a leader
        // change lost the first leader's counts).
        let mut h = Hist::new();
        h.strict_admitted("s1", 1, 10_100);
        h.strict_admitted("s1", 1, 10_200);
        h.new_term();
        h.strict_admitted("s1", 1, 10_300);
        h.strict_admitted("s1", 1, 10_400);
        let v = check(&h.ev(), &h.replay());
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("4 hits"), "{}", v[0]);
    }

    #[test]
    fn windows_are_counted_apart() {
        let mut h = Hist::new();
        h.strict_admitted("s1", 3, 10_100);
        h.strict_admitted("s1", 3, 11_100);
        assert!(check(&h.ev(), &h.replay()).is_empty());
    }
}
