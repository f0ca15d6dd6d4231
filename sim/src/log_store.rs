//! `SimLogStore`: openraft's log storage (storage v2) over a simulated disk that can lose what
//! was not synced.
//!
//! The disk ([`Disk`]) outlives the node: a crash drops the running Raft, and a restarted node
//! reopens the same disk. It behaves as a write-ahead log: every operation (append, vote,
//! committed id, truncate, purge) is written in order, is visible at once to its own
//! incarnation, and becomes durable when a later fsync covers it. One flush worker per
//! incarnation syncs everything written so far (group commit) after a simulated fsync delay
//! (slow disks come from the seed), then reports the appends it covered as flushed
//! (`LogFlushed`) and releases votes waiting to be durable. A crash keeps only the synced
//! prefix: an unsynced tail of appends, truncations, purges, committed ids — and a vote whose
//! save had not returned — is lost, as it would be on a real disk.
//!
//! What is not modelled: torn or corrupted records, lying disks (an fsync that reports success
//! and loses data), and raft-log's own flush thread and files (the production store).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AnyError, OptionalSend, StorageIOError};
use parking_lot::{Mutex, MutexGuard};
use tally_server::node::raft_types::{Entry, LogId, NodeId, StorageError, TypeConfig, Vote};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::audit::Audit;
use crate::rng::SimRng;

/// Deliberately broken disks, to show the invariants catch what they should (tests only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskSabotage {
    /// fsync reports success but persists nothing half of the time.
    LyingFsync,
    /// Votes are acknowledged at once and never synced on their own.
    VolatileVotes,
}

/// One node's disk: survives the node's crashes.
pub struct Disk {
    pub node: NodeId,
    inner: Mutex<DiskInner>,
    rng: SimRng,
    audit: Audit,
    sabotage: Option<DiskSabotage>,
}

/// The log as seen at one moment.
#[derive(Clone, Default)]
struct Image {
    vote: Option<Vote>,
    committed: Option<LogId>,
    purged: Option<LogId>,
    entries: BTreeMap<u64, Entry>,
}

enum Op {
    Vote(Vote),
    Committed(Option<LogId>),
    Append(Vec<Entry>),
    Truncate(u64),
    Purge(LogId),
}

impl Image {
    fn apply(&mut self, op: &Op) {
        match op {
            Op::Vote(v) => self.vote = Some(*v),
            Op::Committed(c) => self.committed = *c,
            Op::Append(entries) => {
                for e in entries {
                    self.entries.insert(e.log_id.index, e.clone());
                }
            }
            Op::Truncate(index) => {
                self.entries.split_off(index);
            }
            Op::Purge(log_id) => {
                self.entries = self.entries.split_off(&(log_id.index + 1));
                if self.purged.is_none_or(|p| p < *log_id) {
                    self.purged = Some(*log_id);
                }
            }
        }
    }

    fn last_log_id(&self) -> Option<LogId> {
        self.entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(self.purged)
    }
}

enum Waiter {
    Append(LogFlushed<TypeConfig>),
    Vote(oneshot::Sender<()>),
}

struct DiskInner {
    /// Bumped by every crash: a store of an older epoch belongs to a dead incarnation.
    epoch: u64,
    live: Image,
    durable: Image,
    /// Written, not yet synced: (sequence number, operation).
    pending: VecDeque<(u64, Op)>,
    next_seq: u64,
    waiters: Vec<(u64, Waiter)>,
    notify: Arc<Notify>,
    worker: Option<JoinHandle<()>>,
    /// A normal fsync takes this long (µs, uniform).
    fsync_us: (u64, u64),
    /// A slow-disk episode: until when, and the extra delay per fsync (ms, uniform).
    slow: Option<(Instant, (u64, u64))>,
    stats: DiskStats,
    /// The highest index this disk reported to the audit as committed.
    committed_seen: Option<u64>,
}

/// Counts for the end-of-seed summary.
#[derive(Clone, Copy, Debug, Default)]
pub struct DiskStats {
    pub fsyncs: u64,
    pub appends: u64,
    pub lost_ops: u64,
}

/// What a crash threw away.
#[derive(Clone, Copy, Debug, Default)]
pub struct CrashLoss {
    pub appends: u64,
    pub entries: u64,
    pub votes: u64,
    pub other: u64,
}

impl fmt::Display for CrashLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "lost unsynced: {} append(s) of {} entries, {} vote(s), {} other op(s)",
            self.appends, self.entries, self.votes, self.other
        )
    }
}

impl Disk {
    pub fn new(
        node: NodeId,
        rng: SimRng,
        audit: Audit,
        fsync_us: (u64, u64),
        sabotage: Option<DiskSabotage>,
    ) -> Arc<Disk> {
        Arc::new(Disk {
            node,
            inner: Mutex::new(DiskInner {
                epoch: 0,
                live: Image::default(),
                durable: Image::default(),
                pending: VecDeque::new(),
                next_seq: 1,
                waiters: Vec::new(),
                notify: Arc::new(Notify::new()),
                worker: None,
                fsync_us,
                slow: None,
                stats: DiskStats::default(),
                committed_seen: None,
            }),
            rng,
            audit,
            sabotage,
        })
    }

    /// Opens the disk for a new incarnation of its node (the first start or a restart after
    /// [`Disk::crash`]): starts its flush worker and hands openraft a store.
    pub fn open(self: &Arc<Self>) -> SimLogStore {
        let mut g = self.inner.lock();
        assert!(
            g.worker.is_none(),
            "disk of node {} opened twice",
            self.node
        );
        let notify = Arc::new(Notify::new());
        g.notify = notify.clone();
        let epoch = g.epoch;
        g.worker = Some(tokio::spawn(flush_worker(self.clone(), epoch, notify)));
        SimLogStore {
            disk: self.clone(),
            epoch,
        }
    }

    /// The node's process dies: whatever was not synced is gone, and the running
    /// incarnation's store fails every further call.
    pub fn crash(&self) -> CrashLoss {
        let (waiters, worker, loss) = {
            let mut g = self.inner.lock();
            g.epoch += 1;
            let mut loss = CrashLoss::default();
            for (_, op) in &g.pending {
                match op {
                    Op::Append(e) => {
                        loss.appends += 1;
                        loss.entries += e.len() as u64;
                    }
                    Op::Vote(_) => loss.votes += 1,
                    _ => loss.other += 1,
                }
            }
            g.stats.lost_ops += g.pending.len() as u64;
            g.pending.clear();
            g.live = g.durable.clone();
            (std::mem::take(&mut g.waiters), g.worker.take(), loss)
        };
        if let Some(worker) = worker {
            worker.abort();
        }
        // Dropping the callbacks: the dead Raft sees its appends and votes fail.
        drop(waiters);
        loss
    }

    /// Every fsync takes `extra_ms` longer (uniform) until `until`.
    pub fn slow_down(&self, until: Instant, extra_ms: (u64, u64)) {
        self.inner.lock().slow = Some((until, extra_ms));
    }

    pub fn heal(&self) {
        self.inner.lock().slow = None;
    }

    /// The current incarnation's epoch (0 at the first start, +1 per crash).
    pub fn epoch(&self) -> u64 {
        self.inner.lock().epoch
    }

    pub fn stats(&self) -> DiskStats {
        self.inner.lock().stats
    }

    fn fsync_delay(&self) -> Duration {
        let (normal, slow) = {
            let g = self.inner.lock();
            let slow = g.slow.filter(|(until, _)| Instant::now() < *until);
            (g.fsync_us, slow.map(|(_, ms)| ms))
        };
        let mut us = self.rng.between(normal.0, normal.1);
        if let Some((lo, hi)) = slow {
            us += self.rng.between(lo, hi) * 1000;
        }
        Duration::from_micros(us)
    }
}

impl DiskInner {
    fn write(&mut self, op: Op) -> u64 {
        self.live.apply(&op);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.push_back((seq, op));
        seq
    }

    /// Sabotage: the waiters up to `seq` hear "synced", the data stays volatile.
    fn report_without_sync(&mut self, seq: u64) -> Vec<Waiter> {
        let (done, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|(s, _)| *s <= seq);
        self.waiters = rest;
        done.into_iter().map(|(_, w)| w).collect()
    }

    fn sync_upto(&mut self, seq: u64) -> Vec<Waiter> {
        while self.pending.front().is_some_and(|(s, _)| *s <= seq) {
            let (_, op) = self.pending.pop_front().expect("front exists");
            self.durable.apply(&op);
        }
        self.stats.fsyncs += 1;
        let (done, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|(s, _)| *s <= seq);
        self.waiters = rest;
        done.into_iter().map(|(_, w)| w).collect()
    }
}

/// One incarnation's flush worker: syncs everything written so far, then reports.
async fn flush_worker(disk: Arc<Disk>, epoch: u64, notify: Arc<Notify>) {
    loop {
        notify.notified().await;
        loop {
            let target = {
                let g = disk.inner.lock();
                if g.epoch != epoch {
                    return;
                }
                if g.waiters.is_empty() {
                    break;
                }
                g.next_seq - 1
            };
            tokio::time::sleep(disk.fsync_delay()).await;
            let lie = disk.sabotage == Some(DiskSabotage::LyingFsync) && disk.rng.chance(0.5);
            let done = {
                let mut g = disk.inner.lock();
                if g.epoch != epoch {
                    return;
                }
                if lie {
                    g.report_without_sync(target)
                } else {
                    g.sync_upto(target)
                }
            };
            for waiter in done {
                match waiter {
                    Waiter::Append(cb) => cb.log_io_completed(Ok(())),
                    Waiter::Vote(tx) => {
                        let _ = tx.send(());
                    }
                }
            }
        }
    }
}

/// openraft's handle on a [`Disk`], for one incarnation.
#[derive(Clone)]
pub struct SimLogStore {
    disk: Arc<Disk>,
    epoch: u64,
}

fn crashed() -> StorageError {
    StorageIOError::write(AnyError::error("simulated crash: this incarnation is dead")).into()
}

impl SimLogStore {
    // openraft's StorageError is what every storage method returns anyway.
    #[allow(clippy::result_large_err)]
    fn lock(&self) -> Result<MutexGuard<'_, DiskInner>, StorageError> {
        let g = self.disk.inner.lock();
        if g.epoch == self.epoch {
            Ok(g)
        } else {
            Err(crashed())
        }
    }
}

impl fmt::Debug for SimLogStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SimLogStore(node {}, epoch {})",
            self.disk.node, self.epoch
        )
    }
}

impl RaftLogReader<TypeConfig> for SimLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let g = self.lock()?;
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(*i),
            Bound::Excluded(i) => Bound::Excluded(*i),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(*i),
            Bound::Excluded(i) => Bound::Excluded(*i),
            Bound::Unbounded => Bound::Unbounded,
        };
        let first = match start {
            Bound::Included(i) => Some(i),
            Bound::Excluded(i) => Some(i + 1),
            Bound::Unbounded => None,
        };
        // As the production store: only the run from the range's start, without gaps.
        Ok(tally_server::node::log_store::contiguous_from(
            first,
            g.live.entries.range((start, end)).map(|(_, e)| e.clone()),
        ))
    }
}

impl RaftLogStorage<TypeConfig> for SimLogStore {
    type LogReader = SimLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let g = self.lock()?;
        Ok(LogState {
            last_purged_log_id: g.live.purged,
            last_log_id: g.live.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> SimLogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        // A vote counts only once it is durable: wait for the fsync that covers it.
        let rx = {
            let mut g = self.lock()?;
            let seq = g.write(Op::Vote(*vote));
            if self.disk.sabotage == Some(DiskSabotage::VolatileVotes) {
                return Ok(());
            }
            let (tx, rx) = oneshot::channel();
            g.waiters.push((seq, Waiter::Vote(tx)));
            g.notify.notify_one();
            rx
        };
        rx.await.map_err(|_| crashed())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.lock()?.live.vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let mut g = self.lock()?;
        // openraft applies up to `committed` next: the log up to it is the committed log.
        if let Some(upto) = committed {
            let from = g.committed_seen.map_or(0, |c| c + 1);
            if upto.index >= from {
                self.disk.audit.record_committed(
                    self.disk.node,
                    g.live.entries.range(from..=upto.index).map(|(_, e)| e),
                );
                g.committed_seen = Some(upto.index);
            }
        }
        // Written, not synced: the next append's or vote's fsync makes it durable.
        g.write(Op::Committed(committed));
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.lock()?.live.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut g = self.lock()?;
        self.disk
            .audit
            .record_append(self.disk.node, self.epoch, &entries);
        g.stats.appends += 1;
        let seq = g.write(Op::Append(entries));
        g.waiters.push((seq, Waiter::Append(callback)));
        g.notify.notify_one();
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.lock()?.write(Op::Truncate(log_id.index));
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.lock()?.write(Op::Purge(log_id));
        Ok(())
    }
}
