//! `tally-sim`: runs seeds of the cluster simulation and reports broken invariants.
//!
//! ```text
//! tally-sim --seeds 1..100            # seeds 1 to 99; prints failures (seed + invariant)
//! tally-sim --seed 17                 # replays seed 17 with its full trace
//! tally-sim --seeds 1..10000 --jobs 8 --seconds 30
//! ```

use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use clap::Parser;
use tally_sim::{SeedReport, SimOptions, run_seed};

#[derive(Parser, Debug)]
#[command(
    name = "tally-sim",
    about = "Deterministic simulation of a Tally cluster under faults"
)]
struct Args {
    /// Seeds to run: `A..B` (B excluded), `A..=B`, or a single seed.
    #[arg(long, conflicts_with = "seed")]
    seeds: Option<String>,
    /// Replay one seed and print its whole trace.
    #[arg(long)]
    seed: Option<u64>,
    /// Simulated seconds of workload under faults per seed (healing and settling come after).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Cluster size (3 or 5 drawn from the seed by default).
    #[arg(long)]
    nodes: Option<usize>,
    /// Seeds run in parallel (each seed is still one deterministic single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Lines of trace printed around a failure (`--seeds` mode).
    #[arg(long, default_value_t = 40)]
    excerpt: usize,
    /// Print a one-line summary of every seed, not only failures.
    #[arg(long)]
    verbose: bool,
    /// Break the disks on purpose, to see the invariants catch it: `lying-fsync` or
    /// `volatile-votes`.
    #[arg(long)]
    sabotage: Option<String>,
    /// No membership changes (members are replaced now and then by default).
    #[arg(long)]
    no_membership: bool,
    /// No metering traffic (quotas, usage reports, reservations): replays a seed exactly as
    /// before metering was simulated.
    #[arg(long)]
    no_metering: bool,
}

fn parse_seeds(s: &str) -> Result<Vec<u64>, String> {
    let bad = |_| format!("bad seed range {s:?}: use A..B, A..=B or N");
    if let Some((a, b)) = s.split_once("..=") {
        let (a, b): (u64, u64) = (a.parse().map_err(bad)?, b.parse().map_err(bad)?);
        Ok((a..=b).collect())
    } else if let Some((a, b)) = s.split_once("..") {
        let (a, b): (u64, u64) = (a.parse().map_err(bad)?, b.parse().map_err(bad)?);
        Ok((a..b).collect())
    } else {
        Ok(vec![s.parse().map_err(bad)?])
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Server and openraft logs, for debugging a replayed seed: TALLY_SIM_LOG=debug (or any
    // tracing filter). Off by default; they go to stderr, without wall-clock times.
    if let Ok(filter) = std::env::var("TALLY_SIM_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .without_time()
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .init();
    }
    let sabotage = match args.sabotage.as_deref() {
        None => None,
        Some("lying-fsync") => Some(tally_sim::log_store::DiskSabotage::LyingFsync),
        Some("volatile-votes") => Some(tally_sim::log_store::DiskSabotage::VolatileVotes),
        Some(other) => {
            eprintln!("unknown sabotage {other:?}: lying-fsync or volatile-votes");
            return ExitCode::from(2);
        }
    };
    let mut opts = SimOptions {
        seconds: args.seconds,
        nodes: args.nodes,
        sabotage,
        membership_changes: !args.no_membership,
        metering: !args.no_metering,
        ..SimOptions::default()
    };
    if let Some(seed) = args.seed {
        opts.echo = true;
        let report = run_seed(seed, &opts);
        println!();
        if report.violations.is_empty() {
            println!("seed {seed}: ok ({})", report.stats);
            return ExitCode::SUCCESS;
        }
        println!("seed {seed}: FAILED ({})", report.stats);
        for v in &report.violations {
            println!("  {v}");
        }
        return ExitCode::FAILURE;
    }
    let seeds = match parse_seeds(args.seeds.as_deref().unwrap_or("1..21")) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let next = AtomicU64::new(0);
    let failures: Mutex<Vec<u64>> = Mutex::new(Vec::new());
    let sim_ms = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let report = |r: &SeedReport| {
        sim_ms.fetch_add(r.stats.sim_ms, Ordering::Relaxed);
        let n = done.fetch_add(1, Ordering::Relaxed) + 1;
        if r.violations.is_empty() {
            if args.verbose {
                println!(
                    "seed {}: ok trace {:016x} ({})",
                    r.seed,
                    r.trace_digest(),
                    r.stats
                );
            } else if n.is_multiple_of(100) {
                eprintln!("... {n}/{} seeds", seeds.len());
            }
            return;
        }
        failures.lock().unwrap().push(r.seed);
        let mut out = format!("seed {}: FAILED ({})\n", r.seed, r.stats);
        for v in &r.violations {
            out.push_str(&format!("  {v}\n"));
        }
        let lines: Vec<&str> = r.trace.lines().collect();
        let first_bad = lines
            .iter()
            .position(|l| l.contains("VIOLATION") || l.contains("FAILED"))
            .unwrap_or(lines.len());
        let from = first_bad.saturating_sub(args.excerpt);
        out.push_str(&format!(
            "  trace excerpt (replay with --seed {}):\n",
            r.seed
        ));
        for l in &lines[from..(first_bad + 3).min(lines.len())] {
            out.push_str(&format!("    {l}\n"));
        }
        print!("{out}");
    };
    std::thread::scope(|scope| {
        for _ in 0..args.jobs.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(seed) = seeds.get(i) else { break };
                    report(&run_seed(*seed, &opts));
                }
            });
        }
    });
    let mut failures = failures.into_inner().unwrap();
    failures.sort_unstable();
    let sim_s = sim_ms.load(Ordering::Relaxed) as f64 / 1000.0;
    println!(
        "{} seeds, {:.0} simulated seconds ({:.2} h), {:.1}s wall: {} failed{}",
        seeds.len(),
        sim_s,
        sim_s / 3600.0,
        started.elapsed().as_secs_f64(),
        failures.len(),
        if failures.is_empty() {
            String::new()
        } else {
            format!(" {failures:?}")
        }
    );
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
