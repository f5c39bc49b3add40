-- roles.sql: least-privilege roles for outbox-relay.
--
-- Answers: which database roles should producers, operators and the relay use, and what
-- exactly may each of them do?
--
-- Run it (as the owner of the outbox schema, i.e. the user that runs the migrations, or a
-- superuser) after `outbox-relay migrate`, and again after every upgrade that adds tables or
-- columns (it is idempotent, and safe when several sessions run it at once):
--
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f sql/roles.sql
--
-- The roles are NOLOGIN groups; grant them to login users:
--
--   CREATE ROLE django_crm LOGIN PASSWORD '...' IN ROLE outbox_producer;
--   GRANT outbox_operator TO alice;
--   CREATE ROLE relay LOGIN PASSWORD '...' IN ROLE outbox_relay;
--
-- Roles are cluster-wide; the grants below are per database: run the file in each
-- database that has an outbox schema.
--
--   outbox_producer  INSERT events (plain INSERT or outbox.publish). Reads back nothing but
--                    events.event_id, which INSERT ... RETURNING event_id and
--                    outbox.publish need (a column-level SELECT; it also lets a producer list
--                    event ids, nothing else). Cannot see subscriptions or their secrets.
--   outbox_operator  SELECT on every table and view except subscriptions.secret (and any
--                    other subscriptions column whose name contains "secret"), re-enable
--                    subscriptions (UPDATE of enabled and disabled_reason only), and
--                    EXECUTE outbox.replay / outbox.backfill. Those two functions are
--                    SECURITY DEFINER, so the operator never gets UPDATE on deliveries:
--                    every re-queue goes through them and is recorded in outbox.replays.
--   outbox_relay     What `outbox-relay run` (with retention), its admin API and the
--                    `subscription` CLI run, and nothing else (listed statement by
--                    statement at its grants below): read the outbox tables except the
--                    operator views; insert events, deliveries and attempts; update the
--                    state columns of deliveries, events.dispatched_at and the ordered
--                    cursor; manage subscriptions; delete events past OUTBOX_RETENTION
--                    (their deliveries and attempts follow by cascade); EXECUTE the
--                    functions it calls, outbox.replay among them (not outbox.backfill).
--                    It may not run migrations (DDL): `outbox-relay migrate` and
--                    OUTBOX_MIGRATE_ON_START run as the schema owner.
--
-- Functions other than outbox.replay and outbox.backfill stay executable by PUBLIC, as
-- PostgreSQL creates them: they are SECURITY INVOKER, so they can do nothing the caller's
-- table privileges do not allow (outbox.claim_deliveries_and_limits needs UPDATE on deliveries).

-- One transaction: a producer never sees the moment between the REVOKE and the GRANTs below.
-- The advisory lock (per database) queues concurrent runs in the same database, whose
-- GRANTs on the same objects would otherwise fail with "tuple concurrently updated".
BEGIN;
DO $$ BEGIN PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('outbox-relay sql/roles.sql')); END $$;

-- Create the roles if missing. Two sessions creating the same role at once: the loser gets
-- duplicate_object or, when it raced the winner's commit, unique_violation on pg_authid.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT * FROM (VALUES
        ('outbox_producer', 'outbox-relay producers: INSERT into outbox.events / outbox.publish; no subscriptions.'),
        ('outbox_operator', 'outbox-relay operators: read-only outbox tables except subscription secrets; outbox.replay and outbox.backfill.'),
        ('outbox_relay',    'outbox-relay relay processes: what run, retention, the admin API and the subscription CLI need; no DDL (migrations run as the schema owner).')
    ) AS v(name, about)
    LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r.name);
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r.name);
            EXECUTE format('COMMENT ON ROLE %I IS %L', r.name, r.about);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            RAISE NOTICE 'role % was created concurrently; using it', r.name;
        END;
    END LOOP;
END
$$;

-- Start from nothing on the outbox objects, so re-running after a change of this file takes
-- away what it no longer grants.
REVOKE ALL ON ALL TABLES IN SCHEMA outbox FROM outbox_producer, outbox_operator, outbox_relay;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA outbox FROM outbox_producer, outbox_operator, outbox_relay;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA outbox FROM outbox_producer, outbox_operator, outbox_relay;
GRANT USAGE ON SCHEMA outbox TO outbox_producer, outbox_operator, outbox_relay;

-- Producers. outbox.publish is a plain (security invoker) SQL function, so it runs with the
-- producer's INSERT privilege and the same CHECK constraints as a direct INSERT.
GRANT INSERT ON outbox.events TO outbox_producer;
GRANT SELECT (event_id) ON outbox.events TO outbox_producer;
GRANT EXECUTE ON FUNCTION outbox.publish(text, jsonb, text, text, text, text[], jsonb, timestamptz, integer) TO outbox_producer;

-- Operators: everything readable (tables and views), then subscriptions by column.
-- Revoking the table-level SELECT also clears earlier column grants, so the column list is
-- rebuilt from the catalog on every run and follows new columns.
GRANT SELECT ON ALL TABLES IN SCHEMA outbox TO outbox_operator;
REVOKE SELECT ON outbox.subscriptions FROM outbox_operator;
DO $$
BEGIN
    EXECUTE (
        SELECT format('GRANT SELECT (%s) ON outbox.subscriptions TO outbox_operator',
                      string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum))
          FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = 'outbox.subscriptions'::regclass
           AND a.attnum > 0 AND NOT a.attisdropped
           AND a.attname NOT LIKE '%secret%'
    );
END
$$;
GRANT UPDATE (enabled, disabled_reason) ON outbox.subscriptions TO outbox_operator;
GRANT EXECUTE ON FUNCTION outbox.replay(text[], text, text, text, timestamptz, timestamptz, uuid[], integer, text, text, boolean),
                          outbox.backfill(text, timestamptz, timestamptz, text, integer, text, text)
   TO outbox_operator;

-- The relay: exactly the statements it runs (src/db/sql.rs, src/db/listen.rs,
-- src/subscriptions.rs, src/maintenance.rs, src/admin.rs) and the functions they call
-- (migrations/V4, V5, V7, V9), object by object, so nothing a later migration adds is granted
-- without being listed here. Rows are deleted only by retention (events, whose deliveries
-- and attempts go with them through ON DELETE CASCADE, which PostgreSQL runs with the
-- table owner's rights) and by `subscription remove` (subscriptions).
--
--   events             SELECT (dispatch, claim, retention, gauges, admin reads),
--                      INSERT (admin publish), UPDATE (dispatched_at) (fan-out marks it;
--                      FOR UPDATE SKIP LOCKED needs some UPDATE), DELETE (retention).
--   deliveries         SELECT, INSERT (fan-out, unordered and ordered), UPDATE of the
--                      state columns only (claim, heartbeat, reclaim, results, release on
--                      shutdown, ordered key advance, ending deliveries of a removed
--                      subscription, switching a subscription between ordered and
--                      unordered). No DELETE: deliveries go only with their event.
--   delivery_attempts  SELECT (admin reads), INSERT (results). History is never rewritten.
--   subscriptions      SELECT, INSERT, UPDATE, DELETE (loading, claim locks, 410 disables,
--                      the admin API and `subscription` CLI).
--   ordered_dispatch_cursor  SELECT, UPDATE of the cursor and probe (ordered fan-out).
--   events_id_seq      SELECT (the ordered probe reads the last id drawn).
--   replays            SELECT (admin reads); written only through outbox.replay.
--   schema_history     SELECT (readiness checks the schema version); never written.
--   functions          EXECUTE on those it calls. outbox.backfill, the operator views and
--                      outbox.publish are not the relay's.
-- No DDL: the role owns nothing and has no CREATE on the schema.
GRANT SELECT, INSERT, DELETE ON outbox.events TO outbox_relay;
GRANT UPDATE (dispatched_at) ON outbox.events TO outbox_relay;
GRANT SELECT, INSERT ON outbox.deliveries TO outbox_relay;
GRANT UPDATE (status, attempts, next_attempt_at, last_status_code, last_error, delivered_at,
              lease_owner, lease_expires_at, lease_token, blocked, updated_at)
   ON outbox.deliveries TO outbox_relay;
GRANT SELECT, INSERT ON outbox.delivery_attempts TO outbox_relay;
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox.subscriptions TO outbox_relay;
GRANT SELECT ON outbox.ordered_dispatch_cursor TO outbox_relay;
GRANT UPDATE (last_event_id, probe_xid, probe_last_id, updated_at) ON outbox.ordered_dispatch_cursor TO outbox_relay;
GRANT SELECT ON SEQUENCE outbox.events_id_seq TO outbox_relay;
GRANT SELECT ON outbox.replays, outbox.schema_history TO outbox_relay;
GRANT EXECUTE ON FUNCTION
    outbox.claim_deliveries(bigint[], integer[], integer, text, interval, bigint),
    outbox.claim_deliveries_and_limits(bigint[], integer[], integer, text, interval, bigint, bigint[]),
    outbox.complete_deliveries(bigint[], text[], timestamptz[], integer[], text[], text[], timestamptz[], integer[], boolean[], bigint[], text),
    outbox.dispatch_events(integer),
    outbox.dispatch_ordered(integer),
    outbox.start_ordered_probe(),
    outbox.lock_ordered_subscriptions(bigint[]),
    outbox.advance_ordering_keys(bigint[], text[], bigint[]),
    outbox.event_type_matches(text[], text),
    outbox.max_payload_bytes(),
    outbox.replay(text[], text, text, text, timestamptz, timestamptz, uuid[], integer, text, text, boolean)
   TO outbox_relay;

COMMIT;

-- What each role can do now (one row per role and object).
SELECT grantee AS role, table_name AS object, string_agg(privilege_type, ', ' ORDER BY privilege_type) AS privileges
  FROM information_schema.role_table_grants
 WHERE table_schema = 'outbox' AND grantee IN ('outbox_producer', 'outbox_operator', 'outbox_relay')
 GROUP BY 1, 2
 ORDER BY 1, 2;
