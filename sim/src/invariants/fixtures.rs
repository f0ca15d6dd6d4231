//! Hand-made histories for the checkers' tests: a model leader that appends batches (committed
//! or not), clients that saw outcomes (the true ones, or tampered ones that break a promise).

use tally_server::engine::limits::{Ack, LimitSet};
use tally_server::engine::{
    Code, Command, Descriptor, Engine, EngineSettings, Mode, Outcome, RateLimitCommand,
};
use tally_server::node::raft_types::Batch;

use crate::audit::Created;
use crate::history::*;
use crate::replay::Replay;
use crate::workload::{CheckedLimit, DOMAIN, FAST_KEY, STRICT_KEY, checked_spec, with_rid};

pub struct Hist {
    pub calls: Vec<Call>,
    pub created: Vec<Created>,
    pub committed: Vec<Created>,
    pub conflicts: Vec<String>,
    pub committed_upto: Option<u64>,
    pub next_index: u64,
    pub term: u64,
    pub next_id: u64,
    pub engine: Engine,
    pub bounds: Bounds,
    pub samples: Vec<Sample>,
    pub leaders: Vec<LeaderSeen>,
    pub finals: Vec<FinalState>,
    pub liveness: Option<Liveness>,
    pub stopped: Vec<RaftStopped>,
}

pub fn bounds() -> Bounds {
    Bounds {
        strict: CheckedLimit {
            entry_key: STRICT_KEY,
            capacity: 3,
            window_ms: 1_000,
            ack: Ack::Strict,
        },
        fast: CheckedLimit {
            entry_key: FAST_KEY,
            capacity: 3,
            window_ms: 1_000,
            ack: Ack::Fast,
        },
        max_batch_commands: 2,
        max_inflight_batches: 2,
        leader_within_ms: 5_000,
        request_within_ms: 10_000,
        max_counters: 10_000,
    }
}

pub fn rl(key: &str, value: &str, hits: Option<u64>) -> RateLimitCommand {
    RateLimitCommand {
        domain: DOMAIN.into(),
        descriptors: vec![Descriptor {
            entries: vec![(key.into(), value.into())],
            hits,
            limit_override: None,
        }],
        hits: 1,
        mode: Mode::Enforce,
    }
}

impl Hist {
    pub fn new() -> Hist {
        let bounds = bounds();
        let mut h = Hist {
            calls: Vec::new(),
            created: Vec::new(),
            committed: Vec::new(),
            conflicts: Vec::new(),
            committed_upto: None,
            next_index: 1,
            term: 1,
            next_id: 1,
            engine: Engine::new(EngineSettings {
                max_counters: bounds.max_counters,
                ..EngineSettings::default()
            }),
            bounds,
            samples: Vec::new(),
            leaders: vec![LeaderSeen {
                at_ms: 0,
                node: 1,
                term: 1,
                epoch: 0,
            }],
            finals: Vec::new(),
            liveness: Some(Liveness {
                healed_at_ms: 1_000,
                leader_at_ms: Some(1_500),
                request_ok_at_ms: Some(1_600),
            }),
            stopped: Vec::new(),
        };
        let limits = LimitSet {
            limits: vec![
                checked_spec("strict-rpw", bounds.strict),
                checked_spec("fast-rpw", bounds.fast),
            ],
        };
        h.append(10_000, vec![Command::ReplaceLimits(limits)], true);
        h
    }

    /// Appends a batch at the next index of the current term; applies it if committed.
    /// Returns the outcomes (speculative ones, on a copy, if not committed).
    pub fn append(
        &mut self,
        stamp_ms: i64,
        commands: Vec<Command>,
        committed: bool,
    ) -> Vec<Outcome> {
        let index = self.next_index;
        self.next_index += 1;
        let entry = Created {
            index,
            term: self.term,
            leader: 1,
            epoch: 0,
            batch: Some(Batch::new(stamp_ms, commands.clone())),
        };
        self.created.push(entry.clone());
        self.created.sort_by_key(|c| (c.index, c.term));
        if committed {
            self.committed.push(entry);
            self.committed_upto = Some(index);
            self.engine.apply(stamp_ms, &commands)
        } else {
            let mut copy = Engine::restore(&self.engine.snapshot()).unwrap();
            copy.apply(stamp_ms, &commands)
        }
    }

    /// A client call whose command goes into its own batch; the client saw the true outcome.
    pub fn request(&mut self, cmd: RateLimitCommand, stamp_ms: i64, committed: bool) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let command = Command::RateLimit(with_rid(cmd, id));
        let outcome = self
            .append(stamp_ms, vec![command.clone()], committed)
            .remove(0);
        self.calls.push(Call {
            id,
            node: 1,
            served_by: (1, 0),
            sent_ms: stamp_ms as u64,
            done_ms: stamp_ms as u64 + 5,
            command,
            result: CallResult::Acked(outcome),
        });
        id
    }

    /// A strict admission the client saw as OK (forced OK if the engine refused it).
    pub fn strict_admitted(&mut self, key: &str, hits: u64, stamp_ms: i64) -> u64 {
        let cmd = rl(STRICT_KEY, key, (hits != 1).then_some(hits));
        let id = self.request(cmd, stamp_ms, true);
        self.force_ok(id);
        id
    }

    /// A fast admission the client saw as OK; `committed` false: the leader crashed first.
    pub fn fast_admitted(&mut self, key: &str, stamp_ms: i64, committed: bool) -> u64 {
        let id = self.request(rl(FAST_KEY, key, None), stamp_ms, committed);
        self.force_ok(id);
        id
    }

    pub fn force_ok(&mut self, id: u64) {
        let call = self.calls.iter_mut().find(|c| c.id == id).unwrap();
        if let CallResult::Acked(Outcome::RateLimit(d)) = &mut call.result {
            d.code = Code::Ok;
        }
    }

    /// The client never heard back.
    pub fn make_unknown(&mut self, id: u64) {
        let call = self.calls.iter_mut().find(|c| c.id == id).unwrap();
        call.result = CallResult::Unknown("deadline".into());
    }

    /// A new leader (term + 1): uncommitted entries of the old term get overwritten.
    pub fn new_term(&mut self) {
        self.term += 1;
        self.next_index = self.committed_upto.map_or(1, |c| c + 1);
        self.leaders.push(LeaderSeen {
            at_ms: 0,
            node: 1,
            term: self.term,
            epoch: 0,
        });
    }

    /// A replica sample of the model engine as it is now.
    pub fn sample_now(&mut self, node: u64, incarnation: u32, at_ms: u64) {
        self.samples.push(Sample {
            node,
            incarnation,
            at_ms,
            applied_floor: self.committed_upto,
            snapshot_hash: digest(&self.engine.snapshot()),
            last_ms: self.engine.last_ms(),
        });
    }

    pub fn final_now(&mut self, node: u64, is_leader: bool) {
        self.finals.push(FinalState {
            node,
            is_leader,
            running: true,
            applied: self.committed_upto,
            snapshot: self.engine.snapshot(),
            archive: ArchiveRead::of(
                crate::invariants::usage_log::export_all(&self.engine).expect("records held"),
            ),
        });
    }

    /// A client call of any command, in its own batch; the client saw the true outcome.
    pub fn call(&mut self, command: Command, stamp_ms: i64, committed: bool) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let outcome = self
            .append(stamp_ms, vec![command.clone()], committed)
            .remove(0);
        self.calls.push(Call {
            id,
            node: 1,
            served_by: (1, 0),
            sent_ms: stamp_ms as u64,
            done_ms: stamp_ms as u64 + 5,
            command,
            result: CallResult::Acked(outcome),
        });
        id
    }

    pub fn ev(&self) -> Evidence {
        Evidence {
            bounds: self.bounds,
            calls: self.calls.clone(),
            samples: self.samples.clone(),
            leaders: self.leaders.clone(),
            created: self.created.clone(),
            committed: self.committed.clone(),
            conflicts: self.conflicts.clone(),
            liveness: self.liveness,
            finals: self.finals.clone(),
            stopped: self.stopped.clone(),
        }
    }

    pub fn replay(&self) -> Replay {
        Replay::build(&self.ev())
    }
}
