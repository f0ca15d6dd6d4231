//! Measurements of Tally, run by hand; results go to `bench/results/`.
//!
//! Layout:
//! - `bin/counter-memory.rs`: heap bytes per counter in the engine, measured with a counting
//!   allocator, against the engine's own estimate.
//! - `bin/tally-bench.rs` and [`load`]: a gRPC load generator for any endpoint speaking Envoy
//!   RLS v3 or Kuadrant v1 (closed and open loop, uniform or Zipf keys, token flows, an
//!   accuracy mode), with hdrhistogram latencies and the server's CPU and RSS.
//! - `run.sh`: the suite, which starts `tallyd` in each configuration and runs the matrix.

pub mod load;
