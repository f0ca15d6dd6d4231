//! The workload, drawn from the seed: limits (with `ReplaceLimits` changes mid-run) and
//! ShouldRateLimit-equivalent requests over many keys.
//!
//! Two limits never change, so the oracle can hold them to their promise exactly:
//! - `strict-rpw`: a fixed window on descriptor entry `skey`, acknowledged `strict`;
//! - `fast-rpw`: a fixed window on `fkey`, acknowledged `fast`.
//!
//! The others are redrawn at every limit change: a rolling window and a first-hit window on
//! `skey` (sometimes shadow), a token bucket on `fkey` (usually fast, sometimes strict — which
//! makes `fkey` decisions strict for a while), and a token quota on `tkey` debited by reports.
//!
//! Every request carries one extra descriptor `[("rid", <call id>)]` that matches no limit:
//! it lets the oracle find the request in the log.

use tally_server::engine::limits::{
    Ack, Capacity, DescriptorKey, EntryCondition, LimitSet, LimitSpec, Scope, WindowSpec,
};
use tally_server::engine::{Descriptor, Mode, RateLimitCommand};

use crate::rng::SimRng;

pub const DOMAIN: &str = "sim";
pub const STRICT_KEY: &str = "skey";
pub const FAST_KEY: &str = "fkey";
pub const TOKEN_KEY: &str = "tkey";
pub const RID_KEY: &str = "rid";

/// The two limits the capacity invariants check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckedLimit {
    /// The descriptor entry key whose value keys the counter.
    pub entry_key: &'static str,
    pub capacity: u64,
    pub window_ms: u64,
    pub ack: Ack,
}

/// What this seed's workload looks like.
#[derive(Clone, Debug)]
pub struct WorkloadPlan {
    pub strict: CheckedLimit,
    pub fast: CheckedLimit,
    pub strict_keys: u32,
    pub fast_keys: u32,
    pub token_keys: u32,
    /// Requests per second, on average.
    pub rate_per_s: u64,
    /// Client deadline range, ms.
    pub deadline_ms: (u64, u64),
}

impl WorkloadPlan {
    pub fn draw(rng: &SimRng) -> WorkloadPlan {
        WorkloadPlan {
            strict: CheckedLimit {
                entry_key: STRICT_KEY,
                capacity: rng.between(2, 10),
                window_ms: *rng.pick(&[1_000, 2_000]),
                ack: Ack::Strict,
            },
            fast: CheckedLimit {
                entry_key: FAST_KEY,
                capacity: rng.between(2, 10),
                window_ms: 1_000,
                ack: Ack::Fast,
            },
            strict_keys: rng.between(3, 40) as u32,
            fast_keys: rng.between(2, 20) as u32,
            token_keys: rng.between(1, 5) as u32,
            rate_per_s: rng.between(30, 150),
            deadline_ms: (rng.between(300, 800), rng.between(1_000, 3_000)),
        }
    }

    /// A limit set: the two checked limits first, unchanged, then the variable ones.
    pub fn limits(&self, rng: &SimRng) -> LimitSet {
        let mut limits = vec![
            checked_spec("strict-rpw", self.strict),
            checked_spec("fast-rpw", self.fast),
        ];
        if rng.chance(0.8) {
            limits.push(spec(
                "strict-rolling",
                STRICT_KEY,
                Capacity::Max(rng.between(5, 60)),
                WindowSpec::Rolling {
                    window_ms: 5_000,
                    resolution_ms: 500,
                },
                Ack::Strict,
                rng.chance(0.2),
            ));
        }
        if rng.chance(0.5) {
            limits.push(spec(
                "strict-first-hit",
                STRICT_KEY,
                Capacity::Max(rng.between(20, 200)),
                WindowSpec::FromFirstHit {
                    duration_ms: 10_000,
                },
                Ack::Strict,
                false,
            ));
        }
        if rng.chance(0.8) {
            limits.push(spec(
                "fast-bucket",
                FAST_KEY,
                Capacity::Max(rng.between(3, 30)),
                WindowSpec::TokenBucket {
                    refill_amount: rng.between(1, 10),
                    refill_every_ms: 1_000,
                },
                if rng.chance(0.8) {
                    Ack::Fast
                } else {
                    Ack::Strict
                },
                false,
            ));
        }
        limits.push(spec(
            "tokens",
            TOKEN_KEY,
            Capacity::Max(rng.between(1_000, 20_000)),
            WindowSpec::Fixed {
                duration_ms: 10_000,
            },
            Ack::Strict,
            false,
        ));
        LimitSet { limits }
    }

    /// One request (without its `rid` descriptor).
    pub fn request(&self, rng: &SimRng) -> RateLimitCommand {
        let key = |prefix: &str, n: u32| {
            // A few hot keys take half the traffic.
            let i = if rng.chance(0.5) {
                rng.between(0, u64::from(n.min(3)) - 1)
            } else {
                rng.between(0, u64::from(n) - 1)
            };
            format!("{prefix}{i}")
        };
        let descriptor = |k: &str, v: String, hits: Option<u64>| Descriptor {
            entries: vec![(k.to_owned(), v)],
            hits,
            limit_override: None,
        };
        let mut mode = Mode::Enforce;
        let mut hits = 1;
        let descriptors = match rng.weighted(&[45, 10, 5, 5, 20, 5, 5, 5]) {
            // ShouldRateLimit on one strict key, request-level hits.
            0 => vec![descriptor(STRICT_KEY, key("s", self.strict_keys), None)],
            // Per-descriptor hits_addend.
            1 => vec![descriptor(
                STRICT_KEY,
                key("s", self.strict_keys),
                Some(rng.between(2, 3)),
            )],
            // A present per-descriptor 0: check only.
            2 => vec![descriptor(STRICT_KEY, key("s", self.strict_keys), Some(0))],
            // Kuadrant's CheckRateLimit.
            3 => {
                mode = Mode::CheckOnly;
                vec![descriptor(STRICT_KEY, key("s", self.strict_keys), None)]
            }
            // A fast decision.
            4 => vec![descriptor(FAST_KEY, key("f", self.fast_keys), None)],
            // Request-level hits > 1 on a fast key.
            5 => {
                hits = 2;
                vec![descriptor(FAST_KEY, key("f", self.fast_keys), None)]
            }
            // Strict and fast together: strict, debited atomically.
            6 => vec![
                descriptor(STRICT_KEY, key("s", self.strict_keys), None),
                descriptor(FAST_KEY, key("f", self.fast_keys), None),
            ],
            // A usage report (tokens used), debited unconditionally.
            _ => {
                mode = Mode::Report;
                vec![descriptor(
                    TOKEN_KEY,
                    key("t", self.token_keys),
                    Some(rng.between(10, 2_000)),
                )]
            }
        };
        RateLimitCommand {
            domain: DOMAIN.into(),
            descriptors,
            hits,
            mode,
        }
    }
}

fn spec(
    name: &str,
    entry_key: &str,
    capacity: Capacity,
    window: WindowSpec,
    ack: Ack,
    shadow: bool,
) -> LimitSpec {
    LimitSpec {
        domain: DOMAIN.into(),
        name: name.into(),
        scope: Scope::Descriptor {
            conditions: vec![EntryCondition::Present {
                key: entry_key.into(),
            }],
            key: DescriptorKey::Entries(vec![entry_key.into()]),
        },
        capacity,
        window,
        shadow,
        ack,
        replaces: Vec::new(),
    }
}

/// Tags a request with its call id.
pub fn with_rid(mut cmd: RateLimitCommand, rid: u64) -> RateLimitCommand {
    cmd.descriptors.push(Descriptor {
        entries: vec![(RID_KEY.into(), rid.to_string())],
        hits: None,
        limit_override: None,
    });
    cmd
}

/// The call id a request was tagged with.
pub fn rid_of(cmd: &RateLimitCommand) -> Option<u64> {
    cmd.descriptors
        .iter()
        .find(|d| d.entries.first().is_some_and(|(k, _)| k == RID_KEY))
        .and_then(|d| d.entries[0].1.parse().ok())
}

/// The call id of a tagged rate-limit command.
pub fn rid_of_command(c: &tally_server::engine::Command) -> Option<u64> {
    match c {
        tally_server::engine::Command::RateLimit(rl) => rid_of(rl),
        _ => None,
    }
}

/// Hits the request charges to the counter of `entry_key = value`, per value: the sum over its
/// descriptors carrying that key (per-descriptor hits, else the request's).
pub fn hits_by_value(cmd: &RateLimitCommand, entry_key: &str) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for d in &cmd.descriptors {
        if d.limit_override.is_some() {
            continue;
        }
        let Some((_, v)) = d.entries.iter().find(|(k, _)| k == entry_key) else {
            continue;
        };
        let h = d.hits.unwrap_or(cmd.hits);
        match out.iter_mut().find(|(x, _)| x == v) {
            Some((_, total)) => *total += h,
            None => out.push((v.clone(), h)),
        }
    }
    out
}

/// A short description of a request for the trace.
pub fn describe(cmd: &RateLimitCommand) -> String {
    let mut parts = Vec::new();
    for d in &cmd.descriptors {
        let Some((k, v)) = d.entries.first() else {
            continue;
        };
        if k == RID_KEY {
            continue;
        }
        match d.hits {
            Some(h) => parts.push(format!("{k}={v}×{h}")),
            None => parts.push(format!("{k}={v}")),
        }
    }
    let mode = match cmd.mode {
        Mode::Enforce => "",
        Mode::CheckOnly => " check",
        Mode::Report => " report",
    };
    let hits = if cmd.hits == 1 {
        String::new()
    } else {
        format!(" hits={}", cmd.hits)
    };
    format!("{}{hits}{mode}", parts.join(","))
}

/// The limit spec of a checked limit (its identity — domain, scope, window — is what keeps
/// its counters across limit changes).
pub fn checked_spec(name: &str, l: CheckedLimit) -> LimitSpec {
    spec(
        name,
        l.entry_key,
        Capacity::Max(l.capacity),
        WindowSpec::Fixed {
            duration_ms: l.window_ms,
        },
        l.ack,
        false,
    )
}
