//! The promises the simulator holds every seed to, one file each. Every checker is a pure
//! function of the [`Evidence`] and its [`Replay`], and each is tested against a hand-made
//! history that breaks it.

pub mod acked_not_lost;
pub mod batch_time;
pub mod counting;
pub mod fast_bound;
pub mod liveness;
pub mod replica_agreement;
pub mod strict_capacity;

use crate::history::{Evidence, Violation};
use crate::replay::Replay;

/// Every invariant, in a fixed order.
pub fn check_all(ev: &Evidence) -> Vec<Violation> {
    let replay = Replay::build(ev);
    let mut out = replay.problems();
    out.extend(strict_capacity::check(ev, &replay));
    out.extend(fast_bound::check(ev, &replay));
    out.extend(acked_not_lost::check(ev, &replay));
    out.extend(replica_agreement::check(ev, &replay));
    out.extend(batch_time::check(ev, &replay));
    out.extend(liveness::check(ev, &replay));
    out
}

#[cfg(test)]
pub(crate) mod fixtures;
