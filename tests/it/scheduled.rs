//! Events scheduled for later (deliver_after) cost the dispatcher nothing until they are due.

use crate::harness::db::TestDb;
use crate::harness::relay::{nested_plans, rows_read_in_transaction};

const SCHEDULED: i64 = 100_000;
const DUE: i64 = 10;

/// With 100 000 events scheduled for tomorrow ahead of 10 due ones, one dispatch round
/// dispatches them and reads no more than a handful of rows: it never walks the future
/// rows. Measured with the transaction's own statistics (rows and index entries read), and the
/// plan of the statement inside `outbox.dispatch_events` shown through auto_explain.
#[tokio::test]
async fn a_dispatch_round_does_not_walk_events_scheduled_for_later() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    client
        .batch_execute(&format!(
            "INSERT INTO outbox.events (event_type, payload, deliver_after)
             SELECT 'report.due', '{{}}', now() + interval '1 day' FROM generate_series(1, {SCHEDULED});
             INSERT INTO outbox.events (event_type, payload)
             SELECT 'lead.created', '{{}}' FROM generate_series(1, {DUE});
             INSERT INTO outbox.events (event_type, payload, created_at, deliver_after)
             VALUES ('reminder.due', '{{}}', now() - interval '1 hour', now() - interval '1 minute');
             ANALYZE outbox.events;"
        ))
        .await
        .expect("insert events");

    let transaction = client.transaction().await.expect("begin");
    let before = rows_read_in_transaction(&transaction, "outbox.events").await;
    let row = transaction
        .query_one("SELECT events FROM outbox.dispatch_events(500)", &[])
        .await
        .expect("dispatch");
    assert_eq!(
        row.get::<_, i64>(0),
        DUE + 1,
        "the due events and the scheduled one now due"
    );
    let rows_read = rows_read_in_transaction(&transaction, "outbox.events").await - before;
    assert!(
        rows_read < 100,
        "the round read {rows_read} rows or index entries of outbox.events; \
         it must not walk the {SCHEDULED} scheduled events"
    );
    transaction.rollback().await.expect("rollback");

    // The plan, for the record and as a second check: both kinds of due event come from
    // their own partial index, and no node filters out a pile of rows.
    let plans = nested_plans(&db, "SELECT * FROM outbox.dispatch_events(500)").await;
    println!("{plans}");
    assert!(
        plans.contains("events_scheduled_idx") && plans.contains("events_undispatched_idx"),
        "each kind of due event comes from its index:\n{plans}"
    );
    for line in plans.lines() {
        if let Some(removed) = line.trim().strip_prefix("Rows Removed by Filter: ") {
            let removed: i64 = removed.trim().parse().unwrap_or(i64::MAX);
            assert!(
                removed < 100,
                "a plan node filtered out {removed} rows:\n{plans}"
            );
        }
    }
}

/// An event whose producer set `created_at` in the future too (an import, say) is still held
/// until its `deliver_after`: it sits in the due-at-insert index, which alone would not say
/// it is not yet due.
#[tokio::test]
async fn an_event_with_a_future_created_at_waits_for_its_deliver_after() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO outbox.events (event_type, payload, created_at, deliver_after)
             VALUES ('import.row', '{}', now() + interval '1 hour', now() + interval '1 hour')",
        )
        .await
        .expect("insert");
    let dispatched: i64 = client
        .query_one("SELECT events FROM outbox.dispatch_events(500)", &[])
        .await
        .expect("dispatch")
        .get(0);
    assert_eq!(dispatched, 0, "not due for an hour");
}
