-- backlog.sql: is anything stuck, and for how long?
--
-- Answers, in three tables:
--   1. per subscription: unfinished deliveries (pending, in_flight, failing), how many of
--      them are due and overdue (due, not claimed yet), how many wait behind an earlier
--      delivery of their ordering_key (ordered subscriptions), the age of the oldest one,
--      and the dead count for context;
--   2. events not yet fanned out into deliveries (should be near zero while a relay runs;
--      "scheduled" ones wait for their deliver_after on purpose);
--   3. in_flight deliveries whose lease expired: their relay died or lost the database;
--      any running relay re-queues them within a heartbeat.
--
-- Run:
--   psql "$DATABASE_URL" -f sql/backlog.sql
--   psql "$DATABASE_URL" -v overdue='5 minutes' -f sql/backlog.sql  -- "overdue" threshold
--
-- Cost: partial indexes of open work only (see COMMENT ON VIEW outbox.subscription_health);
-- the delivered history is never scanned.

\if :{?overdue}
\else
\set overdue '1 minute'
\endif

\echo '== Unfinished deliveries per subscription; overdue = due for more than' :overdue
SELECT h.name AS subscription,
       h.enabled,
       h.pending,
       h.in_flight,
       h.failing,
       q.due_now,
       q.overdue,
       q.waiting_in_order,
       h.oldest_pending_age,
       h.dead,
       h.disabled_reason
  FROM outbox.subscription_health h
  CROSS JOIN LATERAL (
        SELECT count(*) FILTER (WHERE NOT d.blocked AND d.next_attempt_at <= now())                           AS due_now,
               count(*) FILTER (WHERE NOT d.blocked AND d.next_attempt_at <= now() - :'overdue'::interval) AS overdue,
               count(*) FILTER (WHERE d.blocked)                                                            AS waiting_in_order
          FROM outbox.deliveries d
         WHERE d.subscription_id = h.subscription_id AND d.status IN ('pending', 'failing')) q
 WHERE h.pending + h.in_flight + h.failing > 0 OR NOT h.enabled
 ORDER BY h.oldest_pending_age DESC NULLS LAST, h.name;

\echo '== Events not yet dispatched (fanned out into deliveries)'
SELECT count(*) FILTER (WHERE deliver_after <= now())                AS due,
       now() - min(created_at) FILTER (WHERE deliver_after <= now()) AS oldest_due_age,
       count(*) FILTER (WHERE deliver_after > now())                 AS scheduled,
       min(deliver_after) FILTER (WHERE deliver_after > now())       AS next_scheduled_at
  FROM outbox.events
 WHERE dispatched_at IS NULL;

\echo '== In-flight deliveries whose lease expired (relay gone?), by relay'
SELECT lease_owner,
       count(*)                      AS deliveries,
       now() - min(lease_expires_at) AS expired_for
  FROM outbox.deliveries
 WHERE status = 'in_flight' AND lease_expires_at < now()
 GROUP BY lease_owner
 ORDER BY deliveries DESC;
