//! Metrics: OpenTelemetry instruments, read by the Prometheus exporter into this server's own
//! `prometheus::Registry` and served as text on the HTTP listener's `GET /metrics`.
//!
//! A [`Metrics`] is a cheap handle (an `Arc` inside). `server.rs` makes one per server and
//! hands it to the HTTP router, the gRPC routes (both listeners') and the Envoy RLS service;
//! the gRPC layer also puts it in every call's request extensions, where the Kuadrant service
//! finds it. Every in-process server (tests run several) has its own registry, never the
//! process-global one.
//!
//! # What each metric counts
//!
//! **Rate-limit decisions** (Envoy `ShouldRateLimit` only; Kuadrant's calls have counters of
//! their own, below), labels `domain` (the request's) and `limit` (the name of the limit a
//! descriptor's status reports, `_unnamed` for a limit without a name or an Envoy
//! per-descriptor override). For every answered decision, for each descriptor whose status
//! has a `current_limit` (a descriptor no limit matched, or only unlimited ones, counts nothing),
//! with `hits` = that descriptor's `hits_addend` if present, else the request's (`0` means
//! `1`), as the engine uses it (`api::convert`, `RateLimitCommand::hits`):
//! - `tally_rls_hits_total` += hits.
//! - `tally_rls_over_limit_hits_total` += hits when the status is `OVER_LIMIT`.
//! - `tally_rls_within_limit_hits_total` += hits when the status is `OK` (also in a request
//!   that another descriptor made `OVER_LIMIT`: its own limit had room).
//! - `tally_rls_near_limit_hits_total` += hits when the status is `OK` and at least 80 % of
//!   the limit's capacity is used after the request: `5 × (capacity − remaining) ≥ 4 ×
//!   capacity` (a subset of within-limit; with capacity 10, the 8th, 9th and 10th hit).
//! - `tally_rls_shadow_mode_hits_total` += for each shadow-mode limit the request went over
//!   (`Decision::shadow_exceeded`, admitted anyway): the hits of the descriptors whose status
//!   reports that limit, or the request's hits when no status does (another limit of the
//!   descriptor had less left). A shadow limit never makes a status `OVER_LIMIT`.
//!
//! Statuses are counted as answered: a hard metering quota's status merged into a descriptor
//! (`rls_usage::merge`) counts under the quota's name. A call answered with an error (invalid
//! request, no leader, counter table full) is no decision and counts only in the gRPC metrics.
//!
//! **Kuadrant decisions** (`kuadrant.service.ratelimit.v1.RateLimitService`), counted exactly
//! as ShouldRateLimit's above (hits per descriptor, statuses as answered, the same bound on
//! (domain, limit) pairs, shared with them) in counters of their own, labels `domain`, `limit`
//! and `method` (`CheckRateLimit` or `Report`): `tally_kuadrant_hits_total`,
//! `tally_kuadrant_over_limit_hits_total`, `tally_kuadrant_within_limit_hits_total`,
//! `tally_kuadrant_near_limit_hits_total`, `tally_kuadrant_shadow_mode_hits_total`. What the
//! hits did differs by method:
//! - `CheckRateLimit` debits nothing (a request's `hits_addend` of 0 means 1): its hits are
//!   the hits checked; within-limit ones would have been admitted, over-limit ones not, and
//!   near-limit means at least 80 % of the capacity is already used.
//! - `Report` debits every hit unconditionally (`hits_addend` taken literally: a 0-hit report
//!   counts 0 hits, but its series appear). Its descriptors' statuses are always `OK`; the
//!   call's code is `OVER_LIMIT` when a counter it touched now holds more than its capacity,
//!   and that code is what counts: every hit of an `OVER_LIMIT` report is over-limit (debited
//!   all the same), every hit of an `OK` one within-limit (near-limit: ≥ 80 % used after it).
//!   A report never goes over a shadow limit (shadow limits do not make it `OVER_LIMIT`).
//!
//! **Raft internals** (this node's, from [`crate::node::stats`]; histograms with no label
//! unless named):
//! - `tally_raft_proposed_batch_commands`: commands per batch this node proposed to the log as
//!   leader (one batch is one log entry; followers forward and propose nothing).
//! - `tally_raft_applied_batch_commands`: commands per batch entry applied to this replica
//!   (every replica; a restarted node applies the log after its snapshot again).
//! - `tally_raft_log_flush_duration_seconds`: per log append, from its hand-off to raft-log's
//!   flush worker to its `fdatasync` done (the wait behind a sync in progress, the group-commit
//!   wait, the write and the sync; one sync serves every append waiting: group commit).
//! - `tally_raft_snapshot_size_bytes` and `tally_raft_snapshot_duration_seconds`, label `kind`:
//!   `built` (this node's own state: serialize, sync the usage archive, write and fsync) or
//!   `installed` (received from a leader: decode, restore, write and fsync). Their `_count`
//!   is how many snapshots of the kind.
//!
//! The node records them in bounded hdrhistograms (its own memory is fixed); they reach the
//! instruments here, value by value, at most a second later (the Raft watch task) and before
//! every scrape. So `_count` is exact, and so are batch sizes below 2048 (the default
//! `--batch-max-commands` is 512) and their `_sum`; times and bytes are exact to 1 %.
//!
//! **Bounded labels.** `domain` and `limit` come from the network (an Envoy override matches
//! in any domain), so at most [`MAX_LABEL_SETS`] distinct (domain, limit) pairs get labels of
//! their own, the first ones seen by this process; every later pair is counted under
//! `domain="_other", limit="_other"`.
//!
//! **gRPC** (the gRPC listener: every service, health, reflection, and unknown paths; and the
//! Raft listener: `tally.v1.Raft`, `tally.v1.Forward`, `tally.v1.Cluster`, unknown paths; one
//! set of series for both, the methods telling them apart), labels `method`
//! (`/package.Service/Method` when the server serves that method, else `_other`: the set is
//! fixed, from the embedded descriptor set plus health and reflection) and `code` (the gRPC
//! status name, e.g. `OK`, `InvalidArgument`):
//! - `tally_grpc_requests_total`: calls answered.
//! - `tally_grpc_request_duration_seconds` (histogram): from the call reaching the routes to
//!   its response head.
//!
//! The code is an approximation: a `grpc-status` in the response head (tonic puts a unary
//! call's error there, as a trailers-only response), else `OK` — a unary `OK` comes in the
//! trailers, but so would an error a stream reports after its first message, which is
//! counted as `OK`. A call whose client went away before the response head is counted as
//! `Cancelled`. Streams are timed to their head, not their end.
//!
//! **Raft** (this node's view, from openraft's metrics, updated on every change):
//! `tally_raft_term`, `tally_raft_last_log_index`, `tally_raft_last_applied_index`,
//! `tally_raft_apply_lag` (last log index − last applied), `tally_raft_snapshot_index`,
//! `tally_raft_commit_index` (leader only: the highest index a majority of voters holds),
//! `tally_raft_is_leader` (1 or 0), and `tally_raft_leader_changes_total`: how many times
//! this node saw a new leader, i.e. a known leader for a (term, node) pair different from
//! the last one seen (the first leader counts; a node re-elected in a new term counts).
//!
//! **Engine** (this replica's applied state, sampled when `/metrics` is scraped, at most once
//! a second: the memory estimate walks the counter table): `tally_engine_live_counters`,
//! `tally_engine_counter_memory_bytes` (estimate), `tally_engine_reclaimed_counters_total`,
//! `tally_engine_limits`.
//!
//! Raft and engine values are absent until first sampled (a `Metrics` not given a node).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    Counter, Histogram, MeterProvider as _, ObservableCounter, ObservableGauge,
};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::engine::{Code, Decision};
use crate::node::Node;
use crate::node::stats::{Distribution, NodeStats};

/// Most distinct (domain, limit) label pairs of the rate-limit counters; later pairs are
/// counted under [`OTHER`].
pub const MAX_LABEL_SETS: usize = 1000;
/// The label value of everything past a bound (pairs past [`MAX_LABEL_SETS`], methods the
/// server does not serve).
pub const OTHER: &str = "_other";
/// The `limit` label of a limit without a name (and of Envoy's per-descriptor overrides).
pub const UNNAMED: &str = "_unnamed";
/// The content type of `render`'s text.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// Engine status is sampled at most this often (it walks the counter table).
const ENGINE_SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// The node's stats reach the instruments at least this often (and before every scrape).
const NODE_SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Commands per batch.
const BATCH_BUCKETS: [f64; 17] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0, 32768.0, 65536.0,
];
/// A log flush, seconds: tens of microseconds (NVMe) to tens of milliseconds (a busy disk).
const FLUSH_BUCKETS_S: [f64; 16] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5,
];
/// A snapshot, bytes: 1 KiB to 4 GiB by fours.
const SNAPSHOT_BYTES_BUCKETS: [f64; 12] = [
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
    268_435_456.0,
    1_073_741_824.0,
    4_294_967_296.0,
];
/// A snapshot, seconds.
const SNAPSHOT_BUCKETS_S: [f64; 13] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Latency buckets, seconds: a decision takes about one fsync.
const LATENCY_BUCKETS_S: [f64; 15] = [
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];

/// The metrics of one server. Clones share everything.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

struct Inner {
    /// Shuts itself down when the last handle goes.
    _provider: SdkMeterProvider,
    registry: prometheus::Registry,
    rls: RlsCounters,
    kuadrant: RlsCounters,
    label_sets: Mutex<LabelSets>,
    raft: RaftHistograms,
    replayed: Mutex<Replayed>,
    grpc_requests: Counter<u64>,
    grpc_duration: Histogram<f64>,
    sampled: Arc<Sampled>,
    last_engine_sample: Mutex<Option<Instant>>,
    _gauges: Vec<ObservableGauge<u64>>,
    _counters: Vec<ObservableCounter<u64>>,
}

struct RlsCounters {
    hits: Counter<u64>,
    over: Counter<u64>,
    near: Counter<u64>,
    within: Counter<u64>,
    shadow: Counter<u64>,
}

/// Which rate-limit call a decision answered (which counters count it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecisionCall {
    /// Envoy's `ShouldRateLimit`: the `tally_rls_*` counters.
    ShouldRateLimit,
    /// Kuadrant's `CheckRateLimit`: `tally_kuadrant_*{method="CheckRateLimit"}`.
    CheckRateLimit,
    /// Kuadrant's `Report`: `tally_kuadrant_*{method="Report"}`.
    Report,
}

/// The instruments fed from the node's stats.
struct RaftHistograms {
    proposed: Histogram<u64>,
    applied: Histogram<u64>,
    flush: Histogram<f64>,
    snapshot_bytes: Histogram<u64>,
    snapshot_duration: Histogram<f64>,
}

/// What of the node's stats the instruments hold already: the copies last replayed.
#[derive(Default)]
struct Replayed {
    proposed: Option<hdrhistogram::Histogram<u64>>,
    applied: Option<hdrhistogram::Histogram<u64>>,
    flush: Option<hdrhistogram::Histogram<u64>>,
    built_bytes: Option<hdrhistogram::Histogram<u64>>,
    built_nanos: Option<hdrhistogram::Histogram<u64>>,
    installed_bytes: Option<hdrhistogram::Histogram<u64>>,
    installed_nanos: Option<hdrhistogram::Histogram<u64>>,
}

/// Records, through `record`, every value of `stats` that `last` does not hold yet (each at
/// the middle of its histogram bucket: exact where the bucket holds one value), then keeps
/// the copy as `last`. Nothing is copied while nothing new was recorded.
fn replay(
    last: &mut Option<hdrhistogram::Histogram<u64>>,
    stats: &Distribution,
    mut record: impl FnMut(u64),
) {
    let seen = last.as_ref().map_or(0, |l| l.len());
    if stats.count() == seen {
        return;
    }
    let now = stats.snapshot().histogram;
    for v in now.iter_recorded() {
        let at = v.value_iterated_to();
        let before = last.as_ref().map_or(0, |l| l.count_at(at));
        let value = now.median_equivalent(at);
        for _ in 0..v.count_at_value().saturating_sub(before) {
            record(value);
        }
    }
    *last = Some(now);
}

fn nanos_to_s(nanos: u64) -> f64 {
    nanos as f64 / 1e9
}

/// Values read by the observable instruments' callbacks at scrape time.
#[derive(Default)]
struct Sampled {
    raft_seen: AtomicBool,
    term: AtomicU64,
    last_log_index: AtomicU64,
    last_applied_index: AtomicU64,
    apply_lag: AtomicU64,
    snapshot_index: AtomicU64,
    /// Set only while this node leads (a follower does not know the commit index).
    commit_seen: AtomicBool,
    commit_index: AtomicU64,
    is_leader: AtomicU64,
    leader_changes: AtomicU64,
    engine_seen: AtomicBool,
    live_counters: AtomicU64,
    counter_bytes: AtomicU64,
    reclaimed_counters: AtomicU64,
    limits: AtomicU64,
}

/// The (domain, limit) pairs that have labels of their own.
#[derive(Default)]
struct LabelSets {
    by_domain: HashMap<Box<str>, HashSet<Box<str>>>,
    pairs: usize,
}

impl LabelSets {
    /// True when the pair has (or now gets) labels of its own.
    fn admit(&mut self, domain: &str, limit: &str) -> bool {
        if self
            .by_domain
            .get(domain)
            .is_some_and(|l| l.contains(limit))
        {
            return true;
        }
        if self.pairs >= MAX_LABEL_SETS {
            return false;
        }
        self.by_domain
            .entry(domain.into())
            .or_default()
            .insert(limit.into());
        self.pairs += 1;
        true
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Fresh instruments on a registry of their own.
    pub fn new() -> Metrics {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .scope_info_enabled(false)
            .build()
            .expect("a fresh registry has no conflicting collector");
        let provider = SdkMeterProvider::builder()
            .with_reader(exporter)
            .with_resource(Resource::builder().with_service_name("tally").build())
            .build();
        let meter = provider.meter("tally");
        let counter = |name: &'static str, help: &'static str| {
            meter.u64_counter(name).with_description(help).build()
        };
        let rls = RlsCounters {
            hits: counter(
                "tally_rls_hits",
                "Hits of ShouldRateLimit descriptors with a limit, per domain and limit",
            ),
            over: counter(
                "tally_rls_over_limit_hits",
                "Hits of descriptors answered OVER_LIMIT",
            ),
            near: counter(
                "tally_rls_near_limit_hits",
                "Hits of descriptors answered OK with at least 80% of the limit used after them",
            ),
            within: counter(
                "tally_rls_within_limit_hits",
                "Hits of descriptors answered OK",
            ),
            shadow: counter(
                "tally_rls_shadow_mode_hits",
                "Hits that went over a shadow-mode limit (admitted anyway)",
            ),
        };
        let kuadrant = RlsCounters {
            hits: counter(
                "tally_kuadrant_hits",
                "Hits of Kuadrant descriptors with a limit, per domain, limit and method",
            ),
            over: counter(
                "tally_kuadrant_over_limit_hits",
                "Kuadrant hits answered OVER_LIMIT (Report: debited anyway)",
            ),
            near: counter(
                "tally_kuadrant_near_limit_hits",
                "Kuadrant hits answered OK with at least 80% of the limit used",
            ),
            within: counter(
                "tally_kuadrant_within_limit_hits",
                "Kuadrant hits answered OK",
            ),
            shadow: counter(
                "tally_kuadrant_shadow_mode_hits",
                "Kuadrant hits that went over a shadow-mode limit",
            ),
        };
        let raft = RaftHistograms {
            proposed: meter
                .u64_histogram("tally_raft_proposed_batch_commands")
                .with_description("Commands per batch this node proposed to the Raft log as leader")
                .with_boundaries(BATCH_BUCKETS.to_vec())
                .build(),
            applied: meter
                .u64_histogram("tally_raft_applied_batch_commands")
                .with_description("Commands per batch entry applied to this replica's engine")
                .with_boundaries(BATCH_BUCKETS.to_vec())
                .build(),
            flush: meter
                .f64_histogram("tally_raft_log_flush_duration")
                .with_unit("s")
                .with_description(
                    "Raft log append to fdatasync done (group commit: one sync serves many)",
                )
                .with_boundaries(FLUSH_BUCKETS_S.to_vec())
                .build(),
            snapshot_bytes: meter
                .u64_histogram("tally_raft_snapshot_size")
                .with_unit("By")
                .with_description("Snapshots built or installed, bytes, per kind")
                .with_boundaries(SNAPSHOT_BYTES_BUCKETS.to_vec())
                .build(),
            snapshot_duration: meter
                .f64_histogram("tally_raft_snapshot_duration")
                .with_unit("s")
                .with_description("Time to build or install a snapshot, per kind")
                .with_boundaries(SNAPSHOT_BUCKETS_S.to_vec())
                .build(),
        };
        let grpc_requests = counter(
            "tally_grpc_requests",
            "gRPC calls answered, per method and code",
        );
        let grpc_duration = meter
            .f64_histogram("tally_grpc_request_duration")
            .with_unit("s")
            .with_description("gRPC call latency to the response head, per method and code")
            .with_boundaries(LATENCY_BUCKETS_S.to_vec())
            .build();

        let sampled = Arc::new(Sampled::default());
        type Read = fn(&Sampled) -> (&AtomicBool, &AtomicU64);
        let gauge = |name: &'static str, unit: &'static str, help: &'static str, read: Read| {
            let s = sampled.clone();
            meter
                .u64_observable_gauge(name)
                .with_unit(unit)
                .with_description(help)
                .with_callback(move |o| {
                    let (seen, value) = read(&s);
                    if seen.load(Ordering::Relaxed) {
                        o.observe(value.load(Ordering::Relaxed), &[]);
                    }
                })
                .build()
        };
        let gauges = vec![
            gauge("tally_raft_term", "", "Current Raft term", |s| {
                (&s.raft_seen, &s.term)
            }),
            gauge(
                "tally_raft_last_log_index",
                "",
                "Index of the last entry in this node's log",
                |s| (&s.raft_seen, &s.last_log_index),
            ),
            gauge(
                "tally_raft_last_applied_index",
                "",
                "Index of the last entry applied to this node's engine",
                |s| (&s.raft_seen, &s.last_applied_index),
            ),
            gauge(
                "tally_raft_apply_lag",
                "",
                "Log entries not yet applied (last log index minus last applied)",
                |s| (&s.raft_seen, &s.apply_lag),
            ),
            gauge(
                "tally_raft_snapshot_index",
                "",
                "Last log index in this node's latest snapshot",
                |s| (&s.raft_seen, &s.snapshot_index),
            ),
            gauge(
                "tally_raft_commit_index",
                "",
                "On the leader: the highest log index a majority of voters holds (its own last \
                 log index counted for itself); absent on followers",
                |s| (&s.commit_seen, &s.commit_index),
            ),
            gauge(
                "tally_raft_is_leader",
                "",
                "1 when this node is the Raft leader, else 0",
                |s| (&s.raft_seen, &s.is_leader),
            ),
            gauge(
                "tally_engine_live_counters",
                "",
                "Counters in the engine's table (idle ones included)",
                |s| (&s.engine_seen, &s.live_counters),
            ),
            gauge(
                "tally_engine_counter_memory",
                "By",
                "Estimated memory of the counter table",
                |s| (&s.engine_seen, &s.counter_bytes),
            ),
            gauge("tally_engine_limits", "", "Limits in force", |s| {
                (&s.engine_seen, &s.limits)
            }),
        ];
        let observed_counter = |name: &'static str, help: &'static str, read: Read| {
            let s = sampled.clone();
            meter
                .u64_observable_counter(name)
                .with_description(help)
                .with_callback(move |o| {
                    let (seen, value) = read(&s);
                    if seen.load(Ordering::Relaxed) {
                        o.observe(value.load(Ordering::Relaxed), &[]);
                    }
                })
                .build()
        };
        let counters = vec![
            observed_counter(
                "tally_raft_leader_changes",
                "New leaders (term, node) this node has seen",
                |s| (&s.raft_seen, &s.leader_changes),
            ),
            observed_counter(
                "tally_engine_reclaimed_counters",
                "Idle counters the engine has reclaimed",
                |s| (&s.engine_seen, &s.reclaimed_counters),
            ),
        ];
        Metrics(Arc::new(Inner {
            _provider: provider,
            registry,
            rls,
            kuadrant,
            label_sets: Mutex::new(LabelSets::default()),
            raft,
            replayed: Mutex::new(Replayed::default()),
            grpc_requests,
            grpc_duration,
            sampled,
            last_engine_sample: Mutex::new(None),
            _gauges: gauges,
            _counters: counters,
        }))
    }

    /// A meter of this server's provider, for instruments made elsewhere
    /// (`usage_metrics.rs`); each `scope` is its own set of instruments.
    pub fn meter(
        &self,
        scope: impl Into<std::borrow::Cow<'static, str>>,
    ) -> opentelemetry::metrics::Meter {
        self.0
            ._provider
            .meter_with_scope(opentelemetry::InstrumentationScope::builder(scope).build())
    }

    /// Every metric in Prometheus's text exposition format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let families = self.0.registry.gather();
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "metrics: encoding failed");
                String::new()
            })
    }

    /// Counts one answered decision of `call` (see the module docs). `hits[i]`: the hits of
    /// descriptor `i` (its own `hits_addend`, else the request's); `request_hits`: the
    /// request's.
    pub fn record_decision(
        &self,
        call: DecisionCall,
        domain: &str,
        hits: &[u64],
        request_hits: u64,
        decision: &Decision,
    ) {
        let (rls, method) = match call {
            DecisionCall::ShouldRateLimit => (&self.0.rls, None),
            DecisionCall::CheckRateLimit => (&self.0.kuadrant, Some("CheckRateLimit")),
            DecisionCall::Report => (&self.0.kuadrant, Some("Report")),
        };
        for (i, status) in decision.statuses.iter().enumerate() {
            let Some(limit) = &status.current_limit else {
                continue;
            };
            let n = hits.get(i).copied().unwrap_or(request_hits);
            let labels = self.rls_labels(domain, &limit.name, method);
            rls.hits.add(n, &labels);
            // Report's statuses are all OK (it debits unconditionally): whether it went over a
            // limit is the call's code.
            let code = match call {
                DecisionCall::Report => decision.code,
                _ => status.code,
            };
            match code {
                Code::OverLimit => rls.over.add(n, &labels),
                Code::Ok => {
                    rls.within.add(n, &labels);
                    let capacity = u128::from(limit.capacity);
                    let used = capacity.saturating_sub(u128::from(status.remaining));
                    if capacity > 0 && 5 * used >= 4 * capacity {
                        rls.near.add(n, &labels);
                    }
                }
            }
        }
        for name in &decision.shadow_exceeded {
            let mut reported = false;
            let mut n = 0u64;
            for (i, status) in decision.statuses.iter().enumerate() {
                if status
                    .current_limit
                    .as_ref()
                    .is_some_and(|l| l.name == *name)
                {
                    reported = true;
                    n = n.saturating_add(hits.get(i).copied().unwrap_or(request_hits));
                }
            }
            if !reported {
                n = request_hits;
            }
            rls.shadow.add(n, &self.rls_labels(domain, name, method));
        }
    }

    /// `domain` and `limit` (or [`OTHER`] past the bound), and `method` if given.
    fn rls_labels(&self, domain: &str, limit: &str, method: Option<&'static str>) -> Vec<KeyValue> {
        let limit = if limit.is_empty() { UNNAMED } else { limit };
        let mut labels = Vec::with_capacity(3);
        if self.0.label_sets.lock().admit(domain, limit) {
            labels.push(KeyValue::new("domain", domain.to_owned()));
            labels.push(KeyValue::new("limit", limit.to_owned()));
        } else {
            labels.push(KeyValue::new("domain", OTHER));
            labels.push(KeyValue::new("limit", OTHER));
        }
        labels.extend(method.map(|m| KeyValue::new("method", m)));
        labels
    }

    /// Counts one gRPC call answered with `code` (`grpc-status`) after `elapsed`.
    fn record_grpc(&self, method: &'static str, code: i32, elapsed: Duration) {
        let labels = [
            KeyValue::new("method", method),
            KeyValue::new("code", code_name(code)),
        ];
        self.0.grpc_requests.add(1, &labels);
        self.0.grpc_duration.record(elapsed.as_secs_f64(), &labels);
    }

    /// Follows this node's Raft metrics until `stop` turns true (or Raft ends): the Raft
    /// gauges and the leader-change counter; and every second the node's stats (batch sizes,
    /// log flushes, snapshots).
    pub async fn watch_raft(self, node: Node, mut stop: watch::Receiver<bool>) {
        let mut rx = node.raft().metrics();
        let mut tick = tokio::time::interval(NODE_SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_leader: Option<(u64, u64)> = None;
        let s = &self.0.sampled;
        loop {
            {
                let m = rx.borrow_and_update();
                let applied = m.last_applied.map_or(0, |l| l.index);
                let last_log = m.last_log_index.unwrap_or(0);
                s.term.store(m.current_term, Ordering::Relaxed);
                s.last_log_index.store(last_log, Ordering::Relaxed);
                s.last_applied_index.store(applied, Ordering::Relaxed);
                s.apply_lag
                    .store(last_log.saturating_sub(applied), Ordering::Relaxed);
                s.snapshot_index
                    .store(m.snapshot.map_or(0, |l| l.index), Ordering::Relaxed);
                let leads = m.state == openraft::ServerState::Leader;
                s.is_leader.store(u64::from(leads), Ordering::Relaxed);
                if leads {
                    s.commit_index
                        .store(majority_index(&m, last_log), Ordering::Relaxed);
                }
                s.commit_seen.store(leads, Ordering::Relaxed);
                if let Some(leader) = m.current_leader {
                    let seen = Some((m.current_term, leader));
                    if seen != last_leader {
                        last_leader = seen;
                        s.leader_changes.fetch_add(1, Ordering::Relaxed);
                    }
                }
                s.raft_seen.store(true, Ordering::Relaxed);
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = tick.tick() => self.sample_node(node.stats()),
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Records into the Raft histograms what the node's stats gained since the last call (see
    /// the module docs). Work in proportion to the values recorded since; none when idle.
    pub fn sample_node(&self, stats: &NodeStats) {
        let h = &self.0.raft;
        let mut r = self.0.replayed.lock();
        replay(&mut r.proposed, &stats.proposed_batch_commands, |v| {
            h.proposed.record(v, &[]);
        });
        replay(&mut r.applied, &stats.applied_batch_commands, |v| {
            h.applied.record(v, &[]);
        });
        replay(&mut r.flush, &stats.log_flush_nanos, |v| {
            h.flush.record(nanos_to_s(v), &[]);
        });
        let built = [KeyValue::new("kind", "built")];
        replay(&mut r.built_bytes, &stats.snapshots_built.bytes, |v| {
            h.snapshot_bytes.record(v, &built);
        });
        replay(&mut r.built_nanos, &stats.snapshots_built.nanos, |v| {
            h.snapshot_duration.record(nanos_to_s(v), &built);
        });
        let installed = [KeyValue::new("kind", "installed")];
        replay(
            &mut r.installed_bytes,
            &stats.snapshots_installed.bytes,
            |v| {
                h.snapshot_bytes.record(v, &installed);
            },
        );
        replay(
            &mut r.installed_nanos,
            &stats.snapshots_installed.nanos,
            |v| {
                h.snapshot_duration.record(nanos_to_s(v), &installed);
            },
        );
    }

    /// Samples this replica's engine status, unless it was sampled less than a second ago;
    /// and the node's stats, always (what a scrape reads is up to date).
    pub async fn sample_engine(&self, node: &Node) {
        self.sample_node(node.stats());
        {
            let mut last = self.0.last_engine_sample.lock();
            if last.is_some_and(|t| t.elapsed() < ENGINE_SAMPLE_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let Ok(status) = node.read(|e| e.status()).await else {
            return;
        };
        let s = &self.0.sampled;
        s.live_counters
            .store(status.live_counters, Ordering::Relaxed);
        s.counter_bytes
            .store(status.counter_bytes_estimate, Ordering::Relaxed);
        s.reclaimed_counters
            .store(status.reclaimed_counters, Ordering::Relaxed);
        s.limits.store(status.limits, Ordering::Relaxed);
        s.engine_seen.store(true, Ordering::Relaxed);
    }

    /// The tower layer that counts and times every call of the gRPC routes.
    pub fn grpc_layer(&self) -> GrpcMetricsLayer {
        GrpcMetricsLayer(self.clone())
    }
}

/// gRPC status names by code number, as Prometheus labels.
fn code_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "Cancelled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|c| NAMES.get(c))
        .copied()
        .unwrap_or("Unknown")
}

const CANCELLED: i32 = 1;

/// Every method the gRPC listener serves, as `/package.Service/Method`: the embedded
/// descriptor set's services, plus gRPC health and reflection.
static METHODS: LazyLock<HashSet<Box<str>>> = LazyLock::new(|| {
    use prost::Message as _;
    let mut methods: HashSet<Box<str>> = [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ]
    .into_iter()
    .map(Box::from)
    .collect();
    let set = prost_types::FileDescriptorSet::decode(tally_proto::FILE_DESCRIPTOR_SET)
        .expect("the embedded descriptor set decodes");
    for file in &set.file {
        let package = file.package();
        for service in &file.service {
            for method in &service.method {
                let path = if package.is_empty() {
                    format!("/{}/{}", service.name(), method.name())
                } else {
                    format!("/{package}.{}/{}", service.name(), method.name())
                };
                methods.insert(path.into());
            }
        }
    }
    methods
});

/// The `method` label of a request path: itself when served, else [`OTHER`].
fn method_label(path: &str) -> &'static str {
    METHODS.get(path).map_or(OTHER, |m| m)
}

/// The code of a response head: its `grpc-status` if present, else OK (see the module docs).
fn head_code<B>(response: &axum::http::Response<B>) -> i32 {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Counts and times every call of the service it wraps ([`Metrics::grpc_layer`]).
#[derive(Clone)]
pub struct GrpcMetricsLayer(Metrics);

impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Metrics,
}

impl<S, B, RB> tower_service::Service<axum::http::Request<B>> for GrpcMetricsService<S>
where
    S: tower_service::Service<axum::http::Request<B>, Response = axum::http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: axum::http::Request<B>) -> Self::Future {
        // For the services that count what they decide (Kuadrant).
        request.extensions_mut().insert(self.metrics.clone());
        let mut call = CallGuard {
            metrics: self.metrics.clone(),
            method: method_label(request.uri().path()),
            start: Instant::now(),
            done: false,
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let result = response.await;
            let code = match &result {
                Ok(response) => head_code(response),
                // The routes' error type is `Infallible`; anything else is no answer.
                Err(_) => 2,
            };
            call.finish(code);
            result
        })
    }
}

/// Records a call once: with its code, or as cancelled if its future is dropped first.
struct CallGuard {
    metrics: Metrics,
    method: &'static str,
    start: Instant,
    done: bool,
}

impl CallGuard {
    fn finish(&mut self, code: i32) {
        self.done = true;
        self.metrics
            .record_grpc(self.method, code, self.start.elapsed());
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.done {
            self.finish(CANCELLED);
        }
    }
}

/// The highest index a majority of the voters holds, as the leader sees replication
/// (openraft 0.9's metrics carry no commit index): the leader counts its own last log index.
fn majority_index(m: &openraft::RaftMetrics<u64, openraft::BasicNode>, own_last: u64) -> u64 {
    let membership = m.membership_config.membership();
    let mut matched: Vec<u64> = membership
        .voter_ids()
        .map(|id| {
            if id == m.id {
                own_last
            } else {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(&id).copied().flatten())
                    .map_or(0, |l| l.index)
            }
        })
        .collect();
    if matched.is_empty() {
        return 0;
    }
    matched.sort_unstable_by(|a, b| b.cmp(a));
    matched[matched.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::limits::Unit;
    use crate::engine::{DescriptorStatus, LimitInfo};

    fn status(code: Code, name: &str, capacity: u64, remaining: u64) -> DescriptorStatus {
        DescriptorStatus {
            code,
            current_limit: Some(LimitInfo {
                name: Arc::from(name),
                capacity,
                unit: Unit::Minute,
                window_s: 60,
            }),
            remaining,
            reset_in_ms: 0,
        }
    }

    fn decision(statuses: Vec<DescriptorStatus>, shadow: &[&str]) -> Decision {
        Decision {
            code: Code::Ok,
            statuses,
            shadow_exceeded: shadow.iter().map(|s| Arc::from(*s)).collect(),
            fast: false,
        }
    }

    /// The value of the sample line `name{labels}` (labels in the exporter's order).
    fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
        let prefix = format!("{name}{{{labels}}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn label_pairs_past_the_bound_are_counted_under_other() {
        let m = Metrics::new();
        let extra = 5;
        for i in 0..MAX_LABEL_SETS + extra {
            let name = format!("limit-{i}");
            m.record_decision(
                DecisionCall::ShouldRateLimit,
                "d",
                &[2],
                2,
                &decision(vec![status(Code::Ok, &name, 100, 98)], &[]),
            );
        }
        // A pair admitted before the bound keeps its own labels after it.
        m.record_decision(
            DecisionCall::ShouldRateLimit,
            "d",
            &[1],
            1,
            &decision(vec![status(Code::Ok, "limit-0", 100, 97)], &[]),
        );
        let text = m.render();
        let own = text
            .lines()
            .filter(|l| l.starts_with("tally_rls_hits_total{domain=\"d\","))
            .count();
        assert_eq!(own, MAX_LABEL_SETS);
        assert_eq!(
            sample(
                &text,
                "tally_rls_hits_total",
                r#"domain="_other",limit="_other""#
            ),
            Some((2 * extra) as f64)
        );
        assert_eq!(
            sample(
                &text,
                "tally_rls_hits_total",
                r#"domain="d",limit="limit-0""#
            ),
            Some(3.0)
        );
        // Every other counter has the same bound.
        let within = text
            .lines()
            .filter(|l| l.starts_with("tally_rls_within_limit_hits_total{"))
            .count();
        assert_eq!(within, MAX_LABEL_SETS + 1);
    }

    #[test]
    fn a_decision_counts_per_descriptor_status() {
        let m = Metrics::new();
        let statuses = vec![
            status(Code::Ok, "a", 10, 2),       // 8 of 10 used: near
            status(Code::Ok, "a", 10, 3),       // 7 of 10: within only
            status(Code::OverLimit, "b", 5, 0), // over
            DescriptorStatus {
                code: Code::Ok,
                current_limit: None,
                remaining: 0,
                reset_in_ms: 0,
            },
            status(Code::Ok, "", 4, 0), // unnamed, full: near
        ];
        m.record_decision(
            DecisionCall::ShouldRateLimit,
            "d",
            &[1, 2, 3, 4, 5],
            1,
            &decision(statuses, &["a", "s"]),
        );
        let text = m.render();
        let at = |name: &str, limit: &str| {
            sample(&text, name, &format!(r#"domain="d",limit="{limit}""#))
        };
        assert_eq!(at("tally_rls_hits_total", "a"), Some(3.0));
        assert_eq!(at("tally_rls_within_limit_hits_total", "a"), Some(3.0));
        assert_eq!(at("tally_rls_near_limit_hits_total", "a"), Some(1.0));
        assert_eq!(at("tally_rls_over_limit_hits_total", "b"), Some(3.0));
        assert_eq!(at("tally_rls_hits_total", "b"), Some(3.0));
        assert_eq!(at("tally_rls_within_limit_hits_total", "b"), None);
        assert_eq!(at("tally_rls_near_limit_hits_total", UNNAMED), Some(5.0));
        // Shadow: "a" is reported by descriptors 0 and 1 (1 + 2 hits); "s" by none: the
        // request's hits.
        assert_eq!(at("tally_rls_shadow_mode_hits_total", "a"), Some(3.0));
        assert_eq!(at("tally_rls_shadow_mode_hits_total", "s"), Some(1.0));
    }

    #[test]
    fn methods_are_the_served_ones_and_codes_are_named() {
        assert_eq!(
            method_label("/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"),
            "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
        );
        assert_eq!(
            method_label("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health/Check"
        );
        assert_eq!(
            method_label("/envoy.service.ratelimit.v3.RateLimitService/Nope"),
            OTHER
        );
        assert_eq!(method_label("/x"), OTHER);
        assert_eq!(code_name(0), "OK");
        assert_eq!(code_name(3), "InvalidArgument");
        assert_eq!(code_name(16), "Unauthenticated");
        assert_eq!(code_name(17), "Unknown");
        assert_eq!(code_name(-1), "Unknown");
    }

    #[test]
    fn each_metrics_has_its_own_registry() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.record_grpc("/x.Y/Z", 0, Duration::from_millis(3));
        assert!(
            a.render()
                .contains(r#"tally_grpc_requests_total{code="OK",method="/x.Y/Z"} 1"#)
        );
        assert!(!b.render().contains("tally_grpc_requests_total"));
        // Raft and engine values are absent until sampled.
        assert!(!a.render().contains("tally_raft_term"));
    }

    #[test]
    fn kuadrant_decisions_count_apart_per_method() {
        let m = Metrics::new();
        let ok = || decision(vec![status(Code::Ok, "k", 10, 1)], &[]);
        let over = || decision(vec![status(Code::OverLimit, "k", 10, 0)], &[]);
        m.record_decision(DecisionCall::CheckRateLimit, "d", &[1], 1, &ok());
        m.record_decision(DecisionCall::CheckRateLimit, "d", &[2], 2, &over());
        // A report's statuses are OK; the call's code says it went over.
        let mut report_over = decision(vec![status(Code::Ok, "k", 10, 0)], &[]);
        report_over.code = Code::OverLimit;
        m.record_decision(DecisionCall::Report, "d", &[4], 4, &report_over);
        m.record_decision(DecisionCall::Report, "d", &[0], 0, &ok());
        m.record_decision(DecisionCall::ShouldRateLimit, "d", &[7], 7, &ok());
        let text = m.render();
        let at = |name: &str, method: &str| {
            sample(
                &text,
                &format!("tally_kuadrant_{name}_total"),
                &format!(r#"domain="d",limit="k",method="{method}""#),
            )
        };
        assert_eq!(at("hits", "CheckRateLimit"), Some(3.0));
        assert_eq!(at("within_limit_hits", "CheckRateLimit"), Some(1.0));
        assert_eq!(at("near_limit_hits", "CheckRateLimit"), Some(1.0));
        assert_eq!(at("over_limit_hits", "CheckRateLimit"), Some(2.0));
        assert_eq!(at("hits", "Report"), Some(4.0));
        assert_eq!(at("over_limit_hits", "Report"), Some(4.0));
        // A 0-hit report: answered OK, counted as 0 hits.
        assert_eq!(at("within_limit_hits", "Report"), Some(0.0));
        // ShouldRateLimit's counters are apart, and have no method label.
        let rls = r#"domain="d",limit="k""#;
        assert_eq!(sample(&text, "tally_rls_hits_total", rls), Some(7.0));
        assert!(!text.contains(r#"tally_rls_hits_total{domain="d",limit="k",method"#));
    }

    #[test]
    fn node_stats_reach_the_histograms_once_each() {
        let m = Metrics::new();
        let stats = NodeStats::new();
        // Nothing recorded: no histogram at all.
        m.sample_node(&stats);
        assert!(!m.render().contains("tally_raft_proposed_batch_commands"));
        for n in [1, 1, 5] {
            stats.proposed_batch_commands.record(n);
        }
        stats.applied_batch_commands.record(3);
        stats.log_flush_nanos.record(2_000_000);
        stats.snapshots_built.bytes.record(100);
        stats.snapshots_built.nanos.record(50_000_000);
        m.sample_node(&stats);
        // Sampled again with nothing new: nothing counted twice.
        m.sample_node(&stats);
        let text = m.render();
        let plain = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .map(|v| v.parse::<f64>().unwrap())
        };
        assert_eq!(plain("tally_raft_proposed_batch_commands_count"), Some(3.0));
        assert_eq!(plain("tally_raft_proposed_batch_commands_sum"), Some(7.0));
        assert_eq!(
            sample(
                &text,
                "tally_raft_proposed_batch_commands_bucket",
                r#"le="1""#
            ),
            Some(2.0)
        );
        assert_eq!(plain("tally_raft_applied_batch_commands_sum"), Some(3.0));
        assert_eq!(
            plain("tally_raft_log_flush_duration_seconds_count"),
            Some(1.0)
        );
        let flush = plain("tally_raft_log_flush_duration_seconds_sum").unwrap();
        assert!((flush - 0.002).abs() < 0.000_02, "{flush}");
        let built = r#"kind="built""#;
        assert_eq!(
            sample(&text, "tally_raft_snapshot_size_bytes_sum", built),
            Some(100.0)
        );
        assert_eq!(
            sample(&text, "tally_raft_snapshot_duration_seconds_count", built),
            Some(1.0)
        );
        assert!(!text.contains(r#"kind="installed""#));
        // Later values add to what was there.
        stats.proposed_batch_commands.record(2);
        stats.snapshots_installed.bytes.record(4096);
        m.sample_node(&stats);
        let text = m.render();
        let plain = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .map(|v| v.parse::<f64>().unwrap())
        };
        assert_eq!(plain("tally_raft_proposed_batch_commands_count"), Some(4.0));
        assert_eq!(plain("tally_raft_proposed_batch_commands_sum"), Some(9.0));
        assert_eq!(
            sample(
                &text,
                "tally_raft_snapshot_size_bytes_count",
                r#"kind="installed""#
            ),
            Some(1.0)
        );
    }
}
