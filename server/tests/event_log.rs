//! Quota events reach the log as structured lines (target `tally::usage_event`), once each,
//! with the event's seq — besides the WatchEvents stream.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tally_proto::tally::v1::ReportUsageRequest;
use tally_proto::tally::v1::usage_client::UsageClient;

const CONFIG: &str = r#"
domains:
  - domain: test
    limits:
      - name: per-user
        match: { kind: req }
        by: [user]
        capacity: 3
        window: 1m
metering:
  quotas:
    - name: daily-tokens
      per: [subject]
      metric: total_tokens
      limit: 1000
      window: { fixed: day, time_zone: UTC }
      thresholds: [50, 90]
"#;

impl Captured {
    fn event_lines(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "tally::usage_event")
            .collect()
    }
}

fn report(id: &str, tokens: u64) -> ReportUsageRequest {
    ReportUsageRequest {
        request_id: id.into(),
        subject: "alice".into(),
        input_tokens: tokens,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threshold_and_exceeded_events_are_logged_once_with_their_seq() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .json()
        .with_writer(move || writer.clone())
        .with_env_filter("tally::usage_event=info")
        .init();
    let t = start(CONFIG).await;
    let mut usage = UsageClient::new(connect(t.server.grpc_addr).await);
    // 600 of 1,000: 50 %; then 950: 90 %; then 1,100: over the limit.
    for (id, tokens) in [("a", 600), ("b", 350), ("c", 150)] {
        usage.report_usage(report(id, tokens)).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let lines = captured.event_lines();
        if lines.len() >= 3 || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let summary: Vec<(u64, String, Option<u64>)> = lines
        .iter()
        .map(|v| {
            let f = &v["fields"];
            (
                f["seq"].as_u64().unwrap(),
                f["kind"].as_str().unwrap().to_owned(),
                f["pct"].as_u64(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, "threshold".to_owned(), Some(50)),
            (2, "threshold".to_owned(), Some(90)),
            (3, "exceeded".to_owned(), None),
        ],
        "{lines:?}"
    );
    assert_eq!(lines[2]["fields"]["used"], 1_100);
    assert_eq!(lines[2]["fields"]["quota"], "daily-tokens");
    // Nothing is logged twice while the node keeps polling.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(captured.event_lines().len(), 3);
    t.stop().await;
}
