//! The limits in force, compiled: matchers, windows, ids, and the per-domain index.
//!
//! A limit's id names its counters. When a new limit set replaces the old one, a limit whose
//! identity (domain, scope and window) is unchanged keeps its id, and so its counters; a
//! changed capacity, name or shadow flag does not reset anything.

use std::collections::HashMap;
use std::sync::Arc;

use super::cel::{self, CelExpr};
use super::command::{CommandError, LimitInfo, MAX_DOMAIN_BYTES, MAX_KEY_BYTES};
use super::limits::{
    Capacity, DescriptorKey, EntryCondition, LimitSet, LimitSpec, MAX_CONDITION_VALUES,
    MAX_LIMIT_STRING_BYTES, MAX_LIMIT_TERMS, MAX_LIMITS, Scope, ValueMatch,
};
use super::window::Window;

/// A limit ready for use.
#[derive(Debug)]
pub struct Limit {
    pub id: u32,
    pub spec: LimitSpec,
    /// `None` for unlimited.
    pub capacity: Option<u64>,
    pub info: LimitInfo,
    pub window: Window,
    pub matcher: Matcher,
}

/// A compiled [`Scope`].
#[derive(Debug)]
pub enum Matcher {
    Descriptor {
        conditions: Vec<EntryCondition>,
        key: DescriptorKey,
    },
    Request {
        conditions: Vec<CelExpr>,
        variables: Vec<CelExpr>,
    },
}

/// Limit ids of one domain, in limit-set order.
#[derive(Debug, Default)]
pub struct DomainIndex {
    pub descriptor_limits: Vec<u32>,
    pub request_limits: Vec<u32>,
}

#[derive(Debug, Default)]
pub struct Registry {
    pub limits: HashMap<u32, Limit>,
    /// Ids in limit-set order.
    pub order: Vec<u32>,
    pub domains: HashMap<String, DomainIndex>,
    pub next_id: u32,
    /// Bumped every time a limit set is applied.
    pub generation: u64,
    /// Some limit in force is acknowledged `fast`.
    pub has_fast: bool,
}

/// The bytes that identify a limit across limit-set changes.
fn identity(spec: &LimitSpec) -> Vec<u8> {
    postcard::to_allocvec(&(&spec.domain, &spec.scope, &spec.window))
        .expect("limit specs always serialize")
}

impl Registry {
    /// Validates and compiles `set` in full, then swaps it in; on error nothing changes.
    /// Returns how many limits kept the counters of an identical predecessor.
    pub fn replace(&mut self, set: &LimitSet) -> Result<u64, CommandError> {
        if set.limits.len() > MAX_LIMITS {
            return Err(CommandError::invalid(
                "limits",
                format!("{} limits; at most {MAX_LIMITS}", set.limits.len()),
            ));
        }
        let mut by_identity: HashMap<Vec<u8>, u32> = self
            .order
            .iter()
            .map(|id| (identity(&self.limits[id].spec), *id))
            .collect();
        let mut next_id = self.next_id;
        let mut kept = 0;
        let mut compiled = Vec::with_capacity(set.limits.len());
        for (i, spec) in set.limits.iter().enumerate() {
            // An identity is claimed once: a duplicate in the new set gets fresh counters.
            let id = match by_identity.remove(&identity(spec)) {
                Some(id) => {
                    kept += 1;
                    id
                }
                None => {
                    let id = next_id;
                    next_id = next_id
                        .checked_add(1)
                        .filter(|n| *n < u32::MAX)
                        .ok_or_else(|| {
                            CommandError::invalid(
                                "limits",
                                "limit ids exhausted; restart from a snapshot",
                            )
                        })?;
                    id
                }
            };
            compiled.push(compile(id, spec.clone(), &format!("limits[{i}]"))?);
        }
        self.install(compiled, next_id);
        Ok(kept)
    }

    /// Rebuilds a registry from limits with known ids (snapshot restore).
    pub fn restore(limits: Vec<(u32, LimitSpec)>, next_id: u32) -> Result<Registry, CommandError> {
        let mut reg = Registry::default();
        let mut compiled = Vec::with_capacity(limits.len());
        let mut seen = std::collections::HashSet::with_capacity(limits.len());
        for (i, (id, spec)) in limits.into_iter().enumerate() {
            if !seen.insert(id) {
                return Err(CommandError::invalid(
                    format!("limits[{i}]"),
                    "duplicate id",
                ));
            }
            if id >= next_id {
                return Err(CommandError::invalid(
                    format!("limits[{i}]"),
                    "id beyond the next id",
                ));
            }
            compiled.push(compile(id, spec, &format!("limits[{i}]"))?);
        }
        reg.install(compiled, next_id);
        Ok(reg)
    }

    fn install(&mut self, compiled: Vec<Limit>, next_id: u32) {
        self.limits.clear();
        self.order.clear();
        self.domains.clear();
        for limit in compiled {
            let index = self.domains.entry(limit.spec.domain.clone()).or_default();
            match limit.matcher {
                Matcher::Descriptor { .. } => index.descriptor_limits.push(limit.id),
                Matcher::Request { .. } => index.request_limits.push(limit.id),
            }
            self.order.push(limit.id);
            let previous = self.limits.insert(limit.id, limit);
            assert!(previous.is_none(), "limit ids are unique within a set");
        }
        self.next_id = next_id;
        self.generation += 1;
        self.has_fast = self
            .limits
            .values()
            .any(|l| l.spec.ack == super::limits::Ack::Fast);
    }
}

/// Validates one limit spec against the stated bounds and compiles it.
fn compile(id: u32, spec: LimitSpec, field: &str) -> Result<Limit, CommandError> {
    let bad = |sub: &str, reason: String| CommandError::invalid(format!("{field}.{sub}"), reason);
    if spec.domain.is_empty() || spec.domain.len() > MAX_DOMAIN_BYTES {
        return Err(bad(
            "domain",
            format!("must be 1..={MAX_DOMAIN_BYTES} bytes"),
        ));
    }
    check_str(&spec.name, || format!("{field}.name"))?;
    if spec.replaces.len() > MAX_LIMIT_TERMS {
        return Err(bad("replaces", format!("at most {MAX_LIMIT_TERMS} names")));
    }
    for (i, name) in spec.replaces.iter().enumerate() {
        check_str(name, || format!("{field}.replaces[{i}]"))?;
    }
    let capacity = match spec.capacity {
        Capacity::Max(n) => Some(n),
        Capacity::Unlimited => None,
    };
    let window = Window::compile(&spec.window, capacity.unwrap_or(0), field)?;
    let matcher = compile_scope(&spec.scope, field)?;
    let info = LimitInfo {
        name: Arc::from(spec.name.as_str()),
        capacity: capacity.unwrap_or(0),
        unit: spec.window.unit(),
        window_s: spec.window.nominal_seconds(),
    };
    Ok(Limit {
        id,
        spec,
        capacity,
        info,
        window,
        matcher,
    })
}

fn compile_scope(scope: &Scope, field: &str) -> Result<Matcher, CommandError> {
    match scope {
        Scope::Descriptor { conditions, key } => {
            if conditions.len() > MAX_LIMIT_TERMS {
                return Err(CommandError::invalid(
                    format!("{field}.conditions"),
                    format!("at most {MAX_LIMIT_TERMS} conditions"),
                ));
            }
            for (i, c) in conditions.iter().enumerate() {
                check_condition(c, &format!("{field}.conditions[{i}]"))?;
            }
            if let DescriptorKey::Entries(keys) = key {
                if keys.len() > MAX_LIMIT_TERMS {
                    return Err(CommandError::invalid(
                        format!("{field}.variables"),
                        format!("at most {MAX_LIMIT_TERMS} variables"),
                    ));
                }
                for (i, k) in keys.iter().enumerate() {
                    check_key(k, &format!("{field}.variables[{i}]"))?;
                }
            }
            Ok(Matcher::Descriptor {
                conditions: conditions.clone(),
                key: key.clone(),
            })
        }
        Scope::Request {
            conditions,
            variables,
        } => Ok(Matcher::Request {
            conditions: compile_cel_list(conditions, &format!("{field}.conditions"))?,
            variables: compile_cel_list(variables, &format!("{field}.variables"))?,
        }),
    }
}

fn compile_cel_list(sources: &[String], field: &str) -> Result<Vec<CelExpr>, CommandError> {
    if sources.len() > MAX_LIMIT_TERMS {
        return Err(CommandError::invalid(
            field,
            format!("at most {MAX_LIMIT_TERMS} expressions"),
        ));
    }
    sources
        .iter()
        .enumerate()
        .map(|(i, src)| {
            check_str(src, || format!("{field}[{i}]"))?;
            cel::compile(src)
                .map_err(|e| CommandError::invalid(format!("{field}[{i}]"), format!("CEL: {e}")))
        })
        .collect()
}

fn check_condition(c: &EntryCondition, field: &str) -> Result<(), CommandError> {
    let strings: Vec<&String> = match c {
        EntryCondition::Equals { key, value } | EntryCondition::NotEquals { key, value } => {
            vec![key, value]
        }
        EntryCondition::In { key, values } => {
            if values.len() > MAX_LIMIT_TERMS {
                return Err(CommandError::invalid(
                    field,
                    format!("at most {MAX_LIMIT_TERMS} values"),
                ));
            }
            std::iter::once(key).chain(values).collect()
        }
        EntryCondition::Present { key } | EntryCondition::Absent { key } => vec![key],
        EntryCondition::EntryCount(_) => vec![],
        EntryCondition::Positional { key, value, .. } => {
            let mut v = vec![key];
            match value {
                ValueMatch::Exact(s) => v.push(s),
                ValueMatch::Prefix { prefix, except } => {
                    v.push(prefix);
                    v.extend(except);
                }
                ValueMatch::Any {
                    except,
                    except_prefixes,
                } => {
                    v.extend(except);
                    v.extend(except_prefixes);
                }
            }
            v
        }
    };
    if strings.len() > MAX_CONDITION_VALUES + 2 {
        return Err(CommandError::invalid(
            field,
            format!("more than {MAX_CONDITION_VALUES} values"),
        ));
    }
    strings
        .into_iter()
        .try_for_each(|s| check_str(s, || field.to_owned()))
}

fn check_key(key: &str, field: &str) -> Result<(), CommandError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(CommandError::invalid(
            field,
            format!("entry key must be 1..={MAX_KEY_BYTES} bytes"),
        ));
    }
    Ok(())
}

fn check_str(s: &str, field: impl FnOnce() -> String) -> Result<(), CommandError> {
    if s.len() > MAX_LIMIT_STRING_BYTES {
        return Err(CommandError::invalid(
            field(),
            format!("longer than {MAX_LIMIT_STRING_BYTES} bytes"),
        ));
    }
    Ok(())
}
