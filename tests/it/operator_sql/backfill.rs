//! outbox.backfill (see the parent module for the fixtures).

use super::*;

/// Inserts a dispatched event with the given columns; returns its row id.
async fn past_event(db: &TestDb, event_type: &str, columns: &str, values: &str) -> i64 {
    let sql = format!(
        "INSERT INTO outbox.events (event_type, payload, dispatched_at{columns})
         VALUES ($1, '{{\"plan\": \"pro\"}}', now(){values}) RETURNING id"
    );
    db.client()
        .await
        .query_one(&sql, &[&event_type])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// The subscription's rules (type globs, tenant, payload filter, the events'
/// target_services) decide, as in the dispatcher; events it already has, and events not
/// yet dispatched, are left alone.
#[tokio::test]
async fn backfill_creates_deliveries_only_for_matching_past_events_the_subscription_lacked() {
    let db = TestDb::new().await;
    let (newcomer, _) = add_subscription(
        &db,
        "newcomer",
        NOWHERE,
        &[
            ("event_types", "'{lead.*,invoice.paid}'"),
            ("tenant_id", "'acme'"),
            ("filter", "'{\"plan\": \"pro\"}'"),
        ],
    )
    .await;
    let other = subscription(&db, "other").await;
    let t = ", tenant_id";
    let matching = past_event(&db, "lead.created", t, ", 'acme'").await;
    let invoice = past_event(&db, "invoice.paid", t, ", 'acme'").await;
    let targeted = past_event(
        &db,
        "lead.updated",
        ", tenant_id, target_services",
        ", 'acme', '{newcomer,billing}'",
    )
    .await;
    let had_it = past_event(&db, "lead.created", t, ", 'acme'").await;
    delivery(&db, had_it, newcomer, "delivered").await;
    let other_had_it = past_event(&db, "lead.created", t, ", 'acme'").await;
    delivery(&db, other_had_it, other, "delivered").await;
    past_event(&db, "order.created", t, ", 'acme'").await;
    past_event(&db, "lead.created", t, ", 'globex'").await;
    past_event(&db, "lead.created", "", "").await;
    past_event(
        &db,
        "lead.created",
        ", tenant_id, target_services",
        ", 'acme', '{billing}'",
    )
    .await;
    db.client()
        .await
        .batch_execute(
            "INSERT INTO outbox.events (event_type, payload, tenant_id, dispatched_at)
                 VALUES ('lead.created', '{\"plan\": \"free\"}', 'acme', now());
             INSERT INTO outbox.events (event_type, payload, tenant_id)
                 VALUES ('lead.created', '{\"plan\": \"pro\"}', 'acme');",
        )
        .await
        .expect("filter mismatch and undispatched events");

    let (replay_id, matched) = call(
        &db,
        "outbox.backfill('newcomer', created_after => now() - interval '1 hour', reason => 'onboarding')",
    )
    .await
    .expect("backfill");
    assert_eq!(matched, 4);

    let created: Vec<(i64, String, i32, bool)> = query(
        &db,
        &format!(
            "SELECT event_id, status, attempts, next_attempt_at <= now() FROM outbox.deliveries
              WHERE replay_id = {replay_id} AND subscription_id = {newcomer} ORDER BY event_id"
        ),
    )
    .await
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect();
    assert_eq!(
        created,
        vec![
            (matching, "pending".into(), 0, true),
            (invoice, "pending".into(), 0, true),
            (targeted, "pending".into(), 0, true),
            (other_had_it, "pending".into(), 0, true),
        ]
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.deliveries WHERE replay_id IS NOT NULL"
        )
        .await,
        4,
        "nothing else was touched"
    );
    let row = &query(
        &db,
        &format!(
            "SELECT matched, dry_run, reason, criteria FROM outbox.replays WHERE id = {replay_id}"
        ),
    )
    .await[0];
    assert_eq!(row.get::<_, i64>(0), 4);
    assert!(!row.get::<_, bool>(1));
    assert_eq!(
        row.get::<_, Option<String>>(2).as_deref(),
        Some("onboarding")
    );
    let criteria: Value = row.get(3);
    assert_eq!(criteria["backfill"], json!(true));
    assert_eq!(criteria["subscription"], json!("newcomer"));
    assert_eq!(criteria["max_events"], json!(100000));
    assert!(criteria["created_after"].is_string() && criteria["created_before"].is_string());

    // Again: nothing is missing any more.
    assert_eq!(
        call(&db, "outbox.backfill('newcomer', '-infinity')")
            .await
            .expect("second backfill")
            .1,
        0
    );
}

#[tokio::test]
async fn backfill_respects_the_window_event_type_and_max_events() {
    let db = TestDb::new().await;
    let sub = subscription(&db, "newcomer").await;
    let mut ids = Vec::new();
    for (event_type, age) in [
        ("lead.created", "10 days"),
        ("lead.created", "3 days"),
        ("invoice.paid", "3 days"),
        ("lead.updated", "2 days"),
        ("lead.created", "1 hour"),
    ] {
        ids.push(event(&db, event_type, None, age).await.0);
    }
    let backfilled = |args: &'static str| {
        let db = &db;
        async move {
            let mut client = db.client().await;
            let tx = client.transaction().await.expect("begin");
            let replay_id: i64 = tx
                .query_one(
                    &format!("SELECT replay_id FROM outbox.backfill({args})"),
                    &[],
                )
                .await
                .unwrap_or_else(|e| panic!("backfill({args}): {e}"))
                .get(0);
            let events: Vec<i64> = tx
                .query(
                    "SELECT event_id FROM outbox.deliveries WHERE replay_id = $1 AND subscription_id = $2 ORDER BY event_id",
                    &[&replay_id, &sub],
                )
                .await
                .expect("read")
                .iter()
                .map(|r| r.get(0))
                .collect();
            tx.rollback().await.expect("rollback");
            events
        }
    };
    assert_eq!(
        backfilled("'newcomer', '-infinity'").await,
        ids.clone(),
        "created_before defaults to now()"
    );
    assert_eq!(
        backfilled("'newcomer', now() - interval '4 days', now() - interval '1 day'").await,
        vec![ids[1], ids[2], ids[3]]
    );
    assert_eq!(
        backfilled("'newcomer', now() - interval '4 days', event_type => 'lead.*'").await,
        vec![ids[1], ids[3], ids[4]]
    );
    assert_eq!(
        backfilled("'newcomer', '-infinity', event_type => 'invoice.paid'").await,
        vec![ids[2]]
    );
    assert_eq!(
        backfilled("'newcomer', '-infinity', max_events => 2").await,
        vec![ids[0], ids[1]],
        "oldest events first"
    );
    assert_eq!(
        backfilled("subscription => 'newcomer', created_after => '-infinity', created_before => now() - interval '5 days'").await,
        vec![ids[0]]
    );
}

#[tokio::test]
async fn backfill_refuses_unknown_or_disabled_subscriptions_and_bad_windows() {
    let db = TestDb::new().await;
    add_subscription(
        &db,
        "off",
        NOWHERE,
        &[("enabled", "false"), ("disabled_reason", "'HTTP 410 Gone'")],
    )
    .await;
    subscription(&db, "on").await;
    let cases = [
        (
            "'nope', '-infinity'",
            "no subscription named 'nope'",
            "outbox.subscriptions",
        ),
        (
            "'off', '-infinity'",
            "subscription 'off' is disabled (HTTP 410 Gone)",
            "SET enabled = true",
        ),
        (
            "NULL, '-infinity'",
            "subscription is required",
            "subscription =>",
        ),
        ("'on', NULL", "must not be NULL", "-infinity"),
        (
            "'on', now(), now() - interval '1 day'",
            "must be earlier than created_before",
            "window",
        ),
        (
            "'on', '-infinity', max_events => 0",
            "max_events must be at least 1",
            "bounds",
        ),
        (
            "'on', '-infinity', event_type => 'a b'",
            "neither an event type nor a glob",
            "lead.*",
        ),
    ];
    for (args, message, hint) in cases {
        let error = call(&db, &format!("outbox.backfill({args})"))
            .await
            .expect_err(args);
        let (code, got_message, got_hint) = db_error(&error);
        assert_eq!(code, "22023", "{args}: {got_message}");
        assert!(got_message.contains(message), "{args}: {got_message:?}");
        assert!(got_hint.contains(hint), "{args}: hint {got_hint:?}");
    }
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.replays").await, 0);
}
