//! `tally.v1.Usage` through gRPC against an in-process server on 127.0.0.1 port 0: input
//! validation naming wire fields, exactly-once reports, resumable exports, prices, the
//! reserve → commit/release flow and quota events.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tally_proto::tally::v1::usage_client::UsageClient;
use tally_proto::tally::v1::{
    CommitRequest, Enforcement as WireEnforcement, ExportUsageRequest, GetUsageOverviewRequest,
    Granularity, ListPricesRequest, Metric as WireMetric, ModelPrice, QueryUsageRequest,
    ReleaseRequest, ReportUsageRequest, ReserveRequest, SetPricesRequest, Settled as WireSettled,
    Tag, TokenCounts, UsageEvent, UsageFilter, UsageReceipt, UsageRecord, WatchEventsRequest,
    usage_event, usage_receipt,
};
use tally_server::engine::limits::WindowSpec;
use tally_server::engine::usage::{
    Dimension, Enforcement, Metric, QuotaFilter, QuotaSet, QuotaSpec,
};
use tally_server::engine::{Command, EngineSettings, Outcome};
use tally_server::node::usage_archive::ArchiveConfig;
use tally_server::node::{ManualClock, RaftTimings};
use tally_server::server::{self, LimitsSource, ServerConfig};
use tokio_stream::StreamExt;
use tonic::Code as GrpcCode;
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

/// Every test's whole budget: nothing here may hang.
const TEST_LIMIT: Duration = Duration::from_secs(60);
const HOUR_MS: i64 = 3_600_000;

async fn start_usage() -> (TestServer, UsageClient<Channel>) {
    let t = start(LIMITS).await;
    let usage = UsageClient::new(connect(t.server.grpc_addr).await);
    (t, usage)
}

fn report(id: &str, subject: &str, input: u64, output: u64) -> ReportUsageRequest {
    ReportUsageRequest {
        request_id: id.into(),
        subject: subject.into(),
        subscription: "free".into(),
        model: "gpt-test".into(),
        input_tokens: input,
        output_tokens: output,
        ..Default::default()
    }
}

fn tag(k: &str, v: &str) -> Tag {
    Tag {
        key: k.into(),
        value: v.into(),
    }
}

fn recorded(r: &UsageReceipt) -> &usage_receipt::Recorded {
    match &r.result {
        Some(usage_receipt::Result::Recorded(rec)) => rec,
        other => panic!("expected Recorded, got {other:?}"),
    }
}

fn total_query() -> QueryUsageRequest {
    QueryUsageRequest {
        start_ms: T0_MS - HOUR_MS,
        end_ms: T0_MS + HOUR_MS,
        group_by: vec![],
        granularity: Granularity::Total as i32,
        time_zone: String::new(),
        filter: None,
    }
}

async fn export_all(
    usage: &mut UsageClient<Channel>,
    after_seq: u64,
    max_records: u64,
) -> Vec<UsageRecord> {
    let mut stream = usage
        .export_usage(ExportUsageRequest {
            after_seq,
            max_records,
        })
        .await
        .expect("export starts")
        .into_inner();
    let mut out = Vec::new();
    while let Some(r) = stream.next().await {
        out.push(r.expect("record"));
    }
    out
}

/// Every record from the start, or the first error the export answers (at its start or
/// mid-stream).
async fn try_export_all(
    usage: &mut UsageClient<Channel>,
) -> Result<Vec<UsageRecord>, tonic::Status> {
    let request = ExportUsageRequest {
        after_seq: 0,
        max_records: 0,
    };
    let mut stream = usage.export_usage(request).await?.into_inner();
    let mut out = Vec::new();
    while let Some(r) = stream.next().await {
        out.push(r?);
    }
    Ok(out)
}

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("the test finishes in time")
}

fn assert_invalid(status: &tonic::Status, field: &str) {
    assert_eq!(status.code(), GrpcCode::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(field),
        "the message names `{field}`: {}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_invalid_argument_naming_the_field() {
    within(async {
        let (t, mut usage) = start_usage().await;
        let bad_reports = [
            (report("", "alice", 1, 1), "request_id"),
            (report("r1", "", 1, 1), "subject"),
            (
                ReportUsageRequest {
                    cached_input_tokens: 11,
                    ..report("r1", "alice", 10, 1)
                },
                "cached_input_tokens",
            ),
            (
                ReportUsageRequest {
                    reasoning_tokens: 2,
                    ..report("r1", "alice", 10, 1)
                },
                "reasoning_tokens",
            ),
            (
                ReportUsageRequest {
                    tags: vec![tag("team", "a"), tag("env", "x"), tag("team", "b")],
                    ..report("r1", "alice", 10, 1)
                },
                "tags",
            ),
            (
                ReportUsageRequest {
                    tags: vec![tag("team", "a"), tag("", "x")],
                    ..report("r1", "alice", 10, 1)
                },
                "tags[1].key",
            ),
        ];
        for (request, field) in bad_reports {
            let e = usage.report_usage(request).await.unwrap_err();
            assert_invalid(&e, field);
        }
        let e = usage
            .reserve(ReserveRequest {
                request_id: "r".into(),
                subject: "alice".into(),
                ttl_ms: 0,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_invalid(&e, "ttl_ms");
        let e = usage
            .reserve(ReserveRequest {
                request_id: "r".into(),
                subject: "alice".into(),
                ttl_ms: 1_000,
                estimate: Some(TokenCounts {
                    input_tokens: 1,
                    cached_input_tokens: 2,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_invalid(&e, "estimate.cached_input_tokens");
        let e = usage.commit(CommitRequest::default()).await.unwrap_err();
        assert_invalid(&e, "request_id");
        let e = usage.release(ReleaseRequest::default()).await.unwrap_err();
        assert_invalid(&e, "request_id");

        let e = usage
            .query_usage(QueryUsageRequest {
                group_by: vec!["subject".into(), "colour".into()],
                ..total_query()
            })
            .await
            .unwrap_err();
        assert_invalid(&e, "group_by[1]");
        let e = usage
            .query_usage(QueryUsageRequest {
                granularity: Granularity::Unspecified as i32,
                ..total_query()
            })
            .await
            .unwrap_err();
        assert_invalid(&e, "granularity");
        let e = usage
            .query_usage(QueryUsageRequest {
                time_zone: "Mars/Olympus".into(),
                ..total_query()
            })
            .await
            .unwrap_err();
        assert_invalid(&e, "time_zone");
        let e = usage
            .query_usage(QueryUsageRequest {
                end_ms: T0_MS - HOUR_MS,
                ..total_query()
            })
            .await
            .unwrap_err();
        assert_invalid(&e, "end_ms");

        let e = usage
            .set_prices(SetPricesRequest {
                models: vec![price("m", 1, 1, 1), price("m", 2, 2, 2)],
            })
            .await
            .unwrap_err();
        assert_invalid(&e, "models[1].model");
        let e = usage
            .get_usage_overview(GetUsageOverviewRequest::default())
            .await
            .unwrap_err();
        assert_invalid(&e, "subject");

        // Nothing of the refused requests was recorded.
        assert!(export_all(&mut usage, 0, 0).await.is_empty());
        t.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_report_counts_once() {
    within(async {
        let (t, mut usage) = start_usage().await;
        let request = ReportUsageRequest {
            tags: vec![tag("team", "search"), tag("env", "prod")],
            ..report("req-1", "alice", 100, 20)
        };
        let first = usage
            .report_usage(request.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(!first.duplicate);
        assert_eq!(first.request_id, "req-1");
        let second = usage.report_usage(request).await.unwrap().into_inner();
        assert!(second.duplicate, "the retry is answered as a duplicate");
        assert_eq!(recorded(&second).seq, recorded(&first).seq);
        assert_eq!(recorded(&first).seq, 1);
        assert_eq!(recorded(&first).settled, WireSettled::NoReservation as i32);

        let rows = usage
            .query_usage(total_query())
            .await
            .unwrap()
            .into_inner()
            .rows;
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].requests, 1);
        assert_eq!((rows[0].input_tokens, rows[0].output_tokens), (100, 20));
        // Grouped by a tag, through the filter.
        let rows = usage
            .query_usage(QueryUsageRequest {
                group_by: vec!["model".into(), "tag:team".into()],
                filter: Some(UsageFilter {
                    subject: Some("alice".into()),
                    tag: Some(tag("env", "prod")),
                    ..Default::default()
                }),
                time_zone: "Europe/Berlin".into(),
                ..total_query()
            })
            .await
            .unwrap()
            .into_inner()
            .rows;
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].group, ["gpt-test", "search"]);
        let rows = usage
            .query_usage(QueryUsageRequest {
                filter: Some(UsageFilter {
                    subject: Some("bob".into()),
                    ..Default::default()
                }),
                ..total_query()
            })
            .await
            .unwrap()
            .into_inner()
            .rows;
        assert!(rows.is_empty(), "{rows:?}");

        let records = export_all(&mut usage, 0, 0).await;
        assert_eq!(records.len(), 1, "{records:?}");
        let r = &records[0];
        assert_eq!((r.seq, r.request_id.as_str()), (1, "req-1"));
        assert_eq!(r.at_ms, T0_MS);
        assert_eq!(
            (
                r.subject.as_str(),
                r.subscription.as_str(),
                r.model.as_str()
            ),
            ("alice", "free", "gpt-test")
        );
        // Tags come back sorted by key.
        assert_eq!(r.tags, [tag("env", "prod"), tag("team", "search")]);
        t.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_resumes_without_gap_or_duplicate() {
    within(async {
        let (t, usage) = start_usage().await;
        const N: usize = 2_500;
        let permits = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..N {
            let mut client = usage.clone();
            let permit = permits.clone().acquire_owned().await.unwrap();
            tasks.spawn(async move {
                let _permit = permit;
                client
                    .report_usage(report(&format!("req-{i}"), "alice", 10, 5))
                    .await
                    .expect("report accepted")
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        let mut usage = usage;
        let all: BTreeSet<String> = (0..N).map(|i| format!("req-{i}")).collect();

        // A bounded export, then a resume from its last seq.
        let first = export_all(&mut usage, 0, 1_200).await;
        assert_eq!(
            first.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (1..=1_200).collect::<Vec<u64>>()
        );
        let rest = export_all(&mut usage, 1_200, 0).await;
        assert_eq!(
            rest.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (1_201..=N as u64).collect::<Vec<u64>>()
        );
        let mut seen = BTreeSet::new();
        for r in first.iter().chain(&rest) {
            assert!(seen.insert(r.request_id.clone()), "{} twice", r.request_id);
        }
        assert_eq!(seen, all, "every report exactly once");

        // A reader that goes away mid-stream resumes from the last seq it received.
        let mut stream = usage
            .export_usage(ExportUsageRequest {
                after_seq: 0,
                max_records: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let mut part = Vec::new();
        while part.len() < 700 {
            part.push(stream.next().await.expect("more records").unwrap());
        }
        drop(stream);
        let last = part.last().unwrap().seq;
        assert_eq!(last, 700);
        let resumed = export_all(&mut usage, last, 0).await;
        assert_eq!(resumed.first().map(|r| r.seq), Some(701));
        let ids: BTreeSet<String> = part
            .iter()
            .chain(&resumed)
            .map(|r| r.request_id.clone())
            .collect();
        assert_eq!(part.len() + resumed.len(), N, "no record twice");
        assert_eq!(ids, all);

        // Past the end: nothing, not an error.
        assert!(export_all(&mut usage, N as u64, 0).await.is_empty());
        // A query agrees with the export.
        let rows = usage
            .query_usage(total_query())
            .await
            .unwrap()
            .into_inner()
            .rows;
        assert_eq!(rows[0].requests, N as u64);
        assert_eq!(rows[0].input_tokens, 10 * N as u64);
        t.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_reads_history_past_the_engine_tail_from_disk_and_after_a_restart() {
    within(async {
        let dir = tempfile::tempdir().unwrap();
        let config = |dir: &std::path::Path| ServerConfig {
            limits: LimitsSource::Inline {
                origin: "test limits".into(),
                text: LIMITS.into(),
            },
            clock: Arc::new(ManualClock::new(T0_MS)),
            data_dir: dir.join("node-1"),
            // Snapshots every few entries: the archive is synced before each.
            timings: RaftTimings {
                snapshot_every_entries: 7,
                ..fast_timings()
            },
            engine: EngineSettings {
                max_usage_records: 10,
                ..EngineSettings::default()
            },
            ..ServerConfig::default()
        };
        let server = server::spawn(config(dir.path())).await.unwrap();
        server.wait_ready(Duration::from_secs(10)).await.unwrap();
        let mut usage = UsageClient::new(connect(server.grpc_addr).await);
        for i in 0..40 {
            let r = report(&format!("r{i}"), "alice", i + 1, 1);
            usage.report_usage(r).await.unwrap();
        }
        // The engine holds the newest 10; the export has all 40, once, in order.
        let all = export_all(&mut usage, 0, 0).await;
        assert_eq!(
            all.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (1..=40).collect::<Vec<_>>()
        );
        assert_eq!(all[4].input_tokens, 5);
        server.stop().await.unwrap();
        // Restarted from its snapshot and log: the same 40, and new records continue at 41.
        let server = server::spawn(config(dir.path())).await.unwrap();
        server.wait_ready(Duration::from_secs(10)).await.unwrap();
        let mut usage = UsageClient::new(connect(server.grpc_addr).await);
        usage
            .report_usage(report("r-after", "bob", 7, 7))
            .await
            .unwrap();
        let again = export_all(&mut usage, 0, 0).await;
        assert_eq!(again.len(), 41);
        assert_eq!(&again[..40], &all[..]);
        assert_eq!((again[40].seq, again[40].subject.as_str()), (41, "bob"));
        server.stop().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_past_archive_retention_is_out_of_range_naming_the_first_seq_available() {
    within(async {
        let t = start_with(LIMITS, |c| {
            c.archive = ArchiveConfig {
                max_bytes: 1,
                segment_max_bytes: 1_000,
                ..ArchiveConfig::default()
            };
        })
        .await;
        let mut usage = UsageClient::new(connect(t.server.grpc_addr).await);
        for i in 0..40 {
            usage
                .report_usage(report(&format!("r{i}"), "alice", 1, 1))
                .await
                .unwrap();
        }
        let e = usage
            .export_usage(ExportUsageRequest {
                after_seq: 0,
                max_records: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), GrpcCode::OutOfRange, "{e:?}");
        let first: u64 = e
            .message()
            .split("before seq ")
            .nth(1)
            .and_then(|m| m.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("names the first seq held: {}", e.message()));
        assert!(first > 1 && first <= 40, "{first}");
        let kept = export_all(&mut usage, first - 1, 0).await;
        assert_eq!(kept.first().map(|r| r.seq), Some(first));
        assert_eq!(kept.last().map(|r| r.seq), Some(40));
        t.stop().await;
    })
    .await
}

/// A follower wiped and restored from the leader's snapshot holds only what that snapshot's
/// engine tail carries; it copies the rest from the other members (backfill), after which it
/// exports every record, the same as the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_restored_by_snapshot_fills_its_archive_from_other_members() {
    within(async {
        let base = ServerConfig {
            limits: LimitsSource::Inline {
                origin: "test limits".into(),
                text: LIMITS.into(),
            },
            timings: RaftTimings {
                snapshot_every_entries: 40,
                ..fast_timings()
            },
            engine: EngineSettings {
                max_usage_records: 50,
                ..EngineSettings::default()
            },
            ..ServerConfig::default()
        };
        let mut c = Cluster::three(base, Arc::new(ManualClock::new(T0_MS))).await;
        let leader = c.leader(None).await as usize;
        let victim = if leader == 3 { 2 } else { 3 };
        c.stop(victim).await;
        let victim_dir = c.dir.path().join(format!("node-{victim}"));
        std::fs::remove_dir_all(&victim_dir).unwrap();
        let mut usage = UsageClient::new(connect(c.node(leader).grpc_addr).await);
        for i in 0..200 {
            let r = report(&format!("r{i}"), "alice", 1, 1);
            usage.report_usage(r).await.unwrap();
        }
        let all = export_all(&mut usage, 0, 0).await;
        assert_eq!(all.len(), 200);
        c.start_node(victim, false).await;
        c.node(victim)
            .wait_ready(Duration::from_secs(15))
            .await
            .unwrap();
        let mut restored = UsageClient::new(connect(c.node(victim).grpc_addr).await);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        // Pages are copied one at a time, possibly from different members (another follower
        // may have a hole of its own): until the last is in, an export stops at the first
        // hole it meets, UNAVAILABLE naming it.
        let got = loop {
            match try_export_all(&mut restored).await {
                Ok(records) => break records,
                Err(e) => {
                    assert_eq!(e.code(), GrpcCode::Unavailable, "{e:?}");
                    assert!(e.message().contains("does not hold usage records"), "{e:?}");
                }
            }
            assert!(std::time::Instant::now() < deadline, "filled within 20 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(got, all, "the same records, once, in order");
        // It came by backfill: a closed segment from seq 1, which no rotation of 64 MiB
        // segments could have closed (it would have been written in order otherwise).
        let names: Vec<String> = std::fs::read_dir(victim_dir.join("usage"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names
                .iter()
                .any(|n| n.starts_with("u-00000000000000000001-") && n.ends_with(".seg")),
            "{names:?}"
        );
        for i in 1..=3 {
            if c.nodes[i - 1].is_some() {
                c.stop(i).await;
            }
        }
    })
    .await
}

fn price(model: &str, input: u64, cached: u64, output: u64) -> ModelPrice {
    ModelPrice {
        model: model.into(),
        input_nusd: input,
        cached_input_nusd: cached,
        output_nusd: output,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_charged_at_the_prices_in_force() {
    within(async {
        let (t, mut usage) = start_usage().await;
        let listed = usage
            .list_prices(ListPricesRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!((listed.version, listed.models.len()), (0, 0));

        let catalog = vec![
            price("gpt-test", 2_500, 1_250, 10_000),
            price("other", 1, 1, 1),
        ];
        let set = usage
            .set_prices(SetPricesRequest {
                models: catalog.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(set.version, 1);
        let listed = usage
            .list_prices(ListPricesRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.version, 1);
        assert_eq!(listed.models, catalog);

        let receipt = usage
            .report_usage(ReportUsageRequest {
                cached_input_tokens: 400,
                reasoning_tokens: 50,
                ..report("priced", "alice", 1_000, 200)
            })
            .await
            .unwrap()
            .into_inner();
        // (1000 - 400) × 2500 + 400 × 1250 + 200 × 10000
        let expected = 600 * 2_500 + 400 * 1_250 + 200 * 10_000;
        assert_eq!(recorded(&receipt).cost_nusd, expected);
        assert_eq!(recorded(&receipt).price_version, 1);
        // An unpriced model costs nothing, at version 0.
        let unpriced = usage
            .report_usage(ReportUsageRequest {
                model: "unknown".into(),
                ..report("unpriced", "alice", 1_000, 200)
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (
                recorded(&unpriced).cost_nusd,
                recorded(&unpriced).price_version
            ),
            (0, 0)
        );

        let set = usage
            .set_prices(SetPricesRequest {
                models: vec![price("gpt-test", 1, 1, 1)],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(set.version, 2);
        let again = usage
            .report_usage(report("second", "alice", 10, 10))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (recorded(&again).cost_nusd, recorded(&again).price_version),
            (20, 2)
        );
        let records = export_all(&mut usage, 0, 0).await;
        assert_eq!(
            records
                .iter()
                .map(|r| (r.cost_nusd, r.price_version))
                .collect::<Vec<_>>(),
            [(expected, 1), (0, 0), (20, 2)]
        );
        let rows = usage
            .query_usage(total_query())
            .await
            .unwrap()
            .into_inner()
            .rows;
        assert_eq!(rows[0].cost_nusd, expected + 20);
        t.stop().await;
    })
    .await
}

/// A hard budget of 1,000 tokens per subject per hour, alerting at 50 %.
async fn put_quota(t: &TestServer) {
    put_quota_on(&t.server.node().expect("node started")).await
}

/// [`put_quota`], proposed on `node`.
async fn put_quota_on(node: &tally_server::node::Node) {
    let set = QuotaSet {
        quotas: vec![QuotaSpec {
            name: "tokens-per-hour".into(),
            filter: QuotaFilter::default(),
            per: vec![Dimension::Subject],
            metric: Metric::TotalTokens,
            limit: 1_000,
            window: Some(WindowSpec::Fixed {
                duration_ms: HOUR_MS as u64,
            }),
            enforcement: Enforcement::Hard,
            thresholds_pct: vec![50],
        }],
    };
    let outcome = node.propose(Command::ReplaceQuotas(set)).await.unwrap();
    assert!(
        matches!(outcome, Outcome::QuotasReplaced { quotas: 1, .. }),
        "{outcome:?}"
    );
}

fn estimate(input: u64, output: u64) -> Option<TokenCounts> {
    Some(TokenCounts {
        input_tokens: input,
        output_tokens: output,
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_commit_release_and_a_denial_is_an_ok_answer() {
    within(async {
        let (t, mut usage) = start_usage().await;
        put_quota(&t).await;
        let reserve = |id: &str, input: u64| ReserveRequest {
            request_id: id.into(),
            subject: "alice".into(),
            subscription: "free".into(),
            model: "gpt-test".into(),
            estimate: estimate(input, 100),
            ttl_ms: 60_000,
            tags: vec![],
            charge_on_expiry: false,
        };
        let held = usage.reserve(reserve("a", 500)).await.unwrap().into_inner();
        let Some(usage_receipt::Result::Reserved(r)) = &held.result else {
            panic!("expected Reserved, got {held:?}");
        };
        assert_eq!(r.expires_ms, T0_MS + 60_000);
        assert_eq!(r.standings.len(), 1);
        let s = &r.standings[0];
        assert_eq!(s.quota, "tokens-per-hour");
        assert_eq!(s.key, ["alice"]);
        assert_eq!(s.metric, WireMetric::TotalTokens as i32);
        assert_eq!(s.enforcement, WireEnforcement::Hard as i32);
        assert_eq!((s.limit, s.reserved, s.remaining), (1_000, 600, 400));

        // 600 held, 600 more do not fit: an OK answer with the denial.
        let denied = usage.reserve(reserve("b", 500)).await.unwrap().into_inner();
        let Some(usage_receipt::Result::Denied(d)) = &denied.result else {
            panic!("expected Denied, got {denied:?}");
        };
        assert_eq!(d.standing.as_ref().unwrap().quota, "tokens-per-hour");

        let committed = usage
            .commit(CommitRequest {
                request_id: "a".into(),
                input_tokens: 300,
                output_tokens: 50,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let rec = recorded(&committed);
        assert_eq!(rec.settled, WireSettled::Reservation as i32);
        assert_eq!(rec.overshoot_tokens, 0);

        let overview = usage
            .get_usage_overview(GetUsageOverviewRequest {
                subject: "alice".into(),
                subscription: "free".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .standings;
        assert_eq!(overview.len(), 1, "{overview:?}");
        assert_eq!((overview[0].used, overview[0].reserved), (350, 0));

        let released = usage
            .release(ReleaseRequest {
                request_id: "never-reserved".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(matches!(
            released.result,
            Some(usage_receipt::Result::Released(usage_receipt::Released {
                found: false
            }))
        ));
        usage.reserve(reserve("c", 100)).await.unwrap();
        let released = usage
            .release(ReleaseRequest {
                request_id: "c".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(matches!(
            released.result,
            Some(usage_receipt::Result::Released(usage_receipt::Released {
                found: true
            }))
        ));
        t.stop().await;
    })
    .await
}

async fn next_event(stream: &mut tonic::Streaming<UsageEvent>) -> UsageEvent {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("an event within 5 s")
        .expect("stream open")
        .expect("event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_thresholds_and_expired_reservations() {
    within(async {
        let (t, mut usage) = start_usage().await;
        put_quota(&t).await;
        let mut events = usage
            .watch_events(WatchEventsRequest { after_seq: 0 })
            .await
            .unwrap()
            .into_inner();
        // 600 of 1,000 tokens: the 50 % threshold fires.
        usage
            .report_usage(report("big", "alice", 500, 100))
            .await
            .unwrap();
        let e = next_event(&mut events).await;
        assert_eq!(e.seq, 1);
        let Some(usage_event::Kind::Threshold(th)) = &e.kind else {
            panic!("expected a threshold, got {e:?}");
        };
        assert_eq!(th.pct, 50);
        assert_eq!(th.standing.as_ref().unwrap().used, 600);

        // A reservation that outlives its TTL releases itself (at the next batch).
        usage
            .reserve(ReserveRequest {
                request_id: "short".into(),
                subject: "bob".into(),
                estimate: estimate(1, 1),
                ttl_ms: 1_000,
                ..Default::default()
            })
            .await
            .unwrap();
        t.clock.advance_ms(2_000);
        usage
            .report_usage(report("tick", "carol", 1, 1))
            .await
            .unwrap();
        let e = next_event(&mut events).await;
        assert!(
            matches!(
                &e.kind,
                Some(usage_event::Kind::ReservationExpired(x)) if x.request_id == "short"
            ),
            "{e:?}"
        );
        drop(events);

        // A watcher resuming after seq 1 sees only the later event.
        let mut events = usage
            .watch_events(WatchEventsRequest { after_seq: 1 })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(next_event(&mut events).await.seq, 2);
        drop(events);
        t.stop().await;
    })
    .await
}

/// Graceful shutdown waits for every open stream, so an events stream must end when the
/// server stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_events_stream_does_not_hold_up_shutdown() {
    within(async {
        let (t, mut usage) = start_usage().await;
        let mut events = usage
            .watch_events(WatchEventsRequest { after_seq: 0 })
            .await
            .unwrap()
            .into_inner();
        tokio::time::timeout(Duration::from_secs(10), t.stop())
            .await
            .expect("the server stops within 10 s with a stream open");
        // The stream ended (with UNAVAILABLE, or with the connection).
        let end = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("the stream ends");
        assert!(!matches!(end, Some(Ok(_))), "{end:?}");
    })
    .await
}

/// On a follower, writes are forwarded to the leader, and linearizable reads are served there
/// too: the report it forwarded is in its own query and export at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_forwards_reports_and_serves_linearizable_reads() {
    within(async {
        let t = start_on(Topology::ThreeNodes, LIMITS, |_| {}).await;
        let mut usage = UsageClient::new(connect(t.server.grpc_addr).await);
        let receipt = usage
            .report_usage(report("via-follower", "alice", 1, 1))
            .await
            .expect("a follower forwards the report")
            .into_inner();
        assert_eq!(recorded(&receipt).seq, 1);
        let rows = usage
            .query_usage(total_query())
            .await
            .expect("a follower serves linearizable reads")
            .into_inner()
            .rows;
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].requests, 1);
        let records = export_all(&mut usage, 0, 0).await;
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].request_id, "via-follower");
        t.stop().await;
    })
    .await
}

/// Three nodes serving `LIMITS`, every one in the cluster's slots (so any can be stopped).
async fn three_nodes() -> Cluster {
    let config = tally_server::server::ServerConfig {
        limits: tally_server::server::LimitsSource::Inline {
            origin: "test limits".into(),
            text: LIMITS.into(),
        },
        timings: fast_timings(),
        ..tally_server::server::ServerConfig::default()
    };
    Cluster::three(
        config,
        Arc::new(tally_server::node::ManualClock::new(T0_MS)),
    )
    .await
}

async fn usage_client(c: &Cluster, i: usize) -> UsageClient<Channel> {
    UsageClient::new(connect(c.node(i).grpc_addr).await)
}

/// What every node must answer once reports `1..=n` of [`report_round`] are acknowledged.
async fn assert_reads_see(usage: &mut UsageClient<Channel>, n: u64, node: usize) {
    let tokens: u64 = (1..=n).map(|k| 10 + k).sum();
    let rows = usage
        .query_usage(total_query())
        .await
        .unwrap_or_else(|e| panic!("node {node} queries: {e:?}"))
        .into_inner()
        .rows;
    assert_eq!(rows.len(), 1, "node {node} after {n}: {rows:?}");
    assert_eq!(
        rows[0].requests, n,
        "node {node} misses an acknowledged report"
    );
    assert_eq!(rows[0].input_tokens + rows[0].output_tokens, tokens);
    let standings = usage
        .get_usage_overview(GetUsageOverviewRequest {
            subject: "alice".into(),
            subscription: "free".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("node {node} overview: {e:?}"))
        .into_inner()
        .standings;
    assert_eq!(standings.len(), 1, "node {node}: {standings:?}");
    assert_eq!(standings[0].used, tokens, "node {node} after {n}");
    let records = export_all(usage, 0, 0).await;
    let ids: Vec<_> = records.iter().map(|r| r.request_id.clone()).collect();
    let want: Vec<_> = (1..=n).map(|k| format!("round-{k}")).collect();
    assert_eq!(ids, want, "node {node} exports every acknowledged record");
}

/// Read-your-writes across nodes: a report acknowledged by the leader (or forwarded by one
/// follower) is in every follower's QueryUsage, GetUsageOverview and ExportUsage at once,
/// with no wait for replication in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_follower_reads_every_write_acknowledged_before() {
    within(async {
        let c = three_nodes().await;
        let leader = c.leader(None).await as usize;
        let followers: Vec<usize> = (1..=3).filter(|i| *i != leader).collect();
        let leader_node = c.node(leader).node().expect("leader runs");
        put_quota_on(&leader_node).await;
        let mut writers = vec![(leader, usage_client(&c, leader).await)];
        let mut readers = Vec::new();
        for &f in &followers {
            writers.push((f, usage_client(&c, f).await));
            readers.push((f, usage_client(&c, f).await));
        }
        for n in 1..=12u64 {
            // Through the leader, then through each follower (forwarded) in turn.
            let (by, w) = &mut writers[n as usize % 3];
            w.report_usage(report(&format!("round-{n}"), "alice", 10, n))
                .await
                .unwrap_or_else(|e| panic!("node {by} reports: {e:?}"));
            for (f, r) in &mut readers {
                assert_reads_see(r, n, *f).await;
            }
        }
    })
    .await
}

/// No leader, no quorum: a follower's linearizable read answers UNAVAILABLE within the
/// caller's deadline (and within the node's own bound without one) instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_without_quorum_answers_reads_unavailable_within_the_deadline() {
    within(async {
        let mut c = three_nodes().await;
        let leader = c.leader(None).await as usize;
        let others: Vec<usize> = (1..=3).filter(|i| *i != leader).collect();
        let survivor = others[0];
        let mut usage = usage_client(&c, survivor).await;
        usage
            .report_usage(report("before", "alice", 1, 1))
            .await
            .unwrap();
        c.stop(leader).await;
        c.stop(others[1]).await;
        for deadline in [Some(300), Some(300), None, Some(300)] {
            let mut request = tonic::Request::new(total_query());
            if let Some(ms) = deadline {
                request.set_timeout(Duration::from_millis(ms));
            }
            let started = std::time::Instant::now();
            let e = usage
                .query_usage(request)
                .await
                .expect_err("no quorum, no read");
            let took = started.elapsed();
            assert_eq!(e.code(), GrpcCode::Unavailable, "{e:?}");
            // The node's own bound is its forward timeout (2 s).
            let bound = Duration::from_millis(deadline.map_or(2_000, |ms| ms) + 500);
            assert!(took < bound, "answered after {took:?} ({deadline:?})");
        }
    })
    .await
}
