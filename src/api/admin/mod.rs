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
    EventId, EventTypePattern, Headers, JsonObject, Secret, SubscriptionName, TargetUrl, Text,
};
use super::{
    ApiError, ApiJson, ApiPath, ApiQuery, ApiState, ErrorBody, double_option, integer, non_null,
    parse_cursor, parse_time, parse_uuid,
};
use crate::admin::{
    self, EventSearch, NewSubscription, ReplayCriteria, SecretText, SubscriptionInfo,
    SubscriptionSettings, SubscriptionUpdate,
};
use crate::config::secret::SecretUrl;

mod events;
mod replays;
mod subscriptions;

use events::*;
pub use replays::run_replay;
use replays::*;
use subscriptions::*;

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
        #[schema(value_type = TargetUrl)]
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
        #[schema(value_type = TargetUrl, nullable = false)]
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
