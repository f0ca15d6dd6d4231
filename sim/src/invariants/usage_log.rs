//! Shared evidence of the metering invariants: the committed log's metering commands with
//! their committed outcomes and times, every usage record the log produced, and each live
//! replica's final engine.
//!
//! The committed log is replayed through a fresh engine, as [`crate::replay`] does (and as
//! every replica's state machine does: each batch part is one `Engine::apply`). After each
//! part, the records it added are read from the engine's tail, so the list of records is the
//! log's own, seq by seq, whatever the engine keeps later.

use tally_server::engine::usage::{ReadError, UsageRecord};
use tally_server::engine::{Command, Engine, EngineSettings, Outcome};

use crate::history::{Evidence, FinalState};

/// One metering command of the committed log.
#[derive(Clone, Debug)]
pub struct UsageItem {
    /// The log index of its entry.
    pub index: u64,
    /// The time the engine applied it at (its part's `max(stamp, last)`).
    pub applied_ms: i64,
    pub command: Command,
    pub outcome: Outcome,
}

/// A live replica's engine at the end.
pub struct FinalEngine<'a> {
    pub state: &'a FinalState,
    /// Its engine, restored from its snapshot bytes.
    pub engine: Result<Engine, String>,
}

pub struct UsageLog<'a> {
    /// The metering commands (reports, reserves, commits, releases, quota sets), in log order.
    pub items: Vec<UsageItem>,
    /// Every usage record the committed log produced, in seq order (`records[i].seq` is
    /// `i + 1` unless the engine broke its own numbering, which the checkers report).
    pub records: Vec<UsageRecord>,
    /// For each record, the log index whose application produced it.
    pub record_index: Vec<u64>,
    /// The replayed engine's first record still held at the end (1: none dropped).
    pub first_seq_held: u64,
    /// The replayed engine's time at the end.
    pub last_ms: i64,
    pub last_index: Option<u64>,
    pub finals: Vec<FinalEngine<'a>>,
    /// The log's replay could not read back the records it made (an engine error).
    pub problems: Vec<String>,
}

/// Is this a metering command?
pub fn is_usage(c: &Command) -> bool {
    matches!(
        c,
        Command::ReportUsage(_)
            | Command::Reserve(_)
            | Command::Commit(_)
            | Command::Release { .. }
            | Command::ReplaceQuotas(_)
    )
}

/// The request id a metering command is about.
pub fn request_id(c: &Command) -> Option<&str> {
    match c {
        Command::ReportUsage(r) => Some(&r.request_id),
        Command::Reserve(r) => Some(&r.request_id),
        Command::Commit(c) => Some(&c.request_id),
        Command::Release { request_id } => Some(request_id),
        _ => None,
    }
}

/// Every usage record `engine` holds after `after_seq`, paged.
pub fn export_after(engine: &Engine, mut after_seq: u64) -> Result<Vec<UsageRecord>, ReadError> {
    let mut out = Vec::new();
    loop {
        let page = engine.export_usage(after_seq, usize::MAX)?;
        match page.last() {
            None => return Ok(out),
            // A page that does not move forward would loop for ever: stop (the checkers see
            // the seqs and report them).
            Some(last) if last.seq <= after_seq => {
                out.extend(page);
                return Ok(out);
            }
            Some(last) => {
                after_seq = last.seq;
                out.extend(page);
            }
        }
    }
}

/// Every usage record `engine` holds, paged from cursor 0.
pub fn export_all(engine: &Engine) -> Result<Vec<UsageRecord>, ReadError> {
    export_after(engine, 0)
}

impl<'a> UsageLog<'a> {
    pub fn build(ev: &'a Evidence) -> UsageLog<'a> {
        let mut engine = Engine::new(EngineSettings {
            max_counters: ev.bounds.max_counters,
            ..EngineSettings::default()
        });
        let mut items = Vec::new();
        let mut records: Vec<UsageRecord> = Vec::new();
        let mut record_index = Vec::new();
        let mut problems = Vec::new();
        for entry in &ev.committed {
            let Some(batch) = &entry.batch else { continue };
            for (stamp_ms, commands) in batch.parts() {
                let outcomes = engine.apply(stamp_ms, commands);
                let applied_ms = engine.last_ms();
                for (command, outcome) in commands.iter().zip(outcomes) {
                    if is_usage(command) {
                        items.push(UsageItem {
                            index: entry.index,
                            applied_ms,
                            command: command.clone(),
                            outcome,
                        });
                    }
                }
                if engine.last_usage_seq() > records.last().map_or(0, |r| r.seq) {
                    let after = records.last().map_or(0, |r| r.seq);
                    match export_after(&engine, after) {
                        Ok(new) => {
                            record_index.extend(new.iter().map(|_| entry.index));
                            records.extend(new);
                        }
                        Err(e) => problems.push(format!(
                            "replaying index {}: records after seq {after} not readable: {e}",
                            entry.index
                        )),
                    }
                }
            }
        }
        let finals = ev
            .finals
            .iter()
            .map(|state| FinalEngine {
                state,
                engine: Engine::restore(&state.snapshot).map_err(|e| e.to_string()),
            })
            .collect();
        UsageLog {
            items,
            records,
            record_index,
            first_seq_held: engine.first_usage_seq(),
            last_ms: engine.last_ms(),
            last_index: ev.committed.last().map(|c| c.index),
            finals,
            problems,
        }
    }

    /// The log's record with this seq.
    pub fn record(&self, seq: u64) -> Option<&UsageRecord> {
        let i = usize::try_from(seq.checked_sub(1)?).ok()?;
        self.records.get(i).filter(|r| r.seq == seq)
    }
}
