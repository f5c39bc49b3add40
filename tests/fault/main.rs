//! Fault tests: several real relay processes (the binary, so `kill -9` is a real kill) on one
//! real PostgreSQL database, checked end to end against a real receiver and the database.
//!
//! A separate test binary from `tests/it`: cargo runs test binaries one after another, so
//! these heavy tests never compete with the integration tests for the machine. They run one
//! at a time: CI and the README say `cargo test --test fault -- --test-threads=1`, and each
//! test also holds [`one_at_a_time`], so a plain `cargo test` does the same. Deadlines are generous and
//! nothing asserts on speed; each test prints its figures (events, elapsed, duplicates) to
//! stderr, visible with `--nocapture` or when it fails.

// The integration tests' harness, shared rather than copied. Not every helper (nor every
// name it re-exports from testkit) is used here.
#[allow(dead_code, unused_imports)]
#[path = "../it/harness/mod.rs"]
mod harness;

mod many_relays;
mod ordered_under_failures;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use testkit::receiver::Receiver;

use harness::db::TestDb;
use harness::relay::RelayProcess;

/// Held for a whole fault test: the tests measure what several relays do under faults on a
/// small machine, so two at once would only starve each other into their deadlines.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits until no other fault test runs; hold the guard until the test ends.
pub async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().await
}

/// For the whole run of a test (thousands of webhooks on a shared 2-core machine); a
/// deadline, not an expectation.
pub const FAULT_DEADLINE: Duration = Duration::from_secs(300);

/// Inserts `total` events (`fault.tick`, payload `{"n": 1..=total}`) in `statements` INSERT
/// statements, as a producer batch job would.
pub async fn publish_numbered(db: &TestDb, total: i64, statements: i64) {
    let client = db.client().await;
    let per_statement = (total + statements - 1) / statements;
    let mut first = 1;
    while first <= total {
        let last = (first + per_statement - 1).min(total);
        client
            .execute(
                "INSERT INTO outbox.events (event_type, payload)
                 SELECT 'fault.tick', jsonb_build_object('n', n)
                   FROM generate_series($1::bigint, $2::bigint) n ORDER BY n",
                &[&first, &last],
            )
            .await
            .expect("publish events");
        first = last + 1;
    }
}

/// webhook-id → how many requests carried it.
pub fn arrivals(receiver: &Receiver, path: &str) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for request in receiver.received(path) {
        *seen
            .entry(request.header("webhook-id").unwrap_or("?").to_string())
            .or_default() += 1;
    }
    seen
}

/// Events received more than once, and how many extra requests that made.
pub fn duplicates(seen: &HashMap<String, usize>) -> (Vec<String>, usize) {
    let ids = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id.clone())
        .collect();
    (ids, seen.values().map(|n| n - 1).sum())
}

/// Every event_id in outbox.events.
pub async fn event_ids(db: &TestDb) -> HashSet<String> {
    db.client()
        .await
        .query("SELECT event_id::text FROM outbox.events", &[])
        .await
        .expect("read event ids")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// status → number of deliveries.
pub async fn status_counts(db: &TestDb) -> BTreeMap<String, i64> {
    db.client()
        .await
        .query(
            "SELECT status, count(*) FROM outbox.deliveries GROUP BY 1",
            &[],
        )
        .await
        .expect("count deliveries by status")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Deliveries leased to `relay_id` right now.
pub async fn leases_of(db: &TestDb, relay_id: &str) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'in_flight' AND lease_owner = $1",
            &[&relay_id],
        )
        .await
        .expect("count leases")
        .get(0)
}

/// Waits until `total` deliveries are `delivered`, checking on the way that every relay
/// process is still running. Returns, per lease owner seen on the way, the most deliveries
/// it held at once. On timeout, panics with where the deliveries are stuck.
pub async fn wait_until_all_delivered(
    db: &TestDb,
    total: i64,
    relays: &mut [&mut RelayProcess],
) -> BTreeMap<String, i64> {
    let until = tokio::time::Instant::now() + FAULT_DEADLINE;
    let mut most_held: BTreeMap<String, i64> = BTreeMap::new();
    loop {
        for relay in relays.iter_mut() {
            if let Ok(Some(status)) = relay.child.try_wait() {
                panic!("relay {} exited during the test: {status}", relay.relay_id);
            }
        }
        let client = db.client().await;
        for row in client
            .query(
                "SELECT lease_owner, count(*) FROM outbox.deliveries
                  WHERE status = 'in_flight' GROUP BY 1",
                &[],
            )
            .await
            .expect("sample lease owners")
        {
            let held = most_held
                .entry(row.get::<_, Option<String>>(0).unwrap_or_default())
                .or_default();
            *held = (*held).max(row.get(1));
        }
        drop(client);
        let statuses = status_counts(db).await;
        if statuses.get("delivered").copied().unwrap_or(0) >= total {
            return most_held;
        }
        if tokio::time::Instant::now() > until {
            let leases: Vec<(Option<String>, i64, f64)> = db
                .client()
                .await
                .query(
                    "SELECT lease_owner, count(*),
                            extract(epoch FROM min(lease_expires_at) - now())::float8
                       FROM outbox.deliveries WHERE status = 'in_flight' GROUP BY 1",
                    &[],
                )
                .await
                .expect("read leases")
                .iter()
                .map(|row| (row.get(0), row.get(1), row.get(2)))
                .collect();
            let undispatched: i64 = db
                .client()
                .await
                .query_one(
                    "SELECT count(*) FROM outbox.events WHERE dispatched_at IS NULL",
                    &[],
                )
                .await
                .expect("count undispatched")
                .get(0);
            panic!(
                "timed out after {FAULT_DEADLINE:?} waiting for {total} deliveries to be \
                 delivered: by status {statuses:?}; leases (owner, count, seconds to the \
                 earliest expiry) {leases:?}; undispatched events {undispatched}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Deadlocks PostgreSQL has broken in this test's database so far (it aborts one of the
/// transactions after `deadlock_timeout`). The statistics lag by up to a second, so a
/// deadlock at the very end could be missed, never invented.
pub async fn deadlocks(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
        .expect("read pg_stat_database")
        .get(0)
}

/// SIGTERM to each relay: after the faults, each still shuts down cleanly.
pub async fn stop_all(relays: &mut [&mut RelayProcess]) {
    for relay in relays.iter_mut() {
        let status = relay.terminate().await;
        assert_eq!(
            status.code(),
            Some(0),
            "relay {} did not exit cleanly: {status}",
            relay.relay_id
        );
    }
}
