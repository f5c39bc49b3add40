-- Counting in-flight deliveries without walking every delivery finished since the last VACUUM
-- (issue 8, performance).
--
-- Each claim counts a subscription's in-flight deliveries (max_in_flight holds across
-- relays). A delivery that finishes leaves a dead entry in the in-flight index until VACUUM
-- removes it. A plain or index-only scan marks such entries dead the first time it meets
-- them, and later scans skip them; a bitmap scan never does. Without statistics (a new or
-- busy table, autovacuum behind) the planner chose the bitmap scan, so every count read every
-- delivery finished since the last VACUUM: 42 000 index entries and 1 400 heap pages, 2.9 ms
-- per subscription per claim, 60 000 deliveries into a drain (the drain fell from about
-- 4 000 to 1 400 deliveries/s between 20 000 and 100 000 events). Bitmap scans are off
-- inside the claim: every statement in it is a short index lookup, which a bitmap scan never
-- serves better. (A LIMIT on the count would invite a sequential scan instead: the planner
-- expects to find max_in_flight rows early in the table.) The body is V9's otherwise.
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
    LANGUAGE plpgsql VOLATILE
    ROWS 100
    SET enable_bitmapscan = off
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

