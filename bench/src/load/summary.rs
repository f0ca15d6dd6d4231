//! Latency histograms (hdrhistogram, nanoseconds, 3 significant digits) and their summary.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Largest latency recorded: 60 s. Anything slower is clamped to it (and a client timeout
/// fires well before).
pub const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// A new latency histogram in nanoseconds, 1 ns to 60 s at 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("static histogram bounds are valid")
}

/// Records one latency, clamped into the histogram's range.
pub fn record(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record(ns.clamp(1, MAX_LATENCY_NS));
}

/// The percentiles reported for a run, in microseconds (rounded to 0.1 µs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl LatencySummary {
    /// From a histogram of nanoseconds. An empty histogram gives all zeros.
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
        Self {
            count: h.len(),
            mean: (h.mean() / 100.0).round() / 10.0,
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: f64, want: f64) -> bool {
        // 3 significant digits: within 0.1 % plus the 0.1 µs rounding.
        (got - want).abs() <= want * 0.001 + 0.1
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = new_histogram();
        for us in 1..=10_000u64 {
            record(&mut h, us * 1_000);
        }
        let s = LatencySummary::from_histogram(&h);
        assert_eq!(s.count, 10_000);
        assert!(close(s.p50, 5_000.0), "{s:?}");
        assert!(close(s.p90, 9_000.0), "{s:?}");
        assert!(close(s.p99, 9_900.0), "{s:?}");
        assert!(close(s.p999, 9_990.0), "{s:?}");
        assert!(close(s.max, 10_000.0), "{s:?}");
        assert!(close(s.mean, 5_000.5), "{s:?}");
    }

    #[test]
    fn a_tail_shows_in_the_high_percentiles_only() {
        let mut h = new_histogram();
        for _ in 0..9_990 {
            record(&mut h, 50_000); // 50 µs
        }
        for _ in 0..10 {
            record(&mut h, 20_000_000); // 20 ms
        }
        let s = LatencySummary::from_histogram(&h);
        assert!(close(s.p50, 50.0) && close(s.p99, 50.0), "{s:?}");
        assert!(close(s.p999, 50.0), "{s:?}");
        assert!(close(s.max, 20_000.0), "{s:?}");
    }

    #[test]
    fn empty_and_out_of_range() {
        assert_eq!(
            LatencySummary::from_histogram(&new_histogram()),
            LatencySummary::default()
        );
        let mut h = new_histogram();
        record(&mut h, 0);
        record(&mut h, u64::MAX);
        let s = LatencySummary::from_histogram(&h);
        assert_eq!(s.count, 2);
        assert!(close(s.max, 60_000_000.0), "{s:?}");
    }
}
