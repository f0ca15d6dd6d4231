//! The HTTP listener: `/healthz` (the process answers), `/readyz` (it can decide) and
//! `/metrics` (Prometheus text, see [`crate::metrics`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;

use crate::metrics::{self, Metrics};
use crate::node::Node;

/// Whether the node has its first limit set in force.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

pub fn router(node: Node, readiness: Readiness, metrics: Metrics) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(scrape))
        .with_state((node, readiness, metrics))
}

type AppState = (Node, Readiness, Metrics);

async fn readyz(State((node, readiness, _)): State<AppState>) -> (StatusCode, &'static str) {
    if readiness.is_ready() && node.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Every metric as Prometheus text; the engine's status is sampled first (at most once a
/// second, however often this is scraped).
async fn scrape(
    State((node, _, metrics)): State<AppState>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    metrics.sample_engine(&node).await;
    ([(CONTENT_TYPE, metrics::CONTENT_TYPE)], metrics.render())
}
