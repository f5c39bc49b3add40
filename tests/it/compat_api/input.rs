//! Bad bodies: NUL anywhere, and what the OpenAPI document says each endpoint takes.

use super::*;

/// U+0000 in any text the bus endpoints take (body fields at any depth, query and path
/// parameters) is a 400 naming it in the bus's own words, never a 500, and nothing is
/// stored.
#[tokio::test]
async fn nul_in_any_bus_text_field_is_a_400_naming_it() {
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    let nul = "a\u{0}b";
    let with = |base: Value, field: &str, value: Value| {
        let mut body = base;
        body[field] = value;
        body
    };
    let publish = json!({ "event_type": "lead.created", "data": {} });
    let subscribe = json!({ "event_type": "lead.created", "service_name": "crm",
                            "webhook_url": "http://127.0.0.1:9/hook" });
    let cases: Vec<(&str, Option<Value>, &str)> = vec![
        (
            "/events/publish",
            Some(with(publish.clone(), "event_type", json!(nul))),
            "event_type",
        ),
        (
            "/events/publish",
            Some(with(publish.clone(), "data", json!({ "note": nul }))),
            "data.note",
        ),
        (
            "/events/publish",
            Some(with(
                publish.clone(),
                "data",
                json!({ "a": [1, { "b": nul }] }),
            )),
            "data.a[1].b",
        ),
        (
            "/events/publish",
            Some(with(publish.clone(), "data", json!(nul))),
            "data",
        ),
        (
            "/events/publish",
            Some(with(publish.clone(), "tenant_id", json!(nul))),
            "tenant_id",
        ),
        (
            "/events/publish",
            Some(with(publish.clone(), "source_service", json!(nul))),
            "source_service",
        ),
        (
            "/events/publish",
            Some(with(publish.clone(), "priority", json!(nul))),
            "priority",
        ),
        (
            "/events/publish",
            Some(with(
                publish.clone(),
                "target_services",
                json!(["crm", nul]),
            )),
            "target_services[1]",
        ),
        (
            "/events/publish",
            Some(with(publish.clone(), "event_id", json!(nul))),
            "event_id",
        ),
        (
            "/events/publish",
            Some(with(publish.clone(), "correlation_id", json!(nul))),
            "correlation_id",
        ),
        (
            "/events/publish",
            Some(with(publish.clone(), "metadata", json!({ "trace": nul }))),
            "metadata.trace",
        ),
        (
            "/events/publish",
            Some(with(publish.clone(), "ordering_key", json!(nul))),
            "ordering_key",
        ),
        (
            "/events/subscribe",
            Some(with(subscribe.clone(), "event_type", json!(nul))),
            "event_type",
        ),
        (
            "/events/subscribe",
            Some(with(subscribe.clone(), "service_name", json!(nul))),
            "service_name",
        ),
        (
            "/events/subscribe",
            Some(with(
                subscribe.clone(),
                "webhook_url",
                json!(format!("http://127.0.0.1:9/{nul}")),
            )),
            "webhook_url",
        ),
        (
            "/events/subscribe",
            Some(with(subscribe.clone(), "filters", json!({ "plan": nul }))),
            "filters.plan",
        ),
        (
            "/events/history",
            Some(json!({ "tenant_id": nul })),
            "tenant_id",
        ),
        (
            "/events/history",
            Some(json!({ "event_types": ["lead.*", nul] })),
            "event_types[1]",
        ),
        ("/api/events/%00/replay", None, "event_id"),
        (
            "/api/events/replay/batch?event_type=lead%00",
            None,
            "event_type",
        ),
        (
            "/api/events/replay/batch?tenant_id=t%001",
            None,
            "tenant_id",
        ),
        ("/api/events/replay/batch?status=dead%00", None, "status"),
    ];
    for (path, body, field) in cases {
        let answer = api.call(Method::POST, path, body.clone()).await;
        assert_eq!(
            (answer.status, answer.body["error"]["field"].as_str()),
            (400, Some(field)),
            "POST {path} {body:?}: {:#}",
            answer.body
        );
        assert_eq!(answer.body["error"]["code"], "invalid_input");
    }
    for table in ["events", "subscriptions", "replays"] {
        assert_eq!(
            count(&db, &format!("SELECT count(*) FROM outbox.{table}")).await,
            0,
            "{table}"
        );
    }
    relay.shutdown().await;
}

/// The bus endpoints take what their document says: a webhook_url of the documented form
/// only, `limit` as any JSON integer (5.0 too) or null, and unknown fields of any JSON.
#[tokio::test]
async fn bus_bodies_are_judged_as_the_document_says() {
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    api.post(
        "/events/subscribe",
        json!({ "event_type": "lead.created", "service_name": "crm", "webhook_url": "http://a*" }),
    )
    .await
    .expect_error(400, "invalid_input", Some("webhook_url"));
    for limit in [json!(5.0), Value::Null] {
        api.post(
            "/events/history",
            json!({ "limit": limit, "extra": [1, {"a": null}] }),
        )
        .await
        .expect(200);
    }
    api.post("/events/history", json!({ "limit": 5.5 }))
        .await
        .expect_error(400, "invalid_input", Some("limit"));
    relay.shutdown().await;
}
