//! Membership changes, played as an operator would: replace a member with a new node.
//!
//! A change adds a fresh node (new id, empty disk) as a learner, promotes it to voter, then
//! removes another member (which retires its id through the log). Each step goes to the node
//! that reports itself leader, through the server's own `Node::{add_learner, promote, remove}`
//! (what `tally cluster add-learner|promote|remove` calls), and is retried, as an operator
//! would retry, until it succeeds or the change's time runs out. The operator's own link to the
//! leader is not faulted; the cluster's links are, as usual.

use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use parking_lot::Mutex;
use tally_server::node::Node;
use tally_server::node::raft_types::NodeId;
use tokio::time::Instant;

use crate::network::{Router, addr_of};

/// One attempt of one step waits this long at most.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between attempts (no leader, or the leader refused or timed out).
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// A change gives up after this long (simulated); a removal left halfway is retried at healing.
pub const CHANGE_WITHIN: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    AddLearner(NodeId),
    Promote(NodeId),
    Remove(NodeId),
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::AddLearner(id) => write!(f, "add learner n{id}"),
            Step::Promote(id) => write!(f, "promote n{id}"),
            Step::Remove(id) => write!(f, "remove n{id}"),
        }
    }
}

/// What the operator saw, drained by the simulator into its trace.
#[derive(Clone, Debug)]
pub enum Note {
    Done {
        step: Step,
        by: NodeId,
    },
    Failed {
        step: Step,
        by: NodeId,
        error: String,
    },
    GaveUp(Step),
}

pub type Notes = Arc<Mutex<Vec<Note>>>;

/// The node that reports itself leader with the highest term.
fn leader(router: &Router) -> Option<(NodeId, Node)> {
    router
        .live()
        .into_iter()
        .filter_map(|(id, n)| {
            let term = {
                let m = n.raft().metrics();
                let m = m.borrow();
                (m.state == ServerState::Leader).then_some(m.current_term)
            };
            term.map(|t| (t, id, n))
        })
        .max_by_key(|(t, id, _)| (*t, *id))
        .map(|(_, id, n)| (id, n))
}

async fn attempt(node: &Node, step: Step) -> Result<(), String> {
    let call = async {
        match step {
            Step::AddLearner(id) => node.add_learner(id, &addr_of(id)).await,
            Step::Promote(id) => node.promote(id).await,
            Step::Remove(id) => node.remove(id).await,
        }
    };
    match tokio::time::timeout(STEP_TIMEOUT, call).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {STEP_TIMEOUT:?}")),
    }
}

/// Runs `steps` in order, each retried until done or `deadline`; stops at the first that
/// gives up.
pub async fn run(router: Arc<Router>, notes: Notes, steps: Vec<Step>, deadline: Instant) {
    for step in steps {
        loop {
            if Instant::now() >= deadline {
                notes.lock().push(Note::GaveUp(step));
                return;
            }
            let Some((by, node)) = leader(&router) else {
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            };
            match attempt(&node, step).await {
                Ok(()) => {
                    notes.lock().push(Note::Done { step, by });
                    break;
                }
                Err(error) => {
                    notes.lock().push(Note::Failed { step, by, error });
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }
}
