-- Operator views (SPEC.md, "Views for operators"): what is failing and how each subscription
-- is doing, answerable from psql without knowing the internal columns.
--
-- Cost model: a healthy installation has a huge `delivered` history and a small amount of
-- open work (pending, in_flight, failing) and dead rows. Both views reach deliveries through
-- partial indexes whose size follows the open work, never through a scan of the delivered
-- history, except for the one column that is by definition about that history
-- (subscription_health.delivered, see its comment).

-- Last success per subscription (and the delivered counts) without touching the heap of
-- the delivered history: max(delivered_at) is one descent of this index, counts are
-- index-only scans. It costs one extra index entry per delivered row.
--
-- IF NOT EXISTS: on an existing large installation, building it here blocks writes to
-- outbox.deliveries for the duration of the build. To avoid that, create it beforehand with
--   CREATE INDEX CONCURRENTLY deliveries_delivered_idx ON outbox.deliveries (subscription_id, delivered_at) WHERE status = 'delivered';
-- and this migration then finds it and moves on.
CREATE INDEX IF NOT EXISTS deliveries_delivered_idx ON outbox.deliveries (subscription_id, delivered_at)
    WHERE status = 'delivered';

-- Everything not delivered, per subscription and status: the counts of pending, in_flight,
-- failing and dead deliveries and the oldest unfinished one's created_at are index-only
-- scans of a subscription's slice of it. The relay's own partial indexes are shaped for
-- claiming (e.g. the claim index may leave out deliveries that wait for their turn), so the
-- views do not rely on them. Its size follows the open work plus the dead pile; it costs an
-- index entry when a delivery is created, claimed, fails or dies (not when it is delivered).
-- Same advice as above for large existing tables.
CREATE INDEX IF NOT EXISTS deliveries_not_delivered_idx ON outbox.deliveries (subscription_id, status, created_at)
    WHERE status <> 'delivered';

CREATE VIEW outbox.failed_deliveries AS
SELECT d.id                   AS delivery_id,
       d.status,
       e.event_id,
       e.event_type,
       e.tenant_id,
       d.subscription_id,
       s.name                 AS subscription,
       d.attempts,
       d.last_status_code,
       d.last_error,
       d.next_attempt_at,
       now() - e.created_at   AS event_age,
       e.created_at           AS event_created_at,
       d.replay_id,
       d.created_at,
       d.updated_at
  FROM outbox.deliveries d
  JOIN outbox.events e ON e.id = d.event_id
  LEFT JOIN outbox.subscriptions s ON s.id = d.subscription_id
 WHERE d.status IN ('failing', 'dead');

COMMENT ON VIEW outbox.failed_deliveries IS
    'Every failing (will be retried at next_attempt_at) or dead (given up) delivery, with its event, subscription and last error. '
    'subscription is NULL when the subscription was removed (its open deliveries were then marked dead). '
    'event_age = now() - the event''s created_at. History of every attempt: outbox.delivery_attempts (delivery_id). '
    'Cost: reads a partial index of the failing and dead rows only, never the delivered history; '
    'filter on subscription_id or status to narrow it further. Typical: SELECT * FROM outbox.failed_deliveries ORDER BY updated_at DESC LIMIT 50.';
COMMENT ON COLUMN outbox.failed_deliveries.delivery_id IS 'outbox.deliveries.id';
COMMENT ON COLUMN outbox.failed_deliveries.event_id IS 'The event''s uuid (the webhook-id), not its internal row id.';
COMMENT ON COLUMN outbox.failed_deliveries.subscription IS 'Subscription name; NULL when the subscription was removed.';
COMMENT ON COLUMN outbox.failed_deliveries.attempts IS 'Attempts since the delivery was created or last replayed.';
COMMENT ON COLUMN outbox.failed_deliveries.event_age IS 'now() - events.created_at.';
COMMENT ON COLUMN outbox.failed_deliveries.replay_id IS 'The replay (outbox.replays.id) that last re-queued this delivery, if any.';

-- One row per existing subscription. Each count is a correlated subquery on
-- subscription_id = s.id, so it walks the partial index of its status for that subscription
-- only; because the view is a plain SELECT, PostgreSQL inlines it and evaluates only the
-- columns a query asks for (SELECT name, pending, dead ... never pays for delivered).
CREATE VIEW outbox.subscription_health AS
SELECT s.id AS subscription_id,
       s.name,
       s.enabled,
       s.disabled_reason,
       (SELECT count(*) FROM outbox.deliveries d
         WHERE d.subscription_id = s.id AND d.status = 'pending')    AS pending,
       (SELECT count(*) FROM outbox.deliveries d
         WHERE d.subscription_id = s.id AND d.status = 'in_flight')  AS in_flight,
       (SELECT count(*) FROM outbox.deliveries d
         WHERE d.subscription_id = s.id AND d.status = 'failing')    AS failing,
       (SELECT count(*) FROM outbox.deliveries d
         WHERE d.subscription_id = s.id AND d.status = 'delivered')  AS delivered,
       (SELECT count(*) FROM outbox.deliveries d
         WHERE d.subscription_id = s.id AND d.status = 'delivered'
           AND d.delivered_at > now() - interval '24 hours')         AS delivered_last_24h,
       (SELECT count(*) FROM outbox.deliveries d
         WHERE d.subscription_id = s.id AND d.status = 'dead')       AS dead,
       now() - (SELECT min(d.created_at) FROM outbox.deliveries d
                 WHERE d.subscription_id = s.id
                   AND d.status IN ('pending', 'in_flight', 'failing'))      AS oldest_pending_age,
       (SELECT max(d.delivered_at) FROM outbox.deliveries d
         WHERE d.subscription_id = s.id AND d.status = 'delivered')  AS last_success_at,
       f.last_failure_at
  FROM outbox.subscriptions s
  -- Grouped once for all subscriptions rather than per subscription: delivery_attempts has
  -- no subscription column, so "the latest failed attempt of subscription X" cannot be an
  -- index lookup. Unique on subscription_id, so PostgreSQL drops this join entirely when
  -- last_failure_at is not selected.
  LEFT JOIN (SELECT d.subscription_id, max(a.started_at) AS last_failure_at
               FROM outbox.delivery_attempts a
               JOIN outbox.deliveries d ON d.id = a.delivery_id
              WHERE a.error IS NOT NULL
              GROUP BY d.subscription_id) f ON f.subscription_id = s.id;

COMMENT ON VIEW outbox.subscription_health IS
    'Per subscription: enabled, counts of its deliveries by status, age of its oldest unfinished delivery, last success and last failure. '
    'Deliveries of removed subscriptions (subscription_id NULL) are not counted here; see outbox.failed_deliveries. '
    'Cost: PostgreSQL inlines the view and computes only the columns you select. '
    'pending, in_flight, failing, dead and oldest_pending_age are index-only scans of deliveries_not_delivered_idx, whose size follows the open work and the dead pile; '
    'last_success_at is one index descent and delivered_last_24h an index range scan (deliveries_delivered_idx). '
    'delivered is the one column whose cost grows with the whole delivered history of the subscription (an index-only scan of every delivered row): '
    'leave it out of frequent or scripted queries (use delivered_last_24h). '
    'last_failure_at is one pass over the delivery_attempts rows that have an error (the failure history, not the delivered history), '
    'joined to deliveries by primary key.';
COMMENT ON COLUMN outbox.subscription_health.delivered IS
    'All-time count of delivered deliveries. Its cost grows with the delivered history; prefer delivered_last_24h in dashboards.';
COMMENT ON COLUMN outbox.subscription_health.delivered_last_24h IS
    'Deliveries delivered in the last 24 hours (by delivered_at). Cheap: an index range scan.';
COMMENT ON COLUMN outbox.subscription_health.oldest_pending_age IS
    'now() - the oldest deliveries.created_at among its pending, in_flight and failing deliveries (NULL when none). '
    'Measured from when the delivery was created (the event was fanned out, or backfilled), not from the event''s created_at, '
    'so scheduled events (deliver_after) do not look stuck; this is the same measure as the outbox_oldest_pending_seconds metric. '
    'A replayed delivery keeps its original created_at, so it counts as old until delivered.';
COMMENT ON COLUMN outbox.subscription_health.last_success_at IS 'max(delivered_at) of its delivered deliveries.';
COMMENT ON COLUMN outbox.subscription_health.last_failure_at IS 'max(started_at) of its recorded attempts that failed (delivery_attempts.error IS NOT NULL).';
