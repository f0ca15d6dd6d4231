//! The Raft type configuration: what a log entry carries and what applying it returns.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::engine::{Command, Engine, Outcome};

/// Node ids are never reused: a removed node's id stays retired.
pub type NodeId = u64;

/// A log entry's payload: a batch of engine commands and the time the leader stamped it with
/// (`max(last_stamp, now)`, Unix ms). Every replica applies the batch at that time.
///
/// A leader that answers fast requests as they arrive cuts the batch into parts, one per
/// millisecond of arrival, so no command is decided at a time before it arrived: `later`
/// holds, for each part after the first, the index of its first command and its stamp. Each
/// part is applied as one engine batch, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub stamp_ms: i64,
    pub commands: Vec<Command>,
    pub later: Vec<(u32, i64)>,
}

impl Batch {
    /// A batch of one part.
    pub fn new(stamp_ms: i64, commands: Vec<Command>) -> Batch {
        Batch {
            stamp_ms,
            commands,
            later: Vec::new(),
        }
    }

    /// The parts, in order: (stamp, commands); always at least one. Cut points out of order
    /// or past the end (a damaged entry: peers are trusted, but nothing from the network may
    /// panic) cut nothing there; every replica reads the same entry the same way.
    pub fn parts(&self) -> impl Iterator<Item = (i64, &[Command])> {
        let len = self.commands.len();
        let mut last = 0;
        // A part holds at least one command: a cut at or past the end, or not after the
        // previous cut, is no cut.
        let later = self.later.iter().filter_map(move |&(start, stamp_ms)| {
            let start = start as usize;
            (start > last && start < len).then(|| {
                last = start;
                (start, stamp_ms)
            })
        });
        let mut cuts = std::iter::once((0, self.stamp_ms)).chain(later).peekable();
        std::iter::from_fn(move || {
            let (start, stamp_ms) = cuts.next()?;
            let end = cuts.peek().map_or(len, |c| c.0);
            Some((stamp_ms, &self.commands[start..end]))
        })
    }

    /// Applies every part to `engine`; one outcome per command.
    pub fn apply(&self, engine: &mut Engine) -> Vec<Outcome> {
        self.apply_with(engine, |_| {})
    }

    /// [`Batch::apply`], calling `after_part` with the engine after each part (the state
    /// machine copies the part's usage records to disk there: the engine's tail is trimmed
    /// only when the next part begins).
    pub fn apply_with(
        &self,
        engine: &mut Engine,
        mut after_part: impl FnMut(&Engine),
    ) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(self.commands.len());
        for (stamp_ms, commands) in self.parts() {
            outcomes.extend(engine.apply(stamp_ms, commands));
            after_part(engine);
        }
        outcomes
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(commands: u64, later: Vec<(u32, i64)>) -> Batch {
        let commands = (0..commands)
            .map(|node_id| Command::RetireNode { node_id })
            .collect();
        Batch {
            stamp_ms: 10,
            commands,
            later,
        }
    }

    fn shape(b: &Batch) -> Vec<(i64, usize)> {
        b.parts().map(|(ms, c)| (ms, c.len())).collect()
    }

    #[test]
    fn parts_follow_the_cuts() {
        assert_eq!(shape(&batch(3, vec![])), vec![(10, 3)]);
        assert_eq!(
            shape(&batch(5, vec![(2, 11), (4, 12)])),
            vec![(10, 2), (11, 2), (12, 1)]
        );
        assert_eq!(shape(&batch(0, vec![])), vec![(10, 0)]);
    }

    #[test]
    fn damaged_cuts_cut_nothing_and_never_panic() {
        // Out of order, repeated, at 0 and past the end: every command is applied once, in order.
        let b = batch(4, vec![(3, 11), (1, 12), (3, 13), (0, 14), (99, 15)]);
        assert_eq!(shape(&b), vec![(10, 3), (11, 1)]);
        let total: usize = b.parts().map(|(_, c)| c.len()).sum();
        assert_eq!(total, 4);
    }
}
