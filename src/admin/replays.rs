//! Replays and backfills through `outbox.replay`, and the record of them (`outbox.replays`).

use super::*;

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
            .query_typed_opt(
                "SELECT 1 FROM outbox.subscriptions WHERE name = $1",
                &[(name, Type::TEXT)],
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
        .query_typed_one(&sql, &args.params())
        .await
        .map_err(|e| classify(e, "replaying deliveries", ""))?;
    Ok(ReplayOutcome {
        replay_id: row.get(0),
        matched: row.get(1),
        dry_run: criteria.dry_run,
    })
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ReplayPage {
    /// Newest first.
    pub replays: Vec<ReplaySummary>,
    pub next_cursor: Option<String>,
}

/// Replays (and backfills), newest first, a page at a time (keyset on `replays.id`).
pub async fn list_replays(
    client: &Client,
    before_id: Option<i64>,
    limit: i64,
) -> Result<ReplayPage, AdminError> {
    check_limit(limit)?;
    let rows = client
        .query_typed(
            &format!(
                "SELECT {REPLAY_COLUMNS} FROM outbox.replays
                  WHERE $1::bigint IS NULL OR id < $1
                  ORDER BY id DESC LIMIT $2"
            ),
            &[(&before_id, Type::INT8), (&(limit + 1), Type::INT8)],
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
        .query_typed_opt(
            &format!("SELECT {REPLAY_COLUMNS} FROM outbox.replays WHERE id = $1"),
            &[(&id, Type::INT8)],
        )
        .await
        .map_err(|e| classify(e, "reading the replay", ""))?;
    Ok(row.as_ref().map(replay_from_row))
}

pub(super) const REPLAY_COLUMNS: &str =
    "id, requested_at, requested_by, reason, criteria, matched, dry_run";

pub(super) fn replay_from_row(row: &tokio_postgres::Row) -> ReplaySummary {
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

/// Named arguments (`name => $n::type`) for a function call.
#[derive(Default)]
pub(super) struct Arguments {
    named: Vec<String>,
    params: Vec<Param>,
}

impl Arguments {
    fn add<T: ToSql + SqlType + Sync + Send + 'static>(
        &mut self,
        name: &str,
        sql_type: &str,
        value: T,
    ) {
        self.params.push((Box::new(value), T::SQL_TYPE));
        self.named
            .push(format!("{name} => ${}::{sql_type}", self.params.len()));
    }

    fn params(&self) -> Vec<(&(dyn ToSql + Sync), Type)> {
        as_params(&self.params)
    }
}
