//! The operations endpoints on their own HTTP port: `/healthz` (the process is
//! up), `/readyz` (the store answers and consentd is not shutting down) and
//! Prometheus `/metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::hub::{Hub, blocking};

pub fn router(hub: Arc<Hub>) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(hub)
}

async fn ready(State(hub): State<Arc<Hub>>) -> (StatusCode, &'static str) {
    if *hub.shutdown.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    match blocking(&hub.store, |s| s.head()).await {
        Ok(_) => (StatusCode::OK, "ready\n"),
        Err(e) => {
            tracing::warn!("not ready: {e}");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n")
        }
    }
}

async fn metrics(
    State(hub): State<Arc<Hub>>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    let head = hub.head();
    let sidecars = hub.list_sidecars();
    let connected: Vec<_> = sidecars.iter().filter(|s| s.connected).collect();
    let lags: Vec<(String, u64)> = connected
        .iter()
        .map(|s| (s.node_id.clone(), head.saturating_sub(s.acked_revision)))
        .collect();
    let body = hub.metrics.render(head, connected.len(), &lags);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
}
