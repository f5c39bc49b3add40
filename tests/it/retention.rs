//! Retention (`OUTBOX_RETENTION`): finished events past it are deleted with their deliveries
//! and attempts; anything still open, not yet dispatched, or recent stays.

use outbox_relay::config::RelayConfig;
use serde_json::json;
use std::time::Duration;
use testkit::receiver::Reply;

use crate::harness::relay::*;

#[tokio::test]
async fn finished_events_past_retention_are_purged_and_open_ones_kept() {
    let (db, receiver) = db_with_subscriber("crm", "/ok", &[("event_types", "'{lead.*}'")]).await;
    receiver.set_default("/broken", Reply::Status(500));
    add_subscription(
        &db,
        "broken",
        &receiver.url("/broken"),
        &[
            ("event_types", "'{invoice.*}'"),
            ("retry_schedule", "'{1 hour}'"),
        ],
    )
    .await;
    for n in 0..5 {
        publish(&db, "lead.created", json!({ "n": n })).await;
    }
    publish(&db, "invoice.paid", json!({ "n": 99 })).await; // fails once, then waits an hour
    publish(&db, "noise.ignored", json!({})).await; // matches nobody: dispatched, finished
    let relay = spawn_default_relay(&db).await;
    wait_for_statuses(&db, "delivered", 5).await;
    wait_for_statuses(&db, "failing", 1).await;
    wait_until(
        "every event dispatched and passed by ordered fan-out",
        DEADLINE,
        || async {
            count(
            &db,
            "SELECT count(*) FROM outbox.events WHERE dispatched_at IS NULL",
        )
        .await
            == 0
            // Passed by ordered fan-out too (its cursor trails by a probe round): only then
            // is an event finished. The purge runs when the next relay starts, then a
            // minute later, so it must find them finished at once.
            && count(
                &db,
                "SELECT count(*) FROM outbox.events
                  WHERE id > (SELECT last_event_id FROM outbox.ordered_dispatch_cursor)",
            )
            .await
                == 0
        },
    )
    .await;
    relay.shutdown().await;

    // Age everything but one delivered event (recent, finished: it must survive), then add
    // an old one scheduled for later (not yet dispatched).
    let client = db.client().await;
    client
        .batch_execute(
            "UPDATE outbox.events SET created_at = now() - interval '2 days'
              WHERE NOT (event_type = 'lead.created' AND payload = '{\"n\": 4}');
             INSERT INTO outbox.events (event_type, payload, created_at, deliver_after)
             VALUES ('lead.scheduled', '{}', now() - interval '2 days', now() + interval '1 day');",
        )
        .await
        .expect("age events");
    let attempts_before = count(&db, "SELECT count(*) FROM outbox.delivery_attempts").await;
    assert!(attempts_before >= 1, "the failing delivery has an attempt");

    let relay = spawn_relay(
        &db,
        RelayConfig {
            retention: Some(Duration::from_secs(24 * 3600)),
            ..RelayConfig::for_tests()
        },
    )
    .await;
    // The first purge runs at start; the relay also dispatches nothing new meanwhile.
    wait_until("finished old events purged", DEADLINE, || async {
        count(
            &db,
            "SELECT count(*) FROM outbox.events
              WHERE event_type IN ('lead.created', 'noise.ignored')
                AND created_at < now() - interval '1 day'",
        )
        .await
            == 0
    })
    .await;
    relay.shutdown().await;

    let left: Vec<(String, String)> = client
        .query(
            "SELECT event_type, payload::text FROM outbox.events ORDER BY id",
            &[],
        )
        .await
        .expect("remaining events")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        left,
        [
            ("lead.created".to_string(), r#"{"n": 4}"#.to_string()),
            ("invoice.paid".to_string(), r#"{"n": 99}"#.to_string()),
            ("lead.scheduled".to_string(), "{}".to_string()),
        ],
        "the recent finished event, the open one and the scheduled one stay"
    );
    let deliveries_left: Vec<(String, String)> = client
        .query(
            "SELECT e.event_type, d.status FROM outbox.deliveries d
               JOIN outbox.events e ON e.id = d.event_id ORDER BY d.id",
            &[],
        )
        .await
        .expect("remaining deliveries")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        deliveries_left,
        [
            ("lead.created".to_string(), "delivered".to_string()),
            ("invoice.paid".to_string(), "failing".to_string()),
        ],
        "the old delivered ones went with their events; the recent and the open one stay"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.delivery_attempts").await,
        attempts_before,
        "the open delivery keeps its attempts"
    );
}

#[test]
fn retention_below_an_hour_is_refused() {
    let error = RelayConfig {
        retention: Some(Duration::from_secs(60)),
        ..RelayConfig::for_tests()
    }
    .validate()
    .expect_err("a minute is too short");
    assert!(error.to_string().contains("OUTBOX_RETENTION"), "{error}");
}
