//! The oracle's model: the committed log, replayed through a fresh engine.
//!
//! The committed log ([`crate::audit`]) is replayed through `Engine::apply` — exactly what
//! every replica's state machine does. That gives, for each request, the log index it was
//! committed at, the time it was applied at (the engine's `max(stamp, last)`), and its
//! committed outcome; and, after each index, a digest of the engine snapshot, which every
//! replica must match at that index.

use std::collections::BTreeMap;

use tally_server::engine::{Command, Engine, EngineSettings, LimitSet, Outcome};

use crate::history::{Evidence, Violation, digest};
use crate::workload::rid_of;

/// Where and how a request was committed.
#[derive(Clone, Debug)]
pub struct Committed {
    pub index: u64,
    pub term: u64,
    /// The time the engine applied it at.
    pub applied_ms: i64,
    pub outcome: Outcome,
}

pub struct Replay {
    /// By rid.
    pub committed: BTreeMap<u64, Committed>,
    /// Rids found in more than one committed entry (applied twice).
    pub duplicates: Vec<u64>,
    /// Engine snapshot digest → the last index at which the replayed engine had it.
    pub digest_valid_upto: BTreeMap<u64, u64>,
    /// Engine snapshot digest after each committed index.
    pub digest_at: BTreeMap<u64, u64>,
    /// The replayed engine after the last committed index.
    pub engine: Engine,
    /// The last committed index.
    pub last_index: Option<u64>,
    /// Indexes missing from the committed chain (the audit missed something: a simulator bug).
    pub gaps: Vec<u64>,
    /// Limit sets committed, in log order.
    pub limit_sets: Vec<(u64, LimitSet)>,
}

impl Replay {
    pub fn build(ev: &Evidence) -> Replay {
        let mut engine = Engine::new(EngineSettings {
            max_counters: ev.bounds.max_counters,
            ..EngineSettings::default()
        });
        let mut committed = BTreeMap::new();
        let mut duplicates = Vec::new();
        let mut digest_valid_upto = BTreeMap::new();
        let mut digest_at = BTreeMap::new();
        let mut gaps = Vec::new();
        let mut limit_sets = Vec::new();
        let mut current = digest(&engine.snapshot());
        let mut expected = ev.committed.first().map(|c| c.index);
        for entry in &ev.committed {
            let index = entry.index;
            if let Some(e) = expected
                && index > e
            {
                gaps.extend(e..index);
            }
            expected = Some(index + 1);
            if let Some(batch) = &entry.batch {
                let mut applied = Vec::with_capacity(batch.commands.len());
                for (stamp_ms, commands) in batch.parts() {
                    let outcomes = engine.apply(stamp_ms, commands);
                    let applied_ms = engine.last_ms();
                    applied.extend(
                        commands
                            .iter()
                            .zip(outcomes)
                            .map(|(c, o)| (c, o, applied_ms)),
                    );
                }
                for (command, outcome, applied_ms) in applied {
                    let rl = match command {
                        Command::RateLimit(rl) => rl,
                        Command::ReplaceLimits(set) => {
                            limit_sets.push((index, set.clone()));
                            continue;
                        }
                        _ => continue,
                    };
                    let Some(rid) = rid_of(rl) else { continue };
                    let c = Committed {
                        index,
                        term: entry.term,
                        applied_ms,
                        outcome,
                    };
                    if committed.insert(rid, c).is_some() {
                        duplicates.push(rid);
                    }
                }
                current = digest(&engine.snapshot());
            }
            digest_at.insert(index, current);
            digest_valid_upto.insert(current, index);
        }
        Replay {
            committed,
            duplicates,
            digest_valid_upto,
            digest_at,
            engine,
            last_index: ev.committed.last().map(|c| c.index),
            gaps,
            limit_sets,
        }
    }

    /// A simulator-side problem with the evidence itself.
    pub fn problems(&self) -> Vec<Violation> {
        let mut out = Vec::new();
        if !self.gaps.is_empty() {
            out.push(Violation {
                invariant: "oracle",
                message: format!(
                    "committed indexes missing from the audit: {:?} (simulator bug)",
                    &self.gaps[..self.gaps.len().min(10)]
                ),
            });
        }
        out
    }
}
