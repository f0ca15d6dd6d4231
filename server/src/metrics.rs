//! Metrics: OpenTelemetry instruments, read by the Prometheus exporter into this server's own
//! `prometheus::Registry` and served as text on the HTTP listener's `GET /metrics`.
//!
//! A [`Metrics`] is a cheap handle (an `Arc` inside). `server.rs` makes one per server and
//! hands it to the HTTP router, the gRPC routes and the Envoy RLS service; every in-process
//! server (tests run several) has its own registry, never the process-global one.
//!
//! # What each metric counts
//!
//! **Rate-limit decisions** (Envoy `ShouldRateLimit` only; Kuadrant calls are not counted
//! here), labels `domain` (the request's) and `limit` (the name of the limit a descriptor's
//! status reports, `_unnamed` for a limit without a name or an Envoy per-descriptor
//! override). For every answered decision, for each descriptor whose status has a
//! `current_limit` (a descriptor no limit matched, or only unlimited ones, counts nothing),
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
//! **Bounded labels.** `domain` and `limit` come from the network (an Envoy override matches
//! in any domain), so at most [`MAX_LABEL_SETS`] distinct (domain, limit) pairs get labels of
//! their own, the first ones seen by this process; every later pair is counted under
//! `domain="_other", limit="_other"`.
//!
//! **gRPC** (the gRPC listener: every service, health, reflection, and unknown paths), labels
//! `method` (`/package.Service/Method` when the server serves that method, else `_other`:
//! the set is fixed, from the embedded descriptor set plus health and reflection) and `code`
//! (the gRPC status name, e.g. `OK`, `InvalidArgument`):
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
    label_sets: Mutex<LabelSets>,
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

/// Values read by the observable instruments' callbacks at scrape time.
#[derive(Default)]
struct Sampled {
    raft_seen: AtomicBool,
    term: AtomicU64,
    last_log_index: AtomicU64,
    last_applied_index: AtomicU64,
    apply_lag: AtomicU64,
    snapshot_index: AtomicU64,
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
            label_sets: Mutex::new(LabelSets::default()),
            grpc_requests,
            grpc_duration,
            sampled,
            last_engine_sample: Mutex::new(None),
            _gauges: gauges,
            _counters: counters,
        }))
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

    /// Counts one answered ShouldRateLimit decision (see the module docs). `hits[i]`: the
    /// hits of descriptor `i` (its own `hits_addend`, else the request's); `request_hits`:
    /// the request's.
    pub fn record_decision(
        &self,
        domain: &str,
        hits: &[u64],
        request_hits: u64,
        decision: &Decision,
    ) {
        let rls = &self.0.rls;
        for (i, status) in decision.statuses.iter().enumerate() {
            let Some(limit) = &status.current_limit else {
                continue;
            };
            let n = hits.get(i).copied().unwrap_or(request_hits);
            let labels = self.rls_labels(domain, &limit.name);
            rls.hits.add(n, &labels);
            match status.code {
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
            rls.shadow.add(n, &self.rls_labels(domain, name));
        }
    }

    fn rls_labels(&self, domain: &str, limit: &str) -> [KeyValue; 2] {
        let limit = if limit.is_empty() { UNNAMED } else { limit };
        if self.0.label_sets.lock().admit(domain, limit) {
            [
                KeyValue::new("domain", domain.to_owned()),
                KeyValue::new("limit", limit.to_owned()),
            ]
        } else {
            [
                KeyValue::new("domain", OTHER),
                KeyValue::new("limit", OTHER),
            ]
        }
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
    /// gauges and the leader-change counter.
    pub async fn watch_raft(self, node: Node, mut stop: watch::Receiver<bool>) {
        let mut rx = node.raft().metrics();
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
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Samples this replica's engine status, unless it was sampled less than a second ago.
    pub async fn sample_engine(&self, node: &Node) {
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

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
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
                "d",
                &[2],
                2,
                &decision(vec![status(Code::Ok, &name, 100, 98)], &[]),
            );
        }
        // A pair admitted before the bound keeps its own labels after it.
        m.record_decision(
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
        m.record_decision("d", &[1, 2, 3, 4, 5], 1, &decision(statuses, &["a", "s"]));
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
}
