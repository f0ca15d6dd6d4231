//! Three-node clusters on 127.0.0.1: replication, forwarding, failover, restart, catch-up by
//! snapshot, and a minority that answers UNAVAILABLE within the caller's deadline.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tally_proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tally_proto::tally::v1::admin_client::AdminClient;
use tally_proto::tally::v1::cluster_client::ClusterClient;
use tally_proto::tally::v1::{
    AddLearnerRequest, ClusterStatus, ClusterStatusRequest, GetStatusRequest, PromoteRequest,
};
use tally_server::node::ManualClock;
use tally_server::server::{self, LimitsSource, Listeners, RunningServer, ServerConfig};
use tokio::net::TcpListener;
use tonic::transport::Channel;

const LIMITS: &str = r#"
domains:
  - domain: test
    limits:
      - name: per-user
        match: { kind: req }
        by: [user]
        capacity: 5
        window: 1h
      - name: hot
        match: { kind: hot }
        by: [user]
        capacity: 1000
        window: 1h
"#;

struct Cluster {
    dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    raft_addrs: Vec<SocketAddr>,
    nodes: Vec<Option<RunningServer>>,
}

impl Cluster {
    /// Node `i` (1-based) serving on its fixed Raft address.
    async fn start_node(&mut self, i: usize, bootstrap: bool) {
        let listeners = Listeners {
            grpc: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            http: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            raft: TcpListener::bind(self.raft_addrs[i - 1]).await.unwrap(),
        };
        let config = ServerConfig {
            limits: LimitsSource::Inline {
                origin: "test limits".into(),
                text: LIMITS.into(),
            },
            clock: self.clock.clone(),
            node_id: i as u64,
            data_dir: self.dir.path().join(format!("node-{i}")),
            bootstrap,
            timings: fast_timings(),
            ..ServerConfig::default()
        };
        self.nodes[i - 1] = Some(server::spawn_on(listeners, config).await.unwrap());
    }

    /// Three nodes: node 1 bootstraps, 2 and 3 join as learners and are promoted.
    async fn three() -> Cluster {
        let mut raft_addrs = Vec::new();
        for _ in 0..3 {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            raft_addrs.push(l.local_addr().unwrap());
        }
        let mut c = Cluster {
            dir: tempfile::tempdir().unwrap(),
            clock: Arc::new(ManualClock::new(T0_MS)),
            raft_addrs,
            nodes: vec![None, None, None],
        };
        c.start_node(1, true).await;
        c.node(1).wait_ready(Duration::from_secs(10)).await.unwrap();
        c.start_node(2, false).await;
        c.start_node(3, false).await;
        let mut admin = c.cluster_client(1).await;
        for id in [2u64, 3] {
            admin
                .add_learner(AddLearnerRequest {
                    id,
                    addr: c.raft_addrs[id as usize - 1].to_string(),
                })
                .await
                .unwrap();
            admin.promote(PromoteRequest { id }).await.unwrap();
        }
        for i in 1..=3 {
            c.node(i).wait_ready(Duration::from_secs(10)).await.unwrap();
        }
        c
    }

    fn node(&self, i: usize) -> &RunningServer {
        self.nodes[i - 1].as_ref().expect("node running")
    }

    async fn cluster_client(&self, i: usize) -> ClusterClient<Channel> {
        ClusterClient::new(connect(self.raft_addrs[i - 1]).await)
    }

    async fn rls(&self, i: usize) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::new(connect(self.node(i).grpc_addr).await)
    }

    async fn status_from(&self, i: usize) -> ClusterStatus {
        self.cluster_client(i)
            .await
            .status(ClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// Waits until some running node other than `not` reports itself leader.
    async fn leader(&self, not: Option<u64>) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for i in 1..=3 {
                if self.nodes[i - 1].is_none() {
                    continue;
                }
                if let Ok(s) = self
                    .cluster_client(i)
                    .await
                    .status(ClusterStatusRequest {})
                    .await
                {
                    let s = s.into_inner();
                    if let Some(l) = s.leader_id
                        && Some(l) != not
                        && s.answered_by == l
                    {
                        return l;
                    }
                }
            }
            assert!(Instant::now() < deadline, "a leader within 10 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(&mut self, i: usize) {
        let node = self.nodes[i - 1].take().expect("running");
        node.stop().await.unwrap();
    }
}

async fn ask(
    rls: &mut RateLimitServiceClient<Channel>,
    kind: &str,
    user: &str,
) -> Result<Code, tonic::Status> {
    let r = rls
        .should_rate_limit(req(
            "test",
            vec![desc(&[("kind", kind), ("user", user)])],
            0,
        ))
        .await?;
    Ok(code(&r.into_inner()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_and_followers_forward() {
    let c = Cluster::three().await;
    let status = c.status_from(2).await;
    assert_eq!(status.members.len(), 3);
    assert!(status.members.iter().all(|m| m.voter));
    assert_eq!(
        status.answered_by,
        status.leader_id.unwrap(),
        "a follower passes status on"
    );
    // 5 per hour per user, asked of all three nodes: exactly 5 admitted.
    let mut admitted = 0;
    for round in 0..3 {
        for i in 1..=3 {
            let _ = round;
            if ask(&mut c.rls(i).await, "req", "u").await.unwrap() == Code::Ok {
                admitted += 1;
            }
        }
    }
    assert_eq!(admitted, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_under_load_never_over_admits_or_loses_an_ack() {
    let mut c = Cluster::three().await;
    let leader = c.leader(None).await as usize;
    let followers: Vec<usize> = (1..=3).filter(|i| *i != leader).collect();
    let mut clients = Vec::new();
    for k in 0..64 {
        // Clients spread over all three nodes, as Envoy pointed at all of them would be.
        clients.push(c.rls(1 + k % 3).await);
    }
    let mut tasks = Vec::new();
    for mut rls in clients {
        tasks.push(tokio::spawn(async move {
            let mut acked = 0u32;
            let stop_at = Instant::now() + Duration::from_secs(4);
            for _ in 0..40 {
                if Instant::now() > stop_at {
                    break;
                }
                match ask(&mut rls, "hot", "h").await {
                    Ok(Code::Ok) => acked += 1,
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    c.stop(leader).await;
    let mut acked = 0;
    for t in tasks {
        acked += t.await.unwrap();
    }
    assert!(acked <= 1000, "admitted {acked} > 1000");
    // Every acknowledged hit is in the new leader's counter: a check-only request sees
    // exactly 1000 - used remaining, and used >= acked.
    let new_leader = c.leader(Some(leader as u64)).await as usize;
    assert!(followers.contains(&new_leader));
    let mut rls = c.rls(new_leader).await;
    let probe = with_hits(desc(&[("kind", "hot"), ("user", "h")]), 0);
    let r = rls
        .should_rate_limit(req("test", vec![probe], 0))
        .await
        .unwrap()
        .into_inner();
    let used = 1000 - r.statuses[0].limit_remaining;
    assert!(
        used >= acked,
        "acknowledged {acked} but the counter holds {used}"
    );
    assert!(acked > 0, "some traffic got through");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_of_every_node_keeps_counters() {
    let mut c = Cluster::three().await;
    let mut rls = c.rls(1).await;
    for _ in 0..3 {
        assert_eq!(ask(&mut rls, "req", "r").await.unwrap(), Code::Ok);
    }
    for i in 1..=3 {
        c.stop(i).await;
    }
    for i in 1..=3 {
        c.start_node(i, false).await;
    }
    for i in 1..=3 {
        c.node(i).wait_ready(Duration::from_secs(15)).await.unwrap();
    }
    let mut rls = c.rls(2).await;
    assert_eq!(ask(&mut rls, "req", "r").await.unwrap(), Code::Ok);
    assert_eq!(ask(&mut rls, "req", "r").await.unwrap(), Code::Ok);
    assert_eq!(
        ask(&mut rls, "req", "r").await.unwrap(),
        Code::OverLimit,
        "3 before + 2 after = 5"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_follower_catches_up_by_snapshot() {
    let mut c = Cluster::three().await;
    let leader = c.leader(None).await as usize;
    let victim = if leader == 3 { 2 } else { 3 };
    c.stop(victim).await;
    std::fs::remove_dir_all(c.dir.path().join(format!("node-{victim}"))).unwrap();
    // Enough entries for snapshots (every 500) and log purges on the leader.
    let mut rls = c.rls(leader).await;
    for n in 0..1_200 {
        let user = format!("s{n}");
        assert_eq!(ask(&mut rls, "req", &user).await.unwrap(), Code::Ok);
    }
    c.start_node(victim, false).await;
    c.node(victim)
        .wait_ready(Duration::from_secs(15))
        .await
        .unwrap();
    // The wiped node holds counters it never saw as log entries: the leader purged those
    // entries behind its snapshots (no entries are kept behind a snapshot in these tests), so
    // they can only have come in a snapshot. The engine's apply count, which a snapshot does
    // not carry, tells the two apart.
    let mut admin = AdminClient::new(connect(c.node(victim).grpc_addr).await);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        let s = admin
            .get_status(GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.live_counters >= 1_200 {
            break s;
        }
        assert!(Instant::now() < deadline, "caught up within 15 s: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        status.applied_commands < 1_000,
        "caught up by snapshot, not by replaying 1200 commands: {status:?}"
    );
    // And it decides with them once it leads.
    c.stop(leader).await;
    let new_leader = c.leader(Some(leader as u64)).await as usize;
    let mut rls = c.rls(new_leader).await;
    let probe = with_hits(desc(&[("kind", "req"), ("user", "s7")]), 0);
    let r = rls
        .should_rate_limit(req("test", vec![probe], 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.statuses[0].limit_remaining, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_answers_unavailable_within_the_deadline() {
    let mut c = Cluster::three().await;
    let leader = c.leader(None).await as usize;
    let others: Vec<usize> = (1..=3).filter(|i| *i != leader).collect();
    // Keep one follower; stop the leader and the other follower: no quorum.
    c.stop(leader).await;
    c.stop(others[1]).await;
    let survivor = others[0];
    let mut rls = c.rls(survivor).await;
    for _ in 0..3 {
        let mut r = tonic::Request::new(req(
            "test",
            vec![desc(&[("kind", "req"), ("user", "m")])],
            0,
        ));
        r.set_timeout(Duration::from_millis(200));
        r.metadata_mut()
            .insert("x-envoy-expected-rq-timeout-ms", "200".parse().unwrap());
        let started = Instant::now();
        let status = rls
            .should_rate_limit(r)
            .await
            .expect_err("no quorum, no decision");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            started.elapsed() < Duration::from_millis(400),
            "{:?}",
            started.elapsed()
        );
    }
}
