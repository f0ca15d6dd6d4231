//! Properties of the rate-limit engine, checked against independent models:
//!
//! 1. no window kind ever admits more than its capacity (and decisions match a reference model);
//! 2. a request debits all its counters or none, hits on one counter add up, Report always debits;
//! 3. apply is deterministic, also across a snapshot/restore in the middle of the log;
//! 4. snapshots round-trip byte for byte, and bad bytes are refused without panicking;
//! 5. calendar windows follow local dates across DST (America/New_York, Europe/Berlin);
//! 6. reclaimed counters decide exactly as fresh ones;
//! 7. a limit reload keeps the counters of limits whose identity is unchanged.
//!
//! Local dates are computed here from the 2026 DST rules written out by hand, not with the
//! time zone database the engine uses.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};

use proptest::prelude::*;
use proptest::sample::Index;
use tally_server::engine::limits::{
    CalendarUnit, Capacity, DescriptorKey, EntryCondition, LimitSet, LimitSpec, Scope, Unit,
    WindowSpec,
};
use tally_server::engine::{
    Code, Command, Decision, Descriptor, Engine, EngineSettings, LimitOverride, Mode, Outcome,
    RateLimitCommand,
};

const DOMAIN: &str = "api";
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

/// `cases` per property, unless `PROPTEST_CASES` asks for another number (for longer hunts).
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        // Only this file may be created: no regression files next to it.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn spec(name: &str, keys: &[&str], capacity: u64, window: WindowSpec) -> LimitSpec {
    LimitSpec {
        domain: DOMAIN.into(),
        name: name.into(),
        scope: Scope::Descriptor {
            conditions: vec![],
            key: DescriptorKey::Entries(keys.iter().map(|k| k.to_string()).collect()),
        },
        capacity: Capacity::Max(capacity),
        window,
        shadow: false,
        ack: tally_server::engine::limits::Ack::Strict,
        replaces: vec![],
    }
}

fn set(limits: Vec<LimitSpec>) -> Command {
    Command::ReplaceLimits(LimitSet { limits })
}

fn desc(entries: &[(&str, &str)], hits: Option<u64>) -> Descriptor {
    Descriptor {
        entries: entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        hits,
        limit_override: None,
    }
}

fn request(mode: Mode, hits: u64, descriptors: Vec<Descriptor>) -> Command {
    Command::RateLimit(RateLimitCommand {
        domain: DOMAIN.into(),
        descriptors,
        hits,
        mode,
    })
}

fn decision(outcome: &Outcome) -> &Decision {
    match outcome {
        Outcome::RateLimit(d) => d,
        other => panic!("expected a decision, got {other:?}"),
    }
}

/// A fresh engine with default settings and `limits` applied at `at_ms`.
fn engine_with(at_ms: i64, limits: Vec<LimitSpec>) -> Engine {
    let mut engine = Engine::new(EngineSettings::default());
    let out = engine.apply(at_ms, &[set(limits)]);
    assert!(
        matches!(out[0], Outcome::LimitsReplaced { .. }),
        "limits refused: {out:?}"
    );
    engine
}

/// Applies `command` alone in a batch stamped `at_ms` and returns its decision.
fn decide(engine: &mut Engine, at_ms: i64, command: Command) -> Decision {
    let out = engine.apply(at_ms, &[command]);
    decision(&out[0]).clone()
}

/// Enforces one hit on the descriptor `entries`; returns the decision.
fn hit(engine: &mut Engine, at_ms: i64, entries: &[(&str, &str)], hits: u64) -> Decision {
    decide(
        engine,
        at_ms,
        request(Mode::Enforce, hits, vec![desc(entries, None)]),
    )
}

/// The remaining hits of the descriptor's most constrained counter, observed without debiting.
fn remaining(engine: &mut Engine, at_ms: i64, entries: &[(&str, &str)]) -> u64 {
    decide(
        engine,
        at_ms,
        request(Mode::CheckOnly, 1, vec![desc(entries, Some(0))]),
    )
    .statuses[0]
        .remaining
}

fn user(u: usize) -> String {
    format!("u{u}")
}

// ---------------------------------------------------------------------------------------------
// 1. Never over capacity, every window kind
// ---------------------------------------------------------------------------------------------

/// One generated request of test 1: descriptors are (user index, per-descriptor hits).
#[derive(Clone, Debug)]
struct UserRequest {
    mode: Mode,
    hits: u64,
    descriptors: Vec<(usize, Option<u64>)>,
}

fn window_strategy() -> impl Strategy<Value = WindowSpec> {
    prop_oneof![
        (1_000u64..=5_000).prop_map(|duration_ms| WindowSpec::Fixed { duration_ms }),
        (1_000u64..=5_000).prop_map(|duration_ms| WindowSpec::FromFirstHit { duration_ms }),
        (
            1u64..=5,
            prop::sample::select(vec![1u64, 2, 4, 5, 8, 10, 20])
        )
            .prop_map(|(seconds, slots)| WindowSpec::Rolling {
                window_ms: seconds * 1_000,
                resolution_ms: seconds * 1_000 / slots,
            }),
        (1u64..=5, 100u64..=5_000).prop_map(|(refill_amount, refill_every_ms)| {
            WindowSpec::TokenBucket {
                refill_amount,
                refill_every_ms,
            }
        }),
    ]
}

fn user_request_strategy(users: usize) -> impl Strategy<Value = UserRequest> {
    (
        prop_oneof![5 => Just(Mode::Enforce), 1 => Just(Mode::CheckOnly)],
        1u64..=3,
        prop::collection::vec(
            (
                0..users,
                prop_oneof![1 => Just(None), 2 => (0u64..=5).prop_map(Some)],
            ),
            1..=3,
        ),
    )
        .prop_map(|(mode, hits, descriptors)| UserRequest {
            mode,
            hits,
            descriptors,
        })
}

/// Gaps between batches: often none, sometimes longer than any window.
fn small_gap() -> impl Strategy<Value = i64> {
    prop_oneof![3 => Just(0i64), 3 => 1i64..400, 2 => 400i64..3_000, 1 => 3_000i64..15_000]
}

/// Admitted debits per user, and what a window of each kind allows given them.
struct WindowModel {
    window: WindowSpec,
    capacity: u64,
    /// Per user: (time, hits) of every admitted debit, in order.
    debits: BTreeMap<usize, Vec<(i64, u64)>>,
}

/// Windows of a first-hit limit: each opens at the first debit after the previous one closed.
fn first_hit_windows(debits: &[(i64, u64)], duration_ms: i64) -> Vec<(i64, u64)> {
    let mut windows: Vec<(i64, u64)> = Vec::new();
    for &(t, h) in debits {
        match windows.last_mut() {
            Some((start, sum)) if t < *start + duration_ms => *sum += h,
            _ => windows.push((t, h)),
        }
    }
    windows
}

impl WindowModel {
    fn debit(&mut self, user: usize, at_ms: i64, hits: u64) {
        self.debits.entry(user).or_default().push((at_ms, hits));
    }

    /// Hits the user's counter may still take at `now`.
    fn remaining(&self, user: usize, now: i64) -> u64 {
        let debits = self.debits.get(&user).map(Vec::as_slice).unwrap_or(&[]);
        let cap = self.capacity;
        match self.window {
            WindowSpec::Fixed { duration_ms } => {
                let d = duration_ms as i64;
                let used: u64 = debits
                    .iter()
                    .filter(|(t, _)| t.div_euclid(d) == now.div_euclid(d))
                    .map(|(_, h)| h)
                    .sum();
                cap.saturating_sub(used)
            }
            WindowSpec::FromFirstHit { duration_ms } => {
                let d = duration_ms as i64;
                match first_hit_windows(debits, d).last() {
                    Some((start, used)) if now < start + d => cap.saturating_sub(*used),
                    _ => cap,
                }
            }
            WindowSpec::Rolling {
                window_ms,
                resolution_ms,
            } => {
                let r = resolution_ms as i64;
                let slots = (window_ms / resolution_ms) as i64;
                let now_slot = now.div_euclid(r);
                let used: u64 = debits
                    .iter()
                    .filter(|(t, _)| t.div_euclid(r) > now_slot - slots)
                    .map(|(_, h)| h)
                    .sum();
                cap.saturating_sub(used)
            }
            WindowSpec::TokenBucket {
                refill_amount,
                refill_every_ms,
            } => {
                // Exact continuous refill: the level in units of 1/refill_every_ms tokens.
                let full = cap * refill_every_ms;
                let mut level = full;
                let mut at = None;
                for &(t, h) in debits.iter().chain(std::iter::once(&(now, 0))) {
                    if let Some(prev) = at {
                        level = full.min(level + (t - prev) as u64 * refill_amount);
                    }
                    at = Some(t);
                    level = level.saturating_sub(h * refill_every_ms);
                }
                level / refill_every_ms
            }
            WindowSpec::Calendar { .. } => unreachable!("not generated"),
        }
    }

    /// The promise itself, checked on the admitted debits alone.
    fn check_never_over(&self) -> Result<(), String> {
        let cap = self.capacity;
        for (user, debits) in &self.debits {
            match self.window {
                WindowSpec::Fixed { duration_ms } => {
                    let mut windows: BTreeMap<i64, u64> = BTreeMap::new();
                    for (t, h) in debits {
                        *windows.entry(t.div_euclid(duration_ms as i64)).or_default() += h;
                    }
                    for (w, sum) in windows {
                        if sum > cap {
                            return Err(format!(
                                "user {user}: {sum} hits admitted in fixed window {w} \
                                 ({duration_ms} ms), capacity {cap}"
                            ));
                        }
                    }
                }
                WindowSpec::FromFirstHit { duration_ms } => {
                    for (start, sum) in first_hit_windows(debits, duration_ms as i64) {
                        if sum > cap {
                            return Err(format!(
                                "user {user}: {sum} hits admitted in first-hit window opened \
                                 at {start} ({duration_ms} ms), capacity {cap}"
                            ));
                        }
                    }
                }
                WindowSpec::Rolling {
                    window_ms,
                    resolution_ms,
                } => {
                    let r = resolution_ms as i64;
                    let slots = (window_ms / resolution_ms) as i64;
                    let mut per_slot: BTreeMap<i64, u64> = BTreeMap::new();
                    for (t, h) in debits {
                        *per_slot.entry(t.div_euclid(r)).or_default() += h;
                    }
                    for &s in per_slot.keys() {
                        let sum: u64 = per_slot.range(s - slots + 1..=s).map(|(_, h)| h).sum();
                        if sum > cap {
                            return Err(format!(
                                "user {user}: {sum} hits admitted in the {slots} slots ending at \
                                 slot {s} (resolution {resolution_ms} ms), capacity {cap}"
                            ));
                        }
                    }
                }
                WindowSpec::TokenBucket {
                    refill_amount,
                    refill_every_ms,
                } => {
                    for (i, &(t0, _)) in debits.iter().enumerate() {
                        let mut sum = 0;
                        for &(t1, h) in &debits[i..] {
                            sum += h;
                            let allowed = cap + (t1 - t0) as u64 * refill_amount / refill_every_ms;
                            if sum > allowed {
                                return Err(format!(
                                    "user {user}: {sum} hits admitted in [{t0}, {t1}], bucket \
                                     allows {allowed} (burst {cap}, {refill_amount} per \
                                     {refill_every_ms} ms)"
                                ));
                            }
                        }
                    }
                }
                WindowSpec::Calendar { .. } => unreachable!("not generated"),
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(config(192))]

    /// Enforce never admits more than a window allows; CheckOnly never debits; and every
    /// decision and status matches the reference model of the window.
    #[test]
    fn never_over_capacity_in_any_window(
        (window, capacity, start, batches) in (window_strategy(), 1u64..=20, 1usize..=3)
            .prop_flat_map(|(window, capacity, users)| (
                Just(window),
                Just(capacity),
                1_700_000_000_000i64..1_700_000_100_000,
                prop::collection::vec(
                    (small_gap(), prop::collection::vec(user_request_strategy(users), 1..=8)),
                    1..=25,
                ),
            ))
    ) {
        let mut engine = engine_with(0, vec![spec("per-user", &["user"], capacity, window.clone())]);
        let mut model = WindowModel { window: window.clone(), capacity, debits: BTreeMap::new() };
        let mut mismatch: Option<String> = None;
        let mut now = start;
        for (batch, (gap, requests)) in batches.iter().enumerate() {
            now += gap;
            let commands: Vec<Command> = requests
                .iter()
                .map(|r| request(
                    r.mode,
                    r.hits,
                    r.descriptors.iter().map(|(u, h)| desc(&[("user", &user(*u))], *h)).collect(),
                ))
                .collect();
            let outcomes = engine.apply(now, &commands);
            prop_assert_eq!(outcomes.len(), commands.len());
            for (i, (req, outcome)) in requests.iter().zip(&outcomes).enumerate() {
                let d = decision(outcome);
                // Hits per counter (hits of several descriptors add up) and check-only flags.
                let mut per_user: BTreeMap<usize, (u64, bool)> = BTreeMap::new();
                for (u, h) in &req.descriptors {
                    let h = h.unwrap_or(req.hits);
                    let e = per_user.entry(*u).or_default();
                    e.0 += h;
                    e.1 |= h == 0;
                }
                let room: BTreeMap<usize, u64> =
                    per_user.keys().map(|u| (*u, model.remaining(*u, now))).collect();
                let expect_ok = per_user.iter().all(|(u, (sum, check_only))| {
                    let need = if *check_only { (*sum).max(1) } else { *sum };
                    room[u] >= need
                });
                let ok = d.code == Code::Ok;
                let debits = ok && req.mode == Mode::Enforce;
                if mismatch.is_none() {
                    let statuses: Vec<u64> = d.statuses.iter().map(|s| s.remaining).collect();
                    let expected: Vec<u64> = req
                        .descriptors
                        .iter()
                        .map(|(u, _)| if debits { room[u].saturating_sub(per_user[u].0) } else { room[u] })
                        .collect();
                    if ok != expect_ok || statuses != expected {
                        mismatch = Some(format!(
                            "batch {batch} at {now}, request {i} {req:?}: engine says {:?} with \
                             remaining {statuses:?}; model room {room:?} expects ok={expect_ok} \
                             remaining {expected:?}",
                            d.code
                        ));
                    }
                }
                if debits {
                    for (u, (sum, _)) in &per_user {
                        if *sum > 0 {
                            model.debit(*u, now, *sum);
                        }
                    }
                }
            }
        }
        if let Err(violation) = model.check_never_over() {
            return Err(TestCaseError::fail(format!("{window:?}: {violation}")));
        }
        if let Some(m) = mismatch {
            return Err(TestCaseError::fail(format!("{window:?} capacity {capacity}: {m}")));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. All-or-nothing across descriptors
// ---------------------------------------------------------------------------------------------

/// Test 2's requests: descriptors are (limit 0 = entry `a`, 1 = entry `b`; user; hits).
#[derive(Clone, Debug)]
struct PairRequest {
    mode: Mode,
    hits: u64,
    descriptors: Vec<(usize, usize, Option<u64>)>,
}

fn pair_request_strategy() -> impl Strategy<Value = PairRequest> {
    let hits = || prop_oneof![1 => Just(None), 2 => (0u64..=5).prop_map(Some)];
    (
        prop_oneof![6 => Just(Mode::Enforce), 1 => Just(Mode::CheckOnly), 1 => Just(Mode::Report)],
        1u64..=3,
        (0..2usize, hits()),
        (0..2usize, hits()),
        prop::collection::vec((0..2usize, 0..2usize, hits()), 0..=2),
    )
        .prop_map(|(mode, hits, (ua, ha), (ub, hb), extra)| {
            let mut descriptors = vec![(0, ua, ha), (1, ub, hb)];
            descriptors.extend(extra);
            PairRequest {
                mode,
                hits,
                descriptors,
            }
        })
}

const PAIR_KEYS: [&str; 2] = ["a", "b"];

fn pair_descriptor(limit: usize, u: usize, hits: Option<u64>) -> Descriptor {
    desc(&[(PAIR_KEYS[limit], &user(u))], hits)
}

/// A check-only request on all four counters (a/u0, a/u1, b/u0, b/u1).
fn pair_probe() -> Command {
    let mut descriptors = Vec::new();
    for limit in 0..2 {
        for u in 0..2 {
            descriptors.push(pair_descriptor(limit, u, Some(0)));
        }
    }
    request(Mode::CheckOnly, 1, descriptors)
}

proptest! {
    #![proptest_config(config(192))]

    /// After every request, observed through a check-only probe: an admitted Enforce request
    /// moved every counter it matched by its (summed) hits, a denied or check-only one moved
    /// none, and Report moved all of them regardless of room.
    #[test]
    fn requests_debit_all_or_nothing(
        cap_a in 1u64..=10,
        cap_b in 1u64..=10,
        start in 0i64..HOUR / 2,
        requests in prop::collection::vec(pair_request_strategy(), 1..=40),
    ) {
        let caps = [cap_a, cap_b];
        let window = WindowSpec::Fixed { duration_ms: HOUR as u64 };
        let mut engine = engine_with(0, vec![
            spec("a", &["a"], cap_a, window.clone()),
            spec("b", &["b"], cap_b, window),
        ]);
        // Well inside one hour-aligned window: nothing resets during the test.
        let now = 1_700_000_000_000i64.div_euclid(HOUR) * HOUR + start;
        let mut used = [[0u64; 2]; 2];
        let initial = decision(&engine.apply(now, &[pair_probe()])[0]).clone();
        prop_assert_eq!(
            initial.statuses.iter().map(|s| s.remaining).collect::<Vec<_>>(),
            vec![cap_a, cap_a, cap_b, cap_b]
        );
        for (i, req) in requests.iter().enumerate() {
            let command = request(
                req.mode,
                req.hits,
                req.descriptors.iter().map(|&(l, u, h)| pair_descriptor(l, u, h)).collect(),
            );
            let out = engine.apply(now + i as i64, &[command, pair_probe()]);
            let d = decision(&out[0]);
            let probe = decision(&out[1]);
            let mut per_counter: BTreeMap<(usize, usize), (u64, bool)> = BTreeMap::new();
            for &(l, u, h) in &req.descriptors {
                let h = h.unwrap_or(req.hits);
                let e = per_counter.entry((l, u)).or_default();
                e.0 += h;
                e.1 |= h == 0;
            }
            let fits = per_counter.iter().all(|(&(l, u), &(sum, check_only))| {
                let need = if check_only { sum.max(1) } else { sum };
                caps[l].saturating_sub(used[l][u]) >= need
            });
            let debited = match req.mode {
                Mode::Enforce => {
                    prop_assert_eq!(d.code == Code::Ok, fits, "request {}: {:?}", i, req);
                    fits
                }
                Mode::CheckOnly => {
                    prop_assert_eq!(d.code == Code::Ok, fits, "request {}: {:?}", i, req);
                    false
                }
                Mode::Report => true,
            };
            let before = used;
            if debited {
                for (&(l, u), &(sum, _)) in &per_counter {
                    used[l][u] += sum;
                }
            }
            let observed: Vec<u64> = probe.statuses.iter().map(|s| s.remaining).collect();
            let expected: Vec<u64> = (0..4)
                .map(|c| caps[c / 2].saturating_sub(used[c / 2][c % 2]))
                .collect();
            prop_assert_eq!(
                &observed, &expected,
                "after request {} {:?} (decision {:?}); used before {:?}", i, req, d.code, before
            );
        }
    }
}

#[test]
fn hits_on_one_counter_add_up() {
    let window = WindowSpec::Fixed {
        duration_ms: HOUR as u64,
    };
    let mut engine = engine_with(0, vec![spec("per-user", &["user"], 5, window)]);
    let t = 10 * HOUR;
    let alice = [("user", "alice")];
    // 3 + 3 on one counter of capacity 5: denied, nothing debited.
    let d = decide(
        &mut engine,
        t,
        request(
            Mode::Enforce,
            1,
            vec![desc(&alice, Some(3)), desc(&alice, Some(3))],
        ),
    );
    assert_eq!(d.code, Code::OverLimit, "{d:?}");
    assert_eq!(remaining(&mut engine, t, &alice), 5);
    // A check-only descriptor on the same counter adds nothing but needs one hit left.
    let d = decide(
        &mut engine,
        t,
        request(
            Mode::Enforce,
            1,
            vec![desc(&alice, Some(0)), desc(&alice, Some(5))],
        ),
    );
    assert_eq!(d.code, Code::Ok, "{d:?}");
    assert_eq!(d.statuses[0].remaining, 0);
    assert_eq!(remaining(&mut engine, t, &alice), 0);
    let d = decide(
        &mut engine,
        t,
        request(Mode::Enforce, 1, vec![desc(&alice, Some(0))]),
    );
    assert_eq!(
        d.code,
        Code::OverLimit,
        "check-only needs one hit left: {d:?}"
    );
}

#[test]
fn a_denied_descriptor_denies_and_debits_nothing_anywhere() {
    let window = WindowSpec::Fixed {
        duration_ms: HOUR as u64,
    };
    let mut engine = engine_with(
        0,
        vec![
            spec("a", &["a"], 10, window.clone()),
            spec("b", &["b"], 2, window),
        ],
    );
    let t = 10 * HOUR;
    let both = |hits_a, hits_b| {
        request(
            Mode::Enforce,
            1,
            vec![
                desc(&[("a", "x")], Some(hits_a)),
                desc(&[("b", "x")], Some(hits_b)),
            ],
        )
    };
    let d = decide(&mut engine, t, both(4, 3));
    assert_eq!(d.code, Code::OverLimit, "{d:?}");
    assert_eq!(d.statuses[0].code, Code::Ok);
    assert_eq!(d.statuses[1].code, Code::OverLimit);
    assert_eq!(remaining(&mut engine, t, &[("a", "x")]), 10);
    assert_eq!(remaining(&mut engine, t, &[("b", "x")]), 2);
    let d = decide(&mut engine, t, both(4, 2));
    assert_eq!(d.code, Code::Ok, "{d:?}");
    assert_eq!(remaining(&mut engine, t, &[("a", "x")]), 6);
    assert_eq!(remaining(&mut engine, t, &[("b", "x")]), 0);
}

// ---------------------------------------------------------------------------------------------
// 3. Determinism, and 4. snapshots
// ---------------------------------------------------------------------------------------------

const POOL: usize = 8;

/// Limit `i` of a fixed pool, in one of two windows (`alt`): every kind of window and scope.
fn pool_limit(i: usize, capacity: Option<u64>, alt: bool, shadow: bool) -> LimitSpec {
    let on = |keys: &[&str]| Scope::Descriptor {
        conditions: vec![],
        key: DescriptorKey::Entries(keys.iter().map(|k| k.to_string()).collect()),
    };
    let pick = |a: u64, b: u64| if alt { b } else { a };
    let (scope, window) = match i {
        0 => (
            on(&["user"]),
            WindowSpec::Fixed {
                duration_ms: pick(1_000, 2_000),
            },
        ),
        1 => (
            on(&["user"]),
            WindowSpec::Rolling {
                window_ms: 2_000,
                resolution_ms: pick(500, 250),
            },
        ),
        2 => (
            on(&["user"]),
            WindowSpec::TokenBucket {
                refill_amount: 1,
                refill_every_ms: pick(500, 300),
            },
        ),
        3 => (
            on(&["user", "org"]),
            WindowSpec::FromFirstHit {
                duration_ms: pick(1_500, 3_000),
            },
        ),
        4 => (
            on(&["org"]),
            WindowSpec::Calendar {
                unit: CalendarUnit::Day,
                time_zone: if alt {
                    "Europe/Berlin"
                } else {
                    "America/New_York"
                }
                .into(),
            },
        ),
        5 => (
            Scope::Descriptor {
                conditions: vec![EntryCondition::Equals {
                    key: "org".into(),
                    value: "o1".into(),
                }],
                key: DescriptorKey::AllEntries,
            },
            WindowSpec::Fixed { duration_ms: 3_000 },
        ),
        6 => (
            Scope::Request {
                conditions: vec![],
                variables: vec!["descriptors[0].user".into()],
            },
            WindowSpec::Fixed {
                duration_ms: pick(1_000, 1_500),
            },
        ),
        _ => (
            on(&["user"]),
            WindowSpec::Calendar {
                unit: CalendarUnit::Week {
                    start: pick(1, 7) as u8,
                },
                time_zone: "UTC".into(),
            },
        ),
    };
    LimitSpec {
        domain: DOMAIN.into(),
        name: format!("l{i}"),
        scope,
        capacity: capacity.map_or(Capacity::Unlimited, Capacity::Max),
        window,
        shadow,
        ack: if i.is_multiple_of(2) {
            tally_server::engine::limits::Ack::Fast
        } else {
            tally_server::engine::limits::Ack::Strict
        },
        replaces: if i == 0 { vec!["l7".into()] } else { vec![] },
    }
}

fn limit_set_strategy() -> impl Strategy<Value = Command> {
    (
        prop::collection::vec(
            (
                any::<bool>(),
                prop_oneof![1 => Just(None), 6 => (0u64..=6).prop_map(Some)],
                prop::bool::weighted(0.25),
                prop::bool::weighted(0.1),
            ),
            POOL,
        ),
        prop::bool::weighted(0.05),
    )
        .prop_map(|(picks, invalid)| {
            let mut limits: Vec<LimitSpec> = picks
                .into_iter()
                .enumerate()
                .filter(|(_, p)| p.0)
                .map(|(i, (_, capacity, alt, shadow))| pool_limit(i, capacity, alt, shadow))
                .collect();
            if invalid {
                // The resolution does not divide the window: the whole set is refused.
                limits.push(spec(
                    "bad",
                    &["user"],
                    1,
                    WindowSpec::Rolling {
                        window_ms: 1_000,
                        resolution_ms: 300,
                    },
                ));
            }
            limits
        })
        .prop_shuffle()
        .prop_map(set)
}

fn any_descriptor() -> impl Strategy<Value = Descriptor> {
    let user = (0..4usize).prop_map(user);
    let org = (0..3usize).prop_map(|o| format!("o{o}"));
    let entries = prop_oneof![
        user.clone().prop_map(|u| vec![("user".to_string(), u)]),
        org.clone().prop_map(|o| vec![("org".to_string(), o)]),
        (user.clone(), org.clone())
            .prop_map(|(u, o)| vec![("user".to_string(), u), ("org".to_string(), o)]),
        (user, org).prop_map(|(u, o)| vec![("org".to_string(), o), ("user".to_string(), u)]),
    ];
    let limit_override = prop_oneof![
        9 => Just(None),
        1 => (
            0u64..=5,
            prop::sample::select(vec![
                Unit::Second, Unit::Minute, Unit::Day, Unit::Week, Unit::Month, Unit::Year,
            ]),
        )
            .prop_map(|(requests_per_unit, unit)| Some(LimitOverride { requests_per_unit, unit })),
    ];
    // Now and then a huge count: Report debits it whatever the capacity.
    let hits = prop_oneof![
        10 => Just(None),
        10 => (0u64..=5).prop_map(Some),
        1 => (u64::MAX - 8..=u64::MAX).prop_map(Some),
    ];
    (entries, hits, limit_override).prop_map(|(entries, hits, limit_override)| Descriptor {
        entries,
        hits,
        limit_override,
    })
}

fn any_command() -> impl Strategy<Value = Command> {
    let rate_limit = (
        prop_oneof![6 => Just(Mode::Enforce), 2 => Just(Mode::CheckOnly), 2 => Just(Mode::Report)],
        1u64..=4,
        prop::collection::vec(any_descriptor(), 1..=3),
        prop_oneof![
            12 => Just(DOMAIN.to_string()),
            1 => Just("other".to_string()),
            1 => Just(String::new()),
        ],
    )
        .prop_map(|(mode, hits, descriptors, domain)| {
            Command::RateLimit(RateLimitCommand {
                domain,
                descriptors,
                hits,
                mode,
            })
        });
    prop_oneof![1 => limit_set_strategy(), 10 => rate_limit]
}

/// Gaps between batches: mostly short, sometimes hours or days, sometimes backwards (the
/// engine then applies the batch at the previous batch's time).
fn any_gap() -> impl Strategy<Value = i64> {
    prop_oneof![
        3 => Just(0i64),
        4 => 1i64..1_000,
        2 => 1_000i64..10_000,
        1 => HOUR..2 * DAY,
        1 => -5_000i64..0,
    ]
}

#[derive(Clone, Debug)]
struct Scenario {
    settings: EngineSettings,
    /// (batch time, commands); times as stamped, not necessarily increasing.
    batches: Vec<(i64, Vec<Command>)>,
}

fn scenario_strategy() -> impl Strategy<Value = Scenario> {
    (
        prop_oneof![
            1 => Just(EngineSettings::default()),
            1 => (1u64..=10).prop_map(|max_counters| EngineSettings {
                max_counters,
                ..EngineSettings::default()
            }),
        ],
        // Around the 2026-03-08 DST change in New York.
        1_772_800_000_000i64..1_773_200_000_000,
        limit_set_strategy(),
        prop::collection::vec(
            (any_gap(), prop::collection::vec(any_command(), 0..=6)),
            1..=30,
        ),
    )
        .prop_map(|(settings, start, first, gaps)| {
            let mut now = start;
            let mut batches = vec![(start, vec![first])];
            for (gap, commands) in gaps {
                now += gap;
                batches.push((now, commands));
            }
            Scenario { settings, batches }
        })
}

/// A few requests touching every pool limit, for poking at restored engines.
fn poke_commands() -> Vec<Command> {
    let mut commands = Vec::new();
    for mode in [Mode::Enforce, Mode::CheckOnly, Mode::Report] {
        commands.push(request(
            mode,
            1,
            vec![
                desc(&[("user", "u0"), ("org", "o1")], None),
                desc(&[("org", "o0")], Some(2)),
                desc(&[("user", "u1")], Some(0)),
            ],
        ));
    }
    commands
}

proptest! {
    #![proptest_config(config(128))]

    /// Two engines fed the same batches give the same outcomes and snapshot bytes after every
    /// batch — one whole, one in two parts (`apply_part` twice, then `end_batch`, as the
    /// leader's speculative engine does); an engine restored from a mid-way snapshot and fed the
    /// rest agrees with both.
    #[test]
    fn apply_is_deterministic_across_restore(
        scenario in scenario_strategy(),
        cut in any::<Index>(),
        split in any::<Index>(),
    ) {
        let cut = cut.index(scenario.batches.len() + 1);
        let mut a = Engine::new(scenario.settings);
        let mut b = Engine::new(scenario.settings);
        let mut c: Option<Engine> = None;
        for (i, (at, commands)) in scenario.batches.iter().enumerate() {
            if i == cut {
                let bytes = a.snapshot();
                let restored = Engine::restore(&bytes)
                    .map_err(|e| TestCaseError::fail(format!("restore before batch {i}: {e}")))?;
                prop_assert!(restored.snapshot() == bytes, "restore changed the snapshot before batch {}", i);
                c = Some(restored);
            }
            let out_a = a.apply(*at, commands);
            let (head, tail) = commands.split_at(split.index(commands.len() + 1));
            let mut out_b = b.apply_part(*at, head);
            out_b.extend(b.apply_part(*at, tail));
            b.end_batch(commands.len());
            prop_assert_eq!(&out_a, &out_b, "batch {} at {}: {:?}", i, at, commands);
            if let Some(c) = c.as_mut() {
                let out_c = c.apply(*at, commands);
                prop_assert_eq!(&out_a, &out_c, "restored at {}, batch {} at {}: {:?}", cut, i, at, commands);
            }
            prop_assert!(a.snapshot() == b.snapshot(), "snapshots differ after batch {}", i);
        }
        let last = a.snapshot();
        let c = match c {
            Some(c) => c,
            None => Engine::restore(&last).map_err(|e| TestCaseError::fail(e.to_string()))?,
        };
        prop_assert!(b.snapshot() == last);
        prop_assert!(c.snapshot() == last, "restored (cut {}) engine's snapshot differs", cut);
        prop_assert_eq!(c.last_ms(), a.last_ms());
        prop_assert_eq!(c.limits().collect::<Vec<_>>(), a.limits().collect::<Vec<_>>());
    }

    /// restore(snapshot) snapshots to the same bytes after every batch; every truncation and
    /// byte flip of a real snapshot is refused or accepted without panicking, and what is
    /// accepted behaves (round-trips, applies commands).
    #[test]
    fn snapshots_round_trip_and_damage_is_survived(
        scenario in scenario_strategy(),
        flips in prop::collection::vec((any::<Index>(), 1u8..=255), 1..=24),
    ) {
        let mut engine = Engine::new(scenario.settings);
        for (i, (at, commands)) in scenario.batches.iter().enumerate() {
            engine.apply(*at, commands);
            let bytes = engine.snapshot();
            let restored = Engine::restore(&bytes)
                .map_err(|e| TestCaseError::fail(format!("restore after batch {i}: {e}")))?;
            prop_assert!(restored.snapshot() == bytes, "round trip changed bytes after batch {}", i);
            prop_assert_eq!(restored.settings(), engine.settings());
            prop_assert_eq!(restored.last_ms(), engine.last_ms());
            prop_assert_eq!(restored.status().limits, engine.status().limits);
            prop_assert_eq!(restored.status().limits_generation, engine.status().limits_generation);
        }
        let bytes = engine.snapshot();
        for len in 0..bytes.len() {
            let result = Engine::restore(&bytes[..len]);
            if len < 8 {
                prop_assert!(result.is_err(), "a {}-byte prefix restored", len);
            }
        }
        for (at, x) in flips {
            let mut damaged = bytes.clone();
            let i = at.index(damaged.len());
            damaged[i] ^= x;
            if let Ok(mut r) = Engine::restore(&damaged) {
                let again = r.snapshot();
                let r2 = Engine::restore(&again).map_err(|e| TestCaseError::fail(format!(
                    "byte {i} ^ {x:#04x} was accepted, but its own snapshot is refused: {e}"
                )))?;
                prop_assert!(r2.snapshot() == again, "byte {} ^ {:#04x}: round trip not stable", i, x);
                let t = r.last_ms() + 1_000;
                r.apply(t, &poke_commands());
            }
        }
    }

    /// Arbitrary bytes never restore without the magic, and never panic with it.
    #[test]
    fn garbage_never_restores(bytes in prop::collection::vec(any::<u8>(), 0..256), magic in any::<bool>()) {
        let mut input = if magic { b"TALLYSN2".to_vec() } else { Vec::new() };
        input.extend_from_slice(&bytes);
        let result = Engine::restore(&input);
        if !input.starts_with(b"TALLYSN2") {
            prop_assert!(result.is_err());
        }
        if let Ok(mut engine) = result {
            let t = engine.last_ms() + 1_000;
            engine.apply(t, &poke_commands());
        }
    }
}

/// Every single-byte change of a small real snapshot, to every value, restores or is refused
/// without panicking, and an accepted one can apply commands.
#[test]
fn every_single_byte_change_of_a_snapshot_is_survived() {
    let mut engine = engine_with(
        0,
        vec![
            pool_limit(0, Some(3), false, false),
            pool_limit(1, Some(3), false, false),
            pool_limit(2, Some(3), false, false),
        ],
    );
    let t = 1_700_000_000_000;
    engine.apply(t, &poke_commands());
    let bytes = engine.snapshot();
    let mut failures = Vec::new();
    for i in 0..bytes.len() {
        for v in 0..=255u8 {
            if v == bytes[i] {
                continue;
            }
            let mut damaged = bytes.clone();
            damaged[i] = v;
            let result = catch_unwind(AssertUnwindSafe(|| {
                if let Ok(mut r) = Engine::restore(&damaged) {
                    let t = r.last_ms() + 1_000;
                    r.apply(t, &poke_commands());
                    let _ = r.snapshot();
                }
            }));
            if result.is_err() {
                failures.push((i, bytes[i], v));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} single-byte changes panicked (byte index, original, new), first ones: {:?}; \
         snapshot: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)],
        bytes
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Calendar windows across DST
// ---------------------------------------------------------------------------------------------

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix ms of a UTC date and time.
fn utc(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64, ms: i64) -> i64 {
    days_from_civil(y, mo, d) * DAY + h * HOUR + mi * 60_000 + s * 1_000 + ms
}

/// 2026 in America/New_York: EDT (UTC-4) from 2026-03-08 07:00Z to 2026-11-01 06:00Z.
fn new_york_offset(at_ms: i64) -> i64 {
    assert!(
        (utc(2026, 1, 2, 0, 0, 0, 0)..utc(2026, 12, 30, 0, 0, 0, 0)).contains(&at_ms),
        "the hand-written rules only cover 2026"
    );
    if (utc(2026, 3, 8, 7, 0, 0, 0)..utc(2026, 11, 1, 6, 0, 0, 0)).contains(&at_ms) {
        -4 * HOUR
    } else {
        -5 * HOUR
    }
}

/// The local date (days since the epoch) of an instant in New York.
fn new_york_date(at_ms: i64) -> i64 {
    (at_ms + new_york_offset(at_ms)).div_euclid(DAY)
}

/// The instant of local midnight starting `local_day` in New York.
fn new_york_midnight(local_day: i64) -> i64 {
    let est = local_day * DAY + 5 * HOUR;
    let midnight = if new_york_offset(est) == -5 * HOUR {
        est
    } else {
        local_day * DAY + 4 * HOUR
    };
    assert_eq!(new_york_date(midnight), local_day);
    assert_eq!(new_york_date(midnight - 1), local_day - 1);
    midnight
}

const SPRING_FORWARD: i64 = 1_772_953_200_000; // 2026-03-08T07:00:00Z
const FALL_BACK: i64 = 1_793_512_800_000; // 2026-11-01T06:00:00Z

/// Instants within three days of a 2026 New York DST change, often right at local midnight.
fn near_transition() -> impl Strategy<Value = i64> {
    let transition = prop::sample::select(vec![SPRING_FORWARD, FALL_BACK]);
    prop_oneof![
        (transition.clone(), -3 * DAY..3 * DAY).prop_map(|(t, off)| t + off),
        (transition, -3i64..=3, -2i64..=2)
            .prop_map(|(t, day, ms)| new_york_midnight(new_york_date(t) + day) + ms),
    ]
}

fn new_york_daily() -> LimitSpec {
    spec(
        "daily",
        &["user"],
        1,
        WindowSpec::Calendar {
            unit: CalendarUnit::Day,
            time_zone: "America/New_York".into(),
        },
    )
}

proptest! {
    #![proptest_config(config(256))]

    /// A daily limit of 1 in New York admits a second hit iff it falls on another local date,
    /// and reports the time left until the next local midnight.
    #[test]
    fn calendar_day_follows_new_york_dates(
        first in near_transition(),
        second in prop_oneof![
            (0i64..HOUR).prop_map(Err),
            (0i64..2 * DAY).prop_map(Err),
            near_transition().prop_map(Ok),
        ],
    ) {
        let second = match second {
            Ok(at) => at.max(first),
            Err(gap) => first + gap,
        };
        let mut engine = engine_with(0, vec![new_york_daily()]);
        let d = hit(&mut engine, first, &[("user", "alice")], 1);
        prop_assert_eq!(d.code, Code::Ok);
        let next_midnight = new_york_midnight(new_york_date(first) + 1);
        prop_assert_eq!(d.statuses[0].reset_in_ms, (next_midnight - first) as u64, "first hit at {}", first);
        let d = hit(&mut engine, second, &[("user", "alice")], 1);
        let new_day = new_york_date(second) != new_york_date(first);
        prop_assert_eq!(
            d.code == Code::Ok, new_day,
            "first hit at {} (local day {}), second at {} (local day {}): {:?}",
            first, new_york_date(first), second, new_york_date(second), d
        );
        if new_day {
            let next_midnight = new_york_midnight(new_york_date(second) + 1);
            prop_assert_eq!(d.statuses[0].reset_in_ms, (next_midnight - second) as u64);
        }
    }
}

/// A capacity-1 counter admits at `before`, is then full, and admits again at `boundary`
/// (`before` + 1 ms); the window starting there lasts `length` ms.
fn assert_resets_at(window: WindowSpec, before: i64, boundary: i64, length: i64) {
    assert_eq!(before + 1, boundary);
    let mut engine = engine_with(0, vec![spec("cal", &["user"], 1, window.clone())]);
    let who = [("user", "alice")];
    let d = hit(&mut engine, before, &who, 1);
    assert_eq!(d.code, Code::Ok, "{window:?} at {before}: {d:?}");
    assert_eq!(
        d.statuses[0].reset_in_ms, 1,
        "{window:?} at {before}: {d:?}"
    );
    let d = hit(&mut engine, before, &who, 1);
    assert_eq!(d.code, Code::OverLimit, "{window:?} at {before}: {d:?}");
    let d = hit(&mut engine, boundary, &who, 1);
    assert_eq!(d.code, Code::Ok, "{window:?} at {boundary}: {d:?}");
    assert_eq!(
        d.statuses[0].reset_in_ms, length as u64,
        "{window:?} window starting at {boundary}: {d:?}"
    );
    let d = hit(&mut engine, boundary + length - 1, &who, 1);
    assert_eq!(
        d.code,
        Code::OverLimit,
        "{window:?} one ms before the end: {d:?}"
    );
    let d = hit(&mut engine, boundary + length, &who, 1);
    assert_eq!(d.code, Code::Ok, "{window:?} at the end: {d:?}");
}

#[test]
fn calendar_day_resets_at_new_york_midnight_across_dst() {
    let day = || WindowSpec::Calendar {
        unit: CalendarUnit::Day,
        time_zone: "America/New_York".into(),
    };
    // Sat 2026-03-07 23:59:59.999 EST, then Sun 2026-03-08 00:00 EST: a 23-hour day.
    let midnight = utc(2026, 3, 8, 5, 0, 0, 0);
    assert_eq!(midnight, new_york_midnight(new_york_date(SPRING_FORWARD)));
    assert_resets_at(day(), midnight - 1, midnight, 23 * HOUR);
    // Sun 2026-03-08 23:59:59.999 EDT, then Mon 2026-03-09 00:00 EDT: a 24-hour day.
    let midnight = utc(2026, 3, 9, 4, 0, 0, 0);
    assert_resets_at(day(), midnight - 1, midnight, 24 * HOUR);
    // Sat 2026-10-31 23:59:59.999 EDT, then Sun 2026-11-01 00:00 EDT: a 25-hour day.
    let midnight = utc(2026, 11, 1, 4, 0, 0, 0);
    assert_eq!(midnight, new_york_midnight(new_york_date(FALL_BACK)));
    assert_resets_at(day(), midnight - 1, midnight, 25 * HOUR);
    // Sun 2026-11-01 23:59:59.999 EST, then Mon 2026-11-02 00:00 EST.
    let midnight = utc(2026, 11, 2, 5, 0, 0, 0);
    assert_resets_at(day(), midnight - 1, midnight, 24 * HOUR);
}

#[test]
fn calendar_week_and_month_reset_at_berlin_midnight() {
    let berlin = |unit| WindowSpec::Calendar {
        unit,
        time_zone: "Europe/Berlin".into(),
    };
    let week = || berlin(CalendarUnit::Week { start: 1 });
    let month = || berlin(CalendarUnit::Month { day: 1 });
    // CEST (UTC+2) runs from 2026-03-29 01:00Z to 2026-10-25 01:00Z; CET (UTC+1) otherwise.
    // Mon 2026-03-23 00:00 CET; that week ends Mon 2026-03-30 00:00 CEST (one hour short).
    let monday = utc(2026, 3, 22, 23, 0, 0, 0);
    assert_resets_at(week(), monday - 1, monday, 7 * DAY - HOUR);
    // Mon 2026-03-30 00:00 CEST: a full week.
    let monday = utc(2026, 3, 29, 22, 0, 0, 0);
    assert_resets_at(week(), monday - 1, monday, 7 * DAY);
    // Mon 2026-10-19 00:00 CEST; that week ends Mon 2026-10-26 00:00 CET (one hour long).
    let monday = utc(2026, 10, 18, 22, 0, 0, 0);
    assert_resets_at(week(), monday - 1, monday, 7 * DAY + HOUR);
    // 2026-03-01 00:00 CET to 2026-04-01 00:00 CEST: 31 days less an hour.
    let first = utc(2026, 2, 28, 23, 0, 0, 0);
    assert_resets_at(month(), first - 1, first, 31 * DAY - HOUR);
    // 2026-04-01 00:00 CEST to 2026-05-01 00:00 CEST.
    let first = utc(2026, 3, 31, 22, 0, 0, 0);
    assert_resets_at(month(), first - 1, first, 30 * DAY);
    // 2026-10-01 00:00 CEST to 2026-11-01 00:00 CET: 31 days and an hour.
    let first = utc(2026, 9, 30, 22, 0, 0, 0);
    assert_resets_at(month(), first - 1, first, 31 * DAY + HOUR);
    // 2026-11-01 00:00 CET to 2026-12-01 00:00 CET.
    let first = utc(2026, 10, 31, 23, 0, 0, 0);
    assert_resets_at(month(), first - 1, first, 30 * DAY);
}

// ---------------------------------------------------------------------------------------------
// 6. Reclamation
// ---------------------------------------------------------------------------------------------

/// Windows for the reclamation test, with a time after which any counter is surely idle.
fn reclaim_window_strategy() -> impl Strategy<Value = (WindowSpec, i64)> {
    prop_oneof![
        (1_000u64..=5_000).prop_map(|d| (WindowSpec::Fixed { duration_ms: d }, d as i64)),
        (1_000u64..=5_000).prop_map(|d| (WindowSpec::FromFirstHit { duration_ms: d }, d as i64)),
        (1u64..=5, prop::sample::select(vec![1u64, 4, 10])).prop_map(|(s, slots)| (
            WindowSpec::Rolling {
                window_ms: s * 1_000,
                resolution_ms: s * 1_000 / slots
            },
            (s * 1_000) as i64
        )),
        (1u64..=3, 10u64..=500).prop_map(|(amount, every)| (
            WindowSpec::TokenBucket {
                refill_amount: amount,
                refill_every_ms: every
            },
            // Capacity is at most 10: full again after 10 * every / amount.
            (10 * every).div_ceil(amount) as i64
        )),
        prop::sample::select(vec!["UTC", "America/New_York", "Asia/Kolkata"]).prop_map(|tz| (
            WindowSpec::Calendar {
                unit: CalendarUnit::Day,
                time_zone: tz.into()
            },
            25 * HOUR
        )),
    ]
}

proptest! {
    #![proptest_config(config(96))]

    /// Counters whose window has passed are reclaimed by the batches that follow; afterwards a
    /// reclaimed counter, an idle unreclaimed one and no counter at all decide identically.
    #[test]
    fn reclaimed_counters_decide_like_fresh_ones(
        (window, idle_after) in reclaim_window_strategy(),
        capacity in 1u64..=10,
        users in 1usize..=200,
        first_hits in prop::collection::vec(1u64..=12, 200),
        later in prop::collection::vec(prop_oneof![1 => Just(None), 3 => (0u64..=12).prop_map(Some)], 200),
        start in 1_760_000_000_000i64..1_780_000_000_000,
        extra in 0i64..10_000,
    ) {
        let limits = vec![spec("per-user", &["user"], capacity, window.clone())];
        let mut swept = engine_with(0, limits.clone());
        let mut unswept = engine_with(0, limits.clone());
        let mut fresh = engine_with(0, limits);
        let firsts: Vec<Command> = (0..users)
            .map(|u| request(Mode::Enforce, first_hits[u], vec![desc(&[("user", &user(u))], None)]))
            .collect();
        let out = swept.apply(start, &firsts);
        prop_assert_eq!(&out, &unswept.apply(start, &firsts));
        let admitted = out.iter().filter(|o| decision(o).code == Code::Ok).count() as u64;
        prop_assert_eq!(swept.status().live_counters, admitted);

        let late = start + idle_after + extra;
        let before = swept.status().reclaimed_counters;
        let mut empty_batches = 0;
        while swept.status().live_counters > 0 {
            prop_assert!(
                empty_batches <= users / 64 + 1,
                "{} counters still live after {} empty batches at {}",
                swept.status().live_counters, empty_batches, late
            );
            swept.apply(late, &[]);
            empty_batches += 1;
        }
        prop_assert_eq!(swept.status().reclaimed_counters - before, admitted);

        let laters: Vec<Command> = (0..users)
            .map(|u| request(Mode::Enforce, 2, vec![desc(&[("user", &user(u))], later[u])]))
            .collect();
        for at in [late, late + 1, late + idle_after / 2] {
            let expected = fresh.apply(at, &laters);
            prop_assert_eq!(&swept.apply(at, &laters), &expected, "reclaimed counters at {}", at);
            prop_assert_eq!(&unswept.apply(at, &laters), &expected, "idle counters at {}", at);
        }
        // Idle counters are replicated state (they count toward the table bound), so the
        // three snapshots differ; each restores to an engine that decides alike.
        let at = late + idle_after;
        let expected = fresh.apply(at, &laters);
        for (name, engine) in [("swept", &swept), ("unswept", &unswept)] {
            let mut restored = Engine::restore(&engine.snapshot()).unwrap();
            prop_assert_eq!(&restored.apply(at, &laters), &expected, "restored {}", name);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Limit reloads
// ---------------------------------------------------------------------------------------------

#[test]
fn reload_keeps_counters_of_unchanged_limits() {
    let windows = [
        (
            WindowSpec::Fixed {
                duration_ms: HOUR as u64,
            },
            WindowSpec::Fixed {
                duration_ms: 2 * HOUR as u64,
            },
        ),
        (
            WindowSpec::FromFirstHit {
                duration_ms: HOUR as u64,
            },
            WindowSpec::FromFirstHit {
                duration_ms: 2 * HOUR as u64,
            },
        ),
        (
            WindowSpec::Rolling {
                window_ms: HOUR as u64,
                resolution_ms: 60_000,
            },
            WindowSpec::Rolling {
                window_ms: HOUR as u64,
                resolution_ms: 1_000,
            },
        ),
        (
            WindowSpec::TokenBucket {
                refill_amount: 1,
                refill_every_ms: HOUR as u64,
            },
            WindowSpec::TokenBucket {
                refill_amount: 2,
                refill_every_ms: HOUR as u64,
            },
        ),
        (
            WindowSpec::Calendar {
                unit: CalendarUnit::Day,
                time_zone: "UTC".into(),
            },
            WindowSpec::Calendar {
                unit: CalendarUnit::Day,
                time_zone: "Europe/Berlin".into(),
            },
        ),
    ];
    // Early in a UTC (and Berlin) day and hour: no window ends during the test.
    let t = utc(2026, 5, 5, 0, 0, 0, 0) + 1_000;
    let alice = [("user", "alice")];
    for (window, changed) in windows {
        let with = |name: &str, capacity: u64, window: &WindowSpec| {
            spec(name, &["user"], capacity, window.clone())
        };
        let other = spec(
            "other",
            &["org"],
            1,
            WindowSpec::Fixed {
                duration_ms: 60_000,
            },
        );
        let mut engine = engine_with(0, vec![with("quota", 5, &window)]);
        assert_eq!(hit(&mut engine, t, &alice, 3).code, Code::Ok, "{window:?}");
        assert_eq!(remaining(&mut engine, t, &alice), 2, "{window:?}");

        // More capacity, another name, another limit beside it: the counter is kept.
        let out = engine.apply(t, &[set(vec![other.clone(), with("renamed", 10, &window)])]);
        assert!(
            matches!(
                out[0],
                Outcome::LimitsReplaced {
                    limits: 2,
                    kept: 1,
                    ..
                }
            ),
            "{window:?}: {out:?}"
        );
        assert_eq!(remaining(&mut engine, t, &alice), 7, "{window:?}");

        // Less capacity than already used: full, and a hit is denied without debiting.
        engine.apply(t, &[set(vec![with("quota", 2, &window)])]);
        assert_eq!(remaining(&mut engine, t, &alice), 0, "{window:?}");
        assert_eq!(
            hit(&mut engine, t, &alice, 1).code,
            Code::OverLimit,
            "{window:?}"
        );
        engine.apply(t, &[set(vec![with("quota", 5, &window)])]);
        assert_eq!(remaining(&mut engine, t, &alice), 2, "{window:?}");

        // Another window: a new limit, fresh counters.
        let out = engine.apply(t, &[set(vec![with("quota", 5, &changed)])]);
        assert!(
            matches!(
                out[0],
                Outcome::LimitsReplaced {
                    limits: 1,
                    kept: 0,
                    ..
                }
            ),
            "{changed:?}: {out:?}"
        );
        assert_eq!(remaining(&mut engine, t, &alice), 5, "{changed:?}");
    }
}

#[test]
fn refused_reload_changes_nothing() {
    let window = WindowSpec::Fixed {
        duration_ms: HOUR as u64,
    };
    let mut engine = engine_with(0, vec![spec("quota", &["user"], 5, window.clone())]);
    let t = 100 * HOUR;
    let alice = [("user", "alice")];
    assert_eq!(hit(&mut engine, t, &alice, 2).code, Code::Ok);
    let before = engine.snapshot();
    let bad = spec(
        "bad",
        &["user"],
        1,
        WindowSpec::Rolling {
            window_ms: 1_000,
            resolution_ms: 300,
        },
    );
    let out = engine.apply(t, &[set(vec![spec("quota", &["user"], 9, window), bad])]);
    assert!(matches!(out[0], Outcome::Rejected(_)), "{out:?}");
    assert!(engine.snapshot() == before);
    assert_eq!(remaining(&mut engine, t, &alice), 3);
}

// ---------------------------------------------------------------------------------------------
// Regressions found by the properties above, reduced
// ---------------------------------------------------------------------------------------------

/// Whether the counter table is full must not depend on state that snapshots do not carry
/// (table order, the sweep cursor, idle counters not swept yet): a replica restored from a
/// snapshot must decide as the one that applied the whole log.
#[test]
fn table_bound_decisions_do_not_depend_on_restore() {
    let limits = vec![
        spec(
            "short",
            &["user"],
            5,
            WindowSpec::Fixed { duration_ms: 1_000 },
        ),
        spec(
            "long",
            &["org"],
            5,
            WindowSpec::Fixed {
                duration_ms: HOUR as u64,
            },
        ),
    ];
    let one = |k: &str, v: &str| request(Mode::Enforce, 1, vec![desc(&[(k, v)], None)]);
    let mut a = Engine::new(EngineSettings {
        max_counters: 3,
        ..EngineSettings::default()
    });
    a.apply(0, &[set(limits)]);
    let t = 10 * HOUR;
    a.apply(t, &[one("user", "a"), one("user", "b")]);
    a.apply(t, &[one("org", "c")]);
    let mut c = Engine::restore(&a.snapshot()).expect("restores");
    // One second later the two short windows have ended: one live counter, room for two.
    let batch = [request(
        Mode::Enforce,
        1,
        vec![desc(&[("org", "d")], None), desc(&[("org", "e")], None)],
    )];
    let fresh_start = c.apply(t + 1_000, &batch);
    let whole_log = a.apply(t + 1_000, &batch);
    assert_eq!(
        whole_log, fresh_start,
        "the engine that applied the whole log (left) and the one restored from its snapshot \
         (right) disagree"
    );
}

/// Report may push a rolling counter past its capacity, even past u64::MAX in sum; the
/// counter must stay consistent: hits still in the window keep counting, and the engine's own
/// snapshot restores.
#[test]
fn rolling_counter_survives_huge_reports() {
    let window = WindowSpec::Rolling {
        window_ms: 1_000,
        resolution_ms: 500,
    };
    let mut engine = engine_with(0, vec![spec("r", &["user"], 10, window)]);
    let t = 10 * HOUR;
    let alice = [("user", "alice")];
    let report = |hits| request(Mode::Report, hits, vec![desc(&alice, None)]);
    // Beyond the stated bound: refused, nothing counted.
    let out = engine.apply(t, &[report(u64::MAX)]);
    assert!(matches!(out[0], Outcome::Rejected(_)), "{out:?}");
    // The largest allowed hits, many times over, in the slot that then leaves the window.
    let max = tally_server::engine::command::MAX_HITS;
    engine.apply(t, &vec![report(max); 40_000]);
    engine.apply(t + 500, &[report(5)]);
    // The first slot has left the window; the 5 hits of the second are still in it.
    engine.apply(t + 1_000, &[]);
    let bytes = engine.snapshot();
    if let Err(e) = Engine::restore(&bytes) {
        panic!("the engine's own snapshot is refused: {e}");
    }
    assert_eq!(remaining(&mut engine, t + 1_000, &alice), 5);
}

// ---------------------------------------------------------------------------------------------
// 8. Input from the network never panics the engine
// ---------------------------------------------------------------------------------------------

fn any_unit() -> impl Strategy<Value = tally_server::engine::limits::Unit> {
    use tally_server::engine::limits::Unit;
    prop::sample::select(vec![
        Unit::Unknown,
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
        Unit::Day,
        Unit::Week,
        Unit::Month,
        Unit::Year,
    ])
}

fn wild_descriptor() -> impl Strategy<Value = Descriptor> {
    let entry = (
        prop_oneof![Just("user".to_string()), Just("k".to_string()), ".{0,6}"],
        prop_oneof![
            8 => Just("a".to_string()),
            8 => ".{0,12}",
            1 => (1020usize..1030).prop_map(|n| "x".repeat(n)),
        ],
    );
    (
        prop_oneof![
            9 => prop::collection::vec(entry.clone(), 0..4),
            1 => prop::collection::vec(entry, 30..36),
        ],
        prop::option::of(prop_oneof![0u64..10, any::<u64>()]),
        prop::option::of((any::<u32>(), any_unit())),
    )
        .prop_map(|(entries, hits, o)| Descriptor {
            entries,
            hits,
            limit_override: o.map(|(rpu, unit)| LimitOverride {
                requests_per_unit: u64::from(rpu),
                unit,
            }),
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Arbitrary requests (empty, oversized, odd unicode, huge hits, unknown units) against
    /// every kind of limit, request-scoped CEL included: each is decided or refused as
    /// invalid, and a refused one changes nothing.
    #[test]
    fn arbitrary_requests_are_decided_or_refused_never_panic(
        requests in prop::collection::vec(
            (
                prop_oneof![
                    8 => Just(DOMAIN.to_string()),
                    1 => ".{0,4}",
                    1 => (250usize..260).prop_map(|n| "d".repeat(n)),
                ],
                prop_oneof![
                    9 => prop::collection::vec(wild_descriptor(), 0..4),
                    1 => prop::collection::vec(wild_descriptor(), 62..70),
                ],
                prop_oneof![1u64..5, any::<u64>()],
                prop::sample::select(vec![Mode::Enforce, Mode::CheckOnly, Mode::Report]),
            ),
            1..12,
        ),
    ) {
        let cel = LimitSpec {
            scope: Scope::Request {
                conditions: vec!["descriptors[0]['k'] == 'a'".into()],
                variables: vec!["descriptors[0]['user']".into()],
            },
            ..spec("cel", &[], 5, WindowSpec::FromFirstHit { duration_ms: 1_000 })
        };
        let mut engine = engine_with(0, vec![
            spec("fixed", &["user"], 3, WindowSpec::Fixed { duration_ms: 1_000 }),
            spec("rolling", &["user", "k"], 4, WindowSpec::Rolling { window_ms: 2_000, resolution_ms: 500 }),
            spec("bucket", &[], 6, WindowSpec::TokenBucket { refill_amount: 1, refill_every_ms: 100 }),
            cel,
        ]);
        for (i, (domain, descriptors, hits, mode)) in requests.into_iter().enumerate() {
            let cmd = RateLimitCommand { domain, descriptors, hits, mode };
            let valid = cmd.validate().is_ok();
            let before = engine.snapshot();
            let out = engine.apply(10 * HOUR + i as i64 * 300, &[Command::RateLimit(cmd)]);
            match &out[0] {
                Outcome::RateLimit(_) => prop_assert!(valid),
                Outcome::Rejected(tally_server::engine::CommandError::Invalid { .. }) => {
                    prop_assert!(!valid);
                    // Only the batch's time moved; no counter changed.
                    let mut replay = Engine::restore(&before).unwrap();
                    replay.apply(10 * HOUR + i as i64 * 300, &[]);
                    prop_assert!(replay.snapshot() == engine.snapshot());
                }
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
    }
}
