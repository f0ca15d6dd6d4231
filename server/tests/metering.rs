//! Metering in the engine, checked against independent models:
//!
//! 1. exactly once: every report retried several times, in any batches, counts once;
//! 2. reservations: 64 concurrent streams never get more admitted than a hard budget holds;
//!    overshoot of actual over estimate is bounded by what the commits reported;
//! 3. calendar resets in a DST zone; thresholds fire once per period;
//! 4. QueryUsage and ExportUsage agree with an oracle fed the same reports (proptest);
//! 5. expiry is deterministic, request ids are forgotten only after retention, and the
//!    metering state survives snapshot/restore byte for byte.
//! 6. request-time checks: a hard budget with no room for one more unit refuses, soft and
//!    shadow quotas never do, and a check changes no state.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use tally_server::engine::limits::{CalendarUnit, WindowSpec};
use tally_server::engine::usage::{
    Attribution, CheckQuotas, Commit, Dimension, Enforcement, EventKind, Granularity, Metric,
    ModelPrice, PriceCatalog, QuotaCheck, QuotaFilter, QuotaSet, QuotaSpec, Receipt, ReportUsage,
    Reserve, Settled, Tokens, UsageQuery, UsageResult, UsageSums,
};
use tally_server::engine::{Command, CommandError, Engine, EngineSettings, Outcome};

const MIN: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;
/// 2026-03-07T12:00:00Z, a day before New York's spring DST change.
const T0: i64 = 1_772_884_800_000;

fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn who(subject: &str, subscription: &str, model: &str) -> Attribution {
    Attribution {
        subject: subject.into(),
        subscription: subscription.into(),
        model: model.into(),
        tags: vec![],
    }
}

fn tokens(input: u64, output: u64) -> Tokens {
    Tokens {
        input,
        output,
        ..Tokens::default()
    }
}

fn report(id: &str, w: Attribution, t: Tokens) -> Command {
    Command::ReportUsage(ReportUsage {
        request_id: id.into(),
        who: w,
        tokens: t,
    })
}

fn reserve(id: &str, w: Attribution, estimate: Tokens, ttl_ms: u64) -> Command {
    Command::Reserve(Reserve {
        request_id: id.into(),
        who: w,
        estimate,
        ttl_ms,
        charge_on_expiry: false,
    })
}

fn commit(id: &str, t: Tokens) -> Command {
    Command::Commit(Commit {
        request_id: id.into(),
        tokens: t,
    })
}

fn quota(name: &str, metric: Metric, limit: u64, window: Option<WindowSpec>) -> QuotaSpec {
    QuotaSpec {
        name: name.into(),
        filter: QuotaFilter::default(),
        per: vec![Dimension::Subject],
        metric,
        limit,
        window,
        enforcement: Enforcement::Hard,
        thresholds_pct: vec![],
    }
}

fn receipt(o: &Outcome) -> &Receipt {
    match o {
        Outcome::Usage(r) => r,
        other => panic!("expected a usage receipt, got {other:?}"),
    }
}

fn one(engine: &mut Engine, at_ms: i64, c: Command) -> Outcome {
    engine.apply(at_ms, &[c]).pop().expect("one outcome")
}

fn engine_with(quotas: Vec<QuotaSpec>, prices: Vec<ModelPrice>) -> Engine {
    let mut e = Engine::new(EngineSettings::default());
    let out = e.apply(
        0,
        &[
            Command::ReplaceQuotas(QuotaSet { quotas }),
            Command::SetPrices(PriceCatalog { models: prices }),
        ],
    );
    assert!(matches!(out[0], Outcome::QuotasReplaced { .. }), "{out:?}");
    assert!(
        matches!(out[1], Outcome::PricesSet { version: 1 }),
        "{out:?}"
    );
    e
}

fn price(model: &str, input: u64, cached: u64, output: u64) -> ModelPrice {
    ModelPrice {
        model: model.into(),
        input_nusd: input,
        cached_input_nusd: cached,
        output_nusd: output,
    }
}

fn total_query(start_ms: i64, end_ms: i64) -> UsageQuery {
    UsageQuery {
        start_ms,
        end_ms,
        group_by: vec![],
        granularity: Granularity::Total,
        time_zone: "UTC".into(),
        filter: QuotaFilter::default(),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Exactly once
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(64))]

    /// Reports retried 1..=4 times, shuffled into batches at increasing times, count once:
    /// the ledger holds one record per id, every retry answers the first receipt, and the
    /// query's sums are the sums of the distinct reports.
    #[test]
    fn retried_reports_count_once(
        reports in prop::collection::vec((1u64..1_000, 0u64..1_000, 1usize..=4), 1..40),
        order in prop::collection::vec(any::<u32>(), 160),
        cuts in prop::collection::vec(1usize..8, 40),
    ) {
        let mut e = engine_with(vec![], vec![price("m", 3, 1, 7)]);
        let mut sends = Vec::new();
        for (i, (input, output, tries)) in reports.iter().enumerate() {
            for _ in 0..*tries {
                sends.push((i, tokens(*input, *output)));
            }
        }
        // Any order: whichever send of an id arrives first is the one recorded.
        let mut keyed: Vec<_> = sends.into_iter().zip(order.iter().cycle()).collect();
        keyed.sort_by_key(|(_, k)| **k);
        let mut first: BTreeMap<usize, Receipt> = BTreeMap::new();
        let mut at = T0;
        let mut rest = &keyed[..];
        let mut cut = cuts.iter().cycle();
        while !rest.is_empty() {
            let n = (*cut.next().unwrap()).min(rest.len());
            let (batch, tail) = rest.split_at(n);
            rest = tail;
            let cmds: Vec<Command> = batch
                .iter()
                .map(|((i, t), _)| report(&format!("req-{i}"), who("k", "s", "m"), *t))
                .collect();
            let outs = e.apply(at, &cmds);
            for (((i, _), _), o) in batch.iter().zip(&outs) {
                let r = receipt(o).clone();
                match first.get(i) {
                    None => {
                        prop_assert!(!r.duplicate);
                        first.insert(*i, r);
                    }
                    Some(f) => {
                        prop_assert!(r.duplicate);
                        prop_assert_eq!(&r.result, &f.result);
                    }
                }
            }
            at += 1_000;
        }
        prop_assert_eq!(e.last_usage_seq(), reports.len() as u64);
        let exported = e.export_usage(0, 10_000).unwrap();
        let ids: BTreeSet<_> = exported.iter().map(|r| r.request_id.clone()).collect();
        prop_assert_eq!(ids.len(), reports.len());
        let mut want = UsageSums::default();
        for (input, output, _) in &reports {
            want.add(&tokens(*input, *output), input * 3 + output * 7);
        }
        let start = T0 - T0 % (15 * MIN);
        let rows = e.query_usage(&total_query(start, start + DAY)).unwrap();
        prop_assert_eq!(rows.len(), 1);
        prop_assert_eq!(rows[0].sums, want);
    }
}

#[test]
fn a_commit_retried_after_its_reservation_settled_counts_once() {
    let mut e = engine_with(
        vec![quota(
            "daily",
            Metric::TotalTokens,
            1_000,
            Some(fixed_day()),
        )],
        vec![],
    );
    let r = one(
        &mut e,
        T0,
        reserve("a", who("k", "", ""), tokens(100, 100), 60_000),
    );
    assert!(matches!(receipt(&r).result, UsageResult::Reserved { .. }));
    let c1 = one(&mut e, T0 + 1, commit("a", tokens(50, 50)));
    let c2 = one(&mut e, T0 + 2, commit("a", tokens(50, 50)));
    let rep = one(
        &mut e,
        T0 + 3,
        report("a", who("k", "", ""), tokens(50, 50)),
    );
    assert!(!receipt(&c1).duplicate);
    assert!(receipt(&c2).duplicate && receipt(&rep).duplicate);
    assert_eq!(receipt(&c2).result, receipt(&c1).result);
    assert_eq!(e.last_usage_seq(), 1);
    let s = &e.usage_overview("k", "")[0];
    assert_eq!((s.used, s.reserved, s.remaining), (100, 0, 900));
}

#[test]
fn a_full_request_id_table_refuses_new_ids_and_forgets_only_after_retention() {
    let mut e = Engine::new(EngineSettings {
        max_request_ids: 2,
        request_id_retention_ms: 2 * HOUR as u64,
        ..EngineSettings::default()
    });
    let w = who("k", "", "");
    for id in ["a", "b"] {
        let o = one(&mut e, T0, report(id, w.clone(), tokens(1, 1)));
        assert!(!receipt(&o).duplicate);
    }
    let refused = one(&mut e, T0 + HOUR, report("c", w.clone(), tokens(1, 1)));
    assert!(
        matches!(
            &refused,
            Outcome::Rejected(CommandError::UsageTableFull { max: 2, .. })
        ),
        "{refused:?}"
    );
    // Still remembered inside retention: the retry is a duplicate, not a new record.
    let retry = one(
        &mut e,
        T0 + 2 * HOUR - 1,
        report("a", w.clone(), tokens(1, 1)),
    );
    assert!(receipt(&retry).duplicate);
    // Past retention the ids are forgotten and new ones fit.
    let later = one(&mut e, T0 + 2 * HOUR, report("c", w, tokens(1, 1)));
    assert!(!receipt(&later).duplicate);
    assert_eq!(e.remembered_request_ids(), 1);
    assert_eq!(e.last_usage_seq(), 3);
}

// ---------------------------------------------------------------------------------------------
// 2. Reservations
// ---------------------------------------------------------------------------------------------

fn fixed_day() -> WindowSpec {
    WindowSpec::Fixed {
        duration_ms: DAY as u64,
    }
}

proptest! {
    #![proptest_config(config(48))]

    /// 64 streams reserve, then commit (actual ≤ estimate), release, or vanish (TTL), in
    /// random order and batches. At every point: recorded + held ≤ budget, admitted
    /// estimates never exceed what the budget had room for, and the concurrency cap holds.
    #[test]
    fn concurrent_reservations_never_exceed_the_budget(
        plan in prop::collection::vec((1u64..400, 0u8..3, any::<u16>()), 64),
        batch_sizes in prop::collection::vec(1usize..16, 64),
    ) {
        const BUDGET: u64 = 5_000;
        const CAP: u64 = 20;
        let mut e = engine_with(
            vec![
                quota("budget", Metric::TotalTokens, BUDGET, Some(fixed_day())),
                quota("in-flight", Metric::Concurrent, CAP, None),
            ],
            vec![],
        );
        let w = who("k", "", "");
        let mut admitted: BTreeMap<usize, u64> = BTreeMap::new();
        let mut pending: Vec<Command> = plan
            .iter()
            .enumerate()
            .map(|(i, (est, _, _))| reserve(&format!("s{i}"), w.clone(), tokens(*est, 0), 10_000))
            .collect();
        let mut at = T0;
        let mut sizes = batch_sizes.iter().cycle();
        let mut recorded = 0u64;
        while !pending.is_empty() {
            let n = (*sizes.next().unwrap()).min(pending.len());
            let batch: Vec<Command> = pending.drain(..n).collect();
            let outs = e.apply(at, &batch);
            for (c, o) in batch.iter().zip(&outs) {
                let r = receipt(o);
                let i: usize = r.request_id[1..].parse().unwrap();
                let (est, fate, _) = plan[i];
                match (c, &r.result) {
                    (Command::Reserve(_), UsageResult::Reserved { .. }) => {
                        admitted.insert(i, est);
                        match fate {
                            0 => pending.push(commit(&r.request_id, tokens(est / 2, 0))),
                            1 => pending.push(Command::Release { request_id: r.request_id.clone() }),
                            _ => {} // never settles: its TTL releases it
                        }
                    }
                    (Command::Reserve(_), UsageResult::Denied { standing }) => {
                        prop_assert!(
                            standing.used + standing.reserved + est > standing.limit,
                            "denied with room: {standing:?}"
                        );
                    }
                    (Command::Commit(_), UsageResult::Recorded { overshoot, .. }) => {
                        recorded += est / 2;
                        prop_assert_eq!(overshoot.tokens, 0);
                    }
                    (Command::Release { .. }, UsageResult::Released { found }) => prop_assert!(*found),
                    (c, r) => prop_assert!(false, "{c:?} answered {r:?}"),
                }
            }
            let s = e.usage_overview("k", "");
            prop_assert!(s[0].used + s[0].reserved <= BUDGET, "{:?}", s[0]);
            prop_assert_eq!(s[0].used, recorded);
            prop_assert!(s[1].reserved <= CAP, "{:?}", s[1]);
            prop_assert_eq!(s[1].reserved as usize, e.open_reservations());
            at += 100;
        }
        // Every reservation that never settled expires at its TTL, and frees its hold.
        e.apply(at + 10_000, &[]);
        prop_assert_eq!(e.open_reservations(), 0);
        let s = e.usage_overview("k", "");
        prop_assert_eq!((s[0].reserved, s[1].reserved), (0, 0));
        prop_assert!(!admitted.is_empty());
    }
}

#[test]
fn overshoot_is_recorded_and_reported_and_blocks_the_next_reservation() {
    let mut e = engine_with(
        vec![quota("budget", Metric::CostNusd, 10_000, Some(fixed_day()))],
        vec![price("m", 10, 2, 30)],
    );
    let w = who("k", "", "m");
    // Estimate 100 in + 100 out = 4,000 nusd; actual 100 in (50 cached) + 300 out = 9,600.
    let r = one(
        &mut e,
        T0,
        reserve("a", w.clone(), tokens(100, 100), 60_000),
    );
    assert!(matches!(receipt(&r).result, UsageResult::Reserved { .. }));
    let actual = Tokens {
        input: 100,
        output: 300,
        cached_input: 50,
        reasoning: 100,
    };
    let c = one(&mut e, T0 + 1, commit("a", actual));
    let UsageResult::Recorded {
        cost_nusd,
        overshoot,
        settled,
        price_version,
        ..
    } = &receipt(&c).result
    else {
        panic!("{c:?}")
    };
    assert_eq!(*cost_nusd, 50 * 10 + 50 * 2 + 300 * 30);
    assert_eq!(
        (overshoot.tokens, overshoot.cost_nusd),
        (200, 9_600 - 4_000)
    );
    assert_eq!((*settled, *price_version), (Settled::Reservation, 1));
    // 9,600 of 10,000 used: an estimate of 4,000 no longer fits.
    let d = one(&mut e, T0 + 2, reserve("b", w, tokens(100, 100), 60_000));
    let UsageResult::Denied { standing } = &receipt(&d).result else {
        panic!("{d:?}")
    };
    assert_eq!((standing.used, standing.remaining), (9_600, 400));
}

#[test]
fn an_expired_reservation_releases_itself_at_the_first_batch_past_its_ttl() {
    let mut e = engine_with(
        vec![quota("in-flight", Metric::Concurrent, 1, None)],
        vec![],
    );
    let w = who("k", "", "");
    let a = one(&mut e, T0, reserve("a", w.clone(), tokens(1, 0), 5_000));
    assert!(
        matches!(receipt(&a).result, UsageResult::Reserved { expires_ms, .. } if expires_ms == T0 + 5_000)
    );
    let b = one(
        &mut e,
        T0 + 4_999,
        reserve("b", w.clone(), tokens(1, 0), 5_000),
    );
    assert!(
        matches!(receipt(&b).result, UsageResult::Denied { .. }),
        "{b:?}"
    );
    let c = one(
        &mut e,
        T0 + 5_000,
        reserve("c", w.clone(), tokens(1, 0), 5_000),
    );
    assert!(
        matches!(receipt(&c).result, UsageResult::Reserved { .. }),
        "{c:?}"
    );
    let expired: Vec<_> = e
        .events_after(0, 100)
        .into_iter()
        .filter_map(|ev| match ev.kind {
            EventKind::ReservationExpired { request_id } => Some((request_id, ev.at_ms)),
            _ => None,
        })
        .collect();
    assert_eq!(expired, vec![("a".to_string(), T0 + 5_000)]);
    // The stream of the expired reservation ends after all: its usage is the truth.
    let late = one(&mut e, T0 + 6_000, commit("a", tokens(10, 10)));
    assert!(matches!(
        receipt(&late).result,
        UsageResult::Recorded {
            settled: Settled::Lapsed,
            ..
        }
    ));
    // A commit under an id never reserved is refused, naming the field.
    let unknown = one(&mut e, T0 + 6_001, commit("zzz", tokens(1, 1)));
    assert!(
        matches!(&unknown, Outcome::Rejected(CommandError::Invalid { field, .. }) if field == "request_id"),
        "{unknown:?}"
    );
}

/// A reservation made for a caller that may never report (Envoy sends nothing at stream end
/// for a client that disconnected) charges its estimate when its TTL passes; the quota keeps
/// it, the ledger has it, and a report arriving later is answered with that record.
#[test]
fn a_charge_on_expiry_reservation_records_its_estimate_at_the_first_batch_past_its_ttl() {
    let mut e = engine_with(
        vec![
            quota("daily", Metric::TotalTokens, 1_000, Some(fixed_day())),
            quota("in-flight", Metric::Concurrent, 1, None),
        ],
        vec![],
    );
    let w = who("k", "", "");
    let mut held = Reserve {
        request_id: "gone".into(),
        who: w.clone(),
        estimate: tokens(300, 100),
        ttl_ms: 5_000,
        charge_on_expiry: true,
    };
    let r = one(&mut e, T0, Command::Reserve(held.clone()));
    assert!(
        matches!(receipt(&r).result, UsageResult::Reserved { .. }),
        "{r:?}"
    );
    // Not yet expired at T0 + 4,999: nothing recorded, the in-flight slot taken.
    let busy = one(
        &mut e,
        T0 + 4_999,
        reserve("next", w.clone(), tokens(1, 0), 5_000),
    );
    assert!(
        matches!(receipt(&busy).result, UsageResult::Denied { .. }),
        "{busy:?}"
    );
    assert_eq!(e.last_usage_seq(), 0);
    // The first batch at T0 + 5,000 charges the estimate before its own commands.
    let next = one(
        &mut e,
        T0 + 5_000,
        reserve("next2", w.clone(), tokens(1, 0), 5_000),
    );
    assert!(
        matches!(receipt(&next).result, UsageResult::Reserved { .. }),
        "{next:?}"
    );
    let records = e.export_usage(0, 10).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].request_id.as_str(), records[0].tokens),
        ("gone", tokens(300, 100))
    );
    assert_eq!(records[0].at_ms, T0 + 5_000);
    let daily = e
        .usage_overview("k", "")
        .into_iter()
        .find(|s| s.quota == "daily")
        .unwrap();
    assert_eq!(
        (daily.used, daily.reserved),
        (400, 1),
        "the estimate; next2's hold"
    );
    // The stream-done report that comes after all gets the charged record, counting nothing.
    let late = one(
        &mut e,
        T0 + 6_000,
        report("gone", w.clone(), tokens(50, 50)),
    );
    let late = receipt(&late);
    assert!(late.duplicate);
    assert!(
        matches!(
            late.result,
            UsageResult::Recorded {
                seq: 1,
                settled: Settled::Expired,
                ..
            }
        ),
        "{late:?}"
    );
    assert_eq!(e.last_usage_seq(), 1);
    // Without charge_on_expiry the same reservation releases and records nothing.
    held.request_id = "free".into();
    held.charge_on_expiry = false;
    one(
        &mut e,
        T0 + 7_000,
        Command::Release {
            request_id: "next2".into(),
        },
    );
    one(&mut e, T0 + 7_001, Command::Reserve(held));
    one(&mut e, T0 + 20_000, report("tick", w, tokens(1, 0)));
    let ids: Vec<String> = e
        .export_usage(0, 10)
        .unwrap()
        .into_iter()
        .map(|r| r.request_id)
        .collect();
    assert_eq!(ids, vec!["gone".to_string(), "tick".to_string()]);
}

// ---------------------------------------------------------------------------------------------
// 3. Calendar resets across DST; thresholds once per period
// ---------------------------------------------------------------------------------------------

#[test]
fn a_new_york_daily_budget_resets_at_local_midnight_across_dst_and_alerts_once_per_day() {
    let mut q = quota(
        "daily",
        Metric::TotalTokens,
        100,
        Some(WindowSpec::Calendar {
            unit: CalendarUnit::Day,
            time_zone: "America/New_York".into(),
        }),
    );
    q.thresholds_pct = vec![50, 90];
    q.enforcement = Enforcement::Soft;
    let mut e = engine_with(vec![q], vec![]);
    let w = who("k", "", "");
    // 2026-03-08 is 23 hours long in New York: it starts 05:00Z and ends 2026-03-09T04:00Z.
    let day_start = T0 + 17 * HOUR; // 2026-03-08T05:00:00Z
    let day_end = day_start + 23 * HOUR;
    let mut n = 0;
    let mut send = |e: &mut Engine, at: i64, t: u64| {
        n += 1;
        one(e, at, report(&format!("r{n}"), w.clone(), tokens(t, 0)))
    };
    send(&mut e, day_start - 1, 95); // the day before: 95 of 100
    send(&mut e, day_start, 30); // new day: 30
    send(&mut e, day_start + HOUR, 30); // 60: 50 % fires
    send(&mut e, day_start + 2 * HOUR, 10); // 70: nothing new
    send(&mut e, day_start + 3 * HOUR, 25); // 95: 90 % fires
    send(&mut e, day_start + 4 * HOUR, 10); // 105: exceeded fires (soft: recorded)
    send(&mut e, day_start + 5 * HOUR, 10); // 115: nothing new
    send(&mut e, day_end - 1, 1); // last ms of the 23-hour day: 116
    let s = &e.usage_overview("k", "")[0];
    assert_eq!((s.used, s.reset_in_ms), (116, 1));
    send(&mut e, day_end, 60); // next day: 60, 50 % fires again
    let s = &e.usage_overview("k", "")[0];
    assert_eq!((s.used, s.reset_in_ms), (60, 24 * HOUR as u64));
    let alerts: Vec<(i64, String)> = e
        .events_after(0, 100)
        .into_iter()
        .map(|ev| match ev.kind {
            EventKind::Threshold { pct, standing } => {
                (ev.at_ms, format!("{pct}% {}", standing.used))
            }
            EventKind::Exceeded { standing } => (ev.at_ms, format!("over {}", standing.used)),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        alerts,
        vec![
            (day_start - 1, "50% 95".into()),
            (day_start - 1, "90% 95".into()),
            (day_start + HOUR, "50% 60".into()),
            (day_start + 3 * HOUR, "90% 95".into()),
            (day_start + 4 * HOUR, "over 105".into()),
            (day_end, "50% 60".into()),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Queries and export against an oracle
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Sent {
    at_ms: i64,
    who: Attribution,
    tokens: Tokens,
}

const SUBJECTS: [&str; 3] = ["k1", "k2", "k3"];
const MODELS: [&str; 3] = ["small", "large", "unpriced"];
const TEAMS: [&str; 2] = ["red", "blue"];
const ZONES: [&str; 4] = [
    "UTC",
    "America/New_York",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
];

fn arb_sent() -> impl Strategy<Value = (i64, usize, usize, Option<usize>, u64, u64, u64)> {
    (
        0i64..(70 * DAY / MIN),
        0..SUBJECTS.len(),
        0..MODELS.len(),
        prop::option::of(0..TEAMS.len()),
        0u64..5_000,
        0u64..5_000,
        0u64..100,
    )
}

fn oracle_cost(model: &str, t: &Tokens) -> u64 {
    match model {
        "small" => (t.input - t.cached_input) * 100 + t.cached_input * 10 + t.output * 400,
        "large" => (t.input - t.cached_input) * 2_500 + t.cached_input * 1_250 + t.output * 10_000,
        _ => 0,
    }
}

/// Local period start, computed from the zone's UTC offset at that instant, walked by hand
/// (the oracle does not use the engine's calendar code).
fn oracle_period(g: Granularity, zone: &str, at_ms: i64, start_ms: i64) -> i64 {
    use jiff::{Timestamp, tz::TimeZone};
    let tz = TimeZone::get(zone).unwrap();
    let ts = Timestamp::from_millisecond(at_ms).unwrap();
    let local = ts.to_zoned_datetime(tz.clone());
    match g {
        Granularity::Total => start_ms,
        Granularity::Minute => at_ms - at_ms.rem_euclid(MIN),
        Granularity::Hour => {
            let off = i64::from(local.offset().seconds()) * 1_000;
            let l = at_ms + off;
            l - l.rem_euclid(HOUR) - off
        }
        Granularity::Day => local.start_of_day().unwrap().timestamp().as_millisecond(),
        Granularity::Month => local
            .first_of_month()
            .unwrap()
            .start_of_day()
            .unwrap()
            .timestamp()
            .as_millisecond(),
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn query_and_export_agree_with_an_oracle(
        raw in prop::collection::vec(arb_sent(), 1..120),
        gran in 0usize..5,
        zone in 0..ZONES.len(),
        dims in prop::collection::vec(0usize..4, 0..3),
        filter_subject in prop::option::of(0..SUBJECTS.len()),
        range in (0i64..60, 1i64..80),
        page in 1usize..50,
    ) {
        let granularity = [Granularity::Minute, Granularity::Hour, Granularity::Day, Granularity::Month, Granularity::Total][gran];
        let mut e = engine_with(vec![], vec![
            price("small", 100, 10, 400),
            price("large", 2_500, 1_250, 10_000),
        ]);
        let mut sent: Vec<Sent> = raw
            .iter()
            .map(|(m, s, md, team, input, output, cached)| Sent {
                at_ms: T0 + m * MIN + (m % 7) * 1_000,
                who: Attribution {
                    subject: SUBJECTS[*s].into(),
                    subscription: "sub".into(),
                    model: MODELS[*md].into(),
                    tags: team.map(|t| vec![("team".to_string(), TEAMS[t].to_string())]).unwrap_or_default(),
                },
                tokens: Tokens { input: *input, output: *output, cached_input: (*cached).min(*input), reasoning: 0 },
            })
            .collect();
        sent.sort_by_key(|s| s.at_ms);
        for (i, s) in sent.iter().enumerate() {
            let o = one(&mut e, s.at_ms, report(&format!("r{i}"), s.who.clone(), s.tokens));
            prop_assert!(!receipt(&o).duplicate);
        }
        // Export in pages: every record once, in order, matching what was sent.
        let mut cursor = 0;
        let mut exported = Vec::new();
        loop {
            let page = e.export_usage(cursor, page).unwrap();
            if page.is_empty() { break; }
            cursor = page.last().unwrap().seq;
            exported.extend(page);
        }
        prop_assert_eq!(exported.len(), sent.len());
        for (i, (r, s)) in exported.iter().zip(&sent).enumerate() {
            prop_assert_eq!(r.seq, i as u64 + 1);
            prop_assert_eq!(&r.request_id, &format!("r{i}"));
            prop_assert_eq!((r.at_ms, &r.who, r.tokens), (s.at_ms, &s.who, s.tokens));
            prop_assert_eq!(r.cost_nusd, oracle_cost(&s.who.model, &s.tokens));
            prop_assert_eq!(r.price_version, if s.who.model == "unpriced" { 0 } else { 1 });
        }
        // Query.
        let step = if granularity == Granularity::Minute { MIN } else { 15 * MIN };
        let base = T0 - T0.rem_euclid(DAY);
        let start = base + range.0 * DAY / 4 / step * step;
        let end = start + range.1 * DAY / 4 / step * step + step;
        let group_by: Vec<Dimension> = dims.iter().map(|d| match d {
            0 => Dimension::Subject,
            1 => Dimension::Model,
            2 => Dimension::Subscription,
            _ => Dimension::Tag("team".into()),
        }).collect();
        let filter = QuotaFilter {
            subject: filter_subject.map(|s| SUBJECTS[s].to_string()),
            ..QuotaFilter::default()
        };
        let q = UsageQuery {
            start_ms: start,
            end_ms: end,
            group_by: group_by.clone(),
            granularity,
            time_zone: ZONES[zone].into(),
            filter: filter.clone(),
        };
        let got = e.query_usage(&q).unwrap();
        let mut want: BTreeMap<(i64, Vec<String>), UsageSums> = BTreeMap::new();
        for s in &sent {
            if s.at_ms < start || s.at_ms >= end || !filter.matches(&s.who) { continue; }
            let group = group_by.iter().map(|d| s.who.value(d).to_string()).collect();
            let period = oracle_period(granularity, ZONES[zone], s.at_ms, start);
            want.entry((period, group)).or_default().add(&s.tokens, oracle_cost(&s.who.model, &s.tokens));
        }
        let got: BTreeMap<(i64, Vec<String>), UsageSums> =
            got.into_iter().map(|r| ((r.period_start_ms, r.group), r.sums)).collect();
        prop_assert_eq!(got, want);
    }
}

#[test]
fn queries_refuse_bad_ranges_naming_the_field() {
    let e = engine_with(vec![], vec![]);
    let mut q = total_query(T0, T0 + HOUR);
    q.start_ms = T0 + 1;
    let err = e.query_usage(&q).unwrap_err().to_string();
    assert!(err.contains("start_ms"), "{err}");
    q.start_ms = T0;
    q.time_zone = "Mars/Olympus".into();
    let err = e.query_usage(&q).unwrap_err().to_string();
    assert!(err.contains("time_zone"), "{err}");
}

#[test]
fn dropped_records_are_refused_not_answered_short() {
    let mut e = Engine::new(EngineSettings {
        max_usage_records: 3,
        ..EngineSettings::default()
    });
    for i in 0..5 {
        one(
            &mut e,
            T0 + i * MIN,
            report(&format!("r{i}"), who("k", "", ""), tokens(1, 0)),
        );
    }
    // The tail is trimmed when a batch part begins, so the last batch's record is still here
    // (the node's archive copies it after the part): 2..=5.
    let err = e.export_usage(0, 10).unwrap_err().to_string();
    assert!(err.contains("before 2"), "{err}");
    let seqs = |e: &Engine, after| {
        e.export_usage(after, 10)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect::<Vec<_>>()
    };
    assert_eq!(seqs(&e, 1), vec![2, 3, 4, 5]);
    let mut q = total_query(T0, T0 + HOUR);
    q.granularity = Granularity::Minute;
    assert!(e.query_usage(&q).is_err());
    q.start_ms = T0 + MIN;
    assert_eq!(e.query_usage(&q).unwrap().len(), 4);
    // The next batch trims to 3 before its commands.
    e.apply(T0 + 6 * MIN, &[]);
    let err = e.export_usage(1, 10).unwrap_err().to_string();
    assert!(err.contains("before 3"), "{err}");
    assert_eq!(seqs(&e, 2), vec![3, 4, 5]);
    assert!(e.query_usage(&q).is_err());
    q.start_ms = T0 + 2 * MIN;
    assert_eq!(e.query_usage(&q).unwrap().len(), 3);
    // Aggregates still hold all five.
    q.granularity = Granularity::Total;
    q.start_ms = T0 - T0.rem_euclid(15 * MIN);
    assert_eq!(e.query_usage(&q).unwrap()[0].sums.requests, 5);
}

// ---------------------------------------------------------------------------------------------
// 5. Snapshots
// ---------------------------------------------------------------------------------------------

#[test]
fn metering_state_survives_snapshot_and_restore_byte_for_byte() {
    let mut q = quota("daily", Metric::CostNusd, 1_000_000, Some(fixed_day()));
    q.thresholds_pct = vec![1];
    let mut e = engine_with(
        vec![q, quota("in-flight", Metric::Concurrent, 10, None)],
        vec![price("m", 10, 1, 20)],
    );
    let w = who("k", "s", "m");
    e.apply(
        T0,
        &[
            report("a", w.clone(), tokens(100, 100)),
            reserve("b", w.clone(), tokens(1_000, 1_000), 30_000),
            reserve("c", w.clone(), tokens(10, 10), 30_000),
        ],
    );
    let bytes = e.snapshot();
    let mut r = Engine::restore(&bytes).expect("restores");
    assert_eq!(r.snapshot(), bytes);
    let next = [
        commit("b", tokens(5, 5)),
        report("a", w.clone(), tokens(1, 1)),
    ];
    assert_eq!(e.apply(T0 + 10, &next), r.apply(T0 + 10, &next));
    // Expiry of "c" happens alike on both.
    assert_eq!(e.apply(T0 + 30_000, &[]), r.apply(T0 + 30_000, &[]));
    assert_eq!(e.snapshot(), r.snapshot());
    assert_eq!(r.open_reservations(), 0);
    assert_eq!(r.events_after(0, 100), e.events_after(0, 100));
}

// ---------------------------------------------------------------------------------------------
// 6. Request-time checks
// ---------------------------------------------------------------------------------------------

fn check(w: Attribution) -> Command {
    Command::CheckQuotas(CheckQuotas { who: w })
}

fn quota_check(o: &Outcome) -> &QuotaCheck {
    match o {
        Outcome::QuotaCheck(q) => q,
        other => panic!("expected a quota check, got {other:?}"),
    }
}

/// Applies a check at `at_ms` (the time of the last batch) and asserts that the engine's
/// snapshot bytes are the same after it.
fn check_changes_nothing(e: &mut Engine, at_ms: i64, w: Attribution) -> QuotaCheck {
    let before = e.snapshot();
    let answer = quota_check(&one(e, at_ms, check(w))).clone();
    assert!(e.snapshot() == before, "a check changed the engine's state");
    answer
}

#[test]
fn a_check_refuses_once_a_hard_budget_has_no_room_for_one_more_unit_and_changes_nothing() {
    let with = |enforcement, q: QuotaSpec| QuotaSpec { enforcement, ..q };
    let mut e = engine_with(
        vec![
            with(
                Enforcement::Soft,
                quota("soft-tokens", Metric::TotalTokens, 50, Some(fixed_day())),
            ),
            with(
                Enforcement::Shadow,
                quota("shadow-requests", Metric::Requests, 1, Some(fixed_day())),
            ),
            quota("daily-tokens", Metric::TotalTokens, 100, Some(fixed_day())),
            quota("in-flight", Metric::Concurrent, 1, None),
        ],
        vec![],
    );
    let k = who("k", "", "");
    one(&mut e, T0, report("r1", k.clone(), tokens(40, 20)));
    // 60 of 100: room. The soft (60 > 50) and shadow (1 of 1) quotas are full: no refusal.
    let c = check_changes_nothing(&mut e, T0, k.clone());
    assert_eq!(c.denied, None);
    let standings: Vec<(&str, u64, u64)> = c
        .standings
        .iter()
        .map(|s| (s.quota.as_str(), s.used, s.remaining))
        .collect();
    assert_eq!(
        standings,
        vec![("daily-tokens", 60, 40), ("in-flight", 0, 1)],
        "hard quotas only, in set order"
    );
    // A subject with no counter yet is checked without creating one.
    let fresh = check_changes_nothing(&mut e, T0, who("new", "", ""));
    assert_eq!((fresh.denied, fresh.standings[0].remaining), (None, 100));
    // 99 of 100: one more token fits.
    one(&mut e, T0 + 1, report("r2", k.clone(), tokens(39, 0)));
    let c = check_changes_nothing(&mut e, T0 + 1, k.clone());
    assert_eq!((c.denied, c.standings[0].remaining), (None, 1));
    // 100 of 100: used up exactly, so the next request is refused.
    one(&mut e, T0 + 2, report("r3", k.clone(), tokens(0, 1)));
    let c = check_changes_nothing(&mut e, T0 + 2, k.clone());
    let denied = c.denied.expect("a used-up budget refuses");
    assert_eq!(
        (denied.quota.as_str(), denied.used, denied.remaining),
        ("daily-tokens", 100, 0)
    );
    assert_eq!(denied.reset_in_ms, (DAY - T0 % DAY) as u64 - 2);
    // Streams in flight at the cap refuse one more, whatever the token budget says.
    let j = who("j", "", "");
    one(
        &mut e,
        T0 + 3,
        reserve("s1", j.clone(), tokens(1, 0), 60_000),
    );
    let c = check_changes_nothing(&mut e, T0 + 3, j.clone());
    assert_eq!(c.denied.map(|s| s.quota), Some("in-flight".to_owned()));
    // The next day the budget is back.
    let c = quota_check(&one(&mut e, T0 + DAY, check(k))).clone();
    assert_eq!((c.denied, c.standings[0].remaining), (None, 100));
    // A bad attribution is refused, naming the field.
    let bad = one(&mut e, T0 + DAY, check(who("", "", "")));
    assert!(
        matches!(&bad, Outcome::Rejected(CommandError::Invalid { field, .. }) if field == "subject"),
        "{bad:?}"
    );
}

#[test]
fn a_soft_or_shadow_quota_alone_never_refuses_a_check() {
    for enforcement in [Enforcement::Soft, Enforcement::Shadow] {
        let budget = QuotaSpec {
            enforcement,
            ..quota("budget", Metric::Requests, 1, Some(fixed_day()))
        };
        let mut e = engine_with(vec![budget], vec![]);
        let k = who("k", "", "");
        for i in 0..3 {
            one(
                &mut e,
                T0,
                report(&format!("r{i}"), k.clone(), tokens(1, 0)),
            );
        }
        let c = check_changes_nothing(&mut e, T0, k);
        assert_eq!(
            c,
            QuotaCheck {
                denied: None,
                standings: vec![]
            },
            "{enforcement:?}"
        );
    }
}
