//! The deterministic state machine at Tally's core.
//!
//! Events in, decisions out: [`Engine::apply`] takes a batch of [`Command`]s and the batch's
//! timestamp, and returns one [`Outcome`] per command. No clock, no I/O, no async, no protobuf:
//! the same commands with the same timestamps give the same outcomes and the same
//! [`Engine::snapshot`] bytes on every replica.
//!
//! Layout:
//! - [`command`]: the commands, outcomes and request bounds (the engine's interface).
//! - [`limits`]: limit definitions as plain data (what a limit file compiles to).
//! - `registry`: the limits in force, compiled, with ids that name their counters.
//! - `decide`: matching descriptors to limits, all-or-nothing check and debit.
//! - `window`, `calendar`: fixed, calendar, first-hit, rolling and token-bucket arithmetic.
//! - `counters`: the bounded counter table and its incremental reclamation.
//! - [`cel`]: CEL expressions of Limitador-format limits.
//! - [`access`]: API keys and subscriptions as plain data; `keys`: their table,
//!   authorization, and the quotas subscriptions become.
//! - [`audit`]: the audit log of admin changes (who, what, when, before and after).
//! - `snapshot`: the whole state to bytes and back.
//!
//! Architecture invariant: batch time never goes backwards inside the engine; a batch stamped
//! earlier than the last one is applied at the last one's time.

pub mod access;
pub mod audit;
pub mod calendar;
pub mod cel;
pub mod command;
mod counters;
mod decide;
mod keys;
pub mod limits;
mod meter;
mod registry;
mod snapshot;
pub mod usage;
mod window;

use std::sync::Arc;

pub use command::{
    Code, Command, CommandError, Decision, Descriptor, DescriptorStatus, LimitInfo, LimitOverride,
    Mode, Outcome, RateLimitCommand,
};
pub use limits::{LimitSet, LimitSpec};
pub use meter::MAX_EVENTS;
pub use snapshot::SnapshotError;

use counters::{Counters, SWEEP_PER_BATCH, SWEEP_PER_COMMAND};
use registry::Registry;

/// Settings that change decisions, so every replica must hold the same ones: they are set by
/// a replicated [`Command::Configure`] and travel in snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EngineSettings {
    /// Most counters held at once; a request that would create more is refused.
    pub max_counters: u64,
    /// Most request ids remembered for exactly-once usage; a new id beyond it is refused
    /// (`RESOURCE_EXHAUSTED`) until retention frees some, rather than forgetting one early.
    pub max_request_ids: u64,
    /// How long a settled request id is remembered (by batch time): a retry within it is
    /// answered with the first outcome. At least [`usage::MAX_RESERVATION_TTL_MS`].
    pub request_id_retention_ms: u64,
    /// Most quota counters held at once.
    pub max_quota_counters: u64,
    /// Most usage records kept in the engine for minute queries (oldest dropped first, when a
    /// batch part begins); `ExportUsage` reads the node's on-disk archive.
    pub max_usage_records: u64,
    /// Most 15-minute aggregate rows kept for `QueryUsage` (oldest period dropped first).
    pub max_usage_buckets: u64,
    /// How long 15-minute aggregates are kept, by batch time.
    pub usage_bucket_retention_ms: u64,
}

/// Default bound on counters: about half a GiB of fixed-window counters.
pub const DEFAULT_MAX_COUNTERS: u64 = 5_000_000;
/// Default bound on remembered request ids (about 200 MB at the longest ids).
pub const DEFAULT_MAX_REQUEST_IDS: u64 = 1_000_000;
/// Default retention of settled request ids: a day.
pub const DEFAULT_REQUEST_ID_RETENTION_MS: u64 = 86_400_000;
/// Default bound on quota counters.
pub const DEFAULT_MAX_QUOTA_COUNTERS: u64 = 1_000_000;
/// Default number of usage records kept in the engine (about 30 MB of memory and snapshot);
/// the full history is in each node's on-disk usage archive.
pub const DEFAULT_MAX_USAGE_RECORDS: u64 = 200_000;
/// Default number of 15-minute aggregate rows kept.
pub const DEFAULT_MAX_USAGE_BUCKETS: u64 = 1_000_000;
/// Default retention of 15-minute aggregates: 400 days (a year and a billing month).
pub const DEFAULT_USAGE_BUCKET_RETENTION_MS: u64 = 400 * 86_400_000;

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            max_counters: DEFAULT_MAX_COUNTERS,
            max_request_ids: DEFAULT_MAX_REQUEST_IDS,
            request_id_retention_ms: DEFAULT_REQUEST_ID_RETENTION_MS,
            max_quota_counters: DEFAULT_MAX_QUOTA_COUNTERS,
            max_usage_records: DEFAULT_MAX_USAGE_RECORDS,
            max_usage_buckets: DEFAULT_MAX_USAGE_BUCKETS,
            usage_bucket_retention_ms: DEFAULT_USAGE_BUCKET_RETENTION_MS,
        }
    }
}

impl EngineSettings {
    /// Checks every bound; the error names the setting.
    pub fn validate(&self) -> Result<(), CommandError> {
        for (field, n) in [
            ("max_counters", self.max_counters),
            ("max_request_ids", self.max_request_ids),
            ("max_quota_counters", self.max_quota_counters),
            ("max_usage_records", self.max_usage_records),
            ("max_usage_buckets", self.max_usage_buckets),
        ] {
            if n == 0 {
                return Err(CommandError::invalid(field, "must be at least 1"));
            }
        }
        if self.request_id_retention_ms < usage::MAX_RESERVATION_TTL_MS {
            return Err(CommandError::invalid(
                "request_id_retention_ms",
                format!(
                    "must be at least the longest reservation ({} ms)",
                    usage::MAX_RESERVATION_TTL_MS
                ),
            ));
        }
        if self.usage_bucket_retention_ms < 86_400_000 {
            return Err(CommandError::invalid(
                "usage_bucket_retention_ms",
                "must be at least a day",
            ));
        }
        Ok(())
    }
}

/// Counts for operators; not part of the replicated state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStatus {
    pub live_counters: u64,
    pub counter_bytes_estimate: u64,
    pub reclaimed_counters: u64,
    pub limits: u64,
    pub limits_generation: u64,
    pub last_batch_ms: i64,
    pub applied_commands: u64,
    pub applied_batches: u64,
}

pub struct Engine {
    settings: EngineSettings,
    last_ms: i64,
    registry: Registry,
    counters: Counters,
    scratch: decide::Scratch,
    empty_name: Arc<str>,
    applied_commands: u64,
    applied_batches: u64,
    /// Node ids that left the cluster; replicated so that no replica ever accepts one again.
    retired_nodes: std::collections::BTreeSet<u64>,
    /// Prices, quotas, reservations, request ids, the usage ledger and events.
    meter: meter::Meter,
    /// API keys and subscriptions.
    keys: keys::Keys,
    /// Admin changes: who, what, when, before and after.
    audit: audit::AuditLog,
}

impl Engine {
    pub fn new(settings: EngineSettings) -> Engine {
        Engine {
            settings,
            last_ms: calendar::MIN_TIME_MS,
            registry: Registry::default(),
            counters: Counters::default(),
            scratch: decide::Scratch::default(),
            empty_name: Arc::from(""),
            applied_commands: 0,
            applied_batches: 0,
            retired_nodes: std::collections::BTreeSet::new(),
            meter: meter::Meter::default(),
            keys: keys::Keys::default(),
            audit: audit::AuditLog::default(),
        }
    }

    /// Applies a batch stamped `batch_ms` (Unix ms) and returns one outcome per command.
    pub fn apply(&mut self, batch_ms: i64, commands: &[Command]) -> Vec<Outcome> {
        let outcomes = self.apply_part(batch_ms, commands);
        self.end_batch(commands.len());
        outcomes
    }

    /// The first half of [`Engine::apply`], for a leader that answers a batch's commands as
    /// they arrive: `apply_part` over consecutive parts of one batch, all with the batch's
    /// stamp, then one `end_batch` with the whole batch's length, leaves the engine exactly as
    /// one `apply` of the whole batch does (same outcomes, same state).
    pub fn apply_part(&mut self, batch_ms: i64, commands: &[Command]) -> Vec<Outcome> {
        let now_ms = batch_ms.clamp(self.last_ms, calendar::MAX_TIME_MS);
        self.last_ms = now_ms;
        self.advance_usage(now_ms);
        let outcomes: Vec<Outcome> = commands.iter().map(|c| self.apply_one(c, now_ms)).collect();
        self.applied_commands += commands.len() as u64;
        assert_eq!(outcomes.len(), commands.len(), "one outcome per command");
        outcomes
    }

    /// The second half of [`Engine::apply`]: the batch's reclamation step, at the batch's time.
    pub fn end_batch(&mut self, batch_commands: usize) {
        let now_ms = self.last_ms;
        let budget = SWEEP_PER_BATCH + SWEEP_PER_COMMAND * batch_commands;
        let registry = &self.registry;
        self.counters.sweep(budget, |key, state| {
            decide::reclaimable(registry, key, state, now_ms)
        });
        self.sweep_usage(batch_commands, now_ms);
        self.applied_batches += 1;
    }

    fn apply_one(&mut self, command: &Command, now_ms: i64) -> Outcome {
        let result = match command {
            Command::RateLimit(cmd) => decide::decide(
                decide::Ctx {
                    registry: &mut self.registry,
                    counters: &mut self.counters,
                    max_counters: self.settings.max_counters,
                    scratch: &mut self.scratch,
                    empty_name: &self.empty_name,
                },
                cmd,
                now_ms,
            )
            .map(Outcome::RateLimit),
            Command::RetireNode { node_id } => {
                self.retired_nodes.insert(*node_id);
                Ok(Outcome::NodeRetired { node_id: *node_id })
            }
            Command::Configure(settings) => settings.validate().map(|()| {
                self.settings = *settings;
                Outcome::Configured
            }),
            Command::ReportUsage(_)
            | Command::Reserve(_)
            | Command::Commit(_)
            | Command::Release { .. }
            | Command::SetPrices(_)
            | Command::ReplaceQuotas(_)
            | Command::CheckQuotas(_) => self.apply_usage(command, now_ms),
            Command::CreateKey(_)
            | Command::SetKeyEnabled { .. }
            | Command::DeleteKey { .. }
            | Command::RotateKey { .. }
            | Command::SetKeyOverrides { .. }
            | Command::PutSubscription(_)
            | Command::DeleteSubscription { .. }
            | Command::Authorize(_) => self.apply_access(command, now_ms),
            Command::Audited(audited) if matches!(audited.command, Command::Audited(_)) => Err(
                CommandError::invalid("command", "an audited change may not nest another"),
            ),
            Command::Audited(audited) => Ok(self.apply_audited(audited, now_ms)),
            Command::AuditNote(note) => self.apply_audit_note(note, now_ms),
            Command::ReplaceLimits(set) => {
                self.registry
                    .replace(set)
                    .map(|kept| Outcome::LimitsReplaced {
                        limits: self.registry.order.len() as u64,
                        kept,
                        generation: self.registry.generation,
                    })
            }
        };
        result.unwrap_or_else(Outcome::Rejected)
    }

    /// The limits in force, in limit-set order.
    pub fn limits(&self) -> impl Iterator<Item = &LimitSpec> {
        self.registry
            .order
            .iter()
            .map(|id| &self.registry.limits[id].spec)
    }

    /// True when some limit in force is acknowledged `fast`.
    pub fn has_fast_limits(&self) -> bool {
        self.registry.has_fast
    }

    /// True when `node_id` left the cluster and must never be accepted again.
    pub fn is_retired(&self, node_id: u64) -> bool {
        self.retired_nodes.contains(&node_id)
    }

    pub fn settings(&self) -> EngineSettings {
        self.settings
    }

    /// Time of the last applied batch.
    pub fn last_ms(&self) -> i64 {
        self.last_ms
    }

    /// Counts for operators. Walks the counter table for the memory estimate: O(counters).
    pub fn status(&self) -> EngineStatus {
        EngineStatus {
            live_counters: self.counters.len() as u64,
            counter_bytes_estimate: self.counters.bytes_estimate(),
            reclaimed_counters: self.counters.reclaimed,
            limits: self.registry.order.len() as u64,
            limits_generation: self.registry.generation,
            last_batch_ms: self.last_ms,
            applied_commands: self.applied_commands,
            applied_batches: self.applied_batches,
        }
    }
}
