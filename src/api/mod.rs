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

/// What kind of error an [`ApiError`] is; stable, for programs to act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the request is wrong; `field` names what to fix.
    InvalidInput,
    /// 401: missing or wrong bearer token.
    Unauthorized,
    /// 404: no such route or resource.
    NotFound,
    /// 409: a subscription with this name exists.
    Duplicate,
    /// 409 (compatibility publish): an event with this `event_id` was already stored.
    DuplicateEvent,
    /// 503: the database schema is older than this relay; run `outbox-relay migrate`.
    SchemaOutdated,
    /// 503: no database connection available; retry shortly.
    Unavailable,
    /// 500: a database query failed; the relay's log has the cause.
    Internal,
}

/// The body of every error answer.
#[derive(serde::Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(serde::Serialize, ToSchema)]
pub struct ErrorDetail {
    code: ErrorCode,
    /// For people; may change between versions.
    message: String,
    /// The input to blame, when there is one, as the request spells it: `name`,
    /// `headers.X-Team`, `event_types[1]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    field: Option<String>,
}

/// Every error of the API, as `{"error": {"code": "...", "message": "...", "field": "..."}}`
/// (`field` only when one input is to blame). `code` is stable; `message` is for people.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// 400 `invalid_input` naming the field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError {
            field: Some(field.into()),
            ..ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidInput, message)
        }
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
    }

    /// Renames the field an [`AdminError`] named to the name this endpoint's callers use.
    pub fn rename_field(mut self, rename: impl Fn(&str) -> Option<&'static str>) -> ApiError {
        if let Some(renamed) = self.field.as_deref().and_then(&rename) {
            self.field = Some(renamed.to_owned());
        }
        self
    }
}

impl From<AdminError> for ApiError {
    fn from(error: AdminError) -> ApiError {
        let message = error.to_string();
        match error {
            AdminError::NotFound { .. } => ApiError::not_found(message),
            AdminError::Duplicate { .. } => ApiError {
                field: Some("name".to_owned()),
                ..ApiError::new(StatusCode::CONFLICT, ErrorCode::Duplicate, message)
            },
            AdminError::Invalid { field, .. } => ApiError::invalid(field, message),
            AdminError::SchemaOutdated { .. } => {
                tracing::error!(error = %message, "admin API request failed");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::SchemaOutdated,
                    message,
                )
            }
            AdminError::Db(db) => {
                let unavailable = matches!(db, DbError::Pool { .. });
                // Logged here, where it is handled, with its chain; the client gets no
                // internals, only what to do.
                tracing::error!(
                    error = format!("{:#}", anyhow::Error::from(db)),
                    "admin API request failed"
                );
                if unavailable {
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        ErrorCode::Unavailable,
                        "no database connection available; retry shortly",
                    )
                } else {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        ErrorCode::Internal,
                        "the database query failed; the relay's log has the cause",
                    )
                }
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                field: self.field,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// A JSON body whose parse errors are 400s in the API's shape, naming the field. An empty
/// body, or `null`, reads as `{}`, so endpoints whose fields are all optional accept no body
/// at all (the document says such a body is optional or `null`).
/// The content type is not checked: the previous event bus's clients do not all send it.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| ApiError::invalid("body", rejection.body_text()))?;
        let bytes: &[u8] =
            if bytes.iter().all(u8::is_ascii_whitespace) || bytes.trim_ascii() == b"null" {
                b"{}"
            } else {
                &bytes
            };
        refuse_nul_in_json(bytes)?;
        let mut deserializer = serde_json::Deserializer::from_slice(bytes);
        serde_path_to_error::deserialize(&mut deserializer)
            .map(ApiJson)
            .map_err(|error| {
                let (field, message) = field_of(&error.path().to_string(), error.inner());
                ApiError::invalid(field.unwrap_or_else(|| "body".to_owned()), message)
            })
    }
}

/// The one check every JSON body passes: no string or key may hold U+0000, which
/// PostgreSQL cannot store in `text` or `jsonb`. JSON can only spell it `\u0000`, so bodies
/// without that sequence (nearly all) are not parsed twice.
fn refuse_nul_in_json(bytes: &[u8]) -> Result<(), ApiError> {
    const ESCAPE: &[u8] = b"\\u0000";
    if !bytes.windows(ESCAPE.len()).any(|window| window == ESCAPE) {
        return Ok(());
    }
    // Not JSON at all: the typed parse below says where.
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Ok(());
    };
    match crate::admin::nul_path(&value) {
        Some(path) => {
            let field = if path.is_empty() {
                "body".to_owned()
            } else {
                path
            };
            Err(ApiError::invalid(
                field.clone(),
                format!("{field} {}", crate::admin::NUL_PROBLEM),
            ))
        }
        None => Ok(()),
    }
}

/// Refuses a text value of a query or path parameter that holds U+0000.
fn refuse_nul(field: &str, value: &str) -> Result<(), ApiError> {
    if value.contains('\0') {
        return Err(ApiError::invalid(
            field,
            format!("{field} {}", crate::admin::NUL_PROBLEM),
        ));
    }
    Ok(())
}

/// Query parameters whose parse errors are 400s naming the parameter. Values are
/// percent-decoded strictly: a `%00` or bytes that are not UTF-8 are refused naming the
/// parameter, where a lenient decoder would search for U+FFFD or fail in the database.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or("");
        let mut pairs = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = decode_query_part("query", key)?;
            refuse_nul("query", &key)?;
            let value = decode_query_part(&key, value)?;
            refuse_nul(&key, &value)?;
            pairs.push((key, value));
        }
        // Re-encoded so serde_urlencoded reads the checked pairs with its own typing.
        let checked = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&pairs)
            .finish();
        let deserializer =
            serde_urlencoded::Deserializer::new(form_urlencoded::parse(checked.as_bytes()));
        serde_path_to_error::deserialize(deserializer)
            .map(ApiQuery)
            .map_err(|error| {
                let (field, message) = field_of(&error.path().to_string(), error.inner());
                ApiError::invalid(field.unwrap_or_else(|| "query".to_owned()), message)
            })
    }
}

/// One `application/x-www-form-urlencoded` key or value: `+` is a space, `%XX` a byte, and
/// the bytes must be UTF-8.
fn decode_query_part(field: &str, raw: &str) -> Result<String, ApiError> {
    let raw = raw.replace('+', " ");
    let bytes: Vec<u8> = percent_encoding::percent_decode(raw.as_bytes()).collect();
    String::from_utf8(bytes).map_err(|_| {
        ApiError::invalid(
            field,
            format!("{field} is not UTF-8 once percent-decoded; send UTF-8 text"),
        )
    })
}

/// The one path parameter of a route (`{name}`, `{event_id}`, `{id}`), as text. Text that
/// is not UTF-8 once percent-decoded or holds U+0000 is a 400 naming the parameter, in the
/// API's error shape (axum's own rejection is plain text).
pub struct ApiPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ApiPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        use axum::extract::Path;
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        match Path::<Vec<(String, String)>>::from_request_parts(parts, state).await {
            Ok(Path(params)) => match params.into_iter().next() {
                Some((key, value)) => {
                    refuse_nul(&key, &value)?;
                    Ok(ApiPath(value))
                }
                None => Err(ApiError::invalid("path", "a path parameter is missing")),
            },
            Err(PathRejection::FailedToDeserializePathParams(error)) => {
                let field = match error.kind() {
                    ErrorKind::InvalidUtf8InPathParam { key } => key.clone(),
                    _ => "path".to_owned(),
                };
                Err(ApiError::invalid(
                    field.clone(),
                    format!("{field}: {}; send UTF-8 text", error.body_text()),
                ))
            }
            Err(rejection) => Err(ApiError::invalid("path", rejection.body_text())),
        }
    }
}

/// The field a deserialisation error is about: the path where it happened, or for
/// "missing field `x`" / "unknown field `x`" (reported at the parent) the field named.
fn field_of(path: &str, error: &dyn fmt::Display) -> (Option<String>, String) {
    let message = error.to_string();
    let named = ["missing field `", "unknown field `"]
        .iter()
        .find_map(|prefix| {
            let rest = message.split_once(prefix)?.1;
            Some(rest.split_once('`')?.0.to_owned())
        });
    // serde_path_to_error reports an unknown field at itself, a missing one at its parent.
    let field = match (path, named) {
        (".", named) => named,
        (path, Some(named)) if path != named && !path.ends_with(&format!(".{named}")) => {
            Some(format!("{path}.{named}"))
        }
        (path, _) => Some(path.to_owned()),
    };
    (field, message)
}

/// For `#[serde(deserialize_with)]` on settings a client may clear: absent = `None` (leave
/// alone), `null` = `Some(None)` (clear), a value = `Some(Some(v))`. Use with
/// `#[serde(default)]`.
pub fn double_option<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(deserializer).map(Some)
}

/// For `#[serde(default, deserialize_with = "non_null")]` on optional fields of the admin API
/// for which `null` would mean nothing: absent = `None`, a value = `Some(v)`, and `null` is
/// refused (400 naming the field) instead of being read as "absent", so a client that meant
/// to clear a setting learns it cannot, and the document can say "a string" and be right.
pub fn non_null<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// For `#[serde(default, deserialize_with = "integer")]` on optional integer fields: what
/// JSON Schema calls an integer, which includes `7.0`, so a client that writes every number
/// as a float is not refused. Absent = `None`; `null`, fractions and values out of `T`'s range
/// are refused.
pub fn integer<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64>,
{
    let number = serde_json::Number::deserialize(deserializer)?;
    whole(&number)
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom(format!("{number} is not an integer in range")))
}

/// [`integer`] for fields where `null` means absent too (the compatibility endpoints).
pub fn nullable_integer<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64>,
{
    match Option::<serde_json::Number>::deserialize(deserializer)? {
        None => Ok(None),
        Some(number) => whole(&number).map(Some).ok_or_else(|| {
            serde::de::Error::custom(format!("{number} is not an integer in range"))
        }),
    }
}

fn whole<T: TryFrom<i64>>(number: &serde_json::Number) -> Option<T> {
    let value = match number.as_i64() {
        Some(value) => value,
        None => {
            let float = number.as_f64()?;
            // Beyond ±2^63 the cast saturates; such values are out of every T's range anyway,
            // and the fraction check below refuses 7.5.
            if float.fract() != 0.0 || float.abs() >= 9.2e18 {
                return None;
            }
            float as i64
        }
    };
    T::try_from(value).ok()
}

/// Refuses a subscription URL outside [`openapi::WEBHOOK_URL`], the form the document
/// promises. The URL parser alone takes more (`http://a*`, hosts in any script), and the
/// API should refuse what its document calls invalid rather than store it. The CLI and SQL
/// keep the database's looser rule.
pub fn check_webhook_url(field: &str, url: &crate::secret::SecretUrl) -> Result<(), ApiError> {
    static PATTERN: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let pattern = PATTERN.get_or_init(|| {
        // A constant pattern, compiled by the unit test below: it cannot fail here.
        regex::Regex::new(openapi::WEBHOOK_URL).expect("WEBHOOK_URL is a valid regex")
    });
    let raw = url.expose_secret();
    if raw.chars().count() <= openapi::WEBHOOK_URL_MAX && pattern.is_match(raw) {
        return Ok(());
    }
    Err(ApiError::invalid(
        field,
        format!(
            "{} is not a URL this API takes: give http:// or https://, an optional user:password@, \
             a host name of letters, digits, - and _ (or an IPv4 or bracketed IPv6 address), an \
             optional port, then printable ASCII without spaces; at most {} characters",
            url.masked(),
            openapi::WEBHOOK_URL_MAX
        ),
    ))
}

pub fn parse_uuid(field: &str, raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw.trim()).map_err(|error| {
        ApiError::invalid(
            field,
            format!("{raw:?} is not a UUID ({error}); give one like 0b6f8a3e-9c1d-4e2f-8a7b-1c2d3e4f5a6b"),
        )
    })
}

pub fn parse_time(field: &str, raw: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(raw.trim())
        .map(|time| time.with_timezone(&Utc))
        .map_err(|error| {
            ApiError::invalid(
                field,
                format!(
                    "{raw:?} is not an RFC 3339 time ({error}); give one like 2024-05-01T12:00:00Z"
                ),
            )
        })
}

/// Cursors are the decimal `id` of the last row of the previous page, as `next_cursor` spells
/// it (no sign, spaces or leading zeros; at most 18 digits, far above any id); any other text
/// is refused rather than read as "from the start". The document states the same pattern.
pub fn parse_cursor(raw: &str) -> Result<i64, ApiError> {
    let canonical = (1..=CURSOR_MAX_DIGITS).contains(&raw.len())
        && raw.bytes().all(|b| b.is_ascii_digit())
        && !raw.starts_with('0');
    canonical
        .then(|| raw.parse::<i64>().ok())
        .flatten()
        .ok_or_else(|| {
            ApiError::invalid(
                "cursor",
                format!("{raw:?} is not a cursor; pass the next_cursor of the previous page"),
            )
        })
}

/// Longest cursor [`parse_cursor`] takes: 18 digits always fit an `i64`.
pub const CURSOR_MAX_DIGITS: usize = 18;

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
        use crate::secret::SecretUrl;
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
