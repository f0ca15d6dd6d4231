//! Forwarding: a follower sends the commands it was given to the leader, over one persistent
//! channel per leader address, and the leader proposes them as its own. The same channel
//! carries a follower's linearizable reads: the leader answers its read index, which the
//! follower applies up to before it reads its own state ([`Node::read_linearizable`]).
//!
//! Channels are built by [`super::network::peer_endpoint`], like Raft's: with the cluster's
//! client TLS ([`Forwarder::with_tls`]) the leader is dialled over `https://`, presenting this
//! node's certificate. The same channels carry the archive backfill (`ReadUsage`) and
//! `tally.v1.Cluster` calls a follower passes on to the leader ([`Node::peer_channel`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tally_proto::tally::v1::forward_client::ForwardClient;
use tally_proto::tally::v1::forward_server::{self, ForwardServer};
use tally_proto::tally::v1::{
    ForwardRequest, ForwardResponse, ReadIndexRequest, ReadIndexResponse, ReadUsageRequest,
    ReadUsageResponse,
};
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::{Request, Response, Status};

use super::{Node, NodeError};
use crate::engine::usage::UsageRecord;
use crate::engine::{Command, Outcome};

/// How long a forwarded batch or a read index may take, end to end, before the follower gives
/// up; also the bound on a whole linearizable read.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// How long establishing a connection to the leader may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Largest forwarded batch, encoded.
pub const MAX_FORWARD_BYTES: usize = 64 * 1024 * 1024;

/// A boxed future of a transport call.
pub type TransportFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, NodeError>> + Send + 'a>>;

/// How a follower's commands and read-index requests reach the leader: gRPC in production
/// ([`Forwarder`]), an in-memory route in the simulator.
pub trait ForwardTransport: Send + Sync + 'static {
    /// Proposes `commands` on the leader at `addr`; one outcome per command, in order.
    fn propose<'a>(
        &'a self,
        addr: &'a str,
        commands: Vec<Command>,
    ) -> TransportFuture<'a, Vec<Outcome>>;

    /// The read index of the leader at `addr` ([`Node::read_index_here`] there): once this
    /// node has applied up to it, its state reflects every write acknowledged before the call.
    fn read_index<'a>(&'a self, addr: &'a str) -> TransportFuture<'a, u64>;

    /// Up to `max` usage records after `after_seq` from the archive of the node at `addr`.
    /// Transports without it (the simulator's) answer UNAVAILABLE: holes then stay holes.
    fn read_usage<'a>(
        &'a self,
        addr: &'a str,
        after_seq: u64,
        max: u64,
    ) -> TransportFuture<'a, Vec<UsageRecord>> {
        let _ = (addr, after_seq, max);
        Box::pin(async {
            Err(NodeError::Unavailable(
                "no usage reads on this transport".into(),
            ))
        })
    }

    /// A gRPC channel to the node at `addr` for other node-to-node calls (`tally.v1.Cluster`
    /// calls passed on to the leader), with this transport's TLS. Transports without one (the
    /// simulator's) answer UNAVAILABLE.
    fn peer_channel(&self, addr: &str) -> Result<Channel, NodeError> {
        Err(NodeError::Unavailable(format!(
            "no gRPC channel to {addr} on this transport"
        )))
    }
}

impl ForwardTransport for Forwarder {
    fn propose<'a>(
        &'a self,
        addr: &'a str,
        commands: Vec<Command>,
    ) -> TransportFuture<'a, Vec<Outcome>> {
        Box::pin(Forwarder::propose(self, addr, commands))
    }

    fn read_index<'a>(&'a self, addr: &'a str) -> TransportFuture<'a, u64> {
        Box::pin(Forwarder::read_index(self, addr))
    }

    fn read_usage<'a>(
        &'a self,
        addr: &'a str,
        after_seq: u64,
        max: u64,
    ) -> TransportFuture<'a, Vec<UsageRecord>> {
        Box::pin(Forwarder::read_usage(self, addr, after_seq, max))
    }

    fn peer_channel(&self, addr: &str) -> Result<Channel, NodeError> {
        self.channel(addr)
    }
}

/// Client side: one lazily connected channel per leader address, reused.
#[derive(Clone, Default)]
pub struct Forwarder {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// This node's id, sent with every forwarded batch.
    from_node: u64,
    /// Some: peers are dialled over mutual TLS (the cluster's CA and this node's certificate).
    tls: Option<ClientTlsConfig>,
}

impl Forwarder {
    /// A plaintext forwarder for node `from_node`.
    pub fn new(from_node: u64) -> Forwarder {
        Forwarder::with_tls(from_node, None)
    }

    /// The forwarder of node `from_node`, dialling peers with `tls` (the cluster's CA and this
    /// node's certificate and key: mutual TLS) when given.
    pub fn with_tls(from_node: u64, tls: Option<ClientTlsConfig>) -> Forwarder {
        Forwarder {
            channels: Arc::default(),
            from_node,
            tls,
        }
    }

    /// The persistent channel to `addr`, created on first use.
    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, NodeError> {
        let mut channels = self.channels.lock();
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = super::network::peer_endpoint(addr, self.tls.as_ref())
            .map_err(|e| NodeError::Unavailable(format!("leader address {addr:?}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(FORWARD_TIMEOUT)
            .connect_lazy();
        channels.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Proposes `commands` on the leader at `addr`; one outcome per command, in order.
    pub async fn propose(
        &self,
        addr: &str,
        commands: Vec<Command>,
    ) -> Result<Vec<Outcome>, NodeError> {
        let bytes = postcard::to_allocvec(&commands).expect("commands always serialize");
        let mut client = ForwardClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_FORWARD_BYTES)
            .max_encoding_message_size(MAX_FORWARD_BYTES);
        let response = client
            .propose(ForwardRequest {
                commands: bytes,
                from_node: self.from_node,
            })
            .await
            .map_err(|s| {
                NodeError::Unavailable(format!("forward to leader {addr}: {}", s.message()))
            })?;
        postcard::from_bytes(&response.into_inner().outcomes)
            .map_err(|e| NodeError::Unavailable(format!("leader {addr} answered garbage: {e}")))
    }

    /// Asks the leader at `addr` for its read index, over the same channel (so within
    /// [`FORWARD_TIMEOUT`]).
    pub async fn read_index(&self, addr: &str) -> Result<u64, NodeError> {
        let mut client = ForwardClient::new(self.channel(addr)?);
        let response = client
            .read_index(ReadIndexRequest {
                from_node: self.from_node,
            })
            .await
            .map_err(|s| {
                NodeError::Unavailable(format!("read index from leader {addr}: {}", s.message()))
            })?;
        Ok(response.into_inner().read_index)
    }
}

impl Forwarder {
    /// Reads usage records from the archive of the node at `addr`.
    pub async fn read_usage(
        &self,
        addr: &str,
        after_seq: u64,
        max: u64,
    ) -> Result<Vec<UsageRecord>, NodeError> {
        let mut client =
            ForwardClient::new(self.channel(addr)?).max_decoding_message_size(MAX_FORWARD_BYTES);
        let response = client
            .read_usage(ReadUsageRequest {
                from_node: self.from_node,
                after_seq,
                max,
            })
            .await
            .map_err(|s| NodeError::Unavailable(format!("usage from {addr}: {}", s.message())))?;
        postcard::from_bytes(&response.into_inner().records)
            .map_err(|e| NodeError::Unavailable(format!("{addr} answered garbage: {e}")))
    }
}

impl Node {
    /// A channel to the node at `addr` over this node's forwarding transport (with the
    /// cluster's TLS when configured): for `tally.v1.Cluster` calls passed on to the leader.
    pub(crate) fn peer_channel(&self, addr: &str) -> Result<Channel, NodeError> {
        self.forward.peer_channel(addr)
    }
}

/// Server side: the leader proposes forwarded commands, refusing to forward them again, and
/// answers read indexes.
pub struct ForwardService {
    node: Node,
}

impl ForwardService {
    /// A removed node takes no part any more: neither its commands nor its reads are served.
    async fn refuse_retired(&self, from: u64) -> Result<(), Status> {
        if self.node.read(|e| e.is_retired(from)).await? {
            return Err(Status::permission_denied(format!(
                "node {from} was removed from this cluster"
            )));
        }
        Ok(())
    }
}

pub fn forward_service(node: Node) -> ForwardServer<ForwardService> {
    ForwardServer::new(ForwardService { node })
        .max_decoding_message_size(MAX_FORWARD_BYTES)
        .max_encoding_message_size(MAX_FORWARD_BYTES)
}

#[tonic::async_trait]
impl forward_server::Forward for ForwardService {
    async fn propose(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let request = request.into_inner();
        self.refuse_retired(request.from_node).await?;
        let commands: Vec<Command> = postcard::from_bytes(&request.commands)
            .map_err(|e| Status::invalid_argument(format!("commands do not decode: {e}")))?;
        // Spawned so they join the leader's batches together, awaited in order.
        let waits: Vec<_> = commands
            .into_iter()
            .map(|c| {
                let node = self.node.clone();
                tokio::spawn(async move { node.propose_here(c).await })
            })
            .collect();
        let mut outcomes = Vec::with_capacity(waits.len());
        for wait in waits {
            let outcome = wait.await.map_err(|e| Status::internal(e.to_string()))?;
            outcomes.push(outcome.map_err(Status::from)?);
        }
        let bytes = postcard::to_allocvec(&outcomes).expect("outcomes always serialize");
        Ok(Response::new(ForwardResponse { outcomes: bytes }))
    }

    /// Confirms this node's leadership with a majority and answers its read index; a node
    /// that does not lead answers UNAVAILABLE (never passed on: one hop).
    async fn read_index(
        &self,
        request: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        self.refuse_retired(request.into_inner().from_node).await?;
        let read_index = self.node.read_index_here().await.map_err(|e| match e {
            NodeError::NotLeader => Status::unavailable(format!(
                "node {} is not the leader (a read index is never passed on)",
                self.node.id()
            )),
            e => Status::from(e),
        })?;
        Ok(Response::new(ReadIndexResponse { read_index }))
    }

    /// Records from this node's archive (any node answers; records never change).
    async fn read_usage(
        &self,
        request: Request<ReadUsageRequest>,
    ) -> Result<Response<ReadUsageResponse>, Status> {
        let r = request.into_inner();
        self.refuse_retired(r.from_node).await?;
        let node = self.node.clone();
        let max = usize::try_from(r.max).unwrap_or(usize::MAX);
        let records = tokio::task::spawn_blocking(move || node.usage_records(r.after_seq, max))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        let bytes = postcard::to_allocvec(&records).expect("records always serialize");
        Ok(Response::new(ReadUsageResponse { records: bytes }))
    }
}
