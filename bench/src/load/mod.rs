//! The load generator behind the `tally-bench` binary.
//!
//! - [`args`]: the command line and its validation into a [`args::Plan`].
//! - [`run`]: connections, workers (closed and open loop), the server sampler.
//! - [`template`], [`zipf`], [`rng`]: what each request carries.
//! - [`summary`]: hdrhistogram latencies and their percentiles.
//! - [`procstat`]: a process's CPU time and RSS from /proc.
//! - [`report`]: the printed table, the JSON line, the markdown summary.

pub mod args;
pub mod procstat;
pub mod report;
pub mod rng;
pub mod run;
pub mod summary;
pub mod template;
pub mod zipf;
