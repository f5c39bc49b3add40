-- Replay and backfill (SPEC.md, "Replay"): the audited way to send deliveries again.
--
-- Both functions are SECURITY DEFINER (they run with the privileges of the schema owner that
-- ran the migrations, with a pinned search_path), so an operator role needs EXECUTE on them
-- and nothing more to re-queue deliveries: it never gets UPDATE on outbox.deliveries, and
-- every re-queue it makes is recorded in outbox.replays. EXECUTE is revoked from PUBLIC below
-- and granted by sql/roles.sql.
--
-- What one call can and cannot promise about locks. A function runs inside the caller's
-- transaction, so nothing it does is visible, and no row lock it takes is released, before
-- the caller commits. What these functions do instead:
--   * the set of deliveries is bounded by max_events;
--   * replay locks its rows with FOR UPDATE SKIP LOCKED, in delivery id order, in chunks of
--     1000 rows per UPDATE: it never waits for a row a relay is claiming, and the relay's
--     claims skip the rows it holds in turn; it never touches in_flight rows, the only ones
--     the relay's completer writes; each statement stays small;
--   * backfill only inserts new rows, which nobody else can see or wait for until commit.
-- So: call them in their own short transaction (psql autocommit does that), and split very
-- large replays into several calls (e.g. by created_after / created_before windows).

-- The checks replay and backfill share, with the caller's name in each message.
CREATE FUNCTION outbox.check_replay_criteria(
    caller          text,
    event_type      text,
    created_after   timestamptz,
    created_before  timestamptz,
    max_events      integer,
    max_events_hint text
) RETURNS void
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, outbox, pg_temp
    AS $$
    BEGIN
        IF max_events IS NULL OR max_events < 1 THEN
            RAISE EXCEPTION '%: max_events must be at least 1 (got %)', caller, coalesce(max_events::text, 'NULL')
                USING ERRCODE = 'invalid_parameter_value', HINT = max_events_hint;
        END IF;
        IF event_type IS NOT NULL AND NOT outbox.are_valid_event_type_patterns(ARRAY[event_type]) THEN
            RAISE EXCEPTION '%: event_type % is neither an event type nor a glob', caller, quote_literal(event_type)
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Use an exact type such as lead.created or a glob with * such as lead.*';
        END IF;
        IF created_after IS NOT NULL AND created_before IS NOT NULL AND created_after >= created_before THEN
            RAISE EXCEPTION '%: created_after (%) must be earlier than created_before (%)',
                            caller, created_after, created_before
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'The window is created_after <= events.created_at < created_before.';
        END IF;
    END
    $$;
REVOKE ALL ON FUNCTION outbox.check_replay_criteria(text, text, timestamptz, timestamptz, integer, text) FROM PUBLIC;

CREATE FUNCTION outbox.replay(
    status         text[] DEFAULT '{dead}',
    subscription   text DEFAULT NULL,
    event_type     text DEFAULT NULL,
    tenant_id      text DEFAULT NULL,
    created_after  timestamptz DEFAULT NULL,
    created_before timestamptz DEFAULT NULL,
    event_ids      uuid[] DEFAULT NULL,
    max_events     integer DEFAULT 10000,
    requested_by   text DEFAULT current_user,
    reason         text DEFAULT NULL,
    dry_run        boolean DEFAULT false
) RETURNS TABLE (replay_id bigint, matched bigint)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, outbox, pg_temp
    AS $$
    #variable_conflict error
    DECLARE
        known      constant text[] := ARRAY['pending', 'in_flight', 'delivered', 'failing', 'dead'];
        chunk_size constant integer := 1000;
        sub_id     bigint;
        sub_on     boolean;
        cond       text;
        candidates bigint[];
        found_n    bigint;
        done       bigint := 0;
        n          bigint;
        i          integer;
        new_id     bigint;
    BEGIN
        -- Refuse bad input before anything is written.
        IF replay.status IS NULL OR cardinality(replay.status) = 0 OR array_position(replay.status, NULL) IS NOT NULL THEN
            RAISE EXCEPTION 'outbox.replay: status must be a non-empty list of delivery statuses'
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'e.g. status => ''{dead}'' or status => ''{dead,failing}''.';
        END IF;
        IF NOT (replay.status <@ known) THEN
            RAISE EXCEPTION 'outbox.replay: unknown delivery status in %', replay.status
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Statuses are pending, in_flight, delivered, failing and dead; replay accepts all but in_flight.';
        END IF;
        IF 'in_flight' = ANY (replay.status) THEN
            RAISE EXCEPTION 'outbox.replay: in_flight deliveries cannot be replayed: a relay holds them and is sending them now'
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Wait for the attempt to finish (or its lease to expire), then replay the failing, dead or delivered ones.';
        END IF;
        PERFORM outbox.check_replay_criteria('outbox.replay', replay.event_type, replay.created_after,
            replay.created_before, replay.max_events,
            'It bounds how many deliveries one call re-queues; use dry_run => true to count first.');
        IF replay.subscription IS NOT NULL THEN
            SELECT s.id, s.enabled INTO sub_id, sub_on FROM outbox.subscriptions s WHERE s.name = replay.subscription;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'outbox.replay: no subscription named %', quote_literal(replay.subscription)
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'SELECT name FROM outbox.subscriptions lists them.';
            END IF;
            IF NOT sub_on THEN
                RAISE NOTICE 'outbox.replay: subscription % is disabled; re-queued deliveries wait until it is enabled again',
                             replay.subscription;
            END IF;
        END IF;

        -- The criteria as SQL text, so each call is planned with its own values: the status
        -- list written as a literal lets the planner prove that the partial indexes apply
        -- (deliveries_failed_idx for dead/failing, deliveries_due_idx for pending/failing),
        -- and absent criteria disappear instead of becoming "$n IS NULL OR ...".
        cond := format('d.status = ANY (%L::text[]) AND d.subscription_id IS NOT NULL', replay.status)
             || CASE WHEN sub_id IS NOT NULL THEN ' AND d.subscription_id = $1' ELSE '' END
             || CASE WHEN replay.event_type IS NOT NULL
                     THEN ' AND outbox.event_type_matches(ARRAY[$2], e.event_type)' ELSE '' END
             || CASE WHEN replay.tenant_id IS NOT NULL THEN ' AND e.tenant_id = $3' ELSE '' END
             || CASE WHEN replay.created_after IS NOT NULL THEN ' AND e.created_at >= $4' ELSE '' END
             || CASE WHEN replay.created_before IS NOT NULL THEN ' AND e.created_at < $5' ELSE '' END
             || CASE WHEN replay.event_ids IS NOT NULL THEN ' AND e.event_id = ANY ($6)' ELSE '' END;

        -- The candidates, in delivery id order, read once without locks. One more than
        -- max_events is read only to tell the caller that the limit cut the set short.
        EXECUTE 'SELECT array_agg(id ORDER BY id) FROM (SELECT d.id FROM outbox.deliveries d'
                || ' JOIN outbox.events e ON e.id = d.event_id WHERE ' || cond
                || ' ORDER BY d.id LIMIT $7) c'
           INTO candidates
          USING sub_id, replay.event_type, replay.tenant_id, replay.created_after,
                replay.created_before, replay.event_ids, replay.max_events::bigint + 1;
        found_n := coalesce(cardinality(candidates), 0);
        IF found_n > replay.max_events THEN
            RAISE NOTICE 'outbox.replay: more than % deliveries match; only the first % (by delivery id) are %',
                         replay.max_events, replay.max_events,
                         CASE WHEN replay.dry_run THEN 'counted' ELSE 're-queued' END
                USING HINT = 'Call again (a replayed delivery no longer matches status dead or failing) or raise max_events.';
            candidates := candidates[1:replay.max_events];
            found_n := replay.max_events;
        END IF;

        INSERT INTO outbox.replays (requested_by, reason, criteria, matched, dry_run)
        VALUES (coalesce(replay.requested_by, session_user), replay.reason,
                jsonb_strip_nulls(jsonb_build_object(
                    'status', to_jsonb(replay.status),
                    'subscription', replay.subscription,
                    'event_type', replay.event_type,
                    'tenant_id', replay.tenant_id,
                    'created_after', replay.created_after,
                    'created_before', replay.created_before,
                    'event_ids', to_jsonb(replay.event_ids),
                    'max_events', replay.max_events)),
                CASE WHEN replay.dry_run THEN found_n ELSE 0 END,
                coalesce(replay.dry_run, false))
        RETURNING id INTO new_id;

        IF coalesce(replay.dry_run, false) THEN
            RETURN QUERY SELECT new_id, found_n;
            RETURN;
        END IF;

        -- Ordered subscriptions among the candidates: their per-key advisory locks are taken
        -- first, before any row lock, in the same order the relay's completer and ordered
        -- fan-out take them, so a replay never deadlocks with them and "is another delivery
        -- of this key open?" is answered without a race.
        PERFORM outbox.lock_ordered_subscriptions(array_agg(DISTINCT d.subscription_id))
           FROM outbox.deliveries d JOIN outbox.subscriptions s ON s.id = d.subscription_id
          WHERE d.id = ANY (candidates) AND s.ordered AND d.ordering_key IS NOT NULL;

        -- Re-queue in chunks, each locking only rows nobody else holds, and re-checking
        -- status and subscription on the current row version (a failing delivery may have
        -- been claimed since the candidates were read; it is then left alone). A delivery
        -- with an ordering key waits (blocked) behind an open delivery of its key, or behind
        -- an earlier event of its key re-queued with it, so its key keeps one in flight.
        i := 1;
        WHILE i <= found_n LOOP
            WITH locked AS (
                SELECT d.id, d.subscription_id, d.ordering_key, d.event_id FROM outbox.deliveries d
                 WHERE d.id = ANY (candidates[i:i + chunk_size - 1])
                   AND d.status = ANY (replay.status)
                   AND d.subscription_id IS NOT NULL
                   AND (sub_id IS NULL OR d.subscription_id = sub_id)
                 ORDER BY d.id
                   FOR UPDATE SKIP LOCKED
            ), requeued AS (
                SELECT l.id,
                       l.ordering_key IS NOT NULL AND (
                           row_number() OVER (PARTITION BY l.subscription_id, l.ordering_key ORDER BY l.event_id) > 1
                           OR EXISTS (SELECT 1 FROM outbox.deliveries o
                                       WHERE o.subscription_id = l.subscription_id
                                         AND o.ordering_key = l.ordering_key
                                         AND o.id <> l.id
                                         AND NOT o.blocked
                                         AND o.status IN ('pending', 'in_flight', 'failing'))) AS blocked
                  FROM locked l
            )
            UPDATE outbox.deliveries d
               SET status = 'pending',
                   attempts = 0,
                   next_attempt_at = now(),
                   last_status_code = NULL,
                   last_error = NULL,
                   lease_owner = NULL,
                   lease_expires_at = NULL,
                   blocked = r.blocked,
                   replay_id = new_id,
                   updated_at = now()
              FROM requeued r
             WHERE d.id = r.id;
            GET DIAGNOSTICS n = ROW_COUNT;
            done := done + n;
            i := i + chunk_size;
        END LOOP;

        UPDATE outbox.replays r SET matched = done WHERE r.id = new_id;
        RETURN QUERY SELECT new_id, done;
    END
    $$;

COMMENT ON FUNCTION outbox.replay(text[], text, text, text, timestamptz, timestamptz, uuid[], integer, text, text, boolean) IS
$$Re-queue deliveries (fresh attempt budget, due now) and record the request in outbox.replays; returns (replay_id, matched).
Selects deliveries whose status is in status (default {dead}; in_flight is refused: a relay holds those), of the named subscription, whose event matches event_type (exact or * glob), tenant_id, created_after <= events.created_at < created_before and event_ids (events.event_id uuids). Absent (NULL) criteria do not filter. Deliveries of removed subscriptions are never selected.
Re-queued: status pending, attempts 0, next_attempt_at now(), last_status_code and last_error cleared (the failed attempts stay in outbox.delivery_attempts), replay_id = the new replay, which the relay copies onto the attempts it makes. The relay sends the same webhook-id and body bytes as before.
max_events (>= 1) bounds the number of deliveries (not events) re-queued, lowest delivery id first; a NOTICE says when it cut the set short. matched = deliveries actually re-queued: a row locked by a relay at that instant is skipped, not waited for.
dry_run => true changes no delivery: it counts what would be re-queued and records the replays row with dry_run = true.
Limits: runs in the caller's transaction, so re-queued rows stay locked (relays skip them) and invisible until commit; use a short transaction per call and split very large replays into several calls. Ordered subscriptions: the key keeps one delivery in flight: a re-queued delivery waits behind an open delivery of its key and behind earlier events of its key re-queued with it, then goes next (lowest event first). It is sent after later events its key already delivered (the key moved on when it died). Security definer: EXECUTE is the only privilege a caller needs.$$;
REVOKE ALL ON FUNCTION outbox.replay(text[], text, text, text, timestamptz, timestamptz, uuid[], integer, text, text, boolean) FROM PUBLIC;

CREATE FUNCTION outbox.backfill(
    subscription   text,
    created_after  timestamptz,
    created_before timestamptz DEFAULT now(),
    event_type     text DEFAULT NULL,
    max_events     integer DEFAULT 100000,
    requested_by   text DEFAULT current_user,
    reason         text DEFAULT NULL
) RETURNS TABLE (replay_id bigint, matched bigint)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, outbox, pg_temp
    AS $$
    #variable_conflict error
    DECLARE
        sub    outbox.subscriptions%ROWTYPE;
        new_id bigint;
        done   bigint;
    BEGIN
        IF backfill.subscription IS NULL THEN
            RAISE EXCEPTION 'outbox.backfill: subscription is required'
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Name the subscription that should receive past events, e.g. subscription => ''ai-agents''.';
        END IF;
        SELECT * INTO sub FROM outbox.subscriptions s WHERE s.name = backfill.subscription;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'outbox.backfill: no subscription named %', quote_literal(backfill.subscription)
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'SELECT name FROM outbox.subscriptions lists them.';
        END IF;
        IF NOT sub.enabled THEN
            RAISE EXCEPTION 'outbox.backfill: subscription % is disabled (%)', quote_literal(sub.name),
                            coalesce(sub.disabled_reason, 'no reason recorded')
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = format('Enable it first: UPDATE outbox.subscriptions SET enabled = true, disabled_reason = NULL WHERE name = %L;', sub.name);
        END IF;
        IF backfill.created_after IS NULL OR backfill.created_before IS NULL THEN
            RAISE EXCEPTION 'outbox.backfill: created_after and created_before must not be NULL'
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Use created_after => ''-infinity'' for all history.';
        END IF;
        PERFORM outbox.check_replay_criteria('outbox.backfill', backfill.event_type, backfill.created_after,
            backfill.created_before, backfill.max_events, 'It bounds how many deliveries one call creates.');

        INSERT INTO outbox.replays (requested_by, reason, criteria, matched, dry_run)
        VALUES (coalesce(backfill.requested_by, session_user), backfill.reason,
                jsonb_strip_nulls(jsonb_build_object(
                    'backfill', true,
                    'subscription', sub.name,
                    'created_after', backfill.created_after,
                    'created_before', backfill.created_before,
                    'event_type', backfill.event_type,
                    'max_events', backfill.max_events)),
                0, false)
        RETURNING id INTO new_id;

        -- An ordered subscription's per-key lock, as ordered fan-out takes it, so the
        -- blocked flags computed below cannot race with a key advancing.
        IF sub.ordered THEN
            PERFORM outbox.lock_ordered_subscriptions(ARRAY[sub.id]);
        END IF;

        -- The dispatcher's matching rules (src/db/sql.rs DISPATCH_EVENTS) with the
        -- subscription as it is now. Only dispatched events: an undispatched one (including
        -- one scheduled for later with deliver_after) will be fanned out by the dispatcher
        -- itself, at its time. One statement: the new rows lock nothing anyone waits for.
        WITH picked AS (
            SELECT e.id
              FROM outbox.events e
             WHERE e.created_at >= backfill.created_after
               AND e.created_at < backfill.created_before
               AND e.dispatched_at IS NOT NULL
               AND outbox.event_type_matches(sub.event_types, e.event_type)
               AND (backfill.event_type IS NULL OR outbox.event_type_matches(ARRAY[backfill.event_type], e.event_type))
               AND (sub.tenant_id IS NULL OR e.tenant_id = sub.tenant_id)
               AND (sub.filter IS NULL OR e.payload @> sub.filter)
               AND (e.target_services IS NULL OR sub.name = ANY (e.target_services))
               AND NOT EXISTS (SELECT 1 FROM outbox.deliveries x
                                WHERE x.event_id = e.id AND x.subscription_id = sub.id)
             ORDER BY e.id
             LIMIT backfill.max_events
        ), inserted AS (
            INSERT INTO outbox.deliveries (event_id, subscription_id, status, next_attempt_at, replay_id,
                                           ordering_key, blocked)
            SELECT p.id, sub.id, 'pending', now(), new_id, k.ordering_key,
                   k.ordering_key IS NOT NULL AND (
                       row_number() OVER (PARTITION BY k.ordering_key ORDER BY p.id) > 1
                       OR EXISTS (SELECT 1 FROM outbox.deliveries o
                                   WHERE o.subscription_id = sub.id AND o.ordering_key = k.ordering_key
                                     AND NOT o.blocked AND o.status IN ('pending', 'in_flight', 'failing')))
              FROM picked p
              JOIN outbox.events e ON e.id = p.id
             CROSS JOIN LATERAL (SELECT CASE WHEN sub.ordered THEN e.ordering_key END AS ordering_key) k
             ORDER BY p.id
                ON CONFLICT (event_id, subscription_id) DO NOTHING
            RETURNING 1
        )
        SELECT count(*) INTO done FROM inserted;

        UPDATE outbox.replays r SET matched = done WHERE r.id = new_id;
        RETURN QUERY SELECT new_id, done;
    END
    $$;

COMMENT ON FUNCTION outbox.backfill(text, timestamptz, timestamptz, text, integer, text, text) IS
$$Deliver past events to a subscription that never had them (a new subscriber catching up); returns (replay_id, matched), like outbox.replay.
Creates one pending delivery, due now and carrying replay_id, for each already dispatched event with created_after <= created_at < created_before that matches the subscription's current rules (event_types, tenant_id, filter, and the event's target_services), optionally narrowed by event_type (exact or * glob), and that has no delivery for this subscription yet. At most max_events deliveries, oldest event (lowest id) first; matched = deliveries created. Recorded in outbox.replays with criteria {"backfill": true, "subscription": ...}.
Refuses an unknown or disabled subscription. Events not yet dispatched are left to the dispatcher. Ordered subscriptions: backfilled deliveries carry their event's ordering_key and go one at a time per key, oldest first, behind any delivery of the key already open. There is no dry run: run it in a transaction and ROLLBACK to count. Limits: runs in the caller's transaction, so the new deliveries are sent only after commit; the scan reads every event in the window (events_created_at_idx), so keep windows reasonable on large tables. Security definer: EXECUTE is the only privilege a caller needs.$$;
REVOKE ALL ON FUNCTION outbox.backfill(text, timestamptz, timestamptz, text, integer, text, text) FROM PUBLIC;
