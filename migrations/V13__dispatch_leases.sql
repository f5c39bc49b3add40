-- Deliveries created already leased (issue 8, performance).
--
-- Until now every delivery was written three times: inserted pending by the dispatcher,
-- updated to in_flight by the claim, updated to its result by the completer. Each write is a
-- new row version with entries in every index it belongs to (none of them HOT, since the
-- status is in the partial indexes' predicates). When the relay that fans an event out has
-- request slots free, it can lease the new deliveries in the same INSERT and start their
-- requests from the rows this function returns: one row version, four index entries and a
-- claim round trip fewer per delivery.
--
-- The lease is taken under the same rules as outbox.claim_deliveries:
--   * per subscription, under its row lock (FOR NO KEY UPDATE SKIP LOCKED), at most
--     max_in_flight in flight across all relays, counted under that lock;
--   * at most wanted[i] for subscription_ids[i] and total_limit in all (the caller's free
--     request slots and rate-limit tokens);
--   * only while the subscription has no older due delivery waiting: a fresh delivery never
--     overtakes a due one of the same subscription, so claiming stays first due, first sent.
-- Deliveries beyond the quotas are inserted pending, as before, and claimed as usual.
--
-- Paced (paced_batch_floor not NULL): the relay creates deliveries when it can lease them.
-- If no subscription can lease now (all slots taken, or every subscription at its
-- max_in_flight or with older due deliveries waiting), nothing is dispatched and the summary
-- says held_back: new deliveries would only wait pending behind those. Otherwise the batch
-- is about what the quotas can take: the largest quota, and no more than total_limit shared
-- by the subscriptions that can lease, but at least paced_batch_floor (below that a round's
-- fixed cost outweighs the claims saved) and at most batch_size. The relay
-- stops pacing for a while when it has held back too long (see relay/dispatcher.rs).
--
-- Returns one summary row (delivery_id NULL) with (events dispatched, deliveries created,
-- held back), then one row per delivery leased, with the event fields its request is built from (the
-- same columns, in the same order, as outbox.claim_deliveries returns).
--
-- The one-argument outbox.dispatch_events stays for relays of the previous version while a
-- rolling upgrade runs; both fan out under the same advisory lock and the same matching.
CREATE FUNCTION outbox.dispatch_events(
    batch_size       integer,
    subscription_ids bigint[],
    wanted           integer[],
    total_limit      integer,
    lease_owner      text,
    lease_duration   interval,
    lease_token      bigint,
    paced_batch_floor integer
) RETURNS TABLE (events bigint, deliveries bigint, held_back boolean,
                 delivery_id bigint, subscription_id bigint, attempts integer, replay_id bigint,
                 event_id uuid, event_type text, tenant_id text, source_service text,
                 created_at timestamptz, payload text, metadata text, event_ordering_key text)
    LANGUAGE plpgsql VOLATILE
    ROWS 100
    SET enable_bitmapscan = off
    AS $$
    #variable_conflict use_column
    DECLARE
        i            integer;
        sub_id       bigint;
        sub_limit    integer;
        quota        integer;
        lease_subs   bigint[] := '{}';
        lease_quotas integer[] := '{}';
        event_limit  integer := batch_size;
    BEGIN
        PERFORM pg_advisory_xact_lock_shared(1869575539, 0);  -- 1869575539 = 'outs', see V9
        FOR i IN 1 .. coalesce(cardinality(subscription_ids), 0) LOOP
            sub_id := subscription_ids[i];
            CONTINUE WHEN coalesce(wanted[i], 0) <= 0;
            SELECT s.max_in_flight INTO sub_limit
              FROM outbox.subscriptions s
             WHERE s.id = sub_id AND s.enabled AND NOT s.ordered
               FOR NO KEY UPDATE SKIP LOCKED;
            CONTINUE WHEN NOT FOUND;
            CONTINUE WHEN EXISTS (
                SELECT 1 FROM outbox.deliveries d
                 WHERE d.subscription_id = sub_id
                   AND d.status IN ('pending', 'failing')
                   AND NOT d.blocked
                   AND d.next_attempt_at <= now());
            quota := least(wanted[i],
                           sub_limit - (SELECT count(*)::integer FROM outbox.deliveries f
                                         WHERE f.subscription_id = sub_id AND f.status = 'in_flight'));
            CONTINUE WHEN quota <= 0;
            lease_subs := lease_subs || sub_id;
            lease_quotas := lease_quotas || quota;
        END LOOP;
        IF paced_batch_floor IS NOT NULL THEN
            IF cardinality(lease_quotas) = 0 THEN
                RETURN QUERY SELECT 0::bigint, 0::bigint, true,
                       NULL::bigint, NULL::bigint, NULL::integer, NULL::bigint, NULL::uuid,
                       NULL::text, NULL::text, NULL::text, NULL::timestamptz, NULL::text,
                       NULL::text, NULL::text;
                RETURN;
            END IF;
            -- As if every event went to every subscription that can lease: each gets about
            -- its quota, and together no more than the slots set aside.
            event_limit := least(batch_size,
                                 greatest(paced_batch_floor,
                                          least((SELECT max(q) FROM unnest(lease_quotas) AS q),
                                                ceil(total_limit::numeric
                                                     / cardinality(lease_quotas))::integer)));
        END IF;

        RETURN QUERY
        WITH due_at_insert AS (
            SELECT e.id FROM outbox.events e
             WHERE e.dispatched_at IS NULL AND e.deliver_after <= e.created_at
               AND e.deliver_after <= now()  -- created_at may be set in the future by the producer
             ORDER BY e.priority DESC, e.id
             LIMIT event_limit
               FOR UPDATE SKIP LOCKED
        ), scheduled AS (
            SELECT e.id FROM outbox.events e
             WHERE e.dispatched_at IS NULL AND e.deliver_after > e.created_at
               AND e.deliver_after <= now()
             ORDER BY e.deliver_after, e.id
             LIMIT event_limit
               FOR UPDATE SKIP LOCKED
        ), marked AS (
            UPDATE outbox.events e SET dispatched_at = now()
             WHERE e.id IN (SELECT id FROM due_at_insert UNION ALL SELECT id FROM scheduled)
         RETURNING e.id, e.event_id, e.event_type, e.tenant_id, e.source_service, e.created_at,
                   e.payload, e.metadata, e.ordering_key, e.target_services
        ), fanned_out AS (
            SELECT m.id AS event_row, s.id AS sub_id,
                   row_number() OVER (PARTITION BY s.id ORDER BY m.id) AS nth
              FROM marked m
              JOIN outbox.subscriptions s
                ON s.enabled
               AND NOT s.ordered
               AND outbox.event_type_matches(s.event_types, m.event_type)
               AND (s.tenant_id IS NULL OR s.tenant_id = m.tenant_id)
               AND (s.filter IS NULL OR m.payload @> s.filter)
               AND (m.target_services IS NULL OR s.name = ANY (m.target_services))
        ), to_lease AS (
            -- Round-robin across subscriptions (every subscription's first, then its
            -- second...), in the caller's order, so a short total_limit is shared.
            SELECT f.event_row, f.sub_id
              FROM fanned_out f
              JOIN unnest(lease_subs, lease_quotas) WITH ORDINALITY AS q(sub_id, quota, pos)
                ON q.sub_id = f.sub_id AND f.nth <= q.quota
             ORDER BY f.nth, q.pos
             LIMIT greatest(total_limit, 0)
        ), inserted AS (
            INSERT INTO outbox.deliveries AS d
                   (event_id, subscription_id, status, lease_owner, lease_expires_at, lease_token)
            SELECT f.event_row, f.sub_id,
                   CASE WHEN l.sub_id IS NULL THEN 'pending' ELSE 'in_flight' END,
                   CASE WHEN l.sub_id IS NULL THEN NULL ELSE dispatch_events.lease_owner END,
                   CASE WHEN l.sub_id IS NULL THEN NULL ELSE now() + dispatch_events.lease_duration END,
                   CASE WHEN l.sub_id IS NULL THEN NULL ELSE dispatch_events.lease_token END
              FROM fanned_out f
              LEFT JOIN to_lease l ON l.event_row = f.event_row AND l.sub_id = f.sub_id
             ORDER BY f.event_row, f.sub_id
                ON CONFLICT ON CONSTRAINT deliveries_event_subscription_key DO NOTHING
         RETURNING d.id, d.event_id AS event_row, d.subscription_id, d.status, d.attempts, d.replay_id
        )
        SELECT (SELECT count(*) FROM marked), (SELECT count(*) FROM inserted), false,
               NULL::bigint, NULL::bigint, NULL::integer, NULL::bigint, NULL::uuid, NULL::text,
               NULL::text, NULL::text, NULL::timestamptz, NULL::text, NULL::text, NULL::text
        UNION ALL
        SELECT NULL, NULL, NULL, ins.id, ins.subscription_id, ins.attempts, ins.replay_id,
               m.event_id, m.event_type, m.tenant_id, m.source_service, m.created_at,
               m.payload::text, m.metadata::text, m.ordering_key
          FROM inserted ins
          JOIN marked m ON m.id = ins.event_row
         WHERE ins.status = 'in_flight';
    END
    $$;
COMMENT ON FUNCTION outbox.dispatch_events(integer, bigint[], integer[], integer, text, interval, bigint, integer) IS
    'Internal: unordered fan-out that leases what the calling relay can send now (see V13__dispatch_leases.sql).';

-- ---------------------------------------------------------------------------------------
-- Counting in-flight deliveries without walking every delivery ever finished.
--
-- Each claim (and each leasing dispatch) counts a subscription's in-flight deliveries. A
-- delivery that finishes leaves a dead entry in the in-flight index until VACUUM removes
-- it. A plain or index-only scan marks such entries dead the first time it meets them, and
-- later scans skip them; a bitmap scan never does. Without statistics (a new or busy table,
-- autovacuum behind) the planner chose the bitmap scan, so every count read every delivery
-- finished since the last VACUUM: 42 000 index entries and 1 400 heap pages, 2.9 ms per
-- subscription per claim, 60 000 deliveries into a drain (the drain fell from about 4 000 to
-- 1 400 deliveries/s between 20 000 and 100 000 events). Bitmap scans are off inside these
-- two functions: every statement in them is a short index lookup, which a bitmap scan never
-- serves better. (A LIMIT on the count would invite a sequential scan instead: the planner
-- expects to find max_in_flight rows early in the table.)
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

