//! `tally.v1.Cluster`: membership changes and status, on the Raft listener.
//!
//! Membership changes and status are the leader's business: a follower passes the call on to
//! the leader it knows (one hop; a call that was passed on is never passed on again), over
//! the node's own forwarding channel to it ([`Node::peer_channel`]): with the cluster's mutual
//! TLS when the Raft listener has it, so the leader sees this node's certificate.
//!
//! Every membership change is recorded in the audit log (`Command::AuditNote`, by the
//! leader, with the caller and the membership before and after) once it is made.
//!
//! A removed node's id is retired through the log (`Command::RetireNode`), so every replica
//! refuses it from then on: it is never added again, and a node that applied its own
//! retirement refuses to start from that data directory.

use std::collections::{BTreeMap, BTreeSet};

use openraft::BasicNode;
use tally_proto::tally::v1::cluster_client::ClusterClient;
use tally_proto::tally::v1::cluster_server::{self, ClusterServer};
use tally_proto::tally::v1::{
    AddLearnerRequest, ClusterStatus, ClusterStatusRequest, InitRequest, Member, PromoteRequest,
    RemoveRequest,
};
use tonic::{Request, Response, Status};

use super::audit::actor;
use crate::engine::audit::{Actor, AuditNote};
use crate::engine::{Command, Outcome};
use crate::node::Node;
use crate::node::raft_types::NodeId;

/// Metadata marking a call that a follower passed on.
const PASSED_ON: &str = "x-tally-passed-on";

pub struct ClusterService {
    node: Node,
}

pub fn cluster_service(node: Node) -> ClusterServer<ClusterService> {
    ClusterServer::new(ClusterService { node })
}

/// The status as this node sees it (the leader's view includes replication progress).
fn status_of(node: &Node) -> ClusterStatus {
    let m = node.raft().metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let last = m.last_log_index;
    let members = membership
        .nodes()
        .map(|(id, n)| {
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(id))
                .map(|l| l.map_or(0, |l| l.index));
            Member {
                id: *id,
                addr: n.addr.clone(),
                voter: voters.contains(id),
                matched_index: matched,
                lag: matched.zip(last).map(|(mi, l)| l.saturating_sub(mi)),
            }
        })
        .collect();
    let leader_addr = m
        .current_leader
        .and_then(|l| membership.get_node(&l))
        .map(|n| n.addr.clone())
        .unwrap_or_default();
    ClusterStatus {
        answered_by: m.id,
        leader_id: m.current_leader,
        leader_addr,
        term: m.current_term,
        last_log_index: last,
        applied_index: m.last_applied.map(|l| l.index),
        members,
    }
}

/// The membership as audit records show it: each member's address and role.
fn membership_json(status: &ClusterStatus) -> String {
    let members: BTreeMap<String, serde_json::Value> = status
        .members
        .iter()
        .map(|m| {
            let role = if m.voter { "voter" } else { "learner" };
            (
                m.id.to_string(),
                serde_json::json!({ "addr": m.addr, "role": role }),
            )
        })
        .collect();
    crate::engine::audit::object_json(&members)
}

/// How long recording a membership change in the audit log may take.
const AUDIT_NOTE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Records a membership change that was made (the change is done whatever becomes of the
/// record: a record that cannot be written is logged as an error instead).
async fn record(node: &Node, actor: Actor, action: &str, target: String, before: String) {
    let after = membership_json(&status_of(node));
    let note = Command::AuditNote(AuditNote {
        actor,
        action: action.to_owned(),
        target: target.clone(),
        before: Some(before),
        after: Some(after),
    });
    match tokio::time::timeout(AUDIT_NOTE_WAIT, node.propose(note)).await {
        Ok(Ok(Outcome::AuditRecorded { .. })) => {}
        other => tracing::error!(
            action,
            target,
            result = ?other.map(|r| r.map(|_| ())),
            "a membership change was made but could not be recorded in the audit log"
        ),
    }
}

fn raft_error(e: impl std::fmt::Display) -> Status {
    Status::failed_precondition(e.to_string())
}

impl ClusterService {
    /// The leader's address when this node is a follower and may pass the call on.
    fn leader_elsewhere<T>(&self, request: &Request<T>) -> Result<Option<String>, Status> {
        let status = status_of(&self.node);
        match status.leader_id {
            Some(l) if l == self.node.id() => Ok(None),
            Some(_) if request.metadata().contains_key(PASSED_ON) => {
                Err(Status::unavailable("leadership is moving; try again"))
            }
            Some(_) => Ok(Some(status.leader_addr)),
            None => Err(Status::unavailable("no leader is known")),
        }
    }

    async fn leader_client(
        &self,
        addr: &str,
    ) -> Result<ClusterClient<tonic::transport::Channel>, Status> {
        let channel = self
            .node
            .peer_channel(addr)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(ClusterClient::new(channel))
    }
}

/// `request`'s message, marked as passed on, with the caller's bearer token (so the leader
/// checks the same credentials the follower was shown).
fn passed_on<T>(request: Request<T>) -> Request<T> {
    let token = request.metadata().get("authorization").cloned();
    let mut r = Request::new(request.into_inner());
    r.metadata_mut()
        .insert(PASSED_ON, "1".parse().expect("valid metadata"));
    if let Some(token) = token {
        r.metadata_mut().insert("authorization", token);
    }
    r
}

#[tonic::async_trait]
impl cluster_server::Cluster for ClusterService {
    async fn init(&self, request: Request<InitRequest>) -> Result<Response<ClusterStatus>, Status> {
        let actor = actor(&request);
        let before = membership_json(&status_of(&self.node));
        let raft = self.node.raft();
        let mut members: BTreeMap<NodeId, BasicNode> = request
            .into_inner()
            .members
            .into_iter()
            .map(|m| (m.id, BasicNode::new(m.addr)))
            .collect();
        if members.is_empty() {
            members.insert(self.node.id(), BasicNode::new(self.node.advertise_addr()));
        }
        for id in members.keys() {
            self.node.refuse_retired(*id).await?;
        }
        raft.initialize(members).await.map_err(raft_error)?;
        // Recorded once a leader is elected (the log takes no entry before).
        let node = self.node.clone();
        let target = format!("node {}", node.id());
        tokio::spawn(async move { record(&node, actor, "cluster.init", target, before).await });
        Ok(Response::new(status_of(&self.node)))
    }

    async fn status(
        &self,
        request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatus>, Status> {
        if let Some(addr) = self.leader_elsewhere(&request)? {
            let mut c = self.leader_client(&addr).await?;
            return c.status(passed_on(request)).await;
        }
        // Read index: confirms leadership with a majority before answering.
        self.node.read_linearizable(|_| ()).await?;
        Ok(Response::new(status_of(&self.node)))
    }

    async fn add_learner(
        &self,
        request: Request<AddLearnerRequest>,
    ) -> Result<Response<ClusterStatus>, Status> {
        if let Some(addr) = self.leader_elsewhere(&request)? {
            let mut c = self.leader_client(&addr).await?;
            return c.add_learner(passed_on(request)).await;
        }
        let actor = actor(&request);
        let before = membership_json(&status_of(&self.node));
        let r = request.into_inner();
        // Blocking: answers once the learner has caught up with the log.
        self.node.add_learner(r.id, &r.addr).await?;
        let target = format!("node {}", r.id);
        record(&self.node, actor, "cluster.add-learner", target, before).await;
        Ok(Response::new(status_of(&self.node)))
    }

    async fn promote(
        &self,
        request: Request<PromoteRequest>,
    ) -> Result<Response<ClusterStatus>, Status> {
        if let Some(addr) = self.leader_elsewhere(&request)? {
            let mut c = self.leader_client(&addr).await?;
            return c.promote(passed_on(request)).await;
        }
        let actor = actor(&request);
        let before = membership_json(&status_of(&self.node));
        let id = request.into_inner().id;
        self.node.promote(id).await?;
        record(
            &self.node,
            actor,
            "cluster.promote",
            format!("node {id}"),
            before,
        )
        .await;
        Ok(Response::new(status_of(&self.node)))
    }

    async fn remove(
        &self,
        request: Request<RemoveRequest>,
    ) -> Result<Response<ClusterStatus>, Status> {
        if let Some(addr) = self.leader_elsewhere(&request)? {
            let mut c = self.leader_client(&addr).await?;
            return c.remove(passed_on(request)).await;
        }
        let actor = actor(&request);
        let before = membership_json(&status_of(&self.node));
        let id = request.into_inner().id;
        self.node.remove(id).await?;
        record(
            &self.node,
            actor,
            "cluster.remove",
            format!("node {id}"),
            before,
        )
        .await;
        Ok(Response::new(status_of(&self.node)))
    }
}
