//! Whatever one subscriber answers, it is recorded as that delivery's attempt and every other
//! subscription keeps getting its events (SPEC, Guarantees: "No single subscriber, response
//! or row can stop delivery to the others").

use serde_json::json;
use testkit::receiver::Receiver;

use crate::harness::db::TestDb;
use crate::harness::raw_http::{Answer, RawServer};
use crate::harness::relay::*;

const EVENTS: i64 = 100;
/// Two attempts per delivery, quickly, so every bad delivery ends dead within the test.
const BAD_SUBSCRIBER: [(&str, &str); 2] = [
    ("retry_schedule", "'{100 milliseconds}'"),
    ("timeout", "'3 seconds'"),
];

fn answers() -> Vec<(&'static str, Answer)> {
    vec![
        (
            "nul-in-body",
            Answer::status_with_body(500, b"upstream\0failed"),
        ),
        (
            "not-utf8",
            Answer::status_with_body(500, &[b'x', 0xff, 0xfe, 0x00, 0xc3]),
        ),
        (
            "body-shorter-than-content-length",
            Answer::Bytes(b"HTTP/1.1 500 X\r\ncontent-length: 100\r\n\r\nonly ten b".to_vec()),
        ),
        (
            "reset-mid-body",
            Answer::BytesThenReset(
                b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial".to_vec(),
            ),
        ),
        ("endless-headers", Answer::EndlessHeaders),
        (
            "nul-in-header-name",
            Answer::Bytes(b"HTTP/1.1 500 X\r\nx-bad\0name: v\r\ncontent-length: 0\r\n\r\n".to_vec()),
        ),
        (
            "binary-header-value-and-retry-after",
            Answer::Bytes(
                b"HTTP/1.1 503 X\r\nretry-after: \xff\xfe\r\nx-v: \xc3\x28\r\ncontent-length: 4\r\n\r\n\0\xff\0\xfe"
                    .to_vec(),
            ),
        ),
        (
            "not-http",
            Answer::Bytes(b"\0\0\0garbage\xff\r\n\r\n".to_vec()),
        ),
    ]
}

/// Every bad answer at once, next to a healthy subscriber: the healthy one receives all
/// events, and each bad delivery ends `dead` with both attempts recorded and its error (and
/// body, where there was one) stored as text PostgreSQL accepts.
#[tokio::test]
async fn no_subscriber_answer_stops_delivery_to_the_others() {
    let db = TestDb::new().await;
    let healthy = Receiver::start().await.expect("receiver");
    add_subscription(&db, "healthy", &healthy.url("/hook"), &[]).await;
    let mut servers = Vec::new();
    for (name, answer) in answers() {
        let server = RawServer::start(answer).await;
        add_subscription(&db, name, &server.url("/hook"), &BAD_SUBSCRIBER).await;
        servers.push((name, server));
    }
    let relay = spawn_default_relay(&db).await;

    for seq in 0..EVENTS {
        publish(&db, "lead.created", json!({ "seq": seq })).await;
    }

    let received = healthy
        .wait_for("/hook", EVENTS as usize, DEADLINE)
        .await
        .expect("the healthy subscriber receives every event");
    let mut seqs: Vec<i64> = received
        .iter()
        .map(|r| r.json()["data"]["seq"].as_i64().expect("seq"))
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (0..EVENTS).collect::<Vec<_>>(), "each event once");

    let bad_subscriptions = servers.len() as i64;
    wait_until(
        "every delivery to a bad subscriber is dead",
        DEADLINE * 2,
        || async {
            count(
                &db,
                "SELECT count(*) FROM outbox.deliveries d JOIN outbox.subscriptions s
                   ON s.id = d.subscription_id WHERE s.name <> 'healthy' AND d.status = 'dead'",
            )
            .await
                == EVENTS * bad_subscriptions
        },
    )
    .await;
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.deliveries d JOIN outbox.subscriptions s
               ON s.id = d.subscription_id WHERE s.name = 'healthy' AND d.status = 'delivered'"
        )
        .await,
        EVENTS
    );

    let client = db.client().await;
    for (name, server) in &servers {
        let row = client
            .query_one(
                "SELECT count(*), count(a.error), min(a.attempt), max(a.attempt)
                   FROM outbox.delivery_attempts a
                   JOIN outbox.deliveries d ON d.id = a.delivery_id
                   JOIN outbox.subscriptions s ON s.id = d.subscription_id
                  WHERE s.name = $1",
                &[name],
            )
            .await
            .expect("attempts of one subscription");
        let (attempts, with_error): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!(
            attempts,
            EVENTS * 2,
            "{name}: both attempts of every delivery are recorded"
        );
        assert_eq!(
            with_error, attempts,
            "{name}: every attempt says what failed"
        );
        assert!(
            server.requests() >= (EVENTS * 2) as usize,
            "{name}: the subscriber was really asked ({} requests)",
            server.requests()
        );
    }
    let nul_body: String = client
        .query_one(
            "SELECT a.response_body FROM outbox.delivery_attempts a
               JOIN outbox.deliveries d ON d.id = a.delivery_id
               JOIN outbox.subscriptions s ON s.id = d.subscription_id
              WHERE s.name = 'nul-in-body' LIMIT 1",
            &[],
        )
        .await
        .expect("a recorded body")
        .get(0);
    assert_eq!(nul_body, "upstream\u{FFFD}failed");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'in_flight'"
        )
        .await,
        0
    );
    relay.shutdown().await;
}

/// The net under the NUL fix: should the database still refuse one result (here a trigger
/// refuses it, as PostgreSQL refused NUL bytes), the completer writes the rest of its batch,
/// and records the refused one without the subscriber's text instead of retrying forever.
#[tokio::test]
async fn a_result_the_database_refuses_is_isolated_and_recorded_without_its_text() {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute(
            "CREATE FUNCTION public.refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.response_body LIKE '%poison%' THEN
                     RAISE EXCEPTION 'this body is refused' USING ERRCODE = '22023';
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER refuse_poison BEFORE INSERT ON outbox.delivery_attempts
                 FOR EACH ROW EXECUTE FUNCTION public.refuse_poison();",
        )
        .await
        .expect("install the refusing trigger");
    let healthy = Receiver::start().await.expect("receiver");
    add_subscription(&db, "healthy", &healthy.url("/hook"), &[]).await;
    let poison = RawServer::start(Answer::status_with_body(500, b"poison")).await;
    add_subscription(&db, "poisoned", &poison.url("/hook"), &BAD_SUBSCRIBER).await;
    let relay = spawn_default_relay(&db).await;

    for seq in 0..EVENTS {
        publish(&db, "lead.created", json!({ "seq": seq })).await;
    }
    healthy
        .wait_for("/hook", EVENTS as usize, DEADLINE)
        .await
        .expect("the healthy subscriber receives every event");
    wait_until("every poisoned delivery is dead", DEADLINE * 2, || async {
        count(
            &db,
            "SELECT count(*) FROM outbox.deliveries d JOIN outbox.subscriptions s
               ON s.id = d.subscription_id WHERE s.name = 'poisoned' AND d.status = 'dead'",
        )
        .await
            == EVENTS
    })
    .await;
    wait_for_statuses(&db, "delivered", EVENTS).await;
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE a.response_body IS NULL
                                 AND a.error LIKE 'HTTP 500; the result as received could not be stored (SQLSTATE 22023)%')
               FROM outbox.delivery_attempts a
               JOIN outbox.deliveries d ON d.id = a.delivery_id
               JOIN outbox.subscriptions s ON s.id = d.subscription_id
              WHERE s.name = 'poisoned'",
            &[],
        )
        .await
        .expect("poisoned attempts");
    let (attempts, stored_without_text): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(attempts, EVENTS * 2, "every attempt is recorded");
    assert_eq!(
        stored_without_text, attempts,
        "each without the refused text"
    );
    relay.shutdown().await;
}
