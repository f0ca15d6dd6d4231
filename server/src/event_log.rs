//! Quota events to the log: every event this replica applies (threshold reached, over limit,
//! reservation expired) becomes one structured `tracing` line, target `tally::usage_event`
//! (JSON fields with `--log-format json`), besides the `WatchEvents` stream.
//!
//! Every node logs the events its own replica applies, so a cluster logs each event once per
//! node, each line carrying the event's `seq` (the same on every node: deduplicate on it).
//! Logging starts at the events applied after the node started (a restart does not repeat
//! history). Events are kept in a ring of [`MAX_EVENTS`]; a node that falls further behind
//! than that logs a gap line naming the seqs it skipped.

use std::time::Duration;

use tokio::sync::watch;

use crate::engine::MAX_EVENTS;
use crate::engine::usage::{Event, EventKind};
use crate::node::Node;

/// How often the log task looks for new events.
pub const EVENT_LOG_POLL: Duration = Duration::from_millis(100);
/// Most events read at once.
const PAGE: usize = 512;
/// The log target of event lines.
pub const TARGET: &str = "tally::usage_event";

/// Logs events until `stop` turns true.
pub async fn run(node: Node, mut stop: watch::Receiver<bool>) {
    let mut cursor = match node.read(|e| e.last_event_seq()).await {
        Ok(seq) => seq,
        Err(_) => return,
    };
    loop {
        let Ok(events) = node.read(|e| e.events_after(cursor, PAGE)).await else {
            return;
        };
        if let Some(first) = events.first()
            && first.seq > cursor + 1
        {
            tracing::warn!(
                target: TARGET,
                from = cursor + 1,
                to = first.seq - 1,
                "quota events dropped before they were logged (more than {MAX_EVENTS} behind)"
            );
        }
        let full = events.len() == PAGE;
        for event in &events {
            log(event);
            cursor = event.seq;
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
