//! Envoy's `ShouldRateLimit`.

use std::time::Duration;
use tally_proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use tally_proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};

use tonic::{Request, Response, Status};

use super::convert::{self, RequestHits, ResponseOptions};
use super::{deadline, status};
use crate::engine::{Command, Mode, Outcome, RateLimitCommand};
use crate::node::Node;

pub struct Rls {
    node: Node,
    options: ResponseOptions,
}

impl Rls {
    pub fn new(node: Node, options: ResponseOptions) -> Rls {
        Rls { node, options }
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
        decide(&self.node, cmd, deadline, self.options).await
    }
}
