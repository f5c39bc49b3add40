//! Subscriptions: create (with the secret shown once), list, read, change, disable and
//! enable, remove, rotate the secret, and the compatibility endpoints' subscribe.

use super::*;

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
        .query_typed_one(&sql, &columns.params())
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
        .query_typed_one(
            &sql,
            &[
                (&name, Type::TEXT),
                (&url.expose_secret(), Type::TEXT),
                (&event_type, Type::TEXT),
                (&filter.is_some(), Type::BOOL),
                (&filter.flatten(), Type::JSONB),
                (&secret.expose(), Type::TEXT),
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
        .query_typed(&sql, &[])
        .await
        .map_err(|e| classify(e, "listing subscriptions", ""))?;
    Ok(rows.iter().map(subscription_from_row).collect())
}

pub async fn get_subscription(client: &Client, name: &str) -> Result<SubscriptionInfo, AdminError> {
    let sql = format!("SELECT {SUBSCRIPTION_COLUMNS} FROM outbox.subscriptions WHERE name = $1");
    let row = client
        .query_typed_opt(&sql, &[(&name, Type::TEXT)])
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
    columns.params.push((Box::new(name.to_owned()), Type::TEXT));
    let sql = format!(
        "UPDATE outbox.subscriptions SET {} WHERE name = ${} RETURNING {SUBSCRIPTION_COLUMNS}",
        assignments.join(", "),
        columns.params.len()
    );
    let row = client
        .query_typed_opt(&sql, &columns.params())
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
        .query_typed_opt(&sql, &[(&name, Type::TEXT), (&reason, Type::TEXT)])
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
        .query_typed_opt(&sql, &[(&name, Type::TEXT)])
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
        .query_typed_opt(
            "SELECT (SELECT count(*) FROM outbox.deliveries d
                      WHERE d.subscription_id = s.id AND d.status IN ('pending', 'in_flight', 'failing'))
               FROM outbox.subscriptions s WHERE s.name = $1",
            &[(&name, Type::TEXT)],
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
        .query_typed_opt(
            "WITH open AS (
                 SELECT count(*) AS n FROM outbox.deliveries d
                   JOIN outbox.subscriptions s ON s.id = d.subscription_id
                  WHERE s.name = $1 AND d.status IN ('pending', 'in_flight', 'failing')
             )
             DELETE FROM outbox.subscriptions WHERE name = $1
             RETURNING id, (SELECT n FROM open)",
            &[(&name, Type::TEXT)],
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
        .query_typed_opt(
            "UPDATE outbox.subscriptions
                SET previous_secret = CASE WHEN $3::float8 > 0 THEN secret END,
                    previous_secret_expires_at = CASE WHEN $3::float8 > 0
                                                      THEN now() + make_interval(secs => $3::float8) END,
                    secret = $2
              WHERE name = $1
          RETURNING id, previous_secret_expires_at",
            &[
                (&name, Type::TEXT),
                (&secret.expose(), Type::TEXT),
                (&overlap_seconds, Type::FLOAT8),
            ],
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

/// The columns [`subscription_from_row`] reads, usable after SELECT and RETURNING alike.
pub(super) const SUBSCRIPTION_COLUMNS: &str = "
    id, name, url, event_types, tenant_id, filter, enabled, disabled_reason, ordered,
    ARRAY(SELECT extract(epoch FROM w)::float8
            FROM unnest(retry_schedule) WITH ORDINALITY AS t(w, i) ORDER BY i),
    extract(epoch FROM timeout)::float8, max_in_flight, rate_limit_per_second::float8, headers,
    created_at, updated_at,
    CASE WHEN previous_secret_expires_at > now() THEN previous_secret_expires_at END";

pub(super) fn subscription_from_row(row: &tokio_postgres::Row) -> SubscriptionInfo {
    let schedule: Vec<f64> = row.get(9);
    let headers = convert::string_pairs(row.get::<_, serde_json::Value>(13));
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
        retry_schedule: schedule.into_iter().map(convert::seconds).collect(),
        timeout: convert::seconds(row.get(10)),
        max_in_flight: row.get(11),
        rate_limit_per_second: row.get(12),
        headers,
        created_at: row.get(14),
        updated_at: row.get(15),
        previous_secret_expires_at: row.get(16),
    }
}

/// Column assignments for a dynamic INSERT or UPDATE: only the settings given are written,
/// so the rest keep their column defaults (or current values). Column names are literals
/// from this file, never input.
#[derive(Default)]
pub(super) struct Columns {
    names: Vec<&'static str>,
    values: Vec<String>,
    params: Vec<Param>,
}

impl Columns {
    fn set<T: ToSql + SqlType + Sync + Send + 'static>(&mut self, column: &'static str, value: T) {
        self.set_expr(column, "{}", value);
    }

    /// `expression` with `{}` where the parameter goes.
    fn set_expr<T: ToSql + SqlType + Sync + Send + 'static>(
        &mut self,
        column: &'static str,
        expression: &str,
        value: T,
    ) {
        self.params.push((Box::new(value), T::SQL_TYPE));
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

    fn params(&self) -> Vec<(&(dyn ToSql + Sync), Type)> {
        as_params(&self.params)
    }
}

/// Refuses what the `url_scheme` constraint would, with an error that says why.
pub(super) fn check_url(url: &str) -> Result<(), AdminError> {
    let invalid = |problem: String| AdminError::Invalid {
        field: "url",
        problem,
    };
    // These messages reach the terminal, API responses and logs: the URL only masked.
    let shown = mask_url(url);
    if crate::broker::is_broker_url(url) {
        // Before the URL parser: a Kafka broker list (`h1:9092,h2:9092`) is no URL authority.
        crate::broker::Target::parse(url).map_err(|error| invalid(error.to_string()))?;
        return check_password_not_masked(broker_password(url), &shown);
    }
    let parsed = reqwest::Url::parse(url).map_err(|error| {
        invalid(format!(
            "{shown:?} is not a URL ({error}); give an absolute URL such as https://service.internal/hooks/outbox"
        ))
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "{shown:?} uses scheme {:?}; give a webhook (http://, https://) or a broker ({})",
            parsed.scheme(),
            crate::broker::SCHEMES
                .map(|scheme| format!("{scheme}://"))
                .join(", ")
        )));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid(format!("{shown:?} has no host")));
    }
    check_not_masked(&parsed, &shown)
}

/// Subscriptions are shown with their password masked; sending such a URL back (a read, edit,
/// write round trip) would silently replace the real password with the mask.
fn check_not_masked(url: &reqwest::Url, shown: &str) -> Result<(), AdminError> {
    check_password_not_masked(url.password(), shown)
}

/// The password as written in a broker URL (still percent-encoded, as
/// [`reqwest::Url::password`] gives it), found in the text: a broker list is no URL authority.
fn broker_password(url: &str) -> Option<&str> {
    let after_scheme = url.split_once("://")?.1;
    let authority = after_scheme.split(['/', '?', '#']).next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    userinfo.split_once(':').map(|(_, password)| password)
}

fn check_password_not_masked(password: Option<&str>, shown: &str) -> Result<(), AdminError> {
    if password == Some(MASK) {
        return Err(AdminError::Invalid {
            field: "url",
            problem: format!(
                "{shown:?} carries the masked password {MASK:?} as shown by list/show and the API; \
                 give the real password, or leave the URL out to keep the current one"
            ),
        });
    }
    Ok(())
}

pub(super) fn check_secret(secret: &SecretText) -> Result<(), AdminError> {
    SigningSecret::parse(secret.expose())
        .map(drop)
        .map_err(|error| AdminError::Invalid {
            field: "secret",
            problem: format!(
                "{error}; give whsec_ followed by the base64 of at least 16 random bytes, or leave it out to have one generated"
            ),
        })
}
