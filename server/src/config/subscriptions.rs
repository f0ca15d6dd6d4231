//! The native format's `metering.subscriptions`: tiers that API keys are bound to.
//!
//! ```yaml
//! metering:
//!   subscriptions:
//!     - name: free                # required, unique
//!       models: [gpt-4o-mini]     # optional; the models its keys may use (none: every model)
//!       requests_per_minute: 5    # optional; per key, rolling 60 s
//!       tokens_per_minute: 100    # optional; input + output tokens per key, rolling 60 s
//!       max_concurrent: 2         # optional; requests in flight per key
//!       max_classification: internal   # optional; public | internal | confidential | restricted
//!       labels: { cost-center: web }   # optional; recorded with audit entries
//!       budgets:                  # optional, at most 8; a quota per key (fields as for quotas,
//!         - name: daily-tokens    # without `match` and `per`)
//!           metric: total_tokens
//!           limit: 1000
//!           window: { fixed: day, time_zone: Europe/Berlin }
//!           thresholds: [80, 95]
//! ```
//!
//! Each limit becomes a quota named `sub:<name>:<limit>` (see `engine::keys`). A file puts
//! the subscriptions it lists in force (created, or replaced when they differ); subscriptions
//! created over the API and absent from the file are left alone.

use serde::Deserialize;

use super::metering::{QuotaRaw, quota};
use super::native::OrderedMap;
use super::{ConfigError, FieldPath, Source, show};
use crate::engine::access::{
    Budget, CLASSIFICATIONS, MAX_BUDGETS, MAX_SUBSCRIPTIONS, Subscription,
};
use crate::engine::usage::Metric;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SubscriptionRaw {
    name: String,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    requests_per_minute: Option<u64>,
    #[serde(default)]
    tokens_per_minute: Option<u64>,
    #[serde(default)]
    max_concurrent: Option<u64>,
    #[serde(default)]
    max_classification: Option<String>,
    #[serde(default)]
    labels: Option<OrderedMap<String>>,
    #[serde(default)]
    budgets: Vec<QuotaRaw>,
}

pub(super) fn parse(
    src: &Source<'_>,
    raw: &[SubscriptionRaw],
    path: &FieldPath,
) -> Result<Vec<Subscription>, ConfigError> {
    if raw.len() > MAX_SUBSCRIPTIONS {
        return Err(src.invalid(path, format!("more than {MAX_SUBSCRIPTIONS} subscriptions")));
    }
    let mut out: Vec<Subscription> = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let path = path.index(i);
        if out.iter().any(|s| s.name == r.name) {
            return Err(src.invalid(
                &path.key("name"),
                format!("subscription {} is listed twice", show(&r.name)),
            ));
        }
        out.push(subscription(src, r, &path)?);
    }
    Ok(out)
}

fn subscription(
    src: &Source<'_>,
    r: &SubscriptionRaw,
    path: &FieldPath,
) -> Result<Subscription, ConfigError> {
    let max_classification = match &r.max_classification {
        None => None,
        Some(name) => Some(
            CLASSIFICATIONS
                .iter()
                .position(|c| c == name)
                .map(|i| i as u8)
                .ok_or_else(|| {
                    src.invalid(
                        &path.key("max_classification"),
                        format!("{}: one of {}", show(name), CLASSIFICATIONS.join(", ")),
                    )
                })?,
        ),
    };
    if r.budgets.len() > MAX_BUDGETS {
        return Err(src.invalid(
            &path.key("budgets"),
            format!("at most {MAX_BUDGETS} budgets"),
        ));
    }
    let mut budgets = Vec::with_capacity(r.budgets.len());
    for (i, b) in r.budgets.iter().enumerate() {
        budgets.push(budget(src, b, &path.key("budgets").index(i))?);
    }
    let s = Subscription {
        name: r.name.clone(),
        allowed_models: r.models.clone(),
        requests_per_minute: r.requests_per_minute,
        tokens_per_minute: r.tokens_per_minute,
        budgets,
        max_classification,
        max_concurrent: r.max_concurrent,
        labels: r
            .labels
            .as_ref()
            .map(|m| m.0.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default(),
    };
    // The engine's checks, here too, so the error names the file's field.
    s.validate().map_err(|e| match e {
        crate::engine::CommandError::Invalid { field, reason } => {
            src.invalid(&path.key(&field), reason)
        }
        other => src.invalid(path, other.to_string()),
    })?;
    Ok(s)
}

fn budget(src: &Source<'_>, raw: &QuotaRaw, path: &FieldPath) -> Result<Budget, ConfigError> {
    if raw.has_match_or_per() {
        return Err(src.invalid(
            path,
            "a budget has no `match` or `per`: it applies to each key of its subscription".into(),
        ));
    }
    let spec = quota(src, raw, path)?;
    let Some(window) = spec.window else {
        return Err(src.invalid(
            &path.key("metric"),
            "a budget needs a window (no `concurrent`: use max_concurrent)".into(),
        ));
    };
    debug_assert_ne!(spec.metric, Metric::Concurrent);
    Ok(Budget {
        name: spec.name,
        metric: spec.metric,
        limit: spec.limit,
        window,
        enforcement: spec.enforcement,
        thresholds_pct: spec.thresholds_pct,
    })
}

/// A subscriptions document on its own (`tally subscriptions create --file F`): the same
/// syntax as the config section, under a top-level `subscriptions:`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscriptionsFile {
    subscriptions: Vec<SubscriptionRaw>,
}

/// Parses a subscriptions document (YAML or JSON); errors name the line and field.
pub fn parse_subscriptions(text: &str, origin: &str) -> Result<Vec<Subscription>, ConfigError> {
    let src = Source::new(text, origin);
    let file: SubscriptionsFile = src.parse()?;
    parse(
        &src,
        &file.subscriptions,
        &FieldPath::root().key("subscriptions"),
    )
}
