//! The HTTP listener: `/healthz` (the process is up), `/readyz` (it can do its job: database
//! reachable, LISTEN connected, not shutting down; the JSON body names the failed check) and
//! `/metrics` (Prometheus text format).

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::health::Health;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct HttpState {
    pub health: Health,
    pub metrics: Metrics,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    let readiness = state.health.readiness();
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(readiness))
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
