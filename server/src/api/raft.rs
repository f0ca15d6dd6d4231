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

use crate::node::Node;
use crate::node::network::MAX_RAFT_MESSAGE_BYTES;
use crate::node::raft_types::Raft;

/// Serves this node's Raft to its peers.
pub struct RaftService {
    raft: Raft,
    /// When set, RPCs from node ids this node's state says were removed are refused, so a
    /// removed node that comes back with its old state cannot rejoin or disrupt elections.
    node: Option<Node>,
}

impl RaftService {
    pub fn new(raft: Raft) -> RaftService {
        RaftService { raft, node: None }
    }

    async fn refuse_retired(&self, vote: &openraft::Vote<u64>) -> Result<(), Status> {
        let refusal = self
            .node
            .as_ref()
            .and_then(|node| node.refuses_raft_from(vote.leader_id().voted_for()));
        match refusal {
            Some(why) => Err(Status::permission_denied(why)),
            None => Ok(()),
        }
    }
}

/// [`raft_service`] for a running node: also refuses removed nodes.
pub fn raft_service_for(node: &Node) -> RaftServer<RaftService> {
    RaftServer::new(RaftService {
        raft: node.raft().clone(),
        node: Some(node.clone()),
    })
    .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES)
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
        let rpc: openraft::raft::AppendEntriesRequest<crate::node::raft_types::TypeConfig> =
            decode(request, "AppendEntriesRequest")?;
        if let Some(answer) =
            (self.node.as_ref()).and_then(|n| n.higher_vote_for_retired_leader(&rpc.vote))
        {
            return encode(&Ok::<_, openraft::error::RaftError<u64>>(answer));
        }
        self.refuse_retired(&rpc.vote).await?;
        encode(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc: openraft::raft::VoteRequest<u64> = decode(request, "VoteRequest")?;
        self.refuse_retired(&rpc.vote).await?;
        encode(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc: openraft::raft::InstallSnapshotRequest<crate::node::raft_types::TypeConfig> =
            decode(request, "InstallSnapshotRequest")?;
        self.refuse_retired(&rpc.vote).await?;
        encode(&self.raft.install_snapshot(rpc).await)
    }
}
