//! The admin HTTP API (`/admin/v1/…`) and the compatibility endpoints of the previous
//! in-house event bus, served on the relay's HTTP listener next to `/metrics`.
//!
//! Both exist only when `OUTBOX_ADMIN_TOKEN` is set: without it [`router`] is never mounted
//! and every path here answers 404, so an operator cannot expose them by accident. Every
//! route except the OpenAPI document requires `Authorization: Bearer <token>`, compared in
//! constant time.
//!
//! Handlers are thin: they parse and check the request, then call [`crate::admin`], which
//! the CLI uses too, so the two cannot drift. Errors have one JSON shape
//! (`{"error": {"code", "message", "field"}}`, see [`ApiError`]). This module never holds a
//! database connection across anything but its own queries.
//!
//! Every text a request carries enters through one of three extractors, [`ApiJson`],
//! [`ApiQuery`] and [`ApiPath`], and they are the one place text is checked for what
//! PostgreSQL cannot store: U+0000 (in any string or key at any depth) and bytes that are
//! not UTF-8 are a 400 naming the field (`name`, `headers.X-Team`, `event_types[1]`) before
//! a handler runs. What still reaches the database as bad data (SQLSTATE classes 22 and
//! 23) comes back from [`crate::admin`] as invalid input, also a 400.
//!
//! Routes are registered with `utoipa_axum`'s `routes!`, which takes each handler's path and
//! method from its `#[utoipa::path]`: the router and the OpenAPI document ([`openapi`]) are
//! built from the same list, so a route cannot be served undocumented or documented unserved.

mod error;
mod extract;

pub use error::*;
pub use extract::*;

pub mod admin;

pub mod compat;

pub mod openapi;

use std::fmt;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use uuid::Uuid;

use crate::admin::AdminError;
use crate::db::DbError;

/// The admin token, kept only as its SHA-256 digest. Comparing digests of equal length in
/// constant time reveals neither the token's bytes nor its length through timing.
#[derive(Clone)]
pub struct AdminToken {
    digest: Arc<[u8]>,
}

impl AdminToken {
    /// `None` for an empty or blank token: `Authorization: Bearer ` must never open the API.
    pub fn new(token: &str) -> Option<AdminToken> {
        if token.trim().is_empty() {
            return None;
        }
        Some(AdminToken {
            digest: Arc::from(Sha256::digest(token.as_bytes()).as_slice()),
        })
    }

    pub fn matches(&self, presented: &str) -> bool {
        let presented = Sha256::digest(presented.as_bytes());
        bool::from(presented.as_slice().ct_eq(&self.digest))
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// What the handlers share: the admin pool (a few connections of its own, apart from the
/// relay's, so API requests never take the hot path's connections, and commit as the
/// server is configured: durably by default) and the token.
#[derive(Clone)]
pub struct ApiState {
    pub pool: Pool,
    pub token: AdminToken,
}

impl ApiState {
    /// A pooled connection; none within the pool's wait timeout is a 503.
    async fn client(&self) -> Result<deadpool_postgres::Object, ApiError> {
        self.pool.get().await.map_err(|source| {
            ApiError::from(AdminError::Db(DbError::Pool {
                context: "serving an API request",
                source,
            }))
        })
    }
}

/// The admin API and the compatibility endpoints, to merge into the HTTP listener's router.
pub fn router(state: ApiState) -> Router {
    let guarded =
        guarded_routes().route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let (router, _) = open_routes().merge(guarded).split_for_parts();
    router.with_state(state)
}

/// Routes every request to which needs the bearer token.
fn guarded_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .nest("/admin/v1", admin::routes())
        .merge(compat::routes())
}

/// The document describes the API and holds nothing secret, so tools can fetch it without the
/// token; it is still only served when the API is on.
fn open_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(utoipa_axum::routes!(openapi::document))
}

/// The OpenAPI document of exactly the routes [`router`] serves.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let guarded = openapi::guarded(guarded_routes().into_openapi());
    openapi::root(open_routes().into_openapi().merge_from(guarded))
}

/// Refuses requests without the right bearer token (401 with `WWW-Authenticate: Bearer`).
async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, token) = value.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    match presented {
        Some(token) if state.token.matches(token) => next.run(request).await,
        Some(_) => unauthorized(
            "the bearer token is not valid; use the value of OUTBOX_ADMIN_TOKEN",
            r#"Bearer realm="outbox-relay", error="invalid_token""#,
        ),
        None => unauthorized(
            "missing bearer token; send Authorization: Bearer <OUTBOX_ADMIN_TOKEN>",
            r#"Bearer realm="outbox-relay""#,
        ),
    }
}

fn unauthorized(message: &str, challenge: &'static str) -> Response {
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_themselves() {
        let token = AdminToken::new("s3cret-token").expect("non-empty token");
        assert!(token.matches("s3cret-token"));
        assert!(!token.matches("s3cret-toke"));
        assert!(!token.matches("s3cret-token "));
        assert!(!token.matches(""));
        assert!(AdminToken::new("  ").is_none());
        assert!(!format!("{token:?}").contains("s3cret"));
    }

    #[test]
    fn the_documented_url_pattern_is_what_the_server_checks() {
        use crate::config::secret::SecretUrl;
        for good in [
            "https://agents.internal/hooks",
            "http://127.0.0.1:8080/x?y=1#z",
            "HTTP://user:pass@my_service:65535/",
            "http://[::1]:9000/hook",
            "http://localhost",
        ] {
            assert!(
                check_webhook_url("url", &SecretUrl::from(good)).is_ok(),
                "{good}"
            );
        }
        for bad in [
            "http://a*",
            "ftp://a/",
            "http://a b/",
            "http://1.2.3.999/",
            "http://a:65536/",
            "http://é.example/",
            "http://a/\u{0}",
        ] {
            assert!(
                check_webhook_url("url", &SecretUrl::from(bad)).is_err(),
                "{bad}"
            );
        }
        let long = format!("http://a/{}", "x".repeat(openapi::WEBHOOK_URL_MAX));
        assert!(check_webhook_url("url", &SecretUrl::from(long.as_str())).is_err());
    }

    #[test]
    fn the_documented_target_pattern_takes_webhooks_and_brokers_the_server_takes() {
        use crate::config::secret::SecretUrl;
        for good in [
            "https://agents.internal/hooks",
            "nats://127.0.0.1:4222/orders.created",
            "NATS://user:pw@nats.internal/orders",
            "redis://127.0.0.1:6379/0?stream=orders&maxlen=1000",
            "rediss://default:pw@cache.internal?stream=orders",
            "amqp://guest:guest@127.0.0.1:5672/%2f?exchange=events&routing_key=orders",
            "amqps://rabbit.internal/prod?exchange=events",
            "amqp://rabbit.internal/?routing_key=orders",
            "amqp://rabbit.internal",
            "kafka://127.0.0.1:9092/orders",
            "kafka://u:pw@k1.internal:9092,k2.internal:9092/orders.v1",
        ] {
            assert!(
                check_target_url("url", &SecretUrl::from(good)).is_ok(),
                "{good}"
            );
            if crate::broker::is_broker_url(good) {
                assert!(crate::broker::Target::parse(good).is_ok(), "{good}");
            }
        }
        for bad in [
            "nats://h:4222",
            "nats://h/a.*",
            "nats://u:***@h/a",
            "redis://h/0",
            "redis://h/0?stream=s&maxlen=0",
            "redis://h/0?stream=s&bogus=1",
            "amqp://h/?exchange=e&bogus=1",
            "kafka://h:9092",
            "kafka://h/topic",
            "kafka://h:9092/topic?acks=1",
            "ftp://a/",
        ] {
            assert!(
                check_target_url("url", &SecretUrl::from(bad)).is_err(),
                "{bad}"
            );
        }
        assert!(
            check_webhook_url("url", &SecretUrl::from("nats://h/a")).is_err(),
            "the compatibility API takes webhooks only"
        );
    }

    #[test]
    fn parse_errors_name_the_field() {
        assert_eq!(
            field_of(".", &"missing field `url` at line 1 column 2").0,
            Some("url".to_owned())
        );
        assert_eq!(
            field_of("limit", &"invalid digit found in string").0,
            Some("limit".to_owned())
        );
        assert_eq!(field_of(".", &"expected value").0, None);
        assert_eq!(
            field_of("colour", &"unknown field `colour`, expected one of `a`").0,
            Some("colour".to_owned())
        );
    }
}
