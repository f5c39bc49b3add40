-- top_errors.sql: the most frequent error messages of recent delivery attempts.
--
-- Answers: what went wrong most often in the last hour (or :since), across all
-- subscriptions, and which subscriptions saw each error. Reads outbox.delivery_attempts,
-- where every failed attempt is recorded (status code, error text, first 4 KiB of the body).
--
-- Run:
--   psql "$DATABASE_URL" -f sql/top_errors.sql
--   psql "$DATABASE_URL" -v since='6 hours' -v top=50 -f sql/top_errors.sql
--
-- Cost: an index range scan of delivery_attempts.started_at over the window.

\if :{?since}
\else
\set since '1 hour'
\endif
\if :{?top}
\else
\set top 20
\endif

\echo '== Top' :top 'errors in the last' :since
SELECT left(a.error, 160)                                                          AS error,
       count(*)                                                                    AS attempts,
       count(DISTINCT a.delivery_id)                                               AS deliveries,
       string_agg(DISTINCT coalesce(s.name, '(removed)'), ', ')                    AS subscriptions,
       string_agg(DISTINCT a.status_code::text, ', ')                              AS status_codes,
       max(a.started_at)                                                           AS last_seen,
       (array_agg(left(a.response_body, 200) ORDER BY a.started_at DESC))[1]       AS latest_response_body
  FROM outbox.delivery_attempts a
  JOIN outbox.deliveries d ON d.id = a.delivery_id
  LEFT JOIN outbox.subscriptions s ON s.id = d.subscription_id
 WHERE a.error IS NOT NULL
   AND a.started_at > now() - :'since'::interval
 GROUP BY 1
 ORDER BY attempts DESC, error
 LIMIT :top;
