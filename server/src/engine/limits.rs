//! Limit definitions: what a limit matches, what forms its counter key, its capacity and window.
//!
//! These are plain data (serde) so that a limit set can travel as a replicated command and sit
//! in a snapshot. [`crate::config`] turns limit files into a [`LimitSet`]; the engine validates
//! it again on apply, because in a cluster the command arrives from the log, not from a file.

use serde::{Deserialize, Serialize};

/// Longest domain, name, entry key or condition string a limit may carry, in bytes.
pub const MAX_LIMIT_STRING_BYTES: usize = 1024;
/// Most limits one limit set may hold.
pub const MAX_LIMITS: usize = 100_000;
/// Most conditions or variables one limit may hold.
pub const MAX_LIMIT_TERMS: usize = 64;
/// Most values one condition may list (an `In` list, or a positional match's exceptions:
/// one per sibling in an envoyproxy/ratelimit tree).
pub const MAX_CONDITION_VALUES: usize = 4_096;
/// Most buckets a rolling window may have (window / resolution).
pub const MAX_ROLLING_BUCKETS: u64 = 3_600;
/// Longest window of any kind: ten years, in ms.
pub const MAX_WINDOW_MS: u64 = 10 * 366 * 24 * 3_600 * 1_000;
/// Token buckets are computed in integer units of `capacity * refill_every_ms`; this bounds it.
pub const MAX_BUCKET_UNITS: u64 = 1 << 62;

/// A whole limit configuration: replaces the previous one atomically when applied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitSet {
    pub limits: Vec<LimitSpec>,
}

/// One limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitSpec {
    /// The RLS domain (Limitador: namespace) the limit belongs to.
    pub domain: String,
    /// Name shown in statuses and headers, and the target of `replaces`. May be empty.
    pub name: String,
    /// Which requests the limit applies to, and what its counter is keyed by.
    pub scope: Scope,
    pub capacity: Capacity,
    pub window: WindowSpec,
    /// Shadow mode: counted and reported, never denies.
    pub shadow: bool,
    /// When a decision on this limit may be acknowledged.
    pub ack: Ack,
    /// Names of limits this one replaces when both match the same request (envoyproxy/ratelimit).
    pub replaces: Vec<String>,
}

/// When a decision may be acknowledged to the caller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ack {
    /// After the batch holding it is committed on a majority and applied (the default; for
    /// tokens and money).
    #[default]
    Strict,
    /// As soon as the leader has decided it on its speculative state (applied state plus
    /// in-flight batches), before commit. A leader crash can lose at most the in-flight
    /// window of such hits, which only ever under-counts. For plain request windows.
    Fast,
}

/// How many hits a window admits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Capacity {
    /// At most this many hits per window (a token bucket's burst).
    Max(u64),
    /// Always admits and keeps no counter (envoyproxy/ratelimit's `unlimited`).
    Unlimited,
}

/// Where a limit looks for its match and its counter key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scope {
    /// Evaluated on each descriptor of a request on its own (native and envoyproxy/ratelimit
    /// formats). All conditions must hold; the counter key is built from `key`.
    Descriptor {
        conditions: Vec<EntryCondition>,
        key: DescriptorKey,
    },
    /// Evaluated once on the whole request (Limitador format): CEL expressions over
    /// `descriptors` (a list of maps from entry key to value). All conditions must be `true`;
    /// the counter key is the values of `variables`, each of which must evaluate.
    Request {
        conditions: Vec<String>,
        variables: Vec<String>,
    },
}

/// A condition on one descriptor's entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryCondition {
    /// Entry `key` is present with exactly this value.
    Equals { key: String, value: String },
    /// Entry `key` is absent, or present with another value.
    NotEquals { key: String, value: String },
    /// Entry `key` is present with one of these values.
    In { key: String, values: Vec<String> },
    /// Entry `key` is present (any value).
    Present { key: String },
    /// Entry `key` is absent.
    Absent { key: String },
    /// The descriptor has exactly this many entries (envoyproxy/ratelimit matches by depth).
    EntryCount(u32),
    /// Entry number `index` has key `key` and a value matching `value` (envoyproxy/ratelimit's
    /// positional descriptor tree).
    Positional {
        index: u32,
        key: String,
        value: ValueMatch,
    },
}

/// How a positional entry's value must look.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueMatch {
    /// Exactly this value.
    Exact(String),
    /// Starts with `prefix` and is none of `except` (exact siblings take precedence).
    Prefix { prefix: String, except: Vec<String> },
    /// Any value except these exact values and these prefixes (more specific siblings win).
    Any {
        except: Vec<String>,
        except_prefixes: Vec<String>,
    },
}

/// What a descriptor-scoped limit's counter is keyed by.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DescriptorKey {
    /// The values of these entries, in this order; the limit applies only when all are present.
    Entries(Vec<String>),
    /// Every entry's key and value, in order (envoyproxy/ratelimit).
    AllEntries,
}

/// The window over which a limit's capacity applies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WindowSpec {
    /// Fixed windows aligned to multiples of `duration_ms` since the Unix epoch (second,
    /// minute, hour, and any fixed duration).
    Fixed { duration_ms: u64 },
    /// Fixed windows aligned to the calendar in an IANA time zone (DST-aware).
    Calendar {
        unit: CalendarUnit,
        time_zone: String,
    },
    /// A fixed window of `duration_ms` that opens at the first hit after the previous one
    /// closed (Limitador's behaviour).
    FromFirstHit { duration_ms: u64 },
    /// A rolling window of `window_ms`, exact to `resolution_ms` (which divides it).
    Rolling { window_ms: u64, resolution_ms: u64 },
    /// A token bucket holding up to `capacity` tokens, refilled by `refill_amount` every
    /// `refill_every_ms` (continuously, in integer arithmetic).
    TokenBucket {
        refill_amount: u64,
        refill_every_ms: u64,
    },
}

/// Calendar periods, with their anchors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CalendarUnit {
    /// From local midnight to the next local midnight (23 or 25 hours across DST changes).
    Day,
    /// Seven local days from midnight of `start` (ISO weekday: 1 = Monday ... 7 = Sunday).
    Week { start: u8 },
    /// From local midnight of day `day` (1..=28) of a month to the same day of the next month.
    Month { day: u8 },
    /// From local midnight of `month`/`day` (day 1..=28) to the same date a year later.
    Year { month: u8, day: u8 },
}

/// The units Envoy knows, for `current_limit`. `Unknown` when the window is none of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Unit {
    Unknown,
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Unit {
    /// The unit a window of exactly `ms` corresponds to, if any.
    pub fn of_duration_ms(ms: u64) -> Unit {
        match ms {
            1_000 => Unit::Second,
            60_000 => Unit::Minute,
            3_600_000 => Unit::Hour,
            86_400_000 => Unit::Day,
            604_800_000 => Unit::Week,
            _ => Unit::Unknown,
        }
    }
}

impl WindowSpec {
    /// The Envoy unit this window reports as `current_limit.unit`.
    pub fn unit(&self) -> Unit {
        match self {
            WindowSpec::Fixed { duration_ms } | WindowSpec::FromFirstHit { duration_ms } => {
                Unit::of_duration_ms(*duration_ms)
            }
            WindowSpec::Rolling { window_ms, .. } => Unit::of_duration_ms(*window_ms),
            WindowSpec::Calendar { unit, .. } => match unit {
                CalendarUnit::Day => Unit::Day,
                CalendarUnit::Week { .. } => Unit::Week,
                CalendarUnit::Month { .. } => Unit::Month,
                CalendarUnit::Year { .. } => Unit::Year,
            },
            WindowSpec::TokenBucket {
                refill_every_ms, ..
            } => Unit::of_duration_ms(*refill_every_ms),
        }
    }

    /// Nominal window length in seconds, for the `w=` of draft-03 headers.
    pub fn nominal_seconds(&self) -> u64 {
        match self {
            WindowSpec::Fixed { duration_ms } | WindowSpec::FromFirstHit { duration_ms } => {
                duration_ms / 1_000
            }
            WindowSpec::Rolling { window_ms, .. } => window_ms / 1_000,
            WindowSpec::TokenBucket {
                refill_every_ms, ..
            } => refill_every_ms / 1_000,
            WindowSpec::Calendar { unit, .. } => match unit {
                CalendarUnit::Day => 86_400,
                CalendarUnit::Week { .. } => 604_800,
                CalendarUnit::Month { .. } => 30 * 86_400,
                CalendarUnit::Year { .. } => 365 * 86_400,
            },
        }
    }
}
