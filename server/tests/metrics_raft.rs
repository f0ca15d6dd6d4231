//! `GET /metrics` for the Raft internals (batch sizes, log flushes, snapshots), Kuadrant's
//! decisions, and the gRPC metrics of the Raft listener, after known workloads.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tally_proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tally_proto::tally::v1::ClusterStatusRequest;
use tally_proto::tally::v1::cluster_client::ClusterClient;
use tally_server::node::ManualClock;
use tally_server::server::{LimitsSource, ServerConfig};
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
"#;

const SHOULD: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// The value of the sample `name{labels}` (labels in the exporter's sorted order, `""` for
/// none); `None` when there is no such line.
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    let mut found = text.lines().filter_map(|l| l.strip_prefix(&prefix));
    let value = found.next()?;
    assert!(found.next().is_none(), "one line for {prefix}");
    Some(value.parse().expect("a number"))
}

/// A histogram's (count, sum); (0, 0) while it has recorded nothing.
fn histogram(text: &str, name: &str, labels: &str) -> (f64, f64) {
    let count = sample(text, &format!("{name}_count"), labels);
    let sum = sample(text, &format!("{name}_sum"), labels);
    assert_eq!(count.is_some(), sum.is_some(), "{name}: count and sum");
    (count.unwrap_or(0.0), sum.unwrap_or(0.0))
}

async fn scrape(http: std::net::SocketAddr) -> String {
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        common::http1::get(http, "/metrics"),
    )
    .await
    .expect("answers within 10 s")
    .expect("GET /metrics");
    assert_eq!(response.status, 200);
    response.text().await.expect("a text body")
}

/// Scrapes until `done` holds of the text (10 s at most).
async fn scrape_until(http: std::net::SocketAddr, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(http).await;
        if done(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "within 10 s: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn five(user: &str) -> tally_proto::envoy::service::ratelimit::v3::RateLimitRequest {
    req("m", vec![desc(&[("kind", "five"), ("user", user)])], 0)
}

const PROPOSED: &str = "tally_raft_proposed_batch_commands";
const APPLIED: &str = "tally_raft_applied_batch_commands";
const FLUSH: &str = "tally_raft_log_flush_duration_seconds";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_sizes_log_flushes_and_snapshots_follow_a_known_workload() {
    let mut t = start_with(LIMITS, |c| c.timings.snapshot_every_entries = 10).await;
    let http = t.server.http_addr;
    // What starting took (configuration, limits): everything after is the workload's.
    let before = scrape(http).await;
    let (proposed0, proposed_sum0) = histogram(&before, PROPOSED, "");
    let (applied0, applied_sum0) = histogram(&before, APPLIED, "");
    let (flushes0, _) = histogram(&before, FLUSH, "");
    assert!(proposed0 >= 1.0, "the configuration was proposed: {before}");

    // Sequential calls: each is answered after its batch was committed and applied, before
    // the next is sent, and nothing else proposes meanwhile, so each batch holds exactly one
    // command.
    let sequential = 30;
    for i in 0..sequential {
        let r = t.should(five(&format!("s{i}"))).await;
        assert_eq!(code(&r), Code::Ok);
    }
    let mid = scrape(http).await;
    let (proposed1, proposed_sum1) = histogram(&mid, PROPOSED, "");
    assert_eq!(
        proposed1 - proposed0,
        f64::from(sequential),
        "one batch per call"
    );
    assert_eq!(proposed_sum1 - proposed_sum0, f64::from(sequential));
    // One node: every batch proposed is applied, before its callers are answered.
    let (applied1, applied_sum1) = histogram(&mid, APPLIED, "");
    assert_eq!(applied1 - applied0, f64::from(sequential));
    assert_eq!(applied_sum1 - applied_sum0, f64::from(sequential));

    // Concurrent calls: every command goes in exactly one batch, and commands waiting while
    // a batch is in flight share the next one, so there are at most as many batches as calls.
    let concurrent = 40;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..concurrent {
        let mut rls = t.rls.clone();
        calls.spawn(async move { rls.should_rate_limit(five(&format!("c{i}"))).await });
    }
    while let Some(answer) = calls.join_next().await {
        let r = answer.unwrap().expect("call succeeds").into_inner();
        assert_eq!(code(&r), Code::Ok);
    }
    let after = scrape(http).await;
    let (proposed2, proposed_sum2) = histogram(&after, PROPOSED, "");
    let batches = proposed2 - proposed1;
    assert_eq!(proposed_sum2 - proposed_sum1, f64::from(concurrent));
    assert!(
        (1.0..=f64::from(concurrent)).contains(&batches),
        "{batches} batches"
    );
    let (applied2, applied_sum2) = histogram(&after, APPLIED, "");
    assert_eq!(applied2 - applied1, batches);
    assert_eq!(applied_sum2 - applied_sum1, f64::from(concurrent));
    // The buckets agree with the count: every batch is at most 65536 commands.
    assert_eq!(
        sample(&after, &format!("{PROPOSED}_bucket"), r#"le="+Inf""#),
        Some(proposed2)
    );
    assert_eq!(
        sample(&after, &format!("{PROPOSED}_bucket"), r#"le="65536""#),
        Some(proposed2)
    );

    // Every batch was appended to the log and flushed before it could commit.
    let (flushes, flush_seconds) = histogram(&after, FLUSH, "");
    assert!(flushes - flushes0 >= 1.0, "{after}");
    assert!(flush_seconds > 0.0);

    // At least 31 entries (30 calls, then at least one batch) with a snapshot every 10: this
    // node built at least one (in the background, once enough entries were applied).
    let built = r#"kind="built""#;
    let text = scrape_until(http, |text| {
        histogram(text, "tally_raft_snapshot_size_bytes", built).0 >= 1.0
    })
    .await;
    let (snapshots, bytes) = histogram(&text, "tally_raft_snapshot_size_bytes", built);
    assert!(bytes >= snapshots * 8.0, "at least the magic each: {bytes}");
    let (timed, seconds) = histogram(&text, "tally_raft_snapshot_duration_seconds", built);
    assert_eq!(timed, snapshots, "each snapshot timed once");
    assert!(seconds > 0.0);
    assert!(sample(&text, "tally_raft_snapshot_index", "").unwrap() > 0.0);
    // One node installs nothing.
    assert!(!text.contains(r#"kind="installed""#), "{text}");
    t.stop().await;
}

fn kuadrant(text: &str, counter: &str, method: &str) -> Option<f64> {
    sample(
        text,
        &format!("tally_kuadrant_{counter}_total"),
        &format!(r#"domain="m",limit="five",method="{method}""#),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kuadrant_decisions_are_counted_per_method() {
    let mut t = start(LIMITS).await;
    let k = || desc(&[("kind", "five"), ("user", "k")]);
    // CheckRateLimit debits nothing: three checks of one hit (0 means 1) against 5 left.
    for _ in 0..3 {
        let r = t
            .kuadrant
            .check_rate_limit(req("m", vec![k()], 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(code(&r), Code::Ok);
    }
    // Report debits unconditionally: 5 of 5 (within, and near: 100 % used).
    let r = t
        .kuadrant
        .report(req("m", vec![k()], 5))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::Ok);
    // Nothing left: two checks over the limit.
    for _ in 0..2 {
        let r = t
            .kuadrant
            .check_rate_limit(req("m", vec![k()], 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(code(&r), Code::OverLimit);
    }
    // Two more reported: debited anyway, the counter now above its capacity.
    let r = t
        .kuadrant
        .report(req("m", vec![k()], 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::OverLimit);
    // An invalid request is no decision.
    let bad = with_override(k(), 1, 42);
    let status = t
        .kuadrant
        .check_rate_limit(req("m", vec![bad], 0))
        .await
        .expect_err("invalid");
    assert_eq!(status.code(), GrpcCode::InvalidArgument);

    let text = scrape(t.server.http_addr).await;
    assert_eq!(kuadrant(&text, "hits", "CheckRateLimit"), Some(5.0));
    assert_eq!(
        kuadrant(&text, "within_limit_hits", "CheckRateLimit"),
        Some(3.0)
    );
    assert_eq!(kuadrant(&text, "near_limit_hits", "CheckRateLimit"), None);
    assert_eq!(
        kuadrant(&text, "over_limit_hits", "CheckRateLimit"),
        Some(2.0)
    );
    assert_eq!(kuadrant(&text, "hits", "Report"), Some(7.0));
    assert_eq!(kuadrant(&text, "within_limit_hits", "Report"), Some(5.0));
    assert_eq!(kuadrant(&text, "near_limit_hits", "Report"), Some(5.0));
    assert_eq!(kuadrant(&text, "over_limit_hits", "Report"), Some(2.0));
    assert_eq!(kuadrant(&text, "shadow_mode_hits", "Report"), None);
    // Kuadrant's calls are not ShouldRateLimit's.
    assert!(!text.contains("tally_rls_hits_total{"), "{text}");
    // And the gRPC metrics count the calls, the invalid one too.
    let grpc = |code: &str, method: &str| {
        sample(
            &text,
            "tally_grpc_requests_total",
            &format!(
                r#"code="{code}",method="/kuadrant.service.ratelimit.v1.RateLimitService/{method}""#
            ),
        )
    };
    assert_eq!(grpc("OK", "CheckRateLimit"), Some(5.0));
    assert_eq!(grpc("InvalidArgument", "CheckRateLimit"), Some(1.0));
    assert_eq!(grpc("OK", "Report"), Some(2.0));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raft_listener_counts_its_calls() {
    let t = start(LIMITS).await;
    let raft = connect(t.server.raft_addr).await;
    let status = ClusterClient::new(raft.clone())
        .status(ClusterStatusRequest {})
        .await
        .expect("served to a loopback peer")
        .into_inner();
    assert_eq!(status.members.len(), 1);
    // A method the Raft listener does not serve: counted, under its name, as Unimplemented.
    let status = RateLimitServiceClient::new(raft)
        .should_rate_limit(five("x"))
        .await
        .expect_err("not served there");
    assert_eq!(status.code(), GrpcCode::Unimplemented);

    let text = scrape(t.server.http_addr).await;
    let grpc = |name: &str, code: &str, method: &str| {
        sample(&text, name, &format!(r#"code="{code}",method="{method}""#))
    };
    let status = "/tally.v1.Cluster/Status";
    assert_eq!(
        grpc("tally_grpc_requests_total", "OK", status),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        grpc("tally_grpc_request_duration_seconds_count", "OK", status),
        Some(1.0)
    );
    assert_eq!(
        grpc("tally_grpc_requests_total", "Unimplemented", SHOULD),
        Some(1.0)
    );
    assert_eq!(grpc("tally_grpc_requests_total", "OK", SHOULD), None);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_follower_counts_the_snapshot_it_installs_and_its_raft_calls() {
    let base = ServerConfig {
        limits: LimitsSource::Inline {
            origin: "test limits".into(),
            text: LIMITS.into(),
        },
        timings: tally_server::node::RaftTimings {
            snapshot_every_entries: 10,
            ..fast_timings()
        },
        ..ServerConfig::default()
    };
    let mut c = Cluster::three(base, Arc::new(ManualClock::new(T0_MS))).await;
    let leader = c.leader(None).await as usize;
    let victim = if leader == 3 { 2 } else { 3 };
    c.stop(victim).await;
    std::fs::remove_dir_all(c.dir.path().join(format!("node-{victim}"))).unwrap();
    // Snapshots every 10 entries and nothing kept behind them: the leader purges the log the
    // wiped node would need.
    let mut rls = c.rls(leader).await;
    for i in 0..40 {
        let r = rls.should_rate_limit(five(&format!("w{i}"))).await.unwrap();
        assert_eq!(code(&r.into_inner()), Code::Ok);
    }
    c.start_node(victim, false).await;
    let http = c.node(victim).http_addr;
    let installed = r#"kind="installed""#;
    // The snapshot came over its Raft listener (the call is counted once it is answered, a
    // moment after the install), and so do entries and heartbeats.
    let raft = |text: &str, method: &str| {
        sample(
            text,
            "tally_grpc_requests_total",
            &format!(r#"code="OK",method="/tally.v1.Raft/{method}""#),
        )
        .unwrap_or(0.0)
    };
    let text = scrape_until(http, |text| {
        histogram(text, "tally_raft_snapshot_size_bytes", installed).0 >= 1.0
            && raft(text, "InstallSnapshot") >= 1.0
            && raft(text, "AppendEntries") >= 1.0
    })
    .await;
    let (snapshots, bytes) = histogram(&text, "tally_raft_snapshot_size_bytes", installed);
    assert!(bytes >= snapshots * 8.0, "{bytes}");
    let (timed, seconds) = histogram(&text, "tally_raft_snapshot_duration_seconds", installed);
    assert_eq!(timed, snapshots);
    assert!(seconds > 0.0);
    // A follower proposes nothing of its own (it was wiped: it never led).
    assert_eq!(histogram(&text, PROPOSED, ""), (0.0, 0.0));
    // The leader's own view: the calls' batches, each applied there too.
    let text = scrape(c.node(leader).http_addr).await;
    let (_, proposed) = histogram(&text, PROPOSED, "");
    assert!(proposed >= 40.0, "{proposed}");
    // The commit index is the leader's: its applied entries are all committed, and no more
    // than its log holds. A follower does not report one.
    let commit = sample(&text, "tally_raft_commit_index", "").expect("leader's commit index");
    let applied = sample(&text, "tally_raft_last_applied_index", "").unwrap();
    let last_log = sample(&text, "tally_raft_last_log_index", "").unwrap();
    assert!(
        commit >= applied && commit <= last_log,
        "{commit} {applied} {last_log}"
    );
    let follower = scrape(http).await;
    assert_eq!(sample(&follower, "tally_raft_commit_index", ""), None);
    for i in 1..=3 {
        if c.nodes[i - 1].is_some() {
            c.stop(i).await;
        }
    }
}
