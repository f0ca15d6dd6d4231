//! The usage ledger: one record per recorded request, and 15-minute aggregates.
//!
//! Records are numbered 1, 2, 3, ... in commit order (the export cursor) and are written at
//! batch time, so their times never decrease. The newest `max_usage_records` are kept (trimmed
//! when a batch part begins, so a part's own records are all still here when it ends);
//! older ones are dropped first, and the seq and time of the last dropped one are kept so a
//! read that would need them is refused rather than answered short.
//!
//! Aggregates: per 15-minute period (UTC-aligned) and attribution (subject, subscription,
//! model, tags), the sums of its records. Every IANA zone's offset is a multiple of 15
//! minutes, so hours, days and months in any zone are exact unions of these periods. They are
//! kept for `usage_bucket_retention_ms` and at most `max_usage_buckets` rows, oldest period
//! dropped first.

use std::collections::{BTreeMap, VecDeque};

use jiff::Timestamp;
use jiff::tz::TimeZone;

use super::super::calendar::{self, MAX_TIME_MS, MIN_TIME_MS};
use super::super::limits::CalendarUnit;
use super::super::usage::{
    Attribution, Granularity, MAX_DIMENSIONS, ReadError, Tokens, UsageQuery, UsageRecord, UsageRow,
    UsageSums,
};

/// Aggregate period, ms.
pub const BUCKET_MS: i64 = 900_000;
/// Most rows one query answers.
pub const MAX_QUERY_ROWS: usize = 100_000;
/// Most records one export read returns.
pub const MAX_EXPORT_PAGE: usize = 10_000;

pub(crate) struct Ledger {
    pub records: VecDeque<UsageRecord>,
    /// Seq the next record gets.
    pub next_seq: u64,
    /// Seq and time of the last dropped record (0 and `i64::MIN` when none was).
    pub dropped_seq: u64,
    pub dropped_ms: i64,
    /// Period start → attribution → sums.
    pub buckets: BTreeMap<i64, BTreeMap<Attribution, UsageSums>>,
    pub bucket_rows: u64,
    /// Aggregates are complete from this time on (earlier periods were dropped).
    pub buckets_from_ms: i64,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            records: VecDeque::new(),
            next_seq: 1,
            dropped_seq: 0,
            dropped_ms: i64::MIN,
            buckets: BTreeMap::new(),
            bucket_rows: 0,
            buckets_from_ms: MIN_TIME_MS,
        }
    }
}

/// What one record adds.
pub(crate) struct Entry<'a> {
    pub at_ms: i64,
    pub request_id: &'a str,
    pub who: &'a Attribution,
    pub tokens: Tokens,
    pub cost_nusd: u64,
    pub price_version: u64,
}

impl Ledger {
    /// Writes one record and adds it to its aggregate; returns its seq.
    pub fn append(&mut self, e: Entry<'_>, max_rows: u64) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        assert!(
            self.records.back().is_none_or(|r| r.at_ms <= e.at_ms),
            "ledger time went backwards"
        );
        let period = e.at_ms.div_euclid(BUCKET_MS) * BUCKET_MS;
        let rows = self.buckets.entry(period).or_default();
        if !rows.contains_key(e.who) {
            rows.insert(e.who.clone(), UsageSums::default());
            self.bucket_rows += 1;
        }
        rows.get_mut(e.who)
            .expect("inserted above")
            .add(&e.tokens, e.cost_nusd);
        self.records.push_back(UsageRecord {
            seq,
            at_ms: e.at_ms,
            request_id: e.request_id.to_owned(),
            who: e.who.clone(),
            tokens: e.tokens,
            cost_nusd: e.cost_nusd,
            price_version: e.price_version,
        });
        while self.bucket_rows > max_rows {
            self.drop_oldest_period();
        }
        seq
    }

    /// Drops the oldest records beyond `max_records`. Called when a batch part begins, not per
    /// record, so every record a part wrote is still here when the part ends: the node's
    /// on-disk archive copies them from here after each part.
    pub fn trim(&mut self, max_records: u64) {
        while self.records.len() as u64 > max_records {
            let r = self.records.pop_front().expect("non-empty");
            self.dropped_seq = r.seq;
            self.dropped_ms = r.at_ms;
        }
    }

    /// Seq of the oldest record held (`next_seq` when none is).
    pub fn first_seq(&self) -> u64 {
        self.records.front().map_or(self.next_seq, |r| r.seq)
    }

    /// Drops aggregate periods that ended `retention_ms` or more before `now_ms`.
    pub fn expire(&mut self, now_ms: i64, retention_ms: u64) {
        let horizon = now_ms.saturating_sub(i64::try_from(retention_ms).unwrap_or(i64::MAX));
        while self
            .buckets
            .first_key_value()
            .is_some_and(|(start, _)| start + BUCKET_MS <= horizon)
        {
            self.drop_oldest_period();
        }
    }

    fn drop_oldest_period(&mut self) {
        let (start, rows) = self.buckets.pop_first().expect("rows > 0 means a period");
        self.bucket_rows -= rows.len() as u64;
        self.buckets_from_ms = start + BUCKET_MS;
    }

    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Up to `max` (at most [`MAX_EXPORT_PAGE`]) records after `after_seq`.
    pub fn export(&self, after_seq: u64, max: usize) -> Result<Vec<UsageRecord>, ReadError> {
        if after_seq < self.dropped_seq {
            return Err(ReadError::PastRetention {
                what: "usage records",
                available_from: i64::try_from(self.dropped_seq + 1).unwrap_or(i64::MAX),
                hint: "resume from a cursor at or after it (older records were dropped by --max-usage-records)",
            });
        }
        let first = self.records.front().map_or(self.next_seq, |r| r.seq);
        let skip = usize::try_from((after_seq + 1).saturating_sub(first)).unwrap_or(usize::MAX);
        Ok(self
            .records
            .iter()
            .skip(skip)
            .take(max.min(MAX_EXPORT_PAGE))
            .cloned()
            .collect())
    }

    /// Answers a billing query: minute rows from the records, coarser ones from aggregates.
    pub fn query(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, ReadError> {
        let tz = check_query(q)?;
        let mut rows = Rows {
            query: q,
            tz,
            cached: (0, 0),
            out: BTreeMap::new(),
        };
        if q.granularity == Granularity::Minute {
            if self.dropped_ms >= q.start_ms {
                return Err(ReadError::PastRetention {
                    what: "usage records (minute granularity)",
                    available_from: (self.dropped_ms.div_euclid(60_000) + 1) * 60_000,
                    hint: "query from that time on, or at hour granularity or coarser",
                });
            }
            let from = self.records.partition_point(|r| r.at_ms < q.start_ms);
            for r in self.records.range(from..) {
                if r.at_ms >= q.end_ms {
                    break;
                }
                let mut sums = UsageSums::default();
                sums.add(&r.tokens, r.cost_nusd);
                rows.add(r.at_ms, &r.who, &sums)?;
            }
        } else {
            if q.start_ms < self.buckets_from_ms {
                return Err(ReadError::PastRetention {
                    what: "usage aggregates",
                    available_from: self.buckets_from_ms,
                    hint: "query from that time on (older periods were dropped by retention)",
                });
            }
            for (start, period) in self.buckets.range(q.start_ms..q.end_ms) {
                for (who, sums) in period {
                    rows.add(*start, who, sums)?;
                }
            }
        }
        Ok(rows
            .out
            .into_iter()
            .map(|((period_start_ms, group), sums)| UsageRow {
                period_start_ms,
                group,
                sums,
            })
            .collect())
    }
}

fn check_query(q: &UsageQuery) -> Result<TimeZone, ReadError> {
    let in_range = |t: i64| (MIN_TIME_MS..=MAX_TIME_MS).contains(&t);
    if !in_range(q.start_ms) {
        return Err(ReadError::invalid("start_ms", "outside 1970..5000"));
    }
    if !in_range(q.end_ms) || q.end_ms <= q.start_ms {
        return Err(ReadError::invalid(
            "end_ms",
            "must be after start_ms, before 5000",
        ));
    }
    let step = match q.granularity {
        Granularity::Minute => 60_000,
        _ => BUCKET_MS,
    };
    for (field, t) in [("start_ms", q.start_ms), ("end_ms", q.end_ms)] {
        if t % step != 0 {
            return Err(ReadError::invalid(
                field,
                format!(
                    "must be a multiple of {} minutes for this granularity",
                    step / 60_000
                ),
            ));
        }
    }
    if q.group_by.len() > MAX_DIMENSIONS {
        return Err(ReadError::invalid(
            "group_by",
            format!("at most {MAX_DIMENSIONS} dimensions"),
        ));
    }
    TimeZone::get(&q.time_zone)
        .map_err(|e| ReadError::invalid("time_zone", format!("{:?}: {e}", q.time_zone)))
}

/// A query's answer being gathered.
struct Rows<'a> {
    query: &'a UsageQuery,
    tz: TimeZone,
    /// The last day or month computed, `[start, end)`: calendar math once per period.
    cached: (i64, i64),
    out: BTreeMap<(i64, Vec<String>), UsageSums>,
}

impl Rows<'_> {
    fn add(&mut self, at_ms: i64, who: &Attribution, sums: &UsageSums) -> Result<(), ReadError> {
        if !self.query.filter.matches(who) {
            return Ok(());
        }
        let period = self.period_start(at_ms);
        let group: Vec<String> = self
            .query
            .group_by
            .iter()
            .map(|d| who.value(d).to_owned())
            .collect();
        self.out.entry((period, group)).or_default().merge(sums);
        if self.out.len() > MAX_QUERY_ROWS {
            return Err(ReadError::TooLarge {
                what: "usage query",
                max: MAX_QUERY_ROWS,
            });
        }
        Ok(())
    }

    fn period_start(&mut self, at_ms: i64) -> i64 {
        let unit = match self.query.granularity {
            Granularity::Minute => return at_ms - at_ms.rem_euclid(60_000),
            Granularity::Total => return self.query.start_ms,
            Granularity::Hour => {
                // The instant's own offset: both hours of a DST fall-back stay apart.
                let ts = Timestamp::from_millisecond(at_ms).expect("checked range");
                let offset_ms = i64::from(self.tz.to_offset(ts).seconds()) * 1_000;
                let local = at_ms + offset_ms;
                return local - local.rem_euclid(3_600_000) - offset_ms;
            }
            Granularity::Day => CalendarUnit::Day,
            Granularity::Month => CalendarUnit::Month { day: 1 },
        };
        if !(self.cached.0 <= at_ms && at_ms < self.cached.1) {
            self.cached = calendar::bounds(unit, &self.tz, at_ms);
        }
        self.cached.0
    }
}
