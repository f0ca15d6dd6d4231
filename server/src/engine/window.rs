//! Windows at run time: the counter state each kind keeps and the arithmetic over it.
//!
//! Every operation takes the batch time `now_ms` from the caller; nothing here reads a clock.
//! Architecture invariant: a counter that [`Window::is_idle`] is equivalent to no counter at
//! all, so reclaiming it never changes a decision.

use std::collections::VecDeque;

use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

use super::calendar;
use super::command::CommandError;
use super::limits::{
    CalendarUnit, MAX_BUCKET_UNITS, MAX_ROLLING_BUCKETS, MAX_WINDOW_MS, Unit, WindowSpec,
};

/// The state of one counter. Fixed, calendar and first-hit windows share `Window`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CounterState {
    /// Hits `used` in the window that ends at `end_ms` (exclusive). A first-hit window that has
    /// not opened has `end_ms <= now`.
    Window { end_ms: i64, used: u64 },
    /// Per-resolution-slot hits of a rolling window.
    Rolling(Box<RollingState>),
    /// Token bucket: `deficit` units missing from full as of `at_ms` (1 hit = `every_ms` units).
    Bucket { at_ms: i64, deficit: u64 },
}

/// The non-empty slots of a rolling window, oldest first. Their sum is computed when needed
/// (at most [`MAX_ROLLING_BUCKETS`] additions) rather than kept: a kept sum would have to
/// saturate, and subtracting from a saturated sum under-counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollingState {
    slots: VecDeque<(i64, u64)>,
}

impl RollingState {
    /// Hits in the slots still held, saturating (a saturated sum exceeds any capacity).
    fn total(&self) -> u64 {
        self.slots
            .iter()
            .fold(0u64, |sum, (_, n)| sum.saturating_add(*n))
    }
}

/// A window compiled for use: the time zone resolved, the current calendar window cached.
#[derive(Clone, Debug)]
pub enum Window {
    Fixed {
        duration_ms: i64,
    },
    Calendar {
        unit: CalendarUnit,
        tz: TimeZone,
        /// `[start, end)` of the last computed window: calendar math runs once per window.
        cached: (i64, i64),
    },
    FromFirstHit {
        duration_ms: i64,
    },
    Rolling {
        resolution_ms: i64,
        slots: i64,
    },
    Bucket {
        refill_amount: u64,
        every_ms: u64,
    },
}

impl Window {
    /// Checks a window spec against the stated bounds and compiles it.
    pub fn compile(spec: &WindowSpec, capacity: u64, field: &str) -> Result<Window, CommandError> {
        let bad = |reason: String| CommandError::invalid(format!("{field}.window"), reason);
        let check_len = |ms: u64, what: &str| {
            if ms == 0 || ms > MAX_WINDOW_MS {
                Err(bad(format!(
                    "{what} must be 1..={MAX_WINDOW_MS} ms, got {ms}"
                )))
            } else {
                Ok(ms as i64)
            }
        };
        Ok(match spec {
            WindowSpec::Fixed { duration_ms } => Window::Fixed {
                duration_ms: check_len(*duration_ms, "duration")?,
            },
            WindowSpec::FromFirstHit { duration_ms } => Window::FromFirstHit {
                duration_ms: check_len(*duration_ms, "duration")?,
            },
            WindowSpec::Calendar { unit, time_zone } => {
                let tz = TimeZone::get(time_zone)
                    .map_err(|e| bad(format!("unknown time zone {time_zone:?}: {e}")))?;
                check_anchor(*unit).map_err(bad)?;
                Window::Calendar {
                    unit: *unit,
                    tz,
                    cached: (0, 0),
                }
            }
            WindowSpec::Rolling {
                window_ms,
                resolution_ms,
            } => {
                check_len(*window_ms, "rolling window")?;
                check_len(*resolution_ms, "resolution")?;
                if window_ms % resolution_ms != 0 {
                    return Err(bad(format!(
                        "rolling window {window_ms} ms is not a multiple of resolution {resolution_ms} ms"
                    )));
                }
                let slots = window_ms / resolution_ms;
                if slots > MAX_ROLLING_BUCKETS {
                    return Err(bad(format!(
                        "rolling window has {slots} slots; at most {MAX_ROLLING_BUCKETS}"
                    )));
                }
                Window::Rolling {
                    resolution_ms: *resolution_ms as i64,
                    slots: slots as i64,
                }
            }
            WindowSpec::TokenBucket {
                refill_amount,
                refill_every_ms,
            } => {
                check_len(*refill_every_ms, "refill period")?;
                if *refill_amount == 0 {
                    return Err(bad("token bucket refill amount must be at least 1".into()));
                }
                if capacity
                    .checked_mul(*refill_every_ms)
                    .is_none_or(|u| u > MAX_BUCKET_UNITS)
                {
                    return Err(bad(format!(
                        "token bucket capacity x refill period must be at most {MAX_BUCKET_UNITS}"
                    )));
                }
                Window::Bucket {
                    refill_amount: *refill_amount,
                    every_ms: *refill_every_ms,
                }
            }
        })
    }

    /// The Envoy unit of a descriptor `limit` override, as a window. `None` for `Unknown`.
    pub fn for_override(unit: Unit) -> Option<Window> {
        let fixed = |ms| Window::Fixed { duration_ms: ms };
        let cal = |unit| Window::Calendar {
            unit,
            tz: TimeZone::UTC,
            cached: (0, 0),
        };
        Some(match unit {
            Unit::Unknown => return None,
            Unit::Second => fixed(1_000),
            Unit::Minute => fixed(60_000),
            Unit::Hour => fixed(3_600_000),
            Unit::Day => fixed(86_400_000),
            Unit::Week => cal(CalendarUnit::Week { start: 1 }),
            Unit::Month => cal(CalendarUnit::Month { day: 1 }),
            Unit::Year => cal(CalendarUnit::Year { month: 1, day: 1 }),
        })
    }

    /// The state of a counter that has never been hit, as of `now_ms`.
    pub fn fresh(&mut self, now_ms: i64) -> CounterState {
        match self {
            Window::Rolling { .. } => CounterState::Rolling(Box::default()),
            Window::Bucket { .. } => CounterState::Bucket {
                at_ms: now_ms,
                deficit: 0,
            },
            Window::FromFirstHit { .. } => CounterState::Window {
                end_ms: now_ms,
                used: 0,
            },
            Window::Fixed { .. } | Window::Calendar { .. } => CounterState::Window {
                end_ms: self.aligned_end_ms(now_ms),
                used: 0,
            },
        }
    }

    /// Brings `state` forward to `now_ms`: closes ended windows, drops rolling slots that
    /// left the window, refills buckets. Never moves a state backwards in time.
    pub fn refresh(&mut self, state: &mut CounterState, now_ms: i64) {
        match state {
            CounterState::Window { end_ms, used } if now_ms >= *end_ms => {
                *used = 0;
                *end_ms = match self {
                    Window::FromFirstHit { .. } => now_ms,
                    _ => self.aligned_end_ms(now_ms),
                };
            }
            _ => self.settle(state, now_ms),
        }
    }

    /// [`Window::refresh`] for rolling and bucket states, which needs no calendar math; a
    /// live fixed window is left as it is.
    pub fn settle(&self, state: &mut CounterState, now_ms: i64) {
        match (state, self) {
            (
                CounterState::Rolling(r),
                Window::Rolling {
                    resolution_ms,
                    slots,
                },
            ) => {
                let oldest_kept = now_ms.div_euclid(*resolution_ms) - slots + 1;
                while r.slots.front().is_some_and(|&(slot, _)| slot < oldest_kept) {
                    r.slots.pop_front();
                }
            }
            (CounterState::Bucket { at_ms, deficit }, Window::Bucket { refill_amount, .. })
                if now_ms > *at_ms =>
            {
                let elapsed = (now_ms - *at_ms) as u64;
                *deficit = deficit.saturating_sub(elapsed.saturating_mul(*refill_amount));
                *at_ms = now_ms;
            }
            _ => {}
        }
    }

    /// True when `state` is of the kind this window keeps (snapshot validation).
    pub fn fits(&self, state: &CounterState) -> bool {
        match (self, state) {
            (Window::Rolling { slots, .. }, CounterState::Rolling(r)) => {
                r.slots.len() as i64 <= *slots
                    && r.slots
                        .iter()
                        .zip(r.slots.iter().skip(1))
                        .all(|(a, b)| a.0 < b.0)
            }
            (Window::Bucket { .. }, CounterState::Bucket { .. }) => true,
            (
                Window::Fixed { .. } | Window::Calendar { .. } | Window::FromFirstHit { .. },
                CounterState::Window { .. },
            ) => true,
            _ => false,
        }
    }

    /// Hits left before `capacity` is reached, for a refreshed state.
    pub fn remaining(&self, state: &CounterState, capacity: u64) -> u64 {
        match state {
            CounterState::Window { used, .. } => capacity.saturating_sub(*used),
            CounterState::Rolling(r) => capacity.saturating_sub(r.total()),
            CounterState::Bucket { deficit, .. } => match *self {
                Window::Bucket { every_ms, .. } => {
                    (capacity * every_ms).saturating_sub(*deficit) / every_ms
                }
                _ => 0,
            },
        }
    }

    /// Hits recorded in a refreshed window or rolling state (saturating); a bucket's deficit
    /// in whole hits.
    pub fn used(&self, state: &CounterState) -> u64 {
        match state {
            CounterState::Window { used, .. } => *used,
            CounterState::Rolling(r) => r.total(),
            CounterState::Bucket { deficit, .. } => match *self {
                Window::Bucket { every_ms, .. } => deficit.div_ceil(every_ms),
                _ => 0,
            },
        }
    }

    /// True when hits beyond capacity were recorded (only Report can do that).
    pub fn overshot(&self, state: &CounterState, capacity: u64) -> bool {
        match state {
            CounterState::Window { used, .. } => *used > capacity,
            CounterState::Rolling(r) => r.total() > capacity,
            CounterState::Bucket { deficit, .. } => match *self {
                Window::Bucket { every_ms, .. } => *deficit > capacity * every_ms,
                _ => false,
            },
        }
    }

    /// Adds `hits` to a refreshed state.
    pub fn debit(&self, state: &mut CounterState, now_ms: i64, hits: u64) {
        match state {
            CounterState::Window { end_ms, used } => {
                if let Window::FromFirstHit { duration_ms } = *self
                    && *end_ms <= now_ms
                {
                    *end_ms = now_ms.saturating_add(duration_ms);
                }
                *used = used.saturating_add(hits);
            }
            CounterState::Rolling(r) => {
                if let Window::Rolling { resolution_ms, .. } = *self {
                    let slot = now_ms.div_euclid(resolution_ms);
                    match r.slots.back_mut() {
                        Some((last, n)) if *last == slot => *n = n.saturating_add(hits),
                        _ => r.slots.push_back((slot, hits)),
                    }
                }
            }
            CounterState::Bucket { deficit, .. } => {
                if let Window::Bucket { every_ms, .. } = *self {
                    *deficit = deficit.saturating_add(hits.saturating_mul(every_ms));
                }
            }
        }
    }

    /// Time from `now_ms` until the counter is back to full capacity, for a refreshed state.
    pub fn reset_in_ms(&self, state: &CounterState, now_ms: i64) -> u64 {
        let until = |t: i64| t.saturating_sub(now_ms).max(0) as u64;
        match (state, self) {
            (CounterState::Window { end_ms, .. }, Window::FromFirstHit { duration_ms })
                if *end_ms <= now_ms =>
            {
                *duration_ms as u64
            }
            (CounterState::Window { end_ms, .. }, _) => until(*end_ms),
            (
                CounterState::Rolling(r),
                Window::Rolling {
                    resolution_ms,
                    slots,
                },
            ) => r
                .slots
                .back()
                .map_or(0, |&(slot, _)| until((slot + slots) * resolution_ms)),
            (CounterState::Bucket { deficit, .. }, Window::Bucket { refill_amount, .. }) => {
                deficit.div_ceil(*refill_amount)
            }
            _ => 0,
        }
    }

    /// True when the state, refreshed to `now_ms`, would equal a fresh one.
    pub fn is_idle(&self, state: &CounterState, now_ms: i64) -> bool {
        match (state, self) {
            (CounterState::Window { end_ms, used }, _) => *used == 0 || now_ms >= *end_ms,
            (
                CounterState::Rolling(r),
                Window::Rolling {
                    resolution_ms,
                    slots,
                },
            ) => r
                .slots
                .back()
                .is_none_or(|&(slot, _)| slot < now_ms.div_euclid(*resolution_ms) - slots + 1),
            (CounterState::Bucket { at_ms, deficit }, Window::Bucket { refill_amount, .. }) => {
                let elapsed = now_ms.saturating_sub(*at_ms).max(0) as u64;
                *deficit <= elapsed.saturating_mul(*refill_amount)
            }
            // A state that does not fit its window cannot come from this engine.
            _ => unreachable!("counter state does not match its window"),
        }
    }

    /// End of the aligned (fixed or calendar) window containing `now_ms`.
    fn aligned_end_ms(&mut self, now_ms: i64) -> i64 {
        match self {
            Window::Fixed { duration_ms } => {
                (now_ms.div_euclid(*duration_ms) + 1).saturating_mul(*duration_ms)
            }
            Window::Calendar { unit, tz, cached } => {
                if !(cached.0 <= now_ms && now_ms < cached.1) {
                    *cached = calendar::bounds(*unit, tz, now_ms);
                }
                cached.1
            }
            Window::FromFirstHit { duration_ms } => now_ms.saturating_add(*duration_ms),
            Window::Rolling { .. } | Window::Bucket { .. } => now_ms,
        }
    }
}

fn check_anchor(unit: CalendarUnit) -> Result<(), String> {
    match unit {
        CalendarUnit::Day => Ok(()),
        CalendarUnit::Week { start } if (1..=7).contains(&start) => Ok(()),
        CalendarUnit::Week { start } => Err(format!("week start must be 1..=7, got {start}")),
        CalendarUnit::Month { day } if (1..=28).contains(&day) => Ok(()),
        CalendarUnit::Month { day } => Err(format!("month day must be 1..=28, got {day}")),
        CalendarUnit::Year { month, day }
            if (1..=12).contains(&month) && (1..=28).contains(&day) =>
        {
            Ok(())
        }
        CalendarUnit::Year { month, day } => Err(format!(
            "year start must be month 1..=12 and day 1..=28, got {month}-{day}"
        )),
    }
}

impl RollingState {
    /// Slots the buffer can hold without growing (for memory estimates).
    pub fn slots_capacity(&self) -> usize {
        self.slots.capacity()
    }
}
