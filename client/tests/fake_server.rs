//! The client and the `tally` binary against an in-process fake server that implements the
//! generated service traits. Checks the wiring (method paths, deadlines, error mapping, exit
//! codes), not Tally's semantics: those are tested against the real server by the server crate.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tally_client::proto::envoy::config::core::v3::HeaderValue;
use tally_client::proto::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use tally_client::proto::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use tally_client::proto::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use tally_client::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tally_client::proto::kuadrant::service::ratelimit::v1::rate_limit_service_server::{
    RateLimitService as KuadrantService, RateLimitServiceServer as KuadrantServer,
};
use tally_client::proto::tally::v1::admin_server::{Admin, AdminServer};
use tally_client::proto::tally::v1::{
    GetStatusRequest, GetStatusResponse, LimitInfo, ListLimitsRequest, ListLimitsResponse,
};
use tally_client::{ClientError, TallyClient, parse_descriptor};
use tonic::{Request, Response, Status};

/// What the fake saw last: the method, the request, and the `grpc-timeout` header.
#[derive(Default)]
struct Seen {
    method: String,
    request: Option<RateLimitRequest>,
    grpc_timeout: Option<String>,
}

#[derive(Clone, Default)]
struct Fake {
    seen: Arc<Mutex<Seen>>,
}

impl Fake {
    fn record(&self, method: &str, request: &Request<RateLimitRequest>) {
        let mut seen = self.seen.lock().unwrap();
        seen.method = method.to_string();
        seen.request = Some(request.get_ref().clone());
        seen.grpc_timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
    }

    /// Answers by domain: `over` → OVER_LIMIT with headers and body, `bad` → INVALID_ARGUMENT,
    /// `weird` → overall UNKNOWN, `slow` → no answer for 10 s, anything else → OK. Each status
    /// names its limit after the method.
    async fn answer(
        &self,
        method: &str,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        self.record(method, &request);
        let request = request.into_inner();
        let code = match request.domain.as_str() {
            "bad" => return Err(Status::invalid_argument("domain: `bad` is not served here")),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(10)).await;
                Code::Ok
            }
            "over" => Code::OverLimit,
            "weird" => Code::Unknown,
            _ => Code::Ok,
        };
        let statuses = request
            .descriptors
            .iter()
            .map(|_| DescriptorStatus {
                code: code as i32,
                current_limit: Some(RateLimit {
                    name: method.to_string(),
                    requests_per_unit: 5,
                    unit: Unit::Minute as i32,
                }),
                limit_remaining: if code == Code::OverLimit { 0 } else { 4 },
                duration_until_reset: Some(prost_types::Duration {
                    seconds: 30,
                    nanos: 0,
                }),
                quota: None,
            })
            .collect();
        let mut response = RateLimitResponse {
            overall_code: code as i32,
            statuses,
            ..Default::default()
        };
        if code == Code::OverLimit {
            response.response_headers_to_add.push(HeaderValue {
                key: "x-ratelimit-remaining".into(),
                value: "0".into(),
                raw_value: vec![],
            });
            response.raw_body = br#"{"error":{"code":"rate_limit_exceeded"}}"#.to_vec();
        }
        Ok(Response::new(response))
    }
}

#[tonic::async_trait]
impl RateLimitService for Fake {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        self.answer("should_rate_limit", request).await
    }
}

#[tonic::async_trait]
impl KuadrantService for Fake {
    async fn check_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        self.answer("kuadrant_check", request).await
    }

    async fn report(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        self.answer("kuadrant_report", request).await
    }
}

#[tonic::async_trait]
impl Admin for Fake {
    async fn get_status(
        &self,
        _request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        Ok(Response::new(GetStatusResponse {
            live_counters: 7,
            limits: 2,
            limits_generation: 3,
            last_batch_ms: 1_700_000_000_000,
            ..Default::default()
        }))
    }

    async fn list_limits(
        &self,
        request: Request<ListLimitsRequest>,
    ) -> Result<Response<ListLimitsResponse>, Status> {
        let all = [("ai", "free_rpm", 5), ("other", "burst", 100)];
        let domain = request.into_inner().domain;
        let limits = all
            .into_iter()
            .filter(|(d, _, _)| domain.is_empty() || *d == domain)
            .map(|(d, name, capacity)| LimitInfo {
                domain: d.into(),
                name: name.into(),
                capacity,
                window: "fixed 1m".into(),
                matcher: String::new(),
                variables: vec!["api_key".into()],
                shadow: false,
            })
            .collect();
        Ok(Response::new(ListLimitsResponse { limits }))
    }
}

async fn start() -> (SocketAddr, Fake) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = Fake::default();
    let router = tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::new(fake.clone()))
        .add_service(KuadrantServer::new(fake.clone()))
        .add_service(AdminServer::new(fake.clone()));
    tokio::spawn(async move {
        router
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (addr, fake)
}

#[tokio::test]
async fn typed_calls_reach_the_right_methods() {
    let (addr, fake) = start().await;
    let client = TallyClient::connect(&format!("http://{addr}"))
        .await
        .unwrap();
    let descriptors = vec![
        parse_descriptor("api_key=k1,model=m").unwrap(),
        parse_descriptor("api_key=k1;hits=0").unwrap(),
    ];

    let response = client
        .should_rate_limit("ai", descriptors.clone(), 3)
        .await
        .unwrap();
    assert_eq!(response.overall_code(), Code::Ok);
    assert_eq!(response.statuses.len(), 2);
    {
        let seen = fake.seen.lock().unwrap();
        assert_eq!(seen.method, "should_rate_limit");
        let request = seen.request.as_ref().unwrap();
        assert_eq!(request.domain, "ai");
        assert_eq!(request.hits_addend, 3);
        assert_eq!(request.descriptors, descriptors);
        // The per-call deadline travels as grpc-timeout (2 s by default).
        let timeout = seen.grpc_timeout.as_deref().unwrap();
        assert!(
            timeout.ends_with('m') || timeout.ends_with('u'),
            "{timeout}"
        );
    }

    let response = client
        .kuadrant_check("over", descriptors.clone(), 0)
        .await
        .unwrap();
    assert_eq!(response.overall_code(), Code::OverLimit);
    assert_eq!(fake.seen.lock().unwrap().method, "kuadrant_check");

    client
        .kuadrant_report("ai", descriptors, 250)
        .await
        .unwrap();
    {
        let seen = fake.seen.lock().unwrap();
        assert_eq!(seen.method, "kuadrant_report");
        assert_eq!(seen.request.as_ref().unwrap().hits_addend, 250);
    }

    let status = client.status().await.unwrap();
    assert_eq!(status.live_counters, 7);
    assert_eq!(client.list_limits(None).await.unwrap().limits.len(), 2);
    let only = client.list_limits(Some("other")).await.unwrap();
    assert_eq!(only.limits.len(), 1);
    assert_eq!(only.limits[0].name, "burst");
}

#[tokio::test]
async fn address_without_scheme_works() {
    let (addr, _fake) = start().await;
    let client = TallyClient::connect(&addr.to_string()).await.unwrap();
    client.status().await.unwrap();
}

#[tokio::test]
async fn errors_carry_code_and_message_and_deadlines_hold() {
    let (addr, _fake) = start().await;
    let client = TallyClient::connect(&format!("http://{addr}"))
        .await
        .unwrap()
        .with_timeout(Duration::from_millis(300));
    let descriptors = vec![parse_descriptor("k=v").unwrap()];

    match client
        .should_rate_limit("bad", descriptors.clone(), 1)
        .await
    {
        Err(ClientError::Status { code, message }) => {
            assert_eq!(code, tonic::Code::InvalidArgument);
            assert_eq!(message, "domain: `bad` is not served here");
        }
        other => panic!("expected an InvalidArgument status, got {other:?}"),
    }

    let started = std::time::Instant::now();
    let result = client.should_rate_limit("slow", descriptors, 1).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    // The server side may enforce grpc-timeout first (DEADLINE_EXCEEDED / CANCELLED), or the
    // client's own timer fires: either way the call ends near the deadline with an error.
    assert!(
        matches!(
            result,
            Err(ClientError::Timeout(_))
                | Err(ClientError::Status {
                    code: tonic::Code::DeadlineExceeded | tonic::Code::Cancelled,
                    ..
                })
        ),
        "{result:?}"
    );
}

/// Runs the `tally` binary (blocking, so on a blocking thread while the server runs).
async fn tally(args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let output = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(&args)
            .env_remove("TALLY_ADDR")
            .env_remove("TALLY_TIMEOUT")
            .output()
            .unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8(output.stdout).unwrap(),
            String::from_utf8(output.stderr).unwrap(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_exit_codes_and_output() {
    let (addr, fake) = start().await;
    let addr = addr.to_string();

    let (code, out, err) = tally(&[
        "--addr",
        &addr,
        "check",
        "--domain",
        "ai",
        "--descriptor",
        "api_key=k1",
        "--descriptor",
        r"path=/a\,b;hits=0",
        "--hits",
        "2",
    ])
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("overall: OK\n"), "{out}");
    assert!(
        out.contains(
            r#"descriptor 2: OK  limit "should_rate_limit" 5/minute  remaining 4  reset in 30s"#
        ),
        "{out}"
    );
    {
        let seen = fake.seen.lock().unwrap();
        let request = seen.request.as_ref().unwrap();
        assert_eq!(request.hits_addend, 2);
        assert_eq!(request.descriptors[1].entries[0].value, "/a,b");
        assert_eq!(request.descriptors[1].hits_addend, Some(0));
    }

    let (code, out, _) = tally(&[
        "check",
        "--addr",
        &addr,
        "--domain",
        "over",
        "--descriptor",
        "k=v",
        "--json",
    ])
    .await;
    assert_eq!(code, 1, "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["overall_code"], "OVER_LIMIT");
    assert_eq!(json["statuses"][0]["limit_remaining"], 0);
    assert_eq!(json["headers"][0]["key"], "x-ratelimit-remaining");
    assert_eq!(
        json["raw_body"],
        r#"{"error":{"code":"rate_limit_exceeded"}}"#
    );

    let (code, out, _) = tally(&[
        "kuadrant",
        "report",
        "--addr",
        &addr,
        "--domain",
        "ai",
        "--descriptor",
        "k=v",
        "--hits",
        "120",
    ])
    .await;
    assert_eq!(code, 0);
    assert!(out.contains(r#"limit "kuadrant_report""#), "{out}");

    let (code, out, err) = tally(&[
        "--addr",
        &addr,
        "check",
        "--domain",
        "bad",
        "--descriptor",
        "k=v",
    ])
    .await;
    assert_eq!(code, 2);
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("InvalidArgument") && err.contains("not served here"),
        "{err}"
    );

    let (code, _, err) = tally(&[
        "--addr",
        &addr,
        "check",
        "--domain",
        "weird",
        "--descriptor",
        "k=v",
    ])
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("UNKNOWN"), "{err}");

    let (code, _, err) = tally(&[
        "--addr",
        &addr,
        "check",
        "--domain",
        "d",
        "--descriptor",
        "=v",
    ])
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("empty key"), "{err}");

    let (code, out, _) = tally(&["--addr", &addr, "status"]).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("live_counters: 7\n"), "{out}");
    assert!(out.contains("\nlimits_generation: 3\n"), "{out}");

    let (code, out, _) = tally(&["--addr", &addr, "status", "--json"]).await;
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["last_batch_ms"], 1_700_000_000_000i64);

    let (code, out, _) = tally(&["--addr", &addr, "limits", "--domain", "ai"]).await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("DOMAIN"), "{out}");
    assert!(
        lines[1].starts_with("ai") && lines[1].contains("free_rpm"),
        "{out}"
    );

    let (code, out, _) = tally(&["--addr", &addr, "limits", "--json"]).await;
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_reports_unreachable_server() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let (code, out, err) = tally(&["--addr", &addr, "status"]).await;
    assert_eq!(code, 2);
    assert!(out.is_empty());
    assert!(
        err.starts_with(&format!("tally: cannot connect to {addr}: ")),
        "{err}"
    );
}
