//! The HTTP listener: `/healthz` (the process is up), `/readyz` (it can do its job: database
//! reachable, LISTEN connected, not shutting down; the JSON body names the failed check) and
//! `/metrics` (Prometheus text format); plus, when an admin token is configured, the admin
//! API and the event-bus compatibility endpoints of [`crate::api`].

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::api::{self, AdminToken, ApiState};
use crate::health::Health;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct HttpState {
    pub health: Health,
    pub metrics: Metrics,
    /// The admin API's own pool (the server's commit setting), apart from the relay's.
    pub pool: deadpool_postgres::Pool,
    /// `None`: the admin API and compatibility endpoints are not mounted at all (404).
    pub admin_token: Option<AdminToken>,
}

pub fn router(state: HttpState) -> Router {
    let api = state.admin_token.clone().map(|token| {
        api::router(ApiState {
            pool: state.pool.clone(),
            token,
        })
    });
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    match api {
        Some(api) => router.merge(api),
        None => router,
    }
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
