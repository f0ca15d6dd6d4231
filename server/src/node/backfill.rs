//! Fills the holes in this node's usage archive from other members.
//!
//! A node restored from a leader's snapshot (wiped, or too far behind for the log) holds only
//! the records that snapshot's engine tail carried and those after; the seqs before are a hole
//! in its archive (see `usage_archive`). Every [`BACKFILL_EVERY`] this task asks the members,
//! in turn, for the records of its oldest hole, a page at a time, and writes them as closed
//! segments. Records never change once written and every member archives the same ones, so
//! any member that holds them is as good as the leader. A member that cannot help (it has a
//! hole there too, dropped them by retention, or is down) is skipped; a hole no member holds
//! stays a hole, refused on read with the range it covers.
//!
//! Pages are read over the node's forwarding transport (`tally.v1.Forward/ReadUsage`), so with
//! the cluster's mutual TLS when the Raft listener has it (`Node::start`'s `peer_tls`).

use std::time::Duration;

use super::Node;
use super::raft_types::NodeId;

/// How often the archive's holes are looked for.
pub const BACKFILL_EVERY: Duration = Duration::from_secs(2);
/// Most records asked for at once.
pub const BACKFILL_PAGE: u64 = 10_000;

/// Runs until the node stops.
pub async fn run(node: Node) {
    loop {
        tokio::time::sleep(BACKFILL_EVERY).await;
        if node.is_stopping() {
            return;
        }
        // Page after page while it makes progress; then wait for the next round.
        while fill_once(&node).await {
            if node.is_stopping() {
                return;
            }
        }
    }
}

/// Fills the front of the oldest hole with one page from the first member that has it;
/// whether it did.
async fn fill_once(node: &Node) -> bool {
    let Some((from, to)) = node.archive_holes().into_iter().next() else {
        return false;
    };
    let want = (to - from + 1).min(BACKFILL_PAGE);
    for (id, addr) in node.members() {
        if id == node.id() {
            continue;
        }
        let records = match node.forward.read_usage(&addr, from - 1, want).await {
            Ok(records) => records,
            Err(e) => {
                tracing::debug!(member = id, error = %e, from, to, "usage backfill: member cannot help");
                continue;
            }
        };
        let page: Vec<_> = records.into_iter().take_while(|r| r.seq <= to).collect();
        if page.first().is_none_or(|r| r.seq != from) {
            continue;
        }
        match node.archive.fill(&page) {
            Ok(()) => {
                tracing::info!(
                    member = id,
                    from,
                    to = from + page.len() as u64 - 1,
                    "usage backfill: records copied"
                );
                return true;
            }
            Err(e) => {
                tracing::warn!(member = id, error = %e, "usage backfill: records refused");
            }
        }
    }
    false
}

impl Node {
    /// The members in the membership in force: id and Raft address.
    fn members(&self) -> Vec<(NodeId, String)> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        metrics
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect()
    }

    /// Holes in this node's usage archive (seq ranges, inclusive).
    pub fn archive_holes(&self) -> Vec<(u64, u64)> {
        self.archive.holes()
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }
}
