//! The admin API token on the client side: `--token` / `TALLY_TOKEN` and
//! [`TallyClient::with_token`] send `authorization: Bearer <token>`; `tally auth hash-token`
//! and `tally auth new-token` make the entries of a `tallyd --auth-tokens` file. Against a
//! fake `tally.v1.Admin` that records the metadata it gets, and against a real server with
//! tokens configured.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tally_client::proto::tally::v1::admin_server::{Admin, AdminServer};
use tally_client::proto::tally::v1::{
    GetStatusRequest, GetStatusResponse, ListLimitsRequest, ListLimitsResponse,
};
use tally_client::{ClientError, TallyClient, token_sha256};
use tonic::{Request, Response, Status};

/// Records the `authorization` metadata of every call.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Option<String>>>>,
}

impl Recorder {
    fn record<T>(&self, request: &Request<T>) {
        let value = request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string());
        self.seen.lock().unwrap().push(value);
    }

    fn last(&self) -> Option<String> {
        self.seen.lock().unwrap().last().cloned().flatten()
    }
}

#[tonic::async_trait]
impl Admin for Recorder {
    async fn get_status(
        &self,
        request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        self.record(&request);
        Ok(Response::new(GetStatusResponse::default()))
    }

    async fn list_limits(
        &self,
        request: Request<ListLimitsRequest>,
    ) -> Result<Response<ListLimitsResponse>, Status> {
        self.record(&request);
        Ok(Response::new(ListLimitsResponse::default()))
    }
}

async fn start() -> (SocketAddr, Recorder) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let recorder = Recorder::default();
    let router =
        tonic::transport::Server::builder().add_service(AdminServer::new(recorder.clone()));
    tokio::spawn(async move {
        router
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (addr, recorder)
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `tally ARGS...` with the given environment and standard input, at most 30 s.
async fn tally(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    command
        .args(args)
        .env_remove("TALLY_ADDR")
        .env_remove("TALLY_TIMEOUT")
        .env_remove("TALLY_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let stdin = stdin.map(str::to_string);
    let run = tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().expect("tally runs");
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    });
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("tally finishes within 30 s")
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_flag_and_variable_are_sent_as_the_bearer() {
    let (addr, recorder) = start().await;
    let addr = addr.to_string();

    let run = tally(&["--addr", &addr, "status"], &[], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(recorder.last(), None, "no token, no authorization");

    let run = tally(
        &["--addr", &addr, "--token", "tok-from-flag", "status"],
        &[],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(recorder.last().as_deref(), Some("Bearer tok-from-flag"));

    // The flag is global: it may follow the subcommand too.
    let run = tally(
        &["--addr", &addr, "limits", "--token", "tok-after"],
        &[],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(recorder.last().as_deref(), Some("Bearer tok-after"));

    let run = tally(
        &["--addr", &addr, "status"],
        &[("TALLY_TOKEN", "tok-from-env")],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(recorder.last().as_deref(), Some("Bearer tok-from-env"));

    // The help names the variable but never shows its value.
    let run = tally(&["--help"], &[("TALLY_TOKEN", "tok-secret-help")], None).await;
    assert!(run.stdout.contains("TALLY_TOKEN"), "{}", run.stdout);
    assert!(!run.stdout.contains("tok-secret-help"), "{}", run.stdout);

    // A token that cannot be sent is refused before connecting, without echoing it.
    let run = tally(
        &["--addr", &addr, "--token", "has space", "status"],
        &[],
        None,
    )
    .await;
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("invalid token"), "{}", run.stderr);
    assert!(!run.stderr.contains("has space"), "{}", run.stderr);
}

#[tokio::test]
async fn the_library_sends_the_token_with_every_call() {
    let (addr, recorder) = start().await;
    let client = TallyClient::connect(&addr.to_string())
        .await
        .unwrap()
        .with_token(" lib-token \n")
        .unwrap();
    client.status().await.unwrap();
    client.list_limits(None).await.unwrap();
    let seen = recorder.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            Some("Bearer lib-token".to_string()),
            Some("Bearer lib-token".to_string())
        ]
    );
    // Debug output never shows it.
    assert!(!format!("{client:?}").contains("lib-token"));
    assert!(matches!(
        TallyClient::connect(&addr.to_string())
            .await
            .unwrap()
            .with_token(""),
        Err(ClientError::InvalidInput { .. })
    ));
}

#[tokio::test]
async fn hash_token_and_new_token_make_tokens_file_entries() {
    // SHA-256("abc"); the trailing newline of `echo` is not part of the token.
    let run = tally(&["auth", "hash-token"], &[], Some("abc\n")).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        run.stdout,
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
    );
    let run = tally(&["auth", "hash-token"], &[], Some("")).await;
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("no token"), "{}", run.stderr);

    let run = tally(&["auth", "new-token", "--json"], &[], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    let token = v["token"].as_str().unwrap();
    assert!(
        token.starts_with("tally_") && token.len() == 6 + 64,
        "{token}"
    );
    assert_eq!(v["token_sha256"], token_sha256(token));
    let again = tally(&["auth", "new-token"], &[], None).await;
    let lines: Vec<&str> = again.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", again.stdout);
    let token2 = lines[0].strip_prefix("token: ").unwrap();
    assert_ne!(token2, token, "fresh each time");
    assert_eq!(
        lines[1].strip_prefix("token_sha256: ").unwrap(),
        token_sha256(token2)
    );
    // hash-token agrees with new-token.
    let run = tally(&["auth", "hash-token"], &[], Some(token2)).await;
    assert_eq!(run.stdout.trim(), token_sha256(token2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_server_with_tokens_admits_the_cli_with_its_token() {
    use tally_server::api::auth::{AuthConfig, Role};
    use tally_server::server::{self, LimitsSource, ServerConfig};
    let token = tally_client::new_token().unwrap();
    let auth = AuthConfig::default()
        .with_token("cli", Role::ReadOnly, &token)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        limits: LimitsSource::Inline {
            origin: "test".into(),
            text: "domains:\n  - domain: d\n    limits:\n      - { name: l, capacity: 1, window: 1m }\n".into(),
        },
        data_dir: dir.path().join("node-1"),
        auth,
        ..ServerConfig::default()
    };
    let server = server::spawn(config).await.unwrap();
    server.wait_ready(Duration::from_secs(10)).await.unwrap();
    let addr = server.grpc_addr.to_string();

    let run = tally(&["--addr", &addr, "status"], &[], None).await;
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("Unauthenticated"), "{}", run.stderr);
    let run = tally(
        &["--addr", &addr, "status"],
        &[("TALLY_TOKEN", &token)],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    // Read-only may not set prices: the answer names the role needed.
    let dir2 = tempfile::tempdir().unwrap();
    let prices = dir2.path().join("p.json");
    std::fs::write(
        &prices,
        r#"[{"model": "m", "input_nusd": 1, "cached_input_nusd": 1, "output_nusd": 1}]"#,
    )
    .unwrap();
    let run = tally(
        &[
            "--addr",
            &addr,
            "prices",
            "set",
            "--file",
            prices.to_str().unwrap(),
        ],
        &[("TALLY_TOKEN", &token)],
        None,
    )
    .await;
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("PermissionDenied") && run.stderr.contains("needs role admin"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains(&token));
    server.stop().await.unwrap();
}

/// `tally ... | head`: output into a pipe whose reader has gone ends the process quietly
/// (SIGPIPE's default), not with a panic about a broken pipe.
#[test]
fn a_closed_pipe_ends_tally_quietly() {
    for _ in 0..3 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["auth", "new-token"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before tally writes (it is still starting).
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!stderr.contains("Broken pipe"), "{stderr}");
    }
}
