//! Typed async client for Tally, and the pieces the `tally` command-line tool is built from.
//!
//! # Layout
//! - [`TallyClient`]: one `tonic` [`Channel`] to a Tally node, with typed methods for Envoy's
//!   `ShouldRateLimit` ([`TallyClient::should_rate_limit`]), Limitador's `CheckRateLimit` and
//!   `Report` ([`TallyClient::kuadrant_check`], [`TallyClient::kuadrant_report`]) and the
//!   `tally.v1.Admin` service ([`TallyClient::status`], [`TallyClient::list_limits`]).
//!   Connecting waits at most [`CONNECT_TIMEOUT`]; every call waits at most the client's
//!   per-call timeout ([`DEFAULT_TIMEOUT`] unless changed with [`TallyClient::with_timeout`]).
//! - [`parse_descriptor`] and [`descriptor`]: build Envoy `RateLimitDescriptor`s from the
//!   command-line syntax or from pairs.
//! - [`render_response`], [`response_json`], [`render_status`], [`render_limits`]: turn answers
//!   into text for people or JSON for scripts.
//! - [`ClientError`]: everything that can go wrong, with messages fit to show a user.
//! - [`proto`]: the generated protobuf types (a re-export of `tally-proto`).
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), tally_client::ClientError> {
//! use tally_client::{TallyClient, parse_descriptor, render_response};
//!
//! let client = TallyClient::connect("127.0.0.1:8081").await?;
//! let descriptors = vec![parse_descriptor("api_key=k1,model=gpt-4o")?];
//! let response = client.should_rate_limit("ai-gateway", descriptors, 1).await?;
//! print!("{}", render_response(&response));
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

use std::error::Error as StdError;
use std::fmt::Write as _;
use std::future::Future;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

pub use tally_proto as proto;

use tally_proto::envoy::config::core::v3::HeaderValue;
use tally_proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use tally_proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use tally_proto::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use tally_proto::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, Quota,
};
use tally_proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tally_proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tally_proto::envoy::r#type::v3::RateLimitUnit;
use tally_proto::kuadrant::service::ratelimit::v1::rate_limit_service_client::RateLimitServiceClient as KuadrantClient;
use tally_proto::tally::v1::admin_client::AdminClient;
use tally_proto::tally::v1::cluster_client::ClusterClient;
use tally_proto::tally::v1::{
    AddLearnerRequest, ClusterStatus, ClusterStatusRequest, GetStatusRequest, GetStatusResponse,
    InitRequest, ListLimitsRequest, ListLimitsResponse, Member, PromoteRequest, RemoveRequest,
};

/// How long [`TallyClient::connect`] waits for the connection to be established.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The per-call timeout of a new [`TallyClient`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything the client can fail with. The `Display` text is complete (it includes the
/// underlying causes), so it can be shown to a user as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The address could not be parsed or the connection could not be established.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The address as given (before `http://` was added).
        addr: String,
        /// What went wrong, with its causes.
        reason: String,
    },
    /// A descriptor string did not follow the syntax of [`parse_descriptor`].
    #[error("invalid descriptor `{input}`: {reason}")]
    InvalidDescriptor {
        /// The descriptor string as given.
        input: String,
        /// What is wrong and where.
        reason: String,
    },
    /// The server (or the transport under it) answered with a gRPC error status.
    #[error("server answered {code:?}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Status {
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message, with the transport's causes when there are any.
        message: String,
    },
    /// No answer arrived within the per-call timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        let mut message = status.message().to_string();
        if let Some(source) = status.source() {
            let causes = error_chain(source);
            if !causes.is_empty() && !message.contains(&causes) {
                if !message.is_empty() {
                    message.push_str(": ");
                }
                message.push_str(&causes);
            }
        }
        ClientError::Status {
            code: status.code(),
            message,
        }
    }
}

/// Joins an error and its sources with `": "`, skipping a cause whose text its parent already shows.
fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// A typed client for one Tally node.
///
/// Cheap to clone: clones share the underlying HTTP/2 connection. Every method takes `&self`,
/// so one client can serve many concurrent tasks.
#[derive(Debug, Clone)]
pub struct TallyClient {
    channel: Channel,
    timeout: Duration,
}

impl TallyClient {
    /// Connects to `addr`, given as `host:port` or `http://host:port` (e.g. `127.0.0.1:8081`,
    /// `http://[::1]:8081`). Waits at most [`CONNECT_TIMEOUT`]; calls then use
    /// [`DEFAULT_TIMEOUT`].
    ///
    /// The connection is established eagerly, so an unreachable server is reported here.
    /// `https://` is refused: this build has no TLS.
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        let connect_error = |reason: String| ClientError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let trimmed = addr.trim();
        if trimmed.is_empty() {
            return Err(connect_error("the address is empty".to_string()));
        }
        let uri = if trimmed.contains("://") {
            trimmed.to_string()
        } else {
            format!("http://{trimmed}")
        };
        if !uri.starts_with("http://") {
            return Err(connect_error(
                "only plain `http://` addresses are supported (this build has no TLS)".to_string(),
            ));
        }
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| connect_error(format!("invalid address: {}", error_chain(&e))))?
            .connect_timeout(CONNECT_TIMEOUT);
        let channel = match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => return Err(connect_error(error_chain(&e))),
            Err(_) => {
                return Err(connect_error(format!(
                    "no connection within {CONNECT_TIMEOUT:?}"
                )));
            }
        };
        Ok(Self::from_channel(channel))
    }

    /// Wraps an existing channel (for instance one built with custom `Endpoint` settings).
    /// Calls use [`DEFAULT_TIMEOUT`].
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            channel,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Returns the client with a different per-call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Changes the per-call timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The underlying channel, to build other generated clients on the same connection.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Envoy's `ShouldRateLimit`: admits or refuses the request described by `descriptors`,
    /// debiting the hits when it admits. `hits_addend` is the request-level count (0 means 1);
    /// a descriptor's own `hits_addend` overrides it.
    pub async fn should_rate_limit(
        &self,
        domain: &str,
        descriptors: Vec<RateLimitDescriptor>,
        hits_addend: u32,
    ) -> Result<RateLimitResponse, ClientError> {
        self.should_rate_limit_request(rate_limit_request(domain, descriptors, hits_addend))
            .await
    }

    /// [`should_rate_limit`](Self::should_rate_limit) with a request built by the caller.
    pub async fn should_rate_limit_request(
        &self,
        request: RateLimitRequest,
    ) -> Result<RateLimitResponse, ClientError> {
        let mut client = RateLimitServiceClient::new(self.channel.clone());
        self.call(client.should_rate_limit(self.request(request)))
            .await
    }

    /// Limitador's `CheckRateLimit`: decides as `ShouldRateLimit` would, debiting nothing.
    pub async fn kuadrant_check(
        &self,
        domain: &str,
        descriptors: Vec<RateLimitDescriptor>,
        hits_addend: u32,
    ) -> Result<RateLimitResponse, ClientError> {
        let mut client = KuadrantClient::new(self.channel.clone());
        let request = rate_limit_request(domain, descriptors, hits_addend);
        self.call(client.check_rate_limit(self.request(request)))
            .await
    }

    /// Limitador's `Report`: debits the hits on every matched counter, unconditionally.
    pub async fn kuadrant_report(
        &self,
        domain: &str,
        descriptors: Vec<RateLimitDescriptor>,
        hits_addend: u32,
    ) -> Result<RateLimitResponse, ClientError> {
        let mut client = KuadrantClient::new(self.channel.clone());
        let request = rate_limit_request(domain, descriptors, hits_addend);
        self.call(client.report(self.request(request))).await
    }

    /// `tally.v1.Admin/GetStatus`: engine and limit-set status of the node answering.
    pub async fn status(&self) -> Result<GetStatusResponse, ClientError> {
        let mut client = AdminClient::new(self.channel.clone());
        self.call(client.get_status(self.request(GetStatusRequest {})))
            .await
    }

    /// `tally.v1.Admin/ListLimits`: the limits in force, of one domain or of all.
    pub async fn list_limits(
        &self,
        domain: Option<&str>,
    ) -> Result<ListLimitsResponse, ClientError> {
        let mut client = AdminClient::new(self.channel.clone());
        let request = ListLimitsRequest {
            domain: domain.unwrap_or_default().to_string(),
        };
        self.call(client.list_limits(self.request(request))).await
    }

    /// `tally.v1.Cluster/Status` (ask a node's Raft address): the leader's view.
    pub async fn cluster_status(&self) -> Result<ClusterStatus, ClientError> {
        let mut client = ClusterClient::new(self.channel.clone());
        self.call(client.status(self.request(ClusterStatusRequest {})))
            .await
    }

    /// `tally.v1.Cluster/Init`: make an uninitialized node the first member(s) of a cluster.
    /// `members` of `(id, raft address)`; empty means the answering node alone.
    pub async fn cluster_init(
        &self,
        members: &[(u64, String)],
    ) -> Result<ClusterStatus, ClientError> {
        let mut client = ClusterClient::new(self.channel.clone());
        let members = members
            .iter()
            .map(|(id, addr)| Member {
                id: *id,
                addr: addr.clone(),
                voter: true,
                ..Member::default()
            })
            .collect();
        self.call(client.init(self.request(InitRequest { members })))
            .await
    }

    /// `tally.v1.Cluster/AddLearner`: answers once the learner has caught up.
    pub async fn cluster_add_learner(
        &self,
        id: u64,
        addr: &str,
    ) -> Result<ClusterStatus, ClientError> {
        let mut client = ClusterClient::new(self.channel.clone());
        let request = AddLearnerRequest {
            id,
            addr: addr.to_string(),
        };
        self.call(client.add_learner(self.request(request))).await
    }

    /// `tally.v1.Cluster/Promote`: make a learner a voter.
    pub async fn cluster_promote(&self, id: u64) -> Result<ClusterStatus, ClientError> {
        let mut client = ClusterClient::new(self.channel.clone());
        self.call(client.promote(self.request(PromoteRequest { id })))
            .await
    }

    /// `tally.v1.Cluster/Remove`: remove a voter or learner.
    pub async fn cluster_remove(&self, id: u64) -> Result<ClusterStatus, ClientError> {
        let mut client = ClusterClient::new(self.channel.clone());
        self.call(client.remove(self.request(RemoveRequest { id })))
            .await
    }

    /// Wraps a message in a request carrying the per-call deadline (`grpc-timeout`).
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    /// Awaits a call, enforcing the per-call timeout on this side too.
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, ClientError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            // tonic enforces the `grpc-timeout` it sent too, and may get there first.
            Ok(Err(status))
                if status.code() == tonic::Code::DeadlineExceeded
                    || (status.code() == tonic::Code::Cancelled
                        && status.message().contains("Timeout expired")) =>
            {
                Err(ClientError::Timeout(self.timeout))
            }
            Ok(Err(status)) => Err(status.into()),
            Err(_) => Err(ClientError::Timeout(self.timeout)),
        }
    }
}

fn rate_limit_request(
    domain: &str,
    descriptors: Vec<RateLimitDescriptor>,
    hits_addend: u32,
) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_string(),
        descriptors,
        hits_addend,
    }
}

/// Builds a descriptor from `(key, value)` pairs, with no hits or limit override.
///
/// ```
/// let d = tally_client::descriptor([("api_key", "k1"), ("model", "gpt-4o")]);
/// assert_eq!(d.entries.len(), 2);
/// ```
pub fn descriptor<K: Into<String>, V: Into<String>>(
    entries: impl IntoIterator<Item = (K, V)>,
) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .into_iter()
            .map(|(key, value)| Entry {
                key: key.into(),
                value: value.into(),
            })
            .collect(),
        limit: None,
        hits_addend: None,
    }
}

/// One piece of a descriptor string, between unescaped `,` or `;`.
struct Segment {
    /// The text with escapes resolved.
    text: String,
    /// Byte offset in `text` of the first unescaped `=`.
    eq: Option<usize>,
    /// 1-based character column of the segment's first character in the input.
    column: usize,
    /// Whether the segment follows a `;` (an option) rather than a `,` or the start.
    option: bool,
}

impl Segment {
    fn new(column: usize, option: bool) -> Self {
        Self {
            text: String::new(),
            eq: None,
            column,
            option,
        }
    }
}

fn split_segments(input: &str) -> Vec<Segment> {
    let mut segments = Vec::new();
    let mut current = Segment::new(1, false);
    let mut chars = input.chars().enumerate().peekable();
    while let Some((index, c)) = chars.next() {
        match c {
            '\\' => match chars.peek() {
                Some(&(_, escaped @ (',' | ';' | '=' | '\\'))) => {
                    current.text.push(escaped);
                    chars.next();
                }
                _ => current.text.push('\\'),
            },
            ',' | ';' => {
                let next = Segment::new(index + 2, c == ';');
                segments.push(std::mem::replace(&mut current, next));
            }
            '=' => {
                if current.eq.is_none() {
                    current.eq = Some(current.text.len());
                }
                current.text.push('=');
            }
            _ => current.text.push(c),
        }
    }
    segments.push(current);
    segments
}

/// Parses a descriptor written as `key=value,key=value[;hits=N][;limit=N/UNIT]`.
///
/// - Entries are separated by `,` and keep their order. The first `=` of an entry splits key
///   from value, so values may contain `=`. Keys must not be empty; values may be. Nothing is
///   trimmed: spaces are part of keys and values.
/// - Escapes: `\,` is a literal comma, `\;` a literal semicolon, `\=` a literal `=` (so a key
///   can contain one), `\\` a backslash. Any other backslash is kept as it is.
/// - Options after `;`, each at most once:
///   - `hits=N` sets the descriptor's `hits_addend` (a `UInt64Value`), which overrides the
///     request-level count; `hits=0` means check only, add nothing.
///   - `limit=N/UNIT` sets the descriptor's limit override (`requests_per_unit` = N), UNIT
///     one of `second`, `minute`, `hour`, `day`, `month`, `year`.
///
/// Errors name the entry or option and its 1-based character column.
///
/// ```
/// let d = tally_client::parse_descriptor(r"path=/a\,b,q=x=y;hits=0").unwrap();
/// assert_eq!(d.entries[0].value, "/a,b");
/// assert_eq!(d.entries[1].value, "x=y");
/// assert_eq!(d.hits_addend, Some(0));
/// ```
pub fn parse_descriptor(s: &str) -> Result<RateLimitDescriptor, ClientError> {
    let error = |reason: String| ClientError::InvalidDescriptor {
        input: s.to_string(),
        reason,
    };
    if s.is_empty() {
        return Err(error(
            "it is empty; write key=value[,key=value...]".to_string(),
        ));
    }
    let mut descriptor = RateLimitDescriptor::default();
    let mut in_options = false;
    for segment in split_segments(s) {
        let column = segment.column;
        if segment.option {
            in_options = true;
        } else if in_options {
            return Err(error(format!(
                "an entry at column {column} follows a `;` option; entries come first \
                 (escape a literal comma as `\\,`)"
            )));
        }
        if !in_options {
            let n = descriptor.entries.len() + 1;
            if segment.text.is_empty() {
                return Err(error(format!("entry {n} (column {column}) is empty")));
            }
            let Some(eq) = segment.eq else {
                return Err(error(format!(
                    "entry {n} (column {column}) `{}` has no `=`; write key=value",
                    segment.text
                )));
            };
            if eq == 0 {
                return Err(error(format!(
                    "entry {n} (column {column}) has an empty key"
                )));
            }
            descriptor.entries.push(Entry {
                key: segment.text[..eq].to_string(),
                value: segment.text[eq + 1..].to_string(),
            });
            continue;
        }
        let (name, value) = match segment.eq {
            Some(eq) => (&segment.text[..eq], &segment.text[eq + 1..]),
            None => (segment.text.as_str(), ""),
        };
        match name {
            "hits" => {
                if descriptor.hits_addend.is_some() {
                    return Err(error(format!("`hits` given twice (column {column})")));
                }
                let hits = value.parse::<u64>().map_err(|_| {
                    error(format!(
                        "`hits` (column {column}) must be a whole number \
                         from 0 to {}, not `{value}`",
                        u64::MAX
                    ))
                })?;
                descriptor.hits_addend = Some(hits);
            }
            "limit" => {
                if descriptor.limit.is_some() {
                    return Err(error(format!("`limit` given twice (column {column})")));
                }
                let limit = parse_limit_override(value)
                    .map_err(|why| error(format!("`limit` (column {column}) {why}")))?;
                descriptor.limit = Some(limit);
            }
            "" if segment.text.is_empty() => {
                return Err(error(format!("empty option at column {column}")));
            }
            other => {
                return Err(error(format!(
                    "unknown option `{other}` at column {column} (known: hits=N, limit=N/UNIT); \
                     escape a literal semicolon as `\\;`"
                )));
            }
        }
    }
    Ok(descriptor)
}

fn parse_limit_override(value: &str) -> Result<RateLimitOverride, String> {
    let shape = || format!("must look like N/UNIT (e.g. 10/minute), not `{value}`");
    let (count, unit) = value.split_once('/').ok_or_else(shape)?;
    let requests_per_unit = count.parse::<u32>().map_err(|_| shape())?;
    let unit = match unit.to_ascii_lowercase().as_str() {
        "second" => RateLimitUnit::Second,
        "minute" => RateLimitUnit::Minute,
        "hour" => RateLimitUnit::Hour,
        "day" => RateLimitUnit::Day,
        "month" => RateLimitUnit::Month,
        "year" => RateLimitUnit::Year,
        _ => {
            return Err(format!(
                "has unit `{unit}`; use second, minute, hour, day, month or year"
            ));
        }
    };
    Ok(RateLimitOverride {
        requests_per_unit,
        unit: unit as i32,
    })
}

/// The name of a `Code` value as the proto spells it (`OK`, `OVER_LIMIT`, ...).
pub fn code_name(code: i32) -> String {
    match Code::try_from(code) {
        Ok(code) => code.as_str_name().to_string(),
        Err(_) => format!("CODE({code})"),
    }
}

/// The name of a `RateLimit.Unit` value as the proto spells it (`MINUTE`, ...).
pub fn unit_name(unit: i32) -> String {
    match Unit::try_from(unit) {
        Ok(unit) => unit.as_str_name().to_string(),
        Err(_) => format!("UNIT({unit})"),
    }
}

fn format_duration(d: &prost_types::Duration) -> String {
    let millis = i128::from(d.seconds) * 1000 + i128::from(d.nanos / 1_000_000);
    let sign = if millis < 0 { "-" } else { "" };
    let abs = millis.abs();
    if abs % 1000 == 0 {
        format!("{sign}{}s", abs / 1000)
    } else {
        format!("{sign}{}.{:03}s", abs / 1000, abs % 1000)
    }
}

fn duration_millis(d: &prost_types::Duration) -> i64 {
    let millis = i128::from(d.seconds) * 1000 + i128::from(d.nanos / 1_000_000);
    millis.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

fn header_value(header: &HeaderValue) -> String {
    if header.value.is_empty() && !header.raw_value.is_empty() {
        String::from_utf8_lossy(&header.raw_value).into_owned()
    } else {
        header.value.clone()
    }
}

fn render_quota(quota: &Quota) -> String {
    use tally_proto::envoy::service::ratelimit::v3::rate_limit_response::quota::ExpirationSpecifier;
    let mut out = format!("quota {} requests", quota.requests);
    if !quota.id.is_empty() {
        let _ = write!(out, " (id {})", quota.id);
    }
    if let Some(ExpirationSpecifier::ValidUntil(t)) = &quota.expiration_specifier {
        let _ = write!(out, " valid until unix {}s", t.seconds);
    }
    out
}

fn render_status_line(out: &mut String, index: usize, status: &DescriptorStatus) {
    let _ = write!(out, "descriptor {index}: {}", code_name(status.code));
    match &status.current_limit {
        Some(limit) => {
            out.push_str("  limit ");
            if !limit.name.is_empty() {
                let _ = write!(out, "{:?} ", limit.name);
            }
            let _ = write!(
                out,
                "{}/{}",
                limit.requests_per_unit,
                unit_name(limit.unit).to_ascii_lowercase()
            );
            let _ = write!(out, "  remaining {}", status.limit_remaining);
        }
        None => out.push_str("  no limit"),
    }
    if let Some(reset) = &status.duration_until_reset {
        let _ = write!(out, "  reset in {}", format_duration(reset));
    }
    if let Some(quota) = &status.quota {
        let _ = write!(out, "  {}", render_quota(quota));
    }
    out.push('\n');
}

/// Renders a rate-limit answer for people: the overall code; per descriptor its code, limit
/// (`"name" N/unit`), remaining count, and time to reset; the headers to add; the raw body.
///
/// ```text
/// overall: OVER_LIMIT
/// descriptor 1: OVER_LIMIT  limit "per_key" 5/minute  remaining 0  reset in 42s
/// response headers:
///   x-ratelimit-remaining: 0
/// raw body:
///   {"error":{"type":"rate_limit_error"}}
/// ```
pub fn render_response(response: &RateLimitResponse) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "overall: {}", code_name(response.overall_code));
    for (i, status) in response.statuses.iter().enumerate() {
        render_status_line(&mut out, i + 1, status);
    }
    if let Some(quota) = &response.quota {
        let _ = writeln!(out, "{}", render_quota(quota));
    }
    for (title, headers) in [
        ("response headers", &response.response_headers_to_add),
        ("request headers", &response.request_headers_to_add),
    ] {
        if headers.is_empty() {
            continue;
        }
        let _ = writeln!(out, "{title}:");
        for header in headers {
            let _ = writeln!(out, "  {}: {}", header.key, header_value(header));
        }
    }
    if !response.raw_body.is_empty() {
        match std::str::from_utf8(&response.raw_body) {
            Ok(body) => {
                let _ = writeln!(out, "raw body:");
                for line in body.lines() {
                    let _ = writeln!(out, "  {line}");
                }
            }
            Err(_) => {
                let _ = writeln!(
                    out,
                    "raw body ({} bytes, not valid UTF-8):\n  {}",
                    response.raw_body.len(),
                    String::from_utf8_lossy(&response.raw_body)
                );
            }
        }
    }
    if let Some(metadata) = &response.dynamic_metadata {
        let _ = writeln!(out, "dynamic metadata: {}", struct_json(metadata));
    }
    out
}

fn headers_json(headers: &[HeaderValue]) -> serde_json::Value {
    headers
        .iter()
        .map(|h| serde_json::json!({ "key": h.key, "value": header_value(h) }))
        .collect()
}

fn quota_json(quota: &Quota) -> serde_json::Value {
    use tally_proto::envoy::service::ratelimit::v3::rate_limit_response::quota::ExpirationSpecifier;
    let valid_until = match &quota.expiration_specifier {
        Some(ExpirationSpecifier::ValidUntil(t)) => serde_json::json!(t.seconds),
        None => serde_json::Value::Null,
    };
    serde_json::json!({
        "requests": quota.requests,
        "id": quota.id,
        "valid_until_unix_s": valid_until,
    })
}

fn struct_json(s: &prost_types::Struct) -> serde_json::Value {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), value_json(v)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn value_json(v: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::StructValue(s)) => struct_json(s),
        Some(Kind::ListValue(l)) => l.values.iter().map(value_json).collect(),
    }
}

/// Renders a rate-limit answer as JSON for scripts:
///
/// ```json
/// {
///   "overall_code": "OVER_LIMIT",
///   "statuses": [{
///     "code": "OVER_LIMIT",
///     "current_limit": {"name": "per_key", "requests_per_unit": 5, "unit": "MINUTE"},
///     "limit_remaining": 0,
///     "duration_until_reset_ms": 42000,
///     "quota": null
///   }],
///   "headers": [{"key": "x-ratelimit-remaining", "value": "0"}],
///   "request_headers": [],
///   "raw_body": "{\"error\":...}",
///   "quota": null,
///   "dynamic_metadata": null
/// }
/// ```
///
/// `headers` are the response headers to add, in order (keys may repeat). `current_limit`,
/// `duration_until_reset_ms`, `raw_body` (empty body), `quota` and `dynamic_metadata` are
/// `null` when absent. A body that is not UTF-8 is decoded lossily.
pub fn response_json(response: &RateLimitResponse) -> serde_json::Value {
    let statuses: Vec<serde_json::Value> = response
        .statuses
        .iter()
        .map(|status| {
            serde_json::json!({
                "code": code_name(status.code),
                "current_limit": status.current_limit.as_ref().map(|limit| serde_json::json!({
                    "name": limit.name,
                    "requests_per_unit": limit.requests_per_unit,
                    "unit": unit_name(limit.unit),
                })),
                "limit_remaining": status.limit_remaining,
                "duration_until_reset_ms": status.duration_until_reset.as_ref().map(duration_millis),
                "quota": status.quota.as_ref().map(quota_json),
            })
        })
        .collect();
    let raw_body = if response.raw_body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::Value::String(String::from_utf8_lossy(&response.raw_body).into_owned())
    };
    serde_json::json!({
        "overall_code": code_name(response.overall_code),
        "statuses": statuses,
        "headers": headers_json(&response.response_headers_to_add),
        "request_headers": headers_json(&response.request_headers_to_add),
        "raw_body": raw_body,
        "quota": response.quota.as_ref().map(quota_json),
        "dynamic_metadata": response.dynamic_metadata.as_ref().map(struct_json),
    })
}

/// The fields of a `GetStatusResponse`, in proto order, as `(name, value)` pairs.
pub fn status_fields(status: &GetStatusResponse) -> Vec<(&'static str, String)> {
    vec![
        ("live_counters", status.live_counters.to_string()),
        (
            "counter_bytes_estimate",
            status.counter_bytes_estimate.to_string(),
        ),
        ("reclaimed_counters", status.reclaimed_counters.to_string()),
        ("limits", status.limits.to_string()),
        ("limits_generation", status.limits_generation.to_string()),
        ("last_batch_ms", status.last_batch_ms.to_string()),
        ("applied_commands", status.applied_commands.to_string()),
        ("applied_batches", status.applied_batches.to_string()),
    ]
}

/// Renders a `GetStatusResponse` as `key: value` lines, keys as the proto names them.
pub fn render_status(status: &GetStatusResponse) -> String {
    status_fields(status)
        .into_iter()
        .map(|(key, value)| format!("{key}: {value}\n"))
        .collect()
}

/// Renders a `ListLimitsResponse` as a table with a header row
/// (`DOMAIN NAME CAPACITY WINDOW MATCHER VARIABLES SHADOW`), one row per limit,
/// or `(no limits)` when there are none.
pub fn render_limits(limits: &ListLimitsResponse) -> String {
    if limits.limits.is_empty() {
        return "(no limits)\n".to_string();
    }
    const HEADER: [&str; 7] = [
        "DOMAIN",
        "NAME",
        "CAPACITY",
        "WINDOW",
        "MATCHER",
        "VARIABLES",
        "SHADOW",
    ];
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    let rows: Vec<[String; 7]> = limits
        .limits
        .iter()
        .map(|l| {
            [
                or_dash(&l.domain),
                or_dash(&l.name),
                l.capacity.to_string(),
                or_dash(&l.window),
                or_dash(&l.matcher),
                or_dash(&l.variables.join(",")),
                if l.shadow { "yes" } else { "no" }.to_string(),
            ]
        })
        .collect();
    let mut widths = HEADER.map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut push_row = |cells: &[String]| {
        let mut line = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    };
    push_row(&HEADER.map(String::from));
    for row in &rows {
        push_row(row);
    }
    out
}

/// Human-readable cluster status: leader and term, then one line per member with its
/// replication progress (known on the leader).
pub fn render_cluster(status: &ClusterStatus) -> String {
    let mut out = String::new();
    let leader = status.leader_id.map_or("none".to_string(), |l| {
        format!("{l} ({})", status.leader_addr)
    });
    out.push_str(&format!(
        "leader: {leader}\nterm: {}\nanswered by: {}\nlast log index: {}\napplied index: {}\n",
        status.term,
        status.answered_by,
        status
            .last_log_index
            .map_or("-".to_string(), |i| i.to_string()),
        status
            .applied_index
            .map_or("-".to_string(), |i| i.to_string()),
    ));
    out.push_str("ID  ADDR                   ROLE     MATCHED  LAG\n");
    for m in &status.members {
        out.push_str(&format!(
            "{:<3} {:<22} {:<8} {:<8} {}\n",
            m.id,
            m.addr,
            if m.voter { "voter" } else { "learner" },
            m.matched_index.map_or("-".to_string(), |i| i.to_string()),
            m.lag.map_or("-".to_string(), |i| i.to_string()),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_proto::envoy::service::ratelimit::v3::rate_limit_response::RateLimit;
    use tally_proto::tally::v1::LimitInfo;

    fn entries(d: &RateLimitDescriptor) -> Vec<(&str, &str)> {
        d.entries
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect()
    }

    fn reason(input: &str) -> String {
        match parse_descriptor(input) {
            Err(ClientError::InvalidDescriptor { input: got, reason }) => {
                assert_eq!(got, input);
                reason
            }
            other => panic!("expected an invalid-descriptor error for {input:?}, got {other:?}"),
        }
    }

    #[test]
    fn parses_plain_entries_in_order() {
        let d = parse_descriptor("api_key=k1,model=gpt-4o").unwrap();
        assert_eq!(entries(&d), [("api_key", "k1"), ("model", "gpt-4o")]);
        assert_eq!(d.hits_addend, None);
        assert_eq!(d.limit, None);
    }

    #[test]
    fn values_may_contain_equals() {
        let d = parse_descriptor("q=a=b,expr=x==y=").unwrap();
        assert_eq!(entries(&d), [("q", "a=b"), ("expr", "x==y=")]);
    }

    #[test]
    fn empty_values_are_allowed_and_nothing_is_trimmed() {
        let d = parse_descriptor("a=, b = c ").unwrap();
        assert_eq!(entries(&d), [("a", ""), (" b ", " c ")]);
    }

    #[test]
    fn escapes() {
        let d = parse_descriptor(r"path=/a\,b\;c,k\=1=v,back=x\\,raw=\d\n").unwrap();
        assert_eq!(
            entries(&d),
            [
                ("path", "/a,b;c"),
                ("k=1", "v"),
                ("back", r"x\"),
                ("raw", r"\d\n")
            ]
        );
        // A trailing lone backslash is kept.
        let d = parse_descriptor(r"k=v\").unwrap();
        assert_eq!(entries(&d), [("k", r"v\")]);
    }

    #[test]
    fn hits_suffix_sets_hits_addend() {
        let d = parse_descriptor("api_key=k1;hits=250").unwrap();
        assert_eq!(entries(&d), [("api_key", "k1")]);
        assert_eq!(d.hits_addend, Some(250));
        let d = parse_descriptor("api_key=k1,model=m;hits=18446744073709551615").unwrap();
        assert_eq!(d.hits_addend, Some(u64::MAX));
    }

    #[test]
    fn hits_zero_is_present_zero_meaning_check_only() {
        let d = parse_descriptor("api_key=k1;hits=0").unwrap();
        assert_eq!(d.hits_addend, Some(0));
    }

    #[test]
    fn limit_override_option() {
        let d = parse_descriptor("k=v;limit=10/Minute;hits=3").unwrap();
        assert_eq!(
            d.limit,
            Some(RateLimitOverride {
                requests_per_unit: 10,
                unit: RateLimitUnit::Minute as i32
            })
        );
        assert_eq!(d.hits_addend, Some(3));
        assert!(reason("k=v;limit=10/week").contains("unit `week`"));
        assert!(reason("k=v;limit=ten/minute").contains("N/UNIT"));
        assert!(reason("k=v;limit=10").contains("N/UNIT"));
    }

    #[test]
    fn empty_key_names_its_position() {
        let r = reason("a=1,=2");
        assert!(r.contains("entry 2"), "{r}");
        assert!(r.contains("column 5"), "{r}");
        assert!(r.contains("empty key"), "{r}");
        let r = reason("=x");
        assert!(r.contains("entry 1") && r.contains("column 1"), "{r}");
    }

    #[test]
    fn malformed_entries_are_refused() {
        assert!(reason("").contains("empty"));
        let r = reason("a=1,,b=2");
        assert!(r.contains("entry 2") && r.contains("is empty"), "{r}");
        let r = reason("a=1,");
        assert!(r.contains("entry 2") && r.contains("column 5"), "{r}");
        let r = reason("a=1,novalue");
        assert!(r.contains("`novalue` has no `=`"), "{r}");
        let r = reason(r"a\=1");
        assert!(r.contains("has no `=`"), "{r}");
        let r = reason(";hits=1");
        assert!(r.contains("entry 1") && r.contains("is empty"), "{r}");
    }

    #[test]
    fn malformed_options_are_refused() {
        let r = reason("a=1;hits=-1");
        assert!(r.contains("`hits` (column 5)") && r.contains("`-1`"), "{r}");
        assert!(reason("a=1;hits=").contains("whole number"));
        assert!(reason("a=1;hits=1;hits=2").contains("twice"));
        let r = reason("a=1;color=red");
        assert!(
            r.contains("unknown option `color`") && r.contains(r"\;"),
            "{r}"
        );
        assert!(reason("a=1;").contains("empty option at column 5"));
        let r = reason("a=1;hits=1,b=2");
        assert!(
            r.contains("column 12") && r.contains("entries come first"),
            "{r}"
        );
        // An escaped semicolon is part of the value, not an option.
        let d = parse_descriptor(r"a=1\;hits=2").unwrap();
        assert_eq!(entries(&d), [("a", "1;hits=2")]);
        assert_eq!(d.hits_addend, None);
    }

    #[test]
    fn error_display_names_the_input() {
        let e = parse_descriptor("=x").unwrap_err();
        assert!(
            e.to_string().starts_with("invalid descriptor `=x`: "),
            "{e}"
        );
    }

    #[test]
    fn descriptor_helper_builds_entries() {
        let d = descriptor([("a", "1"), ("b", "2")]);
        assert_eq!(entries(&d), [("a", "1"), ("b", "2")]);
        assert_eq!(d.hits_addend, None);
    }

    fn sample_response() -> RateLimitResponse {
        RateLimitResponse {
            overall_code: Code::OverLimit as i32,
            statuses: vec![
                DescriptorStatus {
                    code: Code::OverLimit as i32,
                    current_limit: Some(RateLimit {
                        name: "per_key".to_string(),
                        requests_per_unit: 5,
                        unit: Unit::Minute as i32,
                    }),
                    limit_remaining: 0,
                    duration_until_reset: Some(prost_types::Duration {
                        seconds: 42,
                        nanos: 0,
                    }),
                    quota: None,
                },
                DescriptorStatus {
                    code: Code::Ok as i32,
                    current_limit: Some(RateLimit {
                        name: String::new(),
                        requests_per_unit: 100_000,
                        unit: Unit::Day as i32,
                    }),
                    limit_remaining: 99_990,
                    duration_until_reset: Some(prost_types::Duration {
                        seconds: 3,
                        nanos: 250_000_000,
                    }),
                    quota: None,
                },
                DescriptorStatus {
                    code: Code::Ok as i32,
                    ..Default::default()
                },
            ],
            response_headers_to_add: vec![
                HeaderValue {
                    key: "x-ratelimit-remaining".to_string(),
                    value: "0".to_string(),
                    raw_value: vec![],
                },
                HeaderValue {
                    key: "content-type".to_string(),
                    value: String::new(),
                    raw_value: b"application/json".to_vec(),
                },
            ],
            request_headers_to_add: vec![],
            raw_body: br#"{"error":{"type":"rate_limit_error","code":"rate_limit_exceeded"}}"#
                .to_vec(),
            dynamic_metadata: None,
            quota: None,
        }
    }

    #[test]
    fn render_response_shows_every_piece() {
        let text = render_response(&sample_response());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "overall: OVER_LIMIT");
        assert_eq!(
            lines[1],
            r#"descriptor 1: OVER_LIMIT  limit "per_key" 5/minute  remaining 0  reset in 42s"#
        );
        assert_eq!(
            lines[2],
            "descriptor 2: OK  limit 100000/day  remaining 99990  reset in 3.250s"
        );
        assert_eq!(lines[3], "descriptor 3: OK  no limit");
        assert!(
            text.contains("response headers:\n  x-ratelimit-remaining: 0\n"),
            "{text}"
        );
        assert!(
            text.contains("  content-type: application/json\n"),
            "{text}"
        );
        assert!(!text.contains("request headers"), "{text}");
        assert!(
            text.contains("raw body:\n  {\"error\":{\"type\":\"rate_limit_error\""),
            "{text}"
        );
    }

    #[test]
    fn render_response_minimal_and_odd_values() {
        let response = RateLimitResponse {
            overall_code: Code::Ok as i32,
            ..Default::default()
        };
        assert_eq!(render_response(&response), "overall: OK\n");

        let response = RateLimitResponse {
            overall_code: 9,
            statuses: vec![DescriptorStatus {
                code: 1,
                current_limit: Some(RateLimit {
                    name: "w".into(),
                    requests_per_unit: 1,
                    unit: Unit::Week as i32,
                }),
                ..Default::default()
            }],
            raw_body: vec![0xff, b'a'],
            ..Default::default()
        };
        let text = render_response(&response);
        assert!(text.starts_with("overall: CODE(9)\n"), "{text}");
        assert!(text.contains(r#"limit "w" 1/week  remaining 0"#), "{text}");
        assert!(
            text.contains("raw body (2 bytes, not valid UTF-8)"),
            "{text}"
        );
    }

    #[test]
    fn response_json_shape() {
        let json = response_json(&sample_response());
        assert_eq!(json["overall_code"], "OVER_LIMIT");
        assert_eq!(json["statuses"][0]["code"], "OVER_LIMIT");
        assert_eq!(json["statuses"][0]["current_limit"]["name"], "per_key");
        assert_eq!(json["statuses"][0]["current_limit"]["requests_per_unit"], 5);
        assert_eq!(json["statuses"][0]["current_limit"]["unit"], "MINUTE");
        assert_eq!(json["statuses"][0]["limit_remaining"], 0);
        assert_eq!(json["statuses"][0]["duration_until_reset_ms"], 42_000);
        assert_eq!(json["statuses"][1]["duration_until_reset_ms"], 3_250);
        assert!(json["statuses"][2]["current_limit"].is_null());
        assert!(json["statuses"][2]["duration_until_reset_ms"].is_null());
        assert_eq!(json["headers"][0]["key"], "x-ratelimit-remaining");
        assert_eq!(json["headers"][1]["value"], "application/json");
        assert_eq!(json["request_headers"], serde_json::json!([]));
        assert!(
            json["raw_body"]
                .as_str()
                .unwrap()
                .contains("rate_limit_exceeded")
        );
        assert!(response_json(&RateLimitResponse::default())["raw_body"].is_null());
    }

    #[test]
    fn dynamic_metadata_is_rendered_as_json() {
        use prost_types::value::Kind;
        let mut fields = std::collections::BTreeMap::new();
        fields.insert(
            "tokens".to_string(),
            prost_types::Value {
                kind: Some(Kind::NumberValue(12.0)),
            },
        );
        let response = RateLimitResponse {
            overall_code: 1,
            dynamic_metadata: Some(prost_types::Struct { fields }),
            ..Default::default()
        };
        assert!(render_response(&response).contains(r#"dynamic metadata: {"tokens":12.0}"#));
        assert_eq!(response_json(&response)["dynamic_metadata"]["tokens"], 12.0);
    }

    #[test]
    fn render_status_lines() {
        let status = GetStatusResponse {
            live_counters: 3,
            limits: 2,
            last_batch_ms: 1_700_000_000_000,
            ..Default::default()
        };
        let text = render_status(&status);
        assert!(text.starts_with("live_counters: 3\n"), "{text}");
        assert!(text.contains("\nlimits: 2\n"), "{text}");
        assert!(text.contains("\nlast_batch_ms: 1700000000000\n"), "{text}");
        assert_eq!(text.lines().count(), 8);
    }

    #[test]
    fn render_limits_table() {
        assert_eq!(
            render_limits(&ListLimitsResponse::default()),
            "(no limits)\n"
        );
        let limits = ListLimitsResponse {
            limits: vec![
                LimitInfo {
                    domain: "ai".into(),
                    name: "free_rpm".into(),
                    capacity: 5,
                    window: "rolling 60s/1s".into(),
                    matcher: r#"tier == "free""#.into(),
                    variables: vec!["api_key".into(), "model".into()],
                    shadow: false,
                },
                LimitInfo {
                    domain: "ai".into(),
                    name: String::new(),
                    capacity: 100_000,
                    window: "fixed 1m".into(),
                    matcher: String::new(),
                    variables: vec![],
                    shadow: true,
                },
            ],
        };
        let text = render_limits(&limits);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("DOMAIN  NAME      CAPACITY  WINDOW"),
            "{text}"
        );
        assert!(lines[0].ends_with("VARIABLES      SHADOW"), "{text}");
        assert!(
            lines[1].contains(
                r#"free_rpm  5         rolling 60s/1s  tier == "free"  api_key,model  no"#
            ),
            "{text}"
        );
        assert!(lines[2].contains("-         100000    fixed 1m"), "{text}");
        assert!(lines[2].ends_with("yes"), "{text}");
        // Every column starts at the same offset on every line.
        let col = lines[0].find("CAPACITY").unwrap();
        assert_eq!(&lines[1][col..col + 1], "5");
        assert_eq!(&lines[2][col..col + 6], "100000");
    }

    #[test]
    fn status_error_keeps_code_and_message() {
        let e = ClientError::from(tonic::Status::invalid_argument("descriptors[0]: empty"));
        assert_eq!(
            e,
            ClientError::Status {
                code: tonic::Code::InvalidArgument,
                message: "descriptors[0]: empty".to_string()
            }
        );
        assert_eq!(
            e.to_string(),
            "server answered InvalidArgument: descriptors[0]: empty"
        );
        let e = ClientError::from(tonic::Status::unavailable(""));
        assert_eq!(e.to_string(), "server answered Unavailable");
    }

    #[tokio::test]
    async fn connect_refused_is_a_connect_error() {
        // Bind then drop a listener to get a port nobody listens on.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let addr = format!("127.0.0.1:{port}");
        match TallyClient::connect(&addr).await {
            Err(ClientError::Connect { addr: got, reason }) => {
                assert_eq!(got, addr);
                assert!(!reason.is_empty());
            }
            other => panic!("expected a connect error, got {other:?}"),
        }
        assert!(matches!(
            TallyClient::connect("https://127.0.0.1:1").await,
            Err(ClientError::Connect { reason, .. }) if reason.contains("TLS")
        ));
        assert!(matches!(
            TallyClient::connect("http://bad host:1").await,
            Err(ClientError::Connect { reason, .. }) if reason.contains("invalid address")
        ));
    }

    #[tokio::test]
    async fn calls_time_out_against_a_silent_server() {
        // A listener that accepts but never speaks HTTP/2: the call must end at the per-call
        // timeout, enforced on the client side.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _accept = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let client = TallyClient::from_channel(channel).with_timeout(Duration::from_millis(200));
        assert_eq!(client.timeout(), Duration::from_millis(200));
        let started = std::time::Instant::now();
        let result = client
            .should_rate_limit("d", vec![descriptor([("k", "v")])], 1)
            .await;
        assert_eq!(
            result,
            Err(ClientError::Timeout(Duration::from_millis(200)))
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
