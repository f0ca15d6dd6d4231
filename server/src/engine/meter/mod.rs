//! Metering state: prices, quotas and their counters, reservations, the request-id table,
//! the usage ledger and events. Applied on every replica at batch time, like the rest of
//! the engine.
//!
//! Layout:
//! - this module: the request-id table (exactly-once), reservations and their expiry,
//!   prices, events, and the engine's metering commands and reads.
//! - `quotas`: quotas in force, their counters, holds and alerts.
//! - `check`: the read-only request-time check of hard quotas (`CheckQuotas`).
//! - `ledger`: usage records (the engine's tail: minute queries; the node archives them) and
//!   15-minute aggregates (the queries).
//! - `image`: all of it to a serializable image and back (part of the engine snapshot).
//!
//! Architecture invariant: exactly once. A request id, once seen, is answered with its first
//! outcome until `request_id_retention_ms` after it was first seen (by batch time); a new id
//! that does not fit under `max_request_ids` is refused, never admitted by forgetting one
//! still inside its retention.
//!
//! Architecture invariant: reservations expire deterministically: at the first batch whose
//! time is at or past their expiry, before that batch's commands.

mod check;
mod image;
mod ledger;
mod quotas;

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

pub(crate) use image::MeterImage;

use super::command::{Command, CommandError, Outcome};
use super::keys::DERIVED_PREFIX;
use super::usage::QuotaSet;
use super::usage::{
    Attribution, Commit, Enforcement, Event, EventKind, Overshoot, PriceCatalog, QuotaSpec,
    QuotaStanding, ReadError, Receipt, ReportUsage, Reserve, Settled, Tokens, UsageQuery,
    UsageRecord, UsageResult, UsageRow, validate_release,
};
use super::{Engine, EngineSettings};
use quotas::{Quotas, Touch, amount};

/// Most events kept for `WatchEvents` (oldest dropped first).
pub const MAX_EVENTS: usize = 10_000;

#[derive(Default)]
pub(crate) struct Meter {
    prices: Prices,
    quotas: Quotas,
    requests: Requests,
    ledger: ledger::Ledger,
    events: Events,
}

#[derive(Default)]
struct Prices {
    version: u64,
    catalog: PriceCatalog,
    /// Model → index in the catalog.
    index: HashMap<String, usize>,
}

impl Prices {
    fn set(&mut self, catalog: PriceCatalog, version: u64) {
        self.index = catalog
            .models
            .iter()
            .enumerate()
            .map(|(i, m)| (m.model.clone(), i))
            .collect();
        self.catalog = catalog;
        self.version = version;
    }

    /// `(price version, cost)`; version 0 and cost 0 when the model has no price.
    fn charge(&self, model: &str, tokens: &Tokens) -> (u64, u64) {
        match self.index.get(model) {
            Some(&i) => (
                self.version,
                PriceCatalog::cost_nusd(&self.catalog.models[i], tokens),
            ),
            None => (0, 0),
        }
    }
}

#[derive(Default)]
pub(crate) struct Events {
    list: VecDeque<Event>,
    next_seq: u64,
}

impl Events {
    pub(crate) fn push(&mut self, at_ms: i64, kind: EventKind) {
        self.next_seq += 1;
        self.list.push_back(Event {
            seq: self.next_seq,
            at_ms,
            kind,
        });
        if self.list.len() > MAX_EVENTS {
            self.list.pop_front();
        }
    }
}

/// What is remembered of one request id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// Batch time it was first seen: retention counts from here.
    first_ms: i64,
    who: Attribution,
    state: EntryState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum EntryState {
    /// An open reservation.
    Open(Reservation),
    /// Settled: what a retry is answered with.
    Closed(UsageResult),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Reservation {
    estimate: Tokens,
    /// Record the estimate at expiry rather than release it.
    charge_on_expiry: bool,
    estimate_cost_nusd: u64,
    expires_ms: i64,
    /// Tie-breaker of the expiry order (reservations expiring in the same ms).
    expiry_seq: u64,
    /// What each counter holds for it.
    holds: Vec<(quotas::CounterKey, u64)>,
    /// The answer the Reserve got, repeated to a retry.
    answer: UsageResult,
}

#[derive(Default)]
struct Requests {
    map: HashMap<String, Entry>,
    /// Ids in the order first seen (so by `first_ms`): retention pops from the front.
    order: VecDeque<String>,
    /// Open reservations by `(expires_ms, expiry_seq)`.
    expiry: BTreeMap<(i64, u64), String>,
    next_expiry_seq: u64,
}

impl Requests {
    /// Refuses a new id when the table is at its bound (before anything is applied).
    fn check_room(&self, max: u64) -> Result<(), CommandError> {
        if self.map.len() as u64 >= max {
            return Err(CommandError::UsageTableFull {
                table: "request id table".into(),
                max,
            });
        }
        Ok(())
    }

    /// Remembers a new id; [`Requests::check_room`] said it fits.
    fn insert(&mut self, id: &str, entry: Entry) {
        self.order.push_back(id.to_owned());
        let previous = self.map.insert(id.to_owned(), entry);
        assert!(previous.is_none(), "a request id is inserted once");
    }
}

fn receipt(request_id: &str, duplicate: bool, result: UsageResult) -> Outcome {
    Outcome::Usage(Receipt {
        request_id: request_id.to_owned(),
        duplicate,
        result,
    })
}

/// What a usage record settles, for [`Meter::record`].
struct Settle {
    settled: Settled,
    /// The reservation's estimate and its cost, when one was open.
    estimate: Option<(Tokens, u64)>,
}

impl Meter {
    /// Time moved to `now_ms`: expire reservations and forget request ids past retention.
    fn advance(&mut self, now_ms: i64, settings: &EngineSettings) {
        while let Some(entry) = self.requests.expiry.first_entry() {
            if entry.key().0 > now_ms {
                break;
            }
            let id = entry.remove();
            self.expire_reservation(id, now_ms, settings);
        }
        let retention_ms = i64::try_from(settings.request_id_retention_ms).unwrap_or(i64::MAX);
        while let Some(id) = self.requests.order.front() {
            let e = &self.requests.map[id];
            let past = e.first_ms.saturating_add(retention_ms) <= now_ms;
            // Retention is at least the longest TTL, so an open reservation is never past it.
            if !past || matches!(e.state, EntryState::Open(_)) {
                break;
            }
            let id = self.requests.order.pop_front().expect("front exists");
            self.requests.map.remove(&id);
        }
        self.ledger
            .expire(now_ms, settings.usage_bucket_retention_ms);
        self.ledger.trim(settings.max_usage_records);
    }

    /// A reservation passed its TTL: its holds go, and it is released — or, with
    /// `charge_on_expiry`, its estimate is recorded as the usage (released after all if that
    /// is refused: the quota counter table is full).
    fn expire_reservation(&mut self, id: String, now_ms: i64, settings: &EngineSettings) {
        let e = self
            .requests
            .map
            .get_mut(&id)
            .expect("expiry of a known id");
        let EntryState::Open(r) = std::mem::replace(
            &mut e.state,
            EntryState::Closed(UsageResult::Released { found: true }),
        ) else {
            panic!("expiry entry for a reservation that is not open");
        };
        let who = e.who.clone();
        for (key, n) in &r.holds {
            self.quotas.unhold(key, *n);
        }
        if r.charge_on_expiry {
            let settle = Settle {
                settled: Settled::Expired,
                estimate: Some((r.estimate, r.estimate_cost_nusd)),
            };
            if let Ok(result) = self.record(&id, &who, &r.estimate, settle, now_ms, settings) {
                let e = self.requests.map.get_mut(&id).expect("entry exists");
                e.state = EntryState::Closed(result);
            }
        }
        self.events
            .push(now_ms, EventKind::ReservationExpired { request_id: id });
    }

    /// Records usage: charges it, debits every quota it falls under, writes the ledger.
    fn record(
        &mut self,
        request_id: &str,
        who: &Attribution,
        tokens: &Tokens,
        settle: Settle,
        now_ms: i64,
        settings: &EngineSettings,
    ) -> Result<UsageResult, CommandError> {
        let touches = self.quotas.touches(who);
        self.quotas
            .make_room(&touches, settings.max_quota_counters, now_ms)?;
        let (price_version, cost_nusd) = self.prices.charge(&who.model, tokens);
        let mut over = Vec::new();
        for t in &touches {
            let metric = self.quotas.list[t.index].spec.metric;
            if metric != super::usage::Metric::Concurrent {
                self.quotas.debit(
                    t,
                    amount(metric, tokens, cost_nusd),
                    now_ms,
                    &mut self.events,
                );
            }
            let s = self.quotas.standing(t.index, &t.key, now_ms);
            if s.used > s.limit && s.enforcement != Enforcement::Shadow {
                over.push(s);
            }
        }
        let overshoot = settle
            .estimate
            .map_or(Overshoot::default(), |(est, est_cost)| Overshoot {
                tokens: tokens.total().saturating_sub(est.total()),
                cost_nusd: cost_nusd.saturating_sub(est_cost),
            });
        let entry = ledger::Entry {
            at_ms: now_ms,
            request_id,
            who,
            tokens: *tokens,
            cost_nusd,
            price_version,
        };
        let seq = self.ledger.append(entry, settings.max_usage_buckets);
        Ok(UsageResult::Recorded {
            seq,
            at_ms: now_ms,
            cost_nusd,
            price_version,
            settled: settle.settled,
            overshoot,
            over,
        })
    }

    fn report(
        &mut self,
        r: &ReportUsage,
        now_ms: i64,
        settings: &EngineSettings,
    ) -> Result<Outcome, CommandError> {
        r.validate()?;
        match self.requests.map.get(&r.request_id) {
            None => {}
            // A report under a reserved id settles the reservation, as a commit.
            Some(Entry {
                state: EntryState::Open(_),
                ..
            }) => {
                let commit = Commit {
                    request_id: r.request_id.clone(),
                    tokens: r.tokens,
                };
                return self.commit(&commit, now_ms, settings);
            }
            Some(e) => {
                return self.settle_closed(&r.request_id, e.clone(), &r.tokens, now_ms, settings);
            }
        }
        self.requests.check_room(settings.max_request_ids)?;
        let settle = Settle {
            settled: Settled::NoReservation,
            estimate: None,
        };
        let result = self.record(&r.request_id, &r.who, &r.tokens, settle, now_ms, settings)?;
        let entry = Entry {
            first_ms: now_ms,
            who: r.who.clone(),
            state: EntryState::Closed(result.clone()),
        };
        self.requests.insert(&r.request_id, entry);
        Ok(receipt(&r.request_id, false, result))
    }

    /// Usage under an id already settled: a retry of a recorded one gets its first answer;
    /// after a denial, release or expiry the usage is the truth and is recorded (once).
    fn settle_closed(
        &mut self,
        request_id: &str,
        entry: Entry,
        tokens: &Tokens,
        now_ms: i64,
        settings: &EngineSettings,
    ) -> Result<Outcome, CommandError> {
        let EntryState::Closed(first) = entry.state else {
            unreachable!("callers pass closed entries")
        };
        if matches!(first, UsageResult::Recorded { .. }) {
            return Ok(receipt(request_id, true, first));
        }
        let settle = Settle {
            settled: Settled::Lapsed,
            estimate: None,
        };
        let result = self.record(request_id, &entry.who, tokens, settle, now_ms, settings)?;
        let e = self.requests.map.get_mut(request_id).expect("entry exists");
        e.state = EntryState::Closed(result.clone());
        Ok(receipt(request_id, false, result))
    }

    fn reserve(
        &mut self,
        r: &Reserve,
        now_ms: i64,
        settings: &EngineSettings,
    ) -> Result<Outcome, CommandError> {
        r.validate()?;
        if let Some(e) = self.requests.map.get(&r.request_id) {
            let answer = match &e.state {
                EntryState::Open(res) => res.answer.clone(),
                EntryState::Closed(first) => first.clone(),
            };
            return Ok(receipt(&r.request_id, true, answer));
        }
        self.requests.check_room(settings.max_request_ids)?;
        let (_, cost) = self.prices.charge(&r.who.model, &r.estimate);
        let touches = self.quotas.touches(&r.who);
        if let Some(standing) = self.first_denial(&touches, &r.estimate, cost, now_ms) {
            let result = UsageResult::Denied { standing };
            let entry = Entry {
                first_ms: now_ms,
                who: r.who.clone(),
                state: EntryState::Closed(result.clone()),
            };
            self.requests.insert(&r.request_id, entry);
            return Ok(receipt(&r.request_id, false, result));
        }
        self.quotas
            .make_room(&touches, settings.max_quota_counters, now_ms)?;
        let (holds, standings) = self.hold(&touches, &r.estimate, cost, now_ms);
        let expires_ms = now_ms.saturating_add(r.ttl_ms as i64);
        let answer = UsageResult::Reserved {
            expires_ms,
            standings,
        };
        let expiry_seq = self.requests.next_expiry_seq;
        self.requests.next_expiry_seq += 1;
        let reservation = Reservation {
            estimate: r.estimate,
            charge_on_expiry: r.charge_on_expiry,
            estimate_cost_nusd: cost,
            expires_ms,
            expiry_seq,
            holds,
            answer: answer.clone(),
        };
        let entry = Entry {
            first_ms: now_ms,
            who: r.who.clone(),
            state: EntryState::Open(reservation),
        };
        self.requests.insert(&r.request_id, entry);
        self.requests
            .expiry
            .insert((expires_ms, expiry_seq), r.request_id.clone());
        Ok(receipt(&r.request_id, false, answer))
    }

    /// The first hard quota (in set order) with no room for the estimate on top of what is
    /// recorded and held. Reads only.
    fn first_denial(
        &self,
        touches: &[Touch],
        estimate: &Tokens,
        cost_nusd: u64,
        now_ms: i64,
    ) -> Option<QuotaStanding> {
        touches.iter().find_map(|t| {
            let spec = &self.quotas.list[t.index].spec;
            if spec.enforcement != Enforcement::Hard {
                return None;
            }
            let s = self.quotas.standing(t.index, &t.key, now_ms);
            let need = amount(spec.metric, estimate, cost_nusd);
            let total = u128::from(s.used) + u128::from(s.reserved) + u128::from(need);
            (total > u128::from(s.limit)).then_some(s)
        })
    }

    /// Holds the estimate on every touched counter; returns the holds and the hard quotas'
    /// standings after them.
    fn hold(
        &mut self,
        touches: &[Touch],
        estimate: &Tokens,
        cost_nusd: u64,
        now_ms: i64,
    ) -> (Vec<(quotas::CounterKey, u64)>, Vec<QuotaStanding>) {
        let mut holds = Vec::with_capacity(touches.len());
        let mut standings = Vec::new();
        for t in touches {
            let spec = &self.quotas.list[t.index].spec;
            let (metric, enforcement) = (spec.metric, spec.enforcement);
            let n = amount(metric, estimate, cost_nusd);
            let counter = self.quotas.counter(t, now_ms);
            counter.reserved = counter.reserved.saturating_add(n);
            holds.push((t.key.clone(), n));
            if metric == super::usage::Metric::Concurrent || enforcement == Enforcement::Soft {
                self.quotas.alert(t, now_ms, &mut self.events);
            }
            if enforcement == Enforcement::Hard {
                standings.push(self.quotas.standing(t.index, &t.key, now_ms));
            }
        }
        (holds, standings)
    }

    fn commit(
        &mut self,
        c: &Commit,
        now_ms: i64,
        settings: &EngineSettings,
    ) -> Result<Outcome, CommandError> {
        c.validate()?;
        let Some(entry) = self.requests.map.get(&c.request_id).cloned() else {
            return Err(CommandError::invalid(
                "request_id",
                format!(
                    "no reservation under {:?} (never reserved, or forgotten after retention); report it with ReportUsage",
                    c.request_id
                ),
            ));
        };
        let EntryState::Open(res) = entry.state else {
            return self.settle_closed(&c.request_id, entry, &c.tokens, now_ms, settings);
        };
        // Record first: if it is refused (tables full), the reservation stays as it was.
        let settle = Settle {
            settled: Settled::Reservation,
            estimate: Some((res.estimate, res.estimate_cost_nusd)),
        };
        let result = self.record(
            &c.request_id,
            &entry.who,
            &c.tokens,
            settle,
            now_ms,
            settings,
        )?;
        self.close_reservation(&c.request_id, &res, result.clone());
        Ok(receipt(&c.request_id, false, result))
    }

    fn close_reservation(&mut self, request_id: &str, res: &Reservation, result: UsageResult) {
        for (key, n) in &res.holds {
            self.quotas.unhold(key, *n);
        }
        self.requests
            .expiry
            .remove(&(res.expires_ms, res.expiry_seq))
            .expect("an open reservation is in the expiry order");
        let e = self.requests.map.get_mut(request_id).expect("entry exists");
        e.state = EntryState::Closed(result);
    }

    fn release(&mut self, request_id: &str) -> Result<Outcome, CommandError> {
        validate_release(request_id)?;
        let open = match self.requests.map.get(request_id) {
            Some(Entry {
                state: EntryState::Open(res),
                ..
            }) => res.clone(),
            _ => {
                return Ok(receipt(
                    request_id,
                    false,
                    UsageResult::Released { found: false },
                ));
            }
        };
        let result = UsageResult::Released { found: true };
        self.close_reservation(request_id, &open, result.clone());
        Ok(receipt(request_id, false, result))
    }
}

impl Meter {
    /// Replaces the configured quotas (a quota file's), keeping the `derived` ones
    /// (subscriptions') after them. Configured names may not use the derived prefix.
    fn replace_configured(
        &mut self,
        set: &QuotaSet,
        derived: Vec<QuotaSpec>,
    ) -> Result<u64, CommandError> {
        if let Some(i) = set
            .quotas
            .iter()
            .position(|q| q.name.starts_with(DERIVED_PREFIX))
        {
            return Err(CommandError::invalid(
                format!("quotas[{i}].name"),
                format!("names starting with {DERIVED_PREFIX:?} are the subscriptions' own"),
            ));
        }
        let mut all = set.clone();
        all.quotas.extend(derived);
        self.quotas.replace(&all)
    }

    /// Replaces the quotas derived from subscriptions, keeping the configured ones; how many
    /// quotas are in force after.
    pub(crate) fn set_derived_quotas(
        &mut self,
        derived: Vec<QuotaSpec>,
    ) -> Result<u64, CommandError> {
        let mut all = QuotaSet {
            quotas: self
                .quotas
                .list
                .iter()
                .filter(|q| !q.spec.name.starts_with(DERIVED_PREFIX))
                .map(|q| q.spec.clone())
                .collect(),
        };
        all.quotas.extend(derived);
        self.quotas.replace(&all)?;
        Ok(self.quotas.list.len() as u64)
    }
}

impl Engine {
    /// Applies one metering command at `now_ms`.
    pub(crate) fn apply_usage(
        &mut self,
        command: &Command,
        now_ms: i64,
    ) -> Result<Outcome, CommandError> {
        let settings = self.settings;
        let m = &mut self.meter;
        match command {
            Command::ReportUsage(r) => m.report(r, now_ms, &settings),
            Command::Reserve(r) => m.reserve(r, now_ms, &settings),
            Command::Commit(c) => m.commit(c, now_ms, &settings),
            Command::Release { request_id } => m.release(request_id),
            Command::CheckQuotas(c) => m.check_quotas(c, now_ms),
            Command::SetPrices(catalog) => {
                catalog.validate()?;
                let version = m.prices.version + 1;
                m.prices.set(catalog.clone(), version);
                Ok(Outcome::PricesSet { version })
            }
            Command::ReplaceQuotas(set) => {
                let derived = self.keys.derived_quotas();
                let m = &mut self.meter;
                let kept = m.replace_configured(set, derived)?;
                Ok(Outcome::QuotasReplaced {
                    quotas: m.quotas.list.len() as u64,
                    kept,
                })
            }
            _ => unreachable!("apply_usage takes metering commands only"),
        }
    }

    /// Time moved: reservations past their TTL release themselves, request ids past
    /// retention are forgotten, aggregates past retention dropped. Before a batch's commands.
    pub(crate) fn advance_usage(&mut self, now_ms: i64) {
        let settings = self.settings;
        self.meter.advance(now_ms, &settings);
    }

    /// The metering half of a batch's reclamation step.
    pub(crate) fn sweep_usage(&mut self, commands: usize, now_ms: i64) {
        self.meter.quotas.sweep_batch(commands, now_ms);
    }

    /// The price catalog in force and its version (0 before any was set).
    pub fn prices(&self) -> (u64, &PriceCatalog) {
        (self.meter.prices.version, &self.meter.prices.catalog)
    }

    /// The quotas in force, in set order.
    pub fn quotas(&self) -> impl Iterator<Item = &QuotaSpec> {
        self.meter.quotas.list.iter().map(|q| &q.spec)
    }

    /// Sums of usage in a range, grouped and bucketed (see [`UsageQuery`]).
    pub fn query_usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>, ReadError> {
        self.meter.ledger.query(query)
    }

    /// Up to `max` usage records with `seq > after_seq`, in seq order. `PastRetention` when
    /// records after `after_seq` were already dropped (the cursor is too old).
    pub fn export_usage(&self, after_seq: u64, max: usize) -> Result<Vec<UsageRecord>, ReadError> {
        self.meter.ledger.export(after_seq, max)
    }

    /// Every quota counter that applies to `subject` (with `subscription`), with its standing
    /// as of the last batch; quotas keyed only by subject/subscription that have no counter
    /// yet appear with nothing used.
    pub fn usage_overview(&self, subject: &str, subscription: &str) -> Vec<QuotaStanding> {
        self.meter
            .quotas
            .overview(subject, subscription, self.last_ms())
    }

    /// Up to `max` retained events with `seq > after_seq`, oldest first.
    pub fn events_after(&self, after_seq: u64, max: usize) -> Vec<Event> {
        let list = &self.meter.events.list;
        let skip = list.partition_point(|e| e.seq <= after_seq);
        list.range(skip..).take(max).cloned().collect()
    }

    /// Seq of the oldest usage record this engine still holds (`last_usage_seq() + 1` when it
    /// holds none).
    pub fn first_usage_seq(&self) -> u64 {
        self.meter.ledger.first_seq()
    }

    /// Seq of the last usage record written (0 before any).
    pub fn last_usage_seq(&self) -> u64 {
        self.meter.ledger.last_seq()
    }

    /// Seq of the last event (0 before any).
    pub fn last_event_seq(&self) -> u64 {
        self.meter.events.next_seq
    }

    /// Open reservations.
    pub fn open_reservations(&self) -> usize {
        self.meter.requests.expiry.len()
    }

    /// Request ids remembered.
    pub fn remembered_request_ids(&self) -> usize {
        self.meter.requests.map.len()
    }
}
