//! The Raft type configuration: what a log entry carries and what applying it returns.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::engine::{Command, Outcome};

/// Node ids are never reused: a removed node's id stays retired.
pub type NodeId = u64;

/// A log entry's payload: a batch of engine commands and the time the leader stamped it with
/// (`max(last_stamp, now)`, Unix ms). Every replica applies the batch at that time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub stamp_ms: i64,
    pub commands: Vec<Command>,
}

/// What applying one log entry returned: one outcome per command of its batch (none for
/// blank and membership entries).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchOutcome {
    pub outcomes: Vec<Outcome>,
}

openraft::declare_raft_types!(
    /// Tally's Raft types (openraft 0.9).
    pub TypeConfig:
        D = Batch,
        R = BatchOutcome,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
