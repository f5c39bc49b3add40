//! Events: keyset-paged search, one event with its deliveries and attempts, and publishing
//! (the compatibility endpoints' `POST /events/publish`).

use super::*;

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
        .query_typed(&sql, &conditions.params())
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
        .query_typed_opt(&sql, &[(&event_id, Type::UUID)])
        .await
        .map_err(|e| classify(e, "reading the event", ""))?
    else {
        return Ok(None);
    };
    let event = event_from_row(&row);
    let rows = client
        .query_typed(
            "SELECT d.id, d.subscription_id, s.name, d.status, d.attempts, d.next_attempt_at,
                    d.last_status_code, d.last_error, d.created_at, d.delivered_at, d.replay_id
               FROM outbox.deliveries d
               LEFT JOIN outbox.subscriptions s ON s.id = d.subscription_id
              WHERE d.event_id = $1
              ORDER BY d.id
              LIMIT $2",
            &[(&event.id, Type::INT8), (&EVENT_DELIVERIES_MAX, Type::INT8)],
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
        .query_typed(
            "SELECT id, delivery_id, attempt, started_at, duration_ms, status_code, error,
                    response_body, replay_id
               FROM (SELECT a.*, row_number() OVER (PARTITION BY a.delivery_id
                                                     ORDER BY a.started_at DESC, a.id DESC) AS n
                       FROM outbox.delivery_attempts a
                      WHERE a.delivery_id = ANY ($1)) latest
              WHERE n <= $2
              ORDER BY delivery_id, started_at DESC, id DESC",
            &[
                (&delivery_ids, Type::INT8_ARRAY),
                (&DELIVERY_ATTEMPTS_MAX, Type::INT8),
            ],
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
        .query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM outbox.events WHERE event_id = $1)",
            &[(&event_id, Type::UUID)],
        )
        .await
        .map(|row| row.get(0))
        .map_err(|e| classify(e, "looking up the event", ""))
}

/// Inserts one event, as a producer's `INSERT` would (the table's CHECK constraints judge
/// it; a violation names the field). Delivered by running relays like any other event.
pub async fn publish_event(client: &Client, event: &NewEvent) -> Result<Published, AdminError> {
    let row = client
        .query_typed_one(
            "INSERT INTO outbox.events (event_id, event_type, payload, tenant_id, source_service,
                                        ordering_key, target_services, metadata, priority)
             VALUES (coalesce($1, gen_random_uuid()), $2, $3, $4, $5, $6, $7, $8, $9)
             RETURNING event_id",
            &[
                (&event.event_id, Type::UUID),
                (&event.event_type, Type::TEXT),
                (&event.payload, Type::JSONB),
                (&event.tenant_id, Type::TEXT),
                (&event.source_service, Type::TEXT),
                (&event.ordering_key, Type::TEXT),
                (&event.target_services, Type::TEXT_ARRAY),
                (&event.metadata, Type::JSONB),
                (&event.priority, Type::INT4),
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
pub(super) const EVENT_COLUMNS: &str = "
    e.id, e.event_id, e.event_type, e.tenant_id, e.source_service, e.ordering_key,
    e.target_services, e.metadata, e.priority, e.deliver_after, e.created_at, e.dispatched_at,
    (SELECT coalesce(jsonb_object_agg(c.status, c.n), '{}'::jsonb)
       FROM (SELECT d.status, count(*) AS n FROM outbox.deliveries d
              WHERE d.event_id = e.id GROUP BY d.status) c)";

pub(super) fn event_from_row(row: &tokio_postgres::Row) -> EventSummary {
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

/// A WHERE clause built from fragments with `{}` where the parameter goes. The fragments
/// are literals from this file; only the values come from input, always as parameters.
#[derive(Default)]
pub(super) struct Conditions {
    clauses: Vec<String>,
    params: Vec<Param>,
}

impl Conditions {
    fn bind<T: ToSql + SqlType + Sync + Send + 'static>(&mut self, value: T) -> String {
        self.params.push((Box::new(value), T::SQL_TYPE));
        format!("${}", self.params.len())
    }

    fn add<T: ToSql + SqlType + Sync + Send + 'static>(&mut self, fragment: &str, value: T) {
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

    fn params(&self) -> Vec<(&(dyn ToSql + Sync), Type)> {
        as_params(&self.params)
    }
}
