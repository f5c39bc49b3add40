//! Administrative operations shared by the CLI (`outbox-relay subscription|replay|status`)
//! and the admin API: managing subscriptions (including secret rotation), replaying
//! deliveries and summarising the state of the outbox.
//!
//! Every function takes a plain `&tokio_postgres::Client` (a pooled connection derefs to
//! one) and returns [`AdminError`], whose variants are the cases a caller answers
//! differently: an unknown name, a taken name, a refused value (naming the field), a schema
//! that needs `migrate`, or a database failure. Values are checked by the table's CHECK
//! constraints; a violation comes back as [`AdminError::Invalid`] naming the field, so the
//! database stays the one place the rules live. Only the URL and a given secret are checked
//! here first, because their errors can say more than a constraint name.
//!
//! Results are `Serialize` (for `--json` and the HTTP API). Secrets appear only in the results
//! of [`create_subscription`] and [`rotate_secret`], never in [`SubscriptionInfo`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Serialize, Serializer};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{Json, ToSql};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::db::DbError;
use crate::secret::{ExposeSecret, MASK, SecretString, SecretUrl, mask_url};
use crate::webhook::{SigningSecret, generate_secret};

/// A `jsonb` value as PostgreSQL prints it, passed through without being parsed into a
/// [`serde_json::Value`]: jsonb keeps numbers of any size and precision (a producer may
/// insert `1e400`, and `1.7976931348623157e308` comes back as a 309-digit integer), which an
/// `f64` cannot hold, so reading them as `Value` failed, and a listing panicked on one row.
pub type Jsonb = Box<serde_json::value::RawValue>;

/// Delivery statuses `outbox.deliveries.status` can hold (what replay criteria may name).
pub const DELIVERY_STATUSES: [&str; 5] = ["pending", "in_flight", "delivered", "failing", "dead"];

/// How many of the latest replays [`status`] reports.
pub const RECENT_REPLAYS: i64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no subscription named {name:?}")]
    NotFound { name: String },
    #[error("a subscription named {name:?} already exists")]
    Duplicate { name: String },
    /// A value was refused, before the database saw it or by one of its CHECK constraints.
    #[error("invalid {field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
    /// The database lacks a table, column or function this version uses.
    #[error(
        "{context}: the database schema is older than this outbox-relay ({detail}); apply the migrations with `outbox-relay migrate`"
    )]
    SchemaOutdated {
        context: &'static str,
        detail: String,
    },
    #[error(transparent)]
    Db(#[from] DbError),
}

/// A signing secret as text (`whsec_…`). `Debug` never shows it; [`SecretText::expose`]
/// does, and serializing it does too: it is serialized only into the one answer that hands a
/// new secret to its owner (create, rotate-secret).
#[derive(Clone)]
pub struct SecretText(SecretString);

impl SecretText {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(SecretString::from(secret.into()))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl PartialEq for SecretText {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for SecretText {}

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretText(<redacted>)")
    }
}

impl Serialize for SecretText {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.expose())
    }
}

impl<'de> serde::Deserialize<'de> for SecretText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(SecretText::new)
    }
}

/// Settings shared by create and update. `None` leaves a setting alone (on create: the
/// column default). The doubled options can also clear a nullable column: `Some(None)`.
#[derive(Clone, Debug, Default)]
pub struct SubscriptionSettings {
    /// Exact event types or globs (`lead.*`, `*`). Default `{*}`.
    pub event_types: Option<Vec<String>>,
    /// `Some(None)` = every tenant.
    pub tenant_id: Option<Option<String>>,
    /// A JSON object the payload must contain; `Some(None)` = every payload.
    pub filter: Option<Option<serde_json::Value>>,
    /// Replaces all static headers.
    pub headers: Option<BTreeMap<String, String>>,
    pub timeout: Option<Duration>,
    pub max_in_flight: Option<i32>,
    /// `Some(None)` = unlimited.
    pub rate_limit_per_second: Option<Option<f32>>,
    /// Waits between attempts; empty = a single attempt.
    pub retry_schedule: Option<Vec<Duration>>,
    pub ordered: Option<bool>,
}

impl SubscriptionSettings {
    pub fn is_empty(&self) -> bool {
        self.event_types.is_none()
            && self.tenant_id.is_none()
            && self.filter.is_none()
            && self.headers.is_none()
            && self.timeout.is_none()
            && self.max_in_flight.is_none()
            && self.rate_limit_per_second.is_none()
            && self.retry_schedule.is_none()
            && self.ordered.is_none()
    }
}

/// `Debug` is safe to log: the URL shows `***` for its password, the secret nothing.
#[derive(Clone, Debug)]
pub struct NewSubscription {
    pub name: String,
    pub url: SecretUrl,
    /// Generated (`whsec_` + 32 random bytes) when `None`.
    pub secret: Option<SecretText>,
    pub settings: SubscriptionSettings,
}

#[derive(Clone, Debug, Default)]
pub struct SubscriptionUpdate {
    pub url: Option<SecretUrl>,
    pub settings: SubscriptionSettings,
}

impl SubscriptionUpdate {
    pub fn is_empty(&self) -> bool {
        self.url.is_none() && self.settings.is_empty()
    }
}

/// A subscription as operators see it. Deliberately without its secrets.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct SubscriptionInfo {
    pub id: i64,
    pub name: String,
    /// With its password, if it has one, shown as `***` (SPEC): this is what the CLI, the
    /// API and `--json` print.
    pub url: String,
    pub event_types: Vec<String>,
    pub tenant_id: Option<String>,
    /// As stored (see [`Jsonb`]).
    #[schema(value_type = Option<Object>)]
    pub filter: Option<Jsonb>,
    pub enabled: bool,
    pub disabled_reason: Option<String>,
    pub ordered: bool,
    #[serde(rename = "retry_schedule_seconds", serialize_with = "seconds_list")]
    #[schema(value_type = Vec<f64>)]
    pub retry_schedule: Vec<Duration>,
    #[serde(rename = "timeout_seconds", serialize_with = "seconds")]
    #[schema(value_type = f64)]
    pub timeout: Duration,
    pub max_in_flight: i32,
    pub rate_limit_per_second: Option<f64>,
    pub headers: BTreeMap<String, String>,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    pub updated_at: DateTime<Utc>,
    /// While a rotation's overlap lasts: when the previous secret stops signing.
    #[serde(serialize_with = "rfc3339_option")]
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
}

/// The only time a generated secret is shown: hand it to the subscriber.
#[derive(Clone, Debug, Serialize)]
pub struct CreatedSubscription {
    pub id: i64,
    pub name: String,
    pub secret: SecretText,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct RemovedSubscription {
    pub id: i64,
    pub name: String,
    /// Open deliveries (pending, in flight, failing) that became `dead`.
    pub deliveries_ended: i64,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct RotatedSecret {
    pub id: i64,
    pub name: String,
    #[schema(value_type = String)]
    pub secret: SecretText,
    /// Until when requests also carry a signature under the previous secret; `None` when
    /// the rotation had no overlap.
    #[serde(serialize_with = "rfc3339_option")]
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
}

/// The arguments of `outbox.replay`; `None` (or empty) leaves the function's default.
#[derive(Clone, Debug, Default)]
pub struct ReplayCriteria {
    /// Delivery statuses to re-queue; empty = the function's default (`dead`).
    pub statuses: Vec<String>,
    pub subscription: Option<String>,
    /// Exact or glob.
    pub event_type: Option<String>,
    pub tenant_id: Option<String>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
    pub event_ids: Vec<Uuid>,
    pub max_events: Option<i32>,
    /// Default: the database user (`current_user`).
    pub requested_by: Option<String>,
    pub reason: Option<String>,
    pub dry_run: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReplayOutcome {
    pub replay_id: i64,
    /// Deliveries re-queued (or, for a dry run, that would have been).
    pub matched: i64,
    pub dry_run: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct StatusReport {
    pub backlog: Backlog,
    pub subscriptions: Vec<SubscriptionStatus>,
    pub recent_replays: Vec<ReplaySummary>,
}

/// Events not yet fanned out into deliveries.
#[derive(Clone, Debug, Serialize)]
pub struct Backlog {
    /// Due but not dispatched: near zero while a relay runs.
    pub undispatched_events: i64,
    pub oldest_undispatched_age_seconds: Option<f64>,
    /// Not yet due (`deliver_after` in the future).
    pub scheduled_events: i64,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct SubscriptionStatus {
    pub id: i64,
    pub name: String,
    pub enabled: bool,
    pub disabled_reason: Option<String>,
    pub pending: i64,
    pub in_flight: i64,
    pub failing: i64,
    pub dead: i64,
    /// Age of the oldest delivery not yet done (pending, in flight or failing).
    pub oldest_pending_age_seconds: Option<f64>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ReplaySummary {
    pub id: i64,
    #[serde(serialize_with = "rfc3339")]
    pub requested_at: DateTime<Utc>,
    pub requested_by: String,
    pub reason: Option<String>,
    #[schema(value_type = Object)]
    pub criteria: serde_json::Value,
    pub matched: i64,
    pub dry_run: bool,
}

/// Inserts a subscription; running relays start delivering to it within a second.
pub async fn create_subscription(
    client: &Client,
    new: &NewSubscription,
) -> Result<CreatedSubscription, AdminError> {
    check_url(new.url.expose_secret())?;
    let secret = match &new.secret {
        Some(secret) => {
            check_secret(secret)?;
            secret.clone()
        }
        None => SecretText::new(generate_secret()),
    };
    let mut columns = Columns::default();
    columns.set("name", new.name.clone());
    columns.set("url", new.url.expose_secret().to_owned());
    columns.set("secret", secret.expose().to_owned());
    columns.settings(&new.settings);
    let sql = format!(
        "INSERT INTO outbox.subscriptions ({}) VALUES ({}) RETURNING id",
        columns.names.join(", "),
        columns.values.join(", ")
    );
    let row = client
        .query_one(&sql, &columns.params())
        .await
        .map_err(|e| classify(e, "creating the subscription", &new.name))?;
    Ok(CreatedSubscription {
        id: row.get(0),
        name: new.name.clone(),
        secret,
    })
}

/// What [`subscribe_event_type`] did.
#[derive(Clone, Debug)]
pub struct Subscribed {
    pub subscription: SubscriptionInfo,
    /// `Some` only when this call created the subscription: give it to the subscriber.
    pub created_secret: Option<SecretText>,
}

/// Subscribes `name` to `event_type` at `url`: creates the subscription (secret generated)
/// or adds the type to its `event_types` (kept in order, never twice) and sets its URL.
/// `filter`: `None` leaves it alone (on create: none), `Some(None)` clears it.
///
/// One statement (`INSERT … ON CONFLICT (name) DO UPDATE`), so concurrent subscribes of the
/// same name each add their type: the update runs on the row as the previous one left it,
/// under its row lock. A read, append and write back lost all but one of them.
pub async fn subscribe_event_type(
    client: &Client,
    name: &str,
    url: &SecretUrl,
    event_type: &str,
    filter: Option<Option<&serde_json::Value>>,
) -> Result<Subscribed, AdminError> {
    check_url(url.expose_secret())?;
    check_event_type_pattern("event_types", event_type)?;
    let secret = SecretText::new(generate_secret());
    let sql = format!(
        "INSERT INTO outbox.subscriptions AS s (name, url, event_types, filter, secret)
         VALUES ($1, $2, ARRAY[$3::text], $5, $6)
         ON CONFLICT (name) DO UPDATE
            SET url = EXCLUDED.url,
                event_types = CASE WHEN $3 = ANY (s.event_types) THEN s.event_types
                                   ELSE s.event_types || $3::text END,
                filter = CASE WHEN $4::boolean THEN EXCLUDED.filter ELSE s.filter END
         RETURNING {SUBSCRIPTION_COLUMNS}, s.xmax = 0"
    );
    let row = client
        .query_one(
            &sql,
            &[
                &name,
                &url.expose_secret(),
                &event_type,
                &filter.is_some(),
                &filter.flatten(),
                &secret.expose(),
            ],
        )
        .await
        .map_err(|e| classify(e, "subscribing", name))?;
    // xmax is 0 on a row version this statement inserted, the locking transaction's id on
    // one it updated.
    let created: bool = row.get(17);
    Ok(Subscribed {
        subscription: subscription_from_row(&row),
        created_secret: created.then_some(secret),
    })
}

/// Every subscription, by name.
pub async fn list_subscriptions(client: &Client) -> Result<Vec<SubscriptionInfo>, AdminError> {
    let sql = format!("SELECT {SUBSCRIPTION_COLUMNS} FROM outbox.subscriptions ORDER BY name");
    let rows = client
        .query(&sql, &[])
        .await
        .map_err(|e| classify(e, "listing subscriptions", ""))?;
    Ok(rows.iter().map(subscription_from_row).collect())
}

pub async fn get_subscription(client: &Client, name: &str) -> Result<SubscriptionInfo, AdminError> {
    let sql = format!("SELECT {SUBSCRIPTION_COLUMNS} FROM outbox.subscriptions WHERE name = $1");
    let row = client
        .query_opt(&sql, &[&name])
        .await
        .map_err(|e| classify(e, "reading the subscription", name))?;
    row.as_ref()
        .map(subscription_from_row)
        .ok_or_else(|| not_found(name))
}

/// Changes the given settings, leaving the rest alone; returns the subscription as it is now.
pub async fn update_subscription(
    client: &Client,
    name: &str,
    update: &SubscriptionUpdate,
) -> Result<SubscriptionInfo, AdminError> {
    if update.is_empty() {
        return Err(AdminError::Invalid {
            field: "update",
            problem: "no setting to change was given".to_owned(),
        });
    }
    let mut columns = Columns::default();
    if let Some(url) = &update.url {
        check_url(url.expose_secret())?;
        columns.set("url", url.expose_secret().to_owned());
    }
    columns.settings(&update.settings);
    let assignments: Vec<String> = columns
        .names
        .iter()
        .zip(&columns.values)
        .map(|(column, value)| format!("{column} = {value}"))
        .collect();
    columns.params.push(Box::new(name.to_owned()));
    let sql = format!(
        "UPDATE outbox.subscriptions SET {} WHERE name = ${} RETURNING {SUBSCRIPTION_COLUMNS}",
        assignments.join(", "),
        columns.params.len()
    );
    let row = client
        .query_opt(&sql, &columns.params())
        .await
        .map_err(|e| classify(e, "updating the subscription", name))?;
    row.as_ref()
        .map(subscription_from_row)
        .ok_or_else(|| not_found(name))
}

/// Stops new deliveries (events published meanwhile are not fanned out to it; open
/// deliveries wait). `reason` is kept in `disabled_reason`.
pub async fn disable_subscription(
    client: &Client,
    name: &str,
    reason: Option<&str>,
) -> Result<SubscriptionInfo, AdminError> {
    let sql = format!(
        "UPDATE outbox.subscriptions SET enabled = false, disabled_reason = $2
          WHERE name = $1 RETURNING {SUBSCRIPTION_COLUMNS}"
    );
    let row = client
        .query_opt(&sql, &[&name, &reason])
        .await
        .map_err(|e| classify(e, "disabling the subscription", name))?;
    row.as_ref()
        .map(subscription_from_row)
        .ok_or_else(|| not_found(name))
}

/// Re-enables a subscription and clears `disabled_reason`.
pub async fn enable_subscription(
    client: &Client,
    name: &str,
) -> Result<SubscriptionInfo, AdminError> {
    let sql = format!(
        "UPDATE outbox.subscriptions SET enabled = true, disabled_reason = NULL
          WHERE name = $1 RETURNING {SUBSCRIPTION_COLUMNS}"
    );
    let row = client
        .query_opt(&sql, &[&name])
        .await
        .map_err(|e| classify(e, "enabling the subscription", name))?;
    row.as_ref()
        .map(subscription_from_row)
        .ok_or_else(|| not_found(name))
}

/// Deliveries of the subscription not yet finished (pending, in flight or failing): what
/// [`remove_subscription`] would end as dead.
pub async fn open_deliveries(client: &Client, name: &str) -> Result<i64, AdminError> {
    let row = client
        .query_opt(
            "SELECT (SELECT count(*) FROM outbox.deliveries d
                      WHERE d.subscription_id = s.id AND d.status IN ('pending', 'in_flight', 'failing'))
               FROM outbox.subscriptions s WHERE s.name = $1",
            &[&name],
        )
        .await
        .map_err(|e| classify(e, "counting open deliveries", name))?;
    row.map(|row| row.get(0)).ok_or_else(|| not_found(name))
}

/// Deletes the subscription. Its open deliveries become `dead` (a trigger does it, with the
/// reason in `last_error`); delivery history is kept.
pub async fn remove_subscription(
    client: &Client,
    name: &str,
) -> Result<RemovedSubscription, AdminError> {
    // The CTE reads the open deliveries as they were before the delete's trigger ended them.
    let row = client
        .query_opt(
            "WITH open AS (
                 SELECT count(*) AS n FROM outbox.deliveries d
                   JOIN outbox.subscriptions s ON s.id = d.subscription_id
                  WHERE s.name = $1 AND d.status IN ('pending', 'in_flight', 'failing')
             )
             DELETE FROM outbox.subscriptions WHERE name = $1
             RETURNING id, (SELECT n FROM open)",
            &[&name],
        )
        .await
        .map_err(|e| classify(e, "removing the subscription", name))?;
    let row = row.ok_or_else(|| not_found(name))?;
    Ok(RemovedSubscription {
        id: row.get(0),
        name: name.to_owned(),
        deliveries_ended: row.get(1),
    })
}

/// Replaces the signing secret (generated unless given). For `overlap` after now, requests
/// carry signatures under both the new and the previous secret, so the subscriber can switch
/// at its own pace; `Duration::ZERO` switches at once. Takes effect in running relays within
/// a second. One statement, so concurrent rotations cannot lose a secret halfway.
pub async fn rotate_secret(
    client: &Client,
    name: &str,
    overlap: Duration,
    secret: Option<&SecretText>,
) -> Result<RotatedSecret, AdminError> {
    let secret = match secret {
        Some(secret) => {
            check_secret(secret)?;
            secret.clone()
        }
        None => SecretText::new(generate_secret()),
    };
    let overlap_seconds = overlap.as_secs_f64();
    let row = client
        .query_opt(
            "UPDATE outbox.subscriptions
                SET previous_secret = CASE WHEN $3::float8 > 0 THEN secret END,
                    previous_secret_expires_at = CASE WHEN $3::float8 > 0
                                                      THEN now() + make_interval(secs => $3::float8) END,
                    secret = $2
              WHERE name = $1
          RETURNING id, previous_secret_expires_at",
            &[&name, &secret.expose(), &overlap_seconds],
        )
        .await
        .map_err(|e| classify(e, "rotating the secret", name))?;
    let row = row.ok_or_else(|| not_found(name))?;
    Ok(RotatedSecret {
        id: row.get(0),
        name: name.to_owned(),
        secret,
        previous_secret_expires_at: row.get(1),
    })
}

/// Calls `outbox.replay` with the given criteria (named arguments, so every criterion left
/// out keeps the function's default).
pub async fn replay(
    client: &Client,
    criteria: &ReplayCriteria,
) -> Result<ReplayOutcome, AdminError> {
    for status in &criteria.statuses {
        check_status("status", status)?;
    }
    if let Some(name) = &criteria.subscription {
        // A typo should not look like "nothing matched".
        let exists = client
            .query_opt(
                "SELECT 1 FROM outbox.subscriptions WHERE name = $1",
                &[name],
            )
            .await
            .map_err(|e| classify(e, "looking up the subscription", name))?;
        if exists.is_none() {
            return Err(not_found(name));
        }
    }
    let mut args = Arguments::default();
    if !criteria.statuses.is_empty() {
        args.add("status", "text[]", criteria.statuses.clone());
    }
    if let Some(subscription) = &criteria.subscription {
        args.add("subscription", "text", subscription.clone());
    }
    if let Some(event_type) = &criteria.event_type {
        args.add("event_type", "text", event_type.clone());
    }
    if let Some(tenant_id) = &criteria.tenant_id {
        args.add("tenant_id", "text", tenant_id.clone());
    }
    if let Some(after) = criteria.created_after {
        args.add("created_after", "timestamptz", after);
    }
    if let Some(before) = criteria.created_before {
        args.add("created_before", "timestamptz", before);
    }
    if !criteria.event_ids.is_empty() {
        args.add("event_ids", "uuid[]", criteria.event_ids.clone());
    }
    if let Some(max_events) = criteria.max_events {
        args.add("max_events", "integer", max_events);
    }
    if let Some(requested_by) = &criteria.requested_by {
        args.add("requested_by", "text", requested_by.clone());
    }
    if let Some(reason) = &criteria.reason {
        args.add("reason", "text", reason.clone());
    }
    args.add("dry_run", "boolean", criteria.dry_run);
    let sql = format!(
        "SELECT replay_id, matched FROM outbox.replay({})",
        args.named.join(", ")
    );
    let row = client
        .query_one(&sql, &args.params())
        .await
        .map_err(|e| classify(e, "replaying deliveries", ""))?;
    Ok(ReplayOutcome {
        replay_id: row.get(0),
        matched: row.get(1),
        dry_run: criteria.dry_run,
    })
}

/// Backlog, per-subscription delivery counts and the latest replays.
pub async fn status(client: &Client) -> Result<StatusReport, AdminError> {
    let backlog = client
        .query_one(
            "SELECT count(*) FILTER (WHERE deliver_after <= now()),
                    extract(epoch FROM now() - min(created_at) FILTER (WHERE deliver_after <= now()))::float8,
                    count(*) FILTER (WHERE deliver_after > now())
               -- Undispatched events through the dispatcher's two partial indexes, not a
               -- walk of the whole table.
               FROM (SELECT deliver_after, created_at FROM outbox.events
                      WHERE dispatched_at IS NULL AND deliver_after <= created_at
                     UNION ALL
                     SELECT deliver_after, created_at FROM outbox.events
                      WHERE dispatched_at IS NULL AND deliver_after > created_at) e",
            &[],
        )
        .await
        .map_err(|e| classify(e, "reading the event backlog", ""))?;
    let backlog = Backlog {
        undispatched_events: backlog.get(0),
        oldest_undispatched_age_seconds: backlog.get(1),
        scheduled_events: backlog.get(2),
    };

    // Only open and dead deliveries are joined: the delivered history (most rows) is never
    // read, and the partial indexes on deliveries cover these statuses.
    let rows = client
        .query(
            "SELECT s.id, s.name, s.enabled, s.disabled_reason,
                    count(d.id) FILTER (WHERE d.status = 'pending'),
                    count(d.id) FILTER (WHERE d.status = 'in_flight'),
                    count(d.id) FILTER (WHERE d.status = 'failing'),
                    count(d.id) FILTER (WHERE d.status = 'dead'),
                    extract(epoch FROM now() - min(d.created_at)
                        FILTER (WHERE d.status IN ('pending', 'in_flight', 'failing')))::float8
               FROM outbox.subscriptions s
               LEFT JOIN outbox.deliveries d
                 ON d.subscription_id = s.id AND d.status IN ('pending', 'in_flight', 'failing', 'dead')
              GROUP BY s.id
              ORDER BY s.name",
            &[],
        )
        .await
        .map_err(|e| classify(e, "counting deliveries per subscription", ""))?;
    let subscriptions = rows
        .iter()
        .map(|row| SubscriptionStatus {
            id: row.get(0),
            name: row.get(1),
            enabled: row.get(2),
            disabled_reason: row.get(3),
            pending: row.get(4),
            in_flight: row.get(5),
            failing: row.get(6),
            dead: row.get(7),
            oldest_pending_age_seconds: row.get(8),
        })
        .collect();

    let rows = client
        .query(
            "SELECT id, requested_at, requested_by, reason, criteria, matched, dry_run
               FROM outbox.replays ORDER BY id DESC LIMIT $1",
            &[&RECENT_REPLAYS],
        )
        .await
        .map_err(|e| classify(e, "reading recent replays", ""))?;
    let recent_replays = rows
        .iter()
        .map(|row| ReplaySummary {
            id: row.get(0),
            requested_at: row.get(1),
            requested_by: row.get(2),
            reason: row.get(3),
            criteria: row.get(4),
            matched: row.get(5),
            dry_run: row.get(6),
        })
        .collect();

    Ok(StatusReport {
        backlog,
        subscriptions,
        recent_replays,
    })
}

/// Default page size of [`search_events`] and [`list_replays`].
pub const PAGE_SIZE_DEFAULT: i64 = 50;
/// Largest page [`search_events`] and [`list_replays`] return: a page is read and
/// serialised in one go, so this bounds one request's memory and time.
pub const PAGE_SIZE_MAX: i64 = 500;
/// Deliveries [`get_event`] returns for one event (one per subscription, so this is
/// reached only with more than this many matching subscriptions).
pub const EVENT_DELIVERIES_MAX: i64 = 1000;
/// Attempts [`get_event`] returns per delivery, the latest first. One replay adds at most
/// 1 + the retry schedule (≤ 51) attempts, so this holds about two full histories.
pub const DELIVERY_ATTEMPTS_MAX: i64 = 100;

/// What [`search_events`] looks for. Every criterion given must hold.
#[derive(Clone, Debug)]
pub struct EventSearch {
    /// Exact event types or globs (`lead.*`); an event matching any of them is returned.
    /// Empty = every type.
    pub event_types: Vec<String>,
    pub tenant_id: Option<String>,
    /// `created_at >= since`.
    pub since: Option<DateTime<Utc>>,
    /// `created_at < until`.
    pub until: Option<DateTime<Utc>>,
    /// Only events with at least one delivery in this status.
    pub delivery_status: Option<String>,
    /// Keyset pagination: only events with `id` below this (the previous page's cursor).
    pub before_id: Option<i64>,
    /// 1 to [`PAGE_SIZE_MAX`].
    pub limit: i64,
    /// Whether each event carries its payload (up to 1 MiB each: callers keep `limit` small).
    pub include_payload: bool,
}

impl Default for EventSearch {
    fn default() -> Self {
        Self {
            event_types: Vec::new(),
            tenant_id: None,
            since: None,
            until: None,
            delivery_status: None,
            before_id: None,
            limit: PAGE_SIZE_DEFAULT,
            include_payload: false,
        }
    }
}

/// An event without (unless asked for) its payload, plus how its deliveries stand.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EventSummary {
    /// `events.id`: the internal order, and the pagination key.
    pub id: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub tenant_id: Option<String>,
    pub source_service: Option<String>,
    pub ordering_key: Option<String>,
    pub target_services: Option<Vec<String>>,
    #[schema(value_type = Object)]
    pub metadata: Jsonb,
    pub priority: i32,
    #[serde(serialize_with = "rfc3339")]
    pub deliver_after: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    /// When the relay fanned the event out into deliveries; `None` = not yet.
    #[serde(serialize_with = "rfc3339_option")]
    pub dispatched_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Value, nullable = false)]
    pub payload: Option<Jsonb>,
    /// Number of deliveries per status (statuses without deliveries are left out).
    pub deliveries: BTreeMap<String, i64>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EventPage {
    /// Newest first (descending `id`).
    pub events: Vec<EventSummary>,
    /// Pass as the next request's cursor; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// One event with its payload, its deliveries and their recorded attempts.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EventDetail {
    #[serde(flatten)]
    pub event: EventSummary,
    pub delivery_list: Vec<DeliveryDetail>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct DeliveryDetail {
    pub id: i64,
    /// `None` once the subscription was removed.
    pub subscription_id: Option<i64>,
    pub subscription: Option<String>,
    pub status: String,
    /// Attempts since creation or the last replay.
    pub attempts: i32,
    #[serde(serialize_with = "rfc3339")]
    pub next_attempt_at: DateTime<Utc>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339_option")]
    pub delivered_at: Option<DateTime<Utc>>,
    /// The replay that last re-queued it.
    pub replay_id: Option<i64>,
    /// Recorded attempts, latest first, at most [`DELIVERY_ATTEMPTS_MAX`]. A first-attempt
    /// success is recorded on the delivery alone, so this can be empty.
    pub attempt_history: Vec<AttemptRecord>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct AttemptRecord {
    pub id: i64,
    pub attempt: i32,
    #[serde(serialize_with = "rfc3339")]
    pub started_at: DateTime<Utc>,
    pub duration_ms: i32,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    /// The first 4 KiB of the subscriber's answer.
    pub response_body: Option<String>,
    pub replay_id: Option<i64>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ReplayPage {
    /// Newest first.
    pub replays: Vec<ReplaySummary>,
    pub next_cursor: Option<String>,
}

/// An event to insert into `outbox.events` (what `outbox.publish` takes).
#[derive(Clone, Debug)]
pub struct NewEvent {
    /// Generated by the database when `None`.
    pub event_id: Option<Uuid>,
    pub event_type: String,
    pub payload: serde_json::Value,
    pub tenant_id: Option<String>,
    pub source_service: Option<String>,
    pub ordering_key: Option<String>,
    /// `None` = every matching subscription.
    pub target_services: Option<Vec<String>>,
    pub metadata: serde_json::Value,
    pub priority: i32,
}

/// What [`publish_event`] did. A taken `event_id` is the producer's idempotency (SPEC), not
/// an error of ours, so it is an outcome the caller answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    Inserted(Uuid),
    /// An event with this `event_id` already exists; nothing was inserted.
    AlreadyExists(Uuid),
}

/// Events matching `search`, newest first, one page at a time (keyset on `events.id`, so
/// pages neither repeat nor skip rows while producers insert).
pub async fn search_events(client: &Client, search: &EventSearch) -> Result<EventPage, AdminError> {
    check_limit(search.limit)?;
    for pattern in &search.event_types {
        check_event_type_pattern("event_type", pattern)?;
    }
    if let Some(status) = &search.delivery_status {
        check_status("status", status)?;
    }
    if let (Some(since), Some(until)) = (search.since, search.until)
        && since >= until
    {
        return Err(AdminError::Invalid {
            field: "until",
            problem: format!("until ({until}) must be later than since ({since})"),
        });
    }

    let mut conditions = Conditions::default();
    if !search.event_types.is_empty() {
        // Exact names use the (event_type, created_at) index; globs need the matcher.
        if search.event_types.iter().any(|p| p.contains('*')) {
            conditions.add(
                "outbox.event_type_matches({}::text[], e.event_type)",
                search.event_types.clone(),
            );
        } else {
            conditions.add(
                "e.event_type = ANY ({}::text[])",
                search.event_types.clone(),
            );
        }
    }
    if let Some(tenant_id) = &search.tenant_id {
        conditions.add("e.tenant_id = {}", tenant_id.clone());
    }
    if let Some(since) = search.since {
        conditions.add("e.created_at >= {}", since);
    }
    if let Some(until) = search.until {
        conditions.add("e.created_at < {}", until);
    }
    if let Some(status) = &search.delivery_status {
        conditions.add(
            "EXISTS (SELECT 1 FROM outbox.deliveries d WHERE d.event_id = e.id AND d.status = {})",
            status.clone(),
        );
    }
    if let Some(before_id) = search.before_id {
        conditions.add("e.id < {}", before_id);
    }
    // One row more than the page tells whether another page follows.
    let limit_placeholder = conditions.bind(search.limit + 1);
    let payload_placeholder = conditions.bind(search.include_payload);
    let sql = format!(
        "SELECT {EVENT_COLUMNS}, CASE WHEN {payload_placeholder}::boolean THEN e.payload END
           FROM outbox.events e
          {}
          ORDER BY e.id DESC
          LIMIT {limit_placeholder}",
        conditions.where_clause()
    );
    let rows = client
        .query(&sql, &conditions.params())
        .await
        .map_err(|e| classify(e, "searching events", ""))?;
    let mut events: Vec<EventSummary> = rows.iter().map(event_from_row).collect();
    let next_cursor = page_cursor(&mut events, search.limit, |e| e.id);
    Ok(EventPage {
        events,
        next_cursor,
    })
}

/// One event by its `event_id`, with its payload, deliveries and their attempts; `None` when
/// there is no such event.
pub async fn get_event(client: &Client, event_id: Uuid) -> Result<Option<EventDetail>, AdminError> {
    let sql =
        format!("SELECT {EVENT_COLUMNS}, e.payload FROM outbox.events e WHERE e.event_id = $1");
    let Some(row) = client
        .query_opt(&sql, &[&event_id])
        .await
        .map_err(|e| classify(e, "reading the event", ""))?
    else {
        return Ok(None);
    };
    let event = event_from_row(&row);
    let rows = client
        .query(
            "SELECT d.id, d.subscription_id, s.name, d.status, d.attempts, d.next_attempt_at,
                    d.last_status_code, d.last_error, d.created_at, d.delivered_at, d.replay_id
               FROM outbox.deliveries d
               LEFT JOIN outbox.subscriptions s ON s.id = d.subscription_id
              WHERE d.event_id = $1
              ORDER BY d.id
              LIMIT $2",
            &[&event.id, &EVENT_DELIVERIES_MAX],
        )
        .await
        .map_err(|e| classify(e, "reading the event's deliveries", ""))?;
    let mut deliveries: Vec<DeliveryDetail> = rows
        .iter()
        .map(|row| DeliveryDetail {
            id: row.get(0),
            subscription_id: row.get(1),
            subscription: row.get(2),
            status: row.get(3),
            attempts: row.get(4),
            next_attempt_at: row.get(5),
            last_status_code: row.get(6),
            last_error: row.get(7),
            created_at: row.get(8),
            delivered_at: row.get(9),
            replay_id: row.get(10),
            attempt_history: Vec::new(),
        })
        .collect();
    let delivery_ids: Vec<i64> = deliveries.iter().map(|d| d.id).collect();
    let position: HashMap<i64, usize> = delivery_ids
        .iter()
        .enumerate()
        .map(|(index, id)| (*id, index))
        .collect();
    let rows = client
        .query(
            "SELECT id, delivery_id, attempt, started_at, duration_ms, status_code, error,
                    response_body, replay_id
               FROM (SELECT a.*, row_number() OVER (PARTITION BY a.delivery_id
                                                     ORDER BY a.started_at DESC, a.id DESC) AS n
                       FROM outbox.delivery_attempts a
                      WHERE a.delivery_id = ANY ($1)) latest
              WHERE n <= $2
              ORDER BY delivery_id, started_at DESC, id DESC",
            &[&delivery_ids, &DELIVERY_ATTEMPTS_MAX],
        )
        .await
        .map_err(|e| classify(e, "reading delivery attempts", ""))?;
    for row in &rows {
        let delivery_id: i64 = row.get(1);
        if let Some(delivery) = position.get(&delivery_id).map(|&i| &mut deliveries[i]) {
            delivery.attempt_history.push(AttemptRecord {
                id: row.get(0),
                attempt: row.get(2),
                started_at: row.get(3),
                duration_ms: row.get(4),
                status_code: row.get(5),
                error: row.get(6),
                response_body: row.get(7),
                replay_id: row.get(8),
            });
        }
    }
    Ok(Some(EventDetail {
        event,
        delivery_list: deliveries,
    }))
}

/// Whether an event with this `event_id` exists (one index lookup, nothing else read).
pub async fn event_exists(client: &Client, event_id: Uuid) -> Result<bool, AdminError> {
    client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM outbox.events WHERE event_id = $1)",
            &[&event_id],
        )
        .await
        .map(|row| row.get(0))
        .map_err(|e| classify(e, "looking up the event", ""))
}

/// Replays (and backfills), newest first, a page at a time (keyset on `replays.id`).
pub async fn list_replays(
    client: &Client,
    before_id: Option<i64>,
    limit: i64,
) -> Result<ReplayPage, AdminError> {
    check_limit(limit)?;
    let rows = client
        .query(
            &format!(
                "SELECT {REPLAY_COLUMNS} FROM outbox.replays
                  WHERE $1::bigint IS NULL OR id < $1
                  ORDER BY id DESC LIMIT $2"
            ),
            &[&before_id, &(limit + 1)],
        )
        .await
        .map_err(|e| classify(e, "listing replays", ""))?;
    let mut replays: Vec<ReplaySummary> = rows.iter().map(replay_from_row).collect();
    let next_cursor = page_cursor(&mut replays, limit, |r| r.id);
    Ok(ReplayPage {
        replays,
        next_cursor,
    })
}

/// One replay by id; `None` when there is none.
pub async fn get_replay(client: &Client, id: i64) -> Result<Option<ReplaySummary>, AdminError> {
    let row = client
        .query_opt(
            &format!("SELECT {REPLAY_COLUMNS} FROM outbox.replays WHERE id = $1"),
            &[&id],
        )
        .await
        .map_err(|e| classify(e, "reading the replay", ""))?;
    Ok(row.as_ref().map(replay_from_row))
}

/// Inserts one event, as a producer's `INSERT` would (the table's CHECK constraints judge
/// it; a violation names the field). Delivered by running relays like any other event.
pub async fn publish_event(client: &Client, event: &NewEvent) -> Result<Published, AdminError> {
    let row = client
        .query_one(
            "INSERT INTO outbox.events (event_id, event_type, payload, tenant_id, source_service,
                                        ordering_key, target_services, metadata, priority)
             VALUES (coalesce($1, gen_random_uuid()), $2, $3, $4, $5, $6, $7, $8, $9)
             RETURNING event_id",
            &[
                &event.event_id,
                &event.event_type,
                &event.payload,
                &event.tenant_id,
                &event.source_service,
                &event.ordering_key,
                &event.target_services,
                &event.metadata,
                &event.priority,
            ],
        )
        .await;
    match row {
        Ok(row) => Ok(Published::Inserted(row.get(0))),
        Err(error)
            if error.as_db_error().is_some_and(|db| {
                *db.code() == SqlState::UNIQUE_VIOLATION
                    && db.constraint() == Some("events_event_id_key")
            }) =>
        {
            // Only a given event_id can collide: a generated one is a fresh v4 uuid.
            Ok(Published::AlreadyExists(event.event_id.unwrap_or_default()))
        }
        Err(error) => Err(classify(error, "publishing the event", "")),
    }
}

/// The columns [`event_from_row`] reads (all but the payload, which callers add last).
const EVENT_COLUMNS: &str = "
    e.id, e.event_id, e.event_type, e.tenant_id, e.source_service, e.ordering_key,
    e.target_services, e.metadata, e.priority, e.deliver_after, e.created_at, e.dispatched_at,
    (SELECT coalesce(jsonb_object_agg(c.status, c.n), '{}'::jsonb)
       FROM (SELECT d.status, count(*) AS n FROM outbox.deliveries d
              WHERE d.event_id = e.id GROUP BY d.status) c)";

fn event_from_row(row: &tokio_postgres::Row) -> EventSummary {
    let deliveries = match row.get::<_, serde_json::Value>(12) {
        serde_json::Value::Object(map) => map
            .into_iter()
            .filter_map(|(status, n)| n.as_i64().map(|n| (status, n)))
            .collect(),
        _ => BTreeMap::new(),
    };
    EventSummary {
        id: row.get(0),
        event_id: row.get(1),
        event_type: row.get(2),
        tenant_id: row.get(3),
        source_service: row.get(4),
        ordering_key: row.get(5),
        target_services: row.get(6),
        metadata: row.get::<_, Json<Jsonb>>(7).0,
        priority: row.get(8),
        deliver_after: row.get(9),
        created_at: row.get(10),
        dispatched_at: row.get(11),
        payload: row.get::<_, Option<Json<Jsonb>>>(13).map(|json| json.0),
        deliveries,
    }
}

const REPLAY_COLUMNS: &str = "id, requested_at, requested_by, reason, criteria, matched, dry_run";

fn replay_from_row(row: &tokio_postgres::Row) -> ReplaySummary {
    ReplaySummary {
        id: row.get(0),
        requested_at: row.get(1),
        requested_by: row.get(2),
        reason: row.get(3),
        criteria: row.get(4),
        matched: row.get(5),
        dry_run: row.get(6),
    }
}

/// Cuts the one extra row a page query reads and returns the cursor of the next page.
fn page_cursor<T>(rows: &mut Vec<T>, limit: i64, id: impl Fn(&T) -> i64) -> Option<String> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|row| id(row).to_string())
    } else {
        None
    }
}

fn check_limit(limit: i64) -> Result<(), AdminError> {
    if (1..=PAGE_SIZE_MAX).contains(&limit) {
        Ok(())
    } else {
        Err(AdminError::Invalid {
            field: "limit",
            problem: format!("{limit} is out of range; give 1 to {PAGE_SIZE_MAX}"),
        })
    }
}

/// The rule of `outbox.are_valid_event_type_patterns`, checked here so the error names the
/// field instead of surfacing from inside a query.
pub fn check_event_type_pattern(field: &'static str, pattern: &str) -> Result<(), AdminError> {
    let valid = (1..=255).contains(&pattern.len())
        && pattern
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-*".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(AdminError::Invalid {
            field,
            problem: format!(
                "{pattern:?} is neither an event type nor a glob; use 1 to 255 of letters, digits, . _ : - and * as a wildcard, e.g. lead.created or lead.*"
            ),
        })
    }
}

fn check_status(field: &'static str, status: &str) -> Result<(), AdminError> {
    if DELIVERY_STATUSES.contains(&status) {
        Ok(())
    } else {
        Err(AdminError::Invalid {
            field,
            problem: format!(
                "{status:?} is not a delivery status; use {}",
                DELIVERY_STATUSES.join(", ")
            ),
        })
    }
}

/// A WHERE clause built from fragments with `{}` where the parameter goes. The fragments
/// are literals from this file; only the values come from input, always as parameters.
#[derive(Default)]
struct Conditions {
    clauses: Vec<String>,
    params: Vec<Param>,
}

impl Conditions {
    fn bind(&mut self, value: impl ToSql + Sync + Send + 'static) -> String {
        self.params.push(Box::new(value));
        format!("${}", self.params.len())
    }

    fn add(&mut self, fragment: &str, value: impl ToSql + Sync + Send + 'static) {
        let placeholder = self.bind(value);
        self.clauses.push(fragment.replacen("{}", &placeholder, 1));
    }

    fn where_clause(&self) -> String {
        if self.clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", self.clauses.join(" AND "))
        }
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        as_params(&self.params)
    }
}

/// The columns [`subscription_from_row`] reads, usable after SELECT and RETURNING alike.
const SUBSCRIPTION_COLUMNS: &str = "
    id, name, url, event_types, tenant_id, filter, enabled, disabled_reason, ordered,
    ARRAY(SELECT extract(epoch FROM w)::float8
            FROM unnest(retry_schedule) WITH ORDINALITY AS t(w, i) ORDER BY i),
    extract(epoch FROM timeout)::float8, max_in_flight, rate_limit_per_second::float8, headers,
    created_at, updated_at,
    CASE WHEN previous_secret_expires_at > now() THEN previous_secret_expires_at END";

fn subscription_from_row(row: &tokio_postgres::Row) -> SubscriptionInfo {
    let schedule: Vec<f64> = row.get(9);
    let headers = match row.get::<_, serde_json::Value>(13) {
        serde_json::Value::Object(map) => map
            .into_iter()
            .filter_map(|(k, v)| v.as_str().map(|v| (k, v.to_owned())))
            .collect(),
        _ => BTreeMap::new(),
    };
    SubscriptionInfo {
        id: row.get(0),
        name: row.get(1),
        url: mask_url(row.get(2)),
        event_types: row.get(3),
        tenant_id: row.get(4),
        filter: row.get::<_, Option<Json<Jsonb>>>(5).map(|json| json.0),
        enabled: row.get(6),
        disabled_reason: row.get(7),
        ordered: row.get(8),
        retry_schedule: schedule.into_iter().map(duration_from_seconds).collect(),
        timeout: duration_from_seconds(row.get(10)),
        max_in_flight: row.get(11),
        rate_limit_per_second: row.get(12),
        headers,
        created_at: row.get(14),
        updated_at: row.get(15),
        previous_secret_expires_at: row.get(16),
    }
}

fn duration_from_seconds(seconds: f64) -> Duration {
    Duration::try_from_secs_f64(seconds).unwrap_or(Duration::ZERO)
}

type Param = Box<dyn ToSql + Sync + Send>;

fn as_params(params: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

/// Column assignments for a dynamic INSERT or UPDATE: only the settings given are written,
/// so the rest keep their column defaults (or current values). Column names are literals
/// from this file, never input.
#[derive(Default)]
struct Columns {
    names: Vec<&'static str>,
    values: Vec<String>,
    params: Vec<Param>,
}

impl Columns {
    fn set(&mut self, column: &'static str, value: impl ToSql + Sync + Send + 'static) {
        self.set_expr(column, "{}", value);
    }

    /// `expression` with `{}` where the parameter goes.
    fn set_expr(
        &mut self,
        column: &'static str,
        expression: &str,
        value: impl ToSql + Sync + Send + 'static,
    ) {
        self.params.push(Box::new(value));
        let placeholder = format!("${}", self.params.len());
        self.names.push(column);
        self.values.push(expression.replacen("{}", &placeholder, 1));
    }

    fn settings(&mut self, settings: &SubscriptionSettings) {
        if let Some(event_types) = &settings.event_types {
            self.set("event_types", event_types.clone());
        }
        if let Some(tenant_id) = &settings.tenant_id {
            self.set("tenant_id", tenant_id.clone());
        }
        if let Some(filter) = &settings.filter {
            self.set("filter", filter.clone());
        }
        if let Some(headers) = &settings.headers {
            let object: serde_json::Map<String, serde_json::Value> = headers
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            self.set("headers", serde_json::Value::Object(object));
        }
        if let Some(timeout) = settings.timeout {
            self.set_expr(
                "timeout",
                "make_interval(secs => {}::float8)",
                timeout.as_secs_f64(),
            );
        }
        if let Some(max_in_flight) = settings.max_in_flight {
            self.set("max_in_flight", max_in_flight);
        }
        if let Some(rate_limit) = settings.rate_limit_per_second {
            self.set("rate_limit_per_second", rate_limit);
        }
        if let Some(schedule) = &settings.retry_schedule {
            let seconds: Vec<f64> = schedule.iter().map(Duration::as_secs_f64).collect();
            self.set_expr(
                "retry_schedule",
                "ARRAY(SELECT make_interval(secs => w)
                         FROM unnest({}::float8[]) WITH ORDINALITY AS t(w, i) ORDER BY i)",
                seconds,
            );
        }
        if let Some(ordered) = settings.ordered {
            self.set("ordered", ordered);
        }
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        as_params(&self.params)
    }
}

/// Named arguments (`name => $n::type`) for a function call.
#[derive(Default)]
struct Arguments {
    named: Vec<String>,
    params: Vec<Param>,
}

impl Arguments {
    fn add(&mut self, name: &str, sql_type: &str, value: impl ToSql + Sync + Send + 'static) {
        self.params.push(Box::new(value));
        self.named
            .push(format!("{name} => ${}::{sql_type}", self.params.len()));
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        as_params(&self.params)
    }
}

fn not_found(name: &str) -> AdminError {
    AdminError::NotFound {
        name: name.to_owned(),
    }
}

/// Refuses what the `url_scheme` constraint would, with an error that says why.
fn check_url(url: &str) -> Result<(), AdminError> {
    let invalid = |problem: String| AdminError::Invalid {
        field: "url",
        problem,
    };
    // These messages reach the terminal, API responses and logs: the URL only masked.
    let shown = mask_url(url);
    let parsed = reqwest::Url::parse(url).map_err(|error| {
        invalid(format!(
            "{shown:?} is not a URL ({error}); give an absolute URL such as https://service.internal/hooks/outbox"
        ))
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "{shown:?} uses scheme {:?}; only http:// and https:// are delivered to",
            parsed.scheme()
        )));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid(format!("{shown:?} has no host")));
    }
    // Subscriptions are shown with their password masked; sending such a URL back (a read,
    // edit, write round trip) would silently replace the real password with the mask.
    if parsed.password() == Some(MASK) {
        return Err(invalid(format!(
            "{shown:?} carries the masked password {MASK:?} as shown by list/show and the API; \
             give the real password, or leave the URL out to keep the current one"
        )));
    }
    Ok(())
}

fn check_secret(secret: &SecretText) -> Result<(), AdminError> {
    SigningSecret::parse(secret.expose())
        .map(drop)
        .map_err(|error| AdminError::Invalid {
            field: "secret",
            problem: format!(
                "{error}; give whsec_ followed by the base64 of at least 16 random bytes, or leave it out to have one generated"
            ),
        })
}

/// Where in a JSON value a string (or an object key) holds U+0000, as a path in the
/// request's own words (`name`, `headers.X-Team`, `event_types[1]`; `""` for the value
/// itself); `None` when nowhere.
///
/// PostgreSQL refuses NUL in `text` (`invalid byte sequence for encoding "UTF8": 0x00`)
/// and in `jsonb` strings (`unsupported Unicode escape sequence`), and its error does not
/// say which parameter held it. Callers refuse such input with this path before any
/// query runs, so the error names the field instead of being a failed query.
pub fn nul_path(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(text) => text.contains('\0').then(String::new),
        serde_json::Value::Array(items) => items.iter().enumerate().find_map(|(index, item)| {
            nul_path(item).map(|inner| join_path(&format!("[{index}]"), &inner))
        }),
        serde_json::Value::Object(map) => map.iter().find_map(|(key, item)| {
            if key.contains('\0') {
                // The key itself cannot be shown as a field name; its object is to blame.
                return Some(String::new());
            }
            nul_path(item).map(|inner| join_path(key, &inner))
        }),
        _ => None,
    }
}

/// `head` followed by the path `tail` below it.
fn join_path(head: &str, tail: &str) -> String {
    if tail.is_empty() {
        head.to_owned()
    } else if tail.starts_with('[') {
        format!("{head}{tail}")
    } else {
        format!("{head}.{tail}")
    }
}

/// What to tell a client whose text held U+0000.
pub const NUL_PROBLEM: &str =
    "contains a NUL character (\\u0000), which PostgreSQL cannot store in text or JSON; remove it";

/// Turns the database errors callers act on into their own variants. Data exceptions
/// (SQLSTATE class 22) and integrity violations (class 23) are caused by the values sent,
/// so they are [`AdminError::Invalid`] naming the constraint's or column's field, never a
/// failed query.
fn classify(error: tokio_postgres::Error, context: &'static str, name: &str) -> AdminError {
    if let Some(db) = error.as_db_error() {
        let code = db.code();
        if *code == SqlState::UNIQUE_VIOLATION && db.constraint() == Some("subscriptions_name_key")
        {
            return AdminError::Duplicate {
                name: name.to_owned(),
            };
        }
        if *code == SqlState::UNDEFINED_TABLE
            || *code == SqlState::UNDEFINED_COLUMN
            || *code == SqlState::UNDEFINED_FUNCTION
            || *code == SqlState::INVALID_SCHEMA_NAME
        {
            return AdminError::SchemaOutdated {
                context,
                detail: db.message().to_owned(),
            };
        }
        // What a function such as outbox.replay raises about its arguments.
        if *code == SqlState::RAISE_EXCEPTION
            || *code == SqlState::INVALID_PARAMETER_VALUE
            || *code == SqlState::INVALID_TEXT_REPRESENTATION
        {
            let mut problem = db.message().to_owned();
            if let Some(hint) = db.hint() {
                problem.push_str(". ");
                problem.push_str(hint);
            }
            return AdminError::Invalid {
                field: "arguments",
                problem,
            };
        }
        let class = code.code().get(..2);
        if class == Some("22") || class == Some("23") {
            let (field, rule) = db
                .constraint()
                .map(constraint_rule)
                .filter(|(field, _)| *field != "value")
                .unwrap_or_else(|| (db.column().map_or("value", column_field), None));
            let nul = *code == SqlState::CHARACTER_NOT_IN_REPERTOIRE
                || *code == SqlState::UNTRANSLATABLE_CHARACTER;
            let mut problem = match (rule, nul) {
                (Some(rule), _) => rule.to_owned(),
                (None, true) => format!("a value {NUL_PROBLEM}"),
                (None, false) => db.message().to_owned(),
            };
            match db.constraint() {
                Some(constraint) => problem.push_str(&format!(" (constraint {constraint})")),
                None => problem.push_str(&format!(" (SQLSTATE {})", code.code())),
            }
            if let Some(hint) = db.hint() {
                problem.push_str(". ");
                problem.push_str(hint);
            }
            return AdminError::Invalid { field, problem };
        }
    }
    AdminError::Db(DbError::Query {
        context,
        source: error,
    })
}

/// A column a data exception or NOT NULL violation names, as a field of this module
/// (`value` for one it does not know).
fn column_field(column: &str) -> &'static str {
    const FIELDS: [&str; 17] = [
        "name",
        "url",
        "secret",
        "event_types",
        "tenant_id",
        "filter",
        "headers",
        "timeout",
        "max_in_flight",
        "rate_limit_per_second",
        "retry_schedule",
        "event_type",
        "payload",
        "metadata",
        "ordering_key",
        "source_service",
        "target_services",
    ];
    FIELDS
        .iter()
        .find(|field| **field == column)
        .copied()
        .unwrap_or("value")
}

/// The field a subscriptions CHECK constraint guards, and its rule in words.
fn constraint_rule(constraint: &str) -> (&'static str, Option<&'static str>) {
    match constraint {
        "name_format" => (
            "name",
            Some("1 to 255 characters: letters, digits and . _ : -"),
        ),
        "url_scheme" => (
            "url",
            Some(
                "must be an http:// or https:// URL with a host, without spaces, at most 2048 characters",
            ),
        ),
        "event_types_format" => (
            "event_types",
            Some(
                "at least one pattern; each 1 to 255 characters: letters, digits, . _ : - and * as a wildcard",
            ),
        ),
        "filter_is_object" => (
            "filter",
            Some(r#"must be a JSON object, e.g. {"plan": "pro"}"#),
        ),
        "secret_format" | "previous_secret_format" => (
            "secret",
            Some("must be whsec_ followed by the base64 of at least 16 bytes"),
        ),
        "retry_schedule_sane" => (
            "retry_schedule",
            Some("at most 50 waits, each between 0s and 7 days"),
        ),
        "timeout_sane" => ("timeout", Some("must be between 100ms and 5m")),
        "max_in_flight_sane" => ("max_in_flight", Some("must be between 1 and 10000")),
        "rate_limit_sane" => (
            "rate_limit_per_second",
            Some("must be greater than 0 and at most 100000"),
        ),
        "headers_valid" => (
            "headers",
            Some(
                "names of at most 128 token characters with string values; content-type, content-length, host, user-agent, transfer-encoding, connection and the webhook-* headers are set by the relay and cannot be overridden",
            ),
        ),
        // outbox.events constraints (publish_event).
        "event_type_format" => (
            "event_type",
            Some("1 to 255 characters: letters, digits and . _ : -"),
        ),
        "payload_size" => (
            "payload",
            Some("larger than outbox.max_payload_bytes() (default 1 MiB of JSON text)"),
        ),
        "metadata_is_object" => ("metadata", Some("must be a JSON object")),
        "target_services_not_empty" => (
            "target_services",
            Some("must name at least one subscription, or be left out for all"),
        ),
        "ordering_key_length" => ("ordering_key", Some("must be 1 to 255 characters")),
        _ => ("value", None),
    }
}

fn seconds<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(value.as_secs_f64())
}

fn seconds_list<S: Serializer>(values: &[Duration], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(values.iter().map(Duration::as_secs_f64))
}

fn rfc3339<S: Serializer>(value: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&value.to_rfc3339_opts(SecondsFormat::Micros, true))
}

fn rfc3339_option<S: Serializer>(
    value: &Option<DateTime<Utc>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(value) => rfc3339(value, serializer),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_before_the_database_sees_them() {
        for bad in [
            "not a url",
            "agents.internal/hooks",
            "ftp://agents.internal/x",
            "mailto:ops@example.com",
        ] {
            match check_url(bad) {
                Err(AdminError::Invalid { field: "url", .. }) => {}
                other => panic!("{bad:?} was not refused as a url: {other:?}"),
            }
        }
        for good in [
            "http://127.0.0.1:8080/hook",
            "https://agents.internal/x?y=1",
        ] {
            assert!(check_url(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn url_errors_show_the_url_masked_and_a_masked_url_is_refused() {
        match check_url("ftp://hook:pw-in-url@agents.internal/x") {
            Err(error @ AdminError::Invalid { field: "url", .. }) => {
                let message = error.to_string();
                assert!(!message.contains("pw-in-url"), "{message}");
                assert!(message.contains("hook:***@"), "{message}");
            }
            other => panic!("not refused as a url: {other:?}"),
        }
        assert!(check_url("https://hook:***@agents.internal/x").is_err());
        assert!(check_url("https://hook:pw@agents.internal/x").is_ok());
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let created = CreatedSubscription {
            id: 1,
            name: "crm".to_owned(),
            secret: SecretText::new(generate_secret()),
        };
        let debug = format!("{created:?}");
        assert!(!debug.contains(created.secret.expose()), "{debug}");
        assert!(debug.contains("redacted"));
    }

    #[test]
    fn nul_is_found_wherever_it_is_nested() {
        use serde_json::json;
        for (value, path) in [
            (json!("a\u{0}b"), Some("")),
            (json!({ "name": "crm\u{0}" }), Some("name")),
            (
                json!({ "headers": { "X-Team": "a\u{0}" } }),
                Some("headers.X-Team"),
            ),
            (
                json!({ "event_types": ["lead.*", "\u{0}"] }),
                Some("event_types[1]"),
            ),
            (
                json!({ "data": { "a": [{ "b": "\u{0}" }] } }),
                Some("data.a[0].b"),
            ),
            (json!({ "headers": { "X-\u{0}": "a" } }), Some("headers")),
            (json!({ "name": "crm", "n": 1, "list": [null, true] }), None),
            (json!("\\u0000 spelled out"), None),
        ] {
            assert_eq!(nul_path(&value).as_deref(), path, "{value}");
        }
    }

    #[test]
    fn every_subscription_constraint_names_its_field() {
        for (constraint, field) in [
            ("url_scheme", "url"),
            ("timeout_sane", "timeout"),
            ("rate_limit_sane", "rate_limit_per_second"),
            ("previous_secret_format", "secret"),
        ] {
            let (named, rule) = constraint_rule(constraint);
            assert_eq!(named, field);
            assert!(rule.is_some());
        }
    }
}
