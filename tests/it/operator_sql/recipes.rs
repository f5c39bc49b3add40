//! sql/*.sql through psql (see the parent module for the fixtures).

use super::*;

/// Two subscriptions with a dead, a failing and a delivered delivery and their failed
/// attempts; returns the dead event's event_id.
async fn operator_fixture(db: &TestDb) -> Uuid {
    let crm = subscription(db, "crm").await;
    let billing = subscription(db, "billing").await;
    let (dead_event, dead_event_id) = event(db, "lead.created", Some("acme"), "2 hours").await;
    let (failing_event, _) = event(db, "invoice.paid", None, "10 minutes").await;
    let dead = delivery(db, dead_event, crm, "dead").await;
    delivery(db, dead_event, billing, "delivered").await;
    let failing = delivery(db, failing_event, billing, "failing").await;
    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO outbox.delivery_attempts (delivery_id, attempt, started_at, duration_ms, status_code, error, response_body)
             VALUES ({dead}, 1, now() - interval '20 minutes', 12, 500, 'HTTP 500 Internal Server Error', 'boom'),
                    ({dead}, 2, now() - interval '10 minutes', 12, NULL, 'timeout after 15s', NULL),
                    ({failing}, 1, now() - interval '5 minutes', 8, 503, 'HTTP 503 Service Unavailable', 'later');
             INSERT INTO outbox.events (event_type, payload) VALUES ('lead.updated', '{{}}');"
        ))
        .await
        .expect("attempts and an undispatched event");
    dead_event_id
}

#[tokio::test]
async fn failures_sql_groups_failures_by_subscription_and_error() {
    let db = TestDb::new().await;
    operator_fixture(&db).await;
    let tables = recipe(&db, "failures.sql", &[]).await;
    assert_eq!(tables.len(), 3, "{tables:?}");
    assert_eq!(
        tables[0].heading,
        "Failed attempts by subscription and error, last 24 hours"
    );
    let columns = [
        "subscription",
        "status_code",
        "error",
        "attempts",
        "deliveries",
    ];
    assert_eq!(
        tables[0].select_sorted(&columns),
        rows(&[
            ["billing", "503", "HTTP 503 Service Unavailable", "1", "1"],
            ["crm", "", "timeout after 15s", "1", "1"],
            ["crm", "500", "HTTP 500 Internal Server Error", "1", "1"],
        ])
    );
    let now_columns = [
        "subscription",
        "last_status_code",
        "last_error",
        "deliveries",
    ];
    assert_eq!(
        tables[1].select(&now_columns),
        rows(&[["billing", "500", "HTTP 500 Internal Server Error", "1"]]),
        "failing now"
    );
    assert_eq!(
        tables[2].select(&now_columns),
        rows(&[["crm", "500", "HTTP 500 Internal Server Error", "1"]]),
        "dead"
    );

    let tables = recipe(&db, "failures.sql", &[("since", "1 minute")]).await;
    assert_eq!(
        tables[0].rows.len(),
        0,
        "attempts older than :since are listed: {:?}",
        tables[0]
    );
    assert_eq!(tables[2].rows.len(), 1, "dead deliveries are of all time");
}

#[tokio::test]
async fn backlog_sql_shows_unfinished_work_and_undispatched_events() {
    let db = TestDb::new().await;
    operator_fixture(&db).await;
    // On top of the fixture (billing: one failing delivery, not due for an hour; one
    // undispatched due event): crm gets a delivery due 10 minutes ago and one whose relay's
    // lease expired, and an event scheduled for tomorrow waits.
    let crm: i64 = count(
        &db,
        "SELECT id FROM outbox.subscriptions WHERE name = 'crm'",
    )
    .await;
    let (overdue_event, _) = event(&db, "lead.created", None, "15 minutes").await;
    let overdue = delivery(&db, overdue_event, crm, "pending").await;
    let (held_event, _) = event(&db, "lead.created", None, "15 minutes").await;
    let held = delivery(&db, held_event, crm, "in_flight").await;
    db.client()
        .await
        .batch_execute(&format!(
            "UPDATE outbox.deliveries SET next_attempt_at = now() - interval '10 minutes' WHERE id = {overdue};
             UPDATE outbox.deliveries SET lease_owner = 'relay-gone', lease_expires_at = now() - interval '1 minute'
              WHERE id = {held};
             INSERT INTO outbox.events (event_type, payload, deliver_after)
             VALUES ('lead.later', '{{}}', now() + interval '1 day');"
        ))
        .await
        .expect("backlog fixture");

    let tables = recipe(&db, "backlog.sql", &[("overdue", "5 minutes")]).await;
    assert_eq!(tables.len(), 3, "{tables:?}");
    assert_eq!(
        tables[0].heading,
        "Unfinished deliveries per subscription; overdue = due for more than 5 minutes"
    );
    let columns = [
        "subscription",
        "enabled",
        "pending",
        "in_flight",
        "failing",
        "due_now",
        "overdue",
        "waiting_in_order",
        "dead",
    ];
    assert_eq!(
        tables[0].select_sorted(&columns),
        rows(&[
            ["billing", "t", "0", "0", "1", "0", "0", "0", "0"],
            ["crm", "t", "1", "1", "0", "1", "1", "0", "1"],
        ])
    );
    assert_eq!(
        tables[1].select(&["due", "scheduled"]),
        rows(&[["1", "1"]]),
        "events not yet dispatched"
    );
    assert_eq!(
        tables[2].select(&["lease_owner", "deliveries"]),
        rows(&[["relay-gone", "1"]]),
        "expired leases"
    );

    let tables = recipe(&db, "backlog.sql", &[("overdue", "1 hour")]).await;
    assert_eq!(
        tables[0].select_sorted(&["subscription", "due_now", "overdue"]),
        rows(&[["billing", "0", "0"], ["crm", "1", "0"]]),
        "due 10 minutes ago is not overdue by an hour"
    );
}

#[tokio::test]
async fn top_errors_sql_ranks_recent_error_messages() {
    let db = TestDb::new().await;
    operator_fixture(&db).await;
    let columns = [
        "error",
        "attempts",
        "deliveries",
        "subscriptions",
        "status_codes",
        "latest_response_body",
    ];
    let tables = recipe(&db, "top_errors.sql", &[]).await;
    assert_eq!(tables.len(), 1, "{tables:?}");
    assert_eq!(tables[0].heading, "Top 20 errors in the last 1 hour");
    assert_eq!(
        tables[0].select(&columns),
        rows(&[
            [
                "HTTP 500 Internal Server Error",
                "1",
                "1",
                "crm",
                "500",
                "boom"
            ],
            [
                "HTTP 503 Service Unavailable",
                "1",
                "1",
                "billing",
                "503",
                "later"
            ],
            ["timeout after 15s", "1", "1", "crm", "", ""],
        ])
    );
    let tables = recipe(
        &db,
        "top_errors.sql",
        &[("since", "7 minutes"), ("top", "5")],
    )
    .await;
    assert_eq!(
        tables[0].select(&["error"]),
        rows(&[["HTTP 503 Service Unavailable"]]),
        "only the attempt of the last 7 minutes"
    );
    let tables = recipe(&db, "top_errors.sql", &[("top", "1")]).await;
    assert_eq!(
        tables[0].select(&["error"]),
        rows(&[["HTTP 500 Internal Server Error"]]),
        ":top limits the rows"
    );
}

#[tokio::test]
async fn event_story_sql_tells_one_event_from_deliveries_to_replays() {
    let db = TestDb::new().await;
    let event_id = operator_fixture(&db).await;
    let (replay_id, matched) = call(
        &db,
        &format!("outbox.replay(event_ids => '{{{event_id}}}', reason => 'story-check')"),
    )
    .await
    .expect("replay");
    assert_eq!(matched, 1);
    let replay_id = replay_id.to_string();
    let tables = recipe(
        &db,
        "event_story.sql",
        &[("event_id", &event_id.to_string())],
    )
    .await;
    let headings: Vec<&str> = tables.iter().map(|t| t.heading.as_str()).collect();
    assert_eq!(
        headings,
        [
            format!("Event {event_id}").as_str(),
            "Deliveries (one per subscription)",
            "Attempts (failures, retries and replayed attempts)",
            "Replays and backfills that touched it",
        ]
    );
    assert_eq!(
        tables[0].select(&["event_id", "event_type", "tenant_id"]),
        rows(&[[event_id.to_string().as_str(), "lead.created", "acme"]])
    );
    assert_eq!(
        tables[1].select(&[
            "subscription",
            "status",
            "attempts",
            "last_error",
            "replay_id"
        ]),
        rows(&[
            ["crm", "pending", "0", "", replay_id.as_str()],
            ["billing", "delivered", "3", "", ""],
        ]),
        "the dead delivery was re-queued by the replay; the other event's delivery is not here"
    );
    assert_eq!(
        tables[2].select(&[
            "subscription",
            "attempt",
            "status_code",
            "error",
            "response_body"
        ]),
        rows(&[
            ["crm", "1", "500", "HTTP 500 Internal Server Error", "boom"],
            ["crm", "2", "", "timeout after 15s", ""],
        ]),
        "this event's attempts only (not the other event's 503)"
    );
    assert_eq!(
        tables[3].select(&["replay_id", "reason", "matched"]),
        rows(&[[replay_id.as_str(), "story-check", "1"]])
    );

    let usage = psql(&db, "event_story.sql", &[]).await;
    assert!(usage.contains("usage:"), "{usage}");
}

/// Running the recipes file previews the common replays and leaves nothing behind.
#[tokio::test]
async fn replay_recipes_sql_previews_replays_without_changing_anything() {
    let db = TestDb::new().await;
    operator_fixture(&db).await;
    let before = deliveries(&db).await;
    let tables = recipe(&db, "replay_recipes.sql", &[]).await;
    assert_eq!(tables.len(), 2, "{tables:?}");
    assert_eq!(
        tables[0].select(&["replay", "matched"]),
        rows(&[["dead (the default)", "1"], ["dead and failing", "2"]]),
        "the fixture has one dead and one failing delivery"
    );
    assert_eq!(
        tables[1].select(&["subscription", "dead"]),
        rows(&[["crm", "1"]])
    );
    assert_eq!(deliveries(&db).await, before);
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.replays").await, 0);
}
