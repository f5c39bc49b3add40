//! The relay's per-batch statements find their rows with plain index scans, never bitmap or
//! sequential scans (migration V15; V13 for the claim, whose test is in `leases.rs`).
//!
//! Every dispatched event leaves a dead entry in `events_undispatched_idx`, every finished
//! delivery one in `deliveries_in_flight_idx`, until VACUUM. A plain index scan marks them
//! dead as it meets them (once no snapshot anywhere in the cluster is older than their
//! removal), so later scans skip them; a bitmap scan never does, and read them all on every
//! batch. With the finished work below and no statistics, as on a busy table, the planner
//! picks a bitmap scan by itself for both statements: these tests need no planner settings.
//!
//! They check the plans rather than count what a batch reads: whether an entry can be
//! marked dead depends on every other transaction on the server, which the test suite
//! running in parallel keeps busy.

use crate::harness::db::TestDb;
use crate::harness::relay::*;

/// Work finished before the batch under test.
const FINISHED: i64 = 3000;
const OWNER: &str = "relay-under-test";

/// Panics when `plans` show a bitmap scan, a sequential scan of `table`, or JIT compilation
/// (turning sequential scans off makes the one left on the subscriptions look dear enough to
/// compile, which took 350 ms per statement).
fn assert_index_scans_only(plans: &str, table: &str) {
    assert!(!plans.contains("JIT:"), "a plan was JIT-compiled:\n{plans}");
    assert!(
        !plans.contains("Bitmap"),
        "a bitmap scan reads every dead entry it meets, every time:\n{plans}"
    );
    assert!(
        !plans.contains(&format!("Seq Scan on {table}")),
        "a sequential scan of {table}:\n{plans}"
    );
}

/// Whether a plan node updated `rows` rows of `table` (auto_explain's ANALYZE figures).
fn updated(plans: &str, table: &str, rows: i64) -> bool {
    plans.lines().any(|line| {
        line.contains(&format!("Update on {table}"))
            && line.contains(&format!("rows={rows} loops=1"))
    })
}

#[tokio::test]
async fn the_dispatcher_finds_due_events_without_bitmap_or_sequential_scans() {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO outbox.events (event_type, payload)
                  SELECT 'lead.created', '{{}}' FROM generate_series(1, {FINISHED});
             UPDATE outbox.events SET dispatched_at = now();
             INSERT INTO outbox.events (event_type, payload) VALUES ('lead.created', '{{}}');"
        ))
        .await
        .expect("dispatched events and one due");
    let plans = nested_plans(&db, "SELECT * FROM outbox.dispatch_events(500)").await;
    assert!(
        plans.contains("Index Scan using events_undispatched_idx"),
        "due events come from their partial index:\n{plans}"
    );
    assert!(
        updated(&plans, "events", 1),
        "the due event is dispatched:\n{plans}"
    );
    assert_index_scans_only(&plans, "events");
    // The glob match is inlined into the fan-out's plan: as a function call, each statement
    // set up and planned its body again (V15).
    assert!(
        !plans
            .lines()
            .any(|line| line.contains("Filter:") && line.contains("event_type_matches")),
        "outbox.event_type_matches is called, not inlined:\n{plans}"
    );
}

#[tokio::test]
async fn the_completer_finds_its_deliveries_without_bitmap_or_sequential_scans() {
    // Batches this large got the bitmap plan; a single result was looked up by its id.
    const BATCH: i64 = 10;
    let db = TestDb::new().await;
    let (subscription, _) = add_subscription(&db, "crm", "http://127.0.0.1:9/hook", &[]).await;
    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO outbox.events (event_type, payload, dispatched_at)
                  SELECT 'lead.created', '{{}}', now()
                    FROM generate_series(1, {FINISHED} + {BATCH});
             INSERT INTO outbox.deliveries (event_id, subscription_id, status, lease_owner,
                                            lease_expires_at, lease_token)
                  SELECT id, {subscription}, 'in_flight', '{OWNER}', now() + interval '1 minute', 1
                    FROM outbox.events;
             UPDATE outbox.deliveries
                SET status = 'delivered', attempts = 1, delivered_at = now(),
                    lease_owner = NULL, lease_expires_at = NULL, lease_token = NULL
              WHERE id <= {FINISHED};"
        ))
        .await
        .expect("finished deliveries and a batch in flight");
    // The batch of results as the completer sends it (src/db/sql.rs, COMPLETE_DELIVERIES).
    let completion = format!(
        "SELECT count(*) FROM outbox.complete_deliveries(
             array(SELECT generate_series({first}, {last})::bigint),
             array_fill('delivered'::text, ARRAY[{BATCH}]),
             array_fill(NULL::timestamptz, ARRAY[{BATCH}]),
             array_fill(200, ARRAY[{BATCH}]),
             array_fill(NULL::text, ARRAY[{BATCH}]),
             array_fill(NULL::text, ARRAY[{BATCH}]),
             array_fill(now(), ARRAY[{BATCH}]),
             array_fill(5, ARRAY[{BATCH}]),
             array_fill(false, ARRAY[{BATCH}]),
             array_fill(1::bigint, ARRAY[{BATCH}]),
             '{OWNER}')",
        first = FINISHED + 1,
        last = FINISHED + BATCH,
    );
    let plans = nested_plans(&db, &completion).await;
    assert!(
        updated(&plans, "deliveries", BATCH),
        "the batch is written:\n{plans}"
    );
    assert_index_scans_only(&plans, "deliveries");
}
