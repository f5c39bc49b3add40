//! The previous bus's event endpoints: publish, history, replay one event or a batch, and the
//! pending backlog.

use super::*;

/// Statuses a single-event replay re-sends: everything finished or given up on. Pending and
/// in-flight deliveries are being sent anyway.
pub(super) const SINGLE_REPLAY_STATUSES: [&str; 3] = ["dead", "failing", "delivered"];

/// An event to publish. Unknown fields are ignored and `null` means absent: old clients
/// send both.
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct PublishBody {
    #[schema(value_type = EventType)]
    event_type: String,
    #[schema(value_type = Option<Text>)]
    tenant_id: Option<String>,
    #[schema(value_type = Option<Text>)]
    source_service: Option<String>,
    /// Becomes the payload (at most 1 MiB of JSON); `{}` when absent or null.
    #[schema(value_type = JsonValue, required = false)]
    data: Option<serde_json::Value>,
    /// low, normal (default) or high, in any case: -10, 0, 10 in events.priority.
    #[schema(
        value_type = Option<String>,
        pattern = "^([Ll][Oo][Ww]|[Nn][Oo][Rr][Mm][Aa][Ll]|[Hh][Ii][Gg][Hh])$"
    )]
    priority: Option<String>,
    /// Subscription names; empty or absent = every matching subscription.
    #[schema(value_type = Option<Vec<Text>>)]
    target_services: Option<Vec<String>>,
    /// Your own event_id (idempotency: a second publish with it is a 409).
    #[schema(value_type = Option<EventId>)]
    event_id: Option<String>,
    /// Stored as metadata.correlation_id.
    #[schema(value_type = Option<Text>)]
    correlation_id: Option<String>,
    /// Extra metadata, passed through to subscribers.
    #[schema(value_type = Option<JsonObject>)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// e.g. lead:42; 1 to 255 characters.
    #[schema(value_type = Option<String>, pattern = r"^[^\u0000]{1,255}$")]
    ordering_key: Option<String>,
    /// Fields of older clients, ignored; like all text they must not hold NUL.
    #[serde(flatten)]
    #[schema(value_type = BTreeMap<String, JsonValue>)]
    _ignored: BTreeMap<String, IgnoredAny>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct PublishAnswer {
    event_id: Uuid,
    /// Always accepted.
    #[schema(value_type = String, pattern = "^accepted$")]
    status: &'static str,
}

pub(super) fn priority(raw: Option<&str>) -> Result<i32, ApiError> {
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
pub(super) fn publish_field(field: &str) -> Option<&'static str> {
    match field {
        "payload" => Some("data"),
        _ => None,
    }
}

/// Compatibility: publish an event (inserts into outbox.events).
#[utoipa::path(
    post,
    path = "/events/publish",
    tag = "compatibility",
    request_body = PublishBody,
    responses(
        (status = 201, description = "Stored.", body = PublishAnswer),
        (status = 400, description = "Invalid input; error.field names it.", body = ErrorBody),
        (status = 409, description = "event_id already published (code duplicate_event).", body = ErrorBody),
    ),
)]
pub(super) async fn publish(
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
                ErrorCode::DuplicateEvent,
                format!("event {event_id} was already published; it is not stored twice"),
            )
        }),
    }
}

/// Which events. Unknown fields are ignored.
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct HistoryBody {
    #[schema(value_type = Option<Text>)]
    tenant_id: Option<String>,
    /// Exact event types or globs; none = every type.
    #[serde(default)]
    #[schema(value_type = Vec<EventTypePattern>)]
    event_types: Vec<String>,
    /// 1 to 100 (default 50).
    #[serde(default, deserialize_with = "super::super::nullable_integer")]
    #[schema(minimum = 1, maximum = 100)]
    limit: Option<i64>,
    /// Fields of older clients, ignored; like all text they must not hold NUL.
    #[serde(flatten)]
    #[schema(value_type = BTreeMap<String, JsonValue>)]
    _ignored: BTreeMap<String, IgnoredAny>,
}

/// An event in the old bus's words (`data` is the payload).
#[derive(Serialize, ToSchema)]
pub(super) struct HistoryEvent {
    event_id: Uuid,
    event_type: String,
    tenant_id: Option<String>,
    source_service: Option<String>,
    /// The payload: any JSON.
    #[schema(value_type = Value)]
    data: Option<admin::Jsonb>,
    #[schema(value_type = Object)]
    metadata: admin::Jsonb,
    priority: i32,
    target_services: Option<Vec<String>>,
    #[schema(format = DateTime)]
    created_at: String,
    dispatched: bool,
    /// Number of deliveries per status.
    deliveries: std::collections::BTreeMap<String, i64>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct HistoryAnswer {
    events: Vec<HistoryEvent>,
    count: usize,
}

/// Compatibility: the latest events with their data, newest first.
#[utoipa::path(
    post,
    path = "/events/history",
    tag = "compatibility",
    request_body(content = Option<HistoryBody>, description = "Optional."),
    responses(
        (status = 200, description = "Events.", body = HistoryAnswer),
        (status = 400, description = "Invalid input; error.field names it.", body = ErrorBody),
    ),
)]
pub(super) async fn history(
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

#[derive(Serialize, ToSchema)]
pub(super) struct ReplayAnswer {
    replay_id: i64,
    matched: i64,
    dry_run: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    event_id: Option<Uuid>,
}

/// Compatibility: re-send one event's dead, failing and delivered deliveries.
#[utoipa::path(
    post,
    path = "/api/events/{event_id}/replay",
    tag = "compatibility",
    params(("event_id" = EventId, Path, description = "The event's event_id.")),
    responses(
        (status = 200, description = "Replayed (through outbox.replay).", body = ReplayAnswer),
        (status = 400, description = "Not a uuid.", body = ErrorBody),
        (status = 404, description = "No such event.", body = ErrorBody),
    ),
)]
pub(super) async fn replay_event(
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

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct BatchQuery {
    /// Exact event type or glob.
    #[param(value_type = EventTypePattern, required = false, nullable = false)]
    event_type: Option<String>,
    #[param(value_type = Text, required = false, nullable = false)]
    tenant_id: Option<String>,
    /// Comma-separated delivery statuses (not in_flight); default dead.
    #[param(
        nullable = false,
        pattern = "^( *(pending|delivered|failing|dead) *(, *(pending|delivered|failing|dead) *)*)?$"
    )]
    status: Option<String>,
    /// Deliveries at most, 1 to 10000 (default 100).
    #[param(nullable = false, minimum = 1, maximum = 10000)]
    limit: Option<i32>,
    /// Only count.
    #[serde(default)]
    #[param(required = false)]
    dry_run: bool,
}

/// Compatibility: replay many deliveries.
#[utoipa::path(
    post,
    path = "/api/events/replay/batch",
    tag = "compatibility",
    params(BatchQuery),
    responses(
        (status = 200, description = "Replayed (through outbox.replay).", body = ReplayAnswer),
        (status = 400, description = "Invalid input; error.field names it.", body = ErrorBody),
    ),
)]
pub(super) async fn replay_batch(
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

#[derive(Serialize, ToSchema)]
pub(super) struct PendingAnswer {
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

/// Compatibility: backlog and open deliveries.
#[utoipa::path(
    get,
    path = "/api/events/status/pending",
    tag = "compatibility",
    responses((status = 200, description = "Backlog.", body = PendingAnswer)),
)]
pub(super) async fn pending_status(
    State(state): State<ApiState>,
) -> Result<impl IntoResponse, ApiError> {
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
