//! Membership changes, decided on the leader: add a learner, promote it, remove a member.
//!
//! The cluster API (`tally.v1.Cluster`) and the simulator call these, so both exercise the same
//! path. A removed node's id is retired through the log first (`Command::RetireNode`): every
//! replica refuses it from then on, and the node itself, having applied its own retirement,
//! refuses to start from that data directory again.

use std::collections::BTreeSet;

use openraft::{BasicNode, ChangeMembers};

use super::raft_types::NodeId;
use super::{Node, NodeError};
use crate::engine::{Command, Outcome};

/// Why a membership change was not made.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error(
        "node id {0} was removed from this cluster and is never reused; give the node a new id and an empty data directory"
    )]
    Retired(NodeId),
    #[error("addr: must not be empty")]
    EmptyAddr,
    #[error("id: {0} is not a valid node id (1 to 2^64 - 2)")]
    BadId(NodeId),
    #[error(transparent)]
    Node(#[from] NodeError),
    /// openraft refused or failed the change (not the leader, a change already in progress,
    /// an unknown node...).
    #[error("{0}")]
    Raft(String),
    /// The engine answered a retirement with another kind of outcome: a bug.
    #[error("unexpected engine outcome: {0}")]
    Unexpected(String),
}

impl Node {
    /// Adds `id` at `addr` as a learner; answers once it has caught up with the log.
    pub async fn add_learner(&self, id: NodeId, addr: &str) -> Result<(), MembershipError> {
        if addr.is_empty() {
            return Err(MembershipError::EmptyAddr);
        }
        if id == 0 || id == super::log_store::NO_VOTE {
            return Err(MembershipError::BadId(id));
        }
        self.refuse_retired(id).await?;
        self.raft()
            .add_learner(id, BasicNode::new(addr), true)
            .await
            .map_err(raft_error)?;
        Ok(())
    }

    /// Makes the learner `id` a voter.
    pub async fn promote(&self, id: NodeId) -> Result<(), MembershipError> {
        self.refuse_retired(id).await?;
        self.raft()
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), true)
            .await
            .map_err(raft_error)?;
        Ok(())
    }

    /// Retires `id`, then takes it out of the membership. Safe to repeat after a failure
    /// halfway: retiring twice is a no-op.
    pub async fn remove(&self, id: NodeId) -> Result<(), MembershipError> {
        // Retired first, while the node still receives the log: it applies its own
        // retirement and will refuse to start from that state again.
        match self.propose(Command::RetireNode { node_id: id }).await? {
            Outcome::NodeRetired { .. } => {}
            other => return Err(MembershipError::Unexpected(format!("{other:?}"))),
        }
        let is_voter = {
            let m = self.raft().metrics();
            let m = m.borrow();
            m.membership_config
                .membership()
                .voter_ids()
                .any(|v| v == id)
        };
        let change = if is_voter {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.raft()
            .change_membership(change, false)
            .await
            .map_err(raft_error)?;
        Ok(())
    }

    /// Refuses an id that left the cluster.
    pub async fn refuse_retired(&self, id: NodeId) -> Result<(), MembershipError> {
        if self.read(|e| e.is_retired(id)).await? {
            return Err(MembershipError::Retired(id));
        }
        Ok(())
    }
}

fn raft_error(e: impl std::fmt::Display) -> MembershipError {
    MembershipError::Raft(e.to_string())
}
