//! **Promise: exactly once — a request id's usage is recorded once, and every retry is
//! answered with the first answer** (ARCHITECTURE.md, metering: "A request id is answered
//! with its first outcome for `request_id_retention_ms`"; a report or commit under an id whose
//! reservation was denied, released or expired records the usage, once).
//!
//! The workload sends reports and commits again under the same id with the same tokens —
//! after a timeout, after a failure during a fault, to another node, or simply later — so the
//! log holds many applications of one command. Checked:
//!
//! 1. **The log.** The usage records the committed log produced (replayed) are numbered 1, 2,
//!    3, ... without a gap and carry pairwise distinct request ids. Every committed `Recorded`
//!    answer names the one record of its own request id; at most one per id is not marked
//!    `duplicate`, and that one's record holds the tokens its command carried (a reservation
//!    charged its estimate at expiry is recorded without any command's answer: a commit after
//!    it gets that record, marked `duplicate`).
//! 2. **The clients.** Every usage answer a client saw (report, reserve, commit, release,
//!    quota set) is the committed outcome of an application of that very command (nothing
//!    acknowledged is lost or invented). All `Recorded` answers clients saw for one request id
//!    carry one seq and time (the first answer's), at most one of them not marked `duplicate`;
//!    and the record at that seq is that request's, with the tokens the client sent.
//! 3. **Every live replica at the end** (after healing and settling): its engine's records
//!    (`Engine::export_usage` paged from cursor 0) have pairwise distinct request ids and
//!    contiguous seqs from 1 up to its last seq, and are the committed log's records, byte for
//!    byte; a replica that applied the whole committed log holds all of them. So every
//!    `Recorded` a client was told is there exactly once, with the acknowledged seq and tokens.
//!
//! Not vacuous: when clients were told `Recorded` at all, at least one replica must have been
//! checked against those answers (the counts go to the trace).

use std::collections::{BTreeMap, BTreeSet};

use tally_server::engine::usage::{Receipt, Settled, Tokens, UsageRecord, UsageResult};
use tally_server::engine::{Command, Outcome};

use crate::history::{CallResult, Evidence, Violation};
use crate::invariants::UsageCoverage;
use crate::invariants::usage_log::{UsageLog, export_all, is_usage, request_id};

pub const NAME: &str = "usage_exactly_once";

/// Reports at most this many problems of one kind.
const MAX_REPORTS: usize = 5;

/// The tokens a command records, if it records any.
fn tokens_of(c: &Command) -> Option<&Tokens> {
    match c {
        Command::ReportUsage(r) => Some(&r.tokens),
        Command::Commit(c) => Some(&c.tokens),
        _ => None,
    }
}

/// A `Recorded` answer: the receipt, its seq and time, and whether the record holds the
/// tokens of the command answered (not so for a reservation charged its estimate when it
/// expired: a commit after it is answered with that record).
fn recorded(o: &Outcome) -> Option<(&Receipt, u64, i64, bool)> {
    match o {
        Outcome::Usage(
            r @ Receipt {
                result:
                    UsageResult::Recorded {
                        seq,
                        at_ms,
                        settled,
                        ..
                    },
                ..
            },
        ) => Some((r, *seq, *at_ms, *settled != Settled::Expired)),
        _ => None,
    }
}

struct Out {
    list: Vec<Violation>,
    by_kind: BTreeMap<&'static str, usize>,
}

impl Out {
    fn push(&mut self, kind: &'static str, message: String) {
        let n = self.by_kind.entry(kind).or_default();
        *n += 1;
        if *n <= MAX_REPORTS {
            self.list.push(Violation {
                invariant: NAME,
                message,
            });
        }
    }
}

/// Seqs contiguous from `first`, and request ids distinct: the problems found.
pub fn numbering_problems(records: &[UsageRecord], first: u64) -> Vec<String> {
    let mut out = Vec::new();
    let mut ids = BTreeSet::new();
    for (i, r) in records.iter().enumerate() {
        let want = first + i as u64;
        if r.seq != want {
            out.push(format!(
                "record #{i} has seq {} where {want} was due",
                r.seq
            ));
            break;
        }
        if !ids.insert(r.request_id.as_str()) {
            out.push(format!(
                "request id {:?} recorded twice (again as seq {})",
                r.request_id, r.seq
            ));
        }
    }
    out
}

pub fn check(ev: &Evidence, log: &UsageLog, cov: &mut UsageCoverage) -> Vec<Violation> {
    let mut out = Out {
        list: Vec::new(),
        by_kind: BTreeMap::new(),
    };
    for p in &log.problems {
        out.push("replay", p.clone());
    }
    // 1. The log.
    for p in numbering_problems(&log.records, 1) {
        out.push("log numbering", format!("committed log: {p}"));
    }
    cov.records = log.records.len() as u64;
    // The seq of each request id's record (ids are distinct: checked above).
    let seq_of: BTreeMap<&str, u64> = log
        .records
        .iter()
        .map(|r| (r.request_id.as_str(), r.seq))
        .collect();
    let mut first_answer: BTreeMap<&str, u64> = BTreeMap::new();
    for item in &log.items {
        let Some((receipt, seq, _, own_tokens)) = recorded(&item.outcome) else {
            continue;
        };
        let id = receipt.request_id.as_str();
        match log.record(seq) {
            Some(r) if r.request_id == id => {
                if !receipt.duplicate
                    && own_tokens
                    && let Some(t) = tokens_of(&item.command)
                    && r.tokens != *t
                {
                    out.push(
                        "log tokens",
                        format!(
                            "index {}: {id} recorded as seq {seq} with {:?}, but the command carried {t:?}",
                            item.index, r.tokens
                        ),
                    );
                }
            }
            other => out.push(
                "log record",
                format!(
                    "index {}: {id} answered Recorded seq {seq}, but the log's record {seq} is {:?}",
                    item.index,
                    other.map(|r| &r.request_id)
                ),
            ),
        }
        if seq_of.get(id) != Some(&seq) {
            out.push(
                "log retry",
                format!(
                    "index {}: {id} answered seq {seq}, its record is seq {:?}",
                    item.index,
                    seq_of.get(id)
                ),
            );
        }
        if !receipt.duplicate
            && let Some(first) = first_answer.insert(id, item.index)
        {
            out.push(
                "log twice",
                format!(
                    "index {}: {id} answered as newly recorded again (first at index {first})",
                    item.index
                ),
            );
        }
    }

    // 2. The clients.
    let mut by_id: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, item) in log.items.iter().enumerate() {
        by_id
            .entry(request_id(&item.command).unwrap_or(""))
            .or_default()
            .push(i);
    }
    // Request id → (seq, at_ms, first call, calls not marked duplicate).
    let mut answered: BTreeMap<&str, (u64, i64, u64, Vec<u64>)> = BTreeMap::new();
    let mut answers_per_id: BTreeMap<&str, u64> = BTreeMap::new();
    // (call id, request id, seq, tokens sent) of every Recorded a client saw.
    let mut acked: Vec<(u64, &str, u64, Option<&Tokens>)> = Vec::new();
    for call in &ev.calls {
        if !is_usage(&call.command) {
            continue;
        }
        let CallResult::Acked(outcome) = &call.result else {
            continue;
        };
        let id = request_id(&call.command).unwrap_or("");
        *answers_per_id.entry(id).or_default() += 1;
        let committed = by_id.get(id).is_some_and(|items| {
            items.iter().any(|&i| {
                let item = &log.items[i];
                item.command == call.command && item.outcome == *outcome
            })
        });
        if !committed {
            let answers: Vec<String> = by_id
                .get(id)
                .into_iter()
                .flatten()
                .filter(|&&i| log.items[i].command == call.command)
                .map(|&i| format!("index {}: {:?}", log.items[i].index, log.items[i].outcome))
                .take(3)
                .collect();
            out.push(
                "acked not committed",
                format!(
                    "call #{} (n{}, {}ms): {id:?} acknowledged {outcome:?}, which no committed application of that command answered (committed: {answers:?})",
                    call.id, call.node, call.done_ms
                ),
            );
        }
        let Some((receipt, seq, at_ms, own_tokens)) = recorded(outcome) else {
            continue;
        };
        let sent = tokens_of(&call.command).filter(|_| own_tokens);
        if receipt.request_id != id {
            out.push(
                "acked wrong id",
                format!(
                    "call #{}: sent {id:?}, answered for {:?}",
                    call.id, receipt.request_id
                ),
            );
        }
        cov.acked_recorded += 1;
        acked.push((call.id, id, seq, sent));
        match answered.get_mut(id) {
            None => {
                let fresh = if receipt.duplicate {
                    vec![]
                } else {
                    vec![call.id]
                };
                answered.insert(id, (seq, at_ms, call.id, fresh));
            }
            Some((first_seq, first_at, first_call, fresh)) => {
                if *first_seq != seq || *first_at != at_ms {
                    out.push(
                        "retry answer",
                        format!(
                            "{id:?}: call #{} was told seq {seq} at {at_ms}, call #{first_call} seq {first_seq} at {first_at}",
                            call.id
                        ),
                    );
                }
                if !receipt.duplicate {
                    fresh.push(call.id);
                }
            }
        }
        match log.record(seq) {
            Some(r) if r.request_id == id && r.at_ms == at_ms => {
                if let Some(t) = sent
                    && r.tokens != *t
                {
                    out.push(
                        "acked tokens",
                        format!(
                            "call #{}: {id:?} acknowledged as seq {seq}, recorded with {:?} but sent with {t:?}",
                            call.id, r.tokens
                        ),
                    );
                }
            }
            other => out.push(
                "acked record",
                format!(
                    "call #{}: {id:?} acknowledged as seq {seq} at {at_ms}, but the log's record {seq} is {:?}",
                    call.id,
                    other.map(|r| (&r.request_id, r.at_ms))
                ),
            ),
        }
    }
    for (id, (_, _, _, fresh)) in &answered {
        if fresh.len() > 1 {
            out.push(
                "two firsts",
                format!("{id:?}: calls {fresh:?} were all told it was recorded for the first time"),
            );
        }
    }
    cov.retried_ids += answers_per_id.values().filter(|n| **n > 1).count() as u64;

    // 3. Every live replica at the end.
    for f in &log.finals {
        let node = f.state.node;
        let engine = match &f.engine {
            Ok(e) => e,
            Err(e) => {
                out.push(
                    "replica",
                    format!("n{node}: final snapshot does not restore: {e}"),
                );
                continue;
            }
        };
        let records = match export_all(engine) {
            Ok(r) => r,
            Err(e) => {
                out.push(
                    "replica",
                    format!("n{node}: usage records not readable from cursor 0: {e}"),
                );
                continue;
            }
        };
        for p in numbering_problems(&records, 1) {
            out.push("replica numbering", format!("n{node}: {p}"));
        }
        let last = engine.last_usage_seq();
        if records.last().map_or(0, |r| r.seq) != last {
            out.push(
                "replica numbering",
                format!(
                    "n{node}: export ends at seq {:?}, the engine's last seq is {last}",
                    records.last().map(|r| r.seq)
                ),
            );
        }
        if let Some(r) = records.iter().find(|r| log.record(r.seq) != Some(r)) {
            out.push(
                "replica record",
                format!(
                    "n{node}: record {} is {r:?}, the committed log's is {:?}",
                    r.seq,
                    log.record(r.seq)
                ),
            );
        }
        let at_end = f.state.applied.is_some() && f.state.applied == log.last_index;
        if at_end && last != log.records.len() as u64 {
            out.push(
                "replica missing",
                format!(
                    "n{node} applied the whole committed log (index {:?}) but holds records up to seq {last} of {}",
                    log.last_index,
                    log.records.len()
                ),
            );
        }
        let by_seq: BTreeMap<u64, &UsageRecord> = records.iter().map(|r| (r.seq, r)).collect();
        let times: BTreeMap<&str, usize> = records.iter().fold(BTreeMap::new(), |mut m, r| {
            *m.entry(r.request_id.as_str()).or_default() += 1;
            m
        });
        for (call, id, seq, sent) in &acked {
            if *seq > last {
                continue; // beyond what this replica applied
            }
            match by_seq.get(seq) {
                Some(r) if r.request_id == *id && sent.is_none_or(|t| *t == r.tokens) => {
                    if times.get(id) != Some(&1) {
                        out.push(
                            "replica twice",
                            format!(
                                "n{node}: {id:?} (call #{call}) held {:?} times",
                                times.get(id)
                            ),
                        );
                    }
                    cov.replica_checks += 1;
                }
                other => out.push(
                    "replica acked",
                    format!(
                        "n{node}: call #{call} was told {id:?} is seq {seq}, this replica's record {seq} is {other:?}"
                    ),
                ),
            }
        }
    }
    if cov.acked_recorded > 0 && cov.replica_checks == 0 {
        out.push(
            "vacuous",
            format!(
                "{} usage answers Recorded were acknowledged but no replica was checked against any (finals: {:?})",
                cov.acked_recorded,
                ev.finals.iter().map(|f| (f.node, f.applied)).collect::<Vec<_>>()
            ),
        );
    }
    for (kind, n) in &out.by_kind {
        if *n > MAX_REPORTS {
            out.list.push(Violation {
                invariant: NAME,
                message: format!("... and {} more {kind} problems", n - MAX_REPORTS),
            });
        }
    }
    out.list
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::FinalState;
    use crate::invariants::fixtures::*;
    use crate::invariants::usage_log::UsageLog;
    use tally_server::engine::usage::{Attribution, ReportUsage};

    pub fn report(id: &str, input: u64) -> Command {
        Command::ReportUsage(ReportUsage {
            request_id: id.into(),
            who: Attribution {
                subject: "k0".into(),
                ..Attribution::default()
            },
            tokens: Tokens {
                input,
                output: 1,
                ..Tokens::default()
            },
        })
    }

    fn run(h: &Hist) -> (Vec<Violation>, UsageCoverage) {
        let ev = h.ev();
        let log = UsageLog::build(&ev);
        let mut cov = UsageCoverage::default();
        (check(&ev, &log, &mut cov), cov)
    }

    #[test]
    fn retried_reports_recorded_once_pass() {
        let mut h = Hist::new();
        h.call(report("u1", 10), 10_100, true);
        h.call(report("u1", 10), 10_200, true); // a retry: duplicate, same seq
        h.call(report("u2", 20), 10_300, true);
        h.final_now(1, true);
        h.final_now(2, false);
        let (v, cov) = run(&h);
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(cov.acked_recorded, 3);
        assert_eq!(cov.replica_checks, 6);
        assert_eq!(cov.retried_ids, 1);
    }

    #[test]
    fn a_replica_missing_an_acknowledged_record_fails() {
        let mut h = Hist::new();
        h.call(report("u1", 10), 10_100, true);
        let before = h.engine.snapshot();
        h.call(report("u2", 20), 10_200, true);
        h.finals.push(FinalState {
            node: 2,
            is_leader: false,
            running: true,
            applied: h.committed_upto,
            snapshot: before,
            archive: Default::default(),
        });
        let (v, _) = run(&h);
        assert!(
            v.iter()
                .any(|v| v.message.contains("holds records up to seq 1 of 2")),
            "{v:?}"
        );
    }

    #[test]
    fn a_retry_answered_with_another_seq_fails() {
        let mut h = Hist::new();
        let first = h.call(report("u1", 10), 10_100, true);
        h.call(report("u2", 20), 10_200, true);
        // The client of u1's retry was told the seq of u2 (say, answers crossed).
        let id = h.call(report("u1", 10), 10_300, true);
        let u2 = h.calls[1].result.clone();
        let call = h.calls.iter_mut().find(|c| c.id == id).unwrap();
        let CallResult::Acked(Outcome::Usage(mut r)) = u2 else {
            panic!()
        };
        r.request_id = "u1".into();
        r.duplicate = true;
        call.result = CallResult::Acked(Outcome::Usage(r));
        let _ = first;
        h.final_now(1, true);
        let (v, _) = run(&h);
        assert!(
            v.iter().any(|v| v.message.contains("was told seq 2")),
            "{v:?}"
        );
    }

    #[test]
    fn usage_recorded_twice_fails() {
        let mut h = Hist::new();
        h.call(report("u1", 10), 10_100, true);
        h.final_now(1, true);
        // The final engine recorded u1 a second time under a fresh numbering slot.
        let mut twice = tally_server::engine::Engine::restore(&h.engine.snapshot()).unwrap();
        let mut again = report("u1", 10);
        if let Command::ReportUsage(r) = &mut again {
            r.request_id = "u1-again".into();
        }
        twice.apply(10_200, &[again]);
        h.finals[0].snapshot = twice.snapshot();
        let (v, _) = run(&h);
        assert!(v.iter().any(|v| v.message.contains("u1-again")), "{v:?}");
    }

    #[test]
    fn an_acknowledged_record_missing_from_the_log_fails() {
        let mut h = Hist::new();
        h.call(report("u1", 10), 10_100, false); // acknowledged, never committed
        h.final_now(1, true);
        let (v, _) = run(&h);
        assert!(
            v.iter()
                .any(|v| v.message.contains("no committed application")),
            "{v:?}"
        );
    }

    #[test]
    fn numbering_gaps_and_repeats_are_found() {
        let r = |seq: u64, id: &str| UsageRecord {
            seq,
            at_ms: 0,
            request_id: id.into(),
            who: Attribution::default(),
            tokens: Tokens::default(),
            cost_nusd: 0,
            price_version: 0,
        };
        assert!(numbering_problems(&[r(1, "a"), r(2, "b")], 1).is_empty());
        assert_eq!(numbering_problems(&[r(1, "a"), r(3, "b")], 1).len(), 1);
        assert_eq!(numbering_problems(&[r(1, "a"), r(2, "a")], 1).len(), 1);
    }
}
