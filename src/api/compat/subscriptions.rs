//! The previous bus's subscription endpoints: subscribe a service (one subscription per
//! `service_name`) and list them.

use super::*;

/// Subscribe a service to an event type. Unknown fields are ignored.
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct SubscribeBody {
    /// Exact event type or glob, added to the service's subscription.
    #[schema(value_type = EventTypePattern)]
    event_type: String,
    /// Names the subscription.
    #[schema(value_type = SubscriptionName)]
    service_name: String,
    /// Replaces the subscription's URL.
    #[schema(value_type = WebhookUrl)]
    webhook_url: SecretUrl,
    /// The payload must contain this object; `{}` or `null` = every payload; absent = keep.
    #[serde(default, deserialize_with = "super::super::double_option")]
    #[schema(value_type = Option<JsonObject>)]
    filters: Option<Option<serde_json::Value>>,
    /// Fields of older clients, ignored; like all text they must not hold NUL.
    #[serde(flatten)]
    #[schema(value_type = BTreeMap<String, JsonValue>)]
    _ignored: BTreeMap<String, IgnoredAny>,
}

/// A subscription in the old bus's words.
#[derive(Serialize, ToSchema)]
pub(super) struct CompatSubscription {
    id: i64,
    service_name: String,
    event_types: Vec<String>,
    #[schema(value_type = MaskedUrl)]
    webhook_url: String,
    #[schema(value_type = Option<Object>)]
    filters: Option<admin::Jsonb>,
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

#[derive(Serialize, ToSchema)]
pub(super) struct SubscribeAnswer {
    #[serde(flatten)]
    subscription: CompatSubscription,
    created: bool,
    /// Only when the subscription was created by this call: give it to the subscriber.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String, nullable = false)]
    secret: Option<admin::SecretText>,
}

pub(super) fn subscribe_field(field: &str) -> Option<&'static str> {
    match field {
        "name" => Some("service_name"),
        "url" => Some("webhook_url"),
        "event_types" => Some("event_type"),
        "filter" => Some("filters"),
        _ => None,
    }
}

/// Compatibility: create or extend the subscription named service_name.
#[utoipa::path(
    post,
    path = "/events/subscribe",
    tag = "compatibility",
    request_body = SubscribeBody,
    responses(
        (status = 201, description = "Created; carries the secret.", body = SubscribeAnswer),
        (status = 200, description = "Updated (no secret).", body = SubscribeAnswer),
        (status = 400, description = "Invalid input; error.field names it.", body = ErrorBody),
    ),
)]
pub(super) async fn subscribe(
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<SubscribeBody>,
) -> Result<impl IntoResponse, ApiError> {
    super::super::check_webhook_url("webhook_url", &body.webhook_url)?;
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

#[derive(Serialize, ToSchema)]
pub(super) struct CompatSubscriptionList {
    subscriptions: Vec<CompatSubscription>,
}

/// Compatibility: list subscriptions.
#[utoipa::path(
    get,
    path = "/subscriptions",
    tag = "compatibility",
    responses((status = 200, description = "Subscriptions.", body = CompatSubscriptionList)),
)]
pub(super) async fn list_subscriptions(
    State(state): State<ApiState>,
) -> Result<impl IntoResponse, ApiError> {
    let client = state.client().await?;
    let subscriptions = admin::list_subscriptions(&client)
        .await
        .map_err(ApiError::from)?;
    Ok(axum::Json(CompatSubscriptionList {
        subscriptions: subscriptions.into_iter().map(Into::into).collect(),
    }))
}
