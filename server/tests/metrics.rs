//! `GET /metrics` after a known workload: the rate-limit counters, the gRPC counts per method
//! and code, and the Raft and engine gauges, read from the Prometheus text exposition.

mod common;

use common::*;
use tally_proto::tally::v1::ClusterStatusRequest;
use tally_proto::tally::v1::cluster_client::ClusterClient;
use tonic::Code as GrpcCode;

const LIMITS: &str = r#"
domains:
  - domain: m
    limits:
      - name: five
        match: { kind: five }
        by: [user]
        capacity: 5
        window: 1m
      - name: ten
        match: { kind: ten }
        by: [user]
        capacity: 10
        window: 1m
      - name: trial
        match: { kind: trial }
        by: [user]
        capacity: 2
        window: 1m
        shadow: true
"#;

const SHOULD: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// The value of the sample `name{labels}`, labels in the exporter's (sorted) order; `None`
/// when there is no such line.
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    let mut found = text.lines().filter_map(|l| l.strip_prefix(&prefix));
    let value = found.next()?;
    assert!(found.next().is_none(), "one line for {name}{{{labels}}}");
    Some(value.parse().expect("a number"))
}

/// The value of an unlabelled sample (`name value`).
fn plain(text: &str, name: &str) -> Option<f64> {
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.parse().expect("a number"))
}

async fn scrape(t: &TestServer) -> String {
    let response = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        common::http1::get(t.server.http_addr, "/metrics"),
    )
    .await
    .expect("answers within 10 s")
    .expect("GET /metrics");
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("content-type"),
        Some("text/plain; version=0.0.4")
    );
    response.text().await.expect("a text body")
}

fn rls(text: &str, counter: &str, limit: &str) -> Option<f64> {
    sample(
        text,
        &format!("tally_rls_{counter}_total"),
        &format!(r#"domain="m",limit="{limit}""#),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_workload_gives_exact_decision_and_grpc_counts() {
    let mut t = start(LIMITS).await;
    let mut expected_ok = 0;
    // Capacity 5, 7 requests: 5 within (the 4th and 5th leave ≥ 80 % used), 2 over.
    for i in 0..7 {
        let r = t
            .should(req("m", vec![desc(&[("kind", "five"), ("user", "a")])], 0))
            .await;
        assert_eq!(code(&r), if i < 5 { Code::Ok } else { Code::OverLimit });
        expected_ok += 1;
    }
    // Capacity 10, 12 requests of one hit (hits_addend 1): the 8th, 9th and 10th are near
    // the limit, the 11th and 12th over it.
    for i in 0..12 {
        let r = t
            .should(req("m", vec![desc(&[("kind", "ten"), ("user", "a")])], 1))
            .await;
        assert_eq!(code(&r), if i < 10 { Code::Ok } else { Code::OverLimit });
        expected_ok += 1;
    }
    // A descriptor's own hits_addend counts as its hits: 3, within, not near (3 of 10).
    let bob = with_hits(desc(&[("kind", "ten"), ("user", "b")]), 3);
    assert_eq!(code(&t.should(req("m", vec![bob], 0)).await), Code::Ok);
    expected_ok += 1;
    // Shadow capacity 2, 4 requests: all admitted; the 3rd and 4th went over it; the 2nd to
    // 4th leave it full (near).
    for _ in 0..4 {
        let r = t
            .should(req("m", vec![desc(&[("kind", "trial"), ("user", "a")])], 0))
            .await;
        assert_eq!(code(&r), Code::Ok);
        expected_ok += 1;
    }
    // No limit matches: answered, counted by gRPC only.
    t.should(req("m", vec![desc(&[("kind", "none")])], 0)).await;
    expected_ok += 1;
    // Invalid (unknown override unit): no decision.
    let bad = with_override(desc(&[("kind", "five"), ("user", "a")]), 1, 42);
    let status = t.should_err(req("m", vec![bad], 0)).await;
    assert_eq!(status.code(), GrpcCode::InvalidArgument);
    // A service this listener does not serve (tally.v1.Cluster is on the Raft listener).
    let mut cluster = ClusterClient::new(connect(t.server.grpc_addr).await);
    let status = cluster
        .status(ClusterStatusRequest {})
        .await
        .expect_err("not served here");
    assert_eq!(status.code(), GrpcCode::Unimplemented);

    let text = scrape(&t).await;
    // five: 7 hits, 5 within, 2 near, 2 over.
    assert_eq!(rls(&text, "hits", "five"), Some(7.0));
    assert_eq!(rls(&text, "within_limit_hits", "five"), Some(5.0));
    assert_eq!(rls(&text, "near_limit_hits", "five"), Some(2.0));
    assert_eq!(rls(&text, "over_limit_hits", "five"), Some(2.0));
    assert_eq!(rls(&text, "shadow_mode_hits", "five"), None);
    // ten: 12 + 3 hits, 10 + 3 within, 3 near, 2 over.
    assert_eq!(rls(&text, "hits", "ten"), Some(15.0));
    assert_eq!(rls(&text, "within_limit_hits", "ten"), Some(13.0));
    assert_eq!(rls(&text, "near_limit_hits", "ten"), Some(3.0));
    assert_eq!(rls(&text, "over_limit_hits", "ten"), Some(2.0));
    // trial (shadow): 4 hits, all within, 3 near, none over, 2 over the shadow limit.
    assert_eq!(rls(&text, "hits", "trial"), Some(4.0));
    assert_eq!(rls(&text, "within_limit_hits", "trial"), Some(4.0));
    assert_eq!(rls(&text, "near_limit_hits", "trial"), Some(3.0));
    assert_eq!(rls(&text, "over_limit_hits", "trial"), None);
    assert_eq!(rls(&text, "shadow_mode_hits", "trial"), Some(2.0));
    // Nothing else has rate-limit labels: no unmatched descriptor, no invalid request.
    let series = text
        .lines()
        .filter(|l| l.starts_with("tally_rls_hits_total{"))
        .count();
    assert_eq!(series, 3, "{text}");

    // gRPC: every answered ShouldRateLimit, the invalid one, and the unknown service.
    let grpc = |code: &str, method: &str| {
        sample(
            &text,
            "tally_grpc_requests_total",
            &format!(r#"code="{code}",method="{method}""#),
        )
    };
    assert_eq!(grpc("OK", SHOULD), Some(f64::from(expected_ok)));
    assert_eq!(grpc("InvalidArgument", SHOULD), Some(1.0));
    assert_eq!(grpc("OverLimit", SHOULD), None, "OVER_LIMIT is an OK call");
    assert_eq!(grpc("Unimplemented", "/tally.v1.Cluster/Status"), Some(1.0));
    let timed = sample(
        &text,
        "tally_grpc_request_duration_seconds_count",
        &format!(r#"code="OK",method="{SHOULD}""#),
    );
    assert_eq!(timed, Some(f64::from(expected_ok)));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_and_engine_gauges_are_present_and_sane() {
    let mut t = start(LIMITS).await;
    for user in ["a", "b", "c"] {
        t.should(req("m", vec![desc(&[("kind", "five"), ("user", user)])], 0))
            .await;
    }
    let text = scrape(&t).await;
    let gauge = |name: &str| plain(&text, name).unwrap_or_else(|| panic!("{name} in {text}"));
    assert!(gauge("tally_raft_term") >= 1.0);
    assert_eq!(gauge("tally_raft_is_leader"), 1.0);
    // A one-node group elects itself once.
    assert_eq!(gauge("tally_raft_leader_changes_total"), 1.0);
    let (last_log, applied) = (
        gauge("tally_raft_last_log_index"),
        gauge("tally_raft_last_applied_index"),
    );
    // The limits and the three decisions at least, each in an entry.
    assert!(applied >= 2.0, "applied {applied}");
    assert!(last_log >= applied);
    assert_eq!(gauge("tally_raft_apply_lag"), last_log - applied);
    // A one-node leader is its own majority: everything in its log is committed.
    let commit = gauge("tally_raft_commit_index");
    assert!(
        commit >= applied && commit <= last_log,
        "{commit} {applied} {last_log}"
    );
    assert!(gauge("tally_raft_snapshot_index") <= applied);
    // Engine: one counter per user, the three limits of the file.
    assert_eq!(gauge("tally_engine_live_counters"), 3.0);
    assert_eq!(gauge("tally_engine_limits"), 3.0);
    assert_eq!(gauge("tally_engine_reclaimed_counters_total"), 0.0);
    assert!(gauge("tally_engine_counter_memory_bytes") > 0.0);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_server_in_a_process_counts_only_its_own_calls() {
    let mut a = start(LIMITS).await;
    let b = start(LIMITS).await;
    a.should(req("m", vec![desc(&[("kind", "five"), ("user", "a")])], 0))
        .await;
    assert_eq!(rls(&scrape(&a).await, "hits", "five"), Some(1.0));
    let other = scrape(&b).await;
    assert_eq!(rls(&other, "hits", "five"), None);
    assert!(!other.contains(SHOULD), "{other}");
    a.stop().await;
    b.stop().await;
}
