//! Commands the engine applies and the outcomes it returns: the engine's whole interface.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::limits::{LimitSet, Unit};
use super::{access, audit, usage};

/// Most descriptors one request may carry.
pub const MAX_DESCRIPTORS: usize = 64;
/// Most entries one descriptor may carry.
pub const MAX_ENTRIES: usize = 32;
/// Longest domain, in bytes.
pub const MAX_DOMAIN_BYTES: usize = 256;
/// Longest entry key, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// Longest entry value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1024;
/// Largest per-descriptor `hits_addend` (Envoy itself drops values above 1e9).
pub const MAX_HITS: u64 = 1_000_000_000_000;

/// One command of a batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Decide (and maybe debit) a rate-limit request.
    RateLimit(RateLimitCommand),
    /// Replace the whole limit set. Counters of limits whose identity (domain, scope, window)
    /// is unchanged are kept; the others are reclaimed.
    ReplaceLimits(LimitSet),
    /// Record that a node left the cluster: its id is never accepted again.
    RetireNode { node_id: u64 },
    /// Set the settings that change decisions, the same on every replica.
    Configure(super::EngineSettings),
    /// Record a finished request's usage (once per request id).
    ReportUsage(usage::ReportUsage),
    /// Hold capacity for a request about to run.
    Reserve(usage::Reserve),
    /// Settle a reservation with the actual usage.
    Commit(usage::Commit),
    /// Cancel an open reservation.
    Release { request_id: String },
    /// Replace the price catalog (a new version).
    SetPrices(usage::PriceCatalog),
    /// Replace the quota set.
    ReplaceQuotas(usage::QuotaSet),
    /// Ask whether the hard quotas leave room for one more request (reads only).
    /// Last, so that the log encoding of the variants before it is unchanged.
    CheckQuotas(usage::CheckQuotas),
    /// Create an API key (its secret's hash only).
    CreateKey(access::NewKey),
    /// Disable or enable a key.
    SetKeyEnabled { id: String, enabled: bool },
    /// Delete a key for good.
    DeleteKey { id: String },
    /// Replace a key's secret; the old one stays valid for `grace_ms`.
    RotateKey {
        id: String,
        secret_sha256: access::SecretHash,
        grace_ms: u64,
    },
    /// Create or replace a subscription (its limits become quotas).
    PutSubscription(access::Subscription),
    /// Delete a subscription no key is bound to.
    DeleteSubscription { name: String },
    /// May this key make this request (now)?
    Authorize(access::Authorize),
    /// An admin change with who asked for it: applied, then recorded in the audit log
    /// (refused ones too). Its outcome is the change's own.
    Audited(Box<audit::Audited>),
    /// Records a change made outside the engine (cluster membership) in the audit log.
    AuditNote(audit::AuditNote),
    /// Replaces a key's overrides of its subscription's fields (`None`: back to the tier's).
    SetKeyOverrides {
        id: String,
        overrides: Option<access::KeyOverrides>,
    },
}

/// A rate-limit request, in domain terms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimitCommand {
    pub domain: String,
    pub descriptors: Vec<Descriptor>,
    /// Request-level hits, already defaulted (Envoy's 0 means 1) by the caller.
    pub hits: u64,
    pub mode: Mode,
}

/// One descriptor: ordered entries, and optional per-descriptor overrides.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    pub entries: Vec<(String, String)>,
    /// Overrides the request's hits for this descriptor; a present 0 means check only.
    pub hits: Option<u64>,
    /// Replaces the configured limits for this descriptor (Envoy's `limit` override).
    pub limit_override: Option<LimitOverride>,
}

/// Envoy's per-descriptor `RateLimitOverride`: a fixed window of one unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitOverride {
    pub requests_per_unit: u64,
    pub unit: Unit,
}

/// What the request does to counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Envoy's ShouldRateLimit: admit only if every matched limit has room for its hits, then
    /// debit all of them together; a denied request debits nothing.
    Enforce,
    /// Kuadrant's CheckRateLimit: decide as `Enforce` would, debit nothing.
    CheckOnly,
    /// Kuadrant's Report: debit every matched limit unconditionally (usage may overshoot).
    Report,
}

/// The decision code, as Envoy knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Code {
    Ok,
    OverLimit,
}

/// The limit a status reports on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitInfo {
    pub name: Arc<str>,
    pub capacity: u64,
    pub unit: Unit,
    /// Nominal window length, seconds (draft-03 `w=`).
    pub window_s: u64,
}

/// The status of one descriptor: its most constrained matched limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorStatus {
    pub code: Code,
    /// `None` when no limit matched the descriptor (or only unlimited ones did).
    pub current_limit: Option<LimitInfo>,
    /// Hits left in the window after this request (0 when none matched).
    pub remaining: u64,
    /// Time until the counter is back to full capacity.
    pub reset_in_ms: u64,
}

/// The outcome of a [`RateLimitCommand`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub code: Code,
    /// One per descriptor, in request order.
    pub statuses: Vec<DescriptorStatus>,
    /// Names of shadow-mode limits this request went over (admitted anyway).
    pub shadow_exceeded: Vec<Arc<str>>,
    /// Every counter the request touched belongs to a `fast` limit: the leader may answer it
    /// before the batch commits.
    pub fast: bool,
}

/// One outcome per command, in batch order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    RateLimit(Decision),
    NodeRetired {
        node_id: u64,
    },
    Configured,
    LimitsReplaced {
        limits: u64,
        /// Limits whose counters carried over from the previous set.
        kept: u64,
        generation: u64,
    },
    /// The answer to ReportUsage, Reserve, Commit or Release.
    Usage(usage::Receipt),
    PricesSet {
        version: u64,
    },
    QuotasReplaced {
        quotas: u64,
        /// Quotas whose counters carried over from the previous set.
        kept: u64,
    },
    Rejected(CommandError),
    /// The answer to CheckQuotas.
    QuotaCheck(usage::QuotaCheck),
    /// A key after CreateKey, SetKeyEnabled, RotateKey or SetKeyOverrides.
    Key(Box<access::KeyView>),
    KeyDeleted {
        id: String,
    },
    /// After PutSubscription or DeleteSubscription: the quotas now in force.
    SubscriptionsChanged {
        quotas: u64,
    },
    Authorized(access::Authorization),
    /// After AuditNote: the record's seq.
    AuditRecorded {
        seq: u64,
    },
}

/// Why the engine refused a command. Nothing of a rejected command was applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    /// The input breaks a stated bound or rule; `field` names where.
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    /// The counter table is at its bound and holds no reclaimable counter.
    #[error("counter table full ({max} counters): refusing to create new counters")]
    CounterTableFull { max: u64 },
    /// A metering table (request ids, quota counters) is at its bound and nothing in it may
    /// be forgotten yet.
    #[error("{table} full ({max} entries): refusing new entries until retention frees some")]
    UsageTableFull { table: String, max: u64 },
}

impl CommandError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        CommandError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl Command {
    /// About how many bytes the command takes in a log entry: bounds batch sizes.
    pub fn estimated_bytes(&self) -> usize {
        match self {
            Command::RateLimit(c) => {
                let descriptors: usize = c
                    .descriptors
                    .iter()
                    .map(|d| {
                        16 + d
                            .entries
                            .iter()
                            .map(|(k, v)| 4 + k.len() + v.len())
                            .sum::<usize>()
                    })
                    .sum();
                16 + c.domain.len() + descriptors
            }
            Command::ReplaceLimits(set) => {
                postcard::to_allocvec(set).map_or(usize::MAX, |v| v.len())
            }
            Command::RetireNode { .. } | Command::Configure(_) => 16,
            Command::ReportUsage(r) => 64 + r.request_id.len() + attribution_bytes(&r.who),
            Command::Reserve(r) => 72 + r.request_id.len() + attribution_bytes(&r.who),
            Command::Commit(c) => 48 + c.request_id.len(),
            Command::Release { request_id } => 8 + request_id.len(),
            Command::SetPrices(p) => postcard::to_allocvec(p).map_or(usize::MAX, |v| v.len()),
            Command::ReplaceQuotas(q) => postcard::to_allocvec(q).map_or(usize::MAX, |v| v.len()),
            Command::CheckQuotas(c) => 8 + attribution_bytes(&c.who),
            Command::CreateKey(_) | Command::PutSubscription(_) => {
                postcard::to_allocvec(self).map_or(usize::MAX, |v| v.len())
            }
            Command::SetKeyEnabled { id, .. } | Command::DeleteKey { id } => 8 + id.len(),
            Command::RotateKey { id, .. } => 48 + id.len(),
            Command::DeleteSubscription { name } => 8 + name.len(),
            Command::Authorize(a) => 48 + a.key_id.len() + a.model.as_ref().map_or(0, String::len),
            Command::Audited(a) => {
                16 + a.actor.name.len() + a.actor.role.len() + a.command.estimated_bytes()
            }
            Command::AuditNote(_) | Command::SetKeyOverrides { .. } => {
                postcard::to_allocvec(self).map_or(usize::MAX, |v| v.len())
            }
        }
    }
}

fn attribution_bytes(who: &usage::Attribution) -> usize {
    let tags: usize = who.tags.iter().map(|(k, v)| 4 + k.len() + v.len()).sum();
    12 + who.subject.len() + who.subscription.len() + who.model.len() + tags
}

impl RateLimitCommand {
    /// Checks the stated bounds; the error names the offending field as the RLS request spells
    /// it (e.g. `descriptors[2].entries[0].key`).
    pub fn validate(&self) -> Result<(), CommandError> {
        if self.domain.is_empty() {
            return Err(CommandError::invalid("domain", "must not be empty"));
        }
        if self.domain.len() > MAX_DOMAIN_BYTES {
            return Err(CommandError::invalid(
                "domain",
                format!("longer than {MAX_DOMAIN_BYTES} bytes"),
            ));
        }
        if self.hits > MAX_HITS {
            return Err(CommandError::invalid(
                "hits_addend",
                format!("{} is more than {MAX_HITS}", self.hits),
            ));
        }
        if self.descriptors.is_empty() {
            return Err(CommandError::invalid(
                "descriptors",
                "at least one descriptor is required",
            ));
        }
        if self.descriptors.len() > MAX_DESCRIPTORS {
            return Err(CommandError::invalid(
                "descriptors",
                format!(
                    "{} descriptors; at most {MAX_DESCRIPTORS}",
                    self.descriptors.len()
                ),
            ));
        }
        for (i, d) in self.descriptors.iter().enumerate() {
            d.validate(i)?;
        }
        Ok(())
    }
}

impl Descriptor {
    fn validate(&self, i: usize) -> Result<(), CommandError> {
        let field = |rest: &str| format!("descriptors[{i}].{rest}");
        if self.entries.is_empty() {
            return Err(CommandError::invalid(
                field("entries"),
                "at least one entry is required",
            ));
        }
        if self.entries.len() > MAX_ENTRIES {
            return Err(CommandError::invalid(
                field("entries"),
                format!("{} entries; at most {MAX_ENTRIES}", self.entries.len()),
            ));
        }
        for (j, (k, v)) in self.entries.iter().enumerate() {
            if k.is_empty() {
                return Err(CommandError::invalid(
                    field(&format!("entries[{j}].key")),
                    "must not be empty",
                ));
            }
            if k.len() > MAX_KEY_BYTES {
                return Err(CommandError::invalid(
                    field(&format!("entries[{j}].key")),
                    format!("longer than {MAX_KEY_BYTES} bytes"),
                ));
            }
            if v.len() > MAX_VALUE_BYTES {
                return Err(CommandError::invalid(
                    field(&format!("entries[{j}].value")),
                    format!("longer than {MAX_VALUE_BYTES} bytes"),
                ));
            }
        }
        if let Some(hits) = self.hits
            && hits > MAX_HITS
        {
            return Err(CommandError::invalid(
                field("hits_addend"),
                format!("{hits} is more than {MAX_HITS}"),
            ));
        }
        if let Some(o) = self.limit_override
            && o.unit == Unit::Unknown
        {
            return Err(CommandError::invalid(
                field("limit.unit"),
                "must be a known unit",
            ));
        }
        Ok(())
    }
}
