//! Usage carried by rate-limit calls: Envoy's stream-done `ShouldRateLimit` and Kuadrant's
//! `Report` become usage reports.
//!
//! A descriptor is a usage descriptor when it has the entry `usage` with one of the values
//! `input_tokens`, `output_tokens`, `cached_input_tokens`, `reasoning_tokens` or
//! `total_tokens` (charged at the input price: send input and output apart for exact cost),
//! and carries a positive token count: its own `hits_addend` (Envoy's stream-done call), or
//! for Kuadrant's Report the request's. A present `hits_addend` of 0 is a check only, as
//! everywhere, and records nothing. Attribution comes from the same descriptor's entries:
//! `subject` (or `api_key`), `subscription` (or `tier`), `model`, `tag.<key>`, and
//! `request_id` (Envoy: a `request_headers` action on `x-request-id`).
//!
//! Descriptors of one call with the same attribution and request id make one report (an
//! input and an output descriptor of one stream). Exactly-once: with a `request_id` entry the
//! report is idempotent under that id (`rls:<domain>:<id>`); without one, each call gets an id
//! of its own, so it counts once per call — Envoy does not retry rate-limit calls, and a call
//! that fails is lost (the stream-done answer is ignored). Gateways that need exactly-once
//! without a request id in the descriptors call `tally.v1.Usage/ReportUsage` with retries.
//! The descriptors still go through the limits as well (token limits per minute match them).
//!
//! Request-time check of the metering quotas: a usage descriptor that is a check only (a
//! present `hits_addend` of 0 in ShouldRateLimit; every usage descriptor of Kuadrant's
//! CheckRateLimit) is also checked against the hard quotas of its attribution (token, cost,
//! request and concurrency budgets, `engine::meter::check`): when one has no room left for
//! even one more unit — the budget is used up exactly, or the streams in flight are at the
//! cap — the call answers OVER_LIMIT and that descriptor's status names the quota (its limit
//! as `current_limit`, what is left, and the time until its window resets). Soft and shadow
//! quotas never refuse. While nothing refuses, a check descriptor that no limit matched
//! reports its tightest hard quota instead of no limit (for headers). One check per distinct
//! attribution per call; the request id plays no part in it. The check is proposed beside the
//! decision, not inside it: a call refused by a quota may still have counted its other
//! descriptors' hits on their limits.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use std::time::Duration;

use tokio::time::Instant;
use tonic::Status;

use super::convert::quota_status;
use crate::engine::limits::WindowSpec;
use crate::engine::usage::{
    Attribution, CheckQuotas, QuotaCheck, QuotaStanding, ReportUsage, Tokens,
};
use crate::engine::{
    Code, Command, CommandError, Decision, Descriptor, Mode, Outcome, RateLimitCommand,
};
use crate::node::Node;

use super::rls_reserve::RESERVE_KIND;

/// The entry that marks a usage descriptor.
pub const USAGE_ENTRY: &str = "usage";
/// Prefix of entries that become attribution tags (`tag.team=red` → tag `team`).
pub const TAG_PREFIX: &str = "tag.";

/// Ids for calls that carry no request id: unique per process start and call.
pub struct CallIds {
    prefix: String,
    next: AtomicU64,
}

impl CallIds {
    pub fn new(node_id: u64) -> CallIds {
        // The start time keeps a restarted node's ids apart from its previous run's, which
        // the request-id table still remembers.
        let started_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        CallIds {
            prefix: format!("rls-call:{node_id}:{started_ns}"),
            next: AtomicU64::new(0),
        }
    }

    fn next(&self) -> String {
        format!(
            "{}:{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// Which token field a usage descriptor's count goes to; `None` for an unknown kind.
fn token_field<'a>(kind: &str, t: &'a mut Tokens) -> Option<&'a mut u64> {
    match kind {
        "input_tokens" | "total_tokens" => Some(&mut t.input),
        "output_tokens" => Some(&mut t.output),
        "cached_input_tokens" => Some(&mut t.cached_input),
        "reasoning_tokens" => Some(&mut t.reasoning),
        _ => None,
    }
}

fn unknown_kind(i: usize, kind: &str) -> CommandError {
    CommandError::invalid(
        format!("descriptors[{i}].entries"),
        format!(
            "usage={kind:?}: not one of input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, total_tokens"
        ),
    )
}

/// Proposes each report, within the caller's deadline.
pub async fn record(
    node: &Node,
    reports: Vec<ReportUsage>,
    deadline: Option<Duration>,
) -> Result<(), Status> {
    for r in reports {
        let late = "usage not recorded within the caller's deadline";
        let outcome =
            super::deadline::propose(node, Command::ReportUsage(r), deadline, late).await?;
        match outcome {
            Outcome::Usage(_) => {}
            Outcome::Rejected(e) => return Err(e.into()),
            other => return Err(super::status::unexpected(&other)),
        }
    }
    Ok(())
}

/// The usage reports a rate-limit command carries (none for an ordinary call).
/// `request_hits_count`: the request-level hits are usage too (Kuadrant's Report).
pub fn reports(
    cmd: &RateLimitCommand,
    request_hits_count: bool,
    ids: &CallIds,
) -> Result<Vec<ReportUsage>, CommandError> {
    if cmd.mode == Mode::CheckOnly {
        // Kuadrant's CheckRateLimit: a check records nothing (its usage descriptors are
        // quota checks, see `quota_checks`).
        return Ok(Vec::new());
    }
    let mut grouped: BTreeMap<(Option<String>, Attribution), Tokens> = BTreeMap::new();
    for (i, d) in cmd.descriptors.iter().enumerate() {
        let Some(kind) = entry(d, USAGE_ENTRY) else {
            continue;
        };
        if kind == RESERVE_KIND {
            continue; // A reservation, not usage (`rls_reserve`).
        }
        let n = match d.hits {
            Some(n) => n,
            None if request_hits_count => cmd.hits,
            None => 0,
        };
        if n == 0 {
            continue;
        }
        let field = |f: &str| format!("descriptors[{i}].{f}");
        let who =
            attribution(d).map_err(|reason| CommandError::invalid(field("entries"), reason))?;
        let request_id = entry(d, "request_id").map(|id| format!("rls:{}:{id}", cmd.domain));
        let tokens = grouped.entry((request_id, who)).or_default();
        let Some(count) = token_field(kind, tokens) else {
            return Err(unknown_kind(i, kind));
        };
        *count = count.saturating_add(n);
    }
    let out: Vec<ReportUsage> = grouped
        .into_iter()
        .map(|((request_id, who), tokens)| ReportUsage {
            request_id: request_id.unwrap_or_else(|| ids.next()),
            who,
            tokens,
        })
        .collect();
    for r in &out {
        r.validate()?;
    }
    Ok(out)
}

/// A request-time quota check: one attribution and the descriptors it answers for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaCheckFor {
    pub who: Attribution,
    /// Indexes of the check-only usage descriptors with this attribution, in request order.
    pub descriptors: Vec<usize>,
}

/// The quota checks a rate-limit command asks for: one per distinct attribution of its
/// check-only usage descriptors (a present 0 in ShouldRateLimit, all of them in Kuadrant's
/// CheckRateLimit), in order of first appearance. None for Kuadrant's Report.
pub fn quota_checks(cmd: &RateLimitCommand) -> Result<Vec<QuotaCheckFor>, CommandError> {
    let mut out: Vec<QuotaCheckFor> = Vec::new();
    for (i, d) in cmd.descriptors.iter().enumerate() {
        let Some(kind) = entry(d, USAGE_ENTRY) else {
            continue;
        };
        if kind == RESERVE_KIND {
            continue; // Checked by taking the reservation (`rls_reserve`).
        }
        let check_only = match cmd.mode {
            Mode::Enforce => d.hits == Some(0),
            Mode::CheckOnly => true,
            Mode::Report => false,
        };
        if !check_only {
            continue;
        }
        if token_field(kind, &mut Tokens::default()).is_none() {
            return Err(unknown_kind(i, kind));
        }
        let who = attribution(d)
            .map_err(|reason| CommandError::invalid(format!("descriptors[{i}].entries"), reason))?;
        match out.iter_mut().find(|c| c.who == who) {
            Some(c) => c.descriptors.push(i),
            None => {
                CheckQuotas { who: who.clone() }.validate()?;
                out.push(QuotaCheckFor {
                    who,
                    descriptors: vec![i],
                });
            }
        }
    }
    Ok(out)
}

/// Proposes each quota check, within the caller's deadline (one deadline for all of them);
/// answers in `checks` order.
pub async fn check(
    node: &Node,
    checks: &[QuotaCheckFor],
    deadline: Option<Duration>,
) -> Result<Vec<QuotaCheck>, Status> {
    let until = deadline.map(|d| Instant::now() + d);
    let mut out = Vec::with_capacity(checks.len());
    for c in checks {
        let left = until.map(|u| u.saturating_duration_since(Instant::now()));
        let command = Command::CheckQuotas(CheckQuotas { who: c.who.clone() });
        let late = "quotas not checked within the caller's deadline (no leader or no quorum)";
        match super::deadline::propose(node, command, left, late).await? {
            Outcome::QuotaCheck(answer) => out.push(answer),
            Outcome::Rejected(e) => return Err(e.into()),
            other => return Err(super::status::unexpected(&other)),
        }
    }
    Ok(out)
}

/// Merges the quota checks' answers into the decision: a denied check makes the call
/// OVER_LIMIT and gives its descriptors that were OK the quota's status; otherwise its
/// descriptors that no limit matched report the tightest hard quota. The quotas' windows
/// (for `current_limit.unit` and draft-03's `w=`) are read from this replica's quota set.
pub async fn merge(
    node: &Node,
    decision: &mut Decision,
    checks: &[QuotaCheckFor],
    answers: &[QuotaCheck],
) {
    let shown: Vec<(&QuotaCheckFor, &QuotaStanding, Code)> = checks
        .iter()
        .zip(answers)
        .filter_map(|(c, a)| match &a.denied {
            Some(s) => Some((c, s, Code::OverLimit)),
            None => tightest(&a.standings).map(|s| (c, s, Code::Ok)),
        })
        .collect();
    if shown.is_empty() {
        return;
    }
    let windows = quota_windows(node, shown.iter().map(|(_, s, _)| s.quota.as_str())).await;
    for (c, s, code) in shown {
        let window = windows.get(s.quota.as_str()).and_then(Option::as_ref);
        if code == Code::OverLimit {
            decision.code = Code::OverLimit;
        }
        for &i in &c.descriptors {
            let Some(status) = decision.statuses.get_mut(i) else {
                continue;
            };
            let replace = match code {
                // A descriptor already over a limit keeps that limit's status.
                Code::OverLimit => status.code == Code::Ok,
                Code::Ok => status.current_limit.is_none(),
            };
            if replace {
                *status = quota_status(s, window, code);
            }
        }
    }
}

/// The standing with the smallest share of its limit left (exact: cross-multiplied).
fn tightest(standings: &[QuotaStanding]) -> Option<&QuotaStanding> {
    standings.iter().min_by(|a, b| {
        let left = |s: &QuotaStanding, other: &QuotaStanding| {
            u128::from(s.remaining) * u128::from(other.limit)
        };
        left(a, b).cmp(&left(b, a))
    })
}

/// The windows of the named quotas in this replica's quota set (`None`: no window, or a
/// quota replaced since the check).
async fn quota_windows<'a>(
    node: &Node,
    names: impl Iterator<Item = &'a str>,
) -> HashMap<String, Option<WindowSpec>> {
    let names: Vec<&str> = names.collect();
    node.read(|e| {
        e.quotas()
            .filter(|q| names.contains(&q.name.as_str()))
            .map(|q| (q.name.clone(), q.window.clone()))
            .collect()
    })
    .await
    .unwrap_or_default()
}

pub(super) fn entry<'a>(d: &'a Descriptor, key: &str) -> Option<&'a str> {
    d.entries
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

pub(super) fn attribution(d: &Descriptor) -> Result<Attribution, String> {
    let subject = entry(d, "subject")
        .or_else(|| entry(d, "api_key"))
        .ok_or("a usage descriptor needs a `subject` (or `api_key`) entry")?;
    let mut tags: Vec<(String, String)> = d
        .entries
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(TAG_PREFIX)?.to_owned(), v.clone())))
        .collect();
    tags.sort();
    if let Some(w) = tags.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(format!("entry `{TAG_PREFIX}{}` is repeated", w[0].0));
    }
    Ok(Attribution {
        subject: subject.to_owned(),
        subscription: entry(d, "subscription")
            .or_else(|| entry(d, "tier"))
            .unwrap_or("")
            .to_owned(),
        model: entry(d, "model").unwrap_or("").to_owned(),
        tags,
    })
}
