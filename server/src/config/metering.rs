//! The native format's `metering` section: model prices and usage quotas.
//!
//! An optional top-level key next to `domains`. Limits (under `domains`) decide Envoy's
//! rate-limit requests; quotas count the usage reported through `tally.v1.Usage` (reports,
//! reservations, commits) and prices turn its tokens into money.
//!
//! ```yaml
//! metering:
//!   prices:                       # optional; nano-dollars (1e-9 USD) per token, whole numbers
//!     - model: gpt-4o-mini        # listed once, not empty
//!       input_nusd: 150           # $0.15 per million prompt tokens
//!       cached_input_nusd: 75     # prompt tokens served from a cache (default: input_nusd)
//!       output_nusd: 600          # completion tokens, reasoning included
//!   quotas:
//!     - name: free-daily-tokens   # required, unique
//!       match:                    # optional; all must equal the usage's (none: all usage)
//!         subscription: free      #   subject, subscription, model: a value
//!         # tag: { team: search } #   one tag key and the value it must have
//!       per: [subject]            # optional; one counter per distinct combination of
//!                                 # subject, subscription, model, tag:KEY (none: one counter)
//!       metric: total_tokens      # requests | total_tokens | input_tokens | output_tokens |
//!                                 # cost_usd | concurrent
//!       limit: 1000               # >= 1, in the metric's unit; cost_usd: US dollars as a
//!                                 # decimal ("5.00", "0.000001"; at most 9 decimals)
//!       window: { fixed: day, time_zone: Europe/Berlin }
//!                                 # as for limits: fixed, calendar (with time zone and anchor)
//!                                 # or rolling; no token_bucket or from_first_hit; and none
//!                                 # at all exactly for `concurrent`
//!       enforcement: hard         # hard (default): a reservation that does not fit is denied;
//!                                 # soft: admitted, an Exceeded event says so;
//!                                 # shadow: counted and reported only, no events
//!       thresholds: [80, 95]      # optional; percent of limit, increasing, 1..=100, at most 8:
//!                                 # an event once per period when reached (not for shadow)
//! ```
//!
//! Money is exact: a dollar amount is parsed digit by digit into integer nano-dollars, never
//! through a float. Without a `prices:` key the file leaves the prices in force alone (they
//! may have been set over the API); `prices: []` sets an empty catalog.

use std::collections::HashMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{Deserializer, Visitor};
use serde_saphyr::Spanned;

use super::native::{OneOrMany, OrderedMap, WindowRaw, raw_text, window};
use super::{ConfigError, FieldPath, Source, show};
use crate::engine::limits::{Capacity, WindowSpec};
use crate::engine::usage::{
    Dimension, Enforcement, MAX_DIMENSIONS, MAX_MODELS, MAX_PRICE_NUSD, MAX_QUOTAS, MAX_THRESHOLDS,
    MAX_USAGE_STRING_BYTES, Metric, ModelPrice, PriceCatalog, QuotaFilter, QuotaSet, QuotaSpec,
};

/// Nano-dollars in a US dollar.
pub const NUSD_PER_USD: u64 = 1_000_000_000;

/// The prices and quotas a limits file configures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metering {
    /// The file's `prices:` list; `None` when it has none, so the prices in force (perhaps
    /// set over the API) are left alone.
    pub prices: Option<PriceCatalog>,
    /// The file's quotas (empty without any): they replace the quotas in force.
    pub quotas: QuotaSet,
    /// The file's subscriptions (tiers), put in force when they differ.
    pub subscriptions: Vec<crate::engine::access::Subscription>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MeteringRaw {
    #[serde(default)]
    prices: Option<Vec<PriceRaw>>,
    #[serde(default)]
    quotas: Vec<QuotaRaw>,
    #[serde(default)]
    subscriptions: Vec<super::subscriptions::SubscriptionRaw>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceRaw {
    model: String,
    input_nusd: u64,
    #[serde(default)]
    cached_input_nusd: Option<u64>,
    output_nusd: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct QuotaRaw {
    name: String,
    #[serde(default, rename = "match")]
    match_: Option<FilterRaw>,
    #[serde(default)]
    per: OneOrMany,
    metric: String,
    limit: Spanned<AmountRaw>,
    #[serde(default)]
    window: Option<WindowRaw>,
    #[serde(default)]
    enforcement: EnforcementRaw,
    #[serde(default)]
    thresholds: Vec<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterRaw {
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    subscription: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    tag: Option<OrderedMap<String>>,
}

/// `enforcement: hard | soft | shadow`.
#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum EnforcementRaw {
    #[default]
    Hard,
    Soft,
    Shadow,
}

impl From<EnforcementRaw> for Enforcement {
    fn from(e: EnforcementRaw) -> Self {
        match e {
            EnforcementRaw::Hard => Enforcement::Hard,
            EnforcementRaw::Soft => Enforcement::Soft,
            EnforcementRaw::Shadow => Enforcement::Shadow,
        }
    }
}

/// A `limit:` as written: a whole number, a string (a dollar amount), or anything else (a
/// float, a negative or huge number: dollar amounts are read from their source text).
enum AmountRaw {
    Whole(u64),
    Text(String),
    Null,
    Other,
}

impl<'de> Deserialize<'de> for AmountRaw {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Vis;
        impl<'de> Visitor<'de> for Vis {
            type Value = AmountRaw;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number, or for cost_usd an amount of US dollars")
            }
            fn visit_u64<E>(self, v: u64) -> Result<AmountRaw, E> {
                Ok(AmountRaw::Whole(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<AmountRaw, E> {
                Ok(u64::try_from(v).map_or(AmountRaw::Other, AmountRaw::Whole))
            }
            fn visit_u128<E>(self, _: u128) -> Result<AmountRaw, E> {
                Ok(AmountRaw::Other)
            }
            fn visit_i128<E>(self, _: i128) -> Result<AmountRaw, E> {
                Ok(AmountRaw::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<AmountRaw, E> {
                Ok(AmountRaw::Other)
            }
            fn visit_bool<E>(self, _: bool) -> Result<AmountRaw, E> {
                Ok(AmountRaw::Other)
            }
            fn visit_str<E>(self, v: &str) -> Result<AmountRaw, E> {
                Ok(AmountRaw::Text(v.to_owned()))
            }
            fn visit_unit<E>(self) -> Result<AmountRaw, E> {
                Ok(AmountRaw::Null)
            }
            fn visit_none<E>(self) -> Result<AmountRaw, E> {
                Ok(AmountRaw::Null)
            }
        }
        deserializer.deserialize_any(Vis)
    }
}

/// Builds and checks the metering section at `path` (`metering`).
pub(super) fn parse(
    src: &Source<'_>,
    raw: &MeteringRaw,
    path: &FieldPath,
) -> Result<Metering, ConfigError> {
    let prices = match &raw.prices {
        Some(list) => Some(prices(src, list, &path.key("prices"))?),
        None => None,
    };
    let qpath = path.key("quotas");
    if raw.quotas.len() > MAX_QUOTAS {
        return Err(src.invalid(
            &qpath.index(MAX_QUOTAS),
            format!("more than {MAX_QUOTAS} quotas in one set"),
        ));
    }
    let mut quotas = Vec::with_capacity(raw.quotas.len());
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, q) in raw.quotas.iter().enumerate() {
        let path = qpath.index(i);
        let spec = quota(src, q, &path)?;
        if let Some(first) = names.insert(&q.name, i) {
            return Err(src.invalid(
                &path.key("name"),
                format!(
                    "name {} is already used by {}",
                    show(&q.name),
                    src.describe(&qpath.index(first))
                ),
            ));
        }
        quotas.push(spec);
    }
    let subscriptions =
        super::subscriptions::parse(src, &raw.subscriptions, &path.key("subscriptions"))?;
    Ok(Metering {
        prices,
        quotas: QuotaSet { quotas },
        subscriptions,
    })
}

/// Checks a string against the metering bound ([`MAX_USAGE_STRING_BYTES`]), and that it is
/// not empty if `required`.
fn check_usage_string(
    src: &Source<'_>,
    path: &FieldPath,
    s: &str,
    required: bool,
) -> Result<(), ConfigError> {
    super::check_string_max(src, path, s, required, MAX_USAGE_STRING_BYTES)
}

fn prices(
    src: &Source<'_>,
    raw: &[PriceRaw],
    path: &FieldPath,
) -> Result<PriceCatalog, ConfigError> {
    if raw.len() > MAX_MODELS {
        return Err(src.invalid(
            &path.index(MAX_MODELS),
            format!("more than {MAX_MODELS} models in one price catalog"),
        ));
    }
    let mut models = Vec::with_capacity(raw.len());
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, p) in raw.iter().enumerate() {
        let ipath = path.index(i);
        check_usage_string(src, &ipath.key("model"), &p.model, true)?;
        if let Some(first) = seen.insert(&p.model, i) {
            return Err(src.invalid(
                &ipath.key("model"),
                format!(
                    "model {} is already priced at {}",
                    show(&p.model),
                    src.describe(&path.index(first))
                ),
            ));
        }
        let cached_input_nusd = p.cached_input_nusd.unwrap_or(p.input_nusd);
        for (field, nusd) in [
            ("input_nusd", p.input_nusd),
            ("cached_input_nusd", cached_input_nusd),
            ("output_nusd", p.output_nusd),
        ] {
            if nusd > MAX_PRICE_NUSD {
                return Err(src.invalid(
                    &ipath.key(field),
                    format!(
                        "{nusd} nano-dollars per token is more than the {MAX_PRICE_NUSD} \
                         (1,000 USD) allowed"
                    ),
                ));
            }
        }
        models.push(ModelPrice {
            model: p.model.clone(),
            input_nusd: p.input_nusd,
            cached_input_nusd,
            output_nusd: p.output_nusd,
        });
    }
    let catalog = PriceCatalog { models };
    // The engine's own checks, so that a catalog that loads is one the engine accepts.
    catalog
        .validate()
        .map_err(|e| src.invalid(path, e.to_string()))?;
    Ok(catalog)
}

impl QuotaRaw {
    /// Whether it sets `match` or `per` (a subscription's budget may not).
    pub(super) fn has_match_or_per(&self) -> bool {
        self.match_.is_some() || !self.per.0.is_empty()
    }
}

pub(super) fn quota(
    src: &Source<'_>,
    raw: &QuotaRaw,
    path: &FieldPath,
) -> Result<QuotaSpec, ConfigError> {
    check_usage_string(src, &path.key("name"), &raw.name, true)?;
    let filter = match &raw.match_ {
        Some(m) => filter(src, m, &path.key("match"))?,
        None => QuotaFilter::default(),
    };
    let per = dimensions(src, &raw.per.0, &path.key("per"))?;

    let mpath = path.key("metric");
    let metric = metric(&raw.metric).ok_or_else(|| {
        src.invalid(
            &mpath,
            format!(
                "unknown metric {} (expected requests, total_tokens, input_tokens, \
                 output_tokens, cost_usd or concurrent)",
                show(&raw.metric)
            ),
        )
    })?;
    let limit = limit(src, metric, &raw.metric, &raw.limit, &path.key("limit"))?;

    let wpath = path.key("window");
    let window = match (&raw.window, metric) {
        (Some(_), Metric::Concurrent) => {
            return Err(src.invalid(
                &wpath,
                "a `concurrent` quota counts the requests in flight now and has no window; \
                 remove `window`"
                    .to_owned(),
            ));
        }
        (None, Metric::Concurrent) => None,
        (None, _) => {
            return Err(src.invalid(
                path,
                "missing `window` (every metric but `concurrent` is counted over a window)"
                    .to_owned(),
            ));
        }
        (Some(w), _) => Some(quota_window(src, w, &wpath, limit)?),
    };

    let enforcement: Enforcement = raw.enforcement.into();
    let tpath = path.key("thresholds");
    if raw.thresholds.len() > MAX_THRESHOLDS {
        return Err(src.invalid(
            &tpath,
            format!(
                "{} thresholds is more than the {MAX_THRESHOLDS} allowed",
                raw.thresholds.len()
            ),
        ));
    }
    let mut thresholds_pct = Vec::with_capacity(raw.thresholds.len());
    for (i, &pct) in raw.thresholds.iter().enumerate() {
        let at = tpath.index(i);
        let Some(pct) = u8::try_from(pct).ok().filter(|p| (1..=100).contains(p)) else {
            return Err(src.invalid(
                &at,
                format!("{pct} is not a percentage of the limit from 1 to 100"),
            ));
        };
        if let Some(&before) = thresholds_pct.last()
            && pct <= before
        {
            return Err(src.invalid(
                &at,
                format!(
                    "{pct} does not come after {before}: thresholds are listed in \
                     increasing order, each once"
                ),
            ));
        }
        thresholds_pct.push(pct);
    }
    if enforcement == Enforcement::Shadow && !thresholds_pct.is_empty() {
        return Err(src.invalid(
            &tpath,
            "a shadow quota fires no events, so its thresholds would never be heard; \
             remove them or make it `enforcement: soft`"
                .to_owned(),
        ));
    }

    Ok(QuotaSpec {
        name: raw.name.clone(),
        filter,
        per,
        metric,
        limit,
        window,
        enforcement,
        thresholds_pct,
    })
}

fn metric(s: &str) -> Option<Metric> {
    Some(match s {
        "requests" => Metric::Requests,
        "total_tokens" => Metric::TotalTokens,
        "input_tokens" => Metric::InputTokens,
        "output_tokens" => Metric::OutputTokens,
        "cost_usd" => Metric::CostNusd,
        "concurrent" => Metric::Concurrent,
        _ => return None,
    })
}

fn filter(src: &Source<'_>, raw: &FilterRaw, path: &FieldPath) -> Result<QuotaFilter, ConfigError> {
    if let Some(subject) = &raw.subject {
        // Every usage has a subject: an empty one would match nothing.
        check_usage_string(src, &path.key("subject"), subject, true)?;
    }
    // An empty subscription or model matches usage that has none.
    for (field, value) in [("subscription", &raw.subscription), ("model", &raw.model)] {
        if let Some(value) = value {
            check_usage_string(src, &path.key(field), value, false)?;
        }
    }
    let tag = match &raw.tag {
        None => None,
        Some(OrderedMap(entries)) => {
            let tpath = path.key("tag");
            match entries.as_slice() {
                [] => {
                    return Err(src.invalid(
                        &tpath,
                        "empty: write the tag key and the value it must have, { KEY: VALUE }"
                            .to_owned(),
                    ));
                }
                [(key, value)] => {
                    let kpath = tpath.key(key);
                    check_usage_string(src, &kpath, key, true)?;
                    check_usage_string(src, &kpath, value, false)?;
                    Some((key.clone(), value.clone()))
                }
                [_, (second, _), ..] => {
                    return Err(src.invalid(
                        &tpath.key(second),
                        "a quota matches on one tag; for another, write another quota".to_owned(),
                    ));
                }
            }
        }
    };
    Ok(QuotaFilter {
        subject: raw.subject.clone(),
        subscription: raw.subscription.clone(),
        model: raw.model.clone(),
        tag,
        except_subjects: Vec::new(),
    })
}

fn dimensions(
    src: &Source<'_>,
    raw: &[String],
    path: &FieldPath,
) -> Result<Vec<Dimension>, ConfigError> {
    if raw.len() > MAX_DIMENSIONS {
        return Err(src.invalid(
            path,
            format!(
                "{} dimensions is more than the {MAX_DIMENSIONS} allowed",
                raw.len()
            ),
        ));
    }
    let mut out: Vec<Dimension> = Vec::with_capacity(raw.len());
    for (i, name) in raw.iter().enumerate() {
        let at = path.index(i);
        let dimension = match name.as_str() {
            "subject" => Dimension::Subject,
            "subscription" => Dimension::Subscription,
            "model" => Dimension::Model,
            other => match other.strip_prefix("tag:") {
                Some(key) => {
                    if key.is_empty() {
                        return Err(src
                            .invalid(&at, "`tag:` needs the tag's key, e.g. tag:team".to_owned()));
                    }
                    check_usage_string(src, &at, key, true)?;
                    Dimension::Tag(key.to_owned())
                }
                None => {
                    return Err(src.invalid(
                        &at,
                        format!(
                            "unknown dimension {} (expected subject, subscription, model or \
                             tag:KEY)",
                            show(name)
                        ),
                    ));
                }
            },
        };
        if out.contains(&dimension) {
            return Err(src.invalid(&at, format!("{} is listed twice", show(name))));
        }
        out.push(dimension);
    }
    Ok(out)
}

fn limit(
    src: &Source<'_>,
    metric: Metric,
    metric_name: &str,
    raw: &Spanned<AmountRaw>,
    path: &FieldPath,
) -> Result<u64, ConfigError> {
    if metric == Metric::CostNusd {
        let text = match &raw.value {
            AmountRaw::Text(s) => s.as_str(),
            AmountRaw::Null => return Err(src.invalid(path, "missing value".to_owned())),
            AmountRaw::Whole(_) | AmountRaw::Other => raw_text(src, raw).ok_or_else(|| {
                src.invalid(
                    path,
                    "write the amount of US dollars as a quoted decimal, e.g. \"5.00\"".to_owned(),
                )
            })?,
        };
        let nusd = parse_usd(text).map_err(|m| src.invalid(path, m))?;
        if nusd == 0 {
            return Err(src.invalid(
                path,
                "must be more than 0 (the smallest budget is \"0.000000001\", one nano-dollar)"
                    .to_owned(),
            ));
        }
        return Ok(nusd);
    }
    let unit = match metric {
        Metric::Requests => "requests",
        Metric::Concurrent => "requests in flight",
        _ => "tokens",
    };
    let n = match &raw.value {
        AmountRaw::Whole(n) => *n,
        AmountRaw::Text(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().map_err(|_| {
                src.invalid(path, format!("{} is more than a limit can hold", show(s)))
            })?
        }
        AmountRaw::Text(s) => {
            return Err(src.invalid(
                path,
                format!(
                    "{} is not a whole number of {unit} (only cost_usd limits are amounts of \
                     US dollars; this quota's metric is {metric_name})",
                    show(s)
                ),
            ));
        }
        AmountRaw::Null => return Err(src.invalid(path, "missing value".to_owned())),
        AmountRaw::Other => {
            let written = raw_text(src, raw);
            if written.is_some_and(|t| t.bytes().all(|b| b.is_ascii_digit())) {
                return Err(src.invalid(
                    path,
                    format!("is more than the largest limit, {}", u64::MAX),
                ));
            }
            let written = written.map(|t| format!("{} ", show(t)));
            return Err(src.invalid(
                path,
                format!(
                    "{}is not a whole number of {unit}, 1 or more",
                    written.unwrap_or_default()
                ),
            ));
        }
    };
    if n == 0 {
        return Err(src.invalid(
            path,
            "must be at least 1 (a quota that admits nothing is not a quota)".to_owned(),
        ));
    }
    Ok(n)
}

/// A quota's window: a limit's window syntax, but periods only (fixed, calendar, rolling).
fn quota_window(
    src: &Source<'_>,
    raw: &WindowRaw,
    path: &FieldPath,
    limit: u64,
) -> Result<WindowSpec, ConfigError> {
    if let WindowRaw::Map(map) = raw {
        let refused = [
            ("token_bucket", map.token_bucket.is_some(), "a token bucket"),
            (
                "from_first_hit",
                map.from_first_hit.is_some(),
                "a window opened by the first hit",
            ),
        ];
        for (field, given, what) in refused {
            if given {
                return Err(src.invalid(
                    &path.key(field),
                    format!(
                        "quotas count over fixed, calendar or rolling windows, not {what} (for \
                         that, use a limit under `domains`)"
                    ),
                ));
            }
        }
        if map.fixed.is_none() && map.rolling.is_none() {
            return Err(src.invalid(path, "expected one of fixed, rolling".to_owned()));
        }
    }
    let spec = window(src, path, raw, Capacity::Max(limit))?;
    match spec {
        WindowSpec::Fixed { .. } | WindowSpec::Calendar { .. } | WindowSpec::Rolling { .. } => {
            Ok(spec)
        }
        WindowSpec::TokenBucket { .. } | WindowSpec::FromFirstHit { .. } => Err(src.invalid(
            path,
            "quotas count over fixed, calendar or rolling windows".to_owned(),
        )),
    }
}

/// Parses an amount of US dollars written as a decimal (`5`, `5.00`, `0.000001`) into
/// nano-dollars, exactly: digit by digit, no float. At most 9 digits after the point.
pub fn parse_usd(s: &str) -> Result<u64, String> {
    let (whole, fraction) = match s.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (s, None),
    };
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || fraction.is_some_and(|f| !digits(f)) {
        return Err(format!(
            "{} is not an amount of US dollars: expected a decimal number such as \"5.00\" or \
             \"0.000001\"",
            show(s)
        ));
    }
    let fraction = fraction.unwrap_or("");
    if fraction.len() > 9 {
        return Err(format!(
            "{} has {} digits after the point; at most 9 (one nano-dollar is 0.000000001 USD)",
            show(s),
            fraction.len()
        ));
    }
    let too_much = || {
        format!(
            "{} US dollars is more than the {} a budget can hold",
            show(s),
            u64::MAX / NUSD_PER_USD
        )
    };
    let whole: u64 = whole.parse().map_err(|_| too_much())?;
    // Up to 9 digits, padded to nano-dollars: "5" is 500_000_000.
    let fraction: u64 = format!("{fraction:0<9}").parse().map_err(|_| too_much())?;
    whole
        .checked_mul(NUSD_PER_USD)
        .and_then(|n| n.checked_add(fraction))
        .ok_or_else(too_much)
}

#[cfg(test)]
mod tests {
    use super::super::tests::err;
    use super::super::{Format, parse_config};
    use super::*;
    use crate::engine::limits::CalendarUnit;

    fn parse(text: &str) -> Metering {
        parse_config(text, None, "limits.yaml")
            .unwrap_or_else(|e| panic!("{e}"))
            .metering
    }

    /// A file with one quota: `name: q` then the given lines (each indented 6 spaces). The
    /// quota's lines start at line 4.
    fn one(lines: &str) -> String {
        let mut text = "domains: []\nmetering:\n  quotas:\n    - name: q\n".to_owned();
        for l in lines.lines() {
            text.push_str("      ");
            text.push_str(l);
            text.push('\n');
        }
        text
    }

    #[test]
    fn usd_amounts_are_exact() {
        assert_eq!(parse_usd("5"), Ok(5_000_000_000));
        assert_eq!(parse_usd("5.00"), Ok(5_000_000_000));
        assert_eq!(parse_usd("0.000001"), Ok(1_000));
        assert_eq!(parse_usd("0.000000001"), Ok(1));
        assert_eq!(parse_usd("123.456789012"), Ok(123_456_789_012));
        assert_eq!(parse_usd("0.1"), Ok(100_000_000));
        assert_eq!(parse_usd("007.50"), Ok(7_500_000_000));
        assert_eq!(parse_usd("18446744073"), Ok(18_446_744_073_000_000_000));
        assert_eq!(
            parse_usd("18446744073.709551615"),
            Ok(u64::MAX),
            "the largest amount"
        );
        for bad in [
            "18446744073.709551616",
            "18446744074",
            "99999999999999999999999",
        ] {
            assert!(parse_usd(bad).unwrap_err().contains("more than"), "{bad}");
        }
        assert!(
            parse_usd("1.0000000001")
                .unwrap_err()
                .contains("10 digits after the point; at most 9")
        );
        for bad in [
            "", ".5", "5.", "-1", "+1", "1e3", "1,5", "$5", " 5", "5 ", "1.2.3", "0x10",
        ] {
            assert!(
                parse_usd(bad)
                    .unwrap_err()
                    .contains("not an amount of US dollars"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_full_section_round_trips() {
        let text = r#"
domains: []
metering:
  prices:
    - model: gpt-4o-mini
      input_nusd: 150
      cached_input_nusd: 75
      output_nusd: 600
    - { model: gpt-4o, input_nusd: 2500, output_nusd: 10000 }
  quotas:
    - name: free-daily-tokens
      match: { subscription: free }
      per: [subject]
      metric: total_tokens
      limit: 1000
      window: { fixed: day, time_zone: Europe/Berlin }
      thresholds: [80, 95]
    - name: premium-monthly-cost
      match: { subscription: premium, tag: { team: search } }
      per: [subject, model, "tag:team"]
      metric: cost_usd
      limit: "5.00"
      window: { fixed: month, month_day: 1, time_zone: America/New_York }
      enforcement: soft
    - name: tiny-budget
      match: { subject: key-1, model: "" }
      metric: cost_usd
      limit: 0.000001
      window: { rolling: 1h, resolution: 1m }
      enforcement: shadow
    - name: in-flight
      per: subject
      metric: concurrent
      limit: 4
    - { name: req, metric: requests, limit: 10, window: 1m }
    - { name: in, metric: input_tokens, limit: 1, window: { fixed: 1d } }
    - { name: out, metric: output_tokens, limit: "7", window: { fixed: week, week_start: sun } }
"#;
        let m = parse(text);
        assert_eq!(
            m.prices,
            Some(PriceCatalog {
                models: vec![
                    ModelPrice {
                        model: "gpt-4o-mini".into(),
                        input_nusd: 150,
                        cached_input_nusd: 75,
                        output_nusd: 600,
                    },
                    ModelPrice {
                        model: "gpt-4o".into(),
                        input_nusd: 2500,
                        cached_input_nusd: 2500,
                        output_nusd: 10_000,
                    },
                ]
            })
        );
        let calendar = |unit, tz: &str| {
            Some(WindowSpec::Calendar {
                unit,
                time_zone: tz.into(),
            })
        };
        let expected = vec![
            QuotaSpec {
                name: "free-daily-tokens".into(),
                filter: QuotaFilter {
                    subscription: Some("free".into()),
                    ..QuotaFilter::default()
                },
                per: vec![Dimension::Subject],
                metric: Metric::TotalTokens,
                limit: 1000,
                window: calendar(CalendarUnit::Day, "Europe/Berlin"),
                enforcement: Enforcement::Hard,
                thresholds_pct: vec![80, 95],
            },
            QuotaSpec {
                name: "premium-monthly-cost".into(),
                filter: QuotaFilter {
                    subscription: Some("premium".into()),
                    tag: Some(("team".into(), "search".into())),
                    ..QuotaFilter::default()
                },
                per: vec![
                    Dimension::Subject,
                    Dimension::Model,
                    Dimension::Tag("team".into()),
                ],
                metric: Metric::CostNusd,
                limit: 5_000_000_000,
                window: calendar(CalendarUnit::Month { day: 1 }, "America/New_York"),
                enforcement: Enforcement::Soft,
                thresholds_pct: vec![],
            },
            QuotaSpec {
                name: "tiny-budget".into(),
                filter: QuotaFilter {
                    subject: Some("key-1".into()),
                    model: Some(String::new()),
                    ..QuotaFilter::default()
                },
                per: vec![],
                metric: Metric::CostNusd,
                limit: 1_000,
                window: Some(WindowSpec::Rolling {
                    window_ms: 3_600_000,
                    resolution_ms: 60_000,
                }),
                enforcement: Enforcement::Shadow,
                thresholds_pct: vec![],
            },
            QuotaSpec {
                name: "in-flight".into(),
                filter: QuotaFilter::default(),
                per: vec![Dimension::Subject],
                metric: Metric::Concurrent,
                limit: 4,
                window: None,
                enforcement: Enforcement::Hard,
                thresholds_pct: vec![],
            },
            QuotaSpec {
                name: "req".into(),
                filter: QuotaFilter::default(),
                per: vec![],
                metric: Metric::Requests,
                limit: 10,
                window: Some(WindowSpec::Fixed {
                    duration_ms: 60_000,
                }),
                enforcement: Enforcement::Hard,
                thresholds_pct: vec![],
            },
            QuotaSpec {
                name: "in".into(),
                filter: QuotaFilter::default(),
                per: vec![],
                metric: Metric::InputTokens,
                limit: 1,
                window: Some(WindowSpec::Fixed {
                    duration_ms: 86_400_000,
                }),
                enforcement: Enforcement::Hard,
                thresholds_pct: vec![],
            },
            QuotaSpec {
                name: "out".into(),
                filter: QuotaFilter::default(),
                per: vec![],
                metric: Metric::OutputTokens,
                limit: 7,
                window: calendar(CalendarUnit::Week { start: 7 }, "UTC"),
                enforcement: Enforcement::Hard,
                thresholds_pct: vec![],
            },
        ];
        assert_eq!(m.quotas.quotas, expected);
    }

    #[test]
    fn absent_sections_and_empty_lists() {
        // No metering at all: no prices (the ones in force stay), no quotas.
        assert_eq!(
            parse("domains: []\n"),
            Metering {
                prices: None,
                quotas: QuotaSet::default(),
                subscriptions: Vec::new(),
            }
        );
        assert_eq!(parse("domains: []\nmetering:\n"), Metering::default());
        assert_eq!(
            parse("domains: []\nmetering: { quotas: [] }\n"),
            Metering::default()
        );
        // `prices: []` is a catalog: an empty one.
        assert_eq!(
            parse("domains: []\nmetering: { prices: [] }\n").prices,
            Some(PriceCatalog::default())
        );
        // A metering-only file is a native file, detected as such.
        let c = parse_config(
            "metering:\n  quotas:\n    - { name: q, metric: requests, limit: 1, window: 1m }\n",
            None,
            "m.yaml",
        )
        .unwrap();
        assert!(c.limits.limits.is_empty());
        assert_eq!(c.metering.quotas.quotas.len(), 1);
        let c = parse_config("{ metering: { prices: [] } }", None, "m.yaml").unwrap();
        assert_eq!(c.metering.prices, Some(PriceCatalog::default()));
        // The other formats have no metering section.
        let e = err(
            "domain: d\ndescriptors: []\nmetering: {}\n",
            Some(Format::Envoy),
        );
        assert!(e.contains("unknown field `metering`"), "{e}");
    }

    /// Each bad quota field and the start of its message, with line and field path.
    #[test]
    fn quota_errors_name_line_and_field() {
        let cases: &[(&str, &str)] = &[
            (
                "metric: tokens\nlimit: 1\nwindow: 1d",
                "line 5: metering.quotas[0].metric: unknown metric \"tokens\" (expected requests, total_tokens, input_tokens, output_tokens, cost_usd or concurrent)",
            ),
            (
                "metric: cost_usd\nlimit: \"1.0000000001\"\nwindow: 1d",
                "line 6: metering.quotas[0].limit: \"1.0000000001\" has 10 digits after the point; at most 9",
            ),
            (
                "metric: cost_usd\nlimit: 1.0000000001\nwindow: 1d",
                "line 6: metering.quotas[0].limit: \"1.0000000001\" has 10 digits after the point; at most 9",
            ),
            (
                "metric: cost_usd\nlimit: \"$5\"\nwindow: 1d",
                "line 6: metering.quotas[0].limit: \"$5\" is not an amount of US dollars",
            ),
            (
                "metric: cost_usd\nlimit: -5\nwindow: 1d",
                "line 6: metering.quotas[0].limit: \"-5\" is not an amount of US dollars",
            ),
            (
                "metric: cost_usd\nlimit: 1e3\nwindow: 1d",
                "line 6: metering.quotas[0].limit: \"1e3\" is not an amount of US dollars",
            ),
            (
                "metric: cost_usd\nlimit: \"0.00\"\nwindow: 1d",
                "line 6: metering.quotas[0].limit: must be more than 0",
            ),
            (
                "metric: cost_usd\nlimit:\nwindow: 1d",
                "line 6: metering.quotas[0].limit: missing value",
            ),
            (
                "metric: total_tokens\nlimit: 0\nwindow: 1d",
                "line 6: metering.quotas[0].limit: must be at least 1",
            ),
            (
                "metric: total_tokens\nlimit: 1.5\nwindow: 1d",
                "line 6: metering.quotas[0].limit: \"1.5\" is not a whole number of tokens, 1 or more",
            ),
            (
                "metric: requests\nlimit: -1\nwindow: 1d",
                "line 6: metering.quotas[0].limit: \"-1\" is not a whole number of requests",
            ),
            (
                "metric: requests\nlimit: 99999999999999999999999\nwindow: 1d",
                "line 6: metering.quotas[0].limit: is more than the largest limit, 18446744073709551615",
            ),
            (
                "metric: concurrent\nlimit: true",
                "line 6: metering.quotas[0].limit: \"true\" is not a whole number of requests in flight",
            ),
            (
                "metric: total_tokens\nlimit: \"5.00\"\nwindow: 1d",
                "line 6: metering.quotas[0].limit: \"5.00\" is not a whole number of tokens (only cost_usd limits are amounts of US dollars; this quota's metric is total_tokens)",
            ),
            (
                "metric: total_tokens\nlimit: 10\nwindow: 1d\nthresholds: [95, 80]",
                "line 8: metering.quotas[0].thresholds[1]: 80 does not come after 95: thresholds are listed in increasing order",
            ),
            (
                "metric: total_tokens\nlimit: 10\nwindow: 1d\nthresholds:\n  - 80\n  - 80",
                "line 10: metering.quotas[0].thresholds[1]: 80 does not come after 80",
            ),
            (
                "metric: total_tokens\nlimit: 10\nwindow: 1d\nthresholds: [0]",
                "line 8: metering.quotas[0].thresholds[0]: 0 is not a percentage of the limit from 1 to 100",
            ),
            (
                "metric: total_tokens\nlimit: 10\nwindow: 1d\nthresholds: [50, 101]",
                "line 8: metering.quotas[0].thresholds[1]: 101 is not a percentage",
            ),
            (
                "metric: total_tokens\nlimit: 10\nwindow: 1d\nthresholds: [300]",
                "line 8: metering.quotas[0].thresholds[0]: 300 is not a percentage",
            ),
            (
                "metric: total_tokens\nlimit: 10\nwindow: 1d\nthresholds: [1, 2, 3, 4, 5, 6, 7, 8, 9]",
                "line 8: metering.quotas[0].thresholds: 9 thresholds is more than the 8 allowed",
            ),
            (
                "metric: total_tokens\nlimit: 10\nwindow: 1d\nenforcement: shadow\nthresholds: [50]",
                "line 9: metering.quotas[0].thresholds: a shadow quota fires no events",
            ),
            (
                "metric: concurrent\nlimit: 4\nwindow: 1m",
                "line 7: metering.quotas[0].window: a `concurrent` quota counts the requests in flight now and has no window",
            ),
            (
                "metric: total_tokens\nlimit: 4",
                "line 4: metering.quotas[0]: missing `window` (every metric but `concurrent` is counted over a window)",
            ),
            (
                "metric: total_tokens\nlimit: 4\nwindow: { token_bucket: { refill: 1, every: 1s } }",
                "line 7: metering.quotas[0].window.token_bucket: quotas count over fixed, calendar or rolling windows, not a token bucket",
            ),
            (
                "metric: total_tokens\nlimit: 4\nwindow:\n  from_first_hit: 1m",
                "line 8: metering.quotas[0].window.from_first_hit: quotas count over fixed, calendar or rolling windows, not a window opened by the first hit",
            ),
            (
                "metric: total_tokens\nlimit: 4\nwindow: { time_zone: UTC }",
                "line 7: metering.quotas[0].window: expected one of fixed, rolling",
            ),
            (
                "metric: total_tokens\nlimit: 4\nwindow:\n  fixed: month\n  month_day: 29",
                "line 9: metering.quotas[0].window.month_day: 29 is out of range (expected 1 to 28",
            ),
            (
                "metric: total_tokens\nlimit: 4\nwindow: { fixed: day, time_zone: Mars/Olympus }",
                "line 7: metering.quotas[0].window.time_zone: unknown time zone \"Mars/Olympus\"",
            ),
            (
                "metric: total_tokens\nlimit: 4\nwindow: 5mins",
                "line 7: metering.quotas[0].window: unknown unit \"mins\"",
            ),
            (
                "metric: total_tokens\nlimit: 4\nwindow: { rolling: 2h, resolution: 1s }",
                "line 7: metering.quotas[0].window: 7200000 ms at 1000 ms resolution is 7200 buckets",
            ),
            (
                "metric: requests\nlimit: 4\nwindow: 1m\nper: [subject, user]",
                "line 8: metering.quotas[0].per[1]: unknown dimension \"user\" (expected subject, subscription, model or tag:KEY)",
            ),
            (
                "metric: requests\nlimit: 4\nwindow: 1m\nper: [model, model]",
                "line 8: metering.quotas[0].per[1]: \"model\" is listed twice",
            ),
            (
                "metric: requests\nlimit: 4\nwindow: 1m\nper: [\"tag:\"]",
                "line 8: metering.quotas[0].per[0]: `tag:` needs the tag's key",
            ),
            (
                "metric: requests\nlimit: 4\nwindow: 1m\nper: [subject, subscription, model, tag:a, tag:b, tag:c, tag:d, tag:e, tag:f]",
                "line 8: metering.quotas[0].per: 9 dimensions is more than the 8 allowed",
            ),
            (
                "metric: requests\nlimit: 4\nwindow: 1m\nmatch: { subject: \"\" }",
                "line 8: metering.quotas[0].match.subject: must not be empty",
            ),
            (
                "metric: requests\nlimit: 4\nwindow: 1m\nmatch:\n  tag: {}",
                "line 9: metering.quotas[0].match.tag: empty",
            ),
            (
                "metric: requests\nlimit: 4\nwindow: 1m\nmatch:\n  tag: { a: b, c: d }",
                "line 9: metering.quotas[0].match.tag.c: a quota matches on one tag",
            ),
            (
                "metric: requests\nlimit: 4\nwindow: 1m\nmatch: { team: x }",
                "line 8: metering.quotas[0].match.team: unknown field `team`",
            ),
            (
                "metric: requests\nlimit: 4\nwindow: 1m\nenforcement: strict",
                "line 8: metering.quotas[0].enforcement: unknown variant `strict`",
            ),
            (
                "metric: requests\nlimit: 4\nwindow: 1m\nenforce: soft",
                "line 8: metering.quotas[0].enforce: unknown field `enforce`",
            ),
            (
                "limit: 4\nwindow: 1m",
                "line 4: metering.quotas[0]: missing field `metric`",
            ),
            (
                "metric: requests\nwindow: 1m",
                "line 4: metering.quotas[0]: missing field `limit`",
            ),
        ];
        for (lines, expected) in cases {
            let e = err(&one(lines), None);
            let expected = format!("limits.yaml: {expected}");
            assert!(
                e.starts_with(&expected),
                "\n  got: {e}\n want: {expected}..."
            );
        }
    }

    #[test]
    fn names_and_strings_are_checked() {
        let e = err(
            "metering:\n  quotas:\n    - { name: a, metric: requests, limit: 1, window: 1m }\n    - { name: b, metric: requests, limit: 1, window: 1m }\n    - { name: a, metric: concurrent, limit: 1 }\n",
            None,
        );
        assert_eq!(
            e,
            "limits.yaml: line 5: metering.quotas[2].name: name \"a\" is already used by metering.quotas[0] (line 3)"
        );
        let e = err(
            "metering:\n  quotas:\n    - { name: '', metric: requests, limit: 1, window: 1m }\n",
            None,
        );
        assert_eq!(
            e,
            "limits.yaml: line 3: metering.quotas[0].name: must not be empty"
        );
        let long = "n".repeat(257);
        let e = err(
            &format!(
                "metering:\n  quotas:\n    - {{ name: {long}, metric: requests, limit: 1, window: 1m }}\n"
            ),
            None,
        );
        assert!(
            e.starts_with(
                "limits.yaml: line 3: metering.quotas[0].name: 257 bytes is longer than the 256 bytes allowed"
            ),
            "{e}"
        );
        let e = err(
            &one(&format!(
                "metric: requests\nlimit: 1\nwindow: 1m\nmatch: {{ model: {long} }}"
            )),
            None,
        );
        assert!(
            e.starts_with("limits.yaml: line 8: metering.quotas[0].match.model: 257 bytes"),
            "{e}"
        );
        let e = err(
            &one(&format!(
                "metric: requests\nlimit: 1\nwindow: 1m\nper: [\"tag:{long}\"]"
            )),
            None,
        );
        assert!(
            e.starts_with("limits.yaml: line 8: metering.quotas[0].per[0]: 257 bytes"),
            "{e}"
        );
        let e = err("metering:\n  quotas: {}\n", None);
        assert!(
            e.starts_with("limits.yaml: line 2: metering.quotas: "),
            "{e}"
        );
        let e = err("metering:\n  quota: []\n", None);
        assert!(
            e.starts_with("limits.yaml: line 2: metering.quota: unknown field `quota`"),
            "{e}"
        );
    }

    #[test]
    fn price_errors_name_line_and_field() {
        let file = |prices: &str| format!("domains: []\nmetering:\n  prices:\n{prices}");
        let cases: &[(&str, &str)] = &[
            (
                "    - { model: a, input_nusd: 1, output_nusd: 2 }\n    - { model: b, input_nusd: 1, output_nusd: 2 }\n    - { model: a, input_nusd: 3, output_nusd: 4 }\n",
                "line 6: metering.prices[2].model: model \"a\" is already priced at metering.prices[0] (line 4)",
            ),
            (
                "    - model: a\n      input_nusd: 0.15\n      output_nusd: 2\n",
                "line 5: metering.prices[0].input_nusd: expected a whole number, 0 or more",
            ),
            (
                "    - model: a\n      input_nusd: -1\n      output_nusd: 2\n",
                "line 5: metering.prices[0].input_nusd: expected a whole number, 0 or more",
            ),
            (
                "    - model: a\n      input_nusd: 1\n      output_nusd: 1000000000001\n",
                "line 6: metering.prices[0].output_nusd: 1000000000001 nano-dollars per token is more than the 1000000000000 (1,000 USD) allowed",
            ),
            (
                "    - model: a\n      input_nusd: 1\n      cached_input_nusd: 1000000000001\n      output_nusd: 1\n",
                "line 6: metering.prices[0].cached_input_nusd: 1000000000001 nano-dollars",
            ),
            (
                "    - { model: '', input_nusd: 1, output_nusd: 2 }\n",
                "line 4: metering.prices[0].model: must not be empty",
            ),
            (
                "    - { model: a, input_nusd: 1 }\n",
                "line 4: metering.prices[0]: missing field `output_nusd`",
            ),
            (
                "    - { model: a, input_nusd: 1, output_nusd: 2, output_usd: 3 }\n",
                "line 4: metering.prices[0].output_usd: unknown field `output_usd`",
            ),
        ];
        for (prices, expected) in cases {
            let e = err(&file(prices), None);
            let expected = format!("limits.yaml: {expected}");
            assert!(
                e.starts_with(&expected),
                "\n  got: {e}\n want: {expected}..."
            );
        }
    }

    #[test]
    fn a_bad_metering_section_refuses_the_whole_file() {
        let text = "domains:\n  - domain: d\n    limits:\n      - { capacity: 1, window: 1s }\nmetering:\n  quotas:\n    - { name: q, metric: tokens, limit: 1, window: 1d }\n";
        let e = super::super::parse_limits(text, None, "limits.yaml").unwrap_err();
        assert_eq!(e.line(), Some(7));
        assert_eq!(e.field(), Some("metering.quotas[0].metric"));
    }

    #[test]
    fn the_shipped_example_has_the_design_tiers() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/limits.yaml");
        let c = super::super::load_config_file(std::path::Path::new(path), None)
            .unwrap_or_else(|e| panic!("{e}"));
        let prices = c.metering.prices.expect("the example prices some models");
        assert!((2..=3).contains(&prices.models.len()));
        let q = |name: &str| {
            c.metering
                .quotas
                .quotas
                .iter()
                .find(|q| q.name == name)
                .unwrap_or_else(|| panic!("quota {name}"))
        };
        for tier in ["free", "premium", "enterprise"] {
            let daily = q(&format!("{tier}-daily-tokens"));
            assert_eq!(daily.filter.subscription.as_deref(), Some(tier));
            assert_eq!(daily.per, vec![Dimension::Subject]);
            assert_eq!(daily.metric, Metric::TotalTokens);
            assert!(matches!(
                daily.window,
                Some(WindowSpec::Calendar {
                    unit: CalendarUnit::Day,
                    ..
                })
            ));
            assert_eq!(daily.thresholds_pct, vec![80, 95]);
        }
        let cost = q("premium-monthly-cost");
        assert_eq!(cost.metric, Metric::CostNusd);
        assert_eq!(
            cost.window,
            Some(WindowSpec::Calendar {
                unit: CalendarUnit::Month { day: 1 },
                time_zone: "Europe/Berlin".into()
            })
        );
        assert!(
            c.metering
                .quotas
                .quotas
                .iter()
                .any(|q| q.metric == Metric::Concurrent && q.window.is_none())
        );
    }
}
