//! Admin tokens on a three-node cluster: what a follower passes on to the leader carries the
//! caller's own bearer token, and the leader checks it (commit 0dd8dc8). A follower passes on
//! the `tally.v1.Cluster` calls (membership changes and status, `api::cluster::passed_on`);
//! key management (`tally.v1.Keys`) is checked by the follower's own guard and its commands
//! forwarded node to node.
//!
//! Each node names the same tokens with its own suffix (`ops@1`, `ops@2`, ...), so a
//! refusal, which names the token, also tells which node's guard refused.

mod common;

use std::time::Duration;

use common::Cluster;
use common::auth_cluster::{base_config, tokens_of_node, with_bearer};
use tally_proto::tally::v1::keys_client::KeysClient;
use tally_proto::tally::v1::{
    AddLearnerRequest, ClusterStatus, ClusterStatusRequest, CreateKeyRequest, DeleteKeyRequest,
    GetKeyRequest, ListKeysRequest, PromoteRequest,
};
use tally_server::api::auth::{AuthConfig, Role};
use tonic::transport::Channel;
use tonic::{Code, Status};

const ADMIN: &str = "fwd_admin_6a1f0e2d3c4b5a69788796a5";
const READER: &str = "fwd_reader_1b2c3d4e5f60718293a4b5c6";
const WRONG: &str = "fwd_wrong_00000000000000000000000000";

const TEST_LIMIT: Duration = Duration::from_secs(60);

async fn within<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("test within 60 s");
}

/// Node `node`'s tokens: `ops@<node>` (admin) and `dashboard@<node>` (read-only).
fn strict(node: usize) -> AuthConfig {
    tokens_of_node(
        node,
        &[
            ("ops", Role::Admin, ADMIN),
            ("dashboard", Role::ReadOnly, READER),
        ],
    )
}

#[track_caller]
fn assert_refused(result: Result<ClusterStatus, Status>, code: Code, message: &str) {
    let s = result.expect_err("refused");
    assert_eq!(s.code(), code, "{s:?}");
    assert!(
        s.message().contains(message),
        "expected {message:?} in {:?}",
        s.message()
    );
    for secret in [ADMIN, READER, WRONG] {
        assert!(!s.message().contains(secret), "a token echoed: {s:?}");
    }
}

/// The cluster as the leader sees it, asked through node `i`: (term, leader, answered by).
async fn view(c: &Cluster, i: usize) -> Result<(u64, Option<u64>, u64), Status> {
    let s = c
        .cluster_client(i)
        .await
        .status(with_bearer(ClusterStatusRequest {}, Some(ADMIN)))
        .await?
        .into_inner();
    Ok((s.term, s.leader_id, s.answered_by))
}

/// Waits until node `i` passes calls on to node 1, the leader (a follower passes calls on
/// only once it knows a leader).
async fn follows_node_1(c: &Cluster, i: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !matches!(view(c, i).await, Ok((_, Some(1), 1))) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {i} follows node 1 within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn add_3(c: &Cluster) -> AddLearnerRequest {
    AddLearnerRequest {
        id: 3,
        addr: c.raft_addrs[2].to_string(),
    }
}

/// Every node requires tokens. A follower's guard refuses a read-only or missing token
/// itself; an admin's membership change, and a read-only status, are passed on to the leader
/// with the caller's token — which the leader, requiring tokens too, admits (before 0dd8dc8
/// it was given none and answered UNAUTHENTICATED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_passes_membership_changes_on_with_the_callers_token() {
    within(async {
        let mut c =
            Cluster::unjoined_with_auth(base_config(), [strict(1), strict(2), strict(3)]).await;
        // Tokens are required everywhere, the leader included.
        let mut leader = c.cluster_client(1).await;
        assert_refused(
            leader
                .add_learner(with_bearer(add_3(&c), None))
                .await
                .map(|r| r.into_inner()),
            Code::Unauthenticated,
            "needs a bearer token",
        );
        c.join(2, 1, Some(ADMIN)).await;
        follows_node_1(&c, 2).await;
        let (term, ..) = view(&c, 1).await.unwrap();

        // Node 3 joins through the follower, node 2.
        let mut follower = c.cluster_client(2).await;
        for (token, code, message) in [
            (None, Code::Unauthenticated, "needs a bearer token"),
            (Some(WRONG), Code::Unauthenticated, "invalid bearer token"),
            (
                Some(READER),
                Code::PermissionDenied,
                concat!(
                    "tally.v1.Cluster/AddLearner needs role admin; ",
                    "token `dashboard@2` has role read-only"
                ),
            ),
        ] {
            let r = follower.add_learner(with_bearer(add_3(&c), token)).await;
            assert_refused(r.map(|r| r.into_inner()), code, message);
        }
        let added = follower
            .add_learner(with_bearer(add_3(&c), Some(ADMIN)))
            .await
            .expect("an admin's AddLearner, passed on, is admitted by the leader")
            .into_inner();
        assert_eq!(
            added.answered_by, 1,
            "the leader answered: the call was passed on"
        );
        let member_3 = added
            .members
            .iter()
            .find(|m| m.id == 3)
            .expect("3 is a member");
        assert!(!member_3.voter);
        for (token, code, message) in [
            (None, Code::Unauthenticated, "needs a bearer token"),
            (
                Some(READER),
                Code::PermissionDenied,
                concat!(
                    "tally.v1.Cluster/Promote needs role admin; ",
                    "token `dashboard@2` has role read-only"
                ),
            ),
        ] {
            let r = follower
                .promote(with_bearer(PromoteRequest { id: 3 }, token))
                .await;
            assert_refused(r.map(|r| r.into_inner()), code, message);
        }
        let promoted = follower
            .promote(with_bearer(PromoteRequest { id: 3 }, Some(ADMIN)))
            .await
            .expect("an admin's Promote, passed on, is admitted by the leader")
            .into_inner();
        assert_eq!(promoted.answered_by, 1);
        assert!(promoted.members.iter().all(|m| m.voter), "{promoted:?}");
        assert_eq!(promoted.members.len(), 3);
        c.node(3).wait_ready(Duration::from_secs(10)).await.unwrap();
        follows_node_1(&c, 3).await;

        // Status needs read-only: passed on with the reader's token, admitted by the leader.
        for via in [2, 3] {
            let mut client = c.cluster_client(via).await;
            let s = client
                .status(with_bearer(ClusterStatusRequest {}, Some(READER)))
                .await
                .unwrap_or_else(|s| panic!("a reader's status via node {via}: {s:?}"))
                .into_inner();
            assert_eq!(s.answered_by, 1, "passed on to the leader");
            let s = client
                .status(with_bearer(ClusterStatusRequest {}, None))
                .await
                .map(|r| r.into_inner());
            assert_refused(s, Code::Unauthenticated, "needs a bearer token");
        }
        assert_eq!(
            view(&c, 1).await.unwrap(),
            (term, Some(1), 1),
            "one leader throughout"
        );
        c.stop_all().await;
    })
    .await
}

/// A follower with no tokens configured admits every call from a loopback peer (the test)
/// and passes it on; the leader requires tokens. What the leader answers shows it checked
/// the caller's token itself — the refusal names the leader's own name for the reader's
/// token — and that the follower added no credentials of its own: passed on without a
/// token, the call is refused as having none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_checks_the_token_a_follower_passed_on() {
    within(async {
        let open_follower = AuthConfig::default();
        let mut c =
            Cluster::unjoined_with_auth(base_config(), [strict(1), open_follower, strict(3)]).await;
        c.join(2, 1, Some(ADMIN)).await;
        follows_node_1(&c, 2).await;
        let (term, ..) = view(&c, 1).await.unwrap();

        let mut follower = c.cluster_client(2).await;
        for (token, code, message) in [
            (None, Code::Unauthenticated, "needs a bearer token"),
            (Some(WRONG), Code::Unauthenticated, "invalid bearer token"),
            (
                Some(READER),
                Code::PermissionDenied,
                concat!(
                    "tally.v1.Cluster/AddLearner needs role admin; ",
                    "token `dashboard@1` has role read-only"
                ),
            ),
        ] {
            let r = follower.add_learner(with_bearer(add_3(&c), token)).await;
            assert_refused(r.map(|r| r.into_inner()), code, message);
            let r = follower
                .promote(with_bearer(PromoteRequest { id: 3 }, token))
                .await;
            assert_refused(
                r.map(|r| r.into_inner()),
                code,
                &message.replace("AddLearner", "Promote"),
            );
        }
        // The reader's token is enough for Status at the leader; no token is not.
        let s = follower
            .status(with_bearer(ClusterStatusRequest {}, Some(READER)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.answered_by, 1);
        let s = follower
            .status(with_bearer(ClusterStatusRequest {}, None))
            .await
            .map(|r| r.into_inner());
        assert_refused(s, Code::Unauthenticated, "needs a bearer token");

        let (added, promoted) = c.join(3, 2, Some(ADMIN)).await;
        assert_eq!((added.answered_by, promoted.answered_by), (1, 1));
        assert!(promoted.members.iter().all(|m| m.voter) && promoted.members.len() == 3);
        assert_eq!(
            view(&c, 1).await.unwrap(),
            (term, Some(1), 1),
            "one leader throughout"
        );
        c.stop_all().await;
    })
    .await
}

async fn keys_on(c: &Cluster, i: usize) -> KeysClient<Channel> {
    KeysClient::new(common::connect(c.node(i).grpc_addr).await)
}

fn new_key(name: &str) -> CreateKeyRequest {
    CreateKeyRequest {
        name: name.into(),
        subscription: "free".into(),
        ..Default::default()
    }
}

/// Key management on a follower: an admin token creates (and deletes) a key, which every
/// node then shows; a read-only token may only read; no token, nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_managed_through_a_follower_with_an_admin_token() {
    within(async {
        let mut c =
            Cluster::unjoined_with_auth(base_config(), [strict(1), strict(2), strict(3)]).await;
        c.join(2, 1, Some(ADMIN)).await;
        c.join(3, 1, Some(ADMIN)).await;
        follows_node_1(&c, 2).await;
        let mut follower = keys_on(&c, 2).await;
        let e = follower
            .create_key(with_bearer(new_key("by a reader"), Some(READER)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert_eq!(
            e.message(),
            "tally.v1.Keys/CreateKey needs role admin; token `dashboard@2` has role read-only"
        );
        let e = follower
            .create_key(with_bearer(new_key("by no one"), None))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

        let made = follower
            .create_key(with_bearer(new_key("by an admin"), Some(ADMIN)))
            .await
            .expect("an admin creates a key on a follower")
            .into_inner();
        let key = made.key.unwrap();
        assert_eq!(key.created_by, "ops@2", "the follower's guard admitted it");
        assert!(made.secret.starts_with(&format!("tly_{}_", key.id)));
        // Replicated: the leader and the other follower show it to a reader.
        for i in [1, 3] {
            let shown = keys_on(&c, i)
                .await
                .get_key(with_bearer(
                    GetKeyRequest { id: key.id.clone() },
                    Some(READER),
                ))
                .await
                .unwrap_or_else(|s| panic!("node {i}: {s:?}"))
                .into_inner();
            assert_eq!(
                (shown.name.as_str(), shown.id.as_str()),
                ("by an admin", &*key.id)
            );
        }
        let listed = follower
            .list_keys(with_bearer(ListKeysRequest {}, Some(READER)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.keys.len(), 1, "only the admin's key was made");

        // Deleting is an admin's too.
        let delete = || DeleteKeyRequest { id: key.id.clone() };
        let e = follower
            .delete_key(with_bearer(delete(), Some(READER)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        follower
            .delete_key(with_bearer(delete(), Some(ADMIN)))
            .await
            .unwrap();
        let e = keys_on(&c, 1)
            .await
            .get_key(with_bearer(
                GetKeyRequest { id: key.id.clone() },
                Some(READER),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        c.stop_all().await;
    })
    .await
}
