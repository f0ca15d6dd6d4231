//! The counter table: compact keys, states, bounded size, incremental reclamation.
//!
//! A key is `limit id (u32 LE)` followed by length-prefixed parts (`u16 LE` length, bytes):
//! the values of the limit's variables, or for a descriptor's `limit` override the override's
//! unit, size and the whole descriptor. Keys are boxed byte slices and states are 24 bytes, so
//! a fixed-window counter costs its key plus about 60 bytes of table.

use indexmap::IndexMap;

use super::window::CounterState;

/// Limit id reserved for counters created by a descriptor's `limit` override.
pub const OVERRIDE_LIMIT_ID: u32 = u32::MAX;
/// Counters examined for reclamation per applied batch, at least.
pub const SWEEP_PER_BATCH: usize = 64;
/// Counters examined per command of a batch, on top of [`SWEEP_PER_BATCH`].
pub const SWEEP_PER_COMMAND: usize = 4;
/// Counters examined at most in one emergency sweep when the table is full.
pub const SWEEP_WHEN_FULL: usize = 4_096;

/// A seeded hasher: keys come from the network, so the seed is random per process. Iteration
/// order does not depend on it (the table keeps insertion order).
type Hasher = std::hash::RandomState;

pub struct Counters {
    map: IndexMap<Box<[u8]>, CounterState, Hasher>,
    /// Where the incremental sweep resumes.
    cursor: usize,
    /// Counters reclaimed since this engine was built.
    pub reclaimed: u64,
}

/// Appends one length-prefixed part to a key under construction. Parts are bounded well
/// below `u16::MAX` by the command and limit validation.
pub fn push_part(key: &mut Vec<u8>, part: &[u8]) {
    let len = u16::try_from(part.len()).expect("key parts are bounded by validation");
    key.extend_from_slice(&len.to_le_bytes());
    key.extend_from_slice(part);
}

/// Starts a key for `limit_id` in `key` (cleared first).
pub fn start_key(key: &mut Vec<u8>, limit_id: u32) {
    key.clear();
    key.extend_from_slice(&limit_id.to_le_bytes());
}

/// The limit id a key belongs to.
pub fn limit_id_of(key: &[u8]) -> u32 {
    u32::from_le_bytes(key[..4].try_into().expect("keys start with a limit id"))
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            map: IndexMap::with_hasher(Hasher::default()),
            cursor: 0,
            reclaimed: 0,
        }
    }
}

impl Counters {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn get_mut(&mut self, key: &[u8]) -> Option<&mut CounterState> {
        self.map.get_mut(key)
    }

    pub fn get(&self, key: &[u8]) -> Option<&CounterState> {
        self.map.get(key)
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        self.map.contains_key(key)
    }

    pub fn insert(&mut self, key: &[u8], state: CounterState) {
        self.map.insert(key.into(), state);
    }

    /// Where the incremental sweep resumes (replicated state: it decides what is reclaimed).
    pub fn cursor(&self) -> usize {
        self.cursor
    }

    pub fn set_cursor(&mut self, cursor: usize) {
        self.cursor = cursor;
    }

    /// Counters in table order (insertion order, as changed by reclamation).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &CounterState)> {
        self.map.iter().map(|(k, v)| (&**k, v))
    }

    /// Examines up to `budget` counters from the cursor and removes those `reclaimable`
    /// says may go. Returns how many were removed.
    pub fn sweep(
        &mut self,
        budget: usize,
        mut reclaimable: impl FnMut(&[u8], &CounterState) -> bool,
    ) -> usize {
        let mut removed = 0;
        for _ in 0..budget.min(self.map.len()) {
            if self.cursor >= self.map.len() {
                self.cursor = 0;
            }
            let (key, state) = self.map.get_index(self.cursor).expect("cursor < len");
            if reclaimable(key, state) {
                // The last counter moves into the cursor's place and is examined next.
                self.map.swap_remove_index(self.cursor);
                removed += 1;
            } else {
                self.cursor += 1;
            }
        }
        self.reclaimed += removed as u64;
        removed
    }

    /// Estimated heap and table bytes held by the counters.
    pub fn bytes_estimate(&self) -> u64 {
        // Per entry: the entries vector (hash + boxed key + state), the index table (one usize
        // per bucket at 7/8 load plus a control byte) and the key's own allocation rounded to
        // the allocator's 16-byte classes. Rolling states add their slot buffers.
        let entry = std::mem::size_of::<(u64, Box<[u8]>, CounterState)>() as u64;
        let index = (8 * 8 / 7 + 1) as u64;
        let mut total = self.map.capacity() as u64 * entry + self.map.len() as u64 * index;
        for (key, state) in &self.map {
            total += (key.len() as u64).div_ceil(16) * 16;
            if let CounterState::Rolling(r) = state {
                total += std::mem::size_of_val(&**r) as u64 + r.slots_capacity() as u64 * 16;
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefixed_with_the_limit_id() {
        let mut key = Vec::new();
        start_key(&mut key, 7);
        push_part(&mut key, b"alice");
        assert_eq!(limit_id_of(&key), 7);
        assert_eq!(&key[4..6], &5u16.to_le_bytes());
        assert_eq!(&key[6..], b"alice");
    }

    #[test]
    fn sweep_reclaims_only_what_it_is_told_and_wraps_around() {
        let mut c = Counters::default();
        let mut key = Vec::new();
        for i in 0..10u32 {
            start_key(&mut key, i);
            c.insert(
                &key,
                CounterState::Window {
                    end_ms: i64::from(i),
                    used: 1,
                },
            );
        }
        // Remove the even limit ids, in budgets of 3.
        let mut removed = 0;
        for _ in 0..10 {
            removed += c.sweep(3, |k, _| limit_id_of(k).is_multiple_of(2));
        }
        assert_eq!(removed, 5);
        assert_eq!(c.reclaimed, 5);
        assert!(c.iter().all(|(k, _)| !limit_id_of(k).is_multiple_of(2)));
    }
}
