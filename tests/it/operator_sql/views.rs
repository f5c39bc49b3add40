//! Views (see the parent module for the fixtures).

use super::*;

/// Only failing and dead deliveries appear, each with its event, subscription name (NULL
/// once the subscription is removed), attempts, last status code, last error and age.
#[tokio::test]
async fn failed_deliveries_lists_failing_and_dead_deliveries_with_their_context() {
    let db = TestDb::new().await;
    let crm = subscription(&db, "crm").await;
    let gone = subscription(&db, "gone").await;
    let (e1, e1_id) = event(&db, "lead.created", Some("acme"), "2 hours").await;
    let (e2, _) = event(&db, "invoice.paid", None, "5 minutes").await;
    for status in ["pending", "in_flight", "delivered"] {
        let (e, _) = event(&db, "lead.updated", None, "1 minute").await;
        delivery(&db, e, crm, status).await;
    }
    let failing = delivery(&db, e1, crm, "failing").await;
    let dead = delivery(&db, e2, crm, "dead").await;
    let orphan = delivery(&db, e1, gone, "pending").await;
    db.client()
        .await
        .execute("DELETE FROM outbox.subscriptions WHERE name = 'gone'", &[])
        .await
        .expect("remove subscription");

    let rows = query(
        &db,
        "SELECT delivery_id, status, event_id, event_type, tenant_id, subscription, attempts,
                last_status_code, last_error, extract(epoch FROM event_age)::float8
           FROM outbox.failed_deliveries ORDER BY delivery_id",
    )
    .await;
    // One line per row: id, status, event type, subscription, attempts, last code, last error.
    let got: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{} {} {} {:?} {} {:?} {:?}",
                r.get::<_, i64>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(3),
                r.get::<_, Option<String>>(5),
                r.get::<_, i32>(6),
                r.get::<_, Option<i32>>(7),
                r.get::<_, Option<String>>(8),
            )
        })
        .collect();
    let http_500 = r#"Some(500) Some("HTTP 500 Internal Server Error")"#;
    assert_eq!(
        got,
        vec![
            format!(r#"{failing} failing lead.created Some("crm") 3 {http_500}"#),
            format!(r#"{dead} dead invoice.paid Some("crm") 3 {http_500}"#),
            format!(
                r#"{orphan} dead lead.created None 0 None Some("subscription gone was removed")"#
            ),
        ]
    );
    let first = &rows[0];
    assert_eq!(first.get::<_, Uuid>(2), e1_id);
    assert_eq!(first.get::<_, Option<String>>(4).as_deref(), Some("acme"));
    let age: f64 = first.get(9);
    assert!(
        (7100.0..7300.0).contains(&age),
        "event_age of an event created 2 hours ago: {age} s"
    );
}

/// Counts per status, the oldest unfinished delivery's age (by delivery created_at), last
/// success (max delivered_at) and last failure (latest attempt with an error; a later
/// successful attempt does not count); a subscription without deliveries has zeros.
#[tokio::test]
async fn subscription_health_counts_statuses_and_reports_last_success_and_failure() {
    let db = TestDb::new().await;
    let crm = subscription(&db, "crm").await;
    subscription(&db, "idle").await;
    db.client()
        .await
        .execute(
            "UPDATE outbox.subscriptions SET enabled = false, disabled_reason = 'HTTP 410 Gone' WHERE name = 'idle'",
            &[],
        )
        .await
        .expect("disable");
    let statuses = [
        "pending",
        "pending",
        "in_flight",
        "failing",
        "delivered",
        "delivered",
        "delivered",
        "dead",
    ];
    let mut ids = Vec::new();
    for status in statuses {
        let (e, _) = event(&db, "lead.created", None, "1 minute").await;
        ids.push(delivery(&db, e, crm, status).await);
    }
    db.client()
        .await
        .batch_execute(&format!(
            "UPDATE outbox.deliveries SET created_at = now() - interval '3 hours' WHERE id = {in_flight};
             UPDATE outbox.deliveries SET created_at = now() - interval '10 days' WHERE id = {dead};
             UPDATE outbox.deliveries SET delivered_at = '2020-01-01 00:00:00+00' WHERE status = 'delivered' AND id <> {delivered};
             INSERT INTO outbox.delivery_attempts (delivery_id, attempt, started_at, duration_ms, status_code, error)
             VALUES ({failing}, 1, '2020-02-03 04:05:06+00', 10, 500, 'HTTP 500'),
                    ({failing}, 2, '2020-01-01 00:00:00+00', 10, 503, 'HTTP 503'),
                    ({delivered}, 2, '2021-03-01 00:00:00+00', 10, 200, NULL);",
            in_flight = ids[2],
            failing = ids[3],
            delivered = ids[4],
            dead = ids[7],
        ))
        .await
        .expect("shape the history");

    let rows = query(
        &db,
        "SELECT name, enabled, disabled_reason, pending, in_flight, failing, delivered,
                delivered_last_24h, dead, extract(epoch FROM oldest_pending_age)::float8,
                last_success_at = (SELECT max(delivered_at) FROM outbox.deliveries WHERE delivered_at > '2020-01-01 00:00:00+00'),
                last_failure_at = '2020-02-03 04:05:06+00',
                last_success_at IS NULL AND last_failure_at IS NULL
           FROM outbox.subscription_health ORDER BY name",
    )
    .await;
    assert_eq!(rows.len(), 2);
    let crm_row = &rows[0];
    assert_eq!(crm_row.get::<_, String>(0), "crm");
    assert!(crm_row.get::<_, bool>(1));
    let counts: Vec<i64> = (3..9).map(|i| crm_row.get(i)).collect();
    assert_eq!(
        counts,
        vec![2, 1, 1, 3, 1, 1],
        "pending, in_flight, failing, delivered, delivered_last_24h, dead"
    );
    let oldest: f64 = crm_row.get(9);
    assert!(
        (10_700.0..11_000.0).contains(&oldest),
        "the 3-hour-old in_flight delivery is the oldest unfinished one (dead does not count): {oldest} s"
    );
    assert_eq!(
        crm_row.get::<_, Option<bool>>(10),
        Some(true),
        "last success is the latest delivered_at"
    );
    assert_eq!(
        crm_row.get::<_, Option<bool>>(11),
        Some(true),
        "last failure is the latest attempt with an error"
    );

    let idle = &rows[1];
    assert_eq!(idle.get::<_, String>(0), "idle");
    assert!(!idle.get::<_, bool>(1));
    assert_eq!(
        idle.get::<_, Option<String>>(2).as_deref(),
        Some("HTTP 410 Gone")
    );
    let counts: Vec<i64> = (3..9).map(|i| idle.get(i)).collect();
    assert_eq!(counts, vec![0; 6]);
    assert_eq!(idle.get::<_, Option<f64>>(9), None);
    assert!(idle.get::<_, bool>(12), "no last success or failure");
}

/// The cost promise of COMMENT ON VIEW: with a delivered history much bigger than the open
/// work, the open-work columns are read through the partial indexes, never by scanning the
/// deliveries table or an index over all of it.
#[tokio::test]
async fn subscription_health_reads_open_work_through_partial_indexes() {
    let db = TestDb::new().await;
    let crm = subscription(&db, "crm").await;
    let billing = subscription(&db, "billing").await;
    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO outbox.events (event_type, payload, dispatched_at)
                 SELECT 'lead.created', '{{}}', now() FROM generate_series(1, 20000);
             INSERT INTO outbox.deliveries (event_id, subscription_id, status, attempts, delivered_at)
                 SELECT e.id, s.id, 'delivered', 1, now() FROM outbox.events e, (VALUES ({crm}), ({billing})) s(id);
             UPDATE outbox.deliveries SET status = (ARRAY['pending', 'failing', 'dead'])[1 + id % 3], delivered_at = NULL
              WHERE id % 2000 = 0;
             ANALYZE outbox.deliveries;"
        ))
        .await
        .expect("a large delivered history");
    let plan: Vec<String> = query(
        &db,
        "EXPLAIN SELECT name, pending, in_flight, failing, dead, delivered_last_24h,
                oldest_pending_age, last_success_at
           FROM outbox.subscription_health",
    )
    .await
    .iter()
    .map(|r| r.get(0))
    .collect();
    let plan = plan.join("\n");
    for whole_table in [
        "Seq Scan on deliveries",
        "deliveries_pkey",
        "deliveries_event_subscription_key",
    ] {
        assert!(
            !plan.contains(whole_table),
            "{whole_table} in the plan:\n{plan}"
        );
    }
    for index in ["deliveries_not_delivered_idx", "deliveries_delivered_idx"] {
        assert!(plan.contains(index), "{index} not used:\n{plan}");
    }
}
