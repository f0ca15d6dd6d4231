//! An OpenAI-compatible mock upstream for the end-to-end tests (issue #8): Envoy proxies to it.
//!
//! Started in-process on `127.0.0.1:0` by [`MockOpenAi::start`]; answers
//!
//! - `POST /v1/chat/completions` (OpenAI's body: `model`, `messages`, optional `stream`,
//!   `stream_options.include_usage`, `max_tokens`) with a JSON `chat.completion`, or with
//!   `stream: true` a real, chunked `text/event-stream` of `chat.completion.chunk` events, a
//!   usage chunk (`choices: []`) and `data: [DONE]`;
//! - `GET /v1/models` with a small model list, `GET /healthz` with `200 ok`;
//! - anything else with `404` and OpenAI's error JSON.
//!
//! **Unlike OpenAI, a stream always ends with the usage chunk**, with or without
//! `stream_options: {include_usage: true}`: the gateway configuration meters tokens from it, and
//! a test that forgets the option should not silently meter nothing. (Whether the client asked
//! is recorded in [`Served::include_usage`].) `max_tokens` is recorded, not obeyed: the counts
//! are the configured ones.
//!
//! The token counts of a reply are the mock's configuration ([`MockOpenAi::set_tokens`],
//! changeable at any time), overridden per request by the headers `x-mock-prompt-tokens` and
//! `x-mock-completion-tokens`. Timing: `x-mock-delay-ms` before the first byte (headers
//! included), and for streams `x-mock-chunk-delay-ms` between consecutive events and
//! `x-mock-chunks` content chunks (default 3). `x-mock-status: 4xx|5xx` answers that status with
//! OpenAI's error JSON instead (after the delay). A malformed control header or body is a `400`.
//!
//! Every request is recorded ([`Served`]: method, path, model, streamed or not, the request
//! headers as received — Envoy's `x-tally-*` among them —, the status, the usage it reported,
//! and how it ended, [`Ending::ClientGone`] when the client went away before the end of the
//! response). Bounds: request bodies up to [`MAX_BODY`] (`413` above), the last [`MAX_RECORDS`]
//! records kept, delays up to [`MAX_DELAY_MS`], at most [`MAX_CHUNKS`] chunks.
//!
//! HTTP/1.1 only (the server crate builds axum with `http1` alone): Envoy's default for a
//! cluster.
//!
//! [`client`] is a small raw HTTP/1.1 client (no HTTP client crate in the test dependencies) that
//! reads chunked bodies piece by piece, for SSE and for dropping a connection mid-stream.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Sleep;
use tokio_stream::{Stream, StreamExt};

/// Largest request body accepted (`413` above).
pub const MAX_BODY: usize = 1 << 20;
/// A larger body is read and thrown away up to this, then the connection is closed.
pub const MAX_DRAIN: usize = 16 << 20;
/// Records kept; the oldest are dropped beyond.
pub const MAX_RECORDS: usize = 10_000;
/// Largest `x-mock-delay-ms` / `x-mock-chunk-delay-ms`.
pub const MAX_DELAY_MS: u64 = 60_000;
/// Largest `x-mock-chunks`.
pub const MAX_CHUNKS: u64 = 10_000;
/// Models `GET /v1/models` lists (any model name is accepted by chat completions).
pub const MODELS: &[&str] = &["gpt-4o-mini", "gpt-4o", "mock-small"];

/// Request headers that control one reply.
pub const H_PROMPT_TOKENS: &str = "x-mock-prompt-tokens";
pub const H_COMPLETION_TOKENS: &str = "x-mock-completion-tokens";
pub const H_DELAY_MS: &str = "x-mock-delay-ms";
pub const H_CHUNK_DELAY_MS: &str = "x-mock-chunk-delay-ms";
pub const H_CHUNKS: &str = "x-mock-chunks";
pub const H_STATUS: &str = "x-mock-status";

/// The defaults of every reply; request headers override them one by one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MockConfig {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Before the first byte of a chat completion.
    pub delay_ms: u64,
    /// Between consecutive events of a stream.
    pub chunk_delay_ms: u64,
    /// Content chunks of a stream.
    pub chunks: u64,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            prompt_tokens: 10,
            completion_tokens: 20,
            delay_ms: 0,
            chunk_delay_ms: 0,
            chunks: 3,
        }
    }
}

/// Token counts a reply reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// How a recorded request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Still being answered (in its delay, or streaming).
    InProgress,
    /// The whole response was handed to the connection.
    Complete,
    /// The client went away first (during the delay or mid-stream).
    ClientGone,
}

/// One request the mock served.
#[derive(Clone, Debug)]
pub struct Served {
    /// 0, 1, 2, … in arrival order, over the mock's whole life.
    pub seq: u64,
    pub method: String,
    /// The path, without the query.
    pub path: String,
    pub query: Option<String>,
    /// The request headers as received, names lowercase, in order (values lossy UTF-8).
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
    /// The body's `model`, for chat completions with a valid body.
    pub model: Option<String>,
    /// `stream: true` was asked for (and, when `status` is 200, served).
    pub stream: bool,
    /// `stream_options.include_usage` was `true`.
    pub include_usage: bool,
    pub max_tokens: Option<u64>,
    pub status: u16,
    /// The usage the reply reported (chat completions answered 200).
    pub usage: Option<Usage>,
    /// Stream events handed to the connection (content chunks, the usage chunk, `[DONE]`).
    pub events_sent: usize,
    pub ending: Ending,
    pub received_at: Instant,
}

impl Served {
    /// The first value of a request header (`name` case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a request header, in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The request headers whose names start with `prefix` (e.g. `"x-tally-"`).
    pub fn headers_with_prefix(&self, prefix: &str) -> Vec<(&str, &str)> {
        let prefix = prefix.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    pub fn disconnected(&self) -> bool {
        self.ending == Ending::ClientGone
    }

    pub fn is_chat(&self) -> bool {
        self.method == "POST" && self.path == "/v1/chat/completions"
    }
}

struct Log {
    records: VecDeque<Served>,
    next_seq: u64,
}

struct Shared {
    config: Mutex<MockConfig>,
    log: Mutex<Log>,
    next_id: AtomicU64,
}

impl Shared {
    fn record(self: &Arc<Self>, mut served: Served) -> Recorder {
        let mut log = self.log.lock();
        let seq = log.next_seq;
        log.next_seq += 1;
        served.seq = seq;
        if log.records.len() >= MAX_RECORDS {
            log.records.pop_front();
        }
        log.records.push_back(served);
        Recorder {
            shared: self.clone(),
            seq,
            events_sent: 0,
            finished: false,
        }
    }
}

/// Keeps a record's ending up to date: dropped before [`Recorder::finish`], the client went
/// away (hyper drops the handler's future, or the response body, when the connection closes).
struct Recorder {
    shared: Arc<Shared>,
    seq: u64,
    events_sent: usize,
    finished: bool,
}

impl Recorder {
    fn set_ending(&self, ending: Ending) {
        let mut log = self.shared.log.lock();
        let Some(front) = log.records.front().map(|r| r.seq) else {
            return;
        };
        if self.seq < front {
            return; // dropped from the log
        }
        if let Some(r) = log.records.get_mut((self.seq - front) as usize) {
            r.ending = ending;
            r.events_sent = self.events_sent;
        }
    }

    fn finish(mut self) {
        self.finished = true;
        self.set_ending(Ending::Complete);
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if !self.finished {
            self.set_ending(Ending::ClientGone);
        }
    }
}

/// The running mock. Stops on [`MockOpenAi::stop`] (graceful) or when dropped.
pub struct MockOpenAi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl MockOpenAi {
    /// Serves on `127.0.0.1:0` with [`MockConfig::default`] (10 prompt + 20 completion tokens).
    pub async fn start() -> MockOpenAi {
        Self::start_with(MockConfig::default()).await
    }

    pub async fn start_with(config: MockConfig) -> MockOpenAi {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("mock binds 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            config: Mutex::new(config),
            log: Mutex::new(Log {
                records: VecDeque::new(),
                next_seq: 0,
            }),
            next_id: AtomicU64::new(1),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        MockOpenAi {
            addr,
            shared,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The token counts of the following replies (total = sum).
    pub fn set_tokens(&self, prompt: u64, completion: u64) {
        let mut c = self.shared.config.lock();
        c.prompt_tokens = prompt;
        c.completion_tokens = completion;
    }

    /// The default delays of the following replies (first byte; between stream events).
    pub fn set_delays(&self, first_byte: Duration, between_chunks: Duration) {
        let mut c = self.shared.config.lock();
        c.delay_ms = (first_byte.as_millis() as u64).min(MAX_DELAY_MS);
        c.chunk_delay_ms = (between_chunks.as_millis() as u64).min(MAX_DELAY_MS);
    }

    /// The default number of content chunks of the following streams.
    pub fn set_chunks(&self, chunks: u64) {
        self.shared.config.lock().chunks = chunks.min(MAX_CHUNKS);
    }

    pub fn set_config(&self, config: MockConfig) {
        *self.shared.config.lock() = config;
    }

    pub fn config(&self) -> MockConfig {
        self.shared.config.lock().clone()
    }

    /// The kept records (the last [`MAX_RECORDS`]), oldest first.
    pub fn requests(&self) -> Vec<Served> {
        self.shared.log.lock().records.iter().cloned().collect()
    }

    /// The kept records of `POST /v1/chat/completions`.
    pub fn chat_requests(&self) -> Vec<Served> {
        self.requests()
            .into_iter()
            .filter(Served::is_chat)
            .collect()
    }

    pub fn last(&self) -> Option<Served> {
        self.shared.log.lock().records.back().cloned()
    }

    /// Requests served over the mock's whole life (records dropped or cleared included).
    pub fn count(&self) -> u64 {
        self.shared.log.lock().next_seq
    }

    /// Forgets the records (`count` keeps counting).
    pub fn clear(&self) {
        self.shared.log.lock().records.clear();
    }

    /// Waits until `done(records)` holds and returns the records; panics after `limit`, showing
    /// them. Endings are recorded asynchronously (when the server notices the client left), so
    /// assert them through this.
    pub async fn wait_until(
        &self,
        limit: Duration,
        mut done: impl FnMut(&[Served]) -> bool,
    ) -> Vec<Served> {
        let deadline = Instant::now() + limit;
        loop {
            let records = self.requests();
            if done(&records) {
                return records;
            }
            assert!(
                Instant::now() < deadline,
                "mock upstream: condition not met within {limit:?}; records: {records:#?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops accepting, lets the requests in flight finish (at most 10 s), then stops.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(Duration::from_secs(10), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

impl Drop for MockOpenAi {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// OpenAI's error shape.
fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    json_response(
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": null}}),
    )
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// A numeric control header: `Ok(None)` when absent, `Err` when malformed or above `max`.
fn control(headers: &HeaderMap, name: &str, max: u64) -> Result<Option<u64>, String> {
    let Some(v) = headers.get(name) else {
        return Ok(None);
    };
    let n = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or_else(|| format!("{name}: not a number: {v:?}"))?;
    if n > max {
        return Err(format!("{name}: {n} is above {max}"));
    }
    Ok(Some(n))
}

/// What one chat completion is to be.
struct Plan {
    usage: Usage,
    delay: Duration,
    chunk_delay: Duration,
    chunks: u64,
    status: Option<StatusCode>,
}

fn plan(config: &MockConfig, headers: &HeaderMap) -> Result<Plan, String> {
    let prompt = control(headers, H_PROMPT_TOKENS, u64::MAX)?.unwrap_or(config.prompt_tokens);
    let completion =
        control(headers, H_COMPLETION_TOKENS, u64::MAX)?.unwrap_or(config.completion_tokens);
    let total = prompt
        .checked_add(completion)
        .ok_or("token counts overflow")?;
    let delay = control(headers, H_DELAY_MS, MAX_DELAY_MS)?.unwrap_or(config.delay_ms);
    let chunk_delay =
        control(headers, H_CHUNK_DELAY_MS, MAX_DELAY_MS)?.unwrap_or(config.chunk_delay_ms);
    let chunks = control(headers, H_CHUNKS, MAX_CHUNKS)?.unwrap_or(config.chunks);
    let status = match control(headers, H_STATUS, 599)? {
        None => None,
        Some(s) if s >= 400 => Some(StatusCode::from_u16(s as u16).map_err(|e| e.to_string())?),
        Some(s) => return Err(format!("{H_STATUS}: {s} is not an error status")),
    };
    Ok(Plan {
        usage: Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: total,
        },
        delay: Duration::from_millis(delay),
        chunk_delay: Duration::from_millis(chunk_delay),
        chunks,
        status,
    })
}

/// The fields of a chat completion body the mock reads.
struct ChatBody {
    model: String,
    stream: bool,
    include_usage: bool,
    max_tokens: Option<u64>,
}

fn parse_chat(body: &[u8]) -> Result<ChatBody, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    let model = v
        .get("model")
        .and_then(Value::as_str)
        .ok_or("you must provide a model parameter")?
        .to_owned();
    if !v.get("messages").is_some_and(Value::is_array) {
        return Err("'messages' is a required property and must be an array".into());
    }
    let stream = match v.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("'stream' must be a boolean".into()),
    };
    let include_usage = v
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let max_tokens = match v.get("max_tokens") {
        None | Some(Value::Null) => None,
        Some(m) => Some(
            m.as_u64()
                .ok_or("'max_tokens' must be a non-negative integer")?,
        ),
    };
    Ok(ChatBody {
        model,
        stream,
        include_usage,
        max_tokens,
    })
}

/// Reads the body, keeping up to [`MAX_BODY`]: `Ok(None)` when it is larger. A larger body is
/// still read (and thrown away) up to [`MAX_DRAIN`], so the client gets to read the `413`
/// rather than a reset of a connection closed with its bytes unread.
async fn read_body(body: Body) -> Result<Option<Vec<u8>>, axum::Error> {
    let mut data = body.into_data_stream();
    let mut out = Vec::new();
    let mut seen = 0usize;
    while let Some(piece) = data.next().await {
        let piece = piece?;
        seen = seen.saturating_add(piece.len());
        if seen > MAX_DRAIN {
            return Ok(None);
        }
        if seen <= MAX_BODY {
            out.extend_from_slice(&piece);
        }
    }
    Ok((seen <= MAX_BODY).then_some(out))
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let method = parts.method.clone();
    let path = parts.uri.path().to_owned();
    let mut served = Served {
        seq: 0,
        method: method.as_str().to_owned(),
        path: path.clone(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body_len: 0,
        model: None,
        stream: false,
        include_usage: false,
        max_tokens: None,
        status: 0,
        usage: None,
        events_sent: 0,
        ending: Ending::InProgress,
        received_at: Instant::now(),
    };
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            &format!("request body above {MAX_BODY} bytes"),
        )
    };
    let declared_too_large = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_DRAIN as u64);
    let body = if declared_too_large {
        None
    } else {
        match read_body(body).await {
            Ok(b) => b,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    &format!("reading the body: {e}"),
                );
            }
        }
    };
    let Some(body) = body else {
        served.status = 413;
        shared.record(served).finish();
        return too_large();
    };
    served.body_len = body.len();

    let finish = |mut served: Served, response: Response| {
        served.status = response.status().as_u16();
        shared.record(served).finish();
        response
    };
    match (&method, path.as_str()) {
        (&Method::POST, "/v1/chat/completions") => {}
        (&Method::GET, "/v1/models") => {
            let created = now_secs();
            let data: Vec<Value> = MODELS
                .iter()
                .map(|id| json!({"id": id, "object": "model", "created": created, "owned_by": "tally-mock"}))
                .collect();
            return finish(
                served,
                json_response(StatusCode::OK, &json!({"object": "list", "data": data})),
            );
        }
        (&Method::GET, "/healthz") => {
            let r = Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "text/plain")
                .body(Body::from("ok"))
                .unwrap();
            return finish(served, r);
        }
        _ => {
            let r = error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                &format!("Invalid URL ({method} {path})"),
            );
            return finish(served, r);
        }
    }

    let chat = match parse_chat(&body) {
        Ok(c) => c,
        Err(e) => {
            return finish(
                served,
                error(StatusCode::BAD_REQUEST, "invalid_request_error", &e),
            );
        }
    };
    served.model = Some(chat.model.clone());
    served.stream = chat.stream;
    served.include_usage = chat.include_usage;
    served.max_tokens = chat.max_tokens;
    let config = shared.config.lock().clone();
    let plan = match plan(&config, &parts.headers) {
        Ok(p) => p,
        Err(e) => {
            return finish(
                served,
                error(StatusCode::BAD_REQUEST, "invalid_request_error", &e),
            );
        }
    };
    served.status = plan.status.unwrap_or(StatusCode::OK).as_u16();
    if plan.status.is_none() {
        served.usage = Some(plan.usage);
    }
    let recorder = shared.record(served);
    if !plan.delay.is_zero() {
        tokio::time::sleep(plan.delay).await;
    }
    if let Some(status) = plan.status {
        recorder.finish();
        let kind = if status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        return error(
            status,
            kind,
            &format!("mock error {} (x-mock-status)", status.as_u16()),
        );
    }
    let id = format!(
        "chatcmpl-mock{}",
        shared.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let created = now_secs();
    let usage = json!({
        "prompt_tokens": plan.usage.prompt_tokens,
        "completion_tokens": plan.usage.completion_tokens,
        "total_tokens": plan.usage.total_tokens,
    });
    if !chat.stream {
        let body = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": chat.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "This is a reply from the mock upstream."},
                "finish_reason": "stop",
            }],
            "usage": usage,
        });
        recorder.finish();
        return json_response(StatusCode::OK, &body);
    }

    let mut events = VecDeque::with_capacity(plan.chunks as usize + 2);
    for i in 0..plan.chunks {
        let mut delta = json!({"content": format!("chunk {i}. ")});
        if i == 0 {
            delta["role"] = json!("assistant");
        }
        let finish_reason = if i + 1 == plan.chunks {
            json!("stop")
        } else {
            Value::Null
        };
        let chunk = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": chat.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        });
        events.push_back(Bytes::from(format!("data: {chunk}\n\n")));
    }
    let last = json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": chat.model,
        "choices": [],
        "usage": usage,
    });
    events.push_back(Bytes::from(format!("data: {last}\n\n")));
    events.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
    let sse = SseBody {
        events,
        chunk_delay: plan.chunk_delay,
        sleep: None,
        recorder: Some(recorder),
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(sse))
        .unwrap()
}

/// A stream's events, one body frame (one HTTP chunk) each, `chunk_delay` apart. Dropped
/// before its end (the connection closed), it records the client gone.
struct SseBody {
    events: VecDeque<Bytes>,
    chunk_delay: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    recorder: Option<Recorder>,
}

impl Stream for SseBody {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(sleep) = this.sleep.as_mut() {
            ready!(sleep.as_mut().poll(cx));
            this.sleep = None;
        }
        let Some(event) = this.events.pop_front() else {
            if let Some(r) = this.recorder.take() {
                r.finish();
            }
            return Poll::Ready(None);
        };
        if let Some(r) = this.recorder.as_mut() {
            r.events_sent += 1;
        }
        if !this.events.is_empty() && !this.chunk_delay.is_zero() {
            this.sleep = Some(Box::pin(tokio::time::sleep(this.chunk_delay)));
        }
        Poll::Ready(Some(Ok(event)))
    }
}
