//! The `tally usage` and `tally prices` commands, run as the real binary against a real
//! in-process server on 127.0.0.1 port 0: a billing operator's path (set prices, report, query,
//! export and resume).

mod common;

use common::{ok, tally};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tally_server::server::{self, LimitsSource, ServerConfig};

/// Limits with no metering section: prices and quotas start empty.
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

const QUARTER_HOUR_MS: i64 = 900_000;

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prices_report_query_and_a_resumable_export() {
    tokio::time::timeout(Duration::from_secs(120), walkthrough())
        .await
        .expect("the walkthrough finishes within 120 s");
}

async fn walkthrough() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        limits: LimitsSource::Inline {
            origin: "test limits".into(),
            text: LIMITS.into(),
        },
        data_dir: dir.path().join("node-1"),
        ..ServerConfig::default()
    };
    let running = server::spawn(config).await.unwrap();
    running.wait_ready(Duration::from_secs(10)).await.unwrap();
    let addr = format!("http://{}", running.grpc_addr);

    // Prices: from a JSON file; a bad file is refused before anything is sent.
    let prices = dir.path().join("prices.json");
    std::fs::write(
        &prices,
        r#"[
  {"model": "gpt-4o", "input_nusd": 2500, "cached_input_nusd": 1250, "output_nusd": 10000},
  {"model": "gpt-4o-mini", "input_nusd": 150, "cached_input_nusd": 75, "output_nusd": 600}
]"#,
    )
    .unwrap();
    let run = tally(
        &addr,
        &["prices", "set", "--file", prices.to_str().unwrap()],
    )
    .await;
    assert_eq!(ok(&run), "price catalog version 1 in force (2 models)\n");
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"[{"model": "x", "input_nusd": 2.5}]"#).unwrap();
    let run = tally(&addr, &["prices", "set", "--file", bad.to_str().unwrap()]).await;
    assert_eq!(run.code, 2, "{}", run.stdout);
    assert!(
        run.stderr
            .contains("models[0].input_nusd must be a whole number"),
        "{}",
        run.stderr
    );
    let run = tally(&addr, &["prices", "list"]).await;
    let text = ok(&run);
    assert!(text.starts_with("price catalog version 1\n"), "{text}");
    assert!(text.contains("2.500 / 1.250 / 10.000"), "{text}");
    let run = tally(&addr, &["prices", "list", "--json"]).await;
    let listed: serde_json::Value = serde_json::from_str(ok(&run)).unwrap();
    assert_eq!(listed["version"], 1);
    assert_eq!(listed["models"][1]["model"], "gpt-4o-mini");

    // Reports: charged at the prices in force; a retry counts nothing twice.
    let report = [
        "usage",
        "report",
        "--request-id",
        "req-1",
        "--subject",
        "k1",
        "--subscription",
        "free",
        "--model",
        "gpt-4o",
        "--input",
        "1000",
        "--cached-input",
        "400",
        "--output",
        "200",
        "--tag",
        "team=search",
    ];
    let run = tally(&addr, &report).await;
    let text = ok(&run);
    // (1000 - 400) × 2500 + 400 × 1250 + 200 × 10000 = 4,000,000 nusd.
    assert!(
        text.starts_with("request req-1: recorded as seq 1 at "),
        "{text}"
    );
    assert!(
        text.contains("cost $0.004000000 (price version 1)"),
        "{text}"
    );
    assert!(!text.contains("retry"), "{text}");
    let run = tally(&addr, &report).await;
    assert!(ok(&run).contains("a retry"), "{}", run.stdout);
    let run = tally(
        &addr,
        &[
            "usage",
            "report",
            "--request-id",
            "req-2",
            "--subject",
            "k2",
            "--model",
            "gpt-4o-mini",
            "--input",
            "100",
            "--output",
            "10",
            "--tag",
            "team=ads",
            "--json",
        ],
    )
    .await;
    let receipt: serde_json::Value = serde_json::from_str(ok(&run)).unwrap();
    assert_eq!(receipt["result"], "recorded");
    assert_eq!(receipt["seq"], 2);
    assert_eq!(receipt["cost_nusd"], 100 * 150 + 10 * 600);
    assert_eq!(receipt["duplicate"], false);
    let run = tally(
        &addr,
        &[
            "usage",
            "report",
            "--request-id",
            "req-3",
            "--subject",
            "k1",
        ],
    )
    .await;
    assert!(ok(&run).contains("(model not priced)"), "{}", run.stdout);
    // Bad input: the server's INVALID_ARGUMENT, naming the field, exit 2.
    let run = tally(
        &addr,
        &[
            "usage",
            "report",
            "--request-id",
            "req-4",
            "--subject",
            "k1",
            "--input",
            "1",
            "--cached-input",
            "2",
        ],
    )
    .await;
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("InvalidArgument") && run.stderr.contains("cached_input_tokens"),
        "{}",
        run.stderr
    );

    // Query: the range around now, on quarter hours.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let from = now.div_euclid(QUARTER_HOUR_MS) * QUARTER_HOUR_MS - 4 * QUARTER_HOUR_MS;
    let to = from + 12 * QUARTER_HOUR_MS;
    let (from_rfc, to_ms) = (tally_client::format_time_ms(from), to.to_string());
    let run = tally(
        &addr,
        &[
            "usage",
            "query",
            "--from",
            &from_rfc,
            "--to",
            &to_ms,
            "--group-by",
            "subject,tag:team",
        ],
    )
    .await;
    let text = ok(&run);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "header + 3 groups: {text}");
    assert!(
        lines[0].starts_with("PERIOD") && lines[0].contains("SUBJECT  TAG:TEAM  REQUESTS"),
        "{text}"
    );
    assert!(lines[0].ends_with("COST_USD"), "{text}");
    let search = lines
        .iter()
        .find(|l| l.contains("search"))
        .expect("k1's search row");
    assert!(search.ends_with("0.004000000"), "{text}");
    let run = tally(
        &addr,
        &[
            "usage",
            "query",
            "--from",
            &from.to_string(),
            "--to",
            &to_ms,
            "--group-by",
            "model",
            "--subject",
            "k1",
            "--json",
        ],
    )
    .await;
    let rows = json_lines(ok(&run));
    assert_eq!(rows.len(), 2, "{}", run.stdout);
    let total_requests: u64 = rows.iter().map(|r| r["requests"].as_u64().unwrap()).sum();
    assert_eq!(total_requests, 2, "req-1 once, req-3");
    let run = tally(
        &addr,
        &[
            "usage",
            "query",
            "--from",
            &from.to_string(),
            "--to",
            &to_ms,
            "--group-by",
            "colour",
        ],
    )
    .await;
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("group_by[0]"), "{}", run.stderr);

    // Overview: no quotas are configured.
    let run = tally(&addr, &["usage", "overview", "--subject", "k1"]).await;
    assert_eq!(ok(&run), "(no quotas apply)\n");
    let run = tally(&addr, &["usage", "overview", "--subject", "k1", "--json"]).await;
    assert_eq!(ok(&run).trim(), "[]");

    // Export: JSON lines, the last seq on stderr; resume after it.
    let run = tally(&addr, &["usage", "export", "--max", "2"]).await;
    let records = json_lines(ok(&run));
    assert_eq!(
        records
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(records[0]["request_id"], "req-1");
    assert_eq!(records[0]["tags"]["team"], "search");
    assert_eq!(records[0]["cost_nusd"], 4_000_000);
    assert_eq!(records[0]["cost_usd"], "0.004000000");
    assert_eq!(run.stderr.trim(), "last_seq=2 records=2");
    let run = tally(&addr, &["usage", "export", "--after", "2"]).await;
    let records = json_lines(ok(&run));
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["request_id"], "req-3");
    assert_eq!(run.stderr.trim(), "last_seq=3 records=1");
    // Nothing new: the cursor stays.
    let run = tally(&addr, &["usage", "export", "--after", "3"]).await;
    assert_eq!(ok(&run), "");
    assert_eq!(run.stderr.trim(), "last_seq=3 records=0");

    running.stop().await.unwrap();
}
