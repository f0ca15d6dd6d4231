//! Three-node clusters whose nodes require admin tokens, each node with its own
//! [`AuthConfig`] (so a test can tell which node's guard decided a call), and requests that
//! carry a bearer token.

use std::sync::Arc;
use std::time::Duration;

use tally_proto::tally::v1::{AddLearnerRequest, ClusterStatus, PromoteRequest};
use tally_server::api::auth::{AuthConfig, Role};
use tally_server::node::{ManualClock, RaftTimings};
use tally_server::server::ServerConfig;
use tokio::net::TcpListener;
use tonic::Request;

use super::{Cluster, T0_MS};

/// `message` with `authorization: Bearer <token>` when a token is given.
pub fn with_bearer<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(message);
    if let Some(token) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    r
}

/// Tokens `(name, role, token)`, each name suffixed `@<node>` so that a refusal, which names
/// the token, also names the node whose guard refused it.
pub fn tokens_of_node(node: usize, tokens: &[(&str, Role, &str)]) -> AuthConfig {
    let mut auth = AuthConfig::default();
    for (name, role, token) in tokens {
        auth = auth
            .with_token(&format!("{name}@{node}"), *role, token)
            .unwrap();
    }
    auth
}

/// Raft timings for clusters whose leader must stay put for the whole test: quick
/// heartbeats, elections only after a second of silence.
pub fn steady_timings() -> RaftTimings {
    RaftTimings {
        heartbeat_ms: 50,
        election_min_ms: 1_000,
        election_max_ms: 2_000,
        snapshot_every_entries: 500,
        logs_kept_behind_snapshot: 0,
    }
}

/// The base configuration of such a cluster: the embedded example limits (with its
/// subscriptions), [`steady_timings`].
pub fn base_config() -> ServerConfig {
    ServerConfig {
        limits: ServerConfig::default().limits,
        limits_poll: Duration::ZERO,
        timings: steady_timings(),
        ..ServerConfig::default()
    }
}

impl Cluster {
    /// Three nodes, node `i` guarded by `auth[i - 1]`, on a manual clock at [`T0_MS`]: node 1
    /// bootstrapped (a one-node cluster) and ready; nodes 2 and 3 running, not yet members
    /// ([`Cluster::join`]).
    ///
    /// `base.auth` is left as the last node's: a node restarted later with
    /// [`Cluster::start_node`] gets it unless the test sets `base.auth` first.
    pub async fn unjoined_with_auth(base: ServerConfig, auth: [AuthConfig; 3]) -> Cluster {
        let clock = Arc::new(ManualClock::new(T0_MS));
        let base = ServerConfig {
            clock: clock.clone(),
            ..base
        };
        let mut raft_addrs = Vec::new();
        let mut reserved = Vec::new();
        for _ in 0..3 {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            raft_addrs.push(l.local_addr().unwrap());
            reserved.push(Some(l));
        }
        let mut c = Cluster {
            base,
            dir: tempfile::tempdir().unwrap(),
            clock,
            raft_addrs,
            reserved,
            nodes: vec![None, None, None],
        };
        for (i, auth) in auth.into_iter().enumerate() {
            c.base.auth = auth;
            c.start_node(i + 1, i == 0).await;
            if i == 0 {
                c.node(1).wait_ready(Duration::from_secs(10)).await.unwrap();
            }
        }
        c
    }

    /// Adds node `id` as a learner and promotes it, both calls made to node `via`'s Raft
    /// listener with `token`; answers once the node is ready. The statuses answered.
    pub async fn join(
        &self,
        id: u64,
        via: usize,
        token: Option<&str>,
    ) -> (ClusterStatus, ClusterStatus) {
        let mut admin = self.cluster_client(via).await;
        let added = admin
            .add_learner(with_bearer(
                AddLearnerRequest {
                    id,
                    addr: self.raft_addrs[id as usize - 1].to_string(),
                },
                token,
            ))
            .await
            .unwrap_or_else(|s| panic!("add learner {id} via node {via}: {s:?}"))
            .into_inner();
        let promoted = admin
            .promote(with_bearer(PromoteRequest { id }, token))
            .await
            .unwrap_or_else(|s| panic!("promote {id} via node {via}: {s:?}"))
            .into_inner();
        self.node(id as usize)
            .wait_ready(Duration::from_secs(10))
            .await
            .unwrap();
        (added, promoted)
    }

    /// Stops every running node.
    pub async fn stop_all(&mut self) {
        for i in 1..=3 {
            if self.nodes[i - 1].is_some() {
                self.stop(i).await;
            }
        }
    }
}
