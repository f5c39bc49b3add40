//! The operator SQL surface: the views (V5), outbox.replay and outbox.backfill (V6), the
//! documented queries in sql/ (run through psql) and the least-privilege roles.
//!
//! Most tests set deliveries up directly with SQL and need no relay; the end-to-end test
//! runs one against a real receiver.

use std::path::PathBuf;
use std::time::Duration;

use outbox_relay::config::RelayConfig;
use outbox_relay::devkit::receiver::{Receiver, Reply};
use serde_json::{Value, json};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::harness::db::TestDb;
use crate::harness::relay::*;

/// A URL nothing listens on: no relay runs in the fixture tests.
const NOWHERE: &str = "http://127.0.0.1:9/hook";

async fn subscription(db: &TestDb, name: &str) -> i64 {
    add_subscription(db, name, NOWHERE, &[]).await.0
}

/// Inserts a dispatched event created `age` ago (an interval literal); returns (row id, event_id).
async fn event(db: &TestDb, event_type: &str, tenant: Option<&str>, age: &str) -> (i64, Uuid) {
    let row = db
        .client()
        .await
        .query_one(
            "INSERT INTO outbox.events (event_type, payload, tenant_id, created_at, dispatched_at)
             VALUES ($1, '{}', $2, now() - $3::text::interval, now())
             RETURNING id, event_id",
            &[&event_type, &tenant, &age],
        )
        .await
        .expect("insert event");
    (row.get(0), row.get(1))
}

/// Inserts a delivery in the given status, with what the relay would have left on such a
/// row (last error for failing/dead, a lease for in_flight, delivered_at for delivered).
async fn delivery(db: &TestDb, event_row: i64, subscription_id: i64, status: &str) -> i64 {
    db.client()
        .await
        .query_one(
            "INSERT INTO outbox.deliveries
                 (event_id, subscription_id, status, attempts, last_status_code, last_error,
                  lease_owner, lease_expires_at, delivered_at, next_attempt_at)
             VALUES ($1, $2, $3::text,
                     CASE WHEN $3::text IN ('pending', 'in_flight') THEN 0 ELSE 3 END,
                     CASE WHEN $3::text IN ('failing', 'dead') THEN 500 END,
                     CASE WHEN $3::text IN ('failing', 'dead') THEN 'HTTP 500 Internal Server Error' END,
                     CASE WHEN $3::text = 'in_flight' THEN 'relay-1' END,
                     CASE WHEN $3::text = 'in_flight' THEN now() + interval '1 hour' END,
                     CASE WHEN $3::text = 'delivered' THEN now() END,
                     now() + interval '1 hour')
             RETURNING id",
            &[&event_row, &subscription_id, &status],
        )
        .await
        .unwrap_or_else(|e| panic!("insert {status} delivery: {e}"))
        .get(0)
}

async fn query(db: &TestDb, sql: &str) -> Vec<Row> {
    db.client()
        .await
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// `SELECT replay_id, matched FROM <call>`, where call is e.g. `outbox.replay(dry_run => true)`.
async fn call(db: &TestDb, call: &str) -> Result<(i64, i64), tokio_postgres::Error> {
    let row = db
        .client()
        .await
        .query_one(&format!("SELECT replay_id, matched FROM {call}"), &[])
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// (SQLSTATE, message, hint) of a database error.
fn db_error(error: &tokio_postgres::Error) -> (String, String, String) {
    let db = error
        .as_db_error()
        .unwrap_or_else(|| panic!("not a database error: {error}"));
    (
        db.code().code().to_string(),
        db.message().to_string(),
        db.hint().unwrap_or_default().to_string(),
    )
}

/// Ids of the deliveries a replay with these arguments re-queues, found by running it in a
/// transaction that is then rolled back, so one fixture serves many criteria. A dry run
/// with the same arguments must count exactly as many.
async fn requeued_by(db: &TestDb, args: &str) -> Vec<i64> {
    let mut client = db.client().await;
    let tx = client.transaction().await.expect("begin");
    let dry_args = if args.is_empty() {
        "dry_run => true".to_string()
    } else {
        format!("{args}, dry_run => true")
    };
    let counted: i64 = tx
        .query_one(
            &format!("SELECT matched FROM outbox.replay({dry_args})"),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("outbox.replay({dry_args}): {e}"))
        .get(0);
    let row = tx
        .query_one(
            &format!("SELECT replay_id, matched FROM outbox.replay({args})"),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("outbox.replay({args}): {e}"));
    let (replay_id, matched): (i64, i64) = (row.get(0), row.get(1));
    let ids: Vec<i64> = tx
        .query(
            "SELECT id FROM outbox.deliveries WHERE replay_id = $1 ORDER BY id",
            &[&replay_id],
        )
        .await
        .expect("read re-queued")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        matched,
        ids.len() as i64,
        "matched must count what was re-queued ({args})"
    );
    assert_eq!(counted, matched, "the dry run counted otherwise ({args})");
    tx.rollback().await.expect("rollback");
    ids
}

/// Runs a file of sql/ through psql with ON_ERROR_STOP; returns its output, panicking with
/// stderr when psql fails.
async fn psql(db: &TestDb, file: &str, vars: &[(&str, &str)]) -> String {
    psql_with(db, file, vars, &[]).await
}

async fn psql_with(db: &TestDb, file: &str, vars: &[(&str, &str)], args: &[&str]) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("sql")
        .join(file);
    let mut command = tokio::process::Command::new("psql");
    command
        .arg(&db.url)
        .args(["--no-psqlrc", "-v", "ON_ERROR_STOP=1"])
        .args(args);
    for (name, value) in vars {
        command.arg("-v").arg(format!("{name}={value}"));
    }
    let output = command
        .arg("-f")
        .arg(&path)
        .output()
        .await
        .expect("run psql (is it installed?)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "psql -f {} failed ({}):\n{}\n{stdout}",
        path.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Field separator of [`recipe`]'s unaligned output: nothing in the fixtures contains it.
const FIELD_SEPARATOR: char = '\u{1f}';

/// One result table of a sql/ recipe: the `\echo '== …'` heading printed before it, its
/// column names and its rows, as psql prints the values (NULL as an empty string).
#[derive(Debug)]
struct RecipeTable {
    heading: String,
    columns: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl RecipeTable {
    /// The rows with only the named columns, in that order (times and ages left out).
    fn select(&self, names: &[&str]) -> Vec<Vec<String>> {
        let positions: Vec<usize> = names
            .iter()
            .map(|name| {
                self.columns
                    .iter()
                    .position(|column| column == name)
                    .unwrap_or_else(|| panic!("no column {name} in {self:?}"))
            })
            .collect();
        self.rows
            .iter()
            .map(|row| positions.iter().map(|&i| row[i].clone()).collect())
            .collect()
    }

    /// [`Self::select`], sorted: for recipes whose ORDER BY leaves ties.
    fn select_sorted(&self, names: &[&str]) -> Vec<Vec<String>> {
        let mut rows = self.select(names);
        rows.sort();
        rows
    }
}

/// Runs a recipe of sql/ and splits its output into the tables it printed, so tests assert
/// on the query results, not on headings that print whatever the data.
async fn recipe(db: &TestDb, file: &str, vars: &[(&str, &str)]) -> Vec<RecipeTable> {
    let separator = format!("--field-separator={FIELD_SEPARATOR}");
    let out = psql_with(
        db,
        file,
        vars,
        &["--quiet", "--no-align", &separator, "--pset=footer=off"],
    )
    .await;
    let mut tables: Vec<RecipeTable> = Vec::new();
    for line in out.lines() {
        if let Some(heading) = line.strip_prefix("== ") {
            tables.push(RecipeTable {
                heading: heading.to_string(),
                columns: Vec::new(),
                rows: Vec::new(),
            });
            continue;
        }
        let table = tables
            .last_mut()
            .unwrap_or_else(|| panic!("{file}: output before any heading:\n{out}"));
        let fields: Vec<String> = line.split(FIELD_SEPARATOR).map(str::to_string).collect();
        if table.columns.is_empty() {
            table.columns = fields;
        } else {
            assert_eq!(
                fields.len(),
                table.columns.len(),
                "{file}: a value holds a line break or the separator:\n{out}"
            );
            table.rows.push(fields);
        }
    }
    tables
}

/// Rows of strings from literals, for comparing with [`RecipeTable::select`].
fn rows<const N: usize>(rows: &[[&str; N]]) -> Vec<Vec<String>> {
    rows.iter()
        .map(|row| row.iter().map(|v| v.to_string()).collect())
        .collect()
}

// ---------------------------------------------------------------------------------------
// Views
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// sql/*.sql through psql
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// outbox.replay
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// outbox.backfill
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// End to end
// ---------------------------------------------------------------------------------------

/// dead → outbox.replay → delivered, with the same webhook-id and body bytes, an attempt
/// row carrying the replay id, and the replay recorded with matched = 1.
#[tokio::test]
async fn a_dead_delivery_replayed_after_the_subscriber_is_fixed_is_delivered_unchanged() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver");
    receiver.set_default("/hook", Reply::Status(500));
    add_subscription(
        &db,
        "x",
        &receiver.url("/hook"),
        &[("retry_schedule", "'{}'")],
    )
    .await;
    let relay = spawn_default_relay(&db).await;
    let event_id = publish(
        &db,
        "lead.created",
        json!({"lead_id": 42, "amount": 12.50, "name": "Ada"}),
    )
    .await;
    wait_for_statuses(&db, "dead", 1).await;

    receiver.set_default("/hook", Reply::Status(200));
    let row = db
        .client()
        .await
        .query_one(
            "SELECT * FROM outbox.replay(subscription => 'x', reason => 'fixed')",
            &[],
        )
        .await
        .expect("replay");
    let (replay_id, matched): (i64, i64) = (row.get("replay_id"), row.get("matched"));
    assert_eq!(matched, 1);
    wait_for_statuses(&db, "delivered", 1).await;

    let received = receiver
        .wait_for("/hook", 2, DEADLINE)
        .await
        .expect("original and replayed request");
    assert_eq!(received.len(), 2, "exactly one replayed request");
    let (original, replayed) = (&received[0], &received[1]);
    assert_eq!(
        original.header("webhook-id"),
        Some(event_id.to_string().as_str())
    );
    assert_eq!(replayed.header("webhook-id"), original.header("webhook-id"));
    assert_eq!(replayed.body, original.body, "body bytes differ");

    let attempts: Vec<(i32, Option<i32>, Option<i64>)> = query(
        &db,
        "SELECT attempt, status_code, replay_id FROM outbox.delivery_attempts ORDER BY id",
    )
    .await
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect();
    assert_eq!(
        attempts,
        vec![(1, Some(500), None), (1, Some(200), Some(replay_id))]
    );
    let row = &query(
        &db,
        &format!("SELECT matched, reason, dry_run FROM outbox.replays WHERE id = {replay_id}"),
    )
    .await[0];
    assert_eq!(row.get::<_, i64>(0), 1);
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("fixed"));
    assert!(!row.get::<_, bool>(2));
    relay.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Roles
// ---------------------------------------------------------------------------------------

/// Runs the statements as `role` (SET LOCAL ROLE) in one transaction that is rolled back;
/// returns the rows of the last one.
async fn as_role(
    db: &TestDb,
    role: &str,
    statements: &[&str],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let mut client = db.client().await;
    let tx = client.transaction().await.expect("begin");
    tx.batch_execute(&format!("SET LOCAL ROLE {role}"))
        .await
        .expect("set role");
    let mut rows = Vec::new();
    for statement in statements {
        rows = tx.query(*statement, &[]).await?;
    }
    tx.rollback().await.expect("rollback");
    Ok(rows)
}

async fn allowed_steps(db: &TestDb, role: &str, statements: &[&str]) -> Vec<Row> {
    as_role(db, role, statements)
        .await
        .unwrap_or_else(|e| panic!("{role} should be allowed to run {statements:?}: {e:?}"))
}

async fn allowed(db: &TestDb, role: &str, sql: &str) -> Vec<Row> {
    allowed_steps(db, role, &[sql]).await
}

async fn denied(db: &TestDb, role: &str, sql: &str) {
    match as_role(db, role, &[sql]).await {
        Ok(_) => panic!("{role} should not be allowed to run {sql}"),
        Err(error) => assert_eq!(
            db_error(&error).0,
            "42501",
            "{role} running {sql}: expected insufficient_privilege, got {error:?}"
        ),
    }
}

/// sql/roles.sql is idempotent and safe to run concurrently (roles are cluster-wide and
/// other test runs may create them at the same moment); each role can do its job and
/// nothing beyond it.
#[tokio::test]
async fn least_privilege_roles_allow_each_job_and_nothing_more() {
    let db = TestDb::new().await;
    let crm = subscription(&db, "crm").await;
    let (e, _) = event(&db, "lead.created", None, "1 minute").await;
    delivery(&db, e, crm, "dead").await;
    let (pending_event, _) = event(&db, "lead.created", None, "1 minute").await;
    let pending = delivery(&db, pending_event, crm, "pending").await;
    db.client()
        .await
        .execute(
            "UPDATE outbox.deliveries SET next_attempt_at = now() WHERE id = $1",
            &[&pending],
        )
        .await
        .expect("make it due");

    let (first, second) = tokio::join!(psql(&db, "roles.sql", &[]), psql(&db, "roles.sql", &[]));
    let out = psql(&db, "roles.sql", &[]).await;
    assert_eq!(first, out, "a second run changes nothing");
    assert_eq!(second, out);
    assert!(out.contains("outbox_producer"), "{out}");

    // Producers write events and read back nothing but their ids.
    let p = "outbox_producer";
    let rows = allowed(
        &db,
        p,
        "INSERT INTO outbox.events (event_type, payload) VALUES ('lead.created', '{}') RETURNING event_id",
    )
    .await;
    assert_eq!(rows.len(), 1);
    allowed(
        &db,
        p,
        "SELECT outbox.publish('lead.created', '{}', tenant_id => 'acme')",
    )
    .await;
    denied(&db, p, "SELECT name FROM outbox.subscriptions").await;
    denied(&db, p, "SELECT secret FROM outbox.subscriptions").await;
    denied(&db, p, "SELECT payload FROM outbox.events").await;
    denied(&db, p, "SELECT count(*) FROM outbox.deliveries").await;
    denied(&db, p, "SELECT * FROM outbox.replay(dry_run => true)").await;

    // Operators read everything but secrets and replay through the function only.
    let o = "outbox_operator";
    allowed(&db, o, "SELECT * FROM outbox.deliveries").await;
    allowed(&db, o, "SELECT * FROM outbox.delivery_attempts").await;
    allowed(&db, o, "SELECT * FROM outbox.failed_deliveries").await;
    allowed(&db, o, "SELECT * FROM outbox.subscription_health").await;
    allowed(
        &db,
        o,
        "SELECT name, url, event_types, enabled FROM outbox.subscriptions",
    )
    .await;
    denied(&db, o, "SELECT secret FROM outbox.subscriptions").await;
    denied(&db, o, "SELECT previous_secret FROM outbox.subscriptions").await;
    denied(&db, o, "SELECT * FROM outbox.subscriptions").await;
    denied(&db, o, "UPDATE outbox.deliveries SET status = 'pending'").await;
    denied(
        &db,
        o,
        "INSERT INTO outbox.events (event_type, payload) VALUES ('x', '{}')",
    )
    .await;
    allowed(
        &db,
        o,
        "UPDATE outbox.subscriptions SET enabled = true, disabled_reason = NULL WHERE name = 'crm'",
    )
    .await;
    let rows = allowed_steps(
        &db,
        o,
        &[
            "SELECT * FROM outbox.replay(reason => 'operator')",
            "SELECT r.matched, r.requested_by,
                    (SELECT count(*) FROM outbox.deliveries WHERE status = 'pending')
               FROM outbox.replays r",
        ],
    )
    .await;
    assert_eq!(
        rows[0].get::<_, i64>(0),
        1,
        "the operator's replay re-queued the dead delivery"
    );
    assert_eq!(
        rows[0].get::<_, String>(1),
        "outbox_operator",
        "requested_by is the caller"
    );
    assert_eq!(rows[0].get::<_, i64>(2), 2);
    allowed(&db, o, "SELECT * FROM outbox.backfill('crm', '-infinity')").await;

    // The relay claims, completes and records; it does not change the schema.
    let r = "outbox_relay";
    let claim = format!(
        "SELECT count(*) FROM outbox.claim_deliveries(ARRAY[{crm}::bigint], ARRAY[10], 10, 'relay-test', interval '10 seconds', 1)"
    );
    let rows = allowed_steps(
        &db,
        r,
        &[
            &claim,
            "UPDATE outbox.deliveries
                SET status = 'delivered', attempts = attempts + 1, delivered_at = now(),
                    lease_owner = NULL, lease_expires_at = NULL
              WHERE lease_owner = 'relay-test'",
            "INSERT INTO outbox.delivery_attempts (delivery_id, attempt, started_at, duration_ms, status_code)
             SELECT id, 1, now(), 1, 200 FROM outbox.deliveries WHERE status = 'delivered' RETURNING 1",
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'",
        ],
    )
    .await;
    assert_eq!(
        rows[0].get::<_, i64>(0),
        1,
        "the due pending delivery was claimed"
    );
    allowed(
        &db,
        r,
        "UPDATE outbox.events SET dispatched_at = now() WHERE dispatched_at IS NULL",
    )
    .await;
    allowed(&db, r, "SELECT * FROM outbox.dispatch_ordered(100)").await;
    allowed(&db, r, "SELECT outbox.start_ordered_probe()").await;
    allowed(&db, r, "SELECT * FROM outbox.replay(dry_run => true)").await;
    denied(
        &db,
        r,
        "INSERT INTO outbox.replays (criteria) VALUES ('{}')",
    )
    .await;
    allowed(&db, r, "SELECT secret FROM outbox.subscriptions").await;
    denied(&db, r, "CREATE TABLE outbox.not_allowed (id int)").await;
    // Retention deletes events; their deliveries and attempts go by cascade, and nothing
    // else of the history can be deleted or rewritten.
    let rows = allowed_steps(
        &db,
        r,
        &[
            "DELETE FROM outbox.events",
            "SELECT (SELECT count(*) FROM outbox.deliveries) + (SELECT count(*) FROM outbox.delivery_attempts)",
        ],
    )
    .await;
    assert_eq!(
        rows[0].get::<_, i64>(0),
        0,
        "deliveries and attempts went with their events"
    );
    // The admin API and the `subscription` CLI: manage subscriptions (removing one ends its
    // open deliveries through a trigger that runs with the relay's column grants), publish,
    // read the history.
    let rows = allowed_steps(
        &db,
        r,
        &[
            "INSERT INTO outbox.subscriptions (name, url) VALUES ('new-one', 'https://example.com/hook')",
            "UPDATE outbox.subscriptions SET max_in_flight = 3 WHERE name = 'new-one'",
            "DELETE FROM outbox.subscriptions WHERE name = 'crm'",
            "INSERT INTO outbox.events (event_type, payload) VALUES ('lead.created', '{}')",
            "SELECT outbox.max_payload_bytes()",
            "SELECT count(*) FROM outbox.replays",
            "SELECT count(*) FROM outbox.schema_history",
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'dead' AND last_error LIKE '%was removed'",
        ],
    )
    .await;
    assert_eq!(
        rows[0].get::<_, i64>(0),
        1,
        "removing a subscription ended its pending delivery"
    );
    denied(&db, r, "DELETE FROM outbox.deliveries").await;
    denied(&db, r, "DELETE FROM outbox.delivery_attempts").await;
    denied(&db, r, "UPDATE outbox.delivery_attempts SET error = 'x'").await;
    denied(&db, r, "UPDATE outbox.events SET payload = '{}'").await;
    denied(&db, r, "UPDATE outbox.deliveries SET event_id = event_id").await;
    denied(&db, r, "DELETE FROM outbox.replays").await;
    denied(&db, r, "DELETE FROM outbox.schema_history").await;
    denied(&db, r, "SELECT * FROM outbox.failed_deliveries").await;
    denied(&db, r, "SELECT * FROM outbox.backfill('crm', '-infinity')").await;
}

/// A LOGIN user that is a member of `outbox_relay` and nothing else, dropped on `Drop` (roles
/// are cluster-wide; the name is unique so parallel test runs never share one).
struct RelayLogin {
    name: String,
    admin_url: String,
}

impl RelayLogin {
    async fn create(db: &TestDb) -> RelayLogin {
        let name = format!(
            "outbox_test_relay_{}",
            &Uuid::new_v4().simple().to_string()[..12]
        );
        db.client()
            .await
            .batch_execute(&format!(
                "CREATE ROLE {name} LOGIN PASSWORD 'relay-test' IN ROLE outbox_relay"
            ))
            .await
            .expect("create the relay login");
        RelayLogin {
            name,
            admin_url: db.server_admin_url(),
        }
    }

    /// The test database's URL, logged in as this user instead.
    fn url(&self, db: &TestDb) -> String {
        with_params(&db.url, &[("user", &self.name), ("password", "relay-test")])
    }
}

impl Drop for RelayLogin {
    fn drop(&mut self) {
        let (name, url) = (self.name.clone(), self.admin_url.clone());
        // Drop runs inside the test's runtime: do the blocking cleanup on a thread of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(async move {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP ROLE IF EXISTS {name}"))
                    .await
                    .map_err(|e| e.to_string())
            })
        })
        .join();
        if let Ok(Err(error)) = dropped {
            eprintln!("could not drop test role {}: {error}", self.name);
        }
    }
}

/// The README's promise for `outbox_relay`: a real relay logged in as a member of that role
/// only delivers, retries, dead-letters, disables on 410, reclaims an expired lease, heartbeats,
/// runs ordered fan-out and purges old finished events with retention on, without a single
/// database error.
#[tokio::test]
async fn a_relay_logged_in_with_the_relay_role_only_does_all_its_work_including_retention() {
    let db = TestDb::new().await;
    psql(&db, "roles.sql", &[]).await;
    let login = RelayLogin::create(&db).await;
    let relay_url = login.url(&db);
    let membership = count(
        &db,
        &format!(
            "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member
              WHERE r.rolname = '{}'",
            login.name
        ),
    )
    .await;
    assert_eq!(membership, 1, "member of outbox_relay only");

    let receiver = Receiver::start().await.expect("receiver");
    receiver.queue("/flaky", [Reply::Status(500)]);
    receiver.set_default("/broken", Reply::Status(500));
    receiver.set_default("/gone", Reply::Status(410));
    // Longer than a heartbeat interval, so the lease is renewed while it is in flight.
    receiver.set_default("/slow", Reply::Delay(Duration::from_secs(1), 200));
    let fast_retry = [("retry_schedule", "'{0 seconds}'")];
    let ok = add_subscription(
        &db,
        "ok",
        &receiver.url("/ok"),
        &[("event_types", "'{ok.*}'")],
    )
    .await
    .0;
    for (name, columns) in [
        ("flaky", "flaky.*"),
        ("broken", "broken.*"),
        ("gone", "gone.*"),
        ("slow", "slow.*"),
    ] {
        let mut all = vec![("event_types", format!("'{{{columns}}}'"))];
        all.extend(fast_retry.iter().map(|(c, v)| (*c, v.to_string())));
        let all: Vec<(&str, &str)> = all.iter().map(|(c, v)| (*c, v.as_str())).collect();
        add_subscription(&db, name, &receiver.url(&format!("/{name}")), &all).await;
    }
    add_subscription(
        &db,
        "ordered",
        &receiver.url("/ordered"),
        &[("event_types", "'{order.*}'"), ("ordered", "true")],
    )
    .await;
    for (event_type, payload) in [
        ("ok.created", json!({ "n": 1 })),
        ("flaky.created", json!({ "n": 2 })),
        ("broken.created", json!({ "n": 3 })),
        ("gone.created", json!({ "n": 4 })),
        ("slow.created", json!({ "n": 5 })),
    ] {
        publish(&db, event_type, payload).await;
    }
    db.client()
        .await
        .batch_execute(
            "INSERT INTO outbox.events (event_type, payload, ordering_key)
             SELECT 'order.placed', jsonb_build_object('seq', n), 'key-1' FROM generate_series(1, 3) n",
        )
        .await
        .expect("ordered events");
    // A delivery a dead relay left in flight: its lease expired, so it must be reclaimed.
    let (orphan_event, _) = event(&db, "ok.orphaned", None, "1 minute").await;
    db.client()
        .await
        .execute(
            "INSERT INTO outbox.deliveries (event_id, subscription_id, status, lease_owner, lease_expires_at)
             VALUES ($1, $2, 'in_flight', 'a-dead-relay', now() - interval '1 second')",
            &[&orphan_event, &ok],
        )
        .await
        .expect("orphaned delivery");

    let relay = spawn_relay_at(&relay_url, RelayConfig::for_tests()).await;
    wait_until_ready("the relay-role relay is ready", &relay.health).await;
    // ok, flaky, slow, 3 ordered and the orphan once reclaimed; broken after its retry; gone
    // failed once, and waits: its 410 disabled the subscription.
    wait_for_statuses(&db, "delivered", 7).await;
    wait_for_statuses(&db, "dead", 1).await;
    wait_for_statuses(&db, "failing", 1).await;
    wait_until(
        "everything is dispatched and passed by ordered fan-out",
        DEADLINE,
        || async {
            count(
                &db,
                "SELECT count(*) FROM outbox.events
              WHERE dispatched_at IS NULL
                 OR id > (SELECT last_event_id FROM outbox.ordered_dispatch_cursor)",
            )
            .await
                == 0
        },
    )
    .await;
    let errors = db_errors(&relay);
    let session_user = count(
        &db,
        &format!(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND usename = '{}'",
            login.name
        ),
    )
    .await;
    relay.shutdown().await;
    assert_eq!(
        errors, 0,
        "database errors while delivering as the relay role"
    );
    assert!(
        session_user > 0,
        "the relay was logged in as the relay login"
    );
    let by_status: Vec<(String, String, i32)> = db
        .client()
        .await
        .query(
            "SELECT s.name, d.status, d.attempts FROM outbox.deliveries d
               JOIN outbox.subscriptions s ON s.id = d.subscription_id
              ORDER BY d.id",
            &[],
        )
        .await
        .expect("deliveries")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let of = |name: &str| -> Vec<(String, i32)> {
        by_status
            .iter()
            .filter(|(s, _, _)| s == name)
            .map(|(_, status, attempts)| (status.clone(), *attempts))
            .collect()
    };
    assert_eq!(of("flaky"), [("delivered".to_string(), 2)], "retried");
    assert_eq!(of("broken"), [("dead".to_string(), 2)], "dead-lettered");
    assert_eq!(of("gone"), [("failing".to_string(), 1)]);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.subscriptions WHERE name = 'gone' AND NOT enabled"
        )
        .await,
        1,
        "a 410 disables the subscription"
    );
    assert_eq!(
        of("ordered"),
        vec![("delivered".to_string(), 1); 3],
        "ordered fan-out and key advance"
    );
    assert!(
        of("ok").iter().all(|(status, _)| status == "delivered") && of("ok").len() == 2,
        "the orphaned delivery was reclaimed and delivered: {:?}",
        of("ok")
    );
    let attempts = count(&db, "SELECT count(*) FROM outbox.delivery_attempts").await;
    assert!(attempts >= 3, "failed attempts were recorded ({attempts})");

    // Age everything past retention but one recent finished event, and let a relay with
    // retention on purge as the relay role: all but that one and the open delivery's event.
    db.client()
        .await
        .batch_execute(
            "UPDATE outbox.events SET created_at = now() - interval '2 days'
              WHERE event_type <> 'slow.created'",
        )
        .await
        .expect("age events");
    let relay = spawn_relay_at(
        &relay_url,
        RelayConfig {
            retention: Some(Duration::from_secs(3600)),
            ..RelayConfig::for_tests()
        },
    )
    .await;
    wait_until("old finished events are purged", DEADLINE, || async {
        let errors = db_errors(&relay);
        assert_eq!(errors, 0, "database errors while purging as the relay role");
        count(&db, "SELECT count(*) FROM outbox.events").await == 2
    })
    .await;
    let purged = relay.metrics.events_purged.get();
    let errors = db_errors(&relay);
    relay.shutdown().await;
    assert_eq!(errors, 0, "database errors while purging as the relay role");
    assert_eq!(
        purged, 7,
        "every old finished event was purged by this relay"
    );
    let left: Vec<String> = db
        .client()
        .await
        .query("SELECT event_type FROM outbox.events ORDER BY id", &[])
        .await
        .expect("events left")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        left,
        ["gone.created", "slow.created"],
        "the open delivery's event and the recent one stay"
    );
    assert_eq!(
        count(
            &db,
            "SELECT (SELECT count(*) FROM outbox.deliveries) * 1000 + (SELECT count(*) FROM outbox.delivery_attempts)"
        )
        .await,
        2001,
        "the purged events' deliveries and attempts went with them; the two left keep theirs"
    );
}
