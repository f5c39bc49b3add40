//! Bad rows are refused at INSERT, so the producer's own transaction fails loudly instead of
//! an event being lost later. Each case names the constraint an operator will see.

use crate::harness::db::TestDb;

/// Runs `sql` expecting a CHECK/unique violation whose message names `constraint`.
async fn refused(db: &TestDb, sql: &str, constraint: &str) {
    let error = db
        .client()
        .await
        .batch_execute(sql)
        .await
        .expect_err(&format!("accepted: {sql}"));
    let db_error = error
        .as_db_error()
        .unwrap_or_else(|| panic!("not a database error: {error}"));
    assert_eq!(
        db_error.constraint(),
        Some(constraint),
        "{sql}: {}",
        db_error.message()
    );
}

#[tokio::test]
async fn bad_events_are_refused_at_insert() {
    let db = TestDb::new().await;
    let cases = [
        (
            "INSERT INTO outbox.events (event_type, payload) VALUES ('lead created', '{}')",
            "event_type_format",
        ),
        (
            "INSERT INTO outbox.events (event_type, payload) VALUES ('', '{}')",
            "event_type_format",
        ),
        (
            "INSERT INTO outbox.events (event_type, payload) VALUES (repeat('a', 256), '{}')",
            "event_type_format",
        ),
        (
            "INSERT INTO outbox.events (event_type, payload) VALUES ('lead/created', '{}')",
            "event_type_format",
        ),
        (
            "INSERT INTO outbox.events (event_type, payload) VALUES ('big', jsonb_build_object('blob', repeat('x', 1048576)))",
            "payload_size",
        ),
        (
            "INSERT INTO outbox.events (event_type, payload, metadata) VALUES ('a', '{}', '[1]')",
            "metadata_is_object",
        ),
        (
            "INSERT INTO outbox.events (event_type, payload, target_services) VALUES ('a', '{}', '{}')",
            "target_services_not_empty",
        ),
        (
            "INSERT INTO outbox.events (event_type, payload, ordering_key) VALUES ('a', '{}', '')",
            "ordering_key_length",
        ),
    ];
    for (sql, constraint) in cases {
        refused(&db, sql, constraint).await;
    }
    // outbox.publish goes through the same checks.
    refused(
        &db,
        "SELECT outbox.publish('bad type', '{}')",
        "event_type_format",
    )
    .await;
    // A producer's own event_id makes a retried publish idempotent: the duplicate fails.
    db.client()
        .await
        .batch_execute("INSERT INTO outbox.events (event_id, event_type, payload) VALUES ('6f1c1f5e-1d7a-4d43-9a57-6a0f8e0f2a11', 'a', '{}')")
        .await
        .expect("first insert");
    refused(
        &db,
        "INSERT INTO outbox.events (event_id, event_type, payload) VALUES ('6f1c1f5e-1d7a-4d43-9a57-6a0f8e0f2a11', 'a', '{}')",
        "events_event_id_key",
    )
    .await;
    // Good rows still go in: letters, digits and ._:- are all allowed.
    db.client()
        .await
        .batch_execute("INSERT INTO outbox.events (event_type, payload) VALUES ('Lead_v2.created:eu-1', '[1, 2]')")
        .await
        .expect("valid event accepted");
}

#[tokio::test]
async fn bad_subscriptions_are_refused_at_creation() {
    let db = TestDb::new().await;
    let insert = |columns: &str, values: &str| {
        format!(
            "INSERT INTO outbox.subscriptions (name, url{columns}) VALUES ('s', 'https://hooks.example.com/x'{values})"
        )
    };
    let cases = [
        (
            "INSERT INTO outbox.subscriptions (name, url) VALUES ('s', 'ftp://example.com/x')"
                .to_string(),
            "url_scheme",
        ),
        (
            "INSERT INTO outbox.subscriptions (name, url) VALUES ('s', 'http://')".to_string(),
            "url_scheme",
        ),
        (
            "INSERT INTO outbox.subscriptions (name, url) VALUES ('s', 'http://a b/')".to_string(),
            "url_scheme",
        ),
        (
            "INSERT INTO outbox.subscriptions (name, url) VALUES ('has space', 'http://x/')"
                .to_string(),
            "name_format",
        ),
        (insert(", event_types", ", '{}'"), "event_types_format"),
        (
            insert(", event_types", ", '{\"lead.%\"}'"),
            "event_types_format",
        ),
        (
            insert(", event_types", ", '{\"lead created\"}'"),
            "event_types_format",
        ),
        (insert(", filter", ", '[1]'"), "filter_is_object"),
        (insert(", secret", ", 'not-a-secret'"), "secret_format"),
        (
            insert(", retry_schedule", ", '{-5 seconds}'"),
            "retry_schedule_sane",
        ),
        (
            insert(", retry_schedule", ", '{30 days}'"),
            "retry_schedule_sane",
        ),
        (insert(", timeout", ", '0 seconds'"), "timeout_sane"),
        (insert(", timeout", ", '1 hour'"), "timeout_sane"),
        (insert(", max_in_flight", ", 0"), "max_in_flight_sane"),
        (insert(", rate_limit_per_second", ", 0"), "rate_limit_sane"),
        (insert(", headers", ", '{\"x-n\": 1}'"), "headers_valid"),
        (
            insert(", headers", ", '{\"Webhook-Signature\": \"forged\"}'"),
            "headers_valid",
        ),
        (
            insert(", headers", ", '{\"bad header\": \"v\"}'"),
            "headers_valid",
        ),
    ];
    for (sql, constraint) in cases {
        refused(&db, &sql, constraint).await;
    }
    // Names are unique.
    db.client()
        .await
        .batch_execute(&insert("", ""))
        .await
        .expect("first subscription");
    refused(&db, &insert("", ""), "subscriptions_name_key").await;
    // A generated secret is whsec_ + base64 of 32 bytes.
    let secret: String = db
        .client()
        .await
        .query_one("SELECT secret FROM outbox.subscriptions", &[])
        .await
        .expect("read")
        .get(0);
    let key = secret.strip_prefix("whsec_").expect("prefix");
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(key)
        .expect("base64");
    assert_eq!(decoded.len(), 32);
}
