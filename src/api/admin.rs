//! `/admin/v1/…`: subscriptions, events, deliveries and replays over HTTP. Each handler
//! parses and checks its input, then calls the function of [`crate::admin`] that the CLI
//! calls too. Secrets appear only in the answers of create and rotate-secret.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use super::{
    ApiError, ApiJson, ApiPath, ApiQuery, ApiState, double_option, parse_cursor, parse_time,
    parse_uuid,
};
use crate::admin::{
    self, EventSearch, NewSubscription, ReplayCriteria, SecretText, SubscriptionInfo,
    SubscriptionSettings, SubscriptionUpdate,
};
use crate::secret::SecretUrl;

/// Who a replay made through this API is recorded as, unless the request says.
pub const ADMIN_API_REQUESTER: &str = "admin-api";

/// Overlap of a secret rotation when the request gives none: as long as the CLI's default,
/// a day for the subscriber to switch keys.
const DEFAULT_ROTATION_OVERLAP: Duration = Duration::from_secs(24 * 60 * 60);

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route(
            "/subscriptions",
            get(list_subscriptions).post(create_subscription),
        )
        .route(
            "/subscriptions/{name}",
            get(get_subscription)
                .patch(update_subscription)
                .delete(remove_subscription),
        )
        .route("/subscriptions/{name}/disable", post(disable_subscription))
        .route("/subscriptions/{name}/enable", post(enable_subscription))
        .route("/subscriptions/{name}/rotate-secret", post(rotate_secret))
        .route("/events", get(search_events))
        .route("/events/{event_id}", get(get_event))
        .route("/replays", get(list_replays).post(create_replay))
        .route("/replays/{id}", get(get_replay))
        .fallback(unknown_route)
}

async fn unknown_route() -> ApiError {
    ApiError::not_found("no such admin API route; GET /admin/v1/openapi.json lists them")
}

/// A subscription's settings as JSON. Create needs `name` and `url`; update takes neither
/// `name` nor `secret`. Nullable settings (`tenant_id`, `filter`, `rate_limit_per_second`)
/// are cleared with `null` and left alone when absent.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionBody {
    pub name: Option<String>,
    pub url: Option<SecretUrl>,
    pub secret: Option<SecretText>,
    pub event_types: Option<Vec<String>>,
    #[serde(default, deserialize_with = "double_option")]
    pub tenant_id: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    pub filter: Option<Option<serde_json::Value>>,
    pub headers: Option<BTreeMap<String, String>>,
    pub timeout_seconds: Option<f64>,
    pub max_in_flight: Option<i32>,
    #[serde(default, deserialize_with = "double_option")]
    pub rate_limit_per_second: Option<Option<f32>>,
    pub retry_schedule_seconds: Option<Vec<f64>>,
    pub ordered: Option<bool>,
}

impl SubscriptionBody {
    fn settings(&self) -> Result<SubscriptionSettings, ApiError> {
        let retry_schedule = match &self.retry_schedule_seconds {
            Some(waits) => Some(
                waits
                    .iter()
                    .map(|wait| seconds("retry_schedule_seconds", *wait))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => None,
        };
        Ok(SubscriptionSettings {
            event_types: self.event_types.clone(),
            tenant_id: self.tenant_id.clone(),
            filter: self.filter.clone(),
            headers: self.headers.clone(),
            timeout: self
                .timeout_seconds
                .map(|t| seconds("timeout_seconds", t))
                .transpose()?,
            max_in_flight: self.max_in_flight,
            rate_limit_per_second: self.rate_limit_per_second,
            retry_schedule,
            ordered: self.ordered,
        })
    }
}

fn seconds(field: &str, value: f64) -> Result<Duration, ApiError> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| ApiError::invalid(field, format!("{value} is not a number of seconds ≥ 0")))
}

/// [`crate::admin`] names settings as the CLI and the table do; the JSON names carry units.
fn api_field(field: &str) -> Option<&'static str> {
    match field {
        "timeout" => Some("timeout_seconds"),
        "retry_schedule" => Some("retry_schedule_seconds"),
        "update" => Some("body"),
        _ => None,
    }
}

fn from_admin(error: admin::AdminError) -> ApiError {
    ApiError::from(error).rename_field(api_field)
}

#[derive(Serialize)]
struct SubscriptionList {
    subscriptions: Vec<SubscriptionInfo>,
}

async fn list_subscriptions(State(state): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let client = state.client().await?;
    let subscriptions = admin::list_subscriptions(&client)
        .await
        .map_err(from_admin)?;
    Ok(axum::Json(SubscriptionList { subscriptions }))
}

/// The only answer besides rotate-secret that carries a secret.
#[derive(Serialize)]
struct CreatedSubscription {
    #[serde(flatten)]
    subscription: SubscriptionInfo,
    secret: SecretText,
}

async fn create_subscription(
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<SubscriptionBody>,
) -> Result<impl IntoResponse, ApiError> {
    let name = body
        .name
        .clone()
        .ok_or_else(|| ApiError::invalid("name", "name is required, e.g. \"ai-agents\""))?;
    let url = body.url.clone().ok_or_else(|| {
        ApiError::invalid(
            "url",
            "url is required, e.g. \"https://agents.internal/hooks/outbox\"",
        )
    })?;
    let new = NewSubscription {
        name,
        url,
        secret: body.secret.clone(),
        settings: body.settings()?,
    };
    let client = state.client().await?;
    let created = admin::create_subscription(&client, &new)
        .await
        .map_err(from_admin)?;
    let subscription = admin::get_subscription(&client, &created.name)
        .await
        .map_err(from_admin)?;
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedSubscription {
            subscription,
            secret: created.secret,
        }),
    ))
}

async fn get_subscription(
    State(state): State<ApiState>,
    ApiPath(name): ApiPath,
) -> Result<impl IntoResponse, ApiError> {
    let client = state.client().await?;
    let subscription = admin::get_subscription(&client, &name)
        .await
        .map_err(from_admin)?;
    Ok(axum::Json(subscription))
}

async fn update_subscription(
    State(state): State<ApiState>,
    ApiPath(name): ApiPath,
    ApiJson(body): ApiJson<SubscriptionBody>,
) -> Result<impl IntoResponse, ApiError> {
    if body.name.is_some() {
        return Err(ApiError::invalid(
            "name",
            "a subscription cannot be renamed; create one under the new name and delete this one",
        ));
    }
    if body.secret.is_some() {
        return Err(ApiError::invalid(
            "secret",
            "change the secret with POST /admin/v1/subscriptions/{name}/rotate-secret",
        ));
    }
    let update = SubscriptionUpdate {
        url: body.url.clone(),
        settings: body.settings()?,
    };
    let client = state.client().await?;
    let subscription = admin::update_subscription(&client, &name, &update)
        .await
        .map_err(from_admin)?;
    Ok(axum::Json(subscription))
}

async fn remove_subscription(
    State(state): State<ApiState>,
    ApiPath(name): ApiPath,
) -> Result<impl IntoResponse, ApiError> {
    let client = state.client().await?;
    let removed = admin::remove_subscription(&client, &name)
        .await
        .map_err(from_admin)?;
    Ok(axum::Json(removed))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DisableBody {
    reason: Option<String>,
}

async fn disable_subscription(
    State(state): State<ApiState>,
    ApiPath(name): ApiPath,
    ApiJson(body): ApiJson<DisableBody>,
) -> Result<impl IntoResponse, ApiError> {
    let client = state.client().await?;
    let subscription = admin::disable_subscription(&client, &name, body.reason.as_deref())
        .await
        .map_err(from_admin)?;
    Ok(axum::Json(subscription))
}

async fn enable_subscription(
    State(state): State<ApiState>,
    ApiPath(name): ApiPath,
) -> Result<impl IntoResponse, ApiError> {
    let client = state.client().await?;
    let subscription = admin::enable_subscription(&client, &name)
        .await
        .map_err(from_admin)?;
    Ok(axum::Json(subscription))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    /// How long the previous secret keeps signing too; default a day, 0 = switch at once.
    overlap_seconds: Option<f64>,
    /// Use this secret instead of generating one.
    secret: Option<SecretText>,
}

async fn rotate_secret(
    State(state): State<ApiState>,
    ApiPath(name): ApiPath,
    ApiJson(body): ApiJson<RotateBody>,
) -> Result<impl IntoResponse, ApiError> {
    let overlap = match body.overlap_seconds {
        Some(value) => seconds("overlap_seconds", value)?,
        None => DEFAULT_ROTATION_OVERLAP,
    };
    let secret = body.secret;
    let client = state.client().await?;
    let rotated = admin::rotate_secret(&client, &name, overlap, secret.as_ref())
        .await
        .map_err(from_admin)?;
    Ok(axum::Json(rotated))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    event_type: Option<String>,
    tenant_id: Option<String>,
    since: Option<String>,
    until: Option<String>,
    status: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

async fn search_events(
    State(state): State<ApiState>,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let search = EventSearch {
        event_types: query.event_type.into_iter().collect(),
        tenant_id: query.tenant_id,
        since: query
            .since
            .as_deref()
            .map(|t| parse_time("since", t))
            .transpose()?,
        until: query
            .until
            .as_deref()
            .map(|t| parse_time("until", t))
            .transpose()?,
        delivery_status: query.status,
        before_id: query.cursor.as_deref().map(parse_cursor).transpose()?,
        limit: query.limit.unwrap_or(admin::PAGE_SIZE_DEFAULT),
        include_payload: false,
    };
    let client = state.client().await?;
    let page = admin::search_events(&client, &search)
        .await
        .map_err(from_admin)?;
    Ok(axum::Json(page))
}

async fn get_event(
    State(state): State<ApiState>,
    ApiPath(event_id): ApiPath,
) -> Result<impl IntoResponse, ApiError> {
    let event_id = parse_uuid("event_id", &event_id)?;
    let client = state.client().await?;
    let event = admin::get_event(&client, event_id)
        .await
        .map_err(from_admin)?
        .ok_or_else(|| ApiError::not_found(format!("no event with event_id {event_id}")))?;
    Ok(axum::Json(event))
}

/// The criteria of `outbox.replay`, as JSON. Absent = the function's default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    pub status: Option<Vec<String>>,
    pub subscription: Option<String>,
    pub event_type: Option<String>,
    pub tenant_id: Option<String>,
    pub created_after: Option<String>,
    pub created_before: Option<String>,
    pub event_ids: Option<Vec<String>>,
    pub max_events: Option<i32>,
    pub requested_by: Option<String>,
    pub reason: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
}

impl ReplayBody {
    fn criteria(self) -> Result<ReplayCriteria, ApiError> {
        if let Some(event_type) = &self.event_type {
            admin::check_event_type_pattern("event_type", event_type).map_err(ApiError::from)?;
        }
        if let Some(max_events) = self.max_events
            && max_events < 1
        {
            return Err(ApiError::invalid(
                "max_events",
                format!("{max_events} is out of range; give at least 1"),
            ));
        }
        let created_after = self
            .created_after
            .as_deref()
            .map(|t| parse_time("created_after", t))
            .transpose()?;
        let created_before = self
            .created_before
            .as_deref()
            .map(|t| parse_time("created_before", t))
            .transpose()?;
        if let (Some(after), Some(before)) = (created_after, created_before)
            && after >= before
        {
            return Err(ApiError::invalid(
                "created_before",
                "created_before must be later than created_after",
            ));
        }
        let event_ids = self
            .event_ids
            .unwrap_or_default()
            .iter()
            .map(|id| parse_uuid("event_ids", id))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ReplayCriteria {
            statuses: self.status.unwrap_or_default(),
            subscription: self.subscription,
            event_type: self.event_type,
            tenant_id: self.tenant_id,
            created_after,
            created_before,
            event_ids,
            max_events: self.max_events,
            requested_by: Some(
                self.requested_by
                    .filter(|who| !who.trim().is_empty())
                    .unwrap_or_else(|| ADMIN_API_REQUESTER.to_owned()),
            ),
            reason: self.reason,
            dry_run: self.dry_run,
        })
    }
}

/// Runs `outbox.replay` and answers with the recorded replay. An unknown subscription in
/// the criteria is bad input (400), not a missing resource at this URL.
pub async fn run_replay(
    state: &ApiState,
    criteria: &ReplayCriteria,
) -> Result<admin::ReplaySummary, ApiError> {
    let client = state.client().await?;
    let outcome = admin::replay(&client, criteria)
        .await
        .map_err(|error| match error {
            admin::AdminError::NotFound { name } => ApiError::invalid(
                "subscription",
                format!("no subscription named {name:?}; GET /admin/v1/subscriptions lists them"),
            ),
            other => from_admin(other),
        })?;
    admin::get_replay(&client, outcome.replay_id)
        .await
        .map_err(from_admin)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!(
                    "replay {} was recorded but could not be read back",
                    outcome.replay_id
                ),
            )
        })
}

async fn create_replay(
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<ReplayBody>,
) -> Result<impl IntoResponse, ApiError> {
    let criteria = body.criteria()?;
    let replay = run_replay(&state, &criteria).await?;
    Ok((StatusCode::CREATED, axum::Json(replay)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    limit: Option<i64>,
    cursor: Option<String>,
}

async fn list_replays(
    State(state): State<ApiState>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let before_id = query.cursor.as_deref().map(parse_cursor).transpose()?;
    let limit = query.limit.unwrap_or(admin::PAGE_SIZE_DEFAULT);
    let client = state.client().await?;
    let page = admin::list_replays(&client, before_id, limit)
        .await
        .map_err(from_admin)?;
    Ok(axum::Json(page))
}

async fn get_replay(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath,
) -> Result<impl IntoResponse, ApiError> {
    let id: i64 = id.trim().parse().map_err(|_| {
        ApiError::invalid(
            "id",
            format!("{id:?} is not a replay id (a positive integer)"),
        )
    })?;
    let client = state.client().await?;
    let replay = admin::get_replay(&client, id)
        .await
        .map_err(from_admin)?
        .ok_or_else(|| ApiError::not_found(format!("no replay with id {id}")))?;
    Ok(axum::Json(replay))
}
