//! Kuadrant's (Limitador's) `CheckRateLimit` and `Report`.

use tally_proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tally_proto::kuadrant::service::ratelimit::v1::rate_limit_service_server::RateLimitService;
use tonic::{Request, Response, Status};

use super::convert::{self, RequestHits, ResponseOptions};
use super::deadline;
use super::rls::decide_and_record;
use super::rls_usage::CallIds;
use crate::engine::Mode;
use crate::node::Node;

pub struct Kuadrant {
    node: Node,
    options: ResponseOptions,
    ids: CallIds,
}

impl Kuadrant {
    pub fn new(node: Node, options: ResponseOptions) -> Kuadrant {
        let ids = CallIds::new(node.id());
        Kuadrant { node, options, ids }
    }
}

#[tonic::async_trait]
impl RateLimitService for Kuadrant {
    /// Decides as ShouldRateLimit would and debits nothing; usage descriptors are checked
    /// against the hard metering quotas and record nothing (see `rls_usage`).
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
        decide_and_record(&self.node, cmd, false, &self.ids, deadline, self.options).await
    }

    /// Debits `hits_addend` (taken literally: 0 adds nothing) on every matched counter,
    /// unconditionally; OVER_LIMIT when a counter now holds more than its capacity. Usage
    /// descriptors are also recorded as usage (see `rls_usage`).
    async fn report(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let deadline = deadline::of(&request);
        let cmd = convert::command(request.into_inner(), Mode::Report, RequestHits::Literal);
        decide_and_record(&self.node, cmd, true, &self.ids, deadline, self.options).await
    }
}
