//! `/readyz` says whether a node can decide now (a leader known, not catching up); `/healthz`
//! only that the process answers. Readiness follows elections: a node left without a quorum
//! campaigns with no leader and is not ready, until a majority is back.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tally_server::node::ManualClock;
use tally_server::server::ServerConfig;

const WAIT: Duration = Duration::from_secs(20);

async fn status(addr: std::net::SocketAddr, path: &str) -> Option<u16> {
    http1::status_of(addr, path, Duration::from_secs(2)).await
}

/// Polls `/readyz` until it answers `want`.
async fn until_ready_is(addr: std::net::SocketAddr, want: u16) {
    let started = Instant::now();
    while status(addr, "/readyz").await != Some(want) {
        assert!(started.elapsed() < WAIT, "/readyz {want} within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_flips_while_a_node_has_no_leader_and_liveness_does_not() {
    let clock = std::sync::Arc::new(ManualClock::new(T0_MS));
    let base = ServerConfig {
        timings: fast_timings(),
        ..ServerConfig::default()
    };
    let mut cluster = Cluster::three(base, clock).await;
    let http = cluster.node(2).http_addr;
    until_ready_is(http, 200).await;
    // Node 2 alone: it campaigns and cannot win, so no leader is known.
    cluster.stop(1).await;
    cluster.stop(3).await;
    until_ready_is(http, 503).await;
    assert_eq!(status(http, "/healthz").await, Some(200), "alive all along");
    // Stays so while the election cannot end.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status(http, "/readyz").await, Some(503));
    // A majority again: a leader is elected and node 2 is ready.
    cluster.start_node(1, false).await;
    until_ready_is(http, 200).await;
    until_ready_is(cluster.node(1).http_addr, 200).await;
    cluster.stop(1).await;
    cluster.stop(2).await;
}
