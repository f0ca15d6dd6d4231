//! Breaking election livelocks: a leaderless node starts elections at jittered times.
//!
//! openraft 0.9 draws a node's election timeout once, when its Raft starts, not per election.
//! Two candidates whose timers were reset together then stay in step for as long as both
//! processes live. The simulator found clusters that never elected a leader again: in a
//! four-voter configuration (a member being replaced) with two voters behind, the stale
//! candidate always started first and took the vote of the staler one, the up-to-date candidate
//! took the other, and every term split 2–2 (seeds in sim/README.md).
//!
//! Raft's liveness rests on a fresh random timeout per election. This restores it: once a node
//! has seen no leader for [`STALL_ELECTIONS`] election timeouts, it also starts elections
//! itself (openraft's own timer goes on), each after a delay drawn anew for every term from a
//! hash of (node id, term) — different per node and per term, and deterministic, so a
//! simulated run replays exactly. (Turning openraft's own elections off meanwhile was measured
//! worse: 8 of 1,000 simulated seeds over the liveness bound against 2.)
//!
//! A node that was refused a vote by a peer with a greater log recently (within twice the
//! maximum election timeout, as openraft's own penalty) campaigns not at all meanwhile: no
//! nudges, and openraft's own elections are switched off (`runtime_config().elect(false)`)
//! until the window passes or a leader is known. It cannot win, and its campaigns would take
//! the votes the up-to-date candidates need — in effect the part of a pre-vote round that
//! matters here. (Only skipping the nudges left 6 of 10,000 simulated seeds without a timely
//! leader mid-replacement; openraft's own timer kept the stale candidates campaigning.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use openraft::ServerState;
use tokio::time::Instant;

use super::RaftTimings;
use super::raft_types::{NodeId, Raft};

/// What the Raft network saw that elections care about (see [`super::retired_peers`]).
#[derive(Debug, Default)]
pub struct Signals {
    greater_log_at: parking_lot::Mutex<Option<Instant>>,
}

impl Signals {
    /// A peer refused this node's vote request and has a greater log.
    pub fn saw_greater_log(&self) {
        *self.greater_log_at.lock() = Some(Instant::now());
    }

    pub(crate) fn greater_log_within(&self, window: Duration) -> bool {
        self.greater_log_at
            .lock()
            .is_some_and(|at| at.elapsed() < window)
    }
}

/// Election timeouts without a leader before the node starts nudging.
pub const STALL_ELECTIONS: u32 = 2;

/// The delay before this node's next nudge at `term`: in `[election_min, 2 × election_max)`.
pub fn jitter(id: NodeId, term: u64, t: &RaftTimings) -> Duration {
    let span = (2 * t.election_max_ms)
        .saturating_sub(t.election_min_ms)
        .max(1);
    let h = splitmix64(id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ term);
    Duration::from_millis(t.election_min_ms + h % span)
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Runs until the node stops: nudges elections while no leader is known.
pub async fn nudge(
    raft: Raft,
    id: NodeId,
    timings: RaftTimings,
    signals: Arc<Signals>,
    stopping: Arc<AtomicBool>,
) {
    let stall = Duration::from_millis(timings.election_max_ms) * STALL_ELECTIONS;
    let behind_window = Duration::from_millis(2 * timings.election_max_ms);
    let tick = Duration::from_millis(timings.heartbeat_ms.max(1));
    let mut leaderless_since: Option<Instant> = None;
    let mut next_nudge: Option<Instant> = None;
    let mut own_elections = true;
    loop {
        tokio::time::sleep(tick).await;
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let (led, running, term) = {
            let m = raft.metrics();
            let m = m.borrow();
            let led = m.current_leader.is_some() || m.state == ServerState::Leader;
            (led, m.running_state.is_ok(), m.current_term)
        };
        if !running {
            return;
        }
        // Behind a peer that refused us: no campaigns at all (ours or openraft's) for a while,
        // so the votes go to the candidates that can win.
        let behind = !led && signals.greater_log_within(behind_window);
        if behind == own_elections {
            own_elections = !behind;
            raft.runtime_config().elect(own_elections);
        }
        if led {
            leaderless_since = None;
            next_nudge = None;
            continue;
        }
        let now = Instant::now();
        let since = *leaderless_since.get_or_insert(now);
        if now - since < stall || behind {
            continue;
        }
        let at = *next_nudge.get_or_insert_with(|| now + jitter(id, term, &timings));
        if now < at {
            continue;
        }
        next_nudge = None;
        if raft.trigger().elect().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_range_and_differs_by_node_and_term() {
        let t = RaftTimings::default();
        let mut seen = std::collections::BTreeSet::new();
        for id in 1..=5 {
            for term in 0..50 {
                let d = jitter(id, term, &t).as_millis() as u64;
                assert!(
                    (t.election_min_ms..2 * t.election_max_ms).contains(&d),
                    "{d}"
                );
                seen.insert(d);
            }
        }
        // 250 draws over a 900 ms span: a fixed or per-node-only delay would give ≤ 5 values.
        assert!(seen.len() > 100, "{}", seen.len());
        assert_ne!(jitter(1, 7, &t), jitter(2, 7, &t));
        assert_ne!(jitter(1, 7, &t), jitter(1, 8, &t));
    }
}
