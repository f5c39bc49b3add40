-- Correctness fixes found on review (issue 7): claims return the event they lease, results
-- are guarded by a token per claim, scheduled events stay out of the dispatcher's way, and a
-- subscription can switch between ordered and unordered without losing events.

-- ---------------------------------------------------------------------------------------
-- Scheduled events (deliver_after later than created_at) get an index of their own, keyed by
-- when they come due. The dispatcher used to walk one (priority, id) index and filter out
-- rows not yet due: with 100 000 events scheduled for tomorrow, every round read them all.
-- Now due-at-insert events come from the (priority, id) index and scheduled ones from a
-- range scan that stops at now(); a row is in exactly one of the two, so producers pay for
-- one index entry as before. Both predicates compare columns of the row only (immutable).
DROP INDEX outbox.events_undispatched_idx;
CREATE INDEX events_undispatched_idx ON outbox.events (priority DESC, id)
    WHERE dispatched_at IS NULL AND deliver_after <= created_at;
CREATE INDEX events_scheduled_idx ON outbox.events (deliver_after, id)
    WHERE dispatched_at IS NULL AND deliver_after > created_at;

-- ---------------------------------------------------------------------------------------
-- Unordered fan-out, as a function so that it can take a lock before its snapshot is taken:
-- every dispatcher holds 'outs'/0 shared while it fans out; a subscription switching between
-- ordered and unordered takes it exclusively (outbox.switch_ordering below). In READ
-- COMMITTED each statement of a function gets a fresh snapshot, so the fan-out statement,
-- which runs after the lock is granted, sees the subscription's new mode.
--
-- Claims up to batch_size due events of each kind (due at insert, in priority then id order;
-- scheduled and now due, in due order) with SKIP LOCKED, fans them out to every matching
-- enabled unordered subscription and marks them dispatched. Returns (events, deliveries).
CREATE FUNCTION outbox.dispatch_events(batch_size integer)
RETURNS TABLE (events bigint, deliveries bigint)
    LANGUAGE plpgsql VOLATILE
    AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock_shared(1869575539, 0);  -- 1869575539 = 'outs'
        RETURN QUERY
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
        ), marked AS (
            UPDATE outbox.events e SET dispatched_at = now()
             WHERE e.id IN (SELECT id FROM due_at_insert UNION ALL SELECT id FROM scheduled)
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
COMMENT ON FUNCTION outbox.dispatch_events(integer) IS
    'Internal (outbox-relay): fan due events out to unordered subscriptions and mark them dispatched.';

-- ---------------------------------------------------------------------------------------
-- Leases carry a token per claim. Results are written only where the token still matches,
-- so a relay that lost a lease (a long outage), then claimed the same delivery again, cannot
-- overwrite the newer attempt's outcome with the older one's.
ALTER TABLE outbox.deliveries ADD COLUMN lease_token bigint;
COMMENT ON COLUMN outbox.deliveries.lease_token IS
    'Internal: identifies one claim of this delivery; results carry it back and must match.';

-- The claim now returns the event's columns from its own UPDATE. A caller that joined
-- outbox.events afterwards did so under its statement's snapshot, taken before the
-- function's inner queries: a delivery fanned out for an event committed in between was
-- leased, dropped by the join, and never sent until its lease aged out.
DROP FUNCTION outbox.claim_deliveries(bigint[], integer[], integer, text, interval);
CREATE FUNCTION outbox.claim_deliveries(
    subscription_ids bigint[],
    wanted           integer[],
    total_limit      integer,
    lease_owner      text,
    lease_duration   interval,
    lease_token      bigint
) RETURNS TABLE (delivery_id bigint, subscription_id bigint, attempts integer, replay_id bigint,
                 delivery_ordering_key text, event_id uuid, event_type text, tenant_id text,
                 source_service text, created_at timestamptz, payload text, metadata text,
                 event_ordering_key text)
    LANGUAGE plpgsql VOLATILE
    ROWS 100
    AS $$
    DECLARE
        i          integer;
        sub_id     bigint;
        sub_limit  integer;
        quota      integer;
        remaining  integer := total_limit;
        claimed    integer;
    BEGIN
        FOR i IN 1 .. coalesce(cardinality(subscription_ids), 0) LOOP
            EXIT WHEN remaining <= 0;
            sub_id := subscription_ids[i];
            -- See V4: the quota is counted under this row lock, so max_in_flight holds
            -- across relays; a relay that finds it locked skips the subscription this round.
            SELECT s.max_in_flight INTO sub_limit
              FROM outbox.subscriptions s
             WHERE s.id = sub_id AND s.enabled
               FOR NO KEY UPDATE SKIP LOCKED;
            CONTINUE WHEN NOT FOUND;
            quota := least(wanted[i], remaining,
                           sub_limit - (SELECT count(*)::integer FROM outbox.deliveries f
                                         WHERE f.subscription_id = sub_id AND f.status = 'in_flight'));
            CONTINUE WHEN quota <= 0;
            RETURN QUERY
                WITH picked AS (
                    SELECT d.id FROM outbox.deliveries d
                     WHERE d.subscription_id = sub_id
                       AND d.status IN ('pending', 'failing')
                       AND NOT d.blocked
                       AND d.next_attempt_at <= now()
                     ORDER BY d.next_attempt_at, d.id
                     LIMIT quota
                       FOR UPDATE SKIP LOCKED
                )
                UPDATE outbox.deliveries d
                   SET status = 'in_flight', lease_owner = claim_deliveries.lease_owner,
                       lease_expires_at = now() + lease_duration,
                       lease_token = claim_deliveries.lease_token, updated_at = now()
                  FROM picked p, outbox.events e
                 WHERE d.id = p.id AND e.id = d.event_id
             RETURNING d.id, d.subscription_id, d.attempts, d.replay_id, d.ordering_key,
                       e.event_id, e.event_type, e.tenant_id, e.source_service, e.created_at,
                       e.payload::text, e.metadata::text, e.ordering_key;
            GET DIAGNOSTICS claimed = ROW_COUNT;
            remaining := remaining - claimed;
        END LOOP;
    END
    $$;
COMMENT ON FUNCTION outbox.claim_deliveries(bigint[], integer[], integer, text, interval, bigint) IS
    'Internal (outbox-relay): lease due, unblocked deliveries per subscription (max_in_flight across relays), with their events.';

-- ---------------------------------------------------------------------------------------
-- Switching a subscription between ordered and unordered. The two fan-out passes split the
-- events between them by the subscription's mode at the time each pass runs: the unordered
-- pass takes events as they come due; the ordered pass takes them in id order behind its
-- cursor. Without help, a switch loses events in both directions:
--   unordered -> ordered: events the ordered cursor already passed but the unordered pass had
--     not yet dispatched (a backlog, or deliver_after in the future);
--   ordered -> unordered: events the unordered pass already dispatched (skipping this
--     subscription) that the ordered cursor had not yet reached.
-- This trigger fans exactly that gap out, after waiting for both passes to be idle (their
-- locks), so neither pass can be halfway through a batch that read the old mode.
--
-- The contract, stated in the README: events fanned out after the switch follow the new
-- mode; deliveries created before it keep going as they were, except that an ordered
-- subscription switched to unordered releases its waiting (blocked) deliveries at once.
-- The switch holds the fan-out lock until its transaction ends: switch in a short one.
CREATE FUNCTION outbox.switch_ordering() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
    DECLARE
        cursor_at bigint;
    BEGIN
        -- Also while disabled: the gap would otherwise be lost for good once it is enabled
        -- again (claims skip a disabled subscription's deliveries until then).
        PERFORM pg_advisory_xact_lock(1869575539, 0);  -- no unordered fan-out in progress
        PERFORM pg_advisory_xact_lock(1869575538, 0);  -- no ordered fan-out in progress
        SELECT c.last_event_id INTO cursor_at FROM outbox.ordered_dispatch_cursor c;
        IF NEW.ordered THEN
            WITH matched AS (
                SELECT e.id AS event_id, e.ordering_key,
                       greatest(now(), e.deliver_after) AS due,
                       row_number() OVER (PARTITION BY e.ordering_key ORDER BY e.id) AS position
                  FROM outbox.events e
                 -- Undispatched events, through the dispatcher's two partial indexes.
                 WHERE e.id IN (SELECT u.id FROM outbox.events u
                                 WHERE u.dispatched_at IS NULL AND u.deliver_after <= u.created_at
                                UNION ALL
                                SELECT u.id FROM outbox.events u
                                 WHERE u.dispatched_at IS NULL AND u.deliver_after > u.created_at)
                   AND e.id <= cursor_at
                   AND outbox.event_type_matches(NEW.event_types, e.event_type)
                   AND (NEW.tenant_id IS NULL OR NEW.tenant_id = e.tenant_id)
                   AND (NEW.filter IS NULL OR e.payload @> NEW.filter)
                   AND (e.target_services IS NULL OR NEW.name = ANY (e.target_services))
            )
            INSERT INTO outbox.deliveries (event_id, subscription_id, ordering_key, next_attempt_at, blocked)
            SELECT m.event_id, NEW.id, m.ordering_key, m.due,
                   m.ordering_key IS NOT NULL AND (
                       m.position > 1
                       OR EXISTS (SELECT 1 FROM outbox.deliveries o
                                   WHERE o.subscription_id = NEW.id
                                     AND o.ordering_key = m.ordering_key
                                     AND o.status IN ('pending', 'in_flight', 'failing')))
              FROM matched m
             ORDER BY m.event_id
                ON CONFLICT (event_id, subscription_id) DO NOTHING;
        ELSE
            INSERT INTO outbox.deliveries (event_id, subscription_id)
            SELECT e.id, NEW.id
              FROM outbox.events e
             WHERE e.id > cursor_at AND e.dispatched_at IS NOT NULL
               AND outbox.event_type_matches(NEW.event_types, e.event_type)
               AND (NEW.tenant_id IS NULL OR NEW.tenant_id = e.tenant_id)
               AND (NEW.filter IS NULL OR e.payload @> NEW.filter)
               AND (e.target_services IS NULL OR NEW.name = ANY (e.target_services))
             ORDER BY e.id
                ON CONFLICT (event_id, subscription_id) DO NOTHING;
            UPDATE outbox.deliveries d
               SET blocked = false, updated_at = now()
             WHERE d.subscription_id = NEW.id AND d.blocked
               AND d.status IN ('pending', 'failing');
        END IF;
        RETURN NULL;
    END
    $$;
COMMENT ON FUNCTION outbox.switch_ordering() IS
    'Internal: fan out the events a subscription would miss when it switches between ordered and unordered (see V9).';
CREATE TRIGGER subscriptions_switch_ordering AFTER UPDATE OF ordered ON outbox.subscriptions
    FOR EACH ROW WHEN (OLD.ordered IS DISTINCT FROM NEW.ordered)
    EXECUTE FUNCTION outbox.switch_ordering();
