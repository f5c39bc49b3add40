//! Claims and the leases that guard result writes, at the SQL the relay runs
//! (`outbox_relay::db::sql`), with real concurrent sessions.

use outbox_relay::db::sql;
use tokio_postgres::types::ToSql;

use crate::harness::db::TestDb;
use crate::harness::relay::*;

const OWNER: &str = "relay-under-test";

/// Inserts a dispatched event with one pending delivery to subscription `$1`; returns the
/// event's `event_id`.
const EVENT_WITH_DELIVERY: &str =
    "WITH e AS (INSERT INTO outbox.events (event_type, payload, dispatched_at)
                VALUES ('lead.created', '{}', now()) RETURNING id, event_id),
          d AS (INSERT INTO outbox.deliveries (event_id, subscription_id) SELECT id, $1 FROM e)
     SELECT event_id FROM e";

/// A subscription (to a port nothing listens on) with one pending delivery and the default
/// `max_in_flight` (64); returns the subscription id and a connection.
async fn one_pending_delivery(db: &TestDb) -> (i64, deadpool_postgres::Object) {
    pending_deliveries(db, "64", 1).await
}

/// A subscription (to a port nothing listens on) with `max_in_flight` and `count` pending
/// deliveries; returns the subscription id and a connection.
async fn pending_deliveries(
    db: &TestDb,
    max_in_flight: &str,
    count: usize,
) -> (i64, deadpool_postgres::Object) {
    let (subscription, _) = add_subscription(
        db,
        "crm",
        "http://127.0.0.1:9/hook",
        &[("max_in_flight", max_in_flight)],
    )
    .await;
    let client = db.client().await;
    for _ in 0..count {
        client
            .query_one(EVENT_WITH_DELIVERY, &[&subscription])
            .await
            .expect("event and delivery");
    }
    (subscription, client)
}

/// Runs the relay's claim for subscription `subscription` as `OWNER` with `token`; returns
/// (delivery id, event_id as text) of what it leased.
async fn claim(
    client: &deadpool_postgres::Object,
    subscription: i64,
    token: i64,
) -> Vec<(i64, String)> {
    let params: [&(dyn ToSql + Sync); 7] = [
        &vec![subscription],
        &vec![10i32],
        &10i32,
        &OWNER,
        &60.0f64,
        &token,
        &Vec::<i64>::new(),
    ];
    client
        .query(sql::CLAIM_DELIVERIES.sql, &params)
        .await
        .expect("claim")
        .iter()
        // A row with no delivery only says max_in_flight held the claim back.
        .filter_map(|row| {
            Some((
                row.get::<_, Option<i64>>(0)?,
                row.get::<_, uuid::Uuid>(4).to_string(),
            ))
        })
        .collect()
}

/// Writes one result the way the completer does; returns the ids it updated.
async fn complete(
    client: &deadpool_postgres::Object,
    delivery: i64,
    status: &str,
    error: Option<&str>,
    token: i64,
) -> Vec<i64> {
    let now = chrono::Utc::now();
    let params: [&(dyn ToSql + Sync); 11] = [
        &vec![delivery],
        &vec![status],
        &vec![None::<chrono::DateTime<chrono::Utc>>],
        &vec![Some(500i32)],
        &vec![error],
        &vec![None::<&str>],
        &vec![now],
        &vec![10i32],
        &vec![status != "delivered"],
        &vec![token],
        &OWNER,
    ];
    client
        .query(sql::COMPLETE_DELIVERIES.sql, &params)
        .await
        .expect("complete")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// A delivery committed while a claim is already running (after its statement snapshot was
/// taken) is returned with its event, not leased and silently dropped. The claim is held at
/// its first lock by a table lock, while the same transaction commits the event and delivery.
#[tokio::test]
async fn a_delivery_committed_during_a_claim_is_returned_with_its_event() {
    let db = TestDb::new().await;
    let (subscription, _) = add_subscription(&db, "crm", "http://127.0.0.1:9/hook", &[]).await;
    // An older event, so a claim that joined events afterwards could not skip its call to
    // the claim function on an empty table.
    db.client()
        .await
        .batch_execute(
            "INSERT INTO outbox.events (event_type, payload, dispatched_at)
             VALUES ('lead.created', '{}', now())",
        )
        .await
        .expect("older event");
    let mut holder = db.client().await;
    let blocker = holder.transaction().await.expect("begin");
    blocker
        .batch_execute("LOCK TABLE outbox.subscriptions IN EXCLUSIVE MODE")
        .await
        .expect("lock subscriptions");

    let claimer = db.client().await;
    let claim_task = tokio::spawn(async move { claim(&claimer, subscription, 7).await });
    wait_until("the claim waits for the table lock", DEADLINE, || async {
        count(
            &db,
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'
                AND query LIKE '%claim_deliveries%'",
        )
        .await
            == 1
    })
    .await;

    let event_id: uuid::Uuid = blocker
        .query_one(EVENT_WITH_DELIVERY, &[&subscription])
        .await
        .expect("insert event and delivery")
        .get(0);
    blocker.commit().await.expect("commit");

    let claimed = tokio::time::timeout(DEADLINE, claim_task)
        .await
        .expect("claim finishes")
        .expect("claim task");
    assert_eq!(
        claimed.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
        vec![event_id.to_string()],
        "the leased delivery comes back with its event"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'in_flight'"
        )
        .await,
        claimed.len() as i64,
        "nothing is leased that was not returned"
    );
}

/// A result from an older claim of the same delivery, by the same relay (it lost the lease
/// in an outage, the delivery was re-queued and claimed again), changes nothing: the newer
/// attempt's outcome stands.
#[tokio::test]
async fn a_result_from_an_older_claim_cannot_overwrite_the_newer_one() {
    let db = TestDb::new().await;
    let (subscription, client) = one_pending_delivery(&db).await;

    let first = claim(&client, subscription, 1).await;
    assert_eq!(first.len(), 1);
    let delivery = first[0].0;
    // The outage: the lease runs out and any relay's reclaim re-queues the delivery.
    client
        .execute(
            "UPDATE outbox.deliveries SET lease_expires_at = now() - interval '1 second'",
            &[],
        )
        .await
        .expect("expire the lease");
    let reclaimed = client
        .query(sql::RECLAIM_EXPIRED_LEASES.sql, &[&100i64])
        .await
        .expect("reclaim");
    assert_eq!(reclaimed.len(), 1);
    let second = claim(&client, subscription, 2).await;
    assert_eq!(
        second.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![delivery]
    );

    let stale = complete(&client, delivery, "dead", Some("stale outcome"), 1).await;
    assert!(stale.is_empty(), "the older claim's result is refused");
    let row = client
        .query_one(
            "SELECT status, attempts, lease_owner FROM outbox.deliveries WHERE id = $1",
            &[&delivery],
        )
        .await
        .expect("delivery");
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, i32>(1),
            row.get::<_, Option<String>>(2)
        ),
        ("in_flight".to_string(), 0, Some(OWNER.to_string())),
        "still leased to the newer claim"
    );

    let current = complete(&client, delivery, "delivered", None, 2).await;
    assert_eq!(
        current,
        vec![delivery],
        "the newer claim's result is written"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.delivery_attempts WHERE error = 'stale outcome'"
        )
        .await,
        0
    );
}

/// A claim whose result the completer gave up on is left to expire, but only that claim:
/// the heartbeat renews a later claim of the same delivery (another token) as usual.
#[tokio::test]
async fn a_given_up_claim_is_not_renewed_but_a_later_claim_of_the_delivery_is() {
    let db = TestDb::new().await;
    let (subscription, client) = one_pending_delivery(&db).await;
    let heartbeat = |given_up_token: i64| {
        let client = &client;
        async move {
            client
                .execute(
                    sql::HEARTBEAT_LEASES.sql,
                    &[
                        &OWNER,
                        &60.0f64,
                        &900.0f64,
                        &vec![delivery_of(client).await],
                        &vec![given_up_token],
                    ],
                )
                .await
                .expect("heartbeat")
        }
    };
    assert_eq!(claim(&client, subscription, 1).await.len(), 1);
    assert_eq!(heartbeat(1).await, 0, "the given-up claim is not renewed");
    client
        .execute(
            "UPDATE outbox.deliveries SET lease_expires_at = now() - interval '1 second'",
            &[],
        )
        .await
        .expect("expire the lease");
    client
        .query(sql::RECLAIM_EXPIRED_LEASES.sql, &[&100i64])
        .await
        .expect("reclaim");
    assert_eq!(claim(&client, subscription, 2).await.len(), 1);
    assert_eq!(
        heartbeat(1).await,
        1,
        "the later claim of the same delivery is renewed"
    );
}

async fn delivery_of(client: &deadpool_postgres::Object) -> i64 {
    client
        .query_one("SELECT id FROM outbox.deliveries", &[])
        .await
        .expect("one delivery")
        .get(0)
}

/// Index entries read from `outbox.deliveries`' indexes so far, as the statistics say once
/// `session` has flushed its counters.
async fn delivery_index_reads(db: &TestDb, session: &deadpool_postgres::Object) -> i64 {
    // Flushed when the session next goes idle: after this statement.
    session
        .batch_execute("SELECT pg_stat_force_next_flush()")
        .await
        .expect("flush statistics");
    session.batch_execute("SELECT 1").await.expect("go idle");
    count(
        db,
        "SELECT sum(idx_tup_read)::bigint FROM pg_stat_user_indexes
          WHERE schemaname = 'outbox' AND relname = 'deliveries'",
    )
    .await
}

/// Every finished delivery leaves a dead entry in the in-flight index until VACUUM. The
/// claim counts in-flight deliveries on every round; a scan that cannot mark those entries
/// dead (a bitmap scan, which the planner picks without statistics) reads them all again on
/// every claim, so a busy relay's claims got slower with every delivery (migration V13).
#[tokio::test]
async fn claims_do_not_read_the_deliveries_finished_since_the_last_vacuum_again_and_again() {
    const FINISHED: i64 = 3000;
    let db = TestDb::new().await;
    let (subscription, _) = add_subscription(&db, "crm", "http://127.0.0.1:9/hook", &[]).await;
    let client = db.client().await;
    client
        .batch_execute(&format!(
            "INSERT INTO outbox.events (event_type, payload, dispatched_at)
                  SELECT 'lead.created', '{{}}', now() FROM generate_series(1, {FINISHED});
             INSERT INTO outbox.deliveries (event_id, subscription_id, status, lease_owner,
                                            lease_expires_at, lease_token)
                  SELECT id, {subscription}, 'in_flight', 'another-relay',
                         now() + interval '1 minute', 1
                    FROM outbox.events;
             UPDATE outbox.deliveries
                SET status = 'delivered', attempts = 1, delivered_at = now(),
                    lease_owner = NULL, lease_expires_at = NULL, lease_token = NULL;"
        ))
        .await
        .expect("finished deliveries");
    client
        .query_one(EVENT_WITH_DELIVERY, &[&subscription])
        .await
        .expect("one due delivery");

    // Mid-drain, with no statistics and a large table, the planner picked a bitmap scan for
    // the count on its own; on a table this small it would not, so plain and index-only
    // scans are made to look dear for this session, as the large table made them look.
    client
        .batch_execute("SET enable_indexscan = off; SET enable_indexonlyscan = off")
        .await
        .expect("make bitmap scans look cheaper");
    // The first claim may meet every dead entry once; the second must not.
    claim(&client, subscription, 1).await;
    let before = delivery_index_reads(&db, &client).await;
    claim(&client, subscription, 2).await;
    let read = delivery_index_reads(&db, &client).await - before;
    assert!(
        read < FINISHED / 10,
        "the second claim read {read} index entries of outbox.deliveries ({FINISHED} deliveries \
         finished before it)"
    );
}

/// The claim tells the relay when `max_in_flight` held it back (a row with no delivery), and
/// relays from before that change, which call `outbox.claim_deliveries` until they are
/// upgraded, still get the same claim without such rows.
#[tokio::test]
async fn a_claim_held_back_by_max_in_flight_says_so_and_the_earlier_claim_does_not() {
    let db = TestDb::new().await;
    let (subscription, client) = pending_deliveries(&db, "2", 3).await;
    // The earlier function has no argument for answered requests.
    let claim_with = |function: &'static str, token: i64| {
        let client = &client;
        let answered = if function == "claim_deliveries" {
            ""
        } else {
            ", '{}'"
        };
        async move {
            client
                .query(
                    &format!(
                        "SELECT delivery_id, subscription_id FROM outbox.{function}(
                             $1::bigint[], ARRAY[10], 10, 'relay-test', interval '60 seconds', $2{answered})"
                    ),
                    &[&vec![subscription], &token],
                )
                .await
                .expect("claim")
                .iter()
                .map(|row| (row.get::<_, Option<i64>>(0), row.get::<_, i64>(1)))
                .collect::<Vec<_>>()
        }
    };
    // Asked for 10, allowed 2: both leased, and one row saying the limit held it back.
    let first = claim_with("claim_deliveries_and_limits", 1).await;
    assert_eq!(first.len(), 3, "{first:?}");
    assert_eq!(first.iter().filter(|(id, _)| id.is_some()).count(), 2);
    assert!(first.contains(&(None, subscription)), "{first:?}");
    // Nothing allowed now: only that row.
    assert_eq!(
        claim_with("claim_deliveries_and_limits", 2).await,
        vec![(None, subscription)]
    );
    // The earlier function: nothing to lease, and no row without a delivery.
    assert_eq!(claim_with("claim_deliveries", 3).await, vec![]);
    // With a slot free again, it leases the third delivery.
    client
        .execute(
            "UPDATE outbox.deliveries SET status = 'delivered', lease_owner = NULL,
                    lease_expires_at = NULL, lease_token = NULL
              WHERE lease_token = 1 AND id = (SELECT min(id) FROM outbox.deliveries)",
            &[],
        )
        .await
        .expect("finish one");
    let third = claim_with("claim_deliveries", 4).await;
    assert_eq!(third.len(), 1, "{third:?}");
    assert!(third[0].0.is_some(), "{third:?}");
}

/// A relay's answered requests leave `max_in_flight` room only while their deliveries are
/// still leased to it: one whose lease ran out and was claimed by another relay is a request
/// in flight again, and counts.
#[tokio::test]
async fn answered_requests_free_room_only_while_still_leased_to_the_caller() {
    let db = TestDb::new().await;
    let (subscription, client) = pending_deliveries(&db, "1", 2).await;
    let claim_as = |owner: &'static str, answered: Vec<i64>| {
        let client = &client;
        async move {
            client
                .query(
                    "SELECT delivery_id FROM outbox.claim_deliveries_and_limits(
                         $1::bigint[], ARRAY[10], 10, $2, interval '60 seconds', 1, $3)
                      WHERE delivery_id IS NOT NULL",
                    &[&vec![subscription], &owner, &answered],
                )
                .await
                .expect("claim")
                .iter()
                .map(|row| row.get::<_, i64>(0))
                .collect::<Vec<_>>()
        }
    };
    let first = claim_as("relay-a", vec![]).await;
    assert_eq!(first.len(), 1, "max_in_flight 1");
    // relay-b cannot free relay-a's room by calling that request answered.
    assert_eq!(claim_as("relay-b", first.clone()).await, Vec::<i64>::new());
    // relay-a can: its request was answered, only the result is not written yet.
    assert_eq!(claim_as("relay-a", first).await.len(), 1);
}
