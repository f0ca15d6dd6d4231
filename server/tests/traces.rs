//! Traces over OTLP: `tallyd --otlp-endpoint` exports a span per gRPC call to an OTLP/gRPC
//! collector (here a fake one, in-process on port 0), as a child of the caller's W3C
//! `traceparent`, with the method and request id as attributes, and a span per batch
//! (`raft.batch`, proposal to commit; `raft.apply`). Without the flag no exporter is made
//! (the default).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::tallyd_proc::TallydProc;
use common::{desc, req};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use tally_proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tally_proto::tally::v1::GetStatusRequest;
use tally_proto::tally::v1::admin_client::AdminClient;
use tonic::transport::Channel;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";
const WAIT: Duration = Duration::from_secs(30);

/// Every span the collector was sent.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.0.lock().unwrap().extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            other => format!("{other:?}"),
        })
}

async fn start_collector() -> (Collector, std::net::SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let collector = Collector::default();
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    (collector, addr)
}

async fn status_call(grpc: std::net::SocketAddr, traceparent: Option<&str>) {
    let channel = Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut r = tonic::Request::new(GetStatusRequest {});
    r.metadata_mut()
        .insert("x-request-id", "trace-test-1".parse().unwrap());
    if let Some(tp) = traceparent {
        r.metadata_mut().insert("traceparent", tp.parse().unwrap());
    }
    AdminClient::new(channel).get_status(r).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_is_exported_as_a_child_of_the_callers_trace() {
    let (collector, addr) = start_collector().await;
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://{addr}");
    let node = TallydProc::spawn(
        1,
        &dir.path().join("node-1"),
        &["--otlp-endpoint", &endpoint, "--limits-poll-ms", "0"],
        // The batch exporter's delay (5 s by default), from OpenTelemetry's own setting.
        &[("OTEL_BSP_SCHEDULE_DELAY", "200")],
    )
    .await;
    node.wait_ready().await;
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    status_call(node.grpc, Some(&traceparent)).await;
    let started = Instant::now();
    let span = loop {
        let spans = collector.0.lock().unwrap().clone();
        if let Some(s) = spans.into_iter().find(|s| {
            s.name == "grpc"
                && attribute(s, "method").as_deref() == Some("/tally.v1.Admin/GetStatus")
        }) {
            break s;
        }
        assert!(started.elapsed() < WAIT, "no span exported within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(hex(&span.trace_id), TRACE_ID, "the caller's trace");
    assert_eq!(
        hex(&span.parent_span_id),
        PARENT_ID,
        "the caller's span is the parent"
    );
    assert_eq!(
        attribute(&span, "request_id").as_deref(),
        Some("trace-test-1")
    );
    assert!(span.end_time_unix_nano >= span.start_time_unix_nano);

    // A decision is a batch: proposed, committed and applied, each a span.
    let channel = Channel::from_shared(format!("http://{}", node.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut rls = RateLimitServiceClient::new(channel);
    rls.should_rate_limit(req("ai-gateway", vec![desc(&[("user", "ann")])], 1))
        .await
        .unwrap();
    let started = Instant::now();
    loop {
        let spans = collector.0.lock().unwrap().clone();
        let named = |n: &str| spans.iter().any(|s| s.name == n);
        if named("raft.batch") && named("raft.apply") {
            let batch = spans.iter().find(|s| s.name == "raft.batch").unwrap();
            assert!(attribute(batch, "commands").is_some(), "{batch:?}");
            break;
        }
        assert!(started.elapsed() < WAIT, "no batch spans within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_endpoint_stops_the_start_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(["--otlp-endpoint", "collector:4317"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("--otlp-endpoint"), "{text}");
}
