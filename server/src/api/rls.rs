//! Envoy's `ShouldRateLimit`.

use tally_proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use tally_proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tonic::{Request, Response, Status};

use super::convert::{self, RequestHits, ResponseOptions};
use super::status;
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
pub async fn decide(
    node: &Node,
    cmd: RateLimitCommand,
    options: ResponseOptions,
) -> Result<Response<RateLimitResponse>, Status> {
    cmd.validate()?;
    match node.propose(Command::RateLimit(cmd)).await? {
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
        let cmd = convert::command(
            request.into_inner(),
            Mode::Enforce,
            RequestHits::ZeroMeansOne,
        );
        decide(&self.node, cmd, self.options).await
    }
}
