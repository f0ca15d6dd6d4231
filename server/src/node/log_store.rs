//! The durable Raft log: openraft's [`RaftLogStorage`] on top of the `raft-log` crate.
//!
//! # Layout
//!
//! One directory per node, owned by `raft-log`: a `LOCK` file (an exclusive `flock`, so a second
//! [`LogStore`] on the same directory fails with [`LogStoreError::Locked`]) and chunk files
//! `r-<26-digit global byte offset>.wal`. Every chunk starts with a checkpoint record (vote, last,
//! committed and purged log ids), followed by action records: `SaveVote`, `Append`, `Commit`,
//! `TruncateAfter`, `PurgeUpto`. Each record is `type (u32) | body | crc32`. An `Append` body is
//! the log id (term, leader node id, index as three big-endian u64) and the entry payload as
//! `len (u32) | format version (1 byte) | postcard(EntryPayload)`; blank, membership and normal
//! (batch) entries all round-trip.
//!
//! # What is durable when
//!
//! - [`RaftLogStorage::append`]: when it returns, the entries are readable (by this store and by
//!   every [`LogReader`]) but not yet on disk. The [`LogFlushed`] callback is called only after
//!   the flush worker has `write`n the records and `fdatasync`ed the chunk file (`File::sync_data`);
//!   an I/O or sync error is reported through the callback instead. (Entries at or below the
//!   purge point are already in a snapshot; openraft never appends them, and they are skipped.)
//! - [`RaftLogStorage::save_vote`]: on disk (`fdatasync` done) when it returns. This also makes
//!   every record written before it durable (one file, written in order).
//! - [`RaftLogStorage::save_committed`]: handed to the OS when it returns (it survives a crash of
//!   the process), on disk with the next `fdatasync` (the next append or vote). After a power
//!   loss it can read back older than it was; openraft treats it as a hint (a restarted node
//!   re-applies logs up to it and learns the rest from the leader), so that is safe.
//! - [`RaftLogStorage::truncate`]: handed to the OS on return, on disk with the next `fdatasync`
//!   (at the latest with the append that follows it, which is what Raft needs: a lost truncation
//!   only brings back uncommitted entries the leader will truncate again).
//! - [`RaftLogStorage::purge`]: the purge record is `fdatasync`ed by the flush worker in the
//!   background (purge does not wait); chunk files whose entries are all purged are unlinked only
//!   after that sync, then the directory is synced. A purge lost to a crash brings back entries
//!   that are behind the snapshot anyway.
//!
//! # Group commit
//!
//! `raft-log` hands each flush to one background thread (`chunked_wal_flush_worker`, in the
//! `chunked-wal` crate). The worker takes the first queued write request, keeps collecting
//! further write requests for up to [`LogStoreConfig::flush_batch_wait`] (and at most 2048),
//! writes them with one vectored `write`, calls `sync_data` **once**, then runs every request's
//! callback. Requests that arrive while a sync runs queue up and form the next batch. So one
//! `fdatasync` serves every append (and vote) waiting at that moment; the `group_commit` test
//! checks this with the worker's own counters ([`LogStoreStats::fsyncs`] against
//! [`LogStoreStats::flush_requests`]).
//!
//! A store given the node's [`NodeStats`] ([`LogStore::with_stats`]) records there how long each
//! append's flush took, from its hand-off to the flush worker to its callback (so the wait
//! behind a sync in progress, the group-commit wait, the write and the `fdatasync`), recorded
//! on the worker before openraft hears of it.
//!
//! # Memory bound
//!
//! `raft-log` keeps every payload of the *open* chunk in memory (they may not be on disk yet) and
//! caches older ones up to a bound, serving the rest from the chunk files with `pread`. Payloads
//! become evictable once the chunk they sit in is closed and its successor has been synced. The
//! resident payload bytes are therefore at most `cache_max_bytes` plus what the open chunk and
//! the chunk closed just before it hold: `cache_max_bytes + 2 × chunk_max_bytes` (plus one
//! entry), 128 MiB with the defaults; likewise for entry counts (`cache_max_entries + 2 ×
//! chunk_max_records`). Beyond payloads, `raft-log` keeps ~100 bytes of index per entry that is
//! not purged (bounded by purging behind snapshots), up to `flush_queue_max_bytes` of encoded
//! records waiting for the flush worker (appends block beyond it: backpressure), and while
//! opening, one chunk's records at a time.
//!
//! # Crash recovery
//!
//! On open, `raft-log` replays every chunk in order. In the newest chunk:
//! - a trailing record cut short (a torn write: the file ends inside a record) is detected by the
//!   decoder running out of bytes (`UnexpectedEof`); the file is truncated to the end of the last
//!   whole record (`set_len` + `fsync`), that chunk is kept read-only and a fresh chunk is started
//!   after it. Everything before the torn record is recovered; the torn record itself was never
//!   acknowledged (its `fdatasync` had not completed), so losing it is safe.
//! - a tail of zero bytes (ext4 `data=writeback` after a crash) is treated the same way;
//! - a trailing chunk file without a complete first record (a crash while rotating chunks) is
//!   deleted;
//! - a record that fails to decode for any other reason (bad checksum, unknown record type) with
//!   non-zero bytes from it to the end of the file is *not* a torn write but damage: opening fails
//!   with [`LogStoreError::Corrupt`] rather than silently dropping records that may have been
//!   acknowledged. The node's log must then be rebuilt (wipe the directory and let the node catch
//!   up from the leader by snapshot).
//!
//! Damage anywhere but in the newest chunk also fails the open with [`LogStoreError::Corrupt`].
//!
//! # Threads
//!
//! `raft-log` is single-writer: the log sits behind one `parking_lot::Mutex`, shared by the store
//! and its cheap [`LogReader`] clones. Every operation takes the lock on a tokio blocking thread
//! (`spawn_blocking`): the lock is held only for in-memory work and `pread`s of evicted entries,
//! but appending can also create a chunk file (and sync the directory) or wait for room in the
//! flush queue, which must not stall a runtime worker. Waiting for an `fdatasync` is always an
//! await on a tokio oneshot fed by the flush worker's callback.
//!
//! The log is closed when [`LogStoreHandle::close`] runs (off the runtime, reporting a failed
//! final sync) or when the store and all its readers are dropped (then the dropping thread joins
//! the flush worker after one last sync). Either releases the directory lock.

use std::fmt;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, OptionalSend};
use parking_lot::Mutex;
use raft_log::RaftLog;
use raft_log::api::raft_log_writer::RaftLogWriter;
use raft_log::codeq::{Decode, Encode};
use tokio::sync::oneshot;

use super::raft_types::{Entry, LogId, StorageError, TypeConfig, Vote};
use super::stats::NodeStats;

/// The version byte in front of every encoded entry payload.
const PAYLOAD_FORMAT_V1: u8 = 1;

/// How the log store sizes its chunks, cache and group commit.
#[derive(Clone, Debug)]
pub struct LogStoreConfig {
    /// A chunk file is closed (and a new one started) once it holds this many bytes.
    pub chunk_max_bytes: usize,
    /// ... or this many records.
    pub chunk_max_records: usize,
    /// Payload bytes cached beyond the open chunk's (see the module docs for the bound).
    pub cache_max_bytes: usize,
    /// Entries cached beyond the open chunk's.
    pub cache_max_entries: usize,
    /// How long the flush worker waits, after the first write request of a batch, for more to
    /// share its `fdatasync`. Zero is raised to 1 µs: at zero the worker would not even drain
    /// requests already queued, and would sync them one by one.
    pub flush_batch_wait: Duration,
    /// Encoded bytes queued for the flush worker at most; appends wait beyond it.
    pub flush_queue_max_bytes: usize,
}

impl Default for LogStoreConfig {
    fn default() -> Self {
        LogStoreConfig {
            chunk_max_bytes: 32 << 20,
            chunk_max_records: 65_536,
            cache_max_bytes: 64 << 20,
            cache_max_entries: 65_536,
            flush_batch_wait: Duration::from_micros(200),
            flush_queue_max_bytes: 32 << 20,
        }
    }
}

/// Why the log store could not be opened (or was used after [`LogStoreHandle::close`]).
#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    #[error("raft log directory {} is not valid UTF-8", .0.display())]
    InvalidPath(PathBuf),
    #[error("raft log directory {} is in use by another log store: {source}", dir.display())]
    Locked {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("raft log in {} is damaged and was not opened: {source}", dir.display())]
    Corrupt {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("raft log in {}: {source}", dir.display())]
    Io {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("raft log store is closed")]
    Closed,
}

/// Counters of a log store, for status pages and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogStoreStats {
    /// Chunk files in use (closed ones plus the open one).
    pub chunk_files: usize,
    /// Bytes of the chunk files in use.
    pub on_disk_bytes: u64,
    /// Entries whose payload is in memory.
    pub cached_entries: u64,
    /// Payload bytes in memory.
    pub cached_bytes: u64,
    /// Reads served from disk because the payload was evicted.
    pub cache_misses: u64,
    /// `fdatasync` calls by the flush worker (one per group-commit batch that needed one).
    pub fsyncs: u64,
    /// Flush requests the worker handled (one per append, vote, commit, ...).
    pub flush_requests: u64,
}

/// The durable Raft log store. Hand it to openraft; keep a [`LogStoreHandle`] to close it.
pub struct LogStore {
    shared: Arc<Shared>,
    /// Where appends' flush times go, if anywhere.
    stats: Option<Arc<NodeStats>>,
}

/// A cheap reader sharing the store's log, as openraft's replication tasks use it.
#[derive(Clone)]
pub struct LogReader {
    shared: Arc<Shared>,
}

/// A handle that can close the store (releasing its directory) and read its counters, kept by
/// whoever owns the node after the store itself went to openraft.
#[derive(Clone)]
pub struct LogStoreHandle {
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    /// `None` once closed.
    log: Mutex<Option<RaftLog<TallyWal>>>,
}

impl LogStore {
    /// Opens (or creates) the log in `dir` with the default [`LogStoreConfig`], recovering from
    /// a torn write at its end. Blocking: it replays the whole log (call it before the runtime
    /// gets busy, or from `spawn_blocking`).
    pub fn open(dir: &Path) -> Result<LogStore, LogStoreError> {
        LogStore::open_with(dir, LogStoreConfig::default())
    }

    /// [`LogStore::open`] with an explicit configuration.
    pub fn open_with(dir: &Path, config: LogStoreConfig) -> Result<LogStore, LogStoreError> {
        let dir_str = dir
            .to_str()
            .ok_or_else(|| LogStoreError::InvalidPath(dir.to_path_buf()))?;
        std::fs::create_dir_all(dir).map_err(|source| LogStoreError::Io {
            dir: dir.to_path_buf(),
            source,
        })?;

        let mut wal = raft_log::chunked_wal::Config::new(dir_str);
        wal.chunk_max_size = Some(config.chunk_max_bytes.max(1));
        wal.chunk_max_records = Some(config.chunk_max_records.max(1));
        wal.read_buffer_size = Some(1 << 20);
        wal.truncate_incomplete_record = Some(true);
        wal.flush_batch_wait = Some(config.flush_batch_wait.max(Duration::from_micros(1)));
        wal.flush_queue_max_bytes = Some(config.flush_queue_max_bytes.max(1));
        let raft_log_config = raft_log::Config {
            wal,
            log_cache_max_items: Some(config.cache_max_entries),
            log_cache_capacity: Some(config.cache_max_bytes),
        };

        let log = RaftLog::<TallyWal>::open(Arc::new(raft_log_config)).map_err(|source| {
            let dir = dir.to_path_buf();
            match source.kind() {
                io::ErrorKind::WouldBlock => LogStoreError::Locked { dir, source },
                io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => {
                    LogStoreError::Corrupt { dir, source }
                }
                _ => LogStoreError::Io { dir, source },
            }
        })?;
        let state = log.log_state();
        tracing::info!(
            dir = %dir.display(),
            vote = ?state.vote().map(|v| v.0),
            committed = ?state.committed().map(|l| l.0),
            purged = ?state.purged().map(|l| l.0),
            last = ?state.last().map(|l| l.0),
            "raft log opened"
        );

        Ok(LogStore {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                log: Mutex::new(Some(log)),
            }),
            stats: None,
        })
    }

    /// Records every append's flush time in `stats` ([`NodeStats::log_flush_nanos`]).
    pub fn with_stats(mut self, stats: Arc<NodeStats>) -> LogStore {
        self.stats = Some(stats);
        self
    }

    /// The directory the log lives in.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// A reader sharing this store's log (what [`RaftLogStorage::get_log_reader`] returns).
    pub fn reader(&self) -> LogReader {
        LogReader {
            shared: self.shared.clone(),
        }
    }

    /// A handle to close the store and read its counters.
    pub fn handle(&self) -> LogStoreHandle {
        LogStoreHandle {
            shared: self.shared.clone(),
        }
    }

    /// Appends `entries`; `callback` runs on the flush worker after their `fdatasync`.
    async fn append_with(&self, entries: Vec<Entry>, callback: FlushCallback) -> io::Result<()> {
        let records = entries
            .iter()
            .map(|entry| {
                Ok((
                    WalLogId(entry.log_id),
                    WalPayload::encode_payload(&entry.payload)?,
                ))
            })
            .collect::<io::Result<Vec<_>>>()?;
        let stats = self.stats.clone();
        self.shared
            .blocking(move |log| {
                // Entries at or below the purge point are already covered by a snapshot (openraft
                // never sends them; its storage suite does): skip them rather than fail.
                let purged = log.log_state().purged().map(|p| p.0.index);
                let fresh = records
                    .into_iter()
                    .filter(|(id, _)| purged.is_none_or(|p| id.0.index > p));
                log.append(fresh)?;
                let timer = stats.map(|stats| FlushTimer {
                    since: Instant::now(),
                    stats,
                });
                log.flush(true, Some(Flush { callback, timer }))
            })
            .await
    }
}

impl LogStoreHandle {
    /// Syncs everything written so far, then closes the log and releases its directory, even
    /// while openraft still holds the store or readers (they then fail with a storage error).
    /// Closing twice is fine.
    pub async fn close(&self) -> Result<(), LogStoreError> {
        let shared = self.shared.clone();
        let result = run_blocking(move || {
            let Some(mut log) = shared.log.lock().take() else {
                return Ok(());
            };
            let (tx, rx) = oneshot::channel();
            log.flush(true, Some(FlushCallback::Notify(tx).into()))?;
            let synced = rx
                .blocking_recv()
                .unwrap_or_else(|_| Err(io::Error::other("flush worker stopped before syncing")));
            // Dropping the log joins its flush worker and releases the directory lock.
            drop(log);
            synced
        })
        .await;
        result.map_err(|source| LogStoreError::Io {
            dir: self.shared.dir.clone(),
            source,
        })
    }

    /// The store's counters.
    pub async fn stats(&self) -> Result<LogStoreStats, LogStoreError> {
        self.shared
            .blocking(|log| {
                let stat = log.stat();
                Ok(LogStoreStats {
                    chunk_files: stat.closed_chunks.len() + 1,
                    on_disk_bytes: log.on_disk_size(),
                    cached_entries: stat.payload_cache_item_count,
                    cached_bytes: stat.payload_cache_size,
                    cache_misses: stat.payload_cache_miss,
                    fsyncs: stat.flush_metrics.sync_batch_count,
                    flush_requests: stat.flush_metrics.write_request_count,
                })
            })
            .await
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotConnected => LogStoreError::Closed,
                _ => LogStoreError::Io {
                    dir: self.shared.dir.clone(),
                    source,
                },
            })
    }
}

impl Shared {
    /// Runs `f` on the log, under its lock, on a blocking thread.
    async fn blocking<R, F>(self: &Arc<Self>, f: F) -> io::Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut RaftLog<TallyWal>) -> io::Result<R> + Send + 'static,
    {
        let shared = self.clone();
        run_blocking(move || {
            let mut guard = shared.log.lock();
            let log = guard.as_mut().ok_or_else(closed)?;
            f(log)
        })
        .await
    }

    /// Runs `f` on the log, then waits (asynchronously) until everything written so far,
    /// including what `f` wrote, is `fdatasync`ed.
    async fn blocking_synced<R, F>(self: &Arc<Self>, f: F) -> io::Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut RaftLog<TallyWal>) -> io::Result<R> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let value = self
            .blocking(move |log| {
                let value = f(log)?;
                log.flush(true, Some(FlushCallback::Notify(tx).into()))?;
                Ok(value)
            })
            .await?;
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("flush worker stopped before syncing")))?;
        Ok(value)
    }

    async fn read_entries(
        self: &Arc<Self>,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        if start >= end {
            return Ok(Vec::new());
        }
        let raw = self
            .blocking(move |log| log.read(start, end).collect::<io::Result<Vec<_>>>())
            .await
            .map_err(|e| storage_error(ErrorSubject::LogIndex(start), ErrorVerb::Read, e))?;
        // Decoded here, off the lock.
        let mut entries = Vec::with_capacity(raw.len());
        for (WalLogId(log_id), payload) in raw {
            match payload.decode_payload() {
                Ok(payload) => entries.push(Entry { log_id, payload }),
                Err(e) => return Err(storage_error(ErrorSubject::Log(log_id), ErrorVerb::Read, e)),
            }
        }
        Ok(contiguous_from((start > 0).then_some(start), entries))
    }
}

/// The entries of `entries` (in index order) that continue without a gap from `start` (from
/// the first entry when the read range has no start).
///
/// openraft 0.9 sends whatever a range read returns, and its follower appends it after the
/// request's `prev_log_id` without checking that the first entry follows it. A read racing a
/// purge (a snapshot installed meanwhile) that returned the surviving tail of the range put a
/// hole into a follower's log, which then could neither apply nor restart (found by the
/// simulator, seed 6323). A read returns the prefix of its range that exists, or nothing;
/// openraft treats nothing as a heartbeat and retries.
pub fn contiguous_from(start: Option<u64>, entries: impl IntoIterator<Item = Entry>) -> Vec<Entry> {
    let mut entries = entries.into_iter().peekable();
    let Some(start) = start.or_else(|| entries.peek().map(|e| e.log_id.index)) else {
        return Vec::new();
    };
    entries
        .enumerate()
        .take_while(|(i, e)| e.log_id.index == start + *i as u64)
        .map(|(_, e)| e)
        .collect()
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = index_range(&range);
        self.shared.read_entries(start, end).await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = index_range(&range);
        self.shared.read_entries(start, end).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.shared
            .blocking(|log| {
                let state = log.log_state();
                Ok(LogState {
                    last_purged_log_id: state.purged().map(|l| l.0),
                    last_log_id: state.last().map(|l| l.0),
                })
            })
            .await
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, e))
    }

    async fn get_log_reader(&mut self) -> LogReader {
        self.reader()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        self.shared
            .blocking_synced(move |log| log.save_vote(WalVote(vote)).map(drop))
            .await
            .map_err(|e| storage_error(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.shared
            .blocking(|log| Ok(log.log_state().vote().map(|v| v.0)))
            .await
            .map_err(|e| storage_error(ErrorSubject::Vote, ErrorVerb::Read, e))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Committed only moves forward; `None` (or an older id) has nothing to record.
        let Some(committed) = committed else {
            return Ok(());
        };
        self.shared
            .blocking(move |log| {
                if log
                    .log_state()
                    .committed()
                    .is_some_and(|c| c.0 >= committed)
                {
                    return Ok(());
                }
                log.commit(WalLogId(committed))?;
                // Hand it to the OS now; the next append's or vote's fdatasync makes it durable.
                log.flush(false, None)
            })
            .await
            .map_err(|e| storage_error(ErrorSubject::Store, ErrorVerb::Write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.shared
            .blocking(|log| Ok(log.log_state().committed().map(|l| l.0)))
            .await
            .map_err(|e| storage_error(ErrorSubject::Store, ErrorVerb::Read, e))
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
        let subject = match entries.last() {
            Some(last) => ErrorSubject::Log(last.log_id),
            None => ErrorSubject::Logs,
        };
        self.append_with(entries, FlushCallback::Raft(callback))
            .await
            .map_err(|e| storage_error(subject, ErrorVerb::Write, e))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.shared
            .blocking(move |log| {
                // Nothing at or after `log_id.index`: nothing to remove.
                if log
                    .log_state()
                    .last()
                    .is_none_or(|last| log_id.index > last.0.index)
                {
                    return Ok(());
                }
                log.truncate(log_id.index)?;
                log.flush(false, None)
            })
            .await
            .map_err(|e| storage_error(ErrorSubject::Log(log_id), ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.shared
            .blocking(move |log| {
                log.purge(WalLogId(log_id))?;
                // A sync flush: the worker fsyncs the purge record, then unlinks chunk files
                // that hold only purged entries. Not waited for (see the module docs).
                log.flush(true, None)
            })
            .await
            .map_err(|e| storage_error(ErrorSubject::Log(log_id), ErrorVerb::Delete, e))
    }
}

impl fmt::Debug for LogStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStore")
            .field("dir", &self.shared.dir)
            .finish()
    }
}

impl fmt::Debug for LogReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogReader")
            .field("dir", &self.shared.dir)
            .finish()
    }
}

impl fmt::Debug for LogStoreHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStoreHandle")
            .field("dir", &self.shared.dir)
            .finish()
    }
}

/// Runs blocking work off the runtime's worker threads.
async fn run_blocking<R, F>(f: F) -> io::Result<R>
where
    R: Send + 'static,
    F: FnOnce() -> io::Result<R> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(io::Error::other(format!(
            "log store task did not finish: {e}"
        ))),
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "raft log store is closed")
}

fn storage_error(subject: ErrorSubject<u64>, verb: ErrorVerb, e: io::Error) -> StorageError {
    StorageError::from_io_error(subject, verb, e)
}

/// A `RangeBounds<u64>` as a half-open `[start, end)`.
fn index_range(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

// ---- raft-log plumbing -------------------------------------------------------------------------

/// The `raft-log` type configuration.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct TallyWal;

impl raft_log::Types for TallyWal {
    type LogId = WalLogId;
    type LogPayload = WalPayload;
    type Vote = WalVote;
    type Callback = Flush;
    type UserData = ();

    fn log_index(log_id: &WalLogId) -> u64 {
        log_id.0.index
    }

    fn payload_size(payload: &WalPayload) -> u64 {
        payload.0.len() as u64
    }
}

/// An openraft log id, encoded as term, a reserved zero and index (big-endian u64 each). With
/// openraft's `single-term-leader` (one leader per term, standard Raft) a log id's leader part
/// is its term alone; the middle field is where the leader's node id was and is ignored.
/// Ordered as openraft orders log ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct WalLogId(LogId);

impl Encode for WalLogId {
    fn encode<W: io::Write>(&self, mut w: W) -> io::Result<usize> {
        Ok(self.0.leader_id.term.encode(&mut w)?
            + 0u64.encode(&mut w)?
            + self.0.index.encode(&mut w)?)
    }
}

impl Decode for WalLogId {
    fn decode<R: io::Read>(mut r: R) -> io::Result<Self> {
        let term = u64::decode(&mut r)?;
        let _reserved = u64::decode(&mut r)?;
        let index = u64::decode(&mut r)?;
        Ok(WalLogId(LogId::new(
            openraft::CommittedLeaderId::new(term, 0),
            index,
        )))
    }
}

/// The encoding of "voted for nobody"; node ids are below it (`tallyd` refuses it as an id).
pub const NO_VOTE: u64 = u64::MAX;

/// An openraft vote, encoded as term, the node voted for ([`NO_VOTE`] for none; big-endian
/// u64) and committed (one byte).
/// `raft-log` refuses a vote lower than the saved one, by openraft's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd)]
struct WalVote(Vote);

impl Encode for WalVote {
    fn encode<W: io::Write>(&self, mut w: W) -> io::Result<usize> {
        let voted_for = self.0.leader_id.voted_for.unwrap_or(NO_VOTE);
        Ok(self.0.leader_id.term.encode(&mut w)?
            + voted_for.encode(&mut w)?
            + self.0.committed.encode(&mut w)?)
    }
}

impl Decode for WalVote {
    fn decode<R: io::Read>(mut r: R) -> io::Result<Self> {
        let term = u64::decode(&mut r)?;
        let voted_for = u64::decode(&mut r)?;
        let committed = bool::decode(&mut r)?;
        let mut vote = Vote::new(term, voted_for);
        if voted_for == NO_VOTE {
            vote.leader_id.voted_for = None;
        }
        vote.committed = committed;
        Ok(WalVote(vote))
    }
}

/// An entry payload, encoded: `PAYLOAD_FORMAT_V1` then postcard. Kept encoded in the cache, so
/// its size there is exact and a cached read is an `Arc` clone. On disk it is length-prefixed
/// (u32), so a record cut short always decodes as `UnexpectedEof`, which is what lets recovery
/// tell a torn write from damage.
#[derive(Clone)]
struct WalPayload(Arc<[u8]>);

impl WalPayload {
    fn encode_payload(payload: &EntryPayload<TypeConfig>) -> io::Result<WalPayload> {
        let bytes = postcard::to_extend(payload, vec![PAYLOAD_FORMAT_V1]).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("encode entry: {e}"))
        })?;
        if u32::try_from(bytes.len()).is_err() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("entry of {} bytes is too large for the log", bytes.len()),
            ));
        }
        Ok(WalPayload(bytes.into()))
    }

    fn decode_payload(&self) -> io::Result<EntryPayload<TypeConfig>> {
        match self.0.split_first() {
            Some((&PAYLOAD_FORMAT_V1, body)) => postcard::from_bytes(body).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("decode entry: {e}"))
            }),
            Some((version, _)) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown entry format version {version}"),
            )),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "empty entry payload",
            )),
        }
    }
}

impl fmt::Debug for WalPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WalPayload({} bytes)", self.0.len())
    }
}

impl Encode for WalPayload {
    fn encode<W: io::Write>(&self, mut w: W) -> io::Result<usize> {
        let len = u32::try_from(self.0.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "entry too large"))?;
        w.write_all(&len.to_be_bytes())?;
        w.write_all(&self.0)?;
        Ok(4 + self.0.len())
    }
}

impl Decode for WalPayload {
    fn decode<R: io::Read>(r: R) -> io::Result<Self> {
        // codeq's `Vec<u8>` is the same `len (u32 BE) | bytes`, read without trusting `len` for
        // the allocation, and reports a short input as `UnexpectedEof`.
        Ok(WalPayload(Vec::<u8>::decode(r)?.into()))
    }
}

/// What the flush worker calls once a flush is done (after the `fdatasync` for a sync flush).
enum FlushCallback {
    /// openraft's append callback.
    Raft(LogFlushed<TypeConfig>),
    /// Someone awaiting the sync (vote, close, tests).
    Notify(oneshot::Sender<io::Result<()>>),
}

/// When a timed flush was handed to the worker, and where its time goes.
struct FlushTimer {
    since: Instant,
    stats: Arc<NodeStats>,
}

/// What the flush worker is given: the callback, and for an append of a store with stats, its
/// timer.
struct Flush {
    callback: FlushCallback,
    timer: Option<FlushTimer>,
}

impl From<FlushCallback> for Flush {
    fn from(callback: FlushCallback) -> Flush {
        Flush {
            callback,
            timer: None,
        }
    }
}

impl raft_log::Callback for Flush {
    fn send(self, res: io::Result<()>) {
        // Recorded first: once openraft hears, the entry may commit and its callers be answered.
        if let (Some(t), Ok(())) = (&self.timer, &res) {
            t.stats.log_flush_nanos.record_duration(t.since.elapsed());
        }
        match self.callback {
            FlushCallback::Raft(callback) => callback.log_io_completed(res),
            FlushCallback::Notify(tx) => {
                let _ = tx.send(res);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::io::Cursor;
    use std::path::PathBuf;

    use openraft::storage::{RaftLogStorageExt, RaftStateMachine};
    use openraft::testing::{StoreBuilder, Suite};
    use openraft::{BasicNode, CommittedLeaderId, Membership, RaftSnapshotBuilder};
    use tempfile::TempDir;

    use super::*;
    use crate::engine::{Command, Descriptor, LimitSet, Mode, RateLimitCommand};
    use crate::node::raft_types::{Batch, BatchOutcome, Snapshot, SnapshotMeta, StoredMembership};

    // ---- a minimal state machine, only for openraft's suite --------------------------------

    #[derive(Default)]
    struct SmState {
        last_applied: Option<LogId>,
        membership: StoredMembership,
        snapshot: Option<(SnapshotMeta, Vec<u8>)>,
        snapshots_built: u64,
    }

    /// Applies nothing but records the last applied log id and membership; a snapshot is the
    /// postcard of (last applied, membership).
    #[derive(Clone, Default)]
    struct TestSm(Arc<Mutex<SmState>>);

    fn sm_error(e: impl std::error::Error) -> StorageError {
        storage_error(
            ErrorSubject::StateMachine,
            ErrorVerb::Write,
            io::Error::other(e.to_string()),
        )
    }

    impl RaftStateMachine<TypeConfig> for TestSm {
        type SnapshotBuilder = TestSm;

        async fn applied_state(
            &mut self,
        ) -> Result<(Option<LogId>, StoredMembership), StorageError> {
            let st = self.0.lock();
            Ok((st.last_applied, st.membership.clone()))
        }

        async fn apply<I>(&mut self, entries: I) -> Result<Vec<BatchOutcome>, StorageError>
        where
            I: IntoIterator<Item = Entry> + OptionalSend,
            I::IntoIter: OptionalSend,
        {
            let mut st = self.0.lock();
            let mut outcomes = Vec::new();
            for entry in entries {
                st.last_applied = Some(entry.log_id);
                if let EntryPayload::Membership(m) = &entry.payload {
                    st.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                }
                outcomes.push(BatchOutcome::default());
            }
            Ok(outcomes)
        }

        async fn get_snapshot_builder(&mut self) -> TestSm {
            self.clone()
        }

        async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
            Ok(Box::new(Cursor::new(Vec::new())))
        }

        async fn install_snapshot(
            &mut self,
            meta: &SnapshotMeta,
            snapshot: Box<Cursor<Vec<u8>>>,
        ) -> Result<(), StorageError> {
            let data = snapshot.into_inner();
            let (last_applied, membership): (Option<LogId>, StoredMembership) =
                postcard::from_bytes(&data).map_err(sm_error)?;
            let mut st = self.0.lock();
            st.last_applied = last_applied;
            st.membership = membership;
            st.snapshot = Some((meta.clone(), data));
            Ok(())
        }

        async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
            let st = self.0.lock();
            Ok(st.snapshot.as_ref().map(|(meta, data)| Snapshot {
                meta: meta.clone(),
                snapshot: Box::new(Cursor::new(data.clone())),
            }))
        }
    }

    impl RaftSnapshotBuilder<TypeConfig> for TestSm {
        async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
            let mut st = self.0.lock();
            let data =
                postcard::to_stdvec(&(st.last_applied, st.membership.clone())).map_err(sm_error)?;
            st.snapshots_built += 1;
            let meta = SnapshotMeta {
                last_log_id: st.last_applied,
                last_membership: st.membership.clone(),
                snapshot_id: format!(
                    "{}-{}",
                    st.last_applied.map_or(0, |l| l.index),
                    st.snapshots_built
                ),
            };
            st.snapshot = Some((meta.clone(), data.clone()));
            Ok(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data)),
            })
        }
    }

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, TestSm, TempDir> for Builder {
        async fn build(&self) -> Result<(TempDir, LogStore, TestSm), StorageError> {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = LogStore::open(dir.path()).expect("open log store");
            Ok((dir, store, TestSm::default()))
        }
    }

    #[test]
    fn openraft_storage_suite() {
        Suite::<TypeConfig, LogStore, TestSm, Builder, TempDir>::test_all(Builder).unwrap();
    }

    // ---- helpers ---------------------------------------------------------------------------

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn command(i: u64, value_len: usize) -> Command {
        Command::RateLimit(RateLimitCommand {
            domain: "tally".to_string(),
            descriptors: vec![Descriptor {
                entries: vec![("key".to_string(), format!("{i}-{}", "x".repeat(value_len)))],
                hits: Some(i),
                limit_override: None,
            }],
            hits: 1,
            mode: Mode::Enforce,
        })
    }

    fn batch_entry(term: u64, index: u64, value_len: usize) -> Entry {
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Normal(Batch::new(
                1_700_000_000_000 + index as i64,
                vec![
                    command(index, value_len),
                    Command::ReplaceLimits(LimitSet::default()),
                ],
            )),
        }
    }

    fn membership_entry(term: u64, index: u64) -> Entry {
        let voters: BTreeSet<u64> = [1, 2, 3].into();
        let nodes: BTreeMap<u64, BasicNode> = (1..=4)
            .map(|id| (id, BasicNode::new(format!("127.0.0.1:{}", 7000 + id))))
            .collect();
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Membership(Membership::new(vec![voters], nodes)),
        }
    }

    fn blank_entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Blank,
        }
    }

    fn small_chunks() -> LogStoreConfig {
        LogStoreConfig {
            chunk_max_bytes: 4096,
            ..LogStoreConfig::default()
        }
    }

    async fn all_entries(store: &mut LogStore) -> Vec<Entry> {
        store.try_get_log_entries(..).await.unwrap()
    }

    fn chunk_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.starts_with("r-") && name.ends_with(".wal")
            })
            .collect();
        files.sort();
        files
    }

    /// Records in the open chunk (its leading checkpoint counts as one).
    fn open_chunk_records(store: &LogStore) -> u64 {
        store
            .shared
            .log
            .lock()
            .as_ref()
            .unwrap()
            .stat()
            .open_chunk
            .records_count
    }

    /// Appends `entries` one by one, then more blank ones if needed until the newest chunk
    /// file ends with an `Append` record (not with the checkpoint of a just-rotated chunk).
    /// Returns the last index appended.
    async fn fill(store: &mut LogStore, term: u64, from: u64, to: u64, value_len: usize) -> u64 {
        let mut index = from;
        while index <= to || open_chunk_records(store) < 2 {
            store
                .blocking_append([batch_entry(term, index, value_len)])
                .await
                .unwrap();
            index += 1;
        }
        index - 1
    }

    // ---- tests -----------------------------------------------------------------------------

    #[tokio::test]
    async fn every_payload_kind_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let entries = vec![
            blank_entry(1, 1),
            membership_entry(1, 2),
            batch_entry(1, 3, 10),
            batch_entry(2, 4, 0),
        ];
        {
            let mut store = LogStore::open(dir.path()).unwrap();
            store.blocking_append(entries.clone()).await.unwrap();
            assert_eq!(all_entries(&mut store).await, entries);
            let mut reader = store.get_log_reader().await;
            assert_eq!(
                reader.try_get_log_entries(2..=3).await.unwrap(),
                entries[1..3]
            );
            assert_eq!(reader.try_get_log_entries(3..3).await.unwrap(), vec![]);
            assert_eq!(reader.try_get_log_entries(9..).await.unwrap(), vec![]);
        }
        let mut store = LogStore::open(dir.path()).unwrap();
        assert_eq!(all_entries(&mut store).await, entries);
    }

    #[tokio::test]
    async fn reopen_restores_entries_vote_and_committed() {
        let dir = tempfile::tempdir().unwrap();
        let vote = Vote::new_committed(3, 2);
        let expected: Vec<Entry> = (1..=50).map(|i| batch_entry(3, i, 20)).collect();
        {
            let mut store = LogStore::open_with(dir.path(), small_chunks()).unwrap();
            store.save_vote(&vote).await.unwrap();
            store
                .blocking_append(expected[..30].to_vec())
                .await
                .unwrap();
            store
                .blocking_append(expected[30..].to_vec())
                .await
                .unwrap();
            store.save_committed(Some(log_id(3, 42))).await.unwrap();
            // An older committed id is ignored, not an error.
            store.save_committed(Some(log_id(3, 40))).await.unwrap();
            assert_eq!(store.read_committed().await.unwrap(), Some(log_id(3, 42)));
            assert!(chunk_files(dir.path()).len() > 1, "small chunks rotate");
        }
        let mut store = LogStore::open_with(dir.path(), small_chunks()).unwrap();
        assert_eq!(store.read_vote().await.unwrap(), Some(vote));
        assert_eq!(store.read_committed().await.unwrap(), Some(log_id(3, 42)));
        assert_eq!(
            store.get_log_state().await.unwrap(),
            LogState {
                last_purged_log_id: None,
                last_log_id: Some(log_id(3, 50)),
            }
        );
        assert_eq!(all_entries(&mut store).await, expected);

        // A lower vote is refused (raft-log checks openraft's order), a higher one is kept.
        assert!(store.save_vote(&Vote::new(2, 1)).await.is_err());
        store.save_vote(&Vote::new(4, 3)).await.unwrap();
        drop(store);
        let mut store = LogStore::open(dir.path()).unwrap();
        assert_eq!(store.read_vote().await.unwrap(), Some(Vote::new(4, 3)));
    }

    #[tokio::test]
    async fn truncate_then_append_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = LogStore::open(dir.path()).unwrap();
            store
                .blocking_append((1..=10).map(|i| batch_entry(1, i, 5)))
                .await
                .unwrap();
            store.save_committed(Some(log_id(1, 5))).await.unwrap();
            // Truncating past the end removes nothing.
            store.truncate(log_id(1, 11)).await.unwrap();
            store.truncate(log_id(1, 7)).await.unwrap();
            assert_eq!(
                store.get_log_state().await.unwrap().last_log_id,
                Some(log_id(1, 6))
            );
            store
                .blocking_append([batch_entry(2, 7, 5), batch_entry(2, 8, 5)])
                .await
                .unwrap();
        }
        let mut store = LogStore::open(dir.path()).unwrap();
        let ids: Vec<LogId> = all_entries(&mut store)
            .await
            .iter()
            .map(|e| e.log_id)
            .collect();
        let mut want: Vec<LogId> = (1..=6).map(|i| log_id(1, i)).collect();
        want.extend([log_id(2, 7), log_id(2, 8)]);
        assert_eq!(ids, want);
        assert_eq!(store.read_committed().await.unwrap(), Some(log_id(1, 5)));
    }

    /// The size of the `Append` record of `entry` on disk: type, log id, payload, crc.
    fn append_record_len(entry: &Entry) -> u64 {
        let payload = WalPayload::encode_payload(&entry.payload).unwrap();
        (4 + 24 + 4 + payload.0.len() + 4) as u64
    }

    #[tokio::test]
    async fn torn_write_recovers_the_durable_prefix() {
        let last_len = append_record_len(&batch_entry(1, 1, 30));
        for cut in [1, 5, last_len / 2, last_len - 1] {
            let dir = tempfile::tempdir().unwrap();
            let vote = Vote::new_committed(1, 1);
            let last = {
                let mut store = LogStore::open_with(dir.path(), small_chunks()).unwrap();
                store.save_vote(&vote).await.unwrap();
                let last = fill(&mut store, 1, 1, 120, 30).await;
                store.handle().close().await.unwrap();
                last
            };
            let files = chunk_files(dir.path());
            assert!(files.len() > 2, "several chunks: {files:?}");

            // Tear the newest record: cut the newest chunk file inside it.
            let newest = files.last().unwrap();
            let len = std::fs::metadata(newest).unwrap().len();
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(newest)
                .unwrap();
            file.set_len(len - cut).unwrap();
            drop(file);

            let mut store = LogStore::open_with(dir.path(), small_chunks())
                .unwrap_or_else(|e| panic!("cut {cut}: torn write must recover: {e}"));
            let entries = all_entries(&mut store).await;
            let want: Vec<Entry> = (1..last).map(|i| batch_entry(1, i, 30)).collect();
            assert_eq!(
                entries, want,
                "cut {cut}: the prefix before the torn record"
            );
            assert_eq!(
                store.get_log_state().await.unwrap().last_log_id,
                Some(log_id(1, last - 1))
            );
            assert_eq!(store.read_vote().await.unwrap(), Some(vote));

            // Appending continues where the durable prefix ends, and survives another reopen.
            store
                .blocking_append([batch_entry(2, last, 30), batch_entry(2, last + 1, 30)])
                .await
                .unwrap();
            drop(store);
            let mut store = LogStore::open_with(dir.path(), small_chunks()).unwrap();
            let entries = all_entries(&mut store).await;
            assert_eq!(entries.len() as u64, last + 1);
            assert_eq!(entries[..want.len()], want);
            assert_eq!(entries.last().unwrap(), &batch_entry(2, last + 1, 30));
        }
    }

    #[tokio::test]
    async fn zero_filled_tail_is_recovered_and_garbage_tail_refused() {
        for (tail, recovers) in [(vec![0u8; 300], true), (vec![0xAB_u8; 64], false)] {
            let dir = tempfile::tempdir().unwrap();
            let last = {
                let mut store = LogStore::open_with(dir.path(), small_chunks()).unwrap();
                let last = fill(&mut store, 1, 1, 40, 30).await;
                store.handle().close().await.unwrap();
                last
            };
            let newest = chunk_files(dir.path()).pop().unwrap();
            let mut bytes = std::fs::read(&newest).unwrap();
            bytes.extend_from_slice(&tail);
            std::fs::write(&newest, bytes).unwrap();

            match LogStore::open_with(dir.path(), small_chunks()) {
                Ok(mut store) => {
                    assert!(recovers, "a garbage tail must not be dropped silently");
                    let entries = all_entries(&mut store).await;
                    assert_eq!(entries.len() as u64, last, "every record before the zeros");
                }
                Err(e) => {
                    assert!(!recovers, "zero tail must recover: {e}");
                    assert!(matches!(e, LogStoreError::Corrupt { .. }), "{e:?}");
                }
            }
        }
    }

    #[tokio::test]
    async fn purge_then_reopen_keeps_purged_entries_gone() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = LogStore::open_with(dir.path(), small_chunks()).unwrap();
            store.save_vote(&Vote::new_committed(1, 1)).await.unwrap();
            store
                .blocking_append((1..=100).map(|i| batch_entry(1, i, 40)))
                .await
                .unwrap();
            let before = chunk_files(dir.path()).len();
            store.purge(log_id(1, 60)).await.unwrap();
            // Purging behind what is already purged is a no-op.
            store.purge(log_id(1, 10)).await.unwrap();
            let handle = store.handle();
            let entries = all_entries(&mut store).await;
            assert_eq!(entries.first().unwrap().log_id, log_id(1, 61));
            handle.close().await.unwrap();
            let after = chunk_files(dir.path()).len();
            assert!(
                after < before,
                "chunk files of purged entries are removed: {before} -> {after}"
            );
        }
        let mut store = LogStore::open_with(dir.path(), small_chunks()).unwrap();
        assert_eq!(
            store.get_log_state().await.unwrap(),
            LogState {
                last_purged_log_id: Some(log_id(1, 60)),
                last_log_id: Some(log_id(1, 100)),
            }
        );
        let entries = all_entries(&mut store).await;
        let want: Vec<Entry> = (61..=100).map(|i| batch_entry(1, i, 40)).collect();
        assert_eq!(entries, want);
        assert_eq!(store.try_get_log_entries(0..=60).await.unwrap(), vec![]);
        // A range that starts in the purged part gives nothing, not its surviving tail: the
        // tail sent after an older prev_log_id would leave a hole in a follower's log.
        assert_eq!(store.try_get_log_entries(50..70).await.unwrap(), vec![]);
        let from_61: Vec<Entry> = (61..70).map(|i| batch_entry(1, i, 40)).collect();
        assert_eq!(store.try_get_log_entries(61..70).await.unwrap(), from_61);
        store
            .blocking_append([batch_entry(1, 101, 40)])
            .await
            .unwrap();

        // Purging everything (past the last entry) leaves an empty log that continues after it.
        store.purge(log_id(2, 120)).await.unwrap();
        drop(store);
        let mut store = LogStore::open_with(dir.path(), small_chunks()).unwrap();
        assert_eq!(
            store.get_log_state().await.unwrap(),
            LogState {
                last_purged_log_id: Some(log_id(2, 120)),
                last_log_id: Some(log_id(2, 120)),
            }
        );
        assert_eq!(all_entries(&mut store).await, vec![]);
        store
            .blocking_append([batch_entry(2, 121, 1)])
            .await
            .unwrap();
        assert_eq!(all_entries(&mut store).await, vec![batch_entry(2, 121, 1)]);
    }

    #[tokio::test]
    async fn a_store_with_stats_times_every_append_flush_before_its_callback() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(NodeStats::new());
        let mut store = LogStore::open(dir.path())
            .unwrap()
            .with_stats(stats.clone());
        for i in 1..=3 {
            let (tx, rx) = oneshot::channel();
            store
                .append_with(vec![batch_entry(1, i, 10)], FlushCallback::Notify(tx))
                .await
                .unwrap();
            rx.await.unwrap().unwrap();
            // Recorded by the time the callback is heard.
            assert_eq!(stats.log_flush_nanos.count(), i);
        }
        // A vote is synced too, but only appends are timed.
        store.save_vote(&Vote::new(1, 1)).await.unwrap();
        let flushes = stats.log_flush_nanos.snapshot();
        assert_eq!(flushes.count(), 3);
        assert!(flushes.sum > 0);
    }

    #[tokio::test]
    async fn group_commit_one_fsync_serves_many_appends() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogStoreConfig {
            flush_batch_wait: Duration::from_millis(2),
            ..LogStoreConfig::default()
        };
        let store = LogStore::open_with(dir.path(), config).unwrap();
        let appends = 200;
        let mut synced = Vec::new();
        for i in 1..=appends {
            let (tx, rx) = oneshot::channel();
            store
                .append_with(vec![batch_entry(1, i, 10)], FlushCallback::Notify(tx))
                .await
                .unwrap();
            synced.push(rx);
        }
        for rx in synced {
            rx.await.unwrap().unwrap();
        }
        let stats = store.handle().stats().await.unwrap();
        assert!(stats.flush_requests >= appends, "{stats:?}");
        assert!(
            stats.fsyncs * 4 <= stats.flush_requests,
            "one fsync serves many appends: {stats:?}"
        );
    }

    #[tokio::test]
    async fn memory_is_bounded_and_evicted_entries_are_read_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogStoreConfig {
            chunk_max_bytes: 8 << 10,
            cache_max_bytes: 16 << 10,
            ..LogStoreConfig::default()
        };
        let mut store = LogStore::open_with(dir.path(), config.clone()).unwrap();
        let entries: Vec<Entry> = (1..=300).map(|i| batch_entry(1, i, 500)).collect();
        let entry_len = append_record_len(&entries[0]);
        for entry in &entries {
            store.blocking_append([entry.clone()]).await.unwrap();
        }
        let stats = store.handle().stats().await.unwrap();
        let bound = (config.cache_max_bytes + 2 * config.chunk_max_bytes) as u64 + entry_len;
        assert!(stats.cached_bytes <= bound, "{stats:?} > {bound}");
        assert!(
            stats.on_disk_bytes > bound,
            "the log is larger than the cache: {stats:?}"
        );

        assert_eq!(all_entries(&mut store).await, entries);
        let stats = store.handle().stats().await.unwrap();
        assert!(
            stats.cache_misses > 0,
            "old entries came from disk: {stats:?}"
        );
    }

    #[tokio::test]
    async fn one_store_per_directory_and_close_releases_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path()).unwrap();
        store.blocking_append([blank_entry(1, 1)]).await.unwrap();
        assert!(matches!(
            LogStore::open(dir.path()),
            Err(LogStoreError::Locked { .. })
        ));

        let mut reader = store.get_log_reader().await;
        let handle = store.handle();
        handle.close().await.unwrap();
        handle.close().await.unwrap();
        assert!(reader.try_get_log_entries(..).await.is_err());
        assert!(store.blocking_append([blank_entry(1, 2)]).await.is_err());
        assert!(matches!(handle.stats().await, Err(LogStoreError::Closed)));

        // The reader and the old store are still alive, yet the directory is free again.
        let mut reopened = LogStore::open(dir.path()).unwrap();
        assert_eq!(all_entries(&mut reopened).await, vec![blank_entry(1, 1)]);
        drop(store);
    }
}
