//! Reservations taken by rate-limit calls: Envoy's request-time `ShouldRateLimit` (and
//! Kuadrant's CheckRateLimit) holds an estimate of the request's tokens, its stream-done call
//! settles it.
//!
//! A descriptor with the entry `usage=reserve` is a reservation: its `hits_addend` (or the
//! request's, when it has none) is the estimated total tokens; it needs a `request_id` entry
//! (Envoy: a `request_headers` action on `x-request-id`) and the attribution entries of a usage
//! descriptor (`subject`, `subscription`, `model`, `tag.<k>`); `reserve_ttl_s` (1..=3600,
//! default 600) bounds how long it holds. It becomes `Reserve` under `rls:<domain>:<id>` with
//! `charge_on_expiry`: when the hard quotas have no room for the estimate (or a concurrency cap
//! is reached) the call answers OVER_LIMIT with the quota as that descriptor's status. The
//! stream-done call's usage descriptors with the same `request_id` report under the same id,
//! which commits the reservation with the actual usage (and frees the concurrency slot). When
//! no stream-done call comes (the client disconnected: Envoy then sends nothing) the estimate
//! is charged at the TTL. A call refused anyway (a rate limit over, another reservation
//! denied) releases the reservations it took, so a refused request is never charged.
//! The descriptor itself matches limits like any other.

use std::time::Duration;

use tokio::time::Instant;
use tonic::Status;

use super::rls_usage::{QuotaCheckFor, USAGE_ENTRY, attribution, entry};
use crate::engine::usage::{QuotaCheck, Reserve, Tokens, UsageResult};
use crate::engine::{Code, Command, CommandError, Decision, Mode, Outcome, RateLimitCommand};
use crate::node::Node;

/// The `usage` value that marks a reservation.
pub const RESERVE_KIND: &str = "reserve";
/// The entry that sets a reservation's TTL, in seconds.
pub const TTL_ENTRY: &str = "reserve_ttl_s";
/// TTL of a reservation without [`TTL_ENTRY`]: longer than any one model response streams.
pub const DEFAULT_TTL_MS: u64 = 600_000;
/// Longest [`TTL_ENTRY`], seconds (the engine's longest reservation).
const MAX_TTL_S: u64 = crate::engine::usage::MAX_RESERVATION_TTL_MS / 1_000;

/// One reservation a call asks for, and the descriptor it answers for.
#[derive(Debug)]
pub struct Hold {
    pub check: QuotaCheckFor,
    pub reserve: Reserve,
}

/// What taking a hold answered: as a quota check (for the response), and whether this call
/// newly holds it (so releases it if the call is refused).
#[derive(Debug)]
pub struct Taken {
    pub answer: QuotaCheck,
    pub fresh: bool,
}

/// The reservations a rate-limit command asks for (none in Kuadrant's Report).
pub fn holds(cmd: &RateLimitCommand) -> Result<Vec<Hold>, CommandError> {
    if cmd.mode == Mode::Report {
        return Ok(Vec::new());
    }
    let mut out: Vec<Hold> = Vec::new();
    for (i, d) in cmd.descriptors.iter().enumerate() {
        if entry(d, USAGE_ENTRY) != Some(RESERVE_KIND) {
            continue;
        }
        let invalid =
            |reason: String| CommandError::invalid(format!("descriptors[{i}].entries"), reason);
        let who = attribution(d).map_err(|r| invalid(r.to_owned()))?;
        let id = entry(d, "request_id").ok_or_else(|| {
            invalid("`usage=reserve` needs a `request_id` entry (x-request-id)".into())
        })?;
        let ttl_ms = match entry(d, TTL_ENTRY) {
            None => DEFAULT_TTL_MS,
            Some(v) => match v.parse::<u64>() {
                Ok(s) if (1..=MAX_TTL_S).contains(&s) => s * 1_000,
                _ => {
                    return Err(invalid(format!(
                        "{TTL_ENTRY}={v:?}: seconds, 1..={MAX_TTL_S}"
                    )));
                }
            },
        };
        let reserve = Reserve {
            request_id: format!("rls:{}:{id}", cmd.domain),
            who: who.clone(),
            estimate: Tokens {
                input: d.hits.unwrap_or(cmd.hits),
                ..Tokens::default()
            },
            ttl_ms,
            charge_on_expiry: true,
        };
        reserve.validate()?;
        if out
            .iter()
            .any(|h| h.reserve.request_id == reserve.request_id)
        {
            return Err(invalid(format!(
                "request_id {id:?} reserved twice in one call"
            )));
        }
        out.push(Hold {
            check: QuotaCheckFor {
                who,
                descriptors: vec![i],
            },
            reserve,
        });
    }
    Ok(out)
}

/// Proposes each reservation within the caller's deadline (one for all); answers in order.
pub async fn take(
    node: &Node,
    holds: &[Hold],
    deadline: Option<Duration>,
) -> Result<Vec<Taken>, Status> {
    let until = deadline.map(|d| Instant::now() + d);
    let mut out = Vec::with_capacity(holds.len());
    for h in holds {
        let left = until.map(|u| u.saturating_duration_since(Instant::now()));
        let late = "no reservation within the caller's deadline (no leader or no quorum)";
        let command = Command::Reserve(h.reserve.clone());
        let receipt = match super::deadline::propose(node, command, left, late).await? {
            Outcome::Usage(r) => r,
            Outcome::Rejected(e) => return Err(e.into()),
            other => return Err(super::status::unexpected(&other)),
        };
        let fresh = !receipt.duplicate && matches!(receipt.result, UsageResult::Reserved { .. });
        let (denied, standings) = match receipt.result {
            UsageResult::Denied { standing } => (Some(standing), Vec::new()),
            UsageResult::Reserved { standings, .. } => (None, standings),
            // A retried call whose reservation already settled: nothing to hold or show.
            UsageResult::Recorded { .. } | UsageResult::Released { .. } => (None, Vec::new()),
        };
        out.push(Taken {
            answer: QuotaCheck { denied, standings },
            fresh,
        });
    }
    Ok(out)
}

/// Releases the reservations this call took when the call is refused after all (a refused
/// request sends no stream-done call, and must not be charged its estimate). Best effort
/// within the deadline: a release that fails leaves the reservation to expire — charged.
pub async fn release_if_refused(
    node: &Node,
    decision: &Decision,
    holds: &[Hold],
    taken: &[Taken],
    deadline: Option<Duration>,
) {
    if decision.code != Code::OverLimit {
        return;
    }
    for (h, _) in holds.iter().zip(taken).filter(|(_, t)| t.fresh) {
        let command = Command::Release {
            request_id: h.reserve.request_id.clone(),
        };
        let late = "reservation not released within the caller's deadline";
        if let Err(status) = super::deadline::propose(node, command, deadline, late).await {
            tracing::warn!(
                request_id = %h.reserve.request_id,
                %status,
                "a refused call's reservation was not released; it is charged at its TTL"
            );
        }
    }
}
