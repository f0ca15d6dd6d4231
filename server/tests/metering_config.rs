//! The limits file's `metering` section in a running server: the quotas and prices of the
//! file are put in force at start and on every reload; a bad file changes nothing; a file
//! without `prices:` leaves the prices in force alone, and unchanged prices are not set again.

mod common;

use std::time::Duration;

use common::*;
use tally_server::config::{self, Metering};
use tally_server::engine::usage::{ModelPrice, PriceCatalog, QuotaSpec};
use tally_server::engine::{Command, Outcome};
use tally_server::node::Node;
use tally_server::server::{self, LimitsSource, ServerConfig};

const LIMITS: &str = r#"
domains:
  - domain: d
    limits:
      - name: per-user
        match: { kind: req }
        by: [user]
        capacity: 3
        window: 1m
metering:
  quotas:
    - name: daily-tokens
      match: { subscription: free }
      per: [subject]
      metric: total_tokens
      limit: 1000
      window: { fixed: day, time_zone: Europe/Berlin }
      thresholds: [80, 95]
    - name: in-flight
      per: [subject]
      metric: concurrent
      limit: 2
"#;

const PRICES: &str = r#"
  prices:
    - { model: gpt-4o-mini, input_nusd: 150, cached_input_nusd: 75, output_nusd: 600 }
    - { model: gpt-4o, input_nusd: 2500, cached_input_nusd: 1250, output_nusd: 10000 }
"#;

/// The file's metering section, as the engine will hold it.
fn metering_of(text: &str) -> Metering {
    config::parse_config(text, None, "test").unwrap().metering
}

async fn quotas(node: &Node) -> Vec<QuotaSpec> {
    node.read(|e| e.quotas().cloned().collect()).await.unwrap()
}

async fn prices(node: &Node) -> (u64, PriceCatalog) {
    node.read(|e| {
        let (version, catalog) = e.prices();
        (version, catalog.clone())
    })
    .await
    .unwrap()
}

/// Waits (at most 10 s) until `check` holds of the node.
async fn until<F, Fut>(node: &Node, what: &str, check: F)
where
    F: Fn(Node) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check(node.clone()).await {
        assert!(tokio::time::Instant::now() < deadline, "{what} within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_embedded_example_has_its_quotas_and_prices_in_force() {
    let t = start_with("", |c| c.limits = ServerConfig::default().limits).await;
    let node = t.server.node().expect("node started");
    let expected = metering_of(server::EMBEDDED_LIMITS);
    assert!(expected.quotas.quotas.len() >= 5, "{expected:?}");
    // The configured quotas, then the ones its three tiers' limits become.
    let in_force = quotas(&node).await;
    let (configured, derived) = in_force.split_at(expected.quotas.quotas.len());
    assert_eq!(configured, &expected.quotas.quotas[..]);
    let tiers: Vec<&str> = expected
        .subscriptions
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(tiers, vec!["free", "premium", "enterprise"]);
    let derived: Vec<&str> = derived.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(
        derived,
        vec![
            "sub:enterprise:requests-per-minute",
            "sub:enterprise:tokens-per-minute",
            "sub:enterprise:monthly-cost",
            "sub:free:requests-per-minute",
            "sub:free:tokens-per-minute",
            "sub:free:concurrent",
            "sub:premium:requests-per-minute",
            "sub:premium:tokens-per-minute",
        ]
    );
    let free = node
        .read(|e| e.subscriptions().find(|s| s.name == "free").cloned())
        .await
        .unwrap()
        .expect("free is in force");
    assert_eq!(
        (free.requests_per_minute, free.tokens_per_minute),
        (Some(5), Some(100))
    );
    let (version, catalog) = prices(&node).await;
    assert_eq!(version, 1, "set once, at start");
    let mut want = expected.prices.expect("the example prices models").models;
    let mut have = catalog.models;
    want.sort_by(|a, b| a.model.cmp(&b.model));
    have.sort_by(|a, b| a.model.cmp(&b.model));
    assert_eq!(have, want);
    t.stop().await;
}

#[tokio::test]
async fn a_reload_puts_changed_quotas_and_prices_in_force_and_a_bad_file_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("limits.yaml");
    std::fs::write(&path, LIMITS).unwrap();
    let t = start_with("", |c| {
        c.limits = LimitsSource::File(path.clone());
        c.limits_poll = Duration::from_millis(20);
    })
    .await;
    let node = t.server.node().expect("node started");
    assert_eq!(quotas(&node).await, metering_of(LIMITS).quotas.quotas);
    assert_eq!(prices(&node).await.0, 0, "the file sets no prices");

    // A changed quota limit is picked up.
    let raised = LIMITS.replace("limit: 1000", "limit: 5000");
    std::fs::write(&path, &raised).unwrap();
    until(&node, "the raised quota", |n| async move {
        quotas(&n).await.first().is_some_and(|q| q.limit == 5000)
    })
    .await;
    assert_eq!(quotas(&node).await, metering_of(&raised).quotas.quotas);

    // A file whose metering section is bad is refused whole: limits and quotas stay.
    let generation = node.read(|e| e.status().limits_generation).await.unwrap();
    let bad = raised
        .replace("capacity: 3", "capacity: 30")
        .replace("metric: concurrent", "metric: parallel");
    std::fs::write(&path, &bad).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        node.read(|e| e.status().limits_generation).await.unwrap(),
        generation
    );
    assert_eq!(quotas(&node).await, metering_of(&raised).quotas.quotas);

    // Prices in the file are set...
    let priced = format!("{raised}{PRICES}");
    std::fs::write(&path, &priced).unwrap();
    until(&node, "the file's prices", |n| async move {
        prices(&n).await.0 == 1
    })
    .await;
    assert_eq!(prices(&node).await.1, metering_of(&priced).prices.unwrap());

    // ... and not set again while unchanged (here: the file changes, its prices do not).
    let generation = node.read(|e| e.status().limits_generation).await.unwrap();
    std::fs::write(&path, format!("{priced}# a comment\n")).unwrap();
    until(&node, "the reload", |n| async move {
        n.read(|e| e.status().limits_generation).await.unwrap() > generation
    })
    .await;
    // Prices would be proposed after the limits and quotas: give them time to show.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        prices(&node).await.0,
        1,
        "unchanged prices are not set again"
    );

    // Without `prices:` the file leaves the prices in force alone, and quotas removed from
    // the file are removed from the engine.
    let generation = node.read(|e| e.status().limits_generation).await.unwrap();
    let lean = raised.split("metering:").next().unwrap().to_owned();
    std::fs::write(&path, &lean).unwrap();
    until(&node, "the reload", |n| async move {
        n.read(|e| e.status().limits_generation).await.unwrap() > generation
    })
    .await;
    until(&node, "no quotas", |n| async move {
        quotas(&n).await.is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(prices(&node).await.0, 1);
    t.stop().await;
}

#[tokio::test]
async fn prices_set_over_the_api_stay_until_the_file_sets_different_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("limits.yaml");
    let priced = format!("{LIMITS}{PRICES}");
    std::fs::write(&path, &priced).unwrap();
    let t = start_with("", |c| {
        c.limits = LimitsSource::File(path.clone());
        c.limits_poll = Duration::from_millis(20);
    })
    .await;
    let node = t.server.node().expect("node started");
    assert_eq!(prices(&node).await.0, 1);

    // Someone sets prices over the API (as `tally prices set` does): last writer wins.
    let api = PriceCatalog {
        models: vec![ModelPrice {
            model: "gpt-4o-mini".into(),
            input_nusd: 1,
            cached_input_nusd: 1,
            output_nusd: 1,
        }],
    };
    let r = node.propose(Command::SetPrices(api.clone())).await.unwrap();
    assert_eq!(r, Outcome::PricesSet { version: 2 });

    // A reload of a file without prices leaves them alone.
    let generation = node.read(|e| e.status().limits_generation).await.unwrap();
    std::fs::write(&path, LIMITS.replace("limit: 1000", "limit: 999")).unwrap();
    until(&node, "the reload", |n| async move {
        n.read(|e| e.status().limits_generation).await.unwrap() > generation
    })
    .await;
    until(&node, "the changed quota", |n| async move {
        quotas(&n).await.first().is_some_and(|q| q.limit == 999)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(prices(&node).await, (2, api));

    // A file with prices that differ from those in force sets them again; listed in
    // another order they are the same catalog, not set again.
    std::fs::write(&path, &priced).unwrap();
    until(&node, "the file's prices again", |n| async move {
        prices(&n).await.0 == 3
    })
    .await;
    let generation = node.read(|e| e.status().limits_generation).await.unwrap();
    let reordered = priced.replace(
        "    - { model: gpt-4o-mini, input_nusd: 150, cached_input_nusd: 75, output_nusd: 600 }\n",
        "",
    ) + "    - { model: gpt-4o-mini, input_nusd: 150, cached_input_nusd: 75, output_nusd: 600 }\n";
    assert_ne!(reordered, priced);
    std::fs::write(&path, &reordered).unwrap();
    until(&node, "the reload", |n| async move {
        n.read(|e| e.status().limits_generation).await.unwrap() > generation
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(prices(&node).await.0, 3);
    t.stop().await;
}

#[tokio::test]
async fn a_bad_metering_section_at_start_is_refused_naming_line_and_field() {
    let text = LIMITS.replace("thresholds: [80, 95]", "thresholds: [95, 80]");
    let config = ServerConfig {
        limits: LimitsSource::Inline {
            origin: "bad.yaml".into(),
            text,
        },
        ..ServerConfig::default()
    };
    let err = server::spawn(config)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert_eq!(
        err,
        "bad.yaml: line 18: metering.quotas[0].thresholds[1]: 80 does not come after 95: \
         thresholds are listed in increasing order, each once"
    );
}

#[test]
fn bad_subscriptions_are_refused_naming_the_field() {
    let cases = [
        (
            "metering:\n  subscriptions:\n    - name: t\n      max_classification: secret\n",
            "max_classification",
        ),
        (
            "metering:\n  subscriptions:\n    - name: t\n      requests_per_minute: 0\n",
            "requests_per_minute",
        ),
        (
            "metering:\n  subscriptions:\n    - name: t\n    - name: t\n",
            "listed twice",
        ),
        (
            "metering:\n  subscriptions:\n    - name: t\n      budgets:\n        - name: b\n          match: { model: m }\n          metric: total_tokens\n          limit: 5\n          window: 1d\n",
            "budgets[0]",
        ),
        (
            "metering:\n  subscriptions:\n    - name: t\n      budgets:\n        - name: b\n          metric: concurrent\n          limit: 5\n",
            "budgets[0]",
        ),
        (
            "metering:\n  subscriptions:\n    - name: t\n      colour: red\n",
            "colour",
        ),
    ];
    for (text, needle) in cases {
        let e = config::parse_config(text, None, "test")
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{needle}: {e}");
    }
    let ok = config::parse_config(
        "metering:\n  subscriptions:\n    - name: t\n      models: [m]\n      max_classification: internal\n      budgets:\n        - name: b\n          metric: cost_usd\n          limit: \"1.50\"\n          window: 1d\n",
        None,
        "test",
    )
    .unwrap();
    let s = &ok.metering.subscriptions[0];
    assert_eq!(
        (s.max_classification, s.budgets[0].limit),
        (Some(1), 1_500_000_000)
    );
}
