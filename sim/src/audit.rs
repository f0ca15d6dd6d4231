//! The log as the oracle sees it, from outside Raft: every entry any node ever created, and
//! the committed chain.
//!
//! - **Created**: each simulated log store copies every appended entry here, keyed by index and
//!   leader id (term, node). One log id can name two entries over time: openraft 0.9 restarts a
//!   crashed leader as leader of the same term when its durable vote is committed for itself
//!   (`Engine::startup`), and if the crash lost its unflushed tail it appends new entries under
//!   the lost entries' log ids. That is safe — openraft replicates an entry only after the
//!   leader's own flush, so the lost ones never left the node — and the latest entry recorded
//!   for a log id is kept, with the incarnation (disk epoch) of the leader that created it.
//! - **Committed**: openraft calls `save_committed(upto)` on every node right before applying
//!   up to `upto`; at that moment the node's log up to `upto` *is* the committed log (log
//!   matching). The store records those entries here. Two nodes recording different entries at
//!   one committed index is a Raft safety violation, kept in [`Audit::conflicts`].
//!
//! (The committed entry at an index is *not* simply the highest-term one created there: in the
//! Raft paper's figure-8 situation a lower-term entry is committed after a higher-term leader
//! wrote, and lost, another entry at the same index. The simulator found this the hard way.)

use std::collections::BTreeMap;
use std::sync::Arc;

use openraft::{CommittedLeaderId, EntryPayload};
use parking_lot::Mutex;
use tally_server::node::raft_types::{Batch, Entry, NodeId};

/// One log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Created {
    pub index: u64,
    pub term: u64,
    /// The leader that created it.
    pub leader: NodeId,
    /// The leader's incarnation (disk epoch) when it created it.
    pub epoch: u64,
    /// `None` for blank and membership entries (they do not touch the engine).
    pub batch: Option<Batch>,
}

/// Per index: the entries created there, by leader id, with the creator's epoch.
/// By index, then by the log id's leader part (the term: one leader per term), the node that
/// created the entry, its incarnation (0 when first seen on a follower) and the batch.
type CreatedAt = BTreeMap<u64, BTreeMap<CommittedLeaderId<NodeId>, (NodeId, u64, Option<Batch>)>>;

#[derive(Default)]
struct Inner {
    created: CreatedAt,
    committed: BTreeMap<u64, (CommittedLeaderId<NodeId>, NodeId, Option<Batch>)>,
    conflicts: Vec<String>,
}

#[derive(Clone, Default)]
pub struct Audit(Arc<Mutex<Inner>>);

fn batch_of(e: &Entry) -> Option<Batch> {
    match &e.payload {
        EntryPayload::Normal(b) => Some(b.clone()),
        EntryPayload::Blank | EntryPayload::Membership(_) => None,
    }
}

impl Audit {
    /// `node` (in incarnation `epoch`) appended `entries` to its log.
    pub fn record_append(&self, node: NodeId, epoch: u64, entries: &[Entry]) {
        let mut inner = self.0.lock();
        for e in entries {
            let by_leader = inner.created.entry(e.log_id.index).or_default();
            let batch = batch_of(e);
            match by_leader.get_mut(&e.log_id.leader_id) {
                // A follower's copy: the creator's epoch stays.
                Some((_, _, existing)) if *existing == batch => {}
                // The log id reused for a new entry (a leader restarted in its own term).
                Some(slot) => *slot = (node, epoch, batch),
                None => {
                    // The leader's own append always comes first: whoever appends an entry
                    // first created it.
                    by_leader.insert(e.log_id.leader_id, (node, epoch, batch));
                }
            }
        }
    }

    /// `node` is about to apply up to a committed index: `entries` are its log's entries up to
    /// it (those it still holds).
    pub fn record_committed<'a>(&self, node: NodeId, entries: impl Iterator<Item = &'a Entry>) {
        let mut inner = self.0.lock();
        for e in entries {
            let batch = batch_of(e);
            match inner.committed.get(&e.log_id.index) {
                Some((leader, first, existing)) => {
                    if *leader != e.log_id.leader_id || *existing != batch {
                        let message = format!(
                            "index {}: n{node} committed {} but n{first} committed {}{}",
                            e.log_id.index,
                            e.log_id.leader_id,
                            leader,
                            if *leader == e.log_id.leader_id {
                                " with other content (a log id reused for another entry)"
                            } else {
                                ""
                            }
                        );
                        inner.conflicts.push(message);
                    }
                }
                None => {
                    inner
                        .committed
                        .insert(e.log_id.index, (e.log_id.leader_id, node, batch));
                }
            }
        }
    }

    /// Every created entry, by index then leader id.
    pub fn created(&self) -> Vec<Created> {
        let inner = self.0.lock();
        let mut out = Vec::new();
        for (index, by_leader) in &inner.created {
            for (leader, (creator, epoch, batch)) in by_leader {
                out.push(Created {
                    index: *index,
                    term: leader.term,
                    leader: *creator,
                    epoch: *epoch,
                    batch: batch.clone(),
                });
            }
        }
        out
    }

    /// The committed chain, by index.
    pub fn committed(&self) -> Vec<Created> {
        let inner = self.0.lock();
        inner
            .committed
            .iter()
            .map(|(index, (leader, _, batch))| Created {
                index: *index,
                term: leader.term,
                leader: inner
                    .created
                    .get(index)
                    .and_then(|by| by.get(leader))
                    .map_or(0, |(creator, _, _)| *creator),
                epoch: 0,
                batch: batch.clone(),
            })
            .collect()
    }

    pub fn conflicts(&self) -> Vec<String> {
        self.0.lock().conflicts.clone()
    }
}
