//! Usage metrics: tokens, cost and records per API key and model, counted from the usage
//! records this replica applies and exported with the other metrics on `GET /metrics`
//! ([`Metrics`]).
//!
//! # What each metric counts
//!
//! For every usage record (one per metered request: a report, a commit, a charged expiry;
//! a retried request id makes no new record, so it counts once), labels `key` (the record's
//! subject: the API key id, or a descriptor-derived key) and `model` (`_none` when the record
//! has none):
//! - `tally_usage_tokens_total{key, model, kind}` += the record's tokens of each `kind`:
//!   `input` (every prompt token, cached ones included), `cached_input` (a part of `input`),
//!   `output` (every completion token, reasoning ones included), `reasoning` (a part of
//!   `output`). All four are added, zeros too, so a pair has all four series.
//! - `tally_usage_cost_nusd_total{key, model}` += the record's cost, in nano-dollars
//!   (integers, at the price in force when the record was written; 0 for an unpriced model).
//!   Prometheus holds samples as f64: exact up to 2^53 nUSD (about 9 million dollars) per
//!   series.
//! - `tally_usage_records_total{key, model}` += 1.
//! - `tally_usage_records_skipped_total` (no labels): records this node did not count
//!   because the engine had already dropped them (`--max-usage-records`) before the follower
//!   read them; each gap is also logged as a warning (target `tally::usage_metrics`).
//!
//! # Which records
//!
//! Every node counts the records its own replica applies (the same on every node of a
//! cluster), from those applied after it started (like `event_log.rs`: a restart starts from
//! zero, as every Prometheus counter does). A task follows the engine's record tail
//! ([`Engine::export_usage`]) every [`crate::event_log::EVENT_LOG_POLL`] (`event_log::Follow`), a page of at most
//! [`crate::event_log::PAGE`] records
//! per read of the applied state (a short lock, never waiting on apply's progress).
//!
//! # Bounded labels ([`UsageMetricsConfig`], `--metrics-usage-labels`,
//! `--metrics-max-usage-series`)
//!
//! Keys and models come from the network. With [`UsageLabels::KeyModel`] (the default) at
//! most `max_series` distinct (key, model) pairs get series of their own, the first ones this
//! process counts; every later pair is counted under `key="_other", model="_other"` (models
//! are unbounded too). With [`UsageLabels::Model`] the key is always `_all` and at most
//! `max_series` models get series of their own, later ones under `model="_other"`. With
//! [`UsageLabels::None`] no usage metric is registered at all. So at most `max_series + 1`
//! label pairs exist: `4 × (max_series + 1)` token series and `max_series + 1` of each other
//! counter. A key or model literally named `_other`, `_all` or `_none` shares those series.
//!
//! The OpenTelemetry SDK keeps at most 2,000 attribute sets per instrument (more are folded
//! into an `otel_metric_overflow` series): the instruments are therefore made in shards of
//! [`PAIRS_PER_SHARD`] pairs, one meter scope each (the exporter merges them into one metric
//! family per name), so every admitted pair keeps exact series whatever the bound.

use std::collections::HashMap;
use std::sync::Arc;

use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use tokio::sync::watch;

use crate::engine::Engine;
use crate::engine::usage::{ReadError, UsageRecord};
use crate::event_log::{Follow, Sink};
use crate::metrics::{Metrics, OTHER};
use crate::node::Node;

/// The default of `--metrics-max-usage-series`.
pub const DEFAULT_MAX_USAGE_SERIES: usize = 1000;
/// The `key` label of every series with [`UsageLabels::Model`].
pub const ALL: &str = "_all";
/// The `model` label of a record without a model.
pub const NO_MODEL: &str = "_none";
/// Label pairs per instrument shard: 4 token kinds × 500 = 2,000 attribute sets, the SDK's
/// per-instrument limit.
pub const PAIRS_PER_SHARD: usize = 500;
/// The log target of the follower's warnings.
pub const TARGET: &str = "tally::usage_metrics";

/// The token kinds, in the order of [`kinds`].
const KINDS: [&str; 4] = ["input", "cached_input", "output", "reasoning"];

/// Which labels the usage metrics carry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UsageLabels {
    /// A series per (key, model) pair.
    #[default]
    KeyModel,
    /// A series per model, `key="_all"`.
    Model,
    /// No usage metrics.
    None,
}

/// The usage metrics' settings (`--metrics-usage-labels`, `--metrics-max-usage-series`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsageMetricsConfig {
    pub labels: UsageLabels,
    /// Most distinct label pairs with series of their own; later ones count under `_other`.
    pub max_series: usize,
}

impl Default for UsageMetricsConfig {
    fn default() -> Self {
        UsageMetricsConfig {
            labels: UsageLabels::default(),
            max_series: DEFAULT_MAX_USAGE_SERIES,
        }
    }
}

/// Counts the usage records this replica applies (see the module docs) until `stop` turns
/// true. Returns at once, registering nothing, with [`UsageLabels::None`].
pub async fn run(
    node: Node,
    metrics: Metrics,
    config: UsageMetricsConfig,
    stop: watch::Receiver<bool>,
) {
    let Some(mut usage) = UsageMetrics::new(metrics, config) else {
        return;
    };
    let follow = Follow {
        last: Engine::last_usage_seq,
        after: |e: &Engine, cursor, max| match next_page(e, cursor, max) {
            Ok((_, records)) => records,
            Err(e) => {
                tracing::warn!(target: TARGET, error = %e, "usage metrics: cannot read usage records");
                Vec::new()
            }
        },
        seq: |r: &UsageRecord| r.seq,
    };
    follow.run(node, stop, &mut usage).await;
}

impl Sink<UsageRecord> for UsageMetrics {
    fn item(&mut self, r: &UsageRecord) {
        self.count(r);
    }

    fn gap(&mut self, from: u64, to: u64) {
        self.skipped(to - from + 1);
        tracing::warn!(
            target: TARGET,
            from,
            to,
            "usage records dropped before they were counted in the usage metrics \
             (more than --max-usage-records behind)"
        );
    }
}

/// The records after `cursor`, skipping over those the engine no longer holds: (the seq the
/// records follow, at least `cursor`; the records, in seq order).
fn next_page(e: &Engine, cursor: u64, max: usize) -> Result<(u64, Vec<UsageRecord>), ReadError> {
    let from = cursor.max(e.first_usage_seq().saturating_sub(1));
    match e.export_usage(from, max) {
        Ok(records) => Ok((from, records)),
        Err(ReadError::PastRetention { available_from, .. }) => {
            let from = u64::try_from(available_from)
                .unwrap_or(0)
                .saturating_sub(1)
                .max(from);
            e.export_usage(from, max).map(|records| (from, records))
        }
        Err(other) => Err(other),
    }
}

/// The usage instruments and the label pairs admitted so far.
pub struct UsageMetrics {
    metrics: Metrics,
    config: UsageMetricsConfig,
    skipped: Counter<u64>,
    shards: Vec<Shard>,
    /// Admitted pairs: key label → model label → index in `series`.
    index: HashMap<Box<str>, HashMap<Box<str>, usize>>,
    series: Vec<Series>,
}

/// The instruments of [`PAIRS_PER_SHARD`] label pairs, in a meter scope of their own.
struct Shard {
    tokens: Counter<u64>,
    cost: Counter<u64>,
    records: Counter<u64>,
}

/// One label pair's attributes, made once.
struct Series {
    pair: [KeyValue; 2],
    tokens: [[KeyValue; 3]; 4],
}

impl Series {
    fn new(key: &str, model: &str) -> Series {
        let key = KeyValue::new("key", Arc::<str>::from(key));
        let model = KeyValue::new("model", Arc::<str>::from(model));
        let kind = |k: &'static str| [key.clone(), model.clone(), KeyValue::new("kind", k)];
        Series {
            tokens: KINDS.map(kind),
            pair: [key, model],
        }
    }
}

/// A record's tokens in the order of [`KINDS`].
fn kinds(r: &UsageRecord) -> [u64; 4] {
    [
        r.tokens.input,
        r.tokens.cached_input,
        r.tokens.output,
        r.tokens.reasoning,
    ]
}

impl UsageMetrics {
    /// The instruments on `metrics`' registry; `None` with [`UsageLabels::None`].
    pub fn new(metrics: Metrics, config: UsageMetricsConfig) -> Option<UsageMetrics> {
        if config.labels == UsageLabels::None {
            return None;
        }
        let skipped = metrics
            .meter("tally.usage")
            .u64_counter("tally_usage_records_skipped")
            .with_description(
                "Usage records this node did not count in the usage metrics: dropped by the \
                 engine before they were read",
            )
            .build();
        // Present from the start, at 0.
        skipped.add(0, &[]);
        Some(UsageMetrics {
            metrics,
            config,
            skipped,
            shards: Vec::new(),
            index: HashMap::new(),
            series: Vec::new(),
        })
    }

    /// Counts `n` records skipped.
    pub fn skipped(&self, n: u64) {
        self.skipped.add(n, &[]);
    }

    /// Counts one usage record.
    pub fn count(&mut self, r: &UsageRecord) {
        let model = if r.who.model.is_empty() {
            NO_MODEL
        } else {
            r.who.model.as_str()
        };
        let key = match self.config.labels {
            UsageLabels::Model => ALL,
            _ => r.who.subject.as_str(),
        };
        let i = self.series_of(key, model);
        let shard = &self.shards[i / PAIRS_PER_SHARD];
        let series = &self.series[i];
        for (n, labels) in kinds(r).into_iter().zip(&series.tokens) {
            shard.tokens.add(n, labels);
        }
        shard.cost.add(r.cost_nusd, &series.pair);
        shard.records.add(1, &series.pair);
    }

    /// The index of the series that counts (key, model): its own if admitted (or now
    /// admitted, under the bound), else the overflow pair's.
    fn series_of(&mut self, key: &str, model: &str) -> usize {
        if let Some(&i) = self.index.get(key).and_then(|m| m.get(model)) {
            return i;
        }
        let (key, model) = if self.series.len() < self.config.max_series {
            (key, model)
        } else {
            let key = match self.config.labels {
                UsageLabels::Model => ALL,
                _ => OTHER,
            };
            // The overflow pair is admitted once, past the bound (or was already, if a pair
            // from the network spelled it): label sets stay unique.
            if let Some(&i) = self.index.get(key).and_then(|m| m.get(OTHER)) {
                return i;
            }
            (key, OTHER)
        };
        let i = self.series.len();
        if i / PAIRS_PER_SHARD == self.shards.len() {
            self.shards.push(self.shard(self.shards.len()));
        }
        self.series.push(Series::new(key, model));
        self.index
            .entry(key.into())
            .or_default()
            .insert(model.into(), i);
        i
    }

    fn shard(&self, n: usize) -> Shard {
        let meter = self.metrics.meter(format!("tally.usage.{n}"));
        Shard {
            tokens: meter
                .u64_counter("tally_usage_tokens")
                .with_description(
                    "Tokens of the usage records this node applied, per key, model and kind \
                     (input, cached_input, output, reasoning)",
                )
                .build(),
            cost: meter
                .u64_counter("tally_usage_cost_nusd")
                .with_description(
                    "Cost of the usage records this node applied, nano-dollars, per key and model",
                )
                .build(),
            records: meter
                .u64_counter("tally_usage_records")
                .with_description("Usage records this node applied, per key and model")
                .build(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::usage::{Attribution, ReportUsage, Tokens};
    use crate::engine::{Command, EngineSettings};
    use crate::event_log::PAGE;

    fn record(seq: u64, key: &str, model: &str, input: u64, cost: u64) -> UsageRecord {
        UsageRecord {
            seq,
            at_ms: 0,
            request_id: format!("r{seq}"),
            who: Attribution {
                subject: key.into(),
                model: model.into(),
                ..Attribution::default()
            },
            tokens: Tokens {
                input,
                output: 2 * input,
                cached_input: input / 2,
                reasoning: 1,
            },
            cost_nusd: cost,
            price_version: 1,
        }
    }

    /// The value of the sample line `name{labels}` (labels sorted by name).
    fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
        let prefix = format!("{name}{{{labels}}} ");
        let mut found = text.lines().filter_map(|l| l.strip_prefix(&prefix));
        let value = found.next()?;
        assert!(found.next().is_none(), "one line for {name}{{{labels}}}");
        Some(value.parse().unwrap())
    }

    fn lines(text: &str, prefix: &str) -> usize {
        text.lines().filter(|l| l.starts_with(prefix)).count()
    }

    fn config(labels: UsageLabels, max_series: usize) -> UsageMetricsConfig {
        UsageMetricsConfig { labels, max_series }
    }

    #[test]
    fn a_record_counts_its_tokens_cost_and_one_record() {
        let m = Metrics::new();
        let mut u = UsageMetrics::new(m.clone(), UsageMetricsConfig::default()).unwrap();
        u.count(&record(1, "k1", "gpt", 10, 700));
        u.count(&record(2, "k1", "gpt", 4, 300));
        u.count(&record(3, "k1", "", 1, 0));
        let text = m.render();
        let tokens = |kind: &str, model: &str| {
            sample(
                &text,
                "tally_usage_tokens_total",
                &format!(r#"key="k1",kind="{kind}",model="{model}""#),
            )
        };
        assert_eq!(tokens("input", "gpt"), Some(14.0));
        assert_eq!(tokens("cached_input", "gpt"), Some(7.0));
        assert_eq!(tokens("output", "gpt"), Some(28.0));
        assert_eq!(tokens("reasoning", "gpt"), Some(2.0));
        assert_eq!(tokens("cached_input", NO_MODEL), Some(0.0));
        let pair = r#"key="k1",model="gpt""#;
        assert_eq!(
            sample(&text, "tally_usage_cost_nusd_total", pair),
            Some(1000.0)
        );
        assert_eq!(sample(&text, "tally_usage_records_total", pair), Some(2.0));
        assert_eq!(plain(&text, "tally_usage_records_skipped_total"), Some(0.0));
    }

    fn plain(text: &str, name: &str) -> Option<f64> {
        let prefix = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn pairs_past_the_bound_count_under_other_and_every_shard_stays_exact() {
        // More pairs than one shard holds: every admitted pair keeps its own exact series
        // (no SDK overflow series), later ones go to one `_other` pair.
        let max = 2 * PAIRS_PER_SHARD + 100;
        let extra = 7;
        let m = Metrics::new();
        let mut u = UsageMetrics::new(m.clone(), config(UsageLabels::KeyModel, max)).unwrap();
        for i in 0..max + extra {
            u.count(&record(i as u64 + 1, &format!("key-{i}"), "m", 3, 5));
        }
        // An admitted pair keeps its series past the bound.
        u.count(&record(0, "key-0", "m", 3, 5));
        // A pair from the network spelling the overflow pair shares it.
        u.count(&record(0, OTHER, OTHER, 3, 5));
        let text = m.render();
        assert!(!text.contains("otel_metric_overflow"), "no SDK overflow");
        assert_eq!(lines(&text, "tally_usage_records_total{"), max + 1);
        assert_eq!(lines(&text, "tally_usage_tokens_total{"), 4 * (max + 1));
        assert_eq!(lines(&text, "tally_usage_cost_nusd_total{"), max + 1);
        assert_eq!(
            sample(
                &text,
                "tally_usage_records_total",
                r#"key="_other",model="_other""#
            ),
            Some((extra + 1) as f64)
        );
        let last = format!(r#"key="key-{}",kind="output",model="m""#, max - 1);
        assert_eq!(sample(&text, "tally_usage_tokens_total", &last), Some(6.0));
        assert_eq!(
            sample(
                &text,
                "tally_usage_cost_nusd_total",
                r#"key="key-0",model="m""#
            ),
            Some(10.0)
        );
        // Help and type appear once per family.
        assert_eq!(lines(&text, "# TYPE tally_usage_tokens_total counter"), 1);
    }

    #[test]
    fn model_labels_name_every_key_all() {
        let m = Metrics::new();
        let mut u = UsageMetrics::new(m.clone(), config(UsageLabels::Model, 2)).unwrap();
        u.count(&record(1, "a", "m1", 1, 1));
        u.count(&record(2, "b", "m1", 1, 1));
        u.count(&record(3, "a", "m2", 1, 1));
        u.count(&record(4, "c", "m3", 1, 1));
        u.count(&record(5, "c", "m4", 1, 1));
        let text = m.render();
        let records = |model: &str| {
            sample(
                &text,
                "tally_usage_records_total",
                &format!(r#"key="_all",model="{model}""#),
            )
        };
        assert_eq!(records("m1"), Some(2.0));
        assert_eq!(records("m2"), Some(1.0));
        assert_eq!(records(OTHER), Some(2.0));
        assert_eq!(lines(&text, "tally_usage_records_total{"), 3);
    }

    #[test]
    fn no_labels_registers_nothing() {
        let m = Metrics::new();
        assert!(UsageMetrics::new(m.clone(), config(UsageLabels::None, 10)).is_none());
        assert!(!m.render().contains("tally_usage_"));
    }

    #[test]
    fn a_bound_of_zero_counts_everything_under_other() {
        let m = Metrics::new();
        let mut u = UsageMetrics::new(m.clone(), config(UsageLabels::KeyModel, 0)).unwrap();
        u.count(&record(1, "a", "m1", 1, 1));
        u.count(&record(2, "b", "m2", 1, 1));
        let text = m.render();
        assert_eq!(lines(&text, "tally_usage_records_total{"), 1);
        assert_eq!(
            sample(
                &text,
                "tally_usage_records_total",
                r#"key="_other",model="_other""#
            ),
            Some(2.0)
        );
    }

    fn report(id: &str) -> Command {
        Command::ReportUsage(ReportUsage {
            request_id: id.into(),
            who: Attribution {
                subject: "k".into(),
                model: "m".into(),
                ..Attribution::default()
            },
            tokens: Tokens {
                input: 1,
                ..Tokens::default()
            },
        })
    }

    /// 2026-11-23T12:00:00Z.
    const T0_MS: i64 = 1_795_435_200_000;

    #[test]
    fn a_follower_behind_the_engines_tail_skips_to_it() {
        let mut e = Engine::new(EngineSettings {
            max_usage_records: 3,
            ..EngineSettings::default()
        });
        let batch: Vec<Command> = (0..6).map(|i| report(&format!("a{i}"))).collect();
        e.apply(T0_MS, &batch);
        // The batch's own records are all still there.
        let (from, records) = next_page(&e, 0, PAGE).unwrap();
        assert_eq!((from, records.len()), (0, 6));
        // The next batch trims to the newest 3 before its own record: 1..=3 are gone.
        e.apply(T0_MS + 1, &[report("b")]);
        let (from, records) = next_page(&e, 0, PAGE).unwrap();
        assert_eq!(from, e.first_usage_seq() - 1);
        assert!(from > 0);
        assert_eq!(records.first().map(|r| r.seq), Some(from + 1));
        assert_eq!(records.last().map(|r| r.seq), Some(7));
        // A cursor still inside the tail reads on from it.
        let (from, records) = next_page(&e, 6, PAGE).unwrap();
        assert_eq!((from, records.len()), (6, 1));
        let (from, records) = next_page(&e, 7, PAGE).unwrap();
        assert_eq!((from, records.len()), (7, 0));
    }
}
