//! `/admin/v1/…`: subscriptions, events, deliveries and replays over HTTP. Each handler
//! parses and checks its input, then calls the function of [`crate::admin`] that the CLI
//! calls too. Secrets appear only in the answers of create and rotate-secret.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::openapi::{
    EventId, EventTypePattern, Headers, JsonObject, Secret, SubscriptionName, Text, WebhookUrl,
};
use super::{
    ApiError, ApiJson, ApiPath, ApiQuery, ApiState, ErrorBody, double_option, integer, non_null,
    parse_cursor, parse_time, parse_uuid,
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

/// Limits the database would enforce less exactly: JSON numbers are checked as they were
/// sent, before they are rounded to the microseconds of an `interval` or to a `real`, so a
/// value just outside a limit is refused, never rounded onto it.
pub const TIMEOUT_SECONDS_MIN: f64 = 0.1;
pub const TIMEOUT_SECONDS_MAX: f64 = 300.0;
/// Seven days, the `retry_schedule_sane` limit of one wait.
pub const RETRY_WAIT_SECONDS_MAX: f64 = 604_800.0;
pub const RETRY_WAITS_MAX: usize = 50;
/// The smallest rate limit: one request per 1000 seconds. `rate_limit_per_second` is a
/// `real`, in which much smaller numbers round to 0 (refused) or lose their precision.
pub const RATE_LIMIT_MIN: f64 = 0.001;
pub const RATE_LIMIT_MAX: f64 = 100_000.0;
/// A rotation's overlap: at most a year, long enough for any subscriber to switch keys.
pub const OVERLAP_SECONDS_MAX: f64 = 365.0 * 24.0 * 60.0 * 60.0;

pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list_subscriptions, create_subscription))
        .routes(routes!(
            get_subscription,
            update_subscription,
            remove_subscription
        ))
        .routes(routes!(disable_subscription))
        .routes(routes!(enable_subscription))
        .routes(routes!(rotate_secret))
        .routes(routes!(search_events))
        .routes(routes!(get_event))
        .routes(routes!(list_replays, create_replay))
        .routes(routes!(get_replay))
        .fallback(unknown_route)
}

async fn unknown_route() -> ApiError {
    ApiError::not_found("no such admin API route; GET /admin/v1/openapi.json lists them")
}

/// The settings create and update share, as fields of both bodies (serde cannot combine
/// `flatten` with `deny_unknown_fields`). Nullable settings (`tenant_id`, `filter`,
/// `rate_limit_per_second`) are cleared with `null` and left alone when absent; the others
/// refuse `null`.
macro_rules! subscription_body {
    ($(#[$meta:meta])* $name:ident { $($fields:tt)* }) => {
        #[derive(Debug, Deserialize, ToSchema)]
        #[serde(deny_unknown_fields)]
        $(#[$meta])*
        pub struct $name {
            $($fields)*
            /// Exact event types or globs (lead.*, *); default ["*"].
            #[serde(default, deserialize_with = "non_null")]
            #[schema(value_type = Vec<EventTypePattern>, nullable = false, min_items = 1)]
            pub event_types: Option<Vec<String>>,
            /// Only events of this tenant; null = every tenant.
            #[serde(default, deserialize_with = "double_option")]
            #[schema(value_type = Option<Text>)]
            pub tenant_id: Option<Option<String>>,
            /// The payload must contain it (payload @> filter); null = every payload.
            #[serde(default, deserialize_with = "double_option")]
            #[schema(value_type = Option<JsonObject>)]
            pub filter: Option<Option<serde_json::Value>>,
            /// Replaces all static request headers.
            #[serde(default, deserialize_with = "non_null")]
            #[schema(value_type = Headers, nullable = false)]
            pub headers: Option<BTreeMap<String, String>>,
            /// Per request, 0.1 to 300 seconds; default 15.
            #[serde(default, deserialize_with = "non_null")]
            #[schema(nullable = false, minimum = 0.1, maximum = 300.0)]
            pub timeout_seconds: Option<f64>,
            /// Concurrent requests to this subscriber, 1 to 10000; default 64.
            #[serde(default, deserialize_with = "integer")]
            #[schema(nullable = false, minimum = 1, maximum = 10000)]
            pub max_in_flight: Option<i32>,
            /// Requests per second, 0.001 to 100000; null = unlimited.
            #[serde(default, deserialize_with = "double_option")]
            #[schema(minimum = 0.001, maximum = 100000.0)]
            pub rate_limit_per_second: Option<Option<f64>>,
            /// Waits between attempts, each 0 to 604800 seconds (7 days), at most 50;
            /// attempts = 1 + its length, so [] means a single attempt.
            #[serde(default, deserialize_with = "non_null")]
            #[schema(value_type = Vec<RetryWait>, nullable = false, max_items = 50)]
            pub retry_schedule_seconds: Option<Vec<f64>>,
            /// Per ordering_key, one delivery at a time, in event order.
            #[serde(default, deserialize_with = "non_null")]
            #[schema(nullable = false)]
            pub ordered: Option<bool>,
        }

        impl $name {
            fn settings(&self) -> Result<SubscriptionSettings, ApiError> {
                settings(
                    SubscriptionSettings {
                        event_types: self.event_types.clone(),
                        tenant_id: self.tenant_id.clone(),
                        filter: self.filter.clone(),
                        headers: self.headers.clone(),
                        max_in_flight: self.max_in_flight,
                        ordered: self.ordered,
                        ..SubscriptionSettings::default()
                    },
                    self.timeout_seconds,
                    self.rate_limit_per_second,
                    self.retry_schedule_seconds.as_deref(),
                )
            }
        }
    };
}

subscription_body! {
    /// A new subscription.
    SubscriptionCreate {
        #[schema(value_type = SubscriptionName)]
        pub name: String,
        #[schema(value_type = WebhookUrl)]
        pub url: SecretUrl,
        /// Generated when omitted; shown once, in the answer.
        #[serde(default, deserialize_with = "non_null")]
        #[schema(value_type = Secret, nullable = false)]
        pub secret: Option<SecretText>,
    }
}

subscription_body! {
    /// The settings to change; at least one. The name cannot change, and the secret changes
    /// through rotate-secret.
    #[schema(min_properties = 1)]
    SubscriptionChange {
        #[serde(default, deserialize_with = "non_null")]
        #[schema(value_type = WebhookUrl, nullable = false)]
        pub url: Option<SecretUrl>,
        /// Refused with a message saying what to do instead.
        #[serde(default)]
        #[schema(ignore)]
        pub name: Option<IgnoredAny>,
        /// Refused with a message saying what to do instead.
        #[serde(default)]
        #[schema(ignore)]
        pub secret: Option<IgnoredAny>,
    }
}

/// One wait of a retry schedule, in seconds.
#[derive(ToSchema)]
#[schema(value_type = f64, minimum = 0.0, maximum = 604800.0)]
pub struct RetryWait(#[allow(dead_code)] f64);

/// Checks the numbers of a subscription body against the documented limits, then converts
/// them (see [`TIMEOUT_SECONDS_MIN`] for why here and not only in the database).
fn settings(
    mut settings: SubscriptionSettings,
    timeout_seconds: Option<f64>,
    rate_limit: Option<Option<f64>>,
    retry_schedule: Option<&[f64]>,
) -> Result<SubscriptionSettings, ApiError> {
    if let Some(timeout) = timeout_seconds {
        in_range(
            "timeout_seconds",
            timeout,
            TIMEOUT_SECONDS_MIN,
            TIMEOUT_SECONDS_MAX,
        )?;
        settings.timeout = Some(seconds("timeout_seconds", timeout)?);
    }
    if let Some(rate_limit) = rate_limit {
        if let Some(rate) = rate_limit {
            in_range(
                "rate_limit_per_second",
                rate,
                RATE_LIMIT_MIN,
                RATE_LIMIT_MAX,
            )?;
        }
        // Within the range above, f32 keeps the value positive and at most the maximum.
        settings.rate_limit_per_second = Some(rate_limit.map(|rate| rate as f32));
    }
    if let Some(waits) = retry_schedule {
        if waits.len() > RETRY_WAITS_MAX {
            return Err(ApiError::invalid(
                "retry_schedule_seconds",
                format!(
                    "{} waits is too many; give at most {RETRY_WAITS_MAX}",
                    waits.len()
                ),
            ));
        }
        let mut schedule = Vec::with_capacity(waits.len());
        for (index, wait) in waits.iter().enumerate() {
            let field = format!("retry_schedule_seconds[{index}]");
            in_range(&field, *wait, 0.0, RETRY_WAIT_SECONDS_MAX)?;
            schedule.push(seconds(&field, *wait)?);
        }
        settings.retry_schedule = Some(schedule);
    }
    Ok(settings)
}

fn in_range(field: &str, value: f64, min: f64, max: f64) -> Result<(), ApiError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            format!("{value} is out of range; give {min} to {max}"),
        ))
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

/// Subscriptions, by name.
#[derive(Serialize, ToSchema)]
struct SubscriptionList {
    subscriptions: Vec<SubscriptionInfo>,
}

/// List subscriptions (by name).
#[utoipa::path(
    get,
    path = "/subscriptions",
    tag = "subscriptions",
    responses((status = 200, description = "Every subscription.", body = SubscriptionList)),
)]
async fn list_subscriptions(State(state): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let client = state.client().await?;
    let subscriptions = admin::list_subscriptions(&client)
        .await
        .map_err(from_admin)?;
    Ok(axum::Json(SubscriptionList { subscriptions }))
}

/// The only answer besides rotate-secret that carries a secret.
#[derive(Serialize, ToSchema)]
struct CreatedSubscription {
    #[serde(flatten)]
    subscription: SubscriptionInfo,
    /// Shown only here and by rotate-secret: give it to the subscriber.
    #[schema(value_type = String)]
    secret: SecretText,
}

/// Create a subscription; the answer carries its secret.
#[utoipa::path(
    post,
    path = "/subscriptions",
    tag = "subscriptions",
    request_body = SubscriptionCreate,
    responses(
        (status = 201, description = "Created.", body = CreatedSubscription),
        (status = 400, description = "Invalid input; error.field names it.", body = ErrorBody),
        (status = 409, description = "A subscription with this name exists (code duplicate).", body = ErrorBody),
    ),
)]
async fn create_subscription(
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<SubscriptionCreate>,
) -> Result<impl IntoResponse, ApiError> {
    super::check_webhook_url("url", &body.url)?;
    let settings = body.settings()?;
    let new = NewSubscription {
        name: body.name,
        url: body.url,
        secret: body.secret,
        settings,
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

/// One subscription.
#[utoipa::path(
    get,
    path = "/subscriptions/{name}",
    tag = "subscriptions",
    params(("name" = SubscriptionName, Path, description = "Subscription name.")),
    responses(
        (status = 200, description = "The subscription.", body = SubscriptionInfo),
        (status = 400, description = "Invalid input (e.g. a name holding NUL); error.field names it.", body = ErrorBody),
        (status = 404, description = "No such subscription.", body = ErrorBody),
    ),
)]
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

/// Change the given settings.
#[utoipa::path(
    patch,
    path = "/subscriptions/{name}",
    tag = "subscriptions",
    params(("name" = SubscriptionName, Path, description = "Subscription name.")),
    request_body = SubscriptionChange,
    responses(
        (status = 200, description = "The subscription now.", body = SubscriptionInfo),
        (status = 400, description = "Invalid input; error.field names it.", body = ErrorBody),
        (status = 404, description = "No such subscription.", body = ErrorBody),
    ),
)]
async fn update_subscription(
    State(state): State<ApiState>,
    ApiPath(name): ApiPath,
    ApiJson(body): ApiJson<SubscriptionChange>,
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
    if let Some(url) = &body.url {
        super::check_webhook_url("url", url)?;
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

/// Delete a subscription; its open deliveries become dead.
#[utoipa::path(
    delete,
    path = "/subscriptions/{name}",
    tag = "subscriptions",
    params(("name" = SubscriptionName, Path, description = "Subscription name.")),
    responses(
        (status = 200, description = "Removed.", body = admin::RemovedSubscription),
        (status = 400, description = "Invalid input (e.g. a name holding NUL); error.field names it.", body = ErrorBody),
        (status = 404, description = "No such subscription.", body = ErrorBody),
    ),
)]
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

/// Why a subscription is disabled.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct DisableBody {
    /// Kept in disabled_reason.
    #[schema(value_type = Option<Text>)]
    reason: Option<String>,
}

/// Stop delivering to a subscription.
#[utoipa::path(
    post,
    path = "/subscriptions/{name}/disable",
    tag = "subscriptions",
    params(("name" = SubscriptionName, Path, description = "Subscription name.")),
    request_body(content = Option<DisableBody>, description = "Optional."),
    responses(
        (status = 200, description = "The subscription now.", body = SubscriptionInfo),
        (status = 400, description = "Invalid input; error.field names it.", body = ErrorBody),
        (status = 404, description = "No such subscription.", body = ErrorBody),
    ),
)]
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

/// Deliver to a subscription again.
#[utoipa::path(
    post,
    path = "/subscriptions/{name}/enable",
    tag = "subscriptions",
    params(("name" = SubscriptionName, Path, description = "Subscription name.")),
    responses(
        (status = 200, description = "The subscription now.", body = SubscriptionInfo),
        (status = 400, description = "Invalid input (e.g. a name holding NUL); error.field names it.", body = ErrorBody),
        (status = 404, description = "No such subscription.", body = ErrorBody),
    ),
)]
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

/// How to rotate a signing secret.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    /// How long the previous secret keeps signing too, 0 to 31536000 seconds (a year);
    /// default a day, 0 = switch at once.
    #[serde(default, deserialize_with = "non_null")]
    #[schema(nullable = false, minimum = 0.0, maximum = 31536000.0)]
    overlap_seconds: Option<f64>,
    /// Use this secret instead of generating one.
    #[serde(default, deserialize_with = "non_null")]
    #[schema(value_type = Secret, nullable = false)]
    secret: Option<SecretText>,
}

/// Replace the signing secret; both sign during the overlap (default 86400 s).
#[utoipa::path(
    post,
    path = "/subscriptions/{name}/rotate-secret",
    tag = "subscriptions",
    params(("name" = SubscriptionName, Path, description = "Subscription name.")),
    request_body(content = Option<RotateBody>, description = "Optional."),
    responses(
        (status = 200, description = "The new secret.", body = admin::RotatedSecret),
        (status = 400, description = "Invalid input; error.field names it.", body = ErrorBody),
        (status = 404, description = "No such subscription.", body = ErrorBody),
    ),
)]
async fn rotate_secret(
    State(state): State<ApiState>,
    ApiPath(name): ApiPath,
    ApiJson(body): ApiJson<RotateBody>,
) -> Result<impl IntoResponse, ApiError> {
    let overlap = match body.overlap_seconds {
        Some(value) => {
            in_range("overlap_seconds", value, 0.0, OVERLAP_SECONDS_MAX)?;
            seconds("overlap_seconds", value)?
        }
        None => DEFAULT_ROTATION_OVERLAP,
    };
    let secret = body.secret;
    let client = state.client().await?;
    let rotated = admin::rotate_secret(&client, &name, overlap, secret.as_ref())
        .await
        .map_err(from_admin)?;
    Ok(axum::Json(rotated))
}

/// A delivery status.
#[derive(Clone, Copy, Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    Pending,
    InFlight,
    Delivered,
    Failing,
    Dead,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::InFlight => "in_flight",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failing => "failing",
            DeliveryStatus::Dead => "dead",
        }
    }
}

/// A delivery status a replay can re-queue: all but in_flight, which a relay is sending.
#[derive(Clone, Copy, Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReplayableStatus {
    Pending,
    Delivered,
    Failing,
    Dead,
}

impl ReplayableStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplayableStatus::Pending => "pending",
            ReplayableStatus::Delivered => "delivered",
            ReplayableStatus::Failing => "failing",
            ReplayableStatus::Dead => "dead",
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct EventsQuery {
    /// Exact event type or glob.
    #[param(value_type = EventTypePattern, required = false, nullable = false)]
    event_type: Option<String>,
    #[param(value_type = Text, required = false, nullable = false)]
    tenant_id: Option<String>,
    /// created_at >= since (RFC 3339); earlier than until.
    #[param(value_type = String, format = DateTime, required = false, nullable = false)]
    since: Option<String>,
    /// created_at < until (RFC 3339); later than since.
    #[param(value_type = String, format = DateTime, required = false, nullable = false)]
    until: Option<String>,
    /// Only events with a delivery in this status.
    #[param(inline, nullable = false)]
    status: Option<DeliveryStatus>,
    /// Page size, 1 to 500 (default 50).
    #[param(nullable = false, minimum = 1, maximum = 500)]
    limit: Option<i64>,
    /// next_cursor of the previous page.
    #[param(nullable = false, pattern = "^[1-9][0-9]{0,17}$")]
    cursor: Option<String>,
}

/// Search events, newest first, by keyset pages.
#[utoipa::path(
    get,
    path = "/events",
    tag = "events",
    params(EventsQuery),
    responses(
        (status = 200, description = "A page of events.", body = admin::EventPage),
        (status = 400, description = "Invalid input; error.field names it.", body = ErrorBody),
    ),
)]
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
        delivery_status: query.status.map(|s| s.as_str().to_owned()),
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

/// One event with its payload, deliveries and their attempts.
#[utoipa::path(
    get,
    path = "/events/{event_id}",
    tag = "events",
    params(("event_id" = EventId, Path, description = "The event's event_id.")),
    responses(
        (status = 200, description = "The event.", body = admin::EventDetail),
        (status = 400, description = "Not a uuid.", body = ErrorBody),
        (status = 404, description = "No such event.", body = ErrorBody),
    ),
)]
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

/// The criteria of outbox.replay; absent = the function's default.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    /// Delivery statuses to re-queue; default ["dead"].
    #[serde(default, deserialize_with = "non_null")]
    #[schema(nullable = false)]
    pub status: Option<Vec<ReplayableStatus>>,
    /// Only this subscription's deliveries; 404 when there is none by this name.
    #[serde(default, deserialize_with = "non_null")]
    #[schema(value_type = SubscriptionName, nullable = false)]
    pub subscription: Option<String>,
    /// Exact event type or glob.
    #[serde(default, deserialize_with = "non_null")]
    #[schema(value_type = EventTypePattern, nullable = false)]
    pub event_type: Option<String>,
    #[serde(default, deserialize_with = "non_null")]
    #[schema(value_type = Text, nullable = false)]
    pub tenant_id: Option<String>,
    /// Events created at or after this time; earlier than created_before.
    #[serde(default, deserialize_with = "non_null")]
    #[schema(value_type = String, format = DateTime, nullable = false)]
    pub created_after: Option<String>,
    /// Events created before this time; later than created_after.
    #[serde(default, deserialize_with = "non_null")]
    #[schema(value_type = String, format = DateTime, nullable = false)]
    pub created_before: Option<String>,
    /// Only these events (their event_id).
    #[serde(default, deserialize_with = "non_null")]
    #[schema(value_type = Vec<EventId>, nullable = false)]
    pub event_ids: Option<Vec<String>>,
    /// At most this many deliveries (default 10000).
    #[serde(default, deserialize_with = "integer")]
    #[schema(nullable = false, minimum = 1, maximum = 2147483647)]
    pub max_events: Option<i32>,
    /// Recorded in outbox.replays; default (and when blank) admin-api.
    #[serde(default, deserialize_with = "non_null")]
    #[schema(value_type = Text, nullable = false)]
    pub requested_by: Option<String>,
    /// Recorded in outbox.replays.
    #[serde(default, deserialize_with = "non_null")]
    #[schema(value_type = Text, nullable = false)]
    pub reason: Option<String>,
    /// Only count what would be re-queued.
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
            statuses: self
                .status
                .unwrap_or_default()
                .into_iter()
                .map(|s| s.as_str().to_owned())
                .collect(),
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
/// the criteria is a 404 naming the field: the request is well formed, what it refers to is
/// missing (as for an unknown event of the compatibility replay).
pub async fn run_replay(
    state: &ApiState,
    criteria: &ReplayCriteria,
) -> Result<admin::ReplaySummary, ApiError> {
    let client = state.client().await?;
    let outcome = admin::replay(&client, criteria)
        .await
        .map_err(|error| match error {
            admin::AdminError::NotFound { name } => ApiError {
                field: Some("subscription".to_owned()),
                ..ApiError::not_found(format!(
                    "no subscription named {name:?}; GET /admin/v1/subscriptions lists them"
                ))
            },
            other => from_admin(other),
        })?;
    admin::get_replay(&client, outcome.replay_id)
        .await
        .map_err(from_admin)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                super::ErrorCode::Internal,
                format!(
                    "replay {} was recorded but could not be read back",
                    outcome.replay_id
                ),
            )
        })
}

/// Run outbox.replay (or only count, with dry_run).
#[utoipa::path(
    post,
    path = "/replays",
    tag = "replays",
    request_body(content = Option<ReplayBody>, description = "Optional; {} replays every dead delivery."),
    responses(
        (status = 201, description = "The recorded replay.", body = admin::ReplaySummary),
        (status = 400, description = "Invalid input; error.field names it.", body = ErrorBody),
        (status = 404, description = "No subscription by the name given (error.field is subscription).", body = ErrorBody),
    ),
)]
async fn create_replay(
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<ReplayBody>,
) -> Result<impl IntoResponse, ApiError> {
    let criteria = body.criteria()?;
    let replay = run_replay(&state, &criteria).await?;
    Ok((StatusCode::CREATED, axum::Json(replay)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct PageQuery {
    /// Page size, 1 to 500 (default 50).
    #[param(nullable = false, minimum = 1, maximum = 500)]
    limit: Option<i64>,
    /// next_cursor of the previous page.
    #[param(nullable = false, pattern = "^[1-9][0-9]{0,17}$")]
    cursor: Option<String>,
}

/// Replays and backfills, newest first.
#[utoipa::path(
    get,
    path = "/replays",
    tag = "replays",
    params(PageQuery),
    responses(
        (status = 200, description = "A page of replays.", body = admin::ReplayPage),
        (status = 400, description = "Invalid input; error.field names it.", body = ErrorBody),
    ),
)]
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

/// One replay.
#[utoipa::path(
    get,
    path = "/replays/{id}",
    tag = "replays",
    params(("id" = i64, Path, description = "Replay id.", minimum = 1)),
    responses(
        (status = 200, description = "The replay.", body = admin::ReplaySummary),
        (status = 400, description = "Not an id.", body = ErrorBody),
        (status = 404, description = "No such replay.", body = ErrorBody),
    ),
)]
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
