//! The promises the simulator holds every seed to, one file each. Every checker is a pure
//! function of the [`Evidence`] and its [`Replay`], and each is tested against a hand-made
//! history that breaks it.

pub mod acked_not_lost;
pub mod batch_time;
pub mod counting;
pub mod fast_bound;
pub mod liveness;
pub mod replica_agreement;
pub mod reservation_budget;
pub mod strict_capacity;
pub mod usage_archive_agrees;
pub mod usage_exactly_once;
pub mod usage_log;

use crate::history::{Evidence, Violation};
use crate::replay::Replay;

/// Every invariant, in a fixed order.
pub fn check_all(ev: &Evidence) -> Vec<Violation> {
    check_all_with_coverage(ev).violations
}

/// What [`check_all_with_coverage`] found, with the replay it built (for the stats).
pub struct Checked {
    pub violations: Vec<Violation>,
    pub usage: UsageCoverage,
    pub replay: Replay,
}

/// [`check_all`], and what the metering invariants checked (for the trace and the stats).
pub fn check_all_with_coverage(ev: &Evidence) -> Checked {
    let replay = Replay::build(ev);
    let mut out = replay.problems();
    out.extend(strict_capacity::check(ev, &replay));
    out.extend(fast_bound::check(ev, &replay));
    out.extend(acked_not_lost::check(ev, &replay));
    out.extend(replica_agreement::check(ev, &replay));
    out.extend(batch_time::check(ev, &replay));
    out.extend(liveness::check(ev, &replay));
    let usage = usage_log::UsageLog::build(ev);
    let mut cov = UsageCoverage::default();
    out.extend(usage_exactly_once::check(ev, &usage, &mut cov));
    out.extend(usage_archive_agrees::check(ev, &usage, &mut cov));
    out.extend(reservation_budget::check(ev, &usage, &mut cov));
    Checked {
        violations: out,
        usage: cov,
        replay,
    }
}

/// What the metering invariants checked in one seed: a seed that sent usage and checked
/// nothing is itself a violation (each invariant says where).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageCoverage {
    /// Usage records the committed log produced.
    pub records: u64,
    /// `Recorded` answers clients saw (retries included).
    pub acked_recorded: u64,
    /// Request ids with more than one answer a client saw.
    pub retried_ids: u64,
    /// Acknowledged records found, with their seq and tokens, on a live replica at the end
    /// (one per record and replica).
    pub replica_checks: u64,
    /// Archive records compared with the log's and the engine's (one per record and node).
    pub archive_records: u64,
    /// Reserves of the log admitted, and denied, checked against the quota model.
    pub admitted: u64,
    pub denied: u64,
    /// ...of those admitted, under no hard quota (nothing to check).
    pub unbounded: u64,
    /// Reserves answered while a quota of a shape the model does not follow was in force.
    pub unmodelled: u64,
    /// Reservations the model saw committed, released, and expire.
    pub committed: u64,
    pub released: u64,
    pub expired: u64,
    /// ...of those expired, charged their estimate (`charge_on_expiry`).
    pub charged: u64,
    /// Final quota counters matched against the model (one per counter and replica).
    pub final_counters: u64,
}

impl std::fmt::Display for UsageCoverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} usage records ({} acknowledged answers, {} ids answered more than once; {} found on replicas, {} archived records compared), reserves {} admitted / {} denied ({} committed, {} released, {} expired of which {} charged; {} final counters)",
            self.records,
            self.acked_recorded,
            self.retried_ids,
            self.replica_checks,
            self.archive_records,
            self.admitted,
            self.denied,
            self.committed,
            self.released,
            self.expired,
            self.charged,
            self.final_counters,
        )
    }
}

#[cfg(test)]
pub(crate) mod fixtures;
