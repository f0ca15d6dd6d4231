//! Typed async client for Tally, and the pieces the `tally` command-line tool is built from.
//!
//! # Layout
//! - [`TallyClient`]: one `tonic` [`Channel`] to a Tally node, with typed methods for Envoy's
//!   `ShouldRateLimit` ([`TallyClient::should_rate_limit`]), Limitador's `CheckRateLimit` and
//!   `Report` ([`TallyClient::kuadrant_check`], [`TallyClient::kuadrant_report`]) and the
//!   `tally.v1.Admin` service ([`TallyClient::status`], [`TallyClient::list_limits`]).
//!   Metering (`tally.v1.Usage`): [`TallyClient::report_usage`], [`TallyClient::reserve`],
//!   [`TallyClient::commit`], [`TallyClient::release`], [`TallyClient::set_prices`],
//!   [`TallyClient::list_prices`], [`TallyClient::query_usage`],
//!   [`TallyClient::usage_overview`] and [`TallyClient::export_usage`] (a [`UsageExport`]).
//!   Connecting waits at most [`CONNECT_TIMEOUT`]; every call waits at most the client's
//!   per-call timeout ([`DEFAULT_TIMEOUT`] unless changed with [`TallyClient::with_timeout`]).
//! - [`parse_descriptor`] and [`descriptor`]: build Envoy `RateLimitDescriptor`s from the
//!   command-line syntax or from pairs.
//! - [`render_response`], [`response_json`], [`render_status`], [`render_limits`]: turn answers
//!   into text for people or JSON for scripts.
//! - Metering helpers: [`format_usd`] (nano-dollars as dollars, integer arithmetic),
//!   [`parse_time_ms`] / [`format_time_ms`] (RFC 3339 or Unix ms), [`parse_tag`],
//!   [`parse_granularity`], [`parse_price_catalog`]; renderers [`render_receipt`],
//!   [`render_usage_rows`], [`render_overview`], [`render_prices`] and their JSON forms.
//! - Admin API tokens: [`TallyClient::with_token`] sends `authorization: Bearer <token>` with
//!   every call; [`token_sha256`] and [`new_token`] make the entries of a `tallyd
//!   --auth-tokens` file.
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

mod audit;
mod keys;
pub use audit::{audit_json, render_audit};
pub use keys::{key_json, render_keys, render_subscriptions, subscription_json};

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
use tally_proto::tally::v1::usage_client::UsageClient;
use tally_proto::tally::v1::{
    AddLearnerRequest, ClusterStatus, ClusterStatusRequest, CommitRequest, Enforcement,
    ExportUsageRequest, GetStatusRequest, GetStatusResponse, GetUsageOverviewRequest,
    GetUsageOverviewResponse, Granularity, InitRequest, ListLimitsRequest, ListLimitsResponse,
    ListPricesRequest, ListPricesResponse, Member, Metric, ModelPrice, PromoteRequest,
    QueryUsageRequest, QueryUsageResponse, QuotaStanding, ReleaseRequest, RemoveRequest,
    ReportUsageRequest, ReserveRequest, SetPricesRequest, Settled, Tag, UsageReceipt, UsageRecord,
    UsageRow, usage_receipt,
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
    /// Input given to the client (a file, an argument) is not what it must be.
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// What the input is (e.g. `price file prices.json`).
        what: String,
        /// What is wrong and where.
        reason: String,
    },
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
    token: Option<BearerToken>,
}

/// TLS for [`TallyClient::connect_tls`]: the CA that signed the server's certificate, and for
/// mutual TLS a client certificate and key (all PEM). `Debug` never shows the key.
#[derive(Clone)]
pub struct ClientTls {
    /// CA certificate(s) the server's certificate must be signed by.
    pub ca_pem: Vec<u8>,
    /// Client certificate chain and private key, for servers that require one.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The `authorization: Bearer <token>` value sent with every call. Its `Debug` hides it.
#[derive(Clone)]
struct BearerToken(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl TallyClient {
    /// Connects to `addr`, given as `host:port` or `http://host:port` (e.g. `127.0.0.1:8081`,
    /// `http://[::1]:8081`). Waits at most [`CONNECT_TIMEOUT`]; calls then use
    /// [`DEFAULT_TIMEOUT`].
    ///
    /// The connection is established eagerly, so an unreachable server is reported here.
    /// `https://` needs [`connect_tls`](Self::connect_tls) (a CA to verify the server).
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        Self::connect_with(addr, None).await
    }

    /// [`connect`](Self::connect) over TLS (`tallyd --tls-cert`): the server's certificate is
    /// verified against `tls.ca_pem` and must name the address's host; `tls.identity` is the
    /// client certificate for mutual TLS (`tallyd --tls-client-ca`). `addr` may be
    /// `host:port` or `https://host:port`.
    pub async fn connect_tls(addr: &str, tls: &ClientTls) -> Result<Self, ClientError> {
        Self::connect_with(addr, Some(tls)).await
    }

    async fn connect_with(addr: &str, tls: Option<&ClientTls>) -> Result<Self, ClientError> {
        let connect_error = |reason: String| ClientError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let trimmed = addr.trim();
        if trimmed.is_empty() {
            return Err(connect_error("the address is empty".to_string()));
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let uri = if trimmed.contains("://") {
            trimmed.to_string()
        } else {
            format!("{scheme}://{trimmed}")
        };
        match (uri.split_once("://").map(|(s, _)| s), tls) {
            (Some("http"), None) | (Some("https"), Some(_)) => {}
            (Some("https"), None) => {
                return Err(connect_error(
                    "an `https://` address needs TLS: the server's CA (tally --ca FILE)"
                        .to_string(),
                ));
            }
            (Some("http"), Some(_)) => {
                return Err(connect_error(
                    "TLS was asked for (--ca): use an `https://` address or host:port".to_string(),
                ));
            }
            _ => {
                return Err(connect_error(
                    "only `http://` and `https://` addresses are supported".to_string(),
                ));
            }
        }
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|e| connect_error(format!("invalid address: {}", error_chain(&e))))?
            .connect_timeout(CONNECT_TIMEOUT);
        if let Some(tls) = tls {
            let mut config = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(tonic::transport::Identity::from_pem(cert, key));
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| connect_error(format!("TLS: {}", error_chain(&e))))?;
        }
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
            token: None,
        }
    }

    /// Returns the client sending `token` as `authorization: Bearer <token>` with every call
    /// (what the admin API's tokens need: `tallyd --auth-tokens`). Surrounding whitespace is
    /// ignored; a token must be printable ASCII without spaces. The error never shows it.
    pub fn with_token(mut self, token: &str) -> Result<Self, ClientError> {
        let token = token.trim();
        let invalid = |reason: &str| ClientError::InvalidInput {
            what: "token".to_string(),
            reason: reason.to_string(),
        };
        if token.is_empty() {
            return Err(invalid("it is empty"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid("it must be printable ASCII without spaces"));
        }
        let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            format!("Bearer {token}")
                .parse()
                .map_err(|_| invalid("it is not a valid metadata value"))?;
        // Never indexed by HPACK, shown as "Sensitive" by header Debug output.
        value.set_sensitive(true);
        self.token = Some(BearerToken(value));
        Ok(self)
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

    /// Wraps a message in a request carrying the per-call deadline (`grpc-timeout`) and the
    /// bearer token, if the client has one.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        if let Some(BearerToken(value)) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
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

// ---------------------------------------------------------------------------------------------
// Metering: tally.v1.Usage
// ---------------------------------------------------------------------------------------------

/// Nano-dollars in one US dollar.
pub const NUSD_PER_USD: u64 = 1_000_000_000;

/// Nano-dollars as US dollars with 9 decimals, in integer arithmetic (no float ever touches
/// money): `1234567` → `"0.001234567"`.
///
/// ```
/// assert_eq!(tally_client::format_usd(1_234_567), "0.001234567");
/// assert_eq!(tally_client::format_usd(12_500_000_000), "12.500000000");
/// ```
pub fn format_usd(nusd: u64) -> String {
    format!("{}.{:09}", nusd / NUSD_PER_USD, nusd % NUSD_PER_USD)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since 1970-01-01 (`civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Parses a point in time as Unix milliseconds (`1795435200000`) or RFC 3339 with an offset
/// (`2026-11-23T12:00:00Z`, `2026-11-23T13:00:00.250+01:00`).
///
/// ```
/// assert_eq!(tally_client::parse_time_ms("2026-11-23T12:00:00Z"), Ok(1_795_435_200_000));
/// assert_eq!(tally_client::parse_time_ms("2026-11-23T13:00:00+01:00"), Ok(1_795_435_200_000));
/// assert_eq!(tally_client::parse_time_ms("1795435200000"), Ok(1_795_435_200_000));
/// ```
pub fn parse_time_ms(s: &str) -> Result<i64, String> {
    let shape = || {
        format!(
            "`{s}` is not a time: write RFC 3339 with an offset (2026-11-01T00:00:00Z, \
             2026-11-01T00:00:00+01:00) or Unix milliseconds"
        )
    };
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<i64>().map_err(|_| shape());
    }
    let b = s.as_bytes();
    if b.len() < 20 {
        return Err(shape());
    }
    let num = |range: std::ops::Range<usize>| -> Result<i64, String> {
        let part = s.get(range).ok_or_else(shape)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse::<i64>().map_err(|_| shape())
        } else {
            Err(shape())
        }
    };
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return Err(shape());
    }
    if b[13] != b':' || b[16] != b':' {
        return Err(shape());
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(format!("`{s}`: no such date"));
    }
    // Second 60 (a leap second) is refused: Unix time has none.
    if hour > 23 || minute > 59 || second > 59 {
        return Err(format!("`{s}`: no such time of day"));
    }
    let mut rest = &s[19..];
    let mut millis = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(shape());
        }
        let (frac, after) = fraction.split_at(digits);
        let ms: String = frac.chars().chain("00".chars()).take(3).collect();
        millis = ms.parse::<i64>().map_err(|_| shape())?;
        if frac[3.min(digits)..].bytes().any(|c| c != b'0') {
            return Err(format!("`{s}`: finer than a millisecond"));
        }
        rest = after;
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        _ => {
            let o = rest.as_bytes();
            if o.len() != 6 || !matches!(o[0], b'+' | b'-') || o[3] != b':' {
                return Err(shape());
            }
            let hours = num(s.len() - 5..s.len() - 3)?;
            let minutes = num(s.len() - 2..s.len())?;
            if hours > 23 || minutes > 59 {
                return Err(format!("`{s}`: no such offset"));
            }
            let m = hours * 60 + minutes;
            if o[0] == b'-' { -m } else { m }
        }
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_min * 60;
    Ok(seconds * 1_000 + millis)
}

/// Unix milliseconds as RFC 3339 in UTC: `2026-11-23T12:00:00Z` (`.250` when not a whole
/// second).
///
/// ```
/// assert_eq!(tally_client::format_time_ms(1_795_435_200_250), "2026-11-23T12:00:00.250Z");
/// ```
pub fn format_time_ms(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    let (year, month, day) = civil_from_days(days);
    let (h, m, s, milli) = (
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1_000 % 60,
        in_day % 1_000,
    );
    if milli == 0 {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
    } else {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
    }
}

/// Parses a tag written `key=value` (the first `=` splits; the value may be empty).
pub fn parse_tag(s: &str) -> Result<Tag, String> {
    match s.split_once('=') {
        Some(("", _)) => Err(format!("`{s}` has an empty key; write key=value")),
        Some((key, value)) => Ok(Tag {
            key: key.to_string(),
            value: value.to_string(),
        }),
        None => Err(format!("`{s}` has no `=`; write key=value")),
    }
}

/// Parses a granularity name: `minute`, `hour`, `day`, `month` or `total` (any case).
pub fn parse_granularity(s: &str) -> Result<Granularity, String> {
    match s.to_ascii_lowercase().as_str() {
        "minute" => Ok(Granularity::Minute),
        "hour" => Ok(Granularity::Hour),
        "day" => Ok(Granularity::Day),
        "month" => Ok(Granularity::Month),
        "total" => Ok(Granularity::Total),
        _ => Err(format!(
            "`{s}` is not a granularity; use minute, hour, day, month or total"
        )),
    }
}

/// Parses a price catalog in JSON: a list of
/// `{"model": .., "input_nusd": .., "cached_input_nusd": .., "output_nusd": ..}` (or an object
/// `{"models": [..]}` of them). Prices are whole nano-dollars per token; every field is
/// required and no other is allowed, so a typo cannot silently price a model at 0.
///
/// ```
/// let models = tally_client::parse_price_catalog(
///     r#"[{"model": "gpt-4o", "input_nusd": 2500, "cached_input_nusd": 1250, "output_nusd": 10000}]"#,
/// ).unwrap();
/// assert_eq!(models[0].output_nusd, 10_000);
/// ```
pub fn parse_price_catalog(text: &str) -> Result<Vec<ModelPrice>, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let list = match &value {
        serde_json::Value::Array(list) => list,
        serde_json::Value::Object(o) if o.len() == 1 && o.contains_key("models") => {
            o["models"].as_array().ok_or("`models` must be a list")?
        }
        _ => {
            return Err(
                "expected a list of {model, input_nusd, cached_input_nusd, output_nusd} \
                 (or {\"models\": [...]})"
                    .to_string(),
            );
        }
    };
    let mut models = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let object = item
            .as_object()
            .ok_or_else(|| format!("models[{i}] must be an object"))?;
        const FIELDS: [&str; 4] = ["model", "input_nusd", "cached_input_nusd", "output_nusd"];
        if let Some(unknown) = object.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(format!(
                "models[{i}]: unknown field `{unknown}` (known: {})",
                FIELDS.join(", ")
            ));
        }
        let model = match object.get("model") {
            Some(serde_json::Value::String(m)) => m.clone(),
            Some(_) => return Err(format!("models[{i}].model must be a string")),
            None => return Err(format!("models[{i}].model is missing")),
        };
        let price = |field: &str| -> Result<u64, String> {
            let v = object
                .get(field)
                .ok_or_else(|| format!("models[{i}].{field} is missing"))?;
            v.as_u64().ok_or_else(|| {
                format!(
                    "models[{i}].{field} must be a whole number of nano-dollars per token, \
                     not {v}"
                )
            })
        };
        models.push(ModelPrice {
            model,
            input_nusd: price("input_nusd")?,
            cached_input_nusd: price("cached_input_nusd")?,
            output_nusd: price("output_nusd")?,
        });
    }
    Ok(models)
}

/// A running `ExportUsage`: records in seq order, each within the client's per-call timeout.
#[derive(Debug)]
pub struct UsageExport {
    stream: tonic::Streaming<UsageRecord>,
    timeout: Duration,
}

impl UsageExport {
    /// The next record; `None` once the export is complete. An error ends the export: resume
    /// with `after_seq` = the seq of the last record received.
    pub async fn next(&mut self) -> Result<Option<UsageRecord>, ClientError> {
        match tokio::time::timeout(self.timeout, self.stream.message()).await {
            Ok(Ok(record)) => Ok(record),
            Ok(Err(status)) => Err(status.into()),
            Err(_) => Err(ClientError::Timeout(self.timeout)),
        }
    }
}

impl TallyClient {
    /// `tally.v1.Usage/ReportUsage`: records a finished request's usage, once per request id
    /// (a retry answers the first receipt again, `duplicate` set).
    pub async fn report_usage(
        &self,
        request: ReportUsageRequest,
    ) -> Result<UsageReceipt, ClientError> {
        let mut client = UsageClient::new(self.channel.clone());
        self.call(client.report_usage(self.request(request))).await
    }

    /// `tally.v1.Usage/Reserve`: holds capacity against an estimate (a denial is an answer).
    pub async fn reserve(&self, request: ReserveRequest) -> Result<UsageReceipt, ClientError> {
        let mut client = UsageClient::new(self.channel.clone());
        self.call(client.reserve(self.request(request))).await
    }

    /// `tally.v1.Usage/Commit`: settles a reservation with the actual usage.
    pub async fn commit(&self, request: CommitRequest) -> Result<UsageReceipt, ClientError> {
        let mut client = UsageClient::new(self.channel.clone());
        self.call(client.commit(self.request(request))).await
    }

    /// `tally.v1.Usage/Release`: cancels an open reservation.
    pub async fn release(&self, request_id: &str) -> Result<UsageReceipt, ClientError> {
        let mut client = UsageClient::new(self.channel.clone());
        let request = ReleaseRequest {
            request_id: request_id.to_string(),
        };
        self.call(client.release(self.request(request))).await
    }

    /// `tally.v1.Usage/SetPrices`: replaces the whole price catalog; answers its version.
    pub async fn set_prices(&self, models: Vec<ModelPrice>) -> Result<u64, ClientError> {
        let mut client = UsageClient::new(self.channel.clone());
        let request = SetPricesRequest { models };
        let response = self.call(client.set_prices(self.request(request))).await?;
        Ok(response.version)
    }

    /// `tally.v1.Usage/ListPrices`: the price catalog in force and its version.
    pub async fn list_prices(&self) -> Result<ListPricesResponse, ClientError> {
        let mut client = UsageClient::new(self.channel.clone());
        self.call(client.list_prices(self.request(ListPricesRequest {})))
            .await
    }

    /// `tally.v1.Usage/QueryUsage`: sums of usage, grouped and bucketed.
    pub async fn query_usage(
        &self,
        request: QueryUsageRequest,
    ) -> Result<QueryUsageResponse, ClientError> {
        let mut client = UsageClient::new(self.channel.clone());
        self.call(client.query_usage(self.request(request))).await
    }

    /// `tally.v1.Usage/GetUsageOverview`: a subject's standing against every quota.
    pub async fn usage_overview(
        &self,
        subject: &str,
        subscription: &str,
    ) -> Result<GetUsageOverviewResponse, ClientError> {
        let mut client = UsageClient::new(self.channel.clone());
        let request = GetUsageOverviewRequest {
            subject: subject.to_string(),
            subscription: subscription.to_string(),
        };
        self.call(client.get_usage_overview(self.request(request)))
            .await
    }

    /// `tally.v1.Usage/ExportUsage`: the records after `after_seq` (at most `max_records`, 0
    /// for all), each exactly once. The per-call timeout bounds the wait for each record, not
    /// the whole export.
    pub async fn export_usage(
        &self,
        after_seq: u64,
        max_records: u64,
    ) -> Result<UsageExport, ClientError> {
        let mut client = UsageClient::new(self.channel.clone());
        let request = ExportUsageRequest {
            after_seq,
            max_records,
        };
        let stream = self
            .call(client.export_usage(self.request(request)))
            .await?;
        Ok(UsageExport {
            stream,
            timeout: self.timeout,
        })
    }
}

/// The SHA-256 of a token, lower-case hex: the `token_sha256` of a `tallyd --auth-tokens`
/// file. Surrounding whitespace (a trailing newline) is not part of the token.
///
/// ```
/// assert_eq!(
///     tally_client::token_sha256("abc\n"),
///     "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
/// );
/// ```
pub fn token_sha256(token: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(token.trim().as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// A fresh admin API token: `tally_` and 64 hex digits (256 random bits from the operating
/// system's generator).
pub fn new_token() -> Result<String, ClientError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| ClientError::InvalidInput {
        what: "random source".to_string(),
        reason: e.to_string(),
    })?;
    let mut token = String::from("tally_");
    for b in bytes {
        let _ = write!(token, "{b:02x}");
    }
    Ok(token)
}

/// The name of a `Metric` value without its prefix, lower case (`total_tokens`, ...).
pub fn metric_name(metric: i32) -> String {
    match Metric::try_from(metric) {
        Ok(m) => m
            .as_str_name()
            .trim_start_matches("METRIC_")
            .to_ascii_lowercase(),
        Err(_) => format!("metric({metric})"),
    }
}

/// The name of an `Enforcement` value, lower case (`hard`, `soft`, `shadow`).
pub fn enforcement_name(enforcement: i32) -> String {
    match Enforcement::try_from(enforcement) {
        Ok(e) => e
            .as_str_name()
            .trim_start_matches("ENFORCEMENT_")
            .to_ascii_lowercase(),
        Err(_) => format!("enforcement({enforcement})"),
    }
}

fn settled_name(settled: i32) -> String {
    match Settled::try_from(settled) {
        Ok(s) => s
            .as_str_name()
            .trim_start_matches("SETTLED_")
            .to_ascii_lowercase(),
        Err(_) => format!("settled({settled})"),
    }
}

/// A metric's name for people: amounts of cost are shown in dollars, so just `cost`.
fn metric_label(metric: i32) -> String {
    if metric == Metric::CostNusd as i32 {
        "cost".to_string()
    } else {
        metric_name(metric)
    }
}

/// A metric's amount for people: dollars for cost, the plain number otherwise.
fn amount(metric: i32, n: u64) -> String {
    if metric == Metric::CostNusd as i32 {
        format!("${}", format_usd(n))
    } else {
        n.to_string()
    }
}

fn format_ms(ms: u64) -> String {
    if ms.is_multiple_of(1_000) {
        format!("{}s", ms / 1_000)
    } else {
        format!("{}.{:03}s", ms / 1_000, ms % 1_000)
    }
}

fn standing_line(s: &QuotaStanding) -> String {
    let key = if s.key.is_empty() {
        String::new()
    } else {
        format!(" [{}]", s.key.join(","))
    };
    format!(
        "{}{key} ({} {}): used {} reserved {} of {}, remaining {}, resets in {}",
        s.quota,
        enforcement_name(s.enforcement),
        metric_label(s.metric),
        amount(s.metric, s.used),
        amount(s.metric, s.reserved),
        amount(s.metric, s.limit),
        amount(s.metric, s.remaining),
        format_ms(s.reset_in_ms),
    )
}

/// A quota standing as JSON (amounts as integers in the metric's unit; nano-dollars for cost).
pub fn standing_json(s: &QuotaStanding) -> serde_json::Value {
    serde_json::json!({
        "quota": s.quota,
        "key": s.key,
        "metric": metric_name(s.metric),
        "enforcement": enforcement_name(s.enforcement),
        "limit": s.limit,
        "used": s.used,
        "reserved": s.reserved,
        "remaining": s.remaining,
        "reset_in_ms": s.reset_in_ms,
    })
}

/// Renders a usage receipt for people.
///
/// ```text
/// request req-1: recorded as seq 7 at 2026-11-23T12:00:00Z, cost $0.004000000 (price version 2)
/// ```
pub fn render_receipt(receipt: &UsageReceipt) -> String {
    use usage_receipt::Result as R;
    let mut out = format!("request {}: ", receipt.request_id);
    match &receipt.result {
        Some(R::Recorded(r)) => {
            let _ = write!(
                out,
                "recorded as seq {} at {}, cost ${}",
                r.seq,
                format_time_ms(r.at_ms),
                format_usd(r.cost_nusd)
            );
            if r.price_version == 0 {
                out.push_str(" (model not priced)");
            } else {
                let _ = write!(out, " (price version {})", r.price_version);
            }
            if r.settled == Settled::Reservation as i32 || r.settled == Settled::Lapsed as i32 {
                let _ = write!(out, ", settled {}", settled_name(r.settled));
            }
            if r.overshoot_tokens > 0 || r.overshoot_cost_nusd > 0 {
                let _ = write!(
                    out,
                    ", {} tokens (${}) over the estimate",
                    r.overshoot_tokens,
                    format_usd(r.overshoot_cost_nusd)
                );
            }
            out.push('\n');
            for s in &r.over {
                let _ = writeln!(out, "  over quota: {}", standing_line(s));
            }
        }
        Some(R::Reserved(r)) => {
            let _ = writeln!(out, "reserved until {}", format_time_ms(r.expires_ms));
            for s in &r.standings {
                let _ = writeln!(out, "  {}", standing_line(s));
            }
        }
        Some(R::Denied(d)) => {
            out.push_str("denied\n");
            if let Some(s) = &d.standing {
                let _ = writeln!(out, "  no room in quota: {}", standing_line(s));
            }
        }
        Some(R::Released(r)) => {
            out.push_str(if r.found {
                "reservation released\n"
            } else {
                "no open reservation to release\n"
            });
        }
        None => out.push_str("no result\n"),
    }
    if receipt.duplicate {
        out.push_str("  (a retry: this is the first answer again; nothing counted twice)\n");
    }
    out
}

/// A usage receipt as JSON for scripts: `request_id`, `duplicate`, `result` (`recorded`,
/// `reserved`, `denied`, `released` or null) and the result's fields.
pub fn receipt_json(receipt: &UsageReceipt) -> serde_json::Value {
    use usage_receipt::Result as R;
    let standings = |s: &[QuotaStanding]| s.iter().map(standing_json).collect::<Vec<_>>();
    let (result, detail) = match &receipt.result {
        Some(R::Recorded(r)) => (
            "recorded",
            serde_json::json!({
                "seq": r.seq,
                "at_ms": r.at_ms,
                "cost_nusd": r.cost_nusd,
                "cost_usd": format_usd(r.cost_nusd),
                "price_version": r.price_version,
                "settled": settled_name(r.settled),
                "overshoot_tokens": r.overshoot_tokens,
                "overshoot_cost_nusd": r.overshoot_cost_nusd,
                "over": standings(&r.over),
            }),
        ),
        Some(R::Reserved(r)) => (
            "reserved",
            serde_json::json!({
                "expires_ms": r.expires_ms,
                "standings": standings(&r.standings),
            }),
        ),
        Some(R::Denied(d)) => (
            "denied",
            serde_json::json!({ "standing": d.standing.as_ref().map(standing_json) }),
        ),
        Some(R::Released(r)) => ("released", serde_json::json!({ "found": r.found })),
        None => ("none", serde_json::json!({})),
    };
    let mut object = serde_json::json!({
        "request_id": receipt.request_id,
        "duplicate": receipt.duplicate,
        "result": result,
    });
    if let (Some(o), serde_json::Value::Object(d)) = (object.as_object_mut(), detail) {
        o.extend(d);
    }
    object
}

fn tags_json(tags: &[Tag]) -> serde_json::Value {
    tags.iter()
        .map(|t| (t.key.clone(), serde_json::Value::String(t.value.clone())))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// One usage record as one JSON object (what `tally usage export` prints per line): every
/// field of the record, tags as an object, cost as integer `cost_nusd` and as a `cost_usd`
/// string.
pub fn usage_record_json(r: &UsageRecord) -> serde_json::Value {
    serde_json::json!({
        "seq": r.seq,
        "at_ms": r.at_ms,
        "at": format_time_ms(r.at_ms),
        "request_id": r.request_id,
        "subject": r.subject,
        "subscription": r.subscription,
        "model": r.model,
        "tags": tags_json(&r.tags),
        "input_tokens": r.input_tokens,
        "output_tokens": r.output_tokens,
        "cached_input_tokens": r.cached_input_tokens,
        "reasoning_tokens": r.reasoning_tokens,
        "cost_nusd": r.cost_nusd,
        "cost_usd": format_usd(r.cost_nusd),
        "price_version": r.price_version,
    })
}

/// One query row as JSON: `period_start_ms`, `period_start`, `group` (an object from each
/// `group_by` dimension to its value), the sums, and cost as `cost_nusd` and `cost_usd`.
pub fn usage_row_json(row: &UsageRow, group_by: &[String]) -> serde_json::Value {
    let group: serde_json::Map<String, serde_json::Value> = group_by
        .iter()
        .zip(&row.group)
        .map(|(d, v)| (d.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::json!({
        "period_start_ms": row.period_start_ms,
        "period_start": format_time_ms(row.period_start_ms),
        "group": group,
        "requests": row.requests,
        "input_tokens": row.input_tokens,
        "output_tokens": row.output_tokens,
        "cached_input_tokens": row.cached_input_tokens,
        "reasoning_tokens": row.reasoning_tokens,
        "cost_nusd": row.cost_nusd,
        "cost_usd": format_usd(row.cost_nusd),
    })
}

/// Lays out rows under a header, columns two spaces apart, the last one unpadded.
fn table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for cells in std::iter::once(header).chain(rows.iter().map(Vec::as_slice)) {
        let mut line = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Renders query rows as a table: `PERIOD` (RFC 3339, UTC), one column per `group_by`
/// dimension, `REQUESTS INPUT OUTPUT CACHED REASONING COST_USD`; or `(no usage)`.
pub fn render_usage_rows(rows: &[UsageRow], group_by: &[String]) -> String {
    if rows.is_empty() {
        return "(no usage)\n".to_string();
    }
    let mut header = vec!["PERIOD".to_string()];
    header.extend(group_by.iter().map(|d| d.to_ascii_uppercase()));
    header.extend(
        [
            "REQUESTS",
            "INPUT",
            "OUTPUT",
            "CACHED",
            "REASONING",
            "COST_USD",
        ]
        .map(String::from),
    );
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut row = vec![format_time_ms(r.period_start_ms)];
            row.extend((0..group_by.len()).map(|i| match r.group.get(i) {
                Some(v) if !v.is_empty() => v.clone(),
                _ => "-".to_string(),
            }));
            row.extend([
                r.requests.to_string(),
                r.input_tokens.to_string(),
                r.output_tokens.to_string(),
                r.cached_input_tokens.to_string(),
                r.reasoning_tokens.to_string(),
                format_usd(r.cost_nusd),
            ]);
            row
        })
        .collect();
    table(&header, &cells)
}

/// Renders a usage overview as a table
/// (`QUOTA KEY METRIC ENFORCEMENT LIMIT USED RESERVED REMAINING RESET_IN`), cost amounts in
/// dollars; or `(no quotas apply)`.
pub fn render_overview(overview: &GetUsageOverviewResponse) -> String {
    if overview.standings.is_empty() {
        return "(no quotas apply)\n".to_string();
    }
    let header = [
        "QUOTA",
        "KEY",
        "METRIC",
        "ENFORCEMENT",
        "LIMIT",
        "USED",
        "RESERVED",
        "REMAINING",
        "RESET_IN",
    ]
    .map(String::from);
    let rows: Vec<Vec<String>> = overview
        .standings
        .iter()
        .map(|s| {
            vec![
                s.quota.clone(),
                if s.key.is_empty() {
                    "-".to_string()
                } else {
                    s.key.join(",")
                },
                metric_label(s.metric),
                enforcement_name(s.enforcement),
                amount(s.metric, s.limit),
                amount(s.metric, s.used),
                amount(s.metric, s.reserved),
                amount(s.metric, s.remaining),
                format_ms(s.reset_in_ms),
            ]
        })
        .collect();
    table(&header, &rows)
}

/// Renders the price catalog: its version, then a table of each model's prices in nano-dollars
/// per token, and (exactly) in dollars per million tokens, input / cached input / output.
///
/// ```text
/// price catalog version 2
/// MODEL   INPUT_NUSD  CACHED_INPUT_NUSD  OUTPUT_NUSD  USD_PER_1M_TOKENS
/// gpt-4o  2500        1250               10000        2.500 / 1.250 / 10.000
/// ```
pub fn render_prices(prices: &ListPricesResponse) -> String {
    let mut out = format!("price catalog version {}\n", prices.version);
    if prices.models.is_empty() {
        out.push_str("(no models priced)\n");
        return out;
    }
    let header = [
        "MODEL",
        "INPUT_NUSD",
        "CACHED_INPUT_NUSD",
        "OUTPUT_NUSD",
        "USD_PER_1M_TOKENS",
    ]
    .map(String::from);
    // n nano-dollars per token × 10^6 tokens = n milli-dollars.
    let per_million = |nusd: u64| format!("{}.{:03}", nusd / 1_000, nusd % 1_000);
    let rows: Vec<Vec<String>> = prices
        .models
        .iter()
        .map(|m| {
            vec![
                m.model.clone(),
                m.input_nusd.to_string(),
                m.cached_input_nusd.to_string(),
                m.output_nusd.to_string(),
                format!(
                    "{} / {} / {}",
                    per_million(m.input_nusd),
                    per_million(m.cached_input_nusd),
                    per_million(m.output_nusd)
                ),
            ]
        })
        .collect();
    out.push_str(&table(&header, &rows));
    out
}

/// A price as JSON: `{model, input_nusd, cached_input_nusd, output_nusd}` (the shape
/// [`parse_price_catalog`] reads back).
pub fn price_json(m: &ModelPrice) -> serde_json::Value {
    serde_json::json!({
        "model": m.model,
        "input_nusd": m.input_nusd,
        "cached_input_nusd": m.cached_input_nusd,
        "output_nusd": m.output_nusd,
    })
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

    #[test]
    fn usd_is_formatted_with_integers() {
        assert_eq!(format_usd(0), "0.000000000");
        assert_eq!(format_usd(1), "0.000000001");
        assert_eq!(format_usd(1_234_567), "0.001234567");
        assert_eq!(format_usd(1_000_000_000), "1.000000000");
        assert_eq!(format_usd(u64::MAX), "18446744073.709551615");
    }

    #[test]
    fn times_parse_as_rfc3339_or_unix_ms() {
        const T: i64 = 1_795_435_200_000; // 2026-11-23T12:00:00Z
        assert_eq!(parse_time_ms("2026-11-23T12:00:00Z"), Ok(T));
        assert_eq!(parse_time_ms("2026-11-23t12:00:00z"), Ok(T));
        assert_eq!(parse_time_ms("2026-11-23 12:00:00Z"), Ok(T));
        assert_eq!(parse_time_ms("2026-11-23T13:30:00+01:30"), Ok(T));
        assert_eq!(parse_time_ms("2026-11-23T07:00:00-05:00"), Ok(T));
        assert_eq!(parse_time_ms("2026-11-23T12:00:00.25Z"), Ok(T + 250));
        assert_eq!(parse_time_ms("2026-11-23T12:00:00.123000Z"), Ok(T + 123));
        assert_eq!(parse_time_ms("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_time_ms("1969-12-31T23:59:59Z"), Ok(-1_000));
        assert_eq!(parse_time_ms("2024-02-29T00:00:00Z"), Ok(1_709_164_800_000));
        assert_eq!(parse_time_ms("1795435200000"), Ok(T));
        assert_eq!(parse_time_ms("0"), Ok(0));
        for bad in [
            "",
            "yesterday",
            "2026-11-23",
            "2026-11-23T12:00:00",
            "2026-11-23T12:00Z",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-11-31T00:00:00Z",
            "2026-11-23T24:00:00Z",
            "2026-11-23T12:00:60Z",
            "2026-11-23T12:00:00.1234Z",
            "2026-11-23T12:00:00.Z",
            "2026-11-23T12:00:00+0100",
            "2026-11-23T12:00:00+24:00",
            "-5",
            "99999999999999999999",
            "2026-11-23T12:00:00Zjunk",
            "２026-11-23T12:00:00Z",
        ] {
            assert!(parse_time_ms(bad).is_err(), "{bad:?} is refused");
        }
    }

    #[test]
    fn times_format_as_utc_rfc3339_and_round_trip() {
        assert_eq!(format_time_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(format_time_ms(1_795_435_200_000), "2026-11-23T12:00:00Z");
        for ms in [
            0,
            -86_400_000,
            951_782_400_000,
            1_709_164_800_123,
            4_102_444_800_000,
        ] {
            assert_eq!(parse_time_ms(&format_time_ms(ms)), Ok(ms), "{ms}");
        }
    }

    #[test]
    fn tags_and_granularities_parse() {
        assert_eq!(
            parse_tag("team=a=b"),
            Ok(Tag {
                key: "team".into(),
                value: "a=b".into()
            })
        );
        assert!(parse_tag("=x").unwrap_err().contains("empty key"));
        assert!(parse_tag("x").unwrap_err().contains("no `=`"));
        assert_eq!(parse_granularity("Day"), Ok(Granularity::Day));
        assert_eq!(parse_granularity("total"), Ok(Granularity::Total));
        assert!(parse_granularity("week").is_err());
    }

    #[test]
    fn price_catalogs_parse_strictly() {
        let text = r#"[
            {"model": "gpt-4o", "input_nusd": 2500, "cached_input_nusd": 1250, "output_nusd": 10000},
            {"model": "mini", "input_nusd": 150, "cached_input_nusd": 75, "output_nusd": 600}
        ]"#;
        let models = parse_price_catalog(text).unwrap();
        assert_eq!(models.len(), 2);
        assert_eq!(
            models[0],
            ModelPrice {
                model: "gpt-4o".into(),
                input_nusd: 2_500,
                cached_input_nusd: 1_250,
                output_nusd: 10_000
            }
        );
        let wrapped = format!(r#"{{"models": {text}}}"#);
        assert_eq!(parse_price_catalog(&wrapped).unwrap(), models);
        assert_eq!(parse_price_catalog("[]").unwrap(), []);
        let reason = |t: &str| parse_price_catalog(t).unwrap_err();
        assert!(reason("{").contains("not valid JSON"));
        assert!(reason(r#"{"model": "x"}"#).contains("expected a list"));
        assert!(reason("[1]").contains("models[0] must be an object"));
        let r = reason(
            r#"[{"model": "x", "input_nusd": 1, "cached_input_nusd": 1, "output_nusd": 1, "outptu_nusd": 2}]"#,
        );
        assert!(r.contains("unknown field `outptu_nusd`"), "{r}");
        let r = reason(r#"[{"model": "x", "input_nusd": 1, "output_nusd": 1}]"#);
        assert!(r.contains("models[0].cached_input_nusd is missing"), "{r}");
        for v in ["2.5", "-1", "\"3\"", "1e3"] {
            let r = reason(&format!(
                r#"[{{"model": "x", "input_nusd": {v}, "cached_input_nusd": 1, "output_nusd": 1}}]"#
            ));
            assert!(
                r.contains("models[0].input_nusd must be a whole number"),
                "{v}: {r}"
            );
        }
        assert!(
            reason(r#"[{"model": 5, "input_nusd": 1, "cached_input_nusd": 1, "output_nusd": 1}]"#)
                .contains("models[0].model must be a string")
        );
    }

    fn standing(metric: Metric) -> QuotaStanding {
        QuotaStanding {
            quota: "budget".into(),
            key: vec!["k1".into()],
            metric: metric as i32,
            enforcement: Enforcement::Hard as i32,
            limit: 5_000_000_000,
            used: 1_234_567,
            reserved: 0,
            remaining: 4_998_765_433,
            reset_in_ms: 90_500,
        }
    }

    #[test]
    fn receipts_render_for_people_and_scripts() {
        let receipt = UsageReceipt {
            request_id: "req-1".into(),
            duplicate: true,
            result: Some(usage_receipt::Result::Recorded(usage_receipt::Recorded {
                seq: 7,
                at_ms: 1_795_435_200_000,
                cost_nusd: 1_234_567,
                price_version: 2,
                settled: Settled::NoReservation as i32,
                overshoot_tokens: 0,
                overshoot_cost_nusd: 0,
                over: vec![standing(Metric::CostNusd)],
            })),
        };
        let text = render_receipt(&receipt);
        assert!(
            text.starts_with(
                "request req-1: recorded as seq 7 at 2026-11-23T12:00:00Z, cost $0.001234567 (price version 2)\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("over quota: budget [k1] (hard cost): used $0.001234567 reserved $0.000000000 of $5.000000000"),
            "{text}"
        );
        assert!(text.contains("resets in 90.500s"), "{text}");
        assert!(text.contains("a retry"), "{text}");
        let json = receipt_json(&receipt);
        assert_eq!(json["result"], "recorded");
        assert_eq!(json["duplicate"], true);
        assert_eq!(json["seq"], 7);
        assert_eq!(json["cost_nusd"], 1_234_567);
        assert_eq!(json["cost_usd"], "0.001234567");
        assert_eq!(json["settled"], "no_reservation");
        assert_eq!(json["over"][0]["metric"], "cost_nusd");

        let denied = UsageReceipt {
            request_id: "r".into(),
            duplicate: false,
            result: Some(usage_receipt::Result::Denied(usage_receipt::Denied {
                standing: Some(standing(Metric::TotalTokens)),
            })),
        };
        let text = render_receipt(&denied);
        assert!(text.starts_with("request r: denied\n"), "{text}");
        assert!(
            text.contains("used 1234567 reserved 0 of 5000000000"),
            "{text}"
        );
        assert_eq!(receipt_json(&denied)["result"], "denied");
    }

    #[test]
    fn usage_rows_render_as_a_table_and_json() {
        assert_eq!(render_usage_rows(&[], &[]), "(no usage)\n");
        let group_by = vec!["subject".to_string(), "tag:team".to_string()];
        let rows = vec![
            UsageRow {
                period_start_ms: 1_795_435_200_000,
                group: vec!["alice".into(), "search".into()],
                requests: 2,
                input_tokens: 1_000,
                output_tokens: 200,
                cached_input_tokens: 400,
                reasoning_tokens: 50,
                cost_nusd: 4_000_000,
            },
            UsageRow {
                period_start_ms: 1_795_438_800_000,
                group: vec!["bob".into(), String::new()],
                requests: 1,
                ..Default::default()
            },
        ];
        let text = render_usage_rows(&rows, &group_by);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].starts_with("PERIOD                SUBJECT  TAG:TEAM  REQUESTS"),
            "{text}"
        );
        assert!(lines[0].ends_with("REASONING  COST_USD"), "{text}");
        assert!(
            lines[1].starts_with("2026-11-23T12:00:00Z  alice    search    2"),
            "{text}"
        );
        assert!(lines[1].ends_with("0.004000000"), "{text}");
        assert!(
            lines[2].starts_with("2026-11-23T13:00:00Z  bob      -         1"),
            "{text}"
        );
        let json = usage_row_json(&rows[0], &group_by);
        assert_eq!(json["group"]["subject"], "alice");
        assert_eq!(json["group"]["tag:team"], "search");
        assert_eq!(json["period_start"], "2026-11-23T12:00:00Z");
        assert_eq!(json["cost_usd"], "0.004000000");
        assert_eq!(json["cached_input_tokens"], 400);
    }

    #[test]
    fn overview_and_prices_render() {
        assert_eq!(
            render_overview(&GetUsageOverviewResponse::default()),
            "(no quotas apply)\n"
        );
        let text = render_overview(&GetUsageOverviewResponse {
            standings: vec![standing(Metric::CostNusd), standing(Metric::Requests)],
        });
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("QUOTA   KEY  METRIC"), "{text}");
        assert!(
            lines[1].contains("k1   cost      hard         $5.000000000"),
            "{text}"
        );
        assert!(
            lines[2].contains("k1   requests  hard         5000000000"),
            "{text}"
        );
        assert!(lines[2].ends_with("90.500s"), "{text}");

        let prices = ListPricesResponse {
            version: 3,
            models: vec![ModelPrice {
                model: "gpt-4o".into(),
                input_nusd: 2_500,
                cached_input_nusd: 1_250,
                output_nusd: 10_000,
            }],
        };
        let text = render_prices(&prices);
        assert!(text.starts_with("price catalog version 3\n"), "{text}");
        assert!(text.contains("2.500 / 1.250 / 10.000"), "{text}");
        assert_eq!(
            render_prices(&ListPricesResponse::default()),
            "price catalog version 0\n(no models priced)\n"
        );
        // What `prices list --json` prints is what `prices set` reads.
        let json = serde_json::Value::Array(prices.models.iter().map(price_json).collect());
        assert_eq!(
            parse_price_catalog(&json.to_string()).unwrap(),
            prices.models
        );
    }

    #[test]
    fn records_are_json_lines_with_integer_money() {
        let record = UsageRecord {
            seq: 12,
            at_ms: 1_795_435_200_000,
            request_id: "req-12".into(),
            subject: "k1".into(),
            subscription: "free".into(),
            model: "gpt-4o".into(),
            tags: vec![Tag {
                key: "team".into(),
                value: "search".into(),
            }],
            input_tokens: 10,
            output_tokens: 5,
            cached_input_tokens: 2,
            reasoning_tokens: 1,
            cost_nusd: 1_234_567,
            price_version: 1,
        };
        let json = usage_record_json(&record);
        let line = json.to_string();
        assert!(!line.contains('\n'));
        assert_eq!(json["seq"], 12);
        assert_eq!(json["tags"]["team"], "search");
        assert_eq!(json["cost_nusd"], 1_234_567);
        assert_eq!(json["cost_usd"], "0.001234567");
        assert_eq!(json["at"], "2026-11-23T12:00:00Z");
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
