//! Every gRPC call runs in a `tracing` span naming its method and a request id (the caller's
//! `x-request-id`, or one drawn by Tally, echoed back), so its log lines can be found.

mod common;

use common::*;
use tally_proto::tally::v1::GetStatusRequest;
use tally_proto::tally::v1::admin_client::AdminClient;
use tally_server::api::auth::{AuthConfig, Role};

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

impl Captured {
    fn json_lines(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calls_log_lines_carry_its_method_and_request_id() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .json()
        .with_writer(move || writer.clone())
        .with_env_filter("tally_server=debug")
        .init();
    let auth = AuthConfig::default()
        .with_token("ops", Role::Admin, "a-token-for-the-request-id-test")
        .unwrap();
    let t = start_with(LIMITS, |c| c.auth = auth).await;
    let mut admin = AdminClient::new(connect(t.server.grpc_addr).await);
    // Refused (a wrong token): the auth layer logs the refusal inside the call's span.
    let mut r = tonic::Request::new(GetStatusRequest {});
    r.metadata_mut().insert(
        "authorization",
        "Bearer wrong-token-0000000000".parse().unwrap(),
    );
    r.metadata_mut()
        .insert("x-request-id", "req-7f3a".parse().unwrap());
    let e = admin.get_status(r).await.unwrap_err();
    assert_eq!(e.metadata().get("x-request-id").unwrap(), "req-7f3a");
    let lines = captured.json_lines();
    let refused = lines
        .iter()
        .find(|l| l["fields"]["message"] == "call refused")
        .unwrap_or_else(|| panic!("no refusal line in {lines:?}"));
    assert_eq!(refused["span"]["name"], "grpc", "{refused}");
    assert_eq!(refused["span"]["request_id"], "req-7f3a", "{refused}");
    assert_eq!(
        refused["span"]["method"], "/tally.v1.Admin/GetStatus",
        "{refused}"
    );
    // Without an id (or with one unfit for logs), Tally draws one and sends it back.
    let mut r = tonic::Request::new(GetStatusRequest {});
    r.metadata_mut()
        .insert("x-request-id", "has a space".parse().unwrap());
    let e = admin.get_status(r).await.unwrap_err();
    let drawn = e.metadata().get("x-request-id").unwrap().to_str().unwrap();
    assert!(drawn.starts_with("t-") && drawn.len() == 18, "{drawn}");
    let ok = admin
        .get_status(tonic::Request::new(GetStatusRequest {}))
        .await;
    // Loopback and tokens configured: no token is refused too; both drew ids of their own.
    let other = ok.unwrap_err();
    let second = other.metadata().get("x-request-id").unwrap();
    assert_ne!(second.to_str().unwrap(), drawn);
    t.stop().await;
}
