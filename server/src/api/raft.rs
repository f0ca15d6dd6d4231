//! `tally.v1.Raft`: the node-to-node Raft service (append entries, vote, install snapshot).
//!
//! Each RPC carries a postcard-encoded openraft request and answers with the postcard encoding
//! of the local Raft handler's whole `Result`, so a Raft error on this node reaches the sender
//! typed (it becomes `RPCError::RemoteError` there). A payload that does not decode is refused
//! with `INVALID_ARGUMENT`; nothing here panics. The sending side is
//! [`crate::node::network`]; the contract is written down in `proto/tally/v1/raft.proto`.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tally_proto::tally::v1::RaftPayload;
use tally_proto::tally::v1::raft_server::{Raft as RaftRpc, RaftServer};
use tonic::{Request, Response, Status};

use crate::node::network::MAX_RAFT_MESSAGE_BYTES;
use crate::node::raft_types::Raft;

/// Serves this node's Raft to its peers.
pub struct RaftService {
    raft: Raft,
}

impl RaftService {
    pub fn new(raft: Raft) -> RaftService {
        RaftService { raft }
    }
}

/// The Raft service, with its messages bounded by [`MAX_RAFT_MESSAGE_BYTES`] both ways, ready
/// to be added to a router.
pub fn raft_service(raft: Raft) -> RaftServer<RaftService> {
    RaftServer::new(RaftService::new(raft))
        .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES)
}

fn decode<T: DeserializeOwned>(request: Request<RaftPayload>, what: &str) -> Result<T, Status> {
    postcard::from_bytes(&request.into_inner().data)
        .map_err(|e| Status::invalid_argument(format!("data: not a postcard {what}: {e}")))
}

fn encode<T: Serialize>(result: &T) -> Result<Response<RaftPayload>, Status> {
    match postcard::to_stdvec(result) {
        Ok(data) => Ok(Response::new(RaftPayload { data })),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a Raft response");
            Err(Status::internal(format!(
                "cannot encode the Raft response: {e}"
            )))
        }
    }
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(request, "AppendEntriesRequest")?;
        encode(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(request, "VoteRequest")?;
        encode(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(request, "InstallSnapshotRequest")?;
        encode(&self.raft.install_snapshot(rpc).await)
    }
}
