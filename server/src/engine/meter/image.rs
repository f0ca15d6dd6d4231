//! The metering state as a serializable image (inside the engine snapshot) and back.
//!
//! Everything is written in the order it is held (request ids in first-seen order, counters
//! in table order), so a restored meter makes the same decisions and writes the same bytes.

use serde::{Deserialize, Serialize};

use super::super::usage::{Attribution, Event, PriceCatalog, QuotaSpec, UsageRecord, UsageSums};
use super::ledger::Ledger;
use super::quotas::{self, CounterKey, Quota, QuotaCounter, Quotas};
use super::{Entry, EntryState, Events, Meter, Prices, Requests};

#[derive(Serialize, Deserialize)]
pub(crate) struct MeterImage {
    price_version: u64,
    prices: PriceCatalog,
    quotas: Vec<(u32, QuotaSpec)>,
    next_quota_id: u32,
    counters: Vec<(CounterKey, QuotaCounter)>,
    counter_cursor: u64,
    requests: Vec<(String, Entry)>,
    next_expiry_seq: u64,
    records: Vec<UsageRecord>,
    next_seq: u64,
    dropped_seq: u64,
    dropped_ms: i64,
    buckets: Vec<(i64, Vec<(Attribution, UsageSums)>)>,
    buckets_from_ms: i64,
    events: Vec<Event>,
    next_event_seq: u64,
}

impl Meter {
    pub(crate) fn image(&self) -> MeterImage {
        let q = &self.quotas;
        let l = &self.ledger;
        MeterImage {
            price_version: self.prices.version,
            prices: self.prices.catalog.clone(),
            quotas: q.list.iter().map(|x| (x.id, x.spec.clone())).collect(),
            next_quota_id: q.next_id,
            counters: q
                .counters
                .iter()
                .map(|(k, c)| (k.clone(), c.clone()))
                .collect(),
            counter_cursor: q.cursor as u64,
            requests: self
                .requests
                .order
                .iter()
                .map(|id| (id.clone(), self.requests.map[id].clone()))
                .collect(),
            next_expiry_seq: self.requests.next_expiry_seq,
            records: l.records.iter().cloned().collect(),
            next_seq: l.next_seq,
            dropped_seq: l.dropped_seq,
            dropped_ms: l.dropped_ms,
            buckets: l
                .buckets
                .iter()
                .map(|(t, rows)| (*t, rows.iter().map(|(a, s)| (a.clone(), *s)).collect()))
                .collect(),
            buckets_from_ms: l.buckets_from_ms,
            events: self.events.list.iter().cloned().collect(),
            next_event_seq: self.events.next_seq,
        }
    }

    /// Rebuilds a meter from its image, checking what its decisions rely on.
    pub(crate) fn from_image(img: MeterImage) -> Result<Meter, String> {
        let mut prices = Prices::default();
        img.prices.validate().map_err(|e| e.to_string())?;
        prices.set(img.prices, img.price_version);
        let quotas = restore_quotas(
            img.quotas,
            img.next_quota_id,
            img.counters,
            img.counter_cursor,
        )?;
        let requests = restore_requests(img.requests, img.next_expiry_seq)?;
        check_holds(&quotas, &requests)?;
        let ledger = restore_ledger(
            img.records,
            (img.next_seq, img.dropped_seq, img.dropped_ms),
            img.buckets,
            img.buckets_from_ms,
        )?;
        if img.events.windows(2).any(|w| w[0].seq >= w[1].seq)
            || img
                .events
                .last()
                .is_some_and(|e| e.seq > img.next_event_seq)
        {
            return Err("events out of order".into());
        }
        Ok(Meter {
            prices,
            quotas,
            requests,
            ledger,
            events: Events {
                list: img.events.into(),
                next_seq: img.next_event_seq,
            },
        })
    }
}

fn restore_quotas(
    list: Vec<(u32, QuotaSpec)>,
    next_id: u32,
    counters: Vec<(CounterKey, QuotaCounter)>,
    cursor: u64,
) -> Result<Quotas, String> {
    let mut out = Quotas::default();
    let mut compiled = Vec::with_capacity(list.len());
    for (i, (id, spec)) in list.into_iter().enumerate() {
        if id >= next_id || compiled.iter().any(|q: &Quota| q.id == id) {
            return Err(format!("quota id {id} out of order"));
        }
        let window = quotas::compile(&spec, &format!("quotas[{i}]")).map_err(|e| e.to_string())?;
        compiled.push(Quota { id, spec, window });
    }
    out.next_id = next_id;
    out.set_list(compiled);
    for (key, counter) in counters {
        if key.0 >= next_id {
            return Err(format!("counter of unknown quota id {}", key.0));
        }
        if let Some(&i) = out.by_id.get(&key.0) {
            let fits = match (&out.list[i].window, &counter.state) {
                (Some(w), Some(s)) => w.fits(s),
                (None, None) => true,
                _ => false,
            };
            if !fits || key.1.len() != out.list[i].spec.per.len() {
                return Err(format!("counter of quota {} does not fit it", key.0));
            }
        }
        if out.counters.insert(key, counter).is_some() {
            return Err("duplicate quota counter".into());
        }
    }
    out.cursor = usize::try_from(cursor)
        .ok()
        .filter(|c| *c <= out.counters.len())
        .ok_or("quota sweep cursor beyond the table")?;
    Ok(out)
}

fn restore_requests(
    entries: Vec<(String, Entry)>,
    next_expiry_seq: u64,
) -> Result<Requests, String> {
    let mut out = Requests {
        next_expiry_seq,
        ..Requests::default()
    };
    let mut last_ms = i64::MIN;
    for (id, entry) in entries {
        if entry.first_ms < last_ms {
            return Err("request ids out of order".into());
        }
        last_ms = entry.first_ms;
        if let EntryState::Open(r) = &entry.state
            && (r.expiry_seq >= next_expiry_seq
                || out
                    .expiry
                    .insert((r.expires_ms, r.expiry_seq), id.clone())
                    .is_some())
        {
            return Err("reservation expiry out of order".into());
        }
        out.order.push_back(id.clone());
        if out.map.insert(id, entry).is_some() {
            return Err("duplicate request id".into());
        }
    }
    Ok(out)
}

/// Every counter's `reserved` equals the sum of the open reservations' holds on it.
fn check_holds(quotas: &Quotas, requests: &Requests) -> Result<(), String> {
    let mut held: std::collections::HashMap<&CounterKey, u64> = Default::default();
    for id in requests.expiry.values() {
        if let EntryState::Open(r) = &requests.map[id].state {
            for (key, n) in &r.holds {
                let sum = held.entry(key).or_default();
                *sum = sum.saturating_add(*n);
            }
        }
    }
    for (key, c) in &quotas.counters {
        if c.reserved != held.remove(key).unwrap_or(0) {
            return Err(format!(
                "quota counter {key:?} holds what no reservation does"
            ));
        }
    }
    match held.into_iter().find(|(_, n)| *n > 0) {
        Some((key, _)) => Err(format!("a reservation holds on missing counter {key:?}")),
        None => Ok(()),
    }
}

fn restore_ledger(
    records: Vec<UsageRecord>,
    (next_seq, dropped_seq, dropped_ms): (u64, u64, i64),
    buckets: Vec<(i64, Vec<(Attribution, UsageSums)>)>,
    buckets_from_ms: i64,
) -> Result<Ledger, String> {
    let contiguous = records
        .iter()
        .enumerate()
        .all(|(i, r)| r.seq == dropped_seq + 1 + i as u64);
    if !contiguous || dropped_seq + records.len() as u64 + 1 != next_seq {
        return Err("usage records are not numbered contiguously".into());
    }
    if records.windows(2).any(|w| w[0].at_ms > w[1].at_ms) {
        return Err("usage records out of time order".into());
    }
    let mut ledger = Ledger {
        records: records.into(),
        next_seq,
        dropped_seq,
        dropped_ms,
        buckets_from_ms,
        ..Ledger::default()
    };
    for (start, rows) in buckets {
        ledger.bucket_rows += rows.len() as u64;
        let rows: std::collections::BTreeMap<_, _> = rows.into_iter().collect();
        if ledger.buckets.insert(start, rows).is_some() {
            return Err("duplicate usage period".into());
        }
    }
    Ok(ledger)
}
