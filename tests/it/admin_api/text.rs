//! Text PostgreSQL cannot store (NUL, bytes that are not UTF-8) and text too long: a 400
//! naming the field as the request spells it, in bodies, queries and paths.

use super::*;

/// U+0000 in any text the API takes (body fields at any depth, query and path parameters)
/// is a 400 naming it: PostgreSQL stores NUL in neither text nor jsonb, and without the
/// check its refusal surfaced as `500 internal`.
#[tokio::test]
async fn nul_in_any_admin_text_field_is_a_400_naming_it() {
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    let url = "http://127.0.0.1:9/hook";
    api.post(
        "/admin/v1/subscriptions",
        json!({ "name": "crm", "url": url }),
    )
    .await
    .expect(201);
    let nul = "a\u{0}b";
    let create = |field: &str, value: Value| {
        let mut body = json!({ "name": "crm-2", "url": url });
        body[field] = value;
        body
    };
    let cases: Vec<(Method, String, Option<Value>, &str)> = vec![
        // Create: every text setting, and strings nested in arrays and objects.
        (
            Method::POST,
            "/admin/v1/subscriptions".into(),
            Some(create("name", json!(nul))),
            "name",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions".into(),
            Some(create("url", json!(format!("{url}{nul}")))),
            "url",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions".into(),
            Some(create("secret", json!(nul))),
            "secret",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions".into(),
            Some(create("event_types", json!(["lead.*", nul]))),
            "event_types[1]",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions".into(),
            Some(create("tenant_id", json!(nul))),
            "tenant_id",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions".into(),
            Some(create("filter", json!({ "plan": nul }))),
            "filter.plan",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions".into(),
            Some(create("filter", json!({ "tags": [{ "t": nul }] }))),
            "filter.tags[0].t",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions".into(),
            Some(create("headers", json!({ "X-Team": nul }))),
            "headers.X-Team",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions".into(),
            Some(create("headers", json!({ nul: "crm" }))),
            "headers",
        ),
        // Update.
        (
            Method::PATCH,
            "/admin/v1/subscriptions/crm".into(),
            Some(json!({ "url": format!("{url}{nul}") })),
            "url",
        ),
        (
            Method::PATCH,
            "/admin/v1/subscriptions/crm".into(),
            Some(json!({ "event_types": [nul] })),
            "event_types[0]",
        ),
        (
            Method::PATCH,
            "/admin/v1/subscriptions/crm".into(),
            Some(json!({ "tenant_id": nul })),
            "tenant_id",
        ),
        (
            Method::PATCH,
            "/admin/v1/subscriptions/crm".into(),
            Some(json!({ "filter": { "plan": nul } })),
            "filter.plan",
        ),
        (
            Method::PATCH,
            "/admin/v1/subscriptions/crm".into(),
            Some(json!({ "headers": { "X-Team": nul } })),
            "headers.X-Team",
        ),
        // Disable and rotate bodies.
        (
            Method::POST,
            "/admin/v1/subscriptions/crm/disable".into(),
            Some(json!({ "reason": nul })),
            "reason",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions/crm/rotate-secret".into(),
            Some(json!({ "secret": nul })),
            "secret",
        ),
        // Path parameters.
        (
            Method::GET,
            "/admin/v1/subscriptions/cr%00m".into(),
            None,
            "name",
        ),
        (
            Method::PATCH,
            "/admin/v1/subscriptions/cr%00m".into(),
            Some(json!({ "max_in_flight": 2 })),
            "name",
        ),
        (
            Method::DELETE,
            "/admin/v1/subscriptions/cr%00m".into(),
            None,
            "name",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions/cr%00m/disable".into(),
            None,
            "name",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions/cr%00m/enable".into(),
            None,
            "name",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions/cr%00m/rotate-secret".into(),
            None,
            "name",
        ),
        (Method::GET, "/admin/v1/events/%00".into(), None, "event_id"),
        (Method::GET, "/admin/v1/replays/1%00".into(), None, "id"),
        // Query parameters.
        (
            Method::GET,
            "/admin/v1/events?event_type=lead%00".into(),
            None,
            "event_type",
        ),
        (
            Method::GET,
            "/admin/v1/events?tenant_id=t%001".into(),
            None,
            "tenant_id",
        ),
        (
            Method::GET,
            "/admin/v1/events?since=%00".into(),
            None,
            "since",
        ),
        (
            Method::GET,
            "/admin/v1/events?until=%00".into(),
            None,
            "until",
        ),
        (
            Method::GET,
            "/admin/v1/events?status=dead%00".into(),
            None,
            "status",
        ),
        (
            Method::GET,
            "/admin/v1/events?cursor=1%00".into(),
            None,
            "cursor",
        ),
        (
            Method::GET,
            "/admin/v1/replays?cursor=1%00".into(),
            None,
            "cursor",
        ),
        // Replay criteria.
        (
            Method::POST,
            "/admin/v1/replays".into(),
            Some(json!({ "status": [nul] })),
            "status[0]",
        ),
        (
            Method::POST,
            "/admin/v1/replays".into(),
            Some(json!({ "subscription": nul })),
            "subscription",
        ),
        (
            Method::POST,
            "/admin/v1/replays".into(),
            Some(json!({ "event_type": nul })),
            "event_type",
        ),
        (
            Method::POST,
            "/admin/v1/replays".into(),
            Some(json!({ "tenant_id": nul })),
            "tenant_id",
        ),
        (
            Method::POST,
            "/admin/v1/replays".into(),
            Some(json!({ "created_after": nul })),
            "created_after",
        ),
        (
            Method::POST,
            "/admin/v1/replays".into(),
            Some(json!({ "created_before": nul })),
            "created_before",
        ),
        (
            Method::POST,
            "/admin/v1/replays".into(),
            Some(json!({ "event_ids": [nul] })),
            "event_ids[0]",
        ),
        (
            Method::POST,
            "/admin/v1/replays".into(),
            Some(json!({ "requested_by": nul })),
            "requested_by",
        ),
        (
            Method::POST,
            "/admin/v1/replays".into(),
            Some(json!({ "reason": nul })),
            "reason",
        ),
    ];
    for (method, path, body, field) in cases {
        let answer = api.call(method.clone(), &path, body.clone()).await;
        assert_eq!(
            (answer.status, answer.body["error"]["field"].as_str()),
            (400, Some(field)),
            "{method} {path} {body:?}: {:#}",
            answer.body
        );
        assert_eq!(answer.body["error"]["code"], "invalid_input");
    }
    // Nothing was written: crm is as created, and no replay was recorded.
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.subscriptions").await,
        1
    );
    let crm = api.get("/admin/v1/subscriptions/crm").await.expect(200);
    assert_eq!(crm["enabled"], true);
    assert_eq!(crm["url"], url);
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.replays").await, 0);
    relay.shutdown().await;
}

/// Text that is not UTF-8 (raw bytes in a body, percent-encoded bytes in a path or query,
/// a lone surrogate escape) and values longer than their column allows are 400s naming the
/// field, never 500s.
#[tokio::test]
async fn text_that_is_not_utf8_or_too_long_is_a_400() {
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    api.post_bytes(
        "/admin/v1/subscriptions",
        b"{\"name\": \"cr\xffm\", \"url\": \"http://127.0.0.1:9/hook\"}",
    )
    .await
    .expect_error(400, "invalid_input", Some("name"));
    api.post_bytes(
        "/admin/v1/subscriptions",
        br#"{"name": "cr\ud800m", "url": "http://127.0.0.1:9/hook"}"#,
    )
    .await
    .expect_error(400, "invalid_input", Some("name"));
    api.get("/admin/v1/subscriptions/cr%FFm")
        .await
        .expect_error(400, "invalid_input", Some("name"));
    api.get("/admin/v1/events?tenant_id=t%FF1")
        .await
        .expect_error(400, "invalid_input", Some("tenant_id"));
    let long = "a".repeat(256);
    api.post(
        "/admin/v1/subscriptions",
        json!({ "name": long, "url": "http://127.0.0.1:9/hook" }),
    )
    .await
    .expect_error(400, "invalid_input", Some("name"));
    api.post(
        "/admin/v1/subscriptions",
        json!({ "name": "crm", "url": format!("http://127.0.0.1:9/{}", "a".repeat(3000)) }),
    )
    .await
    .expect_error(400, "invalid_input", Some("url"));
    api.post(
        "/admin/v1/subscriptions",
        json!({ "name": "crm", "url": "http://127.0.0.1:9/hook", "event_types": [long] }),
    )
    .await
    .expect_error(400, "invalid_input", Some("event_types"));
    api.post(
        "/admin/v1/subscriptions",
        json!({ "name": "crm", "url": "http://127.0.0.1:9/hook",
                "retry_schedule_seconds": [1e18] }),
    )
    .await
    .expect_error(400, "invalid_input", Some("retry_schedule_seconds[0]"));
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.subscriptions").await,
        0
    );
    relay.shutdown().await;
}
