//! The usage metrics on `GET /metrics` (`tally_usage_*`, `server/src/usage_metrics.rs`):
//! after a known set of `tally.v1.Usage/ReportUsage` calls, exact tokens, cost and records
//! per (key, model); a retried request id counted once; the bound on label pairs; the
//! `model` and `none` label modes; a restarted node counting only what it applies after it
//! started.

mod common;

use std::time::Duration;

use common::*;
use tally_proto::tally::v1::usage_client::UsageClient;
use tally_proto::tally::v1::{
    ModelPrice, ReportUsageRequest, SetPricesRequest, UsageReceipt, usage_receipt,
};
use tally_server::server::{self, LimitsSource, ServerConfig};
use tally_server::usage_metrics::{UsageLabels, UsageMetricsConfig};
use tonic::transport::Channel;

const LIMITS: &str = r#"
domains:
  - domain: test
    limits:
      - name: per-user
        match: { kind: req }
        by: [user]
        capacity: 3
        window: 1m
"#;

/// How long the follower (polling every 100 ms) may take to show what was applied.
const SETTLE: Duration = Duration::from_secs(10);

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

/// Sample lines of `name` (with labels).
fn series(text: &str, name: &str) -> usize {
    let prefix = format!("{name}{{");
    text.lines().filter(|l| l.starts_with(&prefix)).count()
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        common::http1::get(addr, "/metrics"),
    )
    .await
    .expect("answers within 10 s")
    .expect("GET /metrics");
    assert_eq!(response.status, 200);
    response.text().await.expect("a text body")
}

/// Scrapes until `done` holds for the text (the follower polls), at most [`SETTLE`]; the
/// last text either way.
async fn scrape_until(addr: std::net::SocketAddr, done: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let text = scrape(addr).await;
        if done(&text) || tokio::time::Instant::now() >= deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The records counted for (key, model).
fn records(text: &str, key: &str, model: &str) -> Option<f64> {
    sample(
        text,
        "tally_usage_records_total",
        &format!(r#"key="{key}",model="{model}""#),
    )
}

/// (input, cached_input, output, reasoning, cost nUSD, records) counted for (key, model).
fn counted(text: &str, key: &str, model: &str) -> (f64, f64, f64, f64, f64, f64) {
    let tokens = |kind: &str| {
        sample(
            text,
            "tally_usage_tokens_total",
            &format!(r#"key="{key}",kind="{kind}",model="{model}""#),
        )
        .unwrap_or_else(|| panic!("tokens {kind} of ({key}, {model}):\n{text}"))
    };
    let cost = sample(
        text,
        "tally_usage_cost_nusd_total",
        &format!(r#"key="{key}",model="{model}""#),
    )
    .unwrap_or_else(|| panic!("cost of ({key}, {model}):\n{text}"));
    (
        tokens("input"),
        tokens("cached_input"),
        tokens("output"),
        tokens("reasoning"),
        cost,
        records(text, key, model).unwrap_or_else(|| panic!("records of ({key}, {model})")),
    )
}

fn report(
    id: &str,
    key: &str,
    model: &str,
    [input, cached, output, reasoning]: [u64; 4],
) -> ReportUsageRequest {
    ReportUsageRequest {
        request_id: id.into(),
        subject: key.into(),
        subscription: "pro".into(),
        model: model.into(),
        input_tokens: input,
        cached_input_tokens: cached,
        output_tokens: output,
        reasoning_tokens: reasoning,
        ..Default::default()
    }
}

fn cost_of(receipt: &UsageReceipt) -> u64 {
    match &receipt.result {
        Some(usage_receipt::Result::Recorded(r)) => r.cost_nusd,
        other => panic!("expected Recorded, got {other:?}"),
    }
}

async fn start_usage(config: UsageMetricsConfig) -> (TestServer, UsageClient<Channel>) {
    let t = start_with(LIMITS, |c| c.usage_metrics = config).await;
    let usage = UsageClient::new(connect(t.server.grpc_addr).await);
    (t, usage)
}

async fn set_prices(usage: &mut UsageClient<Channel>) {
    let price = |model: &str, input, cached, output| ModelPrice {
        model: model.into(),
        input_nusd: input,
        cached_input_nusd: cached,
        output_nusd: output,
    };
    usage
        .set_prices(SetPricesRequest {
            models: vec![
                price("gpt-a", 2_500, 1_250, 10_000),
                price("gpt-b", 100, 50, 400),
            ],
        })
        .await
        .expect("prices set");
}

/// Reports, answering the receipt's cost.
async fn send(usage: &mut UsageClient<Channel>, r: ReportUsageRequest) -> u64 {
    cost_of(&usage.report_usage(r).await.expect("reported").into_inner())
}

fn key_model(max_series: usize) -> UsageMetricsConfig {
    UsageMetricsConfig {
        labels: UsageLabels::KeyModel,
        max_series,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_cost_and_records_are_exact_per_key_and_model() {
    let (t, mut usage) = start_usage(UsageMetricsConfig::default()).await;
    set_prices(&mut usage).await;
    // k1 on gpt-a: (1000 - 400) × 2500 + 400 × 1250 + 200 × 10000 = 4_000_000, and
    // 10 × 2500 + 5 × 10000 = 75_000.
    let r1 = report("r1", "k1", "gpt-a", [1_000, 400, 200, 50]);
    assert_eq!(send(&mut usage, r1.clone()).await, 4_000_000);
    assert_eq!(
        send(&mut usage, report("r2", "k1", "gpt-a", [10, 0, 5, 0])).await,
        75_000
    );
    // k1 on gpt-b: 100 × 100 + 20 × 400 = 18_000.
    assert_eq!(
        send(&mut usage, report("r3", "k1", "gpt-b", [100, 0, 20, 3])).await,
        18_000
    );
    // k2 on gpt-a: 200 × 2500 + 100 × 1250 + 30 × 10000 = 925_000.
    assert_eq!(
        send(&mut usage, report("r4", "k2", "gpt-a", [300, 100, 30, 10])).await,
        925_000
    );
    // k2 on an unpriced model, and without a model: no cost.
    assert_eq!(
        send(&mut usage, report("r5", "k2", "mystery", [7, 0, 3, 0])).await,
        0
    );
    assert_eq!(
        send(&mut usage, report("r6", "k2", "", [1, 1, 1, 1])).await,
        0
    );
    // A retry of r1 gets r1's receipt and records nothing.
    assert_eq!(send(&mut usage, r1).await, 4_000_000);

    let text = scrape_until(t.server.http_addr, |text| {
        records(text, "k2", "_none") == Some(1.0)
    })
    .await;
    assert_eq!(
        counted(&text, "k1", "gpt-a"),
        (1_010.0, 400.0, 205.0, 50.0, 4_075_000.0, 2.0)
    );
    assert_eq!(
        counted(&text, "k1", "gpt-b"),
        (100.0, 0.0, 20.0, 3.0, 18_000.0, 1.0)
    );
    assert_eq!(
        counted(&text, "k2", "gpt-a"),
        (300.0, 100.0, 30.0, 10.0, 925_000.0, 1.0)
    );
    assert_eq!(
        counted(&text, "k2", "mystery"),
        (7.0, 0.0, 3.0, 0.0, 0.0, 1.0)
    );
    assert_eq!(
        counted(&text, "k2", "_none"),
        (1.0, 1.0, 1.0, 1.0, 0.0, 1.0)
    );
    // Those five pairs and nothing else; nothing skipped.
    assert_eq!(series(&text, "tally_usage_records_total"), 5);
    assert_eq!(series(&text, "tally_usage_cost_nusd_total"), 5);
    assert_eq!(series(&text, "tally_usage_tokens_total"), 20);
    assert_eq!(plain(&text, "tally_usage_records_skipped_total"), Some(0.0));
    assert!(
        text.contains("# TYPE tally_usage_tokens_total counter"),
        "{text}"
    );

    // Later records add to the same series; a retry still adds nothing.
    send(&mut usage, report("r7", "k1", "gpt-b", [1, 0, 1, 0])).await;
    send(&mut usage, report("r3", "k1", "gpt-b", [100, 0, 20, 3])).await;
    let text = scrape_until(t.server.http_addr, |text| {
        records(text, "k1", "gpt-b") == Some(2.0)
    })
    .await;
    assert_eq!(
        counted(&text, "k1", "gpt-b"),
        (101.0, 0.0, 21.0, 3.0, 18_500.0, 2.0)
    );
    // Stays there (the retry is not merely late).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = scrape(t.server.http_addr).await;
    assert_eq!(records(&text, "k1", "gpt-b"), Some(2.0));
    assert_eq!(records(&text, "k1", "gpt-a"), Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_past_the_bound_are_counted_under_other() {
    let (t, mut usage) = start_usage(key_model(2)).await;
    set_prices(&mut usage).await;
    send(&mut usage, report("a1", "alice", "gpt-a", [10, 0, 0, 0])).await; // 25_000
    send(&mut usage, report("b1", "bob", "gpt-b", [10, 0, 0, 0])).await; // 1_000
    // The third pair (and the fourth) go to _other, with their costs.
    send(&mut usage, report("c1", "carol", "gpt-a", [4, 0, 1, 0])).await; // 20_000
    send(&mut usage, report("a2", "alice", "gpt-b", [1, 0, 0, 0])).await; // 100
    // An admitted pair keeps its own series after the bound is reached.
    send(&mut usage, report("a3", "alice", "gpt-a", [2, 0, 0, 0])).await; // 5_000

    let text = scrape_until(t.server.http_addr, |text| {
        records(text, "alice", "gpt-a") == Some(2.0)
    })
    .await;
    assert_eq!(
        counted(&text, "alice", "gpt-a"),
        (12.0, 0.0, 0.0, 0.0, 30_000.0, 2.0)
    );
    assert_eq!(
        counted(&text, "bob", "gpt-b"),
        (10.0, 0.0, 0.0, 0.0, 1_000.0, 1.0)
    );
    assert_eq!(
        counted(&text, "_other", "_other"),
        (5.0, 0.0, 1.0, 0.0, 20_100.0, 2.0)
    );
    assert_eq!(records(&text, "carol", "gpt-a"), None);
    assert_eq!(records(&text, "alice", "gpt-b"), None);
    assert_eq!(series(&text, "tally_usage_records_total"), 3);
    assert_eq!(series(&text, "tally_usage_tokens_total"), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_labels_count_every_key_as_all() {
    let (t, mut usage) = start_usage(UsageMetricsConfig {
        labels: UsageLabels::Model,
        max_series: 2,
    })
    .await;
    set_prices(&mut usage).await;
    send(&mut usage, report("1", "alice", "gpt-a", [10, 2, 4, 1])).await; // 8 × 2500 + 2 × 1250 + 4 × 10000
    send(&mut usage, report("2", "bob", "gpt-a", [1, 0, 0, 0])).await; // 2_500
    send(&mut usage, report("3", "bob", "gpt-b", [1, 0, 1, 0])).await; // 500
    // A third model is past the bound of 2.
    send(&mut usage, report("4", "carol", "other", [3, 0, 0, 0])).await;

    let text = scrape_until(t.server.http_addr, |text| {
        records(text, "_all", "_other") == Some(1.0)
    })
    .await;
    assert_eq!(
        counted(&text, "_all", "gpt-a"),
        (11.0, 2.0, 4.0, 1.0, 65_000.0, 2.0)
    );
    assert_eq!(
        counted(&text, "_all", "gpt-b"),
        (1.0, 0.0, 1.0, 0.0, 500.0, 1.0)
    );
    assert_eq!(
        counted(&text, "_all", "_other"),
        (3.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    );
    assert_eq!(series(&text, "tally_usage_records_total"), 3);
    for key in ["alice", "bob", "carol", "_other"] {
        assert!(!text.contains(&format!(r#"key="{key}""#)), "{key}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_usage_labels_means_no_usage_metrics() {
    let (t, mut usage) = start_usage(UsageMetricsConfig {
        labels: UsageLabels::None,
        max_series: 1000,
    })
    .await;
    set_prices(&mut usage).await;
    send(&mut usage, report("1", "alice", "gpt-a", [10, 0, 4, 0])).await;
    // The reports are served and counted elsewhere (gRPC); longer than several follower
    // polls later, still no usage metric.
    let report_calls = r#"code="OK",method="/tally.v1.Usage/ReportUsage""#;
    let text = scrape_until(t.server.http_addr, |text| {
        sample(text, "tally_grpc_requests_total", report_calls) == Some(1.0)
    })
    .await;
    assert_eq!(
        sample(&text, "tally_grpc_requests_total", report_calls),
        Some(1.0)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = scrape(t.server.http_addr).await;
    assert!(!text.contains("tally_usage_"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_counts_only_what_it_applies_after_it_started() {
    let t = start(LIMITS).await;
    let mut usage = UsageClient::new(connect(t.server.grpc_addr).await);
    set_prices(&mut usage).await;
    send(
        &mut usage,
        report("before", "alice", "gpt-a", [10, 0, 0, 0]),
    )
    .await;
    let text = scrape_until(t.server.http_addr, |text| {
        records(text, "alice", "gpt-a") == Some(1.0)
    })
    .await;
    assert_eq!(records(&text, "alice", "gpt-a"), Some(1.0));
    t.server.stop().await.expect("stops");

    // The same data directory: its log and records are there, and are not counted again.
    let config = ServerConfig {
        limits: LimitsSource::Inline {
            origin: "test limits".into(),
            text: LIMITS.into(),
        },
        clock: t.clock.clone(),
        data_dir: t.dir.path().join("node-1"),
        timings: fast_timings(),
        ..ServerConfig::default()
    };
    let restarted = server::spawn(config).await.expect("restarts");
    restarted
        .wait_ready(Duration::from_secs(10))
        .await
        .expect("ready again");
    let mut usage = UsageClient::new(connect(restarted.grpc_addr).await);
    // A retry of the record before the restart is answered from the engine: not counted.
    send(
        &mut usage,
        report("before", "alice", "gpt-a", [10, 0, 0, 0]),
    )
    .await;
    send(&mut usage, report("after", "alice", "gpt-a", [3, 0, 0, 0])).await;
    scrape_until(restarted.http_addr, |text| {
        records(text, "alice", "gpt-a").is_some()
    })
    .await;
    // Several follower polls later: still only the record applied after the restart.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = scrape(restarted.http_addr).await;
    assert_eq!(
        counted(&text, "alice", "gpt-a"),
        (3.0, 0.0, 0.0, 0.0, 7_500.0, 1.0)
    );
    restarted.stop().await.expect("stops");
}
