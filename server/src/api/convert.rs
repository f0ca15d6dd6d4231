//! Wire ⇄ domain conversions for the rate-limit services, and the response's headers and body.

use tally_proto::envoy::config::core::v3::HeaderValue;
use tally_proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use tally_proto::envoy::service::ratelimit::v3::rate_limit_response::{
    Code as WireCode, DescriptorStatus as WireStatus, RateLimit, rate_limit::Unit as WireUnit,
};
use tally_proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tally_proto::envoy::r#type::v3::RateLimitUnit;

use std::sync::Arc;

use crate::engine::limits::{Unit, WindowSpec};
use crate::engine::usage::QuotaStanding;
use crate::engine::{
    Code, Decision, Descriptor, DescriptorStatus, LimitInfo, LimitOverride, Mode, RateLimitCommand,
};

/// The body Envoy returns with a 429 when Tally says OVER_LIMIT (OpenAI's error shape).
pub const OVER_LIMIT_BODY: &str = r#"{"error":{"message":"Rate limit exceeded","type":"rate_limit_error","code":"rate_limit_exceeded"}}"#;

/// How responses are dressed.
#[derive(Clone, Copy, Debug, Default)]
pub struct ResponseOptions {
    /// Add draft-03 `x-ratelimit-limit`, `-remaining` and `-reset` to every response.
    pub draft03_headers: bool,
}

/// Which hits rule a service applies to the request-level `hits_addend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestHits {
    /// Envoy's rule: 0 means 1.
    ZeroMeansOne,
    /// Report's rule: the number is the usage, 0 adds nothing.
    Literal,
}

/// Builds the engine command from a wire request. Validation happens in the engine's
/// [`RateLimitCommand::validate`], which names wire fields.
pub fn command(req: RateLimitRequest, mode: Mode, rule: RequestHits) -> RateLimitCommand {
    let hits = match (req.hits_addend, rule) {
        (0, RequestHits::ZeroMeansOne) => 1,
        (n, _) => u64::from(n),
    };
    RateLimitCommand {
        domain: req.domain,
        descriptors: req.descriptors.into_iter().map(Descriptor::from).collect(),
        hits,
        mode,
    }
}

impl From<RateLimitDescriptor> for Descriptor {
    fn from(d: RateLimitDescriptor) -> Descriptor {
        Descriptor {
            entries: d.entries.into_iter().map(|e| (e.key, e.value)).collect(),
            hits: d.hits_addend,
            limit_override: d.limit.map(|o| LimitOverride {
                requests_per_unit: u64::from(o.requests_per_unit),
                unit: RateLimitUnit::try_from(o.unit).map_or(Unit::Unknown, Unit::from),
            }),
        }
    }
}

impl From<RateLimitUnit> for Unit {
    fn from(u: RateLimitUnit) -> Unit {
        match u {
            RateLimitUnit::Unknown => Unit::Unknown,
            RateLimitUnit::Second => Unit::Second,
            RateLimitUnit::Minute => Unit::Minute,
            RateLimitUnit::Hour => Unit::Hour,
            RateLimitUnit::Day => Unit::Day,
            RateLimitUnit::Month => Unit::Month,
            RateLimitUnit::Year => Unit::Year,
        }
    }
}

impl From<Unit> for WireUnit {
    fn from(u: Unit) -> WireUnit {
        match u {
            Unit::Unknown => WireUnit::Unknown,
            Unit::Second => WireUnit::Second,
            Unit::Minute => WireUnit::Minute,
            Unit::Hour => WireUnit::Hour,
            Unit::Day => WireUnit::Day,
            Unit::Week => WireUnit::Week,
            Unit::Month => WireUnit::Month,
            Unit::Year => WireUnit::Year,
        }
    }
}

impl From<Code> for WireCode {
    fn from(c: Code) -> WireCode {
        match c {
            Code::Ok => WireCode::Ok,
            Code::OverLimit => WireCode::OverLimit,
        }
    }
}

fn saturate_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl From<&DescriptorStatus> for WireStatus {
    fn from(s: &DescriptorStatus) -> WireStatus {
        WireStatus {
            code: WireCode::from(s.code) as i32,
            current_limit: s.current_limit.as_ref().map(|l| RateLimit {
                name: l.name.to_string(),
                requests_per_unit: saturate_u32(l.capacity),
                unit: WireUnit::from(l.unit) as i32,
            }),
            limit_remaining: saturate_u32(s.remaining),
            duration_until_reset: s.current_limit.as_ref().map(|_| prost_types::Duration {
                seconds: (s.reset_in_ms / 1_000) as i64,
                nanos: ((s.reset_in_ms % 1_000) * 1_000_000) as i32,
            }),
            quota: None,
        }
    }
}

/// A metering quota reported as a descriptor's status, as a limit would be: its name and
/// limit as `current_limit` (the unit from its window; `Unknown` for a concurrency cap,
/// which has none), what is left as `limit_remaining`, its window's reset as
/// `duration_until_reset`.
pub fn quota_status(
    s: &QuotaStanding,
    window: Option<&WindowSpec>,
    code: Code,
) -> DescriptorStatus {
    DescriptorStatus {
        code,
        current_limit: Some(LimitInfo {
            name: Arc::from(s.quota.as_str()),
            capacity: s.limit,
            unit: window.map_or(Unit::Unknown, WindowSpec::unit),
            window_s: window.map_or(0, WindowSpec::nominal_seconds),
        }),
        remaining: s.remaining,
        reset_in_ms: s.reset_in_ms,
    }
}

/// The wire response for a decision.
pub fn response(decision: &Decision, options: ResponseOptions) -> RateLimitResponse {
    let mut headers = Vec::new();
    if options.draft03_headers {
        headers.extend(draft03_headers(decision));
    }
    let mut raw_body = Vec::new();
    if decision.code == Code::OverLimit {
        // Only on 429: on OK these headers would be added to the upstream's own response.
        headers.push(header("content-type", "application/json"));
        raw_body = OVER_LIMIT_BODY.as_bytes().to_vec();
    }
    RateLimitResponse {
        overall_code: WireCode::from(decision.code) as i32,
        statuses: decision.statuses.iter().map(WireStatus::from).collect(),
        response_headers_to_add: headers,
        raw_body,
        ..RateLimitResponse::default()
    }
}

fn header(key: &str, value: impl Into<String>) -> HeaderValue {
    HeaderValue {
        key: key.to_owned(),
        value: value.into(),
        raw_value: Vec::new(),
    }
}

/// draft-ietf-httpapi-ratelimit-headers-03, as Envoy writes them: the most constrained
/// status leads `x-ratelimit-limit`, followed by every limit's quota policy.
fn draft03_headers(decision: &Decision) -> Vec<HeaderValue> {
    let limited: Vec<&DescriptorStatus> = decision
        .statuses
        .iter()
        .filter(|s| s.current_limit.is_some())
        .collect();
    let Some(tightest) = limited
        .iter()
        .min_by_key(|s| (s.code == Code::Ok, s.remaining))
    else {
        return Vec::new();
    };
    let lead = tightest.current_limit.as_ref().expect("filtered above");
    let mut limit = lead.capacity.to_string();
    let mut seen = Vec::new();
    for s in &limited {
        let l = s.current_limit.as_ref().expect("filtered above");
        let policy = if l.name.is_empty() {
            format!("{};w={}", l.capacity, l.window_s)
        } else {
            format!("{};w={};name=\"{}\"", l.capacity, l.window_s, l.name)
        };
        if !seen.contains(&policy) {
            limit.push_str(", ");
            limit.push_str(&policy);
            seen.push(policy);
        }
    }
    vec![
        header("x-ratelimit-limit", limit),
        header("x-ratelimit-remaining", tightest.remaining.to_string()),
        header(
            "x-ratelimit-reset",
            tightest.reset_in_ms.div_ceil(1_000).to_string(),
        ),
    ]
}
