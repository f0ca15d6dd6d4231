//! Running a [`Plan`]: connections, workers, the schedule, and the server sampler.
//!
//! Every worker runs the same loop. Closed loop: it starts its next operation as soon as the
//! last one answers. Open loop: a scheduler thread releases operation `i` at
//! `start + i / rate` (an OS thread sleeping with nanosleep: tokio's timer has a 1 ms tick)
//! into a queue of `--concurrency` slots; an idle worker takes it and latency is measured from
//! that scheduled time, so a slow server shows as latency instead of silently lowering the rate
//! sent (no coordinated omission; the wrk2 approach). How late operations were sent is
//! reported apart (`send_delay`). Only operations scheduled after the warm-up count. The run
//! stops at the end of `--duration`, or at `--max-requests`; each operation is bounded by
//! `--timeout`, and a watchdog aborts whatever is still running after that.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use tally_proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use tally_proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient as RlsClient;
use tally_proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tally_proto::kuadrant::service::ratelimit::v1::rate_limit_service_client::RateLimitServiceClient as KuadrantClient;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use super::args::{Api, Plan, Workload};
use super::procstat::{self, ProcSample};
use super::rng::Rng;
use super::summary::{self, LatencySummary};
use super::zipf::KeyDist;

/// A send this much after its scheduled time counts as late (open loop).
const LATE: Duration = Duration::from_millis(1);
/// How often the server's RSS is sampled while measuring.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// What one operation came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Ok,
    OverLimit,
    Error(&'static str),
}

/// Why the run stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoppedBy {
    Duration,
    MaxRequests,
}

/// One process's CPU and memory over the measured window.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProcUsage {
    pub pid: u32,
    /// CPU time over wall time, in percent of one core.
    pub cpu_pct: f64,
    pub rss_kib: u64,
    pub rss_max_kib: u64,
}

/// Everything measured in one run.
#[derive(Clone, Debug)]
pub struct Measured {
    /// Operations scheduled in the measured window that completed (in any way).
    pub ops: u64,
    /// gRPC calls made by those operations.
    pub rpcs: u64,
    pub ok: u64,
    pub over_limit: u64,
    /// By gRPC code name (`UNAVAILABLE`, ...), plus `CLIENT_TIMEOUT` and `UNKNOWN_CODE`.
    pub errors: BTreeMap<String, u64>,
    /// Measured seconds: the duration, or less when --max-requests stopped the run first.
    pub elapsed_s: f64,
    pub latency: LatencySummary,
    /// Open loop: operations sent more than 1 ms after their scheduled time.
    pub late: u64,
    /// Open loop: how long after its scheduled time each operation was sent.
    pub send_delay: Option<LatencySummary>,
    /// Open loop: operations scheduled in the measured window but never sent, because the
    /// run ended while the generator was behind its schedule.
    pub unsent: u64,
    /// Operations started in all (warm-up included).
    pub started: u64,
    /// Hits admitted (accuracy workload: every operation, the whole run).
    pub admitted_hits: u64,
    pub stopped_by: StoppedBy,
    pub server: Vec<ProcUsage>,
    pub client_cpu_pct: Option<f64>,
    /// The accuracy workload's key value (`{key}`).
    pub run_key: u64,
    /// Workers aborted by the watchdog (their operations are lost); 0 in a healthy run.
    pub aborted_workers: usize,
}

impl Measured {
    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn ops_per_s(&self) -> f64 {
        if self.elapsed_s > 0.0 {
            self.ops as f64 / self.elapsed_s
        } else {
            0.0
        }
    }
}

/// What one worker saw.
struct WorkerStats {
    hist: Histogram<u64>,
    send_delay: Histogram<u64>,
    ops: u64,
    rpcs: u64,
    ok: u64,
    over_limit: u64,
    errors: BTreeMap<&'static str, u64>,
    late: u64,
    admitted_hits: u64,
    last_done: Option<Instant>,
}

impl WorkerStats {
    fn new() -> Self {
        Self {
            hist: summary::new_histogram(),
            send_delay: summary::new_histogram(),
            ops: 0,
            rpcs: 0,
            ok: 0,
            over_limit: 0,
            errors: BTreeMap::new(),
            late: 0,
            admitted_hits: 0,
            last_done: None,
        }
    }
}

struct Shared {
    plan: Plan,
    dist: KeyDist,
    measure_start: Instant,
    end: Instant,
    run_key: u64,
    /// Open loop: scheduled start times, from the scheduler thread.
    schedule: Option<tokio::sync::Mutex<mpsc::Receiver<Instant>>>,
    /// Operations started (against --max-requests).
    started: AtomicU64,
    hit_max: AtomicBool,
}

/// Connects `plan.connections` HTTP/2 channels to the target.
pub async fn connect(plan: &Plan) -> anyhow::Result<Vec<Channel>> {
    let uri = format!("http://{}", plan.target);
    let mut channels = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections {
        let endpoint = Endpoint::from_shared(uri.clone())?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true);
        let channel = tokio::time::timeout(Duration::from_secs(5), endpoint.connect())
            .await
            .with_context(|| format!("cannot connect to {}: no answer within 5 s", plan.target))?
            .with_context(|| format!("cannot connect to {}", plan.target))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// Runs the plan to its end and gathers what was measured.
pub async fn run(plan: &Plan) -> anyhow::Result<Measured> {
    let channels = connect(plan).await?;
    for &pid in &plan.server_pids {
        if procstat::sample(pid).is_none() {
            bail!("--server-pid {pid}: no such process (or /proc/{pid} is unreadable)");
        }
    }
    // The accuracy key is new for every run, so runs against one server never share a counter.
    let run_key = jiff::Timestamp::now().as_nanosecond() as u64 ^ plan.seed;
    let start = Instant::now();
    let measure_start = start + plan.warmup;
    let end = measure_start + plan.duration;
    let sent_in_window = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let schedule_rx = match plan.rate {
        Some(rate) => {
            let (tx, rx) = mpsc::channel(plan.concurrency);
            let (sent, done) = (sent_in_window.clone(), done.clone());
            std::thread::Builder::new()
                .name("tally-bench-schedule".into())
                .spawn(move || {
                    schedule(rate, start, measure_start, end, tx, &sent, &done);
                })
                .context("cannot start the scheduler thread")?;
            Some(rx)
        }
        None => None,
    };
    let shared = Arc::new(Shared {
        plan: plan.clone(),
        dist: KeyDist::new(plan.keys, plan.zipf),
        measure_start,
        end,
        run_key,
        schedule: schedule_rx.map(tokio::sync::Mutex::new),
        started: AtomicU64::new(0),
        hit_max: AtomicBool::new(false),
    });

    let sampler = tokio::spawn(sample_processes(
        plan.server_pids.clone(),
        measure_start,
        end,
        done.clone(),
    ));

    let mut workers = JoinSet::new();
    for w in 0..plan.concurrency {
        let channel = channels[w % channels.len()].clone();
        workers.spawn(worker(shared.clone(), channel, w as u64));
    }
    let deadline = end + plan.timeout + Duration::from_secs(2);
    let mut stats = Vec::with_capacity(plan.concurrency);
    let mut aborted_workers = 0;
    loop {
        match tokio::time::timeout_at(deadline, workers.join_next()).await {
            Ok(Some(joined)) => stats.push(joined.context("a worker panicked")?),
            Ok(None) => break,
            Err(_) => {
                aborted_workers = workers.len();
                workers.abort_all();
                while workers.join_next().await.is_some() {}
                break;
            }
        }
    }
    done.store(true, Ordering::Relaxed);
    if let Some(rx) = &shared.schedule {
        rx.lock().await.close(); // releases a scheduler blocked on a full queue
    }
    let (server, client_cpu_pct) = sampler.await.context("the sampler panicked")?;

    let mut hist = summary::new_histogram();
    let mut send_delay = summary::new_histogram();
    let mut m = Measured {
        ops: 0,
        rpcs: 0,
        ok: 0,
        over_limit: 0,
        errors: BTreeMap::new(),
        elapsed_s: 0.0,
        latency: LatencySummary::default(),
        late: 0,
        send_delay: None,
        unsent: 0,
        started: shared
            .started
            .load(Ordering::Relaxed)
            .min(plan.max_requests),
        admitted_hits: 0,
        stopped_by: if shared.hit_max.load(Ordering::Relaxed) {
            StoppedBy::MaxRequests
        } else {
            StoppedBy::Duration
        },
        server,
        client_cpu_pct,
        run_key,
        aborted_workers,
    };
    let mut last_done = None::<Instant>;
    for s in stats {
        hist.add(&s.hist).expect("histograms share their bounds");
        send_delay
            .add(&s.send_delay)
            .expect("histograms share their bounds");
        m.ops += s.ops;
        m.rpcs += s.rpcs;
        m.ok += s.ok;
        m.over_limit += s.over_limit;
        m.late += s.late;
        m.admitted_hits += s.admitted_hits;
        for (code, n) in s.errors {
            *m.errors.entry(code.to_string()).or_default() += n;
        }
        last_done = last_done.max(s.last_done);
    }
    let window_end = last_done.map_or(measure_start, |t| t.min(end));
    m.elapsed_s = window_end
        .saturating_duration_since(measure_start)
        .as_secs_f64();
    m.latency = LatencySummary::from_histogram(&hist);
    if let Some(rate) = plan.rate {
        m.send_delay = Some(LatencySummary::from_histogram(&send_delay));
        if m.stopped_by == StoppedBy::Duration {
            let scheduled = (plan.duration.as_secs_f64() * rate).floor() as u64;
            m.unsent = scheduled.saturating_sub(sent_in_window.load(Ordering::Relaxed));
        }
    }
    Ok(m)
}

async fn worker(shared: Arc<Shared>, channel: Channel, index: u64) -> WorkerStats {
    let plan = &shared.plan;
    let mut rls = RlsClient::new(channel.clone());
    let mut kuadrant = KuadrantClient::new(channel);
    let mut rng = Rng::new(
        plan.seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(index),
    );
    let mut stats = WorkerStats::new();
    loop {
        if shared.hit_max.load(Ordering::Relaxed) {
            break;
        }
        let scheduled = match &shared.schedule {
            Some(rx) => match rx.lock().await.recv().await {
                Some(t) => t,
                None => break,
            },
            None => {
                let now = Instant::now();
                if now >= shared.end {
                    break;
                }
                now
            }
        };
        if shared.started.fetch_add(1, Ordering::Relaxed) >= plan.max_requests {
            shared.hit_max.store(true, Ordering::Relaxed);
            break;
        }
        let measured = scheduled >= shared.measure_start;
        if measured && shared.schedule.is_some() {
            let delay = Instant::now().saturating_duration_since(scheduled);
            summary::record(&mut stats.send_delay, delay.as_nanos() as u64);
            if delay > LATE {
                stats.late += 1;
            }
        }
        let descriptors = descriptors(&shared, &mut rng);
        let mut rpcs = 0;
        let mut admitted = 0;
        let verdict = match tokio::time::timeout(
            plan.timeout,
            operation(
                plan,
                &mut rls,
                &mut kuadrant,
                descriptors,
                &mut rpcs,
                &mut admitted,
            ),
        )
        .await
        {
            Ok(v) => v,
            Err(_) => Verdict::Error("CLIENT_TIMEOUT"),
        };
        let done = Instant::now();
        if plan.workload == Workload::Accuracy {
            stats.admitted_hits += admitted;
        }
        if !measured {
            continue;
        }
        summary::record(&mut stats.hist, (done - scheduled).as_nanos() as u64);
        stats.ops += 1;
        stats.rpcs += rpcs;
        stats.last_done = Some(done);
        match verdict {
            Verdict::Ok => stats.ok += 1,
            Verdict::OverLimit => stats.over_limit += 1,
            Verdict::Error(code) => *stats.errors.entry(code).or_default() += 1,
        }
    }
    stats
}

/// The open loop's clock: releases start time `start + i / rate` for i = 0, 1, ... until
/// `end`, sleeping in between (nanosleep, so tens of microseconds late at worst, not tokio's
/// 1 ms tick). A full queue (every worker busy) blocks it; the times it then sends are already
/// past, so the wait shows as latency. Once `end` has passed, what is left of the schedule is
/// dropped (`unsent`), so an overloaded run still stops on time.
fn schedule(
    rate: f64,
    start: Instant,
    measure_start: Instant,
    end: Instant,
    tx: mpsc::Sender<Instant>,
    sent_in_window: &AtomicU64,
    done: &AtomicBool,
) {
    let (start, end) = (start.into_std(), end.into_std());
    let measure_start = measure_start.into_std();
    for i in 0u64.. {
        let t = start + Duration::from_secs_f64(i as f64 / rate);
        let now = std::time::Instant::now();
        if t >= end || now >= end || done.load(Ordering::Relaxed) {
            break;
        }
        if t > now {
            std::thread::sleep(t - now);
        }
        if tx.blocking_send(Instant::from_std(t)).is_err() {
            break; // every worker has stopped
        }
        if t >= measure_start {
            sent_in_window.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The descriptors of one request: each draws its own key (the accuracy workload always uses
/// the run's key).
fn descriptors(shared: &Shared, rng: &mut Rng) -> Vec<RateLimitDescriptor> {
    (0..shared.plan.descriptors)
        .map(|i| {
            let key = if shared.plan.workload == Workload::Accuracy {
                shared.run_key
            } else {
                shared.dist.sample(rng)
            };
            RateLimitDescriptor {
                entries: shared.plan.template.render(key, i),
                limit: None,
                hits_addend: None,
            }
        })
        .collect()
}

/// One operation of the plan's API and workload (see [`Workload`]).
async fn operation(
    plan: &Plan,
    rls: &mut RlsClient<Channel>,
    kuadrant: &mut KuadrantClient<Channel>,
    descriptors: Vec<RateLimitDescriptor>,
    rpcs: &mut u64,
    admitted: &mut u64,
) -> Verdict {
    let request = |descriptors: Vec<RateLimitDescriptor>, hits: u32| RateLimitRequest {
        domain: plan.domain.clone(),
        descriptors,
        hits_addend: hits,
    };
    let report_hits = match plan.workload {
        Workload::Tokens => plan.tokens,
        Workload::Plain | Workload::Accuracy => plan.hits,
    };
    match (plan.api, plan.workload) {
        (Api::Rls, Workload::Plain | Workload::Accuracy) => {
            *rpcs += 1;
            let v = verdict(rls.should_rate_limit(request(descriptors, plan.hits)).await);
            if v == Verdict::Ok {
                *admitted += u64::from(plan.hits);
            }
            v
        }
        (Api::Rls, Workload::Tokens) => {
            // Check only: a present per-descriptor hits_addend of 0 debits nothing.
            let check: Vec<_> = descriptors
                .iter()
                .cloned()
                .map(|d| RateLimitDescriptor {
                    hits_addend: Some(0),
                    ..d
                })
                .collect();
            *rpcs += 1;
            let v = verdict(rls.should_rate_limit(request(check, 0)).await);
            if v != Verdict::Ok {
                return v;
            }
            *rpcs += 1;
            let v = verdict(
                rls.should_rate_limit(request(descriptors, report_hits))
                    .await,
            );
            if v == Verdict::Ok {
                *admitted += u64::from(report_hits);
            }
            v
        }
        (Api::Kuadrant, _) => {
            *rpcs += 1;
            let v = verdict(
                kuadrant
                    .check_rate_limit(request(descriptors.clone(), plan.hits))
                    .await,
            );
            if v != Verdict::Ok {
                return v;
            }
            // Report debits unconditionally; its OVER_LIMIT only says the counter is now past
            // its capacity, so the operation stays admitted unless the call fails.
            *rpcs += 1;
            match kuadrant.report(request(descriptors, report_hits)).await {
                Ok(_) => {
                    *admitted += u64::from(report_hits);
                    Verdict::Ok
                }
                Err(status) => Verdict::Error(code_name(status.code())),
            }
        }
    }
}

fn verdict(result: Result<tonic::Response<RateLimitResponse>, tonic::Status>) -> Verdict {
    match result {
        Ok(response) => match response.get_ref().overall_code {
            1 => Verdict::Ok,
            2 => Verdict::OverLimit,
            _ => Verdict::Error("UNKNOWN_CODE"),
        },
        Err(status) => Verdict::Error(code_name(status.code())),
    }
}

/// gRPC's canonical code names.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Samples the server processes (and this one) over the measured window: CPU from the first
/// and last readings, RSS at the end and its maximum.
async fn sample_processes(
    pids: Vec<u32>,
    measure_start: Instant,
    end: Instant,
    done: Arc<AtomicBool>,
) -> (Vec<ProcUsage>, Option<f64>) {
    tokio::time::sleep_until(measure_start).await;
    let t0 = Instant::now();
    let first: Vec<Option<ProcSample>> = pids.iter().map(|&p| procstat::sample(p)).collect();
    let self_first = procstat::sample_self();
    let mut max_rss: Vec<u64> = first.iter().map(|s| s.map_or(0, |s| s.rss_kib)).collect();
    let mut last = first.clone();
    while Instant::now() < end && !done.load(Ordering::Relaxed) {
        tokio::time::sleep(SAMPLE_EVERY.min(end.saturating_duration_since(Instant::now()))).await;
        for (i, &pid) in pids.iter().enumerate() {
            if let Some(s) = procstat::sample(pid) {
                max_rss[i] = max_rss[i].max(s.rss_kib);
                last[i] = Some(s);
            }
        }
    }
    let self_last = procstat::sample_self();
    let secs = t0.elapsed().as_secs_f64();
    let usage = pids
        .iter()
        .enumerate()
        .filter_map(|(i, &pid)| {
            let (a, b) = (first[i]?, last[i]?);
            Some(ProcUsage {
                pid,
                cpu_pct: procstat::cpu_percent(a.cpu_ticks, b.cpu_ticks, secs),
                rss_kib: b.rss_kib,
                rss_max_kib: max_rss[i],
            })
        })
        .collect();
    let client = match (self_first, self_last) {
        (Some(a), Some(b)) => Some(procstat::cpu_percent(a.cpu_ticks, b.cpu_ticks, secs)),
        _ => None,
    };
    (usage, client)
}
