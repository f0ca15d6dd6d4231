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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use std::time::Duration;

use tonic::Status;

use crate::engine::usage::{Attribution, ReportUsage, Tokens};
use crate::engine::{Command, CommandError, Descriptor, Outcome, RateLimitCommand};
use crate::node::Node;

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

/// Which token field a usage descriptor's count goes to.
fn add_tokens(kind: &str, n: u64, t: &mut Tokens) -> bool {
    let field = match kind {
        "input_tokens" | "total_tokens" => &mut t.input,
        "output_tokens" => &mut t.output,
        "cached_input_tokens" => &mut t.cached_input,
        "reasoning_tokens" => &mut t.reasoning,
        _ => return false,
    };
    *field = field.saturating_add(n);
    true
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
    let mut grouped: BTreeMap<(Option<String>, Attribution), Tokens> = BTreeMap::new();
    for (i, d) in cmd.descriptors.iter().enumerate() {
        let Some(kind) = entry(d, USAGE_ENTRY) else {
            continue;
        };
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
        if !add_tokens(kind, n, tokens) {
            return Err(CommandError::invalid(
                field("entries"),
                format!(
                    "usage={kind:?}: not one of input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, total_tokens"
                ),
            ));
        }
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

fn entry<'a>(d: &'a Descriptor, key: &str) -> Option<&'a str> {
    d.entries
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn attribution(d: &Descriptor) -> Result<Attribution, String> {
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
