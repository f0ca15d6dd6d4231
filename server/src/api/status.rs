//! The one mapping from Tally's errors to gRPC statuses.

use tonic::Status;

use crate::engine::usage::ReadError;
use crate::engine::{CommandError, Outcome};
use crate::node::NodeError;
use crate::node::membership::MembershipError;

impl From<CommandError> for Status {
    fn from(e: CommandError) -> Status {
        match e {
            CommandError::Invalid { .. } => Status::invalid_argument(e.to_string()),
            CommandError::CounterTableFull { .. } | CommandError::UsageTableFull { .. } => {
                Status::resource_exhausted(e.to_string())
            }
        }
    }
}

impl From<ReadError> for Status {
    fn from(e: ReadError) -> Status {
        match e {
            ReadError::Invalid { .. } => Status::invalid_argument(e.to_string()),
            ReadError::TooLarge { .. } => Status::resource_exhausted(e.to_string()),
            // The message names the first seq (or time) still available.
            ReadError::PastRetention { .. } => Status::out_of_range(e.to_string()),
        }
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        // Every node error means "not decided here, now": Envoy applies its failure mode.
        Status::unavailable(e.to_string())
    }
}

/// A linearizable read asked of a node that is not the leader: read-index reads are served by
/// the leader only (openraft 0.9 has no follower read-index), so the caller should ask it.
pub fn read_not_on_leader(leader: Option<u64>) -> Status {
    let leader = leader.map_or("no leader is known".to_owned(), |id| {
        format!("the leader is node {id}")
    });
    Status::unavailable(format!(
        "linearizable reads are served by the leader and this node is not it ({leader}); \
         send the read to the leader"
    ))
}

/// An outcome of the wrong kind for its command: a bug, reported without crashing the server.
pub fn unexpected(outcome: &Outcome) -> Status {
    tracing::error!(?outcome, "engine returned an outcome of the wrong kind");
    Status::internal("unexpected engine outcome")
}

impl From<MembershipError> for Status {
    fn from(e: MembershipError) -> Status {
        match e {
            MembershipError::EmptyAddr | MembershipError::BadId(_) => {
                Status::invalid_argument(e.to_string())
            }
            MembershipError::Node(e) => e.into(),
            MembershipError::Unexpected(_) => {
                tracing::error!(error = %e, "membership change");
                Status::internal(e.to_string())
            }
            MembershipError::Retired(_) | MembershipError::Raft(_) => {
                Status::failed_precondition(e.to_string())
            }
        }
    }
}
