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
    Budget, CLASSIFICATIONS, KeyOverrides, MAX_BUDGETS, MAX_SUBSCRIPTIONS, Subscription,
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
    let max_classification = classification(src, r.max_classification.as_deref(), path)?;
    let budgets = budgets(src, &r.budgets, path)?;
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

fn classification(
    src: &Source<'_>,
    name: Option<&str>,
    path: &FieldPath,
) -> Result<Option<u8>, ConfigError> {
    let Some(name) = name else {
        return Ok(None);
    };
    let level = CLASSIFICATIONS
        .iter()
        .position(|c| *c == name)
        .ok_or_else(|| {
            src.invalid(
                &path.key("max_classification"),
                format!("{}: one of {}", show(name), CLASSIFICATIONS.join(", ")),
            )
        })?;
    Ok(Some(level as u8))
}

fn budgets(
    src: &Source<'_>,
    raw: &[QuotaRaw],
    path: &FieldPath,
) -> Result<Vec<Budget>, ConfigError> {
    if raw.len() > MAX_BUDGETS {
        return Err(src.invalid(
            &path.key("budgets"),
            format!("at most {MAX_BUDGETS} budgets"),
        ));
    }
    raw.iter()
        .enumerate()
        .map(|(i, b)| budget(src, b, &path.key("budgets").index(i)))
        .collect()
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

/// A key's overrides: the fields of a subscription (all optional, no `name`), each one set
/// replacing the subscription's for that key.
///
/// ```yaml
/// requests_per_minute: 100
/// models: [gpt-4o, o3-mini]
/// budgets:
///   - { name: daily-tokens, metric: total_tokens, limit: 5000, window: { fixed: day } }
/// ```
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OverridesRaw {
    #[serde(default)]
    models: Option<Vec<String>>,
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
    budgets: Option<Vec<QuotaRaw>>,
}

/// Parses a key-overrides document (YAML or JSON); errors name the line and field. An empty
/// document is no overrides.
pub fn parse_key_overrides(text: &str, origin: &str) -> Result<KeyOverrides, ConfigError> {
    if text.trim().is_empty() {
        return Ok(KeyOverrides::default());
    }
    let src = Source::new(text, origin);
    let r: OverridesRaw = src.parse()?;
    let root = FieldPath::root();
    let overrides = KeyOverrides {
        allowed_models: r.models.clone(),
        requests_per_minute: r.requests_per_minute,
        tokens_per_minute: r.tokens_per_minute,
        budgets: match &r.budgets {
            None => None,
            Some(raw) => Some(budgets(&src, raw, &root)?),
        },
        max_classification: classification(&src, r.max_classification.as_deref(), &root)?,
        max_concurrent: r.max_concurrent,
        labels: r
            .labels
            .as_ref()
            .map(|m| m.0.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
    };
    overrides.validate().map_err(|e| match e {
        crate::engine::CommandError::Invalid { field, reason } => {
            let field = field
                .strip_prefix("overrides.")
                .unwrap_or(&field)
                .to_owned();
            let field = field.replace("allowed_models", "models");
            src.invalid(&root.key(&field), reason)
        }
        other => src.invalid(&root, other.to_string()),
    })?;
    Ok(overrides)
}

#[cfg(test)]
mod override_tests {
    use super::*;

    #[test]
    fn overrides_parse_and_their_errors_name_the_field() {
        let o = parse_key_overrides(
            "requests_per_minute: 100\nmodels: [gpt-4o]\nmax_classification: internal\n",
            "doc",
        )
        .unwrap();
        assert_eq!(o.requests_per_minute, Some(100));
        assert_eq!(o.allowed_models, Some(vec!["gpt-4o".to_owned()]));
        assert_eq!(o.max_classification, Some(1));
        assert_eq!(o.budgets, None);
        assert!(parse_key_overrides("  \n", "doc").unwrap().is_empty());
        let e = parse_key_overrides("requests_per_minute: 0\n", "doc").unwrap_err();
        assert!(e.to_string().contains("requests_per_minute"), "{e}");
        let e = parse_key_overrides("name: gold\n", "doc").unwrap_err();
        assert!(e.to_string().contains("name"), "{e}");
        let e = parse_key_overrides("max_classification: secret\n", "doc").unwrap_err();
        assert!(e.to_string().contains("max_classification"), "{e}");
    }
}
