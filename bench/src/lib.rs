//! Measurements of Tally, run by hand; results go to `bench/results/`.
//!
//! Layout:
//! - `bin/counter-memory.rs`: heap bytes per counter in the engine, measured with a counting
//!   allocator, against the engine's own estimate.
