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
        "https://hooks.example.com/x#still-fine",
    ] {
        assert_eq!(refusal(&db, good).await, None, "{good} refused");
    }
    for bad in [
        "kafka://127.0.0.1:9092/orders",
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
