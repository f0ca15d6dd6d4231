//! Seeded randomness. Every random choice of a simulation comes from one seed: the root
//! stream is split into independent streams (network, disks, faults, workload) so that, for
//! instance, one more network message does not shift every later workload draw.

use std::sync::Arc;

use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A seeded stream, shared by the tasks that draw from it. The runtime is single-threaded and
/// its scheduling is deterministic, so the order of draws (and so their values) is too.
#[derive(Clone)]
pub struct SimRng(Arc<Mutex<ChaCha8Rng>>);

impl SimRng {
    pub fn new(seed: u64) -> SimRng {
        SimRng(Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(seed))))
    }

    /// An independent stream seeded from this one.
    pub fn fork(&self) -> SimRng {
        SimRng::new(self.0.lock().r#gen())
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut ChaCha8Rng) -> R) -> R {
        f(&mut self.0.lock())
    }

    /// True with probability `p` (0..=1).
    pub fn chance(&self, p: f64) -> bool {
        p > 0.0 && self.with(|r| r.gen_bool(p.min(1.0)))
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        self.with(|r| r.gen_range(lo..=hi))
    }

    /// Uniform in `lo..=hi`, signed.
    pub fn between_i(&self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            return lo;
        }
        self.with(|r| r.gen_range(lo..=hi))
    }

    /// Uniform in `0..n` (n > 0).
    pub fn index(&self, n: usize) -> usize {
        assert!(n > 0, "index of an empty range");
        self.with(|r| r.gen_range(0..n))
    }

    /// One of `items`, uniformly.
    pub fn pick<'a, T>(&self, items: &'a [T]) -> &'a T {
        &items[self.index(items.len())]
    }

    /// An index drawn with the given weights (not all zero).
    pub fn weighted(&self, weights: &[u32]) -> usize {
        let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
        assert!(total > 0, "weights all zero");
        let mut x = self.between(0, total - 1);
        for (i, w) in weights.iter().enumerate() {
            let w = u64::from(*w);
            if x < w {
                return i;
            }
            x -= w;
        }
        unreachable!("x < total")
    }
}
