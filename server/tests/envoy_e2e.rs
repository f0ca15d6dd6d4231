//! End to end behind the real Envoy: a 3-node Tally cluster (`tallyd` processes), the
//! OpenAI-compatible mock upstream, and Envoy 1.40 (from PyPI, `common::pyenv`) running the
//! shipped `examples/envoy/envoy.yaml`, all on 127.0.0.1 with free ports.
//!
//! Without the environment (no network to PyPI) these tests say loudly that they did not
//! run; in CI (`CI=true`) that is a failure.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::envoy_proc::{EnvoyProc, EnvoySetup};
use common::http1;
use common::mock_openai::MockOpenAi;
use common::pyenv::{PyEnv, pyenv};
use common::tallyd_proc::{TallydProc, three_node_cluster};
use serde_json::{Value, json};
use tally_proto::tally::v1::cluster_client::ClusterClient;
use tally_proto::tally::v1::keys_client::KeysClient;
use tally_proto::tally::v1::usage_client::UsageClient;
use tally_proto::tally::v1::{
    ClusterStatusRequest, CreateKeyRequest, ExportUsageRequest, Granularity, PutMode,
    PutSubscriptionsRequest, QueryUsageRequest, SetKeyEnabledRequest, UsageFilter, UsageRecord,
};
use tonic::transport::Channel;

/// Every scenario of a test within this.
const TEST_LIMIT: Duration = Duration::from_secs(240);
/// Waits for something asynchronous (a stream-done report) at most this long.
const SETTLE: Duration = Duration::from_secs(15);
/// The reservation TTL the tests' Envoy uses: a stream that never ends is charged after it.
const RESERVE_TTL_S: u32 = 3;
const CHAT: &str = "/v1/chat/completions";

/// Test tiers beside the example's free / premium / enterprise.
const TIERS: &str = "subscriptions:
  - name: tiny
    models: [gpt-4o-mini]
    budgets:
      - { name: daily-tokens, metric: total_tokens, limit: 100, window: { fixed: day, time_zone: UTC } }
  - name: bulk
    models: [gpt-4o-mini]
";

struct Gateway {
    _dir: tempfile::TempDir,
    nodes: Vec<Option<TallydProc>>,
    mock: MockOpenAi,
    envoy: EnvoyProc,
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connects")
}

impl Gateway {
    async fn start(env: &PyEnv) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let nodes = three_node_cluster(dir.path(), &["--limits-poll-ms", "0"], &[], None).await;
        let mock = MockOpenAi::start().await;
        let grpc: Vec<SocketAddr> = nodes.iter().map(|n| n.grpc).collect();
        let setup = EnvoySetup {
            tally: &grpc,
            upstream: mock.addr(),
            reserve_ttl_s: RESERVE_TTL_S,
        };
        let envoy = EnvoyProc::start(&env.envoy, dir.path(), &setup).await;
        let g = Gateway {
            _dir: dir,
            nodes: nodes.into_iter().map(Some).collect(),
            mock,
            envoy,
        };
        let mut keys = g.keys().await;
        keys.put_subscriptions(PutSubscriptionsRequest {
            document: TIERS.into(),
            mode: PutMode::Create as i32,
        })
        .await
        .expect("test tiers");
        g
    }

    /// A running node's gRPC address (`skip`: one that is not).
    fn grpc(&self) -> SocketAddr {
        self.nodes.iter().flatten().last().unwrap().grpc
    }

    async fn keys(&self) -> KeysClient<Channel> {
        KeysClient::new(channel(self.grpc()).await)
    }

    async fn usage(&self) -> UsageClient<Channel> {
        UsageClient::new(channel(self.grpc()).await)
    }

    /// A key on `tier`: (id, secret).
    async fn key(&self, tier: &str) -> (String, String) {
        let made = self
            .keys()
            .await
            .create_key(CreateKeyRequest {
                name: format!("e2e {tier}"),
                subscription: tier.into(),
                ..Default::default()
            })
            .await
            .expect("key created")
            .into_inner();
        (made.key.unwrap().id, made.secret)
    }

    /// POSTs a chat completion through Envoy with `secret` (if any) and extra headers.
    async fn chat(&self, secret: Option<&str>, body: Value, extra: &[(&str, &str)]) -> Answer {
        let bearer = secret.map(|s| format!("Bearer {s}"));
        let mut headers: Vec<(&str, &str)> = extra.to_vec();
        if let Some(b) = &bearer {
            headers.push(("authorization", b));
        }
        let exchange = async {
            let r = http1::post_json(self.envoy.listener, CHAT, &headers, &body).await?;
            let (status, headers) = (r.status, r.headers.clone());
            let body = r.body().await?;
            Ok::<_, std::io::Error>(Answer {
                status,
                headers,
                body,
            })
        };
        tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .expect("an answer within 30 s")
            .unwrap_or_else(|e| panic!("request through envoy: {e}\n{}", self.envoy.logs()))
    }

    /// Total input and output tokens recorded for `subject` (a linearizable read).
    async fn tokens_of(&self, subject: &str) -> (u64, u64, u64) {
        let rows = self
            .usage()
            .await
            .query_usage(QueryUsageRequest {
                start_ms: (now_ms() / DAY_MS - 1) * DAY_MS,
                end_ms: (now_ms() / DAY_MS + 2) * DAY_MS,
                group_by: vec![],
                granularity: Granularity::Total as i32,
                time_zone: String::new(),
                filter: Some(UsageFilter {
                    subject: Some(subject.into()),
                    ..Default::default()
                }),
            })
            .await
            .expect("query usage")
            .into_inner()
            .rows;
        rows.iter().fold((0, 0, 0), |(r, i, o), row| {
            (
                r + row.requests,
                i + row.input_tokens,
                o + row.output_tokens,
            )
        })
    }

    /// Waits until `subject`'s usage is `want` (requests, input, output), then checks it
    /// stays so for a moment (nothing counted twice).
    async fn expect_usage(&self, subject: &str, want: (u64, u64, u64)) {
        let started = Instant::now();
        loop {
            let got = self.tokens_of(subject).await;
            if got == want {
                break;
            }
            assert!(
                started.elapsed() < SETTLE,
                "usage of {subject}: {got:?}, want {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(self.tokens_of(subject).await, want, "usage of {subject}");
    }

    async fn export(&self) -> Vec<UsageRecord> {
        let mut stream = self
            .usage()
            .await
            .export_usage(ExportUsageRequest {
                after_seq: 0,
                max_records: 0,
            })
            .await
            .expect("export")
            .into_inner();
        let mut out = Vec::new();
        while let Some(r) = stream.message().await.expect("export stream") {
            out.push(r);
        }
        out
    }
}

const DAY_MS: i64 = 86_400_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// An HTTP answer.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The OpenAI-style error's `type` and `code`.
    fn error(&self) -> (String, String) {
        assert_eq!(self.header("content-type"), Some("application/json"));
        let v = self.json();
        let field = |k: &str| v["error"][k].as_str().unwrap_or_default().to_owned();
        assert!(!field("message").is_empty(), "{v}");
        (field("type"), field("code"))
    }
}

fn mini(max_tokens: u64) -> Value {
    json!({ "model": "gpt-4o-mini", "max_tokens": max_tokens, "messages": [{ "role": "user", "content": "hi" }] })
}

fn tokens(prompt: u64, completion: u64) -> [(&'static str, String); 2] {
    [
        ("x-mock-prompt-tokens", prompt.to_string()),
        ("x-mock-completion-tokens", completion.to_string()),
    ]
}

fn as_refs<'a>(h: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    h.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

async fn keys_are_checked_at_the_edge(g: &Gateway) {
    let body = mini(10);
    let none = g.chat(None, body.clone(), &[]).await;
    assert_eq!(none.status, 401);
    assert_eq!(
        none.error(),
        ("authentication_error".into(), "missing_api_key".into())
    );
    let bad = g
        .chat(
            Some("tly_aaaaaaaaaaaaaaaa_notarealsecretnotarealsecret00"),
            body.clone(),
            &[],
        )
        .await;
    assert_eq!(bad.status, 401);
    assert_eq!(bad.error().0, "authentication_error");

    let (id, secret) = g.key("free").await;
    let forbidden = json!({ "model": "gpt-4o", "max_tokens": 10 });
    let r = g.chat(Some(&secret), forbidden, &[]).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.error(),
        ("permission_error".into(), "model_not_allowed".into())
    );
    g.keys()
        .await
        .set_key_enabled(SetKeyEnabledRequest { id, enabled: false })
        .await
        .unwrap();
    let r = g.chat(Some(&secret), body, &[]).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.error(),
        ("permission_error".into(), "key_disabled".into())
    );
}

async fn requests_per_minute_end_in_an_openai_429(g: &Gateway) {
    // Free: 5 requests a minute (and 100 tokens: one token each way keeps well inside).
    let (id, secret) = g.key("free").await;
    let small = tokens(1, 1);
    for i in 0..5 {
        let r = g.chat(Some(&secret), mini(1), &as_refs(&small)).await;
        assert_eq!(
            r.status,
            200,
            "request {i}: {}",
            String::from_utf8_lossy(&r.body)
        );
        for h in [
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
        ] {
            assert!(r.header(h).is_some(), "{h} on request {i}: {:?}", r.headers);
        }
    }
    // The upstream saw the key's headers from ext_authz.
    let last = g.mock.last().unwrap();
    assert_eq!(last.header("x-tally-key-id"), Some(id.as_str()));
    assert_eq!(last.header("x-tally-subscription"), Some("free"));
    let r = g.chat(Some(&secret), mini(1), &as_refs(&small)).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("x-envoy-ratelimited"), Some("true"));
    assert_eq!(
        r.error(),
        ("rate_limit_error".into(), "rate_limit_exceeded".into())
    );
    let limit = r.header("x-ratelimit-limit").unwrap_or_default();
    assert!(limit.contains("requests-per-minute"), "{limit}");
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    g.expect_usage(&id, (5, 5, 5)).await;
}

async fn tokens_are_metered_from_json_and_streams(g: &Gateway) {
    let (id, secret) = g.key("premium").await;
    let json_tokens = tokens(13, 21);
    let r = g
        .chat(Some(&secret), mini(50), &as_refs(&json_tokens))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["usage"]["total_tokens"], 34);
    let mut stream = mini(50);
    stream["stream"] = json!(true);
    let stream_tokens = tokens(17, 5);
    let r = g
        .chat(Some(&secret), stream, &as_refs(&stream_tokens))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert!(
        text.contains("\"total_tokens\":22") && text.contains("[DONE]"),
        "{text}"
    );
    // Exactly what the upstream reported, once each.
    g.expect_usage(&id, (2, 13 + 17, 21 + 5)).await;
}

async fn a_spent_budget_refuses_the_next_request(g: &Gateway) {
    // Tiny: 100 tokens a day. 60 + 50 goes over; the next one has no room for its estimate.
    let (id, secret) = g.key("tiny").await;
    let big = tokens(60, 50);
    let r = g.chat(Some(&secret), mini(10), &as_refs(&big)).await;
    assert_eq!(r.status, 200);
    g.expect_usage(&id, (1, 60, 50)).await;
    let r = g
        .chat(Some(&secret), mini(10), &as_refs(&tokens(1, 1)))
        .await;
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.error().0, "rate_limit_error");
    let limit = r.header("x-ratelimit-limit").unwrap_or_default();
    assert!(limit.contains("daily-tokens"), "{limit}");
}

async fn a_client_gone_mid_stream_is_charged_its_reservation(g: &Gateway) {
    let (id, secret) = g.key("premium").await;
    let mut body = mini(77);
    body["stream"] = json!(true);
    let bearer = format!("Bearer {secret}");
    let headers = [
        ("authorization", bearer.as_str()),
        ("x-mock-chunks", "20"),
        ("x-mock-chunk-delay-ms", "300"),
    ];
    let read_one = async {
        let mut r = http1::post_json(g.envoy.listener, CHAT, &headers, &body).await?;
        assert_eq!(r.status, 200);
        r.next_event().await
        // Dropped: the client goes away with the stream half sent.
    };
    let first = tokio::time::timeout(Duration::from_secs(10), read_one)
        .await
        .expect("first event within 10 s")
        .expect("first event");
    assert!(first.is_some());
    g.mock
        .wait_until(SETTLE, |served| {
            served
                .iter()
                .any(|s| s.header("x-tally-key-id") == Some(id.as_str()) && s.disconnected())
        })
        .await;
    // Nothing is reported by Envoy for it; after the TTL the reservation's estimate is
    // charged, at the first batch past it (any call makes one).
    tokio::time::sleep(Duration::from_secs(u64::from(RESERVE_TTL_S) + 1)).await;
    let started = Instant::now();
    loop {
        // Any write makes a batch (a Check without a key does not: it is refused at once).
        let _ = g.key("free").await;
        let (requests, input, output) = g.tokens_of(&id).await;
        if requests == 1 {
            assert_eq!(input + output, 77, "the estimate, charged");
            break;
        }
        assert!(
            started.elapsed() < SETTLE,
            "the reservation was not charged"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_limits_budgets_and_metering_through_envoy() {
    let Some(env) = pyenv() else { return };
    tokio::time::timeout(TEST_LIMIT, async {
        let g = Gateway::start(&env).await;
        keys_are_checked_at_the_edge(&g).await;
        requests_per_minute_end_in_an_openai_429(&g).await;
        tokens_are_metered_from_json_and_streams(&g).await;
        a_spent_budget_refuses_the_next_request(&g).await;
        a_client_gone_mid_stream_is_charged_its_reservation(&g).await;
    })
    .await
    .expect("within the test limit");
}

/// The request ids Envoy gave the chat requests the upstream served for `key`.
fn served_ids(mock: &MockOpenAi, key: &str) -> BTreeSet<String> {
    mock.chat_requests()
        .iter()
        .filter(|s| s.header("x-tally-key-id") == Some(key))
        .filter_map(|s| s.header("x-request-id").map(str::to_owned))
        .collect()
}

/// Every id of `ids` has a usage record (`rls:<domain>:<x-request-id>`).
async fn all_recorded(g: &Gateway, ids: &BTreeSet<String>) -> bool {
    let recorded: BTreeSet<String> = g
        .export()
        .await
        .into_iter()
        .filter_map(|r| {
            r.request_id
                .strip_prefix("rls:ai-gateway:")
                .map(str::to_owned)
        })
        .collect();
    ids.is_subset(&recorded)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_continues_after_the_leader_is_killed_and_no_reported_usage_is_lost() {
    let Some(env) = pyenv() else { return };
    tokio::time::timeout(TEST_LIMIT, async {
        let mut g = Gateway::start(&env).await;
        let (id, secret) = g.key("bulk").await;
        let t = tokens(3, 4);
        for i in 0..10 {
            let r = g.chat(Some(&secret), mini(5), &as_refs(&t)).await;
            assert_eq!(r.status, 200, "request {i}");
        }
        let before = served_ids(&g.mock, &id);
        assert_eq!(before.len(), 10);
        let started = Instant::now();
        while !all_recorded(&g, &before).await {
            assert!(started.elapsed() < SETTLE, "pre-kill usage recorded");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Kill the leader (SIGKILL) while traffic goes on.
        let status = ClusterClient::new(channel(g.nodes[1].as_ref().unwrap().raft).await)
            .status(ClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        let leader = status.leader_id.expect("a leader") as usize;
        let dead = g.nodes[leader - 1].take().unwrap();
        let dead_grpc = dead.grpc;
        dead.kill();
        let started = Instant::now();
        let mut consecutive = 0;
        let mut statuses = Vec::new();
        while consecutive < 10 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "traffic did not recover within 60 s of the kill:\n{}",
                g.envoy.logs()
            );
            let r = g.chat(Some(&secret), mini(5), &as_refs(&t)).await;
            statuses.push(r.status);
            consecutive = if r.status == 200 { consecutive + 1 } else { 0 };
            if r.status != 200 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Requests served while Envoy still sent calls to the dead node may have lost their
        // stream-done report (fire-and-forget; the rate-limit filter fails open). Once its
        // health checks took the node out, traffic goes on fully metered: ten more requests,
        // every one recorded.
        g.envoy.wait_host_unhealthy(dead_grpc).await;
        let recovered: BTreeSet<String> = served_ids(&g.mock, &id);
        for i in 0..10 {
            let r = g.chat(Some(&secret), mini(5), &as_refs(&t)).await;
            assert_eq!(r.status, 200, "request {i} after recovery");
        }
        let later: BTreeSet<String> = served_ids(&g.mock, &id)
            .difference(&recovered)
            .cloned()
            .collect();
        assert_eq!(later.len(), 10);
        // Every usage reported before the kill is still there, on the survivors, and the
        // later requests are all metered.
        let started = Instant::now();
        while !all_recorded(&g, &later).await {
            if started.elapsed() > SETTLE {
                let recorded: Vec<String> =
                    g.export().await.into_iter().map(|r| r.request_id).collect();
                let logs: String = g
                    .nodes
                    .iter()
                    .flatten()
                    .map(|n| {
                        n.logs()
                            .lines()
                            .filter(|l| l.contains("tally_server") && (l.contains("WARN") || l.contains("ERROR")))
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .collect::<Vec<_>>()
                    .join("\n---\n");
                let stats = g.envoy.stats("ratelimit|tally").await;
                panic!(
                    "usage after recovery not recorded: {later:?}\nrecorded {recorded:?}\nstatuses {statuses:?}\n{logs}\n{}\n{stats}",
                    g.envoy.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(all_recorded(&g, &before).await, "usage reported before the kill was lost");
        let after = served_ids(&g.mock, &id);
        let (requests, input, output) = g.tokens_of(&id).await;
        assert!(
            requests >= 20 && requests as usize <= after.len(),
            "{requests} of {}",
            after.len()
        );
        assert_eq!((input, output), (3 * requests, 4 * requests));
    })
    .await
    .expect("within the test limit");
}
