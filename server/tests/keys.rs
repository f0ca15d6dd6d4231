//! API keys and subscriptions in the engine: authorization at batch time (401 vs 403 cases),
//! permanent deletion, rotation grace, exact expiry, debounced last-used, and the quotas a
//! subscription's limits become.

use tally_server::engine::access::{
    Authorize, Budget, Denial, KeyOverrides, NewKey, SecretHash, Subscription,
};
use tally_server::engine::limits::{CalendarUnit, WindowSpec};
use tally_server::engine::usage::{
    Attribution, Enforcement, Metric, QuotaSet, Reserve, Tokens, UsageResult,
};
use tally_server::engine::{Command, CommandError, Engine, EngineSettings, Outcome};

/// 2026-03-07T12:00:00Z.
const T0: i64 = 1_772_884_800_000;

fn hash(secret: &str) -> SecretHash {
    use sha2::Digest;
    sha2::Sha256::digest(secret.as_bytes()).into()
}

fn one(e: &mut Engine, at_ms: i64, c: Command) -> Outcome {
    e.apply(at_ms, &[c]).pop().unwrap()
}

fn free() -> Subscription {
    Subscription {
        name: "free".into(),
        allowed_models: vec!["small".into()],
        requests_per_minute: Some(5),
        tokens_per_minute: Some(100),
        max_classification: Some(1),
        max_concurrent: Some(2),
        budgets: vec![Budget {
            name: "daily-tokens".into(),
            metric: Metric::TotalTokens,
            limit: 1_000,
            window: WindowSpec::Calendar {
                unit: CalendarUnit::Day,
                time_zone: "UTC".into(),
            },
            enforcement: Enforcement::Hard,
            thresholds_pct: vec![80],
        }],
        ..Subscription::default()
    }
}

fn key(id: &str, secret: &str, subscription: Option<&str>) -> Command {
    Command::CreateKey(NewKey {
        id: id.into(),
        name: format!("key {id}"),
        description: String::new(),
        subscription: subscription.map(str::to_owned),
        labels: vec![("team".into(), "red".into())],
        expires_ms: None,
        ephemeral: false,
        secret_sha256: hash(secret),
        created_by: "test".into(),
        overrides: None,
    })
}

fn with_overrides(command: Command, overrides: KeyOverrides) -> Command {
    match command {
        Command::CreateKey(k) => Command::CreateKey(NewKey {
            overrides: Some(overrides),
            ..k
        }),
        other => other,
    }
}

fn auth(id: &str, secret: &str, model: Option<&str>, class: Option<u8>) -> Command {
    Command::Authorize(Authorize {
        key_id: id.into(),
        secret_sha256: hash(secret),
        model: model.map(str::to_owned),
        classification: class,
    })
}

fn verdict(o: &Outcome) -> Result<String, Denial> {
    match o {
        Outcome::Authorized(Ok(g)) => Ok(g.key_id.clone()),
        Outcome::Authorized(Err(d)) => Err(d.clone()),
        other => panic!("not an authorization: {other:?}"),
    }
}

const A: &str = "aaaaaaaaaaaaaaaa";
const B: &str = "bbbbbbbbbbbbbbbb";

fn engine() -> Engine {
    let mut e = Engine::new(EngineSettings::default());
    let out = one(&mut e, T0, Command::PutSubscription(free()));
    assert!(
        matches!(out, Outcome::SubscriptionsChanged { quotas: 4 }),
        "{out:?}"
    );
    assert!(matches!(
        one(&mut e, T0, key(A, "sa", Some("free"))),
        Outcome::Key(_)
    ));
    e
}

#[test]
fn every_denial_and_the_happy_path() {
    let mut e = engine();
    assert_eq!(
        verdict(&one(&mut e, T0, auth(A, "sa", Some("small"), Some(1)))),
        Ok(A.into())
    );
    let cases = [
        (auth(B, "sa", None, None), Denial::UnknownKey, true),
        (
            auth("not-an-id", "sa", None, None),
            Denial::UnknownKey,
            true,
        ),
        (auth(A, "wrong", None, None), Denial::BadSecret, true),
        (
            auth(A, "sa", Some("large"), None),
            Denial::ModelNotAllowed {
                model: "large".into(),
                subscription: "free".into(),
            },
            false,
        ),
        (
            auth(A, "sa", Some("small"), Some(2)),
            Denial::ClassificationTooHigh {
                level: "confidential".into(),
                max: "internal".into(),
            },
            false,
        ),
    ];
    for (cmd, want, unauthenticated) in cases {
        let got = verdict(&one(&mut e, T0, cmd)).unwrap_err();
        assert_eq!(got, want);
        assert_eq!(got.is_unauthenticated(), unauthenticated, "{got:?}");
    }
    // Disabled: 403 from the next batch on; a bad secret is still 401 first.
    one(
        &mut e,
        T0 + 1,
        Command::SetKeyEnabled {
            id: A.into(),
            enabled: false,
        },
    );
    assert_eq!(
        verdict(&one(&mut e, T0 + 2, auth(A, "sa", None, None))),
        Err(Denial::Disabled)
    );
    assert_eq!(
        verdict(&one(&mut e, T0 + 2, auth(A, "x", None, None))),
        Err(Denial::BadSecret)
    );
    one(
        &mut e,
        T0 + 3,
        Command::SetKeyEnabled {
            id: A.into(),
            enabled: true,
        },
    );
    assert!(verdict(&one(&mut e, T0 + 4, auth(A, "sa", None, None))).is_ok());
    // A key bound to a subscription that does not exist is refused, naming the field.
    let out = one(&mut e, T0, key(B, "sb", Some("gold")));
    assert!(
        matches!(&out, Outcome::Rejected(CommandError::Invalid { field, .. }) if field == "subscription"),
        "{out:?}"
    );
    // A legacy key: no subscription, no limits, every model.
    one(&mut e, T0, key(B, "sb", None));
    assert!(verdict(&one(&mut e, T0, auth(B, "sb", Some("large"), Some(3)))).is_ok());
}

#[test]
fn delete_is_permanent() {
    let mut e = engine();
    assert!(matches!(
        one(&mut e, T0, Command::DeleteKey { id: A.into() }),
        Outcome::KeyDeleted { .. }
    ));
    assert_eq!(
        verdict(&one(&mut e, T0 + 1, auth(A, "sa", None, None))),
        Err(Denial::DeletedKey)
    );
    // The id can never be created again, not even with the same secret.
    let again = one(&mut e, T0 + 2, key(A, "sa", Some("free")));
    assert!(matches!(again, Outcome::Rejected(_)), "{again:?}");
    assert_eq!(
        verdict(&one(&mut e, T0 + 3, auth(A, "sa", None, None))),
        Err(Denial::DeletedKey)
    );
    assert!(e.key(A).is_none());
}

#[test]
fn rotation_keeps_the_old_secret_for_its_grace_period_exactly() {
    let mut e = engine();
    let rotate = Command::RotateKey {
        id: A.into(),
        secret_sha256: hash("sa2"),
        grace_ms: 10_000,
    };
    let Outcome::Key(view) = one(&mut e, T0, rotate) else {
        panic!("rotated")
    };
    assert_eq!(view.previous_valid_until_ms, Some(T0 + 10_000));
    assert!(verdict(&one(&mut e, T0 + 9_999, auth(A, "sa", None, None))).is_ok());
    assert!(verdict(&one(&mut e, T0 + 9_999, auth(A, "sa2", None, None))).is_ok());
    assert_eq!(
        verdict(&one(&mut e, T0 + 10_000, auth(A, "sa", None, None))),
        Err(Denial::BadSecret)
    );
    assert!(verdict(&one(&mut e, T0 + 10_000, auth(A, "sa2", None, None))).is_ok());
    let too_long = Command::RotateKey {
        id: A.into(),
        secret_sha256: hash("sa3"),
        grace_ms: 8 * 86_400_000,
    };
    assert!(matches!(one(&mut e, T0, too_long), Outcome::Rejected(_)));
}

#[test]
fn expiry_takes_effect_at_the_first_batch_at_or_past_it() {
    let mut e = engine();
    let Command::CreateKey(mut k) = key(B, "sb", Some("free")) else {
        unreachable!()
    };
    k.expires_ms = Some(T0 + 4 * 3_600_000);
    k.ephemeral = true;
    one(&mut e, T0, Command::CreateKey(k));
    assert!(
        verdict(&one(
            &mut e,
            T0 + 4 * 3_600_000 - 1,
            auth(B, "sb", None, None)
        ))
        .is_ok()
    );
    assert_eq!(
        verdict(&one(&mut e, T0 + 4 * 3_600_000, auth(B, "sb", None, None))),
        Err(Denial::ExpiredKey)
    );
}

#[test]
fn last_used_is_written_at_most_once_a_minute() {
    let mut e = engine();
    assert_eq!(e.key(A).unwrap().last_used_ms, None);
    one(&mut e, T0, auth(A, "sa", None, None));
    one(&mut e, T0 + 59_999, auth(A, "sa", None, None));
    assert_eq!(e.key(A).unwrap().last_used_ms, Some(T0));
    one(&mut e, T0 + 60_000, auth(A, "sa", None, None));
    assert_eq!(e.key(A).unwrap().last_used_ms, Some(T0 + 60_000));
    // A refused attempt is not a use.
    one(&mut e, T0 + 200_000, auth(A, "wrong", None, None));
    assert_eq!(e.key(A).unwrap().last_used_ms, Some(T0 + 60_000));
}

fn reserve(id: &str, subject: &str, tokens: u64) -> Command {
    Command::Reserve(Reserve {
        request_id: id.into(),
        who: Attribution {
            subject: subject.into(),
            subscription: "free".into(),
            ..Attribution::default()
        },
        estimate: Tokens {
            input: tokens,
            ..Tokens::default()
        },
        ttl_ms: 600_000,
        charge_on_expiry: false,
    })
}

#[test]
fn a_subscription_limits_every_key_on_it_through_its_derived_quotas() {
    let mut e = engine();
    let names: Vec<&str> = e.quotas().map(|q| q.name.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "sub:free:requests-per-minute",
            "sub:free:tokens-per-minute",
            "sub:free:concurrent",
            "sub:free:daily-tokens"
        ]
    );
    // Two in flight per key (max_concurrent 2); a third waits, another key has its own.
    let admitted = |o: &Outcome| matches!(o, Outcome::Usage(r) if matches!(r.result, UsageResult::Reserved { .. }));
    assert!(admitted(&one(&mut e, T0, reserve("r1", A, 10))));
    assert!(admitted(&one(&mut e, T0, reserve("r2", A, 10))));
    assert!(!admitted(&one(&mut e, T0, reserve("r3", A, 10))));
    assert!(admitted(&one(&mut e, T0, reserve("r4", B, 10))));
    // Tokens per minute: 100 per key.
    assert!(!admitted(&one(&mut e, T0, reserve("r5", "c", 101))));
    // A configured quota set keeps the subscriptions' quotas, and may not take their prefix.
    let out = one(&mut e, T0, Command::ReplaceQuotas(QuotaSet::default()));
    assert!(
        matches!(out, Outcome::QuotasReplaced { quotas: 4, kept: 4 }),
        "{out:?}"
    );
    let mut bad = QuotaSet::default();
    bad.quotas.push(e.quotas().next().unwrap().clone());
    let out = one(&mut e, T0, Command::ReplaceQuotas(bad));
    assert!(
        matches!(&out, Outcome::Rejected(CommandError::Invalid { field, .. }) if field == "quotas[0].name"),
        "{out:?}"
    );
    // A subscription with keys bound to it cannot go; changing it rebuilds its quotas.
    let out = one(
        &mut e,
        T0,
        Command::DeleteSubscription {
            name: "free".into(),
        },
    );
    assert!(matches!(out, Outcome::Rejected(_)), "{out:?}");
    let mut fewer = free();
    fewer.budgets.clear();
    fewer.max_concurrent = None;
    let out = one(&mut e, T0, Command::PutSubscription(fewer));
    assert!(
        matches!(out, Outcome::SubscriptionsChanged { quotas: 2 }),
        "{out:?}"
    );
}

#[test]
fn keys_and_subscriptions_survive_a_snapshot_and_hold_no_secret() {
    let mut e = engine();
    const SECRET: &str = "tly_cccccccccccccccc_do-not-store-me-0123456789";
    one(&mut e, T0, key("cccccccccccccccc", SECRET, Some("free")));
    one(&mut e, T0, auth(A, "sa", None, None));
    let bytes = e.snapshot();
    let restored = Engine::restore(&bytes).unwrap();
    assert_eq!(restored.snapshot(), bytes);
    assert_eq!(restored.key(A), e.key(A));
    assert_eq!(restored.subscriptions().count(), 1);
    let secret = SECRET.as_bytes();
    assert!(
        !bytes.windows(secret.len()).any(|w| w == secret),
        "no secret in a snapshot"
    );
    assert!(
        !bytes.windows(20).any(|w| w == &SECRET.as_bytes()[20..40]),
        "nor part of one"
    );
}

#[test]
fn a_key_overrides_its_subscription_without_disturbing_the_other_keys() {
    let mut e = engine();
    let admitted = |o: &Outcome| matches!(o, Outcome::Usage(r) if matches!(r.result, UsageResult::Reserved { .. }));
    // Key A fills its tier's in-flight cap (2).
    assert!(admitted(&one(&mut e, T0, reserve("a1", A, 10))));
    assert!(admitted(&one(&mut e, T0, reserve("a2", A, 10))));
    const C: &str = "cccccccccccccccc";
    let more = KeyOverrides {
        allowed_models: Some(vec!["small".into(), "large".into()]),
        max_classification: Some(2),
        max_concurrent: Some(3),
        ..KeyOverrides::default()
    };
    let out = one(
        &mut e,
        T0,
        with_overrides(key(C, "sc", Some("free")), more.clone()),
    );
    assert!(
        matches!(&out, Outcome::Key(v) if v.overrides.as_deref() == Some(&more)),
        "{out:?}"
    );
    let names: Vec<&str> = e.quotas().map(|q| q.name.as_str()).collect();
    assert!(
        names.contains(&"sub:free:concurrent@cccccccccccccccc"),
        "{names:?}"
    );
    assert_eq!(
        names.len(),
        8,
        "the tier's four and C's own four: {names:?}"
    );
    // The tier's counters were kept: A is still at its cap.
    assert!(!admitted(&one(&mut e, T0, reserve("a3", A, 10))));
    // C has its own cap of 3, and its own limits for models and classification.
    for r in ["c1", "c2", "c3"] {
        assert!(admitted(&one(&mut e, T0, reserve(r, C, 10))), "{r}");
    }
    assert!(!admitted(&one(&mut e, T0, reserve("c4", C, 10))));
    assert_eq!(
        verdict(&one(&mut e, T0, auth(C, "sc", Some("large"), Some(2)))),
        Ok(C.into())
    );
    assert!(verdict(&one(&mut e, T0, auth(A, "sa", Some("large"), None))).is_err());
    assert_eq!(e.effective_subscription(C).unwrap().max_concurrent, Some(3));
    assert_eq!(e.effective_subscription(A).unwrap(), free());
    // Survives a snapshot.
    let restored = Engine::restore(&e.snapshot()).unwrap();
    assert_eq!(restored.snapshot(), e.snapshot());

    // Bad overrides are refused naming the field, and change nothing.
    let before = e.snapshot();
    let zero = KeyOverrides {
        requests_per_minute: Some(0),
        ..KeyOverrides::default()
    };
    let set = |id: &str, overrides| Command::SetKeyOverrides {
        id: id.into(),
        overrides,
    };
    let out = one(&mut e, T0, set(C, Some(zero)));
    assert!(
        matches!(&out, Outcome::Rejected(CommandError::Invalid { field, .. }) if field == "overrides.requests_per_minute"),
        "{out:?}"
    );
    let out = one(&mut e, T0, with_overrides(key(B, "sb", None), more.clone()));
    assert!(matches!(out, Outcome::Rejected(_)), "a legacy key: {out:?}");
    assert_eq!(e.snapshot().len(), before.len());

    // Cleared: C is the tier's again.
    let out = one(&mut e, T0, set(C, None));
    assert!(
        matches!(&out, Outcome::Key(v) if v.overrides.is_none()),
        "{out:?}"
    );
    assert_eq!(e.quotas().count(), 4);
    assert!(verdict(&one(&mut e, T0, auth(C, "sc", Some("large"), None))).is_err());
    // A key deleted with overrides takes its quotas with it.
    one(&mut e, T0, set(C, Some(more)));
    assert_eq!(e.quotas().count(), 8);
    one(&mut e, T0, Command::DeleteKey { id: C.into() });
    assert_eq!(e.quotas().count(), 4);
}
