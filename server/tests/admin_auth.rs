//! The admin API's bearer tokens (`api::auth`): which calls need which role, the loopback
//! default when no token is configured, the open data path, and that a token never shows in
//! an answer or a log line.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use tally_proto::tally::v1::admin_client::AdminClient;
use tally_proto::tally::v1::cluster_client::ClusterClient;
use tally_proto::tally::v1::usage_client::UsageClient;
use tally_proto::tally::v1::{
    AddLearnerRequest, ClusterStatusRequest, CommitRequest, ExportUsageRequest, GetStatusRequest,
    GetUsageOverviewRequest, Granularity, InitRequest, ListLimitsRequest, ListPricesRequest,
    ModelPrice, PromoteRequest, QueryUsageRequest, ReleaseRequest, RemoveRequest,
    ReportUsageRequest, ReserveRequest, SetPricesRequest, TokenCounts, WatchEventsRequest,
};
use tally_server::api::auth::{AuthConfig, sha256_hex};
use tally_server::server::{self, LimitsSource, Listeners, ServerConfig};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

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

const ADMIN: &str = "tally_admin_4f1c0d9e8b7a6f5e4d3c2b1a";
const BILLING: &str = "tally_billing_0a1b2c3d4e5f60718293a4b5";
const READER: &str = "tally_reader_99887766554433221100ffee";
const WRONG: &str = "tally_wrong_0000000000000000000000000000";
const ENV_ADMIN: &str = "tally_env_admin_1234567890abcdef1234";

/// Every secret this file uses: none may show in an answer or a log line.
const SECRETS: [&str; 5] = [ADMIN, BILLING, READER, WRONG, ENV_ADMIN];

/// A tokens file as an operator writes it: names, roles and SHA-256 digests only.
fn tokens_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("tokens.yaml");
    let text = format!(
        "# made with `tally auth new-token`\n\
         - name: ops\n  role: admin\n  token_sha256: {}\n\
         - name: finance\n  role: billing\n  token_sha256: {}\n\
         - name: dashboard\n  role: read-only\n  token_sha256: {}\n",
        sha256_hex(ADMIN),
        sha256_hex(BILLING),
        sha256_hex(READER),
    );
    std::fs::write(&path, &text).unwrap();
    for secret in SECRETS {
        assert!(!text.contains(secret), "the file holds no secret");
    }
    path
}

fn with_tokens(dir: &std::path::Path) -> AuthConfig {
    AuthConfig::from_file(&tokens_file(dir)).unwrap()
}

/// A request carrying `authorization: Bearer <token>` when a token is given.
fn call<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(message);
    if let Some(token) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    r
}

fn query() -> QueryUsageRequest {
    QueryUsageRequest {
        start_ms: T0_MS - 3_600_000,
        end_ms: T0_MS + 3_600_000,
        group_by: vec![],
        granularity: Granularity::Total as i32,
        time_zone: String::new(),
        filter: None,
    }
}

fn prices() -> SetPricesRequest {
    SetPricesRequest {
        models: vec![ModelPrice {
            model: "gpt-4o".into(),
            input_nusd: 2_500,
            cached_input_nusd: 1_250,
            output_nusd: 10_000,
        }],
    }
}

fn report(id: &str) -> ReportUsageRequest {
    ReportUsageRequest {
        request_id: id.into(),
        subject: "alice".into(),
        model: "gpt-4o".into(),
        input_tokens: 10,
        ..Default::default()
    }
}

/// Every guarded call of the gRPC and Raft listeners, by name, with the token given: the code
/// each answered (OK, or the status code).
struct Clients {
    admin: AdminClient<Channel>,
    usage: UsageClient<Channel>,
    cluster: ClusterClient<Channel>,
}

impl Clients {
    async fn new(grpc: SocketAddr, raft: SocketAddr) -> Clients {
        let channel = connect(grpc).await;
        Clients {
            admin: AdminClient::new(channel.clone()),
            usage: UsageClient::new(channel),
            cluster: ClusterClient::new(connect(raft).await),
        }
    }

    /// Calls `method` with `token`; Ok, or the refusal.
    async fn try_call(&mut self, method: &str, token: Option<&str>) -> Result<(), Status> {
        let t = token;
        match method {
            "Admin/GetStatus" => self
                .admin
                .get_status(call(GetStatusRequest {}, t))
                .await
                .map(drop),
            "Admin/ListLimits" => self
                .admin
                .list_limits(call(ListLimitsRequest::default(), t))
                .await
                .map(drop),
            "Usage/SetPrices" => self.usage.set_prices(call(prices(), t)).await.map(drop),
            "Usage/ListPrices" => self
                .usage
                .list_prices(call(ListPricesRequest {}, t))
                .await
                .map(drop),
            "Usage/QueryUsage" => self.usage.query_usage(call(query(), t)).await.map(drop),
            "Usage/GetUsageOverview" => self
                .usage
                .get_usage_overview(call(
                    GetUsageOverviewRequest {
                        subject: "alice".into(),
                        subscription: String::new(),
                    },
                    t,
                ))
                .await
                .map(drop),
            "Usage/ExportUsage" => {
                let mut s = self
                    .usage
                    .export_usage(call(ExportUsageRequest::default(), t))
                    .await?
                    .into_inner();
                while s.message().await?.is_some() {}
                Ok(())
            }
            "Usage/WatchEvents" => self
                .usage
                .watch_events(call(WatchEventsRequest { after_seq: 0 }, t))
                .await
                .map(drop),
            "Cluster/Status" => self
                .cluster
                .status(call(ClusterStatusRequest {}, t))
                .await
                .map(drop),
            // Init of an initialized node: past the guard it answers FAILED_PRECONDITION.
            "Cluster/Init" => self
                .cluster
                .init(call(InitRequest { members: vec![] }, t))
                .await
                .map(drop),
            // Past the guard: INVALID_ARGUMENT (an empty address).
            "Cluster/AddLearner" => self
                .cluster
                .add_learner(call(
                    AddLearnerRequest {
                        id: 9,
                        addr: String::new(),
                    },
                    t,
                ))
                .await
                .map(drop),
            // Past the guard: an unknown node is refused by Raft.
            "Cluster/Promote" => self
                .cluster
                .promote(call(PromoteRequest { id: 77 }, t))
                .await
                .map(drop),
            "Cluster/Remove" => self
                .cluster
                .remove(call(RemoveRequest { id: 77 }, t))
                .await
                .map(drop),
            other => panic!("no call {other}"),
        }
    }

    /// Whether the call got past the guard (whatever the handler then answered).
    async fn admitted(&mut self, method: &str, token: Option<&str>) -> Result<(), Status> {
        match self.try_call(method, token).await {
            Err(s) if matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied) => Err(s),
            _ => Ok(()),
        }
    }
}

const ADMIN_ONLY: [&str; 5] = [
    "Usage/SetPrices",
    "Cluster/Init",
    "Cluster/AddLearner",
    "Cluster/Promote",
    "Cluster/Remove",
];
const BILLING_UP: [&str; 5] = [
    "Usage/ListPrices",
    "Usage/QueryUsage",
    "Usage/GetUsageOverview",
    "Usage/ExportUsage",
    "Usage/WatchEvents",
];
const READ_ONLY_UP: [&str; 3] = ["Admin/GetStatus", "Admin/ListLimits", "Cluster/Status"];

fn all_guarded() -> impl Iterator<Item = &'static str> {
    ADMIN_ONLY.into_iter().chain(BILLING_UP).chain(READ_ONLY_UP)
}

fn assert_no_secret(text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "a token leaked: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_loopback_may_call_everything() {
    let t = start(LIMITS).await;
    let mut c = Clients::new(t.server.grpc_addr, t.server.raft_addr).await;
    for method in all_guarded() {
        c.admitted(method, None)
            .await
            .unwrap_or_else(|s| panic!("{method}: {s:?}"));
        // A bearer is ignored while no token is configured: loopback decides.
        c.admitted(method, Some(WRONG))
            .await
            .unwrap_or_else(|s| panic!("{method} with a token: {s:?}"));
    }
    c.usage
        .report_usage(call(report("r1"), None))
        .await
        .unwrap();
    t.stop().await;
}

/// This host's address on its default route, if it has one (no packet is sent).
fn non_loopback_ip() -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_other_hosts_are_told_how_to_configure_tokens() {
    let Some(ip) = non_loopback_ip() else {
        eprintln!("skipped: this host has no non-loopback address");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let listeners = Listeners {
        grpc: tokio::net::TcpListener::bind((ip, 0)).await.unwrap(),
        http: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        raft: tokio::net::TcpListener::bind((ip, 0)).await.unwrap(),
    };
    let config = ServerConfig {
        limits: LimitsSource::Inline {
            origin: "test limits".into(),
            text: LIMITS.into(),
        },
        data_dir: dir.path().join("node-1"),
        timings: fast_timings(),
        ..ServerConfig::default()
    };
    let server = server::spawn_on(listeners, config).await.unwrap();
    server.wait_ready(Duration::from_secs(10)).await.unwrap();
    // Connections to the host's own address come from that address: not loopback.
    let mut c = Clients::new(server.grpc_addr, server.raft_addr).await;
    for method in all_guarded() {
        let s = c.admitted(method, None).await.unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated, "{method}: {s:?}");
        assert!(
            s.message().contains("only to loopback peers") && s.message().contains("--auth-tokens"),
            "{method}: {}",
            s.message()
        );
    }
    // The data path stays open.
    c.usage
        .report_usage(call(report("r1"), None))
        .await
        .unwrap();
    let mut rls = tally_proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient::new(
        connect(server.grpc_addr).await,
    );
    let r = rls
        .should_rate_limit(req(
            "test",
            vec![desc(&[("kind", "req"), ("user", "u")])],
            1,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code_::Ok);
    server.stop().await.unwrap();
}

use common::Code as Code_;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_each_role_calls_what_it_may() {
    let dir = tempfile::tempdir().unwrap();
    let auth = with_tokens(dir.path());
    let t = start_with(LIMITS, |c| c.auth = auth).await;
    let mut c = Clients::new(t.server.grpc_addr, t.server.raft_addr).await;

    for method in all_guarded() {
        // Loopback is no exemption once tokens are configured.
        let s = c.admitted(method, None).await.unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated, "{method}: {s:?}");
        assert!(
            s.message().contains("needs a bearer token"),
            "{method}: {s:?}"
        );
        let s = c.admitted(method, Some(WRONG)).await.unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated, "{method}: {s:?}");
        assert_eq!(s.message(), "invalid bearer token");
        // Admin may call everything.
        c.admitted(method, Some(ADMIN))
            .await
            .unwrap_or_else(|s| panic!("admin {method}: {s:?}"));
    }
    for method in BILLING_UP.into_iter().chain(READ_ONLY_UP) {
        c.admitted(method, Some(BILLING))
            .await
            .unwrap_or_else(|s| panic!("billing {method}: {s:?}"));
    }
    for method in ADMIN_ONLY {
        let s = c.admitted(method, Some(BILLING)).await.unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied, "{method}: {s:?}");
        assert!(
            s.message()
                .ends_with("needs role admin; token `finance` has role billing"),
            "{method}: {}",
            s.message()
        );
    }
    for method in READ_ONLY_UP {
        c.admitted(method, Some(READER))
            .await
            .unwrap_or_else(|s| panic!("read-only {method}: {s:?}"));
    }
    for method in BILLING_UP {
        let s = c.admitted(method, Some(READER)).await.unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied, "{method}: {s:?}");
        assert!(
            s.message().contains("needs role billing"),
            "{}",
            s.message()
        );
    }
    let s = c
        .admitted("Usage/SetPrices", Some(READER))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert_eq!(
        s.message(),
        "tally.v1.Usage/SetPrices needs role admin; token `dashboard` has role read-only"
    );

    // What the handlers answer past the guard is their own: admin really set prices, and
    // billing reads them.
    let version = c
        .usage
        .set_prices(call(prices(), Some(ADMIN)))
        .await
        .unwrap()
        .into_inner()
        .version;
    let listed = c
        .usage
        .list_prices(call(ListPricesRequest {}, Some(BILLING)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((listed.version, listed.models.len()), (version, 1));
    // A malformed authorization is refused without echoing it.
    let mut r = Request::new(GetStatusRequest {});
    r.metadata_mut()
        .insert("authorization", format!("Token {ADMIN}").parse().unwrap());
    let s = c.admin.get_status(r).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    assert_no_secret(s.message());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_path_needs_no_token_but_a_sent_one_must_be_valid() {
    let dir = tempfile::tempdir().unwrap();
    let auth = with_tokens(dir.path());
    let mut t = start_with(LIMITS, |c| c.auth = auth).await;
    let mut usage = UsageClient::new(connect(t.server.grpc_addr).await);
    let receipt = usage
        .report_usage(call(report("r1"), None))
        .await
        .unwrap()
        .into_inner();
    assert!(!receipt.duplicate);
    let reserve = ReserveRequest {
        request_id: "r2".into(),
        subject: "alice".into(),
        estimate: Some(TokenCounts {
            input_tokens: 5,
            ..Default::default()
        }),
        ttl_ms: 60_000,
        ..Default::default()
    };
    usage.reserve(call(reserve.clone(), None)).await.unwrap();
    usage
        .commit(call(
            CommitRequest {
                request_id: "r2".into(),
                input_tokens: 4,
                ..Default::default()
            },
            None,
        ))
        .await
        .unwrap();
    usage
        .reserve(call(
            ReserveRequest {
                request_id: "r3".into(),
                ..reserve
            },
            None,
        ))
        .await
        .unwrap();
    usage
        .release(call(
            ReleaseRequest {
                request_id: "r3".into(),
            },
            None,
        ))
        .await
        .unwrap();
    // Any valid token may be sent with them; a wrong one is refused.
    usage
        .report_usage(call(report("r4"), Some(READER)))
        .await
        .unwrap();
    let s = usage
        .report_usage(call(report("r5"), Some(WRONG)))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    assert_eq!(s.message(), "invalid bearer token");
    // Envoy's RLS is not guarded at all.
    let r = t
        .should(req(
            "test",
            vec![desc(&[("kind", "req"), ("user", "u")])],
            1,
        ))
        .await;
    assert_eq!(code(&r), Code_::Ok);
    // What the admitted reports recorded: r1, r2 (committed) and r4, not r5.
    let mut records = usage
        .export_usage(call(ExportUsageRequest::default(), Some(BILLING)))
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    while let Some(r) = records.message().await.unwrap() {
        ids.push(r.request_id);
    }
    assert_eq!(ids, ["r1", "r2", "r4"]);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_admin_token_works_beside_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let auth = with_tokens(dir.path()).with_admin_token(ENV_ADMIN).unwrap();
    let t = start_with(LIMITS, |c| c.auth = auth).await;
    let mut c = Clients::new(t.server.grpc_addr, t.server.raft_addr).await;
    for method in all_guarded() {
        c.admitted(method, Some(ENV_ADMIN))
            .await
            .unwrap_or_else(|s| panic!("{method}: {s:?}"));
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_tokens_file_is_put_in_force_and_a_bad_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = tokens_file(dir.path());
    let base = AuthConfig::default().with_admin_token(ENV_ADMIN).unwrap();
    let auth = base
        .clone()
        .with_file_text(&std::fs::read_to_string(&file).unwrap(), "tokens")
        .unwrap();
    let reload = tally_server::server::AuthReload {
        file: file.clone(),
        base,
    };
    let t = start_with(LIMITS, |c| {
        c.auth = auth;
        c.auth_reload = Some(reload);
        c.limits_poll = Duration::from_millis(50);
    })
    .await;
    let mut c = Clients::new(t.server.grpc_addr, t.server.raft_addr).await;
    c.admitted("Admin/GetStatus", Some(READER)).await.unwrap();
    // `dashboard` goes; `ops` becomes read-only; a new token comes.
    let text = format!(
        "- name: ops\n  role: read-only\n  token_sha256: {}\n\
         - name: newcomer\n  role: admin\n  token_sha256: {}\n",
        sha256_hex(ADMIN),
        sha256_hex(WRONG),
    );
    std::fs::write(&file, text).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.try_call("Admin/GetStatus", Some(READER)).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "not reloaded in 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = c
        .try_call("Admin/GetStatus", Some(READER))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    c.admitted("Admin/GetStatus", Some(ADMIN)).await.unwrap();
    let e = c
        .try_call("Usage/SetPrices", Some(ADMIN))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    c.admitted("Usage/SetPrices", Some(WRONG)).await.unwrap();
    c.admitted("Usage/SetPrices", Some(ENV_ADMIN))
        .await
        .unwrap();
    // A file that does not parse leaves the tokens in force.
    std::fs::write(&file, "- name: [broken\n").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.admitted("Usage/SetPrices", Some(WRONG)).await.unwrap();
    c.admitted("Usage/SetPrices", Some(ENV_ADMIN))
        .await
        .unwrap();
    t.stop().await;
}

/// The only test of this file that installs a subscriber; it captures every test's logs at
/// trace level (Tally's own) and debug (the libraries').
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_reach_answers_or_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_env_filter("debug,tally_server=trace,openraft=info")
        .init();
    let dir = tempfile::tempdir().unwrap();
    let auth = with_tokens(dir.path()).with_admin_token(ENV_ADMIN).unwrap();
    let t = start_with(LIMITS, |c| c.auth = auth).await;
    let mut c = Clients::new(t.server.grpc_addr, t.server.raft_addr).await;
    for method in all_guarded() {
        for token in [None, Some(WRONG), Some(READER), Some(BILLING), Some(ADMIN)] {
            if let Err(s) = c.try_call(method, token).await {
                assert_no_secret(&format!("{s:?}"));
            }
        }
    }
    let mut usage = UsageClient::new(connect(t.server.grpc_addr).await);
    let s = usage
        .report_usage(call(report("r1"), Some(WRONG)))
        .await
        .unwrap_err();
    assert_no_secret(&format!("{s:?}"));
    t.stop().await;
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("bearer tokens required"),
        "the startup line is logged"
    );
    assert!(
        logs.contains("call refused"),
        "refusals are logged (without the token)"
    );
    assert_no_secret(&logs);
}
