//! Quota events and audit records to the log: every event this replica applies (threshold
//! reached, over limit, reservation expired) becomes one structured `tracing` line, target
//! `tally::usage_event` (JSON fields with `--log-format json`), besides the `WatchEvents`
//! stream; every audit record one line, target `tally::audit`, besides `tally.v1.Audit`.
//!
//! Every node logs the events its own replica applies, so a cluster logs each event once per
//! node, each line carrying the event's `seq` (the same on every node: deduplicate on it).
//! Logging starts at the events applied after the node started (a restart does not repeat
//! history). Events are kept in a ring of [`MAX_EVENTS`]; a node that falls further behind
//! than that logs a gap line naming the seqs it skipped.

use std::time::Duration;

use tokio::sync::watch;

use crate::engine::audit::{AuditQuery, AuditRecord, MAX_AUDIT_RECORDS};
use crate::engine::usage::{Event, EventKind};
use crate::engine::{Engine, MAX_EVENTS};
use crate::node::Node;

/// How often the log task looks for new events.
pub const EVENT_LOG_POLL: Duration = Duration::from_millis(100);
/// Most items read at once.
pub const PAGE: usize = 512;
/// The log target of event lines.
pub const TARGET: &str = "tally::usage_event";

/// The log target of audit lines.
pub const AUDIT_TARGET: &str = "tally::audit";

/// Logs quota events and audit records until `stop` turns true.
pub async fn run(node: Node, stop: watch::Receiver<bool>) {
    let events = Follow {
        last: Engine::last_event_seq,
        after: Engine::events_after,
        seq: |e: &Event| e.seq,
    };
    let audit = Follow {
        last: Engine::last_audit_seq,
        after: |e: &Engine, after_seq, max| {
            e.audit(&AuditQuery {
                after_seq,
                limit: max,
                ..AuditQuery::default()
            })
            .records
        },
        seq: |r: &AuditRecord| r.seq,
    };
    let mut events_log = ToLog {
        log,
        what: "quota events",
        kept: MAX_EVENTS,
        ring: TARGET,
    };
    let mut audit_log = ToLog {
        log: log_audit,
        what: "audit records",
        kept: MAX_AUDIT_RECORDS,
        ring: AUDIT_TARGET,
    };
    tokio::join!(
        events.run(node.clone(), stop.clone(), &mut events_log),
        audit.run(node, stop, &mut audit_log)
    );
}

/// Where followed items go: [`Follow::run`] hands them over in seq order, with the gaps.
pub(crate) trait Sink<T> {
    fn item(&mut self, item: &T);
    /// Seqs `from..=to` were dropped by the engine before they were read.
    fn gap(&mut self, from: u64, to: u64);
}

/// Items to log lines.
struct ToLog<T> {
    log: fn(&T),
    what: &'static str,
    kept: usize,
    ring: &'static str,
}

impl<T> Sink<T> for ToLog<T> {
    fn item(&mut self, item: &T) {
        (self.log)(item);
    }

    fn gap(&mut self, from: u64, to: u64) {
        tracing::warn!(
            target: "tally::event_log",
            ring = self.ring,
            from,
            to,
            "{} dropped before they were logged (more than {} behind)",
            self.what,
            self.kept
        );
    }
}

/// How to follow one numbered series of the engine (events, audit records, usage records)
/// from those applied after the node started: [`Follow::run`].
pub(crate) struct Follow<T> {
    /// The newest seq now (the start).
    pub last: fn(&Engine) -> u64,
    /// At most `max` items after a seq, in seq order; items the engine no longer holds are
    /// skipped (the first one returned then comes after a gap).
    pub after: fn(&Engine, u64, usize) -> Vec<T>,
    pub seq: fn(&T) -> u64,
}

impl<T: Send + 'static> Follow<T> {
    /// Hands every item and every gap to `sink`, in seq order, polling every
    /// [`EVENT_LOG_POLL`] until `stop` turns true (or the node's engine is gone).
    pub async fn run(
        self,
        node: Node,
        mut stop: watch::Receiver<bool>,
        sink: &mut (impl Sink<T> + Send),
    ) {
        let Ok(mut cursor) = node.read(self.last).await else {
            return;
        };
        loop {
            let after = self.after;
            let Ok(items) = node.read(move |e| after(e, cursor, PAGE)).await else {
                return;
            };
            if let Some(first) = items.first().map(self.seq)
                && first > cursor + 1
            {
                sink.gap(cursor + 1, first - 1);
            }
            let full = items.len() == PAGE;
            for item in &items {
                sink.item(item);
                cursor = (self.seq)(item);
            }
            if full {
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep(EVENT_LOG_POLL) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

fn log_audit(r: &AuditRecord) {
    tracing::info!(
        target: AUDIT_TARGET,
        seq = r.seq,
        at_ms = r.at_ms,
        actor = %r.actor.name,
        role = %r.actor.role,
        action = %r.action,
        target = %r.target,
        before = r.before.as_deref().unwrap_or(""),
        after = r.after.as_deref().unwrap_or(""),
        error = r.error.as_deref().unwrap_or(""),
        "audit"
    );
}

fn log(e: &Event) {
    match &e.kind {
        EventKind::Threshold { standing: s, pct } => tracing::info!(
            target: TARGET,
            seq = e.seq,
            at_ms = e.at_ms,
            kind = "threshold",
            pct,
            quota = %s.quota,
            key = ?s.key,
            used = s.used,
            limit = s.limit,
            "quota threshold reached"
        ),
        EventKind::Exceeded { standing: s } => tracing::warn!(
            target: TARGET,
            seq = e.seq,
            at_ms = e.at_ms,
            kind = "exceeded",
            quota = %s.quota,
            key = ?s.key,
            used = s.used,
            limit = s.limit,
            enforcement = ?s.enforcement,
            "quota exceeded"
        ),
        EventKind::ReservationExpired { request_id } => tracing::info!(
            target: TARGET,
            seq = e.seq,
            at_ms = e.at_ms,
            kind = "reservation_expired",
            request_id = %request_id,
            "reservation expired"
        ),
    }
}
