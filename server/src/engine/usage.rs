//! Metering's interface: usage reports, reservations, prices, quotas and billing queries, as
//! plain data (the engine's half of `tally.v1.Usage`).
//!
//! Money is integer nano-dollars (1 USD = 10^9 nusd); prices are nano-dollars per token. No
//! float appears in any of these types.
//!
//! Token accounting follows the OpenAI usage object: `input` counts every prompt token,
//! `cached_input` is the part of them served from a prompt cache (so `cached_input <= input`),
//! and `reasoning` is the part of `output` spent on reasoning (`reasoning <= output`). Cost is
//! `(input - cached_input) × input price + cached_input × cached price + output × output price`.

use serde::{Deserialize, Serialize};

use super::command::CommandError;
use super::limits::WindowSpec;

/// Longest request id, subject, subscription, model, tag key or value, quota name, in bytes.
pub const MAX_USAGE_STRING_BYTES: usize = 256;
/// Most tags one report may carry.
pub const MAX_TAGS: usize = 16;
/// Largest token count of any kind in one report (Envoy drops values above 1e9).
pub const MAX_TOKENS: u64 = 1_000_000_000_000;
/// Longest reservation, ms: an hour. A stream that outlives it is settled by Commit anyway.
pub const MAX_RESERVATION_TTL_MS: u64 = 3_600_000;
/// Most models in a price catalog.
pub const MAX_MODELS: usize = 10_000;
/// Highest price per token: 1,000 USD.
pub const MAX_PRICE_NUSD: u64 = 1_000_000_000_000;
/// Most quotas in a quota set.
pub const MAX_QUOTAS: usize = 10_000;
/// Most alert thresholds of one quota.
pub const MAX_THRESHOLDS: usize = 8;
/// Most dimensions a quota counts per, or a query groups by.
pub const MAX_DIMENSIONS: usize = 8;

/// Tokens one request used (or is estimated to use).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokens {
    /// Every prompt token, cached ones included.
    pub input: u64,
    /// Completion tokens, reasoning ones included.
    pub output: u64,
    /// Prompt tokens served from a cache (part of `input`).
    pub cached_input: u64,
    /// Completion tokens spent reasoning (part of `output`).
    pub reasoning: u64,
}

impl Tokens {
    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }

    pub fn validate(&self, field: &str) -> Result<(), CommandError> {
        for (name, n) in [
            ("input_tokens", self.input),
            ("output_tokens", self.output),
            ("cached_input_tokens", self.cached_input),
            ("reasoning_tokens", self.reasoning),
        ] {
            if n > MAX_TOKENS {
                return Err(CommandError::invalid(
                    format!("{field}{name}"),
                    format!("{n} is more than {MAX_TOKENS}"),
                ));
            }
        }
        if self.cached_input > self.input {
            return Err(CommandError::invalid(
                format!("{field}cached_input_tokens"),
                "must not exceed input_tokens (cached tokens are part of the input)",
            ));
        }
        if self.reasoning > self.output {
            return Err(CommandError::invalid(
                format!("{field}reasoning_tokens"),
                "must not exceed output_tokens (reasoning tokens are part of the output)",
            ));
        }
        Ok(())
    }
}

/// Who a request is charged to.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Attribution {
    /// The API key id (or a descriptor-derived key).
    pub subject: String,
    /// The subscription (tier) the key belongs to; may be empty.
    pub subscription: String,
    /// The model; may be empty (then no price applies).
    pub model: String,
    /// Attribution labels, sorted by key, keys unique.
    pub tags: Vec<(String, String)>,
}

impl Attribution {
    pub fn validate(&self) -> Result<(), CommandError> {
        if self.subject.is_empty() {
            return Err(CommandError::invalid("subject", "must not be empty"));
        }
        check_len("subject", &self.subject)?;
        check_len("subscription", &self.subscription)?;
        check_len("model", &self.model)?;
        if self.tags.len() > MAX_TAGS {
            return Err(CommandError::invalid(
                "tags",
                format!("{} tags; at most {MAX_TAGS}", self.tags.len()),
            ));
        }
        for (i, (k, v)) in self.tags.iter().enumerate() {
            if k.is_empty() {
                return Err(CommandError::invalid(
                    format!("tags[{i}].key"),
                    "must not be empty",
                ));
            }
            check_len(&format!("tags[{i}].key"), k)?;
            check_len(&format!("tags[{i}].value"), v)?;
            if i > 0 && self.tags[i - 1].0 >= *k {
                return Err(CommandError::invalid(
                    format!("tags[{i}].key"),
                    format!("{k:?} is repeated or out of order (tags are sorted by key)"),
                ));
            }
        }
        Ok(())
    }

    /// The value of one dimension of this attribution ("" for a missing tag).
    pub fn value(&self, dimension: &Dimension) -> &str {
        match dimension {
            Dimension::Subject => &self.subject,
            Dimension::Subscription => &self.subscription,
            Dimension::Model => &self.model,
            Dimension::Tag(key) => self
                .tags
                .binary_search_by(|(k, _)| k.as_str().cmp(key))
                .map_or("", |i| &self.tags[i].1),
        }
    }
}

pub(crate) fn check_len(field: &str, s: &str) -> Result<(), CommandError> {
    if s.len() > MAX_USAGE_STRING_BYTES {
        return Err(CommandError::invalid(
            field,
            format!("longer than {MAX_USAGE_STRING_BYTES} bytes"),
        ));
    }
    Ok(())
}

fn check_request_id(id: &str) -> Result<(), CommandError> {
    if id.is_empty() {
        return Err(CommandError::invalid("request_id", "must not be empty"));
    }
    check_len("request_id", id)
}

/// What a quota counts per, or a query groups by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Dimension {
    Subject,
    Subscription,
    Model,
    Tag(String),
}

impl Dimension {
    pub fn name(&self) -> String {
        match self {
            Dimension::Subject => "subject".into(),
            Dimension::Subscription => "subscription".into(),
            Dimension::Model => "model".into(),
            Dimension::Tag(k) => format!("tag:{k}"),
        }
    }
}

/// A finished request's usage: recorded once per `request_id`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportUsage {
    pub request_id: String,
    pub who: Attribution,
    pub tokens: Tokens,
}

/// Holds capacity for a request about to run, against its estimate, for `ttl_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reserve {
    pub request_id: String,
    pub who: Attribution,
    pub estimate: Tokens,
    pub ttl_ms: u64,
    /// When the TTL passes unsettled, record the estimate as the request's usage (settled
    /// [`Settled::Expired`]) instead of releasing it: for callers that may never learn the
    /// actual usage (Envoy sends nothing at stream end for a client that disconnected).
    pub charge_on_expiry: bool,
}

/// Asks whether `who` may start one more request under the hard quotas: read-only (no counter
/// is created, nothing is held or recorded). Proposed through the log anyway, so that it is
/// ordered after every report acknowledged before it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckQuotas {
    pub who: Attribution,
}

/// The answer to [`CheckQuotas`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaCheck {
    /// The first hard quota (in set order) with no room for one more unit of its metric.
    pub denied: Option<QuotaStanding>,
    /// Every hard quota `who` falls under, in set order (for response headers).
    pub standings: Vec<QuotaStanding>,
}

/// Settles a reservation with the request's actual usage (records it, frees the rest).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    pub request_id: String,
    pub tokens: Tokens,
}

impl ReportUsage {
    pub fn validate(&self) -> Result<(), CommandError> {
        check_request_id(&self.request_id)?;
        self.who.validate()?;
        self.tokens.validate("")
    }
}

impl Reserve {
    pub fn validate(&self) -> Result<(), CommandError> {
        check_request_id(&self.request_id)?;
        self.who.validate()?;
        self.estimate.validate("estimate.")?;
        if self.ttl_ms == 0 || self.ttl_ms > MAX_RESERVATION_TTL_MS {
            return Err(CommandError::invalid(
                "ttl",
                format!(
                    "must be 1..={MAX_RESERVATION_TTL_MS} ms, got {}",
                    self.ttl_ms
                ),
            ));
        }
        Ok(())
    }
}

impl CheckQuotas {
    pub fn validate(&self) -> Result<(), CommandError> {
        self.who.validate()
    }
}

impl Commit {
    pub fn validate(&self) -> Result<(), CommandError> {
        check_request_id(&self.request_id)?;
        self.tokens.validate("")
    }
}

/// Validates a `Release` command's request id.
pub fn validate_release(request_id: &str) -> Result<(), CommandError> {
    check_request_id(request_id)
}

/// Prices of one model, nano-dollars per token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelPrice {
    pub model: String,
    pub input_nusd: u64,
    pub cached_input_nusd: u64,
    pub output_nusd: u64,
}

/// The whole price catalog; replaced as one, each replacement a new version.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceCatalog {
    pub models: Vec<ModelPrice>,
}

impl PriceCatalog {
    pub fn validate(&self) -> Result<(), CommandError> {
        if self.models.len() > MAX_MODELS {
            return Err(CommandError::invalid(
                "models",
                format!("{} models; at most {MAX_MODELS}", self.models.len()),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let field = |f: &str| format!("models[{i}].{f}");
            if m.model.is_empty() {
                return Err(CommandError::invalid(field("model"), "must not be empty"));
            }
            check_len(&field("model"), &m.model)?;
            if !seen.insert(m.model.as_str()) {
                return Err(CommandError::invalid(
                    field("model"),
                    format!("{:?} is priced twice", m.model),
                ));
            }
            for (f, p) in [
                ("input_nusd", m.input_nusd),
                ("cached_input_nusd", m.cached_input_nusd),
                ("output_nusd", m.output_nusd),
            ] {
                if p > MAX_PRICE_NUSD {
                    return Err(CommandError::invalid(
                        field(f),
                        format!("{p} nusd per token is more than {MAX_PRICE_NUSD}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The cost of `tokens` at `price`, nano-dollars (saturating: bounded inputs cannot reach
    /// it, 10^12 tokens × 10^12 nusd being below 2^128 but above 2^64).
    pub fn cost_nusd(price: &ModelPrice, tokens: &Tokens) -> u64 {
        let uncached = u128::from(tokens.input - tokens.cached_input.min(tokens.input));
        let cost = uncached * u128::from(price.input_nusd)
            + u128::from(tokens.cached_input) * u128::from(price.cached_input_nusd)
            + u128::from(tokens.output) * u128::from(price.output_nusd);
        u64::try_from(cost).unwrap_or(u64::MAX)
    }
}

/// What a quota counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Metric {
    /// Requests (a reservation holds one; a report or commit counts one).
    Requests,
    /// Input plus output tokens.
    TotalTokens,
    InputTokens,
    OutputTokens,
    /// Cost in nano-dollars at the price in force.
    CostNusd,
    /// Requests in flight: reservations held and not yet committed, released or expired.
    /// Has no window.
    Concurrent,
}

/// What happens when a quota is reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Enforcement {
    /// A reservation that does not fit is denied.
    #[default]
    Hard,
    /// Admitted anyway; an `Exceeded` event says so.
    Soft,
    /// Counted and reported only: no event, never denies.
    Shadow,
}

/// Which usage a quota applies to: every set field must equal the usage's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaFilter {
    pub subject: Option<String>,
    pub subscription: Option<String>,
    pub model: Option<String>,
    /// A tag key and the value it must have.
    pub tag: Option<(String, String)>,
    /// Subjects it does not apply to, sorted (a tier's quotas skip the keys that override
    /// its limits). Not part of a quota's identity: its counters stay when the list changes.
    pub except_subjects: Vec<String>,
}

impl QuotaFilter {
    pub fn matches(&self, who: &Attribution) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        eq(&self.subject, &who.subject)
            && eq(&self.subscription, &who.subscription)
            && eq(&self.model, &who.model)
            && self.tag.as_ref().is_none_or(|(k, v)| {
                who.tags
                    .binary_search_by(|(tk, _)| tk.as_str().cmp(k))
                    .is_ok_and(|i| who.tags[i].1 == *v)
            })
            && self
                .except_subjects
                .binary_search_by(|s| s.as_str().cmp(&who.subject))
                .is_err()
    }

    /// The same usage, whatever the exceptions (a quota's identity).
    pub fn same_scope(&self, other: &QuotaFilter) -> bool {
        self.subject == other.subject
            && self.subscription == other.subscription
            && self.model == other.model
            && self.tag == other.tag
    }
}

/// One quota or budget.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaSpec {
    /// Unique within the set; names it in outcomes, events and the overview.
    pub name: String,
    pub filter: QuotaFilter,
    /// One counter per distinct combination of these values (none: one counter in all).
    pub per: Vec<Dimension>,
    pub metric: Metric,
    /// The most the window admits, in the metric's unit.
    pub limit: u64,
    /// Fixed, calendar or rolling. `None` exactly when the metric is `Concurrent`.
    pub window: Option<WindowSpec>,
    pub enforcement: Enforcement,
    /// Percentages of `limit` (1..=100, increasing) at which an event fires once per period.
    pub thresholds_pct: Vec<u8>,
}

/// The whole quota configuration; replaces the previous one when applied. Counters of a
/// quota whose name, filter, dimensions, metric and window are unchanged carry over.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaSet {
    pub quotas: Vec<QuotaSpec>,
}

/// A quota's standing for one request's counter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaStanding {
    pub quota: String,
    /// The counter's key: the values of the quota's `per` dimensions, in order.
    pub key: Vec<String>,
    pub metric: Metric,
    pub enforcement: Enforcement,
    pub limit: u64,
    /// Recorded in the current window (after this command).
    pub used: u64,
    /// Held by open reservations.
    pub reserved: u64,
    /// `limit - used - reserved`, floored at 0.
    pub remaining: u64,
    /// Time until the window resets (0 for `Concurrent`).
    pub reset_in_ms: u64,
}

/// What the actual usage of a committed reservation was beyond its estimate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overshoot {
    pub tokens: u64,
    pub cost_nusd: u64,
}

/// What became of the reservation a usage record settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Settled {
    /// A plain report, or a commit with no reservation under its id.
    NoReservation,
    /// The reservation was open and is now released.
    Reservation,
    /// The reservation had expired (or was released) before the commit came.
    Lapsed,
    /// The reservation (`charge_on_expiry`) passed its TTL unsettled: its estimate was recorded
    /// as the usage. A commit or report under its id later gets this record as its answer.
    Expired,
}

/// The answer to a usage command. A retried command gets its first answer again, with
/// `duplicate` set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub request_id: String,
    pub duplicate: bool,
    pub result: UsageResult,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UsageResult {
    /// Usage recorded as ledger record `seq`.
    Recorded {
        seq: u64,
        at_ms: i64,
        cost_nusd: u64,
        /// Price catalog version charged; 0 when the catalog did not price the model.
        price_version: u64,
        settled: Settled,
        overshoot: Overshoot,
        /// Quotas now over their limit (hard ones deny the next reservation).
        over: Vec<QuotaStanding>,
    },
    /// Capacity held until `expires_ms`.
    Reserved {
        expires_ms: i64,
        /// Hard quotas the reservation was checked against, after holding it.
        standings: Vec<QuotaStanding>,
    },
    /// Refused: this hard quota has no room for the estimate. Nothing was held.
    Denied { standing: QuotaStanding },
    /// `found`: an open reservation was released; otherwise there was none to release.
    Released { found: bool },
}

/// Something a billing or alerting system wants to know, in order (`seq`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at_ms: i64,
    pub kind: EventKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// A quota's counter reached `pct` % of its limit (once per period).
    Threshold { standing: QuotaStanding, pct: u8 },
    /// A soft or hard quota's counter went over its limit (once per period).
    Exceeded { standing: QuotaStanding },
    /// An open reservation passed its TTL and released itself.
    ReservationExpired { request_id: String },
}

/// One ledger record: what one request used and what it cost. Never changes once written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// 1, 2, 3, ... in commit order, with no gaps: `ExportUsage`'s cursor.
    pub seq: u64,
    pub at_ms: i64,
    pub request_id: String,
    pub who: Attribution,
    pub tokens: Tokens,
    pub cost_nusd: u64,
    pub price_version: u64,
}

/// Sums over usage records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageSums {
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    pub reasoning_tokens: u64,
    pub cost_nusd: u64,
}

impl UsageSums {
    pub fn add(&mut self, tokens: &Tokens, cost_nusd: u64) {
        self.requests = self.requests.saturating_add(1);
        self.input_tokens = self.input_tokens.saturating_add(tokens.input);
        self.output_tokens = self.output_tokens.saturating_add(tokens.output);
        self.cached_input_tokens = self.cached_input_tokens.saturating_add(tokens.cached_input);
        self.reasoning_tokens = self.reasoning_tokens.saturating_add(tokens.reasoning);
        self.cost_nusd = self.cost_nusd.saturating_add(cost_nusd);
    }

    pub fn merge(&mut self, other: &UsageSums) {
        self.requests = self.requests.saturating_add(other.requests);
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.cached_input_tokens = self
            .cached_input_tokens
            .saturating_add(other.cached_input_tokens);
        self.reasoning_tokens = self.reasoning_tokens.saturating_add(other.reasoning_tokens);
        self.cost_nusd = self.cost_nusd.saturating_add(other.cost_nusd);
    }
}

/// Period length of a query's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Granularity {
    Minute,
    Hour,
    Day,
    Month,
    /// One row per group over the whole range.
    Total,
}

/// A billing query: sums of usage in `[start_ms, end_ms)`, grouped and bucketed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageQuery {
    pub start_ms: i64,
    pub end_ms: i64,
    pub group_by: Vec<Dimension>,
    pub granularity: Granularity,
    /// IANA zone that hours, days and months are taken in.
    pub time_zone: String,
    /// Only usage this filter matches.
    pub filter: QuotaFilter,
}

/// One row of a query's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRow {
    /// Start of the row's period (the range's start for `Total`).
    pub period_start_ms: i64,
    /// Values of the query's `group_by` dimensions, in order.
    pub group: Vec<String>,
    pub sums: UsageSums,
}

/// Why a read could not be answered as asked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    /// The answer would be larger than the stated bound: narrow the query.
    #[error("{what}: more than {max} rows; narrow the query")]
    TooLarge { what: &'static str, max: usize },
    /// Part of the range is past retention: the answer would be incomplete.
    /// `available_from` is the first seq (records) or Unix ms (aggregates) still held.
    #[error("{what} before {available_from} are past retention; {hint}")]
    PastRetention {
        what: &'static str,
        available_from: i64,
        hint: &'static str,
    },
}

impl ReadError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ReadError {
        ReadError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
