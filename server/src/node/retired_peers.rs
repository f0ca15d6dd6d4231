//! No Raft message goes to a retired node id.
//!
//! A removed member's id is retired through the log before the membership change that takes
//! it out commits (see [`super::membership`]). Incoming messages from a retired id are refused
//! (`api::raft`), but that alone is one-way: while the retired node is still in the membership,
//! the leader keeps sending it entries and heartbeats, and if the retired node's term has run
//! ahead (it was cut off and campaigned), each answer carries that higher vote and deposes the
//! leader. Every new leader is deposed the same way, so the membership change that would end
//! it can never commit (found by the simulator: a livelock with no leader for good).
//!
//! Wrapping every node's Raft network, this filter answers any message to a retired id as
//! unreachable without sending it, and a node that has applied its own retirement asks for no
//! votes (a retired candidate still won the vote of a lagging member that had not yet heard of
//! the retirement, moving it to a higher term, which then deposed the leader — seed 8577). It
//! still sends entries if it leads: a leader removing itself must commit that change. (Silencing
//! it entirely left such a leader unable to finish its own removal — seed 1034.) A retired
//! member is then a silent, dead voter until the change that removes it commits.
//!
//! Incoming, `api::raft` refuses messages from a retired id, and every message once this node
//! knows itself retired (its answers — a greater log — held back candidates that could win).
//! Entries from a retired id that still leads are answered with this node's higher vote, if it
//! holds one ([`super::Node::higher_vote_for_retired_leader`]): such a leader cannot commit or
//! apply its own retirement any more, and would otherwise lead — and hold the members that have
//! not applied it yet — for ever (seed 8885).
//!
//! Architecture invariant: no Raft message flows to or from a retired node id.
//!
//! The same wrapper also notes when a vote this node asked for was refused by a peer with a
//! greater log ([`super::election::Signals`]): a candidate that cannot win then holds back
//! from the elections [`super::election`] would otherwise start for it.

use std::sync::Arc;

use openraft::error::{Infallible, InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode};

use super::election::Signals;
use super::raft_types::{NodeId, TypeConfig};
use super::state_machine::Applied;

type Shared = Arc<parking_lot::Mutex<Applied>>;
type RpcResult<T, E = Infallible> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

/// A Raft network factory whose clients refuse to reach retired ids.
pub struct RetiredPeers<N> {
    inner: N,
    /// This node's own id.
    me: NodeId,
    applied: Shared,
    signals: Arc<Signals>,
}

impl<N> RetiredPeers<N> {
    pub fn new(inner: N, me: NodeId, applied: Shared, signals: Arc<Signals>) -> Self {
        RetiredPeers {
            inner,
            me,
            applied,
            signals,
        }
    }
}

impl<N: RaftNetworkFactory<TypeConfig>> RaftNetworkFactory<TypeConfig> for RetiredPeers<N> {
    type Network = Filtered<N::Network>;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        Filtered {
            inner: self.inner.new_client(target, node).await,
            target,
            me: self.me,
            applied: self.applied.clone(),
            signals: self.signals.clone(),
        }
    }
}

pub struct Filtered<P> {
    inner: P,
    target: NodeId,
    me: NodeId,
    applied: Shared,
    signals: Arc<Signals>,
}

impl<P> Filtered<P> {
    // The error is openraft's own RPC error type, built only when refusing.
    #[allow(clippy::result_large_err)]
    fn refuse<E: std::error::Error>(
        &self,
        even_if_i_am: bool,
    ) -> Result<(), RPCError<NodeId, BasicNode, E>> {
        // Never wait for the apply lock here (a snapshot being serialized holds it): when it is
        // busy, the message goes out; the filter is for liveness, not safety.
        let retired = self.applied.try_lock().and_then(|a| {
            let me = even_if_i_am.then_some(self.me);
            [Some(self.target), me]
                .into_iter()
                .flatten()
                .find(|id| a.engine.is_retired(*id))
        });
        if let Some(id) = retired {
            return Err(RPCError::Unreachable(Unreachable::from(AnyError::error(
                format!("node {id} was removed from this cluster"),
            ))));
        }
        Ok(())
    }
}

impl<P: RaftNetwork<TypeConfig>> RaftNetwork<TypeConfig> for Filtered<P> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        self.refuse(false)?;
        self.inner.append_entries(rpc, option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.refuse(false)?;
        self.inner.install_snapshot(rpc, option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        self.refuse(true)?;
        let ours = rpc.last_log_id;
        let answer = self.inner.vote(rpc, option).await;
        if let Ok(resp) = &answer
            && !resp.vote_granted
            && resp.last_log_id > ours
        {
            self.signals.saw_greater_log();
        }
        answer
    }

    fn backoff(&self) -> Backoff {
        self.inner.backoff()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use openraft::{LeaderId, Vote};

    use super::*;
    use crate::engine::{Command, Engine, EngineSettings};
    use crate::node::raft_types::StoredMembership;

    /// A network whose every RPC is counted and succeeds; votes are granted, or with `ahead`
    /// refused by a peer whose log is longer than any candidate's.
    #[derive(Clone, Default)]
    struct Counting(Arc<AtomicUsize>, bool);

    impl RaftNetworkFactory<TypeConfig> for Counting {
        type Network = Counting;
        async fn new_client(&mut self, _target: NodeId, _node: &BasicNode) -> Counting {
            self.clone()
        }
    }

    impl RaftNetwork<TypeConfig> for Counting {
        async fn append_entries(
            &mut self,
            _rpc: AppendEntriesRequest<TypeConfig>,
            _option: RPCOption,
        ) -> RpcResult<AppendEntriesResponse<NodeId>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(AppendEntriesResponse::Success)
        }

        async fn install_snapshot(
            &mut self,
            _rpc: InstallSnapshotRequest<TypeConfig>,
            _option: RPCOption,
        ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
            unreachable!("not used here")
        }

        async fn vote(
            &mut self,
            rpc: VoteRequest<NodeId>,
            _option: RPCOption,
        ) -> RpcResult<VoteResponse<NodeId>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            if self.1 {
                let theirs = openraft::LogId::new(openraft::CommittedLeaderId::new(1, 0), 10);
                return Ok(VoteResponse::new(rpc.vote, Some(theirs), false));
            }
            Ok(VoteResponse::new(rpc.vote, None, true))
        }
    }

    fn applied(retired: &[NodeId]) -> Shared {
        let mut engine = Engine::new(EngineSettings::default());
        let commands: Vec<Command> = retired
            .iter()
            .map(|id| Command::RetireNode { node_id: *id })
            .collect();
        engine.apply(0, &commands);
        Arc::new(parking_lot::Mutex::new(Applied {
            engine,
            last_applied: None,
            membership: StoredMembership::default(),
        }))
    }

    fn append() -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        }
    }

    fn vote() -> VoteRequest<NodeId> {
        VoteRequest::new(
            Vote {
                leader_id: LeaderId::new(2, 1),
                committed: false,
            },
            None,
        )
    }

    fn option() -> RPCOption {
        RPCOption::new(std::time::Duration::from_secs(1))
    }

    async fn client(
        me: NodeId,
        target: NodeId,
        retired: &[NodeId],
    ) -> (Filtered<Counting>, Counting) {
        let inner = Counting::default();
        let signals = Arc::new(Signals::default());
        let mut peers = RetiredPeers::new(inner.clone(), me, applied(retired), signals);
        (peers.new_client(target, &BasicNode::new("x")).await, inner)
    }

    #[tokio::test]
    async fn nothing_is_sent_to_a_retired_id() {
        let (mut c, sent) = client(1, 3, &[3]).await;
        let refused = c.append_entries(append(), option()).await.unwrap_err();
        assert!(matches!(refused, RPCError::Unreachable(_)), "{refused:?}");
        assert!(c.vote(vote(), option()).await.is_err());
        assert_eq!(sent.0.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_retired_node_asks_no_votes_but_a_leader_still_sends_entries() {
        let (mut c, sent) = client(1, 2, &[1]).await;
        assert!(c.vote(vote(), option()).await.is_err());
        assert_eq!(sent.0.load(Ordering::SeqCst), 0);
        // A leader removing itself must still commit that change.
        c.append_entries(append(), option()).await.unwrap();
        assert_eq!(sent.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_vote_refused_by_a_greater_log_is_signalled() {
        let signals = Arc::new(Signals::default());
        let mut c = Filtered {
            inner: Counting(Arc::default(), true),
            target: 2,
            me: 1,
            applied: applied(&[]),
            signals: signals.clone(),
        };
        let window = std::time::Duration::from_secs(60);
        assert!(!signals.greater_log_within(window));
        c.vote(vote(), option()).await.unwrap();
        assert!(signals.greater_log_within(window));
    }

    #[tokio::test]
    async fn members_talk_freely() {
        let (mut c, sent) = client(1, 2, &[7]).await;
        c.append_entries(append(), option()).await.unwrap();
        c.vote(vote(), option()).await.unwrap();
        assert_eq!(sent.0.load(Ordering::SeqCst), 2);
    }
}
