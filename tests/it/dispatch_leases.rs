//! Deliveries leased as the dispatcher creates them (`sql::DISPATCH_EVENTS`, migration V13):
//! the quotas at the SQL the relay runs, with real concurrent sessions, and the relay using
//! the path end to end.

use outbox_relay::db::sql;
use tokio_postgres::types::ToSql;

use crate::harness::db::TestDb;
use crate::harness::relay::*;

const OWNER: &str = "relay-under-test";
const TOKEN: i64 = 77;

/// What one call of the leasing dispatch returned.
#[derive(Debug)]
struct Dispatched {
    events: i64,
    deliveries: i64,
    held_back: bool,
    /// (subscription id, delivery id) of each delivery leased, in the order returned.
    leased: Vec<(i64, i64)>,
}

/// Runs the relay's dispatch statement (unpaced) as `OWNER`, offering `wanted` slots per
/// subscription and `total` in all.
async fn dispatch(
    client: &deadpool_postgres::Object,
    subscriptions: &[i64],
    wanted: &[i32],
    total: i32,
) -> Dispatched {
    dispatch_paced(client, subscriptions, wanted, total, None).await
}

/// The same, paced with at least `paced_floor` events per round when `Some`.
async fn dispatch_paced(
    client: &deadpool_postgres::Object,
    subscriptions: &[i64],
    wanted: &[i32],
    total: i32,
    paced_floor: Option<i32>,
) -> Dispatched {
    let params: [&(dyn ToSql + Sync); 8] = [
        &500i32,
        &subscriptions.to_vec(),
        &wanted.to_vec(),
        &total,
        &OWNER,
        &60.0f64,
        &TOKEN,
        &paced_floor,
    ];
    let rows = client
        .query(sql::DISPATCH_EVENTS.sql, &params)
        .await
        .expect("dispatch");
    let summary = rows
        .iter()
        .find(|row| row.get::<_, Option<i64>>(3).is_none())
        .expect("a summary row");
    Dispatched {
        events: summary.get(0),
        deliveries: summary.get(1),
        held_back: summary.get(2),
        leased: rows
            .iter()
            .filter_map(|row| {
                row.get::<_, Option<i64>>(3)
                    .map(|delivery| (row.get::<_, i64>(4), delivery))
            })
            .collect(),
    }
}

async fn publish_n(db: &TestDb, n: usize) {
    for i in 0..n {
        publish(db, "lead.created", serde_json::json!({ "n": i })).await;
    }
}

/// (status, lease owner, lease token) counts per subscription, from the table itself.
async fn statuses(db: &TestDb, subscription: i64) -> Vec<(String, i64)> {
    db.client()
        .await
        .query(
            "SELECT status || coalesce('/' || lease_owner || '/' || lease_token, ''), count(*)
               FROM outbox.deliveries WHERE subscription_id = $1 GROUP BY 1 ORDER BY 1",
            &[&subscription],
        )
        .await
        .expect("statuses")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

#[tokio::test]
async fn dispatch_leases_up_to_each_subscriptions_max_in_flight_and_the_rest_waits_pending() {
    let db = TestDb::new().await;
    let (narrow, _) = add_subscription(
        &db,
        "narrow",
        "http://127.0.0.1:9/a",
        &[("max_in_flight", "3")],
    )
    .await;
    let (wide, _) = add_subscription(&db, "wide", "http://127.0.0.1:9/b", &[]).await;
    publish_n(&db, 5).await;

    let client = db.client().await;
    let result = dispatch(&client, &[narrow, wide], &[10, 10], 100).await;

    assert_eq!((result.events, result.deliveries), (5, 10));
    assert_eq!(result.leased.len(), 8, "{result:?}");
    let leased_to = |subscription| {
        result
            .leased
            .iter()
            .filter(|(s, _)| *s == subscription)
            .count()
    };
    assert_eq!((leased_to(narrow), leased_to(wide)), (3, 5));
    assert_eq!(
        statuses(&db, narrow).await,
        vec![
            (format!("in_flight/{OWNER}/{TOKEN}"), 3),
            ("pending".to_string(), 2)
        ]
    );
    assert_eq!(
        statuses(&db, wide).await,
        vec![(format!("in_flight/{OWNER}/{TOKEN}"), 5)]
    );
}

#[tokio::test]
async fn a_short_total_is_shared_round_robin_and_wanted_caps_each_subscription() {
    let db = TestDb::new().await;
    let (first, _) = add_subscription(&db, "first", "http://127.0.0.1:9/a", &[]).await;
    let (second, _) = add_subscription(&db, "second", "http://127.0.0.1:9/b", &[]).await;
    let (third, _) = add_subscription(&db, "third", "http://127.0.0.1:9/c", &[]).await;
    publish_n(&db, 4).await;

    let client = db.client().await;
    // `third` is offered nothing (say, its rate limit is spent): none of its leased.
    let result = dispatch(&client, &[first, second, third], &[10, 1, 0], 3).await;

    assert_eq!((result.events, result.deliveries), (4, 12));
    let mut by_subscription: Vec<i64> = result.leased.iter().map(|(s, _)| *s).collect();
    by_subscription.sort_unstable();
    assert_eq!(by_subscription, vec![first, first, second], "{result:?}");
    assert_eq!(statuses(&db, third).await, vec![("pending".to_string(), 4)]);
}

#[tokio::test]
async fn nothing_is_leased_past_an_older_due_delivery_or_past_in_flight_work() {
    let db = TestDb::new().await;
    let (waiting, _) = add_subscription(&db, "waiting", "http://127.0.0.1:9/a", &[]).await;
    let (busy, _) = add_subscription(
        &db,
        "busy",
        "http://127.0.0.1:9/b",
        &[("max_in_flight", "2")],
    )
    .await;
    let client = db.client().await;
    // An older delivery of `waiting` is due (pending), and `busy` has two in flight already
    // (under another relay): a fresh delivery must not overtake the first, nor exceed the
    // second's max_in_flight.
    client
        .batch_execute(&format!(
            "INSERT INTO outbox.events (event_type, payload, dispatched_at)
                  VALUES ('lead.created', '{{}}', now()), ('lead.created', '{{}}', now()),
                         ('lead.created', '{{}}', now());
             INSERT INTO outbox.deliveries (event_id, subscription_id)
                  SELECT min(id), {waiting} FROM outbox.events;
             INSERT INTO outbox.deliveries (event_id, subscription_id, status, lease_owner,
                                            lease_expires_at, lease_token)
                  SELECT id, {busy}, 'in_flight', 'another-relay', now() + interval '1 minute', 1
                    FROM outbox.events ORDER BY id DESC LIMIT 2;"
        ))
        .await
        .expect("earlier work");
    publish_n(&db, 2).await;

    let result = dispatch(&client, &[waiting, busy], &[10, 10], 100).await;

    assert_eq!((result.events, result.deliveries), (2, 4));
    assert!(result.leased.is_empty(), "{result:?}");
}

#[tokio::test]
async fn a_subscription_locked_by_another_claim_ordered_or_disabled_gets_nothing_leased() {
    let db = TestDb::new().await;
    let (locked, _) = add_subscription(&db, "locked", "http://127.0.0.1:9/a", &[]).await;
    let (ordered, _) = add_subscription(
        &db,
        "ordered",
        "http://127.0.0.1:9/b",
        &[("ordered", "true")],
    )
    .await;
    let (disabled, _) = add_subscription(
        &db,
        "disabled",
        "http://127.0.0.1:9/c",
        &[("enabled", "false")],
    )
    .await;
    let (free, _) = add_subscription(&db, "free", "http://127.0.0.1:9/d", &[]).await;
    publish_n(&db, 2).await;

    // Another relay's claim holds `locked`'s row (its quota is being counted there).
    let mut other = db.client().await;
    let other_claim = other.transaction().await.expect("begin");
    other_claim
        .execute(
            "SELECT 1 FROM outbox.subscriptions WHERE id = $1 FOR NO KEY UPDATE",
            &[&locked],
        )
        .await
        .expect("lock the subscription row");

    let client = db.client().await;
    let result = dispatch(
        &client,
        &[locked, ordered, disabled, free],
        &[5, 5, 5, 5],
        20,
    )
    .await;
    other_claim.rollback().await.expect("rollback");

    // Fan-out itself is unchanged: `locked` gets its deliveries (pending), the ordered
    // subscription gets none here (the ordered pass makes them), the disabled one none.
    assert_eq!((result.events, result.deliveries), (2, 4));
    assert!(result.leased.iter().all(|(s, _)| *s == free), "{result:?}");
    assert_eq!(result.leased.len(), 2);
    assert_eq!(
        statuses(&db, locked).await,
        vec![("pending".to_string(), 2)]
    );
}

#[tokio::test]
async fn a_paced_round_takes_what_the_quotas_can_and_holds_back_when_nothing_can_be_leased() {
    let db = TestDb::new().await;
    let (subscription, _) = add_subscription(
        &db,
        "crm",
        "http://127.0.0.1:9/a",
        &[("max_in_flight", "5")],
    )
    .await;
    publish_n(&db, 100).await;
    let client = db.client().await;

    // Room for 5 (max_in_flight): 5 events, all 5 deliveries leased, nothing left pending.
    let first = dispatch_paced(&client, &[subscription], &[50], 50, Some(2)).await;
    assert_eq!(
        (first.events, first.leased.len(), first.held_back),
        (5, 5, false)
    );
    // Nothing can be leased now (5 in flight): nothing dispatched.
    let room = dispatch_paced(&client, &[subscription], &[50], 50, Some(2)).await;
    assert_eq!((room.events, room.held_back), (0, true), "{room:?}");
    // Room for 2 more, but a floor of 4: 4 events, 2 leased, 2 left pending.
    client
        .execute(
            "UPDATE outbox.subscriptions SET max_in_flight = 7 WHERE id = $1",
            &[&subscription],
        )
        .await
        .expect("more room");
    let floor = dispatch_paced(&client, &[subscription], &[50], 50, Some(4)).await;
    assert_eq!((floor.events, floor.leased.len()), (4, 2), "{floor:?}");
    // Unpaced: whatever is due, leasing nothing more (7 in flight, 2 pending).
    let rest = dispatch(&client, &[subscription], &[50], 50).await;
    assert_eq!(
        (rest.events, rest.leased.len(), rest.held_back),
        (91, 0, false)
    );
    assert_eq!(
        statuses(&db, subscription).await,
        vec![
            (format!("in_flight/{OWNER}/{TOKEN}"), 7),
            ("pending".to_string(), 93)
        ]
    );
}

#[tokio::test]
async fn the_relay_sends_deliveries_it_leased_while_dispatching_exactly_once() {
    let (db, receiver) = db_with_subscriber("crm", "/hook", &[]).await;
    let relay = spawn_default_relay(&db).await;
    // One at a time, so the deliverer has free slots whenever the dispatcher runs.
    for i in 0..20 {
        publish(&db, "lead.created", serde_json::json!({ "n": i })).await;
        wait_for_statuses(&db, "delivered", i + 1).await;
    }

    let leased = |path: &str| {
        relay
            .metrics
            .deliveries_leased
            .with_label_values(&[path])
            .get()
    };
    assert!(
        leased("dispatch") > 0,
        "no delivery was leased by the dispatcher (claim path: {})",
        leased("claim")
    );
    assert_eq!(leased("dispatch") + leased("claim"), 20);
    assert_eq!(receiver.received("/hook").len(), 20);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered' AND attempts = 1"
        )
        .await,
        20
    );
    relay.shutdown().await;
}
