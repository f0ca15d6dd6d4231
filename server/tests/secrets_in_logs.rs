//! Issue #7: a key's secret never appears in a log. The real `tallyd` binary runs with every
//! target at `trace` (Tally's own, openraft's, and the HTTP/2 and gRPC stacks': h2, hyper,
//! tonic, tower), in JSON and in text, with admin tokens configured (`TALLY_ADMIN_TOKEN`, and a
//! read-only token in an `--auth-tokens` file); a key lives its whole life over gRPC (create,
//! show, list, rotate, ephemeral keys, ext_authz Check with the secret as a bearer and as
//! `x-api-key` — valid, rotated out, wrong —, ListModels with the secret in gRPC metadata,
//! ShouldRateLimit, disable, delete). Then nothing the process wrote (stdout and stderr) may
//! hold a key's secret, its random part, its SHA-256 (hex, or the digest's bytes as `Debug`
//! prints them), nor any admin token sent (right or wrong) or its SHA-256.
//!
//! So that the check is not vacuous, the log must also hold what trace level brings: lines
//! from Tally's targets, hundreds of h2 lines at TRACE (the frames of these very calls), the
//! gRPC server's, and the debug lines of refused admin calls.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::tallyd_proc::{TallydProc, field_addr, three_node_cluster};
use sha2::Digest;
use tally_proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use tally_proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use tally_proto::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Request as AttrRequest,
};
use tally_proto::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tally_proto::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use tally_proto::envoy::service::ratelimit::v3::RateLimitRequest;
use tally_proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tally_proto::tally::v1::admin_client::AdminClient;
use tally_proto::tally::v1::keys_client::KeysClient;
use tally_proto::tally::v1::models_client::ModelsClient;
use tally_proto::tally::v1::{
    CreateEphemeralKeyRequest, CreateKeyRequest, DeleteKeyRequest, GetKeyRequest, GetStatusRequest,
    Label, ListKeysRequest, ListModelsRequest, ListSubscriptionsRequest, RotateKeyRequest,
    SetKeyEnabledRequest,
};
use tonic::transport::Channel;
use tonic::{Code, Request};

/// The admin token, given to `tallyd` as `TALLY_ADMIN_TOKEN`.
const ADMIN: &str = "adm1n-T0ken-for-the-log-test-7c5e2b91d04f";
/// A read-only token, from the `--auth-tokens` file (which holds only its SHA-256).
const READER: &str = "read0nly-T0ken-for-the-log-test-3e8a61f2c9";
/// A token no one configured: refused (and the refusal logged at debug).
const WRONG_ADMIN: &str = "not-a-token-of-this-server-0a9b8c7d6e";

/// Every wait of this file is bounded by this.
const WAIT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Format {
    Json,
    Text,
}

impl Format {
    fn flag(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Text => "text",
        }
    }
}

/// A running `tallyd` (killed if dropped before it is stopped), its tokens file beside it.
struct Tallyd {
    proc: TallydProc,
    _dir: tempfile::TempDir,
}

/// The flags and environment every node of this file gets: trace logs in `format`, the
/// read-only token from a tokens file in `dir` (which holds only its SHA-256), the admin token
/// from `TALLY_ADMIN_TOKEN`.
fn flags(format: Format, dir: &std::path::Path) -> Vec<String> {
    let tokens = dir.join("tokens.yaml");
    let digest = hex(&sha256(READER));
    std::fs::write(
        &tokens,
        format!("- {{ name: dashboard, role: read-only, token_sha256: {digest} }}\n"),
    )
    .unwrap();
    [
        "--limits-poll-ms",
        "0",
        "--log",
        "trace",
        "--log-format",
        format.flag(),
        "--auth-tokens",
    ]
    .map(String::from)
    .into_iter()
    .chain([tokens.display().to_string()])
    .collect()
}

const ENV: [(&str, &str); 1] = [("TALLY_ADMIN_TOKEN", ADMIN)];

impl Tallyd {
    /// Starts a one-node `tallyd` and waits until it is ready.
    async fn start(format: Format) -> Tallyd {
        let dir = tempfile::tempdir().unwrap();
        let args = flags(format, dir.path());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = TallydProc::spawn(1, &dir.path().join("node-1"), &args, &ENV).await;
        proc.wait_ready().await;
        Tallyd { proc, _dir: dir }
    }

    /// Stops it as an operator does (SIGTERM; it must exit 0): everything it wrote, stdout
    /// then stderr, without ANSI escapes.
    async fn stop(self) -> String {
        strip_ansi(&self.proc.stop().await)
    }
}

/// The text without ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn sha256(s: &str) -> [u8; 32] {
    sha2::Sha256::digest(s.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What must never show in the log, each with what it is.
#[derive(Default)]
struct Needles(Vec<(String, String)>);

impl Needles {
    fn add(&mut self, what: impl Into<String>, needle: impl Into<String>) {
        self.0.push((what.into(), needle.into()));
    }

    /// A credential, its SHA-256 (hex either case, and the bytes as `Debug` prints them) and,
    /// for a key secret, its random part.
    fn credential(&mut self, what: &str, secret: &str) {
        self.add(what, secret);
        if secret.starts_with("tly_") {
            let random = secret.rsplit('_').next().unwrap();
            assert_eq!(random.len(), 32, "{secret}");
            self.add(format!("{what} (random part)"), random);
        }
        let digest = sha256(secret);
        self.add(format!("{what} (SHA-256 hex)"), hex(&digest));
        self.add(format!("{what} (SHA-256 HEX)"), hex(&digest).to_uppercase());
        self.add(format!("{what} (SHA-256 bytes)"), format!("{digest:?}"));
    }

    #[track_caller]
    fn assert_absent(&self, log: &str) {
        for (what, needle) in &self.0 {
            if let Some(at) = log.find(needle.as_str()) {
                let line_start = log[..at].rfind('\n').map_or(0, |i| i + 1);
                let line_end = log[at..].find('\n').map_or(log.len(), |i| at + i);
                panic!(
                    "{what} leaked into the log:\n{}",
                    &log[line_start..line_end]
                );
            }
        }
    }
}

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(message);
    if let Some(token) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    r
}

fn admin<T>(message: T) -> Request<T> {
    with_token(message, Some(ADMIN))
}

fn check_request(headers: &[(&str, &str)]) -> CheckRequest {
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
                    path: "/v1/chat/completions".into(),
                    host: "gateway.example".into(),
                    ..HttpRequest::default()
                }),
            }),
            ..AttributeContext::default()
        }),
    }
}

/// The gRPC clients one key's life goes through.
struct Clients {
    keys: KeysClient<Channel>,
    authz: AuthorizationClient<Channel>,
    models: ModelsClient<Channel>,
    rls: RateLimitServiceClient<Channel>,
    admin: AdminClient<Channel>,
}

impl Clients {
    async fn new(addr: SocketAddr) -> Clients {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .expect("connects");
        Clients {
            keys: KeysClient::new(channel.clone()),
            authz: AuthorizationClient::new(channel.clone()),
            models: ModelsClient::new(channel.clone()),
            rls: RateLimitServiceClient::new(channel.clone()),
            admin: AdminClient::new(channel),
        }
    }

    /// The gRPC code of Check's verdict on `secret`, presented both ways Envoy passes it on
    /// (`authorization: Bearer`, `x-api-key`); both must agree.
    async fn check(&mut self, secret: &str) -> i32 {
        let bearer = format!("Bearer {secret}");
        let mut codes = Vec::new();
        for header in [("authorization", bearer.as_str()), ("x-api-key", secret)] {
            let answer = self
                .authz
                .check(check_request(&[header]))
                .await
                .expect("Check answers")
                .into_inner();
            codes.push(answer.status.map_or(0, |s| s.code));
        }
        assert_eq!(codes[0], codes[1], "both ways of presenting a key agree");
        codes[0]
    }

    /// ListModels with the secret in gRPC metadata, both ways.
    async fn list_models(&mut self, secret: &str) -> Result<(), Code> {
        let mut results = Vec::new();
        for (name, value) in [
            ("authorization", format!("Bearer {secret}")),
            ("x-api-key", secret.to_owned()),
        ] {
            let mut r = Request::new(ListModelsRequest::default());
            r.metadata_mut().insert(name, value.parse().unwrap());
            results.push(
                self.models
                    .list_models(r)
                    .await
                    .map(drop)
                    .map_err(|s| s.code()),
            );
        }
        assert_eq!(
            results[0], results[1],
            "both ways of presenting a key agree"
        );
        results[0]
    }

    async fn should_rate_limit(&mut self, key_id: &str) {
        let entries = [("kind", "requests"), ("tier", "free"), ("api_key", key_id)];
        let r = self
            .rls
            .should_rate_limit(RateLimitRequest {
                domain: "ai-gateway".into(),
                descriptors: vec![RateLimitDescriptor {
                    entries: entries
                        .iter()
                        .map(|(k, v)| Entry {
                            key: (*k).into(),
                            value: (*v).into(),
                        })
                        .collect(),
                    limit: None,
                    hits_addend: None,
                }],
                hits_addend: 1,
            })
            .await
            .expect("ShouldRateLimit answers")
            .into_inner();
        assert_eq!(r.overall_code, 1, "OK: {r:?}");
    }
}

const OK: i32 = 0;
const UNAUTHENTICATED: i32 = 16;
const PERMISSION_DENIED: i32 = 7;

/// A key's whole life; every credential used is added to `needles`.
async fn a_key_lives_its_whole_life(c: &mut Clients, needles: &mut Needles) {
    needles.credential("the admin token", ADMIN);
    needles.credential("the read-only token", READER);
    needles.credential("a wrong admin token", WRONG_ADMIN);

    // An admin call refused: its refusal is logged at debug (without the token).
    let refused = c
        .admin
        .get_status(with_token(GetStatusRequest {}, Some(WRONG_ADMIN)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    c.admin
        .get_status(admin(GetStatusRequest {}))
        .await
        .unwrap();

    let subs = c
        .keys
        .list_subscriptions(admin(ListSubscriptionsRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(subs.subscriptions.iter().any(|s| s.name == "free"));
    let made = c
        .keys
        .create_key(admin(CreateKeyRequest {
            name: "web app".into(),
            description: "the storefront".into(),
            subscription: "free".into(),
            labels: vec![Label {
                key: "team".into(),
                value: "web".into(),
            }],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let first = made.secret;
    needles.credential("the key's first secret", &first);
    let id = made.key.unwrap().id;
    assert!(first.starts_with(&format!("tly_{id}_")), "{first}");

    let shown = c
        .keys
        .get_key(admin(GetKeyRequest { id: id.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.id, id);
    let listed = c
        .keys
        .list_keys(admin(ListKeysRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.keys.len(), 1);
    // The read-only token may list, not create (a refusal logged with the token's name).
    let listed = c
        .keys
        .list_keys(with_token(ListKeysRequest {}, Some(READER)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.keys.len(), 1);
    let e = c
        .keys
        .create_key(with_token(CreateKeyRequest::default(), Some(READER)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    assert_eq!(c.check(&first).await, OK);
    c.list_models(&first).await.unwrap();
    c.should_rate_limit(&id).await;

    // A key's secret is no admin token.
    let e = c
        .keys
        .list_keys(with_token(ListKeysRequest {}, Some(&first)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // Rotated without grace: the first secret is out at once.
    let second = c
        .keys
        .rotate_key(admin(RotateKeyRequest {
            id: id.clone(),
            grace_ms: 0,
        }))
        .await
        .unwrap()
        .into_inner()
        .secret;
    needles.credential("the key's second secret", &second);
    assert_ne!(first, second);
    assert_eq!(c.check(&second).await, OK);
    assert_eq!(c.check(&first).await, UNAUTHENTICATED, "rotated out");
    assert_eq!(c.list_models(&first).await, Err(Code::Unauthenticated));
    // Well formed, right id, wrong random part.
    let wrong = format!("tly_{id}_{}", "Q".repeat(32));
    needles.credential("a wrong secret", &wrong);
    assert_eq!(c.check(&wrong).await, UNAUTHENTICATED);

    // Ephemeral keys: asked for by the key itself (its secret in the message), and by an
    // admin.
    let own = c
        .keys
        .create_ephemeral_key(CreateEphemeralKeyRequest {
            api_key: second.clone(),
            name: "browser session".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    needles.credential("an ephemeral key's secret", &own);
    let e = c
        .keys
        .create_ephemeral_key(CreateEphemeralKeyRequest {
            api_key: first.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let issued = c
        .keys
        .create_ephemeral_key(admin(CreateEphemeralKeyRequest {
            subscription: "premium".into(),
            ttl_ms: 60_000,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .secret;
    needles.credential("an admin-issued ephemeral key's secret", &issued);
    assert_eq!(c.check(&own).await, OK);
    assert_eq!(c.check(&issued).await, OK);
    c.list_models(&own).await.unwrap();

    // Disabled: refused (403); enabled again; deleted: refused for good (401).
    let off = c
        .keys
        .set_key_enabled(admin(SetKeyEnabledRequest {
            id: id.clone(),
            enabled: false,
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(!off.enabled);
    assert_eq!(c.check(&second).await, PERMISSION_DENIED);
    assert_eq!(c.list_models(&second).await, Err(Code::PermissionDenied));
    c.keys
        .set_key_enabled(admin(SetKeyEnabledRequest {
            id: id.clone(),
            enabled: true,
        }))
        .await
        .unwrap();
    assert_eq!(c.check(&second).await, OK);
    c.keys
        .delete_key(admin(DeleteKeyRequest { id: id.clone() }))
        .await
        .unwrap();
    assert_eq!(c.check(&second).await, UNAUTHENTICATED);
    let e = c
        .keys
        .get_key(admin(GetKeyRequest { id }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

/// The target of a text line's `[<spans>: ]<target>: <message>` (after the level): a module
/// path (lower case, `::`-separated; span names are not, or hold fields in braces), the first
/// of the first three `: `-separated parts that has a `::`, else the first that is a path.
fn text_target(rest: &str) -> Option<&str> {
    let is_path = |s: &str| {
        s.split("::").all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
    };
    let parts: Vec<&str> = rest.split(": ").take(3).collect();
    let paths = || parts.iter().copied().filter(|p| is_path(p));
    paths()
        .find(|p| p.contains("::"))
        .or_else(|| paths().next())
}

/// What the log lines say: how many per (level, crate of the target). JSON lines are parsed
/// (a line that is not JSON is skipped: stderr, or a line cut short); text lines are
/// `<time> <LEVEL> [<spans>: ]<target>: <message>`.
fn levels_and_targets(format: Format, log: &str) -> BTreeMap<(String, String), usize> {
    let mut seen = BTreeMap::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let (level, target) = match format {
            Format::Json => {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue; // stderr, or a line cut short
                };
                let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
                (s("level"), s("target"))
            }
            Format::Text => {
                // The level is right-aligned: ` INFO`, `TRACE`.
                let Some((level, rest)) = line
                    .split_once(' ')
                    .and_then(|(_time, rest)| rest.trim_start().split_once(' '))
                else {
                    continue;
                };
                (
                    level.to_owned(),
                    text_target(rest).unwrap_or_default().to_owned(),
                )
            }
        };
        let krate = target.split("::").next().unwrap_or_default().to_owned();
        *seen.entry((level, krate)).or_default() += 1;
    }
    seen
}

async fn secrets_stay_out_of_the_log(format: Format) {
    let server = Tallyd::start(format).await;
    let mut clients = Clients::new(server.proc.grpc).await;
    let mut needles = Needles::default();
    tokio::time::timeout(WAIT, a_key_lives_its_whole_life(&mut clients, &mut needles))
        .await
        .expect("a key's life within the time allowed");
    drop(clients);
    let log = server.stop().await;
    let seen = assert_substantial(format, &log);
    assert!(
        count(&seen, "TRACE", "h2") > 100,
        "h2 frames at trace: {seen:?}"
    );
    assert_refusals_logged(format, &log);
    needles.assert_absent(&log);
}

/// How many lines of `level` a crate wrote.
fn count(seen: &BTreeMap<(String, String), usize>, level: &str, krate: &str) -> usize {
    seen.get(&(level.to_owned(), krate.to_owned()))
        .copied()
        .unwrap_or(0)
}

/// Checks that one process's log holds what trace level brings, from this very run (so that
/// finding no secret in it means something); its lines per level and crate.
#[track_caller]
fn assert_substantial(format: Format, log: &str) -> BTreeMap<(String, String), usize> {
    let seen = levels_and_targets(format, log);
    let summary = format!("{seen:?}");
    assert!(count(&seen, "INFO", "tally_server") > 0, "{summary}");
    assert!(count(&seen, "TRACE", "h2") > 0, "h2 at trace: {summary}");
    assert!(
        count(&seen, "DEBUG", "openraft") + count(&seen, "TRACE", "openraft") > 0,
        "openraft at trace: {summary}"
    );
    assert!(
        ["TRACE", "DEBUG"].iter().any(|l| count(&seen, l, "tonic")
            + count(&seen, l, "hyper")
            + count(&seen, l, "tower")
            > 0),
        "the gRPC stack at trace: {summary}"
    );
    for expected in ["tallyd serving", "tallyd stopped"] {
        assert!(log.contains(expected), "{expected:?} is logged");
    }
    // The frames of the calls that carried secrets are there: a HEADERS frame per call.
    assert!(log.contains("Headers"), "h2 HEADERS frames are logged");
    seen
}

/// The node the calls went to refused some admin calls: logged at debug, with the token's
/// name (never the token).
#[track_caller]
fn assert_refusals_logged(format: Format, log: &str) {
    let seen = levels_and_targets(format, log);
    assert!(count(&seen, "DEBUG", "tally_server") > 0, "{seen:?}");
    for expected in ["call refused", "token `dashboard` has role read-only"] {
        assert!(log.contains(expected), "{expected:?} is logged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_trace_logs_never_show_a_secret() {
    secrets_stay_out_of_the_log(Format::Json).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_trace_logs_never_show_a_secret() {
    secrets_stay_out_of_the_log(Format::Text).await;
}

/// Three `tallyd`s, the key's life driven through a follower: its commands (with the
/// secrets' SHA-256) and reads forwarded to the leader, and replicated to every node, with
/// every node logging at trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clusters_trace_logs_never_show_a_secret() {
    let format = Format::Json;
    let dir = tempfile::tempdir().unwrap();
    let args = flags(format, dir.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut nodes = three_node_cluster(dir.path(), &args, &ENV, Some(ADMIN)).await;
    let followers = nodes.split_off(1);
    let leader = nodes.pop().unwrap();
    let mut clients = Clients::new(followers[0].grpc).await;
    let mut needles = Needles::default();
    tokio::time::timeout(WAIT, a_key_lives_its_whole_life(&mut clients, &mut needles))
        .await
        .expect("a key's life within the time allowed");
    drop(clients);
    let Ok([first, second]) = <[TallydProc; 2]>::try_from(followers) else {
        unreachable!("two followers")
    };
    let logs = [
        strip_ansi(&second.stop().await),
        strip_ansi(&first.stop().await),
        strip_ansi(&leader.stop().await),
    ];
    for log in &logs {
        assert_substantial(format, log);
    }
    assert_refusals_logged(format, &logs[1]);
    for log in &logs {
        needles.assert_absent(log);
    }
}

/// The needle check itself finds what it looks for, wherever in the log.
#[test]
fn a_leak_is_found() {
    let secret = "tly_abcdefghij012345_0123456789ABCDEFGHIJabcdefghijKL";
    let mut needles = Needles::default();
    needles.credential("a secret", secret);
    let digest = sha256(secret);
    for log in [
        format!("x\n{{\"fields\":{{\"header\":\"Bearer {secret}\"}}}}\ny"),
        "value=0123456789ABCDEFGHIJabcdefghijKL".to_owned(),
        format!("hash={}", hex(&digest)),
        format!("hash={}", hex(&digest).to_uppercase()),
        format!("cmd=CreateKey {{ secret_sha256: {digest:?} }}"),
    ] {
        let found = std::panic::catch_unwind(|| needles.assert_absent(&log));
        assert!(found.is_err(), "not found in {log}");
    }
    needles.assert_absent("tly_abcdefghij012345 (the key id alone is no secret)");
    assert_eq!(
        field_addr(
            "INFO tally_server::server: tallyd serving node=1 grpc=127.0.0.1:4242 http=127.0.0.1:1",
            "grpc"
        ),
        Some("127.0.0.1:4242".parse().unwrap())
    );
    assert_eq!(
        field_addr(
            r#"{"fields":{"grpc":"127.0.0.1:4242","http":"[::1]:1"}}"#,
            "grpc"
        ),
        Some("127.0.0.1:4242".parse().unwrap())
    );
    assert_eq!(
        strip_ansi("\u{1b}[3mgrpc\u{1b}[0m\u{1b}[2m=\u{1b}[0m1"),
        "grpc=1"
    );
}

#[test]
fn text_lines_name_their_target() {
    let t = "2026-12-02T02:59:26.082400Z";
    let log = [
        "TRACE tonic::transport::server: connection accepted",
        "TRACE h2::proto::streams::state: send_close: Open => Closed",
        "DEBUG Connection{peer=Server}:poll:FramedRead::poll_next: h2::codec::framed_read: got",
        "TRACE poll: h2::proto::connection: poll",
        " INFO tallyd: shutdown signal received; finishing in-flight calls",
        " INFO tally_server::server: tallyd serving node=1",
    ]
    .map(|line| format!("{t} {line}\n"))
    .concat();
    let seen = levels_and_targets(Format::Text, &log);
    let expected: BTreeMap<(String, String), usize> = [
        (("TRACE", "tonic"), 1),
        (("TRACE", "h2"), 2),
        (("DEBUG", "h2"), 1),
        (("INFO", "tallyd"), 1),
        (("INFO", "tally_server"), 1),
    ]
    .into_iter()
    .map(|((l, k), n)| ((l.to_owned(), k.to_owned()), n))
    .collect();
    assert_eq!(seen, expected);
}
