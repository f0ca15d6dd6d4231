//! The seam between the API layer and replication.
//!
//! The API layer hands [`Command`]s to a [`Node`] and awaits their [`Outcome`]s; it never sees
//! how they are ordered. Here a local batcher orders them: it collects concurrent commands into
//! a batch (up to `max_batch_commands`, lingering up to `batch_linger` for more), stamps the
//! batch with `max(last_stamp, now)` and applies it to the engine. Replication replaces the
//! batcher with a Raft log; `Node`'s interface stays as it is.
//!
//! Layout:
//! - [`clock`]: where batch time comes from (the system clock, or a manual one in tests).
//! - `batcher`: the local batching loop.

mod batcher;
pub mod clock;

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use crate::engine::{Command, Engine, Outcome};
pub use clock::{Clock, ManualClock, SystemClock};

/// Commands waiting for a batch at most; proposers wait (backpressure) beyond it.
pub const MAX_QUEUED_COMMANDS: usize = 65_536;
/// Upper bound for `max_batch_commands`.
pub const MAX_BATCH_COMMANDS: usize = 65_536;

/// How batches form.
#[derive(Clone, Copy, Debug)]
pub struct BatchConfig {
    /// Most commands in one batch.
    pub max_batch_commands: usize,
    /// How long a batch waits for more commands after its first. Zero: take what is queued
    /// and go (commands that arrive while a batch applies form the next one).
    pub batch_linger: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_batch_commands: 512,
            batch_linger: Duration::ZERO,
        }
    }
}

/// Why a command got no outcome.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeError {
    /// The node is shutting down; the command may or may not have been applied.
    #[error("node is shutting down")]
    Stopped,
}

/// A proposal waiting for its batch.
struct Proposal {
    command: Command,
    reply: oneshot::Sender<Outcome>,
}

/// A handle to the node: cheap to clone, shared by every API service.
#[derive(Clone)]
pub struct Node {
    tx: mpsc::Sender<Proposal>,
    engine: Arc<Mutex<Engine>>,
}

impl Node {
    /// Starts a single local node applying to `engine`. The batcher stops when every `Node`
    /// handle is dropped, after answering what it already took.
    pub fn start_local(engine: Engine, clock: Arc<dyn Clock>, config: BatchConfig) -> Node {
        assert!(
            (1..=MAX_BATCH_COMMANDS).contains(&config.max_batch_commands),
            "max_batch_commands out of range"
        );
        let engine = Arc::new(Mutex::new(engine));
        let (tx, rx) = mpsc::channel(MAX_QUEUED_COMMANDS);
        tokio::spawn(batcher::run(rx, engine.clone(), clock, config));
        Node { tx, engine }
    }

    /// Orders `command` after every command proposed before it returns, applies it, and
    /// returns its outcome. Cancel-safe: dropping the future abandons the wait, not the command.
    pub async fn propose(&self, command: Command) -> Result<Outcome, NodeError> {
        let (reply, outcome) = oneshot::channel();
        self.tx
            .send(Proposal { command, reply })
            .await
            .map_err(|_| NodeError::Stopped)?;
        outcome.await.map_err(|_| NodeError::Stopped)
    }

    /// Reads applied state. Locally every applied command is visible; replication makes this
    /// a linearizable read.
    pub async fn read<R>(&self, f: impl FnOnce(&Engine) -> R) -> Result<R, NodeError> {
        Ok(f(&self.engine.lock()))
    }

    /// True when the node can take commands.
    pub fn is_ready(&self) -> bool {
        !self.tx.is_closed()
    }
}
