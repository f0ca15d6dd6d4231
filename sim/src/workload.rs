//! The workload, drawn from the seed: limits (with `ReplaceLimits` changes mid-run) and
//! ShouldRateLimit-equivalent requests over many keys.
//!
//! Two limits never change, so the oracle can hold them to their promise exactly:
//! - `strict-rpw`: a fixed window on descriptor entry `skey`, acknowledged `strict`;
//! - `fast-rpw`: a fixed window on `fkey`, acknowledged `fast`.
//!
//! The others are redrawn at every limit change: a rolling window and a first-hit window on
//! `skey` (sometimes shadow), a token bucket on `fkey` (usually fast, sometimes strict — which
//! makes `fkey` decisions strict for a while), and a token quota on `tkey` debited by reports.
//!
//! Every request carries one extra descriptor `[("rid", <call id>)]` that matches no limit:
//! it lets the oracle find the request in the log.
//!
//! Metering ([`MeterPlan`], [`MeterClient`]) has its own seeded stream, so the requests above
//! are drawn exactly as without it: a hard `TotalTokens` quota per subject (installed with the
//! limits), usage reports, and reservations that are committed (sometimes above their
//! estimate), released, or left to expire; retried by clients that timed out, that retry
//! anyway, or that send an earlier report again, to the same node or another.

use tally_server::engine::limits::{
    Ack, Capacity, DescriptorKey, EntryCondition, LimitSet, LimitSpec, Scope, WindowSpec,
};
use tally_server::engine::usage::{
    Attribution, Commit, Enforcement, Metric, QuotaFilter, QuotaSet, QuotaSpec, ReportUsage,
    Reserve, Tokens, UsageResult,
};
use tally_server::engine::{Command, Descriptor, Mode, Outcome, RateLimitCommand};
use tally_server::node::raft_types::NodeId;

use crate::history::CallResult;
use crate::rng::SimRng;

pub const DOMAIN: &str = "sim";
pub const STRICT_KEY: &str = "skey";
pub const FAST_KEY: &str = "fkey";
pub const TOKEN_KEY: &str = "tkey";
pub const RID_KEY: &str = "rid";

/// The two limits the capacity invariants check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckedLimit {
    /// The descriptor entry key whose value keys the counter.
    pub entry_key: &'static str,
    pub capacity: u64,
    pub window_ms: u64,
    pub ack: Ack,
}

/// What this seed's workload looks like.
#[derive(Clone, Debug)]
pub struct WorkloadPlan {
    pub strict: CheckedLimit,
    pub fast: CheckedLimit,
    pub strict_keys: u32,
    pub fast_keys: u32,
    pub token_keys: u32,
    /// Requests per second, on average.
    pub rate_per_s: u64,
    /// Client deadline range, ms.
    pub deadline_ms: (u64, u64),
}

impl WorkloadPlan {
    pub fn draw(rng: &SimRng) -> WorkloadPlan {
        WorkloadPlan {
            strict: CheckedLimit {
                entry_key: STRICT_KEY,
                capacity: rng.between(2, 10),
                window_ms: *rng.pick(&[1_000, 2_000]),
                ack: Ack::Strict,
            },
            fast: CheckedLimit {
                entry_key: FAST_KEY,
                capacity: rng.between(2, 10),
                window_ms: 1_000,
                ack: Ack::Fast,
            },
            strict_keys: rng.between(3, 40) as u32,
            fast_keys: rng.between(2, 20) as u32,
            token_keys: rng.between(1, 5) as u32,
            rate_per_s: rng.between(30, 150),
            deadline_ms: (rng.between(300, 800), rng.between(1_000, 3_000)),
        }
    }

    /// A limit set: the two checked limits first, unchanged, then the variable ones.
    pub fn limits(&self, rng: &SimRng) -> LimitSet {
        let mut limits = vec![
            checked_spec("strict-rpw", self.strict),
            checked_spec("fast-rpw", self.fast),
        ];
        if rng.chance(0.8) {
            limits.push(spec(
                "strict-rolling",
                STRICT_KEY,
                Capacity::Max(rng.between(5, 60)),
                WindowSpec::Rolling {
                    window_ms: 5_000,
                    resolution_ms: 500,
                },
                Ack::Strict,
                rng.chance(0.2),
            ));
        }
        if rng.chance(0.5) {
            limits.push(spec(
                "strict-first-hit",
                STRICT_KEY,
                Capacity::Max(rng.between(20, 200)),
                WindowSpec::FromFirstHit {
                    duration_ms: 10_000,
                },
                Ack::Strict,
                false,
            ));
        }
        if rng.chance(0.8) {
            limits.push(spec(
                "fast-bucket",
                FAST_KEY,
                Capacity::Max(rng.between(3, 30)),
                WindowSpec::TokenBucket {
                    refill_amount: rng.between(1, 10),
                    refill_every_ms: 1_000,
                },
                if rng.chance(0.8) {
                    Ack::Fast
                } else {
                    Ack::Strict
                },
                false,
            ));
        }
        limits.push(spec(
            "tokens",
            TOKEN_KEY,
            Capacity::Max(rng.between(1_000, 20_000)),
            WindowSpec::Fixed {
                duration_ms: 10_000,
            },
            Ack::Strict,
            false,
        ));
        LimitSet { limits }
    }

    /// One request (without its `rid` descriptor).
    pub fn request(&self, rng: &SimRng) -> RateLimitCommand {
        let key = |prefix: &str, n: u32| {
            // A few hot keys take half the traffic.
            let i = if rng.chance(0.5) {
                rng.between(0, u64::from(n.min(3)) - 1)
            } else {
                rng.between(0, u64::from(n) - 1)
            };
            format!("{prefix}{i}")
        };
        let descriptor = |k: &str, v: String, hits: Option<u64>| Descriptor {
            entries: vec![(k.to_owned(), v)],
            hits,
            limit_override: None,
        };
        let mut mode = Mode::Enforce;
        let mut hits = 1;
        let descriptors = match rng.weighted(&[45, 10, 5, 5, 20, 5, 5, 5]) {
            // ShouldRateLimit on one strict key, request-level hits.
            0 => vec![descriptor(STRICT_KEY, key("s", self.strict_keys), None)],
            // Per-descriptor hits_addend.
            1 => vec![descriptor(
                STRICT_KEY,
                key("s", self.strict_keys),
                Some(rng.between(2, 3)),
            )],
            // A present per-descriptor 0: check only.
            2 => vec![descriptor(STRICT_KEY, key("s", self.strict_keys), Some(0))],
            // Kuadrant's CheckRateLimit.
            3 => {
                mode = Mode::CheckOnly;
                vec![descriptor(STRICT_KEY, key("s", self.strict_keys), None)]
            }
            // A fast decision.
            4 => vec![descriptor(FAST_KEY, key("f", self.fast_keys), None)],
            // Request-level hits > 1 on a fast key.
            5 => {
                hits = 2;
                vec![descriptor(FAST_KEY, key("f", self.fast_keys), None)]
            }
            // Strict and fast together: strict, debited atomically.
            6 => vec![
                descriptor(STRICT_KEY, key("s", self.strict_keys), None),
                descriptor(FAST_KEY, key("f", self.fast_keys), None),
            ],
            // A usage report (tokens used), debited unconditionally.
            _ => {
                mode = Mode::Report;
                vec![descriptor(
                    TOKEN_KEY,
                    key("t", self.token_keys),
                    Some(rng.between(10, 2_000)),
                )]
            }
        };
        RateLimitCommand {
            domain: DOMAIN.into(),
            descriptors,
            hits,
            mode,
        }
    }
}

fn spec(
    name: &str,
    entry_key: &str,
    capacity: Capacity,
    window: WindowSpec,
    ack: Ack,
    shadow: bool,
) -> LimitSpec {
    LimitSpec {
        domain: DOMAIN.into(),
        name: name.into(),
        scope: Scope::Descriptor {
            conditions: vec![EntryCondition::Present {
                key: entry_key.into(),
            }],
            key: DescriptorKey::Entries(vec![entry_key.into()]),
        },
        capacity,
        window,
        shadow,
        ack,
        replaces: Vec::new(),
    }
}

/// Tags a request with its call id.
pub fn with_rid(mut cmd: RateLimitCommand, rid: u64) -> RateLimitCommand {
    cmd.descriptors.push(Descriptor {
        entries: vec![(RID_KEY.into(), rid.to_string())],
        hits: None,
        limit_override: None,
    });
    cmd
}

/// The call id a request was tagged with.
pub fn rid_of(cmd: &RateLimitCommand) -> Option<u64> {
    cmd.descriptors
        .iter()
        .find(|d| d.entries.first().is_some_and(|(k, _)| k == RID_KEY))
        .and_then(|d| d.entries[0].1.parse().ok())
}

/// The call id of a tagged rate-limit command.
pub fn rid_of_command(c: &tally_server::engine::Command) -> Option<u64> {
    match c {
        tally_server::engine::Command::RateLimit(rl) => rid_of(rl),
        _ => None,
    }
}

/// Hits the request charges to the counter of `entry_key = value`, per value: the sum over its
/// descriptors carrying that key (per-descriptor hits, else the request's).
pub fn hits_by_value(cmd: &RateLimitCommand, entry_key: &str) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for d in &cmd.descriptors {
        if d.limit_override.is_some() {
            continue;
        }
        let Some((_, v)) = d.entries.iter().find(|(k, _)| k == entry_key) else {
            continue;
        };
        let h = d.hits.unwrap_or(cmd.hits);
        match out.iter_mut().find(|(x, _)| x == v) {
            Some((_, total)) => *total += h,
            None => out.push((v.clone(), h)),
        }
    }
    out
}

/// A short description of a request for the trace.
pub fn describe(cmd: &RateLimitCommand) -> String {
    let mut parts = Vec::new();
    for d in &cmd.descriptors {
        let Some((k, v)) = d.entries.first() else {
            continue;
        };
        if k == RID_KEY {
            continue;
        }
        match d.hits {
            Some(h) => parts.push(format!("{k}={v}×{h}")),
            None => parts.push(format!("{k}={v}")),
        }
    }
    let mode = match cmd.mode {
        Mode::Enforce => "",
        Mode::CheckOnly => " check",
        Mode::Report => " report",
    };
    let hits = if cmd.hits == 1 {
        String::new()
    } else {
        format!(" hits={}", cmd.hits)
    };
    format!("{}{hits}{mode}", parts.join(","))
}

/// The limit spec of a checked limit (its identity — domain, scope, window — is what keeps
/// its counters across limit changes).
pub fn checked_spec(name: &str, l: CheckedLimit) -> LimitSpec {
    spec(
        name,
        l.entry_key,
        Capacity::Max(l.capacity),
        WindowSpec::Fixed {
            duration_ms: l.window_ms,
        },
        l.ack,
        false,
    )
}

// ----- metering -----

/// Metering subjects are `k0`, `k1`, ...; subject `kN`'s hard quota is named `budget-kN`.
pub const SUBJECT_PREFIX: &str = "k";
pub const QUOTA_PREFIX: &str = "budget-";
/// Sends of one command (its first attempt and the retries) at most.
const MAX_ATTEMPTS: u32 = 4;
/// Sends of one flow (all its commands, retries and hedged copies) at most.
const MAX_SENDS_PER_FLOW: u32 = 10;
/// Earlier reports kept for sending again.
const MAX_REMEMBERED_REPORTS: usize = 2_000;

/// This seed's metering: subjects, their hard token budgets, traffic.
#[derive(Clone, Debug)]
pub struct MeterPlan {
    /// Each subject and the limit of its hard `TotalTokens` quota per window.
    pub subjects: Vec<(String, u64)>,
    /// The quotas' fixed window (epoch-aligned).
    pub window_ms: u64,
    /// New metering flows (a report, or a reservation and what follows it) per second.
    pub rate_per_s: u64,
    /// Chance that a call answered in time is sent again anyway (the answer "got lost").
    pub retry_anyway: f64,
    /// Chance that a new report re-sends an earlier one (same id, same tokens).
    pub resend_earlier: f64,
}

impl MeterPlan {
    pub fn draw(rng: &SimRng) -> MeterPlan {
        let n = rng.between(2, 5);
        let window_ms = *rng.pick(&[2_000, 3_000, 5_000]);
        let subjects = (0..n)
            .map(|i| (format!("{SUBJECT_PREFIX}{i}"), rng.between(1_500, 12_000)))
            .collect();
        MeterPlan {
            subjects,
            window_ms,
            rate_per_s: rng.between(4, 20),
            retry_anyway: rng.between(3, 15) as f64 / 100.0,
            resend_earlier: rng.between(5, 20) as f64 / 100.0,
        }
    }

    /// One hard quota per subject: its own budget of total tokens per fixed window.
    pub fn quotas(&self) -> QuotaSet {
        QuotaSet {
            quotas: self
                .subjects
                .iter()
                .map(|(subject, limit)| QuotaSpec {
                    name: format!("{QUOTA_PREFIX}{subject}"),
                    filter: QuotaFilter {
                        subject: Some(subject.clone()),
                        ..QuotaFilter::default()
                    },
                    per: Vec::new(),
                    metric: Metric::TotalTokens,
                    limit: *limit,
                    window: Some(WindowSpec::Fixed {
                        duration_ms: self.window_ms,
                    }),
                    enforcement: Enforcement::Hard,
                    thresholds_pct: vec![50, 90],
                })
                .collect(),
        }
    }

    pub fn describe(&self) -> String {
        let budgets: Vec<String> = self
            .subjects
            .iter()
            .map(|(s, l)| format!("{s}≤{l}"))
            .collect();
        format!(
            "metering: {} flows/s, hard token budgets per {}ms [{}], retry anyway {:.0}%, earlier ids resent {:.0}%",
            self.rate_per_s,
            self.window_ms,
            budgets.join(" "),
            self.retry_anyway * 100.0,
            self.resend_earlier * 100.0
        )
    }
}

/// Which command of a flow a send is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Report,
    Reserve,
    /// The reservation's commit or release.
    Settle,
}

/// What a send was, handed back with its result.
#[derive(Clone, Copy, Debug)]
pub struct Ticket {
    pub flow: u64,
    pub step: Step,
    /// 1 for the first send of this command.
    pub attempt: u32,
}

/// One call the driver should make now.
pub struct MeterSend {
    pub command: Command,
    pub ticket: Ticket,
    /// Send it to a node other than this one if there is one (a retry elsewhere).
    pub avoid: Option<NodeId>,
}

/// What a reservation's client does once it holds (or thinks it holds) the reservation.
#[derive(Clone, Copy, Debug)]
enum Then {
    Commit(Tokens),
    Release,
    /// Nothing: the reservation expires by its TTL.
    Nothing,
}

enum FlowKind {
    Report {
        tokens: Tokens,
    },
    Reservation {
        estimate: Tokens,
        ttl_ms: u64,
        /// Unsettled at its TTL, the estimate is recorded as the usage.
        charge_on_expiry: bool,
        then: Then,
        /// How long after the reservation's answer the client settles it (sometimes past
        /// its TTL: the commit then records a lapsed reservation).
        after_ms: u64,
    },
}

struct Flow {
    request_id: String,
    who: Attribution,
    kind: FlowKind,
    /// The settle step was scheduled (once per flow).
    settling: bool,
    sends: u32,
}

struct Due {
    flow: u64,
    step: Step,
    attempt: u32,
    avoid: Option<NodeId>,
}

/// The metering clients: flows of usage commands, their follow-ups and retries. The driver
/// calls [`MeterClient::tick`] every tick for the sends due and hands every result back
/// ([`MeterClient::result`]). All draws come from the client's own stream.
pub struct MeterClient {
    pub plan: MeterPlan,
    rng: SimRng,
    flows: std::collections::BTreeMap<u64, Flow>,
    next_flow: u64,
    due: std::collections::BTreeMap<(u64, u64), Due>,
    next_due: u64,
    /// Earlier reports (flow ids), to send again.
    reports: Vec<u64>,
    /// Commands sent, by kind: reports, reserves, commits, releases; and how many were
    /// retries (a second or later send of one command).
    pub sent: [u64; 4],
    pub retries: u64,
}

fn tokens(input: u64, output: u64, rng: &SimRng) -> Tokens {
    let cached_input = if rng.chance(0.3) {
        rng.between(0, input)
    } else {
        0
    };
    let reasoning = if rng.chance(0.2) {
        rng.between(0, output)
    } else {
        0
    };
    Tokens {
        input,
        output,
        cached_input,
        reasoning,
    }
}

impl MeterClient {
    pub fn new(plan: MeterPlan, rng: SimRng) -> MeterClient {
        MeterClient {
            plan,
            rng,
            flows: Default::default(),
            next_flow: 1,
            due: Default::default(),
            next_due: 0,
            reports: Vec::new(),
            sent: [0; 4],
            retries: 0,
        }
    }

    /// Schedules a send; false when the flow has used up its sends.
    fn schedule(
        &mut self,
        at_ms: u64,
        flow: u64,
        step: Step,
        attempt: u32,
        avoid: Option<NodeId>,
    ) -> bool {
        let f = self.flows.get_mut(&flow).expect("a known flow");
        if f.sends >= MAX_SENDS_PER_FLOW {
            return false;
        }
        f.sends += 1;
        self.due.insert(
            (at_ms, self.next_due),
            Due {
                flow,
                step,
                attempt,
                avoid,
            },
        );
        self.next_due += 1;
        true
    }

    fn subject(&self) -> Attribution {
        let n = self.plan.subjects.len();
        let i = if self.rng.chance(0.5) {
            0
        } else {
            self.rng.index(n)
        };
        Attribution {
            subject: self.plan.subjects[i].0.clone(),
            subscription: String::new(),
            model: (*self.rng.pick(&["", "m-small", "m-large"])).to_owned(),
            tags: Vec::new(),
        }
    }

    /// A new flow, its first send scheduled at `now_ms` (twice, to two nodes, now and then).
    fn new_flow(&mut self, now_ms: u64) {
        let rng = self.rng.clone();
        let id = self.next_flow;
        self.next_flow += 1;
        let mut fresh_report = false;
        let (request_id, who, kind, step) = if rng.chance(0.5) {
            if !self.reports.is_empty() && rng.chance(self.plan.resend_earlier) {
                // An earlier report sent again: same id, same attribution, same tokens.
                let earlier = &self.flows[rng.pick(&self.reports)];
                let FlowKind::Report { tokens } = earlier.kind else {
                    unreachable!("reports holds report flows")
                };
                (
                    earlier.request_id.clone(),
                    earlier.who.clone(),
                    FlowKind::Report { tokens },
                    Step::Report,
                )
            } else {
                fresh_report = true;
                let t = tokens(rng.between(1, 700), rng.between(0, 700), &rng);
                (
                    format!("u{id}"),
                    self.subject(),
                    FlowKind::Report { tokens: t },
                    Step::Report,
                )
            }
        } else {
            let estimate = tokens(rng.between(50, 700), rng.between(50, 700), &rng);
            let ttl_ms = rng.between(300, 4_000);
            let then = match rng.weighted(&[45, 25, 10, 20]) {
                // Used less than estimated.
                0 => {
                    let f = rng.between(0, 100);
                    Then::Commit(tokens(
                        estimate.input * f / 100,
                        estimate.output * f / 100,
                        &rng,
                    ))
                }
                // More than estimated: the overshoot is recorded anyway.
                1 => Then::Commit(tokens(
                    estimate.input + rng.between(0, estimate.input),
                    estimate.output + rng.between(1, 2 * estimate.output),
                    &rng,
                )),
                2 => Then::Release,
                _ => Then::Nothing,
            };
            let after_ms = if rng.chance(0.15) {
                ttl_ms + rng.between(0, 2_000)
            } else {
                rng.between(10, ttl_ms)
            };
            (
                format!("r{id}"),
                self.subject(),
                FlowKind::Reservation {
                    estimate,
                    ttl_ms,
                    charge_on_expiry: rng.chance(0.3),
                    then,
                    after_ms,
                },
                Step::Reserve,
            )
        };
        self.flows.insert(
            id,
            Flow {
                request_id,
                who,
                kind,
                settling: false,
                sends: 0,
            },
        );
        if fresh_report && self.reports.len() < MAX_REMEMBERED_REPORTS {
            self.reports.push(id);
        }
        self.schedule(now_ms, id, step, 1, None);
        if rng.chance(0.04) {
            // A hedged request: the same command to a second node at once.
            self.schedule(now_ms, id, step, 2, None);
        }
    }

    /// The sends due at `now_ms`, after starting this tick's new flows (`tick_ms` of traffic)
    /// when `new_flows`.
    pub fn tick(&mut self, now_ms: u64, tick_ms: u64, new_flows: bool) -> Vec<MeterSend> {
        if new_flows {
            let per_tick_milli = self.plan.rate_per_s * tick_ms;
            let mut n = per_tick_milli / 1000;
            if self.rng.between(0, 999) < per_tick_milli % 1000 {
                n += 1;
            }
            for _ in 0..n {
                self.new_flow(now_ms);
            }
        }
        let mut out = Vec::new();
        while let Some(entry) = self.due.first_entry() {
            if entry.key().0 > now_ms {
                break;
            }
            let due = entry.remove();
            let flow = &self.flows[&due.flow];
            let command = match (due.step, &flow.kind) {
                (Step::Report, FlowKind::Report { tokens }) => Command::ReportUsage(ReportUsage {
                    request_id: flow.request_id.clone(),
                    who: flow.who.clone(),
                    tokens: *tokens,
                }),
                (
                    Step::Reserve,
                    FlowKind::Reservation {
                        estimate,
                        ttl_ms,
                        charge_on_expiry,
                        ..
                    },
                ) => Command::Reserve(Reserve {
                    request_id: flow.request_id.clone(),
                    who: flow.who.clone(),
                    estimate: *estimate,
                    ttl_ms: *ttl_ms,
                    charge_on_expiry: *charge_on_expiry,
                }),
                (
                    Step::Settle,
                    FlowKind::Reservation {
                        then: Then::Commit(t),
                        ..
                    },
                ) => Command::Commit(Commit {
                    request_id: flow.request_id.clone(),
                    tokens: *t,
                }),
                (
                    Step::Settle,
                    FlowKind::Reservation {
                        then: Then::Release,
                        ..
                    },
                ) => Command::Release {
                    request_id: flow.request_id.clone(),
                },
                _ => unreachable!("only reservations that settle schedule a settle step"),
            };
            self.sent[match &command {
                Command::ReportUsage(_) => 0,
                Command::Reserve(_) => 1,
                Command::Commit(_) => 2,
                _ => 3,
            }] += 1;
            if due.attempt > 1 {
                self.retries += 1;
            }
            out.push(MeterSend {
                command,
                ticket: Ticket {
                    flow: due.flow,
                    step: due.step,
                    attempt: due.attempt,
                },
                avoid: due.avoid,
            });
        }
        out
    }

    /// A send's result, seen by its client at `now_ms` from node `node`: retries and
    /// follow-ups are scheduled.
    pub fn result(&mut self, ticket: Ticket, node: NodeId, result: &CallResult, now_ms: u64) {
        let rng = self.rng.clone();
        let unknown = matches!(result, CallResult::Unknown(_));
        let mut retrying = false;
        if ticket.attempt < MAX_ATTEMPTS {
            let again = if unknown {
                rng.chance(0.85)
            } else {
                rng.chance(self.plan.retry_anyway)
            };
            if again {
                let delay = if unknown {
                    rng.between(20, 1_500)
                } else {
                    rng.between(0, 3_000)
                };
                let avoid = rng.chance(0.6).then_some(node);
                let scheduled = self.schedule(
                    now_ms + delay,
                    ticket.flow,
                    ticket.step,
                    ticket.attempt + 1,
                    avoid,
                );
                retrying = unknown && scheduled;
            }
        }
        if ticket.step != Step::Reserve {
            return;
        }
        let flow = &self.flows[&ticket.flow];
        let FlowKind::Reservation { then, after_ms, .. } = flow.kind else {
            unreachable!("a reserve step belongs to a reservation")
        };
        if flow.settling || matches!(then, Then::Nothing) {
            return;
        }
        let go = match result {
            CallResult::Acked(Outcome::Usage(r)) => match r.result {
                UsageResult::Reserved { .. } => true,
                // Denied, yet the client ran the request: its usage is the truth.
                UsageResult::Denied { .. } => matches!(then, Then::Commit(_)) && rng.chance(0.25),
                _ => false,
            },
            CallResult::Acked(_) => false,
            // Given up without knowing: half the clients go ahead anyway.
            CallResult::Unknown(_) => !retrying && rng.chance(0.5),
        };
        if go {
            self.flows
                .get_mut(&ticket.flow)
                .expect("a known flow")
                .settling = true;
            let _ = self.schedule(now_ms + after_ms, ticket.flow, Step::Settle, 1, None);
        }
    }
}

/// A short description of a metering command for the trace.
pub fn describe_usage(c: &Command) -> Option<String> {
    Some(match c {
        Command::ReportUsage(r) => format!(
            "report {} {} {}+{} tokens",
            r.request_id, r.who.subject, r.tokens.input, r.tokens.output
        ),
        Command::Reserve(r) => format!(
            "reserve {} {} est {} ttl {}ms{}",
            r.request_id,
            r.who.subject,
            r.estimate.total(),
            r.ttl_ms,
            if r.charge_on_expiry {
                " (charge on expiry)"
            } else {
                ""
            }
        ),
        Command::Commit(c) => format!("commit {} {} tokens", c.request_id, c.tokens.total()),
        Command::Release { request_id } => format!("release {request_id}"),
        Command::ReplaceQuotas(set) => format!("ReplaceQuotas({} quotas)", set.quotas.len()),
        _ => return None,
    })
}

/// A short description of a usage receipt for the trace.
pub fn describe_receipt(r: &tally_server::engine::usage::Receipt) -> String {
    let dup = if r.duplicate { " (duplicate)" } else { "" };
    match &r.result {
        UsageResult::Recorded {
            seq,
            settled,
            overshoot,
            over,
            ..
        } => format!(
            "RECORDED seq {seq} {settled:?}{}{}{dup}",
            if overshoot.tokens > 0 {
                format!(" overshoot {}", overshoot.tokens)
            } else {
                String::new()
            },
            if over.is_empty() { "" } else { " over budget" }
        ),
        UsageResult::Reserved { standings, .. } => format!(
            "RESERVED{}{dup}",
            standings
                .first()
                .map(|s| format!(" used {} held {} of {}", s.used, s.reserved, s.limit))
                .unwrap_or_default()
        ),
        UsageResult::Denied { standing } => format!(
            "DENIED used {} held {} of {}{dup}",
            standing.used, standing.reserved, standing.limit
        ),
        UsageResult::Released { found } => {
            format!("RELEASED{}{dup}", if *found { "" } else { " (none open)" })
        }
    }
}
