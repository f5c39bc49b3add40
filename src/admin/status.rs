//! The state of the outbox at a glance: backlog, per-subscription counts, recent replays.

use super::*;

/// How many of the latest replays [`status`] reports.
pub const RECENT_REPLAYS: i64 = 10;

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

/// Backlog, per-subscription delivery counts and the latest replays.
pub async fn status(client: &Client) -> Result<StatusReport, AdminError> {
    let backlog = client
        .query_typed_one(
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
        .query_typed(
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
        .query_typed(
            "SELECT id, requested_at, requested_by, reason, criteria, matched, dry_run
               FROM outbox.replays ORDER BY id DESC LIMIT $1",
            &[(&RECENT_REPLAYS, Type::INT8)],
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
