//! API keys at the edge: Envoy's ext_authz `envoy.service.auth.v3.Authorization/Check`, and
//! `tally.v1.Models/ListModels` (the models a key may use).
//!
//! Check, for one HTTP request Envoy holds:
//! 1. a public path (exact match of the path without its query, `authz_public_paths`) passes
//!    without a key, and loses any `x-tally-*` header the client sent;
//! 2. the key comes from `authorization: Bearer <secret>` or `x-api-key` (`authz_convert`);
//!    none, or nothing shaped like a Tally secret: 401, decided here without a Raft round trip;
//! 3. otherwise `Command::Authorize` (key id, SHA-256 of the secret, model, classification) is
//!    proposed within the caller's deadline, so every replica decides alike at batch time;
//!    no decision in time: UNAVAILABLE, and Envoy applies its failure mode;
//! 4. a denial becomes 401 (unknown, deleted, expired, wrong secret) or 403 (disabled, model
//!    not allowed, classification above the subscription's ceiling), with an OpenAI-style JSON
//!    body; a grant becomes OK with the headers the rate-limit filter's descriptors use.
//!
//! A classification name that is not a level, or a model named ambiguously (header and body
//! disagree, a non-string or over-long model, a body that starts as JSON but is not), is an
//! invalid request: 403 `invalid_request_error` — but only once the key is known good (the key
//! is authorized without them), so an unauthenticated caller always gets 401 first.
//!
//! No message or header ever carries the secret.

use std::sync::Arc;

use tally_proto::envoy::service::auth::v3::authorization_server::Authorization;
use tally_proto::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use tally_proto::tally::v1::models_server::Models;
use tally_proto::tally::v1::{ListModelsRequest, ListModelsResponse};
use tonic::{Request, Response, Status};

use super::authz_convert::{self as convert, Credential, Headers, Refusal};
use super::{deadline, key_secret, status};
use crate::engine::access::{Authorization as Verdict, Authorize};
use crate::engine::{Command, Outcome};
use crate::node::Node;

/// Paths served without a key by default.
pub const DEFAULT_PUBLIC_PATHS: [&str; 2] = ["/healthz", "/readyz"];

/// How Check treats requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthzConfig {
    /// Paths (without query string) that pass without a key; exact matches.
    pub public_paths: Vec<String>,
}

impl Default for AuthzConfig {
    fn default() -> Self {
        AuthzConfig {
            public_paths: DEFAULT_PUBLIC_PATHS
                .iter()
                .map(|p| (*p).to_owned())
                .collect(),
        }
    }
}

/// Serves both `Authorization` and `Models`.
#[derive(Clone)]
pub struct Authz {
    node: Node,
    config: Arc<AuthzConfig>,
}

impl Authz {
    pub fn new(node: Node, config: AuthzConfig) -> Authz {
        Authz {
            node,
            config: Arc::new(config),
        }
    }

    /// Proposes one authorization within `deadline`.
    async fn authorize(
        &self,
        a: Authorize,
        deadline: Option<std::time::Duration>,
    ) -> Result<Verdict, Status> {
        let late =
            "no authorization decision within the caller's deadline (no leader or no quorum)";
        match deadline::propose(&self.node, Command::Authorize(a), deadline, late).await? {
            Outcome::Authorized(v) => Ok(v),
            Outcome::Rejected(e) => Err(e.into()),
            other => Err(status::unexpected(&other)),
        }
    }
}

#[tonic::async_trait]
impl Authorization for Authz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let deadline = deadline::of(&request);
        let http = request
            .into_inner()
            .attributes
            .and_then(|a| a.request)
            .and_then(|r| r.http)
            .unwrap_or_default();
        let path = convert::path_only(&http.path);
        if self.config.public_paths.iter().any(|p| p == path) {
            return Ok(Response::new(convert::public()));
        }
        let headers = Headers::new(&http);
        let (secret, key_id) = match convert::credential(&headers) {
            Credential::Missing => return Ok(denied(&Refusal::missing_key())),
            Credential::Malformed => return Ok(denied(&Refusal::malformed_key())),
            Credential::Key { secret, key_id } => (secret, key_id),
        };
        // Request problems are reported only to a caller whose key is good.
        let model = convert::model(&headers, &http);
        let classification = convert::classification(&headers);
        let authorize = Authorize {
            key_id: key_id.to_owned(),
            secret_sha256: key_secret::hash(secret),
            model: model.as_ref().ok().cloned().flatten(),
            classification: classification
                .as_ref()
                .and_then(|c| c.as_ref().ok().copied()),
        };
        let grant = match self.authorize(authorize, deadline).await? {
            Ok(grant) => grant,
            Err(denial) => return Ok(denied(&Refusal::from(&denial))),
        };
        if let Err(refusal) = model {
            return Ok(denied(&refusal));
        }
        if let Some(Err(name)) = classification {
            return Ok(denied(&convert::unknown_classification(&name)));
        }
        Ok(Response::new(convert::allowed(&grant)))
    }
}

fn denied(r: &Refusal) -> Response<CheckResponse> {
    Response::new(convert::denied(r))
}

#[tonic::async_trait]
impl Models for Authz {
    async fn list_models(
        &self,
        request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let deadline = deadline::of(&request);
        // The `api_key` field, else the call's metadata, as Check reads headers: the first
        // well-formed Tally secret wins.
        let metadata = |name: &str| {
            request
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        let candidates = [
            Some(request.get_ref().api_key.trim()).filter(|k| !k.is_empty()),
            metadata("authorization").and_then(convert::bearer_token),
            metadata("x-api-key"),
        ];
        let mut presented = candidates.iter().flatten().peekable();
        if presented.peek().is_none() {
            return Err(Status::unauthenticated(Refusal::missing_key().message));
        }
        let Some((secret, key_id)) =
            presented.find_map(|&s| Some((s, key_secret::parse(s)?.to_owned())))
        else {
            return Err(Status::unauthenticated(Refusal::malformed_key().message));
        };
        let authorize = Authorize {
            key_id,
            secret_sha256: key_secret::hash(secret),
            model: None,
            classification: None,
        };
        let grant = match self.authorize(authorize, deadline).await? {
            Ok(grant) => grant,
            Err(d) if d.is_unauthenticated() => return Err(Status::unauthenticated(d.to_string())),
            Err(d) => return Err(Status::permission_denied(d.to_string())),
        };
        // Read once this replica has applied at least the authorization just decided.
        let models = deadline::read(&self.node, deadline, |e| e.models_for(&grant.key_id))
            .await?
            .ok_or_else(|| Status::unauthenticated("this API key was deleted"))?;
        Ok(Response::new(ListModelsResponse { models }))
    }
}
