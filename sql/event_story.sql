-- event_story.sql: one event's full story.
--
-- Answers "what happened to this event?": the event itself, its delivery to each
-- subscription, every recorded attempt (a first-attempt success is recorded on the delivery
-- alone), and the replays and backfills that touched it.
--
-- Run (event_id is the uuid producers get back and subscribers see as webhook-id):
--   psql "$DATABASE_URL" -v event_id=6f1c2a9e-0000-4000-8000-000000000000 -f sql/event_story.sql
--
-- Cost: index lookups only (events.event_id is unique; deliveries and attempts are found
-- through their event and delivery indexes).

\if :{?event_id}
\else
\echo 'usage: psql "$DATABASE_URL" -v event_id=<uuid> -f sql/event_story.sql'
\quit
\endif

\echo '== Event' :event_id
SELECT e.id AS row_id, e.event_id, e.event_type, e.tenant_id, e.source_service, e.ordering_key,
       e.target_services, e.priority, e.created_at, e.deliver_after, e.dispatched_at,
       octet_length(e.payload::text) AS payload_bytes, e.metadata
  FROM outbox.events e
 WHERE e.event_id = :'event_id'::uuid;

\echo '== Deliveries (one per subscription)'
SELECT d.id AS delivery_id, coalesce(s.name, '(removed)') AS subscription, d.status, d.attempts,
       d.created_at, d.next_attempt_at, d.delivered_at, d.last_status_code, d.last_error,
       d.lease_owner, d.replay_id
  FROM outbox.events e
  JOIN outbox.deliveries d ON d.event_id = e.id
  LEFT JOIN outbox.subscriptions s ON s.id = d.subscription_id
 WHERE e.event_id = :'event_id'::uuid
 ORDER BY d.id;

\echo '== Attempts (failures, retries and replayed attempts)'
SELECT d.id AS delivery_id, coalesce(s.name, '(removed)') AS subscription, a.attempt, a.started_at,
       a.duration_ms, a.status_code, a.error, left(a.response_body, 200) AS response_body, a.replay_id
  FROM outbox.events e
  JOIN outbox.deliveries d ON d.event_id = e.id
  LEFT JOIN outbox.subscriptions s ON s.id = d.subscription_id
  JOIN outbox.delivery_attempts a ON a.delivery_id = d.id
 WHERE e.event_id = :'event_id'::uuid
 ORDER BY d.id, a.id;

\echo '== Replays and backfills that touched it'
-- A replay touched the event if it re-queued (or created) one of its deliveries, if one of
-- its attempts came from it, or if it named the event in event_ids (dry runs included).
WITH ev AS (
    SELECT id FROM outbox.events WHERE event_id = :'event_id'::uuid
), touched AS (
    SELECT d.replay_id FROM outbox.deliveries d JOIN ev ON d.event_id = ev.id
    UNION
    SELECT a.replay_id FROM outbox.delivery_attempts a
      JOIN outbox.deliveries d ON d.id = a.delivery_id JOIN ev ON d.event_id = ev.id
)
SELECT r.id AS replay_id, r.requested_at, r.requested_by, r.reason, r.dry_run, r.matched, r.criteria
  FROM outbox.replays r
 WHERE r.id IN (SELECT replay_id FROM touched)
    OR r.criteria -> 'event_ids' ? (:'event_id'::uuid)::text
 ORDER BY r.id;
