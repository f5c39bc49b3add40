-- A claim that says which subscriptions' max_in_flight held it back (issue 8, performance).
--
-- The relay's claim loop used to claim again whenever one of its requests finished and freed
-- a slot, in case the slot was what had kept a due delivery waiting. At a steady rate almost
-- nothing waits for a slot: each event's delivery is claimed as soon as the dispatcher makes
-- it, and the claim that follows its result finds nothing. Measured at a steady 300 events/s:
-- 1.66 claims per delivery, 0.29 ms of PostgreSQL time each.
--
-- With this function the relay knows when a freed slot can help: it returns, besides the
-- leased deliveries, one row with no delivery (delivery_id NULL) for each subscription that
-- may have more due deliveries than it was allowed to take:
-- * the claim took all it was allowed, whatever capped that: what the relay asked for (its
--   free slots, max_in_flight, rate tokens) or max_in_flight counted across relays (taking
--   less means nothing more was due);
-- * or the subscription's row was locked by another session (SKIP LOCKED), so nothing was
--   counted at all.
-- The relay then claims again when one of its slots is freed; otherwise it waits for new
-- deliveries, re-queued leases, results that make a delivery due (a retry due at once, the
-- next delivery of an ordered key), its rate limits, or the poll interval.
--
-- It also frees a subscription's max_in_flight room as soon as a request is answered, not
-- only once its result is written: the relay passes the deliveries it holds whose requests
-- have been answered but whose results are not written yet (answered), and the count of
-- in-flight rows leaves those out. max_in_flight limits the requests a subscriber is
-- sent at once; those are no longer at the subscriber. (The relay's own request slots,
-- OUTBOX_MAX_CONCURRENCY, are still freed only when results are written: that bounds what
-- a crash can re-send.) Measured on a drain of 100 000 events with max_in_flight 64, the
-- write took a good share of each slot's time: 128 slots ran 10-15 % faster than 64.
--
-- The body is V9's claim (V13's planner setting), with those rows and that count.
CREATE FUNCTION outbox.claim_deliveries_and_limits(
    subscription_ids bigint[],
    wanted           integer[],
    total_limit      integer,
    lease_owner      text,
    lease_duration   interval,
    lease_token      bigint,
    answered         bigint[]
) RETURNS TABLE (delivery_id bigint, subscription_id bigint, attempts integer, replay_id bigint,
                 delivery_ordering_key text, event_id uuid, event_type text, tenant_id text,
                 source_service text, created_at timestamptz, payload text, metadata text,
                 event_ordering_key text)
    LANGUAGE plpgsql VOLATILE
    ROWS 100
    SET enable_bitmapscan = off
    AS $$
    DECLARE
        i          integer;
        sub_id     bigint;
        sub_limit  integer;
        allowed    integer;
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
            IF NOT FOUND THEN
                -- Locked by another claim (or disabled since the relay last read it): what is
                -- due is unknown, so the relay should look again soon.
                delivery_id := NULL;
                subscription_id := sub_id;
                RETURN NEXT;
                CONTINUE;
            END IF;
            allowed := sub_limit - (SELECT count(*)::integer FROM outbox.deliveries f
                                     WHERE f.subscription_id = sub_id AND f.status = 'in_flight'
                                       -- Still leased to the caller: a lease that ran out
                                       -- and was claimed again is a request in flight.
                                       AND NOT (f.id = ANY (answered)
                                                AND f.lease_owner = claim_deliveries_and_limits.lease_owner));
            quota := least(wanted[i], remaining, allowed);
            claimed := 0;
            IF quota > 0 THEN
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
                       SET status = 'in_flight',
                           lease_owner = claim_deliveries_and_limits.lease_owner,
                           lease_expires_at = now() + lease_duration,
                           lease_token = claim_deliveries_and_limits.lease_token,
                           updated_at = now()
                      FROM picked p, outbox.events e
                     WHERE d.id = p.id AND e.id = d.event_id
                 RETURNING d.id, d.subscription_id, d.attempts, d.replay_id, d.ordering_key,
                           e.event_id, e.event_type, e.tenant_id, e.source_service, e.created_at,
                           e.payload::text, e.metadata::text, e.ordering_key;
                GET DIAGNOSTICS claimed = ROW_COUNT;
                remaining := remaining - claimed;
            END IF;
            -- Held back: all that was allowed was taken (taking less means nothing more was
            -- due).
            IF claimed >= greatest(quota, 0) THEN
                delivery_id := NULL;
                subscription_id := sub_id;
                RETURN NEXT;
            END IF;
        END LOOP;
    END
    $$;
COMMENT ON FUNCTION outbox.claim_deliveries_and_limits(bigint[], integer[], integer, text, interval, bigint, bigint[]) IS
    'Internal (outbox-relay): lease due, unblocked deliveries per subscription (max_in_flight across relays, not counting the caller''s answered requests), with their events; plus a row with no delivery for each subscription that got all it was allowed, or whose row another claim held.';

-- Kept for relays of an earlier version that run on during an upgrade (the schema is migrated
-- first): the same claim, without the rows that name no delivery.
CREATE OR REPLACE FUNCTION outbox.claim_deliveries(
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
    LANGUAGE sql VOLATILE
    ROWS 100
    AS $$
        SELECT * FROM outbox.claim_deliveries_and_limits($1, $2, $3, $4, $5, $6, '{}') c
         WHERE c.delivery_id IS NOT NULL
    $$;
