//! Forwarding: a follower sends the commands it was given to the leader, over one persistent
//! channel per leader address, and the leader proposes them as its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tally_proto::tally::v1::forward_client::ForwardClient;
use tally_proto::tally::v1::forward_server::{self, ForwardServer};
use tally_proto::tally::v1::{ForwardRequest, ForwardResponse};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use super::{Node, NodeError};
use crate::engine::{Command, Outcome};

/// How long a forwarded batch may take, end to end, before the follower gives up.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// How long establishing a connection to the leader may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Largest forwarded batch, encoded.
pub const MAX_FORWARD_BYTES: usize = 64 * 1024 * 1024;

/// How a follower's commands reach the leader: gRPC in production ([`Forwarder`]), an
/// in-memory route in the simulator.
pub trait ForwardTransport: Send + Sync + 'static {
    /// Proposes `commands` on the leader at `addr`; one outcome per command, in order.
    fn propose<'a>(
        &'a self,
        addr: &'a str,
        commands: Vec<Command>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Vec<Outcome>, NodeError>> + Send + 'a>,
    >;
}

impl ForwardTransport for Forwarder {
    fn propose<'a>(
        &'a self,
        addr: &'a str,
        commands: Vec<Command>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Vec<Outcome>, NodeError>> + Send + 'a>,
    > {
        Box::pin(Forwarder::propose(self, addr, commands))
    }
}

/// Client side: one lazily connected channel per leader address, reused.
#[derive(Clone, Default)]
pub struct Forwarder {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// This node's id, sent with every forwarded batch.
    from_node: u64,
}

impl Forwarder {
    pub fn new(from_node: u64) -> Forwarder {
        Forwarder {
            from_node,
            ..Forwarder::default()
        }
    }

    /// The persistent channel to `addr`, created on first use.
    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, NodeError> {
        let mut channels = self.channels.lock();
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| NodeError::Unavailable(format!("bad leader address {addr:?}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(FORWARD_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
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
}

/// Server side: the leader proposes forwarded commands, refusing to forward them again.
pub struct ForwardService {
    node: Node,
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
        let from = request.from_node;
        if self.node.read(|e| e.is_retired(from)).await? {
            return Err(Status::permission_denied(format!(
                "node {from} was removed from this cluster"
            )));
        }
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
}
