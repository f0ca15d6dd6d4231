//! Mutual TLS between Raft peers, end to end: every member's Raft listener requires a client
//! certificate signed by the cluster's CA, and every connection a member opens to another
//! (Raft, forwarding and read indexes, cluster calls passed on to the leader) presents its
//! own. Certificates are made at run time (`common/certs.rs`); everything on 127.0.0.1,
//! port 0.

#[path = "common/certs.rs"]
mod certs;
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use certs::{Ca, Leaf, channel, server_tls};
use common::*;
use openraft::error::RPCError;
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::VoteRequest;
use openraft::{BasicNode, Vote};
use tally_proto::tally::v1::admin_client::AdminClient;
use tally_proto::tally::v1::cluster_client::ClusterClient;
use tally_proto::tally::v1::{
    AddLearnerRequest, ClusterStatus, ClusterStatusRequest, GetStatusRequest, InitRequest, Member,
    PromoteRequest,
};
use tally_server::engine::{Command, Descriptor, EngineStatus, Mode, RateLimitCommand};
use tally_server::node::forward::Forwarder;
use tally_server::node::network::Network;
use tally_server::node::{ManualClock, Node, RaftTimings};
use tally_server::server::{self, Listeners, RunningServer, ServerConfig, TlsConfig};
use tokio::net::TcpListener;
use tonic::transport::Channel;

const LIMITS: &str = r#"
domains:
  - domain: test
    limits:
      - name: per-user
        match: { kind: req }
        by: [user]
        capacity: 100
        window: 1h
"#;

/// The members' timings: quick heartbeats, and elections slow enough that none starts by
/// accident while a test watches the term (a loaded machine can delay a heartbeat by a few
/// hundred ms).
fn member_timings() -> RaftTimings {
    RaftTimings {
        election_min_ms: 1_500,
        election_max_ms: 3_000,
        ..fast_timings()
    }
}

/// Waits for the node of a server that has just been spawned (set once `Node::start` is done).
async fn node_of(server: &RunningServer) -> Node {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(node) = server.node() {
            return node;
        }
        assert!(!server.is_finished(), "the server stopped while starting");
        assert!(Instant::now() < deadline, "the node started within 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `check` every 20 ms until it holds, for at most `limit`.
async fn wait_until<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Who a node believes leads, and at which term.
fn leader_and_term(node: &Node) -> (Option<u64>, u64) {
    let m = node.raft().metrics().borrow().clone();
    (m.current_leader, m.current_term)
}

/// The engine's counts on a node's own replica (not a linearizable read).
async fn engine_status(node: &Node) -> EngineStatus {
    node.read(|e| e.status()).await.unwrap()
}

/// Three members with raft mTLS under one CA.
struct TlsCluster {
    ca: Ca,
    /// A certificate the cluster's CA signed, as an operator's `tally cluster --ca
    /// --client-cert --client-key` would present.
    operator: Leaf,
    _dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    servers: Vec<RunningServer>,
    nodes: Vec<Node>,
}

/// A server on fresh 127.0.0.1 ports, serving `limits` with `raft_tls`.
async fn spawn_node(
    node_id: u64,
    dir: &std::path::Path,
    clock: Arc<ManualClock>,
    bootstrap: bool,
    timings: RaftTimings,
    raft_tls: Option<TlsConfig>,
) -> RunningServer {
    let bind = || TcpListener::bind("127.0.0.1:0");
    let listeners = Listeners {
        grpc: bind().await.unwrap(),
        http: bind().await.unwrap(),
        raft: bind().await.unwrap(),
    };
    let config = ServerConfig {
        limits: server::LimitsSource::Inline {
            origin: "test limits".into(),
            text: LIMITS.into(),
        },
        clock,
        node_id,
        data_dir: dir.join(format!("node-{node_id}")),
        bootstrap,
        timings,
        raft_tls,
        ..ServerConfig::default()
    };
    server::spawn_on(listeners, config).await.unwrap()
}

impl TlsCluster {
    /// Node 1 bootstraps; node 2 is added (as a learner, then promoted) through node 1's
    /// `tally.v1.Cluster`, node 3 through node 2's, which passes the calls on to the leader
    /// over the cluster's TLS. Every member is ready (its limits are in force: followers
    /// forwarded them to the leader) when this returns.
    async fn three() -> TlsCluster {
        let ca = Ca::new("tally cluster CA");
        let operator = ca.leaf("operator");
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(T0_MS));
        let mut servers = Vec::new();
        for id in 1..=3u64 {
            let tls = server_tls(&ca.leaf(&format!("node {id}")), Some(&ca));
            let s = spawn_node(
                id,
                dir.path(),
                clock.clone(),
                id == 1,
                member_timings(),
                Some(tls),
            )
            .await;
            if id == 1 {
                s.wait_ready(Duration::from_secs(10)).await.unwrap();
            }
            servers.push(s);
        }
        let mut c = TlsCluster {
            ca,
            operator,
            _dir: dir,
            clock,
            servers,
            nodes: Vec::new(),
        };
        for (id, via) in [(2u64, 1usize), (3, 2)] {
            let addr = c.servers[id as usize - 1].raft_addr.to_string();
            let mut admin = c.cluster_client(via);
            admin
                .add_learner(AddLearnerRequest { id, addr })
                .await
                .unwrap_or_else(|e| panic!("add node {id} via node {via}: {e:?}"));
            admin
                .promote(PromoteRequest { id })
                .await
                .unwrap_or_else(|e| panic!("promote node {id} via node {via}: {e:?}"));
        }
        for s in &c.servers {
            s.wait_ready(Duration::from_secs(10)).await.unwrap();
        }
        for s in &c.servers {
            c.nodes.push(node_of(s).await);
        }
        c
    }

    /// `tally.v1.Cluster` on member `i` (1-based), over TLS with the operator's certificate.
    fn cluster_client(&self, i: usize) -> ClusterClient<Channel> {
        let raft = self.servers[i - 1].raft_addr;
        ClusterClient::new(channel(raft, Some(&self.ca), Some(&self.operator)))
    }

    async fn status_from(&self, i: usize) -> ClusterStatus {
        self.cluster_client(i)
            .status(ClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// The leader's 1-based index, once every member agrees on one (at most 10 s).
    async fn agreed_leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let views: Vec<_> = self.nodes.iter().map(leader_and_term).collect();
            if let (Some(l), t) = views[0]
                && views.iter().all(|v| *v == (Some(l), t))
                && self.nodes[l as usize - 1]
                    .raft()
                    .metrics()
                    .borrow()
                    .state
                    .is_leader()
            {
                return l as usize;
            }
            assert!(
                Instant::now() < deadline,
                "one leader within 10 s: {views:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn raft_addr(&self, i: usize) -> String {
        self.servers[i - 1].raft_addr.to_string()
    }

    async fn stop(self) {
        for s in self.servers {
            s.stop().await.expect("a member stops cleanly");
        }
    }
}

/// `ShouldRateLimit` for `user` on member `server`'s gRPC listener (plaintext: its TLS is
/// separate from the Raft listener's).
async fn hit(server: &RunningServer, user: &str) -> Code {
    let mut rls =
        tally_proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient::new(
            connect(server.grpc_addr).await,
        );
    let r = rls
        .should_rate_limit(req(
            "test",
            vec![desc(&[("kind", "req"), ("user", user)])],
            1,
        ))
        .await
        .unwrap()
        .into_inner();
    code(&r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_raft_mtls_elects_forwards_and_reads_linearizably() {
    // Forming the cluster already went through TLS end to end: members added over the
    // Cluster service (node 3 through a follower, passed on to the leader), the learners
    // caught up by Raft, and each follower's limits forwarded to the leader.
    let c = TlsCluster::three().await;
    let leader = c.agreed_leader().await;
    // A follower passes the status call on to the leader (over TLS), which confirms its
    // leadership with a majority before answering.
    let follower = if leader == 3 { 2 } else { 3 };
    let status = c.status_from(follower).await;
    assert_eq!(status.answered_by, leader as u64, "{status:?}");
    assert_eq!(status.leader_id, Some(leader as u64));
    assert_eq!(status.members.len(), 3, "{status:?}");
    assert!(status.members.iter().all(|m| m.voter), "{status:?}");
    for m in &status.members {
        assert_eq!(m.addr, c.raft_addr(m.id as usize));
        assert!(
            m.matched_index.is_some_and(|i| i > 0),
            "replicated to {m:?}"
        );
    }

    // Writes through a follower: forwarded to the leader, committed, answered.
    let (writer, reader) = match leader {
        1 => (2, 3),
        2 => (1, 3),
        _ => (1, 2),
    };
    for n in 0..10 {
        assert_eq!(
            hit(&c.servers[writer - 1], &format!("w{n}")).await,
            Code::Ok
        );
    }
    // A linearizable read on the other follower (read index from the leader over TLS, then
    // its own apply up to it) sees every one of them, at once.
    let live = c.nodes[reader - 1]
        .read_linearizable(|e| e.status().live_counters)
        .await
        .expect("a linearizable read on a follower");
    assert_eq!(live, 10, "the read reflects every acknowledged write");
    // And every member applies them.
    for (i, node) in c.nodes.iter().enumerate() {
        wait_until(
            &format!("node {} applied the writes", i + 1),
            Duration::from_secs(5),
            || async { engine_status(node).await.live_counters == 10 },
        )
        .await;
    }
    // The same counter decides on every member: one more hit on user w0 through the other
    // follower leaves 100 - 2.
    let mut rls =
        tally_proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient::new(
            connect(c.servers[reader - 1].grpc_addr).await,
        );
    let r = rls
        .should_rate_limit(req(
            "test",
            vec![desc(&[("kind", "req"), ("user", "w0")])],
            1,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.statuses[0].limit_remaining, 98, "{r:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_cluster_certificate_can_neither_join_nor_disturb_it() {
    let c = TlsCluster::three().await;
    let leader = c.agreed_leader().await;
    let (_, term) = leader_and_term(&c.nodes[leader - 1]);
    let applied_before = engine_status(&c.nodes[leader - 1]).await.applied_commands;
    let intruders = tempfile::tempdir().unwrap();

    // Node 4 speaks no TLS at all. The leader is asked to add it as a learner: the change
    // commits (the voters agree) and the call answers (openraft counts a learner within
    // `replication_lag_threshold` entries as caught up), but the leader's connections to it
    // fail the handshake, so no entry ever reaches it (checked below, after a while).
    let plain = spawn_node(
        4,
        intruders.path(),
        c.clock.clone(),
        false,
        fast_timings(),
        None,
    )
    .await;
    let plain_node = node_of(&plain).await;
    c.cluster_client(leader)
        .add_learner(AddLearnerRequest {
            id: 4,
            addr: plain.raft_addr.to_string(),
        })
        .await
        .expect("node 4 is put in the membership");

    // Node 5 has a certificate from another CA (and trusts the cluster's CA, as anyone may:
    // it is public). Initialised as a cluster of itself and the three members, it campaigns
    // through its own network, at terms above the cluster's, and never learns of a leader.
    let other = Ca::new("someone else");
    let rogue_tls = TlsConfig {
        client_ca_pem: Some(c.ca.pem.clone().into_bytes()),
        ..server_tls(&other.leaf("intruder"), None)
    };
    let rogue = spawn_node(
        5,
        intruders.path(),
        c.clock.clone(),
        false,
        fast_timings(),
        Some(rogue_tls.clone()),
    )
    .await;
    let rogue_node = node_of(&rogue).await;
    let mut members: Vec<Member> = (1..=3)
        .map(|id| Member {
            id,
            addr: c.raft_addr(id as usize),
            ..Member::default()
        })
        .collect();
    members.push(Member {
        id: 5,
        addr: rogue.raft_addr.to_string(),
        ..Member::default()
    });
    // Its own listener: its certificate (another CA's), clients from the cluster's CA.
    ClusterClient::new(channel(rogue.raft_addr, Some(&other), Some(&c.operator)))
        .init(InitRequest { members })
        .await
        .expect("the intruder initialises its own view");
    wait_until(
        "the intruder campaigned at terms above the cluster's",
        Duration::from_secs(10),
        || async { leader_and_term(&rogue_node).1 >= term + 3 },
    )
    .await;

    // The same refusal, call by call, against a control that holds the cluster's
    // certificate: with it, a forwarded write, a read index and a vote request reach the
    // leader and are answered; with the intruder's certificate (what node 5 dials with), or
    // with no TLS, none of them gets past the handshake.
    let leader_addr = c.raft_addr(leader);
    let write = |user: &str| {
        vec![Command::RateLimit(RateLimitCommand {
            domain: "test".into(),
            descriptors: vec![Descriptor {
                entries: vec![("kind".into(), "req".into()), ("user".into(), user.into())],
                hits: None,
                limit_override: None,
            }],
            hits: 1,
            mode: Mode::Enforce,
        })]
    };
    let vote = |term, from| VoteRequest::new(Vote::new(term, from), None);
    let rpc = RPCOption::new(Duration::from_secs(2));
    let insider_tls = server_tls(&c.ca.leaf("node 6"), Some(&c.ca))
        .peer_client("insider")
        .unwrap();
    let insider = Forwarder::with_tls(6, Some(insider_tls.clone()));
    let outcomes = insider
        .propose(&leader_addr, write("insider"))
        .await
        .expect("a write forwarded with the cluster's certificate is served");
    assert_eq!(outcomes.len(), 1);
    insider.read_index(&leader_addr).await.unwrap();
    let answer = Network::with_tls(6, Some(insider_tls))
        .new_client(leader as u64, &BasicNode::new(&leader_addr))
        .await
        .vote(vote(term, 6), rpc.clone())
        .await
        .expect("a vote request with the cluster's certificate is answered");
    assert!(!answer.vote_granted, "{answer:?}");

    let rogue_client = rogue_tls.peer_client("intruder").unwrap();
    for (what, forwarder) in [
        (
            "another CA's certificate",
            Forwarder::with_tls(5, Some(rogue_client.clone())),
        ),
        ("no TLS", Forwarder::new(5)),
    ] {
        let e = forwarder
            .propose(&leader_addr, write("rogue"))
            .await
            .expect_err(what);
        assert!(
            matches!(e, tally_server::node::NodeError::Unavailable(_)),
            "{what}: {e:?}"
        );
        forwarder.read_index(&leader_addr).await.expect_err(what);
    }
    for (what, network) in [
        (
            "another CA's certificate",
            Network::with_tls(5, Some(rogue_client)),
        ),
        ("no TLS", Network::new(5)),
    ] {
        let e = network
            .clone()
            .new_client(leader as u64, &BasicNode::new(&leader_addr))
            .await
            .vote(vote(term + 100, 5), rpc.clone())
            .await
            .expect_err(what);
        assert!(matches!(e, RPCError::Unreachable(_)), "{what}: {e:?}");
    }

    // Nothing reached the cluster: every member still follows the same leader at the same
    // term, and it still commits writes (through a follower).
    for (i, node) in c.nodes.iter().enumerate() {
        assert_eq!(
            leader_and_term(node),
            (Some(leader as u64), term),
            "node {}",
            i + 1
        );
    }
    let follower = if leader == 1 { 2 } else { 1 };
    assert_eq!(hit(&c.servers[follower - 1], "after").await, Code::Ok);
    // The insider's forwarded write was applied, the intruder's was not (check-only probes).
    let mut rls =
        tally_proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient::new(
            connect(c.servers[follower - 1].grpc_addr).await,
        );
    for (user, remaining) in [("insider", 99), ("rogue", 100)] {
        let probe = with_hits(desc(&[("kind", "req"), ("user", user)]), 0);
        let r = rls
            .should_rate_limit(req("test", vec![probe], 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.statuses[0].limit_remaining, remaining, "{user}: {r:?}");
    }
    let applied = c.nodes[leader - 1]
        .read_linearizable(|e| e.status().applied_commands)
        .await
        .unwrap();
    assert!(applied > applied_before, "{applied} > {applied_before}");
    for (i, node) in c.nodes.iter().enumerate() {
        assert_eq!(
            leader_and_term(node),
            (Some(leader as u64), term),
            "node {}",
            i + 1
        );
    }

    // Nothing reached the intruders either: node 4 is a learner in the membership that was
    // never replicated to, knows no leader and holds no entry; node 5 never found a leader.
    let status = c.status_from(leader).await;
    let learner = status
        .members
        .iter()
        .find(|m| m.id == 4)
        .unwrap_or_else(|| panic!("node 4 was added as a learner: {status:?}"));
    assert!(!learner.voter, "{learner:?}");
    assert!(status.members.iter().all(|m| m.id != 5), "{status:?}");
    let replication = c.nodes[leader - 1]
        .raft()
        .metrics()
        .borrow()
        .replication
        .clone();
    assert_eq!(
        replication.as_ref().and_then(|r| r.get(&4)),
        Some(&None),
        "the leader replicates to node 4 and never matched an entry: {replication:?}"
    );
    let m = plain_node.raft().metrics().borrow().clone();
    assert_eq!(m.current_leader, None, "{m:?}");
    assert_eq!(m.last_log_index, None, "node 4's log is empty: {m:?}");
    assert_eq!(m.last_applied, None, "{m:?}");
    assert_eq!(rogue_node.raft().metrics().borrow().current_leader, None);
    for (id, server) in [(4, &plain), (5, &rogue)] {
        let s = AdminClient::new(connect(server.grpc_addr).await)
            .get_status(GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (
                s.applied_commands,
                s.applied_batches,
                s.live_counters,
                s.limits
            ),
            (0, 0, 0, 0),
            "node {id} applied nothing: {s:?}"
        );
        assert!(
            server.wait_ready(Duration::ZERO).await.is_err(),
            "node {id} is not ready"
        );
    }
    rogue.stop().await.unwrap();
    plain.stop().await.unwrap();
    c.stop().await;
}

#[test]
fn peer_client_tls_needs_the_cluster_ca_and_usable_pem() {
    let ca = Ca::new("tally cluster CA");
    let leaf = ca.leaf("node");
    const WHAT: &str = "--raft-tls-cert/--raft-tls-key/--raft-tls-ca";
    server_tls(&leaf, Some(&ca)).peer_client(WHAT).unwrap();
    let e = server_tls(&leaf, None).peer_client(WHAT).unwrap_err();
    assert!(e.to_string().starts_with(WHAT), "{e}");
    assert!(e.to_string().contains("CA"), "{e}");
    let garbage = TlsConfig {
        key_pem: b"not a key".to_vec(),
        ..server_tls(&leaf, Some(&ca))
    };
    let e = garbage.peer_client(WHAT).unwrap_err();
    assert!(e.to_string().starts_with(WHAT), "{e}");
    assert!(!e.to_string().contains("PRIVATE KEY"), "{e}");
}
