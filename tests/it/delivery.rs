//! The happy path and the request itself: what a subscriber receives, exactly once.

use std::collections::HashSet;
use std::time::Duration;

use outbox_relay::webhook::{SigningSecret, verify};
use serde_json::json;
use testkit::receiver::Receiver;

use crate::harness::db::TestDb;
use crate::harness::relay::*;

/// Committed events reach the subscriber once each, signed, with the SPEC body.
#[tokio::test]
async fn committed_events_are_delivered_once_each_with_valid_signatures_and_the_spec_body() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver");
    let (_, secret) = add_subscription(&db, "crm", &receiver.url("/hook"), &[]).await;
    let relay = spawn_default_relay(&db).await;

    let mut client = db.client().await;
    let tx = client.transaction().await.expect("begin");
    let mut ids = Vec::new();
    for lead in 0..20 {
        // Numbers a float would change: the payload is sent as PostgreSQL stored it, so a
        // subscriber gets every digit (given as text: serde_json's f64 would round them).
        let payload = format!(
            r#"{{"lead_id": {lead}, "big": 12345678901234567890123, "exact": 0.1, "precise": 3.141592653589793238462643}}"#
        );
        let row = tx
            .query_one(
                "INSERT INTO outbox.events (event_type, payload, tenant_id, source_service, ordering_key, metadata)
                 VALUES ('lead.created', $1::text::jsonb, 'acme', 'django-crm', $2, '{\"correlation_id\": \"c-1\"}')
                 RETURNING event_id",
                &[&payload, &format!("lead:{lead}")],
            )
            .await
            .expect("insert event");
        ids.push(row.get::<_, uuid::Uuid>(0));
    }
    tx.commit().await.expect("commit");
    // What PostgreSQL stored, as the text the relay must send byte for byte.
    let stored: std::collections::HashMap<String, String> = client
        .query(
            "SELECT event_id::text, payload::text FROM outbox.events",
            &[],
        )
        .await
        .expect("stored payloads")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();

    let received = receiver
        .wait_for("/hook", 20, DEADLINE)
        .await
        .expect("all delivered");
    wait_for_statuses(&db, "delivered", 20).await;
    // Anything extra would show up by now: the relay polls every 200 ms.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let received_again = receiver.received("/hook");
    assert_eq!(received_again.len(), 20, "each event exactly once");

    let secret = SigningSecret::parse(&secret).expect("secret");
    let mut seen = HashSet::new();
    for request in &received {
        let id = request
            .header("webhook-id")
            .expect("webhook-id")
            .to_string();
        assert!(seen.insert(id.clone()), "duplicate {id}");
        verify(
            &secret,
            &id,
            request.header("webhook-timestamp").expect("timestamp"),
            &request.body,
            request.header("webhook-signature").expect("signature"),
            chrono::Utc::now().timestamp(),
            300,
        )
        .expect("signature verifies");
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert!(
            request
                .header("user-agent")
                .unwrap_or("")
                .starts_with("outbox-relay/")
        );
        let body = request.json();
        assert_eq!(body["event_id"].as_str(), Some(id.as_str()));
        assert_eq!(body["event_type"], "lead.created");
        assert_eq!(body["tenant_id"], "acme");
        assert_eq!(body["source_service"], "django-crm");
        assert_eq!(body["metadata"], json!({"correlation_id": "c-1"}));
        let lead = body["data"]["lead_id"].as_i64().expect("lead_id");
        let text = std::str::from_utf8(&request.body).expect("UTF-8 body");
        let data = format!(r#""data":{}"#, stored[&id]);
        assert!(
            text.contains(&data),
            "data is not the stored payload text {data}:\n{text}"
        );
        for number in [
            r#""big": 12345678901234567890123"#,
            r#""exact": 0.1"#,
            r#""precise": 3.141592653589793238462643"#,
        ] {
            assert!(text.contains(number), "{number} lost in:\n{text}");
        }
        assert_eq!(body["ordering_key"], format!("lead:{lead}"));
        chrono::DateTime::parse_from_rfc3339(body["timestamp"].as_str().expect("timestamp"))
            .expect("RFC 3339 timestamp");
        let keys: Vec<&str> = body
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = vec![
            "data",
            "event_id",
            "event_type",
            "metadata",
            "ordering_key",
            "source_service",
            "tenant_id",
            "timestamp",
        ];
        expected.sort_unstable();
        assert_eq!(keys, expected);
    }
    let expected: HashSet<String> = ids.iter().map(|id| id.to_string()).collect();
    assert_eq!(seen, expected);
    relay.shutdown().await;
}

#[tokio::test]
async fn rolled_back_event_is_never_delivered() {
    let (db, receiver) = db_with_subscriber("crm", "/hook", &[]).await;
    let relay = spawn_default_relay(&db).await;

    let mut client = db.client().await;
    let tx = client.transaction().await.expect("begin");
    tx.execute(
        "SELECT outbox.publish('lead.created', '{\"lead_id\": 1}')",
        &[],
    )
    .await
    .expect("publish");
    tx.rollback().await.expect("rollback");
    // A committed marker after it: once the marker arrives, the rolled-back one had its chance.
    publish(&db, "lead.marker", json!({})).await;

    receiver
        .wait_for("/hook", 1, DEADLINE)
        .await
        .expect("marker");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let received = receiver.received("/hook");
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0].json()["event_type"], "lead.marker");
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.events").await, 1);
    relay.shutdown().await;
}

/// An event is not dispatched while its deliver_after is in the future, and is once it is
/// due. Checked by state, not by clock: the scheduled event is inserted before a due one,
/// so the dispatch pass that took the due one (in id order) passed over it.
#[tokio::test]
async fn deliver_after_holds_an_event_back_until_it_is_due() {
    let (db, receiver) = db_with_subscriber("crm", "/hook", &[]).await;
    let relay = spawn_default_relay(&db).await;

    db.client()
        .await
        .execute(
            "SELECT outbox.publish('lead.later', '{}', deliver_after => now() + interval '1 hour')",
            &[],
        )
        .await
        .expect("publish scheduled");
    publish(&db, "lead.now", json!({})).await;

    wait_for_statuses(&db, "delivered", 1).await;
    let received = receiver.received("/hook");
    let types: Vec<_> = received
        .iter()
        .map(|r| r.json()["event_type"].clone())
        .collect();
    assert_eq!(types, [json!("lead.now")], "only the due event was sent");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.events WHERE event_type = 'lead.later' AND dispatched_at IS NULL"
        )
        .await,
        1,
        "the scheduled event is not dispatched before deliver_after"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.deliveries").await,
        1,
        "no delivery for the scheduled event yet"
    );

    // Now it is due.
    db.client()
        .await
        .execute(
            "UPDATE outbox.events SET deliver_after = now() WHERE event_type = 'lead.later'",
            &[],
        )
        .await
        .expect("make it due");
    let both = receiver
        .wait_for("/hook", 2, DEADLINE)
        .await
        .expect("scheduled one too");
    assert_eq!(both[1].json()["event_type"], "lead.later");
    wait_for_statuses(&db, "delivered", 2).await;
    assert_eq!(receiver.received("/hook").len(), 2);
    relay.shutdown().await;
}

/// The subscription's static headers go out with every request.
#[tokio::test]
async fn subscription_headers_are_sent() {
    let (db, receiver) = db_with_subscriber(
        "crm",
        "/hook",
        &[(
            "headers",
            "'{\"x-api-key\": \"k-123\", \"x-team\": \"growth\"}'",
        )],
    )
    .await;
    let relay = spawn_default_relay(&db).await;
    publish(&db, "lead.created", json!({})).await;
    let received = receiver
        .wait_for("/hook", 1, DEADLINE)
        .await
        .expect("delivered");
    assert_eq!(received[0].header("x-api-key"), Some("k-123"));
    assert_eq!(received[0].header("x-team"), Some("growth"));
    relay.shutdown().await;
}

/// A retry sends the very same bytes and webhook-id as the first attempt.
#[tokio::test]
async fn retries_send_the_same_body_and_webhook_id() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver");
    receiver.queue("/hook", [testkit::receiver::Reply::Status(500)]);
    add_subscription(
        &db,
        "crm",
        &receiver.url("/hook"),
        &[("retry_schedule", "'{100 milliseconds}'")],
    )
    .await;
    let relay = spawn_default_relay(&db).await;
    publish(&db, "lead.created", json!({"n": 1.50, "s": "é"})).await;
    let received = receiver
        .wait_for("/hook", 2, DEADLINE)
        .await
        .expect("two attempts");
    assert_eq!(received[0].body, received[1].body);
    assert_eq!(
        received[0].header("webhook-id"),
        received[1].header("webhook-id")
    );
    wait_for_statuses(&db, "delivered", 1).await;
    relay.shutdown().await;
}
