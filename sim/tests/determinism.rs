//! Same seed ⇒ same trace: the whole simulation (faults, crashes, leader changes, every client
//! call and outcome) is a function of the seed.

use tally_sim::{SimOptions, run_seed};

fn first_difference(a: &str, b: &str) -> String {
    for (i, (x, y)) in a.lines().zip(b.lines()).enumerate() {
        if x != y {
            return format!("line {}:\n  first:  {x}\n  second: {y}", i + 1);
        }
    }
    format!(
        "one trace is a prefix of the other ({} vs {} lines)",
        a.lines().count(),
        b.lines().count()
    )
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    let opts = SimOptions {
        seconds: 8,
        ..SimOptions::default()
    };
    // Seed 7: crashes, partitions and leader changes within 8 simulated seconds.
    let a = run_seed(7, &opts);
    let b = run_seed(7, &opts);
    assert!(
        a.trace.lines().count() > 200,
        "trace too short:\n{}",
        a.trace
    );
    assert!(
        a.trace.contains("FAULT"),
        "no fault in the trace:\n{}",
        a.trace
    );
    assert!(
        a.trace == b.trace,
        "seed 7 diverged on replay: {}",
        first_difference(&a.trace, &b.trace)
    );
    assert_eq!(a.violations, b.violations);
}

#[test]
fn different_seeds_give_different_traces() {
    let opts = SimOptions {
        seconds: 2,
        ..SimOptions::default()
    };
    assert_ne!(run_seed(1, &opts).trace, run_seed(2, &opts).trace);
}
