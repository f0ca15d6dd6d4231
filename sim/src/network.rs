//! `SimNetwork`: an in-memory router for Raft RPCs and forwarded commands, with faults.
//!
//! A message is handed to the router, travels for a simulated delay, and is delivered by
//! calling the target node's `Raft::{append_entries, vote, install_snapshot}` (or, for a
//! forwarded batch, its proposer); the answer travels back the same way. Faults, all drawn
//! from the seed:
//! - **loss**: a request or an answer is dropped (the sender times out, as over TCP);
//! - **delay and reordering**: every message has its own random delay, so messages overtake
//!   each other, and a request its sender gave up on may still arrive later;
//! - **duplication**: a request is delivered twice (the copy's answer goes nowhere);
//! - **partitions**: directed links are cut — symmetric splits, one-way cuts, an isolated
//!   leader — checked when a message is sent and again when it arrives, and healed later;
//! - **crashed nodes**: a call to a node that is down fails at once as unreachable (connection
//!   refused); one that is in flight when its target dies is lost.
//!
//! Not simulated: tonic/gRPC and HTTP/2 (framing, keepalive, connection setup, message size
//! limits), the production network module's retries, and the real `tally.v1.Forward` service.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use parking_lot::Mutex;
use tally_server::engine::{Command, Outcome};
use tally_server::node::forward::{FORWARD_TIMEOUT, ForwardTransport};
use tally_server::node::raft_types::{NodeId, Raft};
use tally_server::node::{Node, NodeError};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::rng::SimRng;

/// How links behave when nothing special is going on.
#[derive(Clone, Copy, Debug)]
pub struct LinkModel {
    /// One-way delay, µs, uniform.
    pub delay_us: (u64, u64),
    pub loss: f64,
    pub duplicate: f64,
}

/// A temporary degradation of every link (overlapping episodes combine: the worst wins).
#[derive(Clone, Copy, Debug)]
pub struct Episode {
    pub loss: f64,
    pub duplicate: f64,
    /// Extra one-way delay, ms, uniform (wide ranges reorder messages).
    pub extra_delay_ms: (u64, u64),
}

#[derive(Clone, Copy, Debug, Default)]
pub struct NetStats {
    pub sent: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub refused: u64,
    /// Entries of a retired leader answered with a higher vote instead of being refused.
    pub retired_leaders_deposed: u64,
    pub snapshots_delivered: u64,
    pub forwards: u64,
}

struct NetState {
    /// The live incarnation of each node that is up, with its epoch.
    nodes: BTreeMap<NodeId, (u64, Node)>,
    /// Cut directed links, by the fault that cut them.
    cuts: BTreeMap<u64, BTreeSet<(NodeId, NodeId)>>,
    episodes: BTreeMap<u64, Episode>,
    base: LinkModel,
    stats: NetStats,
}

/// The in-memory network every node of one simulation shares.
pub struct Router {
    state: Mutex<NetState>,
    rng: SimRng,
    /// Where each tagged request was last forwarded to: rid → (node, epoch). The oracle uses
    /// it to know which leader answered a call.
    forwarded: Mutex<BTreeMap<u64, (NodeId, u64)>>,
}

/// What happens to one message.
struct Fate {
    lost: bool,
    delay: Duration,
    duplicate: Option<Duration>,
}

impl Router {
    pub fn new(rng: SimRng, base: LinkModel) -> Arc<Router> {
        Arc::new(Router {
            state: Mutex::new(NetState {
                nodes: BTreeMap::new(),
                cuts: BTreeMap::new(),
                episodes: BTreeMap::new(),
                base,
                stats: NetStats::default(),
            }),
            rng,
            forwarded: Mutex::new(BTreeMap::new()),
        })
    }

    /// Node `id`'s incarnation `epoch` is up.
    pub fn up(&self, id: NodeId, epoch: u64, node: Node) {
        self.state.lock().nodes.insert(id, (epoch, node));
    }

    pub fn down(&self, id: NodeId) -> Option<Node> {
        self.state.lock().nodes.remove(&id).map(|(_, n)| n)
    }

    pub fn node(&self, id: NodeId) -> Option<Node> {
        self.state.lock().nodes.get(&id).map(|(_, n)| n.clone())
    }

    /// The node and the epoch of its running incarnation.
    pub fn incarnation(&self, id: NodeId) -> Option<(u64, Node)> {
        self.state.lock().nodes.get(&id).cloned()
    }

    /// True while incarnation `epoch` of node `id` runs. A crashed process answers nothing:
    /// whatever its leftover tasks compute after the crash is dropped, not delivered.
    pub fn alive(&self, id: NodeId, epoch: u64) -> bool {
        self.state
            .lock()
            .nodes
            .get(&id)
            .is_some_and(|(e, _)| *e == epoch)
    }

    pub fn live(&self) -> Vec<(NodeId, Node)> {
        let s = self.state.lock();
        s.nodes
            .iter()
            .map(|(id, (_, n))| (*id, n.clone()))
            .collect()
    }

    /// Cuts every directed link in `links` until [`Router::heal_cut`] with the same id.
    pub fn cut(&self, fault: u64, links: BTreeSet<(NodeId, NodeId)>) {
        self.state.lock().cuts.insert(fault, links);
    }

    pub fn heal_cut(&self, fault: u64) {
        self.state.lock().cuts.remove(&fault);
    }

    pub fn degrade(&self, fault: u64, episode: Episode) {
        self.state.lock().episodes.insert(fault, episode);
    }

    pub fn heal_episode(&self, fault: u64) {
        self.state.lock().episodes.remove(&fault);
    }

    /// Heals every partition and episode, and makes the base links clean (no loss).
    pub fn heal_all(&self) {
        let mut s = self.state.lock();
        s.cuts.clear();
        s.episodes.clear();
        s.base.loss = 0.0;
        s.base.duplicate = 0.0;
    }

    /// The node (and incarnation) request `rid` was last forwarded to, if any.
    pub fn forwarded_to(&self, rid: u64) -> Option<(NodeId, u64)> {
        self.forwarded.lock().get(&rid).copied()
    }

    pub fn stats(&self) -> NetStats {
        self.state.lock().stats
    }

    pub fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        let s = self.state.lock();
        s.cuts.values().any(|links| links.contains(&(from, to)))
    }

    fn fate(&self, from: NodeId, to: NodeId, may_duplicate: bool) -> Fate {
        let (base, worst) = {
            let mut s = self.state.lock();
            s.stats.sent += 1;
            let mut worst = Episode {
                loss: 0.0,
                duplicate: 0.0,
                extra_delay_ms: (0, 0),
            };
            for e in s.episodes.values() {
                worst.loss = worst.loss.max(e.loss);
                worst.duplicate = worst.duplicate.max(e.duplicate);
                worst.extra_delay_ms.0 = worst.extra_delay_ms.0.max(e.extra_delay_ms.0);
                worst.extra_delay_ms.1 = worst.extra_delay_ms.1.max(e.extra_delay_ms.1);
            }
            (s.base, worst)
        };
        let _ = (from, to);
        let delay = |rng: &SimRng| {
            let us = rng.between(base.delay_us.0, base.delay_us.1)
                + rng.between(worst.extra_delay_ms.0, worst.extra_delay_ms.1) * 1000;
            Duration::from_micros(us)
        };
        let lost = self.rng.chance(base.loss.max(worst.loss));
        let delay_1 = delay(&self.rng);
        let duplicate = (may_duplicate && self.rng.chance(base.duplicate.max(worst.duplicate)))
            .then(|| delay(&self.rng));
        let mut s = self.state.lock();
        if lost {
            s.stats.lost += 1;
        }
        if duplicate.is_some() {
            s.stats.duplicated += 1;
        }
        Fate {
            lost,
            delay: delay_1,
            duplicate,
        }
    }

    fn count(&self, f: impl FnOnce(&mut NetStats)) {
        f(&mut self.state.lock().stats)
    }
}

/// Why a delivery produced no answer from the target's Raft.
#[allow(clippy::large_enum_variant)]
enum Undelivered<E> {
    /// The target is down (or died while handling the call).
    Down,
    /// The target's Raft answered with an error.
    Remote(RaftError<NodeId, E>),
}

type Reply<R, E> = oneshot::Sender<Result<R, Undelivered<E>>>;

/// Carries one request to `to` after `delay` and its answer back (unless `reply` is `None`:
/// a duplicate whose answer nobody waits for).
async fn deliver<R, E, F, Fut>(
    router: Arc<Router>,
    from: NodeId,
    to: NodeId,
    delay: Duration,
    call: Arc<Call<F, R>>,
    reply: Option<Reply<R, E>>,
) where
    F: Fn(Raft) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, RaftError<NodeId, E>>> + Send + 'static,
    R: Send + 'static,
    E: std::error::Error + Send + 'static,
{
    tokio::time::sleep(delay).await;
    if router.is_cut(from, to) {
        router.count(|s| s.lost += 1);
        return;
    }
    let Some((epoch, node)) = router.incarnation(to) else {
        // Connection reset: the target died while the request travelled.
        if let Some(reply) = reply {
            let _ = reply.send(Err(Undelivered::Down));
        }
        return;
    };
    // What the server's Raft service refuses (a removed sender, or a removed self), and what
    // it answers instead, if anything.
    let answer = if node.refuses_raft_from(Some(from)).is_some() {
        match (call.refused)(&node) {
            Some(r) => {
                router.count(|s| s.retired_leaders_deposed += 1);
                Ok(r)
            }
            None => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(Undelivered::Down));
                }
                return;
            }
        }
    } else {
        let raft = node.raft().clone();
        drop(node);
        match (call.send)(raft).await {
            Ok(r) => Ok(r),
            Err(RaftError::Fatal(_)) => Err(Undelivered::Down),
            Err(e) => Err(Undelivered::Remote(e)),
        }
    };
    if !router.alive(to, epoch) {
        // The target crashed while handling it: no answer leaves a dead process.
        if let Some(reply) = reply {
            let _ = reply.send(Err(Undelivered::Down));
        }
        return;
    }
    let Some(reply) = reply else {
        return;
    };
    let back = router.fate(to, from, false);
    if back.lost {
        return;
    }
    tokio::time::sleep(back.delay).await;
    if router.is_cut(to, from) {
        router.count(|s| s.lost += 1);
        return;
    }
    let _ = reply.send(answer);
}

type Refused<R> = Box<dyn Fn(&Node) -> Option<R> + Send + Sync>;

/// One Raft RPC: how the target's Raft handles it, and what the target's Raft service
/// answers instead when it refuses the sender (`None`: nothing, as for an unreachable node).
struct Call<F, R> {
    send: F,
    refused: Refused<R>,
}

/// Sends one Raft RPC through the router and waits for its answer at most `ttl`.
async fn rpc<R, E, F, Fut>(
    router: &Arc<Router>,
    from: NodeId,
    to: NodeId,
    action: RPCTypes,
    ttl: Duration,
    call: Call<F, R>,
) -> Result<R, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
where
    F: Fn(Raft) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, RaftError<NodeId, E>>> + Send + 'static,
    R: Send + 'static,
    E: std::error::Error + Send + 'static,
{
    let deadline = Instant::now() + ttl;
    let timeout = || {
        RPCError::Timeout(Timeout {
            action,
            id: from,
            target: to,
            timeout: ttl,
        })
    };
    let unreachable = || {
        RPCError::Unreachable(Unreachable::new(&std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("node {to} is down"),
        )))
    };
    if router.node(to).is_none() {
        router.count(|s| s.refused += 1);
        tokio::time::sleep(Duration::from_millis(1)).await;
        return Err(unreachable());
    }
    if router.is_cut(from, to) {
        router.count(|s| s.lost += 1);
        tokio::time::sleep_until(deadline).await;
        return Err(timeout());
    }
    let fate = router.fate(from, to, true);
    let call = Arc::new(call);
    if let Some(delay) = fate.duplicate {
        tokio::spawn(deliver(router.clone(), from, to, delay, call.clone(), None));
    }
    let (tx, rx) = oneshot::channel();
    if !fate.lost {
        tokio::spawn(deliver(
            router.clone(),
            from,
            to,
            fate.delay,
            call,
            Some(tx),
        ));
    }
    match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(Ok(r))) => Ok(r),
        Ok(Ok(Err(Undelivered::Remote(e)))) => Err(RPCError::RemoteError(RemoteError::new(to, e))),
        Ok(Ok(Err(Undelivered::Down))) => Err(unreachable()),
        // Lost on the way there or back: the sender learns nothing until its deadline.
        Ok(Err(_)) => {
            tokio::time::sleep_until(deadline).await;
            Err(timeout())
        }
        Err(_) => Err(timeout()),
    }
}

/// openraft's network factory for node `from`.
pub struct SimNetwork {
    pub from: NodeId,
    pub router: Arc<Router>,
}

impl RaftNetworkFactory<tally_server::node::raft_types::TypeConfig> for SimNetwork {
    type Network = SimPeer;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> SimPeer {
        SimPeer {
            from: self.from,
            target,
            router: self.router.clone(),
        }
    }
}

pub struct SimPeer {
    from: NodeId,
    target: NodeId,
    router: Arc<Router>,
}

type TC = tally_server::node::raft_types::TypeConfig;

impl RaftNetwork<TC> for SimPeer {
    async fn append_entries(
        &mut self,
        rpc_req: AppendEntriesRequest<TC>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let vote = rpc_req.vote;
        rpc(
            &self.router,
            self.from,
            self.target,
            RPCTypes::AppendEntries,
            option.hard_ttl(),
            Call {
                send: move |raft: Raft| {
                    let req = rpc_req.clone();
                    async move { raft.append_entries(req).await }
                },
                refused: Box::new(move |node: &Node| node.higher_vote_for_retired_leader(&vote)),
            },
        )
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc_req: InstallSnapshotRequest<TC>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let router = self.router.clone();
        let result = rpc(
            &self.router,
            self.from,
            self.target,
            RPCTypes::InstallSnapshot,
            option.hard_ttl(),
            Call {
                send: move |raft: Raft| {
                    let req = rpc_req.clone();
                    async move { raft.install_snapshot(req).await }
                },
                refused: Box::new(|_: &Node| None),
            },
        )
        .await;
        if result.is_ok() {
            router.count(|s| s.snapshots_delivered += 1);
        }
        result
    }

    async fn vote(
        &mut self,
        rpc_req: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        rpc(
            &self.router,
            self.from,
            self.target,
            RPCTypes::Vote,
            option.hard_ttl(),
            Call {
                send: move |raft: Raft| {
                    let req = rpc_req.clone();
                    async move { raft.vote(req).await }
                },
                refused: Box::new(|_: &Node| None),
            },
        )
        .await
    }
}

/// Follower → leader forwarding over the router.
///
/// Difference from production: the leader side calls `Node::propose` (public) where the real
/// `tally.v1.Forward` service calls `Node::propose_here` (crate-private), which refuses to
/// forward again. To stay close, a forwarded batch that reaches a node that does not believe
/// it leads is refused with `NotLeader`, as `propose_here` would; but a leader that loses its
/// leadership between that check and its proposer taking the batch forwards it once more
/// instead of refusing.
pub struct SimForward {
    pub from: NodeId,
    pub router: Arc<Router>,
}

/// The node id in a simulated address (`sim-3` → 3).
pub fn node_of_addr(addr: &str) -> Option<NodeId> {
    addr.strip_prefix("sim-")?.parse().ok()
}

pub fn addr_of(id: NodeId) -> String {
    format!("sim-{id}")
}

impl SimForward {
    async fn forward(&self, addr: &str, commands: Vec<Command>) -> Result<Vec<Outcome>, NodeError> {
        let unavailable =
            |why: &str| NodeError::Unavailable(format!("forward to leader {addr}: {why}"));
        let Some(to) = node_of_addr(addr) else {
            return Err(unavailable("bad address"));
        };
        let from = self.from;
        let router = &self.router;
        router.count(|s| s.forwards += 1);
        let deadline = Instant::now() + FORWARD_TIMEOUT;
        if router.node(to).is_none() {
            tokio::time::sleep(Duration::from_millis(1)).await;
            return Err(unavailable("connection refused"));
        }
        if router.is_cut(from, to) {
            tokio::time::sleep_until(deadline).await;
            return Err(unavailable("deadline exceeded"));
        }
        // Never duplicated: a forwarded batch is not idempotent, and HTTP/2 does not resend it.
        let fate = router.fate(from, to, false);
        let (tx, rx) = oneshot::channel::<Result<Vec<Outcome>, NodeError>>();
        if !fate.lost {
            let router = router.clone();
            tokio::spawn(async move {
                tokio::time::sleep(fate.delay).await;
                if router.is_cut(from, to) {
                    return;
                }
                let Some((epoch, node)) = router.incarnation(to) else {
                    let _ = tx.send(Err(NodeError::Unavailable("connection reset".into())));
                    return;
                };
                {
                    let mut forwarded = router.forwarded.lock();
                    for c in &commands {
                        if let Command::RateLimit(rl) = c
                            && let Some(rid) = crate::workload::rid_of(rl)
                        {
                            forwarded.insert(rid, (to, epoch));
                        }
                    }
                }
                let answer = serve_forwarded(&node, to, commands).await;
                drop(node);
                if !router.alive(to, epoch) {
                    let _ = tx.send(Err(NodeError::Unavailable(
                        "connection reset (leader crashed)".into(),
                    )));
                    return;
                }
                let back = router.fate(to, from, false);
                if back.lost {
                    return;
                }
                tokio::time::sleep(back.delay).await;
                if router.is_cut(to, from) {
                    return;
                }
                let _ = tx.send(answer);
            });
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(answer)) => answer.map_err(|e| unavailable(&e.to_string())),
            Ok(Err(_)) => {
                tokio::time::sleep_until(deadline).await;
                Err(unavailable("deadline exceeded"))
            }
            Err(_) => Err(unavailable("deadline exceeded")),
        }
    }
}

/// The leader's side of a forwarded batch, as `tally.v1.Forward` does it: every command
/// proposed at once (so they share batches), answered in order; any failure fails the call.
async fn serve_forwarded(
    node: &Node,
    id: NodeId,
    commands: Vec<Command>,
) -> Result<Vec<Outcome>, NodeError> {
    if node.raft().metrics().borrow().current_leader != Some(id) {
        return Err(NodeError::NotLeader);
    }
    let waits: Vec<_> = commands
        .into_iter()
        .map(|c| {
            let node = node.clone();
            tokio::spawn(async move { node.propose(c).await })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(waits.len());
    for wait in waits {
        let outcome = wait
            .await
            .map_err(|e| NodeError::Unavailable(e.to_string()))??;
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

impl ForwardTransport for SimForward {
    fn propose<'a>(
        &'a self,
        addr: &'a str,
        commands: Vec<Command>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Vec<Outcome>, NodeError>> + Send + 'a>,
    > {
        Box::pin(self.forward(addr, commands))
    }

    /// As `tally.v1.Forward`'s ReadIndex: routed to the leader in memory under the same faults
    /// as a forwarded batch (loss, delay, cuts, crashes), within [`FORWARD_TIMEOUT`].
    fn read_index<'a>(
        &'a self,
        addr: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, NodeError>> + Send + 'a>>
    {
        Box::pin(async move {
            let unavailable =
                |why: &str| NodeError::Unavailable(format!("read index from leader {addr}: {why}"));
            let Some(to) = node_of_addr(addr) else {
                return Err(unavailable("bad address"));
            };
            let (from, router) = (self.from, self.router.clone());
            let deadline = Instant::now() + FORWARD_TIMEOUT;
            if router.node(to).is_none() {
                tokio::time::sleep(Duration::from_millis(1)).await;
                return Err(unavailable("connection refused"));
            }
            let fate = router.fate(from, to, false);
            let (tx, rx) = oneshot::channel::<Result<u64, NodeError>>();
            if !fate.lost && !router.is_cut(from, to) {
                tokio::spawn(async move {
                    tokio::time::sleep(fate.delay).await;
                    if router.is_cut(from, to) {
                        return;
                    }
                    let Some((epoch, node)) = router.incarnation(to) else {
                        let _ = tx.send(Err(NodeError::Unavailable("connection reset".into())));
                        return;
                    };
                    let answer = node.read_index_here().await;
                    drop(node);
                    let back = router.fate(to, from, false);
                    if !router.alive(to, epoch) || back.lost {
                        return;
                    }
                    tokio::time::sleep(back.delay).await;
                    if !router.is_cut(to, from) {
                        let _ = tx.send(answer);
                    }
                });
            }
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(answer)) => answer.map_err(|e| unavailable(&e.to_string())),
                // Lost on the way: the caller sees its deadline pass, as over TCP.
                Ok(Err(_)) => {
                    tokio::time::sleep_until(deadline).await;
                    Err(unavailable("deadline exceeded"))
                }
                Err(_) => Err(unavailable("deadline exceeded")),
            }
        })
    }
}
