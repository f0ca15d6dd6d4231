//! The Raft state machine: the engine, the last applied log id and membership, and durable
//! snapshots.
//!
//! What is durable when: applying an entry changes only memory; the log (fdatasync'd before it
//! counts as flushed) is what makes an applied command durable. A snapshot is the engine's
//! bytes plus the last applied log id and membership, written to `snapshot.bin` in the data
//! directory with write-to-temp, fsync, rename and directory fsync, so a crash leaves either
//! the old or the new snapshot, never a torn one. openraft purges logs only behind a snapshot
//! it built (and so persisted). On start the engine is restored from the snapshot and openraft
//! re-applies the committed log after it.
//!
//! Usage records also go to the node's on-disk [`UsageArchive`]: copied from the engine's tail
//! after every batch part, `fdatasync`ed before a snapshot that covers them is persisted, and
//! reconciled with the engine after a restore (see the archive's docs).
//!
//! Into the node's [`NodeStats`] go the commands of every batch applied and the size and time
//! of every snapshot built or installed.

// openraft's StorageError is what the storage traits return; boxing it here would only move
// the conversion elsewhere.
#![allow(clippy::result_large_err)]

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder, StorageIOError};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::raft_types::{
    BatchOutcome, Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};
use super::stats::NodeStats;
use super::usage_archive::{ArchiveError, UsageArchive};
use crate::engine::{Engine, EngineSettings};

const SNAPSHOT_FILE: &str = "snapshot.bin";
const SNAPSHOT_MAGIC: &[u8; 8] = b"TALLYRS1";

/// The applied state, shared between the Raft apply path and readers.
pub struct Applied {
    pub engine: Engine,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

/// A snapshot as stored and sent: metadata and the engine's snapshot bytes.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    snapshot_id: String,
    engine: Vec<u8>,
}

/// The current snapshot's metadata and encoded bytes.
type CurrentSnapshot = (SnapshotMeta, Arc<Vec<u8>>);

/// The state machine handed to openraft. Cheap to clone: clones share the state.
#[derive(Clone)]
pub struct StateMachine {
    applied: Arc<Mutex<Applied>>,
    /// The current snapshot, encoded as a [`SnapshotFile`].
    current: Arc<Mutex<Option<CurrentSnapshot>>>,
    dir: PathBuf,
    /// Distinguishes snapshots built at the same log id.
    built: Arc<std::sync::atomic::AtomicU64>,
    /// Every usage record applied, on disk.
    archive: Arc<UsageArchive>,
    /// Batch sizes applied, snapshots built and installed.
    stats: Arc<NodeStats>,
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_snapshot(None, &e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_snapshot(None, &e).into()
}

impl StateMachine {
    /// Opens the state machine in `dir`, restoring the last snapshot if there is one, and
    /// brings `archive` up to the restored engine. Records into `stats`.
    pub fn open(
        dir: &Path,
        settings: EngineSettings,
        archive: Arc<UsageArchive>,
        stats: Arc<NodeStats>,
    ) -> Result<StateMachine, StorageError> {
        std::fs::create_dir_all(dir).map_err(write_err)?;
        let path = dir.join(SNAPSHOT_FILE);
        let (applied, current) = match std::fs::read(&path) {
            Ok(bytes) => {
                let file = decode(&bytes)?;
                let engine = Engine::restore(&file.engine).map_err(read_err)?;
                let meta = SnapshotMeta {
                    last_log_id: file.last_applied,
                    last_membership: file.membership.clone(),
                    snapshot_id: file.snapshot_id.clone(),
                };
                let applied = Applied {
                    engine,
                    last_applied: file.last_applied,
                    membership: file.membership,
                };
                (applied, Some((meta, Arc::new(bytes))))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                Applied {
                    engine: Engine::new(settings),
                    last_applied: None,
                    membership: StoredMembership::default(),
                },
                None,
            ),
            Err(e) => return Err(read_err(e)),
        };
        archive_from(&archive, &applied.engine).map_err(write_err)?;
        Ok(StateMachine {
            applied: Arc::new(Mutex::new(applied)),
            current: Arc::new(Mutex::new(current)),
            dir: dir.to_owned(),
            built: Arc::default(),
            archive,
            stats,
        })
    }

    /// The applied state, for readers.
    pub fn applied(&self) -> &Arc<Mutex<Applied>> {
        &self.applied
    }

    /// Writes `bytes` as the snapshot file, durably and atomically.
    fn persist(&self, bytes: &[u8]) -> Result<(), StorageError> {
        let tmp = self.dir.join(format!("{SNAPSHOT_FILE}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(write_err)?;
        f.write_all(bytes).map_err(write_err)?;
        f.sync_all().map_err(write_err)?;
        drop(f);
        std::fs::rename(&tmp, self.dir.join(SNAPSHOT_FILE)).map_err(write_err)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(write_err)
    }
}

/// Copies the engine's usage records the archive lacks into it.
fn archive_from(archive: &UsageArchive, engine: &Engine) -> Result<(), ArchiveError> {
    archive.catch_up(
        engine.last_usage_seq(),
        |after| engine.export_usage(after, usize::MAX),
        engine.first_usage_seq(),
    )
}

fn encode(file: &SnapshotFile) -> Vec<u8> {
    let mut out = SNAPSHOT_MAGIC.to_vec();
    postcard::to_io(file, &mut out).expect("writing to a Vec cannot fail");
    out
}

fn decode(bytes: &[u8]) -> Result<SnapshotFile, StorageError> {
    let body = bytes.strip_prefix(SNAPSHOT_MAGIC).ok_or_else(|| {
        read_err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a Tally snapshot (bad magic)",
        ))
    })?;
    postcard::from_bytes(body).map_err(read_err)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let started = Instant::now();
        // Serialized under the lock: the engine's bytes and the log id must match.
        let file = {
            let a = self.applied.lock();
            let n = self
                .built
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let snapshot_id = match a.last_applied {
                Some(id) => format!("{}-{}-{n}", id.leader_id, id.index),
                None => format!("none-{n}"),
            };
            SnapshotFile {
                last_applied: a.last_applied,
                membership: a.membership.clone(),
                snapshot_id,
                engine: a.engine.snapshot(),
            }
        };
        let bytes = encode(&file);
        // Every record the snapshot covers is on disk before the log behind it can go.
        self.archive.sync().map_err(write_err)?;
        self.persist(&bytes)?;
        let meta = SnapshotMeta {
            last_log_id: file.last_applied,
            last_membership: file.membership,
            snapshot_id: file.snapshot_id,
        };
        let built = &self.stats.snapshots_built;
        built.bytes.record(bytes.len() as u64);
        built.nanos.record_duration(started.elapsed());
        let bytes = Arc::new(bytes);
        *self.current.lock() = Some((meta.clone(), bytes.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes.to_vec())),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let a = self.applied.lock();
        Ok((a.last_applied, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<BatchOutcome>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut a = self.applied.lock();
        let mut out = Vec::new();
        for entry in entries {
            assert!(
                a.last_applied.is_none_or(|last| last < entry.log_id),
                "entries are applied in log order, once"
            );
            a.last_applied = Some(entry.log_id);
            let outcome = match entry.payload {
                EntryPayload::Blank => BatchOutcome::default(),
                EntryPayload::Normal(batch) => {
                    let _span = tracing::info_span!(
                        "raft.apply",
                        index = entry.log_id.index,
                        commands = batch.commands.len()
                    )
                    .entered();
                    let archive = &self.archive;
                    let mut archived = Ok(());
                    let outcomes = batch.apply_with(&mut a.engine, |engine| {
                        if archived.is_ok() {
                            archived = archive_from(archive, engine);
                        }
                    });
                    archived.map_err(write_err)?;
                    let commands = batch.commands.len() as u64;
                    self.stats.applied_batch_commands.record(commands);
                    BatchOutcome { outcomes }
                }
                EntryPayload::Membership(m) => {
                    a.membership = StoredMembership::new(Some(entry.log_id), m);
                    BatchOutcome::default()
                }
            };
            out.push(outcome);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> StateMachine {
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
        let started = Instant::now();
        let bytes = snapshot.into_inner();
        let file = decode(&bytes)?;
        let engine = Engine::restore(&file.engine).map_err(read_err)?;
        self.persist(&bytes)?;
        {
            let mut a = self.applied.lock();
            archive_from(&self.archive, &engine).map_err(write_err)?;
            a.engine = engine;
            a.last_applied = meta.last_log_id;
            a.membership = meta.last_membership.clone();
        }
        let installed = &self.stats.snapshots_installed;
        installed.bytes.record(bytes.len() as u64);
        installed.nanos.record_duration(started.elapsed());
        *self.current.lock() = Some((meta.clone(), Arc::new(bytes)));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        Ok(self.current.lock().as_ref().map(|(meta, bytes)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(bytes.to_vec())),
        }))
    }
}
