//! The engine's whole replicated state to bytes and back.
//!
//! Format: the 8-byte magic `TALLYSN4`, then a postcard-encoded [`Body`].
//!
//! The counter table is written exactly as it is: in table order, idle counters included,
//! with the reclamation cursor. The table's size decides whether a request that needs a new
//! counter fits under the bound, and its order decides what reclamation removes next, so both
//! are replicated state: a restored engine must hold the very same table to decide alike.

use serde::{Deserialize, Serialize};

use super::counters::{self, Counters, OVERRIDE_LIMIT_ID};
use super::limits::LimitSpec;
use super::registry::Registry;
use super::window::{CounterState, Window};
use super::{Engine, EngineSettings, calendar};

const MAGIC: &[u8; 8] = b"TALLYSN4";

#[derive(Serialize, Deserialize)]
struct Body {
    settings: EngineSettings,
    last_ms: i64,
    generation: u64,
    next_limit_id: u32,
    limits: Vec<(u32, LimitSpec)>,
    counters: Vec<(Vec<u8>, CounterState)>,
    cursor: u64,
    retired_nodes: Vec<u64>,
    meter: super::meter::MeterImage,
    keys: super::keys::Keys,
    audit: super::audit::AuditLog,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a Tally engine snapshot (bad magic)")]
    BadMagic,
    #[error("snapshot does not decode: {0}")]
    Decode(#[from] postcard::Error),
    #[error("snapshot holds an invalid limit: {0}")]
    Limit(#[from] super::CommandError),
    #[error("snapshot holds an invalid counter: {0}")]
    Counter(String),
    #[error("snapshot holds invalid metering state: {0}")]
    Meter(String),
    #[error("snapshot holds an invalid audit log: {0}")]
    Audit(String),
}

impl Engine {
    /// Serializes the whole replicated state.
    pub fn snapshot(&self) -> Vec<u8> {
        let counters = self
            .counters
            .iter()
            .map(|(key, state)| (key.to_vec(), state.clone()))
            .collect();
        let body = Body {
            settings: self.settings,
            last_ms: self.last_ms,
            generation: self.registry.generation,
            next_limit_id: self.registry.next_id,
            limits: self
                .registry
                .order
                .iter()
                .map(|id| (*id, self.registry.limits[id].spec.clone()))
                .collect(),
            counters,
            cursor: self.counters.cursor() as u64,
            retired_nodes: self.retired_nodes.iter().copied().collect(),
            meter: self.meter.image(),
            keys: self.keys.clone(),
            audit: self.audit.clone(),
        };
        let mut out = MAGIC.to_vec();
        postcard::to_io(&body, &mut out).expect("writing to a Vec cannot fail");
        out
    }

    /// Rebuilds an engine from [`Engine::snapshot`] bytes, checking every part.
    pub fn restore(bytes: &[u8]) -> Result<Engine, SnapshotError> {
        let rest = bytes.strip_prefix(MAGIC).ok_or(SnapshotError::BadMagic)?;
        let body: Body = postcard::from_bytes(rest)?;
        if !(calendar::MIN_TIME_MS..=calendar::MAX_TIME_MS).contains(&body.last_ms) {
            return Err(SnapshotError::Counter(format!(
                "time {} out of range",
                body.last_ms
            )));
        }
        let mut registry = Registry::restore(body.limits, body.next_limit_id)?;
        registry.generation = body.generation;
        let mut engine = Engine::new(body.settings);
        engine.last_ms = body.last_ms;
        engine.retired_nodes = body.retired_nodes.into_iter().collect();
        engine.meter = super::meter::Meter::from_image(body.meter).map_err(SnapshotError::Meter)?;
        engine.keys = body.keys;
        body.audit.check().map_err(SnapshotError::Audit)?;
        engine.audit = body.audit;
        engine.registry = registry;
        engine.counters = Counters::default();
        for (key, state) in body.counters {
            engine.check_counter(&key, &state)?;
            if engine.counters.contains(&key) {
                return Err(SnapshotError::Counter("duplicate key".into()));
            }
            engine.counters.insert(&key, state);
        }
        match usize::try_from(body.cursor) {
            Ok(cursor) if cursor <= engine.counters.len() => engine.counters.set_cursor(cursor),
            _ => {
                return Err(SnapshotError::Counter(
                    "sweep cursor beyond the table".into(),
                ));
            }
        }
        Ok(engine)
    }

    fn window_of_key(&self, key: &[u8]) -> Option<&Window> {
        match counters::limit_id_of(key) {
            OVERRIDE_LIMIT_ID => None,
            id => self.registry.limits.get(&id).map(|l| &l.window),
        }
    }

    fn check_counter(&self, key: &[u8], state: &CounterState) -> Result<(), SnapshotError> {
        if key.len() < 4 {
            return Err(SnapshotError::Counter("key shorter than a limit id".into()));
        }
        let id = counters::limit_id_of(key);
        let fits = match (self.window_of_key(key), state) {
            (None, CounterState::Window { .. }) if id == OVERRIDE_LIMIT_ID => true,
            // A counter of a limit that went away, not yet reclaimed: kept as it was.
            (None, _) => id != OVERRIDE_LIMIT_ID && id < self.registry.next_id,
            (Some(window), state) => window.fits(state),
        };
        if fits {
            Ok(())
        } else {
            Err(SnapshotError::Counter(format!(
                "counter of limit {} does not match its window",
                counters::limit_id_of(key)
            )))
        }
    }
}
