//! Switching a live subscription between ordered and unordered loses nothing, in either
//! direction, with deliveries in flight and events scheduled for later (see
//! `outbox.switch_ordering` in migrations/V9__hardening.sql for the rule).

use outbox_relay::relay::RelayHandle;
use serde_json::json;

use crate::harness::db::TestDb;
use crate::harness::raw_http::{Answer, RawServer};
use crate::harness::relay::*;

/// Publishes a `lead.updated` event with `seq` and `key`; returns its row id.
async fn publish_keyed(
    client: &deadpool_postgres::Object,
    key: &str,
    seq: i64,
    delay_seconds: f64,
) -> i64 {
    client
        .query_one(
            "INSERT INTO outbox.events (event_type, payload, ordering_key, deliver_after)
             VALUES ('lead.updated', $1, $2, now() + make_interval(secs => $3))
             RETURNING id",
            &[&json!({ "seq": seq }), &key, &delay_seconds],
        )
        .await
        .expect("publish")
        .get(0)
}

async fn ordered_cursor(db: &TestDb) -> i64 {
    count(
        db,
        "SELECT last_event_id FROM outbox.ordered_dispatch_cursor",
    )
    .await
}

/// (ordering key, seq) of each request, in arrival order.
fn arrivals(server: &RawServer) -> Vec<(String, i64)> {
    server
        .json_bodies()
        .iter()
        .map(|body| {
            (
                body["ordering_key"].as_str().unwrap_or("-").to_string(),
                body["data"]["seq"].as_i64().expect("seq"),
            )
        })
        .collect()
}

/// Waits until events 1..=`events` are delivered, checks each arrived exactly once, and
/// returns the arrivals.
async fn wait_for_each_event_once(
    db: &TestDb,
    server: &RawServer,
    events: i64,
) -> Vec<(String, i64)> {
    wait_for_statuses(db, "delivered", events).await;
    let arrived = arrivals(server);
    let mut seqs: Vec<i64> = arrived.iter().map(|(_, seq)| *seq).collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=events).collect::<Vec<_>>(),
        "each event exactly once: {arrived:?}"
    );
    arrived
}

/// A subscription `crm` with these columns at a gated subscriber, a relay, and event 1
/// (key lead:1) in flight, held there until the test releases the subscriber.
async fn event_1_in_flight(
    db: &TestDb,
    columns: &[(&str, &str)],
) -> (RawServer, RelayHandle, deadpool_postgres::Object) {
    let server = RawServer::start_gated(Answer::status_with_body(200, b"ok")).await;
    add_subscription(db, "crm", &server.url("/hook"), columns).await;
    let relay = spawn_default_relay(db).await;
    let client = db.client().await;
    publish_keyed(&client, "lead:1", 1, 0.0).await;
    wait_until("event 1 is in flight", DEADLINE, || async {
        server.requests() == 1
    })
    .await;
    (server, relay, client)
}

/// Unordered → ordered. Event 1 is in flight; event 2 is scheduled for later and the
/// ordered cursor has already passed it (so only the unordered pass could have taken it, and
/// after the switch it skips the subscription); events 3–5 come after the switch. All five
/// arrive exactly once, and key lead:1 goes 2, 3, 4 in order from the switch on.
#[tokio::test]
async fn switching_to_ordered_keeps_scheduled_and_in_flight_events() {
    let db = TestDb::new().await;
    let (server, relay, client) = event_1_in_flight(&db, &[("max_in_flight", "10")]).await;
    let scheduled = publish_keyed(&client, "lead:1", 2, 5.0).await;
    wait_until(
        "the ordered cursor passed the scheduled event",
        DEADLINE,
        || async { ordered_cursor(&db).await >= scheduled },
    )
    .await;
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM outbox.deliveries WHERE event_id = {scheduled}")
        )
        .await,
        0,
        "the scheduled event is not yet fanned out (else this test proves nothing)"
    );

    client
        .execute(
            "UPDATE outbox.subscriptions SET ordered = true WHERE name = 'crm'",
            &[],
        )
        .await
        .expect("switch to ordered");
    publish_keyed(&client, "lead:1", 3, 0.0).await;
    publish_keyed(&client, "lead:1", 4, 0.0).await;
    publish_keyed(&client, "lead:2", 5, 0.0).await;
    server.release(100);

    let arrived = wait_for_each_event_once(&db, &server, 5).await;
    let lead_1_after_switch: Vec<i64> = arrived
        .iter()
        .filter(|(key, seq)| key == "lead:1" && *seq >= 2)
        .map(|(_, seq)| *seq)
        .collect();
    assert_eq!(
        lead_1_after_switch,
        vec![2, 3, 4],
        "ordered from the switch on"
    );
    relay.shutdown().await;
}

/// Ordered → unordered. Event 1 is in flight and event 2 waits behind it (blocked); a
/// producer transaction left open holds the ordered cursor back while the unordered pass
/// dispatches events 3 and 4 (skipping the then-ordered subscription); event 5 is scheduled.
/// After the switch all five arrive exactly once, and event 2 no longer waits for event 1.
#[tokio::test]
async fn switching_to_unordered_keeps_events_the_ordered_pass_had_not_reached() {
    let db = TestDb::new().await;
    let (server, relay, client) = event_1_in_flight(
        &db,
        &[
            ("ordered", "true"),
            ("max_in_flight", "10"),
            ("event_types", "'{lead.*}'"),
        ],
    )
    .await;
    let second = publish_keyed(&client, "lead:1", 2, 0.0).await;
    wait_until("event 2 waits behind event 1", DEADLINE, || async {
        count(
            &db,
            &format!(
                "SELECT count(*) FROM outbox.deliveries WHERE event_id = {second} AND blocked"
            ),
        )
        .await
            == 1
    })
    .await;

    // An open producer transaction: ordered fan-out cannot pass ids drawn after it began.
    let mut producer = db.client().await;
    let open = producer.transaction().await.expect("begin");
    open.execute("SELECT outbox.publish('audit.noted', '{}')", &[])
        .await
        .expect("insert in the open transaction");
    let third = publish_keyed(&client, "lead:1", 3, 0.0).await;
    let fourth = publish_keyed(&client, "lead:2", 4, 0.0).await;
    wait_until("the unordered pass dispatched events 3 and 4", DEADLINE, || async {
        count(
            &db,
            &format!(
                "SELECT count(*) FROM outbox.events WHERE id IN ({third}, {fourth}) AND dispatched_at IS NOT NULL"
            ),
        )
        .await
            == 2
    })
    .await;
    assert!(
        ordered_cursor(&db).await < third,
        "the ordered cursor is held back (else this test proves nothing)"
    );
    publish_keyed(&client, "lead:1", 5, 1.0).await;

    client
        .execute(
            "UPDATE outbox.subscriptions SET ordered = false WHERE name = 'crm'",
            &[],
        )
        .await
        .expect("switch to unordered");
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.deliveries WHERE blocked").await,
        0,
        "nothing waits behind a key any more"
    );
    open.rollback().await.expect("end the open transaction");
    server.release(100);

    wait_for_each_event_once(&db, &server, 5).await;
    relay.shutdown().await;
}

/// A switch made while the subscription is disabled still fans out its gap: a scheduled event
/// the ordered cursor already passed arrives once the subscription is enabled again.
#[tokio::test]
async fn switching_while_disabled_loses_nothing_once_enabled_again() {
    let db = TestDb::new().await;
    let server = RawServer::start(Answer::status_with_body(200, b"ok")).await;
    add_subscription(&db, "crm", &server.url("/hook"), &[]).await;
    let relay = spawn_default_relay(&db).await;
    let client = db.client().await;

    let scheduled = publish_keyed(&client, "lead:1", 1, 3.0).await;
    wait_until(
        "the ordered cursor passed the scheduled event",
        DEADLINE,
        || async { ordered_cursor(&db).await >= scheduled },
    )
    .await;
    client
        .batch_execute(
            "UPDATE outbox.subscriptions SET enabled = false WHERE name = 'crm';
             UPDATE outbox.subscriptions SET ordered = true WHERE name = 'crm';
             UPDATE outbox.subscriptions SET enabled = true WHERE name = 'crm';",
        )
        .await
        .expect("disable, switch, enable");
    wait_for_each_event_once(&db, &server, 1).await;
    relay.shutdown().await;
}
