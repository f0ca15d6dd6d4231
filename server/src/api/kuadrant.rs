//! Kuadrant's (Limitador's) `CheckRateLimit` and `Report`.
//!
//! Their decisions are counted in the `tally_kuadrant_*` metrics (per method; see
//! [`crate::metrics`]), through the [`Metrics`] the gRPC routes' metrics layer puts in every
//! request's extensions (a call served without that layer is not counted).

use tally_proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tally_proto::kuadrant::service::ratelimit::v1::rate_limit_service_server::RateLimitService;
use tonic::{Request, Response, Status};

use super::convert::{self, RequestHits, ResponseOptions};
use super::deadline;
use super::rls::decide_and_record;
use super::rls_usage::CallIds;
use crate::engine::Mode;
use crate::metrics::{DecisionCall, Metrics};
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
        let metrics = request.extensions().get::<Metrics>().cloned();
        let cmd = convert::command(
            request.into_inner(),
            Mode::CheckOnly,
            RequestHits::ZeroMeansOne,
        );
        decide_and_record(
            &self.node,
            cmd,
            false,
            &self.ids,
            deadline,
            self.options,
            metrics.as_ref(),
            DecisionCall::CheckRateLimit,
        )
        .await
    }

    /// Debits `hits_addend` (taken literally: 0 adds nothing) on every matched counter,
    /// unconditionally; OVER_LIMIT when a counter now holds more than its capacity. Usage
    /// descriptors are also recorded as usage (see `rls_usage`).
    async fn report(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let deadline = deadline::of(&request);
        let metrics = request.extensions().get::<Metrics>().cloned();
        let cmd = convert::command(request.into_inner(), Mode::Report, RequestHits::Literal);
        decide_and_record(
            &self.node,
            cmd,
            true,
            &self.ids,
            deadline,
            self.options,
            metrics.as_ref(),
            DecisionCall::Report,
        )
        .await
    }
}
