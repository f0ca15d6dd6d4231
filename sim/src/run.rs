//! One seed, start to finish: build the cluster, run the workload under faults, heal, check
//! liveness, let the cluster settle, and hand the evidence to the invariants.
//!
//! Determinism: the seed runs on a fresh single-threaded tokio runtime with paused (virtual)
//! time; every random choice comes from streams split off one seeded ChaCha generator; there
//! are no sockets and no threads. Data directories (the state machines' snapshot files) live in
//! a fresh temporary directory. openraft draws election timeouts from `rand::thread_rng()`
//! (not seedable): each node gets its own seed-derived timeout with
//! `election_max = election_min + 1`, so that draw has exactly one possible value. Residual
//! hazard: tokio's `select!` without `biased` picks among ready branches with a runtime RNG
//! that cannot be seeded without `--cfg tokio_unstable`; openraft uses it in two places
//! (replication backoff, metrics waits), where ties are rare and (as far as we can tell) do not
//! change what happens. The determinism test guards this.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use openraft::{BasicNode, ServerState};
use parking_lot::Mutex;
use tally_server::engine::{Code, Command, EngineSettings, Outcome};
use tally_server::node::raft_types::NodeId;
use tally_server::node::usage_archive::ArchiveConfig;
use tally_server::node::{BatchConfig, Node, NodeConfig, NodeStartError, RaftTimings};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::audit::Audit;
use crate::clock::SimClock;
use crate::history::*;
use crate::invariants;
use crate::log_store::Disk;
use crate::membership::{Note, Step};
use crate::network::{Episode, LinkModel, Router, SimForward, SimNetwork, addr_of};
use crate::rng::SimRng;
use crate::trace::Trace;
use crate::workload::{
    MeterClient, MeterPlan, Ticket, WorkloadPlan, describe, describe_receipt, describe_usage,
    with_rid,
};

/// Liveness bound: after healing, every live node agrees on a leader within this...
pub const LEADER_WITHIN_MS: u64 = 5_000;
/// ...and a request is acknowledged within this (simulated time).
pub const REQUEST_WITHIN_MS: u64 = 10_000;
/// The same bounds when a member replacement is still under way at healing. In a 3-node
/// cluster mid-replacement there are four voters, one of them retired (silent); only the
/// candidates with the longest log can win and they need every other live voter, while
/// openraft 0.9 (no pre-vote) lets the others' campaigns take those votes. Measured over
/// 10,000 seeds: up to 12.2 s to a leader (23 seeds over 5 s, all of this kind).
pub const CHANGING_LEADER_WITHIN_MS: u64 = 15_000;
pub const CHANGING_REQUEST_WITHIN_MS: u64 = 20_000;

/// A node that exits because its Raft stopped on its own is restarted this long after, as a
/// service manager would (systemd's `Restart=on-failure` with `RestartSec=1`).
pub const SUPERVISOR_RESTART_MS: u64 = 1_000;

/// Nodes' pinned election timeouts are at least this far apart. openraft would draw a fresh
/// random timeout for every election; pinned ones that were close stayed in lockstep after a
/// common reset, and two candidates split the vote round after round (seed 5 with membership
/// changes: 26 s without a leader). Apart by more than a vote's round trip, one candidate
/// always starts first, as randomization gives a real cluster with high probability.
const ELECTION_SPACING_MS: u64 = 30;

fn draw_timeout(rng: &SimRng) -> u64 {
    rng.between(30, 60) * 10 + rng.between(0, 9)
}

fn well_apart(t: u64, others: &BTreeSet<u64>) -> bool {
    others.iter().all(|o| o.abs_diff(t) >= ELECTION_SPACING_MS)
}

/// Simulated time between two driver steps.
const TICK: Duration = Duration::from_millis(10);
/// Replicas are sampled this often.
const SAMPLE_EVERY_MS: u64 = 100;
/// A status line goes into the trace this often.
const STATUS_EVERY_MS: u64 = 1_000;
const HEARTBEAT_MS: u64 = 100;

#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Simulated seconds of workload under faults (healing and settling come after).
    pub seconds: u64,
    /// Cluster size; drawn from the seed (3 or 5) when `None`.
    pub nodes: Option<usize>,
    /// Print the trace as it is written.
    pub echo: bool,
    /// Where the temporary data directories go (default: /dev/shm when there is one).
    pub data_root: Option<PathBuf>,
    /// Break the disks on purpose (to show the invariants catch it).
    pub sabotage: Option<crate::log_store::DiskSabotage>,
    /// Replace members now and then (add a node, promote it, remove another). Off replays a
    /// seed with the fault mix of the runs before membership changes were simulated.
    pub membership_changes: bool,
    /// Metering traffic (quotas, usage reports, reservations) beside the rate-limit requests.
    /// Off replays a seed exactly as before metering was simulated.
    pub metering: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            seconds: 20,
            nodes: None,
            echo: false,
            data_root: None,
            sabotage: None,
            membership_changes: true,
            metering: true,
        }
    }
}

/// Counts for one seed.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub nodes: usize,
    pub calls: usize,
    pub acked: usize,
    pub unknown: usize,
    pub leaders: usize,
    pub faults: u64,
    pub crashes: u64,
    /// Members replaced (a node added and promoted, another removed).
    pub membership_changes: u64,
    /// Nodes whose Raft stopped on its own, so they exited and were restarted.
    pub raft_stops: u64,
    pub clock_jumps: u64,
    pub limit_changes: u64,
    pub snapshots_installed: u64,
    pub messages: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub fsyncs: u64,
    pub lost_disk_ops: u64,
    pub lost_fast_answers: usize,
    pub retired_leaders_deposed: u64,
    pub committed_entries: u64,
    pub sim_ms: u64,
    /// Metering calls made (retries included) and what the usage invariants checked.
    pub usage_calls: usize,
    pub usage: invariants::UsageCoverage,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} nodes, {:.1}s simulated, {} calls ({} acked, {} unknown), {} committed entries, {} leaders, \
             {} faults ({} crashes, {} clock jumps), {} raft stops, {} membership changes, {} limit changes, {} snapshot installs, \
             {} messages ({} lost, {} duplicated), {} fsyncs ({} unsynced ops lost), {} fast answers lost, \
             {} retired-leader entries answered with a higher vote; {} metering calls, {}",
            self.nodes,
            self.sim_ms as f64 / 1000.0,
            self.calls,
            self.acked,
            self.unknown,
            self.committed_entries,
            self.leaders,
            self.faults,
            self.crashes,
            self.clock_jumps,
            self.raft_stops,
            self.membership_changes,
            self.limit_changes,
            self.snapshots_installed,
            self.messages,
            self.lost,
            self.duplicated,
            self.fsyncs,
            self.lost_disk_ops,
            self.lost_fast_answers,
            self.retired_leaders_deposed,
            self.usage_calls,
            self.usage,
        )
    }
}

pub struct SeedReport {
    pub seed: u64,
    pub violations: Vec<Violation>,
    pub trace: String,
    pub stats: Stats,
}

impl SeedReport {
    /// A digest of the whole trace: equal digests ⇒ (almost surely) equal runs.
    pub fn trace_digest(&self) -> u64 {
        digest(self.trace.as_bytes())
    }
}

/// Runs one seed on its own runtime; same seed ⇒ same report.
pub fn run_seed(seed: u64, opts: &SimOptions) -> SeedReport {
    let root = opts.data_root.clone().unwrap_or_else(default_data_root);
    let dir = tempfile::Builder::new()
        .prefix(&format!("tally-sim-{seed}-"))
        .tempdir_in(&root)
        .or_else(|_| tempfile::tempdir())
        .expect("a temporary directory");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a tokio runtime");
    // Built inside the runtime: outside it, `tokio::time::Instant::now()` reads the real
    // clock, and the trace's and the node clocks' time zero would carry wall-clock jitter.
    let report = runtime.block_on(async { Sim::new(seed, opts, dir.path()).run().await });
    drop(runtime);
    report
}

fn default_data_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() && tempfile::tempdir_in(shm).is_ok() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

/// What the clients and samplers recorded.
#[derive(Default)]
struct Recorded {
    calls: Vec<Call>,
    samples: Vec<Sample>,
}

/// What every node's slot is made from (nodes added by membership changes too).
struct SlotRecipe {
    dir: PathBuf,
    base_ms: i64,
    batch: BatchConfig,
    snapshot_every: u64,
    audit: Audit,
    sabotage: Option<crate::log_store::DiskSabotage>,
}

impl SlotRecipe {
    /// A node's slot, its clock and disk drawn from `rng`; and the trace line describing it.
    fn slot(&self, id: NodeId, timeout: u64, rng: &SimRng, disk_rng: SimRng) -> (Slot, String) {
        let fsync_us = if rng.chance(0.2) {
            (rng.between(2_000, 10_000), rng.between(10_000, 40_000))
        } else {
            (rng.between(100, 500), rng.between(500, 3_000))
        };
        let clock = Arc::new(SimClock::new(
            self.base_ms,
            rng.between_i(-2_000, 2_000),
            rng.between_i(-500, 500),
        ));
        let line = format!(
            "n{id}: election timeout {timeout}ms, clock skew {:+}ms drift {:+}ppm, fsync {}..{}µs",
            clock.offset_ms(),
            clock.drift_ppm(),
            fsync_us.0,
            fsync_us.1
        );
        let config = NodeConfig {
            node_id: id,
            data_dir: self.dir.join(format!("n{id}")),
            advertise_addr: addr_of(id),
            bootstrap: false,
            engine: EngineSettings::default(),
            archive: ArchiveConfig::default(),
            batch: self.batch,
            timings: RaftTimings {
                heartbeat_ms: HEARTBEAT_MS,
                election_min_ms: timeout,
                election_max_ms: timeout + 1,
                snapshot_every_entries: self.snapshot_every,
                logs_kept_behind_snapshot: 0,
            },
            clock: clock.clone(),
        };
        let disk = Disk::new(id, disk_rng, self.audit.clone(), fsync_us, self.sabotage);
        let slot = Slot {
            id,
            disk,
            clock,
            config,
            node: None,
            incarnation: 0,
            stopping: None,
            retired: false,
        };
        (slot, line)
    }
}

struct Slot {
    /// Removed from the cluster: never started again.
    retired: bool,
    id: NodeId,
    disk: Arc<Disk>,
    clock: Arc<SimClock>,
    config: NodeConfig,
    node: Option<Node>,
    incarnation: u32,
    /// The dead incarnation's shutdown, awaited before a restart.
    stopping: Option<JoinHandle<()>>,
}

enum Event {
    HealCut(u64),
    HealEpisode(u64),
    Restart(NodeId),
    HealDisk(NodeId),
}

struct Sim {
    seed: u64,
    opts: SimOptions,
    trace: Trace,
    faults_rng: SimRng,
    work_rng: SimRng,
    router: Arc<Router>,
    audit: Audit,
    slots: BTreeMap<NodeId, Slot>,
    plan: WorkloadPlan,
    batch: BatchConfig,
    recorded: Arc<Mutex<Recorded>>,
    outstanding: Arc<AtomicUsize>,
    next_call: u64,
    events: BTreeMap<(u64, u64), Event>,
    next_event: u64,
    next_fault: u64,
    leaders: Vec<LeaderSeen>,
    violations: Vec<Violation>,
    liveness_seen: Option<Liveness>,
    /// A membership change was under way when the faults healed (see
    /// [`CHANGING_LEADER_WITHIN_MS`]).
    changing_at_heal: bool,
    stopped: Vec<RaftStopped>,
    /// Nodes that exited on a Raft failure, and when their supervisor restarts them.
    supervised: Vec<(u64, NodeId)>,
    recipe: SlotRecipe,
    member_rng: SimRng,
    /// The id the next added node gets.
    next_id: NodeId,
    /// The steps of the change in progress not yet done.
    change: Option<Vec<Step>>,
    /// Members whose removal started: their refusal to start again is expected.
    removing: BTreeSet<NodeId>,
    /// The steps of a change that gave up halfway (a node added but not promoted, an id
    /// retired but still a member...): finished at healing, as an operator would.
    unfinished: Vec<Step>,
    notes: crate::membership::Notes,
    next_status_ms: u64,
    stats: Stats,
    /// Mean simulated time between faults, ms.
    fault_gap_ms: (u64, u64),
    /// The metering clients (none with `metering` off) and their own stream.
    meter: Option<MeterClient>,
    meter_rng: SimRng,
    /// Metering calls in flight: their answers go back to the client that sent them.
    meter_inflight: Vec<(tokio::sync::oneshot::Receiver<CallResult>, Ticket, NodeId)>,
}

impl Sim {
    fn new(seed: u64, opts: &SimOptions, dir: &Path) -> Sim {
        let root = SimRng::new(seed);
        let setup = root.fork();
        let net_rng = root.fork();
        let disk_rng = root.fork();
        let faults_rng = root.fork();
        let work_rng = root.fork();
        // Forked last, so the streams above are what they were before membership changes.
        let member_rng = root.fork();
        // ...and after it, metering's: the streams above are what they were before it.
        let meter_rng = root.fork();
        let trace = Trace::new(opts.echo);
        let n = opts
            .nodes
            .unwrap_or_else(|| if setup.chance(0.7) { 3 } else { 5 });
        let base = LinkModel {
            delay_us: (setup.between(200, 1_000), setup.between(2_000, 8_000)),
            loss: if setup.chance(0.5) {
                0.0
            } else {
                setup.between(1, 20) as f64 / 1000.0
            },
            duplicate: if setup.chance(0.5) {
                0.0
            } else {
                setup.between(1, 20) as f64 / 1000.0
            },
        };
        let router = Router::new(net_rng, base);
        let audit = Audit::default();
        let batch = BatchConfig {
            max_batch_commands: *setup.pick(&[1, 2, 4, 8, 16, 64, 512]),
            batch_linger: Duration::from_millis(*setup.pick(&[0, 0, 1, 2])),
            max_inflight_batches: *setup.pick(&[
                1,
                1,
                2,
                4,
                tally_server::node::MAX_INFLIGHT_BATCHES,
            ]),
        };
        let snapshot_every = *setup.pick(&[5, 10, 20, 50, 200]);
        // Distinct election timeouts, one value each (see the module docs).
        let mut timeouts = BTreeSet::new();
        while timeouts.len() < n {
            let t = draw_timeout(&setup);
            if well_apart(t, &timeouts) {
                timeouts.insert(t);
            }
        }
        let timeouts: Vec<u64> = {
            let mut t: Vec<u64> = timeouts.into_iter().collect();
            // Shuffle deterministically so node 1 is not always the fastest.
            for i in (1..t.len()).rev() {
                let j = setup.index(i + 1);
                t.swap(i, j);
            }
            t
        };
        let base_ms = 1_767_225_600_000 + setup.between(0, 86_400_000) as i64;
        let plan = WorkloadPlan::draw(&setup);
        trace.log(format!(
            "seed {seed}: {n} nodes, heartbeat {HEARTBEAT_MS}ms, snapshot every {snapshot_every} entries, \
             batches of ≤{} commands (linger {:?}, ≤{} in flight), links {}..{}µs loss {:.1}% dup {:.1}%",
            batch.max_batch_commands,
            batch.batch_linger,
            batch.max_inflight_batches,
            base.delay_us.0,
            base.delay_us.1,
            base.loss * 100.0,
            base.duplicate * 100.0
        ));
        trace.log(format!(
            "workload: {} req/s, strict-rpw {}/{}ms on {} skeys, fast-rpw {}/{}ms on {} fkeys, {} tkeys, deadlines {}..{}ms",
            plan.rate_per_s,
            plan.strict.capacity,
            plan.strict.window_ms,
            plan.strict_keys,
            plan.fast.capacity,
            plan.fast.window_ms,
            plan.fast_keys,
            plan.token_keys,
            plan.deadline_ms.0,
            plan.deadline_ms.1
        ));
        let meter = opts.metering.then(|| {
            let plan = MeterPlan::draw(&meter_rng);
            trace.log(plan.describe());
            MeterClient::new(plan, meter_rng.clone())
        });
        let recipe = SlotRecipe {
            dir: dir.to_path_buf(),
            base_ms,
            batch,
            snapshot_every,
            audit: audit.clone(),
            sabotage: opts.sabotage,
        };
        let mut slots = BTreeMap::new();
        for (i, timeout) in timeouts.iter().copied().enumerate() {
            let id = (i + 1) as NodeId;
            let (slot, line) = recipe.slot(id, timeout, &setup, disk_rng.fork());
            trace.log(line);
            slots.insert(id, slot);
        }
        let fault_gap_ms = *setup.pick(&[(200, 1_000), (500, 2_500), (1_000, 5_000)]);
        Sim {
            seed,
            opts: opts.clone(),
            trace,
            faults_rng,
            work_rng,
            router,
            audit,
            slots,
            plan,
            batch,
            recorded: Arc::default(),
            outstanding: Arc::default(),
            next_call: 1,
            events: BTreeMap::new(),
            next_event: 0,
            next_fault: 1,
            leaders: Vec::new(),
            violations: Vec::new(),
            liveness_seen: None,
            changing_at_heal: false,
            stopped: Vec::new(),
            supervised: Vec::new(),
            recipe,
            member_rng,
            next_id: n as NodeId + 1,
            change: None,
            removing: BTreeSet::new(),
            unfinished: Vec::new(),
            notes: Arc::default(),
            next_status_ms: 0,
            stats: Stats {
                nodes: n,
                ..Stats::default()
            },
            fault_gap_ms,
            meter,
            meter_rng,
            meter_inflight: Vec::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.trace.now_ms()
    }

    async fn run(mut self) -> SeedReport {
        let ids: Vec<NodeId> = self.slots.keys().copied().collect();
        for id in &ids {
            self.start(*id).await;
        }
        let members: BTreeMap<NodeId, BasicNode> = ids
            .iter()
            .map(|id| (*id, BasicNode::new(addr_of(*id))))
            .collect();
        if let Some(first) = self.router.node(ids[0])
            && let Err(e) = first.raft().initialize(members).await
        {
            self.fail("setup", format!("initialize: {e}"));
        }
        self.trace
            .log(format!("cluster initialized: members {ids:?}"));
        if !self.install_initial_limits().await {
            return self.finish().await;
        }
        if self.meter.is_some() && !self.install_quotas().await {
            return self.finish().await;
        }

        // Workload under faults.
        let chaos_end = self.now_ms() + self.opts.seconds * 1000;
        let mut next_fault_at = self.now_ms() + self.fault_gap();
        let mut next_limits_at = self.now_ms() + self.work_rng.between(2_000, 6_000);
        let mut next_change_at = self.now_ms() + self.member_rng.between(2_000, 12_000);
        let mut next_sample_at = 0;
        while self.now_ms() < chaos_end {
            let now = self.now_ms();
            if self.opts.membership_changes && now >= next_change_at && self.change.is_none() {
                self.start_change().await;
                next_change_at = now + self.member_rng.between(4_000, 12_000);
            }
            if now >= next_fault_at {
                self.inject_fault().await;
                next_fault_at = now + self.fault_gap();
            }
            if now >= next_limits_at {
                self.change_limits();
                next_limits_at = now + self.work_rng.between(2_000, 6_000);
            }
            self.due_events().await;
            self.spawn_workload();
            self.meter_tick();
            self.observe().await;
            if now >= next_sample_at {
                self.sample().await;
                next_sample_at = now + SAMPLE_EVERY_MS;
            }
            tokio::time::sleep(TICK).await;
        }

        // Heal everything, then hold the cluster to its liveness bound.
        self.heal_all().await;
        let liveness = self.liveness().await;
        self.record_liveness(liveness);

        // A last burst of traffic (fills the final window the end-state check looks at),
        // then let every call finish and every replica catch up.
        let burst_end = self.now_ms() + 1_500;
        while self.now_ms() < burst_end {
            self.spawn_workload();
            self.meter_tick();
            self.observe().await;
            if self.now_ms() >= next_sample_at {
                self.sample().await;
                next_sample_at = self.now_ms() + SAMPLE_EVERY_MS;
            }
            tokio::time::sleep(TICK).await;
        }
        self.finish().await
    }

    /// Drains calls, waits for the replicas to settle, records the end state, checks.
    async fn finish(mut self) -> SeedReport {
        let drain_until = self.now_ms() + 10_000;
        let mut next_sample_at = 0;
        while self.outstanding.load(Ordering::SeqCst) > 0 && self.now_ms() < drain_until {
            self.observe().await;
            if self.now_ms() >= next_sample_at {
                self.sample().await;
                next_sample_at = self.now_ms() + SAMPLE_EVERY_MS;
            }
            tokio::time::sleep(TICK).await;
        }
        let settle_until = self.now_ms() + 10_000;
        while !self.settled() && self.now_ms() < settle_until {
            self.observe().await;
            if self.now_ms() >= next_sample_at {
                self.sample().await;
                next_sample_at = self.now_ms() + SAMPLE_EVERY_MS;
            }
            tokio::time::sleep(TICK).await;
        }
        self.observe_leaders();
        self.sample().await;
        let mut finals = Vec::new();
        for (id, node) in self.router.live() {
            let (applied, is_leader, running) = {
                let m = node.raft().metrics();
                let m = m.borrow();
                (
                    m.last_applied.map(|l| l.index),
                    m.state == ServerState::Leader,
                    m.running_state.is_ok(),
                )
            };
            let snapshot = node.read(|e| e.snapshot()).await.expect("read");
            finals.push(FinalState {
                node: id,
                is_leader,
                running,
                applied,
                snapshot,
                archive: read_archive(&node),
            });
        }
        self.trace.log(format!(
            "at rest: {}",
            finals
                .iter()
                .map(|f| format!(
                    "n{}{} applied {:?}",
                    f.node,
                    if f.is_leader { " (leader)" } else { "" },
                    f.applied
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        for (_, node) in self.router.live() {
            node.shutdown().await;
        }
        let recorded = std::mem::take(&mut *self.recorded.lock());
        let mut calls = recorded.calls;
        calls.sort_by_key(|c| c.id);
        let committed = self.audit.committed();
        let evidence = Evidence {
            bounds: Bounds {
                strict: self.plan.strict,
                fast: self.plan.fast,
                max_batch_commands: self.batch.max_batch_commands,
                max_inflight_batches: self.batch.max_inflight_batches,
                leader_within_ms: self.bounds().0,
                request_within_ms: self.bounds().1,
                max_counters: EngineSettings::default().max_counters,
            },
            calls,
            samples: recorded.samples,
            leaders: self.leaders.clone(),
            created: self.audit.created(),
            committed,
            conflicts: self.audit.conflicts(),
            liveness: self.liveness_seen,
            finals,
            stopped: self.stopped.clone(),
        };
        let mut violations = std::mem::take(&mut self.violations);
        let checked = invariants::check_all_with_coverage(&evidence);
        violations.extend(checked.violations);
        let (usage, replay) = (checked.usage, checked.replay);
        let net = self.router.stats();
        let mut stats = self.stats.clone();
        stats.calls = evidence.calls.len();
        stats.acked = evidence
            .calls
            .iter()
            .filter(|c| matches!(c.result, CallResult::Acked(_)))
            .count();
        stats.unknown = stats.calls - stats.acked;
        stats.leaders = self.leaders.len();
        stats.snapshots_installed = net.snapshots_delivered;
        stats.messages = net.sent;
        stats.lost = net.lost;
        stats.duplicated = net.duplicated;
        stats.retired_leaders_deposed = net.retired_leaders_deposed;
        stats.fsyncs = self.slots.values().map(|s| s.disk.stats().fsyncs).sum();
        stats.lost_disk_ops = self.slots.values().map(|s| s.disk.stats().lost_ops).sum();
        stats.lost_fast_answers = invariants::fast_bound::lost_fast_answers(&evidence, &replay);
        stats.committed_entries = replay.last_index.unwrap_or(0);
        stats.sim_ms = self.now_ms();
        stats.usage_calls = evidence
            .calls
            .iter()
            .filter(|c| describe_usage(&c.command).is_some())
            .count();
        stats.usage = usage;
        if let Some(m) = &self.meter {
            self.trace.log(format!(
                "metering sent {} reports, {} reserves, {} commits, {} releases ({} of them retries); checked: {}",
                m.sent[0], m.sent[1], m.sent[2], m.sent[3], m.retries, stats.usage
            ));
        }
        for v in &violations {
            self.trace.log(format!("VIOLATION {v}"));
        }
        self.trace.log(format!("done: {stats}"));
        SeedReport {
            seed: self.seed,
            violations,
            trace: self.trace.text(),
            stats,
        }
    }

    fn fail(&mut self, invariant: &'static str, message: String) {
        self.trace.log(format!("FAILED {invariant}: {message}"));
        self.violations.push(Violation { invariant, message });
    }

    // ----- nodes -----

    async fn start(&mut self, id: NodeId) {
        let slot = self.slots.get_mut(&id).expect("slot");
        if let Some(stopping) = slot.stopping.take() {
            let _ = stopping.await;
        }
        let store = slot.disk.open();
        let network = SimNetwork {
            from: id,
            router: self.router.clone(),
        };
        let forward = Arc::new(SimForward {
            from: id,
            router: self.router.clone(),
        });
        match Node::start_with(slot.config.clone(), store, network, forward).await {
            Ok(node) => {
                slot.incarnation += 1;
                slot.node = Some(node.clone());
                self.router.up(id, slot.disk.epoch(), node);
            }
            Err(NodeStartError::Retired(_)) if self.removing.contains(&id) => {
                // It applied its own retirement before it went down: expected.
                slot.retired = true;
                self.trace.log(format!(
                    "n{id} refuses to start: retired (it was being removed)"
                ));
            }
            Err(e) => {
                slot.disk.crash();
                let message = format!("n{id} failed to start: {e}");
                self.fail("restart", message);
            }
        }
    }

    fn crash(&mut self, id: NodeId) {
        if self.take_down(id, "CRASH") {
            self.stats.crashes += 1;
        }
    }

    /// The node's process ends: it leaves the network, and its disk keeps only what was
    /// synced (an exit keeps the page cache in reality; losing it is the harder case).
    fn take_down(&mut self, id: NodeId, what: &str) -> bool {
        let slot = self.slots.get_mut(&id).expect("slot");
        let Some(node) = slot.node.take() else {
            return false;
        };
        self.router.down(id);
        let loss = slot.disk.crash();
        let leader = node.raft().metrics().borrow().state == ServerState::Leader;
        self.trace.log(format!(
            "{what} n{id}{} ({loss})",
            if leader { " (leader)" } else { "" }
        ));
        slot.stopping = Some(tokio::spawn(async move {
            node.shutdown().await;
        }));
        true
    }

    /// Leaders and Raft failures seen, then the supervisor's restarts that are due.
    async fn observe(&mut self) {
        self.observe_leaders();
        self.membership_notes();
        let now = self.now_ms();
        let due: Vec<NodeId> = self
            .supervised
            .iter()
            .filter(|(at, _)| *at <= now)
            .map(|(_, id)| *id)
            .collect();
        self.supervised.retain(|(at, _)| *at > now);
        for id in due {
            self.restart(id).await;
        }
    }

    async fn restart(&mut self, id: NodeId) {
        if self.slots[&id].node.is_some() || self.slots[&id].retired {
            return;
        }
        self.start(id).await;
        let slot = &self.slots[&id];
        if slot.node.is_some() {
            self.trace
                .log(format!("RESTART n{id} (incarnation {})", slot.incarnation));
        }
    }

    fn live_ids(&self) -> Vec<NodeId> {
        self.slots
            .values()
            .filter(|s| s.node.is_some())
            .map(|s| s.id)
            .collect()
    }

    /// The node that reports itself leader with the highest term, if any.
    fn leader(&self) -> Option<NodeId> {
        self.router
            .live()
            .into_iter()
            .filter_map(|(id, n)| {
                let m = n.raft().metrics();
                let m = m.borrow();
                (m.state == ServerState::Leader).then_some((m.current_term, id))
            })
            .max()
            .map(|(_, id)| id)
    }

    fn observe_leaders(&mut self) {
        let mut exits = Vec::new();
        for (id, node) in self.router.live() {
            let (state, term, fatal) = {
                let m = node.raft().metrics();
                let m = m.borrow();
                (m.state, m.current_term, m.running_state.clone().err())
            };
            let epoch = self.slots[&id].disk.epoch();
            if let Some(fatal) = fatal
                && !self
                    .stopped
                    .iter()
                    .any(|s| s.node == id && s.epoch == epoch)
            {
                // What tallyd acts on: the node's own report, not the simulator's peek.
                let reported = node.raft_failure().is_some();
                self.trace.log(format!(
                    "RAFT STOPPED n{id} on its own: {fatal}{}",
                    if reported {
                        ""
                    } else {
                        " (not reported by the node)"
                    }
                ));
                self.stopped.push(RaftStopped {
                    at_ms: self.now_ms(),
                    node: id,
                    epoch,
                    error: fatal.to_string(),
                    reported,
                });
                if reported {
                    exits.push(id);
                }
            }
            if state == ServerState::Leader
                && !self
                    .leaders
                    .iter()
                    .any(|l| l.node == id && l.term == term && l.epoch == epoch)
            {
                let again = self.leaders.iter().any(|l| l.node == id && l.term == term);
                self.trace.log(format!(
                    "leader n{id} term {term}{}",
                    if again {
                        " (restarted as leader of the same term)"
                    } else {
                        ""
                    }
                ));
                self.leaders.push(LeaderSeen {
                    at_ms: self.now_ms(),
                    node: id,
                    term,
                    epoch,
                });
            }
        }
        for id in exits {
            if self.take_down(id, "EXIT (raft stopped)") {
                self.stats.raft_stops += 1;
                let at = self.now_ms() + SUPERVISOR_RESTART_MS;
                self.trace
                    .log(format!("supervisor: n{id} restarts at {at}ms"));
                self.supervised.push((at, id));
            }
        }
    }

    /// One line: every node's role, term, applied and last log index.
    fn log_status(&self) {
        let mut parts = Vec::new();
        for slot in self.slots.values() {
            let Some(node) = &slot.node else {
                parts.push(format!("n{} down", slot.id));
                continue;
            };
            let m = node.raft().metrics();
            let m = m.borrow();
            let role = match m.state {
                ServerState::Leader => "L",
                ServerState::Candidate => "C",
                ServerState::Follower => "F",
                ServerState::Learner => "l",
                ServerState::Shutdown => "x",
            };
            parts.push(format!(
                "n{} {role} t{} applied {} log {}",
                slot.id,
                m.current_term,
                m.last_applied.map_or(0, |l| l.index),
                m.last_log_index.unwrap_or(0)
            ));
        }
        self.trace.log(format!(
            "status: {} | {} calls open",
            parts.join(", "),
            self.outstanding.load(Ordering::SeqCst)
        ));
    }

    /// Every live node's engine, with the applied index its metrics reported just before.
    async fn sample(&mut self) {
        let at_ms = self.now_ms();
        if at_ms >= self.next_status_ms {
            self.log_status();
            self.next_status_ms = at_ms + STATUS_EVERY_MS;
        }
        for (id, node) in self.router.live() {
            let floor = node.raft().metrics().borrow().last_applied.map(|l| l.index);
            let (hash, last_ms) = node
                .read(|e| (digest(&e.snapshot()), e.last_ms()))
                .await
                .expect("read");
            let incarnation = self.slots[&id].incarnation;
            self.recorded.lock().samples.push(Sample {
                node: id,
                incarnation,
                at_ms,
                applied_floor: floor,
                snapshot_hash: hash,
                last_ms,
            });
        }
    }

    /// All nodes live, one leader, everyone applied everything the leader has.
    fn settled(&self) -> bool {
        let live = self.router.live();
        if live.len() != self.member_ids().len() {
            return false;
        }
        let Some(leader) = self.leader() else {
            return false;
        };
        let target = {
            let m = live
                .iter()
                .find(|(id, _)| *id == leader)
                .expect("leader is live")
                .1
                .raft()
                .metrics();
            let m = m.borrow();
            m.last_log_index
        };
        live.iter().all(|(_, n)| {
            let m = n.raft().metrics();
            let m = m.borrow();
            m.current_leader == Some(leader) && m.last_applied.map(|l| l.index) == target
        })
    }

    // ----- clients -----

    /// Sends `command` to node `to` as a client with a deadline; records what it saw.
    fn spawn_call(
        &mut self,
        command: Command,
        to: NodeId,
    ) -> tokio::sync::oneshot::Receiver<CallResult> {
        let rng = self.work_rng.clone();
        self.spawn_call_drawing(command, to, &rng)
    }

    /// [`Sim::spawn_call`], its deadline drawn from `rng`.
    fn spawn_call_drawing(
        &mut self,
        command: Command,
        to: NodeId,
        rng: &SimRng,
    ) -> tokio::sync::oneshot::Receiver<CallResult> {
        let id = self.next_call;
        self.next_call += 1;
        let command = match command {
            Command::RateLimit(cmd) => Command::RateLimit(with_rid(cmd, id)),
            other => other,
        };
        let deadline =
            Duration::from_millis(rng.between(self.plan.deadline_ms.0, self.plan.deadline_ms.1));
        let node = self.router.incarnation(to);
        let router = self.router.clone();
        let trace = self.trace.clone();
        let recorded = self.recorded.clone();
        let outstanding = self.outstanding.clone();
        outstanding.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let sent_ms = trace.now_ms();
            let mut served_by = (to, 0);
            let result = match node {
                None => CallResult::Unknown("node is down".into()),
                Some((epoch, node)) => {
                    served_by = (to, epoch);
                    let answer =
                        tokio::time::timeout(deadline, node.propose(command.clone())).await;
                    drop(node);
                    match answer {
                        // A crashed process sends nothing: its leftover tasks' answers are dropped.
                        Ok(_) if !router.alive(to, epoch) => {
                            CallResult::Unknown(format!("connection reset (n{to} crashed)"))
                        }
                        Ok(Ok(outcome)) => CallResult::Acked(outcome),
                        Ok(Err(e)) => CallResult::Unknown(e.to_string()),
                        Err(_) => CallResult::Unknown(format!(
                            "deadline {}ms passed",
                            deadline.as_millis()
                        )),
                    }
                }
            };
            let done_ms = trace.now_ms();
            if let Some(forwarded) =
                crate::workload::rid_of_command(&command).and_then(|rid| router.forwarded_to(rid))
            {
                served_by = forwarded;
            }
            trace.log(format!(
                "call#{id} n{to} {} -> {} ({}ms)",
                describe_command(&command),
                describe_result(&result),
                done_ms - sent_ms
            ));
            recorded.lock().calls.push(Call {
                id,
                node: to,
                served_by,
                sent_ms,
                done_ms,
                command,
                result: result.clone(),
            });
            outstanding.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(result);
        });
        rx
    }

    fn random_node(&self, rng: &SimRng) -> NodeId {
        let ids = self.member_ids();
        *rng.pick(&ids)
    }

    /// This tick's requests: `rate_per_s` on average, in bursts.
    fn spawn_workload(&mut self) {
        let per_tick_milli = self.plan.rate_per_s * TICK.as_millis() as u64; // thousandths
        let mut n = per_tick_milli / 1000;
        if self.work_rng.between(0, 999) < per_tick_milli % 1000 {
            n += 1;
        }
        if self.work_rng.chance(0.02) {
            n += self.work_rng.between(5, 30); // a burst
        }
        for _ in 0..n {
            let cmd = self.plan.request(&self.work_rng);
            let to = self.random_node(&self.work_rng.clone());
            drop(self.spawn_call(Command::RateLimit(cmd), to));
        }
    }

    /// Metering: answers that came back go to their clients, then this tick's sends.
    fn meter_tick(&mut self) {
        let Some(mut meter) = self.meter.take() else {
            return;
        };
        let now = self.now_ms();
        let mut open = Vec::with_capacity(self.meter_inflight.len());
        for (mut rx, ticket, node) in std::mem::take(&mut self.meter_inflight) {
            match rx.try_recv() {
                Ok(result) => meter.result(ticket, node, &result, now),
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {
                    open.push((rx, ticket, node))
                }
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                    meter.result(ticket, node, &CallResult::Unknown("no answer".into()), now)
                }
            }
        }
        self.meter_inflight = open;
        for send in meter.tick(now, TICK.as_millis() as u64, true) {
            let rng = self.meter_rng.clone();
            let members = self.member_ids();
            let others: Vec<NodeId> = members
                .iter()
                .copied()
                .filter(|m| Some(*m) != send.avoid)
                .collect();
            let to = *rng.pick(if others.is_empty() { &members } else { &others });
            let rx = self.spawn_call_drawing(send.command, to, &rng);
            self.meter_inflight.push((rx, send.ticket, to));
        }
        self.meter = Some(meter);
    }

    /// The metering plan's quota set, proposed until it is acknowledged.
    async fn install_quotas(&mut self) -> bool {
        let set = self.meter.as_ref().expect("metering").plan.quotas();
        let rng = self.meter_rng.clone();
        let give_up = self.now_ms() + 30_000;
        while self.now_ms() < give_up {
            self.observe().await;
            let to = self.random_node(&rng);
            let rx = self.spawn_call_drawing(Command::ReplaceQuotas(set.clone()), to, &rng);
            if let Ok(CallResult::Acked(Outcome::QuotasReplaced { .. })) = rx.await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.fail("liveness", "quotas not installed within 30s".into());
        false
    }

    fn change_limits(&mut self) {
        let set = self.plan.limits(&self.work_rng);
        let names: Vec<String> = set
            .limits
            .iter()
            .map(|l| {
                format!(
                    "{}({:?}{})",
                    l.name,
                    l.ack,
                    if l.shadow { ",shadow" } else { "" }
                )
            })
            .collect();
        self.trace
            .log(format!("LIMITS change: {}", names.join(" ")));
        self.stats.limit_changes += 1;
        let to = self.random_node(&self.work_rng.clone());
        drop(self.spawn_call(Command::ReplaceLimits(set), to));
    }

    async fn install_initial_limits(&mut self) -> bool {
        let set = self.plan.limits(&self.work_rng);
        let give_up = self.now_ms() + 30_000;
        while self.now_ms() < give_up {
            self.observe().await;
            let to = self.random_node(&self.work_rng.clone());
            let rx = self.spawn_call(Command::ReplaceLimits(set.clone()), to);
            if let Ok(CallResult::Acked(Outcome::LimitsReplaced { .. })) = rx.await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.fail("liveness", "initial limits not installed within 30s".into());
        false
    }

    // ----- faults -----

    fn fault_gap(&self) -> u64 {
        self.faults_rng
            .between(self.fault_gap_ms.0, self.fault_gap_ms.1)
    }

    fn schedule(&mut self, after_ms: u64, event: Event) {
        let at = self.now_ms() + after_ms;
        self.events.insert((at, self.next_event), event);
        self.next_event += 1;
    }

    async fn due_events(&mut self) {
        let now = self.now_ms();
        while let Some(entry) = self.events.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let event = entry.remove();
            match event {
                Event::HealCut(f) => {
                    self.router.heal_cut(f);
                    self.trace.log(format!("HEAL #{f}"));
                }
                Event::HealEpisode(f) => {
                    self.router.heal_episode(f);
                    self.trace.log(format!("HEAL #{f}"));
                }
                Event::Restart(id) => self.restart(id).await,
                Event::HealDisk(id) => {
                    self.slots[&id].disk.heal();
                    self.trace.log(format!("HEAL disk n{id}"));
                }
            }
        }
    }

    async fn inject_fault(&mut self) {
        let rng = self.faults_rng.clone();
        let f = self.next_fault;
        self.next_fault += 1;
        self.stats.faults += 1;
        let ids = self.member_ids();
        let duration = rng.between(300, 4_000);
        match rng.weighted(&[14, 8, 10, 8, 8, 6, 18, 12, 10]) {
            0 => {
                // Symmetric partition into two sides.
                let mut side: Vec<NodeId> =
                    ids.iter().copied().filter(|_| rng.chance(0.5)).collect();
                if side.is_empty() || side.len() == ids.len() {
                    side = vec![*rng.pick(&ids)];
                }
                let other: Vec<NodeId> =
                    ids.iter().copied().filter(|i| !side.contains(i)).collect();
                let mut links = BTreeSet::new();
                for a in &side {
                    for b in &other {
                        links.insert((*a, *b));
                        links.insert((*b, *a));
                    }
                }
                self.router.cut(f, links);
                self.trace.log(format!(
                    "FAULT #{f} partition {side:?} | {other:?} for {duration}ms"
                ));
                self.schedule(duration, Event::HealCut(f));
            }
            1 => {
                // One-way: a node's messages to one peer (or to all) vanish; it still hears them.
                let a = *rng.pick(&ids);
                let targets: Vec<NodeId> = if rng.chance(0.5) {
                    ids.iter().copied().filter(|b| *b != a).collect()
                } else {
                    let others: Vec<NodeId> = ids.iter().copied().filter(|b| *b != a).collect();
                    vec![*rng.pick(&others)]
                };
                let links = targets.iter().map(|b| (a, *b)).collect();
                self.router.cut(f, links);
                self.trace.log(format!(
                    "FAULT #{f} one-way cut n{a} -> {targets:?} for {duration}ms"
                ));
                self.schedule(duration, Event::HealCut(f));
            }
            2 => {
                // The leader, isolated both ways.
                let Some(leader) = self.leader() else {
                    self.trace
                        .log(format!("FAULT #{f} leader isolation: no leader, skipped"));
                    return;
                };
                let mut links = BTreeSet::new();
                for b in ids.iter().filter(|b| **b != leader) {
                    links.insert((leader, *b));
                    links.insert((*b, leader));
                }
                self.router.cut(f, links);
                self.trace.log(format!(
                    "FAULT #{f} leader n{leader} isolated for {duration}ms"
                ));
                self.schedule(duration, Event::HealCut(f));
            }
            3 => {
                let loss = rng.between(5, 40) as f64 / 100.0;
                self.router.degrade(
                    f,
                    Episode {
                        loss,
                        duplicate: 0.0,
                        extra_delay_ms: (0, 0),
                    },
                );
                self.trace.log(format!(
                    "FAULT #{f} message loss {:.0}% for {duration}ms",
                    loss * 100.0
                ));
                self.schedule(duration, Event::HealEpisode(f));
            }
            4 => {
                let duplicate = rng.between(5, 30) as f64 / 100.0;
                let spread = rng.between(10, 80);
                self.router.degrade(
                    f,
                    Episode {
                        loss: 0.0,
                        duplicate,
                        extra_delay_ms: (0, spread),
                    },
                );
                self.trace.log(format!(
                    "FAULT #{f} duplication {:.0}% and reordering (+0..{spread}ms) for {duration}ms",
                    duplicate * 100.0
                ));
                self.schedule(duration, Event::HealEpisode(f));
            }
            5 => {
                let lo = rng.between(20, 100);
                let hi = lo + rng.between(0, 150);
                self.router.degrade(
                    f,
                    Episode {
                        loss: 0.0,
                        duplicate: 0.0,
                        extra_delay_ms: (lo, hi),
                    },
                );
                self.trace.log(format!(
                    "FAULT #{f} slow network +{lo}..{hi}ms for {duration}ms"
                ));
                self.schedule(duration, Event::HealEpisode(f));
            }
            6 => {
                // Crash a node (the leader half the time); restart it later.
                let live = self.live_ids();
                if live.is_empty() {
                    return;
                }
                let victim = match self.leader() {
                    Some(l) if rng.chance(0.5) => l,
                    _ => *rng.pick(&live),
                };
                self.crash(victim);
                let down = rng.between(100, 4_000);
                self.schedule(down, Event::Restart(victim));
            }
            7 => {
                let id = *rng.pick(&ids);
                let by = rng.between_i(50, 20_000) * if rng.chance(0.4) { -1 } else { 1 };
                let clock = &self.slots[&id].clock;
                clock.jump(by);
                self.trace.log(format!(
                    "FAULT #{f} clock n{id} jumps {by:+}ms (offset now {:+}ms)",
                    clock.offset_ms()
                ));
                self.stats.clock_jumps += 1;
            }
            _ => {
                let id = *rng.pick(&ids);
                let lo = rng.between(5, 50);
                let hi = lo + rng.between(0, 150);
                let until = Instant::now() + Duration::from_millis(duration);
                self.slots[&id].disk.slow_down(until, (lo, hi));
                self.trace.log(format!(
                    "FAULT #{f} slow disk n{id}: fsync +{lo}..{hi}ms for {duration}ms"
                ));
                self.schedule(duration, Event::HealDisk(id));
            }
        }
    }

    async fn heal_all(&mut self) {
        self.router.heal_all();
        let pending: Vec<Event> = std::mem::take(&mut self.events).into_values().collect();
        for event in pending {
            if let Event::Restart(id) = event {
                self.restart(id).await;
            }
        }
        let down: Vec<NodeId> = self
            .slots
            .values()
            .filter(|s| s.node.is_none() && !s.retired)
            .map(|s| s.id)
            .collect();
        for id in down {
            self.restart(id).await;
        }
        for slot in self.slots.values() {
            slot.disk.heal();
        }
        let unfinished = std::mem::take(&mut self.unfinished);
        if !unfinished.is_empty() && self.change.is_none() {
            self.trace
                .log(format!("MEMBERSHIP finishing {unfinished:?}"));
            self.spawn_change(unfinished);
        }
        self.changing_at_heal = self.change.is_some();
        self.trace.log(format!(
            "HEAL ALL: partitions and network faults cleared, nodes restarted, disks normal{}",
            if self.changing_at_heal {
                " (a membership change is under way)"
            } else {
                ""
            }
        ));
    }

    // ----- membership -----

    /// Every node that has not been removed (live or down).
    fn member_ids(&self) -> Vec<NodeId> {
        self.slots
            .values()
            .filter(|s| !s.retired)
            .map(|s| s.id)
            .collect()
    }

    /// Starts replacing a voter: a new node joins as a learner, is promoted, and the voter
    /// is removed (see [`crate::membership`]).
    async fn start_change(&mut self) {
        let rng = self.member_rng.clone();
        let Some(leader) = self.leader().and_then(|l| self.router.node(l)) else {
            self.trace.log("MEMBERSHIP change: no leader, skipped");
            return;
        };
        let voters: Vec<NodeId> = {
            let m = leader.raft().metrics();
            let m = m.borrow();
            m.membership_config
                .membership()
                .voter_ids()
                .filter(|v| !self.removing.contains(v))
                .collect()
        };
        if voters.len() < 3 {
            return;
        }
        let victim = *rng.pick(&voters);
        let id = self.next_id;
        self.next_id += 1;
        let used: BTreeSet<u64> = self
            .slots
            .values()
            .filter(|s| !s.retired)
            .map(|s| s.config.timings.election_min_ms)
            .collect();
        let timeout = loop {
            let t = draw_timeout(&rng);
            if well_apart(t, &used) {
                break t;
            }
        };
        let (slot, line) = self.recipe.slot(id, timeout, &rng, rng.fork());
        self.trace.log(line);
        self.slots.insert(id, slot);
        self.start(id).await;
        self.trace.log(format!(
            "MEMBERSHIP change: add n{id}, promote it, remove n{victim}"
        ));
        self.removing.insert(victim);
        self.spawn_change(vec![
            Step::AddLearner(id),
            Step::Promote(id),
            Step::Remove(victim),
        ]);
    }

    fn spawn_change(&mut self, steps: Vec<Step>) {
        self.change = Some(steps.clone());
        let deadline = Instant::now() + crate::membership::CHANGE_WITHIN;
        tokio::spawn(crate::membership::run(
            self.router.clone(),
            self.notes.clone(),
            steps,
            deadline,
        ));
    }

    /// What the operator's change saw: traced; a removed member is stopped for good.
    fn membership_notes(&mut self) {
        let notes = std::mem::take(&mut *self.notes.lock());
        for note in notes {
            match note {
                Note::Done { step, by } => {
                    self.trace
                        .log(format!("MEMBERSHIP {step}: done (leader n{by})"));
                    if let Some(steps) = self.change.as_mut() {
                        steps.retain(|s| *s != step);
                        if steps.is_empty() {
                            self.change = None;
                            self.stats.membership_changes += 1;
                        }
                    }
                    if let Step::Remove(victim) = step {
                        self.take_down(victim, "REMOVED");
                        self.slots.get_mut(&victim).expect("slot").retired = true;
                    }
                }
                Note::Failed { step, by, error } => {
                    self.trace
                        .log(format!("MEMBERSHIP {step}: refused by n{by}: {error}"));
                }
                Note::GaveUp(step) => {
                    self.trace
                        .log(format!("MEMBERSHIP {step}: gave up for now"));
                    self.unfinished = self.change.take().unwrap_or_default();
                }
            }
        }
    }

    // ----- liveness -----

    async fn liveness(&mut self) -> Liveness {
        let healed_at_ms = self.now_ms();
        let mut l = Liveness {
            healed_at_ms,
            leader_at_ms: None,
            request_ok_at_ms: None,
        };
        let (leader_within, request_within) = self.bounds();
        let give_up = healed_at_ms + leader_within.max(request_within) + 5_000;
        let mut probe: Option<tokio::sync::oneshot::Receiver<CallResult>> = None;
        let mut next_sample_at = 0;
        while self.now_ms() < give_up {
            self.observe().await;
            if self.now_ms() >= next_sample_at {
                self.sample().await;
                next_sample_at = self.now_ms() + SAMPLE_EVERY_MS;
            }
            if l.leader_at_ms.is_none() && self.agreed_leader().is_some() {
                l.leader_at_ms = Some(self.now_ms());
                self.trace.log(format!(
                    "liveness: leader n{} agreed {}ms after healing",
                    self.agreed_leader().expect("agreed"),
                    self.now_ms() - healed_at_ms
                ));
            }
            if l.request_ok_at_ms.is_none() {
                match probe.as_mut().map(|rx| rx.try_recv()) {
                    Some(Ok(CallResult::Acked(_))) => {
                        l.request_ok_at_ms = Some(self.now_ms());
                        self.trace.log(format!(
                            "liveness: request acknowledged {}ms after healing",
                            self.now_ms() - healed_at_ms
                        ));
                    }
                    Some(Err(tokio::sync::oneshot::error::TryRecvError::Empty)) => {}
                    _ => {
                        let cmd = self.plan.request(&self.work_rng);
                        let to = self.random_node(&self.work_rng.clone());
                        probe = Some(self.spawn_call(Command::RateLimit(cmd), to));
                    }
                }
            }
            if l.leader_at_ms.is_some() && l.request_ok_at_ms.is_some() {
                break;
            }
            tokio::time::sleep(TICK).await;
        }
        l
    }

    /// The liveness bounds (leader, request) for this run's healing.
    fn bounds(&self) -> (u64, u64) {
        if self.changing_at_heal {
            (CHANGING_LEADER_WITHIN_MS, CHANGING_REQUEST_WITHIN_MS)
        } else {
            (LEADER_WITHIN_MS, REQUEST_WITHIN_MS)
        }
    }

    /// The leader every live node agrees on, if they do and it says so itself. A node the
    /// leader knows as retired (its removal under way) is not asked: nobody talks to it.
    fn agreed_leader(&self) -> Option<NodeId> {
        let live = self.router.live();
        let leader = self.leader()?;
        let leader_node = self.router.node(leader)?;
        live.iter()
            .filter(|(id, _)| !leader_node.knows_retired(*id))
            .all(|(_, n)| n.raft().metrics().borrow().current_leader == Some(leader))
            .then_some(leader)
    }

    fn record_liveness(&mut self, l: Liveness) {
        self.liveness_seen = Some(l);
    }
}

fn describe_command(c: &Command) -> String {
    match c {
        Command::RateLimit(rl) => describe(rl),
        Command::ReplaceLimits(set) => format!("ReplaceLimits({} limits)", set.limits.len()),
        other => describe_usage(other).unwrap_or_else(|| format!("{other:?}")),
    }
}

/// A node's usage archive from seq 0 to its end, page by page; a range it does not hold is
/// noted and skipped.
fn read_archive(node: &Node) -> ArchiveRead {
    use tally_server::node::usage_archive::{ArchiveError, MAX_READ_RECORDS};
    let mut read = ArchiveRead::default();
    let mut after = 0;
    loop {
        match node.usage_records(after, MAX_READ_RECORDS) {
            Ok(page) => match page.last() {
                None => return read,
                Some(last) => {
                    if last.seq <= after {
                        read.error = Some(format!(
                            "a read after seq {after} returned seq {} last",
                            last.seq
                        ));
                        return read;
                    }
                    after = last.seq;
                    read.records.extend(page);
                }
            },
            Err(ArchiveError::NotHeld { from, to }) if to >= from && to > after => {
                read.not_held.push((from, to));
                after = to;
            }
            Err(e) => {
                read.error = Some(e.to_string());
                return read;
            }
        }
    }
}

fn describe_result(r: &CallResult) -> String {
    match r {
        CallResult::Acked(Outcome::RateLimit(d)) => {
            let code = match d.code {
                Code::Ok => "OK",
                Code::OverLimit => "OVER_LIMIT",
            };
            let remaining: Vec<String> = d
                .statuses
                .iter()
                .filter(|s| s.current_limit.is_some())
                .map(|s| s.remaining.to_string())
                .collect();
            format!(
                "{code} remaining [{}]{}",
                remaining.join(","),
                if d.fast { " fast" } else { "" }
            )
        }
        CallResult::Acked(Outcome::LimitsReplaced {
            limits,
            kept,
            generation,
        }) => {
            format!("limits generation {generation} ({limits} limits, {kept} kept)")
        }
        CallResult::Acked(Outcome::Usage(r)) => describe_receipt(r),
        CallResult::Acked(Outcome::QuotasReplaced { quotas, kept }) => {
            format!("quotas replaced ({quotas} quotas, {kept} kept)")
        }
        CallResult::Acked(Outcome::Rejected(e)) => format!("REJECTED ({e})"),
        CallResult::Acked(other) => format!("{other:?}"),
        CallResult::Unknown(why) => format!("UNKNOWN ({why})"),
    }
}
