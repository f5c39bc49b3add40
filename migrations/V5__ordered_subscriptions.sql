-- Ordered subscriptions: per (subscription, ordering_key), one delivery in flight at a time,
-- in event id order, across all relays.
--
-- The hazard: identity values become visible out of commit order. Transaction A draws id 5,
-- transaction B draws id 6 and commits first; a consumer that sent 6 as soon as it was
-- visible would have to send 5 after it. So ordered fan-out only passes an id once every
-- transaction that could still hold a lower id has ended. It learns that with a probe:
--
-- * Before any row of an INSERT statement draws its id, a statement-level trigger gives the
--   producing transaction its xid (statement triggers fire before column defaults). So a
--   transaction holding an id had its xid before it drew that id.
-- * The probe, a transaction of its own (outbox.start_ordered_probe): it reads the last id
--   the sequence handed out (M), THEN gets its xid (P). Whoever drew an id <= M did so before
--   the read, so got its xid before P. (P must be assigned after the read: a transaction that
--   already had an xid, e.g. from locking a row, would break this.)
-- * Once the oldest running xid is past P (pg_snapshot_xmin > P), all of them have ended:
--   every id <= M is final, visible if committed, and can be fanned out in id order.
--
-- A probe normally completes on the next round (tens of milliseconds). The price: an open
-- write transaction older than the probe holds back ordered fan-out (never unordered
-- delivery) until it ends. Identity caching (CACHE > 1) would break the argument; the events
-- identity uses the default CACHE 1.

CREATE FUNCTION outbox.assign_producer_xid() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
    BEGIN
        PERFORM pg_current_xact_id();
        RETURN NULL;
    END
    $$;
COMMENT ON FUNCTION outbox.assign_producer_xid() IS
    'Internal: gives the inserting transaction its xid before any row draws an id (see V5__ordered_subscriptions.sql for why).';
CREATE TRIGGER events_assign_producer_xid BEFORE INSERT ON outbox.events
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.assign_producer_xid();

-- Where ordered fan-out has got to, and the probe in progress. One row.
CREATE TABLE outbox.ordered_dispatch_cursor (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_event_id  bigint NOT NULL,
    probe_xid      xid8,
    probe_last_id  bigint,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE outbox.ordered_dispatch_cursor IS
    'Internal: events up to last_event_id were offered to ordered subscriptions; ids up to probe_last_id are final once every xid up to probe_xid has ended.';
-- Ordered subscriptions see events inserted from now on, like a new subscription would.
INSERT INTO outbox.ordered_dispatch_cursor (last_event_id)
    SELECT coalesce(max(id), 0) FROM outbox.events;

-- The columns this builds on (deliveries.ordering_key, deliveries.blocked) and the claim
-- that skips blocked rows are in V1 and V4: every subscription uses the same claim.

-- Ordered fan-out and key advancement take this per-subscription advisory lock, so the
-- "is there an earlier open delivery for this key?" check and the "promote the next one"
-- step never race: whichever commits second sees the other's work.
CREATE FUNCTION outbox.lock_ordered_subscriptions(subscription_ids bigint[]) RETURNS void
    LANGUAGE sql VOLATILE
    AS $$
        SELECT pg_advisory_xact_lock(1869575538, id::integer)  -- 1869575538 = 'outr'
          FROM (SELECT DISTINCT unnest(subscription_ids) AS id ORDER BY 1) s
    $$;
COMMENT ON FUNCTION outbox.lock_ordered_subscriptions(bigint[]) IS
    'Internal: transaction-scoped advisory locks on ordered subscriptions, always in id order (no deadlocks).';

-- Fans final events out to ordered subscriptions, in id order, from the cursor. Only one
-- relay does this at a time (the others skip), so the deliveries of one key are created in
-- order. Returns (events passed, deliveries created, probe_pending): when no probe is
-- pending, the caller starts one with outbox.start_ordered_probe() in a new transaction.
CREATE FUNCTION outbox.dispatch_ordered(batch_size integer)
RETURNS TABLE (events bigint, deliveries bigint, probe_pending boolean)
    LANGUAGE plpgsql VOLATILE
    AS $$
    DECLARE
        cursor_row  outbox.ordered_dispatch_cursor%ROWTYPE;
        through_id  bigint;
        passed      bigint := 0;
        created     bigint := 0;
    BEGIN
        IF NOT pg_try_advisory_xact_lock(1869575538, 0) THEN
            RETURN QUERY SELECT 0::bigint, 0::bigint, false;
            RETURN;
        END IF;
        SELECT * INTO cursor_row FROM outbox.ordered_dispatch_cursor FOR UPDATE;

        IF cursor_row.probe_xid IS NOT NULL
           AND pg_snapshot_xmin(pg_current_snapshot()) > cursor_row.probe_xid THEN
            -- Every id up to probe_last_id is final: pass up to batch_size of them.
            SELECT max(b.id), count(*) INTO through_id, passed
              FROM (SELECT e.id FROM outbox.events e
                     WHERE e.id > cursor_row.last_event_id AND e.id <= cursor_row.probe_last_id
                     ORDER BY e.id LIMIT batch_size) b;
            IF passed < batch_size THEN
                through_id := cursor_row.probe_last_id;
            END IF;

            PERFORM outbox.lock_ordered_subscriptions(
                ARRAY(SELECT s.id FROM outbox.subscriptions s WHERE s.ordered AND s.enabled));

            -- A new statement, so a fresh snapshot: it sees every key advance committed
            -- before the locks above were granted.
            WITH matched AS (
                SELECT e.id AS event_id, s.id AS subscription_id, e.ordering_key,
                       greatest(now(), e.deliver_after) AS due,
                       row_number() OVER (PARTITION BY s.id, e.ordering_key ORDER BY e.id) AS position
                  FROM outbox.events e
                  JOIN outbox.subscriptions s
                    ON s.ordered AND s.enabled
                   AND outbox.event_type_matches(s.event_types, e.event_type)
                   AND (s.tenant_id IS NULL OR s.tenant_id = e.tenant_id)
                   AND (s.filter IS NULL OR e.payload @> s.filter)
                   AND (e.target_services IS NULL OR s.name = ANY (e.target_services))
                 WHERE e.id > cursor_row.last_event_id AND e.id <= through_id
            )
            INSERT INTO outbox.deliveries (event_id, subscription_id, ordering_key, next_attempt_at, blocked)
            SELECT m.event_id, m.subscription_id, m.ordering_key, m.due,
                   m.ordering_key IS NOT NULL AND (
                       m.position > 1
                       OR EXISTS (SELECT 1 FROM outbox.deliveries o
                                   WHERE o.subscription_id = m.subscription_id
                                     AND o.ordering_key = m.ordering_key
                                     AND o.status IN ('pending', 'in_flight', 'failing')))
              FROM matched m
             ORDER BY m.event_id, m.subscription_id
                ON CONFLICT (event_id, subscription_id) DO NOTHING;
            GET DIAGNOSTICS created = ROW_COUNT;

            cursor_row.last_event_id := through_id;
            IF through_id >= cursor_row.probe_last_id THEN
                cursor_row.probe_xid := NULL;
                cursor_row.probe_last_id := NULL;
            END IF;
        END IF;

        UPDATE outbox.ordered_dispatch_cursor
           SET last_event_id = cursor_row.last_event_id, probe_xid = cursor_row.probe_xid,
               probe_last_id = cursor_row.probe_last_id, updated_at = now();
        RETURN QUERY SELECT passed, created, cursor_row.probe_xid IS NOT NULL;
    END
    $$;
COMMENT ON FUNCTION outbox.dispatch_ordered(integer) IS
    'Internal (outbox-relay): fan final events out to ordered subscriptions in id order.';

-- Starts a probe if none is pending and ids were drawn past the cursor. Must be called in a
-- transaction of its own that has no xid yet (autocommit), so that its xid is assigned
-- after the sequence is read. Returns true when a probe is pending afterwards.
CREATE FUNCTION outbox.start_ordered_probe() RETURNS boolean
    LANGUAGE plpgsql VOLATILE
    AS $$
    DECLARE
        drawn     bigint;
        cursor_at bigint;
        probe     xid8;
    BEGIN
        IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
            RAISE EXCEPTION 'outbox.start_ordered_probe() must run in a transaction of its own'
                USING HINT = 'Call it in autocommit mode, not after other writes in the same transaction.';
        END IF;
        SELECT c.last_event_id, c.probe_xid INTO cursor_at, probe FROM outbox.ordered_dispatch_cursor c;
        IF probe IS NOT NULL THEN
            RETURN true;
        END IF;
        -- Read the sequence first, then take an xid: the order is the whole argument.
        SELECT CASE WHEN q.is_called THEN q.last_value ELSE q.last_value - 1 END INTO drawn
          FROM outbox.events_id_seq q;
        IF drawn <= cursor_at THEN
            RETURN false;
        END IF;
        probe := pg_current_xact_id();
        UPDATE outbox.ordered_dispatch_cursor
           SET probe_xid = probe, probe_last_id = drawn, updated_at = now()
         WHERE probe_xid IS NULL;
        RETURN true;
    END
    $$;
COMMENT ON FUNCTION outbox.start_ordered_probe() IS
    'Internal (outbox-relay): note the last drawn event id and an xid taken after it; see V8.';

-- Promotes the next delivery of each given key once its head is delivered or dead. Call it
-- in the transaction that finished the head, after outbox.lock_ordered_subscriptions.
-- `finished` lists the deliveries that transaction just finished (their new status may not
-- be visible to this statement's snapshot, so they are excluded by id).
CREATE FUNCTION outbox.advance_ordering_keys(subscription_ids bigint[], ordering_keys text[], finished bigint[])
RETURNS bigint
    LANGUAGE sql VOLATILE
    AS $$
        WITH keys AS (
            SELECT DISTINCT k.subscription_id, k.ordering_key
              FROM unnest(subscription_ids, ordering_keys) AS k(subscription_id, ordering_key)
             WHERE k.ordering_key IS NOT NULL
        ), heads AS (
            SELECT (SELECT n.id FROM outbox.deliveries n
                     WHERE n.subscription_id = k.subscription_id AND n.ordering_key = k.ordering_key
                       AND n.status IN ('pending', 'failing') AND n.blocked
                     ORDER BY n.event_id LIMIT 1) AS id
              FROM keys k
             WHERE NOT EXISTS (SELECT 1 FROM outbox.deliveries o
                                WHERE o.subscription_id = k.subscription_id AND o.ordering_key = k.ordering_key
                                  AND NOT o.blocked AND o.status IN ('pending', 'in_flight', 'failing')
                                  AND o.id <> ALL (finished))
        ), promoted AS (
            UPDATE outbox.deliveries d SET blocked = false, updated_at = now()
              FROM heads h WHERE d.id = h.id
            RETURNING 1
        )
        SELECT count(*) FROM promoted
    $$;
COMMENT ON FUNCTION outbox.advance_ordering_keys(bigint[], text[], bigint[]) IS
    'Internal (outbox-relay): unblock the next delivery of each ordered key whose head finished.';
