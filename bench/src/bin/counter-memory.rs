//! Heap bytes per counter: fills an engine with N counters of one fixed-window limit (and of
//! a rolling one) and reports what the allocator says they cost.
//!
//! `cargo run --release -p tally-bench --bin counter-memory -- [N] [results file]`

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicIsize, Ordering};

use tally_server::engine::limits::{
    Capacity, DescriptorKey, LimitSet, LimitSpec, Scope, WindowSpec,
};
use tally_server::engine::{
    Command, Descriptor, Engine, EngineSettings, Mode, Outcome, RateLimitCommand,
};

struct Counting;
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const T0_MS: i64 = 1_795_435_200_000;
const BATCH: usize = 1_000;

fn limit(name: &str, window: WindowSpec) -> LimitSpec {
    LimitSpec {
        domain: "bench".into(),
        name: name.into(),
        scope: Scope::Descriptor {
            conditions: vec![tally_server::engine::limits::EntryCondition::Equals {
                key: "kind".into(),
                value: name.into(),
            }],
            key: DescriptorKey::Entries(vec!["api_key".into()]),
        },
        capacity: Capacity::Max(1_000),
        window,
        shadow: false,
        ack: tally_server::engine::limits::Ack::Strict,
        replaces: vec![],
    }
}

/// Bytes per counter for `n` keys hitting the limit named `kind`.
fn measure(kind: &str, n: usize) -> anyhow::Result<(f64, f64)> {
    let mut engine = Engine::new(EngineSettings {
        max_counters: n as u64 + 1,
        ..EngineSettings::default()
    });
    let set = LimitSet {
        limits: vec![
            limit(
                "fixed",
                WindowSpec::Fixed {
                    duration_ms: 3_600_000,
                },
            ),
            limit(
                "rolling",
                WindowSpec::Rolling {
                    window_ms: 60_000,
                    resolution_ms: 1_000,
                },
            ),
        ],
    };
    engine.apply(T0_MS, &[Command::ReplaceLimits(set)]);
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    for start in (0..n).step_by(BATCH) {
        let batch: Vec<Command> = (start..(start + BATCH).min(n))
            .map(|i| {
                Command::RateLimit(RateLimitCommand {
                    domain: "bench".into(),
                    descriptors: vec![Descriptor {
                        entries: vec![
                            ("kind".into(), kind.into()),
                            ("api_key".into(), format!("key-{i:08}")),
                        ],
                        hits: None,
                        limit_override: None,
                    }],
                    hits: 1,
                    mode: Mode::Enforce,
                })
            })
            .collect();
        for outcome in engine.apply(T0_MS, &batch) {
            anyhow::ensure!(matches!(outcome, Outcome::RateLimit(_)), "{outcome:?}");
        }
    }
    let measured = (LIVE_BYTES.load(Ordering::Relaxed) - before) as f64 / n as f64;
    let status = engine.status();
    anyhow::ensure!(status.live_counters == n as u64, "{status:?}");
    Ok((measured, status.counter_bytes_estimate as f64 / n as f64))
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(1_000_000), |a| a.parse())?;
    let out = args.next();
    let mut lines = Vec::new();
    for kind in ["fixed", "rolling"] {
        let (measured, estimate) = measure(kind, n)?;
        let line = format!(
            "{{\"bench\":\"counter-memory\",\"window\":\"{kind}\",\"counters\":{n},\"key_bytes\":12,\"heap_bytes_per_counter\":{measured:.1},\"estimate_bytes_per_counter\":{estimate:.1}}}"
        );
        println!("{line}");
        lines.push(line);
    }
    if let Some(path) = out {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        for line in lines {
            writeln!(f, "{line}")?;
        }
    }
    Ok(())
}
