//! The local batching loop: the stand-in for the Raft log.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use super::{BatchConfig, Clock, Proposal};
use crate::engine::{Command, Engine, Outcome};

/// A batch under construction: commands and, in the same order, who waits for each.
struct Batch {
    commands: Vec<Command>,
    replies: Vec<oneshot::Sender<Outcome>>,
}

impl Batch {
    fn push(&mut self, p: Proposal) {
        self.commands.push(p.command);
        self.replies.push(p.reply);
    }
}

/// Forms batches from `rx`, stamps them and applies them, until every sender is gone.
pub(super) async fn run(
    mut rx: mpsc::Receiver<Proposal>,
    engine: Arc<Mutex<Engine>>,
    clock: Arc<dyn Clock>,
    config: BatchConfig,
) {
    let mut last_stamp_ms = i64::MIN;
    let mut batch = Batch {
        commands: Vec::with_capacity(config.max_batch_commands),
        replies: Vec::with_capacity(config.max_batch_commands),
    };
    while let Some(first) = rx.recv().await {
        batch.push(first);
        fill(&mut rx, &mut batch, config).await;
        // Time never goes back: a clock stepped backwards stamps the last stamp again.
        let stamp_ms = clock.now_ms().max(last_stamp_ms);
        last_stamp_ms = stamp_ms;
        let outcomes = engine.lock().apply(stamp_ms, &batch.commands);
        batch.commands.clear();
        for (reply, outcome) in batch.replies.drain(..).zip(outcomes) {
            // A caller that gave up no longer listens; its command was applied all the same.
            let _ = reply.send(outcome);
        }
    }
}

/// Adds queued proposals to `batch` up to the bound, lingering if configured.
async fn fill(rx: &mut mpsc::Receiver<Proposal>, batch: &mut Batch, config: BatchConfig) {
    let room = |b: &Batch| b.commands.len() < config.max_batch_commands;
    while room(batch) {
        match rx.try_recv() {
            Ok(p) => batch.push(p),
            Err(_) => break,
        }
    }
    if config.batch_linger.is_zero() {
        return;
    }
    let deadline = tokio::time::Instant::now() + config.batch_linger;
    while room(batch) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(p)) => batch.push(p),
            Ok(None) | Err(_) => break,
        }
    }
}
