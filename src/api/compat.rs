//! Endpoints of the previous in-house HTTP event bus, so services built against it keep
//! working unchanged while they move to inserting into `outbox.events` themselves. Same
//! bearer token as the admin API. Everything goes through [`crate::admin`]: a publish is an
//! ordinary event row, a subscribe an ordinary subscription, a replay an `outbox.replay`
//! call recorded in `outbox.replays`.
//!
//! Request bodies here ignore fields they do not know (old clients send extras such as a
//! timestamp); the admin API, a new interface, refuses them instead.
//!
//! Decisions the old bus left open:
//! - A subscription is named after `service_name` alone, so `target_services` (which names
//!   subscriptions) keeps addressing services. Subscribing the same service to another
//!   event type adds the type to that subscription; `webhook_url` and `filters` are the
//!   service's, the last subscribe wins. Concurrent subscribes of one service each add
//!   their type ([`admin::subscribe_event_type`] is one statement).
//! - A publish with an `event_id` that exists already is refused with 409
//!   (`duplicate_event`): the first one was stored and will be delivered, so a retrying
//!   client can treat 409 as done. This is the SPEC's idempotency of `event_id`.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::admin::run_replay;
use super::{ApiError, ApiJson, ApiPath, ApiQuery, ApiState, parse_uuid};
use crate::admin::{self, EventSearch, NewEvent, Published, ReplayCriteria};
use crate::secret::SecretUrl;

/// Who compatibility replays are recorded as in `outbox.replays`.
pub const COMPAT_REQUESTER: &str = "event-bus-compat";

/// `priority` of the old bus to `events.priority` (higher is dispatched sooner). Spaced out
/// so producers writing SQL can still place an event between two of them.
pub const PRIORITY_LOW: i32 = -10;
pub const PRIORITY_NORMAL: i32 = 0;
pub const PRIORITY_HIGH: i32 = 10;

/// Largest `limit` of `/events/history`: unlike the admin search it returns payloads (up to
/// 1 MiB each), so its pages are smaller.
pub const HISTORY_LIMIT_MAX: i64 = 100;
/// `limit` of a batch replay when none is given, and the largest accepted (the default
/// `max_events` of `outbox.replay`).
pub const BATCH_REPLAY_DEFAULT: i32 = 100;
pub const BATCH_REPLAY_MAX: i32 = 10_000;

/// Statuses a single-event replay re-sends: everything finished or given up on. Pending and
/// in-flight deliveries are being sent anyway.
const SINGLE_REPLAY_STATUSES: [&str; 3] = ["dead", "failing", "delivered"];

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/events/publish", post(publish))
        .route("/events/subscribe", post(subscribe))
        .route("/subscriptions", get(list_subscriptions))
        .route("/events/history", post(history))
        .route("/api/events/{event_id}/replay", post(replay_event))
        .route("/api/events/replay/batch", post(replay_batch))
        .route("/api/events/status/pending", get(pending_status))
}

#[derive(Debug, Deserialize)]
struct PublishBody {
    event_type: String,
    tenant_id: Option<String>,
    source_service: Option<String>,
    /// Becomes the payload; `{}` when absent.
    data: Option<serde_json::Value>,
    priority: Option<String>,
    /// Empty or absent = every matching subscription.
    target_services: Option<Vec<String>>,
    event_id: Option<String>,
    correlation_id: Option<String>,
    /// Extra metadata, passed through to subscribers.
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    ordering_key: Option<String>,
}

#[derive(Serialize)]
struct PublishAnswer {
    event_id: Uuid,
    status: &'static str,
}

fn priority(raw: Option<&str>) -> Result<i32, ApiError> {
    match raw.map(str::to_ascii_lowercase).as_deref() {
        None | Some("normal") => Ok(PRIORITY_NORMAL),
        Some("low") => Ok(PRIORITY_LOW),
        Some("high") => Ok(PRIORITY_HIGH),
        Some(other) => Err(ApiError::invalid(
            "priority",
            format!("{other:?} is not a priority; use low, normal or high"),
        )),
    }
}

/// Field names of [`crate::admin`] (the table's) to this endpoint's.
fn publish_field(field: &str) -> Option<&'static str> {
    match field {
        "payload" => Some("data"),
        _ => None,
    }
}

async fn publish(
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<PublishBody>,
) -> Result<impl IntoResponse, ApiError> {
    let event_id = body
        .event_id
        .as_deref()
        .map(|id| parse_uuid("event_id", id))
        .transpose()?;
    let mut metadata = body.metadata.unwrap_or_default();
    if let Some(correlation_id) = body.correlation_id {
        metadata.insert(
            "correlation_id".to_owned(),
            serde_json::Value::String(correlation_id),
        );
    }
    let event = NewEvent {
        event_id,
        event_type: body.event_type,
        payload: body
            .data
            .unwrap_or_else(|| serde_json::Value::Object(serde_json::Map::new())),
        tenant_id: body.tenant_id,
        source_service: body.source_service,
        ordering_key: body.ordering_key,
        // The old bus sent [] for "everyone"; the table says that with NULL.
        target_services: body.target_services.filter(|t| !t.is_empty()),
        metadata: serde_json::Value::Object(metadata),
        priority: priority(body.priority.as_deref())?,
    };
    let client = state.client().await?;
    match admin::publish_event(&client, &event)
        .await
        .map_err(|e| ApiError::from(e).rename_field(publish_field))?
    {
        Published::Inserted(event_id) => Ok((
            StatusCode::CREATED,
            axum::Json(PublishAnswer {
                event_id,
                status: "accepted",
            }),
        )),
        Published::AlreadyExists(event_id) => Err(ApiError {
            field: Some("event_id".to_owned()),
            ..ApiError::new(
                StatusCode::CONFLICT,
                "duplicate_event",
                format!("event {event_id} was already published; it is not stored twice"),
            )
        }),
    }
}

#[derive(Debug, Deserialize)]
struct SubscribeBody {
    event_type: String,
    service_name: String,
    webhook_url: SecretUrl,
    /// The payload must contain this object; `{}` or `null` = every payload.
    #[serde(default, deserialize_with = "super::double_option")]
    filters: Option<Option<serde_json::Value>>,
}

/// A subscription in the old bus's words.
#[derive(Serialize)]
struct CompatSubscription {
    id: i64,
    service_name: String,
    event_types: Vec<String>,
    webhook_url: String,
    filters: Option<serde_json::Value>,
    tenant_id: Option<String>,
    enabled: bool,
}

impl From<admin::SubscriptionInfo> for CompatSubscription {
    fn from(info: admin::SubscriptionInfo) -> Self {
        CompatSubscription {
            id: info.id,
            service_name: info.name,
            event_types: info.event_types,
            webhook_url: info.url,
            filters: info.filter,
            tenant_id: info.tenant_id,
            enabled: info.enabled,
        }
    }
}

#[derive(Serialize)]
struct SubscribeAnswer {
    #[serde(flatten)]
    subscription: CompatSubscription,
    created: bool,
    /// Only when the subscription was created by this call: give it to the subscriber.
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<admin::SecretText>,
}

fn subscribe_field(field: &str) -> Option<&'static str> {
    match field {
        "name" => Some("service_name"),
        "url" => Some("webhook_url"),
        "event_types" => Some("event_type"),
        "filter" => Some("filters"),
        _ => None,
    }
}

async fn subscribe(
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<SubscribeBody>,
) -> Result<impl IntoResponse, ApiError> {
    // An empty filter matches every payload; store it as NULL, which says so plainly.
    let filter = body
        .filters
        .map(|f| f.filter(|f| f.as_object().is_none_or(|o| !o.is_empty())));
    let client = state.client().await?;
    let subscribed = admin::subscribe_event_type(
        &client,
        &body.service_name,
        &body.webhook_url,
        &body.event_type,
        filter.as_ref().map(Option::as_ref),
    )
    .await
    .map_err(|e| ApiError::from(e).rename_field(subscribe_field))?;
    let created = subscribed.created_secret.is_some();
    Ok((
        if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        axum::Json(SubscribeAnswer {
            subscription: subscribed.subscription.into(),
            created,
            secret: subscribed.created_secret,
        }),
    ))
}

#[derive(Serialize)]
struct CompatSubscriptionList {
    subscriptions: Vec<CompatSubscription>,
}

async fn list_subscriptions(State(state): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let client = state.client().await?;
    let subscriptions = admin::list_subscriptions(&client)
        .await
        .map_err(ApiError::from)?;
    Ok(axum::Json(CompatSubscriptionList {
        subscriptions: subscriptions.into_iter().map(Into::into).collect(),
    }))
}

#[derive(Debug, Deserialize)]
struct HistoryBody {
    tenant_id: Option<String>,
    #[serde(default)]
    event_types: Vec<String>,
    limit: Option<i64>,
}

/// An event in the old bus's words (`data` is the payload).
#[derive(Serialize)]
struct HistoryEvent {
    event_id: Uuid,
    event_type: String,
    tenant_id: Option<String>,
    source_service: Option<String>,
    data: Option<serde_json::Value>,
    metadata: serde_json::Value,
    priority: i32,
    target_services: Option<Vec<String>>,
    created_at: String,
    dispatched: bool,
    /// Number of deliveries per status.
    deliveries: std::collections::BTreeMap<String, i64>,
}

#[derive(Serialize)]
struct HistoryAnswer {
    events: Vec<HistoryEvent>,
    count: usize,
}

async fn history(
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<HistoryBody>,
) -> Result<impl IntoResponse, ApiError> {
    let limit = body.limit.unwrap_or(admin::PAGE_SIZE_DEFAULT);
    if !(1..=HISTORY_LIMIT_MAX).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("{limit} is out of range; give 1 to {HISTORY_LIMIT_MAX}"),
        ));
    }
    let search = EventSearch {
        event_types: body.event_types,
        tenant_id: body.tenant_id,
        limit,
        include_payload: true,
        ..EventSearch::default()
    };
    let client = state.client().await?;
    let page = admin::search_events(&client, &search).await.map_err(|e| {
        ApiError::from(e).rename_field(|f| (f == "event_type").then_some("event_types"))
    })?;
    let events: Vec<HistoryEvent> = page
        .events
        .into_iter()
        .map(|e| HistoryEvent {
            event_id: e.event_id,
            event_type: e.event_type,
            tenant_id: e.tenant_id,
            source_service: e.source_service,
            data: e.payload,
            metadata: e.metadata,
            priority: e.priority,
            target_services: e.target_services,
            created_at: e
                .created_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            dispatched: e.dispatched_at.is_some(),
            deliveries: e.deliveries,
        })
        .collect();
    Ok(axum::Json(HistoryAnswer {
        count: events.len(),
        events,
    }))
}

#[derive(Serialize)]
struct ReplayAnswer {
    replay_id: i64,
    matched: i64,
    dry_run: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<Uuid>,
}

async fn replay_event(
    State(state): State<ApiState>,
    ApiPath(event_id): ApiPath,
) -> Result<impl IntoResponse, ApiError> {
    let event_id = parse_uuid("event_id", &event_id)?;
    {
        // A replay of an unknown event would record "0 matched"; a 404 says what happened.
        let client = state.client().await?;
        if !admin::event_exists(&client, event_id)
            .await
            .map_err(ApiError::from)?
        {
            return Err(ApiError::not_found(format!(
                "no event with event_id {event_id}"
            )));
        }
    }
    let criteria = ReplayCriteria {
        statuses: SINGLE_REPLAY_STATUSES.map(str::to_owned).to_vec(),
        event_ids: vec![event_id],
        requested_by: Some(COMPAT_REQUESTER.to_owned()),
        reason: Some(format!("POST /api/events/{event_id}/replay")),
        ..ReplayCriteria::default()
    };
    let replay = run_replay(&state, &criteria).await?;
    Ok(axum::Json(ReplayAnswer {
        replay_id: replay.id,
        matched: replay.matched,
        dry_run: replay.dry_run,
        event_id: Some(event_id),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchQuery {
    event_type: Option<String>,
    tenant_id: Option<String>,
    /// Comma-separated delivery statuses; default `dead`.
    status: Option<String>,
    limit: Option<i32>,
    #[serde(default)]
    dry_run: bool,
}

async fn replay_batch(
    State(state): State<ApiState>,
    ApiQuery(query): ApiQuery<BatchQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let limit = query.limit.unwrap_or(BATCH_REPLAY_DEFAULT);
    if !(1..=BATCH_REPLAY_MAX).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("{limit} is out of range; give 1 to {BATCH_REPLAY_MAX}"),
        ));
    }
    if let Some(event_type) = &query.event_type {
        admin::check_event_type_pattern("event_type", event_type).map_err(ApiError::from)?;
    }
    let statuses = query
        .status
        .map(|s| {
            s.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let criteria = ReplayCriteria {
        statuses,
        event_type: query.event_type,
        tenant_id: query.tenant_id,
        max_events: Some(limit),
        requested_by: Some(COMPAT_REQUESTER.to_owned()),
        reason: Some("POST /api/events/replay/batch".to_owned()),
        dry_run: query.dry_run,
        ..ReplayCriteria::default()
    };
    let replay = run_replay(&state, &criteria).await?;
    Ok(axum::Json(ReplayAnswer {
        replay_id: replay.id,
        matched: replay.matched,
        dry_run: replay.dry_run,
        event_id: None,
    }))
}

#[derive(Serialize)]
struct PendingAnswer {
    /// Events committed and due but not yet fanned out into deliveries.
    undispatched_events: i64,
    oldest_undispatched_age_seconds: Option<f64>,
    /// Events whose `deliver_after` is still ahead.
    scheduled_events: i64,
    pending_deliveries: i64,
    in_flight_deliveries: i64,
    failing_deliveries: i64,
    dead_deliveries: i64,
    subscriptions: Vec<admin::SubscriptionStatus>,
}

async fn pending_status(State(state): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let client = state.client().await?;
    let report = admin::status(&client).await.map_err(ApiError::from)?;
    let total = |count: fn(&admin::SubscriptionStatus) -> i64| {
        report.subscriptions.iter().map(count).sum::<i64>()
    };
    Ok(axum::Json(PendingAnswer {
        undispatched_events: report.backlog.undispatched_events,
        oldest_undispatched_age_seconds: report.backlog.oldest_undispatched_age_seconds,
        scheduled_events: report.backlog.scheduled_events,
        pending_deliveries: total(|s| s.pending),
        in_flight_deliveries: total(|s| s.in_flight),
        failing_deliveries: total(|s| s.failing),
        dead_deliveries: total(|s| s.dead),
        subscriptions: report.subscriptions,
    }))
}
