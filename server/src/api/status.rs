//! The one mapping from Tally's errors to gRPC statuses.

use tonic::Status;

use crate::engine::usage::ReadError;
use crate::engine::{CommandError, Outcome};
use crate::node::NodeError;
use crate::node::membership::MembershipError;
use crate::node::usage_archive::ArchiveError;

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

impl From<ArchiveError> for Status {
    fn from(e: ArchiveError) -> Status {
        match e {
            // The message names the first seq still held.
            ArchiveError::PastRetention { .. } => Status::out_of_range(e.to_string()),
            // Another node holds them: retry there.
            ArchiveError::NotHeld { .. } => Status::unavailable(e.to_string()),
            ArchiveError::Io { .. } | ArchiveError::Corrupt(_) => {
                tracing::error!(error = %e, "usage archive read failed");
                Status::internal(e.to_string())
            }
        }
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        // Every node error means "not decided here, now": Envoy applies its failure mode.
        Status::unavailable(e.to_string())
    }
}

/// A linearizable read that could not be served. Every node serves them (the leader after
/// confirming its leadership with a majority, a follower after applying up to the leader's read
/// index), so a failure means no leader, no quorum, an unreachable leader or a node too far
/// behind: UNAVAILABLE, and the same read may be retried here or on any node.
pub fn read_unavailable(e: NodeError) -> Status {
    Status::unavailable(format!("no linearizable read: {e}"))
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

impl From<crate::api::auth::AuthError> for Status {
    fn from(e: crate::api::auth::AuthError) -> Status {
        use crate::api::auth::AuthError;
        // The messages name the method and roles, never the token.
        match e {
            AuthError::LoopbackOnly { .. }
            | AuthError::MissingToken { .. }
            | AuthError::Malformed
            | AuthError::InvalidToken => Status::unauthenticated(e.to_string()),
            AuthError::Forbidden { .. } => Status::permission_denied(e.to_string()),
        }
    }
}
