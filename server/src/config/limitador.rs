//! Kuadrant/limitador's limits file.
//!
//! A YAML list of limits:
//!
//! ```yaml
//! - namespace: ai-gateway            # the RLS domain (required)
//!   name: free-requests-per-minute   # optional; unique within the namespace
//!   max_value: 5                     # hits per window; 0 = always limited
//!   seconds: 60                      # window length, >= 1
//!   conditions:                      # CEL; all must be true for the limit to apply
//!     - "descriptors[0]['tier'] == 'free'"
//!   variables:                       # CEL; one counter per distinct tuple of values;
//!     - "descriptors[0]['api_key']"  # the limit applies only when all evaluate
//! ```
//!
//! Each item becomes a [`Scope::Request`] limit with [`Capacity::Max`]`(max_value)` and a
//! [`WindowSpec::FromFirstHit`] window of `seconds` (Limitador's window opens at the first
//! hit). `id` (Limitador's optional counter identity) is accepted and ignored; any other
//! unknown field is refused.
//!
//! CEL expressions see one variable, `descriptors`: a list with one map per request
//! descriptor, from entry key to value. Every expression is compiled at load, and an
//! expression that references variables but never `descriptors` is refused: it could never
//! evaluate, so its limit would silently never apply.
//!
//! # The pre-CEL syntax
//!
//! Limitador before 2.0 wrote conditions as `req.method == 'GET'` and variables as
//! `user_id`, naming descriptor entries directly. A whole condition of the form
//! `<entry> == '<value>'` (or `!=`, with either quote) and a whole variable that is a bare
//! `<entry>`, where `<entry>` is letters, digits, `_`, `.` and `-` and is not rooted at
//! `descriptors`, are rewritten to `descriptors[0]['<entry>'] == '<value>'` and
//! `descriptors[0]['<entry>']`. Likewise `descriptors[N].a.b` (a dotted entry key written
//! as CEL field selection, which can never evaluate on string values) becomes
//! `descriptors[N]['a.b']`. Anything else is taken as CEL as written.

use serde::Deserialize;

use super::{Built, ConfigError, FieldPath, Source, check_name, check_string, check_terms};
use crate::engine::limits::{Capacity, LimitSpec, MAX_LIMITS, MAX_WINDOW_MS, Scope, WindowSpec};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitRaw {
    namespace: String,
    max_value: u64,
    seconds: u64,
    #[serde(default)]
    name: Option<String>,
    #[serde(default, rename = "id")]
    _id: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    conditions: Option<Vec<String>>,
    #[serde(default)]
    variables: Option<Vec<String>>,
}

/// Parses a Limitador limits file into limits.
pub(crate) fn parse(src: &Source<'_>) -> Result<Vec<Built>, ConfigError> {
    let raws: Option<Vec<LimitRaw>> = src.parse()?;
    let raws = raws.unwrap_or_default();
    let mut out = Vec::with_capacity(raws.len());
    let mut cel = Vec::new();
    for (i, raw) in raws.into_iter().enumerate() {
        let path = FieldPath::root().index(i);
        if out.len() >= MAX_LIMITS {
            return Err(src.invalid(&path, format!("more than {MAX_LIMITS} limits in one set")));
        }
        check_name(
            src,
            &path.key("namespace"),
            &raw.namespace,
            crate::engine::command::MAX_DOMAIN_BYTES,
        )?;
        let name = raw.name.unwrap_or_default();
        check_string(src, &path.key("name"), &name, false)?;
        if raw.seconds == 0 {
            return Err(src.invalid(&path.key("seconds"), "must be at least 1".to_owned()));
        }
        let duration_ms = raw
            .seconds
            .checked_mul(1_000)
            .filter(|&ms| ms <= MAX_WINDOW_MS)
            .ok_or_else(|| {
                src.invalid(
                    &path.key("seconds"),
                    format!(
                        "{} s is longer than the longest window allowed ({} s, ten years)",
                        raw.seconds,
                        MAX_WINDOW_MS / 1_000
                    ),
                )
            })?;
        let mut exprs =
            |field: &str, list: Option<Vec<String>>, rewrite: fn(&str) -> Option<String>| {
                let list = list.unwrap_or_default();
                let fpath = path.key(field);
                check_terms(src, &fpath, list.len())?;
                let mut out = Vec::with_capacity(list.len());
                for (k, expr) in list.into_iter().enumerate() {
                    let epath = fpath.index(k);
                    check_string(src, &epath, &expr, true)?;
                    let expr = match rewrite(&expr) {
                        Some(new) => {
                            tracing::warn!(
                                file = src.origin,
                                field = %epath,
                                from = %expr,
                                to = %new,
                                "pre-CEL Limitador syntax rewritten"
                            );
                            check_string(src, &epath, &new, true)?;
                            new
                        }
                        None => expr,
                    };
                    cel.push((epath, expr.clone()));
                    out.push(expr);
                }
                Ok::<_, ConfigError>(out)
            };
        let conditions = exprs("conditions", raw.conditions, legacy_condition)?;
        let variables = exprs("variables", raw.variables, legacy_variable)?;
        out.push(Built {
            spec: LimitSpec {
                domain: raw.namespace,
                name,
                scope: Scope::Request {
                    conditions,
                    variables,
                },
                capacity: Capacity::Max(raw.max_value),
                window: WindowSpec::FromFirstHit { duration_ms },
                shadow: false,
                ack: crate::engine::limits::Ack::Strict,
                replaces: Vec::new(),
            },
            name_path: path.key("name"),
            replaces_path: path.clone(),
            path,
            replaces_field: None,
            replaces_must_exist: true,
        });
    }
    if let Some((path, message)) = compile_all(cel) {
        return Err(src.invalid(&path, message));
    }
    Ok(out)
}

/// Compiles every expression with the engine's compiler; returns the first failure. (The
/// caller runs on a large stack: the CEL parser recurses deeply, see `on_big_stack`.)
fn compile_all(exprs: Vec<(FieldPath, String)>) -> Option<(FieldPath, String)> {
    exprs
        .into_iter()
        .find_map(|(path, expr)| check_cel(&expr).err().map(|message| (path, message)))
}

fn check_cel(expr: &str) -> Result<(), String> {
    crate::engine::cel::compile(expr).map_err(|e| format!("invalid CEL: {}", first_error(&e)))?;
    // The engine's compiler accepted it, so the parse below succeeds; it only reads references.
    if let Ok(program) = cel::Program::compile(expr) {
        let references = program.references();
        let variables = references.variables();
        if !variables.is_empty() && !references.has_variable("descriptors") {
            let mut names: Vec<&str> = variables;
            names.sort_unstable();
            return Err(format!(
                "refers to {} but never to `descriptors`, the only variable defined, so it can \
                 never evaluate (write e.g. descriptors[0]['{}'])",
                names
                    .iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                names[0]
            ));
        }
    }
    Ok(())
}

/// The first error of a CEL error report, on one line and of bounded length.
fn first_error(report: &str) -> String {
    let mut lines = report.lines().filter(|l| !l.trim().is_empty());
    let mut out = lines.next().unwrap_or(report).trim().to_owned();
    out = out.trim_start_matches("ERROR: ").to_owned();
    out = out.trim_start_matches("<input>:").to_owned();
    const MAX: usize = 300;
    if out.len() > MAX {
        let mut end = MAX;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push_str("...");
    }
    out
}

/// An entry name as pre-CEL Limitador wrote it: `req.method`, `user_id`, `x-api-key`.
fn is_entry_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// `descriptors[N]` followed by two or more `.segment`s: returns (`N`, `a.b`).
fn dotted_selection(s: &str) -> Option<(&str, &str)> {
    let rest = s.strip_prefix("descriptors[")?;
    let (index, rest) = rest.split_once(']')?;
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let key = rest.strip_prefix('.')?;
    (key.contains('.') && is_entry_name(key) && !key.contains("..") && !key.ends_with('.'))
        .then_some((index, key))
}

/// The CEL for an entry reference, or `None` if `s` is not a legacy form.
fn legacy_reference(s: &str) -> Option<String> {
    if let Some((index, key)) = dotted_selection(s) {
        return Some(format!("descriptors[{index}]['{key}']"));
    }
    let root = s.split('.').next().unwrap_or(s);
    if is_entry_name(s) && root != "descriptors" && !matches!(s, "true" | "false" | "null") {
        return Some(format!("descriptors[0]['{s}']"));
    }
    None
}

fn legacy_variable(s: &str) -> Option<String> {
    legacy_reference(s.trim())
}

fn legacy_condition(s: &str) -> Option<String> {
    let s = s.trim();
    let (lhs, op, rhs) = ["==", "!="].iter().find_map(|op| {
        let (l, r) = s.split_once(op)?;
        Some((l.trim(), *op, r.trim()))
    })?;
    let literal = ['\'', '"'].iter().find_map(|&q| {
        let inner = rhs.strip_prefix(q)?.strip_suffix(q)?;
        (!inner.contains(q) && !inner.contains('\\')).then_some((q, inner))
    });
    let (quote, value) = literal?;
    let lhs = legacy_reference(lhs)?;
    Some(format!("{lhs} {op} {quote}{value}{quote}"))
}

#[cfg(test)]
mod tests {
    use super::super::tests::err;
    use super::super::{Format, load_limits_file, parse_limits};
    use super::*;
    use crate::engine::cel::nesting;

    fn limit(
        ns: &str,
        name: &str,
        max: u64,
        seconds: u64,
        conditions: &[&str],
        variables: &[&str],
    ) -> LimitSpec {
        LimitSpec {
            domain: ns.into(),
            name: name.into(),
            scope: Scope::Request {
                conditions: conditions.iter().map(|s| s.to_string()).collect(),
                variables: variables.iter().map(|s| s.to_string()).collect(),
            },
            capacity: Capacity::Max(max),
            window: WindowSpec::FromFirstHit {
                duration_ms: seconds * 1_000,
            },
            shadow: false,
            ack: crate::engine::limits::Ack::Strict,
            replaces: vec![],
        }
    }

    #[test]
    fn example_file_parses_to_the_expected_limits() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/limitador/limits.yaml"
        );
        let set =
            load_limits_file(std::path::Path::new(path), None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            set.limits,
            vec![
                limit(
                    "ai-gateway",
                    "free-requests-per-minute",
                    5,
                    60,
                    &["descriptors[0]['tier'] == 'free'"],
                    &["descriptors[0]['api_key']"],
                ),
                limit(
                    "ai-gateway",
                    "premium-requests-per-minute",
                    20,
                    60,
                    &["descriptors[0]['tier'] == 'premium'"],
                    &["descriptors[0]['api_key']"],
                ),
                limit(
                    "ai-gateway",
                    "suspended",
                    0,
                    3_600,
                    &["descriptors[0]['tier'] == 'suspended'"],
                    &[],
                ),
                limit(
                    "toystore",
                    "",
                    2,
                    30,
                    &[
                        "descriptors[0]['req.method'] == 'GET'",
                        "descriptors[0]['req.path'] != '/health'"
                    ],
                    &["descriptors[0]['user_id']"],
                ),
            ]
        );
    }

    #[test]
    fn pre_cel_syntax_is_rewritten() {
        let text = "- namespace: n\n  max_value: 1\n  seconds: 1\n  conditions:\n    - \"req.method == 'GET'\"\n    - 'x-tier != \"free\"'\n    - \"descriptors[0].req.path == '/'\"\n    - \"descriptors[0]['a'] == 'b'\"\n  variables: [user_id, 'descriptors[1].x.y', \"descriptors[0]['k']\"]\n";
        let set = parse_limits(text, None, "l.yaml").unwrap();
        assert_eq!(
            set.limits[0].scope,
            Scope::Request {
                conditions: vec![
                    "descriptors[0]['req.method'] == 'GET'".into(),
                    "descriptors[0]['x-tier'] != \"free\"".into(),
                    "descriptors[0]['req.path'] == '/'".into(),
                    "descriptors[0]['a'] == 'b'".into(),
                ],
                variables: vec![
                    "descriptors[0]['user_id']".into(),
                    "descriptors[1]['x.y']".into(),
                    "descriptors[0]['k']".into(),
                ],
            }
        );
        assert_eq!(legacy_condition("true == 'x'"), None);
        assert_eq!(legacy_condition("a == b"), None);
        assert_eq!(legacy_condition("a == 'it\\'s'"), None);
        assert_eq!(legacy_variable("descriptors[0].user"), None);
        assert_eq!(legacy_variable("size(descriptors)"), None);
    }

    #[test]
    fn max_value_zero_and_empty_file() {
        let set = parse_limits(
            "- { namespace: n, max_value: 0, seconds: 5 }\n",
            None,
            "l.yaml",
        )
        .unwrap();
        assert_eq!(set.limits, vec![limit("n", "", 0, 5, &[], &[])]);
        let set = parse_limits("", Some(Format::Limitador), "l.yaml").unwrap();
        assert!(set.limits.is_empty());
        let set = parse_limits("[]", None, "l.yaml").unwrap();
        assert!(set.limits.is_empty());
    }

    #[test]
    fn validation_errors_name_line_and_field() {
        let head = "- namespace: a\n  max_value: 1\n  seconds: 1\n- namespace: n\n  max_value: 5\n";
        let cases: &[(&str, &str)] = &[
            ("  seconds: 0\n", "line 6: [1].seconds: must be at least 1"),
            (
                "  seconds: 316224001\n",
                "line 6: [1].seconds: 316224001 s is longer than the longest window allowed (316224000 s, ten years)",
            ),
            (
                "  seconds: 1\n  conditions: [\"descriptors[0]['a'] ==\"]\n",
                "line 7: [1].conditions[0]: invalid CEL: 1:23: Syntax error",
            ),
            (
                "  seconds: 1\n  conditions:\n    - \"descriptors[0]['a'] == 'b'\"\n    - \"((\"\n",
                "line 9: [1].conditions[1]: invalid CEL: ",
            ),
            (
                "  seconds: 1\n  variables: ['a b']\n",
                "line 7: [1].variables[0]: invalid CEL: ",
            ),
            (
                "  seconds: 1\n  conditions: [\"req.method == GET\"]\n",
                "line 7: [1].conditions[0]: refers to `GET`, `req` but never to `descriptors`",
            ),
            (
                "  seconds: 1\n  conditions: ['']\n",
                "line 7: [1].conditions[0]: must not be empty",
            ),
            (
                "  seconds: 1\n  name: ''\n  namespace2: x\n",
                "line 8: [1].namespace2: unknown field `namespace2`",
            ),
            ("  seconds: -1\n", "line 6: [1].seconds: "),
        ];
        for (tail, expected) in cases {
            let e = err(&format!("{head}{tail}"), None);
            let expected = format!("limits.yaml: {expected}");
            assert!(
                e.starts_with(&expected),
                "\n  got: {e}\n want: {expected}..."
            );
        }
        let e = err("- namespace: ''\n  max_value: 1\n  seconds: 1\n", None);
        assert_eq!(e, "limits.yaml: line 1: [0].namespace: must not be empty");
        let e = err("- namespace: a\n  seconds: 1\n", None);
        assert!(
            e.starts_with("limits.yaml: line 1: [0]: missing field `max_value`"),
            "{e}"
        );
        let e = err(
            "- { namespace: a, name: x, max_value: 1, seconds: 1 }\n- { namespace: a, name: x, max_value: 2, seconds: 60 }\n",
            None,
        );
        assert_eq!(
            e,
            "limits.yaml: line 2: [1].name: name \"x\" is already used by [0] (line 1) in domain \"a\""
        );
        let many: Vec<String> = (0..65)
            .map(|i| format!("\"descriptors[0]['k{i}']\""))
            .collect();
        let e = err(
            &format!(
                "- namespace: a\n  max_value: 1\n  seconds: 1\n  variables: [{}]\n",
                many.join(", ")
            ),
            None,
        );
        assert!(
            e.starts_with(
                "limits.yaml: line 4: [0].variables: 65 entries is more than the 64 allowed"
            ),
            "{e}"
        );
    }

    #[test]
    fn cel_nesting_is_bounded() {
        assert_eq!(nesting("descriptors[0]['a'] == 'b'"), 1);
        assert_eq!(
            nesting("size(descriptors.filter(d, d['x'] in ['a', 'b'])) > 0"),
            3
        );
        assert_eq!(
            nesting(r#"'(((' + "[[[" + '''{{{''' + 'it\'s (' + x[0]"#),
            1
        );
        assert_eq!(nesting("'unterminated ((("), 0);
        let ok = format!("{}1{}", "(".repeat(8), ")".repeat(8));
        parse_limits(
            &format!("- namespace: a\n  max_value: 1\n  seconds: 1\n  conditions: ['descriptors[0][\"a\"] == \"b\" && {ok} == 1']\n"),
            None,
            "l.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let deep = format!("{}1{}", "[".repeat(9), "]".repeat(9));
        let e = err(
            &format!("- namespace: a\n  max_value: 1\n  seconds: 1\n  variables: ['{deep}']\n"),
            None,
        );
        assert_eq!(
            e,
            "limits.yaml: line 4: [0].variables[0]: invalid CEL: brackets and operators nested 9 deep, more than the 8 allowed"
        );
    }

    #[test]
    fn deeply_nested_cel_is_an_error_not_a_crash() {
        let deep = format!("{}1{}", "(".repeat(500), ")".repeat(500));
        let e = err(
            &format!("- namespace: a\n  max_value: 1\n  seconds: 1\n  conditions: ['{deep}']\n"),
            None,
        );
        assert_eq!(
            e,
            "limits.yaml: line 4: [0].conditions[0]: invalid CEL: brackets and operators nested 500 deep, more than the 8 allowed"
        );
        // Ternaries nest too: refused by the same bound, with a bounded message.
        let e = parse_limits(
            &format!(
                "- namespace: a\n  max_value: 1\n  seconds: 1\n  conditions: ['{}true']\n",
                "a ? ".repeat(150)
            ),
            None,
            "l.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("l.yaml: line 4: [0].conditions[0]: invalid CEL: "),
            "{e}"
        );
        assert!(e.len() < 500, "{e}");
    }
}
