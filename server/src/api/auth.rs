//! Admin API security: bearer tokens with roles, checked by a tower layer ([`AuthLayer`])
//! in front of `tally.v1.Admin`, `tally.v1.Usage` and `tally.v1.Cluster`.
//!
//! Roles are ordered, `admin` ⊇ `billing` ⊇ `read-only`: a token may call what its role and
//! every lower role may. What each method needs is [`access_for`]:
//! - `tally.v1.Cluster` Init, AddLearner, Promote, Remove: admin; Status: read-only.
//! - `tally.v1.Admin` (GetStatus, ListLimits), `tally.v1.Audit/ListAudit`: read-only.
//! - `tally.v1.Usage` SetPrices: admin; ListPrices, QueryUsage, GetUsageOverview,
//!   ExportUsage, WatchEvents: billing; ReportUsage, Reserve, Commit, Release: open. They are
//!   the gateways' data path (like Envoy's RLS, which is not guarded at all): anyone who
//!   reaches the listener may call them, but a token sent with them must be valid.
//! - a method of a guarded service not named here needs admin (fail closed).
//!
//! Tokens come from a file (`--auth-tokens`: YAML or JSON, a list of
//! `{ name, role, token_sha256 }`; only the SHA-256 of each token is stored, so the file holds
//! no secret) and/or `TALLY_ADMIN_TOKEN` (one admin token, plain). A token is checked by
//! comparing its SHA-256 digest with every configured digest in constant time.
//!
//! With no token configured, guarded methods are served only to loopback peers (127.0.0.1,
//! ::1) and bearer metadata is ignored; any other peer is answered UNAUTHENTICATED, saying how
//! to configure tokens. With tokens: no token → UNAUTHENTICATED, an unknown token →
//! UNAUTHENTICATED, a valid token whose role is too low → PERMISSION_DENIED naming the role
//! needed. A refusal never echoes the token, and no token is ever logged.
//!
//! The caller of an admitted call is in the request's extensions as a [`Caller`] (absent on
//! an open method called without a token).

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// Metadata that carries the bearer token.
pub const AUTHORIZATION: &str = "authorization";

/// The shortest plain token accepted from `TALLY_ADMIN_TOKEN`.
pub const MIN_TOKEN_LEN: usize = 16;

/// What a token may call. Ordered: `ReadOnly < Billing < Admin`, and a role may call all that
/// the roles below it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Status and limits (`tally.v1.Admin`, `tally.v1.Cluster/Status`).
    ReadOnly,
    /// Billing reads: prices, usage queries, overview, export, events.
    Billing,
    /// Everything: prices, cluster membership.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ReadOnly => "read-only",
            Role::Billing => "billing",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "billing" => Ok(Role::Billing),
            "read-only" => Ok(Role::ReadOnly),
            other => Err(format!(
                "unknown role `{other}` (expected admin, billing or read-only)"
            )),
        }
    }
}

/// How a caller was admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallerKind {
    /// By a configured bearer token.
    Token,
    /// From a loopback peer while no token is configured (role admin).
    Loopback,
}

/// Who made an admitted call: in the request's extensions, for handlers (and the audit log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's name from the tokens file (`TALLY_ADMIN_TOKEN` for the env token), or
    /// `loopback`.
    pub name: Arc<str>,
    pub role: Role,
    pub kind: CallerKind,
}

/// The name a [`CallerKind::Loopback`] caller has.
pub const LOOPBACK_CALLER: &str = "loopback";
/// The name the `TALLY_ADMIN_TOKEN` token has.
pub const ENV_TOKEN_NAME: &str = "TALLY_ADMIN_TOKEN";

/// What a method needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The data path: no token needed; a token sent must be valid.
    Open,
    /// A token with at least this role (or loopback while no token is configured).
    Needs(Role),
}

/// What the gRPC method at `path` (`/package.Service/Method`) needs. Only the services the
/// layer is put in front of reach it; an unknown method needs admin.
pub fn access_for(path: &str) -> Access {
    let (service, method) = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .unwrap_or(("", ""));
    use Access::{Needs, Open};
    use Role::{Admin, Billing, ReadOnly};
    match (service, method) {
        ("tally.v1.Cluster", "Status") => Needs(ReadOnly),
        ("tally.v1.Cluster", "Init" | "AddLearner" | "Promote" | "Remove") => Needs(Admin),
        ("tally.v1.Admin", "GetStatus" | "ListLimits") => Needs(ReadOnly),
        ("tally.v1.Usage", "ReportUsage" | "Reserve" | "Commit" | "Release") => Open,
        ("tally.v1.Usage", "SetPrices") => Needs(Admin),
        // Authenticated by the asking key's own secret (or an admin token: checked inside).
        ("tally.v1.Keys", "CreateEphemeralKey") => Open,
        ("tally.v1.Keys", "ListKeys" | "GetKey" | "ListSubscriptions") => Needs(ReadOnly),
        ("tally.v1.Audit", "ListAudit") => Needs(ReadOnly),
        (
            "tally.v1.Usage",
            "ListPrices" | "QueryUsage" | "GetUsageOverview" | "ExportUsage" | "WatchEvents",
        ) => Needs(Billing),
        _ => Needs(Admin),
    }
}

/// The SHA-256 of a token, lower-case hex: what a tokens file stores.
pub fn sha256_hex(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let text = text.as_bytes();
    if text.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in text.chunks(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// One line of a tokens file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    role: Role,
    token_sha256: String,
}

#[derive(Clone)]
struct Entry {
    name: Arc<str>,
    role: Role,
    digest: [u8; 32],
}

/// Why the token configuration could not be loaded. No variant holds a token.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("cannot read tokens file {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "tokens file {origin}: {reason} (expected a list of {{ name, role, token_sha256 }}; `tally auth new-token` makes a token and its hash)"
    )]
    Parse { origin: String, reason: String },
    #[error("tokens file {origin}: token {index} (`{name}`): {reason}")]
    Invalid {
        origin: String,
        index: usize,
        name: String,
        reason: String,
    },
    #[error("TALLY_ADMIN_TOKEN: {0}")]
    AdminToken(String),
}

/// The tokens a server accepts. Empty (the default): guarded methods only from loopback.
///
/// Cheap to clone. Its `Debug` shows names and roles, never digests.
#[derive(Clone, Default)]
pub struct AuthConfig {
    entries: Arc<Vec<Entry>>,
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.entries
                    .iter()
                    .map(|e| format!("{} ({})", e.name, e.role)),
            )
            .finish()
    }
}

impl AuthConfig {
    /// Reads a tokens file (YAML, or JSON: a YAML flow list).
    pub fn from_file(path: &Path) -> Result<AuthConfig, AuthConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| AuthConfigError::Io {
            path: path.to_owned(),
            error,
        })?;
        AuthConfig::default().with_file_text(&text, &path.display().to_string())
    }

    /// Adds the tokens of a tokens file's text; `origin` names it in errors.
    pub fn with_file_text(self, text: &str, origin: &str) -> Result<AuthConfig, AuthConfigError> {
        let parsed: Vec<TokenEntry> =
            serde_saphyr::from_str(text).map_err(|e| AuthConfigError::Parse {
                origin: origin.to_owned(),
                reason: e.to_string(),
            })?;
        let mut config = self;
        for (index, entry) in parsed.into_iter().enumerate() {
            let invalid = |reason: String| AuthConfigError::Invalid {
                origin: origin.to_owned(),
                index,
                name: entry.name.clone(),
                reason,
            };
            let digest = parse_digest(entry.token_sha256.trim()).ok_or_else(|| {
                invalid("token_sha256 must be 64 hex digits (`tally auth hash-token`)".into())
            })?;
            config = config
                .with_digest(&entry.name, entry.role, digest)
                .map_err(invalid)?;
        }
        Ok(config)
    }

    /// Adds the plain admin token of `TALLY_ADMIN_TOKEN` (named after the variable).
    pub fn with_admin_token(self, token: &str) -> Result<AuthConfig, AuthConfigError> {
        let token = token.trim();
        if token.len() < MIN_TOKEN_LEN {
            return Err(AuthConfigError::AdminToken(format!(
                "must be at least {MIN_TOKEN_LEN} characters (`tally auth new-token` makes one)"
            )));
        }
        if !is_token_text(token) {
            return Err(AuthConfigError::AdminToken(
                "must be printable ASCII without spaces".into(),
            ));
        }
        self.with_token(ENV_TOKEN_NAME, Role::Admin, token)
            .map_err(AuthConfigError::AdminToken)
    }

    /// Adds a plain token (hashed here; the token itself is not kept).
    pub fn with_token(self, name: &str, role: Role, token: &str) -> Result<AuthConfig, String> {
        self.with_digest(name, role, Sha256::digest(token.trim().as_bytes()).into())
    }

    fn with_digest(mut self, name: &str, role: Role, digest: [u8; 32]) -> Result<Self, String> {
        if name.trim().is_empty() {
            return Err("name must not be empty".into());
        }
        if self.entries.iter().any(|e| &*e.name == name) {
            return Err(format!("the name `{name}` is used twice"));
        }
        if self
            .entries
            .iter()
            .any(|e| bool::from(e.digest.ct_eq(&digest)))
        {
            return Err("the same token is configured twice".into());
        }
        Arc::make_mut(&mut self.entries).push(Entry {
            name: name.into(),
            role,
            digest,
        });
        Ok(self)
    }

    /// Whether any token is configured (else: loopback only).
    pub fn is_configured(&self) -> bool {
        !self.entries.is_empty()
    }

    /// How many tokens are configured.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no token is configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The configured token whose digest is the token's, compared in constant time against
    /// every entry (which entry matched, if any, does not change the time taken).
    fn lookup(&self, token: &[u8]) -> Option<&Entry> {
        let digest: [u8; 32] = Sha256::digest(token).into();
        let mut found = u32::MAX;
        for (i, e) in self.entries.iter().enumerate() {
            found.conditional_assign(&(i as u32), e.digest.ct_eq(&digest));
        }
        self.entries.get(found as usize)
    }

    /// Decides a call to `path` carrying `authorization` (the metadata's raw value, if any)
    /// from `peer`: the caller to record, `None` for an open method called without a token.
    pub fn authorize(
        &self,
        path: &str,
        authorization: Option<&[u8]>,
        peer: Option<IpAddr>,
    ) -> Result<Option<Caller>, AuthError> {
        let access = access_for(path);
        let method = || path.trim_start_matches('/').to_owned();
        if !self.is_configured() {
            // No tokens: bearer metadata is ignored; the peer decides.
            return match access {
                Access::Open => Ok(None),
                Access::Needs(_) if peer.is_some_and(is_loopback) => Ok(Some(Caller {
                    name: LOOPBACK_CALLER.into(),
                    role: Role::Admin,
                    kind: CallerKind::Loopback,
                })),
                Access::Needs(_) => Err(AuthError::LoopbackOnly { method: method() }),
            };
        }
        let Some(raw) = authorization else {
            return match access {
                Access::Open => Ok(None),
                Access::Needs(needs) => Err(AuthError::MissingToken {
                    method: method(),
                    needs,
                }),
            };
        };
        let token = bearer_token(raw).ok_or(AuthError::Malformed)?;
        let entry = self.lookup(token).ok_or(AuthError::InvalidToken)?;
        if let Access::Needs(needs) = access
            && entry.role < needs
        {
            return Err(AuthError::Forbidden {
                method: method(),
                needs,
                name: entry.name.to_string(),
                role: entry.role,
            });
        }
        Ok(Some(Caller {
            name: entry.name.clone(),
            role: entry.role,
            kind: CallerKind::Token,
        }))
    }
}

fn is_token_text(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic())
}

/// The token of `Bearer <token>` (scheme case-insensitive, surrounding spaces ignored).
fn bearer_token(raw: &[u8]) -> Option<&[u8]> {
    let raw = raw.trim_ascii();
    let (scheme, rest) = raw.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || !rest.first()?.is_ascii_whitespace() {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty() && token.iter().all(u8::is_ascii_graphic)).then_some(token)
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Why a call was refused (mapped to a status in `api::status`). Never holds a token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "{method} is served only to loopback peers while no admin tokens are configured: start tallyd with --auth-tokens FILE (or TALLY_ADMIN_TOKEN) and send `authorization: Bearer <token>`"
    )]
    LoopbackOnly { method: String },
    #[error(
        "{method} needs a bearer token with role {needs}: send `authorization: Bearer <token>`"
    )]
    MissingToken { method: String, needs: Role },
    #[error("the authorization metadata is not `Bearer <token>`")]
    Malformed,
    #[error("invalid bearer token")]
    InvalidToken,
    #[error("{method} needs role {needs}; token `{name}` has role {role}")]
    Forbidden {
        method: String,
        needs: Role,
        name: String,
        role: Role,
    },
}

/// The peer's IP address, from the connection info tonic puts in every request's extensions.
fn peer_ip(extensions: &http::Extensions) -> Option<IpAddr> {
    let addr: Option<SocketAddr> = match extensions.get::<TcpConnectInfo>() {
        Some(tcp) => tcp.remote_addr(),
        None => extensions
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|tls| tls.get_ref().remote_addr()),
    };
    addr.map(|a| a.ip())
}

/// The tokens in force, shared by every guarded service and replaceable while serving (the
/// tokens file is re-read when it changes: `server.rs`). Each call reads the tokens in force
/// when it arrives.
#[derive(Clone, Debug, Default)]
pub struct SharedAuth(Arc<parking_lot::RwLock<AuthConfig>>);

impl SharedAuth {
    pub fn new(config: AuthConfig) -> SharedAuth {
        SharedAuth(Arc::new(parking_lot::RwLock::new(config)))
    }

    /// The tokens in force (a cheap clone).
    pub fn get(&self) -> AuthConfig {
        self.0.read().clone()
    }

    /// Puts `config` in force for every call from now on.
    pub fn replace(&self, config: AuthConfig) {
        *self.0.write() = config;
    }
}

impl From<AuthConfig> for SharedAuth {
    fn from(config: AuthConfig) -> SharedAuth {
        SharedAuth::new(config)
    }
}

/// Puts [`AuthConfig::authorize`] in front of a gRPC service.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    config: SharedAuth,
}

impl AuthLayer {
    pub fn new(config: impl Into<SharedAuth>) -> AuthLayer {
        AuthLayer {
            config: config.into(),
        }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Guarded<S>;
    fn layer(&self, inner: S) -> Guarded<S> {
        Guarded {
            inner,
            config: self.config.clone(),
        }
    }
}

/// A gRPC service behind the token check (see [`AuthLayer`]).
#[derive(Clone, Debug)]
pub struct Guarded<S> {
    inner: S,
    config: SharedAuth,
}

impl<S: NamedService> NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower_service::Service<http::Request<Body>> for Guarded<S>
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + Clone,
    S::Future: Unpin,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = GuardedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let decided = self.config.get().authorize(
            request.uri().path(),
            request
                .headers()
                .get(AUTHORIZATION)
                .map(http::HeaderValue::as_bytes),
            peer_ip(request.extensions()),
        );
        match decided {
            Ok(caller) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                // The clone is ready in its turn (tower's clone-and-call pattern: the ready
                // one serves this call).
                let clone = self.inner.clone();
                let mut ready = std::mem::replace(&mut self.inner, clone);
                GuardedFuture::Inner(ready.call(request))
            }
            Err(e) => {
                tracing::debug!(path = request.uri().path(), error = %e, "call refused");
                let status: tonic::Status = e.into();
                GuardedFuture::Refused(Some(status.into_http()))
            }
        }
    }
}

/// The inner service's answer, or the refusal.
pub enum GuardedFuture<F> {
    Inner(F),
    Refused(Option<http::Response<Body>>),
}

impl<F> Future for GuardedFuture<F>
where
    F: Future<Output = Result<http::Response<Body>, Infallible>> + Unpin,
{
    type Output = Result<http::Response<Body>, Infallible>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            GuardedFuture::Inner(f) => Pin::new(f).poll(cx),
            GuardedFuture::Refused(r) => Poll::Ready(Ok(r
                .take()
                .expect("a refusal is polled to completion once"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    const REMOTE: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 2, 3)));

    fn tokens() -> AuthConfig {
        let file = format!(
            "- {{ name: ops, role: admin, token_sha256: {} }}\n\
             - {{ name: finance, role: billing, token_sha256: {} }}\n\
             - {{ name: dash, role: read-only, token_sha256: {} }}\n",
            sha256_hex("admin-token-0123456789"),
            sha256_hex("billing-token-0123456789").to_uppercase(),
            sha256_hex("reader-token-0123456789"),
        );
        AuthConfig::default().with_file_text(&file, "test").unwrap()
    }

    fn bearer(token: &str) -> Vec<u8> {
        format!("Bearer {token}").into_bytes()
    }

    #[test]
    fn sha256_hex_is_the_standard_digest() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Admin > Role::Billing && Role::Billing > Role::ReadOnly);
        assert_eq!("read-only".parse::<Role>(), Ok(Role::ReadOnly));
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn every_method_has_its_access() {
        use Access::*;
        for (path, access) in [
            ("/tally.v1.Cluster/Init", Needs(Role::Admin)),
            ("/tally.v1.Cluster/AddLearner", Needs(Role::Admin)),
            ("/tally.v1.Cluster/Promote", Needs(Role::Admin)),
            ("/tally.v1.Cluster/Remove", Needs(Role::Admin)),
            ("/tally.v1.Cluster/Status", Needs(Role::ReadOnly)),
            ("/tally.v1.Admin/GetStatus", Needs(Role::ReadOnly)),
            ("/tally.v1.Admin/ListLimits", Needs(Role::ReadOnly)),
            ("/tally.v1.Usage/SetPrices", Needs(Role::Admin)),
            ("/tally.v1.Usage/ListPrices", Needs(Role::Billing)),
            ("/tally.v1.Usage/QueryUsage", Needs(Role::Billing)),
            ("/tally.v1.Usage/GetUsageOverview", Needs(Role::Billing)),
            ("/tally.v1.Usage/ExportUsage", Needs(Role::Billing)),
            ("/tally.v1.Usage/WatchEvents", Needs(Role::Billing)),
            ("/tally.v1.Usage/ReportUsage", Open),
            ("/tally.v1.Usage/Reserve", Open),
            ("/tally.v1.Usage/Commit", Open),
            ("/tally.v1.Usage/Release", Open),
            ("/tally.v1.Usage/SomethingNew", Needs(Role::Admin)),
            ("/tally.v1.Admin/SomethingNew", Needs(Role::Admin)),
            ("garbage", Needs(Role::Admin)),
        ] {
            assert_eq!(access_for(path), access, "{path}");
        }
    }

    #[test]
    fn without_tokens_only_loopback_may_call_guarded_methods() {
        let none = AuthConfig::default();
        for peer in [
            LOCAL,
            Some("::1".parse().unwrap()),
            Some("::ffff:127.0.0.1".parse().unwrap()),
        ] {
            let caller = none
                .authorize("/tally.v1.Usage/SetPrices", None, peer)
                .unwrap()
                .unwrap();
            assert_eq!(
                (caller.role, caller.kind),
                (Role::Admin, CallerKind::Loopback)
            );
        }
        // A bearer is ignored: the peer decides.
        let b = bearer("whatever-it-is-0123");
        assert!(
            none.authorize("/tally.v1.Admin/GetStatus", Some(&b), LOCAL)
                .is_ok()
        );
        for peer in [REMOTE, None] {
            let e = none
                .authorize("/tally.v1.Cluster/AddLearner", None, peer)
                .unwrap_err();
            assert!(matches!(e, AuthError::LoopbackOnly { .. }), "{e:?}");
            assert!(e.to_string().contains("--auth-tokens"), "{e}");
        }
        // The data path is open to everyone.
        assert_eq!(
            none.authorize("/tally.v1.Usage/ReportUsage", None, REMOTE),
            Ok(None)
        );
    }

    #[test]
    fn with_tokens_the_role_decides() {
        let t = tokens();
        let admin = bearer("admin-token-0123456789");
        let billing = bearer("billing-token-0123456789");
        let reader = bearer("reader-token-0123456789");
        // No loopback exemption once tokens are configured.
        assert!(matches!(
            t.authorize("/tally.v1.Admin/GetStatus", None, LOCAL),
            Err(AuthError::MissingToken {
                needs: Role::ReadOnly,
                ..
            })
        ));
        assert_eq!(
            t.authorize(
                "/tally.v1.Admin/GetStatus",
                Some(b"Bearer nope-nope-nope"),
                LOCAL
            ),
            Err(AuthError::InvalidToken)
        );
        for malformed in [
            &b"admin-token-0123456789"[..],
            b"Basic abc",
            b"Bearer",
            b"Bearer  ",
        ] {
            assert_eq!(
                t.authorize("/tally.v1.Admin/GetStatus", Some(malformed), LOCAL),
                Err(AuthError::Malformed),
                "{malformed:?}"
            );
        }
        let caller = t
            .authorize("/tally.v1.Admin/GetStatus", Some(&reader), REMOTE)
            .unwrap()
            .unwrap();
        assert_eq!((&*caller.name, caller.role), ("dash", Role::ReadOnly));
        let e = t
            .authorize("/tally.v1.Usage/SetPrices", Some(&reader), REMOTE)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "tally.v1.Usage/SetPrices needs role admin; token `dash` has role read-only"
        );
        assert!(
            t.authorize("/tally.v1.Usage/QueryUsage", Some(&billing), REMOTE)
                .is_ok()
        );
        assert!(matches!(
            t.authorize("/tally.v1.Cluster/AddLearner", Some(&billing), REMOTE),
            Err(AuthError::Forbidden {
                needs: Role::Admin,
                ..
            })
        ));
        for path in ["/tally.v1.Cluster/Init", "/tally.v1.Usage/ExportUsage"] {
            assert!(t.authorize(path, Some(&admin), REMOTE).is_ok(), "{path}");
        }
        // Scheme case and spacing do not matter.
        assert!(
            t.authorize(
                "/tally.v1.Usage/SetPrices",
                Some(b"  bearer   admin-token-0123456789 "),
                REMOTE
            )
            .is_ok()
        );
    }

    #[test]
    fn the_data_path_is_open_but_a_sent_token_must_be_valid() {
        let t = tokens();
        assert_eq!(
            t.authorize("/tally.v1.Usage/ReportUsage", None, REMOTE),
            Ok(None)
        );
        assert_eq!(
            t.authorize(
                "/tally.v1.Usage/Commit",
                Some(b"Bearer wrong-wrong"),
                REMOTE
            ),
            Err(AuthError::InvalidToken)
        );
        let reader = bearer("reader-token-0123456789");
        let caller = t
            .authorize("/tally.v1.Usage/Reserve", Some(&reader), REMOTE)
            .unwrap()
            .unwrap();
        assert_eq!(caller.role, Role::ReadOnly);
    }

    #[test]
    fn tokens_files_are_checked() {
        let good = sha256_hex("x");
        let json = format!(r#"[{{"name": "a", "role": "billing", "token_sha256": "{good}"}}]"#);
        assert_eq!(
            AuthConfig::default()
                .with_file_text(&json, "j")
                .unwrap()
                .len(),
            1
        );
        for (text, expected) in [
            (
                format!("- {{ name: a, role: root, token_sha256: {good} }}"),
                "unknown variant",
            ),
            (
                "- { name: a, role: admin, token_sha256: abc }".to_string(),
                "64 hex digits",
            ),
            (
                format!("- {{ name: a, role: admin, token: {good} }}"),
                "unknown field",
            ),
            (
                format!(
                    "- {{ name: a, role: admin, token_sha256: {good} }}\n- {{ name: a, role: admin, token_sha256: {} }}",
                    sha256_hex("y")
                ),
                "used twice",
            ),
            (
                format!(
                    "- {{ name: a, role: admin, token_sha256: {good} }}\n- {{ name: b, role: admin, token_sha256: {good} }}"
                ),
                "configured twice",
            ),
        ] {
            let e = AuthConfig::default()
                .with_file_text(&text, "f")
                .unwrap_err()
                .to_string();
            assert!(e.contains(expected), "{text}: {e}");
        }
    }

    /// A stand-in for a generated server: answers 200 with the caller's name in a header.
    #[derive(Clone)]
    struct Echo;

    impl tower_service::Service<http::Request<Body>> for Echo {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<http::Response<Body>, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, request: http::Request<Body>) -> Self::Future {
            let mut response = http::Response::new(Body::empty());
            if let Some(caller) = request.extensions().get::<Caller>() {
                let value = format!("{} {}", caller.name, caller.role);
                response
                    .headers_mut()
                    .insert("x-caller", value.parse().unwrap());
            }
            std::future::ready(Ok(response))
        }
    }

    async fn through_layer(
        config: &AuthConfig,
        path: &str,
        token: Option<&str>,
        peer: &str,
    ) -> http::Response<Body> {
        use tower_layer::Layer as _;
        use tower_service::Service as _;
        let mut request = http::Request::builder().uri(path);
        if let Some(token) = token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let mut request = request.body(Body::empty()).unwrap();
        request.extensions_mut().insert(TcpConnectInfo {
            local_addr: None,
            remote_addr: Some(peer.parse().unwrap()),
        });
        AuthLayer::new(config.clone())
            .layer(Echo)
            .call(request)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn the_layer_hands_the_caller_to_the_handler_or_answers_the_refusal() {
        let t = tokens();
        let r = through_layer(
            &t,
            "/tally.v1.Usage/QueryUsage",
            Some("billing-token-0123456789"),
            "10.0.0.1:5000",
        )
        .await;
        assert_eq!(r.headers()["x-caller"], "finance billing");
        let r = through_layer(
            &t,
            "/tally.v1.Usage/QueryUsage",
            Some("reader-token-0123456789"),
            "10.0.0.1:5000",
        )
        .await;
        assert!(r.headers().get("x-caller").is_none());
        assert_eq!(r.headers()["grpc-status"], "7"); // PERMISSION_DENIED
        let r = through_layer(&t, "/tally.v1.Usage/ReportUsage", None, "10.0.0.1:5000").await;
        assert!(r.headers().get("x-caller").is_none() && r.headers().get("grpc-status").is_none());
        let none = AuthConfig::default();
        let r = through_layer(&none, "/tally.v1.Admin/GetStatus", None, "[::1]:5000").await;
        assert_eq!(r.headers()["x-caller"], "loopback admin");
        let r = through_layer(&none, "/tally.v1.Admin/GetStatus", None, "10.0.0.1:5000").await;
        assert_eq!(r.headers()["grpc-status"], "16"); // UNAUTHENTICATED
    }

    #[test]
    fn the_env_token_is_an_admin_token_and_never_shown() {
        let secret = "s3cr3t-s3cr3t-s3cr3t";
        let t = AuthConfig::default().with_admin_token(secret).unwrap();
        let caller = t
            .authorize("/tally.v1.Cluster/Remove", Some(&bearer(secret)), REMOTE)
            .unwrap()
            .unwrap();
        assert_eq!((&*caller.name, caller.role), (ENV_TOKEN_NAME, Role::Admin));
        assert!(!format!("{t:?}").contains(secret));
        let e = AuthConfig::default()
            .with_admin_token("short")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("short"), "{e}");
        // Env token and file together.
        let both = tokens().with_admin_token(secret).unwrap();
        assert_eq!(both.len(), 4);
    }
}
