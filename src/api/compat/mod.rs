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

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use std::collections::BTreeMap;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::admin::run_replay;
use super::openapi::{
    EventId, EventType, EventTypePattern, JsonObject, JsonValue, MaskedUrl, SubscriptionName, Text,
    WebhookUrl,
};
use super::{ApiError, ApiJson, ApiPath, ApiQuery, ApiState, ErrorBody, ErrorCode, parse_uuid};
use crate::admin::{self, EventSearch, NewEvent, Published, ReplayCriteria};
use crate::config::secret::SecretUrl;

mod events;
mod subscriptions;

use events::*;
use subscriptions::*;

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

pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(publish))
        .routes(routes!(subscribe))
        .routes(routes!(list_subscriptions))
        .routes(routes!(history))
        .routes(routes!(replay_event))
        .routes(routes!(replay_batch))
        .routes(routes!(pending_status))
}
