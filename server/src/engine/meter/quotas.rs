//! Quotas and budgets in force, their counters, reservations held on them, and alerts.
//!
//! A counter is named by `(quota id, values of the quota's per-dimensions)`. It holds the
//! window state of what was recorded (`None` for `Concurrent`, which has no window), what
//! open reservations hold on it, and which alerts already fired in this period.
//!
//! Architecture invariant: a counter's `reserved` is exactly the sum of the holds of the open
//! reservations on it (checked on restore); a counter with `reserved > 0` is never reclaimed.

use std::collections::HashMap;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use super::super::command::CommandError;
use super::super::limits::WindowSpec;
use super::super::usage::{
    Attribution, Dimension, Enforcement, MAX_DIMENSIONS, MAX_QUOTAS, MAX_THRESHOLDS, Metric,
    QuotaSet, QuotaSpec, QuotaStanding, Tokens, check_len,
};
use super::super::window::{CounterState, Window};
use super::Events;
use crate::engine::usage::EventKind;

/// Counter name: quota id and the values of its per-dimensions.
pub(crate) type CounterKey = (u32, Vec<String>);

/// Bit of `QuotaCounter::fired` that marks "over the limit" as announced.
const EXCEEDED_BIT: u16 = 1 << 15;
/// Counters examined for reclamation per applied batch, at least (and per command, on top).
const SWEEP_PER_BATCH: usize = 64;
const SWEEP_PER_COMMAND: usize = 4;
/// Counters examined at most in one sweep when the table is full.
const SWEEP_WHEN_FULL: usize = 4_096;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct QuotaCounter {
    pub state: Option<CounterState>,
    pub reserved: u64,
    /// Bit i: threshold i announced in this period; [`EXCEEDED_BIT`]: over-limit announced.
    pub fired: u16,
}

pub(crate) struct Quota {
    pub id: u32,
    pub spec: QuotaSpec,
    pub window: Option<Window>,
}

#[derive(Default)]
pub(crate) struct Quotas {
    pub list: Vec<Quota>,
    /// Quota id → index in `list`.
    pub by_id: HashMap<u32, usize>,
    pub next_id: u32,
    pub counters: IndexMap<CounterKey, QuotaCounter>,
    pub cursor: usize,
}

/// One quota a usage event touches: its index in the list and its counter's key.
pub(crate) struct Touch {
    pub index: usize,
    pub key: CounterKey,
}

fn counter_in<'a>(
    counters: &'a mut IndexMap<CounterKey, QuotaCounter>,
    quota: &mut Quota,
    key: &CounterKey,
    now_ms: i64,
) -> &'a mut QuotaCounter {
    let counter = counters.entry(key.clone()).or_insert_with(|| QuotaCounter {
        state: quota.window.as_mut().map(|w| w.fresh(now_ms)),
        reserved: 0,
        fired: 0,
    });
    if let (Some(w), Some(state)) = (quota.window.as_mut(), counter.state.as_mut()) {
        w.refresh(state, now_ms);
        // A new period (or a rolling window's slide) may have taken the level back below
        // alerts that fired: they fire again when it is next reached.
        let level = w.used(state);
        counter.fired &= armed_at(&quota.spec, level);
    }
    counter
}

/// The alert bits that stay set at `level`: thresholds at or below it, and over-limit if
/// it is over.
fn armed_at(spec: &QuotaSpec, level: u64) -> u16 {
    let limit = u128::from(spec.limit);
    let mut bits = 0;
    for (i, pct) in spec.thresholds_pct.iter().enumerate() {
        if u128::from(level) * 100 >= limit * u128::from(*pct) {
            bits |= 1 << i;
        }
    }
    if u128::from(level) > limit {
        bits |= EXCEEDED_BIT;
    }
    bits
}

/// How much of a quota's metric a request uses.
pub(crate) fn amount(metric: Metric, tokens: &Tokens, cost_nusd: u64) -> u64 {
    match metric {
        Metric::Requests | Metric::Concurrent => 1,
        Metric::TotalTokens => tokens.total(),
        Metric::InputTokens => tokens.input,
        Metric::OutputTokens => tokens.output,
        Metric::CostNusd => cost_nusd,
    }
}

/// Checks one quota and compiles its window.
pub(crate) fn compile(spec: &QuotaSpec, field: &str) -> Result<Option<Window>, CommandError> {
    let bad = |f: &str, reason: String| CommandError::invalid(format!("{field}.{f}"), reason);
    if spec.name.is_empty() {
        return Err(bad("name", "must not be empty".into()));
    }
    check_len(&format!("{field}.name"), &spec.name)?;
    for (f, v) in [
        ("match.subject", &spec.filter.subject),
        ("match.subscription", &spec.filter.subscription),
        ("match.model", &spec.filter.model),
    ] {
        if let Some(v) = v {
            check_len(&format!("{field}.{f}"), v)?;
        }
    }
    if let Some((k, v)) = &spec.filter.tag {
        check_len(&format!("{field}.match.tag"), k)?;
        check_len(&format!("{field}.match.tag"), v)?;
    }
    if spec.per.len() > MAX_DIMENSIONS {
        return Err(bad("per", format!("at most {MAX_DIMENSIONS} dimensions")));
    }
    for (i, d) in spec.per.iter().enumerate() {
        if let Dimension::Tag(k) = d {
            check_len(&format!("{field}.per[{i}]"), k)?;
        }
        if spec.per[..i].contains(d) {
            return Err(bad(&format!("per[{i}]"), format!("{} repeated", d.name())));
        }
    }
    if spec.limit == 0 {
        return Err(bad("limit", "must be at least 1".into()));
    }
    if spec.thresholds_pct.len() > MAX_THRESHOLDS {
        return Err(bad("thresholds", format!("at most {MAX_THRESHOLDS}")));
    }
    for (i, pct) in spec.thresholds_pct.iter().enumerate() {
        if !(1..=100).contains(pct) || (i > 0 && spec.thresholds_pct[i - 1] >= *pct) {
            return Err(bad(
                &format!("thresholds[{i}]"),
                "percentages must be 1..=100 and increasing".into(),
            ));
        }
    }
    match (&spec.window, spec.metric) {
        (None, Metric::Concurrent) => Ok(None),
        (Some(_), Metric::Concurrent) => Err(bad(
            "window",
            "a concurrent-request cap has no window".into(),
        )),
        (None, _) => Err(bad("window", "required for this metric".into())),
        (
            Some(
                w @ (WindowSpec::Fixed { .. }
                | WindowSpec::Calendar { .. }
                | WindowSpec::Rolling { .. }),
            ),
            _,
        ) => Window::compile(w, spec.limit, field).map(Some),
        (Some(_), _) => Err(bad(
            "window",
            "quotas take fixed, calendar or rolling windows".into(),
        )),
    }
}

/// Quotas keep their counters across a replacement when all of these are unchanged.
fn same_identity(a: &QuotaSpec, b: &QuotaSpec) -> bool {
    a.name == b.name
        && a.filter.same_scope(&b.filter)
        && a.per == b.per
        && a.metric == b.metric
        && a.window == b.window
}

impl Quotas {
    /// Replaces the quota set, all or nothing. Returns how many quotas kept their counters.
    pub fn replace(&mut self, set: &QuotaSet) -> Result<u64, CommandError> {
        if set.quotas.len() > MAX_QUOTAS {
            return Err(CommandError::invalid(
                "quotas",
                format!("{} quotas; at most {MAX_QUOTAS}", set.quotas.len()),
            ));
        }
        let mut compiled = Vec::with_capacity(set.quotas.len());
        for (i, spec) in set.quotas.iter().enumerate() {
            let field = format!("quotas[{i}]");
            if set.quotas[..i].iter().any(|q| q.name == spec.name) {
                return Err(CommandError::invalid(
                    format!("{field}.name"),
                    format!("{:?} is used by two quotas", spec.name),
                ));
            }
            compiled.push(compile(spec, &field)?);
        }
        let mut next_id = self.next_id;
        let mut kept = 0;
        let list: Vec<Quota> = set
            .quotas
            .iter()
            .zip(compiled)
            .map(|(spec, window)| {
                let old = self.list.iter().find(|q| same_identity(&q.spec, spec));
                let id = match old {
                    Some(q) => {
                        kept += 1;
                        q.id
                    }
                    None => {
                        next_id = next_id.checked_add(1).expect("fewer than 2^32 quotas ever");
                        next_id - 1
                    }
                };
                Quota {
                    id,
                    spec: spec.clone(),
                    window,
                }
            })
            .collect();
        self.next_id = next_id;
        self.set_list(list);
        Ok(kept)
    }

    pub fn set_list(&mut self, list: Vec<Quota>) {
        self.by_id = list.iter().enumerate().map(|(i, q)| (q.id, i)).collect();
        self.list = list;
    }

    /// The quotas `who` falls under, with their counter keys, in set order.
    pub fn touches(&self, who: &Attribution) -> Vec<Touch> {
        self.list
            .iter()
            .enumerate()
            .filter(|(_, q)| q.spec.filter.matches(who))
            .map(|(index, q)| Touch {
                index,
                key: (
                    q.id,
                    q.spec.per.iter().map(|d| who.value(d).to_owned()).collect(),
                ),
            })
            .collect()
    }

    /// Makes room for the touches' missing counters, or refuses (nothing changed).
    pub fn make_room(
        &mut self,
        touches: &[Touch],
        max: u64,
        now_ms: i64,
    ) -> Result<(), CommandError> {
        let new = touches
            .iter()
            .filter(|t| !self.counters.contains_key(&t.key))
            .count() as u64;
        if self.counters.len() as u64 + new <= max {
            return Ok(());
        }
        self.sweep(SWEEP_WHEN_FULL, now_ms);
        if self.counters.len() as u64 + new <= max {
            Ok(())
        } else {
            Err(CommandError::UsageTableFull {
                table: "quota counter table".into(),
                max,
            })
        }
    }

    /// The counter of `touch`, created fresh if missing, refreshed to `now_ms`.
    pub fn counter(&mut self, touch: &Touch, now_ms: i64) -> &mut QuotaCounter {
        counter_in(
            &mut self.counters,
            &mut self.list[touch.index],
            &touch.key,
            now_ms,
        )
    }

    /// Records `amount` on the touch's counter and announces what it crossed.
    pub fn debit(&mut self, touch: &Touch, amount: u64, now_ms: i64, events: &mut Events) {
        let quota = &mut self.list[touch.index];
        let counter = counter_in(&mut self.counters, quota, &touch.key, now_ms);
        if let (Some(w), Some(state)) = (quota.window.as_ref(), counter.state.as_mut()) {
            w.debit(state, now_ms, amount);
        }
        self.alert(touch, now_ms, events);
    }

    /// Fires the threshold and over-limit events the counter's level newly reached, and
    /// re-arms the ones it fell back below (a new period starts at 0). Level: recorded use,
    /// or reservations held for `Concurrent`.
    pub fn alert(&mut self, touch: &Touch, now_ms: i64, events: &mut Events) {
        let standing = self.standing(touch.index, &touch.key, now_ms);
        let quota = &self.list[touch.index];
        let counter = self
            .counters
            .get_mut(&touch.key)
            .expect("alert on a held counter");
        let level = match quota.spec.metric {
            Metric::Concurrent => standing.reserved,
            _ => standing.used,
        };
        let silent = quota.spec.enforcement == Enforcement::Shadow;
        let reached = armed_at(&quota.spec, level);
        let new = reached & !counter.fired;
        counter.fired = reached;
        if silent {
            return;
        }
        for (i, pct) in quota.spec.thresholds_pct.iter().enumerate() {
            if new & (1 << i) != 0 {
                let kind = EventKind::Threshold {
                    standing: standing.clone(),
                    pct: *pct,
                };
                events.push(now_ms, kind);
            }
        }
        if new & EXCEEDED_BIT != 0 {
            events.push(now_ms, EventKind::Exceeded { standing });
        }
    }

    /// A counter's standing as of `now_ms` (a missing counter: nothing used or held). Reads
    /// only: the state is refreshed on a copy.
    pub fn standing(&self, index: usize, key: &CounterKey, now_ms: i64) -> QuotaStanding {
        let quota = &self.list[index];
        let counter = self.counters.get(key);
        let reserved = counter.map_or(0, |c| c.reserved);
        let (used, reset_in_ms) = match quota.window.clone() {
            None => (0, 0),
            Some(mut w) => {
                let mut state = match counter.and_then(|c| c.state.clone()) {
                    Some(s) => s,
                    None => w.fresh(now_ms),
                };
                w.refresh(&mut state, now_ms);
                (w.used(&state), w.reset_in_ms(&state, now_ms))
            }
        };
        QuotaStanding {
            quota: quota.spec.name.clone(),
            key: key.1.clone(),
            metric: quota.spec.metric,
            enforcement: quota.spec.enforcement,
            limit: quota.spec.limit,
            used,
            reserved,
            remaining: quota
                .spec
                .limit
                .saturating_sub(used)
                .saturating_sub(reserved),
            reset_in_ms,
        }
    }

    /// Frees `amount` held on `key` by a reservation.
    pub fn unhold(&mut self, key: &CounterKey, amount: u64) {
        let counter = self
            .counters
            .get_mut(key)
            .expect("a counter with reservations held is never reclaimed");
        assert!(
            counter.reserved >= amount,
            "reservation holds exceed reserved"
        );
        counter.reserved -= amount;
    }

    /// The batch's reclamation step: `64 + 4 × commands` counters examined.
    pub fn sweep_batch(&mut self, commands: usize, now_ms: i64) {
        self.sweep(SWEEP_PER_BATCH + SWEEP_PER_COMMAND * commands, now_ms);
    }

    /// Drops counters that hold no reservation and decide as a missing one would: their
    /// quota is gone, or their window is idle and no alert of theirs is armed mid-period.
    fn sweep(&mut self, budget: usize, now_ms: i64) {
        for _ in 0..budget.min(self.counters.len()) {
            if self.cursor >= self.counters.len() {
                self.cursor = 0;
            }
            let (key, c) = self.counters.get_index(self.cursor).expect("cursor < len");
            let idle = c.reserved == 0
                && match self.by_id.get(&key.0) {
                    None => true,
                    Some(&i) => match (&self.list[i].window, &c.state) {
                        (Some(w), Some(s)) => w.is_idle(s, now_ms),
                        _ => true,
                    },
                };
            if idle {
                // The last counter moves into the cursor's place and is examined next.
                self.counters.swap_remove_index(self.cursor);
            } else {
                self.cursor += 1;
            }
        }
    }

    /// Standings of every quota that applies to `subject` in `subscription`: one per counter
    /// of it, and, for quotas counted only per subject/subscription with no counter yet, the
    /// standing the subject would start from.
    pub fn overview(&self, subject: &str, subscription: &str, now_ms: i64) -> Vec<QuotaStanding> {
        let applies = |q: &Quota| {
            q.spec
                .filter
                .subject
                .as_deref()
                .is_none_or(|s| s == subject)
                && q.spec
                    .filter
                    .subscription
                    .as_deref()
                    .is_none_or(|s| s == subscription)
        };
        let key_fits = |q: &Quota, key: &[String]| {
            q.spec.per.iter().zip(key).all(|(d, v)| match d {
                Dimension::Subject => v == subject,
                Dimension::Subscription => v == subscription,
                _ => true,
            })
        };
        let mut per_quota: Vec<Vec<QuotaStanding>> = vec![Vec::new(); self.list.len()];
        for key in self.counters.keys() {
            if let Some(&i) = self.by_id.get(&key.0)
                && applies(&self.list[i])
                && key_fits(&self.list[i], &key.1)
            {
                per_quota[i].push(self.standing(i, key, now_ms));
            }
        }
        for (i, q) in self.list.iter().enumerate() {
            let determined = q
                .spec
                .per
                .iter()
                .all(|d| matches!(d, Dimension::Subject | Dimension::Subscription));
            let unconditional = q.spec.filter.model.is_none() && q.spec.filter.tag.is_none();
            if per_quota[i].is_empty() && applies(q) && determined && unconditional {
                let who = Attribution {
                    subject: subject.into(),
                    subscription: subscription.into(),
                    ..Attribution::default()
                };
                let key = (
                    q.id,
                    q.spec.per.iter().map(|d| who.value(d).into()).collect(),
                );
                per_quota[i].push(self.standing(i, &key, now_ms));
            }
        }
        per_quota.into_iter().flatten().collect()
    }
}
