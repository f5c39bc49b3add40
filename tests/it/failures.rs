//! Subscribers that fail, hang, redirect, go away or lie; and the limits that protect them.

use std::time::Duration;

use outbox_relay::config::{CidrList, RelayConfig};
use serde_json::json;
use testkit::receiver::{Receiver, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::db::TestDb;
use crate::harness::relay::*;

/// (attempt, status_code, error, response_body) of every recorded attempt, in order.
async fn attempts(db: &TestDb) -> Vec<(i32, Option<i32>, Option<String>, Option<String>)> {
    db.client()
        .await
        .query(
            "SELECT attempt, status_code, error, response_body FROM outbox.delivery_attempts ORDER BY id",
            &[],
        )
        .await
        .expect("read attempts")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

async fn last_error(db: &TestDb) -> String {
    db.client()
        .await
        .query_one(
            "SELECT coalesce(last_error, '') FROM outbox.deliveries",
            &[],
        )
        .await
        .expect("one delivery")
        .get(0)
}

const FAST_RETRIES: (&str, &str) = ("retry_schedule", "'{100 milliseconds,100 milliseconds}'");

#[tokio::test]
async fn failed_attempts_are_retried_until_delivered_and_recorded() {
    let (db, receiver) = db_with_subscriber("crm", "/hook", &[FAST_RETRIES]).await;
    receiver.queue("/hook", [Reply::Status(500), Reply::Status(502)]);
    let relay = spawn_default_relay(&db).await;
    publish(&db, "lead.created", json!({})).await;

    wait_for_statuses(&db, "delivered", 1).await;
    assert_eq!(deliveries(&db).await, vec![("delivered".to_string(), 3)]);
    let recorded = attempts(&db).await;
    assert_eq!(
        recorded.len(),
        3,
        "two failures and the success after retries: {recorded:?}"
    );
    assert_eq!((recorded[0].0, recorded[0].1), (1, Some(500)));
    assert_eq!(
        recorded[0].2.as_deref(),
        Some("HTTP 500 Internal Server Error")
    );
    assert_eq!((recorded[1].0, recorded[1].1), (2, Some(502)));
    assert_eq!(
        (recorded[2].0, recorded[2].1, recorded[2].2.clone()),
        (3, Some(200), None)
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn exhausted_attempts_make_the_delivery_dead() {
    let (db, receiver) = db_with_subscriber("crm", "/hook", &[FAST_RETRIES]).await;
    receiver.set_default("/hook", Reply::Status(500));
    let relay = spawn_default_relay(&db).await;
    publish(&db, "lead.created", json!({})).await;

    wait_for_statuses(&db, "dead", 1).await;
    assert_eq!(
        deliveries(&db).await,
        vec![("dead".to_string(), 3)],
        "1 + 2 scheduled retries"
    );
    let recorded = attempts(&db).await;
    assert_eq!(
        recorded.iter().map(|a| a.0).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(recorded.iter().all(|a| a.1 == Some(500)));
    // Nothing more is sent once dead.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received("/hook").len(), 3);
    relay.shutdown().await;
}

/// A 302 is a failure; the Location is never visited.
#[tokio::test]
async fn redirects_are_not_followed() {
    let (db, receiver) = db_with_subscriber("crm", "/hook", &[("retry_schedule", "'{}'")]).await;
    receiver.set_default("/hook", Reply::Redirect(receiver.url("/elsewhere")));
    let relay = spawn_default_relay(&db).await;
    publish(&db, "lead.created", json!({})).await;

    wait_for_statuses(&db, "dead", 1).await;
    assert!(
        receiver.received("/elsewhere").is_empty(),
        "redirect was followed"
    );
    let recorded = attempts(&db).await;
    assert_eq!(recorded[0].1, Some(302));
    assert!(last_error(&db).await.contains("redirects are not followed"));
    relay.shutdown().await;
}

#[tokio::test]
async fn gone_disables_the_subscription_with_a_reason() {
    let (db, receiver) = db_with_subscriber("crm", "/hook", &[FAST_RETRIES]).await;
    receiver.set_default("/hook", Reply::Status(410));
    let relay = spawn_default_relay(&db).await;
    publish(&db, "lead.created", json!({})).await;

    wait_until("subscription disabled", DEADLINE, || async {
        count(&db, "SELECT count(*) FROM outbox.subscriptions WHERE NOT enabled AND disabled_reason LIKE '%410%'").await == 1
    })
    .await;
    // No further attempts while disabled; the delivery waits (failing) for a re-enable.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(receiver.received("/hook").len(), 1);
    assert_eq!(deliveries(&db).await, vec![("failing".to_string(), 1)]);
    relay.shutdown().await;
}

#[tokio::test]
async fn a_hanging_subscriber_times_out_and_the_timeout_is_recorded() {
    let (db, receiver) = db_with_subscriber(
        "crm",
        "/hook",
        &[
            ("timeout", "'300 milliseconds'"),
            ("retry_schedule", "'{}'"),
        ],
    )
    .await;
    receiver.set_default("/hook", Reply::Hang);
    let relay = spawn_default_relay(&db).await;
    publish(&db, "lead.created", json!({})).await;

    wait_for_statuses(&db, "dead", 1).await;
    let recorded = attempts(&db).await;
    assert_eq!(recorded[0].1, None);
    let error = recorded[0].2.clone().unwrap_or_default();
    assert!(error.starts_with("timeout"), "{error}");
    relay.shutdown().await;
}

/// Only the first 4 KiB of a response body is kept (and read).
#[tokio::test]
async fn response_body_is_truncated_to_4_kib() {
    let (db, receiver) = db_with_subscriber("crm", "/hook", &[("retry_schedule", "'{}'")]).await;
    receiver.set_default("/hook", Reply::LargeBody(500, 1 << 20));
    let relay = spawn_default_relay(&db).await;
    publish(&db, "lead.created", json!({})).await;

    wait_for_statuses(&db, "dead", 1).await;
    let body = attempts(&db).await[0].3.clone().unwrap_or_default();
    assert_eq!(body.len(), 4096);
    assert!(body.bytes().all(|b| b == b'x'));
    relay.shutdown().await;
}

/// Loopback is refused when OUTBOX_ALLOW_PRIVATE_TARGETS does not cover it; the subscriber
/// never sees a request and the attempt says why.
#[tokio::test]
async fn private_targets_are_refused_without_an_allow_list() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver");
    let localhost_url = format!("http://localhost:{}/hook", receiver.addr.port());
    add_subscription(
        &db,
        "ip-literal",
        &receiver.url("/hook"),
        &[("retry_schedule", "'{}'")],
    )
    .await;
    add_subscription(
        &db,
        "dns-name",
        &localhost_url,
        &[("retry_schedule", "'{}'")],
    )
    .await;
    let config = RelayConfig {
        allow_private_targets: CidrList(vec![]),
        ..RelayConfig::for_tests()
    };
    let relay = spawn_relay(&db, config).await;
    publish(&db, "lead.created", json!({})).await;

    wait_for_statuses(&db, "dead", 2).await;
    assert!(
        receiver.received_all().is_empty(),
        "a forbidden target was contacted"
    );
    let recorded = attempts(&db).await;
    assert_eq!(
        recorded.len(),
        2,
        "one refused attempt per subscription: {recorded:?}"
    );
    for (attempt, status_code, error, _) in recorded {
        assert_eq!(attempt, 1);
        assert_eq!(status_code, None);
        let error = error.unwrap_or_default();
        assert!(error.starts_with("target refused"), "{error}");
        assert!(error.contains("OUTBOX_ALLOW_PRIVATE_TARGETS"), "{error}");
    }
    relay.shutdown().await;
}

/// 429 with Retry-After: the next attempt waits that long, not the (shorter) schedule.
#[tokio::test]
async fn retry_after_is_honoured() {
    let (db, receiver) = db_with_subscriber("crm", "/hook", &[FAST_RETRIES]).await;
    receiver.queue("/hook", [Reply::RetryAfter(429, "2".into())]);
    let relay = spawn_default_relay(&db).await;
    publish(&db, "lead.created", json!({})).await;

    let received = receiver
        .wait_for("/hook", 2, DEADLINE)
        .await
        .expect("retried");
    let gap = received[1].at - received[0].at;
    assert!(
        gap >= Duration::from_millis(1900),
        "retried after {gap:?}, before Retry-After"
    );
    wait_for_statuses(&db, "delivered", 1).await;
    relay.shutdown().await;
}

/// A peer that answers with bytes that are not HTTP, and one that refuses connections: both
/// are recorded failures, and nothing is lost.
#[tokio::test]
async fn garbage_responses_and_refused_connections_are_failures() {
    let db = TestDb::new().await;
    let garbage = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let garbage_url = format!("http://{}/hook", garbage.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = garbage.accept().await {
            let mut buffer = [0u8; 1024];
            let _ = socket.read(&mut buffer).await;
            let _ = socket.write_all(b"\x00\xffthis is not http\r\n\r\n").await;
        }
    });
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let closed_url = format!("http://{}/hook", closed.local_addr().expect("addr"));
    drop(closed);

    add_subscription(&db, "garbage", &garbage_url, &[("retry_schedule", "'{}'")]).await;
    add_subscription(&db, "closed", &closed_url, &[("retry_schedule", "'{}'")]).await;
    let relay = spawn_default_relay(&db).await;
    publish(&db, "lead.created", json!({})).await;

    wait_for_statuses(&db, "dead", 2).await;
    let rows = db
        .client()
        .await
        .query(
            "SELECT s.name, a.error FROM outbox.delivery_attempts a
             JOIN outbox.deliveries d ON d.id = a.delivery_id JOIN outbox.subscriptions s ON s.id = d.subscription_id
             ORDER BY s.name",
            &[],
        )
        .await
        .expect("attempts");
    let errors: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(errors.len(), 2);
    assert!(errors[0].1.starts_with("connection failed"), "{errors:?}");
    assert!(
        errors[1].1.starts_with("request failed") || errors[1].1.starts_with("connection failed"),
        "{errors:?}"
    );
    relay.shutdown().await;
}

/// max_in_flight = 1: the next request only starts after the previous one was answered.
#[tokio::test]
async fn max_in_flight_limits_concurrent_requests() {
    let (db, receiver) = db_with_subscriber("crm", "/hook", &[("max_in_flight", "1")]).await;
    receiver.set_default("/hook", Reply::Delay(Duration::from_millis(200), 200));
    let relay = spawn_default_relay(&db).await;
    for n in 0..4 {
        publish(&db, "lead.created", json!({ "n": n })).await;
    }
    let received = receiver
        .wait_for("/hook", 4, DEADLINE)
        .await
        .expect("all delivered");
    for pair in received.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_millis(195),
            "two requests overlapped: gap {gap:?}"
        );
    }
    relay.shutdown().await;
}

/// rate_limit_per_second = 2: six requests cannot all go out in the first second.
#[tokio::test]
async fn rate_limit_spaces_requests() {
    let (db, receiver) =
        db_with_subscriber("crm", "/hook", &[("rate_limit_per_second", "2")]).await;
    let relay = spawn_default_relay(&db).await;
    db.client()
        .await
        .batch_execute("INSERT INTO outbox.events (event_type, payload) SELECT 'tick', '{}' FROM generate_series(1, 6)")
        .await
        .expect("publish");
    let received = receiver
        .wait_for("/hook", 6, DEADLINE)
        .await
        .expect("all delivered");
    // A bucket of 2 plus 2 per second: the sixth request is at least ~2 s after the first.
    let span = received[5].at - received[0].at;
    assert!(
        span >= Duration::from_millis(1800),
        "6 requests in {span:?} at 2/s"
    );
    relay.shutdown().await;
}
