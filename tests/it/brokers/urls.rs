//! Broker target URLs at insert: refused with the constraint's name when unusable, and shown
//! with the password masked everywhere.

use crate::harness::db::TestDb;

/// Inserts a subscription with `url`; the constraint that refused it, if any.
async fn refusal(db: &TestDb, url: &str) -> Option<String> {
    match db
        .client()
        .await
        .execute(
            "INSERT INTO outbox.subscriptions (name, url) VALUES ($1, $2)",
            &[&super::unique("s"), &url],
        )
        .await
    {
        Ok(_) => None,
        Err(error) => Some(
            error
                .as_db_error()
                .and_then(|db_error| db_error.constraint())
                .unwrap_or_else(|| panic!("{url}: not a constraint violation: {error}"))
                .to_owned(),
        ),
    }
}

/// The SPEC's broker forms are taken; an unknown scheme, a missing subject or stream, a bad or
/// unknown query parameter is refused at insert, naming `url_scheme`.
#[tokio::test]
async fn broker_urls_are_checked_at_insert_with_the_constraint_name() {
    let db = TestDb::new().await;
    for good in [
        "nats://127.0.0.1:4222/orders.created",
        "nats://user:pw@nats.internal/orders",
        "redis://127.0.0.1:6379/0?stream=orders&maxlen=1000",
        "rediss://:pw@cache.internal?stream=orders",
        "amqp://guest:guest@127.0.0.1:5672/%2f?exchange=events&routing_key=orders",
        "amqps://rabbit.internal/prod?exchange=events",
        "amqp://rabbit.internal/?routing_key=orders",
        "kafka://127.0.0.1:9092/orders",
        "kafka://user:pw@k1.internal:9092,k2.internal:9093,[::1]:9094/orders.v1_x-y",
        "https://hooks.example.com/x#still-fine",
    ] {
        assert_eq!(refusal(&db, good).await, None, "{good} refused");
    }
    for bad in [
        "kafka://127.0.0.1:9092",
        "kafka://127.0.0.1:9092/",
        "kafka://127.0.0.1/orders",
        "kafka://127.0.0.1:9092,/orders",
        "kafka://127.0.0.1:9092,k2/orders",
        "kafka://127.0.0.1:9092/orders?acks=1",
        "kafka://127.0.0.1:9092/a/b",
        "kafka://127.0.0.1:9092/..",
        "kafka://127.0.0.1:9092/orders#x",
        "mqtt://127.0.0.1/orders",
        "nats://127.0.0.1:4222",
        "nats://127.0.0.1:4222/",
        "nats://127.0.0.1:4222/orders.*",
        "nats://127.0.0.1:4222/orders?stream=x",
        "redis://127.0.0.1:6379/0",
        "redis://127.0.0.1:6379/0?maxlen=10",
        "redis://127.0.0.1:6379/0?stream=",
        "redis://127.0.0.1:6379/0?stream=s&maxln=10",
        "redis://127.0.0.1:6379/0?stream=s&maxlen=0",
        "redis://127.0.0.1:6379/0?stream=s&maxlen=ten",
        "redis://127.0.0.1:6379/zero?stream=s",
        "amqp://127.0.0.1/?exchange=e&queue=q",
        "amqp://127.0.0.1/?exchange",
        "amqp://127.0.0.1/?exchange=a&exchange=b",
        "nats://h/a b",
    ] {
        assert_eq!(
            refusal(&db, bad).await.as_deref(),
            Some("url_scheme"),
            "{bad} accepted"
        );
    }
}

/// The admin API takes broker targets, shows them with the password masked, refuses a bad
/// one naming the `url` field, and its OpenAPI document lists the schemes.
#[tokio::test]
async fn the_admin_api_takes_broker_targets_and_masks_their_passwords() {
    use crate::admin_api::Api;
    use reqwest::Method;
    use serde_json::json;

    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    for (name, url, shown) in [
        (
            "orders-nats",
            "nats://relay:hunter2@127.0.0.1:4222/orders.created",
            "nats://relay:***@127.0.0.1:4222/orders.created",
        ),
        (
            "orders-redis",
            "redis://default:hunter2@127.0.0.1:6379/0?stream=orders&maxlen=1000",
            "redis://default:***@127.0.0.1:6379/0?stream=orders&maxlen=1000",
        ),
        (
            "orders-kafka",
            "kafka://relay:hunter2@127.0.0.1:9092,127.0.0.1:9093/orders",
            "kafka://relay:***@127.0.0.1:9092,127.0.0.1:9093/orders",
        ),
        (
            "orders-amqp",
            "amqp://guest:hunter2@127.0.0.1:5672/%2f?exchange=events&routing_key=orders",
            "amqp://guest:***@127.0.0.1:5672/%2f?exchange=events&routing_key=orders",
        ),
    ] {
        let created = api
            .post("/admin/v1/subscriptions", json!({"name": name, "url": url}))
            .await
            .expect(201);
        assert_eq!(created["url"], shown, "{created:#}");
    }
    let listed = api.get("/admin/v1/subscriptions").await.expect(200);
    assert!(!listed.to_string().contains("hunter2"), "{listed:#}");
    api.post(
        "/admin/v1/subscriptions",
        json!({"name": "bad", "url": "redis://127.0.0.1:6379/0?stream=s&maxln=5"}),
    )
    .await
    .expect_error(400, "invalid_input", Some("url"));
    let document = api
        .call_as(None, Method::GET, "/admin/v1/openapi.json", None)
        .await
        .expect(200)
        .to_string();
    for scheme in ["nats://", "redis://", "amqp://", "kafka://"] {
        assert!(
            document.contains(scheme),
            "the document does not list {scheme}"
        );
    }
    relay.shutdown().await;
}
