//! outbox.replay (see the parent module for the fixtures).

use super::*;

#[tokio::test]
async fn a_dry_run_changes_no_delivery_but_records_the_replay() {
    let db = TestDb::new().await;
    let crm = subscription(&db, "crm").await;
    for _ in 0..3 {
        let (e, _) = event(&db, "lead.created", None, "1 minute").await;
        delivery(&db, e, crm, "dead").await;
    }
    let before = query(
        &db,
        "SELECT row_to_json(d)::text FROM outbox.deliveries d ORDER BY id",
    )
    .await
    .iter()
    .map(|r| r.get::<_, String>(0))
    .collect::<Vec<_>>();

    let (replay_id, matched) = call(
        &db,
        "outbox.replay(subscription => 'crm', max_events => 2, dry_run => true, reason => 'how many?')",
    )
    .await
    .expect("dry run");
    assert_eq!(matched, 2, "max_events bounds the dry run's count too");

    let after = query(
        &db,
        "SELECT row_to_json(d)::text FROM outbox.deliveries d ORDER BY id",
    )
    .await
    .iter()
    .map(|r| r.get::<_, String>(0))
    .collect::<Vec<_>>();
    assert_eq!(before, after, "a dry run changed deliveries");
    let row = &query(
        &db,
        "SELECT id, dry_run, matched, reason, requested_by = current_user, criteria FROM outbox.replays",
    )
    .await[0];
    assert_eq!(row.get::<_, i64>(0), replay_id);
    assert!(row.get::<_, bool>(1));
    assert_eq!(row.get::<_, i64>(2), 2);
    assert_eq!(
        row.get::<_, Option<String>>(3).as_deref(),
        Some("how many?")
    );
    assert!(
        row.get::<_, bool>(4),
        "requested_by defaults to current_user"
    );
    assert_eq!(
        row.get::<_, Value>(5),
        json!({"status": ["dead"], "subscription": "crm", "max_events": 2})
    );
}

#[tokio::test]
async fn replay_requeues_dead_deliveries_with_a_fresh_attempt_budget() {
    let db = TestDb::new().await;
    let crm = subscription(&db, "crm").await;
    let (e1, _) = event(&db, "lead.created", None, "1 hour").await;
    let (e2, _) = event(&db, "lead.created", None, "1 hour").await;
    let dead = delivery(&db, e1, crm, "dead").await;
    let delivered = delivery(&db, e2, crm, "delivered").await;

    let (replay_id, matched) = call(&db, "outbox.replay(reason => 'receiver fixed')")
        .await
        .expect("replay");
    assert_eq!(matched, 1);

    let row = &query(
        &db,
        &format!(
            "SELECT status, attempts, next_attempt_at <= now(), replay_id, last_status_code,
                    last_error, lease_owner IS NULL
               FROM outbox.deliveries WHERE id = {dead}"
        ),
    )
    .await[0];
    assert_eq!(row.get::<_, String>(0), "pending");
    assert_eq!(row.get::<_, i32>(1), 0);
    assert!(row.get::<_, bool>(2), "due now");
    assert_eq!(row.get::<_, Option<i64>>(3), Some(replay_id));
    assert_eq!(
        row.get::<_, Option<i32>>(4),
        None,
        "last_* describe attempt 0"
    );
    assert_eq!(row.get::<_, Option<String>>(5), None);
    assert!(row.get::<_, bool>(6));
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM outbox.deliveries WHERE id = {delivered} AND status = 'delivered' AND replay_id IS NULL")
        )
        .await,
        1,
        "the default replays dead deliveries only"
    );
    let row = &query(
        &db,
        &format!(
            "SELECT matched, dry_run, reason, criteria FROM outbox.replays WHERE id = {replay_id}"
        ),
    )
    .await[0];
    assert_eq!(row.get::<_, i64>(0), 1);
    assert!(!row.get::<_, bool>(1));
    assert_eq!(
        row.get::<_, Option<String>>(2).as_deref(),
        Some("receiver fixed")
    );
    assert_eq!(
        row.get::<_, Value>(3),
        json!({"status": ["dead"], "max_events": 10000})
    );
}

/// One fixture, each criterion alone and some combined: exactly the matching deliveries are
/// re-queued, lowest delivery id first when max_events cuts.
#[tokio::test]
async fn replay_respects_every_criterion() {
    let db = TestDb::new().await;
    let a = subscription(&db, "a").await;
    let b = subscription(&db, "b").await;
    let (lead_old, lead_old_id) = event(&db, "lead.created", Some("t1"), "3 days").await;
    let (lead_updated, _) = event(&db, "lead.updated", Some("t2"), "1 day").await;
    let (invoice, invoice_id) = event(&db, "invoice.paid", Some("t1"), "1 minute").await;
    let (lead_new, _) = event(&db, "lead.created", Some("t1"), "1 hour").await;
    let a1 = delivery(&db, lead_old, a, "dead").await;
    let b1 = delivery(&db, lead_old, b, "dead").await;
    let a2 = delivery(&db, lead_updated, a, "dead").await;
    let a3 = delivery(&db, invoice, a, "failing").await;
    let b3 = delivery(&db, invoice, b, "dead").await;
    let a4 = delivery(&db, lead_new, a, "delivered").await;
    let b4 = delivery(&db, lead_new, b, "pending").await;

    let cases: Vec<(String, Vec<i64>)> = vec![
        ("".into(), vec![a1, b1, a2, b3]),
        ("subscription => 'a'".into(), vec![a1, a2]),
        ("event_type => 'lead.*'".into(), vec![a1, b1, a2]),
        ("event_type => 'lead.created'".into(), vec![a1, b1]),
        ("tenant_id => 't2'".into(), vec![a2]),
        ("created_after => now() - interval '2 days'".into(), vec![a2, b3]),
        ("created_before => now() - interval '2 days'".into(), vec![a1, b1]),
        (
            "created_after => now() - interval '2 days', created_before => now() - interval '2 minutes'"
                .into(),
            vec![a2],
        ),
        (
            format!("status => '{{dead,failing}}', event_ids => '{{{invoice_id}}}'"),
            vec![a3, b3],
        ),
        (
            format!("event_ids => '{{{invoice_id},{lead_old_id}}}', subscription => 'b'"),
            vec![b1, b3],
        ),
        ("status => '{delivered}'".into(), vec![a4]),
        ("status => '{pending,failing}'".into(), vec![a3, b4]),
        ("max_events => 2".into(), vec![a1, b1]),
        (
            "status => '{dead,failing,delivered,pending}', subscription => 'a', event_type => 'lead.*', tenant_id => 't1'"
                .into(),
            vec![a1, a4],
        ),
        ("event_ids => '{}'".into(), vec![]),
    ];
    for (args, expected) in cases {
        assert_eq!(requeued_by(&db, &args).await, expected, "replay({args})");
    }

    // Every non-null criterion is recorded under its parameter name.
    let (replay_id, _) = call(
        &db,
        &format!(
            "outbox.replay(status => '{{dead,failing}}', subscription => 'a', event_type => 'lead.*',
                           tenant_id => 't1', created_after => '2020-01-01 00:00+00',
                           created_before => '2100-01-01 00:00+00', event_ids => '{{{lead_old_id}}}',
                           max_events => 7, requested_by => 'alice', dry_run => true)"
        ),
    )
    .await
    .expect("dry run");
    let row = &query(
        &db,
        &format!("SELECT requested_by, criteria FROM outbox.replays WHERE id = {replay_id}"),
    )
    .await[0];
    assert_eq!(row.get::<_, String>(0), "alice");
    let mut criteria: Value = row.get(1);
    // Timestamps are written in the session's time zone: compare them as instants.
    for (key, expected) in [
        ("created_after", "2020-01-01T00:00:00Z"),
        ("created_before", "2100-01-01T00:00:00Z"),
    ] {
        let written = criteria
            .as_object_mut()
            .and_then(|c| c.remove(key))
            .unwrap_or_else(|| panic!("{key} missing"));
        let instant = |text: &str| {
            chrono::DateTime::parse_from_rfc3339(text)
                .unwrap_or_else(|e| panic!("{key} {text:?}: {e}"))
        };
        assert_eq!(
            instant(written.as_str().unwrap_or_default()),
            instant(expected)
        );
    }
    assert_eq!(
        criteria,
        json!({
            "status": ["dead", "failing"],
            "subscription": "a",
            "event_type": "lead.*",
            "tenant_id": "t1",
            "event_ids": [lead_old_id.to_string()],
            "max_events": 7
        })
    );
}

/// Bad input fails with SQLSTATE 22023, a message naming the problem and a hint, and
/// records nothing.
#[tokio::test]
async fn replay_refuses_bad_input_with_clear_errors() {
    let db = TestDb::new().await;
    subscription(&db, "crm").await;
    let cases = [
        (
            "status => '{dead,gone}'",
            "unknown delivery status in {dead,gone}",
            "Statuses are pending",
        ),
        (
            "status => '{}'",
            "status must be a non-empty list",
            "status =>",
        ),
        (
            "subscription => 'nope'",
            "no subscription named 'nope'",
            "outbox.subscriptions",
        ),
        (
            "max_events => 0",
            "max_events must be at least 1 (got 0)",
            "dry_run",
        ),
        (
            "max_events => NULL",
            "max_events must be at least 1 (got NULL)",
            "dry_run",
        ),
        (
            "status => '{in_flight}'",
            "in_flight deliveries cannot be replayed",
            "lease",
        ),
        (
            "event_type => 'lead.%'",
            "neither an event type nor a glob",
            "lead.*",
        ),
        (
            "created_after => now(), created_before => now() - interval '1 day'",
            "must be earlier than created_before",
            "window",
        ),
    ];
    for (args, message, hint) in cases {
        let error = call(&db, &format!("outbox.replay({args})"))
            .await
            .expect_err(args);
        let (code, got_message, got_hint) = db_error(&error);
        assert_eq!(code, "22023", "{args}: {got_message}");
        assert!(
            got_message.contains(message),
            "{args}: message {got_message:?} lacks {message:?}"
        );
        assert!(
            got_hint.contains(hint),
            "{args}: hint {got_hint:?} lacks {hint:?}"
        );
    }
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.replays").await, 0);
}

/// A relay holds in_flight deliveries: asking for them is an error, and replaying every
/// other status leaves them (and their lease) alone.
#[tokio::test]
async fn in_flight_deliveries_are_never_requeued() {
    let db = TestDb::new().await;
    let crm = subscription(&db, "crm").await;
    let (e1, _) = event(&db, "lead.created", None, "1 minute").await;
    let (e2, _) = event(&db, "lead.created", None, "1 minute").await;
    let in_flight = delivery(&db, e1, crm, "in_flight").await;
    let dead = delivery(&db, e2, crm, "dead").await;

    let error = call(&db, "outbox.replay(status => '{dead,in_flight}')")
        .await
        .expect_err("in_flight refused");
    assert!(db_error(&error).1.contains("in_flight"), "{error}");

    assert_eq!(
        requeued_by(&db, "status => '{pending,failing,dead,delivered}'").await,
        vec![dead]
    );
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT count(*) FROM outbox.deliveries WHERE id = {in_flight}
                   AND status = 'in_flight' AND lease_owner = 'relay-1' AND replay_id IS NULL"
            )
        )
        .await,
        1
    );
}

/// A row another transaction holds locked (a relay claiming it) is skipped, not waited
/// for, and matched counts only what was re-queued.
#[tokio::test]
async fn replay_skips_rows_locked_by_others_instead_of_waiting() {
    let db = TestDb::new().await;
    let crm = subscription(&db, "crm").await;
    let (e1, _) = event(&db, "lead.created", None, "1 minute").await;
    let (e2, _) = event(&db, "lead.created", None, "1 minute").await;
    let locked = delivery(&db, e1, crm, "dead").await;
    let free = delivery(&db, e2, crm, "dead").await;

    let mut holder = db.client().await;
    let tx = holder.transaction().await.expect("begin");
    tx.execute(
        "SELECT id FROM outbox.deliveries WHERE id = $1 FOR UPDATE",
        &[&locked],
    )
    .await
    .expect("lock");
    // The deadline is a hang guard, not a timing assertion.
    let (replay_id, matched) = tokio::time::timeout(DEADLINE, call(&db, "outbox.replay()"))
        .await
        .expect("replay waited for a locked row")
        .expect("replay");
    tx.rollback().await.expect("rollback");

    assert_eq!(matched, 1);
    assert_eq!(
        query(
            &db,
            "SELECT id, replay_id FROM outbox.deliveries ORDER BY id"
        )
        .await
        .iter()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, Option<i64>>(1)))
        .collect::<Vec<_>>(),
        vec![(locked, None), (free, Some(replay_id))]
    );
    assert_eq!(
        count(
            &db,
            &format!("SELECT matched FROM outbox.replays WHERE id = {replay_id}")
        )
        .await,
        1
    );
}

/// Deliveries of a removed subscription have nobody to go to and are never re-queued.
#[tokio::test]
async fn replay_leaves_deliveries_of_removed_subscriptions_dead() {
    let db = TestDb::new().await;
    let gone = subscription(&db, "gone").await;
    let (e, _) = event(&db, "lead.created", None, "1 minute").await;
    delivery(&db, e, gone, "failing").await;
    db.client()
        .await
        .execute("DELETE FROM outbox.subscriptions WHERE id = $1", &[&gone])
        .await
        .expect("remove");
    assert_eq!(requeued_by(&db, "").await, Vec::<i64>::new());
    assert_eq!(deliveries(&db).await, vec![("dead".to_string(), 3)]);
}
