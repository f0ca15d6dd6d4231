//! Envoy's `ShouldRateLimit`.

use std::time::Duration;
use tally_proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use tally_proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};

use tonic::{Request, Response, Status};

use super::convert::{self, RequestHits, ResponseOptions};
use super::rls_usage::{self, CallIds};
use super::{deadline, status};
use crate::engine::{Command, Mode, Outcome, RateLimitCommand};
use crate::node::Node;

pub struct Rls {
    node: Node,
    options: ResponseOptions,
    ids: CallIds,
}

impl Rls {
    pub fn new(node: Node, options: ResponseOptions) -> Rls {
        let ids = CallIds::new(node.id());
        Rls { node, options, ids }
    }
}

/// Validates, proposes and answers one rate-limit command (shared with the Kuadrant service).
/// Answers UNAVAILABLE, not DEADLINE_EXCEEDED, when no decision comes within the caller's
/// deadline, so Envoy applies its failure mode.
pub async fn decide(
    node: &Node,
    cmd: RateLimitCommand,
    deadline: Option<Duration>,
    options: ResponseOptions,
) -> Result<Response<RateLimitResponse>, Status> {
    cmd.validate()?;
    let propose = node.propose(Command::RateLimit(cmd));
    let outcome = match deadline {
        Some(d) => tokio::time::timeout(d, propose).await.map_err(|_| {
            Status::unavailable("no decision within the caller's deadline (no leader or no quorum)")
        })??,
        None => propose.await?,
    };
    match outcome {
        Outcome::RateLimit(decision) => Ok(Response::new(convert::response(&decision, options))),
        Outcome::Rejected(e) => Err(e.into()),
        other => Err(status::unexpected(&other)),
    }
}

#[tonic::async_trait]
impl RateLimitService for Rls {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let deadline = deadline::of(&request);
        let cmd = convert::command(
            request.into_inner(),
            Mode::Enforce,
            RequestHits::ZeroMeansOne,
        );
        cmd.validate()?;
        // Usage descriptors (Envoy's stream-done call) are recorded and also limited.
        let reports = rls_usage::reports(&cmd, false, &self.ids)?;
        let (decision, recorded) = tokio::join!(
            decide(&self.node, cmd, deadline, self.options),
            rls_usage::record(&self.node, reports, deadline)
        );
        recorded?;
        decision
    }
}
