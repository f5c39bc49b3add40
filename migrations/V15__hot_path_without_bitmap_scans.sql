-- The dispatcher's and the completer's statements find their rows through indexes only
-- (issue 8, performance); V13 did the same for the claim.
--
-- Every event the dispatcher marks dispatched leaves a dead entry in events_undispatched_idx,
-- and every delivery that finishes leaves one in deliveries_in_flight_idx, until VACUUM (with
-- autovacuum's defaults, until a fifth of the table is dead). A plain index scan marks such
-- entries dead the first time it meets them (once no snapshot on the server is older than
-- their rows' removal) and later scans skip them; a bitmap scan never does. Without statistics, which a busy table under autovacuum often lacks, the planner
-- chose bitmap scans for both statements:
-- * the dispatcher's look for due events read every event dispatched since the last VACUUM,
--   on every look (up to 1 000 looks a second in a busy spell);
-- * the completer's batch update found its rows through the in-flight index's predicate
--   (status = 'in_flight') and read every delivery finished since the last VACUUM, on every
--   batch of results.
-- Measured at a steady 300 events/s (pg_stat_statements, 7 100 events): the dispatcher's
-- statement took 1.34 ms per look and the completion 0.39 ms per batch, against 0.50 and
-- 0.17 ms with bitmap scans turned off for the whole run. tests/it/dead_index_entries.rs.
--
-- Both functions turn off sequential scans as well: every statement in them is a lookup by
-- key or a LIMITed walk of a partial index, and with bitmap scans off alone the planner
-- read the whole events table (100 000 rows in tests/it/scheduled.rs) to join the picked
-- ids, a plan PL/pgSQL then keeps for the session. And JIT compilation off: a path that can
-- only be a sequential scan (the few subscriptions) still gets one, costed 10^10 when
-- turned off, and a plan that dear is JIT-compiled, which took 350 ms per dispatch round.
--
-- The completer's statement becomes a function so that it can carry the settings: the relay
-- sends no SET of its own (through a transaction pooler it would leak to other sessions).
-- Its body is the statement the relay sent before (src/db/sql.rs, COMPLETE_DELIVERIES).

-- V9's fan-out in two statements: the first picks and locks the due events; when there are
-- none (most looks of a busy spell at a steady rate) the function returns at once: an
-- empty look runs one short statement, not the whole update and fan-out statement. The
-- second still runs after the fan-out lock, so it sees every subscription's current mode.
CREATE OR REPLACE FUNCTION outbox.dispatch_events(batch_size integer)
RETURNS TABLE (events bigint, deliveries bigint)
    LANGUAGE plpgsql VOLATILE
    SET enable_bitmapscan = off
    SET enable_seqscan = off
    SET jit = off
    AS $$
    DECLARE
        due bigint[];
    BEGIN
        PERFORM pg_advisory_xact_lock_shared(1869575539, 0);  -- 1869575539 = 'outs'
        WITH due_at_insert AS (
            SELECT e.id FROM outbox.events e
             WHERE e.dispatched_at IS NULL AND e.deliver_after <= e.created_at
               AND e.deliver_after <= now()  -- created_at may be set in the future by the producer
             ORDER BY e.priority DESC, e.id
             LIMIT batch_size
               FOR UPDATE SKIP LOCKED
        ), scheduled AS (
            SELECT e.id FROM outbox.events e
             WHERE e.dispatched_at IS NULL AND e.deliver_after > e.created_at
               AND e.deliver_after <= now()
             ORDER BY e.deliver_after, e.id
             LIMIT batch_size
               FOR UPDATE SKIP LOCKED
        )
        SELECT array_agg(picked.id) INTO due
          FROM (SELECT id FROM due_at_insert UNION ALL SELECT id FROM scheduled) picked;
        IF due IS NULL THEN
            RETURN QUERY SELECT 0::bigint, 0::bigint;
            RETURN;
        END IF;
        RETURN QUERY
        WITH marked AS (
            UPDATE outbox.events e SET dispatched_at = now()
             WHERE e.id = ANY (due)
         RETURNING e.id, e.event_type, e.tenant_id, e.payload, e.target_services
        ), fanned_out AS (
            INSERT INTO outbox.deliveries (event_id, subscription_id)
            SELECT m.id, s.id
              FROM marked m
              JOIN outbox.subscriptions s
                ON s.enabled
               AND NOT s.ordered
               AND outbox.event_type_matches(s.event_types, m.event_type)
               AND (s.tenant_id IS NULL OR s.tenant_id = m.tenant_id)
               AND (s.filter IS NULL OR m.payload @> s.filter)
               AND (m.target_services IS NULL OR s.name = ANY (m.target_services))
             ORDER BY m.id, s.id
                ON CONFLICT (event_id, subscription_id) DO NOTHING
         RETURNING 1
        )
        SELECT (SELECT count(*) FROM marked), (SELECT count(*) FROM fanned_out);
    END
    $$;

CREATE FUNCTION outbox.complete_deliveries(
    result_ids        bigint[],
    result_statuses   text[],
    next_attempts     timestamptz[],
    status_codes      integer[],
    result_errors     text[],
    response_bodies   text[],
    attempts_started  timestamptz[],
    durations_ms      integer[],
    attempts_failed   boolean[],
    lease_tokens      bigint[],
    owner             text
) RETURNS SETOF bigint
    LANGUAGE plpgsql VOLATILE
    ROWS 100
    SET enable_bitmapscan = off
    SET enable_seqscan = off
    SET jit = off
    AS $$
    BEGIN
        RETURN QUERY
        WITH results AS (
            SELECT *
              FROM unnest(result_ids, result_statuses, next_attempts, status_codes,
                          result_errors, response_bodies, attempts_started, durations_ms,
                          attempts_failed, lease_tokens)
                   AS r(id, status, next_attempt_at, status_code, error, response_body,
                        started_at, duration_ms, failed, lease_token)
        ), updated AS (
            UPDATE outbox.deliveries d
               SET status = r.status,
                   attempts = d.attempts + 1,
                   next_attempt_at = coalesce(r.next_attempt_at, d.next_attempt_at),
                   last_status_code = r.status_code,
                   last_error = r.error,
                   delivered_at = CASE WHEN r.status = 'delivered' THEN now() ELSE d.delivered_at END,
                   lease_owner = NULL,
                   lease_expires_at = NULL,
                   lease_token = NULL,
                   updated_at = now()
              FROM results r
             WHERE d.id = r.id AND d.status = 'in_flight' AND d.lease_owner = owner
               AND d.lease_token = r.lease_token
         RETURNING d.id, d.attempts, d.replay_id
        ), recorded AS (
            INSERT INTO outbox.delivery_attempts
                   (delivery_id, attempt, started_at, duration_ms, status_code, error,
                    response_body, replay_id)
            SELECT u.id, u.attempts, r.started_at, r.duration_ms, r.status_code, r.error,
                   r.response_body, u.replay_id
              FROM updated u JOIN results r ON r.id = u.id
             WHERE r.failed OR u.attempts > 1 OR u.replay_id IS NOT NULL
        )
        SELECT u.id FROM updated u;
    END
    $$;
COMMENT ON FUNCTION outbox.complete_deliveries(bigint[], text[], timestamptz[], integer[], text[], text[], timestamptz[], integer[], boolean[], bigint[], text) IS
    'Internal (outbox-relay): write a batch of delivery results where the claim (owner, lease token) still holds the lease; returns the ids written.';

-- Glob matching as one expression PostgreSQL inlines into the caller's plan. V1's body was a
-- subquery (EXISTS over unnest), which keeps a SQL function from being inlined: every
-- statement that called it set up and planned the function afresh, about 0.3 ms of each
-- dispatch round that found events (auto_explain: the fan-out join took 0.40 ms for one event
-- and one subscription). Same meaning: '*' is the only wildcard, every other character
-- matches itself ('_', '%' and '\' are escaped for LIKE). The patterns are joined with a
-- character no valid pattern holds (U+001F; outbox.are_valid_event_type_patterns allows
-- [A-Za-z0-9._:*-] only), made LIKE patterns, and split again. STABLE, no longer IMMUTABLE:
-- array_to_string is STABLE, and PostgreSQL inlines no IMMUTABLE function whose body is less
-- so. Nothing needs it IMMUTABLE (no index or constraint uses it).
CREATE OR REPLACE FUNCTION outbox.event_type_matches(patterns text[], event_type text) RETURNS boolean
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$
        SELECT event_type LIKE ANY (string_to_array(
                   replace(replace(replace(replace(array_to_string(patterns, E'\x1f'),
                                                   '\', '\\'), '_', '\_'), '%', '\%'), '*', '%'),
                   E'\x1f'))
    $$;
