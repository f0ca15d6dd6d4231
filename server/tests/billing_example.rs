//! The Python billing example (`examples/billing/export_usage.py`) run for real against an
//! in-process tallyd on 127.0.0.1: usage reported over `tally.v1.Usage/ReportUsage` on the
//! day asked and the days around it, exported per subscription, subject and model with the
//! exact dollar cost of the prices set; and its failures (auth, a malformed day, a day past
//! retention, no server) as a clear message and a non-zero exit code.
//!
//! The Python environment is `common::pyenv` (grpcio and grpcio-tools in a venv under the
//! build directory); where it cannot be made outside CI the tests say so and pass.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pyenv::{PyEnv, pyenv, repo_file};
use common::*;
use tally_proto::tally::v1::usage_client::UsageClient;
use tally_proto::tally::v1::{ModelPrice, ReportUsageRequest, SetPricesRequest, usage_receipt};
use tally_server::api::auth::{AuthConfig, Role};
use tally_server::node::ManualClock;
use tonic::Request;
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

const ADMIN: &str = "tally_admin_billing_example_0123456789";
const BILLING: &str = "tally_billing_example_abcdef0123456789";
const READER: &str = "tally_reader_billing_example_99887766";
const WRONG: &str = "tally_wrong_billing_example_000000000";

/// How long one run of the script may take before it is killed.
const SCRIPT_LIMIT: Duration = Duration::from_secs(60);
const HOUR_MS: i64 = 3_600_000;
const MINUTE_MS: i64 = 60_000;
/// 2026-11-23T00:00:00Z: the day the tests export.
const DAY_MS: i64 = T0_MS - 12 * HOUR_MS;
const DAY: &str = "2026-11-23";

/// One usage report: when it is recorded (the manual clock is moved there first), its
/// attribution and its tokens (input, cached input, output, reasoning).
struct Use {
    at_ms: i64,
    id: &'static str,
    subscription: &'static str,
    subject: &'static str,
    model: &'static str,
    tokens: [u64; 4],
}

/// What is reported, in time order. Prices (nano-dollars per token): gpt-4o 2,500 input,
/// 1,250 cached input, 10,000 output; gpt-4o-mini 150, 75, 600; o3 has none (costs 0).
const USES: &[Use] = &[
    // The day before (2026-11-22, UTC): never in the export of the 23rd.
    Use {
        at_ms: DAY_MS - 2 * HOUR_MS,
        id: "before-1",
        subscription: "trial",
        subject: "frank",
        model: "gpt-4o",
        tokens: [100, 0, 100, 0],
    },
    Use {
        at_ms: DAY_MS - 1,
        id: "before-2",
        subscription: "pro",
        subject: "alice",
        model: "gpt-4o",
        tokens: [1, 0, 1, 0],
    },
    // The day: 2026-11-23T00:00:00.000Z to 23:59:59.999Z.
    // (800 × 2,500 + 200 × 1,250 + 300 × 10,000 = 5,250,000 nusd)
    Use {
        at_ms: DAY_MS,
        id: "day-1",
        subscription: "pro",
        subject: "alice",
        model: "gpt-4o",
        tokens: [1_000, 200, 300, 50],
    },
    // 4,000,000 × 150 + 1,000,000 × 600 = 1,200,000,000 nusd: 1.2 USD.
    Use {
        at_ms: DAY_MS + 9 * HOUR_MS + 30 * MINUTE_MS,
        id: "day-2",
        subscription: "pro",
        subject: "bob",
        model: "gpt-4o-mini",
        tokens: [4_000_000, 0, 1_000_000, 0],
    },
    // 100 × 150 + 20 × 600 = 27,000 nusd.
    Use {
        at_ms: DAY_MS + 12 * HOUR_MS,
        id: "day-3",
        subscription: "free",
        subject: "carol",
        model: "gpt-4o-mini",
        tokens: [100, 0, 20, 0],
    },
    // 1,000 × 2,500 + 1,000 × 1,250 + 500 × 10,000 = 8,750,000 nusd.
    Use {
        at_ms: DAY_MS + 15 * HOUR_MS,
        id: "day-4",
        subscription: "pro",
        subject: "alice",
        model: "gpt-4o",
        tokens: [2_000, 1_000, 500, 100],
    },
    // A model without a price: counted, at no cost.
    Use {
        at_ms: DAY_MS + 18 * HOUR_MS,
        id: "day-5",
        subscription: "enterprise",
        subject: "dave",
        model: "o3",
        tokens: [500, 0, 500, 400],
    },
    // The day's last millisecond. 10 × 2,500 + 10 × 10,000 = 125,000 nusd.
    Use {
        at_ms: DAY_MS + 24 * HOUR_MS - 1,
        id: "day-6",
        subscription: "free",
        subject: "carol",
        model: "gpt-4o",
        tokens: [10, 0, 10, 0],
    },
    // The day after (2026-11-24, UTC), from its first millisecond: not in the export of
    // the 23rd in UTC, but in New York's 23rd (19:00 EST).
    // 7 × 2,500 + 3 × 10,000 = 47,500 nusd.
    Use {
        at_ms: DAY_MS + 24 * HOUR_MS,
        id: "after-1",
        subscription: "pro",
        subject: "alice",
        model: "gpt-4o",
        tokens: [7, 0, 3, 0],
    },
    // 1,000 × 150 = 150,000 nusd.
    Use {
        at_ms: DAY_MS + 24 * HOUR_MS,
        id: "after-2",
        subscription: "enterprise",
        subject: "erin",
        model: "gpt-4o-mini",
        tokens: [1_000, 0, 0, 0],
    },
];

const HEADER: &str = "day,time_zone,subscription,subject,model,requests,input_tokens,\
cached_input_tokens,output_tokens,reasoning_tokens,total_tokens,cost_nusd,cost_usd";
const SUBSCRIPTION_HEADER: &str = "day,time_zone,subscription,requests,input_tokens,\
cached_input_tokens,output_tokens,reasoning_tokens,total_tokens,cost_nusd,cost_usd";

/// A server holding [`USES`], with tokens for every role, and the script's environment.
struct Fixture {
    py: PyEnv,
    t: TestServer,
    clock: Arc<ManualClock>,
    usage: UsageClient<Channel>,
    addr: String,
    out: tempfile::TempDir,
}

/// A request carrying `authorization: Bearer <token>`.
fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn report_request(u: &Use) -> ReportUsageRequest {
    let [input, cached, output, reasoning] = u.tokens;
    ReportUsageRequest {
        request_id: u.id.into(),
        subject: u.subject.into(),
        subscription: u.subscription.into(),
        model: u.model.into(),
        input_tokens: input,
        cached_input_tokens: cached,
        output_tokens: output,
        reasoning_tokens: reasoning,
        tags: vec![],
    }
}

/// Starts tallyd (aggregates kept 2 days) on a clock before the first use, sets the prices
/// and reports [`USES`], each at its time. `None` when the Python environment is missing
/// (outside CI).
async fn setup() -> Option<Fixture> {
    let py = tokio::task::spawn_blocking(pyenv).await.unwrap()?;
    let auth = AuthConfig::default()
        .with_token("ops", Role::Admin, ADMIN)
        .and_then(|a| a.with_token("finance", Role::Billing, BILLING))
        .and_then(|a| a.with_token("dashboard", Role::ReadOnly, READER))
        .unwrap();
    let clock = Arc::new(ManualClock::new(USES[0].at_ms - HOUR_MS));
    let t = start_with(LIMITS, |c| {
        c.auth = auth;
        c.clock = clock.clone();
        c.engine.usage_bucket_retention_ms = 2 * 86_400_000;
    })
    .await;
    let mut usage = UsageClient::new(connect(t.server.grpc_addr).await);
    let prices = SetPricesRequest {
        models: vec![
            ModelPrice {
                model: "gpt-4o".into(),
                input_nusd: 2_500,
                cached_input_nusd: 1_250,
                output_nusd: 10_000,
            },
            ModelPrice {
                model: "gpt-4o-mini".into(),
                input_nusd: 150,
                cached_input_nusd: 75,
                output_nusd: 600,
            },
        ],
    };
    usage
        .set_prices(with_token(prices, ADMIN))
        .await
        .expect("prices set");
    for u in USES {
        clock.set_ms(u.at_ms);
        let receipt = usage
            .report_usage(report_request(u))
            .await
            .expect("usage reported")
            .into_inner();
        match receipt.result {
            Some(usage_receipt::Result::Recorded(r)) => {
                assert_eq!(r.at_ms, u.at_ms, "{} recorded at its time", u.id)
            }
            other => panic!("{}: expected Recorded, got {other:?}", u.id),
        }
    }
    // A retried report (same request id) is answered again and counts nothing twice.
    let retry = usage
        .report_usage(report_request(&USES[3]))
        .await
        .expect("retry answered")
        .into_inner();
    assert!(retry.duplicate, "a retry is a duplicate: {retry:?}");
    let addr = t.server.grpc_addr.to_string();
    Some(Fixture {
        py,
        t,
        clock,
        usage,
        addr,
        out: tempfile::tempdir().unwrap(),
    })
}

/// What one run of the script did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    /// Failed with `code`, one message on stderr, no traceback.
    fn assert_failed(&self, code: i32) {
        assert_eq!(self.code, Some(code), "exit code: {self:#?}");
        assert!(self.stdout.is_empty(), "no CSV on a failure: {self:#?}");
        assert!(
            self.stderr.contains("error:") && !self.stderr.contains("Traceback"),
            "a message, no traceback: {}",
            self.stderr
        );
    }
}

/// Runs `export_usage.py` with `args` (no TALLY_* variables from this environment), killed
/// after [`SCRIPT_LIMIT`].
async fn export(py: &PyEnv, args: &[&str]) -> Run {
    export_with_env(py, args, None).await
}

/// [`export`] with `TALLY_TOKEN` set to `token`.
async fn export_with_env(py: &PyEnv, args: &[&str], token: Option<&str>) -> Run {
    let python = py.python.clone();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let token = token.map(str::to_owned);
    tokio::task::spawn_blocking(move || run_script(&python, &args, token.as_deref()))
        .await
        .unwrap()
}

fn run_script(python: &Path, args: &[String], token: Option<&str>) -> Run {
    // Output to files, not pipes: a child that fills a pipe nobody reads would never end.
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut command = Command::new(python);
    command
        .arg(repo_file("examples/billing/export_usage.py"))
        .args(args)
        .env_remove("TALLY_TOKEN")
        .env_remove("TALLY_ADDR")
        .env_remove("TALLY_CA")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    if let Some(token) = token {
        command.env("TALLY_TOKEN", token);
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("python starts");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > SCRIPT_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "export_usage.py {args:?} did not end within {SCRIPT_LIMIT:?}; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Run {
        code: status.code(),
        stdout: std::fs::read_to_string(&out_path).unwrap(),
        stderr: std::fs::read_to_string(&err_path).unwrap(),
    }
}

impl Fixture {
    fn out_file(&self, name: &str) -> PathBuf {
        self.out.path().join(name)
    }

    async fn export(&self, args: &[&str]) -> Run {
        self.export_with_env(args, None).await
    }

    async fn export_with_env(&self, args: &[&str], token: Option<&str>) -> Run {
        let mut all = vec!["--addr", &self.addr, "--timeout", "20"];
        all.extend_from_slice(args);
        export_with_env(&self.py, &all, token).await
    }

    async fn stop(self) {
        self.t.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_the_day_per_subscription_subject_and_model_with_exact_costs() {
    let Some(f) = setup().await else { return };
    let out = f.out_file("usage.csv");
    let run = f
        .export(&[
            "--token",
            BILLING,
            "--day",
            DAY,
            "--out",
            out.to_str().unwrap(),
        ])
        .await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.stdout.is_empty(), "the CSV goes to --out: {run:#?}");
    assert!(
        run.stderr.contains("5 rows, 6 requests, 1.214152000 USD"),
        "a summary on stderr: {}",
        run.stderr
    );
    let csv = std::fs::read_to_string(&out).unwrap();
    assert!(!csv.contains('"'), "no quoting needed here: {csv}");
    let lines: Vec<&str> = csv.lines().collect();
    // Sorted by subscription, subject, model. Only the 23rd's records; totals = input +
    // output; costs from the prices, to the nano-dollar.
    assert_eq!(
        lines,
        [
            HEADER,
            "2026-11-23,UTC,enterprise,dave,o3,1,500,0,500,400,1000,0,0.000000000",
            "2026-11-23,UTC,free,carol,gpt-4o,1,10,0,10,0,20,125000,0.000125000",
            "2026-11-23,UTC,free,carol,gpt-4o-mini,1,100,0,20,0,120,27000,0.000027000",
            // day-1 + day-4: 5,250,000 + 8,750,000 nusd.
            "2026-11-23,UTC,pro,alice,gpt-4o,2,3000,1200,800,150,3800,14000000,0.014000000",
            "2026-11-23,UTC,pro,bob,gpt-4o-mini,1,4000000,0,1000000,0,5000000,1200000000,1.200000000",
        ],
        "{csv}"
    );
    // The other days' subjects and subscriptions are absent.
    for absent in ["frank", "erin", "trial"] {
        assert!(!csv.contains(absent), "{absent} is not of the 23rd: {csv}");
    }
    // The same export on stdout, the token from TALLY_TOKEN.
    let run = f
        .export_with_env(&["--day", DAY, "--quiet"], Some(BILLING))
        .await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(run.stdout, csv, "the same CSV on stdout");
    assert!(run.stderr.is_empty(), "--quiet: {}", run.stderr);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_subscription_totals_in_utc_and_in_another_time_zone() {
    let Some(f) = setup().await else { return };
    let run = f
        .export(&[
            "--token",
            BILLING,
            "--day",
            DAY,
            "--group-by",
            "subscription",
        ])
        .await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(
        run.lines(),
        [
            SUBSCRIPTION_HEADER,
            "2026-11-23,UTC,enterprise,1,500,0,500,400,1000,0,0.000000000",
            // 27,000 + 125,000 nusd.
            "2026-11-23,UTC,free,2,110,0,30,0,140,152000,0.000152000",
            // 5,250,000 + 1,200,000,000 + 8,750,000 nusd.
            "2026-11-23,UTC,pro,3,4003000,1200,1000800,150,5003800,1214000000,1.214000000",
        ],
        "{run:#?}"
    );
    // New York's 23rd (EST, UTC-5) is 05:00Z on the 23rd to 05:00Z on the 24th: without
    // day-1 (19:00 on the 22nd there), with the 24th's first reports.
    let run = f
        .export(&[
            "--token",
            BILLING,
            "--day",
            DAY,
            "--group-by",
            "subscription",
            "--time-zone",
            "America/New_York",
        ])
        .await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(
        run.lines(),
        [
            SUBSCRIPTION_HEADER,
            // day-5 + after-2: 0 + 150,000 nusd.
            "2026-11-23,America/New_York,enterprise,2,1500,0,500,400,2000,150000,0.000150000",
            "2026-11-23,America/New_York,free,2,110,0,30,0,140,152000,0.000152000",
            // day-2 + day-4 + after-1: 1,200,000,000 + 8,750,000 + 47,500 nusd.
            "2026-11-23,America/New_York,pro,3,4002007,1000,1000503,100,5002510,1208797500,1.208797500",
        ],
        "{run:#?}"
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_missing_or_underprivileged_token_is_refused_by_name() {
    let Some(f) = setup().await else { return };
    let out = f.out_file("never.csv");
    let out = out.to_str().unwrap();
    let run = f
        .export(&["--token", WRONG, "--day", DAY, "--out", out])
        .await;
    run.assert_failed(4);
    assert!(
        run.stderr.contains("UNAUTHENTICATED") && run.stderr.contains("invalid bearer token"),
        "names the auth problem: {}",
        run.stderr
    );
    assert!(!run.stderr.contains(WRONG), "the token is not echoed");
    let run = f.export(&["--day", DAY, "--out", out]).await;
    run.assert_failed(4);
    assert!(
        run.stderr.contains("UNAUTHENTICATED") && run.stderr.contains("role billing"),
        "says a billing token is needed: {}",
        run.stderr
    );
    let run = f
        .export(&["--token", READER, "--day", DAY, "--out", out])
        .await;
    run.assert_failed(4);
    assert!(
        run.stderr.contains("PERMISSION_DENIED")
            && run
                .stderr
                .contains("needs role billing; token `dashboard` has role read-only"),
        "names the role needed: {}",
        run.stderr
    );
    assert!(
        !Path::new(out).exists(),
        "no file is left by a failed export"
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_day_is_refused_before_any_call() {
    let Some(py) = tokio::task::spawn_blocking(pyenv).await.unwrap() else {
        return;
    };
    // Nothing listens here: the day is checked before any connection is tried.
    let addr = closed_port().await;
    for day in [
        "2026-11-31",
        "23/11/2026",
        "2026-11-23T00:00",
        "20261123",
        "yesterday",
    ] {
        let run = export(&py, &["--addr", &addr, "--day", day]).await;
        run.assert_failed(2);
        assert!(
            run.stderr.contains(&format!("--day: '{day}'")),
            "names the flag and the value: {}",
            run.stderr
        );
        assert!(
            run.stderr.contains("YYYY-MM-DD") || run.stderr.contains("not a valid date"),
            "says what a day looks like: {}",
            run.stderr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_older_than_tally_keeps_is_out_of_range() {
    let Some(mut f) = setup().await else { return };
    // Three days on (aggregates are kept two): the 23rd's periods go at this batch.
    f.clock.set_ms(DAY_MS + 3 * 24 * HOUR_MS + 12 * HOUR_MS);
    f.usage
        .report_usage(report_request(&Use {
            at_ms: 0,
            id: "later-1",
            subscription: "pro",
            subject: "alice",
            model: "gpt-4o",
            tokens: [1, 0, 1, 0],
        }))
        .await
        .expect("reported");
    let run = f.export(&["--token", BILLING, "--day", DAY]).await;
    run.assert_failed(5);
    assert!(
        run.stderr
            .contains("2026-11-23 (UTC) is older than tallyd keeps")
            && run.stderr.contains("past retention"),
        "says the day is gone: {}",
        run.stderr
    );
    // The day that is still held is exported.
    let run = f.export(&["--token", BILLING, "--day", "2026-11-26"]).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(
        run.lines(),
        [
            HEADER,
            "2026-11-26,UTC,pro,alice,gpt-4o,1,1,0,1,0,2,12500,0.000012500",
        ],
        "{run:#?}"
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_fails_with_a_message() {
    let Some(py) = tokio::task::spawn_blocking(pyenv).await.unwrap() else {
        return;
    };
    let addr = closed_port().await;
    let started = Instant::now();
    let run = export(
        &py,
        &[
            "--addr",
            &addr,
            "--day",
            DAY,
            "--timeout",
            "5",
            "--token",
            BILLING,
        ],
    )
    .await;
    run.assert_failed(3);
    assert!(
        run.stderr
            .contains(&format!("tallyd at {addr} is unavailable")),
        "names the address: {}",
        run.stderr
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "gives up within its timeout"
    );
}

/// A 127.0.0.1 address nothing listens on (bound on port 0, then closed).
async fn closed_port() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    addr
}
