//! Per-node wall clocks: skew, drift and jumps, driven by tokio's virtual time.
//!
//! A node's clock reads `base + skew + jumps + elapsed × (1 + drift)`, where `elapsed` is the
//! simulated time since the seed started. It is the node's hardware clock: it survives the
//! node's crashes and restarts. Only the proposer reads it (batch stamps); Raft's own timers
//! run on tokio's (virtual) monotonic clock, as they do in production.

use std::sync::atomic::{AtomicI64, Ordering};

use tally_server::node::Clock;
use tokio::time::Instant;

pub struct SimClock {
    base_ms: i64,
    /// Parts per million: +500 runs 0.05 % fast.
    drift_ppm: i64,
    start: Instant,
    /// Initial skew plus every jump so far.
    offset_ms: AtomicI64,
}

impl SimClock {
    pub fn new(base_ms: i64, skew_ms: i64, drift_ppm: i64) -> SimClock {
        SimClock {
            base_ms,
            drift_ppm,
            start: Instant::now(),
            offset_ms: AtomicI64::new(skew_ms),
        }
    }

    /// Steps the clock by `by_ms` (negative: backwards), as NTP or an operator might.
    pub fn jump(&self, by_ms: i64) {
        self.offset_ms.fetch_add(by_ms, Ordering::SeqCst);
    }

    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::SeqCst)
    }

    pub fn drift_ppm(&self) -> i64 {
        self.drift_ppm
    }
}

impl Clock for SimClock {
    fn now_ms(&self) -> i64 {
        let elapsed_us = Instant::now().duration_since(self.start).as_micros() as i64;
        let drifted_ms = elapsed_us * (1_000_000 + self.drift_ppm) / 1_000_000_000;
        self.base_ms + self.offset_ms() + drifted_ms
    }
}
