//! The on-disk usage archive: reads across segments, recovery from torn writes, retention,
//! holes after a snapshot install, and idempotent catch-up — against an in-memory oracle.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use tally_server::engine::usage::{Attribution, Tokens, UsageRecord};
use tally_server::node::usage_archive::{ArchiveConfig, ArchiveError, UsageArchive};

fn record(seq: u64) -> UsageRecord {
    UsageRecord {
        seq,
        at_ms: 1_700_000_000_000 + seq as i64 * 1_000,
        request_id: format!("req-{seq}"),
        who: Attribution {
            subject: format!("key-{}", seq % 7),
            subscription: "premium".into(),
            model: "gpt-4o".into(),
            tags: vec![("team".into(), format!("t{}", seq % 3))],
        },
        tokens: Tokens {
            input: seq,
            output: 2 * seq,
            cached_input: 0,
            reasoning: seq % 5,
        },
        cost_nusd: seq * 1_000,
        price_version: 1,
    }
}

fn small(segment_max_bytes: u64) -> ArchiveConfig {
    ArchiveConfig {
        segment_max_bytes,
        ..ArchiveConfig::default()
    }
}

/// Brings `archive` up to `last` as the engine would, its tail holding `tail_first..=last`.
fn catch_up(archive: &UsageArchive, tail_first: u64, last: u64) {
    archive
        .catch_up(
            last,
            |after| -> Result<Vec<UsageRecord>, ()> {
                Ok((after + 1..=last.min(after + 100)).map(record).collect())
            },
            tail_first,
        )
        .unwrap();
}

/// Every record after `after` in pages of `page`.
fn read_all(archive: &UsageArchive, mut after: u64, page: usize) -> Result<Vec<u64>, ArchiveError> {
    let mut seqs = Vec::new();
    loop {
        let got = archive.read(after, page)?;
        let Some(last) = got.last() else {
            return Ok(seqs);
        };
        for r in &got {
            assert_eq!(*r, record(r.seq), "a record reads back as written");
        }
        after = last.seq;
        seqs.extend(got.iter().map(|r| r.seq));
    }
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

#[test]
fn records_read_back_across_segments_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    {
        let a = UsageArchive::open(dir.path(), small(4_096)).unwrap();
        catch_up(&a, 1, 500);
        assert_eq!(a.last_seq(), 500);
        assert!(files(dir.path(), "seg").len() > 5, "small segments rotate");
        assert_eq!(read_all(&a, 0, 37).unwrap(), (1..=500).collect::<Vec<_>>());
        assert_eq!(
            read_all(&a, 333, 1_000).unwrap(),
            (334..=500).collect::<Vec<_>>()
        );
        a.sync().unwrap();
    }
    // Reopened: closed segments are indexed on first read, the open one at open.
    let a = UsageArchive::open(dir.path(), small(4_096)).unwrap();
    assert_eq!((a.first_seq(), a.last_seq()), (1, 500));
    assert_eq!(
        read_all(&a, 250, 9).unwrap(),
        (251..=500).collect::<Vec<_>>()
    );
    catch_up(&a, 1, 600);
    assert_eq!(
        read_all(&a, 0, 10_000).unwrap(),
        (1..=600).collect::<Vec<_>>()
    );
}

#[test]
fn catch_up_writes_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let a = UsageArchive::open(dir.path(), small(1 << 20)).unwrap();
    catch_up(&a, 1, 80);
    // Restored from an older snapshot (engine at 50): the archive is ahead; nothing is written.
    let mut asked = false;
    a.catch_up(
        50,
        |_| -> Result<Vec<UsageRecord>, ()> {
            asked = true;
            Ok(Vec::new())
        },
        1,
    )
    .unwrap();
    assert!(
        !asked,
        "no records are asked for when the archive holds them"
    );
    // Re-applying the log re-creates 51..=80, then goes on: only 81.. are new.
    catch_up(&a, 40, 120);
    assert_eq!(
        read_all(&a, 0, 1_000).unwrap(),
        (1..=120).collect::<Vec<_>>()
    );
}

#[test]
fn a_torn_tail_is_cut_and_damage_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let a = UsageArchive::open(dir.path(), small(1 << 20)).unwrap();
        catch_up(&a, 1, 10);
        a.sync().unwrap();
    }
    let open = files(dir.path(), "open").pop().unwrap();
    let len = std::fs::metadata(&open).unwrap().len();
    // A record cut short by the crash.
    let mut f = OpenOptions::new().append(true).open(&open).unwrap();
    f.write_all(&[40, 0, 0, 0, 1, 2, 3, 4, 5, 6]).unwrap();
    drop(f);
    let a = UsageArchive::open(dir.path(), small(1 << 20)).unwrap();
    assert_eq!(a.last_seq(), 10);
    assert_eq!(
        std::fs::metadata(&open).unwrap().len(),
        len,
        "the torn bytes are gone"
    );
    catch_up(&a, 1, 12);
    drop(a);
    // Zeros after the last record (ext4 after a crash) are a torn write too.
    let mut f = OpenOptions::new().append(true).open(&open).unwrap();
    f.write_all(&[0; 300]).unwrap();
    drop(f);
    let a = UsageArchive::open(dir.path(), small(1 << 20)).unwrap();
    assert_eq!(a.last_seq(), 12);
    drop(a);
    // A bad checksum with data after it is damage: refused, never silently dropped.
    let bytes = std::fs::read(&open).unwrap();
    let mut damaged = bytes.clone();
    damaged[8 + 8 + 3] ^= 0xff; // inside the first record's body
    std::fs::write(&open, &damaged).unwrap();
    match UsageArchive::open(dir.path(), small(1 << 20)) {
        Err(ArchiveError::Corrupt(msg)) => assert!(msg.contains("bad record"), "{msg}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a damaged archive opened"),
    }
}

#[test]
fn retention_by_size_drops_oldest_segments_and_refuses_older_cursors() {
    let dir = tempfile::tempdir().unwrap();
    let config = ArchiveConfig {
        max_bytes: 20_000,
        segment_max_bytes: 4_096,
        ..ArchiveConfig::default()
    };
    let a = UsageArchive::open(dir.path(), config).unwrap();
    catch_up(&a, 1, 2_000);
    let first = a.first_seq();
    assert!(first > 1, "old segments were deleted");
    let on_disk: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        on_disk <= 20_000 + 4_096 + 200,
        "bounded on disk: {on_disk} bytes"
    );
    assert_eq!(
        read_all(&a, first - 1, 100).unwrap(),
        (first..=2_000).collect::<Vec<_>>()
    );
    match a.read(first - 2, 10) {
        Err(ArchiveError::PastRetention { available_from }) => assert_eq!(available_from, first),
        other => panic!("expected PastRetention, got {other:?}"),
    }
    drop(a);
    // Reopened: still a retention drop (the mark is on disk), not a hole.
    let a = UsageArchive::open(dir.path(), config).unwrap();
    assert_eq!(a.first_seq(), first);
    match a.read(0, 10) {
        Err(ArchiveError::PastRetention { available_from }) => assert_eq!(available_from, first),
        other => panic!("expected PastRetention, got {other:?}"),
    }
}

#[test]
fn retention_by_age_counts_from_the_newest_record() {
    let dir = tempfile::tempdir().unwrap();
    let config = ArchiveConfig {
        retention_ms: 100_000, // 100 records at one per second
        segment_max_bytes: 4_096,
        ..ArchiveConfig::default()
    };
    let a = UsageArchive::open(dir.path(), config).unwrap();
    catch_up(&a, 1, 1_000);
    let first = a.first_seq();
    assert!(
        first > 800,
        "records older than 100 s before the newest are gone: first {first}"
    );
    assert!(
        first <= 900 + 1,
        "records within retention are kept: first {first}"
    );
}

#[test]
fn a_snapshot_beyond_the_archive_leaves_a_named_hole() {
    let dir = tempfile::tempdir().unwrap();
    {
        let a = UsageArchive::open(dir.path(), small(1 << 20)).unwrap();
        catch_up(&a, 1, 30);
        // Installed a snapshot at 500 whose engine tail starts at 401.
        catch_up(&a, 401, 500);
        match read_all(&a, 0, 10) {
            Err(ArchiveError::NotHeld { from, to }) => assert_eq!((from, to), (31, 400)),
            other => panic!("expected NotHeld, got {other:?}"),
        }
        assert_eq!(
            read_all(&a, 400, 1_000).unwrap(),
            (401..=500).collect::<Vec<_>>()
        );
        a.sync().unwrap();
    }
    let a = UsageArchive::open(dir.path(), small(1 << 20)).unwrap();
    assert_eq!(
        a.read(0, 100).unwrap().len(),
        30,
        "reads stop before the hole"
    );
    drop(a);
    // A node whose archive starts with a hole (wiped, then restored by snapshot).
    let fresh = tempfile::tempdir().unwrap();
    let b = UsageArchive::open(fresh.path(), small(1 << 20)).unwrap();
    catch_up(&b, 133, 200);
    match b.read(0, 10) {
        Err(ArchiveError::NotHeld { from, to }) => assert_eq!((from, to), (1, 132)),
        other => panic!("expected NotHeld, got {other:?}"),
    }
    let a = UsageArchive::open(dir.path(), small(1 << 20)).unwrap();
    match a.read(30, 10) {
        Err(ArchiveError::NotHeld { from, to }) => assert_eq!((from, to), (31, 400)),
        other => panic!("expected NotHeld, got {other:?}"),
    }
    assert_eq!(
        read_all(&a, 450, 7).unwrap(),
        (451..=500).collect::<Vec<_>>()
    );
}

#[test]
fn holes_are_filled_from_the_front_and_stay_filled_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let a = UsageArchive::open(dir.path(), small(1 << 20)).unwrap();
    catch_up(&a, 1, 30);
    catch_up(&a, 401, 500);
    assert_eq!(a.holes(), vec![(31, 400)]);
    // Records that do not start the hole, or run past it, are refused.
    let wrong: Vec<_> = (32..=40).map(record).collect();
    assert!(matches!(a.fill(&wrong), Err(ArchiveError::Corrupt(_))));
    let past: Vec<_> = (31..=401).map(record).collect();
    assert!(matches!(a.fill(&past), Err(ArchiveError::Corrupt(_))));
    // A page fills the front; the rest stays a hole.
    a.fill(&(31..=200).map(record).collect::<Vec<_>>()).unwrap();
    assert_eq!(a.holes(), vec![(201, 400)]);
    match a.read(200, 10) {
        Err(ArchiveError::NotHeld { from, to }) => assert_eq!((from, to), (201, 400)),
        other => panic!("expected NotHeld, got {other:?}"),
    }
    a.fill(&(201..=400).map(record).collect::<Vec<_>>())
        .unwrap();
    assert!(a.holes().is_empty());
    assert_eq!(read_all(&a, 0, 64).unwrap(), (1..=500).collect::<Vec<_>>());
    a.sync().unwrap();
    drop(a);
    let a = UsageArchive::open(dir.path(), small(1 << 20)).unwrap();
    assert!(a.holes().is_empty());
    catch_up(&a, 1, 520);
    assert_eq!(
        read_all(&a, 0, 1_000).unwrap(),
        (1..=520).collect::<Vec<_>>()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Writes in random steps, syncs at random points, "crashes" by cutting the open segment
    /// at a random byte (possibly inside a record), reopens and catches up from the engine's
    /// tail: every record reads back once, in order, with nothing written twice.
    #[test]
    fn crashes_lose_nothing_synced_and_catch_up_restores_the_rest(
        steps in proptest::collection::vec((1u64..60, any::<bool>()), 1..12),
        segment_max_bytes in 600u64..6_000,
        cut in any::<u64>(),
        page in 1usize..50,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut last = 0;
        {
            let a = UsageArchive::open(dir.path(), small(segment_max_bytes)).unwrap();
            for (n, sync) in &steps {
                catch_up(&a, 1, last + n);
                last += n;
                if *sync {
                    a.sync().unwrap();
                }
            }
        }
        // The crash: the open segment loses some of what was written after its last sync.
        let open = files(dir.path(), "open").pop().unwrap();
        let len = std::fs::metadata(&open).unwrap().len();
        let keep = cut % (len + 1);
        OpenOptions::new().write(true).open(&open).unwrap().set_len(keep).unwrap();
        let a = UsageArchive::open(dir.path(), small(segment_max_bytes)).unwrap();
        prop_assert!(a.last_seq() <= last);
        catch_up(&a, 1, last);
        prop_assert_eq!(read_all(&a, 0, page).unwrap(), (1..=last).collect::<Vec<_>>());
    }
}
