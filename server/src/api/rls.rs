//! Envoy's `ShouldRateLimit`.

use std::time::Duration;
use tally_proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use tally_proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};

use tonic::{Request, Response, Status};

use super::convert::{self, RequestHits, ResponseOptions};
use super::rls_reserve;
use super::rls_usage::{self, CallIds};
use super::{deadline, status};
use crate::engine::{Command, Decision, Mode, Outcome, RateLimitCommand};
use crate::metrics::Metrics;
use crate::node::Node;

pub struct Rls {
    node: Node,
    options: ResponseOptions,
    ids: CallIds,
    metrics: Metrics,
}

impl Rls {
    pub fn new(node: Node, options: ResponseOptions, metrics: Metrics) -> Rls {
        let ids = CallIds::new(node.id());
        Rls {
            node,
            options,
            ids,
            metrics,
        }
    }
}

/// Validates, proposes and answers one rate-limit command (shared with the Kuadrant service),
/// recording its usage descriptors as usage and checking its check-only ones against the hard
/// metering quotas (see `rls_usage`); `request_hits_count`: the request-level hits are usage
/// too (Kuadrant's Report). Nothing is recorded for an invalid command. Answers UNAVAILABLE,
/// not DEADLINE_EXCEEDED, when no decision comes within the caller's deadline, so Envoy
/// applies its failure mode.
pub async fn decide_and_record(
    node: &Node,
    cmd: RateLimitCommand,
    request_hits_count: bool,
    ids: &CallIds,
    deadline: Option<Duration>,
    options: ResponseOptions,
) -> Result<Response<RateLimitResponse>, Status> {
    let decision = decide_and_record_decision(node, cmd, request_hits_count, ids, deadline).await?;
    Ok(Response::new(convert::response(&decision, options)))
}

/// [`decide_and_record`], answering the decision itself (with the hard quotas' checks merged
/// into it) rather than its wire response.
async fn decide_and_record_decision(
    node: &Node,
    cmd: RateLimitCommand,
    request_hits_count: bool,
    ids: &CallIds,
    deadline: Option<Duration>,
) -> Result<Decision, Status> {
    cmd.validate()?;
    let reports = rls_usage::reports(&cmd, request_hits_count, ids)?;
    let mut checks = rls_usage::quota_checks(&cmd)?;
    let holds = rls_reserve::holds(&cmd)?;
    // Side by side: a check or reservation adds no Raft round trip of its own to the call.
    let (decision, recorded, checked, taken) = tokio::join!(
        propose_decision(node, cmd, deadline),
        rls_usage::record(node, reports, deadline),
        rls_usage::check(node, &checks, deadline),
        rls_reserve::take(node, &holds, deadline),
    );
    recorded?;
    let (mut decision, mut answers, taken) = (decision?, checked?, taken?);
    // Reservations answer like checks: denied, or their hard quotas' standings.
    checks.extend(holds.iter().map(|h| h.check.clone()));
    answers.extend(taken.iter().map(|t| t.answer.clone()));
    rls_usage::merge(node, &mut decision, &checks, &answers).await;
    rls_reserve::release_if_refused(node, &decision, &holds, &taken, deadline).await;
    Ok(decision)
}

async fn propose_decision(
    node: &Node,
    cmd: RateLimitCommand,
    deadline: Option<Duration>,
) -> Result<Decision, Status> {
    let outcome = deadline::propose(
        node,
        Command::RateLimit(cmd),
        deadline,
        "no decision within the caller's deadline (no leader or no quorum)",
    )
    .await?;
    match outcome {
        Outcome::RateLimit(decision) => Ok(decision),
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
        // What the metrics count a decision's statuses with (the command is moved below).
        let domain = cmd.domain.clone();
        let hits: Vec<u64> = cmd
            .descriptors
            .iter()
            .map(|d| d.hits.unwrap_or(cmd.hits))
            .collect();
        let request_hits = cmd.hits;
        // Usage descriptors (Envoy's stream-done call) are recorded, and limited as well.
        let decision =
            decide_and_record_decision(&self.node, cmd, false, &self.ids, deadline).await?;
        self.metrics
            .record_decision(&domain, &hits, request_hits, &decision);
        Ok(Response::new(convert::response(&decision, self.options)))
    }
}
