//! Raft's network: the sending side of `tally.v1.Raft` (the serving side is
//! [`crate::api::raft`]; the wire contract is in `proto/tally/v1/raft.proto`).
//!
//! - **One channel per peer.** [`Network`] (openraft's network factory) keeps one lazily
//!   connected tonic [`Channel`] per peer, keyed by node id and address, shared by every
//!   [`PeerClient`] it hands out: openraft asks for a client for every election and every
//!   heartbeat round, and each of them reuses the peer's HTTP/2 connection. A peer whose address
//!   changes gets a new channel; the old one closes when its last client goes. TCP_NODELAY and
//!   HTTP/2 keepalive are on, so a black-holed connection is torn down and redialled.
//! - **A deadline on every call**: openraft's [`RPCOption::hard_ttl`] (the heartbeat interval for
//!   append entries, the election timeout for votes, `install_snapshot_timeout` per snapshot
//!   chunk) bounds each call, including its retries, and travels as the gRPC `grpc-timeout` so
//!   the peer drops work nobody waits for. Connecting is bounded by [`CONNECT_TIMEOUT`] as well.
//! - **Bounded retries**: a call that failed in transport (refused, reset, unavailable) is sent
//!   again at most [`MAX_TRANSPORT_RETRIES`] times, after [`RETRY_BACKOFF`] (doubling), and only
//!   while the retry can start before [`RPCOption::soft_ttl`]. Retrying is safe because the three
//!   RPCs are idempotent (same term, same entries; a snapshot chunk is written at its offset). A
//!   call that reached the peer's Raft and got an answer is never retried here.
//! - **Errors openraft can act on**: a peer that cannot be reached → [`RPCError::Unreachable`]
//!   (openraft pauses replication to it per [`PeerClient::backoff`]); the deadline passed →
//!   [`RPCError::Timeout`]; the peer's Raft answered with an error → [`RPCError::RemoteError`]
//!   (typed); anything else (a payload that does not decode on either side, an unexpected
//!   status) → [`RPCError::Network`]. An append-entries request too big for one message →
//!   [`RPCError::PayloadTooLarge`] with a hint, so openraft sends fewer entries at a time.
//!
//! - **Mutual TLS between peers** ([`Network::with_tls`], [`peer_endpoint`]): with the
//!   cluster's client TLS (CA to verify the peer, this node's certificate to present; what
//!   `Node::start` is given, made from the Raft listener's own `TlsConfig`), peers are
//!   dialled over `https://`; the Raft listener (`server.rs`) then refuses any peer without a
//!   certificate signed by the cluster's CA. The forwarder's channels are built the same way.
//!
//! The gRPC client and its protobuf envelope stay private to this module: nothing protobuf
//! leaves it (the envelope is only `bytes`; the payload is openraft's own serde types).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use openraft::error::{
    Infallible, InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError,
    RemoteError, Timeout, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode};
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tally_proto::tally::v1::RaftPayload;
use tally_proto::tally::v1::raft_client::RaftClient;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::raft_types::{NodeId, TypeConfig};

/// Snapshot chunk size: set openraft's `Config::snapshot_max_chunk_size` to this. Each chunk is
/// one `InstallSnapshot` call bounded by `Config::install_snapshot_timeout`.
pub const SNAPSHOT_CHUNK_BYTES: u64 = 1024 * 1024;

/// Largest Raft message either way, bytes (requests and responses, both ends). Far above a
/// snapshot chunk; it also bounds one log entry (a batch), which must fit in one append-entries
/// message on its own.
pub const MAX_RAFT_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Protobuf framing around the payload bytes inside one message (tag and length), bytes.
const PAYLOAD_FRAMING_BYTES: usize = 16;

/// Retries of a call that failed in transport, at most (so at most 3 sends per call).
pub const MAX_TRANSPORT_RETRIES: u32 = 2;

/// Pause before the first retry; each further retry waits twice as long.
pub const RETRY_BACKOFF: Duration = Duration::from_millis(10);

/// Bound on establishing a connection to a peer (TCP, then HTTP/2).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// HTTP/2 keepalive: a PING every interval (also while idle), and the connection is dropped if
/// one goes unanswered for the timeout.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long openraft waits before replicating again to a peer that was unreachable: starting at
/// the first, doubling up to the second, reset by the next successful call.
const UNREACHABLE_BACKOFF_FIRST: Duration = Duration::from_millis(50);
const UNREACHABLE_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Openraft's network factory: hands out [`PeerClient`]s that share one channel per peer.
/// Cheap to clone; clones share the channels.
#[derive(Clone)]
pub struct Network {
    id: NodeId,
    shared: Arc<Shared>,
    /// Some: peers are dialled over mutual TLS.
    tls: Option<tonic::transport::ClientTlsConfig>,
}

struct Shared {
    peers: Mutex<HashMap<NodeId, Peer>>,
    channels_created: AtomicU64,
    clients_created: AtomicU64,
}

/// A peer's channel, and the address it dials.
struct Peer {
    addr: String,
    /// `Err` holds why the address is unusable; every call to it then fails as unreachable.
    channel: Result<Channel, String>,
}

/// What the factory has done so far (for tests and metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetworkStats {
    /// Channels created: one per peer, plus one per address change.
    pub channels_created: u64,
    /// Clients handed to openraft (many per peer; they share the peer's channel).
    pub clients_created: u64,
}

impl Network {
    /// The network of node `id` (the sender named in timeout errors).
    pub fn new(id: NodeId) -> Network {
        Network::with_tls(id, None)
    }

    /// The network of node `id`, dialling peers with `tls` (the cluster's CA and this node's
    /// certificate and key: mutual TLS) when given.
    pub fn with_tls(id: NodeId, tls: Option<tonic::transport::ClientTlsConfig>) -> Network {
        Network {
            id,
            shared: Arc::new(Shared {
                peers: Mutex::new(HashMap::new()),
                channels_created: AtomicU64::new(0),
                clients_created: AtomicU64::new(0),
            }),
            tls,
        }
    }

    pub fn stats(&self) -> NetworkStats {
        NetworkStats {
            channels_created: self.shared.channels_created.load(Ordering::Relaxed),
            clients_created: self.shared.clients_created.load(Ordering::Relaxed),
        }
    }

    /// Forgets a peer's channel (for a node removed from the cluster). Clients still holding
    /// it keep working until they are dropped.
    pub fn forget(&self, target: NodeId) {
        self.shared.peers.lock().remove(&target);
    }

    /// The channel to `target` at `addr`: the cached one, or a new lazy one if there is none
    /// or the address changed. Never connects here.
    fn channel(&self, target: NodeId, addr: &str) -> Result<Channel, String> {
        let mut peers = self.shared.peers.lock();
        if let Some(peer) = peers.get(&target)
            && peer.addr == addr
        {
            return peer.channel.clone();
        }
        let channel = peer_endpoint(addr, self.tls.as_ref()).map(|e| e.connect_lazy());
        if let Err(e) = &channel {
            tracing::error!(target, addr, error = %e, "unusable Raft peer address");
        }
        self.shared.channels_created.fetch_add(1, Ordering::Relaxed);
        peers.insert(
            target,
            Peer {
                addr: addr.to_owned(),
                channel: channel.clone(),
            },
        );
        channel
    }
}

/// The endpoint for a peer address: `host:port`, or a URI with a scheme (`http://host:port`).
/// With `tls`, the peer is dialled over `https://` and verified against the cluster's CA (its
/// certificate must name the address's host, an IP or DNS name), presenting this node's
/// certificate. For every node-to-node channel (Raft, forwarding, cluster calls passed on).
pub fn peer_endpoint(
    addr: &str,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Result<Endpoint, String> {
    let uri = match (addr.split_once("://"), tls) {
        (Some(("http", rest)), Some(_)) => format!("https://{rest}"),
        (Some(_), _) => addr.to_owned(),
        (None, Some(_)) => format!("https://{addr}"),
        (None, None) => format!("http://{addr}"),
    };
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|e| format!("invalid address {addr:?}: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    match tls {
        None => Ok(endpoint),
        Some(tls) => endpoint
            .tls_config(tls.clone())
            .map_err(|e| format!("TLS for {addr:?}: {e}")),
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        self.shared.clients_created.fetch_add(1, Ordering::Relaxed);
        let client = self.channel(target, &node.addr).map(|channel| {
            RaftClient::new(channel)
                .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES)
        });
        PeerClient {
            from: self.id,
            target,
            node: node.clone(),
            client,
        }
    }
}

/// Sends Raft RPCs to one peer over its shared channel.
pub struct PeerClient {
    from: NodeId,
    target: NodeId,
    node: BasicNode,
    client: Result<RaftClient<Channel>, String>,
}

/// Why a call got no answer from the peer's Raft.
#[derive(Debug)]
enum Failure {
    /// The encoded request (this many bytes) exceeds [`MAX_RAFT_MESSAGE_BYTES`]; not sent.
    TooLarge(usize),
    /// The deadline passed.
    Timeout,
    /// The peer could not be reached (after the retries).
    Unreachable(AnyError),
    /// Anything else: encoding or decoding, or a status the peer chose.
    Network(AnyError),
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

/// What a failed call's status says.
#[derive(Debug, PartialEq, Eq)]
enum StatusKind {
    /// The deadline passed: the peer said DEADLINE_EXCEEDED, or the client's own timer for
    /// the call's `grpc-timeout` fired.
    Timeout,
    /// The call did not reach the peer's Raft: the peer (or a proxy) said UNAVAILABLE, or the
    /// client made the status from a transport error (connect failed, connection reset or
    /// closed mid-call). Statuses the peer sent carry no source.
    Transport,
    /// Any other status the peer sent (INVALID_ARGUMENT, UNIMPLEMENTED, ...).
    Other,
}

fn classify(status: &Status) -> StatusKind {
    let mut source = std::error::Error::source(status);
    let local = source.is_some();
    while let Some(e) = source {
        if e.is::<tonic::TimeoutExpired>() {
            return StatusKind::Timeout;
        }
        source = e.source();
    }
    match status.code() {
        Code::DeadlineExceeded => StatusKind::Timeout,
        Code::Unavailable => StatusKind::Transport,
        Code::Unknown | Code::Internal | Code::Cancelled if local => StatusKind::Transport,
        _ => StatusKind::Other,
    }
}

impl PeerClient {
    /// Sends `req` as `action` and decodes the peer's answer: `Ok(Ok)` or `Ok(Err)` is the
    /// peer Raft's own result.
    async fn call<Req, Resp, E>(
        &self,
        action: RPCTypes,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Result<Resp, RaftError<NodeId, E>>, Failure>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let start = Instant::now();
        let hard_deadline = start + option.hard_ttl();
        let soft_deadline = start + option.soft_ttl();
        let client = match &self.client {
            Ok(client) => client,
            Err(e) => return Err(Failure::Unreachable(AnyError::error(e))),
        };
        let data = postcard::to_stdvec(req).map_err(|e| Failure::Network(AnyError::new(&e)))?;
        if data.len() + PAYLOAD_FRAMING_BYTES > MAX_RAFT_MESSAGE_BYTES {
            return Err(Failure::TooLarge(data.len()));
        }

        let mut attempt = 0;
        let mut backoff = RETRY_BACKOFF;
        loop {
            let remaining = hard_deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Failure::Timeout);
            }
            let mut request = tonic::Request::new(RaftPayload { data: data.clone() });
            request.set_timeout(remaining);
            let mut client = client.clone();
            let sent = async move {
                match action {
                    RPCTypes::AppendEntries => client.append_entries(request).await,
                    RPCTypes::Vote => client.vote(request).await,
                    RPCTypes::InstallSnapshot => client.install_snapshot(request).await,
                }
            };
            let status = match tokio::time::timeout(remaining, sent).await {
                Err(_elapsed) => return Err(Failure::Timeout),
                Ok(Ok(response)) => {
                    return postcard::from_bytes(&response.into_inner().data).map_err(|e| {
                        Failure::Network(AnyError::error(format!(
                            "undecodable {action} response from node {}: {e}",
                            self.target
                        )))
                    });
                }
                Ok(Err(status)) => status,
            };
            match classify(&status) {
                StatusKind::Timeout => return Err(Failure::Timeout),
                StatusKind::Other => return Err(Failure::Network(AnyError::new(&status))),
                StatusKind::Transport => {}
            }
            if attempt >= MAX_TRANSPORT_RETRIES || Instant::now() + backoff >= soft_deadline {
                return Err(Failure::Unreachable(AnyError::new(&status)));
            }
            tracing::debug!(
                target = self.target,
                %action,
                attempt,
                error = %status,
                "Raft RPC failed in transport; retrying"
            );
            attempt += 1;
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }

    /// The openraft error for a call that got no answer from the peer's Raft.
    fn failure<E: std::error::Error>(
        &self,
        failure: Failure,
        action: RPCTypes,
        option: &RPCOption,
    ) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
        match failure {
            Failure::Timeout => RPCError::Timeout(Timeout {
                action,
                id: self.from,
                target: self.target,
                timeout: option.hard_ttl(),
            }),
            Failure::Unreachable(e) => RPCError::Unreachable(Unreachable::from(e)),
            Failure::Network(e) => RPCError::Network(NetworkError::from(e)),
            Failure::TooLarge(bytes) => {
                RPCError::Network(NetworkError::from(AnyError::error(format!(
                    "{action} request of {bytes} bytes exceeds the {MAX_RAFT_MESSAGE_BYTES}-byte \
                     Raft message bound"
                ))))
            }
        }
    }

    /// The openraft error for the peer Raft's own error.
    fn remote<E: std::error::Error>(
        &self,
        error: RaftError<NodeId, E>,
    ) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            self.node.clone(),
            error,
        ))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, Infallible> {
        let entries = rpc.entries.len() as u64;
        match self.call(RPCTypes::AppendEntries, &rpc, &option).await {
            Ok(answer) => answer.map_err(|e| self.remote(e)),
            Err(Failure::TooLarge(bytes)) if entries > 1 => {
                // Ask openraft to send fewer entries: as many as would have fit, on average.
                let fit = (entries as u128 * MAX_RAFT_MESSAGE_BYTES as u128 / bytes as u128) as u64;
                let hint = fit.clamp(1, entries - 1);
                tracing::warn!(
                    target = self.target,
                    entries,
                    bytes,
                    hint,
                    "append-entries request too large; splitting"
                );
                Err(RPCError::PayloadTooLarge(
                    PayloadTooLarge::new_entries_hint(hint),
                ))
            }
            Err(Failure::TooLarge(bytes)) => {
                // One entry over the bound can never be sent; back off rather than spin.
                tracing::error!(
                    target = self.target,
                    bytes,
                    "a single log entry exceeds the Raft message bound; peer cannot be replicated"
                );
                Err(RPCError::Unreachable(Unreachable::from(AnyError::error(
                    format!(
                        "one log entry of {bytes} bytes exceeds the \
                         {MAX_RAFT_MESSAGE_BYTES}-byte Raft message bound"
                    ),
                ))))
            }
            Err(f) => Err(self.failure(f, RPCTypes::AppendEntries, &option)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        match self.call(RPCTypes::InstallSnapshot, &rpc, &option).await {
            Ok(answer) => answer.map_err(|e| self.remote(e)),
            Err(f) => Err(self.failure(f, RPCTypes::InstallSnapshot, &option)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, Infallible> {
        match self.call(RPCTypes::Vote, &rpc, &option).await {
            Ok(answer) => answer.map_err(|e| self.remote(e)),
            Err(f) => Err(self.failure(f, RPCTypes::Vote, &option)),
        }
    }

    /// After an unreachable peer: 50 ms, doubling to 500 ms (openraft's default is a flat
    /// 500 ms), so a briefly restarted peer is caught up again quickly.
    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::successors(
            Some(UNREACHABLE_BACKOFF_FIRST),
            |d| Some((*d * 2).min(UNREACHABLE_BACKOFF_MAX)),
        ))
    }
}
