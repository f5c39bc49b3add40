//! Every statement the relay runs on its pooled connections, as named constants, so
//! performance work changes SQL here without touching logic. Each carries its parameter
//! types, and runs through [`super::query`]: prepared once per connection when connected
//! directly, sent as one unnamed Parse/Bind/Execute behind a transaction pooler.
//!
//! Batches go in and out as arrays (`unnest`), so a batch costs one round trip. Nothing here
//! may leave session state behind (no session advisory locks, `SET` without `LOCAL`, LISTEN
//! or temporary tables): behind PgBouncer in transaction mode the next statement may run on
//! another server connection.

use tokio_postgres::types::Type;

use super::query::Query;

/// Claims due events, fans each out into one delivery per matching enabled unordered
/// subscription and marks it dispatched, in one call and so one transaction (see
/// `outbox.dispatch_events`, last replaced in migrations/V15__hot_path_without_bitmap_scans.sql).
/// `$1` is the batch size per kind: events due at insert (highest priority first, then insert
/// order) and scheduled events now due. An event that matches nothing is marked dispatched too: it stays queryable and can be
/// backfilled later, but is never retried.
///
/// Matching: event_types globs, tenant (NULL = all), payload containment filter, and the
/// event's target_services (NULL = everyone) against the subscription name. Ordered
/// subscriptions are left to [`DISPATCH_ORDERED`], which respects commit order.
///
/// Returns (events dispatched, deliveries created).
pub const DISPATCH_EVENTS: Query = Query {
    sql: "SELECT events, deliveries FROM outbox.dispatch_events($1::integer)",
    param_types: &[Type::INT4],
};

/// Leases due deliveries (see `outbox.claim_deliveries_and_limits`, migrations/V16) under the
/// token `$6`, and returns them with the event fields the webhook body is built from, read
/// inside the claim itself (a join here would use this statement's older snapshot and miss
/// fresh events). payload and metadata come as jsonb text so their bytes (and number
/// precision) are exactly what PostgreSQL stored. A row whose `delivery_id` is NULL leases
/// nothing: it names a subscription that got all it was allowed (by `$2` or by
/// `max_in_flight`) or whose row another claim held, so a freed request slot may find more of
/// its deliveries due. `$7`: this relay's deliveries whose requests were answered but whose
/// results are not written yet; they no longer count against `max_in_flight`.
pub const CLAIM_DELIVERIES: Query = Query {
    sql: "
SELECT delivery_id, subscription_id, attempts, replay_id,
       event_id, event_type, tenant_id, source_service, created_at,
       payload, metadata, event_ordering_key, delivery_ordering_key
  FROM outbox.claim_deliveries_and_limits($1::bigint[], $2::integer[], $3::integer, $4::text,
                                          make_interval(secs => $5::float8), $6::bigint,
                                          $7::bigint[])",
    param_types: &[
        Type::INT8_ARRAY,
        Type::INT4_ARRAY,
        Type::INT4,
        Type::TEXT,
        Type::FLOAT8,
        Type::INT8,
        Type::INT8_ARRAY,
    ],
};

/// Fans final events out to ordered subscriptions, in id order, and starts the next probe
/// (see migrations/V5__ordered_subscriptions.sql for why commit order needs this). One relay
/// at a time; the others get (0, 0, false). Returns (events passed, deliveries created,
/// probe pending: call again soon).
pub const DISPATCH_ORDERED: Query = Query {
    sql: "SELECT events, deliveries, probe_pending FROM outbox.dispatch_ordered($1::integer)",
    param_types: &[Type::INT4],
};

/// Starts the next ordered-dispatch probe; must run in autocommit (its own transaction).
/// Returns whether a probe is pending.
pub const START_ORDERED_PROBE: Query = Query {
    sql: "SELECT outbox.start_ordered_probe()",
    param_types: &[],
};

/// Serialises key advancement with ordered fan-out, per subscription, for this transaction,
/// and makes the transaction commit durably although the relay's connections commit
/// asynchronously: a crash must never undo an ordered key's result once the next delivery of
/// the key may have been sent (that would send them out of order). One round trip for both.
pub const LOCK_ORDERED_SUBSCRIPTIONS: Query = Query {
    sql: "SELECT outbox.lock_ordered_subscriptions($1::bigint[]),
       set_config('synchronous_commit', 'on', true)",
    param_types: &[Type::INT8_ARRAY],
};

/// Unblocks the next delivery of each ordered key whose head this transaction finished.
pub const ADVANCE_ORDERING_KEYS: Query = Query {
    sql: "SELECT outbox.advance_ordering_keys($1::bigint[], $2::text[], $3::bigint[])",
    param_types: &[Type::INT8_ARRAY, Type::TEXT_ARRAY, Type::INT8_ARRAY],
};

/// Writes a batch of results, guarded by the lease: a row only changes while it is still
/// in flight under this relay (`$11`) and the same claim (`$10`, one token per claim), so a
/// result that arrives after the lease expired and the delivery was claimed again, by
/// another relay or by this one, changes nothing. Failed attempts, retries and replayed
/// attempts are recorded in delivery_attempts; a first-attempt success lives on the delivery
/// row alone (see `outbox.complete_deliveries` in
/// migrations/V15__hot_path_without_bitmap_scans.sql: a function, so it can turn off the
/// bitmap scans that read every delivery finished since the last VACUUM).
///
/// Subscriptions are not touched here (see [`DISABLE_SUBSCRIPTIONS`]): this statement locks
/// deliveries, and a subscription DELETE locks the subscription before its deliveries, so
/// taking both here would be the opposite order.
///
/// Returns the ids actually updated, so metrics count only what was recorded.
pub const COMPLETE_DELIVERIES: Query = Query {
    sql: "
SELECT id FROM outbox.complete_deliveries(
           $1::bigint[], $2::text[], $3::timestamptz[], $4::integer[], $5::text[], $6::text[],
           $7::timestamptz[], $8::integer[], $9::boolean[], $10::bigint[], $11::text) AS id",
    param_types: &[
        Type::INT8_ARRAY,        // $1 delivery ids
        Type::TEXT_ARRAY,        // $2 statuses
        Type::TIMESTAMPTZ_ARRAY, // $3 next attempt at
        Type::INT4_ARRAY,        // $4 status codes
        Type::TEXT_ARRAY,        // $5 errors
        Type::TEXT_ARRAY,        // $6 response bodies
        Type::TIMESTAMPTZ_ARRAY, // $7 started at
        Type::INT4_ARRAY,        // $8 durations (ms)
        Type::BOOL_ARRAY,        // $9 failed
        Type::INT8_ARRAY,        // $10 lease tokens (one per claim)
        Type::TEXT,              // $11 lease owner (this relay)
    ],
};

/// Disables subscriptions that answered 410, with the reason. Run on its own, after the
/// results that carried the 410 are committed, so it never holds delivery row locks while
/// it waits for a subscription row (the order a subscription DELETE takes them in).
pub const DISABLE_SUBSCRIPTIONS: Query = Query {
    sql: "
UPDATE outbox.subscriptions s
   SET enabled = false, disabled_reason = g.reason
  FROM unnest($1::bigint[], $2::text[]) AS g(subscription_id, reason)
 WHERE s.id = g.subscription_id AND s.enabled",
    param_types: &[Type::INT8_ARRAY, Type::TEXT_ARRAY],
};

/// Renews the leases this relay holds, so slow requests are never taken over by another relay.
/// Rows locked right now are skipped, not waited for: the lock is this relay's completer
/// finishing them (waiting deadlocked against its unordered batch update); if that write
/// fails, the next heartbeat renews them.
/// Leases claimed (`updated_at`) more than $3 seconds ago are not renewed: no request lives
/// that long (timeouts are capped at 5 minutes), so such a lease was leaked by a bug, and
/// letting it expire gets the delivery re-queued instead of stuck in flight forever.
/// Claims in (`$4`, `$5`) (delivery id, lease token) are not renewed either: their results
/// were given up by the completer (see `completer::Completer::write_alone`), so their leases
/// must run out for a retry; a later claim of the same delivery has another token.
pub const HEARTBEAT_LEASES: Query = Query {
    sql: "
UPDATE outbox.deliveries d
   SET lease_expires_at = now() + make_interval(secs => $2::float8)
  FROM (SELECT id FROM outbox.deliveries
         WHERE status = 'in_flight' AND lease_owner = $1
           AND updated_at > now() - make_interval(secs => $3::float8)
           AND NOT EXISTS (SELECT 1 FROM unnest($4::bigint[], $5::bigint[]) AS g(id, token)
                            WHERE g.id = deliveries.id AND g.token = deliveries.lease_token)
           FOR UPDATE SKIP LOCKED) held
 WHERE d.id = held.id",
    param_types: &[
        Type::TEXT,
        Type::FLOAT8,
        Type::FLOAT8,
        Type::INT8_ARRAY,
        Type::INT8_ARRAY,
    ],
};

/// Re-queues deliveries whose lease expired (their relay died or lost the database), due now.
/// The interrupted attempt is not counted: its result was never recorded. Keyset-free on
/// purpose: every row it touches leaves the in_flight index, so the next call sees new rows.
pub const RECLAIM_EXPIRED_LEASES: Query = Query {
    sql: "
WITH expired AS (
    SELECT id FROM outbox.deliveries
     WHERE status = 'in_flight' AND lease_expires_at < now()
     ORDER BY lease_expires_at
     LIMIT $1
       FOR UPDATE SKIP LOCKED
)
UPDATE outbox.deliveries d
   SET status = CASE WHEN d.attempts = 0 THEN 'pending' ELSE 'failing' END,
       next_attempt_at = now(),
       last_error = 'lease of relay ' || d.lease_owner || ' expired before its result was recorded; re-queued',
       lease_owner = NULL,
       lease_expires_at = NULL,
       lease_token = NULL,
       updated_at = now()
  FROM expired x
 WHERE d.id = x.id
RETURNING d.id",
    param_types: &[Type::INT8],
};

/// Retention: deletes up to $2 events older than $1 seconds whose work is finished, with
/// their deliveries and attempts (ON DELETE CASCADE). Finished means dispatched, offered to
/// ordered subscriptions (at or below their cursor) and no delivery still open; the replays
/// log stays. SKIP LOCKED: relays purging at once take disjoint rows and never wait.
pub const PURGE_EXPIRED_EVENTS: Query = Query {
    sql: "
WITH expired AS (
    SELECT e.id FROM outbox.events e
     WHERE e.created_at < now() - make_interval(secs => $1::float8)
       AND e.dispatched_at IS NOT NULL
       AND e.id <= (SELECT c.last_event_id FROM outbox.ordered_dispatch_cursor c)
       AND NOT EXISTS (SELECT 1 FROM outbox.deliveries d
                        WHERE d.event_id = e.id AND d.status IN ('pending', 'in_flight', 'failing'))
     ORDER BY e.created_at
     LIMIT $2
       FOR UPDATE SKIP LOCKED
)
DELETE FROM outbox.events e USING expired x WHERE e.id = x.id",
    param_types: &[Type::FLOAT8, Type::INT8],
};

/// On shutdown: hands back whatever this relay still holds, due now, so another relay takes
/// it at once instead of waiting for the lease to expire.
pub const RELEASE_LEASES: Query = Query {
    sql: "
UPDATE outbox.deliveries
   SET status = CASE WHEN attempts = 0 THEN 'pending' ELSE 'failing' END,
       next_attempt_at = now(),
       lease_owner = NULL,
       lease_expires_at = NULL,
       lease_token = NULL,
       updated_at = now()
 WHERE status = 'in_flight' AND lease_owner = $1",
    param_types: &[Type::TEXT],
};

/// Every subscription, with intervals as seconds (tokio-postgres has no interval type). The
/// last column is the previous secret while a rotation's overlap lasts, else NULL: expiry is
/// decided here, by the database clock, so it takes effect at the next reload.
pub const LOAD_SUBSCRIPTIONS: Query = Query {
    sql: "
SELECT id, name, url, secret, enabled, extract(epoch FROM timeout)::float8,
       max_in_flight, rate_limit_per_second::float8, headers,
       ARRAY(SELECT extract(epoch FROM w)::float8 FROM unnest(retry_schedule) w),
       CASE WHEN previous_secret_expires_at > now() THEN previous_secret END, ordered
  FROM outbox.subscriptions
 ORDER BY id",
    param_types: &[],
};

/// Gauges, refreshed on a timer by this one query rather than per scrape. Each count walks a
/// partial index (what is pending, in flight, or dead), never the delivered history.
pub const BACKLOG_GAUGES: Query = Query {
    sql: "
SELECT s.name,
       (SELECT count(*) FROM outbox.deliveries d
         WHERE d.subscription_id = s.id AND d.status IN ('pending', 'failing'))
     + (SELECT count(*) FROM outbox.deliveries d
         WHERE d.subscription_id = s.id AND d.status = 'in_flight') AS pending,
       (SELECT count(*) FROM outbox.deliveries d
         WHERE d.subscription_id = s.id AND d.status = 'dead') AS dead,
       (NOT s.enabled)::int4::int8 AS disabled
  FROM outbox.subscriptions s",
    param_types: &[],
};

/// Age in seconds of the oldest work not done: an undispatched due event, or an undelivered
/// delivery (by the time it was fanned out). The two event predicates are those of the
/// dispatcher's two partial indexes, so events scheduled for later are never walked.
pub const OLDEST_PENDING_SECONDS: Query = Query {
    sql: "
SELECT coalesce(extract(epoch FROM now() - least(
           (SELECT min(created_at) FROM outbox.events
             WHERE dispatched_at IS NULL AND deliver_after <= created_at
               AND deliver_after <= now()),
           (SELECT min(created_at) FROM outbox.events
             WHERE dispatched_at IS NULL AND deliver_after > created_at
               AND deliver_after <= now()),
           (SELECT min(created_at) FROM outbox.deliveries
             WHERE status IN ('pending', 'failing', 'in_flight')))), 0)::float8",
    param_types: &[],
};

/// Applied migration versions (for /readyz: the schema is current).
pub const APPLIED_MIGRATIONS: Query = Query {
    sql: "SELECT max(version) FROM outbox.schema_history",
    param_types: &[],
};

#[cfg(test)]
mod tests {
    use super::*;

    /// The highest `$n` in a statement's text.
    fn highest_placeholder(sql: &str) -> usize {
        let bytes = sql.as_bytes();
        let mut highest = 0;
        for (i, byte) in bytes.iter().enumerate() {
            if *byte == b'$' {
                let digits: String = sql[i + 1..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                if let Ok(n) = digits.parse::<usize>() {
                    highest = highest.max(n);
                }
            }
        }
        highest
    }

    /// The pooler path pairs values with these declarations one by one: a missing type
    /// would send a short Parse, an extra one a parameter the SQL never uses.
    #[test]
    fn every_statement_declares_one_type_per_placeholder() {
        for (name, query) in [
            ("DISPATCH_EVENTS", &DISPATCH_EVENTS),
            ("CLAIM_DELIVERIES", &CLAIM_DELIVERIES),
            ("DISPATCH_ORDERED", &DISPATCH_ORDERED),
            ("START_ORDERED_PROBE", &START_ORDERED_PROBE),
            ("LOCK_ORDERED_SUBSCRIPTIONS", &LOCK_ORDERED_SUBSCRIPTIONS),
            ("ADVANCE_ORDERING_KEYS", &ADVANCE_ORDERING_KEYS),
            ("COMPLETE_DELIVERIES", &COMPLETE_DELIVERIES),
            ("DISABLE_SUBSCRIPTIONS", &DISABLE_SUBSCRIPTIONS),
            ("HEARTBEAT_LEASES", &HEARTBEAT_LEASES),
            ("RECLAIM_EXPIRED_LEASES", &RECLAIM_EXPIRED_LEASES),
            ("RELEASE_LEASES", &RELEASE_LEASES),
            ("PURGE_EXPIRED_EVENTS", &PURGE_EXPIRED_EVENTS),
            ("LOAD_SUBSCRIPTIONS", &LOAD_SUBSCRIPTIONS),
            ("BACKLOG_GAUGES", &BACKLOG_GAUGES),
            ("OLDEST_PENDING_SECONDS", &OLDEST_PENDING_SECONDS),
            ("APPLIED_MIGRATIONS", &APPLIED_MIGRATIONS),
        ] {
            assert_eq!(
                query.param_types.len(),
                highest_placeholder(query.sql),
                "{name}"
            );
        }
    }
}
