//! The Raft network over real gRPC: real `openraft::Raft` instances, each on its own tokio
//! runtime (so a node can be killed hard: its runtime is dropped with every task and socket),
//! serving `tally.v1.Raft` on 127.0.0.1 and talking through `node::network::Network`.
//!
//! The log store and state machine here are in-memory test doubles (a `BTreeMap` log; a state
//! machine that records applied batches); the production ones live in `node/`.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{Fatal, RPCError, RaftError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, VoteRequest, VoteResponse};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    BasicNode, CommittedLeaderId, Config, EntryPayload, LogState, RaftLogReader,
    RaftSnapshotBuilder, ServerState, SnapshotPolicy,
};
use parking_lot::Mutex;
use tally_proto::tally::v1::RaftPayload;
use tally_proto::tally::v1::raft_client::RaftClient;
use tally_server::api::raft::raft_service;
use tally_server::engine::{Command, Descriptor, Mode, RateLimitCommand};
use tally_server::node::network::{MAX_RAFT_MESSAGE_BYTES, Network};
use tally_server::node::raft_types::{
    Batch, BatchOutcome, Entry, LogId, NodeId, Raft, Snapshot, SnapshotMeta, StorageError,
    StoredMembership, TypeConfig, Vote,
};
use tokio_stream::wrappers::TcpListenerStream;

/// Every wait in these tests gives up after this long.
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Test doubles: an in-memory log store and a state machine that records applied batches.

#[derive(Default)]
struct LogInner {
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
    log: BTreeMap<u64, Entry>,
}

#[derive(Clone, Default)]
struct MemLog(Arc<Mutex<LogInner>>);

impl RaftLogReader<TypeConfig> for MemLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(self
            .0
            .lock()
            .log
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for MemLog {
    type LogReader = MemLog;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let inner = self.0.lock();
        let last = inner.log.values().next_back().map(|e| e.log_id);
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last.or(inner.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> MemLog {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.0.lock().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.0.lock().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.0.lock().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.0.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        {
            let mut inner = self.0.lock();
            for entry in entries {
                inner.log.insert(entry.log_id.index, entry);
            }
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.0.lock().log.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut inner = self.0.lock();
        inner.log = inner.log.split_off(&(log_id.index + 1));
        inner.last_purged = Some(log_id);
        Ok(())
    }
}

#[derive(Default)]
struct SmInner {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    batches: Vec<Batch>,
    snapshot: Option<(SnapshotMeta, Vec<u8>)>,
    snapshots_built: u64,
}

/// What a snapshot of the test state machine holds.
type SmImage = (Option<LogId>, StoredMembership, Vec<Batch>);

#[derive(Clone, Default)]
struct MemSm(Arc<Mutex<SmInner>>);

impl MemSm {
    fn batches(&self) -> Vec<Batch> {
        self.0.lock().batches.clone()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for MemSm {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let mut inner = self.0.lock();
        let image: SmImage = (
            inner.last_applied,
            inner.membership.clone(),
            inner.batches.clone(),
        );
        let data = postcard::to_stdvec(&image).expect("encode snapshot");
        inner.snapshots_built += 1;
        let meta = SnapshotMeta {
            last_log_id: inner.last_applied,
            last_membership: inner.membership.clone(),
            snapshot_id: format!("snap-{}", inner.snapshots_built),
        };
        inner.snapshot = Some((meta.clone(), data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for MemSm {
    type SnapshotBuilder = MemSm;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let inner = self.0.lock();
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<BatchOutcome>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut inner = self.0.lock();
        let mut outcomes = Vec::new();
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(batch) => inner.batches.push(batch),
                EntryPayload::Membership(m) => {
                    inner.membership = StoredMembership::new(Some(entry.log_id), m)
                }
            }
            outcomes.push(BatchOutcome::default());
        }
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> MemSm {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let (last_applied, membership, batches): SmImage =
            postcard::from_bytes(&data).expect("decode snapshot");
        let mut inner = self.0.lock();
        inner.last_applied = last_applied;
        inner.membership = membership;
        inner.batches = batches;
        inner.snapshot = Some((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        Ok(self.0.lock().snapshot.clone().map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// Harness.

fn config() -> Arc<Config> {
    Arc::new(
        Config {
            cluster_name: "tally-test".into(),
            heartbeat_interval: 50,
            election_timeout_min: 150,
            election_timeout_max: 300,
            ..Default::default()
        }
        .validate()
        .expect("valid config"),
    )
}

/// A node: its Raft, its state machine, its network, and the runtime everything of it runs on.
struct TestNode {
    id: NodeId,
    addr: String,
    raft: Raft,
    sm: MemSm,
    network: Network,
    runtime: Option<tokio::runtime::Runtime>,
}

/// A listener on 127.0.0.1, any free port.
fn listener() -> std::net::TcpListener {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    listener
}

impl TestNode {
    /// Starts node `id` serving `tally.v1.Raft` on `listener`, on a runtime of its own.
    async fn start(id: NodeId, listener: std::net::TcpListener, config: Arc<Config>) -> TestNode {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("node-{id}"))
            .enable_all()
            .build()
            .expect("runtime");
        let addr = listener.local_addr().expect("local addr").to_string();
        let network = Network::new(id);
        let sm = MemSm::default();
        let raft = runtime
            .spawn({
                let (network, sm) = (network.clone(), sm.clone());
                async move {
                    let raft = Raft::new(id, config, network, MemLog::default(), sm)
                        .await
                        .expect("raft starts");
                    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                    tokio::spawn(
                        tonic::transport::Server::builder()
                            .tcp_nodelay(true)
                            .add_service(raft_service(raft.clone()))
                            .serve_with_incoming(TcpListenerStream::new(listener)),
                    );
                    raft
                }
            })
            .await
            .expect("node starts");
        TestNode {
            id,
            addr,
            raft,
            sm,
            network,
            runtime: Some(runtime),
        }
    }

    fn node(&self) -> BasicNode {
        BasicNode::new(&self.addr)
    }

    /// Kills the node hard: every task of it stops and every socket closes at once.
    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    fn is_alive(&self) -> bool {
        self.runtime.is_some()
    }

    fn metrics(&self) -> openraft::RaftMetrics<NodeId, BasicNode> {
        self.raft.metrics().borrow().clone()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` every 10 ms until it returns `Some`, for at most [`WAIT`].
async fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(t) = check() {
            return t;
        }
        assert!(
            start.elapsed() < WAIT,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until every live node agrees on one live leader, and returns its index in `nodes`.
async fn wait_leader(nodes: &[TestNode], not: Option<NodeId>) -> usize {
    wait_for("a leader every live node agrees on", || {
        let live: Vec<&TestNode> = nodes.iter().filter(|n| n.is_alive()).collect();
        let leader = live[0].metrics().current_leader?;
        if Some(leader) == not {
            return None;
        }
        if !live
            .iter()
            .all(|n| n.metrics().current_leader == Some(leader))
        {
            return None;
        }
        let index = nodes.iter().position(|n| n.id == leader && n.is_alive())?;
        (nodes[index].metrics().state == ServerState::Leader).then_some(index)
    })
    .await
}

/// The batch written with stamp `stamp_ms`: odd stamps carry a rate-limit command (so real
/// engine commands cross the wire), even ones are empty.
fn batch(stamp_ms: i64) -> Batch {
    let commands = if stamp_ms % 2 == 1 {
        vec![Command::RateLimit(RateLimitCommand {
            domain: "tally-test".into(),
            descriptors: vec![Descriptor {
                entries: vec![("key".into(), format!("value-{stamp_ms}"))],
                hits: Some(stamp_ms as u64),
                limit_override: None,
            }],
            hits: 1,
            mode: Mode::Enforce,
        })]
    } else {
        vec![]
    };
    Batch::new(stamp_ms, commands)
}

async fn write(leader: &TestNode, stamp_ms: i64) -> LogId {
    let response = tokio::time::timeout(WAIT, leader.raft.client_write(batch(stamp_ms)))
        .await
        .expect("client_write in time")
        .expect("client_write succeeds");
    response.log_id
}

/// Waits until every live node's state machine applied exactly the batches of `stamps`, in
/// order.
async fn wait_applied(nodes: &[TestNode], stamps: &[i64]) {
    let expected: Vec<Batch> = stamps.iter().map(|&s| batch(s)).collect();
    wait_for("every live node to apply every batch", || {
        nodes
            .iter()
            .filter(|n| n.is_alive())
            .all(|n| n.sm.batches() == expected)
            .then_some(())
    })
    .await
}

fn multi_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn run<F: Future<Output = ()>>(test: F) {
    let runtime = multi_thread_runtime();
    runtime.block_on(async move {
        tokio::time::timeout(Duration::from_secs(60), test)
            .await
            .expect("test finished within 60 s");
    });
    runtime.shutdown_background();
}

// ---------------------------------------------------------------------------------------------
// Tests.

/// Three nodes elect a leader, replicate writes to every state machine, survive the leader's
/// hard death (a new leader is elected and takes writes), and never open more than one channel
/// per peer however many clients openraft asks for.
#[test]
fn three_nodes_replicate_fail_over_and_keep_one_channel_per_peer() {
    run(async {
        let listeners = [listener(), listener(), listener()];
        let mut nodes = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            nodes.push(TestNode::start(i as NodeId + 1, listener, config()).await);
        }
        let members: BTreeMap<NodeId, BasicNode> = nodes.iter().map(|n| (n.id, n.node())).collect();
        nodes[0].raft.initialize(members).await.expect("initialize");

        let leader = wait_leader(&nodes, None).await;
        let mut stamps = Vec::new();
        for stamp in 1..=5 {
            write(&nodes[leader], stamp).await;
            stamps.push(stamp);
        }
        wait_applied(&nodes, &stamps).await;

        // openraft asks for a new client for every election and every read-index round
        // (`ensure_linearizable`); they all share the peer's channel.
        for _ in 0..5 {
            nodes[leader]
                .raft
                .ensure_linearizable()
                .await
                .expect("read index");
        }
        for node in &nodes {
            let stats = node.network.stats();
            assert!(stats.channels_created <= 2, "node {}: {stats:?}", node.id);
        }
        let leader_stats = nodes[leader].network.stats();
        assert_eq!(leader_stats.channels_created, 2, "{leader_stats:?}");
        assert!(leader_stats.clients_created >= 12, "{leader_stats:?}");

        // Kill the leader hard; the others elect a new one and keep taking writes.
        let old = nodes[leader].id;
        let killed_at = Instant::now();
        nodes[leader].kill();
        let leader = wait_leader(&nodes, Some(old)).await;
        let failover = killed_at.elapsed();
        assert_ne!(nodes[leader].id, old);
        for stamp in 6..=8 {
            write(&nodes[leader], stamp).await;
            stamps.push(stamp);
        }
        wait_applied(&nodes, &stamps).await;
        eprintln!("failover took {failover:?}");

        // Calls to the dead node fail and redial on the same channel, never a new one.
        for node in nodes.iter().filter(|n| n.is_alive()) {
            let stats = node.network.stats();
            assert!(stats.channels_created <= 2, "node {}: {stats:?}", node.id);
        }
        let leader_stats = nodes[leader].network.stats();
        assert_eq!(leader_stats.channels_created, 2, "{leader_stats:?}");
    });
}

/// A learner added after the leader purged its log catches up by a snapshot sent in many
/// chunks through `InstallSnapshot`.
#[test]
fn learner_catches_up_by_chunked_snapshot() {
    run(async {
        let config = Arc::new(
            Config {
                snapshot_policy: SnapshotPolicy::LogsSinceLast(5),
                max_in_snapshot_log_to_keep: 0,
                purge_batch_size: 1,
                snapshot_max_chunk_size: 16,
                ..(*config()).clone()
            }
            .validate()
            .expect("valid config"),
        );
        let mut nodes = vec![TestNode::start(1, listener(), config.clone()).await];
        let members = BTreeMap::from([(1, nodes[0].node())]);
        nodes[0].raft.initialize(members).await.expect("initialize");
        wait_leader(&nodes, None).await;
        let stamps: Vec<i64> = (1..=20).collect();
        let mut last = None;
        for &stamp in &stamps {
            last = Some(write(&nodes[0], stamp).await);
        }
        let last = last.expect("writes");
        wait_for("the leader to snapshot and purge its log", || {
            let m = nodes[0].metrics();
            let purged = m.purged?.index;
            (m.snapshot?.index + 5 > last.index && purged >= stamps.len() as u64 / 2).then_some(())
        })
        .await;
        let snapshot_bytes = nodes[0]
            .sm
            .0
            .lock()
            .snapshot
            .as_ref()
            .expect("snapshot")
            .1
            .len();
        assert!(
            snapshot_bytes > 4 * 16,
            "snapshot of {snapshot_bytes} bytes"
        );

        nodes.push(TestNode::start(2, listener(), config.clone()).await);
        let learner = nodes[1].node();
        tokio::time::timeout(WAIT, nodes[0].raft.add_learner(2, learner, true))
            .await
            .expect("learner added in time")
            .expect("learner added");
        wait_applied(&nodes, &stamps).await;
        let m = nodes[1].metrics();
        assert!(
            m.snapshot.is_some(),
            "the learner installed a snapshot: {m:?}"
        );
        assert_eq!(nodes[1].network.stats().channels_created, 0);
        assert_eq!(nodes[0].network.stats().channels_created, 1);
    });
}

/// The wire contract: a payload that does not decode is INVALID_ARGUMENT; a valid one gets the
/// postcard encoding of the Raft handler's result.
#[test]
fn undecodable_payload_is_invalid_argument() {
    run(async {
        let node = TestNode::start(1, listener(), config()).await;
        let mut client = RaftClient::connect(format!("http://{}", node.addr))
            .await
            .expect("connect");
        let garbage = || {
            tonic::Request::new(RaftPayload {
                data: vec![0xff; 9],
            })
        };
        let statuses = [
            client.append_entries(garbage()).await.expect_err("append"),
            client.vote(garbage()).await.expect_err("vote"),
            client
                .install_snapshot(garbage())
                .await
                .expect_err("snapshot"),
        ];
        for status in statuses {
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            assert!(status.message().starts_with("data: "), "{status:?}");
        }

        let vote = VoteRequest::new(Vote::new(1, 2), None);
        let response = client
            .vote(tonic::Request::new(RaftPayload {
                data: postcard::to_stdvec(&vote).expect("encode"),
            }))
            .await
            .expect("vote answered");
        let result: Result<VoteResponse<NodeId>, RaftError<NodeId>> =
            postcard::from_bytes(&response.into_inner().data).expect("decodable result");
        assert!(result.expect("vote handled").vote_granted);
    });
}

/// Errors openraft can act on: nobody listening → Unreachable, quickly (bounded retries);
/// a peer that never answers → Timeout at the deadline; a peer whose Raft is shut down answers
/// with its error → RemoteError carrying it, typed.
#[test]
fn errors_map_to_unreachable_timeout_and_remote() {
    run(async {
        let mut network = Network::new(9);
        let vote = || VoteRequest::new(Vote::new(1, 9), None);

        // Nothing listens on the port.
        let closed = listener();
        let closed_addr = closed.local_addr().expect("addr").to_string();
        drop(closed);
        let mut peer = network.new_client(1, &BasicNode::new(&closed_addr)).await;
        let start = Instant::now();
        let err = peer
            .vote(vote(), RPCOption::new(Duration::from_secs(2)))
            .await
            .expect_err("nobody listens");
        assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");
        assert!(
            start.elapsed() < Duration::from_millis(1500),
            "{:?}",
            start.elapsed()
        );

        // An append-entries request over the message bound is never sent: openraft is asked
        // to send fewer entries, or (one entry alone too big) to back off.
        let big = |index: u64| Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 9), index),
            payload: EntryPayload::Normal(Batch::new(
                0,
                vec![Command::RateLimit(RateLimitCommand {
                    domain: "x".repeat(MAX_RAFT_MESSAGE_BYTES / 2),
                    descriptors: vec![],
                    hits: 1,
                    mode: Mode::Enforce,
                })],
            )),
        };
        let append = |entries: Vec<Entry>| AppendEntriesRequest {
            vote: Vote::new_committed(1, 9),
            prev_log_id: None,
            entries,
            leader_commit: None,
        };
        let option = RPCOption::new(Duration::from_secs(2));
        let err = peer
            .append_entries(append(vec![big(1), big(2), big(3)]), option.clone())
            .await
            .expect_err("too large");
        assert!(matches!(err, RPCError::PayloadTooLarge(_)), "{err:?}");
        let err = peer
            .append_entries(append(vec![big(1), big(2)]), option)
            .await
            .expect_err("one entry too large");
        assert!(matches!(err, RPCError::PayloadTooLarge(_)), "{err:?}");
        let mut lone = big(1);
        if let EntryPayload::Normal(batch) = &mut lone.payload {
            batch.commands.push(batch.commands[0].clone());
            batch.commands.push(batch.commands[0].clone());
        }
        let err = peer
            .append_entries(append(vec![lone]), RPCOption::new(Duration::from_secs(2)))
            .await
            .expect_err("one entry too large");
        assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");

        // The kernel accepts the connection but nobody speaks HTTP/2 on it.
        let silent = listener();
        let silent_addr = silent.local_addr().expect("addr").to_string();
        let mut peer = network.new_client(2, &BasicNode::new(&silent_addr)).await;
        let start = Instant::now();
        let err = peer
            .vote(vote(), RPCOption::new(Duration::from_millis(200)))
            .await
            .expect_err("nobody answers");
        let took = start.elapsed();
        assert!(matches!(err, RPCError::Timeout(_)), "{err:?}");
        assert!(
            took >= Duration::from_millis(190) && took < Duration::from_millis(1500),
            "{took:?}"
        );
        drop(silent);

        // The peer's server is up but its Raft has stopped: the Raft error comes back typed.
        let node = TestNode::start(3, listener(), config()).await;
        node.raft.shutdown().await.expect("shutdown");
        let mut peer = network.new_client(3, &node.node()).await;
        let err = peer
            .vote(vote(), RPCOption::new(Duration::from_secs(2)))
            .await
            .expect_err("raft stopped");
        match err {
            RPCError::RemoteError(remote) => {
                assert_eq!(remote.target, 3);
                assert!(
                    matches!(remote.source, RaftError::Fatal(Fatal::Stopped)),
                    "{remote:?}"
                );
            }
            other => panic!("expected a remote error, got {other:?}"),
        }

        // A changed address replaces the peer's channel; an unchanged one reuses it.
        let before = network.stats().channels_created;
        let _ = network.new_client(3, &node.node()).await;
        assert_eq!(network.stats().channels_created, before);
        let _ = network.new_client(3, &BasicNode::new(&closed_addr)).await;
        assert_eq!(network.stats().channels_created, before + 1);
    });
}
