//! When the claim loop looks for deliveries again. A freed request slot wakes it only when
//! slots held its last round back (the relay's own, a subscription's `max_in_flight`);
//! results that make a delivery due at once (a 0-second retry, the next delivery of an
//! ordered key) wake it from the completer; a subscription out of rate tokens, its next
//! token. The guards run with an hour-long poll interval, so a missed wake-up shows as a
//! delivery that never comes.

use std::time::Duration;

use outbox_relay::config::RelayConfig;
use serde_json::json;
use testkit::receiver::{Receiver, Reply};

use crate::harness::db::TestDb;
use crate::harness::relay::*;

/// No poll to fall back on within a test's deadline.
fn config_without_poll() -> RelayConfig {
    let mut config = RelayConfig::for_tests();
    config.poll_interval = Duration::from_secs(3600);
    config
}

async fn publish_lead(db: &TestDb, seq: i64) {
    publish(db, "lead.created", json!({ "seq": seq })).await;
}

/// Publishes `events` events, then runs a relay with `config` until `deliveries` are
/// delivered: a backlog the relay must work through on its wake-ups alone.
async fn deliver_backlog(db: &TestDb, events: i64, deliveries: i64, config: RelayConfig) {
    for seq in 0..events {
        publish_lead(db, seq).await;
    }
    let relay = spawn_relay(db, config).await;
    wait_for_statuses(db, "delivered", deliveries).await;
    relay.shutdown().await;
}

/// At a steady rate, each event's delivery is claimed when the dispatcher makes it; the
/// claim that each freed slot used to trigger found nothing (1.66 claims per delivery).
/// Events go one at a time, each once the previous is delivered, so every delivery frees its
/// slot with nothing else due. Expected: one claim per event plus one per 200 ms poll; with a
/// claim after every freed slot, two per event.
#[tokio::test]
async fn at_a_steady_rate_a_freed_slot_does_not_trigger_another_claim() {
    const EVENTS: i64 = 100;
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver");
    add_subscription(&db, "crm", &receiver.url("/hook"), &[]).await;
    track_function_calls(&db).await;
    let relay = spawn_default_relay(&db).await;
    for seq in 0..EVENTS {
        publish_lead(&db, seq).await;
        wait_for_statuses(&db, "delivered", seq + 1).await;
    }
    relay.shutdown().await;
    let claims = function_calls_after_relays_exit(&db, "claim_deliveries_and_limits").await;
    assert!(
        claims * 10 < EVENTS * 15,
        "{claims} claims for {EVENTS} deliveries made one at a time"
    );
}

/// max_in_flight = 3 with ten deliveries due, the first replies staggered: the first claim
/// gets all three it asks for (more may be due); when the quick one finishes, the next claim
/// asks for three and max_in_flight allows one (the claim says it held back). Either way the
/// slots freed later wake the claims that follow.
#[tokio::test]
async fn a_subscription_at_its_max_in_flight_is_claimed_again_as_its_requests_finish() {
    let (db, receiver) = db_with_subscriber("crm", "/hook", &[("max_in_flight", "3")]).await;
    receiver.queue(
        "/hook",
        [
            Reply::Delay(Duration::from_millis(20), 200),
            Reply::Delay(Duration::from_millis(300), 200),
            Reply::Delay(Duration::from_millis(300), 200),
        ],
    );
    deliver_backlog(&db, 10, 10, config_without_poll()).await;
}

/// max_in_flight = 1: the next request goes out once the previous one is answered, before
/// its result is written. The test holds the first delivery's row locked from while the
/// subscriber is still answering (a 1 s reply), so its result cannot be written; the second
/// request must arrive all the same, with the first still `in_flight` in the table.
#[tokio::test]
async fn max_in_flight_room_is_freed_when_a_request_is_answered_not_when_its_result_is_written() {
    let (db, receiver) = db_with_subscriber("crm", "/hook", &[("max_in_flight", "1")]).await;
    receiver.queue("/hook", [Reply::Delay(Duration::from_secs(1), 200)]);
    publish_lead(&db, 0).await;
    publish_lead(&db, 1).await;
    let relay = spawn_relay(&db, config_without_poll()).await;
    receiver
        .wait_for("/hook", 1, DEADLINE)
        .await
        .expect("the first request");
    let mut holder = db.client().await;
    let lock = holder.transaction().await.expect("begin");
    let first: i64 = lock
        .query_one(
            "SELECT id FROM outbox.deliveries WHERE status = 'in_flight' FOR UPDATE",
            &[],
        )
        .await
        .expect("lock the first delivery's row")
        .get(0);
    receiver
        .wait_for("/hook", 2, DEADLINE)
        .await
        .expect("the second request, while the first result is unwritten");
    let status: String = lock
        .query_one(
            "SELECT status FROM outbox.deliveries WHERE id = $1",
            &[&first],
        )
        .await
        .expect("first delivery")
        .get(0);
    assert_eq!(status, "in_flight", "the first result is not written yet");
    lock.rollback().await.expect("release the row");
    wait_for_statuses(&db, "delivered", 2).await;
    relay.shutdown().await;
}

/// A relay with one request slot and two subscriptions: each freed slot wakes the claim
/// that was left without one.
#[tokio::test]
async fn a_relay_out_of_slots_claims_again_as_its_requests_finish() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver");
    add_subscription(&db, "crm", &receiver.url("/crm"), &[]).await;
    add_subscription(&db, "erp", &receiver.url("/erp"), &[]).await;
    let mut config = config_without_poll();
    config.max_concurrency = 1;
    deliver_backlog(&db, 5, 10, config).await;
}

/// A rate limit of 5 per second with twelve deliveries due: the first five go at once (a
/// second's tokens), and each later one when its token is due, which the claim loop waits
/// for by itself.
#[tokio::test]
async fn a_subscription_out_of_rate_tokens_is_claimed_again_when_its_next_token_is_due() {
    let (db, _receiver) =
        db_with_subscriber("crm", "/hook", &[("rate_limit_per_second", "5")]).await;
    deliver_backlog(&db, 12, 12, config_without_poll()).await;
}

/// A retry schedule that starts at 0 seconds: the failed attempt's result makes the delivery
/// due at once, and the completer wakes the claim for it.
#[tokio::test]
async fn a_retry_due_at_once_is_sent_without_waiting_for_the_poll() {
    let (db, receiver) =
        db_with_subscriber("crm", "/hook", &[("retry_schedule", "'{0 seconds}'")]).await;
    receiver.queue("/hook", [Reply::Status(500)]);
    let relay = spawn_relay(&db, config_without_poll()).await;
    publish_lead(&db, 0).await;
    wait_for_statuses(&db, "delivered", 1).await;
    assert_eq!(
        count(&db, "SELECT attempts::bigint FROM outbox.deliveries").await,
        2,
        "the 500, then the retry"
    );
    relay.shutdown().await;
}

/// Ordered: finishing a key's delivery releases the next one, and the completer wakes the
/// claim for it.
#[tokio::test]
async fn the_next_delivery_of_an_ordered_key_is_sent_without_waiting_for_the_poll() {
    let (db, _receiver) = db_with_subscriber("crm", "/hook", &[("ordered", "true")]).await;
    let relay = spawn_relay(&db, config_without_poll()).await;
    let client = db.client().await;
    client
        .batch_execute(
            "BEGIN;
             SELECT outbox.publish('lead.updated', jsonb_build_object('seq', seq),
                                   ordering_key => 'lead:1')
               FROM generate_series(1, 5) seq;
             COMMIT;",
        )
        .await
        .expect("publish five events on one key");
    wait_for_statuses(&db, "delivered", 5).await;
    relay.shutdown().await;
}
