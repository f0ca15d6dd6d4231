//! **Promise: a node's usage archive holds exactly the records its engine applied, each once,
//! in seq order** (ARCHITECTURE.md, "The usage archive": "the archive holds every record up to
//! the engine's last seq once a batch is applied, each once, in seq order"; a node restored
//! from a leader's snapshot may lack the records that snapshot no longer carried, and says so:
//! `ArchiveError::NotHeld`, never a short answer).
//!
//! Checked on every live node at the end, its archive read with `Node::usage_records` from
//! cursor 0, page by page, stepping over each range it refuses as not held:
//!
//! - the records it returns are in strictly increasing seq order, and, with the refused
//!   ranges, cover 1..=its engine's last seq exactly: no gap that is not a named hole, nothing
//!   beyond the engine's last seq, no record twice;
//! - each record is the committed log's record of that seq (replayed), and its own engine's
//!   for the seqs the engine holds;
//! - a hole (`NotHeld`) lies only where a snapshot could not carry the records: below the
//!   first record the engine still holds (`max_usage_records` trimmed them). In these runs the
//!   engine holds every record (200,000 kept), so no node may report any hole — a node that
//!   installed a snapshot rebuilds its archive from the engine's tail;
//! - no other error (retention cannot apply: the default keeps 400 days).
//!
//! Not vacuous: when the log produced records, at least one node's archive must have been
//! compared record by record (the count goes to the trace).

use tally_server::engine::usage::UsageRecord;

use crate::history::{Evidence, Violation};
use crate::invariants::UsageCoverage;
use crate::invariants::usage_log::{UsageLog, export_all};

pub const NAME: &str = "usage_archive_agrees";

pub fn check(_ev: &Evidence, log: &UsageLog, cov: &mut UsageCoverage) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut push = |message: String| {
        out.push(Violation {
            invariant: NAME,
            message,
        })
    };
    for f in &log.finals {
        let node = f.state.node;
        let Ok(engine) = &f.engine else {
            continue; // reported by usage_exactly_once
        };
        let own: Vec<UsageRecord> = export_all(engine).unwrap_or_default();
        let engine_first = engine.first_usage_seq();
        let engine_last = engine.last_usage_seq();
        let archive = &f.state.archive;
        if let Some(e) = &archive.error {
            push(format!("n{node}: archive read failed: {e}"));
        }
        // Walk seqs 1..: every seq is either a record returned (in order) or in a named hole.
        let mut next = 1u64;
        let mut holes = archive.not_held.iter().peekable();
        let mut bad = false;
        for r in &archive.records {
            while let Some((from, to)) = holes.peek().copied() {
                if *from > r.seq {
                    break;
                }
                if *from != next || *to >= r.seq {
                    push(format!(
                        "n{node}: archive refused {from}..={to} as not held, at seq {next} (next record returned: {})",
                        r.seq
                    ));
                    bad = true;
                }
                next = to + 1;
                holes.next();
            }
            if r.seq != next {
                push(format!(
                    "n{node}: archive returned seq {} where {next} was due (neither returned nor refused as not held)",
                    r.seq
                ));
                bad = true;
                break;
            }
            next += 1;
            match log.record(r.seq) {
                Some(want) if want == r => {}
                want => {
                    push(format!(
                        "n{node}: archive record {} is {r:?}, the committed log's is {want:?}",
                        r.seq
                    ));
                    bad = true;
                    break;
                }
            }
            if r.seq >= engine_first
                && let Some(mine) = own.get((r.seq - engine_first) as usize)
                && mine != r
            {
                push(format!(
                    "n{node}: archive record {} differs from its engine's {mine:?}",
                    r.seq
                ));
                bad = true;
                break;
            }
            cov.archive_records += 1;
        }
        if bad {
            continue;
        }
        for (from, to) in holes {
            if *from != next {
                push(format!(
                    "n{node}: archive refused {from}..={to} as not held, at seq {next}"
                ));
            }
            next = to + 1;
        }
        if next != engine_last + 1 {
            push(format!(
                "n{node}: archive ends at seq {}, its engine's last record is seq {engine_last}",
                next - 1
            ));
        }
        for (from, to) in &archive.not_held {
            if *to >= log.first_seq_held {
                push(format!(
                    "n{node}: archive holds no records {from}..={to}, but the engine still carried them (first record held: {}): the node could have archived them from its engine's tail",
                    log.first_seq_held
                ));
            }
        }
    }
    if !log.records.is_empty() && cov.archive_records == 0 && !log.finals.is_empty() {
        push(format!(
            "the log produced {} usage records but no node's archive was compared with any",
            log.records.len()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invariants::fixtures::*;
    use crate::invariants::usage_log::UsageLog;
    use tally_server::engine::Command;
    use tally_server::engine::usage::{Attribution, ReportUsage, Tokens};

    fn report(id: &str) -> Command {
        Command::ReportUsage(ReportUsage {
            request_id: id.into(),
            who: Attribution {
                subject: "k0".into(),
                ..Attribution::default()
            },
            tokens: Tokens {
                input: 5,
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

    fn hist() -> Hist {
        let mut h = Hist::new();
        for i in 1..=3 {
            h.call(report(&format!("u{i}")), 10_000 + i * 100, true);
        }
        h.final_now(1, true);
        h
    }

    #[test]
    fn a_faithful_archive_passes() {
        let (v, cov) = run(&hist());
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(cov.archive_records, 3);
    }

    #[test]
    fn a_short_archive_fails() {
        let mut h = hist();
        h.finals[0].archive.records.pop();
        let (v, _) = run(&h);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("ends at seq 2"), "{}", v[0]);
    }

    #[test]
    fn a_record_archived_twice_or_changed_fails() {
        let mut h = hist();
        let r = h.finals[0].archive.records[1].clone();
        h.finals[0].archive.records.insert(1, r);
        let (v, _) = run(&h);
        assert!(v[0].message.contains("returned seq 2 where 3"), "{v:?}");

        let mut h = hist();
        h.finals[0].archive.records[0].tokens.input += 1;
        let (v, _) = run(&h);
        assert!(v[0].message.contains("committed log's is"), "{v:?}");
    }

    #[test]
    fn a_hole_the_engine_could_have_filled_fails() {
        let mut h = hist();
        h.finals[0].archive.records.remove(0);
        h.finals[0].archive.not_held.push((1, 1));
        let (v, _) = run(&h);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("still carried them"), "{}", v[0]);
    }
}
