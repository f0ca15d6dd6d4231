//! The proposer: forms batches from concurrent commands and puts them in the Raft log.
//!
//! On the leader a batch is stamped with `max(last_stamp, now)` and handed to openraft with
//! `client_write_ff`, in order; up to `max_inflight_batches` batches are in flight at once
//! (default 1). While the pipeline is full the next batch keeps gathering every command that
//! arrives, so one fsync and one replication round trip serve them all — measured far better
//! than pipelining small batches, whose commits each wait for their own fsync. Each caller
//! gets the outcome of its own command when its batch has been committed and applied.
//! On a follower the batch is forwarded to the leader (one hop, never further).
//!
//! `fast` acknowledgement: the leader keeps a speculative engine, a copy of the applied engine
//! to which every command is applied as it joins a batch, so it always equals the applied
//! state plus the batches in flight plus the batch being gathered. A decision whose counters
//! all belong to `fast` limits is answered from it at once — before the batch is proposed;
//! the rest wait for commit. The copy is made when a term starts, once the log is fully
//! applied and nothing is in flight, and dropped whenever a write fails or leadership moves.
//! A leader crash loses at most the in-flight batches plus the one being gathered
//! ((`max_inflight_batches` + 1) × `max_batch_commands` commands) of fast-acknowledged hits:
//! the counters then hold fewer hits than were admitted, never more.

use std::sync::Arc;
use tracing::Instrument;

use openraft::error::ClientWriteError;
use tokio::sync::{Semaphore, mpsc, oneshot};

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::forward::ForwardTransport;
use super::raft_types::{Batch, NodeId, Raft};
use super::state_machine::Applied;
use super::stats::NodeStats;
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
/// Most parts (distinct batch times) one gathered batch is cut into; past it the batch takes
/// no more commands until it is proposed.
const MAX_PARTS_PER_BATCH: usize = 64;

/// Upper bound of `--batch-max-inflight`: batches proposed and not yet answered.
pub const MAX_INFLIGHT_BATCHES: usize = 32;
/// A batch stops taking commands once it holds about this many bytes, far below the Raft
/// message bound ([`super::network::MAX_RAFT_MESSAGE_BYTES`]); one larger command still goes
/// alone.
pub const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;

pub(super) type Reply = oneshot::Sender<Result<Outcome, NodeError>>;
/// Answers given from the speculative engine before commit: (index in the batch, outcome).
type EarlyAnswers = Vec<(usize, Outcome)>;
/// What openraft's responder resolves to for one proposed batch.
type WriteResult = Result<
    openraft::raft::ClientWriteResponse<super::raft_types::TypeConfig>,
    ClientWriteError<NodeId, openraft::BasicNode>,
>;

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
    /// `None` once the caller has been answered early from the speculative engine.
    replies: Vec<Option<Reply>>,
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
        self.replies.push(Some(p.reply));
    }

    fn len(&self) -> usize {
        self.commands.len()
    }

    fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    fn has_room(&self, config: BatchConfig) -> bool {
        self.len() < config.max_batch_commands && self.bytes < MAX_BATCH_BYTES
    }

    fn fail(self, error: NodeError) {
        fail_all(self.replies, &error);
    }

    /// The commands not answered early, in order.
    fn unanswered(self) -> Pending {
        let mut out = Pending::with_capacity(self.len());
        out.bytes = self.bytes;
        let all = self.commands.into_iter().zip(self.forwardable);
        for ((command, forwardable), reply) in all.zip(self.replies) {
            if reply.is_some() {
                out.commands.push(command);
                out.forwardable.push(forwardable);
                out.replies.push(reply);
            }
        }
        out
    }
}

fn fail_all(replies: Vec<Option<Reply>>, error: &NodeError) {
    for reply in replies.into_iter().flatten() {
        let _ = reply.send(Err(error.clone()));
    }
}

/// The next batch, gathering commands while the batches before it are in flight.
///
/// While a speculative engine answers, the batch is cut into parts, one per batch time: a
/// command is applied at the time it arrived (to the millisecond), never at the earlier stamp
/// of the command that opened the batch. The parts travel in one Raft entry
/// ([`Batch::later`]): one append, one fsync. (One entry per part was measured at half the
/// throughput: each append waited for its own flush.)
struct Group {
    pending: Pending,
    early: EarlyAnswers,
    /// (first command, stamp) of each part the speculative engine has applied, in order.
    /// Commands after the last part's range that it has not seen form one more part, stamped
    /// when proposed.
    parts: Vec<(usize, i64)>,
    /// Commands already offered to the speculative engine.
    seen: usize,
    opened: tokio::time::Instant,
}

impl Group {
    fn has_room(&self, config: BatchConfig) -> bool {
        self.pending.has_room(config) && self.parts.len() < MAX_PARTS_PER_BATCH
    }

    /// The Raft entry (its parts cut where the speculative engine saw time move), its
    /// callers, and the early answers.
    fn into_batch(self) -> (Batch, Vec<Option<Reply>>, EarlyAnswers) {
        let (&(_, first_ms), later) = self
            .parts
            .split_first()
            .expect("a batch is proposed with at least one part");
        let batch = Batch {
            stamp_ms: first_ms,
            commands: self.pending.commands,
            // At most MAX_PARTS_PER_BATCH parts of at most MAX_BATCH_COMMANDS commands.
            later: later.iter().map(|&(i, ms)| (i as u32, ms)).collect(),
        };
        (batch, self.pending.replies, self.early)
    }

    /// The speculative engine that answered part of this batch was dropped (a write failed or
    /// leadership moved) before the batch could be proposed. Its early answers were given
    /// against a state the log may no longer reach, so those commands are not proposed: their
    /// hits are lost (within the fast bound; counters under-count, never over-count). The
    /// rest were answered by no one yet and go in as one part, stamped when proposed.
    fn abandon_speculation(&mut self) {
        let answered = self.early.len();
        self.pending = std::mem::replace(&mut self.pending, Pending::with_capacity(0)).unanswered();
        self.early.clear();
        self.parts.clear();
        self.seen = 0;
        tracing::debug!(
            answered,
            "early answers of an unproposed batch lost with speculation"
        );
    }
}

/// What the run loop carries from batch to batch.
struct LoopState {
    inflight: Arc<Semaphore>,
    /// Set by a batch whose commit failed or disagreed with its early answers.
    broken: Arc<AtomicBool>,
    spec: Option<Speculative>,
    /// When the next attempt to build a speculative engine may be made.
    next_attempt: tokio::time::Instant,
    last_stamp_ms: i64,
}

impl LoopState {
    /// Time never goes back: a clock stepped backwards stamps the last stamp again.
    fn next_stamp(&mut self, clock: &dyn Clock) -> i64 {
        self.last_stamp_ms = clock.now_ms().max(self.last_stamp_ms);
        self.last_stamp_ms
    }

    /// Drops the speculative engine when a batch failed or leadership moved.
    fn check_speculation(&mut self, leader: Option<NodeId>, id: NodeId, term: u64) {
        if self.broken.swap(false, Ordering::SeqCst)
            || leader != Some(id)
            || self.spec.as_ref().is_some_and(|s| s.term != term)
        {
            self.spec = None;
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
    pub stats: Arc<NodeStats>,
}

impl Proposer {
    /// Runs until every sender of `rx` is gone or Raft stops.
    ///
    /// One batch is gathered at a time: it takes commands (answering fast ones at once) until
    /// an in-flight permit is free and the linger has passed, then it is proposed whole. So
    /// every command that arrives while the pipeline is full shares the next commit, and at
    /// most one batch is answered but not yet proposed.
    pub(super) async fn run(self, mut rx: mpsc::Receiver<Proposal>) {
        let config = self.config;
        let mut st = LoopState {
            inflight: Arc::new(Semaphore::new(config.max_inflight_batches)),
            broken: Arc::new(AtomicBool::new(false)),
            spec: None,
            next_attempt: tokio::time::Instant::now(),
            last_stamp_ms: i64::MIN,
        };
        let mut group: Option<Group> = None;
        let mut open = true;
        loop {
            let g = match group.as_mut() {
                Some(g) => g,
                None => {
                    let Some(first) = (if open { rx.recv().await } else { None }) else {
                        return;
                    };
                    self.refresh_speculation(&mut st).await;
                    let mut pending = Pending::with_capacity(config.max_batch_commands);
                    pending.push(first);
                    group.insert(Group {
                        pending,
                        early: Vec::new(),
                        parts: Vec::new(),
                        seen: 0,
                        opened: tokio::time::Instant::now(),
                    })
                }
            };
            while open && g.has_room(config) {
                match rx.try_recv() {
                    Ok(p) => g.pending.push(p),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            if g.pending.is_empty() {
                // Every caller gave up while queued: nothing to propose.
                group = None;
                continue;
            }
            self.answer_new(g, &mut st);
            let linger_until = g.opened + config.batch_linger;
            let room = open && g.has_room(config);
            let lingering = room && tokio::time::Instant::now() < linger_until;
            tokio::select! {
                biased;
                permit = st.inflight.clone().acquire_owned(), if !lingering => {
                    let permit = permit.expect("semaphore never closed");
                    let g = group.take().expect("a group is being gathered");
                    if !self.propose(g, permit, &mut st).await {
                        return;
                    }
                }
                p = rx.recv(), if room => match p {
                    Some(p) => g.pending.push(p),
                    None => open = false,
                },
                _ = tokio::time::sleep_until(linger_until), if lingering => {}
            }
        }
    }

    /// Offers the group's new commands to the speculative engine, answering fast ones now.
    fn answer_new(&self, g: &mut Group, st: &mut LoopState) {
        if g.seen == g.pending.len() || st.spec.is_none() {
            return;
        }
        let (leader, term) = self.leadership();
        st.check_speculation(leader, self.id, term);
        if st.spec.is_none() {
            return;
        }
        // A new part when time has moved since the last one began (the last one is sealed).
        let stamp_ms = st.next_stamp(&*self.clock);
        let spec = st.spec.as_mut().expect("checked above");
        match g.parts.last() {
            Some(&(_, last_ms)) if last_ms == stamp_ms => {}
            last => {
                if let Some(&(start, _)) = last {
                    spec.engine.end_batch(g.seen - start);
                }
                g.parts.push((g.seen, stamp_ms));
            }
        }
        let from = g.seen;
        answer_fast(
            &mut spec.engine,
            stamp_ms,
            &g.pending.commands[from..],
            &mut g.pending.replies[from..],
        )
        .into_iter()
        .for_each(|(i, outcome)| g.early.push((from + i, outcome)));
        g.seen = g.pending.len();
    }

    /// At the start of a batch: builds the speculative engine if this node leads a new term
    /// and some limit is fast. A failed attempt is not retried for a while, so a lagging
    /// apply cannot stall every batch.
    async fn refresh_speculation(&self, st: &mut LoopState) {
        let (leader, term) = self.leadership();
        let stale = st.spec.as_ref().is_none_or(|s| s.term != term);
        if leader != Some(self.id) || !stale || tokio::time::Instant::now() < st.next_attempt {
            return;
        }
        st.spec = None;
        if !self.applied.lock().engine.has_fast_limits() {
            return;
        }
        st.spec = self.speculate(term, st).await;
        if st.spec.is_none() {
            st.next_attempt = tokio::time::Instant::now() + SPECULATION_RETRY;
        }
    }

    /// Proposes the gathered batch (or forwards it when this node does not lead). Returns
    /// false when Raft has stopped.
    async fn propose(
        &self,
        mut g: Group,
        permit: tokio::sync::OwnedSemaphorePermit,
        st: &mut LoopState,
    ) -> bool {
        // Decided only now that this batch holds its permit: a batch in flight that failed
        // while we waited resets speculation before this one goes into the log.
        let (leader, term) = self.leadership();
        st.check_speculation(leader, self.id, term);
        if st.spec.is_none() && !g.parts.is_empty() {
            g.abandon_speculation();
        }
        if leader != Some(self.id) {
            let forwarder = self.forwarder.clone();
            let raft = self.raft.clone();
            tokio::spawn(async move {
                forward(&raft, &forwarder, leader, g.pending).await;
                drop(permit);
            });
            return true;
        }
        if let (Some(spec), Some(&(start, _))) = (st.spec.as_mut(), g.parts.last()) {
            spec.engine.end_batch(g.pending.len() - start);
        }
        if g.seen < g.pending.len() || g.parts.is_empty() {
            // Commands the speculative engine never saw: one part, stamped now.
            g.parts.push((g.seen, st.next_stamp(&*self.clock)));
        }
        let (entry, replies, early) = g.into_batch();
        let commands = entry.commands.len() as u64;
        // One span per batch, from its proposal until its callers have their outcomes
        // (exported as a trace with --otlp-endpoint; its apply is a `raft.apply` span).
        let span = tracing::info_span!("raft.batch", commands, term);
        let proposed = self
            .raft
            .client_write_ff(entry)
            .instrument(span.clone())
            .await;
        match proposed {
            Ok(responder) => {
                // Before it can commit: counted before any caller waiting for the commit hears.
                self.stats.proposed_batch_commands.record(commands);
                let settled =
                    settle_after_commit(responder, replies, early, st.broken.clone(), permit);
                tokio::spawn(settled.instrument(span));
                true
            }
            Err(fatal) => {
                tracing::error!(error = %fatal, "raft stopped");
                fail_all(replies, &NodeError::Stopped);
                false
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
    async fn speculate(&self, term: u64, st: &LoopState) -> Option<Speculative> {
        let window = self.config.max_inflight_batches;
        let all = st
            .inflight
            .acquire_many(window as u32)
            .await
            .expect("semaphore never closed");
        // Every batch of ours has settled: a failure among them concerns the old state.
        st.broken.store(false, Ordering::SeqCst);
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

/// Applies part of a batch to the speculative engine and answers every fast decision at once.
/// Returns the early answers `(index in the part, outcome)` so the commit can confirm them.
fn answer_fast(
    engine: &mut Engine,
    stamp_ms: i64,
    commands: &[Command],
    replies: &mut [Option<Reply>],
) -> Vec<(usize, Outcome)> {
    let mut early = Vec::new();
    for (i, outcome) in engine
        .apply_part(stamp_ms, commands)
        .into_iter()
        .enumerate()
    {
        if matches!(&outcome, Outcome::RateLimit(d) if d.fast)
            && let Some(reply) = replies[i].take()
        {
            let _ = reply.send(Ok(outcome.clone()));
            early.push((i, outcome));
        }
    }
    early
}

/// Waits for a proposed batch to be committed and applied, answers its callers, then releases
/// its in-flight permit. openraft 0.9 can leave a deposed leader's responders unresolved: the
/// wait is bounded, so a lost batch never holds its permit (and the proposer) for ever; its
/// callers are then told its fate is unknown.
async fn settle_after_commit<F, E>(
    responder: F,
    replies: Vec<Option<Reply>>,
    early: EarlyAnswers,
    broken: Arc<AtomicBool>,
    permit: tokio::sync::OwnedSemaphorePermit,
) where
    F: std::future::Future<Output = Result<WriteResult, E>>,
    E: std::fmt::Display,
{
    let ok = match tokio::time::timeout(COMMIT_WAIT_MAX, responder).await {
        Ok(result) => settle(result, replies, early),
        Err(_) => {
            let error = NodeError::Unavailable("no commit within the commit wait bound".into());
            fail_all(replies, &error);
            false
        }
    };
    if !ok {
        broken.store(true, Ordering::SeqCst);
    }
    drop(permit);
}

/// Hands every caller of a committed batch its own outcome, and checks the early answers
/// against the committed ones. Returns false when speculation can no longer be trusted.
fn settle<E: std::fmt::Display>(
    result: Result<WriteResult, E>,
    replies: Vec<Option<Reply>>,
    early: EarlyAnswers,
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
        // Commands answered early were taken out when speculation was abandoned (a follower
        // has none): a second decision by the leader could contradict the answer given.
        let Some(reply) = reply else { continue };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn group_of(n: u64) -> (Group, Vec<oneshot::Receiver<Result<Outcome, NodeError>>>) {
        let mut pending = Pending::with_capacity(8);
        let mut receivers = Vec::new();
        for node_id in 0..n {
            let (reply, rx) = oneshot::channel();
            receivers.push(rx);
            pending.push(Proposal {
                command: Command::RetireNode { node_id },
                forwardable: node_id % 2 == 0,
                reply,
            });
        }
        let group = Group {
            pending,
            early: Vec::new(),
            parts: Vec::new(),
            seen: 0,
            opened: tokio::time::Instant::now(),
        };
        (group, receivers)
    }

    #[tokio::test]
    async fn abandoned_speculation_drops_answered_commands_and_keeps_the_rest_in_order() {
        let (mut g, _receivers) = group_of(5);
        // Commands 1 and 3 were answered early, in two parts.
        for i in [1, 3] {
            let reply = g.pending.replies[i].take().expect("not yet answered");
            let _ = reply.send(Ok(Outcome::Configured));
            g.early.push((i, Outcome::Configured));
        }
        g.parts = vec![(0, 10), (2, 11)];
        g.seen = 5;
        g.abandon_speculation();
        let ids: Vec<u64> = g
            .pending
            .commands
            .iter()
            .map(|c| match c {
                Command::RetireNode { node_id } => *node_id,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(ids, vec![0, 2, 4]);
        assert_eq!(g.pending.forwardable, vec![true, true, true]);
        assert!(g.pending.replies.iter().all(Option::is_some));
        assert!(g.early.is_empty() && g.parts.is_empty());
        assert_eq!(g.seen, 0, "the rest is stamped when proposed");
    }

    #[tokio::test]
    async fn a_batch_takes_no_more_commands_past_its_parts_bound() {
        let config = BatchConfig::default();
        let (mut g, _receivers) = group_of(1);
        g.parts = (0..MAX_PARTS_PER_BATCH - 1)
            .map(|i| (0, i as i64))
            .collect();
        assert!(g.has_room(config));
        g.parts.push((0, MAX_PARTS_PER_BATCH as i64));
        assert!(!g.has_room(config));
    }
}
