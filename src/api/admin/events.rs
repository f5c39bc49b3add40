//! `/admin/v1/events…`: keyset-paged search and one event with its deliveries and attempts.

use super::*;

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

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct EventsQuery {
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
pub(super) async fn search_events(
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
pub(super) async fn get_event(
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
