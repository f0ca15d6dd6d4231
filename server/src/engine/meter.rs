//! Metering state (skeleton, being filled in).

use super::usage::*;
use super::{CommandError, Engine, Outcome};

#[derive(Default)]
pub(crate) struct Meter {}

impl Engine {
    pub(crate) fn apply_usage(&mut self, _command: &super::Command, _now_ms: i64) -> Result<Outcome, CommandError> {
        Err(CommandError::invalid("command", "metering is not built yet"))
    }

    /// The price catalog in force and its version (0 before any was set).
    pub fn prices(&self) -> (u64, &PriceCatalog) {
        unimplemented!()
    }

    /// The quotas in force, in set order.
    pub fn quotas(&self) -> impl Iterator<Item = &QuotaSpec> {
        std::iter::empty()
    }

    /// Sums of usage in a range, grouped and bucketed (see [`UsageQuery`]).
    pub fn query_usage(&self, _query: &UsageQuery) -> Result<Vec<UsageRow>, ReadError> {
        unimplemented!()
    }

    /// Up to `max` usage records with `seq > after_seq`, in seq order. `PastRetention` when
    /// records after `after_seq` were already dropped (the cursor is too old).
    pub fn export_usage(&self, _after_seq: u64, _max: usize) -> Result<Vec<UsageRecord>, ReadError> {
        unimplemented!()
    }

    /// Every quota counter that applies to `subject` (with `subscription`), with its standing
    /// as of the last batch; quotas keyed only by subject/subscription that have no counter
    /// yet appear with nothing used.
    pub fn usage_overview(&self, _subject: &str, _subscription: &str) -> Vec<QuotaStanding> {
        unimplemented!()
    }

    /// Up to `max` retained events with `seq > after_seq`, oldest first.
    pub fn events_after(&self, _after_seq: u64, _max: usize) -> Vec<Event> {
        unimplemented!()
    }

    /// Seq of the last usage record written (0 before any).
    pub fn last_usage_seq(&self) -> u64 {
        unimplemented!()
    }

    /// Seq of the last event (0 before any).
    pub fn last_event_seq(&self) -> u64 {
        unimplemented!()
    }
}
