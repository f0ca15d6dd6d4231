//! The rate-limit decision: match every descriptor against every limit, check every matched
//! counter, then debit all of them or none.
//!
//! Architecture invariant: a request in `Enforce` mode either debits every counter it matched
//! by its hits, or debits nothing. Hits of several descriptors on one counter add up before
//! the check, so one request can never overrun a counter by splitting its hits.

use std::ops::Range;
use std::sync::Arc;

use super::cel;
use super::command::{
    Code, CommandError, Decision, Descriptor, DescriptorStatus, LimitInfo, LimitOverride, Mode,
    RateLimitCommand,
};
use super::counters::{self, Counters, OVERRIDE_LIMIT_ID, SWEEP_WHEN_FULL};
use super::limits::{Ack, DescriptorKey, EntryCondition, ValueMatch};
use super::registry::{Limit, Matcher, Registry};
use super::window::{CounterState, Window};

/// Longest counter-key part a CEL variable may produce; a longer value means the limit does
/// not apply (as when the variable does not evaluate).
const MAX_CEL_PART_BYTES: usize = 4 * 1024;

/// Which limit a charge is against.
#[derive(Clone, Copy, Debug)]
enum LimitRef {
    Configured(u32),
    Override(LimitOverride),
}

/// One matched (descriptor, limit) pair and the hits it asks for.
struct Charge {
    descriptor: usize,
    counter: usize,
}

/// One distinct counter touched by the request.
struct Touched {
    key: Range<usize>,
    limit: LimitRef,
    hits: u64,
    /// Some charge is check-only: the counter must have at least one hit left.
    check_only: bool,
    remaining: u64,
    pass: bool,
    reset_in_ms: u64,
}

/// Scratch space reused across requests, so a decision allocates little.
#[derive(Default)]
pub struct Scratch {
    keys: Vec<u8>,
    key: Vec<u8>,
    charges: Vec<Charge>,
    touched: Vec<Touched>,
}

/// What the decision needs from the engine.
pub struct Ctx<'a> {
    pub registry: &'a mut Registry,
    pub counters: &'a mut Counters,
    pub max_counters: u64,
    pub scratch: &'a mut Scratch,
    pub empty_name: &'a Arc<str>,
}

pub fn decide(ctx: Ctx<'_>, cmd: &RateLimitCommand, now_ms: i64) -> Result<Decision, CommandError> {
    cmd.validate()?;
    let Ctx {
        registry,
        counters,
        max_counters,
        scratch,
        empty_name,
    } = ctx;
    scratch.keys.clear();
    scratch.charges.clear();
    scratch.touched.clear();
    collect_charges(registry, cmd, scratch);
    drop_replaced(registry, scratch);
    evaluate(registry, counters, scratch, cmd.mode, now_ms);

    let blocking = |t: &Touched| !t.pass && !is_shadow(registry, t.limit);
    let admitted = !scratch.touched.iter().any(blocking);
    let debit = match cmd.mode {
        Mode::Enforce => admitted,
        Mode::CheckOnly => false,
        Mode::Report => true,
    };
    if debit {
        make_room(registry, counters, scratch, max_counters, now_ms)?;
        apply_debits(registry, counters, scratch, now_ms);
    }
    let code = match cmd.mode {
        Mode::Report => report_code(registry, counters, scratch, now_ms),
        _ if admitted => Code::Ok,
        _ => Code::OverLimit,
    };
    let mut shadow_exceeded: Vec<Arc<str>> = Vec::new();
    for t in scratch
        .touched
        .iter()
        .filter(|t| !t.pass && is_shadow(registry, t.limit))
    {
        let name = info_of(registry, t.limit, empty_name).name;
        if !shadow_exceeded.contains(&name) {
            shadow_exceeded.push(name);
        }
    }
    let fast = scratch.touched.iter().all(|t| is_fast(registry, t.limit));
    Ok(Decision {
        code,
        statuses: statuses(registry, scratch, cmd.descriptors.len(), empty_name),
        shadow_exceeded,
        fast,
    })
}

/// Finds every (descriptor, limit) match and records its counter key and hits.
fn collect_charges(registry: &Registry, cmd: &RateLimitCommand, s: &mut Scratch) {
    let Some(index) = registry.domains.get(&cmd.domain) else {
        // Overrides apply even in a domain without configured limits.
        for (i, d) in cmd.descriptors.iter().enumerate() {
            if let Some(o) = d.limit_override {
                override_key(&cmd.domain, d, o, &mut s.key);
                add_charge(s, i, LimitRef::Override(o), hits_of(cmd, d));
            }
        }
        return;
    };
    for (i, d) in cmd.descriptors.iter().enumerate() {
        let hits = hits_of(cmd, d);
        if let Some(o) = d.limit_override {
            override_key(&cmd.domain, d, o, &mut s.key);
            add_charge(s, i, LimitRef::Override(o), hits);
            continue;
        }
        for id in &index.descriptor_limits {
            let limit = &registry.limits[id];
            if descriptor_key(limit, d, &mut s.key) {
                add_charge(s, i, LimitRef::Configured(*id), hits);
            }
        }
    }
    if !index.request_limits.is_empty() {
        let cel_ctx = cel::request_context(&cmd.descriptors);
        let hits = request_hits(cmd);
        for id in &index.request_limits {
            let limit = &registry.limits[id];
            if request_key(limit, &cel_ctx, &mut s.key) {
                add_charge(s, 0, LimitRef::Configured(*id), hits);
            }
        }
    }
}

/// A descriptor's effective hits: its own when present (0 = check only), else the request's.
fn hits_of(cmd: &RateLimitCommand, d: &Descriptor) -> u64 {
    d.hits.unwrap_or(cmd.hits)
}

/// Hits for request-scoped (Limitador) limits: the request's, or the only descriptor's own.
fn request_hits(cmd: &RateLimitCommand) -> u64 {
    match cmd.descriptors.as_slice() {
        [only] => hits_of(cmd, only),
        _ => cmd.hits,
    }
}

/// Records a charge for the key in `s.key`, merging it into an already touched counter.
fn add_charge(s: &mut Scratch, descriptor: usize, limit: LimitRef, hits: u64) {
    let found = s
        .touched
        .iter()
        .position(|t| s.keys[t.key.clone()] == s.key[..]);
    let counter = match found {
        Some(c) => c,
        None => {
            let start = s.keys.len();
            s.keys.extend_from_slice(&s.key);
            s.touched.push(Touched {
                key: start..s.keys.len(),
                limit,
                hits: 0,
                check_only: false,
                remaining: 0,
                pass: true,
                reset_in_ms: 0,
            });
            s.touched.len() - 1
        }
    };
    let t = &mut s.touched[counter];
    t.hits = t.hits.saturating_add(hits);
    t.check_only |= hits == 0;
    s.charges.push(Charge {
        descriptor,
        counter,
    });
}

/// envoyproxy/ratelimit's `replaces`: a matched limit removes the matched limits it names,
/// across all descriptors of the request.
fn drop_replaced(registry: &Registry, s: &mut Scratch) {
    let replaced: Vec<&str> = s
        .touched
        .iter()
        .filter_map(|t| match t.limit {
            LimitRef::Configured(id) => Some(&registry.limits[&id].spec.replaces),
            LimitRef::Override(_) => None,
        })
        .flatten()
        .map(String::as_str)
        .collect();
    if replaced.is_empty() {
        return;
    }
    let gone = |t: &Touched| match t.limit {
        LimitRef::Configured(id) => {
            let name = registry.limits[&id].spec.name.as_str();
            !name.is_empty() && replaced.contains(&name)
        }
        LimitRef::Override(_) => false,
    };
    let keep: Vec<bool> = s.touched.iter().map(|t| !gone(t)).collect();
    let mut new_index = Vec::with_capacity(keep.len());
    let mut next = 0;
    for k in &keep {
        new_index.push(next);
        next += usize::from(*k);
    }
    s.charges.retain(|c| keep[c.counter]);
    for c in &mut s.charges {
        c.counter = new_index[c.counter];
    }
    let mut i = 0;
    s.touched.retain(|_| {
        i += 1;
        keep[i - 1]
    });
}

/// Checks every touched counter against its limit, without changing any count.
fn evaluate(
    registry: &mut Registry,
    counters: &mut Counters,
    s: &mut Scratch,
    mode: Mode,
    now_ms: i64,
) {
    for t in &mut s.touched {
        let key = &s.keys[t.key.clone()];
        let Some((mut window, capacity)) = window_of(registry, t.limit) else {
            // Unlimited: always passes, keeps no counter.
            t.remaining = u64::MAX;
            continue;
        };
        let fresh;
        let state = match counters.get_mut(key) {
            Some(state) => {
                window.refresh(state, now_ms);
                &*state
            }
            None => {
                fresh = window.fresh(now_ms);
                &fresh
            }
        };
        t.remaining = window.remaining(state, capacity);
        t.reset_in_ms = window.reset_in_ms(state, now_ms);
        let need = if t.check_only { t.hits.max(1) } else { t.hits };
        t.pass = mode == Mode::Report || t.remaining >= need;
    }
}

/// Ensures every counter about to be created fits under the table bound, reclaiming idle
/// counters if needed; refuses the whole request otherwise (nothing has been debited yet).
fn make_room(
    registry: &mut Registry,
    counters: &mut Counters,
    s: &Scratch,
    max_counters: u64,
    now_ms: i64,
) -> Result<(), CommandError> {
    let new = s
        .touched
        .iter()
        .filter(|t| t.hits > 0 && !counters.contains(&s.keys[t.key.clone()]))
        .filter(|t| window_of(registry, t.limit).is_some())
        .count() as u64;
    if counters.len() as u64 + new <= max_counters {
        return Ok(());
    }
    counters.sweep(SWEEP_WHEN_FULL, |key, state| {
        reclaimable(registry, key, state, now_ms)
    });
    if counters.len() as u64 + new <= max_counters {
        Ok(())
    } else {
        Err(CommandError::CounterTableFull { max: max_counters })
    }
}

/// True when a counter may be dropped: its limit is gone, or it is idle.
pub fn reclaimable(registry: &Registry, key: &[u8], state: &CounterState, now_ms: i64) -> bool {
    match counters::limit_id_of(key) {
        OVERRIDE_LIMIT_ID => match state {
            CounterState::Window { used, end_ms } => *used == 0 || now_ms >= *end_ms,
            _ => true,
        },
        id => registry
            .limits
            .get(&id)
            .is_none_or(|l| l.capacity.is_none() || l.window.is_idle(state, now_ms)),
    }
}

fn apply_debits(registry: &mut Registry, counters: &mut Counters, s: &mut Scratch, now_ms: i64) {
    for t in &mut s.touched {
        let key = &s.keys[t.key.clone()];
        let Some((mut window, capacity)) = window_of(registry, t.limit) else {
            continue;
        };
        if t.hits == 0 {
            continue;
        }
        if !counters.contains(key) {
            let fresh = window.fresh(now_ms);
            counters.insert(key, fresh);
        }
        let state = counters.get_mut(key).expect("inserted above");
        window.debit(state, now_ms, t.hits);
        t.remaining = window.remaining(state, capacity);
        t.reset_in_ms = window.reset_in_ms(state, now_ms);
    }
}

/// Report's code: over limit when a non-shadow counter now holds more than its capacity.
fn report_code(registry: &mut Registry, counters: &Counters, s: &Scratch, _now_ms: i64) -> Code {
    let over = s.touched.iter().any(|t| {
        if is_shadow(registry, t.limit) {
            return false;
        }
        let key = &s.keys[t.key.clone()];
        match (window_of(registry, t.limit), counters.get(key)) {
            (Some((window, capacity)), Some(state)) => window.overshot(state, capacity),
            _ => false,
        }
    });
    if over { Code::OverLimit } else { Code::Ok }
}

/// One status per descriptor: its blocking limit if any, else its least remaining one.
fn statuses(
    registry: &Registry,
    s: &Scratch,
    descriptors: usize,
    empty_name: &Arc<str>,
) -> Vec<DescriptorStatus> {
    let mut out: Vec<DescriptorStatus> = (0..descriptors)
        .map(|_| DescriptorStatus {
            code: Code::Ok,
            current_limit: None,
            remaining: 0,
            reset_in_ms: 0,
        })
        .collect();
    // Rank: blocking first, then least remaining; unlimited ranks last.
    let mut best: Vec<Option<(bool, u64, usize)>> = vec![None; descriptors];
    for c in &s.charges {
        let t = &s.touched[c.counter];
        let blocking = !t.pass && !is_shadow(registry, t.limit);
        let rank = (blocking, t.remaining, c.counter);
        let better = match best[c.descriptor] {
            None => true,
            Some((b, r, _)) => (blocking && !b) || (blocking == b && t.remaining < r),
        };
        if better {
            best[c.descriptor] = Some(rank);
        }
    }
    for (status, rank) in out.iter_mut().zip(best) {
        let Some((blocking, _, counter)) = rank else {
            continue;
        };
        let t = &s.touched[counter];
        status.code = if blocking { Code::OverLimit } else { Code::Ok };
        status.remaining = t.remaining;
        status.reset_in_ms = t.reset_in_ms;
        if is_limited(registry, t.limit) {
            status.current_limit = Some(info_of(registry, t.limit, empty_name));
        }
    }
    out
}

fn is_shadow(registry: &Registry, limit: LimitRef) -> bool {
    match limit {
        LimitRef::Configured(id) => registry.limits[&id].spec.shadow,
        LimitRef::Override(_) => false,
    }
}

/// Overrides come from the request, not a limit file: they are strict.
fn is_fast(registry: &Registry, limit: LimitRef) -> bool {
    match limit {
        LimitRef::Configured(id) => registry.limits[&id].spec.ack == Ack::Fast,
        LimitRef::Override(_) => false,
    }
}

fn is_limited(registry: &Registry, limit: LimitRef) -> bool {
    match limit {
        LimitRef::Configured(id) => registry.limits[&id].capacity.is_some(),
        LimitRef::Override(_) => true,
    }
}

fn info_of(registry: &Registry, limit: LimitRef, empty_name: &Arc<str>) -> LimitInfo {
    match limit {
        LimitRef::Configured(id) => registry.limits[&id].info.clone(),
        LimitRef::Override(o) => LimitInfo {
            name: empty_name.clone(),
            capacity: o.requests_per_unit,
            unit: o.unit,
            window_s: override_window_s(o),
        },
    }
}

fn override_window_s(o: LimitOverride) -> u64 {
    use super::limits::Unit;
    match o.unit {
        Unit::Unknown => 0,
        Unit::Second => 1,
        Unit::Minute => 60,
        Unit::Hour => 3_600,
        Unit::Day => 86_400,
        Unit::Week => 604_800,
        Unit::Month => 30 * 86_400,
        Unit::Year => 365 * 86_400,
    }
}

/// The window and capacity of a limited counter; `None` for unlimited limits.
fn window_of(registry: &mut Registry, limit: LimitRef) -> Option<(WindowHandle<'_>, u64)> {
    match limit {
        LimitRef::Configured(id) => {
            let l: &mut Limit = registry.limits.get_mut(&id).expect("touched limits exist");
            let capacity = l.capacity?;
            Some((WindowHandle::Borrowed(&mut l.window), capacity))
        }
        LimitRef::Override(o) => Some((
            WindowHandle::Owned(Window::for_override(o.unit).expect("validated unit")),
            o.requests_per_unit,
        )),
    }
}

/// A configured limit's window, or a window made for an override.
enum WindowHandle<'a> {
    Borrowed(&'a mut Window),
    Owned(Window),
}

impl std::ops::Deref for WindowHandle<'_> {
    type Target = Window;
    fn deref(&self) -> &Window {
        match self {
            WindowHandle::Borrowed(w) => w,
            WindowHandle::Owned(w) => w,
        }
    }
}

impl std::ops::DerefMut for WindowHandle<'_> {
    fn deref_mut(&mut self) -> &mut Window {
        match self {
            WindowHandle::Borrowed(w) => w,
            WindowHandle::Owned(w) => w,
        }
    }
}

/// Builds the counter key of a descriptor-scoped limit into `key`, if the limit matches `d`.
fn descriptor_key(limit: &Limit, d: &Descriptor, key: &mut Vec<u8>) -> bool {
    let Matcher::Descriptor {
        conditions,
        key: by,
    } = &limit.matcher
    else {
        return false;
    };
    if !conditions.iter().all(|c| holds(c, &d.entries)) {
        return false;
    }
    counters::start_key(key, limit.id);
    match by {
        DescriptorKey::Entries(names) => {
            for name in names {
                match find(&d.entries, name) {
                    Some(v) => counters::push_part(key, v.as_bytes()),
                    None => return false,
                }
            }
        }
        DescriptorKey::AllEntries => {
            for (k, v) in &d.entries {
                counters::push_part(key, k.as_bytes());
                counters::push_part(key, v.as_bytes());
            }
        }
    }
    true
}

/// Builds the counter key of a request-scoped (CEL) limit into `key`, if the limit applies.
fn request_key(limit: &Limit, ctx: &::cel::Context<'_, '_>, key: &mut Vec<u8>) -> bool {
    let Matcher::Request {
        conditions,
        variables,
    } = &limit.matcher
    else {
        return false;
    };
    if !conditions.iter().all(|c| c.holds(ctx)) {
        return false;
    }
    counters::start_key(key, limit.id);
    for v in variables {
        match v.value(ctx) {
            Some(part) if part.len() <= MAX_CEL_PART_BYTES => {
                counters::push_part(key, part.as_bytes())
            }
            _ => return false,
        }
    }
    true
}

/// The key of a descriptor's override counter: unit, size, domain and the whole descriptor.
fn override_key(domain: &str, d: &Descriptor, o: LimitOverride, key: &mut Vec<u8>) {
    counters::start_key(key, OVERRIDE_LIMIT_ID);
    counters::push_part(key, &[o.unit as u8]);
    counters::push_part(key, &o.requests_per_unit.to_le_bytes());
    counters::push_part(key, domain.as_bytes());
    for (k, v) in &d.entries {
        counters::push_part(key, k.as_bytes());
        counters::push_part(key, v.as_bytes());
    }
}

fn find<'a>(entries: &'a [(String, String)], key: &str) -> Option<&'a String> {
    entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

fn holds(c: &EntryCondition, entries: &[(String, String)]) -> bool {
    match c {
        EntryCondition::Equals { key, value } => find(entries, key) == Some(value),
        EntryCondition::NotEquals { key, value } => find(entries, key) != Some(value),
        EntryCondition::In { key, values } => {
            find(entries, key).is_some_and(|v| values.contains(v))
        }
        EntryCondition::Present { key } => find(entries, key).is_some(),
        EntryCondition::Absent { key } => find(entries, key).is_none(),
        EntryCondition::EntryCount(n) => entries.len() == *n as usize,
        EntryCondition::Positional { index, key, value } => entries
            .get(*index as usize)
            .is_some_and(|(k, v)| k == key && value_matches(value, v)),
    }
}

fn value_matches(m: &ValueMatch, v: &str) -> bool {
    match m {
        ValueMatch::Exact(x) => v == x,
        ValueMatch::Prefix { prefix, except } => {
            v.starts_with(prefix.as_str()) && !except.iter().any(|e| e == v)
        }
        ValueMatch::Any {
            except,
            except_prefixes,
        } => {
            !except.iter().any(|e| e == v)
                && !except_prefixes.iter().any(|p| v.starts_with(p.as_str()))
        }
    }
}
