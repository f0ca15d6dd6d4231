//! The usage archive: every usage record this node applied, on disk, for `ExportUsage`.
//!
//! The engine keeps only the newest `max_usage_records` records (its tail: minute queries and
//! snapshots); the archive keeps the history a billing job exports, bounded by age and bytes
//! rather than by memory.
//!
//! # Layout
//!
//! One directory (`<data-dir>/usage`) of segment files, each a run of records with consecutive
//! seqs: the segment being written is `u-<first seq>.open`; a full one is closed as
//! `u-<first seq>-<last seq>-<last record's time ms>.seg` (20-digit numbers, so names sort).
//! A segment starts with [`SEGMENT_MAGIC`]; each record is `len (u32 LE) | crc32 of body (u32
//! LE) | body`, the body being `postcard(UsageRecord)`.
//!
//! # What is durable when
//!
//! Records are written (to the OS) as they are applied, and `fdatasync`ed when a segment is
//! closed and by [`UsageArchive::sync`], which the state machine calls before it persists a
//! snapshot. So every record a snapshot covers is on disk before the log behind that snapshot
//! may be purged; records after the snapshot are re-derived by re-applying the log.
//!
//! # Recovery
//!
//! On open, a torn or zeroed tail of the open segment (a crash before its sync) is cut off
//! after the last whole record; any other bad record fails the open ([`ArchiveError::Corrupt`]).
//! The state machine then reconciles the archive with the restored engine
//! ([`UsageArchive::catch_up`]): records the archive already holds are not written again
//! (re-applying the log re-creates identical records: idempotent), missing ones are taken from
//! the engine's tail. When the engine's tail no longer reaches back to the archive's end (this
//! node installed a snapshot from a leader far ahead), the archive starts a new segment at the
//! tail's first record and the seqs in between are a hole: reading them is refused with
//! [`ArchiveError::NotHeld`], naming the range, so the caller exports them from another node,
//! until the node's backfill task copies them from another member ([`UsageArchive::fill`]:
//! one closed segment per page, written whole before it is used).
//!
//! # Retention
//!
//! Closed segments are deleted, oldest first, when their last record is older than
//! `retention_ms` (by the newest record's time, not a clock) or while the archive is over
//! `max_bytes`; the open segment is never deleted. The first seq kept is written to
//! `retained-from` (durably, before the files go; a deletion a crash interrupted is finished at
//! open), so a read before it is refused with [`ArchiveError::PastRetention`] and a gap after
//! it is a hole. Retention is per node (a flag, not replicated).
//!
//! # Memory
//!
//! Per segment, a sparse index (one entry every [`INDEX_EVERY`] records: ~600 entries for a
//! full segment), built while writing, or on the first read for segments found at open (one
//! scan of that file). Reads hold the archive's lock for one page (at most
//! [`MAX_READ_RECORDS`] records).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::engine::usage::UsageRecord;

/// Each segment's first bytes.
pub const SEGMENT_MAGIC: &[u8; 8] = b"TALLYUA1";
/// Default size at which a segment is closed.
pub const DEFAULT_SEGMENT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// One sparse-index entry every this many records.
pub const INDEX_EVERY: u64 = 1_024;
/// Largest record body accepted when reading (a record's fields are bounded far below it).
const MAX_RECORD_BYTES: u32 = 1024 * 1024;
/// Most records one read returns.
pub const MAX_READ_RECORDS: usize = 10_000;
/// Record header: length and checksum.
const HEADER_BYTES: u64 = 8;

/// Default retention of archived records: 400 days, like the aggregates.
pub const DEFAULT_RETENTION_MS: u64 = 400 * 86_400_000;
/// Default bound on the archive's size on disk.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024 * 1024;

/// Node-local bounds of the archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArchiveConfig {
    /// Closed segments whose last record is this much older than the newest are deleted.
    pub retention_ms: u64,
    /// Closed segments are deleted, oldest first, while the archive is larger.
    pub max_bytes: u64,
    /// A segment is closed (synced, renamed) once it holds this many bytes.
    pub segment_max_bytes: u64,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            retention_ms: DEFAULT_RETENTION_MS,
            max_bytes: DEFAULT_MAX_BYTES,
            segment_max_bytes: DEFAULT_SEGMENT_MAX_BYTES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("usage archive: {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "usage archive damaged: {0} (move the directory away; the node rebuilds what its log and snapshot hold)"
    )]
    Corrupt(String),
    #[error(
        "usage records before seq {available_from} were dropped from this node's archive by retention; resume from a cursor at or after {}",
        available_from.saturating_sub(1)
    )]
    PastRetention { available_from: u64 },
    #[error(
        "this node does not hold usage records {from}..={to} (it was restored from another node's snapshot); export them from a node that does"
    )]
    NotHeld { from: u64, to: u64 },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ArchiveError {
    let path = path.to_owned();
    move |source| ArchiveError::Io {
        action,
        path,
        source,
    }
}

/// One segment file.
struct Segment {
    path: PathBuf,
    first_seq: u64,
    /// `first_seq - 1` while empty.
    last_seq: u64,
    last_ms: i64,
    bytes: u64,
    /// `(seq, offset)` every [`INDEX_EVERY`] records from the first; `None` until built.
    index: Option<Vec<(u64, u64)>>,
}

impl Segment {
    fn holds(&self, seq: u64) -> bool {
        self.first_seq <= seq && seq <= self.last_seq
    }
}

struct Inner {
    dir: PathBuf,
    config: ArchiveConfig,
    /// Oldest first; the last one is open for writing.
    segments: VecDeque<Segment>,
    writer: BufWriter<File>,
    bytes_total: u64,
    /// Retention dropped every record before this seq (1: none dropped). Persisted in
    /// [`RETAINED_FROM_FILE`] before the segments go, so a record missing at or after it is a
    /// hole (never held here), before it a retention drop.
    retained_from: u64,
}

/// Holds [`Inner::retained_from`] (absent: 1).
const RETAINED_FROM_FILE: &str = "retained-from";

/// The archive; shared by the apply path (writes) and the usage API (reads).
pub struct UsageArchive {
    inner: Mutex<Inner>,
}

impl UsageArchive {
    /// Opens (or creates) the archive in `dir`, cutting a torn tail off the open segment.
    pub fn open(dir: &Path, config: ArchiveConfig) -> Result<UsageArchive, ArchiveError> {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let retained_from = read_retained_from(dir)?;
        let mut segments = list_segments(dir)?;
        // Finish a retention step a crash interrupted: its mark is written before its deletes.
        while segments.len() > 1 && segments[0].last_seq < retained_from {
            let s = segments.remove(0);
            std::fs::remove_file(&s.path).map_err(io("remove", &s.path))?;
        }
        if segments
            .last()
            .is_none_or(|s| s.path.extension() != Some("open".as_ref()))
        {
            let first = segments.last().map_or(1, |s| s.last_seq + 1);
            segments.push(create_segment(dir, first)?);
        }
        let open = segments.last_mut().expect("one segment at least");
        recover_open(open)?;
        let writer = open_writer(&open.path)?;
        let bytes_total = segments.iter().map(|s| s.bytes).sum();
        Ok(UsageArchive {
            inner: Mutex::new(Inner {
                dir: dir.to_owned(),
                config,
                segments: segments.into(),
                writer,
                bytes_total,
                retained_from,
            }),
        })
    }

    /// Seq of the last record held (0 when none ever was).
    pub fn last_seq(&self) -> u64 {
        self.inner.lock().last_seq()
    }

    /// Seq of the first record still held (`last_seq() + 1` when none is).
    pub fn first_seq(&self) -> u64 {
        let inner = self.inner.lock();
        inner
            .segments
            .iter()
            .find(|s| s.last_seq >= s.first_seq)
            .map_or(inner.last_seq() + 1, |s| s.first_seq)
    }

    /// Brings the archive up to `last_seq` from `tail`, which reads the engine's records after
    /// a seq (an error when the engine no longer holds them). Records already held are not
    /// written again.
    pub fn catch_up<E>(
        &self,
        last_seq: u64,
        mut tail: impl FnMut(u64) -> Result<Vec<UsageRecord>, E>,
        tail_first_seq: u64,
    ) -> Result<(), ArchiveError> {
        let mut inner = self.inner.lock();
        while inner.last_seq() < last_seq {
            let after = inner.last_seq();
            if after + 1 < tail_first_seq {
                tracing::warn!(
                    from = after + 1,
                    to = tail_first_seq - 1,
                    "usage archive: records restored by snapshot are not held on this node"
                );
                inner.start_segment(tail_first_seq)?;
                continue;
            }
            let page = tail(after).unwrap_or_default();
            assert!(
                page.first().is_some_and(|r| r.seq == after + 1),
                "the engine's tail holds every record the archive lacks (after {after})"
            );
            for record in &page {
                inner.append(record)?;
            }
        }
        inner
            .writer
            .flush()
            .map_err(io("write", &inner.open_path()))
    }

    /// The seq ranges (inclusive) this archive lacks although they are within retention and
    /// before its last record: holes left by a snapshot install, oldest first.
    pub fn holes(&self) -> Vec<(u64, u64)> {
        let inner = self.inner.lock();
        let mut out = Vec::new();
        let mut next = inner.retained_from;
        for s in inner.segments.iter().filter(|s| s.last_seq >= s.first_seq) {
            if s.first_seq > next {
                out.push((next, s.first_seq - 1));
            }
            next = next.max(s.last_seq + 1);
        }
        out
    }

    /// Fills (the front of) a hole with `records` copied from another node: consecutive, the
    /// first one the hole's first seq, none past its end. They become one closed segment,
    /// written whole (temp file, sync, rename, directory sync) before it is used.
    pub fn fill(&self, records: &[UsageRecord]) -> Result<(), ArchiveError> {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Ok(());
        };
        let mut inner = self.inner.lock();
        let hole = inner.hole_at(first.seq).ok_or_else(|| {
            ArchiveError::Corrupt(format!("no hole starts at seq {} to fill", first.seq))
        })?;
        let consecutive = records.windows(2).all(|w| w[1].seq == w[0].seq + 1);
        if !consecutive || first.seq != hole.0 || last.seq > hole.1 {
            return Err(ArchiveError::Corrupt(format!(
                "records {}..={} do not fill the front of hole {}..={}",
                first.seq, last.seq, hole.0, hole.1
            )));
        }
        let segment = write_closed(&inner.dir, records)?;
        inner.bytes_total += segment.bytes;
        let at = inner
            .segments
            .partition_point(|s| s.first_seq < segment.first_seq);
        inner.segments.insert(at, segment);
        Ok(())
    }

    /// Makes every record written so far durable (`fdatasync`).
    pub fn sync(&self) -> Result<(), ArchiveError> {
        let mut inner = self.inner.lock();
        let path = inner.open_path();
        inner.writer.flush().map_err(io("write", &path))?;
        inner
            .writer
            .get_ref()
            .sync_data()
            .map_err(io("sync", &path))
    }

    /// Up to `max` (at most [`MAX_READ_RECORDS`]) records with seq > `after_seq`, in order.
    pub fn read(&self, after_seq: u64, max: usize) -> Result<Vec<UsageRecord>, ArchiveError> {
        let mut inner = self.inner.lock();
        let mut want = after_seq.saturating_add(1);
        let max = max.min(MAX_READ_RECORDS);
        if want > inner.last_seq() || max == 0 {
            return Ok(Vec::new());
        }
        let mut i = inner.locate(want)?;
        let path = inner.open_path();
        inner.writer.flush().map_err(io("write", &path))?;
        let mut out = Vec::new();
        loop {
            read_segment(&mut inner.segments[i], want, max, &mut out)?;
            want = inner.segments[i].last_seq + 1;
            i += 1;
            // On into the next segment while it continues this one (not across a hole).
            if out.len() >= max || inner.segments.get(i).is_none_or(|s| s.first_seq != want) {
                return Ok(out);
            }
        }
    }
}

impl Inner {
    fn last_seq(&self) -> u64 {
        self.segments.back().map_or(0, |s| s.last_seq)
    }

    /// The hole that starts at `seq`, if one does.
    fn hole_at(&self, seq: u64) -> Option<(u64, u64)> {
        let holes = {
            let mut out = Vec::new();
            let mut next = self.retained_from;
            for s in self.segments.iter().filter(|s| s.last_seq >= s.first_seq) {
                if s.first_seq > next {
                    out.push((next, s.first_seq - 1));
                }
                next = next.max(s.last_seq + 1);
            }
            out
        };
        holes.into_iter().find(|h| h.0 == seq)
    }

    fn open_path(&self) -> PathBuf {
        self.segments.back().expect("an open segment").path.clone()
    }

    /// The segment holding `seq` (which is ≤ the last seq held).
    fn locate(&self, seq: u64) -> Result<usize, ArchiveError> {
        if seq < self.retained_from {
            let first_held = self
                .segments
                .iter()
                .find(|s| s.last_seq >= s.first_seq)
                .map_or(self.retained_from, |s| s.first_seq);
            return Err(ArchiveError::PastRetention {
                available_from: first_held.max(self.retained_from),
            });
        }
        match self.segments.iter().position(|s| s.holds(seq)) {
            Some(i) => Ok(i),
            None => {
                let next = self
                    .segments
                    .iter()
                    .find(|s| s.first_seq > seq)
                    .map_or(seq, |s| s.first_seq);
                Err(ArchiveError::NotHeld {
                    from: seq,
                    to: next.saturating_sub(1),
                })
            }
        }
    }

    fn append(&mut self, r: &UsageRecord) -> Result<(), ArchiveError> {
        assert_eq!(
            r.seq,
            self.last_seq() + 1,
            "archive records are consecutive"
        );
        let path = self.open_path();
        let seg = self.segments.back_mut().expect("an open segment");
        if (r.seq - seg.first_seq).is_multiple_of(INDEX_EVERY) {
            seg.index
                .get_or_insert_with(Vec::new)
                .push((r.seq, seg.bytes));
        }
        let n = write_record(&mut self.writer, r).map_err(io("write", &path))?;
        seg.bytes += n;
        seg.last_seq = r.seq;
        seg.last_ms = r.at_ms;
        self.bytes_total += n;
        if seg.bytes >= self.config.segment_max_bytes {
            self.start_segment(r.seq + 1)?;
        }
        Ok(())
    }

    /// Closes the open segment (durably) and opens a new one whose first seq is `first_seq`;
    /// then applies retention.
    fn start_segment(&mut self, first_seq: u64) -> Result<(), ArchiveError> {
        let path = self.open_path();
        self.writer.flush().map_err(io("write", &path))?;
        self.writer
            .get_ref()
            .sync_data()
            .map_err(io("sync", &path))?;
        let seg = self.segments.back_mut().expect("an open segment");
        if seg.last_seq >= seg.first_seq {
            let closed = self
                .dir
                .join(closed_name(seg.first_seq, seg.last_seq, seg.last_ms));
            std::fs::rename(&seg.path, &closed).map_err(io("rename", &seg.path))?;
            seg.path = closed;
        } else {
            // An empty open segment is replaced, not kept.
            std::fs::remove_file(&seg.path).map_err(io("remove", &seg.path))?;
            self.bytes_total -= seg.bytes;
            self.segments.pop_back();
        }
        let next = create_segment(&self.dir, first_seq)?;
        self.writer = open_writer(&next.path)?;
        self.bytes_total += next.bytes;
        self.segments.push_back(next);
        sync_dir(&self.dir)?;
        self.apply_retention()
    }

    fn apply_retention(&mut self) -> Result<(), ArchiveError> {
        let newest_ms = self.segments.iter().map(|s| s.last_ms).max().unwrap_or(0);
        let retention_ms = i64::try_from(self.config.retention_ms).unwrap_or(i64::MAX);
        let horizon_ms = newest_ms.saturating_sub(retention_ms);
        let mut bytes = self.bytes_total;
        let mut drop = 0;
        while drop + 1 < self.segments.len() {
            let oldest = &self.segments[drop];
            if oldest.last_ms >= horizon_ms && bytes <= self.config.max_bytes {
                break;
            }
            bytes -= oldest.bytes;
            drop += 1;
        }
        if drop == 0 {
            return Ok(());
        }
        self.retained_from = self.segments[drop - 1].last_seq + 1;
        write_retained_from(&self.dir, self.retained_from)?;
        for s in self.segments.drain(..drop) {
            std::fs::remove_file(&s.path).map_err(io("remove", &s.path))?;
        }
        self.bytes_total = bytes;
        sync_dir(&self.dir)
    }
}

fn read_retained_from(dir: &Path) -> Result<u64, ArchiveError> {
    let path = dir.join(RETAINED_FROM_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| ArchiveError::Corrupt(format!("{}: not a seq: {text:?}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(1),
        Err(e) => Err(io("read", &path)(e)),
    }
}

/// Writes the retention mark durably and atomically (temp file, sync, rename, sync dir).
fn write_retained_from(dir: &Path, seq: u64) -> Result<(), ArchiveError> {
    let tmp = dir.join(format!("{RETAINED_FROM_FILE}.tmp"));
    let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(format!("{seq}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, dir.join(RETAINED_FROM_FILE)).map_err(io("rename", &tmp))?;
    sync_dir(dir)
}

/// Writes one record (`len | crc32 | body`); its size on disk.
fn write_record(w: &mut impl Write, r: &UsageRecord) -> std::io::Result<u64> {
    let body = postcard::to_allocvec(r).expect("a record encodes");
    let len = u32::try_from(body.len()).expect("a record is far below 4 GiB");
    w.write_all(&len.to_le_bytes())?;
    w.write_all(&crc32fast::hash(&body).to_le_bytes())?;
    w.write_all(&body)?;
    Ok(HEADER_BYTES + u64::from(len))
}

/// Writes `records` (consecutive) as a closed segment, durably and atomically.
fn write_closed(dir: &Path, records: &[UsageRecord]) -> Result<Segment, ArchiveError> {
    let (first, last) = (&records[0], &records[records.len() - 1]);
    let path = dir.join(closed_name(first.seq, last.seq, last.at_ms));
    let tmp = path.with_extension("tmp");
    let mut w = BufWriter::new(File::create(&tmp).map_err(io("create", &tmp))?);
    w.write_all(SEGMENT_MAGIC).map_err(io("write", &tmp))?;
    let mut offset = SEGMENT_MAGIC.len() as u64;
    let mut index = Vec::new();
    for r in records {
        if (r.seq - first.seq).is_multiple_of(INDEX_EVERY) {
            index.push((r.seq, offset));
        }
        offset += write_record(&mut w, r).map_err(io("write", &tmp))?;
    }
    let f = w
        .into_inner()
        .map_err(|e| io("write", &tmp)(e.into_error()))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("rename", &tmp))?;
    sync_dir(dir)?;
    Ok(Segment {
        path,
        first_seq: first.seq,
        last_seq: last.seq,
        last_ms: last.at_ms,
        bytes: offset,
        index: Some(index),
    })
}

fn closed_name(first_seq: u64, last_seq: u64, last_ms: i64) -> String {
    format!(
        "u-{first_seq:020}-{last_seq:020}-{:020}.seg",
        last_ms.max(0)
    )
}

fn create_segment(dir: &Path, first_seq: u64) -> Result<Segment, ArchiveError> {
    let path = dir.join(format!("u-{first_seq:020}.open"));
    let mut f = File::create(&path).map_err(io("create", &path))?;
    f.write_all(SEGMENT_MAGIC)
        .and_then(|()| f.sync_data())
        .map_err(io("write", &path))?;
    sync_dir(dir)?;
    Ok(Segment {
        path,
        first_seq,
        last_seq: first_seq - 1,
        last_ms: 0,
        bytes: SEGMENT_MAGIC.len() as u64,
        index: Some(Vec::new()),
    })
}

fn open_writer(path: &Path) -> Result<BufWriter<File>, ArchiveError> {
    let f = OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io("open", path))?;
    Ok(BufWriter::with_capacity(256 * 1024, f))
}

fn sync_dir(dir: &Path) -> Result<(), ArchiveError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync", dir))
}

/// The segments in `dir`, oldest first: closed ones from their names (their index is built on
/// first read), at most one open one (last), not yet scanned.
fn list_segments(dir: &Path) -> Result<Vec<Segment>, ArchiveError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io("list", dir))? {
        let entry = entry.map_err(io("list", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let Some(segment) = parse_name(&name, path) else {
            continue; // Not ours (an editor's swap file, say): left alone.
        };
        out.push(segment?);
    }
    out.sort_by_key(|s| s.first_seq);
    for pair in out.windows(2) {
        let ok = pair[0].last_seq < pair[1].first_seq
            && pair[0].path.extension() == Some("seg".as_ref());
        if !ok {
            return Err(ArchiveError::Corrupt(format!(
                "segments {} and {} overlap or an open segment is not the last",
                pair[0].path.display(),
                pair[1].path.display()
            )));
        }
    }
    Ok(out)
}

fn parse_name(name: &str, path: PathBuf) -> Option<Result<Segment, ArchiveError>> {
    let stem = name.strip_prefix("u-")?;
    let (numbers, open) = match (stem.strip_suffix(".open"), stem.strip_suffix(".seg")) {
        (Some(n), _) => (n, true),
        (None, Some(n)) => (n, false),
        _ => return None,
    };
    let parts: Vec<u64> = numbers
        .split('-')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let bytes = match std::fs::metadata(&path) {
        Ok(m) => m.len(),
        Err(e) => return Some(Err(io("stat", &path)(e))),
    };
    let segment = match (open, parts.as_slice()) {
        (true, &[first]) if first > 0 => Segment {
            path,
            first_seq: first,
            last_seq: first - 1,
            last_ms: 0,
            bytes,
            index: None,
        },
        (false, &[first, last, last_ms]) if first > 0 && last >= first => Segment {
            path,
            first_seq: first,
            last_seq: last,
            last_ms: i64::try_from(last_ms).unwrap_or(i64::MAX),
            bytes,
            index: None,
        },
        _ => return None,
    };
    Some(Ok(segment))
}

/// Scans the open segment: builds its index and last seq, and cuts a torn tail off.
fn recover_open(seg: &mut Segment) -> Result<(), ArchiveError> {
    let path = seg.path.clone();
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io("open", &path))?;
    let mut magic = [0u8; 8];
    let n = read_full(&mut f, &mut magic);
    if n < magic.len() || &magic != SEGMENT_MAGIC {
        if magic[..n].iter().any(|b| *b != 0) && n == magic.len() {
            return Err(ArchiveError::Corrupt(format!(
                "{}: bad magic",
                path.display()
            )));
        }
        // Created but never whole (a crash right after creating it): start it again.
        f.set_len(0)
            .and_then(|()| f.seek(SeekFrom::Start(0)))
            .and_then(|_| f.write_all(SEGMENT_MAGIC))
            .map_err(io("write", &path))?;
    }
    let mut scan = Scan::new(seg.first_seq);
    let end = scan.run(&mut BufReader::new(&mut f), &path, u64::MAX)?;
    let torn_ok = match end.bad {
        None | Some(Bad::Short) => true,
        Some(Bad::Zero) => rest_is_zero(&mut f, end.offset, &path)?,
        Some(Bad::Damaged) => false,
    };
    if !torn_ok {
        return Err(ArchiveError::Corrupt(format!(
            "{}: bad record at byte {} (not a torn write: data follows it)",
            path.display(),
            end.offset
        )));
    }
    f.set_len(end.offset)
        .and_then(|()| f.sync_all())
        .map_err(io("truncate", &path))?;
    seg.bytes = end.offset;
    seg.last_seq = scan.next_seq - 1;
    seg.last_ms = scan.last_ms;
    seg.index = Some(scan.index);
    Ok(())
}

/// Whether every byte of `f` from `offset` on is zero (ext4 can leave zeros after a crash).
fn rest_is_zero(f: &mut File, offset: u64, path: &Path) -> Result<bool, ArchiveError> {
    f.seek(SeekFrom::Start(offset)).map_err(io("seek", path))?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match f.read(&mut buf).map_err(io("read", path))? {
            0 => return Ok(true),
            n if buf[..n].iter().any(|b| *b != 0) => return Ok(false),
            _ => {}
        }
    }
}

/// A sequential pass over a segment's records.
struct Scan {
    next_seq: u64,
    first_seq: u64,
    last_ms: i64,
    index: Vec<(u64, u64)>,
}

/// Where a scan stopped: the end of the last whole record, and what follows it when that is
/// not a clean end.
struct ScanEnd {
    offset: u64,
    bad: Option<Bad>,
}

/// Why a record could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bad {
    /// The file ends inside it: an unfinished write.
    Short,
    /// Its header is zeros: an unfinished write if everything after it is zero too.
    Zero,
    /// Bad length, checksum or encoding.
    Damaged,
}

impl Scan {
    fn new(first_seq: u64) -> Scan {
        Scan {
            next_seq: first_seq,
            first_seq,
            last_ms: 0,
            index: Vec::new(),
        }
    }

    /// Reads records from just after the magic up to `stop_seq` (inclusive) or the end.
    fn run(
        &mut self,
        r: &mut impl Read,
        path: &Path,
        stop_seq: u64,
    ) -> Result<ScanEnd, ArchiveError> {
        let mut offset = SEGMENT_MAGIC.len() as u64;
        while self.next_seq <= stop_seq {
            let record = match read_record(r) {
                Ok(Some(rec)) => rec,
                Ok(None) => return Ok(ScanEnd { offset, bad: None }),
                Err(bad) => {
                    return Ok(ScanEnd {
                        offset,
                        bad: Some(bad),
                    });
                }
            };
            if record.0.seq != self.next_seq {
                return Err(ArchiveError::Corrupt(format!(
                    "{}: record seq {} where {} was expected",
                    path.display(),
                    record.0.seq,
                    self.next_seq
                )));
            }
            if (record.0.seq - self.first_seq).is_multiple_of(INDEX_EVERY) {
                self.index.push((record.0.seq, offset));
            }
            self.last_ms = record.0.at_ms;
            self.next_seq += 1;
            offset += record.1;
        }
        Ok(ScanEnd { offset, bad: None })
    }
}

/// The next record and its size on disk; `Ok(None)` at a clean end of file.
fn read_record(r: &mut impl Read) -> Result<Option<(UsageRecord, u64)>, Bad> {
    let mut header = [0u8; HEADER_BYTES as usize];
    match read_full(r, &mut header) {
        0 => return Ok(None),
        n if n < header.len() => return Err(Bad::Short),
        _ => {}
    }
    if header.iter().all(|b| *b == 0) {
        return Err(Bad::Zero);
    }
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if len == 0 || len > MAX_RECORD_BYTES {
        return Err(Bad::Damaged);
    }
    let mut body = vec![0u8; len as usize];
    if read_full(r, &mut body) < body.len() {
        return Err(Bad::Short);
    }
    if crc32fast::hash(&body) != crc {
        return Err(Bad::Damaged);
    }
    let record: UsageRecord = postcard::from_bytes(&body).map_err(|_| Bad::Damaged)?;
    Ok(Some((record, HEADER_BYTES + u64::from(len))))
}

/// Reads until `buf` is full or the input ends; how many bytes were read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    n
}

/// Appends up to `max` records of `seg` from seq `want` on to `out`.
fn read_segment(
    seg: &mut Segment,
    want: u64,
    max: usize,
    out: &mut Vec<UsageRecord>,
) -> Result<(), ArchiveError> {
    let mut f = File::open(&seg.path).map_err(io("open", &seg.path))?;
    if seg.index.is_none() {
        let mut scan = Scan::new(seg.first_seq);
        let mut reader = BufReader::new(&mut f);
        reader
            .seek(SeekFrom::Start(SEGMENT_MAGIC.len() as u64))
            .map_err(io("seek", &seg.path))?;
        let end = scan.run(&mut reader, &seg.path, seg.last_seq)?;
        if scan.next_seq != seg.last_seq + 1 {
            return Err(ArchiveError::Corrupt(format!(
                "{}: ends at seq {} (byte {}), its name says {}",
                seg.path.display(),
                scan.next_seq - 1,
                end.offset,
                seg.last_seq
            )));
        }
        seg.index = Some(scan.index);
    }
    let index = seg.index.as_ref().expect("built above");
    let at = index.partition_point(|(s, _)| *s <= want);
    let (mut seq, offset) = match at {
        0 => (seg.first_seq, SEGMENT_MAGIC.len() as u64),
        i => index[i - 1],
    };
    let mut reader = BufReader::new(f);
    reader
        .seek(SeekFrom::Start(offset))
        .map_err(io("seek", &seg.path))?;
    while seq <= seg.last_seq && out.len() < max {
        let Ok(Some((record, _))) = read_record(&mut reader) else {
            return Err(ArchiveError::Corrupt(format!(
                "{}: record {seq} unreadable",
                seg.path.display()
            )));
        };
        if record.seq != seq {
            return Err(ArchiveError::Corrupt(format!(
                "{}: record seq {} where {seq} was expected",
                seg.path.display(),
                record.seq
            )));
        }
        if seq >= want {
            out.push(record);
        }
        seq += 1;
    }
    Ok(())
}
