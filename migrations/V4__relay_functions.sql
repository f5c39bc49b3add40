-- Internal functions the relay calls. Not part of the public contract (SPEC.md): they may
-- change between versions. Each takes a whole batch, so one call is one round trip.

-- Claims due deliveries for the given subscriptions and leases them to `lease_owner`.
--
-- Per subscription, the claim takes at most min(wanted, max_in_flight - in flight now)
-- deliveries, in due order. The subscription row is locked (SKIP LOCKED) while its quota is
-- counted, so two relays never both fill the same free slots: max_in_flight holds across
-- relays. A relay that finds the row locked skips that subscription this round rather than
-- wait, so claims never queue behind each other or deadlock. Locking with FOR NO KEY UPDATE
-- does not conflict with the FOR KEY SHARE that inserting deliveries takes.
--
-- It returns each delivery's ordering_key from the claiming UPDATE itself: a caller joining
-- outbox.deliveries afterwards would read with its own statement snapshot, which misses
-- deliveries committed after it started (the function's inner queries see them), and such a
-- row would be leased but never sent.
CREATE FUNCTION outbox.claim_deliveries(
    subscription_ids bigint[],
    wanted           integer[],
    total_limit      integer,
    lease_owner      text,
    lease_duration   interval
) RETURNS TABLE (delivery_id bigint, subscription_id bigint, attempts integer, replay_id bigint,
                 event_row_id bigint, delivery_ordering_key text)
    LANGUAGE plpgsql VOLATILE
    -- Without this the planner assumes 1000 rows and turns the caller's join to events into
    -- a sequential scan once the table is large.
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
                       lease_expires_at = now() + lease_duration, updated_at = now()
                  FROM picked p
                 WHERE d.id = p.id
             RETURNING d.id, d.subscription_id, d.attempts, d.replay_id, d.event_id, d.ordering_key;
            GET DIAGNOSTICS claimed = ROW_COUNT;
            remaining := remaining - claimed;
        END LOOP;
    END
    $$;
COMMENT ON FUNCTION outbox.claim_deliveries(bigint[], integer[], integer, text, interval) IS
    'Internal (outbox-relay): lease due, unblocked deliveries per subscription, respecting max_in_flight across relays.';
