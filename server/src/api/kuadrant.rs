//! Kuadrant's (Limitador's) `CheckRateLimit` and `Report`.

use tally_proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tally_proto::kuadrant::service::ratelimit::v1::rate_limit_service_server::RateLimitService;
use tonic::{Request, Response, Status};

use super::convert::{self, RequestHits, ResponseOptions};
use super::deadline;
use super::rls::decide;
use crate::engine::Mode;
use crate::node::Node;

pub struct Kuadrant {
    node: Node,
    options: ResponseOptions,
}

impl Kuadrant {
    pub fn new(node: Node, options: ResponseOptions) -> Kuadrant {
        Kuadrant { node, options }
    }
}

#[tonic::async_trait]
impl RateLimitService for Kuadrant {
    /// Decides as ShouldRateLimit would and debits nothing.
    async fn check_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let deadline = deadline::of(&request);
        let cmd = convert::command(
            request.into_inner(),
            Mode::CheckOnly,
            RequestHits::ZeroMeansOne,
        );
        decide(&self.node, cmd, deadline, self.options).await
    }

    /// Debits `hits_addend` (taken literally: 0 adds nothing) on every matched counter,
    /// unconditionally; OVER_LIMIT when a counter now holds more than its capacity.
    async fn report(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let deadline = deadline::of(&request);
        let cmd = convert::command(request.into_inner(), Mode::Report, RequestHits::Literal);
        decide(&self.node, cmd, deadline, self.options).await
    }
}
