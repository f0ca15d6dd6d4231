//! **Promise: admitted reservations never exceed a hard quota** (ARCHITECTURE.md, metering:
//! "a reservation is admitted only if `recorded + held + estimate ≤ limit` on every hard quota
//! it falls under, and then holds its estimate on every quota until it is committed, released,
//! or expires"; a commit records its actual usage even beyond the estimate).
//!
//! Checked exactly, against an independent model of the quotas run over the committed log
//! (replayed; every command at the time the engine applied it, `t`). For a quota `q` (hard,
//! `TotalTokens`, fixed window of `d` ms aligned to the epoch, limit `L`) and its counter:
//!
//! - `used(t)` = the total tokens (input + output) of the usage records under that counter
//!   with `at_ms` in the window holding `t`, i.e. `[⌊t/d⌋·d, +d)` — the ledger's records, by
//!   the seq each `Recorded` answer names;
//! - `held(t)` = the sum of the estimates (total tokens) of the reservations admitted under it
//!   (answered `Reserved`, not duplicate) that are still open at `t`: not settled by a
//!   `Recorded` answer under their id, not released (`Released { found: true }`), and not
//!   expired (a reservation expires at the first batch part whose time reaches its
//!   `expires_ms`, before that part's commands).
//!
//! Then, for every Reserve in the log with estimate `e`:
//! - answered `Reserved`: `used + held + e ≤ L` on every hard quota it falls under, its expiry
//!   is `t + ttl`, and the standings it reports are the model's (`used`, `held + e`, `L`);
//! - answered `Denied`: the quota it names is the first hard one (in set order) where
//!   `used + held + e > L`, with the model's `used` and `held`.
//!
//! Both directions are held, so the model cannot silently drift from the engine (a drift
//! shows up as a violation either way), and admissions are checked one by one, never
//! vacuously: with reserves answered at all, some must have been checked. The engine's other
//! answers agree with the model too: a `Recorded` answer settles `Reservation` exactly when
//! the model holds that id open (then its overshoot is `max(0, actual − estimate)`),
//! `Lapsed` when the id was denied, released or expired before, `NoReservation` when new; a
//! `Release` finds a reservation exactly when one is open; a retried Reserve is answered the
//! id's standing answer. And at the end, on every live replica that applied the whole log, each
//! modelled counter's standing (`Engine::usage_overview`) shows the model's `used` and `held`.
//!
//! Quotas of another shape (other metrics, windows or filters) are not modelled: while one is
//! in force the checks are skipped, and counted (`unmodelled`); the workload installs none.

use std::collections::{BTreeMap, BTreeSet};

use tally_server::engine::limits::WindowSpec;
use tally_server::engine::usage::{
    Dimension, Enforcement, Metric, QuotaSet, QuotaSpec, QuotaStanding, Settled, UsageRecord,
    UsageResult,
};
use tally_server::engine::{Command, Outcome};

use crate::history::{CallResult, Evidence, Violation};
use crate::invariants::UsageCoverage;
use crate::invariants::counting::window_start;
use crate::invariants::usage_log::UsageLog;

pub const NAME: &str = "reservation_budget";

const MAX_REPORTS: usize = 8;

/// A modelled quota.
#[derive(Clone, Debug)]
struct Quota {
    spec: QuotaSpec,
    window_ms: u64,
    /// One counter per subject (`per: [Subject]`), else one in all.
    per_subject: bool,
}

impl Quota {
    fn of(spec: &QuotaSpec) -> Option<Quota> {
        let f = &spec.filter;
        let window_ms = match spec.window {
            Some(WindowSpec::Fixed { duration_ms }) => duration_ms,
            _ => return None,
        };
        let per_subject = match spec.per.as_slice() {
            [] => false,
            [Dimension::Subject] => true,
            _ => return None,
        };
        (spec.metric == Metric::TotalTokens
            && f.subscription.is_none()
            && f.model.is_none()
            && f.tag.is_none())
        .then(|| Quota {
            spec: spec.clone(),
            window_ms,
            per_subject,
        })
    }

    /// This quota's counter key for `subject`, if the quota applies to it.
    fn key(&self, subject: &str) -> Option<Vec<String>> {
        if self
            .spec
            .filter
            .subject
            .as_deref()
            .is_some_and(|s| s != subject)
        {
            return None;
        }
        Some(if self.per_subject {
            vec![subject.to_owned()]
        } else {
            Vec::new()
        })
    }
}

fn same_identity(a: &QuotaSpec, b: &QuotaSpec) -> bool {
    a.name == b.name
        && a.filter == b.filter
        && a.per == b.per
        && a.metric == b.metric
        && a.window == b.window
}

/// (quota name, counter key).
type CounterId = (String, Vec<String>);

#[derive(Default, Clone, Debug)]
struct Counter {
    window: i64,
    used: u64,
    held: u64,
}

struct Open {
    /// Charged its estimate, as usage, if it expires unsettled.
    charge: bool,
    estimate: u64,
    expires_ms: i64,
    expiry_seq: u64,
    holds: Vec<CounterId>,
}

#[derive(Default)]
struct Model {
    quotas: Vec<Quota>,
    /// A quota in force is not of a modelled shape.
    unmodelled: bool,
    counters: BTreeMap<CounterId, Counter>,
    open: BTreeMap<String, Open>,
    expiry: BTreeMap<(i64, u64), String>,
    next_expiry: u64,
    /// What a retried Reserve under a known id is answered: its reservation's answer while
    /// open, else what closed it.
    answer: BTreeMap<String, Answer>,
}

/// A request id's standing answer.
#[derive(Clone, Debug, PartialEq)]
enum Answer {
    Is(UsageResult),
    /// The record its reservation was charged when it expired (an answer no command got).
    ChargedAt(u64),
}

impl Answer {
    fn matches(&self, r: &UsageResult) -> bool {
        match (self, r) {
            (Answer::Is(a), r) => a == r,
            (
                Answer::ChargedAt(seq),
                UsageResult::Recorded {
                    seq: s,
                    settled: Settled::Expired,
                    ..
                },
            ) => s == seq,
            _ => false,
        }
    }
}

impl Model {
    fn used(&self, id: &CounterId, window_ms: u64, t: i64) -> u64 {
        self.counters
            .get(id)
            .filter(|c| c.window == window_start(t, window_ms))
            .map_or(0, |c| c.used)
    }

    fn held(&self, id: &CounterId) -> u64 {
        self.counters.get(id).map_or(0, |c| c.held)
    }

    /// The quotas `subject` falls under, in set order, with their counters.
    fn touches(&self, subject: &str) -> Vec<(Quota, CounterId)> {
        self.quotas
            .iter()
            .filter_map(|q| {
                q.key(subject)
                    .map(|k| (q.clone(), (q.spec.name.clone(), k)))
            })
            .collect()
    }

    fn replace(&mut self, set: &QuotaSet) {
        let quotas: Option<Vec<Quota>> = set.quotas.iter().map(Quota::of).collect();
        let Some(quotas) = quotas else {
            self.unmodelled = true;
            self.quotas.clear();
            return;
        };
        let kept: BTreeSet<String> = quotas
            .iter()
            .filter(|q| {
                self.quotas
                    .iter()
                    .any(|old| same_identity(&old.spec, &q.spec))
            })
            .map(|q| q.spec.name.clone())
            .collect();
        // Counters of quotas that keep their identity carry over; the others go (a dropped
        // quota still holding reservations is beyond the model).
        if self
            .counters
            .iter()
            .any(|((name, _), c)| !kept.contains(name) && c.held > 0)
        {
            self.unmodelled = true;
            self.quotas.clear();
            return;
        }
        self.counters.retain(|(name, _), _| kept.contains(name));
        self.quotas = quotas;
        self.unmodelled = false;
    }

    fn unhold(&mut self, holds: &[CounterId], n: u64) {
        for h in holds {
            if let Some(c) = self.counters.get_mut(h) {
                c.held = c.held.saturating_sub(n);
            }
        }
    }

    /// Records usage at `at_ms` under the quotas `subject` falls under.
    fn debit(&mut self, subject: &str, total: u64, at_ms: i64) {
        if self.unmodelled {
            return;
        }
        for (q, c) in self.touches(subject) {
            let w = window_start(at_ms, q.window_ms);
            let counter = self.counters.entry(c).or_default();
            if counter.window != w {
                counter.window = w;
                counter.used = 0;
            }
            counter.used = counter.used.saturating_add(total);
        }
    }

    /// Reservations whose expiry is at or before `t` release themselves, or are charged
    /// their estimate (the log's record under their id, made when the first batch part at or
    /// past the expiry began: at or before `t`). Returns what disagreed.
    fn expire(
        &mut self,
        t: i64,
        records: &BTreeMap<&str, &UsageRecord>,
        cov: &mut UsageCoverage,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        while let Some(e) = self.expiry.first_entry() {
            if e.key().0 > t {
                break;
            }
            let id = e.remove();
            let open = self
                .open
                .remove(&id)
                .expect("expiry of an open reservation");
            self.unhold(&open.holds, open.estimate);
            cov.expired += 1;
            let charged = records.get(id.as_str());
            match (open.charge, charged) {
                (false, _) => {
                    self.answer
                        .insert(id, Answer::Is(UsageResult::Released { found: true }));
                }
                (true, Some(r))
                    if r.tokens.total() == open.estimate
                        && open.expires_ms <= r.at_ms
                        && r.at_ms <= t =>
                {
                    cov.charged += 1;
                    self.debit(&r.who.subject, open.estimate, r.at_ms);
                    self.answer.insert(id, Answer::ChargedAt(r.seq));
                }
                (true, r) => {
                    problems.push(format!(
                        "reservation {id} (estimate {}, expiring at {}) was to be charged on expiry, by t={t}; its record is {r:?}",
                        open.estimate, open.expires_ms
                    ));
                    self.answer
                        .insert(id, Answer::Is(UsageResult::Released { found: true }));
                }
            }
        }
        problems
    }

    fn close(&mut self, id: &str) -> Option<Open> {
        let open = self.open.remove(id)?;
        self.expiry.remove(&(open.expires_ms, open.expiry_seq));
        self.unhold(&open.holds, open.estimate);
        Some(open)
    }
}

/// A standing reported by the engine against the model's numbers.
fn standing_agrees(s: &QuotaStanding, used: u64, held: u64, limit: u64) -> bool {
    s.used == used && s.reserved == held && s.limit == limit
}

pub fn check(ev: &Evidence, log: &UsageLog, cov: &mut UsageCoverage) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut reported = 0usize;
    let mut push = |message: String| {
        reported += 1;
        if reported <= MAX_REPORTS {
            out.push(Violation {
                invariant: NAME,
                message,
            });
        }
    };
    let mut m = Model::default();
    let records: BTreeMap<&str, &UsageRecord> = log
        .records
        .iter()
        .map(|r| (r.request_id.as_str(), r))
        .collect();
    for item in &log.items {
        let t = item.applied_ms;
        for p in m.expire(t, &records, cov) {
            push(format!("index {}: {p}", item.index));
        }
        let at = format!("index {} (t={t})", item.index);
        match (&item.command, &item.outcome) {
            (Command::ReplaceQuotas(set), Outcome::QuotasReplaced { .. }) => m.replace(set),
            (Command::Reserve(r), Outcome::Usage(receipt)) => {
                let id = r.request_id.as_str();
                if receipt.duplicate {
                    match m.answer.get(id) {
                        Some(a) if a.matches(&receipt.result) => {}
                        want => push(format!(
                            "{at}: retried reserve {id} answered {:?}, its standing answer is {want:?}",
                            receipt.result
                        )),
                    }
                    continue;
                }
                if m.answer.contains_key(id) {
                    push(format!(
                        "{at}: reserve {id} answered as new ({:?}), but the id was seen before",
                        receipt.result
                    ));
                    continue;
                }
                if m.unmodelled {
                    cov.unmodelled += 1;
                    m.answer
                        .insert(id.to_owned(), Answer::Is(receipt.result.clone()));
                    continue;
                }
                let e = r.estimate.total();
                let touches = m.touches(&r.who.subject);
                let hard: Vec<&(Quota, CounterId)> = touches
                    .iter()
                    .filter(|(q, _)| q.spec.enforcement == Enforcement::Hard)
                    .collect();
                let first_full = hard.iter().find(|(q, c)| {
                    u128::from(m.used(c, q.window_ms, t)) + u128::from(m.held(c)) + u128::from(e)
                        > u128::from(q.spec.limit)
                });
                match &receipt.result {
                    UsageResult::Reserved {
                        expires_ms,
                        standings,
                    } => {
                        cov.admitted += 1;
                        if hard.is_empty() {
                            cov.unbounded += 1;
                        }
                        if let Some((q, c)) = first_full {
                            push(format!(
                                "{at}: reserve {id} ({}, estimate {e}) admitted over hard quota {}: used {} + held {} + {e} > limit {}",
                                r.who.subject,
                                q.spec.name,
                                m.used(c, q.window_ms, t),
                                m.held(c),
                                q.spec.limit
                            ));
                        }
                        if *expires_ms != t.saturating_add(r.ttl_ms as i64) {
                            push(format!(
                                "{at}: reserve {id} expires at {expires_ms}, not t + ttl {}",
                                r.ttl_ms
                            ));
                        }
                        let want: Vec<(u64, u64, u64)> = hard
                            .iter()
                            .map(|(q, c)| (m.used(c, q.window_ms, t), m.held(c) + e, q.spec.limit))
                            .collect();
                        let agrees = standings.len() == want.len()
                            && standings
                                .iter()
                                .zip(&want)
                                .all(|(s, (u, h, l))| standing_agrees(s, *u, *h, *l));
                        if !agrees {
                            push(format!(
                                "{at}: reserve {id} reported standings {standings:?}, the model has (used, held, limit) {want:?}"
                            ));
                        }
                        let holds: Vec<CounterId> =
                            touches.iter().map(|(_, c)| c.clone()).collect();
                        for c in &holds {
                            let counter = m.counters.entry(c.clone()).or_default();
                            counter.held += e;
                        }
                        let seq = m.next_expiry;
                        m.next_expiry += 1;
                        m.expiry.insert((*expires_ms, seq), id.to_owned());
                        m.open.insert(
                            id.to_owned(),
                            Open {
                                charge: r.charge_on_expiry,
                                estimate: e,
                                expires_ms: *expires_ms,
                                expiry_seq: seq,
                                holds,
                            },
                        );
                    }
                    UsageResult::Denied { standing } => {
                        cov.denied += 1;
                        match first_full {
                            Some((q, c))
                                if standing.quota == q.spec.name
                                    && standing_agrees(
                                        standing,
                                        m.used(c, q.window_ms, t),
                                        m.held(c),
                                        q.spec.limit,
                                    ) => {}
                            Some((q, c)) => push(format!(
                                "{at}: reserve {id} (estimate {e}) denied with {standing:?}; the model's first full quota is {} with used {} held {} limit {}",
                                q.spec.name,
                                m.used(c, q.window_ms, t),
                                m.held(c),
                                q.spec.limit
                            )),
                            None => push(format!(
                                "{at}: reserve {id} ({}, estimate {e}) denied with {standing:?}, but every hard quota had room (model)",
                                r.who.subject
                            )),
                        }
                    }
                    other => push(format!("{at}: reserve {id} answered {other:?}")),
                }
                m.answer
                    .insert(id.to_owned(), Answer::Is(receipt.result.clone()));
            }
            (
                Command::ReportUsage(_) | Command::Commit(_),
                Outcome::Usage(
                    receipt @ tally_server::engine::usage::Receipt {
                        result:
                            UsageResult::Recorded {
                                seq,
                                settled,
                                overshoot,
                                at_ms,
                                ..
                            },
                        ..
                    },
                ),
            ) => {
                let id = receipt.request_id.as_str();
                if receipt.duplicate {
                    continue; // usage_exactly_once holds retries to the first answer
                }
                let Some(record) = log.record(*seq) else {
                    continue; // usage_exactly_once reports it
                };
                if *at_ms != t {
                    push(format!("{at}: {id} recorded at {at_ms}, applied at {t}"));
                }
                let total = record.tokens.total();
                let was_known = m.answer.contains_key(id);
                match m.close(id) {
                    Some(open) => {
                        cov.committed += 1;
                        if *settled != Settled::Reservation {
                            push(format!(
                                "{at}: {id} settled an open reservation, answered {settled:?}"
                            ));
                        }
                        if overshoot.tokens != total.saturating_sub(open.estimate) {
                            push(format!(
                                "{at}: {id} used {total} of estimate {}, overshoot answered {}",
                                open.estimate, overshoot.tokens
                            ));
                        }
                    }
                    None => {
                        let want = if was_known {
                            Settled::Lapsed
                        } else {
                            Settled::NoReservation
                        };
                        if *settled != want {
                            push(format!(
                                "{at}: {id} recorded as {settled:?}; the model says {want:?}"
                            ));
                        }
                        if !was_known && matches!(item.command, Command::Commit(_)) {
                            push(format!(
                                "{at}: commit {id} recorded without any reservation under its id"
                            ));
                        }
                    }
                }
                m.debit(&record.who.subject, total, t);
                m.answer
                    .insert(id.to_owned(), Answer::Is(receipt.result.clone()));
            }
            (Command::Release { request_id }, Outcome::Usage(receipt)) => {
                let found = matches!(receipt.result, UsageResult::Released { found: true });
                let open = m.close(request_id).is_some();
                if found != open || receipt.duplicate {
                    push(format!(
                        "{at}: release {request_id} answered {:?} (duplicate {}), the model has it {}",
                        receipt.result,
                        receipt.duplicate,
                        if open { "open" } else { "not open" }
                    ));
                }
                if open {
                    cov.released += 1;
                    m.answer.insert(
                        request_id.clone(),
                        Answer::Is(UsageResult::Released { found: true }),
                    );
                }
            }
            (Command::Commit(c), Outcome::Rejected(e)) if m.answer.contains_key(&c.request_id) => {
                push(format!(
                    "{at}: commit {} refused ({e}), but the id is known",
                    c.request_id
                ));
            }
            _ => {}
        }
    }
    // At the end: every live replica that applied the whole log shows the model's counters.
    for p in m.expire(log.last_ms, &records, cov) {
        push(format!("at the end: {p}"));
    }
    for f in &log.finals {
        let Ok(engine) = &f.engine else { continue };
        if f.state.applied.is_none() || f.state.applied != log.last_index || m.unmodelled {
            continue;
        }
        let now = engine.last_ms();
        for ((name, key), c) in &m.counters {
            let Some(q) = m.quotas.iter().find(|q| q.spec.name == *name) else {
                continue;
            };
            let subject = match (key.first(), &q.spec.filter.subject) {
                (Some(s), _) | (None, Some(s)) => s.clone(),
                (None, None) => continue,
            };
            let standing = engine
                .usage_overview(&subject, "")
                .into_iter()
                .find(|s| s.quota == *name && s.key == *key);
            let used = if c.window == window_start(now, q.window_ms) {
                c.used
            } else {
                0
            };
            match standing {
                Some(s) if s.used == used && s.reserved == c.held => cov.final_counters += 1,
                other => push(format!(
                    "n{} at rest (t={now}): quota {name} {key:?} stands at {:?}, the model has used {used} held {}",
                    f.state.node,
                    other.map(|s| (s.used, s.reserved)),
                    c.held
                )),
            }
        }
    }
    let answered = ev
        .calls
        .iter()
        .filter(|c| {
            matches!(c.command, Command::Reserve(_))
                && matches!(
                    &c.result,
                    CallResult::Acked(Outcome::Usage(r))
                        if matches!(r.result, UsageResult::Reserved { .. } | UsageResult::Denied { .. })
                )
        })
        .count();
    if answered > 0 && cov.admitted + cov.denied == cov.unbounded {
        push(format!(
            "{answered} reserves were answered Reserved or Denied but none was checked against a hard quota ({} admitted with no hard quota, {} under unmodelled quotas)",
            cov.unbounded, cov.unmodelled
        ));
    }
    if reported > MAX_REPORTS {
        out.push(Violation {
            invariant: NAME,
            message: format!("... and {} more", reported - MAX_REPORTS),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invariants::fixtures::*;
    use crate::invariants::usage_log::UsageLog;
    use tally_server::engine::usage::{
        Attribution, Commit, QuotaFilter, ReportUsage, Reserve, Tokens,
    };

    fn who() -> Attribution {
        Attribution {
            subject: "k0".into(),
            ..Attribution::default()
        }
    }

    fn t(input: u64) -> Tokens {
        Tokens {
            input,
            ..Tokens::default()
        }
    }

    fn quotas(limit: u64) -> Command {
        Command::ReplaceQuotas(QuotaSet {
            quotas: vec![QuotaSpec {
                name: "budget-k0".into(),
                filter: QuotaFilter {
                    subject: Some("k0".into()),
                    ..QuotaFilter::default()
                },
                per: vec![],
                metric: Metric::TotalTokens,
                limit,
                window: Some(WindowSpec::Fixed { duration_ms: 1_000 }),
                enforcement: Enforcement::Hard,
                thresholds_pct: vec![],
            }],
        })
    }

    fn reserve(id: &str, e: u64, ttl_ms: u64) -> Command {
        Command::Reserve(Reserve {
            request_id: id.into(),
            who: who(),
            estimate: t(e),
            ttl_ms,
            charge_on_expiry: false,
        })
    }

    fn run(h: &Hist) -> (Vec<Violation>, UsageCoverage) {
        let ev = h.ev();
        let log = UsageLog::build(&ev);
        let mut cov = UsageCoverage::default();
        (check(&ev, &log, &mut cov), cov)
    }

    /// Budget 100 per second: reports, reservations admitted and denied, a commit above its
    /// estimate, a release, an expiry, a lapsed commit, a new window.
    fn busy() -> Hist {
        let mut h = Hist::new();
        h.call(quotas(100), 10_000, true);
        let report = |id: &str, n| {
            Command::ReportUsage(ReportUsage {
                request_id: id.into(),
                who: who(),
                tokens: t(n),
            })
        };
        let commit = |id: &str, n| {
            Command::Commit(Commit {
                request_id: id.into(),
                tokens: t(n),
            })
        };
        h.call(report("u1", 30), 10_010, true);
        h.call(reserve("r1", 40, 500), 10_020, true); // 30 + 0 + 40 ≤ 100
        h.call(reserve("r2", 40, 500), 10_030, true); // 30 + 40 + 40 > 100: denied
        h.call(reserve("r1", 40, 500), 10_035, true); // retry: the same answer
        h.call(commit("r1", 55), 10_040, true); // overshoot 15; used 85
        h.call(reserve("r3", 15, 100), 10_050, true); // 85 + 15 ≤ 100
        h.call(
            Command::Release {
                request_id: "r3".into(),
            },
            10_060,
            true,
        );
        h.call(reserve("r4", 10, 100), 10_070, true);
        h.call(commit("r4", 5), 10_500, true); // expired at 10_170: lapsed
        h.call(reserve("r5", 100, 1_000), 11_000, true); // a new window
        h.final_now(1, true);
        h
    }

    #[test]
    fn the_engine_keeps_the_budget() {
        let (v, cov) = run(&busy());
        assert!(v.is_empty(), "{v:?}");
        assert_eq!((cov.admitted, cov.denied), (4, 1), "{cov:?}");
        assert_eq!(
            (cov.committed, cov.released, cov.expired),
            (1, 1, 1),
            "{cov:?}"
        );
        assert!(cov.final_counters >= 1, "{cov:?}");
    }

    #[test]
    fn a_reservation_charged_on_expiry_counts_as_usage() {
        let mut h = Hist::new();
        h.call(quotas(100), 10_000, true);
        let mut charged = reserve("r1", 60, 100);
        if let Command::Reserve(r) = &mut charged {
            r.charge_on_expiry = true;
        }
        h.call(charged.clone(), 10_010, true);
        // Expires at 10_110 in a batch of rate-limit traffic: charged 60 at that time.
        h.request(rl(crate::workload::STRICT_KEY, "s1", None), 10_200, true);
        h.call(reserve("r2", 50, 100), 10_300, true); // 60 + 50 > 100: denied
        h.call(reserve("r3", 40, 100), 10_310, true); // 60 + 40 ≤ 100
        h.call(charged, 10_320, true); // a retry: answered with the charged record
        h.call(
            Command::Commit(Commit {
                request_id: "r1".into(),
                tokens: t(10),
            }),
            10_330,
            true,
        ); // too late: the charged record is the answer
        h.final_now(1, true);
        let (v, cov) = run(&h);
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(
            (cov.admitted, cov.denied, cov.charged),
            (2, 1, 1),
            "{cov:?}"
        );
    }

    #[test]
    fn an_admission_over_the_budget_fails() {
        let h = busy();
        let ev = h.ev();
        let mut log = UsageLog::build(&ev);
        // The denied r2 turned into an admission (say, holds were forgotten).
        let r1 = log.items[2].outcome.clone();
        let i = log
            .items
            .iter()
            .position(|i| matches!(&i.command, Command::Reserve(r) if r.request_id == "r2"))
            .unwrap();
        let Outcome::Usage(mut receipt) = r1 else {
            panic!()
        };
        receipt.request_id = "r2".into();
        log.items[i].outcome = Outcome::Usage(receipt);
        let mut cov = UsageCoverage::default();
        let v = check(&ev, &log, &mut cov);
        assert!(
            v.iter()
                .any(|v| v.message.contains("admitted over hard quota")),
            "{v:?}"
        );
    }

    #[test]
    fn a_needless_denial_fails() {
        let h = busy();
        let ev = h.ev();
        let mut log = UsageLog::build(&ev);
        let pos = |log: &UsageLog, id: &str| {
            log.items
                .iter()
                .position(|i| matches!(&i.command, Command::Reserve(r) if r.request_id == id))
                .unwrap()
        };
        // r1 (which fits) answered with r2's denial.
        let (r1, r2) = (pos(&log, "r1"), pos(&log, "r2"));
        log.items[r1].outcome = log.items[r2].outcome.clone();
        let mut cov = UsageCoverage::default();
        let v = check(&ev, &log, &mut cov);
        assert!(v.iter().any(|v| v.message.contains("had room")), "{v:?}");
    }

    #[test]
    fn a_release_of_a_reservation_never_made_fails() {
        let h = busy();
        let ev = h.ev();
        let mut log = UsageLog::build(&ev);
        // r3's reservation never reached the log: its release finds nothing; the model
        // then sees r3's admission missing and the release's answer wrong.
        let i = log
            .items
            .iter()
            .position(|i| matches!(&i.command, Command::Reserve(r) if r.request_id == "r3"))
            .unwrap();
        log.items.remove(i);
        let mut cov = UsageCoverage::default();
        let v = check(&ev, &log, &mut cov);
        assert!(v.iter().any(|v| v.message.contains("release r3")), "{v:?}");
    }
}
