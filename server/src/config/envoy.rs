//! envoyproxy/ratelimit's config file (one file, one domain).
//!
//! ```yaml
//! domain: ai-gateway                  # required, not empty
//! descriptors:
//!   - key: api_key                    # required, not empty
//!     value: trial-*                  # optional; absent or "" = any value (key-only);
//!                                     # a trailing * = any value with that prefix
//!     rate_limit:                     # optional
//!       unit: minute                  # second|minute|hour|day|week|month|year, any case
//!       requests_per_unit: 5          # >= 1
//!       unlimited: false              # true: always admits (then no unit)
//!       name: trial-keys              # optional
//!       replaces: [{ name: per-key }] # optional: limits this one replaces
//!     shadow_mode: false              # optional: counted, never denies
//!     detailed_metric: false          # accepted and ignored (a metrics option)
//!     descriptors: [...]              # optional: the next entry of the descriptor
//! ```
//!
//! Unknown fields are refused, as envoyproxy/ratelimit does.
//!
//! # Flattening the tree
//!
//! envoyproxy/ratelimit matches a request descriptor's entries in order, one tree level per
//! entry. At each level it takes the child whose key and value equal the entry's; failing
//! that, the first wildcard child (same key, value ending in `*`) whose prefix the value has;
//! failing that, the key-only child. It never backtracks. A limit applies only when the
//! descriptor has exactly as many entries as the depth of the node holding the `rate_limit`.
//!
//! Each node with a `rate_limit` at depth `n` becomes one limit with scope
//! [`Scope::Descriptor`]`{ conditions: [EntryCount(n), Positional{index: 0, ..}, ...,
//! Positional{index: n-1, ..}], key: AllEntries }`, where each level's [`ValueMatch`]
//! encodes that precedence among the node's siblings (children of the same parent with the
//! same key):
//!
//! - `value: v` (exact): `Exact(v)`;
//! - `value: v*` (wildcard): `Prefix { prefix: v, except }`, `except` = the exact sibling
//!   values that start with `v` (they take precedence);
//! - no value (key-only): `Any { except, except_prefixes }` = every exact sibling value and
//!   every wildcard sibling prefix.
//!
//! So exactly one path of the tree can match a descriptor, as upstream. Two wildcard siblings
//! whose prefixes overlap (`a*` and `ab*`) are refused: upstream resolves them by file
//! order, which a `Prefix` cannot express. Two siblings with the same key and value are
//! refused, as upstream does.
//!
//! # Units and names
//!
//! `second`, `minute`, `hour` become [`WindowSpec::Fixed`] windows of 1 s, 60 s, 3600 s
//! (epoch-aligned, as upstream). `day`, `week`, `month`, `year` become calendar windows in
//! UTC: the UTC day; the ISO week from Monday; the month from day 1; the year from January 1.
//! (Upstream divides the epoch by 1, 7, 30 and 365 days instead: its "week" starts on
//! Thursdays and its "month" and "year" drift from the calendar.) An `unlimited` limit
//! keeps no counter; its window is a nominal 1 s.
//!
//! A limit without `name` is named like upstream's stats key: the domain and each level's
//! `key` or `key_value`, joined by dots: `ai-gateway.tier_free.model`. Names are unique in
//! the file. `replaces` targets are not required to exist (a dangling one is a no-op, as
//! upstream).

use std::collections::HashMap;

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::{Built, ConfigError, FieldPath, Source, check_name, check_string, show};
use crate::engine::limits::{
    CalendarUnit, Capacity, DescriptorKey, EntryCondition, LimitSpec, MAX_LIMIT_TERMS, MAX_LIMITS,
    Scope, ValueMatch, WindowSpec,
};

/// Deepest descriptor tree: a limit at depth `n` has `n + 1` conditions.
const MAX_DEPTH: usize = MAX_LIMIT_TERMS - 1;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvoyFile {
    domain: String,
    #[serde(default)]
    descriptors: Option<Vec<DescriptorRaw>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DescriptorRaw {
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    rate_limit: Option<RateLimitRaw>,
    #[serde(default)]
    descriptors: Option<Vec<DescriptorRaw>>,
    #[serde(default)]
    shadow_mode: bool,
    #[serde(default, rename = "detailed_metric")]
    _detailed_metric: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitRaw {
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    requests_per_unit: Option<u64>,
    #[serde(default)]
    unlimited: bool,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    replaces: Option<Vec<ReplacesRaw>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplacesRaw {
    name: String,
}

/// One level of the path from the root to the current node.
struct Level {
    key: String,
    value: ValueMatch,
    /// `key` or `key_value`, for generated names.
    label: String,
}

/// Parses an envoyproxy/ratelimit config file into limits.
pub(crate) fn parse(src: &Source<'_>) -> Result<Vec<Built>, ConfigError> {
    let file: EnvoyFile = src.parse()?;
    check_name(
        src,
        &FieldPath::root().key("domain"),
        &file.domain,
        crate::engine::command::MAX_DOMAIN_BYTES,
    )?;
    let mut out = Vec::new();
    let nodes = file.descriptors.unwrap_or_default();
    walk(
        src,
        &file.domain,
        &nodes,
        &FieldPath::root(),
        &mut Vec::new(),
        &mut out,
    )?;
    Ok(out)
}

/// The value as upstream reads it: absent and empty both mean key-only.
fn value_of(node: &DescriptorRaw) -> Option<&str> {
    node.value.as_deref().filter(|v| !v.is_empty())
}

fn walk(
    src: &Source<'_>,
    domain: &str,
    nodes: &[DescriptorRaw],
    parent: &FieldPath,
    levels: &mut Vec<Level>,
    out: &mut Vec<Built>,
) -> Result<(), ConfigError> {
    let here = |i: usize| parent.key("descriptors").index(i);

    // Siblings: bounds, duplicates, overlapping wildcards.
    let mut seen: HashMap<(&str, Option<&str>), usize> = HashMap::new();
    for (i, node) in nodes.iter().enumerate() {
        check_name(
            src,
            &here(i).key("key"),
            &node.key,
            crate::engine::command::MAX_KEY_BYTES,
        )?;
        if let Some(v) = &node.value {
            check_string(src, &here(i).key("value"), v, false)?;
        }
        let value = value_of(node);
        if let Some(first) = seen.insert((&node.key, value), i) {
            let what = match value {
                Some(v) => format!("key {} value {}", show(&node.key), show(v)),
                None => format!("key-only {}", show(&node.key)),
            };
            return Err(src.invalid(
                &here(i),
                format!(
                    "duplicate descriptor: {what} is already at {}",
                    src.describe(&here(first))
                ),
            ));
        }
        if let Some(prefix) = value.and_then(|v| v.strip_suffix('*')) {
            for (j, earlier) in nodes[..i].iter().enumerate() {
                let Some(other) = value_of(earlier).and_then(|v| v.strip_suffix('*')) else {
                    continue;
                };
                if earlier.key == node.key
                    && (prefix.starts_with(other) || other.starts_with(prefix))
                {
                    return Err(src.invalid(
                        &here(i).key("value"),
                        format!(
                            "wildcard {} overlaps wildcard {} at {}: which one applies would \
                             depend on their order; make the prefixes disjoint",
                            show(value.unwrap_or_default()),
                            show(value_of(earlier).unwrap_or_default()),
                            src.describe(&here(j))
                        ),
                    ));
                }
            }
        }
    }

    for (i, node) in nodes.iter().enumerate() {
        let path = here(i);
        let same_key = || {
            nodes
                .iter()
                .filter(|n| n.key == node.key)
                .filter_map(value_of)
        };
        let exact = || same_key().filter(|v| !v.ends_with('*'));
        let (value, label) = match value_of(node) {
            None => (
                ValueMatch::Any {
                    except: exact().map(str::to_owned).collect(),
                    except_prefixes: same_key()
                        .filter_map(|v| v.strip_suffix('*'))
                        .map(str::to_owned)
                        .collect(),
                },
                node.key.clone(),
            ),
            Some(v) => {
                let value = match v.strip_suffix('*') {
                    Some(prefix) => ValueMatch::Prefix {
                        prefix: prefix.to_owned(),
                        except: exact()
                            .filter(|e| e.starts_with(prefix))
                            .map(str::to_owned)
                            .collect(),
                    },
                    None => ValueMatch::Exact(v.to_owned()),
                };
                (value, format!("{}_{v}", node.key))
            }
        };
        levels.push(Level {
            key: node.key.clone(),
            value,
            label,
        });
        if levels.len() > MAX_DEPTH {
            return Err(src.invalid(
                &path,
                format!("descriptor tree deeper than {MAX_DEPTH} levels"),
            ));
        }
        if let Some(rate_limit) = &node.rate_limit {
            if out.len() >= MAX_LIMITS {
                return Err(src.invalid(&path, format!("more than {MAX_LIMITS} limits in one set")));
            }
            out.push(limit(src, domain, node, rate_limit, levels, &path)?);
        }
        if let Some(children) = &node.descriptors {
            walk(src, domain, children, &path, levels, out)?;
        }
        levels.pop();
    }
    Ok(())
}

fn limit(
    src: &Source<'_>,
    domain: &str,
    node: &DescriptorRaw,
    raw: &RateLimitRaw,
    levels: &[Level],
    path: &FieldPath,
) -> Result<Built, ConfigError> {
    let rpath = path.key("rate_limit");
    let (capacity, window) = if raw.unlimited {
        if raw.unit.as_deref().is_some_and(|u| !u.is_empty()) {
            return Err(src.invalid(
                &rpath.key("unit"),
                "must not be set when `unlimited: true`".to_owned(),
            ));
        }
        (
            Capacity::Unlimited,
            WindowSpec::Fixed { duration_ms: 1_000 },
        )
    } else {
        let Some(unit) = &raw.unit else {
            return Err(src.invalid(&rpath, "missing `unit` (or `unlimited: true`)".to_owned()));
        };
        let window = window_of_unit(unit).ok_or_else(|| {
            src.invalid(
                &rpath.key("unit"),
                format!(
                    "unknown unit {} (expected second, minute, hour, day, week, month or year)",
                    show(unit)
                ),
            )
        })?;
        let capacity = match raw.requests_per_unit {
            None => {
                return Err(src.invalid(&rpath, "missing `requests_per_unit`".to_owned()));
            }
            Some(0) => {
                return Err(src.invalid(
                    &rpath.key("requests_per_unit"),
                    "must be at least 1 (a limit that admits nothing is not a limit)".to_owned(),
                ));
            }
            Some(n) => Capacity::Max(n),
        };
        (capacity, window)
    };

    let (name, name_path) = match &raw.name {
        Some(name) if !name.is_empty() => {
            let name_path = rpath.key("name");
            check_string(src, &name_path, name, false)?;
            (name.clone(), name_path)
        }
        _ => {
            let mut name = domain.to_owned();
            for level in levels {
                name.push('.');
                name.push_str(&level.label);
            }
            check_string(src, &rpath, &name, false).map_err(|_| {
                src.invalid(
                    &rpath,
                    format!(
                        "the generated name is longer than {} bytes; give the rate_limit a `name`",
                        crate::engine::limits::MAX_LIMIT_STRING_BYTES
                    ),
                )
            })?;
            (name, rpath.clone())
        }
    };

    let mut conditions = Vec::with_capacity(levels.len() + 1);
    conditions.push(EntryCondition::EntryCount(levels.len() as u32));
    for (index, level) in levels.iter().enumerate() {
        conditions.push(EntryCondition::Positional {
            index: index as u32,
            key: level.key.clone(),
            value: level.value.clone(),
        });
    }

    Ok(Built {
        spec: LimitSpec {
            domain: domain.to_owned(),
            name,
            scope: Scope::Descriptor {
                conditions,
                key: DescriptorKey::AllEntries,
            },
            capacity,
            window,
            shadow: node.shadow_mode,
            ack: crate::engine::limits::Ack::Strict,
            replaces: raw
                .replaces
                .iter()
                .flatten()
                .map(|r| r.name.clone())
                .collect(),
        },
        path: path.clone(),
        name_path,
        replaces_path: rpath.key("replaces"),
        replaces_field: Some("name"),
        replaces_must_exist: false,
    })
}

fn window_of_unit(unit: &str) -> Option<WindowSpec> {
    let calendar = |unit| WindowSpec::Calendar {
        unit,
        time_zone: "UTC".to_owned(),
    };
    Some(match unit.to_ascii_lowercase().as_str() {
        "second" => WindowSpec::Fixed { duration_ms: 1_000 },
        "minute" => WindowSpec::Fixed {
            duration_ms: 60_000,
        },
        "hour" => WindowSpec::Fixed {
            duration_ms: 3_600_000,
        },
        "day" => calendar(CalendarUnit::Day),
        "week" => calendar(CalendarUnit::Week { start: 1 }),
        "month" => calendar(CalendarUnit::Month { day: 1 }),
        "year" => calendar(CalendarUnit::Year { month: 1, day: 1 }),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::err;
    use super::super::{Format, load_limits_file, parse_limits};
    use super::*;

    fn parse(text: &str) -> Vec<LimitSpec> {
        parse_limits(text, Some(Format::Envoy), "config.yaml")
            .unwrap_or_else(|e| panic!("{e}"))
            .limits
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn pos(index: u32, key: &str, value: ValueMatch) -> EntryCondition {
        EntryCondition::Positional {
            index,
            key: key.into(),
            value,
        }
    }

    fn exact(v: &str) -> ValueMatch {
        ValueMatch::Exact(v.into())
    }

    fn any(except: &[&str], except_prefixes: &[&str]) -> ValueMatch {
        ValueMatch::Any {
            except: s(except),
            except_prefixes: s(except_prefixes),
        }
    }

    fn prefix(p: &str, except: &[&str]) -> ValueMatch {
        ValueMatch::Prefix {
            prefix: p.into(),
            except: s(except),
        }
    }

    fn spec(
        name: &str,
        conditions: Vec<EntryCondition>,
        capacity: Capacity,
        window: WindowSpec,
    ) -> LimitSpec {
        let mut all = vec![EntryCondition::EntryCount((conditions.len()) as u32)];
        all.extend(conditions);
        LimitSpec {
            domain: "ai-gateway".into(),
            name: name.into(),
            scope: Scope::Descriptor {
                conditions: all,
                key: DescriptorKey::AllEntries,
            },
            capacity,
            window,
            shadow: false,
            ack: crate::engine::limits::Ack::Strict,
            replaces: vec![],
        }
    }

    const MINUTE: WindowSpec = WindowSpec::Fixed {
        duration_ms: 60_000,
    };
    const HOUR: WindowSpec = WindowSpec::Fixed {
        duration_ms: 3_600_000,
    };

    #[test]
    fn example_file_parses_to_the_expected_limits() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/envoy-ratelimit/config.yaml"
        );
        let set =
            load_limits_file(std::path::Path::new(path), None).unwrap_or_else(|e| panic!("{e}"));
        let day = WindowSpec::Calendar {
            unit: CalendarUnit::Day,
            time_zone: "UTC".into(),
        };
        let month = WindowSpec::Calendar {
            unit: CalendarUnit::Month { day: 1 },
            time_zone: "UTC".into(),
        };
        let unlimited = WindowSpec::Fixed { duration_ms: 1_000 };
        let key_siblings = any(&["internal-batch"], &["trial-"]);
        let mut enterprise = spec(
            "enterprise",
            vec![pos(0, "tier", exact("enterprise"))],
            Capacity::Max(1_000),
            MINUTE,
        );
        enterprise.replaces = s(&["per-key"]);
        let mut preview = spec(
            "enterprise-monthly-preview",
            vec![
                pos(0, "tier", exact("enterprise")),
                pos(1, "plan", exact("preview")),
            ],
            Capacity::Max(1_000_000),
            month,
        );
        preview.shadow = true;
        let expected = vec![
            spec(
                "per-key",
                vec![pos(0, "api_key", key_siblings.clone())],
                Capacity::Max(60),
                MINUTE,
            ),
            spec(
                "ai-gateway.api_key.model",
                vec![
                    pos(0, "api_key", key_siblings),
                    pos(1, "model", any(&[], &[])),
                ],
                Capacity::Max(600),
                HOUR,
            ),
            spec(
                "ai-gateway.api_key_internal-batch",
                vec![pos(0, "api_key", exact("internal-batch"))],
                Capacity::Unlimited,
                unlimited,
            ),
            spec(
                "trial-keys",
                vec![pos(0, "api_key", prefix("trial-", &[]))],
                Capacity::Max(5),
                MINUTE,
            ),
            spec(
                "free-gpt-4o-per-day",
                vec![
                    pos(0, "tier", exact("free")),
                    pos(1, "model", exact("gpt-4o")),
                ],
                Capacity::Max(50),
                day,
            ),
            spec(
                "ai-gateway.tier_free.model",
                vec![
                    pos(0, "tier", exact("free")),
                    pos(1, "model", any(&["gpt-4o"], &[])),
                ],
                Capacity::Max(100),
                HOUR,
            ),
            enterprise,
            preview,
        ];
        assert_eq!(set.limits, expected);
    }

    #[test]
    fn precedence_of_exact_wildcard_and_key_only_siblings() {
        let limits = parse(
            "domain: ai-gateway
descriptors:
  - key: k
    rate_limit: { unit: minute, requests_per_unit: 1 }
  - key: k
    value: ab*
    rate_limit: { unit: minute, requests_per_unit: 2 }
  - key: k
    value: abc
    rate_limit: { unit: minute, requests_per_unit: 3 }
  - key: k
    value: x*
    rate_limit: { unit: minute, requests_per_unit: 4 }
  - key: k
    value: zz
    rate_limit: { unit: minute, requests_per_unit: 5 }
  - key: other
    rate_limit: { unit: minute, requests_per_unit: 6 }
  - key: j
    value: '*'
    descriptors:
      - key: m
        value: ''
        rate_limit: { unit: hour, requests_per_unit: 7 }
",
        );
        let cap = Capacity::Max;
        assert_eq!(
            limits,
            vec![
                spec(
                    "ai-gateway.k",
                    vec![pos(0, "k", any(&["abc", "zz"], &["ab", "x"]))],
                    cap(1),
                    MINUTE
                ),
                spec(
                    "ai-gateway.k_ab*",
                    vec![pos(0, "k", prefix("ab", &["abc"]))],
                    cap(2),
                    MINUTE
                ),
                spec(
                    "ai-gateway.k_abc",
                    vec![pos(0, "k", exact("abc"))],
                    cap(3),
                    MINUTE
                ),
                spec(
                    "ai-gateway.k_x*",
                    vec![pos(0, "k", prefix("x", &[]))],
                    cap(4),
                    MINUTE
                ),
                spec(
                    "ai-gateway.k_zz",
                    vec![pos(0, "k", exact("zz"))],
                    cap(5),
                    MINUTE
                ),
                spec(
                    "ai-gateway.other",
                    vec![pos(0, "other", any(&[], &[]))],
                    cap(6),
                    MINUTE
                ),
                spec(
                    "ai-gateway.j_*.m",
                    vec![pos(0, "j", prefix("", &[])), pos(1, "m", any(&[], &[]))],
                    cap(7),
                    HOUR
                ),
            ]
        );
    }

    #[test]
    fn wildcard_overlap_is_refused() {
        // `*` and `ab*` under one parent with one key overlap.
        let e = err(
            "domain: d\ndescriptors:\n  - key: k\n    value: ab*\n  - key: k\n    value: '*'\n",
            None,
        );
        assert_eq!(
            e,
            "config.yaml: line 6: descriptors[1].value: wildcard \"*\" overlaps wildcard \"ab*\" at descriptors[0] (line 3): which one applies would depend on their order; make the prefixes disjoint"
                .replace("config.yaml", "limits.yaml")
        );
        // Different keys, or different parents, do not overlap.
        parse(
            "domain: d\ndescriptors:\n  - { key: k, value: 'a*' }\n  - { key: j, value: 'ab*' }\n  - key: p\n    descriptors: [{ key: k, value: 'ab*' }]\n",
        );
    }

    #[test]
    fn units_names_and_options() {
        let limits = parse(
            "domain: ai-gateway
descriptors:
  - key: a
    value: '1'
    rate_limit: { unit: SECOND, requests_per_unit: 1 }
  - key: a
    value: '2'
    rate_limit: { unit: Week, requests_per_unit: 1 }
  - key: a
    value: '3'
    rate_limit: { unit: year, requests_per_unit: 1, name: '' }
  - key: a
    value: '4'
    shadow_mode: true
    detailed_metric: true
    rate_limit:
      unlimited: true
      requests_per_unit: 9
      name: four
      replaces: [{ name: ai-gateway.a_1 }, { name: nowhere }]
",
        );
        assert_eq!(limits[0].window, WindowSpec::Fixed { duration_ms: 1_000 });
        assert_eq!(
            limits[1].window,
            WindowSpec::Calendar {
                unit: CalendarUnit::Week { start: 1 },
                time_zone: "UTC".into()
            }
        );
        assert_eq!(
            limits[2].window,
            WindowSpec::Calendar {
                unit: CalendarUnit::Year { month: 1, day: 1 },
                time_zone: "UTC".into()
            }
        );
        assert_eq!(limits[2].name, "ai-gateway.a_3");
        assert_eq!(limits[3].name, "four");
        assert_eq!(limits[3].capacity, Capacity::Unlimited);
        assert!(limits[3].shadow);
        assert_eq!(limits[3].replaces, s(&["ai-gateway.a_1", "nowhere"]));
    }

    #[test]
    fn validation_errors_name_line_and_field() {
        let cases: &[(&str, &str)] = &[
            (
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: mins\n      requests_per_unit: 1\n",
                "line 5: descriptors[0].rate_limit.unit: unknown unit \"mins\" (expected second, minute, hour, day, week, month or year)",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit:\n      requests_per_unit: 1\n",
                "line 4: descriptors[0].rate_limit: missing `unit` (or `unlimited: true`)",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: hour\n",
                "line 4: descriptors[0].rate_limit: missing `requests_per_unit`",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: hour\n      requests_per_unit: 0\n",
                "line 6: descriptors[0].rate_limit.requests_per_unit: must be at least 1",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: hour\n      unlimited: true\n",
                "line 5: descriptors[0].rate_limit.unit: must not be set when `unlimited: true`",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    descriptors:\n      - key: a\n        value: b\n      - key: c\n      - key: a\n        value: b\n",
                "line 8: descriptors[0].descriptors[2]: duplicate descriptor: key \"a\" value \"b\" is already at descriptors[0].descriptors[0] (line 5)",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n  - key: k\n    value: ''\n",
                "line 4: descriptors[1]: duplicate descriptor: key-only \"k\" is already at descriptors[0] (line 3)",
            ),
            (
                "domain: d\ndescriptors:\n  - key: ''\n",
                "line 3: descriptors[0].key: must not be empty",
            ),
            ("domain: ''\n", "line 1: domain: must not be empty"),
            (
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit: { unit: hour, requests_per_unit: 1, name: n, replaces: [{ name: n }] }\n",
                "line 4: descriptors[0].rate_limit.replaces[0].name: a limit cannot replace itself",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit: { unit: hour, requests_per_unit: 1, replaces: [{ name: '' }] }\n",
                "line 4: descriptors[0].rate_limit.replaces[0].name: must not be empty",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    value: v\n    rate_limit: { unit: hour, requests_per_unit: 1, name: d.k }\n  - key: k\n    rate_limit: { unit: hour, requests_per_unit: 1 }\n",
                "line 7: descriptors[1].rate_limit: name \"d.k\" is already used by descriptors[0] (line 3) in domain \"d\"",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit: { unit: hour, requests_per_unit: 1, burst: 2 }\n",
                "line 4: descriptors[0].rate_limit.burst: unknown field `burst`",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    valeu: v\n",
                "line 4: descriptors[0].valeu: unknown field `valeu`",
            ),
            (
                "domain: d\ndescriptors:\n  - value: v\n",
                "line 3: descriptors[0]: missing field `key`",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit: { unit: hour, requests_per_unit: -1 }\n",
                "line 4: descriptors[0].rate_limit.requests_per_unit: ",
            ),
        ];
        for (text, expected) in cases {
            let e = err(text, None);
            let expected = format!("limits.yaml: {expected}");
            assert!(
                e.starts_with(&expected),
                "\n  got: {e}\n want: {expected}..."
            );
        }
        let long = "v".repeat(1000);
        let e = err(
            &format!(
                "domain: d\ndescriptors:\n  - key: k\n    value: {long}\n    descriptors:\n      - key: k\n        value: {long}\n        rate_limit: {{ unit: hour, requests_per_unit: 1 }}\n"
            ),
            None,
        );
        assert!(e.starts_with("limits.yaml: line 8: descriptors[0].descriptors[0].rate_limit: the generated name is longer than 1024 bytes"), "{e}");
    }

    #[test]
    fn deep_trees_are_bounded() {
        let mut text = "domain: d\ndescriptors:\n".to_owned();
        for depth in 0..70 {
            let pad = "  ".repeat(2 * depth);
            text.push_str(&format!("{pad}  - key: k{depth}\n{pad}    descriptors:\n"));
        }
        let e = err(&text, None);
        assert!(e.contains("line"), "{e}");
    }
}
