//! Subscriptions, events and replays round trip through the API; the OpenAPI document lists
//! every route.

use super::*;

#[tokio::test]
async fn a_taken_subscription_name_is_a_409_and_unknown_names_are_404() {
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    let body = json!({ "name": "crm", "url": "http://127.0.0.1:9/hook" });
    api.post("/admin/v1/subscriptions", body.clone())
        .await
        .expect(201);
    api.post("/admin/v1/subscriptions", body)
        .await
        .expect_error(409, "duplicate", Some("name"));
    for (method, path) in [
        (Method::GET, "/admin/v1/subscriptions/ghost"),
        (Method::DELETE, "/admin/v1/subscriptions/ghost"),
        (Method::POST, "/admin/v1/subscriptions/ghost/enable"),
        (Method::POST, "/admin/v1/subscriptions/ghost/disable"),
        (Method::POST, "/admin/v1/subscriptions/ghost/rotate-secret"),
        (
            Method::GET,
            "/admin/v1/events/0b6f8a3e-9c1d-4e2f-8a7b-1c2d3e4f5a6b",
        ),
        (Method::GET, "/admin/v1/replays/424242"),
        (Method::GET, "/admin/v1/no-such-thing"),
    ] {
        api.call(method, path, None)
            .await
            .expect_error(404, "not_found", None);
    }
    api.patch("/admin/v1/subscriptions/ghost", json!({ "ordered": true }))
        .await
        .expect_error(404, "not_found", None);
    relay.shutdown().await;
}

#[tokio::test]
async fn subscription_crud_round_trip_shows_the_secret_only_on_create_and_rotate() {
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    let created = api
        .post(
            "/admin/v1/subscriptions",
            json!({
                "name": "ai-agents",
                "url": "http://127.0.0.1:9/hooks",
                "event_types": ["lead.*", "invoice.paid"],
                "filter": { "plan": "pro" },
                "headers": { "X-Team": "crm" },
                "timeout_seconds": 2.5,
                "retry_schedule_seconds": [1, 60],
                "rate_limit_per_second": 20
            }),
        )
        .await
        .expect(201);
    let secret = created["secret"]
        .as_str()
        .expect("secret on create")
        .to_owned();
    assert!(secret.starts_with("whsec_"), "{created:#}");
    assert_eq!(created["name"], "ai-agents");
    assert_eq!(created["event_types"], json!(["lead.*", "invoice.paid"]));
    assert_eq!(created["timeout_seconds"], 2.5);
    assert_eq!(created["retry_schedule_seconds"], json!([1.0, 60.0]));
    assert_eq!(created["headers"], json!({ "X-Team": "crm" }));
    let stored: String = db
        .client()
        .await
        .query_one(
            "SELECT secret FROM outbox.subscriptions WHERE name = 'ai-agents'",
            &[],
        )
        .await
        .expect("read secret")
        .get(0);
    assert_eq!(stored, secret);

    let listed = api.get("/admin/v1/subscriptions").await.expect(200);
    assert_eq!(listed["subscriptions"].as_array().map(Vec::len), Some(1));
    let one = api
        .get("/admin/v1/subscriptions/ai-agents")
        .await
        .expect(200);
    for body in [&listed, &one] {
        let text = body.to_string();
        assert!(
            !text.contains(&secret) && !text.contains("\"secret\""),
            "{text}"
        );
    }
    assert_eq!(one["filter"], json!({ "plan": "pro" }));

    let updated = api
        .patch(
            "/admin/v1/subscriptions/ai-agents",
            json!({ "event_types": ["order.*"], "tenant_id": "t1", "filter": null, "max_in_flight": 3, "ordered": true }),
        )
        .await
        .expect(200);
    assert_eq!(updated["event_types"], json!(["order.*"]));
    assert_eq!(updated["tenant_id"], "t1");
    assert_eq!(updated["filter"], Value::Null, "null clears the filter");
    assert_eq!(updated["max_in_flight"], 3);
    assert_eq!(updated["ordered"], true);
    assert_eq!(updated["timeout_seconds"], 2.5, "absent settings stay");
    assert!(!updated.to_string().contains("secret\""));

    let disabled = api
        .post(
            "/admin/v1/subscriptions/ai-agents/disable",
            json!({ "reason": "maintenance" }),
        )
        .await
        .expect(200);
    assert_eq!(disabled["enabled"], false);
    assert_eq!(disabled["disabled_reason"], "maintenance");
    let enabled = api
        .call(
            Method::POST,
            "/admin/v1/subscriptions/ai-agents/enable",
            None,
        )
        .await
        .expect(200);
    assert_eq!(enabled["enabled"], true);
    assert_eq!(enabled["disabled_reason"], Value::Null);

    let rotated = api
        .call(
            Method::POST,
            "/admin/v1/subscriptions/ai-agents/rotate-secret",
            None,
        )
        .await
        .expect(200);
    let new_secret = rotated["secret"].as_str().expect("secret on rotate");
    assert!(new_secret.starts_with("whsec_") && new_secret != secret);
    assert!(
        rotated["previous_secret_expires_at"].is_string(),
        "default overlap: {rotated:#}"
    );
    let immediate = api
        .post(
            "/admin/v1/subscriptions/ai-agents/rotate-secret",
            json!({ "overlap_seconds": 0 }),
        )
        .await
        .expect(200);
    assert_eq!(immediate["previous_secret_expires_at"], Value::Null);
    let after = api
        .get("/admin/v1/subscriptions/ai-agents")
        .await
        .expect(200);
    assert!(!after.to_string().contains("whsec_"), "{after:#}");

    let removed = api
        .delete("/admin/v1/subscriptions/ai-agents")
        .await
        .expect(200);
    assert_eq!(removed["name"], "ai-agents");
    assert_eq!(removed["deliveries_ended"], 0);
    api.get("/admin/v1/subscriptions/ai-agents")
        .await
        .expect_error(404, "not_found", None);
    assert_eq!(
        api.get("/admin/v1/subscriptions").await.expect(200)["subscriptions"],
        json!([])
    );
    relay.shutdown().await;
}

/// Keyset pages of a search cover exactly the matching events, newest first, whatever the
/// page size, and the filters narrow them as documented.
#[tokio::test]
async fn event_search_filters_and_pages_without_gaps_or_repeats() {
    let db = TestDb::new().await;
    let mut expected_all = Vec::new();
    let mut leads = Vec::new();
    let mut recent_t2 = Vec::new();
    for i in 0..7 {
        let (id, _) = insert_event(&db, "lead.created", "t1", &format!("{} minutes", 10 + i)).await;
        expected_all.push(id);
        leads.push(id);
    }
    for i in 0..3 {
        let (id, _) = insert_event(&db, "invoice.paid", "t2", &format!("{i} hours")).await;
        expected_all.push(id);
        if i == 0 {
            recent_t2.push(id);
        }
    }
    for _ in 0..2 {
        let (id, _) = insert_event(&db, "lead.updated", "t2", "1 minute").await;
        expected_all.push(id);
        leads.push(id);
        recent_t2.push(id);
    }
    // Two lead.created events with a dead delivery to a disabled subscription (the relay
    // leaves both alone).
    let (sub_id, _) = add_subscription(
        &db,
        "archive",
        "http://127.0.0.1:9/x",
        &[("enabled", "false"), ("event_types", "'{nothing}'")],
    )
    .await;
    let dead: Vec<i64> = leads[..2].to_vec();
    db.client()
        .await
        .execute(
            "INSERT INTO outbox.deliveries (event_id, subscription_id, status, attempts)
             SELECT unnest($1::bigint[]), $2, 'dead', 1",
            &[&dead, &sub_id],
        )
        .await
        .expect("insert dead deliveries");

    let (relay, api) = Api::spawn(&db).await;
    let descending = |mut ids: Vec<i64>| {
        ids.sort_unstable_by(|a, b| b.cmp(a));
        ids
    };
    for limit in [1, 3, 5, 12, 500] {
        let (ids, pages) = all_pages(&api, &format!("limit={limit}")).await;
        assert_eq!(ids, descending(expected_all.clone()), "limit {limit}");
        assert_eq!(
            pages,
            expected_all.len().div_ceil(limit).max(1),
            "limit {limit}"
        );
    }
    let (ids, _) = all_pages(&api, "event_type=lead.created&limit=2").await;
    assert_eq!(ids.len(), 7);
    let (ids, _) = all_pages(&api, "event_type=lead.*&limit=4").await;
    assert_eq!(ids, descending(leads.clone()));
    let (ids, _) = all_pages(&api, "tenant_id=t2&limit=2").await;
    assert_eq!(ids.len(), 5);
    let since = (chrono::Utc::now() - chrono::Duration::minutes(5))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (ids, _) = all_pages(&api, &format!("tenant_id=t2&since={since}&limit=1")).await;
    assert_eq!(ids, descending(recent_t2.clone()));
    let (ids, _) = all_pages(&api, &format!("until={since}")).await;
    assert_eq!(ids.len(), expected_all.len() - recent_t2.len());
    let (ids, _) = all_pages(&api, "status=dead&limit=1").await;
    assert_eq!(ids, descending(dead.clone()));

    let page = api
        .get("/admin/v1/events?status=dead&limit=1")
        .await
        .expect(200);
    let event = &page["events"][0];
    assert_eq!(event["deliveries"], json!({ "dead": 1 }));
    assert_eq!(event["event_type"], "lead.created");
    assert!(event.get("payload").is_none(), "search leaves payloads out");
    assert!(page["next_cursor"].is_string());
    relay.shutdown().await;
}

/// A delivery that died is visible with its attempt, replayed through the API (dry run
/// first), delivered again with the same webhook-id, and the replays are listed.
#[tokio::test]
async fn a_dead_delivery_replayed_through_the_api_is_delivered_again() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver");
    receiver.queue("/hooks", [Reply::Status(500)]);
    add_subscription(
        &db,
        "billing",
        &receiver.url("/hooks"),
        &[("retry_schedule", "'{}'")],
    )
    .await;
    let (relay, api) = Api::spawn(&db).await;
    let event_id = publish(&db, "invoice.paid", json!({ "invoice": 7 })).await;
    wait_for_statuses(&db, "dead", 1).await;

    let detail = api
        .get(&format!("/admin/v1/events/{event_id}"))
        .await
        .expect(200);
    assert_eq!(detail["event_id"], event_id.to_string());
    assert_eq!(detail["payload"], json!({ "invoice": 7 }));
    assert_eq!(detail["deliveries"], json!({ "dead": 1 }));
    let delivery = &detail["delivery_list"][0];
    assert_eq!(delivery["subscription"], "billing");
    assert_eq!(delivery["status"], "dead");
    assert_eq!(delivery["attempts"], 1);
    assert_eq!(delivery["last_status_code"], 500);
    let history = delivery["attempt_history"]
        .as_array()
        .expect("attempt_history");
    assert_eq!(history.len(), 1, "{detail:#}");
    assert_eq!(history[0]["attempt"], 1);
    assert_eq!(history[0]["status_code"], 500);

    let dry = api
        .post(
            "/admin/v1/replays",
            json!({ "event_ids": [event_id.to_string()], "dry_run": true }),
        )
        .await
        .expect(201);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["matched"], 1);
    assert_eq!(dry["requested_by"], "admin-api");
    assert_eq!(
        deliveries(&db).await,
        vec![("dead".to_owned(), 1)],
        "a dry run changes nothing"
    );

    let replay = api
        .post(
            "/admin/v1/replays",
            json!({ "event_ids": [event_id.to_string()], "subscription": "billing",
                    "reason": "billing fixed their endpoint", "requested_by": "ops@example.com" }),
        )
        .await
        .expect(201);
    assert_eq!(replay["dry_run"], false);
    assert_eq!(replay["matched"], 1);
    assert_eq!(replay["requested_by"], "ops@example.com");
    assert_eq!(
        replay["criteria"]["event_ids"],
        json!([event_id.to_string()])
    );
    let replay_id = replay["id"].as_i64().expect("replay id");

    wait_for_statuses(&db, "delivered", 1).await;
    let received = receiver
        .wait_for("/hooks", 2, DEADLINE)
        .await
        .expect("both attempts arrive");
    assert_eq!(
        received[0].header("webhook-id"),
        received[1].header("webhook-id")
    );
    assert_eq!(
        received[0].body, received[1].body,
        "a replay sends the same bytes"
    );

    let detail = api
        .get(&format!("/admin/v1/events/{event_id}"))
        .await
        .expect(200);
    assert_eq!(detail["delivery_list"][0]["status"], "delivered");
    assert_eq!(detail["delivery_list"][0]["replay_id"], replay_id);

    let one = api
        .get(&format!("/admin/v1/replays/{replay_id}"))
        .await
        .expect(200);
    assert_eq!(one, replay);
    let first_page = api.get("/admin/v1/replays?limit=1").await.expect(200);
    assert_eq!(first_page["replays"][0]["id"], replay_id, "newest first");
    let cursor = first_page["next_cursor"].as_str().expect("a second page");
    let second_page = api
        .get(&format!("/admin/v1/replays?limit=1&cursor={cursor}"))
        .await
        .expect(200);
    assert_eq!(second_page["replays"][0]["id"], dry["id"]);
    assert_eq!(second_page["next_cursor"], Value::Null);
    relay.shutdown().await;
}

#[tokio::test]
async fn the_openapi_document_describes_every_route() {
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    // Served without the token: it describes, it does not act.
    let document = api
        .call_as(None, Method::GET, "/admin/v1/openapi.json", None)
        .await
        .expect(200);
    assert!(
        document["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3."))
    );
    let paths = document["paths"].as_object().expect("paths");
    let routes = [
        ("/admin/v1/openapi.json", "get"),
        ("/admin/v1/subscriptions", "get"),
        ("/admin/v1/subscriptions", "post"),
        ("/admin/v1/subscriptions/{name}", "get"),
        ("/admin/v1/subscriptions/{name}", "patch"),
        ("/admin/v1/subscriptions/{name}", "delete"),
        ("/admin/v1/subscriptions/{name}/disable", "post"),
        ("/admin/v1/subscriptions/{name}/enable", "post"),
        ("/admin/v1/subscriptions/{name}/rotate-secret", "post"),
        ("/admin/v1/events", "get"),
        ("/admin/v1/events/{event_id}", "get"),
        ("/admin/v1/replays", "get"),
        ("/admin/v1/replays", "post"),
        ("/admin/v1/replays/{id}", "get"),
        ("/events/publish", "post"),
        ("/events/subscribe", "post"),
        ("/subscriptions", "get"),
        ("/events/history", "post"),
        ("/api/events/{event_id}/replay", "post"),
        ("/api/events/replay/batch", "post"),
        ("/api/events/status/pending", "get"),
    ];
    for (path, method) in routes {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} is not in the document"
        );
    }
    let documented: usize = paths
        .values()
        .map(|p| p.as_object().map_or(0, |ops| ops.len()))
        .sum();
    assert_eq!(
        documented,
        routes.len(),
        "the document lists routes that do not exist"
    );
    // Every $ref points at a schema that exists.
    let schemas = document["components"]["schemas"]
        .as_object()
        .expect("schemas");
    let text = document.to_string();
    for reference in text.split("#/components/schemas/").skip(1) {
        let name = reference.split('"').next().unwrap_or_default();
        assert!(schemas.contains_key(name), "dangling $ref {name}");
    }
    // Every operation it lists is served: the router and the document are built from one
    // list of handlers (utoipa_axum's routes!), and this checks that from outside. A route
    // the server does not have answers 405, the admin fallback, or axum's empty 404.
    for (path, method) in routes {
        let concrete = path
            .replace("{name}", "nobody")
            .replace("{event_id}", "3f1c3a52-52a1-4d57-9a43-8a8c61f3a0de")
            .replace("{id}", "999999");
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
        let body = (method != Method::GET && method != Method::DELETE).then(|| json!({}));
        let answer = api.call(method.clone(), &concrete, body).await;
        assert_ne!(answer.status, 405, "{method} {concrete}: {:#}", answer.body);
        assert!(
            answer.body.is_object(),
            "{method} {concrete}: no JSON answer"
        );
        let message = answer.body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !message.contains("no such admin API route"),
            "{method} {concrete} is documented but not routed"
        );
    }
    relay.shutdown().await;
}

/// jsonb keeps numbers an f64 cannot hold (a producer may insert 1e400; f64::MAX comes back
/// as 309 digits). The API passes them through as stored; reading them as f64 panicked the
/// handler, so one such event broke every listing that included it.
#[tokio::test]
async fn json_numbers_beyond_f64_are_shown_as_stored() {
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    db.client()
        .await
        .batch_execute(
            r#"INSERT INTO outbox.events (event_type, payload, metadata)
               VALUES ('lead.created', '{"big": 1e400}', '{"max": 1.7976931348623157e308}');
               INSERT INTO outbox.subscriptions (name, url, filter)
               VALUES ('crm', 'http://127.0.0.1:9/hook', '{"big": 1e400}')"#,
        )
        .await
        .expect("insert");
    // The answers are read as text: serde_json itself (as any f64 client) cannot hold them.
    let client = reqwest::Client::new();
    let text = |path: String| {
        let request = client
            .request(
                if path == "/events/history" {
                    Method::POST
                } else {
                    Method::GET
                },
                format!("{}{path}", api.base),
            )
            .header("authorization", format!("Bearer {TOKEN}"));
        async move {
            let response = request.send().await.expect("request");
            assert_eq!(response.status(), 200, "{path}");
            response.text().await.expect("body")
        }
    };
    let max = format!("17976931348623157{}", "0".repeat(292));
    let page = text("/admin/v1/events".to_owned()).await;
    assert!(page.contains(&format!(r#""max": {max}"#)), "{page}");
    let event_id = page
        .split(r#""event_id":""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("event_id");
    let big = format!("1{}", "0".repeat(400));
    let detail = text(format!("/admin/v1/events/{event_id}")).await;
    assert!(detail.contains(&format!(r#""big": {big}"#)), "{detail}");
    let subscription = text("/admin/v1/subscriptions/crm".to_owned()).await;
    assert!(subscription.contains(&big), "{subscription}");
    let history = text("/events/history".to_owned()).await;
    assert!(history.contains(&big), "{history}");
    relay.shutdown().await;
}
