//! Descriptor templates: `kind=requests,tier=free,api_key={key}` → one descriptor's entries.
//!
//! Entries are separated by `,`, each `key=value` split at its first `=`. Keys and values may
//! hold the placeholders `{key}` (the key index drawn for this descriptor, in decimal) and
//! `{i}` (the descriptor's position in the request, from 0). `{{` and `}}` stand for literal
//! braces; any other brace is an error, so a typo never sends a literal `{kye}`.

use std::fmt::Write as _;

use tally_proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Lit(String),
    Key,
    Index,
}

/// A parsed descriptor template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    entries: Vec<(Vec<Seg>, Vec<Seg>)>,
}

impl Template {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Err("the descriptor template is empty".into());
        }
        let mut entries = Vec::new();
        for (n, entry) in text.split(',').enumerate() {
            let Some((key, value)) = entry.split_once('=') else {
                return Err(format!(
                    "descriptor template entry {n} `{entry}` has no `=` (want key=value)"
                ));
            };
            if key.is_empty() {
                return Err(format!(
                    "descriptor template entry {n} `{entry}` has an empty key"
                ));
            }
            entries.push((segments(key)?, segments(value)?));
        }
        Ok(Template { entries })
    }

    /// Whether `{key}` appears anywhere (without it, every request hits the same counter).
    pub fn uses_key(&self) -> bool {
        self.entries
            .iter()
            .any(|(k, v)| k.contains(&Seg::Key) || v.contains(&Seg::Key))
    }

    /// The entries of descriptor number `index` whose key index is `key`.
    pub fn render(&self, key: u64, index: usize) -> Vec<Entry> {
        self.entries
            .iter()
            .map(|(k, v)| Entry {
                key: expand(k, key, index),
                value: expand(v, key, index),
            })
            .collect()
    }
}

fn segments(text: &str) -> Result<Vec<Seg>, String> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if let Some(r) = rest.strip_prefix("{{") {
            lit.push('{');
            rest = r;
        } else if let Some(r) = rest.strip_prefix("}}") {
            lit.push('}');
            rest = r;
        } else if c == '{' {
            let Some(end) = rest.find('}') else {
                return Err(format!("unclosed `{{` in descriptor template `{text}`"));
            };
            let seg = match &rest[1..end] {
                "key" => Seg::Key,
                "i" => Seg::Index,
                other => {
                    return Err(format!(
                        "unknown placeholder `{{{other}}}` in descriptor template `{text}` \
                         (known: {{key}}, {{i}}; write {{{{ for a literal brace)"
                    ));
                }
            };
            if !lit.is_empty() {
                out.push(Seg::Lit(std::mem::take(&mut lit)));
            }
            out.push(seg);
            rest = &rest[end + 1..];
        } else if c == '}' {
            return Err(format!(
                "stray `}}` in descriptor template `{text}` (write }}}} for a literal brace)"
            ));
        } else {
            lit.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    if !lit.is_empty() {
        out.push(Seg::Lit(lit));
    }
    Ok(out)
}

fn expand(segs: &[Seg], key: u64, index: usize) -> String {
    let mut s = String::new();
    for seg in segs {
        match seg {
            Seg::Lit(l) => s.push_str(l),
            Seg::Key => {
                let _ = write!(s, "{key}");
            }
            Seg::Index => {
                let _ = write!(s, "{index}");
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(t: &Template, key: u64, index: usize) -> Vec<(String, String)> {
        t.render(key, index)
            .into_iter()
            .map(|e| (e.key, e.value))
            .collect()
    }

    #[test]
    fn expands_key_and_index() {
        let t = Template::parse("kind=requests,tier=free,api_key={key}").unwrap();
        assert!(t.uses_key());
        assert_eq!(
            pairs(&t, 42, 0),
            [
                ("kind".into(), "requests".into()),
                ("tier".into(), "free".into()),
                ("api_key".into(), "42".into())
            ]
        );
        let t = Template::parse("d{i}=user-{key}-x,model=gpt").unwrap();
        assert_eq!(
            pairs(&t, 7, 3),
            [
                ("d3".into(), "user-7-x".into()),
                ("model".into(), "gpt".into())
            ]
        );
    }

    #[test]
    fn value_may_hold_equals_and_braces_escape() {
        let t = Template::parse("q=a=b,j={{x}}{key}").unwrap();
        assert!(t.uses_key());
        assert_eq!(
            pairs(&t, 1, 0),
            [("q".into(), "a=b".into()), ("j".into(), "{x}1".into())]
        );
        let fixed = Template::parse("kind=requests,empty=").unwrap();
        assert!(!fixed.uses_key());
        assert_eq!(pairs(&fixed, 9, 0)[1], ("empty".into(), String::new()));
    }

    #[test]
    fn refuses_malformed_templates() {
        for (bad, why) in [
            ("", "empty"),
            ("kind", "no `=`"),
            ("=v", "empty key"),
            ("a=b,", "no `=`"),
            ("k={kye}", "unknown placeholder `{kye}`"),
            ("k={key", "unclosed"),
            ("k=}", "stray"),
        ] {
            let err = Template::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }
}
