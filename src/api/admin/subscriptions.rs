//! `/admin/v1/subscriptions…`: list, create (the answer carries the secret), read, change,
//! remove, disable, enable, rotate the secret.

use super::*;

/// Subscriptions, by name.
#[derive(Serialize, ToSchema)]
pub(super) struct SubscriptionList {
    subscriptions: Vec<SubscriptionInfo>,
}

/// List subscriptions (by name).
#[utoipa::path(
    get,
    path = "/subscriptions",
    tag = "subscriptions",
    responses((status = 200, description = "Every subscription.", body = SubscriptionList)),
)]
pub(super) async fn list_subscriptions(
    State(state): State<ApiState>,
) -> Result<impl IntoResponse, ApiError> {
    let client = state.client().await?;
    let subscriptions = admin::list_subscriptions(&client)
        .await
        .map_err(from_admin)?;
    Ok(axum::Json(SubscriptionList { subscriptions }))
}

/// The only answer besides rotate-secret that carries a secret.
#[derive(Serialize, ToSchema)]
pub(super) struct CreatedSubscription {
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
pub(super) async fn create_subscription(
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<SubscriptionCreate>,
) -> Result<impl IntoResponse, ApiError> {
    super::super::check_target_url("url", &body.url)?;
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
pub(super) async fn get_subscription(
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
pub(super) async fn update_subscription(
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
        super::super::check_target_url("url", url)?;
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
pub(super) async fn remove_subscription(
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
pub(super) struct DisableBody {
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
pub(super) async fn disable_subscription(
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
pub(super) async fn enable_subscription(
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
pub(super) struct RotateBody {
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
pub(super) async fn rotate_secret(
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
