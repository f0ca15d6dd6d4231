//! Tally's native limits format.
//!
//! A YAML map with `domains`: a list of RLS domains, each with its limits; and optionally
//! `metering`: prices and usage quotas (see [`super::metering`]). A limit applies to each
//! descriptor of a request on its own: it matches when all of its `match` conditions hold on
//! that descriptor's entries, and counts per distinct value of its `by` entries.
//!
//! ```yaml
//! domains:
//!   - domain: ai-gateway             # the RLS domain (required, not empty, listed once)
//!     limits:
//!       - name: free-requests-per-minute   # optional; unique within the domain;
//!                                          # shown in statuses, target of `replaces`
//!         match:                     # optional; conditions on ONE descriptor's entries,
//!                                    # all must hold (none: every descriptor matches)
//!           kind: requests           # a string (or number, bool): entry present, equal to it
//!           tier: { equals: free }   # the same, spelled out
//!           region: { not: eu }      # entry absent, or present with another value
//!           model: { in: [gpt-4o, gpt-4o-mini] }   # present, one of these (at least one)
//!           plan: [pro, team]        # short for { in: [pro, team] }
//!           user: { present: true }  # present, any value
//!           usage: { absent: true }  # absent
//!         by: [api_key]              # optional; one counter per distinct value of these
//!                                    # entries, in order (`by: api_key` for one); the limit
//!                                    # applies only when all are present; omitted: one
//!                                    # counter shared by every matching descriptor
//!         capacity: 5                # hits per window (>= 1); a token bucket's burst
//!         # unlimited: true          # instead of capacity: always admits, keeps no counter
//!         window: 1m                 # required unless unlimited; see below
//!         shadow: false              # optional; counted and reported, never denies
//!         ack: strict                # optional; `fast`: answered by the leader before commit
//!                                    # (plain request windows; see the README's bound)
//!         replaces: []               # optional; names of limits in this domain that this
//!                                    # one replaces when both match one request
//! ```
//!
//! # Windows
//!
//! Durations are an integer and a unit, one of `ms`, `s`, `m`, `h`, `d`, `w`: `500ms`, `90s`,
//! `1m`, `1h`, `1d`, `1w`. Every window is longer than 0 and at most ten years.
//!
//! | `window:`                                        | meaning                                   |
//! |--------------------------------------------------|-------------------------------------------|
//! | `90s` (a duration)                                | fixed windows of that length, aligned to the Unix epoch (UTC): `1d` is the UTC day, `1w` starts on Thursdays (the epoch's weekday) |
//! | `{ fixed: 90s }`                                  | the same                                  |
//! | `{ fixed: day }`                                  | calendar day, from local midnight          |
//! | `{ fixed: week, week_start: monday }`             | calendar week (`monday`..`sunday` or `mon`..`sun`; default `monday`) |
//! | `{ fixed: month, month_day: 1 }`                  | calendar month from day `month_day` (1..=28; default 1) |
//! | `{ fixed: year, year_start: "01-01" }`            | calendar year from `MM-DD` (day 1..=28; default `01-01`) |
//! | `{ rolling: 60s, resolution: 1s }`                | rolling window, exact to `resolution` (default `1s`), which must divide it; at most 3600 buckets |
//! | `{ from_first_hit: 60s }`                         | a fixed window that opens at the first hit after the previous one closed |
//! | `{ token_bucket: { refill: 10, every: 1s } }`     | token bucket holding up to `capacity` tokens, refilled by `refill` (1..=capacity) every `every`; `capacity * every` (in ms) at most 2^62 |
//!
//! Calendar windows (`fixed: day | week | month | year`) take `time_zone:` (an IANA name,
//! default `UTC`), checked against the bundled tz database; they follow DST (a local day may
//! be 23 or 25 hours). The calendar options are refused on other windows, and `resolution`
//! on anything but `rolling`.
//!
//! Unknown fields are refused everywhere, so a typo is an error, not a silently ignored
//! setting.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor, value::MapAccessDeserializer};
use serde_saphyr::Spanned;

use super::{
    Built, ConfigError, FieldPath, Source, check_name, check_string, check_terms, check_time_zone,
    show,
};
use crate::engine::limits::{
    CalendarUnit, Capacity, DescriptorKey, EntryCondition, LimitSpec, MAX_BUCKET_UNITS, MAX_LIMITS,
    MAX_ROLLING_BUCKETS, MAX_WINDOW_MS, Scope, WindowSpec,
};

/// The window of an unlimited limit that gives none: it keeps no counter, so any will do.
const UNLIMITED_WINDOW: WindowSpec = WindowSpec::Fixed { duration_ms: 1_000 };

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NativeFile {
    #[serde(default)]
    domains: Vec<DomainRaw>,
    /// Prices and quotas (see [`super::metering`]).
    #[serde(default)]
    metering: Option<super::metering::MeteringRaw>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DomainRaw {
    domain: String,
    #[serde(default)]
    limits: Vec<LimitRaw>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitRaw {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, rename = "match")]
    match_: OrderedMap<Spanned<MatchRaw>>,
    #[serde(default)]
    by: OneOrMany,
    #[serde(default)]
    capacity: Option<u64>,
    #[serde(default)]
    unlimited: bool,
    #[serde(default)]
    window: Option<WindowRaw>,
    #[serde(default)]
    shadow: bool,
    #[serde(default)]
    ack: AckRaw,
    #[serde(default)]
    replaces: Vec<String>,
}

/// `ack: strict | fast`.
#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum AckRaw {
    #[default]
    Strict,
    Fast,
}

impl From<AckRaw> for crate::engine::limits::Ack {
    fn from(a: AckRaw) -> Self {
        match a {
            AckRaw::Strict => crate::engine::limits::Ack::Strict,
            AckRaw::Fast => crate::engine::limits::Ack::Fast,
        }
    }
}

/// A YAML map kept in file order (conditions are evaluated in the order written).
pub(super) struct OrderedMap<V>(pub(super) Vec<(String, V)>);

impl<V> Default for OrderedMap<V> {
    fn default() -> Self {
        OrderedMap(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Vis<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Vis<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map from entry key to condition")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(OrderedMap(Vec::new()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry()? {
                    entries.push((k, v));
                }
                Ok(OrderedMap(entries))
            }
        }
        deserializer.deserialize_map(Vis(std::marker::PhantomData))
    }
}

/// `by: api_key` or `by: [tier, api_key]`.
#[derive(Default)]
pub(super) struct OneOrMany(pub(super) Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Vis;
        impl<'de> Visitor<'de> for Vis {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a name or a list of names")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_owned()]))
            }
            fn visit_unit<E>(self) -> Result<OneOrMany, E> {
                Ok(OneOrMany(Vec::new()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut keys = Vec::new();
                while let Some(k) = seq.next_element::<String>()? {
                    keys.push(k);
                }
                Ok(OneOrMany(keys))
            }
        }
        deserializer.deserialize_any(Vis)
    }
}

/// One `match` entry's condition, as written.
enum MatchRaw {
    /// A string: equals.
    Str(String),
    /// A number or boolean: equals its text as written (taken from the source).
    NonString,
    /// Nothing (`tier:`).
    Null,
    /// A list: one of.
    List(Vec<String>),
    /// An operator map.
    Ops(MatchOps),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MatchOps {
    #[serde(default)]
    equals: Option<String>,
    #[serde(default)]
    not: Option<String>,
    #[serde(default, rename = "in")]
    in_: Option<Vec<String>>,
    #[serde(default)]
    present: Option<bool>,
    #[serde(default)]
    absent: Option<bool>,
}

impl<'de> Deserialize<'de> for MatchRaw {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Vis;
        impl<'de> Visitor<'de> for Vis {
            type Value = MatchRaw;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a value, a list of values, or one of { equals, not, in, present, absent }",
                )
            }
            fn visit_str<E>(self, v: &str) -> Result<MatchRaw, E> {
                Ok(MatchRaw::Str(v.to_owned()))
            }
            fn visit_bool<E>(self, _: bool) -> Result<MatchRaw, E> {
                Ok(MatchRaw::NonString)
            }
            fn visit_i64<E>(self, _: i64) -> Result<MatchRaw, E> {
                Ok(MatchRaw::NonString)
            }
            fn visit_u64<E>(self, _: u64) -> Result<MatchRaw, E> {
                Ok(MatchRaw::NonString)
            }
            fn visit_i128<E>(self, _: i128) -> Result<MatchRaw, E> {
                Ok(MatchRaw::NonString)
            }
            fn visit_u128<E>(self, _: u128) -> Result<MatchRaw, E> {
                Ok(MatchRaw::NonString)
            }
            fn visit_f64<E>(self, _: f64) -> Result<MatchRaw, E> {
                Ok(MatchRaw::NonString)
            }
            fn visit_unit<E>(self) -> Result<MatchRaw, E> {
                Ok(MatchRaw::Null)
            }
            fn visit_none<E>(self) -> Result<MatchRaw, E> {
                Ok(MatchRaw::Null)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MatchRaw, A::Error> {
                let mut values = Vec::new();
                while let Some(v) = seq.next_element::<String>()? {
                    values.push(v);
                }
                Ok(MatchRaw::List(values))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<MatchRaw, A::Error> {
                MatchOps::deserialize(MapAccessDeserializer::new(map)).map(MatchRaw::Ops)
            }
        }
        deserializer.deserialize_any(Vis)
    }
}

/// A `window:` as written.
pub(super) enum WindowRaw {
    /// `window: 90s`.
    Text(String),
    /// `window: 60` (no unit).
    Number(String),
    /// `window: { ... }`.
    Map(WindowMap),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WindowMap {
    #[serde(default)]
    pub(super) fixed: Option<String>,
    #[serde(default)]
    pub(super) rolling: Option<String>,
    #[serde(default)]
    resolution: Option<String>,
    #[serde(default)]
    pub(super) from_first_hit: Option<String>,
    #[serde(default)]
    pub(super) token_bucket: Option<TokenBucketRaw>,
    #[serde(default)]
    time_zone: Option<String>,
    #[serde(default)]
    week_start: Option<String>,
    #[serde(default)]
    month_day: Option<u64>,
    #[serde(default)]
    year_start: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TokenBucketRaw {
    refill: u64,
    every: String,
}

impl<'de> Deserialize<'de> for WindowRaw {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Vis;
        impl<'de> Visitor<'de> for Vis {
            type Value = WindowRaw;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 60s, or a map such as { rolling: 60s }")
            }
            fn visit_str<E>(self, v: &str) -> Result<WindowRaw, E> {
                Ok(WindowRaw::Text(v.to_owned()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<WindowRaw, E> {
                Ok(WindowRaw::Number(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<WindowRaw, E> {
                Ok(WindowRaw::Number(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<WindowRaw, E> {
                Ok(WindowRaw::Number(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<WindowRaw, A::Error> {
                WindowMap::deserialize(MapAccessDeserializer::new(map)).map(WindowRaw::Map)
            }
        }
        deserializer.deserialize_any(Vis)
    }
}

/// Parses a native file into limits and its metering section.
pub(crate) fn parse(src: &Source<'_>) -> Result<(Vec<Built>, super::Metering), ConfigError> {
    let file: NativeFile = src.parse()?;
    let mut out = Vec::new();
    let mut domains: HashMap<&str, FieldPath> = HashMap::new();
    let root = FieldPath::root().key("domains");
    for (d, dom) in file.domains.iter().enumerate() {
        let dpath = root.index(d);
        check_name(
            src,
            &dpath.key("domain"),
            &dom.domain,
            crate::engine::command::MAX_DOMAIN_BYTES,
        )?;
        if let Some(first) = domains.get(dom.domain.as_str()) {
            return Err(src.invalid(
                &dpath.key("domain"),
                format!(
                    "domain {} is already listed at {}; put all its limits under one entry",
                    show(&dom.domain),
                    src.describe(first)
                ),
            ));
        }
        domains.insert(&dom.domain, dpath.clone());
        for (l, raw) in dom.limits.iter().enumerate() {
            let lpath = dpath.key("limits").index(l);
            if out.len() >= MAX_LIMITS {
                return Err(
                    src.invalid(&lpath, format!("more than {MAX_LIMITS} limits in one set"))
                );
            }
            out.push(limit(src, &dom.domain, raw, &lpath)?);
        }
    }
    let metering = match &file.metering {
        Some(raw) => super::metering::parse(src, raw, &FieldPath::root().key("metering"))?,
        None => super::Metering::default(),
    };
    Ok((out, metering))
}

fn limit(
    src: &Source<'_>,
    domain: &str,
    raw: &LimitRaw,
    path: &FieldPath,
) -> Result<Built, ConfigError> {
    let name = raw.name.clone().unwrap_or_default();
    check_string(src, &path.key("name"), &name, false)?;

    let mpath = path.key("match");
    check_terms(src, &mpath, raw.match_.0.len())?;
    let mut conditions = Vec::with_capacity(raw.match_.0.len());
    let mut absent = HashSet::new();
    for (key, value) in &raw.match_.0 {
        let kpath = mpath.key(key);
        check_name(src, &kpath, key, crate::engine::command::MAX_KEY_BYTES)?;
        let condition = condition(src, &kpath, key, value)?;
        if matches!(condition, EntryCondition::Absent { .. }) {
            absent.insert(key.as_str());
        }
        conditions.push(condition);
    }

    let bpath = path.key("by");
    check_terms(src, &bpath, raw.by.0.len())?;
    let mut seen = HashSet::new();
    for (i, key) in raw.by.0.iter().enumerate() {
        check_name(
            src,
            &bpath.index(i),
            key,
            crate::engine::command::MAX_KEY_BYTES,
        )?;
        if !seen.insert(key.as_str()) {
            return Err(src.invalid(
                &bpath.index(i),
                format!("entry {} is listed twice", show(key)),
            ));
        }
        if absent.contains(key.as_str()) {
            return Err(src.invalid(
                &bpath.index(i),
                format!(
                    "entry {} must be absent by `match`, so this limit could never apply",
                    show(key)
                ),
            ));
        }
    }

    let capacity = match (raw.capacity, raw.unlimited) {
        (Some(_), true) => {
            return Err(src.invalid(
                &path.key("unlimited"),
                "set either `capacity` or `unlimited: true`, not both".to_owned(),
            ));
        }
        (None, true) => Capacity::Unlimited,
        (Some(0), false) => {
            return Err(src.invalid(
                &path.key("capacity"),
                "must be at least 1 (a limit that admits nothing is not a limit)".to_owned(),
            ));
        }
        (Some(c), false) => Capacity::Max(c),
        (None, false) => {
            return Err(src.invalid(path, "missing `capacity` (or `unlimited: true`)".to_owned()));
        }
    };

    let window = match &raw.window {
        Some(w) => window(src, &path.key("window"), w, capacity)?,
        None if capacity == Capacity::Unlimited => UNLIMITED_WINDOW,
        None => return Err(src.invalid(path, "missing `window`".to_owned())),
    };

    Ok(Built {
        spec: LimitSpec {
            domain: domain.to_owned(),
            name,
            scope: Scope::Descriptor {
                conditions,
                key: DescriptorKey::Entries(raw.by.0.clone()),
            },
            capacity,
            window,
            shadow: raw.shadow,
            ack: raw.ack.into(),
            replaces: raw.replaces.clone(),
        },
        path: path.clone(),
        name_path: path.key("name"),
        replaces_path: path.key("replaces"),
        replaces_field: None,
        replaces_must_exist: true,
    })
}

fn condition(
    src: &Source<'_>,
    path: &FieldPath,
    key: &str,
    raw: &Spanned<MatchRaw>,
) -> Result<EntryCondition, ConfigError> {
    let key = key.to_owned();
    let value = |v: &str, p: &FieldPath| -> Result<String, ConfigError> {
        check_string(src, p, v, false)?;
        Ok(v.to_owned())
    };
    let one_of = |values: &[String], p: &FieldPath| -> Result<Vec<String>, ConfigError> {
        if values.is_empty() {
            return Err(src.invalid(p, "an empty list can never match".to_owned()));
        }
        check_terms(src, p, values.len())?;
        for (i, v) in values.iter().enumerate() {
            check_string(src, &p.index(i), v, false)?;
        }
        Ok(values.to_vec())
    };
    Ok(match &raw.value {
        MatchRaw::Str(s) => EntryCondition::Equals {
            key,
            value: value(s, path)?,
        },
        MatchRaw::NonString => {
            let text = raw_text(src, raw).ok_or_else(|| {
                src.invalid(path, "quote this value so it is read as text".to_owned())
            })?;
            EntryCondition::Equals {
                key,
                value: value(text, path)?,
            }
        }
        MatchRaw::Null => {
            return Err(src.invalid(
                path,
                "missing value (to require the entry with any value, write { present: true })"
                    .to_owned(),
            ));
        }
        MatchRaw::List(values) => EntryCondition::In {
            key,
            values: one_of(values, path)?,
        },
        MatchRaw::Ops(ops) => {
            let set: Vec<&str> = [
                ("equals", ops.equals.is_some()),
                ("not", ops.not.is_some()),
                ("in", ops.in_.is_some()),
                ("present", ops.present.is_some()),
                ("absent", ops.absent.is_some()),
            ]
            .into_iter()
            .filter_map(|(n, set)| set.then_some(n))
            .collect();
            match set.as_slice() {
                [] => {
                    return Err(src.invalid(
                        path,
                        "empty condition (expected one of equals, not, in, present, absent)"
                            .to_owned(),
                    ));
                }
                [_] => {}
                [a, b, ..] => {
                    return Err(src.invalid(
                        &path.key(b),
                        format!("`{a}` and `{b}` cannot be combined: one operator per entry"),
                    ));
                }
            }
            if let Some(v) = &ops.equals {
                EntryCondition::Equals {
                    key,
                    value: value(v, &path.key("equals"))?,
                }
            } else if let Some(v) = &ops.not {
                EntryCondition::NotEquals {
                    key,
                    value: value(v, &path.key("not"))?,
                }
            } else if let Some(values) = &ops.in_ {
                EntryCondition::In {
                    key,
                    values: one_of(values, &path.key("in"))?,
                }
            } else if let Some(present) = ops.present {
                if !present {
                    return Err(src.invalid(
                        &path.key("present"),
                        "`present: false` is not a condition; write `absent: true`".to_owned(),
                    ));
                }
                EntryCondition::Present { key }
            } else {
                if ops.absent != Some(true) {
                    return Err(src.invalid(
                        &path.key("absent"),
                        "`absent: false` is not a condition; write `present: true`".to_owned(),
                    ));
                }
                EntryCondition::Absent { key }
            }
        }
    })
}

/// The source text of a plain scalar (a number or boolean written as a match value), where
/// it is defined (an alias points at its anchor).
pub(super) fn raw_text<'s, T>(src: &Source<'s>, raw: &Spanned<T>) -> Option<&'s str> {
    let span = raw.defined.span();
    let start = usize::try_from(span.byte_offset()?).ok()?;
    let len = usize::try_from(span.byte_len()?).ok()?;
    src.text.get(start..start.checked_add(len)?)
}

pub(super) const DURATION_UNITS: &str = "ms, s, m, h, d, w";

/// Parses `90s`-style durations into milliseconds: in (0, MAX_WINDOW_MS].
pub(crate) fn parse_duration(s: &str) -> Result<u64, String> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = s.split_at(digits);
    if number.is_empty() {
        let hint = if calendar_unit_name(s).is_some() {
            format!(" (for a calendar {s}, write {{ fixed: {s} }})")
        } else {
            String::new()
        };
        return Err(format!(
            "{} is not a duration: expected a whole number and a unit ({DURATION_UNITS}), e.g. 60s{hint}",
            show(s)
        ));
    }
    let per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 604_800_000,
        "" => {
            return Err(format!(
                "{} has no unit (expected {DURATION_UNITS}, e.g. {s}s)",
                show(s)
            ));
        }
        _ => {
            return Err(format!(
                "unknown unit {} (expected {DURATION_UNITS})",
                show(unit)
            ));
        }
    };
    let too_long = || {
        format!(
            "{} is longer than the longest window allowed ({MAX_WINDOW_MS} ms, ten years)",
            show(s)
        )
    };
    let n: u64 = number.parse().map_err(|_| too_long())?;
    let ms = n.checked_mul(per_unit).ok_or_else(too_long)?;
    if ms == 0 {
        return Err("must be longer than 0".to_owned());
    }
    if ms > MAX_WINDOW_MS {
        return Err(too_long());
    }
    Ok(ms)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CalendarName {
    Day,
    Week,
    Month,
    Year,
}

fn calendar_unit_name(s: &str) -> Option<CalendarName> {
    match s.to_ascii_lowercase().as_str() {
        "day" => Some(CalendarName::Day),
        "week" => Some(CalendarName::Week),
        "month" => Some(CalendarName::Month),
        "year" => Some(CalendarName::Year),
        _ => None,
    }
}

fn weekday(s: &str) -> Option<u8> {
    let s = s.to_ascii_lowercase();
    let days = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    days.iter()
        .position(|d| *d == s || (s.len() == 3 && d.starts_with(&s)))
        .map(|i| i as u8 + 1)
}

/// `MM-DD` with month 1..=12 and day 1..=28.
fn month_day(s: &str) -> Option<(u8, u8)> {
    let (m, d) = s.split_once('-')?;
    let ok = |p: &str| (1..=2).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit());
    if !ok(m) || !ok(d) {
        return None;
    }
    let (m, d): (u8, u8) = (m.parse().ok()?, d.parse().ok()?);
    ((1..=12).contains(&m) && (1..=28).contains(&d)).then_some((m, d))
}

pub(super) fn window(
    src: &Source<'_>,
    path: &FieldPath,
    raw: &WindowRaw,
    capacity: Capacity,
) -> Result<WindowSpec, ConfigError> {
    let duration = |s: &str, p: &FieldPath| parse_duration(s).map_err(|m| src.invalid(p, m));
    let map = match raw {
        WindowRaw::Text(s) => {
            return Ok(WindowSpec::Fixed {
                duration_ms: duration(s, path)?,
            });
        }
        WindowRaw::Number(n) => {
            return Err(src.invalid(
                path,
                format!("{n} has no unit (expected {DURATION_UNITS}, e.g. {n}s)"),
            ));
        }
        WindowRaw::Map(map) => map,
    };

    let kinds: Vec<&str> = [
        ("fixed", map.fixed.is_some()),
        ("rolling", map.rolling.is_some()),
        ("from_first_hit", map.from_first_hit.is_some()),
        ("token_bucket", map.token_bucket.is_some()),
    ]
    .into_iter()
    .filter_map(|(n, set)| set.then_some(n))
    .collect();
    match kinds.as_slice() {
        [] => {
            return Err(src.invalid(
                path,
                "expected one of fixed, rolling, from_first_hit, token_bucket".to_owned(),
            ));
        }
        [_] => {}
        [a, b, ..] => {
            return Err(src.invalid(
                &path.key(b),
                format!("`{a}` and `{b}` cannot be combined: one window kind per limit"),
            ));
        }
    }

    let calendar = map.fixed.as_deref().and_then(calendar_unit_name);
    // Options that belong to one kind of window only.
    let misplaced = [
        (
            "resolution",
            map.resolution.is_some(),
            map.rolling.is_some(),
            "rolling windows",
        ),
        (
            "time_zone",
            map.time_zone.is_some(),
            calendar.is_some(),
            "calendar windows (fixed: day, week, month or year)",
        ),
        (
            "week_start",
            map.week_start.is_some(),
            calendar == Some(CalendarName::Week),
            "`fixed: week`",
        ),
        (
            "month_day",
            map.month_day.is_some(),
            calendar == Some(CalendarName::Month),
            "`fixed: month`",
        ),
        (
            "year_start",
            map.year_start.is_some(),
            calendar == Some(CalendarName::Year),
            "`fixed: year`",
        ),
    ];
    for (field, given, allowed, what) in misplaced {
        if given && !allowed {
            return Err(src.invalid(&path.key(field), format!("applies only to {what}")));
        }
    }

    if let Some(fixed) = &map.fixed {
        let Some(unit) = calendar else {
            return Ok(WindowSpec::Fixed {
                duration_ms: duration(fixed, &path.key("fixed"))
                    .map_err(|e| with_hint(e, "or day, week, month, year"))?,
            });
        };
        let time_zone = map.time_zone.clone().unwrap_or_else(|| "UTC".to_owned());
        check_time_zone(src, &path.key("time_zone"), &time_zone)?;
        let unit = match unit {
            CalendarName::Day => CalendarUnit::Day,
            CalendarName::Week => {
                let start = match &map.week_start {
                    None => 1,
                    Some(s) => weekday(s).ok_or_else(|| {
                        src.invalid(
                            &path.key("week_start"),
                            format!("{} is not a weekday (expected monday ... sunday)", show(s)),
                        )
                    })?,
                };
                CalendarUnit::Week { start }
            }
            CalendarName::Month => {
                let day = map.month_day.unwrap_or(1);
                if !(1..=28).contains(&day) {
                    return Err(src.invalid(
                        &path.key("month_day"),
                        format!("{day} is out of range (expected 1 to 28, so every month has it)"),
                    ));
                }
                CalendarUnit::Month { day: day as u8 }
            }
            CalendarName::Year => {
                let (month, day) = match &map.year_start {
                    None => (1, 1),
                    Some(s) => month_day(s).ok_or_else(|| {
                        src.invalid(
                            &path.key("year_start"),
                            format!(
                                "{} is not a valid MM-DD (month 01 to 12, day 01 to 28)",
                                show(s)
                            ),
                        )
                    })?,
                };
                CalendarUnit::Year { month, day }
            }
        };
        return Ok(WindowSpec::Calendar { unit, time_zone });
    }

    if let Some(rolling) = &map.rolling {
        let window_ms = duration(rolling, &path.key("rolling"))?;
        let rpath = path.key("resolution");
        let resolution_ms = match &map.resolution {
            Some(r) => duration(r, &rpath)?,
            None => 1_000,
        };
        if window_ms % resolution_ms != 0 {
            let at = if map.resolution.is_some() {
                rpath
            } else {
                path.key("rolling")
            };
            return Err(src.invalid(
                &at,
                format!(
                    "the resolution ({resolution_ms} ms) must divide the window ({window_ms} ms)"
                ),
            ));
        }
        let buckets = window_ms / resolution_ms;
        if buckets > MAX_ROLLING_BUCKETS {
            return Err(src.invalid(
                path,
                format!(
                    "{window_ms} ms at {resolution_ms} ms resolution is {buckets} buckets, \
                     more than the {MAX_ROLLING_BUCKETS} allowed; use a coarser resolution"
                ),
            ));
        }
        return Ok(WindowSpec::Rolling {
            window_ms,
            resolution_ms,
        });
    }

    if let Some(first) = &map.from_first_hit {
        return Ok(WindowSpec::FromFirstHit {
            duration_ms: duration(first, &path.key("from_first_hit"))?,
        });
    }

    let Some(bucket) = &map.token_bucket else {
        // Not reached: exactly one window kind is set, and the others returned above.
        return Err(src.invalid(path, "no window kind".to_owned()));
    };
    let bpath = path.key("token_bucket");
    let refill_every_ms = duration(&bucket.every, &bpath.key("every"))?;
    if bucket.refill == 0 {
        return Err(src.invalid(&bpath.key("refill"), "must be at least 1".to_owned()));
    }
    if let Capacity::Max(capacity) = capacity {
        if bucket.refill > capacity {
            return Err(src.invalid(
                &bpath.key("refill"),
                format!(
                    "refill {} is more than the capacity {capacity}: the bucket never holds more \
                     than its capacity",
                    bucket.refill
                ),
            ));
        }
        if capacity
            .checked_mul(refill_every_ms)
            .is_none_or(|units| units > MAX_BUCKET_UNITS)
        {
            return Err(src.invalid(
                &bpath.key("every"),
                format!(
                    "capacity {capacity} times {refill_every_ms} ms is more than the \
                     {MAX_BUCKET_UNITS} units a token bucket can count; lower one of them"
                ),
            ));
        }
    }
    Ok(WindowSpec::TokenBucket {
        refill_amount: bucket.refill,
        refill_every_ms,
    })
}

fn with_hint(e: ConfigError, hint: &str) -> ConfigError {
    match e {
        ConfigError::Invalid {
            origin,
            line,
            field,
            message,
        } if message.contains("is not a duration") => ConfigError::Invalid {
            origin,
            line,
            field,
            message: format!("{message}, {hint}"),
        },
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::err;
    use super::super::{Format, parse_limits};
    use super::*;
    use crate::engine::limits::LimitSet;

    fn parse(text: &str) -> LimitSet {
        parse_limits(text, Some(Format::Native), "limits.yaml").unwrap_or_else(|e| panic!("{e}"))
    }

    /// One limit with the given extra YAML lines (indented 8 spaces) after `- name: x`.
    fn one(lines: &str) -> String {
        let mut text = "domains:\n  - domain: d\n    limits:\n      - name: x\n".to_owned();
        for l in lines.lines() {
            text.push_str("        ");
            text.push_str(l);
            text.push('\n');
        }
        text
    }

    fn rolling(window_ms: u64) -> WindowSpec {
        WindowSpec::Rolling {
            window_ms,
            resolution_ms: 1_000,
        }
    }

    fn per_key(kind: &str, tier: &str, name: &str, capacity: u64) -> LimitSpec {
        LimitSpec {
            domain: "ai-gateway".into(),
            name: name.into(),
            scope: Scope::Descriptor {
                conditions: vec![
                    EntryCondition::Equals {
                        key: "kind".into(),
                        value: kind.into(),
                    },
                    EntryCondition::Equals {
                        key: "tier".into(),
                        value: tier.into(),
                    },
                ],
                key: DescriptorKey::Entries(vec!["api_key".into()]),
            },
            capacity: Capacity::Max(capacity),
            window: rolling(60_000),
            shadow: false,
            ack: crate::engine::limits::Ack::Strict,
            replaces: vec![],
        }
    }

    #[test]
    fn example_file_parses_to_the_expected_limits() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/limits.yaml");
        let set = super::super::load_limits_file(std::path::Path::new(path), None)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut daily = per_key("tokens", "free", "free-tokens-per-day", 1_000);
        daily.window = WindowSpec::Calendar {
            unit: CalendarUnit::Day,
            time_zone: "Europe/Berlin".into(),
        };
        let expected = vec![
            per_key("requests", "free", "free-requests-per-minute", 5),
            per_key("tokens", "free", "free-tokens-per-minute", 100),
            daily,
            per_key("requests", "premium", "premium-requests-per-minute", 20),
            per_key("tokens", "premium", "premium-tokens-per-minute", 50_000),
            per_key(
                "requests",
                "enterprise",
                "enterprise-requests-per-minute",
                50,
            ),
            per_key(
                "tokens",
                "enterprise",
                "enterprise-tokens-per-minute",
                100_000,
            ),
        ];
        assert_eq!(set.limits, expected);
    }

    #[test]
    fn every_match_form() {
        let set = parse(&one(
            "match:\n  kind: requests\n  code: 429\n  flag: yes\n  ver: 1.50\n  tier: { equals: free }\n  region: { not: eu }\n  model: { in: [gpt-4o, 4] }\n  plan: [pro, team]\n  user: { present: true }\n  usage: { absent: true }\nby: user\ncapacity: 1\nwindow: 1s",
        ));
        let Scope::Descriptor { conditions, key } = &set.limits[0].scope else {
            panic!()
        };
        let eq = |k: &str, v: &str| EntryCondition::Equals {
            key: k.into(),
            value: v.into(),
        };
        assert_eq!(
            conditions,
            &vec![
                eq("kind", "requests"),
                eq("code", "429"),
                eq("flag", "yes"),
                eq("ver", "1.50"),
                eq("tier", "free"),
                EntryCondition::NotEquals {
                    key: "region".into(),
                    value: "eu".into()
                },
                EntryCondition::In {
                    key: "model".into(),
                    values: vec!["gpt-4o".into(), "4".into()]
                },
                EntryCondition::In {
                    key: "plan".into(),
                    values: vec!["pro".into(), "team".into()]
                },
                EntryCondition::Present { key: "user".into() },
                EntryCondition::Absent {
                    key: "usage".into()
                },
            ]
        );
        assert_eq!(key, &DescriptorKey::Entries(vec!["user".into()]));
    }

    #[test]
    fn minimal_limit_and_defaults() {
        let set = parse(&one("capacity: 3\nwindow: 90s"));
        assert_eq!(
            set.limits,
            vec![LimitSpec {
                domain: "d".into(),
                name: "x".into(),
                scope: Scope::Descriptor {
                    conditions: vec![],
                    key: DescriptorKey::Entries(vec![]),
                },
                capacity: Capacity::Max(3),
                window: WindowSpec::Fixed {
                    duration_ms: 90_000
                },
                shadow: false,
                ack: crate::engine::limits::Ack::Strict,
                replaces: vec![],
            }]
        );
        let set = parse(&one("unlimited: true\nshadow: true"));
        assert_eq!(set.limits[0].capacity, Capacity::Unlimited);
        assert_eq!(set.limits[0].window, UNLIMITED_WINDOW);
        assert!(set.limits[0].shadow);
        // Nameless limits are fine, and may be many.
        let set = parse(
            "domains:\n  - domain: d\n    limits:\n      - { capacity: 1, window: 1s }\n      - { capacity: 2, window: 1s }\n  - domain: e\n",
        );
        assert_eq!(set.limits.len(), 2);
        assert_eq!(set.limits[1].name, "");
    }

    #[test]
    fn anchors_and_aliases_reuse_values() {
        let set = parse(
            "domains:\n  - domain: d\n    limits:\n      - name: a\n        match: &free { tier: free, code: 429 }\n        capacity: 1\n        window: &minute { rolling: 60s, resolution: 1s }\n      - name: b\n        match: *free\n        capacity: 2\n        window: *minute\n",
        );
        assert_eq!(set.limits[0].scope, set.limits[1].scope);
        assert_eq!(set.limits[1].window, rolling(60_000));
        let Scope::Descriptor { conditions, .. } = &set.limits[1].scope else {
            panic!()
        };
        assert_eq!(
            conditions[1],
            EntryCondition::Equals {
                key: "code".into(),
                value: "429".into()
            }
        );
    }

    #[test]
    fn every_window_form() {
        let w = |spec: &str| {
            parse(&one(&format!("capacity: 10\nwindow: {spec}"))).limits[0]
                .window
                .clone()
        };
        assert_eq!(w("500ms"), WindowSpec::Fixed { duration_ms: 500 });
        assert_eq!(
            w("1m"),
            WindowSpec::Fixed {
                duration_ms: 60_000
            }
        );
        assert_eq!(
            w("1h"),
            WindowSpec::Fixed {
                duration_ms: 3_600_000
            }
        );
        assert_eq!(
            w("1d"),
            WindowSpec::Fixed {
                duration_ms: 86_400_000
            }
        );
        assert_eq!(
            w("2w"),
            WindowSpec::Fixed {
                duration_ms: 1_209_600_000
            }
        );
        assert_eq!(
            w("{ fixed: 90s }"),
            WindowSpec::Fixed {
                duration_ms: 90_000
            }
        );
        let cal = |unit, tz: &str| WindowSpec::Calendar {
            unit,
            time_zone: tz.into(),
        };
        assert_eq!(w("{ fixed: day }"), cal(CalendarUnit::Day, "UTC"));
        assert_eq!(
            w("{ fixed: day, time_zone: America/New_York }"),
            cal(CalendarUnit::Day, "America/New_York")
        );
        assert_eq!(
            w("{ fixed: week }"),
            cal(CalendarUnit::Week { start: 1 }, "UTC")
        );
        assert_eq!(
            w("{ fixed: week, week_start: Sunday }"),
            cal(CalendarUnit::Week { start: 7 }, "UTC")
        );
        assert_eq!(
            w("{ fixed: week, week_start: wed }"),
            cal(CalendarUnit::Week { start: 3 }, "UTC")
        );
        assert_eq!(
            w("{ fixed: month }"),
            cal(CalendarUnit::Month { day: 1 }, "UTC")
        );
        assert_eq!(
            w("{ fixed: month, month_day: 28, time_zone: Asia/Tokyo }"),
            cal(CalendarUnit::Month { day: 28 }, "Asia/Tokyo")
        );
        assert_eq!(
            w("{ fixed: year }"),
            cal(CalendarUnit::Year { month: 1, day: 1 }, "UTC")
        );
        assert_eq!(
            w("{ fixed: year, year_start: 04-06 }"),
            cal(CalendarUnit::Year { month: 4, day: 6 }, "UTC")
        );
        assert_eq!(w("{ rolling: 60s }"), rolling(60_000));
        assert_eq!(
            w("{ rolling: 1h, resolution: 1m }"),
            WindowSpec::Rolling {
                window_ms: 3_600_000,
                resolution_ms: 60_000
            }
        );
        assert_eq!(
            w("{ from_first_hit: 60s }"),
            WindowSpec::FromFirstHit {
                duration_ms: 60_000
            }
        );
        assert_eq!(
            w("{ token_bucket: { refill: 10, every: 1s } }"),
            WindowSpec::TokenBucket {
                refill_amount: 10,
                refill_every_ms: 1_000
            }
        );
    }

    #[test]
    fn duration_parsing() {
        assert_eq!(parse_duration("1ms"), Ok(1));
        assert_eq!(parse_duration("3660s"), Ok(3_660_000));
        assert_eq!(parse_duration("3660d"), Ok(316_224_000_000));
        assert!(parse_duration("3661d").unwrap_err().contains("longer than"));
        assert!(
            parse_duration("99999999999999999999999s")
                .unwrap_err()
                .contains("longer than")
        );
        assert!(parse_duration("0s").unwrap_err().contains("longer than 0"));
        assert!(
            parse_duration("1.5s")
                .unwrap_err()
                .contains("unknown unit \".5s\"")
        );
        assert!(
            parse_duration("-1s")
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(parse_duration("").unwrap_err().contains("not a duration"));
        assert!(parse_duration("1 s").unwrap_err().contains("unknown unit"));
        assert!(
            parse_duration("day")
                .unwrap_err()
                .contains("{ fixed: day }")
        );
    }

    /// Each bad limit and the exact message, including line and field.
    #[test]
    fn validation_errors_name_line_and_field() {
        let cases: &[(&str, &str)] = &[
            (
                "capacity: 5\nwindow: 5mins",
                "line 6: domains[0].limits[0].window: unknown unit \"mins\" (expected ms, s, m, h, d, w)",
            ),
            (
                "capacity: 5\nwindow: 60",
                "line 6: domains[0].limits[0].window: 60 has no unit (expected ms, s, m, h, d, w, e.g. 60s)",
            ),
            (
                "capacity: 5\nwindow: day",
                "line 6: domains[0].limits[0].window: \"day\" is not a duration: expected a whole number and a unit (ms, s, m, h, d, w), e.g. 60s (for a calendar day, write { fixed: day })",
            ),
            (
                "capacity: 5\nwindow: 0s",
                "line 6: domains[0].limits[0].window: must be longer than 0",
            ),
            (
                "capacity: 5\nwindow: 3661d",
                "line 6: domains[0].limits[0].window: \"3661d\" is longer than the longest window allowed (316224000000 ms, ten years)",
            ),
            (
                "capacity: 0\nwindow: 1s",
                "line 5: domains[0].limits[0].capacity: must be at least 1",
            ),
            (
                "window: 1s",
                "line 4: domains[0].limits[0]: missing `capacity` (or `unlimited: true`)",
            ),
            (
                "capacity: 1",
                "line 4: domains[0].limits[0]: missing `window`",
            ),
            (
                "capacity: 1\nunlimited: true",
                "line 6: domains[0].limits[0].unlimited: set either `capacity` or `unlimited: true`, not both",
            ),
            (
                "capacity: 5\nwindow:\n  rolling: 60s\n  resolution: 7s",
                "line 8: domains[0].limits[0].window.resolution: the resolution (7000 ms) must divide the window (60000 ms)",
            ),
            (
                "capacity: 5\nwindow:\n  rolling: 2h\n  resolution: 1s",
                "line 6: domains[0].limits[0].window: 7200000 ms at 1000 ms resolution is 7200 buckets, more than the 3600 allowed",
            ),
            (
                "capacity: 5\nwindow: { rolling: 1500ms }",
                "line 6: domains[0].limits[0].window.rolling: the resolution (1000 ms) must divide the window (1500 ms)",
            ),
            (
                "capacity: 5\nwindow: { fixed: 1m, rolling: 1m }",
                "line 6: domains[0].limits[0].window.rolling: `fixed` and `rolling` cannot be combined",
            ),
            (
                "capacity: 5\nwindow: { time_zone: UTC }",
                "line 6: domains[0].limits[0].window: expected one of fixed, rolling, from_first_hit, token_bucket",
            ),
            (
                "capacity: 5\nwindow: { fixed: 1d, time_zone: UTC }",
                "line 6: domains[0].limits[0].window.time_zone: applies only to calendar windows",
            ),
            (
                "capacity: 5\nwindow: { fixed: day, week_start: monday }",
                "line 6: domains[0].limits[0].window.week_start: applies only to `fixed: week`",
            ),
            (
                "capacity: 5\nwindow: { rolling: 1m, month_day: 2 }",
                "line 6: domains[0].limits[0].window.month_day: applies only to `fixed: month`",
            ),
            (
                "capacity: 5\nwindow: { fixed: 1m, resolution: 1s }",
                "line 6: domains[0].limits[0].window.resolution: applies only to rolling windows",
            ),
            (
                "capacity: 5\nwindow: { fixed: fortnight }",
                "line 6: domains[0].limits[0].window.fixed: \"fortnight\" is not a duration: expected a whole number and a unit (ms, s, m, h, d, w), e.g. 60s, or day, week, month, year",
            ),
            (
                "capacity: 5\nwindow:\n  fixed: day\n  time_zone: Europe/Berlim",
                "line 8: domains[0].limits[0].window.time_zone: unknown time zone \"Europe/Berlim\"",
            ),
            (
                "capacity: 5\nwindow: { fixed: day, time_zone: Etc/Unknown }",
                "line 6: domains[0].limits[0].window.time_zone: Etc/Unknown is not a real time zone",
            ),
            (
                "capacity: 5\nwindow: { fixed: week, week_start: someday }",
                "line 6: domains[0].limits[0].window.week_start: \"someday\" is not a weekday",
            ),
            (
                "capacity: 5\nwindow: { fixed: month, month_day: 31 }",
                "line 6: domains[0].limits[0].window.month_day: 31 is out of range (expected 1 to 28",
            ),
            (
                "capacity: 5\nwindow: { fixed: year, year_start: 02-30 }",
                "line 6: domains[0].limits[0].window.year_start: \"02-30\" is not a valid MM-DD",
            ),
            (
                "capacity: 5\nwindow: { token_bucket: { refill: 0, every: 1s } }",
                "line 6: domains[0].limits[0].window.token_bucket.refill: must be at least 1",
            ),
            (
                "capacity: 5\nwindow: { token_bucket: { refill: 6, every: 1s } }",
                "line 6: domains[0].limits[0].window.token_bucket.refill: refill 6 is more than the capacity 5",
            ),
            (
                "capacity: 18446744073709551615\nwindow: { token_bucket: { refill: 6, every: 1s } }",
                "line 6: domains[0].limits[0].window.token_bucket.every: capacity 18446744073709551615 times 1000 ms is more than the 4611686018427387904 units",
            ),
            (
                "capacity: 5\nwindow: { token_bucket: { refill: 1, every: 1 } }",
                "line 6: domains[0].limits[0].window.token_bucket.every: \"1\" has no unit",
            ),
            (
                "capacity: 5\nwindow: 1s\nmatch:\n  tier:",
                "line 8: domains[0].limits[0].match.tier: missing value",
            ),
            (
                "capacity: 5\nwindow: 1s\nmatch:\n  model: { in: [] }",
                "line 8: domains[0].limits[0].match.model.in: an empty list can never match",
            ),
            (
                "capacity: 5\nwindow: 1s\nmatch:\n  model: { in: [a], not: b }",
                "line 8: domains[0].limits[0].match.model.in: `not` and `in` cannot be combined",
            ),
            (
                "capacity: 5\nwindow: 1s\nmatch:\n  model: {}",
                "line 8: domains[0].limits[0].match.model: empty condition",
            ),
            (
                "capacity: 5\nwindow: 1s\nmatch:\n  model: { present: false }",
                "line 8: domains[0].limits[0].match.model.present: `present: false` is not a condition",
            ),
            (
                "capacity: 5\nwindow: 1s\nmatch:\n  model: { absent: false }",
                "line 8: domains[0].limits[0].match.model.absent: `absent: false` is not a condition",
            ),
            (
                "capacity: 5\nwindow: 1s\nmatch:\n  '': x",
                "line 8: domains[0].limits[0].match[\"\"]: must not be empty",
            ),
            (
                "capacity: 5\nwindow: 1s\nby: [a, b, a]",
                "line 7: domains[0].limits[0].by[2]: entry \"a\" is listed twice",
            ),
            (
                "capacity: 5\nwindow: 1s\nby: ['']",
                "line 7: domains[0].limits[0].by[0]: must not be empty",
            ),
            (
                "capacity: 5\nwindow: 1s\nmatch: { user: { absent: true } }\nby: user",
                "line 8: domains[0].limits[0].by[0]: entry \"user\" must be absent by `match`",
            ),
            (
                "capacity: 5\nwindow: 1s\nreplaces: [nothing]",
                "line 7: domains[0].limits[0].replaces[0]: no limit named \"nothing\" in domain \"d\"",
            ),
            (
                "capacity: 5\nwindow: 1s\nreplaces: [x]",
                "line 7: domains[0].limits[0].replaces[0]: a limit cannot replace itself",
            ),
            (
                "capacity: 5\nwindow: 1s\nreplaces: ['']",
                "line 7: domains[0].limits[0].replaces[0]: must not be empty",
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
    fn bounds_are_checked() {
        let long = "k".repeat(1025);
        let text = format!(
            "domains:\n  - domain: d\n    limits:\n      - name: {long}\n        capacity: 1\n        window: 1s\n"
        );
        assert!(err(&text, None).starts_with("limits.yaml: line 4: domains[0].limits[0].name: 1025 bytes is longer than the 1024 bytes allowed"));
        let text = format!("domains:\n  - domain: {long}\n");
        assert!(err(&text, None).starts_with("limits.yaml: line 2: domains[0].domain: 1025 bytes"));
        let many: String = (0..65).map(|i| format!("  k{i}: v\n")).collect();
        let e = err(
            &one(&format!("capacity: 1\nwindow: 1s\nmatch:\n{many}")),
            None,
        );
        assert!(e.starts_with("limits.yaml: line 7: domains[0].limits[0].match: 65 entries is more than the 64 allowed"), "{e}");
        let many: Vec<String> = (0..65).map(|i| format!("k{i}")).collect();
        let e = err(
            &one(&format!(
                "capacity: 1\nwindow: 1s\nby: [{}]",
                many.join(", ")
            )),
            None,
        );
        assert!(
            e.starts_with("limits.yaml: line 7: domains[0].limits[0].by: 65 entries"),
            "{e}"
        );
        let e = err(
            &one(&format!("capacity: 1\nwindow: 1s\nmatch: {{ a: {long} }}")),
            None,
        );
        assert!(
            e.starts_with("limits.yaml: line 7: domains[0].limits[0].match.a: 1025 bytes"),
            "{e}"
        );
        let e = err(
            &one(&format!("capacity: 1\nwindow: 1s\nby: [{long}]")),
            None,
        );
        assert!(
            e.starts_with("limits.yaml: line 7: domains[0].limits[0].by[0]: 1025 bytes"),
            "{e}"
        );
        let e = err("domains:\n  - domain: ''\n", None);
        assert!(
            e.starts_with("limits.yaml: line 2: domains[0].domain: must not be empty"),
            "{e}"
        );
    }

    #[test]
    fn set_wide_checks() {
        let e = err(
            "domains:\n  - domain: d\n    limits:\n      - { name: a, capacity: 1, window: 1s }\n      - { name: a, capacity: 2, window: 1m }\n",
            None,
        );
        assert_eq!(
            e,
            "limits.yaml: line 5: domains[0].limits[1].name: name \"a\" is already used by domains[0].limits[0] (line 4) in domain \"d\""
        );
        // The same name in two domains is fine; replaces within the domain resolves.
        let set = parse(
            "domains:\n  - domain: d\n    limits:\n      - { name: a, capacity: 1, window: 1s }\n      - { name: b, capacity: 1, window: 1s, replaces: [a] }\n  - domain: e\n    limits:\n      - { name: a, capacity: 1, window: 1s }\n",
        );
        assert_eq!(set.limits[1].replaces, vec!["a".to_owned()]);
        let e = err(
            "domains:\n  - domain: d\n  - domain: e\n  - domain: d\n",
            None,
        );
        assert_eq!(
            e,
            "limits.yaml: line 4: domains[2].domain: domain \"d\" is already listed at domains[0] (line 2); put all its limits under one entry"
        );
    }

    #[test]
    fn unknown_and_mistyped_fields_are_refused() {
        let e = err(&one("capacity: 5\nwindow: 1s\nshadw: true"), None);
        assert!(e.starts_with("limits.yaml: line 7: domains[0].limits[0].shadw: unknown field `shadw`, expected one of"), "{e}");
        let e = err(
            &one("capacity: 5\nwindow: { rolling: 1m, resolutoin: 1s }"),
            None,
        );
        assert!(
            e.starts_with("limits.yaml: line 6: domains[0].limits[0].window"),
            "{e}"
        );
        assert!(e.contains("unknown field `resolutoin`"), "{e}");
        let e = err(
            &one("capacity: 5\nwindow: 1s\nmatch: { a: { equal: b } }"),
            None,
        );
        assert!(
            e.starts_with("limits.yaml: line 7: domains[0].limits[0].match.a"),
            "{e}"
        );
        assert!(e.contains("unknown field `equal`"), "{e}");
        let e = err(
            &one("capacity: 5\nwindow: { token_bucket: { refill: 1, every: 1s, burst: 3 } }"),
            None,
        );
        assert!(e.contains("unknown field `burst`"), "{e}");
        let e = err("domains:\n  - domain: d\n    limit: []\n", None);
        assert!(
            e.starts_with("limits.yaml: line 3: domains[0].limit: unknown field `limit`"),
            "{e}"
        );
        let e = err("domain: d\ndomains: []\n", Some(Format::Native));
        assert!(
            e.starts_with("limits.yaml: line 1: domain: unknown field `domain`"),
            "{e}"
        );
        let e = err(&one("capacity: -5\nwindow: 1s"), None);
        assert_eq!(
            e,
            "limits.yaml: line 5: domains[0].limits[0].capacity: expected a whole number, 0 or more"
        );
        let e = err(
            "domains:\n  - domain: a\n    limits: []\n    domain: b\n",
            None,
        );
        assert_eq!(
            e,
            "limits.yaml: line 4: domains[0].domain: duplicate key \"domain\""
        );
        let e = err(
            "domains:\n  - domain: a\n    limits:\n      - name: x\n        capacity: 1\n    domain: b\n",
            None,
        );
        assert_eq!(
            e,
            "limits.yaml: line 6: domains[0].domain: duplicate key \"domain\""
        );
        let e = err(
            "domains:\n- domain: a\n  limits:\n  - name: x\n    capacity: 1\n    window: 1s\n    name: y\n",
            None,
        );
        assert_eq!(
            e,
            "limits.yaml: line 7: domains[0].limits[0].name: duplicate key \"name\""
        );
        let e = err(&one("capacity: 5\nwindow: 1s\nmatch: [a]"), None);
        assert_eq!(
            e,
            "limits.yaml: line 7: domains[0].limits[0].match: expected a map"
        );
        let e = err(&one("capacity: 5\nwindow: [1s]"), None);
        assert!(
            e.starts_with("limits.yaml: line 6: domains[0].limits[0].window: "),
            "{e}"
        );
        let e = err(&one("capacity: 5\nwindow: 1s\nshadow: maybe"), None);
        assert!(
            e.starts_with("limits.yaml: line 7: domains[0].limits[0].shadow: "),
            "{e}"
        );
        let e = err("domains:\n  - limits: []\n", None);
        assert!(
            e.starts_with("limits.yaml: line 2: domains[0]: missing field `domain`"),
            "{e}"
        );
        let e = err(
            "domains:\n  - domain: d\n    limits:\n      - name: x\n      capacity: 5\n",
            None,
        );
        assert!(e.starts_with("limits.yaml: line 5"), "{e}");
    }
}
