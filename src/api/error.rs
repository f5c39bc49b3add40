//! The one JSON error shape every route answers with, and how the admin layer's errors map
//! onto HTTP statuses.

use super::*;

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
