//! Plain statistics of the node's internals, kept for [`crate::metrics`] to export (the node
//! knows nothing of OpenTelemetry): how many commands each batch held (proposed by this node
//! as leader, applied to this replica), how long the Raft log's flushes took, and the
//! snapshots built and installed (bytes and time).
//!
//! Each is a [`Distribution`]: a bounded hdrhistogram (its memory is fixed when it is made,
//! whatever is recorded; a value past its top is counted at the top) and the exact sum, behind
//! one mutex taken once per recorded value: once per batch, flush or snapshot, never per
//! command. Recording allocates nothing. Values are cumulative since the node started; a
//! reader takes a copy ([`Distribution::snapshot`]) and keeps its own previous copy to see
//! what is new (`subtract`, or `count_at` per value).

use std::time::Duration;

use hdrhistogram::Histogram;
use parking_lot::Mutex;

use super::MAX_BATCH_COMMANDS;

/// Precision of the batch-size histograms: 3 significant digits, so every value below 2048
/// (every batch with the default `--batch-max-commands` of 512) is held exactly.
const BATCH_SIGFIG: u8 = 3;
/// Precision of the time and byte histograms: 2 significant digits (within 1 %).
const COARSE_SIGFIG: u8 = 2;
/// Highest nanoseconds told apart (about 18 minutes); longer ones count at it.
const MAX_NANOS: u64 = 1 << 40;
/// Highest bytes told apart (1 TiB); larger counts at it.
const MAX_BYTES: u64 = 1 << 40;

/// Values recorded so far: a bounded histogram and their exact sum.
pub struct Distribution {
    inner: Mutex<Recorded>,
}

/// A copy of a [`Distribution`].
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Every value recorded (clamped to the histogram's range). `len()` is the count.
    pub histogram: Histogram<u64>,
    /// The exact sum of the values recorded (unclamped, saturating at `u64::MAX`).
    pub sum: u64,
}

impl Recorded {
    /// How many values were recorded.
    pub fn count(&self) -> u64 {
        self.histogram.len()
    }
}

impl Distribution {
    /// Values from 0 to `highest` told apart to `sigfig` significant digits.
    fn new(highest: u64, sigfig: u8) -> Distribution {
        let histogram = Histogram::new_with_bounds(1, highest, sigfig)
            .expect("constant bounds are valid (highest >= 2, sigfig <= 5)");
        Distribution {
            inner: Mutex::new(Recorded { histogram, sum: 0 }),
        }
    }

    /// Records one value (a value past the top is counted at the top; the sum is exact).
    pub fn record(&self, value: u64) {
        let mut r = self.inner.lock();
        r.histogram.saturating_record(value);
        r.sum = r.sum.saturating_add(value);
    }

    /// Records a duration, in nanoseconds.
    pub fn record_duration(&self, elapsed: Duration) {
        self.record(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
    }

    /// How many values were recorded (cheaper than a copy).
    pub fn count(&self) -> u64 {
        self.inner.lock().histogram.len()
    }

    /// A copy of everything recorded so far.
    pub fn snapshot(&self) -> Recorded {
        self.inner.lock().clone()
    }
}

/// Snapshots of one kind (built here, or installed from the leader).
pub struct SnapshotStats {
    /// Bytes of each snapshot (the encoded file: engine state, last log id, membership).
    pub bytes: Distribution,
    /// Nanoseconds each took: to build (serialize, sync the usage archive, write and fsync the
    /// file), or to install (decode, restore the engine, write and fsync the file, reconcile
    /// the usage archive).
    pub nanos: Distribution,
}

impl SnapshotStats {
    fn new() -> SnapshotStats {
        SnapshotStats {
            bytes: Distribution::new(MAX_BYTES, COARSE_SIGFIG),
            nanos: Distribution::new(MAX_NANOS, COARSE_SIGFIG),
        }
    }
}

/// Everything [`super::Node::stats`] reports. One per node, shared by its proposer, log store
/// and state machine.
pub struct NodeStats {
    /// Commands in each batch this node proposed to the Raft log as leader (one batch is one
    /// log entry; a follower forwards its commands and proposes nothing).
    pub proposed_batch_commands: Distribution,
    /// Commands in each batch entry applied to this replica's engine (every replica; a
    /// restarted node applies again the log after its snapshot).
    pub applied_batch_commands: Distribution,
    /// Nanoseconds from a log append handed to raft-log's flush worker to its `fdatasync`
    /// done (waiting behind a sync in progress, the group-commit wait, the write and the
    /// sync): one per append, and one `fdatasync` may serve many (group commit). Only the
    /// production log store records it (not the simulator's).
    pub log_flush_nanos: Distribution,
    /// Snapshots this node built from its own state.
    pub snapshots_built: SnapshotStats,
    /// Snapshots this node installed from a leader.
    pub snapshots_installed: SnapshotStats,
}

impl Default for NodeStats {
    fn default() -> Self {
        NodeStats::new()
    }
}

impl NodeStats {
    pub fn new() -> NodeStats {
        let batch = || Distribution::new(MAX_BATCH_COMMANDS as u64, BATCH_SIGFIG);
        NodeStats {
            proposed_batch_commands: batch(),
            applied_batch_commands: batch(),
            log_flush_nanos: Distribution::new(MAX_NANOS, COARSE_SIGFIG),
            snapshots_built: SnapshotStats::new(),
            snapshots_installed: SnapshotStats::new(),
        }
    }
}

impl std::fmt::Debug for NodeStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeStats").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (value, count) of every value recorded, as a reader sees them.
    fn values(r: &Recorded) -> Vec<(u64, u64)> {
        r.histogram
            .iter_recorded()
            .map(|v| {
                let at = r.histogram.median_equivalent(v.value_iterated_to());
                (at, v.count_at_value())
            })
            .collect()
    }

    #[test]
    fn batch_sizes_below_2048_are_held_exactly() {
        let s = NodeStats::new();
        for n in [1, 1, 3, 512, 2047] {
            s.proposed_batch_commands.record(n);
        }
        let r = s.proposed_batch_commands.snapshot();
        assert_eq!(r.count(), 5);
        assert_eq!(r.sum, 2564);
        assert_eq!(values(&r), vec![(1, 2), (3, 1), (512, 1), (2047, 1)]);
        // The others are untouched.
        assert_eq!(s.applied_batch_commands.snapshot().count(), 0);
        assert_eq!(s.snapshots_built.bytes.snapshot().count(), 0);
    }

    #[test]
    fn values_past_the_top_count_at_the_top_and_the_sum_stays_exact() {
        let d = Distribution::new(MAX_BATCH_COMMANDS as u64, BATCH_SIGFIG);
        d.record(10_000_000);
        d.record(u64::MAX);
        d.record(5);
        let r = d.snapshot();
        assert_eq!(r.count(), 3);
        assert_eq!(r.sum, u64::MAX, "saturates");
        assert!(r.histogram.max() >= MAX_BATCH_COMMANDS as u64);
        assert!(r.histogram.max() <= 2 * MAX_BATCH_COMMANDS as u64);
    }

    #[test]
    fn durations_are_nanoseconds_within_one_percent() {
        let d = Distribution::new(MAX_NANOS, COARSE_SIGFIG);
        d.record_duration(Duration::from_micros(1_234));
        d.record_duration(Duration::MAX); // counted at the top, never a panic
        let r = d.snapshot();
        assert_eq!(r.count(), 2);
        let (first, n) = values(&r)[0];
        assert_eq!(n, 1);
        assert!(first.abs_diff(1_234_000) <= 12_340, "{first}");
        assert_eq!(r.sum, u64::MAX);
    }

    #[test]
    fn a_snapshot_is_a_copy_and_later_values_are_new_against_it() {
        let d = Distribution::new(MAX_BATCH_COMMANDS as u64, BATCH_SIGFIG);
        d.record(2);
        let before = d.snapshot();
        d.record(2);
        d.record(7);
        let after = d.snapshot();
        assert_eq!(before.count(), 1, "the copy does not change");
        let mut new = after.histogram.clone();
        new.subtract(&before.histogram).expect("same bounds");
        assert_eq!(new.len(), 2);
        assert_eq!(new.count_at(2), 1);
        assert_eq!(new.count_at(7), 1);
        assert_eq!(after.sum - before.sum, 9);
    }

    #[test]
    fn concurrent_recorders_lose_nothing() {
        let s = std::sync::Arc::new(NodeStats::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        s.applied_batch_commands.record(i % 10);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let r = s.applied_batch_commands.snapshot();
        assert_eq!(r.count(), 4000);
        assert_eq!(r.sum, 4 * 100 * 45);
    }
}
