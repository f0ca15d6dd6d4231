//! The seam between the API layer and replication.
//!
//! The API layer hands [`Command`]s to a [`Node`] and awaits their [`Outcome`]s; it never sees
//! how they are ordered. A node is a member of a Raft group (openraft): its proposer collects
//! concurrent commands into a batch, the leader stamps it with `max(last_stamp, now)` and
//! appends it to the log; once a majority has it on disk, every replica applies it to its
//! engine. A single `tallyd` is a one-node group: the same code path.
//!
//! Layout:
//! - [`clock`]: where batch time comes from (the system clock, or a manual one in tests).
//! - [`election`]: jittered elections while no leader is known (openraft 0.9 draws its
//!   election timeout once per process).
//! - `proposer`: batching, pipelining into the Raft log, forwarding from followers.
//! - [`raft_types`]: what a log entry carries (a stamped batch) and returns (its outcomes).
//! - [`log_store`]: the durable Raft log (raft-log: fdatasync'd, group commit).
//! - [`state_machine`]: the engine as openraft's state machine; durable snapshots.
//! - [`usage_archive`]: every usage record applied, on disk (the export's history).
//! - `backfill`: fills holes in the archive (after a snapshot install) from other members.
//! - [`network`]: Raft RPCs over gRPC, one persistent channel per peer.
//! - [`forward`]: followers' commands and read-index requests to the leader, and the leader's
//!   service for them.
//! - [`membership`]: adding, promoting and removing members (on the leader).
//! - [`retired_peers`]: no Raft message to a removed node's id.
//! - [`stats`]: batch sizes, log flush times and snapshots, as plain numbers
//!   ([`Node::stats`]; `crate::metrics` exports them).

mod backfill;
pub mod clock;
pub mod election;
pub mod forward;
pub mod log_store;
pub mod membership;
pub mod network;
mod proposer;
pub mod raft_types;
pub mod retired_peers;
pub mod state_machine;
pub mod stats;
pub mod usage_archive;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::engine::{Command, Engine, EngineSettings, Outcome};
pub use clock::{Clock, ManualClock, SystemClock};
pub use proposer::MAX_INFLIGHT_BATCHES;
use raft_types::{NodeId, Raft};
use stats::NodeStats;

/// Commands waiting for a batch at most; proposers wait (backpressure) beyond it.
pub const MAX_QUEUED_COMMANDS: usize = 65_536;
/// A node with more log entries than this not yet applied (catching up after a restart or a
/// snapshot install) is not ready: its answers would come late.
pub const READY_MAX_APPLY_LAG: u64 = 1_000;
/// Upper bound for `max_batch_commands`.
pub const MAX_BATCH_COMMANDS: usize = 65_536;

/// How batches form.
#[derive(Clone, Copy, Debug)]
pub struct BatchConfig {
    /// Most commands in one batch.
    pub max_batch_commands: usize,
    /// How long a batch waits for more commands after its first, even when it could be
    /// proposed. Zero: propose once the pipeline has room (commands that arrive while it is
    /// full join the waiting batch).
    pub batch_linger: Duration,
    /// Batches proposed and not yet committed, at most (1..=[`proposer::MAX_INFLIGHT_BATCHES`]).
    /// Commands arriving while the pipeline is full join the next, larger batch.
    pub max_inflight_batches: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_batch_commands: 512,
            batch_linger: Duration::ZERO,
            // Measured: one batch in flight lets every command that arrives meanwhile share the
            // next commit; more, smaller batches each wait for their own fsync.
            max_inflight_batches: 1,
        }
    }
}

/// Raft timing and log compaction.
#[derive(Clone, Copy, Debug)]
pub struct RaftTimings {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// A snapshot is built after this many log entries since the last one; the log is purged
    /// behind it.
    pub snapshot_every_entries: u64,
    /// Log entries kept behind a snapshot, so that a briefly lagging follower catches up from
    /// the log rather than by a whole snapshot.
    pub logs_kept_behind_snapshot: u64,
}

impl Default for RaftTimings {
    fn default() -> Self {
        RaftTimings {
            heartbeat_ms: 100,
            election_min_ms: 300,
            election_max_ms: 600,
            snapshot_every_entries: 20_000,
            logs_kept_behind_snapshot: 1_000,
        }
    }
}

/// Everything a node needs to start.
#[derive(Clone)]
pub struct NodeConfig {
    pub node_id: NodeId,
    /// Holds the Raft log and the snapshot; one node's, never shared.
    pub data_dir: PathBuf,
    /// The Raft address other members reach this node at (host:port).
    pub advertise_addr: String,
    /// With an empty data directory, initialize a one-node cluster of this node.
    pub bootstrap: bool,
    pub engine: EngineSettings,
    /// Bounds of the on-disk usage archive (`data_dir/usage`); node-local.
    pub archive: usage_archive::ArchiveConfig,
    pub batch: BatchConfig,
    pub timings: RaftTimings,
    pub clock: Arc<dyn Clock>,
}

/// Why a command got no outcome. Every variant but `Stopped` means "try again later or
/// elsewhere": the command was not applied, or its fate is unknown.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeError {
    #[error("node is shutting down")]
    Stopped,
    #[error("no leader is known (election in progress or no quorum)")]
    NoLeader,
    #[error("this node is not the leader and will not forward a forwarded command")]
    NotLeader,
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// Why a node could not start. Large (it can carry openraft's storage error), but built once.
#[derive(Debug, thiserror::Error)]
#[allow(clippy::large_enum_variant)]
pub enum NodeStartError {
    #[error("log store: {0}")]
    LogStore(#[from] log_store::LogStoreError),
    #[error("state machine: {0}")]
    Storage(#[from] raft_types::StorageError),
    #[error("{0}")]
    Archive(#[from] usage_archive::ArchiveError),
    #[error("raft config: {0}")]
    Config(#[from] openraft::ConfigError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("data directory {path}: {error}")]
    DataDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "node {0} was removed from its cluster and does not rejoin with its old state; start it with a new id and an empty data directory"
    )]
    Retired(NodeId),
    #[error("data directory {path} belongs to node {found}, not node {wanted}")]
    WrongNode {
        path: PathBuf,
        found: String,
        wanted: NodeId,
    },
}

/// A handle to the node: cheap to clone, shared by every API service.
#[derive(Clone)]
pub struct Node {
    id: NodeId,
    advertise_addr: Arc<str>,
    tx: mpsc::Sender<proposer::Proposal>,
    raft: Raft,
    applied: Arc<parking_lot::Mutex<state_machine::Applied>>,
    /// Every usage record this replica applied, on disk.
    archive: Arc<usage_archive::UsageArchive>,
    /// How a follower asks the leader for a read index (the proposer forwards through it too).
    forward: Arc<dyn forward::ForwardTransport>,
    /// Set by [`Node::shutdown`], so a Raft stopped on purpose is not taken for a failure.
    stopping: Arc<AtomicBool>,
    /// Batch sizes, log flushes and snapshots (recorded by the proposer, the log store and the
    /// state machine).
    stats: Arc<NodeStats>,
}

impl Node {
    /// Opens the data directory, starts Raft and the proposer, talking to peers over gRPC.
    ///
    /// `peer_tls` is the cluster's client TLS (the CA that signed every member's certificate,
    /// and this node's certificate and key): with it every node-to-node channel — Raft,
    /// forwarding and read indexes, the archive backfill, cluster calls passed on to the
    /// leader — dials `https://` and presents this node's certificate; without it, plaintext.
    /// (A parameter rather than a [`NodeConfig`] field: the simulator, which builds a
    /// `NodeConfig` of its own, has no use for it.)
    #[allow(clippy::result_large_err)]
    pub async fn start(
        config: NodeConfig,
        peer_tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Result<Node, NodeStartError> {
        claim_data_dir(&config)?;
        let stats = Arc::new(NodeStats::new());
        let log =
            log_store::LogStore::open(&config.data_dir.join("log"))?.with_stats(stats.clone());
        let network = network::Network::with_tls(config.node_id, peer_tls.clone());
        let forward = Arc::new(forward::Forwarder::with_tls(config.node_id, peer_tls));
        let node = Node::start_with_stats(config, log, network, forward, stats).await?;
        // Over gRPC only: the simulator's transport cannot read peers' archives. It reads
        // through `forward` (with the same TLS).
        tokio::spawn(backfill::run(node.clone()));
        Ok(node)
    }

    /// Starts a node on the given log store, Raft network and forwarding transport (the
    /// simulator gives in-memory ones). The state machine lives in `data_dir/state`. The log
    /// store given records no flush times in [`Node::stats`].
    #[allow(clippy::result_large_err)]
    pub async fn start_with<L, N>(
        config: NodeConfig,
        log: L,
        network: N,
        forward: Arc<dyn forward::ForwardTransport>,
    ) -> Result<Node, NodeStartError>
    where
        L: openraft::storage::RaftLogStorage<raft_types::TypeConfig>,
        N: openraft::RaftNetworkFactory<raft_types::TypeConfig>,
    {
        let stats = Arc::new(NodeStats::new());
        Node::start_with_stats(config, log, network, forward, stats).await
    }

    /// [`Node::start_with`], recording into `stats` (which the log store may share).
    #[allow(clippy::result_large_err)]
    async fn start_with_stats<L, N>(
        config: NodeConfig,
        log: L,
        network: N,
        forward: Arc<dyn forward::ForwardTransport>,
        stats: Arc<NodeStats>,
    ) -> Result<Node, NodeStartError>
    where
        L: openraft::storage::RaftLogStorage<raft_types::TypeConfig>,
        N: openraft::RaftNetworkFactory<raft_types::TypeConfig>,
    {
        assert!(
            (1..=MAX_BATCH_COMMANDS).contains(&config.batch.max_batch_commands),
            "max_batch_commands out of range"
        );
        assert!(
            (1..=MAX_INFLIGHT_BATCHES).contains(&config.batch.max_inflight_batches),
            "max_inflight_batches out of range"
        );
        claim_data_dir(&config)?;
        let archive = Arc::new(usage_archive::UsageArchive::open(
            &config.data_dir.join("usage"),
            config.archive,
        )?);
        let sm = state_machine::StateMachine::open(
            &config.data_dir.join("state"),
            config.engine,
            archive.clone(),
            stats.clone(),
        )?;
        let applied = sm.applied().clone();
        if applied.lock().engine.is_retired(config.node_id) {
            return Err(NodeStartError::Retired(config.node_id));
        }
        let raft_config = raft_config(&config.timings).validate()?;
        let signals = Arc::new(election::Signals::default());
        let network = retired_peers::RetiredPeers::new(
            network,
            config.node_id,
            applied.clone(),
            signals.clone(),
        );
        let raft = Raft::new(config.node_id, Arc::new(raft_config), network, log, sm)
            .await
            .map_err(|e| NodeStartError::Raft(e.to_string()))?;
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| NodeStartError::Raft(e.to_string()))?;
        if config.bootstrap && !initialized {
            let members = BTreeMap::from([(
                config.node_id,
                openraft::BasicNode::new(&config.advertise_addr),
            )]);
            raft.initialize(members)
                .await
                .map_err(|e| NodeStartError::Raft(e.to_string()))?;
        }
        let stopping = Arc::new(AtomicBool::new(false));
        tokio::spawn(election::nudge(
            raft.clone(),
            config.node_id,
            config.timings,
            signals,
            stopping.clone(),
        ));
        let (tx, rx) = mpsc::channel(MAX_QUEUED_COMMANDS);
        let proposer = proposer::Proposer {
            applied: applied.clone(),
            id: config.node_id,
            raft: raft.clone(),
            clock: config.clock.clone(),
            config: config.batch,
            forwarder: forward.clone(),
            stats: stats.clone(),
        };
        tokio::spawn(proposer.run(rx));
        Ok(Node {
            id: config.node_id,
            advertise_addr: Arc::from(config.advertise_addr.as_str()),
            tx,
            raft,
            applied,
            archive,
            forward,
            stopping,
            stats,
        })
    }

    /// Up to `max` usage records with seq > `after_seq` from this replica's archive, in order.
    /// Not a linearizable read by itself: records never change once written, so a caller that
    /// learned the last seq linearizably (`read_linearizable(|e| e.last_usage_seq())`) and
    /// reads up to it reads exactly what the leader holds.
    pub fn usage_records(
        &self,
        after_seq: u64,
        max: usize,
    ) -> Result<Vec<crate::engine::usage::UsageRecord>, usage_archive::ArchiveError> {
        self.archive.read(after_seq, max)
    }

    /// Orders `command` into the log (through the leader), and returns its outcome once it is
    /// committed on a majority and applied. Cancel-safe: dropping the future abandons the
    /// wait, not the command.
    pub async fn propose(&self, command: Command) -> Result<Outcome, NodeError> {
        self.enqueue(command, true).await
    }

    /// As [`Node::propose`], but never forwarded: for commands forwarded to this node.
    pub(crate) async fn propose_here(&self, command: Command) -> Result<Outcome, NodeError> {
        self.enqueue(command, false).await
    }

    async fn enqueue(&self, command: Command, forwardable: bool) -> Result<Outcome, NodeError> {
        let (reply, outcome) = oneshot::channel();
        let proposal = proposer::Proposal {
            command,
            forwardable,
            reply,
        };
        self.tx
            .send(proposal)
            .await
            .map_err(|_| NodeError::Stopped)?;
        outcome.await.map_err(|_| NodeError::Stopped)?
    }

    /// Reads this replica's applied state (possibly behind the leader's).
    pub async fn read<R>(&self, f: impl FnOnce(&Engine) -> R) -> Result<R, NodeError> {
        Ok(f(&self.applied.lock().engine))
    }

    /// Reads state that reflects every command acknowledged before the call started, on any
    /// node (read index, Raft §6.4): the read index is the leader's — its own when this node
    /// leads, else asked of the leader over `tally.v1.Forward` — and `f` runs once this
    /// replica has applied up to it. The whole read takes at most [`forward::FORWARD_TIMEOUT`]:
    /// no leader, no quorum, an unreachable leader or a replica too far behind answer an error.
    pub async fn read_linearizable<R>(&self, f: impl FnOnce(&Engine) -> R) -> Result<R, NodeError> {
        let deadline = tokio::time::Instant::now() + forward::FORWARD_TIMEOUT;
        let index = tokio::time::timeout_at(deadline, self.read_index())
            .await
            .map_err(|_| {
                NodeError::Unavailable(
                    "the leader did not confirm its leadership in time (no quorum?)".to_owned(),
                )
            })??;
        self.wait_applied(index, deadline).await?;
        Ok(f(&self.applied.lock().engine))
    }

    /// The read index for a read starting now, from whoever leads.
    async fn read_index(&self) -> Result<u64, NodeError> {
        // Twice at most: a leader deposed while confirming asks the new leader, if known.
        for _ in 0..2 {
            let leader = self.raft.metrics().borrow().current_leader;
            match leader {
                None => return Err(NodeError::NoLeader),
                Some(l) if l == self.id => match self.read_index_here().await {
                    Err(NodeError::NotLeader) => continue,
                    done => return done,
                },
                Some(l) => {
                    let addr = self.peer_addr(l).ok_or(NodeError::NoLeader)?;
                    return self.forward.read_index(&addr).await;
                }
            }
        }
        Err(NodeError::NoLeader)
    }

    /// This node's read index, if it leads: it confirms its leadership with a majority (so no
    /// newer leader can have acknowledged a write it lacks) and answers the greater of its
    /// commit index and its term's first entry (entries of earlier terms it holds may be
    /// committed without its knowing until that one is). Does not wait for its own apply:
    /// whoever reads waits for its own. [`NodeError::NotLeader`] when it does not lead.
    pub async fn read_index_here(&self) -> Result<u64, NodeError> {
        use openraft::error::{CheckIsLeaderError, RaftError};
        match self.raft.get_read_log_id().await {
            // A leader always holds its term's first entry; `None` cannot come from one.
            Ok((read_log_id, _)) => Ok(read_log_id.map_or(0, |id| id.index)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => {
                Err(NodeError::NotLeader)
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => Err(
                NodeError::Unavailable(format!("leadership not confirmed by a majority: {e}")),
            ),
            Err(RaftError::Fatal(_)) => Err(NodeError::Stopped),
        }
    }

    /// Waits, until `deadline`, for this replica to have applied the entry at `index`.
    async fn wait_applied(
        &self,
        index: u64,
        deadline: tokio::time::Instant,
    ) -> Result<(), NodeError> {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match self
            .raft
            .wait(Some(left))
            .applied_index_at_least(Some(index), "read index")
            .await
        {
            Ok(_) => Ok(()),
            Err(openraft::metrics::WaitError::ShuttingDown) => Err(NodeError::Stopped),
            Err(openraft::metrics::WaitError::Timeout(..)) => Err(NodeError::Unavailable(format!(
                "this node had not applied up to the read index {index} in time (behind the leader)"
            ))),
        }
    }

    /// The Raft address of member `id`, from the membership in force.
    fn peer_addr(&self, id: NodeId) -> Option<String> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let node = metrics.membership_config.membership().get_node(&id)?;
        Some(node.addr.clone())
    }

    /// Whether this replica's applied state has retired node `id` (removed from the cluster).
    pub fn knows_retired(&self, id: NodeId) -> bool {
        self.applied.lock().engine.is_retired(id)
    }

    /// Why an incoming Raft message from `sender` is refused, if it is: the sender was
    /// removed (so it cannot disrupt elections or rejoin with its old state), or this node was
    /// (it takes no part any more: its answers, a greater log say, would only hold back
    /// candidates that can win — simulator, seed 1676). The Raft service and the simulator's
    /// router both ask this.
    pub fn refuses_raft_from(&self, sender: Option<NodeId>) -> Option<String> {
        let engine = &self.applied.lock().engine;
        if engine.is_retired(self.id) {
            return Some("this node was removed from the cluster".to_owned());
        }
        sender
            .filter(|s| engine.is_retired(*s))
            .map(|s| format!("node {s} was removed from this cluster"))
    }

    /// How to answer an AppendEntries that [`Node::refuses_raft_from`] refuses, when its
    /// sender was removed but still leads: it cannot apply its own retirement (no member that
    /// applied it acknowledges it), so it would lead for ever, and members that have not yet
    /// applied the retirement would keep following it instead of electing a leader (simulator,
    /// seed 8885: no leader for 40 s). Told of this node's higher vote, it steps down. `None`:
    /// refuse the message as usual (this node holds no higher vote, or is retired itself).
    pub fn higher_vote_for_retired_leader(
        &self,
        leader_vote: &raft_types::Vote,
    ) -> Option<openraft::raft::AppendEntriesResponse<NodeId>> {
        let sender = leader_vote.leader_id().voted_for()?;
        {
            let engine = &self.applied.lock().engine;
            if !engine.is_retired(sender) || engine.is_retired(self.id) {
                return None;
            }
        }
        let ours = self.raft.metrics().borrow().vote;
        (ours > *leader_vote).then_some(openraft::raft::AppendEntriesResponse::HigherVote(ours))
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The Raft address other members reach this node at.
    pub fn advertise_addr(&self) -> &str {
        &self.advertise_addr
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// This node's batch sizes, log flush times and snapshots, cumulative since it started.
    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    /// True when a leader is known, this node's Raft is running and it is not catching up
    /// (at most [`READY_MAX_APPLY_LAG`] entries of its log not yet applied): commands can be
    /// decided now.
    pub fn is_ready(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        let applied = m.last_applied.map_or(0, |l| l.index);
        let apply_lag = m.last_log_index.unwrap_or(0).saturating_sub(applied);
        !self.tx.is_closed()
            && m.running_state.is_ok()
            && m.current_leader.is_some()
            && apply_lag <= READY_MAX_APPLY_LAG
    }

    /// Why this node's Raft stopped on its own, if it did.
    ///
    /// openraft stops its core for good on a fatal error (a storage error, or one of its own
    /// races: 0.9.25 reports a closed replication channel as a snapshot read error when a
    /// leader steps down while a snapshot is being sent). The node cannot recover in place: its
    /// process must exit and be restarted from its data directory, which is intact.
    pub fn raft_failure(&self) -> Option<String> {
        if self.stopping.load(Ordering::SeqCst) {
            return None;
        }
        self.raft
            .metrics()
            .borrow()
            .running_state
            .clone()
            .err()
            .map(|e| e.to_string())
    }

    /// Resolves when this node's Raft stops on its own (never after [`Node::shutdown`]),
    /// with the reason. `tallyd` exits on it so that its supervisor restarts it.
    pub async fn raft_failed(&self) -> String {
        let mut metrics = self.raft.metrics();
        loop {
            if let Some(reason) = self.raft_failure() {
                return reason;
            }
            if metrics.changed().await.is_err() {
                // The core task ended without reporting why (a panic).
                if !self.stopping.load(Ordering::SeqCst) {
                    return "raft core ended".to_owned();
                }
                return std::future::pending().await;
            }
        }
    }

    /// Stops Raft; pending commands get [`NodeError::Stopped`].
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}

/// openraft's configuration for these timings.
fn raft_config(t: &RaftTimings) -> openraft::Config {
    openraft::Config {
        cluster_name: "tally".into(),
        heartbeat_interval: t.heartbeat_ms,
        election_timeout_min: t.election_min_ms,
        election_timeout_max: t.election_max_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(t.snapshot_every_entries),
        max_in_snapshot_log_to_keep: t.logs_kept_behind_snapshot,
        snapshot_max_chunk_size: network::SNAPSHOT_CHUNK_BYTES,
        // Per chunk: generous for a loaded node or a slow link.
        install_snapshot_timeout: 2_000,
        ..openraft::Config::default()
    }
}

/// Records the node id in the data directory, and refuses a directory of another node.
#[allow(clippy::result_large_err)]
fn claim_data_dir(config: &NodeConfig) -> Result<(), NodeStartError> {
    let dir = &config.data_dir;
    let io = |error| NodeStartError::DataDir {
        path: dir.clone(),
        error,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let path = dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(found) if found.trim() == config.node_id.to_string() => Ok(()),
        Ok(found) => Err(NodeStartError::WrongNode {
            path: path.clone(),
            found: found.trim().to_owned(),
            wanted: config.node_id,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&path, format!("{}\n", config.node_id)).map_err(io)?;
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)
        }
        Err(e) => Err(io(e)),
    }
}
