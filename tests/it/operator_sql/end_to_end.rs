//! End to end (see the parent module for the fixtures).

use super::*;

/// dead → outbox.replay → delivered, with the same webhook-id and body bytes, an attempt
/// row carrying the replay id, and the replay recorded with matched = 1.
#[tokio::test]
async fn a_dead_delivery_replayed_after_the_subscriber_is_fixed_is_delivered_unchanged() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver");
    receiver.set_default("/hook", Reply::Status(500));
    add_subscription(
        &db,
        "x",
        &receiver.url("/hook"),
        &[("retry_schedule", "'{}'")],
    )
    .await;
    let relay = spawn_default_relay(&db).await;
    let event_id = publish(
        &db,
        "lead.created",
        json!({"lead_id": 42, "amount": 12.50, "name": "Ada"}),
    )
    .await;
    wait_for_statuses(&db, "dead", 1).await;

    receiver.set_default("/hook", Reply::Status(200));
    let row = db
        .client()
        .await
        .query_one(
            "SELECT * FROM outbox.replay(subscription => 'x', reason => 'fixed')",
            &[],
        )
        .await
        .expect("replay");
    let (replay_id, matched): (i64, i64) = (row.get("replay_id"), row.get("matched"));
    assert_eq!(matched, 1);
    wait_for_statuses(&db, "delivered", 1).await;

    let received = receiver
        .wait_for("/hook", 2, DEADLINE)
        .await
        .expect("original and replayed request");
    assert_eq!(received.len(), 2, "exactly one replayed request");
    let (original, replayed) = (&received[0], &received[1]);
    assert_eq!(
        original.header("webhook-id"),
        Some(event_id.to_string().as_str())
    );
    assert_eq!(replayed.header("webhook-id"), original.header("webhook-id"));
    assert_eq!(replayed.body, original.body, "body bytes differ");

    let attempts: Vec<(i32, Option<i32>, Option<i64>)> = query(
        &db,
        "SELECT attempt, status_code, replay_id FROM outbox.delivery_attempts ORDER BY id",
    )
    .await
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect();
    assert_eq!(
        attempts,
        vec![(1, Some(500), None), (1, Some(200), Some(replay_id))]
    );
    let row = &query(
        &db,
        &format!("SELECT matched, reason, dry_run FROM outbox.replays WHERE id = {replay_id}"),
    )
    .await[0];
    assert_eq!(row.get::<_, i64>(0), 1);
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("fixed"));
    assert!(!row.get::<_, bool>(2));
    relay.shutdown().await;
}
