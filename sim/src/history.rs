//! What the oracle knows at the end of a seed: the clients' calls and what they saw, samples
//! of every replica's state, the log as created, and the end state. The invariant checkers
//! are pure functions of this [`Evidence`] (so each can be tested on a hand-made history).

use tally_server::engine::usage::UsageRecord;
use tally_server::engine::{Command, Outcome};
use tally_server::node::raft_types::NodeId;

use crate::audit::Created;
use crate::workload::CheckedLimit;

/// What a client learnt from one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallResult {
    /// An outcome was returned: the client was told this happened.
    Acked(Outcome),
    /// Timed out or failed: it may or may not have happened. Never "failed".
    Unknown(String),
}

#[derive(Clone, Debug)]
pub struct Call {
    /// Also the request's `rid`.
    pub id: u64,
    /// The node the client sent it to.
    pub node: NodeId,
    /// The node (and its incarnation) that decided it: `node`, or the leader it was forwarded
    /// to.
    pub served_by: (NodeId, u64),
    pub sent_ms: u64,
    pub done_ms: u64,
    pub command: Command,
    pub result: CallResult,
}

/// One look at a replica's applied state.
#[derive(Clone, Debug)]
pub struct Sample {
    pub node: NodeId,
    /// Counts the node's restarts: batch time is monotone within one incarnation.
    pub incarnation: u32,
    pub at_ms: u64,
    /// The last applied log index its Raft metrics reported just before the engine was read.
    /// The engine may be ahead of it (metrics are published after apply), never behind.
    pub applied_floor: Option<u64>,
    pub snapshot_hash: u64,
    pub last_ms: i64,
}

/// A node that reported itself leader of a term. openraft 0.9 restarts a crashed leader as
/// leader of the same term, so one term can have several leaderships: (term, node, epoch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaderSeen {
    pub at_ms: u64,
    pub node: NodeId,
    pub term: u64,
    /// The node's incarnation (disk epoch: 0 at first start, +1 per crash).
    pub epoch: u64,
}

/// What happened after every fault was healed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Liveness {
    pub healed_at_ms: u64,
    /// When every live node first agreed on one leader that reported itself leader.
    pub leader_at_ms: Option<u64>,
    /// When a probe request was first acknowledged.
    pub request_ok_at_ms: Option<u64>,
}

/// A node whose Raft stopped on its own (openraft `Fatal`), not because the simulator crashed
/// it. `tallyd` exits on it (`Node::raft_failed`) and its service manager restarts it; the
/// simulator plays that manager.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftStopped {
    pub at_ms: u64,
    pub node: NodeId,
    pub epoch: u64,
    pub error: String,
    /// Whether the node itself reported the failure (`Node::raft_failure`) when it was seen.
    /// Unreported, the process would live on with a dead Raft.
    pub reported: bool,
}

/// One node's state at the end, after quiescence.
#[derive(Clone, Debug)]
pub struct FinalState {
    pub node: NodeId,
    pub is_leader: bool,
    /// False when its Raft stopped on its own: its metrics may lag its engine.
    pub running: bool,
    pub applied: Option<u64>,
    pub snapshot: Vec<u8>,
    /// Its usage archive, read from the start (`Node::usage_records`, page by page).
    pub archive: ArchiveRead,
}

/// What a node's usage archive answered when read from seq 0 to its end, a page at a time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArchiveRead {
    /// Every record it returned, in the order returned.
    pub records: Vec<UsageRecord>,
    /// The ranges it refused as not held here (`ArchiveError::NotHeld { from, to }`), in
    /// order; the read went on after each.
    pub not_held: Vec<(u64, u64)>,
    /// Any other refusal, which ended the read.
    pub error: Option<String>,
}

impl ArchiveRead {
    /// A faithful archive of `records` (for hand-made histories).
    pub fn of(records: Vec<UsageRecord>) -> ArchiveRead {
        ArchiveRead {
            records,
            ..ArchiveRead::default()
        }
    }
}

/// Bounds the invariants hold the run to.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub strict: CheckedLimit,
    pub fast: CheckedLimit,
    pub max_batch_commands: usize,
    pub max_inflight_batches: usize,
    /// After healing, a leader must be elected within this (simulated ms)...
    pub leader_within_ms: u64,
    /// ...and a request must succeed within this.
    pub request_within_ms: u64,
    pub max_counters: u64,
}

#[derive(Clone, Debug)]
pub struct Evidence {
    pub bounds: Bounds,
    pub calls: Vec<Call>,
    pub samples: Vec<Sample>,
    pub leaders: Vec<LeaderSeen>,
    /// Every log entry ever created, by index then term.
    pub created: Vec<Created>,
    /// The committed log, by index, as the nodes recorded it when they committed.
    pub committed: Vec<Created>,
    /// Nodes that committed different entries at one index.
    pub conflicts: Vec<String>,
    pub liveness: Option<Liveness>,
    pub finals: Vec<FinalState>,
    pub stopped: Vec<RaftStopped>,
}

/// A broken promise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub invariant: &'static str,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] {}", self.invariant, self.message)
    }
}

/// A 64-bit digest of bytes (`DefaultHasher::new()` has fixed keys: the same in every run).
pub fn digest(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}
