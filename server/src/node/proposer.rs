//! The proposer: forms batches from concurrent commands and puts them in the Raft log.
//!
//! On the leader a batch is stamped with `max(last_stamp, now)` and handed to openraft with
//! `client_write_ff`, in order; up to `max_inflight_batches` batches are in flight at once
//! (default 1: commands arriving while a batch commits form the next one, so one fsync and one
//! replication round trip serve them all — measured far better than pipelining small batches,
//! whose commits each wait for their own fsync). Each
//! caller gets the outcome of its own command when its batch has been committed and applied.
//! On a follower the batch is forwarded to the leader (one hop, never further).
//!
//! `fast` acknowledgement: the leader keeps a speculative engine, a copy of the applied engine
//! to which every batch is applied as it is proposed, so it always equals the applied state
//! plus the batches in flight. A decision whose counters all belong to `fast` limits is
//! answered from it at once; the rest wait for commit. The copy is made when a term starts,
//! once the log is fully applied and nothing is in flight, and dropped whenever a write fails
//! or leadership moves. A leader crash loses at most the in-flight batches
//! (`max_inflight_batches` × `max_batch_commands` commands) of fast-acknowledged hits: the
//! counters then hold fewer hits than were admitted, never more.

use std::sync::Arc;

use openraft::error::ClientWriteError;
use tokio::sync::{Semaphore, mpsc, oneshot};

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::forward::ForwardTransport;
use super::raft_types::{Batch, NodeId, Raft};
use super::state_machine::Applied;
use super::{BatchConfig, Clock, NodeError};
use crate::engine::{Command, Engine, Outcome};

/// How long a new leader waits for its log to be applied before it builds its speculative
/// engine; past it, decisions stay strict and it tries again at the next batch.
const SPECULATION_SYNC_WAIT: Duration = Duration::from_secs(1);
/// Longest wait for a proposed batch to be committed and applied before its callers are told
/// UNAVAILABLE (fate unknown) and its in-flight permit is released.
const COMMIT_WAIT_MAX: Duration = Duration::from_secs(5);
/// How long after a failed attempt the proposer tries speculation again.
const SPECULATION_RETRY: Duration = Duration::from_secs(1);

/// Upper bound of `--batch-max-inflight`: batches proposed and not yet answered.
pub const MAX_INFLIGHT_BATCHES: usize = 32;
/// A batch stops taking commands once it holds about this many bytes, far below the Raft
/// message bound ([`super::network::MAX_RAFT_MESSAGE_BYTES`]); one larger command still goes
/// alone.
pub const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;

pub(super) type Reply = oneshot::Sender<Result<Outcome, NodeError>>;

/// A command waiting for a batch.
pub(super) struct Proposal {
    pub command: Command,
    /// False for commands forwarded to us: we must not forward them again.
    pub forwardable: bool,
    pub reply: Reply,
}

struct Pending {
    bytes: usize,
    commands: Vec<Command>,
    forwardable: Vec<bool>,
    replies: Vec<Reply>,
}

impl Pending {
    fn with_capacity(n: usize) -> Pending {
        Pending {
            bytes: 0,
            commands: Vec::with_capacity(n),
            forwardable: Vec::with_capacity(n),
            replies: Vec::with_capacity(n),
        }
    }

    /// Adds a proposal, unless its caller has already given up (its deadline passed while it
    /// was queued): such a command is dropped unapplied rather than proposed as dead work.
    fn push(&mut self, p: Proposal) {
        if p.reply.is_closed() {
            return;
        }
        self.bytes = self.bytes.saturating_add(p.command.estimated_bytes());
        self.commands.push(p.command);
        self.forwardable.push(p.forwardable);
        self.replies.push(p.reply);
    }

    fn len(&self) -> usize {
        self.commands.len()
    }

    fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    fn fail(self, error: NodeError) {
        for reply in self.replies {
            let _ = reply.send(Err(error.clone()));
        }
    }
}

pub(super) struct Proposer {
    pub applied: Arc<parking_lot::Mutex<Applied>>,
    pub id: NodeId,
    pub raft: Raft,
    pub clock: Arc<dyn Clock>,
    pub config: BatchConfig,
    pub forwarder: Arc<dyn ForwardTransport>,
}

impl Proposer {
    /// Runs until every sender of `rx` is gone or Raft stops.
    pub(super) async fn run(self, mut rx: mpsc::Receiver<Proposal>) {
        let window = self.config.max_inflight_batches;
        let inflight = Arc::new(Semaphore::new(window));
        let broken = Arc::new(AtomicBool::new(false));
        let mut spec: Option<Speculative> = None;
        // When the next attempt to build a speculative engine may be made.
        let mut next_attempt = tokio::time::Instant::now();
        let mut last_stamp_ms = i64::MIN;
        while let Some(first) = rx.recv().await {
            let mut batch = Pending::with_capacity(self.config.max_batch_commands);
            batch.push(first);
            fill(&mut rx, &mut batch, self.config).await;
            if batch.is_empty() {
                // Every caller gave up while queued: nothing to propose.
                continue;
            }
            let (leader, term) = self.leadership();
            let stale = spec.as_ref().is_none_or(|s| s.term != term);
            if leader == Some(self.id) && stale && tokio::time::Instant::now() >= next_attempt {
                // Only worth a copy of the engine (and a drained pipeline) when some limit is
                // fast; a failed attempt is not retried for a while, so a lagging apply cannot
                // stall every batch.
                spec = None;
                if self.applied.lock().engine.has_fast_limits() {
                    spec = self.speculate(term, &inflight, window).await;
                    if spec.is_none() {
                        next_attempt = tokio::time::Instant::now() + SPECULATION_RETRY;
                    }
                }
            }
            let permit = inflight
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            // Decided only now that this batch holds its permit: a batch in flight that failed
            // while we waited must reset speculation before this one is answered from it.
            let (leader, term) = self.leadership();
            if broken.swap(false, Ordering::SeqCst)
                || leader != Some(self.id)
                || spec.as_ref().is_some_and(|s| s.term != term)
            {
                spec = None;
            }
            if leader != Some(self.id) {
                let forwarder = self.forwarder.clone();
                let raft = self.raft.clone();
                tokio::spawn(async move {
                    forward(&raft, &forwarder, leader, batch).await;
                    drop(permit);
                });
                continue;
            }
            // Time never goes back: a clock stepped backwards stamps the last stamp again.
            let stamp_ms = self.clock.now_ms().max(last_stamp_ms);
            last_stamp_ms = stamp_ms;
            let Pending {
                commands, replies, ..
            } = batch;
            let mut replies: Vec<Option<Reply>> = replies.into_iter().map(Some).collect();
            let early = match spec.as_mut() {
                Some(s) => answer_fast(&mut s.engine, stamp_ms, &commands, &mut replies),
                None => Vec::new(),
            };
            let entry = Batch { stamp_ms, commands };
            match self.raft.client_write_ff(entry).await {
                Ok(responder) => {
                    let broken = broken.clone();
                    tokio::spawn(async move {
                        // openraft 0.9 can leave a deposed leader's responders unresolved:
                        // bounded, so a lost batch never holds its permit (and the proposer)
                        // for ever. Its fate is then unknown to its callers.
                        let ok = match tokio::time::timeout(COMMIT_WAIT_MAX, responder).await {
                            Ok(result) => settle(result, replies, early),
                            Err(_) => {
                                let error = NodeError::Unavailable(
                                    "no commit within the commit wait bound".into(),
                                );
                                for reply in replies.into_iter().flatten() {
                                    let _ = reply.send(Err(error.clone()));
                                }
                                false
                            }
                        };
                        if !ok {
                            broken.store(true, Ordering::SeqCst);
                        }
                        drop(permit);
                    });
                }
                Err(fatal) => {
                    tracing::error!(error = %fatal, "raft stopped");
                    for reply in replies.into_iter().flatten() {
                        let _ = reply.send(Err(NodeError::Stopped));
                    }
                    return;
                }
            }
        }
    }

    /// Who leads, and in which term, as this node knows it now.
    fn leadership(&self) -> (Option<NodeId>, u64) {
        let m = self.raft.metrics();
        let m = m.borrow();
        (m.current_leader, m.current_term)
    }

    /// Copies the applied engine once the log is applied and nothing of ours is in flight.
    async fn speculate(
        &self,
        term: u64,
        inflight: &Arc<Semaphore>,
        window: usize,
    ) -> Option<Speculative> {
        let all = inflight
            .acquire_many(window as u32)
            .await
            .expect("semaphore never closed");
        let last_log = self.raft.metrics().borrow().last_log_index;
        let synced = match last_log {
            Some(index) => self
                .raft
                .wait(Some(SPECULATION_SYNC_WAIT))
                .applied_index_at_least(Some(index), "speculation")
                .await
                .is_ok(),
            None => true,
        };
        drop(all);
        if !synced {
            return None;
        }
        let bytes = self.applied.lock().engine.snapshot();
        let engine = Engine::restore(&bytes).expect("an engine restores its own snapshot");
        tracing::debug!(
            term,
            "speculative engine ready: fast limits answer before commit"
        );
        Some(Speculative { term, engine })
    }
}

/// The leader's speculative engine for one term.
struct Speculative {
    term: u64,
    engine: Engine,
}

/// Applies the batch to the speculative engine and answers every fast decision at once.
/// Returns the early answers `(index, outcome)` so the commit can confirm them.
fn answer_fast(
    engine: &mut Engine,
    stamp_ms: i64,
    commands: &[Command],
    replies: &mut [Option<Reply>],
) -> Vec<(usize, Outcome)> {
    let mut early = Vec::new();
    for (i, outcome) in engine.apply(stamp_ms, commands).into_iter().enumerate() {
        if matches!(&outcome, Outcome::RateLimit(d) if d.fast)
            && let Some(reply) = replies[i].take()
        {
            let _ = reply.send(Ok(outcome.clone()));
            early.push((i, outcome));
        }
    }
    early
}

/// Hands every caller of a committed batch its own outcome, and checks the early answers
/// against the committed ones. Returns false when speculation can no longer be trusted.
fn settle<E: std::fmt::Display>(
    result: Result<
        Result<
            openraft::raft::ClientWriteResponse<super::raft_types::TypeConfig>,
            ClientWriteError<NodeId, openraft::BasicNode>,
        >,
        E,
    >,
    replies: Vec<Option<Reply>>,
    early: Vec<(usize, Outcome)>,
) -> bool {
    let error = match result {
        Ok(Ok(response)) => {
            let outcomes = response.data.outcomes;
            assert_eq!(outcomes.len(), replies.len(), "one outcome per command");
            let agree = early.iter().all(|(i, o)| outcomes[*i] == *o);
            if !agree {
                tracing::error!("speculative and committed outcomes differ; speculation reset");
            }
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                // A caller that gave up no longer listens; its command was applied all the same.
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(outcome));
                }
            }
            return agree;
        }
        // Leadership moved between our check and the append: the batch was not appended.
        Ok(Err(e)) => NodeError::Unavailable(format!("leadership changed: {e}")),
        Err(e) => NodeError::Unavailable(format!("raft dropped the write: {e}")),
    };
    for reply in replies.into_iter().flatten() {
        let _ = reply.send(Err(error.clone()));
    }
    false
}

/// Sends a follower's batch to the leader; commands that were forwarded to us are refused.
async fn forward(
    raft: &Raft,
    forwarder: &Arc<dyn ForwardTransport>,
    leader: Option<NodeId>,
    batch: Pending,
) {
    let Some(leader) = leader else {
        batch.fail(NodeError::NoLeader);
        return;
    };
    let addr = raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .get_node(&leader)
        .map(|n| n.addr.clone());
    let Some(addr) = addr else {
        batch.fail(NodeError::NoLeader);
        return;
    };
    let mut to_send = Vec::new();
    let mut waiting = Vec::new();
    for ((command, forwardable), reply) in batch
        .commands
        .into_iter()
        .zip(batch.forwardable)
        .zip(batch.replies)
    {
        if forwardable {
            to_send.push(command);
            waiting.push(reply);
        } else {
            let _ = reply.send(Err(NodeError::NotLeader));
        }
    }
    if to_send.is_empty() {
        return;
    }
    match forwarder.propose(&addr, to_send).await {
        Ok(outcomes) if outcomes.len() == waiting.len() => {
            for (reply, outcome) in waiting.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        Ok(outcomes) => {
            let error = NodeError::Unavailable(format!(
                "leader answered {} outcomes for {} commands",
                outcomes.len(),
                waiting.len()
            ));
            for reply in waiting {
                let _ = reply.send(Err(error.clone()));
            }
        }
        Err(error) => {
            for reply in waiting {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

/// Adds queued proposals to `batch` up to the bound, lingering if configured.
async fn fill(rx: &mut mpsc::Receiver<Proposal>, batch: &mut Pending, config: BatchConfig) {
    let room = |b: &Pending| b.len() < config.max_batch_commands && b.bytes < MAX_BATCH_BYTES;
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
