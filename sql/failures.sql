-- failures.sql: what is failing, for which subscription, and why.
--
-- Answers, in three tables:
--   1. failed attempts in the last 24 hours, by subscription and error message
--      (from outbox.delivery_attempts: every failed attempt is recorded there);
--   2. deliveries failing right now (they will be retried), by subscription and last error;
--   3. dead deliveries of all time (attempts exhausted or subscription removed), by
--      subscription and last error: what outbox.replay would re-queue.
--
-- Run:
--   psql "$DATABASE_URL" -f sql/failures.sql
--   psql "$DATABASE_URL" -v since='7 days' -f sql/failures.sql    -- window of table 1
--
-- Cost: table 1 reads the attempts of the window (index on started_at); tables 2 and 3 read
-- the failing/dead partial index, never the delivered history.
-- Next steps: sql/top_errors.sql (messages), sql/event_story.sql (one event),
-- sql/replay_recipes.sql (send them again).

\if :{?since}
\else
\set since '24 hours'
\endif

\echo '== Failed attempts by subscription and error, last' :since
SELECT coalesce(s.name, '(removed)')          AS subscription,
       a.status_code,
       left(a.error, 120)                     AS error,
       count(*)                               AS attempts,
       count(DISTINCT a.delivery_id)          AS deliveries,
       min(a.started_at)                      AS first_seen,
       max(a.started_at)                      AS last_seen
  FROM outbox.delivery_attempts a
  JOIN outbox.deliveries d ON d.id = a.delivery_id
  LEFT JOIN outbox.subscriptions s ON s.id = d.subscription_id
 WHERE a.error IS NOT NULL
   AND a.started_at > now() - :'since'::interval
 GROUP BY 1, 2, 3
 ORDER BY attempts DESC, subscription
 LIMIT 100;

\echo '== Failing now (will be retried), by subscription and last error'
SELECT coalesce(subscription, '(removed)')    AS subscription,
       last_status_code,
       left(last_error, 120)                  AS last_error,
       count(*)                               AS deliveries,
       max(event_age)                         AS oldest_event_age,
       min(next_attempt_at)                   AS next_retry_at
  FROM outbox.failed_deliveries
 WHERE status = 'failing'
 GROUP BY 1, 2, 3
 ORDER BY deliveries DESC, subscription
 LIMIT 100;

\echo '== Dead, all time, by subscription and last error (outbox.replay re-queues these)'
SELECT coalesce(subscription, '(removed)')    AS subscription,
       last_status_code,
       left(last_error, 120)                  AS last_error,
       count(*)                               AS deliveries,
       max(event_age)                         AS oldest_event_age,
       max(updated_at)                        AS last_died_at
  FROM outbox.failed_deliveries
 WHERE status = 'dead'
 GROUP BY 1, 2, 3
 ORDER BY deliveries DESC, subscription
 LIMIT 100;
