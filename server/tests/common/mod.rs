//! Shared helpers for the gRPC integration tests: an in-process server on port 0 and
//! terse request builders.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use tally_proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use tally_proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use tally_proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tally_proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tally_proto::kuadrant::service::ratelimit::v1::rate_limit_service_client::RateLimitServiceClient as KuadrantClient;
use tally_server::api::ResponseOptions;
use tally_server::node::{ManualClock, RaftTimings};
use tally_server::server::{self, LimitsSource, RunningServer, ServerConfig};
use tonic::transport::Channel;

pub use tally_proto::envoy::service::ratelimit::v3::rate_limit_response::Code;

/// 2026-11-23T12:00:00Z: a Monday, mid-minute-aligned.
pub const T0_MS: i64 = 1_795_435_200_000;

pub struct TestServer {
    pub server: RunningServer,
    pub dir: tempfile::TempDir,
    pub clock: Arc<ManualClock>,
    pub rls: RateLimitServiceClient<Channel>,
    pub kuadrant: KuadrantClient<Channel>,
}

pub async fn start(limits_yaml: &str) -> TestServer {
    start_with(limits_yaml, |_| {}).await
}

pub async fn start_with(limits_yaml: &str, tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
    let clock = Arc::new(ManualClock::new(T0_MS));
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig {
        limits: LimitsSource::Inline {
            origin: "test limits".into(),
            text: limits_yaml.into(),
        },
        clock: clock.clone(),
        response: ResponseOptions::default(),
        data_dir: dir.path().join("node-1"),
        timings: fast_timings(),
        ..ServerConfig::default()
    };
    tweak(&mut config);
    let server = server::spawn(config).await.expect("server starts");
    server
        .wait_ready(Duration::from_secs(10))
        .await
        .expect("ready within 10 s");
    let channel = connect(server.grpc_addr).await;
    TestServer {
        server,
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
