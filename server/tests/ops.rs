//! Operating `tallyd`: health endpoints, gRPC health and reflection, limit-file reload, a bad
//! file at start, and the admin API.

mod common;

use std::time::Duration;

use common::*;
use tally_proto::tally::v1::admin_client::AdminClient;
use tally_proto::tally::v1::{GetStatusRequest, ListLimitsRequest};
use tally_server::server::{self, LimitsSource, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: tally\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

const LIMITS: &str = r#"
domains:
  - domain: d
    limits:
      - name: per-user
        match: { kind: req }
        by: [user]
        capacity: 3
        window: 1m
"#;

#[tokio::test]
async fn health_readiness_grpc_health_and_reflection() {
    let t = start(LIMITS).await;
    let health = http_get(t.server.http_addr, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let ready = http_get(t.server.http_addr, "/readyz").await;
    assert!(
        ready.starts_with("HTTP/1.1 200") && ready.ends_with("ready\n"),
        "{ready}"
    );
    assert!(
        http_get(t.server.http_addr, "/nope")
            .await
            .starts_with("HTTP/1.1 404")
    );

    let channel = connect(t.server.grpc_addr).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in [
        "envoy.service.ratelimit.v3.RateLimitService",
        "kuadrant.service.ratelimit.v1.RateLimitService",
        "tally.v1.Admin",
    ] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "envoy.service.ratelimit.v3.RateLimitService",
        "kuadrant.service.ratelimit.v1.RateLimitService",
        "tally.v1.Admin",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    t.stop().await;
}

#[tokio::test]
async fn admin_status_and_limits_reflect_the_engine() {
    let mut t = start(LIMITS).await;
    for u in ["a", "b", "c"] {
        t.should(req("d", vec![desc(&[("kind", "req"), ("user", u)])], 0))
            .await;
    }
    let mut admin = AdminClient::new(connect(t.server.grpc_addr).await);
    let s = admin
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.live_counters, 3);
    assert!(s.counter_bytes_estimate > 0);
    assert_eq!((s.limits, s.limits_generation), (1, 1));
    assert_eq!(s.last_batch_ms, T0_MS);
    assert_eq!(
        s.applied_commands, 6,
        "the settings, the limit set, the quota set and three requests"
    );
    let l = admin
        .list_limits(ListLimitsRequest { domain: "d".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.limits.len(), 1);
    assert_eq!(
        (l.limits[0].name.as_str(), l.limits[0].capacity),
        ("per-user", 3)
    );
    assert_eq!(l.limits[0].variables, vec!["user".to_owned()]);
    let none = admin
        .list_limits(ListLimitsRequest {
            domain: "other".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.limits.is_empty());
    // Counters of a passed window are reclaimed by later batches.
    t.clock.advance_ms(61_000);
    for i in 0..40 {
        t.should(req(
            "d",
            vec![desc(&[("kind", "none"), ("i", &i.to_string())])],
            0,
        ))
        .await;
    }
    let s = admin
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((s.live_counters, s.reclaimed_counters), (0, 3));
    t.stop().await;
}

async fn generation(admin: &mut AdminClient<tonic::transport::Channel>) -> u64 {
    admin
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .limits_generation
}

#[tokio::test]
async fn limits_file_reloads_keeping_counters_and_refuses_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("limits.yaml");
    std::fs::write(&path, LIMITS).unwrap();
    let mut t = start_with("", |c| {
        c.limits = LimitsSource::File(path.clone());
        c.limits_poll = Duration::from_millis(20);
    })
    .await;
    let user = || desc(&[("kind", "req"), ("user", "u")]);
    t.should(req("d", vec![user()], 2)).await;
    let mut admin = AdminClient::new(connect(t.server.grpc_addr).await);
    assert_eq!(generation(&mut admin).await, 1);

    // Raise the capacity: the counter (2 used) carries over.
    std::fs::write(&path, LIMITS.replace("capacity: 3", "capacity: 10")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while generation(&mut admin).await < 2 {
        assert!(tokio::time::Instant::now() < deadline, "reload within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = t.should(req("d", vec![user()], 0)).await;
    assert_eq!(r.statuses[0].limit_remaining, 7, "10 - 2 kept - 1");

    // A broken file is refused; the limits in force stay.
    std::fs::write(
        &path,
        "domains:\n  - domain: d\n    limits:\n      - name: x\n        capacity: -4\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(generation(&mut admin).await, 2);
    let r = t.should(req("d", vec![user()], 0)).await;
    assert_eq!(r.statuses[0].limit_remaining, 6);

    // Changing the window is a new limit: its counters start afresh.
    std::fs::write(&path, LIMITS.replace("window: 1m", "window: 1h")).unwrap();
    while generation(&mut admin).await < 3 {
        assert!(tokio::time::Instant::now() < deadline, "reload within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = t.should(req("d", vec![user()], 0)).await;
    assert_eq!(r.statuses[0].limit_remaining, 2);
    t.stop().await;
}

#[tokio::test]
async fn a_bad_limits_file_at_start_is_refused_naming_line_and_field() {
    let config = ServerConfig {
        limits: LimitsSource::Inline {
            origin: "bad.yaml".into(),
            text: "domains:\n  - domain: d\n    limits:\n      - name: x\n        match: { kind: req }\n        capacity: 5\n        window: 3 parsecs\n".into(),
        },
        ..ServerConfig::default()
    };
    let err = server::spawn(config)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("bad.yaml"), "{err}");
    assert!(err.contains("line 7"), "{err}");
    assert!(err.contains("window"), "{err}");
}

/// A Raft that stops on its own (openraft `Fatal`) cannot be revived in place: the node stops
/// reporting ready, the server stops serving and returns an error, so `tallyd` exits non-zero
/// and its service manager restarts it from its data directory.
#[tokio::test]
async fn a_raft_that_stops_on_its_own_stops_the_server_with_an_error() {
    let t = start(LIMITS).await;
    let node = t.server.node().expect("node started");
    assert!(node.is_ready());
    assert_eq!(node.raft_failure(), None);

    // Stop the core behind the node's back, as openraft does on a fatal error.
    node.raft().shutdown().await.unwrap();
    assert!(
        !node.is_ready(),
        "a node with a stopped Raft must not be ready"
    );
    assert!(node.raft_failure().is_some());
    let reason = tokio::time::timeout(Duration::from_secs(5), node.raft_failed())
        .await
        .expect("raft_failed resolves");
    assert!(!reason.is_empty());

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !t.server.is_finished() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "server still serving"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match t.server.stop().await {
        Err(server::ServerError::RaftStopped(why)) => assert_eq!(why, reason),
        other => panic!("expected RaftStopped, got {other:?}"),
    }
}

/// Shutting a node down on purpose is not a failure.
#[tokio::test]
async fn a_node_shut_down_on_purpose_reports_no_failure() {
    let t = start(LIMITS).await;
    let node = t.server.node().expect("node started");
    node.shutdown().await;
    assert_eq!(node.raft_failure(), None);
    assert!(!node.is_ready());
    let waited = tokio::time::timeout(Duration::from_millis(300), node.raft_failed()).await;
    assert!(
        waited.is_err(),
        "raft_failed must not resolve after shutdown"
    );
}
