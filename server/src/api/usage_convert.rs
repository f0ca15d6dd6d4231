//! Wire ⇄ domain conversions of `tally.v1.Usage`: small `From`/`TryFrom` impls at the API
//! boundary. Wire requests become engine types (whose `validate` then names the wire fields);
//! engine answers become wire messages. Nothing here panics on network input.

use tally_proto::tally::v1 as wire;
use tally_proto::tally::v1::{usage_event, usage_receipt};

use crate::engine::CommandError;
use crate::engine::usage::{
    Attribution, Commit, Dimension, Enforcement, Event, EventKind, Granularity,
    MAX_RESERVATION_TTL_MS, MAX_TAGS, MAX_USAGE_STRING_BYTES, Metric, ModelPrice, PriceCatalog,
    QuotaFilter, QuotaStanding, ReadError, Receipt, ReportUsage, Reserve, Settled, Tokens,
    UsageQuery, UsageRecord, UsageResult, UsageRow,
};

/// The zone a query without one is taken in.
pub const DEFAULT_TIME_ZONE: &str = "UTC";

/// A request's tags as the engine wants them: sorted by key, keys unique. Checked in wire
/// order first, so errors name the tag as the caller sent it (`tags[2].key`).
pub fn tags(wire: Vec<wire::Tag>) -> Result<Vec<(String, String)>, CommandError> {
    if wire.len() > MAX_TAGS {
        return Err(CommandError::invalid(
            "tags",
            format!("{} tags; at most {MAX_TAGS}", wire.len()),
        ));
    }
    for (i, t) in wire.iter().enumerate() {
        if t.key.is_empty() {
            return Err(CommandError::invalid(
                format!("tags[{i}].key"),
                "must not be empty",
            ));
        }
        for (part, s) in [("key", &t.key), ("value", &t.value)] {
            if s.len() > MAX_USAGE_STRING_BYTES {
                return Err(CommandError::invalid(
                    format!("tags[{i}].{part}"),
                    format!("longer than {MAX_USAGE_STRING_BYTES} bytes"),
                ));
            }
        }
    }
    let mut tags: Vec<(String, String)> = wire.into_iter().map(|t| (t.key, t.value)).collect();
    tags.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = tags.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(CommandError::invalid(
            "tags",
            format!("key {:?} is repeated (tag keys must be unique)", w[0].0),
        ));
    }
    Ok(tags)
}

fn tags_to_wire(tags: Vec<(String, String)>) -> Vec<wire::Tag> {
    tags.into_iter()
        .map(|(key, value)| wire::Tag { key, value })
        .collect()
}

impl From<wire::TokenCounts> for Tokens {
    fn from(t: wire::TokenCounts) -> Tokens {
        Tokens {
            input: t.input_tokens,
            output: t.output_tokens,
            cached_input: t.cached_input_tokens,
            reasoning: t.reasoning_tokens,
        }
    }
}

impl TryFrom<wire::ReportUsageRequest> for ReportUsage {
    type Error = CommandError;

    fn try_from(r: wire::ReportUsageRequest) -> Result<ReportUsage, CommandError> {
        Ok(ReportUsage {
            request_id: r.request_id,
            who: Attribution {
                subject: r.subject,
                subscription: r.subscription,
                model: r.model,
                tags: tags(r.tags)?,
            },
            tokens: Tokens {
                input: r.input_tokens,
                output: r.output_tokens,
                cached_input: r.cached_input_tokens,
                reasoning: r.reasoning_tokens,
            },
        })
    }
}

impl TryFrom<wire::ReserveRequest> for Reserve {
    type Error = CommandError;

    fn try_from(r: wire::ReserveRequest) -> Result<Reserve, CommandError> {
        // Checked here too so the error names the wire field (`ttl_ms`).
        if r.ttl_ms == 0 || r.ttl_ms > MAX_RESERVATION_TTL_MS {
            return Err(CommandError::invalid(
                "ttl_ms",
                format!("must be 1..={MAX_RESERVATION_TTL_MS}, got {}", r.ttl_ms),
            ));
        }
        Ok(Reserve {
            request_id: r.request_id,
            who: Attribution {
                subject: r.subject,
                subscription: r.subscription,
                model: r.model,
                tags: tags(r.tags)?,
            },
            estimate: r.estimate.map(Tokens::from).unwrap_or_default(),
            ttl_ms: r.ttl_ms,
            charge_on_expiry: r.charge_on_expiry,
        })
    }
}

impl From<wire::CommitRequest> for Commit {
    fn from(r: wire::CommitRequest) -> Commit {
        Commit {
            request_id: r.request_id,
            tokens: Tokens {
                input: r.input_tokens,
                output: r.output_tokens,
                cached_input: r.cached_input_tokens,
                reasoning: r.reasoning_tokens,
            },
        }
    }
}

impl From<wire::ModelPrice> for ModelPrice {
    fn from(p: wire::ModelPrice) -> ModelPrice {
        ModelPrice {
            model: p.model,
            input_nusd: p.input_nusd,
            cached_input_nusd: p.cached_input_nusd,
            output_nusd: p.output_nusd,
        }
    }
}

impl From<&ModelPrice> for wire::ModelPrice {
    fn from(p: &ModelPrice) -> wire::ModelPrice {
        wire::ModelPrice {
            model: p.model.clone(),
            input_nusd: p.input_nusd,
            cached_input_nusd: p.cached_input_nusd,
            output_nusd: p.output_nusd,
        }
    }
}

impl From<wire::SetPricesRequest> for PriceCatalog {
    fn from(r: wire::SetPricesRequest) -> PriceCatalog {
        PriceCatalog {
            models: r.models.into_iter().map(ModelPrice::from).collect(),
        }
    }
}

/// Parses one `group_by` entry: `subject`, `subscription`, `model` or `tag:KEY`.
pub fn dimension(s: &str, field: &str) -> Result<Dimension, ReadError> {
    match s {
        "subject" => Ok(Dimension::Subject),
        "subscription" => Ok(Dimension::Subscription),
        "model" => Ok(Dimension::Model),
        _ => match s.strip_prefix("tag:") {
            Some("") => Err(ReadError::invalid(
                field,
                "`tag:` needs a tag key (tag:KEY)",
            )),
            Some(key) if key.len() > MAX_USAGE_STRING_BYTES => Err(ReadError::invalid(
                field,
                format!("tag key longer than {MAX_USAGE_STRING_BYTES} bytes"),
            )),
            Some(key) => Ok(Dimension::Tag(key.to_owned())),
            None => Err(ReadError::invalid(
                field,
                format!("{s:?} is not subject, subscription, model or tag:KEY"),
            )),
        },
    }
}

/// A wire `Granularity`; UNSPECIFIED (or an unknown value) is refused, naming the field.
pub fn granularity(g: i32) -> Result<Granularity, ReadError> {
    match wire::Granularity::try_from(g) {
        Ok(wire::Granularity::Minute) => Ok(Granularity::Minute),
        Ok(wire::Granularity::Hour) => Ok(Granularity::Hour),
        Ok(wire::Granularity::Day) => Ok(Granularity::Day),
        Ok(wire::Granularity::Month) => Ok(Granularity::Month),
        Ok(wire::Granularity::Total) => Ok(Granularity::Total),
        Ok(wire::Granularity::Unspecified) | Err(_) => Err(ReadError::invalid(
            "granularity",
            format!("must be MINUTE, HOUR, DAY, MONTH or TOTAL (got {g})"),
        )),
    }
}

impl TryFrom<wire::UsageFilter> for QuotaFilter {
    type Error = ReadError;

    fn try_from(f: wire::UsageFilter) -> Result<QuotaFilter, ReadError> {
        let tag = match f.tag {
            Some(t) if t.key.is_empty() => {
                return Err(ReadError::invalid("filter.tag.key", "must not be empty"));
            }
            Some(t) => Some((t.key, t.value)),
            None => None,
        };
        Ok(QuotaFilter {
            subject: f.subject,
            subscription: f.subscription,
            model: f.model,
            tag,
            except_subjects: Vec::new(),
        })
    }
}

impl TryFrom<wire::QueryUsageRequest> for UsageQuery {
    type Error = ReadError;

    fn try_from(r: wire::QueryUsageRequest) -> Result<UsageQuery, ReadError> {
        let group_by = r
            .group_by
            .iter()
            .enumerate()
            .map(|(i, s)| dimension(s, &format!("group_by[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(UsageQuery {
            start_ms: r.start_ms,
            end_ms: r.end_ms,
            group_by,
            granularity: granularity(r.granularity)?,
            time_zone: if r.time_zone.is_empty() {
                DEFAULT_TIME_ZONE.to_owned()
            } else {
                r.time_zone
            },
            filter: r
                .filter
                .map(QuotaFilter::try_from)
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

impl From<Metric> for wire::Metric {
    fn from(m: Metric) -> wire::Metric {
        match m {
            Metric::Requests => wire::Metric::Requests,
            Metric::TotalTokens => wire::Metric::TotalTokens,
            Metric::InputTokens => wire::Metric::InputTokens,
            Metric::OutputTokens => wire::Metric::OutputTokens,
            Metric::CostNusd => wire::Metric::CostNusd,
            Metric::Concurrent => wire::Metric::Concurrent,
        }
    }
}

impl From<Enforcement> for wire::Enforcement {
    fn from(e: Enforcement) -> wire::Enforcement {
        match e {
            Enforcement::Hard => wire::Enforcement::Hard,
            Enforcement::Soft => wire::Enforcement::Soft,
            Enforcement::Shadow => wire::Enforcement::Shadow,
        }
    }
}

impl From<Settled> for wire::Settled {
    fn from(s: Settled) -> wire::Settled {
        match s {
            Settled::NoReservation => wire::Settled::NoReservation,
            Settled::Reservation => wire::Settled::Reservation,
            Settled::Lapsed => wire::Settled::Lapsed,
            Settled::Expired => wire::Settled::Expired,
        }
    }
}

impl From<QuotaStanding> for wire::QuotaStanding {
    fn from(s: QuotaStanding) -> wire::QuotaStanding {
        wire::QuotaStanding {
            quota: s.quota,
            key: s.key,
            metric: wire::Metric::from(s.metric) as i32,
            enforcement: wire::Enforcement::from(s.enforcement) as i32,
            limit: s.limit,
            used: s.used,
            reserved: s.reserved,
            remaining: s.remaining,
            reset_in_ms: s.reset_in_ms,
        }
    }
}

fn standings(s: Vec<QuotaStanding>) -> Vec<wire::QuotaStanding> {
    s.into_iter().map(wire::QuotaStanding::from).collect()
}

impl From<Receipt> for wire::UsageReceipt {
    fn from(r: Receipt) -> wire::UsageReceipt {
        use usage_receipt::Result as R;
        let result = match r.result {
            UsageResult::Recorded {
                seq,
                at_ms,
                cost_nusd,
                price_version,
                settled,
                overshoot,
                over,
            } => R::Recorded(usage_receipt::Recorded {
                seq,
                at_ms,
                cost_nusd,
                price_version,
                settled: wire::Settled::from(settled) as i32,
                overshoot_tokens: overshoot.tokens,
                overshoot_cost_nusd: overshoot.cost_nusd,
                over: standings(over),
            }),
            UsageResult::Reserved {
                expires_ms,
                standings: s,
            } => R::Reserved(usage_receipt::Reserved {
                expires_ms,
                standings: standings(s),
            }),
            UsageResult::Denied { standing } => R::Denied(usage_receipt::Denied {
                standing: Some(standing.into()),
            }),
            UsageResult::Released { found } => R::Released(usage_receipt::Released { found }),
        };
        wire::UsageReceipt {
            request_id: r.request_id,
            duplicate: r.duplicate,
            result: Some(result),
        }
    }
}

impl From<UsageRow> for wire::UsageRow {
    fn from(r: UsageRow) -> wire::UsageRow {
        wire::UsageRow {
            period_start_ms: r.period_start_ms,
            group: r.group,
            requests: r.sums.requests,
            input_tokens: r.sums.input_tokens,
            output_tokens: r.sums.output_tokens,
            cached_input_tokens: r.sums.cached_input_tokens,
            reasoning_tokens: r.sums.reasoning_tokens,
            cost_nusd: r.sums.cost_nusd,
        }
    }
}

impl From<UsageRecord> for wire::UsageRecord {
    fn from(r: UsageRecord) -> wire::UsageRecord {
        wire::UsageRecord {
            seq: r.seq,
            at_ms: r.at_ms,
            request_id: r.request_id,
            subject: r.who.subject,
            subscription: r.who.subscription,
            model: r.who.model,
            tags: tags_to_wire(r.who.tags),
            input_tokens: r.tokens.input,
            output_tokens: r.tokens.output,
            cached_input_tokens: r.tokens.cached_input,
            reasoning_tokens: r.tokens.reasoning,
            cost_nusd: r.cost_nusd,
            price_version: r.price_version,
        }
    }
}

impl From<Event> for wire::UsageEvent {
    fn from(e: Event) -> wire::UsageEvent {
        use usage_event::Kind;
        let kind = match e.kind {
            EventKind::Threshold { standing, pct } => Kind::Threshold(usage_event::Threshold {
                standing: Some(standing.into()),
                pct: u32::from(pct),
            }),
            EventKind::Exceeded { standing } => Kind::Exceeded(usage_event::Exceeded {
                standing: Some(standing.into()),
            }),
            EventKind::ReservationExpired { request_id } => {
                Kind::ReservationExpired(usage_event::ReservationExpired { request_id })
            }
        };
        wire::UsageEvent {
            seq: e.seq,
            at_ms: e.at_ms,
            kind: Some(kind),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(k: &str, v: &str) -> wire::Tag {
        wire::Tag {
            key: k.into(),
            value: v.into(),
        }
    }

    fn field(e: CommandError) -> String {
        match e {
            CommandError::Invalid { field, .. } => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn tags_are_sorted_and_a_repeated_key_names_tags() {
        let t = tags(vec![tag("team", "a"), tag("env", "prod")]).unwrap();
        assert_eq!(
            t,
            [("env".into(), "prod".into()), ("team".into(), "a".into())]
        );
        let e = tags(vec![tag("a", "1"), tag("b", "2"), tag("a", "3")]).unwrap_err();
        assert!(e.to_string().contains("\"a\" is repeated"), "{e}");
        assert_eq!(field(e), "tags");
        assert_eq!(
            field(tags(vec![tag("a", "1"), tag("", "2")]).unwrap_err()),
            "tags[1].key"
        );
        let long = "x".repeat(MAX_USAGE_STRING_BYTES + 1);
        assert_eq!(
            field(tags(vec![tag("a", &long)]).unwrap_err()),
            "tags[0].value"
        );
        let many = (0..=MAX_TAGS).map(|i| tag(&i.to_string(), "")).collect();
        assert_eq!(field(tags(many).unwrap_err()), "tags");
    }

    #[test]
    fn group_by_and_granularity_parse_or_name_the_field() {
        assert_eq!(dimension("model", "g").unwrap(), Dimension::Model);
        assert_eq!(
            dimension("tag:team", "g").unwrap(),
            Dimension::Tag("team".into())
        );
        for bad in ["tag:", "Model", "tags:x", ""] {
            let e = dimension(bad, "group_by[1]").unwrap_err();
            assert!(e.to_string().contains("group_by[1]"), "{e}");
        }
        assert_eq!(granularity(2).unwrap(), Granularity::Hour);
        for bad in [0, 6, -1] {
            let e = granularity(bad).unwrap_err();
            assert!(e.to_string().contains("granularity"), "{e}");
        }
    }

    #[test]
    fn a_query_defaults_its_zone_and_filter() {
        let q = UsageQuery::try_from(wire::QueryUsageRequest {
            start_ms: 0,
            end_ms: 10,
            group_by: vec!["subject".into(), "tag:team".into()],
            granularity: wire::Granularity::Total as i32,
            time_zone: String::new(),
            filter: None,
        })
        .unwrap();
        assert_eq!(q.time_zone, "UTC");
        assert_eq!(q.filter, QuotaFilter::default());
        assert_eq!(
            q.group_by,
            [Dimension::Subject, Dimension::Tag("team".into())]
        );
        let e = UsageQuery::try_from(wire::QueryUsageRequest {
            granularity: wire::Granularity::Day as i32,
            filter: Some(wire::UsageFilter {
                tag: Some(tag("", "x")),
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("filter.tag.key"), "{e}");
    }

    #[test]
    fn reserve_ttl_is_checked_under_its_wire_name() {
        let r = wire::ReserveRequest {
            request_id: "r".into(),
            subject: "s".into(),
            ttl_ms: 0,
            ..Default::default()
        };
        assert_eq!(field(Reserve::try_from(r.clone()).unwrap_err()), "ttl_ms");
        let ok = Reserve::try_from(wire::ReserveRequest { ttl_ms: 1_000, ..r }).unwrap();
        assert_eq!(ok.estimate, Tokens::default());
        ok.validate().unwrap();
    }

    #[test]
    fn receipts_and_events_map_every_field() {
        let standing = QuotaStanding {
            quota: "q".into(),
            key: vec!["k".into()],
            metric: Metric::CostNusd,
            enforcement: Enforcement::Soft,
            limit: 10,
            used: 11,
            reserved: 1,
            remaining: 0,
            reset_in_ms: 5,
        };
        let w = wire::UsageReceipt::from(Receipt {
            request_id: "r".into(),
            duplicate: true,
            result: UsageResult::Recorded {
                seq: 7,
                at_ms: 9,
                cost_nusd: 100,
                price_version: 2,
                settled: Settled::Lapsed,
                overshoot: crate::engine::usage::Overshoot {
                    tokens: 3,
                    cost_nusd: 4,
                },
                over: vec![standing.clone()],
            },
        });
        assert!(w.duplicate);
        let Some(usage_receipt::Result::Recorded(r)) = w.result else {
            panic!("recorded");
        };
        assert_eq!(
            (r.seq, r.at_ms, r.cost_nusd, r.price_version),
            (7, 9, 100, 2)
        );
        assert_eq!(r.settled, wire::Settled::Lapsed as i32);
        assert_eq!((r.overshoot_tokens, r.overshoot_cost_nusd), (3, 4));
        assert_eq!(r.over[0].metric, wire::Metric::CostNusd as i32);
        assert_eq!(r.over[0].enforcement, wire::Enforcement::Soft as i32);
        assert_eq!((r.over[0].used, r.over[0].reserved), (11, 1));

        let e = wire::UsageEvent::from(Event {
            seq: 3,
            at_ms: 4,
            kind: EventKind::Threshold { standing, pct: 80 },
        });
        assert!(matches!(
            e.kind,
            Some(usage_event::Kind::Threshold(usage_event::Threshold {
                pct: 80,
                ..
            }))
        ));
    }
}
