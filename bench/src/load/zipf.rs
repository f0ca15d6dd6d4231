//! Key choice: uniform, or Zipf-distributed over `1..=n` (rank 1 the hottest).
//!
//! Zipf uses rejection-inversion (W. Hörmann and G. Derflinger, "Rejection-inversion to
//! generate variates from monotone discrete distributions", ACM TOMACS 6(3), 1996): O(1) per
//! sample and no table, so a million keys cost nothing to set up. P(k) ∝ 1 / k^s for any
//! exponent s > 0, including s = 1.

use super::rng::Rng;

/// How keys are drawn, as indices in `0..keys`.
#[derive(Clone, Debug)]
pub enum KeyDist {
    Uniform { keys: u64 },
    Zipf(Zipf),
}

impl KeyDist {
    /// `zipf: None` is uniform. `keys ≥ 1`; `s > 0` and finite (checked by the caller).
    pub fn new(keys: u64, zipf: Option<f64>) -> Self {
        match zipf {
            None => KeyDist::Uniform { keys },
            Some(s) => KeyDist::Zipf(Zipf::new(keys, s)),
        }
    }

    /// A key index in `0..keys`; under Zipf, index 0 is the hottest key.
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        match self {
            KeyDist::Uniform { keys } => rng.below(*keys),
            KeyDist::Zipf(z) => z.sample(rng) - 1,
        }
    }
}

/// Zipf over ranks `1..=n` with exponent `s`.
#[derive(Clone, Debug)]
pub struct Zipf {
    n: f64,
    s: f64,
    h_integral_x1: f64,
    h_integral_n: f64,
    squeeze: f64,
}

impl Zipf {
    /// `n ≥ 1`, `s > 0` and finite.
    pub fn new(n: u64, s: f64) -> Self {
        assert!(n >= 1, "zipf needs at least one element");
        assert!(
            s.is_finite() && s > 0.0,
            "zipf exponent must be > 0, got {s}"
        );
        let mut z = Zipf {
            n: n as f64,
            s,
            h_integral_x1: 0.0,
            h_integral_n: 0.0,
            squeeze: 0.0,
        };
        z.h_integral_x1 = z.h_integral(1.5) - 1.0;
        z.h_integral_n = z.h_integral(z.n + 0.5);
        z.squeeze = 2.0 - z.h_integral_inverse(z.h_integral(2.5) - z.h(2.0));
        z
    }

    /// A rank in `1..=n`.
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        loop {
            let u = self.h_integral_n + rng.next_f64() * (self.h_integral_x1 - self.h_integral_n);
            let x = self.h_integral_inverse(u);
            let k = (x + 0.5).floor().clamp(1.0, self.n);
            if k - x <= self.squeeze || u >= self.h_integral(k + 0.5) - self.h(k) {
                return k as u64;
            }
        }
    }

    /// h(x) = x^-s, the (unnormalised) density.
    fn h(&self, x: f64) -> f64 {
        (-self.s * x.ln()).exp()
    }

    /// H(x), an integral of h, written to stay accurate as s → 1.
    fn h_integral(&self, x: f64) -> f64 {
        let log_x = x.ln();
        helper2((1.0 - self.s) * log_x) * log_x
    }

    fn h_integral_inverse(&self, x: f64) -> f64 {
        let t = (x * (1.0 - self.s)).max(-1.0);
        (helper1(t) * x).exp()
    }
}

/// ln(1 + x) / x, accurate near 0.
fn helper1(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.ln_1p() / x
    } else {
        1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x))
    }
}

/// (e^x - 1) / x, accurate near 0.
fn helper2(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.exp_m1() / x
    } else {
        1.0 + x * 0.5 * (1.0 + x / 3.0 * (1.0 + 0.25 * x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Observed frequencies of ranks 1..=n against the exact pmf, each within 5 standard
    /// deviations of its binomial count.
    fn check_against_pmf(n: u64, s: f64, samples: u64, seed: u64) {
        let z = Zipf::new(n, s);
        let mut rng = Rng::new(seed);
        let mut counts = vec![0u64; n as usize];
        for _ in 0..samples {
            let k = z.sample(&mut rng);
            assert!((1..=n).contains(&k), "rank {k} outside 1..={n}");
            counts[(k - 1) as usize] += 1;
        }
        let norm: f64 = (1..=n).map(|k| (k as f64).powf(-s)).sum();
        for (i, &c) in counts.iter().enumerate() {
            let p = ((i + 1) as f64).powf(-s) / norm;
            let expected = p * samples as f64;
            let sd = (samples as f64 * p * (1.0 - p)).sqrt();
            assert!(
                (c as f64 - expected).abs() <= 5.0 * sd + 1.0,
                "n={n} s={s}: rank {} seen {c} times, expected {expected:.0} ± {sd:.0}",
                i + 1
            );
        }
    }

    #[test]
    fn matches_the_zipf_pmf() {
        check_against_pmf(10, 1.0, 200_000, 1);
        check_against_pmf(10, 0.5, 200_000, 2);
        check_against_pmf(50, 1.2, 300_000, 3);
        check_against_pmf(5, 2.5, 100_000, 4);
    }

    #[test]
    fn one_element_and_huge_n() {
        let mut rng = Rng::new(9);
        let one = Zipf::new(1, 1.1);
        assert!((0..1000).all(|_| one.sample(&mut rng) == 1));

        // s = 2 over a million ranks: P(1) = 1 / zeta(2) ≈ 0.608 (the tail beyond 10^6 is
        // negligible), and every sample stays in range.
        let big = Zipf::new(1_000_000, 2.0);
        let samples = 100_000;
        let mut ones = 0;
        for _ in 0..samples {
            let k = big.sample(&mut rng);
            assert!((1..=1_000_000).contains(&k));
            ones += u64::from(k == 1);
        }
        let share = ones as f64 / samples as f64;
        assert!((share - 0.6079).abs() < 0.01, "P(1) = {share}");
    }

    #[test]
    fn key_dist_indices_start_at_zero() {
        let mut rng = Rng::new(5);
        let uniform = KeyDist::new(3, None);
        let zipf = KeyDist::new(3, Some(1.0));
        for _ in 0..1000 {
            assert!(uniform.sample(&mut rng) < 3);
            assert!(zipf.sample(&mut rng) < 3);
        }
        // Under a steep Zipf the hottest key is index 0.
        let steep = KeyDist::new(1000, Some(3.0));
        let zeros = (0..1000).filter(|_| steep.sample(&mut rng) == 0).count();
        assert!(zeros > 700, "{zeros}");
    }
}
