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
use crate::metrics::{DecisionCall, Metrics};
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
/// applies its failure mode. The decision is counted in `metrics` as `call`'s (when given;
/// a call answered with an error is no decision and counts nothing there).
#[allow(clippy::too_many_arguments)]
pub async fn decide_and_record(
    node: &Node,
    cmd: RateLimitCommand,
    request_hits_count: bool,
    ids: &CallIds,
    deadline: Option<Duration>,
    options: ResponseOptions,
    metrics: Option<&Metrics>,
    call: DecisionCall,
) -> Result<Response<RateLimitResponse>, Status> {
    // What the metrics count the decision's statuses with (the command is moved below).
    let counted = metrics.map(|m| (m, Counted::of(&cmd)));
    let decision = decide_and_record_decision(node, cmd, request_hits_count, ids, deadline).await?;
    if let Some((m, c)) = counted {
        m.record_decision(call, &c.domain, &c.hits, c.request_hits, &decision);
    }
    Ok(Response::new(convert::response(&decision, options)))
}

/// A command's domain and hits, as the decision metrics count them.
struct Counted {
    domain: String,
    /// Per descriptor: its own hits if it has them, else the request's.
    hits: Vec<u64>,
    request_hits: u64,
}

impl Counted {
    fn of(cmd: &RateLimitCommand) -> Counted {
        Counted {
            domain: cmd.domain.clone(),
            hits: cmd
                .descriptors
                .iter()
                .map(|d| d.hits.unwrap_or(cmd.hits))
                .collect(),
            request_hits: cmd.hits,
        }
    }
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
        // Usage descriptors (Envoy's stream-done call) are recorded, and limited as well.
        decide_and_record(
            &self.node,
            cmd,
            false,
            &self.ids,
            deadline,
            self.options,
            Some(&self.metrics),
            DecisionCall::ShouldRateLimit,
        )
        .await
    }
}
