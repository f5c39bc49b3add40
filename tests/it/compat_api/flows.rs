//! What services written for the previous bus do: publish, subscribe, read history, replay,
//! and ask for the backlog.

use super::*;

/// An event published through `/events/publish` reaches a service subscribed through
/// `/events/subscribe`, signed with the secret the subscribe call returned.
#[tokio::test]
async fn a_published_event_reaches_a_service_subscribed_through_the_bus() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver");
    let (relay, api) = Api::spawn(&db).await;

    let created = api
        .post(
            "/events/subscribe",
            json!({ "event_type": "lead.created", "service_name": "crm-agents",
                    "webhook_url": receiver.url("/crm"), "filters": { "plan": "pro" } }),
        )
        .await
        .expect(201);
    assert_eq!(created["created"], true);
    assert_eq!(created["service_name"], "crm-agents");
    let secret = created["secret"].as_str().expect("secret when created");
    receiver
        .expect_secret("/crm", secret)
        .expect("valid secret");

    let extended = api
        .post(
            "/events/subscribe",
            json!({ "event_type": "lead.updated", "service_name": "crm-agents",
                    "webhook_url": receiver.url("/crm"), "filters": { "plan": "pro" },
                    "extra_field_old_clients_send": 1 }),
        )
        .await
        .expect(200);
    assert_eq!(extended["created"], false);
    assert!(extended.get("secret").is_none(), "{extended:#}");
    assert_eq!(
        extended["event_types"],
        json!(["lead.created", "lead.updated"])
    );

    let listed = api.get("/subscriptions").await.expect(200);
    assert_eq!(listed["subscriptions"][0]["service_name"], "crm-agents");
    assert_eq!(
        listed["subscriptions"][0]["webhook_url"],
        receiver.url("/crm")
    );
    assert_eq!(
        listed["subscriptions"][0]["filters"],
        json!({ "plan": "pro" })
    );
    assert!(!listed.to_string().contains("whsec_"));

    let event_id = "3f1c3a52-52a1-4d57-9a43-8a8c61f3a0de";
    let published = api
        .post(
            "/events/publish",
            json!({ "event_type": "lead.created", "tenant_id": "t1", "source_service": "django-crm",
                    "data": { "plan": "pro", "lead_id": 42 }, "priority": "high",
                    "target_services": ["crm-agents"], "event_id": event_id,
                    "correlation_id": "req-123" }),
        )
        .await
        .expect(201);
    assert_eq!(published["event_id"], event_id);
    // Filtered out by the subscription's filters, and delivered to nobody.
    let free = api
        .post(
            "/events/publish",
            json!({ "event_type": "lead.created", "data": { "plan": "free" }, "priority": "low",
                    "target_services": [] }),
        )
        .await
        .expect(201);

    let received = receiver
        .wait_for("/crm", 1, DEADLINE)
        .await
        .expect("the event arrives");
    let body = received[0].json();
    assert_eq!(body["event_id"], event_id);
    assert_eq!(body["data"], json!({ "plan": "pro", "lead_id": 42 }));
    assert_eq!(body["metadata"]["correlation_id"], "req-123");
    assert_eq!(body["tenant_id"], "t1");
    assert_eq!(received[0].signature_valid, Some(true));

    let row = db
        .client()
        .await
        .query_one(
            "SELECT priority, target_services FROM outbox.events WHERE event_id = $1::text::uuid",
            &[&event_id],
        )
        .await
        .expect("read event");
    assert_eq!(row.get::<_, i32>(0), 10);
    assert_eq!(
        row.get::<_, Option<Vec<String>>>(1),
        Some(vec!["crm-agents".to_owned()])
    );
    let free_row = db
        .client()
        .await
        .query_one(
            "SELECT priority, target_services IS NULL FROM outbox.events WHERE event_id = $1::text::uuid",
            &[&free["event_id"].as_str().expect("event_id")],
        )
        .await
        .expect("read event");
    assert_eq!(free_row.get::<_, i32>(0), -10);
    assert!(free_row.get::<_, bool>(1), "[] means every subscription");

    api.post(
        "/events/publish",
        json!({ "event_type": "lead.created", "event_id": event_id, "data": {} }),
    )
    .await
    .expect_error(409, "duplicate_event", Some("event_id"));
    for (body, field) in [
        (
            json!({ "event_type": "lead.created", "priority": "urgent" }),
            "priority",
        ),
        (json!({ "event_type": "lead created" }), "event_type"),
        (json!({ "data": {} }), "event_type"),
        (
            json!({ "event_type": "lead.created", "event_id": "nope" }),
            "event_id",
        ),
    ] {
        api.post("/events/publish", body)
            .await
            .expect_error(400, "invalid_input", Some(field));
    }
    for (body, field) in [
        (
            json!({ "event_type": "lead.*", "service_name": "bad name", "webhook_url": receiver.url("/x") }),
            "service_name",
        ),
        (
            json!({ "event_type": "lead.*", "service_name": "x", "webhook_url": "nope" }),
            "webhook_url",
        ),
        (
            json!({ "event_type": "lead created", "service_name": "x", "webhook_url": receiver.url("/x") }),
            "event_type",
        ),
        (
            json!({ "event_type": "lead.*", "service_name": "x", "webhook_url": receiver.url("/x"), "filters": [1] }),
            "filters",
        ),
    ] {
        api.post("/events/subscribe", body)
            .await
            .expect_error(400, "invalid_input", Some(field));
    }
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.events").await, 2);
    assert_eq!(receiver.received("/crm").len(), 1);
    relay.shutdown().await;
}

#[tokio::test]
async fn history_returns_the_latest_events_with_their_data() {
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    for (event_type, tenant, n) in [
        ("lead.created", "t1", 1),
        ("invoice.paid", "t1", 2),
        ("lead.created", "t2", 3),
        ("lead.updated", "t1", 4),
    ] {
        api.post(
            "/events/publish",
            json!({ "event_type": event_type, "tenant_id": tenant, "data": { "n": n } }),
        )
        .await
        .expect(201);
    }
    let history = api
        .post(
            "/events/history",
            json!({ "tenant_id": "t1", "event_types": ["lead.created", "lead.updated"], "limit": 10 }),
        )
        .await
        .expect(200);
    assert_eq!(history["count"], 2);
    let data: Vec<&Value> = history["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| &e["data"])
        .collect();
    assert_eq!(
        data,
        [&json!({ "n": 4 }), &json!({ "n": 1 })],
        "newest first"
    );

    let latest = api
        .post("/events/history", json!({ "limit": 1 }))
        .await
        .expect(200);
    assert_eq!(latest["events"][0]["data"], json!({ "n": 4 }));
    let all = api
        .call(Method::POST, "/events/history", None)
        .await
        .expect(200);
    assert_eq!(all["count"], 4);
    let globbed = api
        .post("/events/history", json!({ "event_types": ["lead.*"] }))
        .await
        .expect(200);
    assert_eq!(globbed["count"], 3);
    for limit in [0, 101] {
        api.post("/events/history", json!({ "limit": limit }))
            .await
            .expect_error(400, "invalid_input", Some("limit"));
    }
    api.post("/events/history", json!({ "event_types": ["bad type"] }))
        .await
        .expect_error(400, "invalid_input", Some("event_types"));
    relay.shutdown().await;
}

/// Both replay endpoints go through outbox.replay: recorded in outbox.replays, and the
/// dead deliveries are delivered again.
#[tokio::test]
async fn single_and_batch_replays_are_recorded_and_delivered_again() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver");
    receiver.queue("/orders", [Reply::Status(500), Reply::Status(500)]);
    add_subscription(
        &db,
        "fulfilment",
        &receiver.url("/orders"),
        &[("retry_schedule", "'{}'")],
    )
    .await;
    let (relay, api) = Api::spawn(&db).await;
    let first = publish(&db, "order.placed", json!({ "order": 1 })).await;
    let second = publish(&db, "order.placed", json!({ "order": 2 })).await;
    wait_for_statuses(&db, "dead", 2).await;

    let single = api
        .call(Method::POST, &format!("/api/events/{first}/replay"), None)
        .await
        .expect(200);
    assert_eq!(single["matched"], 1);
    assert_eq!(single["event_id"], first.to_string());
    wait_for_statuses(&db, "delivered", 1).await;

    let dry = api
        .call(
            Method::POST,
            "/api/events/replay/batch?event_type=order.*&limit=10&dry_run=true",
            None,
        )
        .await
        .expect(200);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["matched"], 1, "only the second is still dead");
    let batch = api
        .call(
            Method::POST,
            "/api/events/replay/batch?event_type=order.*&limit=10",
            None,
        )
        .await
        .expect(200);
    assert_eq!(batch["matched"], 1);
    wait_for_statuses(&db, "delivered", 2).await;
    let received = receiver
        .wait_for("/orders", 4, DEADLINE)
        .await
        .expect("4 requests");
    let ids: Vec<Option<&str>> = received.iter().map(|r| r.header("webhook-id")).collect();
    for event in [first, second] {
        let id = event.to_string();
        assert_eq!(
            ids.iter().filter(|i| **i == Some(id.as_str())).count(),
            2,
            "{ids:?}"
        );
    }

    let rows = db
        .client()
        .await
        .query(
            "SELECT requested_by, matched, dry_run, criteria FROM outbox.replays ORDER BY id",
            &[],
        )
        .await
        .expect("read replays");
    assert_eq!(rows.len(), 3);
    for row in &rows {
        assert_eq!(row.get::<_, String>(0), "event-bus-compat");
    }
    let criteria: Value = rows[0].get(3);
    assert_eq!(criteria["event_ids"], json!([first.to_string()]));
    let criteria: Value = rows[2].get(3);
    assert_eq!(criteria["event_type"], "order.*");
    assert_eq!(criteria["max_events"], 10);

    api.call(
        Method::POST,
        "/api/events/0b6f8a3e-9c1d-4e2f-8a7b-1c2d3e4f5a6b/replay",
        None,
    )
    .await
    .expect_error(404, "not_found", None);
    api.call(Method::POST, "/api/events/not-a-uuid/replay", None)
        .await
        .expect_error(400, "invalid_input", Some("event_id"));
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=many", "limit"),
        ("event_type=order%20placed", "event_type"),
        ("status=lost", "status"),
    ] {
        api.call(
            Method::POST,
            &format!("/api/events/replay/batch?{query}"),
            None,
        )
        .await
        .expect_error(400, "invalid_input", Some(field));
    }
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.replays").await, 3);
    relay.shutdown().await;
}

#[tokio::test]
async fn pending_status_counts_the_backlog() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver");
    receiver.set_default("/slow", Reply::Status(503));
    add_subscription(
        &db,
        "warehouse",
        &receiver.url("/slow"),
        &[("retry_schedule", "'{1 hour}'")],
    )
    .await;
    let (relay, api) = Api::spawn(&db).await;
    publish(&db, "stock.changed", json!({ "sku": "A" })).await;
    db.client()
        .await
        .execute(
            "SELECT outbox.publish('stock.changed', '{}', deliver_after => now() + interval '1 hour')",
            &[],
        )
        .await
        .expect("schedule an event");
    wait_for_statuses(&db, "failing", 1).await;

    let status = api.get("/api/events/status/pending").await.expect(200);
    assert_eq!(status["failing_deliveries"], 1, "{status:#}");
    assert_eq!(status["scheduled_events"], 1, "{status:#}");
    assert_eq!(status["dead_deliveries"], 0);
    assert_eq!(status["subscriptions"][0]["name"], "warehouse");
    assert_eq!(status["subscriptions"][0]["failing"], 1);

    let refused = api
        .call_as(None, Method::GET, "/api/events/status/pending", None)
        .await;
    assert_eq!(refused.status, 401);
    let wrong = api
        .call_as(
            Some(&format!("Bearer {TOKEN}-")),
            Method::GET,
            "/subscriptions",
            None,
        )
        .await;
    assert_eq!(wrong.status, 401);
    relay.shutdown().await;
}

/// Subscribes of one service arriving at once each add their event type: the type is
/// appended in the same statement that creates or updates the subscription, so none of
/// them overwrites another's (a read, append and write back kept only the last writer's).
/// Exactly one of them creates the subscription and gets its secret.
#[tokio::test]
async fn concurrent_subscribes_of_one_service_keep_every_event_type() {
    const SUBSCRIBERS: usize = 20;
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    let event_types: Vec<String> = (0..SUBSCRIBERS).map(|i| format!("lead.kind{i}")).collect();
    let answers = futures::future::join_all(event_types.iter().map(|event_type| {
        api.post(
            "/events/subscribe",
            json!({ "event_type": event_type, "service_name": "crm",
                    "webhook_url": "http://127.0.0.1:9/hook" }),
        )
    }))
    .await;
    let mut created = 0;
    for answer in answers {
        assert!(
            matches!(answer.status, 200 | 201),
            "{}: {:#}",
            answer.status,
            answer.body
        );
        if answer.status == 201 {
            created += 1;
            assert!(answer.body["secret"].is_string(), "{:#}", answer.body);
        } else {
            assert!(answer.body.get("secret").is_none(), "{:#}", answer.body);
        }
    }
    assert_eq!(created, 1, "exactly one subscribe creates the service");

    let listed = api.get("/subscriptions").await.expect(200);
    let subscriptions = listed["subscriptions"].as_array().expect("list");
    assert_eq!(subscriptions.len(), 1, "{listed:#}");
    let mut stored: Vec<String> = subscriptions[0]["event_types"]
        .as_array()
        .expect("event_types")
        .iter()
        .map(|t| t.as_str().expect("text").to_owned())
        .collect();
    stored.sort();
    let mut wanted = event_types.clone();
    wanted.sort();
    assert_eq!(stored, wanted, "every subscribed type, once each");
    relay.shutdown().await;
}
