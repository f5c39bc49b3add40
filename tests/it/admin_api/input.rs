//! Bad input is a 400 naming the field, wherever it hides: values, NUL, non-UTF-8 text,
//! numbers at the documented limits, URLs outside the documented form, database refusals.

use super::*;

#[tokio::test]
async fn bad_input_is_a_400_naming_the_field() {
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    let url = "http://127.0.0.1:9/hook";
    for (body, field) in [
        (json!({ "name": "crm", "url": "not a url" }), "url"),
        (json!({ "name": "crm", "url": "ftp://x.internal/a" }), "url"),
        (json!({ "name": "crm" }), "url"),
        (json!({ "url": url }), "name"),
        (json!({ "name": "bad name!", "url": url }), "name"),
        (
            json!({ "name": "crm", "url": url, "event_types": ["lead.*", "lead created"] }),
            "event_types",
        ),
        (
            json!({ "name": "crm", "url": url, "timeout_seconds": 0.01 }),
            "timeout_seconds",
        ),
        (
            json!({ "name": "crm", "url": url, "timeout_seconds": -1 }),
            "timeout_seconds",
        ),
        (
            json!({ "name": "crm", "url": url, "max_in_flight": 0 }),
            "max_in_flight",
        ),
        (
            json!({ "name": "crm", "url": url, "filter": [1] }),
            "filter",
        ),
        (
            json!({ "name": "crm", "url": url, "secret": "short" }),
            "secret",
        ),
        (
            json!({ "name": "crm", "url": url, "colour": "red" }),
            "colour",
        ),
        (
            json!({ "name": "crm", "url": url, "max_in_flight": "many" }),
            "max_in_flight",
        ),
    ] {
        api.post("/admin/v1/subscriptions", body.clone())
            .await
            .expect_error(400, "invalid_input", Some(field));
    }
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.subscriptions").await,
        0
    );

    // A body that is not JSON at all.
    let answer = api
        .call_as(
            Some(&format!("Bearer {TOKEN}")),
            Method::POST,
            "/admin/v1/subscriptions",
            None,
        )
        .await;
    answer.expect_error(400, "invalid_input", Some("name"));

    api.post(
        "/admin/v1/subscriptions",
        json!({ "name": "crm", "url": url }),
    )
    .await
    .expect(201);
    api.patch("/admin/v1/subscriptions/crm", json!({}))
        .await
        .expect_error(400, "invalid_input", Some("body"));
    api.patch("/admin/v1/subscriptions/crm", json!({ "url": "nope" }))
        .await
        .expect_error(400, "invalid_input", Some("url"));
    api.patch(
        "/admin/v1/subscriptions/crm",
        json!({ "retry_schedule_seconds": [1, -5] }),
    )
    .await
    .expect_error(400, "invalid_input", Some("retry_schedule_seconds[1]"));
    api.patch("/admin/v1/subscriptions/crm", json!({ "name": "other" }))
        .await
        .expect_error(400, "invalid_input", Some("name"));

    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=abc", "limit"),
        ("event_type=lead%20created", "event_type"),
        ("event_type=lead.%3F", "event_type"),
        ("status=lost", "status"),
        ("since=yesterday", "since"),
        (
            "since=2024-02-01T00:00:00Z&until=2024-01-01T00:00:00Z",
            "until",
        ),
        ("cursor=abc", "cursor"),
        ("colour=red", "colour"),
    ] {
        api.get(&format!("/admin/v1/events?{query}"))
            .await
            .expect_error(400, "invalid_input", Some(field));
    }
    api.get("/admin/v1/events/not-a-uuid").await.expect_error(
        400,
        "invalid_input",
        Some("event_id"),
    );
    api.get("/admin/v1/replays/abc")
        .await
        .expect_error(400, "invalid_input", Some("id"));
    api.get("/admin/v1/replays?limit=1000")
        .await
        .expect_error(400, "invalid_input", Some("limit"));
    for (body, field) in [
        (json!({ "status": ["lost"] }), "status[0]"),
        (json!({ "status": ["in_flight"] }), "status[0]"),
        (json!({ "event_ids": ["nope"] }), "event_ids"),
        (json!({ "subscription": null }), "subscription"),
        (json!({ "max_events": 1.5 }), "max_events"),
        (json!({ "event_type": "lead created" }), "event_type"),
        (json!({ "max_events": 0 }), "max_events"),
        (json!({ "created_after": "soon" }), "created_after"),
        (json!({ "dry_run": "yes" }), "dry_run"),
    ] {
        api.post("/admin/v1/replays", body)
            .await
            .expect_error(400, "invalid_input", Some(field));
    }
    // Well formed, but naming what does not exist: 404, as for any missing resource.
    api.post("/admin/v1/replays", json!({ "subscription": "nobody" }))
        .await
        .expect_error(404, "not_found", Some("subscription"));
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.replays").await, 0);
    relay.shutdown().await;
}

/// Bad data that reaches PostgreSQL anyway (a caller of [`outbox_relay::admin`] other than
/// the API, which checks first) comes back as invalid input, not as a failed query: data
/// exceptions (SQLSTATE class 22, e.g. NUL in text or jsonb) and integrity violations
/// (class 23) name their field or constraint, and the API answers them with 400.
#[tokio::test]
async fn database_data_errors_are_invalid_input_not_failures() {
    use outbox_relay::admin::{self, AdminError, NewEvent};
    use outbox_relay::api::ApiError;
    let db = TestDb::new().await;
    let client = db.client().await;
    add_subscription(&db, "crm", "http://127.0.0.1:9/hook", &[]).await;
    let event = |payload: Value, ordering_key: Option<String>| NewEvent {
        event_id: None,
        event_type: "lead.created".to_owned(),
        payload,
        tenant_id: None,
        source_service: None,
        ordering_key,
        target_services: None,
        metadata: json!({}),
        priority: 0,
    };
    let cases: Vec<(&str, Result<(), AdminError>, &str, &str)> = vec![
        (
            "NUL in text",
            admin::disable_subscription(&client, "crm", Some("a\u{0}b"))
                .await
                .map(drop),
            "value",
            "NUL",
        ),
        (
            "NUL in a jsonb string",
            admin::publish_event(&client, &event(json!({ "note": "a\u{0}b" }), None))
                .await
                .map(drop),
            "value",
            "NUL",
        ),
        (
            "a CHECK constraint",
            admin::publish_event(&client, &event(json!({}), Some("k".repeat(300))))
                .await
                .map(drop),
            "ordering_key",
            "ordering_key_length",
        ),
    ];
    for (what, result, field, says) in cases {
        let error = result.expect_err(what);
        match &error {
            AdminError::Invalid {
                field: named,
                problem,
            } => {
                assert_eq!(*named, field, "{what}: {error}");
                assert!(problem.contains(says), "{what}: {error}");
            }
            other => panic!("{what}: not invalid input: {other:?}"),
        }
        let answer = ApiError::from(error);
        assert_eq!(answer.status.as_u16(), 400, "{what}: {answer:?}");
        assert_eq!(answer.field.as_deref(), Some(field), "{what}");
    }
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.events").await, 0);
}

/// Numbers are judged as the client sent them, against the limits the document states: a
/// value just outside a limit used to be rounded onto it (to the microseconds of an interval,
/// to a `real`) and stored. Whole numbers written as floats are integers, as JSON Schema says.
#[tokio::test]
async fn numbers_just_outside_the_documented_limits_are_refused_and_7_0_is_an_integer() {
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    let url = "http://127.0.0.1:9/hook";
    for (setting, value, field) in [
        ("timeout_seconds", json!(300.000_000_1), "timeout_seconds"),
        ("timeout_seconds", json!(0.099_999_999), "timeout_seconds"),
        (
            "rate_limit_per_second",
            json!(100_000.001),
            "rate_limit_per_second",
        ),
        (
            "rate_limit_per_second",
            json!(1e-40),
            "rate_limit_per_second",
        ),
        (
            "retry_schedule_seconds",
            json!([5, 604_800.000_000_1]),
            "retry_schedule_seconds[1]",
        ),
        ("max_in_flight", json!(5.5), "max_in_flight"),
        // A setting that cannot be cleared refuses null rather than ignoring it.
        ("max_in_flight", Value::Null, "max_in_flight"),
    ] {
        let mut body = json!({ "name": "crm", "url": url });
        body[setting] = value.clone();
        api.post("/admin/v1/subscriptions", body)
            .await
            .expect_error(400, "invalid_input", Some(field));
    }
    let created = api
        .post(
            "/admin/v1/subscriptions",
            json!({ "name": "crm", "url": url, "max_in_flight": 7.0, "timeout_seconds": 300,
                    "rate_limit_per_second": 0.001, "retry_schedule_seconds": [604_800] }),
        )
        .await
        .expect(201);
    assert_eq!(created["max_in_flight"], 7, "{created:#}");
    // Cursors are spelled as next_cursor spells them.
    for cursor in ["01", "+1", "1000000000000000000"] {
        api.get(&format!(
            "/admin/v1/events?cursor={}",
            cursor.replace('+', "%2B")
        ))
        .await
        .expect_error(400, "invalid_input", Some("cursor"));
    }
    // An optional body may be null.
    api.post("/admin/v1/subscriptions/crm/disable", Value::Null)
        .await
        .expect(200);
    relay.shutdown().await;
}

/// Subscription URLs must have the form the document gives: the URL parser alone accepts
/// hosts such as `a*`, which the document calls invalid (the fuzzer found one stored).
#[tokio::test]
async fn a_subscription_url_outside_the_documented_form_is_refused() {
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    for url in ["HTTP://A*", "http://é.example/hook", "http://a:65536/"] {
        api.post(
            "/admin/v1/subscriptions",
            json!({ "name": "crm", "url": url }),
        )
        .await
        .expect_error(400, "invalid_input", Some("url"));
    }
    api.post(
        "/admin/v1/subscriptions",
        json!({ "name": "crm", "url": "https://user:pw@my_service:8443/in?x=1" }),
    )
    .await
    .expect(201);
    api.patch("/admin/v1/subscriptions/crm", json!({ "url": "http://a*" }))
        .await
        .expect_error(400, "invalid_input", Some("url"));
    relay.shutdown().await;
}
