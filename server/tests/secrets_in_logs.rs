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

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
use tally_proto::tally::v1::cluster_client::ClusterClient;
use tally_proto::tally::v1::keys_client::KeysClient;
use tally_proto::tally::v1::models_client::ModelsClient;
use tally_proto::tally::v1::{
    AddLearnerRequest, CreateEphemeralKeyRequest, CreateKeyRequest, DeleteKeyRequest,
    GetKeyRequest, GetStatusRequest, Label, ListKeysRequest, ListModelsRequest,
    ListSubscriptionsRequest, PromoteRequest, RotateKeyRequest, SetKeyEnabledRequest,
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

/// Bytes a child wrote to one of its pipes, read by a thread until end of file.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<Vec<u8>>>);

impl Output {
    fn drain(&self, mut pipe: impl Read + Send + 'static) -> JoinHandle<()> {
        let out = self.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64 * 1024];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => out.0.lock().unwrap().extend_from_slice(&buf[..n]),
                }
            }
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A running `tallyd`, killed if dropped before [`Tallyd::stop`].
struct Tallyd {
    child: Child,
    stdout: Output,
    stderr: Output,
    readers: Vec<JoinHandle<()>>,
    grpc: SocketAddr,
    http: SocketAddr,
    raft: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Tallyd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `name=addr` (text) or `"name":"addr"` (JSON) in a log line.
fn field_addr(line: &str, name: &str) -> Option<SocketAddr> {
    for (i, _) in line.match_indices(name) {
        let rest = line[i + name.len()..].trim_start_matches(['"', '=', ':', ' ']);
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
            .unwrap_or(rest.len());
        if let Ok(addr) = rest[..end].parse() {
            return Some(addr);
        }
    }
    None
}

impl Tallyd {
    /// Starts a one-node `tallyd` and waits until it is ready.
    async fn start(format: Format) -> Tallyd {
        let server = Tallyd::spawn(format, 1).await;
        server.wait_ready().await;
        server
    }

    /// Starts `tallyd` as node `node_id` (node 1 bootstraps a one-node cluster; the others
    /// wait to be added) on ports of the OS's choosing: each listener on port 0, the addresses
    /// read from its "tallyd serving" line.
    async fn spawn(format: Format, node_id: u64) -> Tallyd {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens.yaml");
        let digest = hex(&sha256(READER));
        std::fs::write(
            &tokens,
            format!("- {{ name: dashboard, role: read-only, token_sha256: {digest} }}\n"),
        )
        .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_tallyd"));
        // Nothing from the environment this test runs in may change the server's flags.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("TALLY_") {
                command.env_remove(name);
            }
        }
        command
            .args(["--grpc-listen", "127.0.0.1:0"])
            .args(["--http-listen", "127.0.0.1:0"])
            .args(["--raft-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path().join("node-1"))
            .args(["--limits-poll-ms", "0"])
            .args(["--node-id", &node_id.to_string()])
            .args(["--log", "trace"])
            .args(["--log-format", format.flag()])
            .arg("--auth-tokens")
            .arg(&tokens)
            .env("TALLY_ADMIN_TOKEN", ADMIN)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if node_id != 1 {
            command.arg("--no-bootstrap");
        }
        let mut child = command.spawn().expect("tallyd starts");
        let (stdout, stderr) = (Output::default(), Output::default());
        let readers = vec![
            stdout.drain(child.stdout.take().unwrap()),
            stderr.drain(child.stderr.take().unwrap()),
        ];
        let started = Instant::now();
        let (grpc, http, raft) = loop {
            let text = stdout.text();
            if let Some(line) = text.lines().find(|l| l.contains("tallyd serving")) {
                let line = strip_ansi(line);
                let addr = |name| field_addr(&line, name);
                match (addr("grpc"), addr("http"), addr("raft")) {
                    (Some(g), Some(h), Some(r)) => break (g, h, r),
                    _ => panic!("no addresses in {line:?}"),
                }
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "tallyd exited with {status}:\n{}\n{}",
                    stderr.text(),
                    tail(&text)
                );
            }
            assert!(
                started.elapsed() < WAIT,
                "tallyd serving within {WAIT:?}:\n{}",
                stderr.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Tallyd {
            child,
            stdout,
            stderr,
            readers,
            grpc,
            http,
            raft,
            _dir: dir,
        }
    }

    /// Polls `GET /readyz` until it answers 200.
    async fn wait_ready(&self) {
        let started = Instant::now();
        let http = self.http;
        loop {
            let ready = tokio::task::spawn_blocking(move || readyz(http))
                .await
                .unwrap();
            if ready {
                return;
            }
            assert!(
                started.elapsed() < WAIT,
                "tallyd ready within {WAIT:?}:\n{}",
                self.stderr.text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the server as an operator does (SIGTERM: graceful, and it must exit 0), within
    /// [`WAIT`]; everything it wrote, stdout then stderr, without ANSI escapes.
    async fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "SIGTERM sent to {pid}");
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > WAIT {
                let _ = self.child.kill();
                panic!("tallyd did not stop within {WAIT:?} of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // The pipes are closed: the readers reach end of file.
        for reader in std::mem::take(&mut self.readers) {
            reader.join().unwrap();
        }
        let all = strip_ansi(&format!("{}\n{}", self.stdout.text(), self.stderr.text()));
        assert!(
            status.success(),
            "tallyd stopped cleanly ({status}):\n{}",
            tail(&all)
        );
        all
    }
}

fn readyz(http: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&http, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: tally\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
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

fn tail(text: &str) -> &str {
    let start = text.len().saturating_sub(4000);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    &text[start..]
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
    let mut clients = Clients::new(server.grpc).await;
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
    let leader = Tallyd::start(format).await;
    let followers = [
        Tallyd::spawn(format, 2).await,
        Tallyd::spawn(format, 3).await,
    ];
    let channel = Channel::from_shared(format!("http://{}", leader.raft))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(WAIT)
        .connect()
        .await
        .expect("connects");
    let mut cluster = ClusterClient::new(channel);
    for (id, node) in (2u64..).zip(&followers) {
        let addr = node.raft.to_string();
        cluster
            .add_learner(admin(AddLearnerRequest { id, addr }))
            .await
            .unwrap_or_else(|s| panic!("add learner {id}: {s:?}"));
        cluster
            .promote(admin(PromoteRequest { id }))
            .await
            .unwrap_or_else(|s| panic!("promote {id}: {s:?}"));
        node.wait_ready().await;
    }
    drop(cluster);
    let mut clients = Clients::new(followers[0].grpc).await;
    let mut needles = Needles::default();
    tokio::time::timeout(WAIT, a_key_lives_its_whole_life(&mut clients, &mut needles))
        .await
        .expect("a key's life within the time allowed");
    drop(clients);
    let [first, second] = followers;
    let logs = [second.stop().await, first.stop().await, leader.stop().await];
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
