//! The gRPC and HTTP surface. Every service turns wire messages into engine commands at the
//! boundary (`convert`), proposes them through the [`Node`], and turns outcomes back.
//!
//! Layout:
//! - `rls`: `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`.
//! - `kuadrant`: `kuadrant.service.ratelimit.v1.RateLimitService` (CheckRateLimit, Report).
//! - `rls_usage`: usage descriptors of rate-limit calls (stream-done, Report) as usage reports,
//!   and request-time checks of the hard quotas.
//! - `rls_reserve`: `usage=reserve` descriptors: reservations taken at request time.
//! - `auth`: bearer tokens with roles in front of `tally.v1.Admin`, `tally.v1.Usage` and
//!   `tally.v1.Cluster` ([`auth::AuthLayer`]); loopback only while no token is configured.
//! - `admin`: `tally.v1.Admin` (status, limits in force).
//! - `audit`: `tally.v1.Audit` (the audit log), and the caller of an admin call as the
//!   engine's `Actor` (every admin change is proposed as `Command::Audited`).
//! - `authz`: API keys at the edge: Envoy's ext_authz `envoy.service.auth.v3.Authorization`
//!   and `tally.v1.Models` (never behind admin tokens: the key is the credential), with the
//!   wire ⇄ domain conversions in `authz_convert`; `key_secret`: the secrets' format.
//! - `usage`: `tally.v1.Usage` (usage reports, reservations, prices, billing queries, export,
//!   quota events), with its wire ⇄ domain conversions in `usage_convert`.
//! - `convert`: wire ⇄ domain conversions, response headers and bodies.
//! - `status`: the one place errors become gRPC statuses.
//! - `request_span`: a `tracing` span per gRPC call (method, request id, traceparent).
//! - `http`: `/healthz`, `/readyz` and `/metrics` (see [`crate::metrics`]).
//!
//! Architecture invariant: no protobuf type crosses into `engine` or `node`.

mod admin;
pub mod audit;
pub mod auth;
pub mod authz;
mod authz_convert;
pub mod cluster;
mod convert;
mod deadline;
pub mod http;
pub mod key_secret;
mod keys;
mod kuadrant;
pub mod raft;
pub mod request_span;
mod rls;
mod rls_reserve;
mod rls_usage;
pub(crate) mod status;
mod usage;
mod usage_convert;

use tally_proto::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use tally_proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use tally_proto::kuadrant::service::ratelimit::v1::rate_limit_service_server::RateLimitServiceServer as KuadrantServer;
use tally_proto::tally::v1::admin_server::AdminServer;
use tally_proto::tally::v1::audit_server::AuditServer;
use tally_proto::tally::v1::keys_server::KeysServer;
use tally_proto::tally::v1::models_server::ModelsServer;
use tally_proto::tally::v1::usage_server::UsageServer;
use tokio::sync::watch;
use tonic::service::Routes;
use tower_layer::Layer;

pub use authz::AuthzConfig;
pub use convert::{OVER_LIMIT_BODY, ResponseOptions};

use crate::metrics::Metrics;
use crate::node::Node;

/// Largest gRPC message accepted, bytes. Far above any valid request (64 descriptors of 32
/// entries of 1 KiB values is about 2 MiB at the extreme), far below memory trouble.
pub const MAX_GRPC_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Every Tally gRPC service, plus gRPC health and reflection, ready to serve. Long-lived
/// streams (`tally.v1.Usage/WatchEvents`) end only when their client goes away: a server that
/// shuts down gracefully should use [`grpc_routes_with_stop`].
pub async fn grpc_routes(node: Node, options: ResponseOptions) -> Routes {
    // A sender dropped at once: the stop never comes.
    let (_, never) = watch::channel(false);
    grpc_routes_with_stop(node, options, never).await
}

/// [`grpc_routes`], with long-lived streams ending once `stop` turns true (the server's
/// graceful shutdown waits for every open stream, so they must end). No token is configured:
/// the admin and billing methods answer loopback peers only. The calls are counted in a
/// [`Metrics`] of their own.
pub async fn grpc_routes_with_stop(
    node: Node,
    options: ResponseOptions,
    stop: watch::Receiver<bool>,
) -> Routes {
    let authz = AuthzConfig::default();
    let auth = auth::AuthConfig::default();
    grpc_routes_secured(node, options, auth, authz, stop, Metrics::new()).await
}

/// [`grpc_routes_with_stop`] with the admin API's tokens: `tally.v1.Admin` and
/// `tally.v1.Usage` are behind [`auth::AuthLayer`] (see `auth` for which method needs which
/// role); Envoy RLS, Kuadrant, ext_authz and `tally.v1.Models` (`authz`, configured by
/// `authz`), health and reflection are not guarded. Every call (unknown paths too) is counted
/// and timed in `metrics`, and ShouldRateLimit's decisions are counted there.
pub async fn grpc_routes_secured(
    node: Node,
    options: ResponseOptions,
    auth: impl Into<auth::SharedAuth>,
    authz: AuthzConfig,
    stop: watch::Receiver<bool>,
    metrics: Metrics,
) -> Routes {
    let guard = auth::AuthLayer::new(auth);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<RateLimitServiceServer<rls::Rls>>()
        .await;
    health_reporter
        .set_serving::<KuadrantServer<kuadrant::Kuadrant>>()
        .await;
    health_reporter
        .set_serving::<AdminServer<admin::Admin>>()
        .await;
    health_reporter
        .set_serving::<UsageServer<usage::Usage>>()
        .await;
    health_reporter
        .set_serving::<AuthorizationServer<authz::Authz>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tally_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor set is valid");
    let rls = RateLimitServiceServer::new(rls::Rls::new(node.clone(), options, metrics.clone()))
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    let kuadrant = KuadrantServer::new(kuadrant::Kuadrant::new(node.clone(), options))
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    let usage = guard.layer(
        UsageServer::new(usage::Usage::new(node.clone(), stop))
            .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES),
    );
    let keys = guard.layer(KeysServer::new(keys::Keys::new(node.clone())));
    let authz = authz::Authz::new(node.clone(), authz);
    let ext_authz =
        AuthorizationServer::new(authz.clone()).max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    let models = ModelsServer::new(authz);
    let audit = guard.layer(AuditServer::new(audit::Audit::new(node.clone())));
    let admin = guard.layer(AdminServer::new(admin::Admin::new(node)));
    let routes = Routes::new(rls)
        .add_service(audit)
        .add_service(keys)
        .add_service(kuadrant)
        .add_service(admin)
        .add_service(usage)
        .add_service(ext_authz)
        .add_service(models)
        .add_service(health_service)
        .add_service(reflection);
    // Outermost, and over the fallback as well: every call is counted, unknown ones too, and
    // every call's log lines carry its method and request id.
    Routes::from(
        routes
            .into_axum_router()
            .layer(metrics.grpc_layer())
            .layer(request_span::RequestSpanLayer),
    )
}
