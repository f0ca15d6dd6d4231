//! Tally's deterministic cluster simulator.
//!
//! The whole cluster (3 or 5 nodes) runs in one process on one single-threaded tokio runtime
//! with virtual time: the real engine, the real Raft state machine and proposer
//! ([`tally_server::node::Node::start_with`]), openraft itself — over an in-memory network
//! ([`network`]), a disk that loses unsynced writes on a crash ([`log_store`]), and a wall clock
//! per node with skew, drift and jumps ([`clock`]). Faults and workload come from one seed; the
//! oracle ([`history`], [`replay`]) and the [`invariants`] judge the run; any seed replays
//! exactly ([`run::run_seed`]). Members are replaced now and then ([`membership`]), and a node
//! whose Raft stops on its own exits and is restarted, as its service manager would. Beside
//! the rate-limit requests, metering clients ([`workload::MeterClient`]) report usage and
//! reserve, commit and release under hard token budgets, retrying ids as real clients do.

pub mod audit;
pub mod clock;
pub mod history;
pub mod invariants;
pub mod log_store;
pub mod membership;
pub mod network;
pub mod replay;
pub mod rng;
pub mod run;
pub mod trace;
pub mod workload;

pub use run::{SeedReport, SimOptions, Stats, run_seed};
