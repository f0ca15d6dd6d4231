//! Envoy's ext_authz `Check` and `tally.v1.Models/ListModels` over gRPC: every 401 and 403
//! case with its OpenAI-style body, the happy path's headers, public paths, expiry at the
//! batch time, rotation grace, a disable seen by every node of a cluster, the models per tier,
//! a subscription's requests-per-minute enforced through ShouldRateLimit with the headers
//! Check returned — and no response ever carrying a secret.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use prost::Message;
use tally_proto::envoy::config::core::v3::{HeaderMap, HeaderValue};
use tally_proto::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Request as AttrRequest,
};
use tally_proto::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tally_proto::envoy::service::auth::v3::check_response::HttpResponse;
use tally_proto::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use tally_proto::tally::v1::ListModelsRequest;
use tally_proto::tally::v1::models_client::ModelsClient;
use tally_server::api::key_secret;
use tally_server::engine::access::{KeyOverrides, NewKey, Subscription};
use tally_server::engine::usage::{ModelPrice, PriceCatalog};
use tally_server::engine::{Command, Outcome};
use tally_server::node::Node;
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

const TEST_LIMIT: Duration = Duration::from_secs(120);

async fn within<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("test within its time");
}

async fn propose(node: &Node, c: Command) -> Outcome {
    let o = node.propose(c).await.expect("proposed");
    assert!(!matches!(o, Outcome::Rejected(_)), "{o:?}");
    o
}

fn tier(name: &str, models: &[&str], rpm: Option<u64>, max_class: Option<u8>) -> Subscription {
    Subscription {
        name: name.into(),
        allowed_models: models.iter().map(|m| (*m).to_owned()).collect(),
        requests_per_minute: rpm,
        max_classification: max_class,
        ..Subscription::default()
    }
}

/// A key `id` (16 characters of a-z0-9) on `subscription` (none: legacy); its secret.
async fn new_key(
    node: &Node,
    id: &str,
    subscription: Option<&str>,
    expires_ms: Option<i64>,
) -> String {
    let secret = key_secret::generate(id);
    propose(
        node,
        Command::CreateKey(NewKey {
            id: id.into(),
            name: format!("key {id}"),
            description: String::new(),
            subscription: subscription.map(str::to_owned),
            labels: vec![("team".into(), "red".into()), ("env".into(), "prod".into())],
            expires_ms,
            ephemeral: false,
            secret_sha256: key_secret::hash(&secret),
            created_by: "test".into(),
            overrides: None,
        }),
    )
    .await;
    secret
}

fn request(path: &str, headers: &[(&str, &str)], body: &str) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                time: None,
                http: Some(HttpRequest {
                    id: "req-1".into(),
                    method: "POST".into(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                    path: path.into(),
                    host: "gateway.example".into(),
                    body: body.into(),
                    ..HttpRequest::default()
                }),
            }),
            ..AttributeContext::default()
        }),
    }
}

fn bearer(secret: &str) -> String {
    format!("Bearer {secret}")
}

/// A Check answer, decoded.
#[derive(Debug)]
enum Answer {
    Allowed {
        headers: BTreeMap<String, String>,
        removed: Vec<String>,
        metadata_key_id: Option<String>,
    },
    Denied {
        http: i32,
        rpc: i32,
        content_type: String,
        error: serde_json::Value,
    },
}

impl Answer {
    #[track_caller]
    fn headers(&self) -> &BTreeMap<String, String> {
        match self {
            Answer::Allowed { headers, .. } => headers,
            other => panic!("not allowed: {other:?}"),
        }
    }

    /// (HTTP status, error.type, error.code) of a denial, after checking its shape.
    #[track_caller]
    fn denial(&self) -> (i32, String, String) {
        let Answer::Denied {
            http,
            rpc,
            content_type,
            error,
        } = self
        else {
            panic!("not denied: {self:?}")
        };
        assert_eq!(content_type, "application/json");
        assert_eq!(*rpc, if *http == 401 { 16 } else { 7 }, "{self:?}");
        let message = error["message"].as_str().expect("a message");
        assert!(!message.is_empty());
        let s = |k: &str| error[k].as_str().expect(k).to_owned();
        (*http, s("type"), s("code"))
    }
}

/// Check clients (one per node) that keep every response's bytes, to search for secrets.
struct Checker {
    clients: Vec<AuthorizationClient<Channel>>,
    models: Vec<ModelsClient<Channel>>,
    seen: Vec<u8>,
}

impl Checker {
    async fn new(addrs: &[std::net::SocketAddr]) -> Checker {
        let mut clients = Vec::new();
        let mut models = Vec::new();
        for a in addrs {
            let ch = connect(*a).await;
            clients.push(AuthorizationClient::new(ch.clone()));
            models.push(ModelsClient::new(ch));
        }
        Checker {
            clients,
            models,
            seen: Vec::new(),
        }
    }

    async fn check_on(&mut self, node: usize, r: CheckRequest) -> Answer {
        let resp: CheckResponse = self.clients[node]
            .check(r)
            .await
            .expect("Check answers")
            .into_inner();
        self.seen.extend(resp.encode_to_vec());
        decode(resp)
    }

    async fn check(&mut self, r: CheckRequest) -> Answer {
        self.check_on(0, r).await
    }

    async fn list_models(
        &mut self,
        r: tonic::Request<ListModelsRequest>,
    ) -> Result<Vec<String>, tonic::Status> {
        match self.models[0].list_models(r).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                self.seen.extend(resp.encode_to_vec());
                Ok(resp.models)
            }
            Err(status) => {
                self.seen.extend(status.message().as_bytes());
                self.seen.extend(status.details());
                Err(status)
            }
        }
    }

    #[track_caller]
    fn assert_never_shown(&self, secrets: &[&str]) {
        assert!(!self.seen.is_empty(), "responses were kept");
        for s in secrets {
            // The random part alone is never shown either.
            let random = &s.as_bytes()[s.len() - key_secret::RANDOM_LEN..];
            assert!(
                !self.seen.windows(random.len()).any(|w| w == random),
                "a secret was shown"
            );
        }
    }
}

fn decode(resp: CheckResponse) -> Answer {
    let rpc = resp.status.as_ref().map_or(0, |s| s.code);
    match resp.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            assert_eq!(rpc, 0);
            let headers = ok
                .headers
                .iter()
                .map(|h| {
                    assert_eq!(
                        h.append,
                        Some(false),
                        "Tally's headers replace the client's"
                    );
                    let h = h.header.as_ref().unwrap();
                    (h.key.clone(), h.value.clone())
                })
                .collect();
            let metadata_key_id = resp.dynamic_metadata.and_then(|m| {
                match m.fields.get("key_id")?.kind.as_ref()? {
                    prost_types::value::Kind::StringValue(s) => Some(s.clone()),
                    _ => None,
                }
            });
            Answer::Allowed {
                headers,
                removed: ok.headers_to_remove,
                metadata_key_id,
            }
        }
        Some(HttpResponse::DeniedResponse(d)) => {
            let content_type = d
                .headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .find(|h| h.key == "content-type")
                .map(|h| h.value.clone())
                .unwrap_or_default();
            let body: serde_json::Value = serde_json::from_str(&d.body).expect("a JSON body");
            Answer::Denied {
                http: d.status.map_or(0, |s| s.code),
                rpc,
                content_type,
                error: body["error"].clone(),
            }
        }
        None => panic!("no http_response"),
    }
}

/// (case, request headers, error.code).
type Case401<'a> = (&'a str, Vec<(&'a str, String)>, &'a str);
/// (case, extra request headers, body, error.type, error.code).
type Case403<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str, &'a str, &'a str);

const A: &str = "aaaaaaaaaaaaaaaa";
const B: &str = "bbbbbbbbbbbbbbbb";
const C: &str = "cccccccccccccccc";
const D: &str = "dddddddddddddddd";
const L: &str = "llllllllllllllll";
const U: &str = "uuuuuuuuuuuuuuuu";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_401_and_403_case_answers_with_an_openai_error_body() {
    within(async {
        let t = start(LIMITS).await;
        let node = t.server.node().unwrap();
        propose(
            &node,
            Command::PutSubscription(tier("free", &["small"], None, Some(1))),
        )
        .await;
        let a = new_key(&node, A, Some("free"), None).await;
        let b = new_key(&node, B, Some("free"), None).await;
        let c = new_key(&node, C, Some("free"), None).await;
        let d = new_key(&node, D, Some("free"), Some(T0_MS + 10_000)).await;
        propose(
            &node,
            Command::SetKeyEnabled {
                id: B.into(),
                enabled: false,
            },
        )
        .await;
        propose(&node, Command::DeleteKey { id: C.into() }).await;
        let mut k = Checker::new(&[t.server.grpc_addr]).await;
        let p = "/v1/chat/completions";

        // The same key is allowed until its expiry...
        assert!(matches!(
            k.check(request(p, &[("authorization", &bearer(&d))], ""))
                .await,
            Answer::Allowed { .. }
        ));

        let unknown = key_secret::generate(U);
        let wrong_secret = key_secret::generate(A);
        let auth = |v: &str| ("authorization", v.to_owned());
        let api_key = |v: &str| ("x-api-key", v.to_owned());
        let unauthenticated: Vec<Case401> = vec![
            ("no key at all", vec![], "missing_api_key"),
            (
                "another scheme",
                vec![auth("Basic dXNlcjpwYXNz")],
                "missing_api_key",
            ),
            (
                "not a Tally bearer token",
                vec![auth("Bearer sk-0123456789")],
                "invalid_api_key",
            ),
            (
                "a malformed x-api-key",
                vec![api_key("tly_short")],
                "invalid_api_key",
            ),
            (
                "an unknown key",
                vec![auth(&bearer(&unknown))],
                "invalid_api_key",
            ),
            (
                "a wrong secret",
                vec![api_key(&wrong_secret)],
                "invalid_api_key",
            ),
            ("a deleted key", vec![auth(&bearer(&c))], "key_deleted"),
            // Authentication first: a bad key with a bad classification is still 401.
            (
                "an unknown key with an unknown classification",
                vec![
                    auth(&bearer(&unknown)),
                    ("x-data-classification", "secret".into()),
                ],
                "invalid_api_key",
            ),
        ];
        for (case, headers, code) in unauthenticated {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let got = k.check(request(p, &h, "")).await.denial();
            assert_eq!(
                got,
                (401, "authentication_error".into(), code.into()),
                "{case}"
            );
        }
        // ... and refused from the first batch at or past it.
        t.clock.advance_ms(10_000);
        let got = k
            .check(request(p, &[("authorization", &bearer(&d))], ""))
            .await
            .denial();
        assert_eq!(
            got,
            (401, "authentication_error".into(), "key_expired".into())
        );

        let forbidden: Vec<Case403> = vec![
            (
                "a disabled key",
                vec![],
                "",
                "permission_error",
                "key_disabled",
            ),
            (
                "a model not allowed (header)",
                vec![("x-tally-model", "large")],
                "",
                "permission_error",
                "model_not_allowed",
            ),
            (
                "a model not allowed (JSON body)",
                vec![("content-type", "application/json")],
                r#"{"model":"large","messages":[{"role":"user","content":"hi"}]}"#,
                "permission_error",
                "model_not_allowed",
            ),
            (
                "a classification above the ceiling",
                vec![("x-data-classification", "confidential")],
                "",
                "permission_error",
                "classification_not_allowed",
            ),
            (
                "an unknown classification",
                vec![("x-data-classification", "top-secret")],
                "",
                "invalid_request_error",
                "invalid_classification",
            ),
            (
                "header and body disagree on the model",
                vec![("x-tally-model", "small")],
                r#"{"model":"large"}"#,
                "invalid_request_error",
                "model_mismatch",
            ),
            (
                "a body that is not valid JSON",
                vec![],
                r#"{"model":"small",,}"#,
                "invalid_request_error",
                "invalid_model",
            ),
        ];
        for (case, extra, body, kind, code) in forbidden {
            let secret = if code == "key_disabled" { &b } else { &a };
            let mut h = vec![("authorization", bearer(secret))];
            h.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let got = k.check(request(p, &h, body)).await.denial();
            assert_eq!(got, (403, kind.into(), code.into()), "{case}");
        }
        // Within its ceiling and list, the same key passes.
        let ok = k
            .check(request(
                p,
                &[
                    ("authorization", &bearer(&a)),
                    ("x-data-classification", "Internal"),
                ],
                r#"{"model":"small"}"#,
            ))
            .await;
        assert_eq!(ok.headers()["x-tally-model"], "small");
        k.assert_never_shown(&[&a, &b, &c, &d, &unknown, &wrong_secret]);
        t.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_requests_get_the_key_headers_and_public_paths_need_no_key() {
    within(async {
        let t = start_with(LIMITS, |c| {
            c.authz_public_paths = vec!["/healthz".into(), "/v1/status".into()];
        })
        .await;
        let node = t.server.node().unwrap();
        propose(
            &node,
            Command::PutSubscription(tier("premium", &["small", "large"], None, None)),
        )
        .await;
        let a = new_key(&node, A, Some("premium"), None).await;
        let legacy = new_key(&node, L, None, None).await;
        let mut k = Checker::new(&[t.server.grpc_addr]).await;

        let body = r#"{"model":"large","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let got = k
            .check(request(
                "/v1/chat/completions",
                &[("authorization", &bearer(&a))],
                body,
            ))
            .await;
        let Answer::Allowed {
            headers,
            removed,
            metadata_key_id,
        } = &got
        else {
            panic!("{got:?}")
        };
        let want: BTreeMap<String, String> = [
            ("x-tally-key-id", A),
            ("x-tally-subscription", "premium"),
            ("x-tally-model", "large"),
            ("x-tally-labels", "env=prod,team=red"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(headers, &want);
        assert!(
            removed.is_empty(),
            "the upstream's Authorization is left alone: {removed:?}"
        );
        assert_eq!(metadata_key_id.as_deref(), Some(A));

        // Raw headers (encode_raw_headers), any case; a legacy key: no subscription, no model.
        let mut raw = request("/v1/embeddings", &[], "");
        raw.attributes
            .as_mut()
            .unwrap()
            .request
            .as_mut()
            .unwrap()
            .http
            .as_mut()
            .unwrap()
            .header_map = Some(HeaderMap {
            headers: vec![HeaderValue {
                key: "X-API-Key".into(),
                value: String::new(),
                raw_value: legacy.as_bytes().to_vec(),
            }],
        });
        let got = k.check(raw).await;
        let Answer::Allowed {
            headers, removed, ..
        } = &got
        else {
            panic!("{got:?}")
        };
        assert_eq!(headers["x-tally-key-id"], L);
        assert_eq!(headers["x-tally-subscription"], "");
        assert!(!headers.contains_key("x-tally-model"));
        assert_eq!(
            removed,
            &vec!["x-tally-model".to_owned()],
            "a client's own x-tally-model goes"
        );

        // Public paths (exact, query ignored) pass without a key and lose spoofed headers.
        for path in ["/healthz", "/healthz?verbose=1", "/v1/status"] {
            let got = k
                .check(request(path, &[("x-tally-key-id", "someone-else")], ""))
                .await;
            let Answer::Allowed {
                headers, removed, ..
            } = &got
            else {
                panic!("{path}: {got:?}")
            };
            assert!(headers.is_empty(), "{path}");
            assert!(
                removed.contains(&"x-tally-key-id".to_owned()),
                "{path}: {removed:?}"
            );
        }
        for path in ["/readyz", "/healthz/deep", "/v1/status/"] {
            let got = k.check(request(path, &[], "")).await.denial();
            assert_eq!(got.0, 401, "{path} is not public here");
        }
        k.assert_never_shown(&[&a, &legacy]);
        t.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_keeps_its_old_secret_for_the_grace_period() {
    within(async {
        let t = start(LIMITS).await;
        let node = t.server.node().unwrap();
        let old = new_key(&node, A, None, None).await;
        let new = key_secret::generate(A);
        propose(
            &node,
            Command::RotateKey {
                id: A.into(),
                secret_sha256: key_secret::hash(&new),
                grace_ms: 5_000,
            },
        )
        .await;
        let mut k = Checker::new(&[t.server.grpc_addr]).await;
        let check = |s: &str| request("/v1/chat/completions", &[("authorization", &bearer(s))], "");
        for s in [&old, &new] {
            assert_eq!(k.check(check(s)).await.headers()["x-tally-key-id"], A);
        }
        t.clock.advance_ms(4_999);
        assert!(
            matches!(k.check(check(&old)).await, Answer::Allowed { .. }),
            "still in grace"
        );
        t.clock.advance_ms(1);
        let got = k.check(check(&old)).await.denial();
        assert_eq!(
            got,
            (401, "authentication_error".into(), "invalid_api_key".into())
        );
        assert!(matches!(k.check(check(&new)).await, Answer::Allowed { .. }));
        k.assert_never_shown(&[&old, &new]);
        t.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_key_is_refused_on_the_next_request_on_every_node() {
    within(async {
        let t = start_on(Topology::ThreeNodes, LIMITS, |_| {}).await;
        let cluster = t.cluster.as_ref().unwrap();
        let addrs = [
            cluster.node(1).grpc_addr,
            t.server.grpc_addr,
            cluster.node(3).grpc_addr,
        ];
        let node = t.server.node().unwrap();
        propose(
            &node,
            Command::PutSubscription(tier("free", &["small"], None, None)),
        )
        .await;
        let a = new_key(&node, A, Some("free"), None).await;
        let mut k = Checker::new(&addrs).await;
        let check = || {
            request(
                "/v1/chat/completions",
                &[("x-api-key", &a)],
                r#"{"model":"small"}"#,
            )
        };
        for i in 0..3 {
            assert_eq!(
                k.check_on(i, check()).await.headers()["x-tally-key-id"],
                A,
                "node {}",
                i + 1
            );
        }
        // Disabled through node 1; every node refuses the very next request.
        let leader = cluster.node(1).node().unwrap();
        propose(
            &leader,
            Command::SetKeyEnabled {
                id: A.into(),
                enabled: false,
            },
        )
        .await;
        for i in 0..3 {
            let got = k.check_on(i, check()).await.denial();
            assert_eq!(
                got,
                (403, "permission_error".into(), "key_disabled".into()),
                "node {}",
                i + 1
            );
        }
        // Enabled again from a follower, and deleted: deleted is permanent, on every node.
        propose(
            &node,
            Command::SetKeyEnabled {
                id: A.into(),
                enabled: true,
            },
        )
        .await;
        for i in 0..3 {
            assert!(
                matches!(k.check_on(i, check()).await, Answer::Allowed { .. }),
                "node {}",
                i + 1
            );
        }
        propose(&node, Command::DeleteKey { id: A.into() }).await;
        for i in 0..3 {
            let got = k.check_on(i, check()).await.denial();
            assert_eq!(
                got,
                (401, "authentication_error".into(), "key_deleted".into()),
                "node {}",
                i + 1
            );
        }
        k.assert_never_shown(&[&a]);
        t.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_models_answers_per_tier_and_only_to_a_good_key() {
    within(async {
        let t = start(LIMITS).await;
        let node = t.server.node().unwrap();
        let priced = |m: &str| ModelPrice {
            model: m.into(),
            input_nusd: 1,
            cached_input_nusd: 1,
            output_nusd: 2,
        };
        propose(
            &node,
            Command::SetPrices(PriceCatalog {
                models: vec![priced("huge"), priced("large"), priced("small")],
            }),
        )
        .await;
        propose(
            &node,
            Command::PutSubscription(tier("free", &["small"], None, None)),
        )
        .await;
        propose(
            &node,
            Command::PutSubscription(tier("premium", &["small", "large"], None, None)),
        )
        .await;
        propose(
            &node,
            Command::PutSubscription(tier("open", &[], None, None)),
        )
        .await;
        let free = new_key(&node, A, Some("free"), None).await;
        let premium = new_key(&node, B, Some("premium"), None).await;
        let open = new_key(&node, C, Some("open"), None).await;
        let legacy = new_key(&node, L, None, None).await;
        let disabled = new_key(&node, D, Some("free"), None).await;
        propose(
            &node,
            Command::SetKeyEnabled {
                id: D.into(),
                enabled: false,
            },
        )
        .await;
        let mut k = Checker::new(&[t.server.grpc_addr]).await;
        let by_field = |s: &str| tonic::Request::new(ListModelsRequest { api_key: s.into() });
        let every = vec!["huge".to_owned(), "large".into(), "small".into()];
        for (secret, want) in [
            (&free, vec!["small".to_owned()]),
            (&premium, vec!["small".into(), "large".into()]),
            (&open, every.clone()),
            (&legacy, every.clone()),
        ] {
            let mut got = k.list_models(by_field(secret)).await.unwrap();
            let mut want = want;
            got.sort();
            want.sort();
            assert_eq!(got, want);
        }
        // The key may come as call metadata instead.
        let mut r = tonic::Request::new(ListModelsRequest::default());
        r.metadata_mut()
            .insert("authorization", bearer(&free).parse().unwrap());
        assert_eq!(k.list_models(r).await.unwrap(), vec!["small".to_owned()]);
        let unknown = key_secret::generate(U);
        for (secret, code) in [
            ("", GrpcCode::Unauthenticated),
            ("sk-not-tally", GrpcCode::Unauthenticated),
            (unknown.as_str(), GrpcCode::Unauthenticated),
            (disabled.as_str(), GrpcCode::PermissionDenied),
        ] {
            let e = k.list_models(by_field(secret)).await.unwrap_err();
            assert_eq!(e.code(), code, "{e:?}");
        }
        propose(&node, Command::DeleteKey { id: C.into() }).await;
        let e = k.list_models(by_field(&open)).await.unwrap_err();
        assert_eq!(e.code(), GrpcCode::Unauthenticated);
        k.assert_never_shown(&[&free, &premium, &open, &legacy, &disabled, &unknown]);
        t.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_headers_check_returns_drive_the_subscription_limits_in_should_rate_limit() {
    within(async {
        let mut t = start(LIMITS).await;
        let node = t.server.node().unwrap();
        propose(
            &node,
            Command::PutSubscription(tier("metered", &[], Some(2), None)),
        )
        .await;
        let a = new_key(&node, A, Some("metered"), None).await;
        let b = new_key(&node, B, Some("metered"), None).await;
        let mut k = Checker::new(&[t.server.grpc_addr]).await;
        // What Envoy's rate-limit filter builds from the request headers after ext_authz.
        let mut n = 0;
        let mut request_once = async |secret: &str| {
            let got = k
                .check(request(
                    "/v1/chat/completions",
                    &[("authorization", &bearer(secret))],
                    "",
                ))
                .await;
            let h = got.headers();
            n += 1;
            let id = format!("req-{n}");
            let d = desc(&[
                ("usage", "reserve"),
                ("subject", &h["x-tally-key-id"]),
                ("subscription", &h["x-tally-subscription"]),
                ("request_id", &id),
            ]);
            code(&t.should(req("test", vec![d], 1)).await)
        };
        assert_eq!(request_once(&a).await, Code::Ok);
        assert_eq!(request_once(&a).await, Code::Ok);
        assert_eq!(
            request_once(&a).await,
            Code::OverLimit,
            "the third request within the minute"
        );
        assert_eq!(request_once(&b).await, Code::Ok, "another key has its own");
        // A key with its own requests-per-minute: 4, while the tier keeps 2 for the others.
        propose(
            &node,
            Command::SetKeyOverrides {
                id: B.into(),
                overrides: Some(KeyOverrides {
                    requests_per_minute: Some(4),
                    ..KeyOverrides::default()
                }),
            },
        )
        .await;
        for i in 0..4 {
            assert_eq!(
                request_once(&b).await,
                Code::Ok,
                "b's request {i} of its own 4"
            );
        }
        assert_eq!(request_once(&b).await, Code::OverLimit, "b's fifth");
        assert_eq!(
            request_once(&a).await,
            Code::OverLimit,
            "a still at the tier's 2"
        );
        k.assert_never_shown(&[&a, &b]);
        t.stop().await;
    })
    .await
}
