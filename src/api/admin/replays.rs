//! `/admin/v1/replays…`: run `outbox.replay` (or count with `dry_run`) and read the record.

use super::*;

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
    pub(super) fn criteria(self) -> Result<ReplayCriteria, ApiError> {
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
                super::super::ErrorCode::Internal,
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
pub(super) async fn create_replay(
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
pub(super) struct PageQuery {
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
pub(super) async fn list_replays(
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
pub(super) async fn get_replay(
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
