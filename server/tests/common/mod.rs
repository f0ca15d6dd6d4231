//! Shared helpers for the gRPC integration tests: an in-process server on port 0 and
//! terse request builders.
#![allow(dead_code)]

pub mod auth_cluster;
pub mod envoy_proc;
pub mod http1;
pub mod mock_openai;
pub mod pyenv;
pub mod tallyd_proc;

/// Instantiates behaviour tests (each an `async fn(Topology)`) for every topology.
#[macro_export]
macro_rules! behaviour_suite {
    ($($name:ident),* $(,)?) => {
        mod one_node {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Topology::OneNode).await
                }
            )*
        }
        mod three_nodes {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Topology::ThreeNodes).await
                }
            )*
        }
        mod one_node_fast {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Topology::OneNodeFast).await
                }
            )*
        }
        mod three_nodes_fast {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Topology::ThreeNodesFast).await
                }
            )*
        }
    };
}

use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;
use std::time::Instant;
use tally_proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use tally_proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use tally_proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tally_proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tally_proto::kuadrant::service::ratelimit::v1::rate_limit_service_client::RateLimitServiceClient as KuadrantClient;
use tally_server::api::ResponseOptions;
use tally_server::node::{ManualClock, RaftTimings};

use tally_proto::tally::v1::cluster_client::ClusterClient;
use tally_proto::tally::v1::{
    AddLearnerRequest, ClusterStatus, ClusterStatusRequest, PromoteRequest,
};
use tally_server::server::{self, LimitsSource, Listeners, RunningServer, ServerConfig};
use tokio::net::TcpListener;
use tonic::transport::Channel;

pub use tally_proto::envoy::service::ratelimit::v3::rate_limit_response::Code;

/// 2026-11-23T12:00:00Z: a Monday, mid-minute-aligned.
pub const T0_MS: i64 = 1_795_435_200_000;

pub struct TestServer {
    /// The node requests go to (a follower, with three nodes).
    pub server: RunningServer,
    /// The other nodes, with three.
    pub cluster: Option<Cluster>,
    pub dir: tempfile::TempDir,
    pub clock: Arc<ManualClock>,
    pub rls: RateLimitServiceClient<Channel>,
    pub kuadrant: KuadrantClient<Channel>,
}

pub async fn start(limits_yaml: &str) -> TestServer {
    start_with(limits_yaml, |_| {}).await
}

/// How many nodes a behaviour test runs against, and with which acknowledgement.
#[derive(Clone, Copy, Debug)]
pub enum Topology {
    OneNode,
    /// Requests go to a follower, which forwards them to the leader.
    ThreeNodes,
    /// Every limit `ack: fast`: answered from the leader's speculative state.
    OneNodeFast,
    ThreeNodesFast,
}

/// Marks every limit of a native limits text `ack: fast`.
pub fn all_fast(limits_yaml: &str) -> String {
    limits_yaml
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("capacity:") {
                let indent = &line[..line.len() - trimmed.len()];
                format!("{indent}ack: fast\n{line}\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect()
}

pub async fn start_with(limits_yaml: &str, tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
    start_on(Topology::OneNode, limits_yaml, tweak).await
}

pub async fn start_on(
    topology: Topology,
    limits_yaml: &str,
    tweak: impl FnOnce(&mut ServerConfig),
) -> TestServer {
    let clock = Arc::new(ManualClock::new(T0_MS));
    let dir = tempfile::tempdir().unwrap();
    let text = match topology {
        Topology::OneNodeFast | Topology::ThreeNodesFast => all_fast(limits_yaml),
        _ => limits_yaml.to_owned(),
    };
    let mut config = ServerConfig {
        limits: LimitsSource::Inline {
            origin: "test limits".into(),
            text,
        },
        clock: clock.clone(),
        response: ResponseOptions::default(),
        data_dir: dir.path().join("node-1"),
        timings: fast_timings(),
        ..ServerConfig::default()
    };
    tweak(&mut config);
    let (server, cluster) = match topology {
        Topology::OneNode | Topology::OneNodeFast => {
            let server = server::spawn(config).await.expect("server starts");
            server
                .wait_ready(Duration::from_secs(10))
                .await
                .expect("ready within 10 s");
            (server, None)
        }
        Topology::ThreeNodes | Topology::ThreeNodesFast => {
            let mut cluster = Cluster::three(config, clock.clone()).await;
            let follower = cluster.nodes[1].take().expect("node 2 runs");
            (follower, Some(cluster))
        }
    };
    let channel = connect(server.grpc_addr).await;
    TestServer {
        server,
        cluster,
        dir,
        clock,
        rls: RateLimitServiceClient::new(channel.clone()),
        kuadrant: KuadrantClient::new(channel),
    }
}

/// Raft timings for tests: quick elections, frequent snapshots.
pub fn fast_timings() -> RaftTimings {
    RaftTimings {
        heartbeat_ms: 50,
        election_min_ms: 150,
        election_max_ms: 300,
        snapshot_every_entries: 500,
        logs_kept_behind_snapshot: 0,
    }
}

pub async fn connect(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connects")
}

/// A descriptor from `[("k", "v"), ...]`.
pub fn desc(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: (*k).into(),
                value: (*v).into(),
            })
            .collect(),
        limit: None,
        hits_addend: None,
    }
}

pub fn with_hits(mut d: RateLimitDescriptor, hits: u64) -> RateLimitDescriptor {
    d.hits_addend = Some(hits);
    d
}

pub fn with_override(mut d: RateLimitDescriptor, rpu: u32, unit: i32) -> RateLimitDescriptor {
    d.limit = Some(RateLimitOverride {
        requests_per_unit: rpu,
        unit,
    });
    d
}

pub fn req(domain: &str, descriptors: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors,
        hits_addend: hits,
    }
}

impl TestServer {
    pub async fn should(&mut self, r: RateLimitRequest) -> RateLimitResponse {
        self.rls
            .should_rate_limit(r)
            .await
            .expect("call succeeds")
            .into_inner()
    }

    pub async fn should_err(&mut self, r: RateLimitRequest) -> tonic::Status {
        self.rls.should_rate_limit(r).await.expect_err("call fails")
    }

    pub async fn stop(self) {
        self.server.stop().await.expect("server stops cleanly");
        if let Some(mut cluster) = self.cluster {
            for i in [1, 3] {
                cluster.stop(i).await;
            }
        }
    }
}

pub fn code(r: &RateLimitResponse) -> Code {
    Code::try_from(r.overall_code).unwrap()
}

pub fn header<'a>(r: &'a RateLimitResponse, key: &str) -> Option<&'a str> {
    r.response_headers_to_add
        .iter()
        .find(|h| h.key == key)
        .map(|h| h.value.as_str())
}

pub struct Cluster {
    /// The configuration every node starts from (limits, clock, timings, tweaks).
    pub base: ServerConfig,
    pub dir: tempfile::TempDir,
    pub clock: Arc<ManualClock>,
    pub raft_addrs: Vec<SocketAddr>,
    /// Raft listeners bound at creation and held until their node first starts, so no other
    /// test can take the port in between.
    reserved: Vec<Option<TcpListener>>,
    pub nodes: Vec<Option<RunningServer>>,
}

impl Cluster {
    /// Node `i` (1-based) serving on its fixed Raft address.
    pub async fn start_node(&mut self, i: usize, bootstrap: bool) {
        self.start_node_as(i, i as u64, bootstrap).await
    }

    /// Slot `i`'s addresses, serving node `node_id` from its own data directory.
    pub async fn start_node_as(&mut self, i: usize, node_id: u64, bootstrap: bool) {
        let listeners = Listeners {
            grpc: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            http: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            raft: match self.reserved[i - 1].take() {
                Some(l) => l,
                None => TcpListener::bind(self.raft_addrs[i - 1]).await.unwrap(),
            },
        };
        let config = ServerConfig {
            node_id,
            data_dir: self.dir.path().join(format!("node-{node_id}")),
            bootstrap,
            ..self.base.clone()
        };
        self.nodes[i - 1] = Some(server::spawn_on(listeners, config).await.unwrap());
    }

    /// Three nodes: node 1 bootstraps, 2 and 3 join as learners and are promoted.
    pub async fn three(base: ServerConfig, clock: Arc<ManualClock>) -> Cluster {
        let base = ServerConfig {
            clock: clock.clone(),
            ..base
        };
        let mut raft_addrs = Vec::new();
        let mut reserved = Vec::new();
        for _ in 0..3 {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            raft_addrs.push(l.local_addr().unwrap());
            reserved.push(Some(l));
        }
        let mut c = Cluster {
            base,
            dir: tempfile::tempdir().unwrap(),
            clock,
            raft_addrs,
            reserved,
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

    pub fn node(&self, i: usize) -> &RunningServer {
        self.nodes[i - 1].as_ref().expect("node running")
    }

    pub async fn cluster_client(&self, i: usize) -> ClusterClient<Channel> {
        ClusterClient::new(connect(self.raft_addrs[i - 1]).await)
    }

    pub async fn rls(&self, i: usize) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::new(connect(self.node(i).grpc_addr).await)
    }

    pub async fn status_from(&self, i: usize) -> ClusterStatus {
        self.cluster_client(i)
            .await
            .status(ClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// Waits until some running node other than `not` reports itself leader.
    pub async fn leader(&self, not: Option<u64>) -> u64 {
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

    pub async fn stop(&mut self, i: usize) {
        let node = self.nodes[i - 1].take().expect("running");
        node.stop().await.unwrap();
    }
}

/// Log output, shared with a `tracing` subscriber (`with_writer(move || c.clone())`).
#[derive(Clone, Default)]
pub struct Captured(pub Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
