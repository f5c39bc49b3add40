-- A producer's INSERT (and outbox.publish) no longer plans SQL-language functions on every
-- statement (issue 8, performance: what producers pay per event).
--
-- PostgreSQL prepares a table's CHECK constraints afresh for every INSERT statement (once per
-- executor run, not once per session), and folding them then inlines every SQL-language
-- function they call (the body is parsed and analysed again) and runs every IMMUTABLE one
-- with constant arguments through the SQL function executor (parsed, analysed and planned
-- again). outbox.events' constraints call two: is_valid_event_type (inlined) and
-- max_payload_bytes (folded). perf of 8 producers inserting while a relay delivered: 27 % of
-- their backends' CPU was in ExecConstraints, most of it that planning. outbox.publish, a
-- SQL-language function too, parsed and planned its INSERT on every call as well.
--
-- PL/pgSQL compiles a function once per session and keeps its statements' plans, so the same
-- bodies in PL/pgSQL cost a cached call. Measured on the local server (pgbench, one client,
-- transactions of 20 statements, synchronous_commit off so that the statements dominate),
-- per statement: INSERT 153 -> 128 µs, SELECT outbox.publish(...) about 250 -> 140 µs.
--
-- Nothing else changes: the constraints keep their names and text (replacing the functions
-- they call touches no row and takes no table lock), the functions accept what they did,
-- publish keeps its arguments, defaults and grants. max_payload_bytes stays the knob the
-- README documents; a replacement takes effect on the next statement in every session (the
-- constraints are prepared per statement, and a replaced PL/pgSQL function is recompiled).

CREATE OR REPLACE FUNCTION outbox.is_valid_event_type(event_type text) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    AS $$
    BEGIN
        RETURN length(event_type) BETWEEN 1 AND 255 AND event_type ~ '^[A-Za-z0-9._:-]+$';
    END
    $$;

CREATE OR REPLACE FUNCTION outbox.max_payload_bytes() RETURNS integer
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    AS $$
    BEGIN
        RETURN 1048576;
    END
    $$;

CREATE OR REPLACE FUNCTION outbox.publish(
    event_type      text,
    payload         jsonb,
    tenant_id       text DEFAULT NULL,
    source_service  text DEFAULT NULL,
    ordering_key    text DEFAULT NULL,
    target_services text[] DEFAULT NULL,
    metadata        jsonb DEFAULT '{}',
    deliver_after   timestamptz DEFAULT now(),
    priority        integer DEFAULT 0
) RETURNS uuid
    LANGUAGE plpgsql VOLATILE
    AS $$
    DECLARE
        published uuid;
    BEGIN
        -- Positional parameters: the argument names are also the table's column names.
        INSERT INTO outbox.events AS e
            (event_type, payload, tenant_id, source_service, ordering_key, target_services, metadata, deliver_after, priority)
        VALUES
            ($1, $2, $3, $4, $5, $6, COALESCE($7, '{}'), COALESCE($8, now()), COALESCE($9, 0))
        RETURNING e.event_id INTO published;
        RETURN published;
    END
    $$;
