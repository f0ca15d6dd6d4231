//! `tally-bench`: a gRPC load generator for any endpoint speaking Envoy RLS v3 or Kuadrant v1.
//!
//! `tally-bench --target 127.0.0.1:8081 [--api rls|kuadrant] [--concurrency N | --rate R] ...`
//! runs one measurement, prints a table and appends a JSON line to `--results`;
//! `tally-bench summarize FILE` prints a results file as a markdown table. See bench/README.md.

use std::process::ExitCode;

use clap::Parser as _;
use tally_bench::load::args::{Cli, Command};
use tally_bench::load::report::{Record, summarize};
use tally_bench::load::run;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Summarize { file }) = cli.command {
        return match std::fs::read_to_string(&file)
            .map_err(anyhow::Error::from)
            .and_then(|text| summarize(&text))
        {
            Ok(md) => {
                print!("{md}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tally-bench: {}: {e:#}", file.display());
                ExitCode::from(2)
            }
        };
    }
    let plan = match cli.run.validate() {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("tally-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(plan.threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tally-bench: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let measured = match runtime.block_on(run::run(&plan)) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("tally-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let record = Record::new(&plan, &measured);
    print!("{}", record.table());
    if let Some(path) = &plan.results
        && let Err(e) = record.append_to(path)
    {
        eprintln!("tally-bench: {e:#}");
        return ExitCode::from(2);
    }
    ExitCode::SUCCESS
}
