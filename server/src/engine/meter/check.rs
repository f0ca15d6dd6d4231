//! Request-time check of the hard quotas: may `who` start one more request?
//!
//! A request's size is unknown when it starts (the gateway learns its tokens at the end), so
//! the check asks for the smallest amount each metric can count — one request, one token,
//! one nano-dollar, one stream in flight — and refuses when even that does not fit on top of
//! what is recorded and held: a budget used up exactly refuses the next request, as a
//! zero-hit check of a rate limit does. Soft and shadow quotas never refuse.
//!
//! Reads only: no counter is created, nothing is held, recorded or announced, so a check
//! leaves the engine's snapshot bytes as they were.

use super::super::command::{CommandError, Outcome};
use super::super::usage::{CheckQuotas, Enforcement, Metric, QuotaCheck, Tokens};
use super::Meter;
use super::quotas::amount;

/// The smallest usage `metric` counts as at least one unit, as `(tokens, cost_nusd)` for
/// [`Meter::first_denial`]: `max(amount(metric, nothing, 0), 1)`.
fn one_unit(metric: Metric) -> (Tokens, u64) {
    let unit = match metric {
        // Each counts one per request whatever it used.
        Metric::Requests | Metric::Concurrent => (Tokens::default(), 0),
        Metric::TotalTokens | Metric::InputTokens => (
            Tokens {
                input: 1,
                ..Tokens::default()
            },
            0,
        ),
        Metric::OutputTokens => (
            Tokens {
                output: 1,
                ..Tokens::default()
            },
            0,
        ),
        Metric::CostNusd => (Tokens::default(), 1),
    };
    debug_assert_eq!(
        amount(metric, &unit.0, unit.1),
        amount(metric, &Tokens::default(), 0).max(1)
    );
    unit
}

impl Meter {
    /// Answers [`CheckQuotas`] as of `now_ms`, changing nothing.
    pub(super) fn check_quotas(
        &self,
        c: &CheckQuotas,
        now_ms: i64,
    ) -> Result<Outcome, CommandError> {
        c.validate()?;
        let touches = self.quotas.touches(&c.who);
        // One touch at a time: each quota's unit depends on its own metric.
        let denied = touches.iter().find_map(|t| {
            let (tokens, cost_nusd) = one_unit(self.quotas.list[t.index].spec.metric);
            self.first_denial(std::slice::from_ref(t), &tokens, cost_nusd, now_ms)
        });
        let standings = touches
            .iter()
            .filter(|t| self.quotas.list[t.index].spec.enforcement == Enforcement::Hard)
            .map(|t| self.quotas.standing(t.index, &t.key, now_ms))
            .collect();
        Ok(Outcome::QuotaCheck(QuotaCheck { denied, standings }))
    }
}
