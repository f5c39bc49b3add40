//! The operator SQL surface: the views (V5), outbox.replay and outbox.backfill (V6), the
//! documented queries in sql/ (run through psql) and the least-privilege roles.
//!
//! Most tests set deliveries up directly with SQL and need no relay; the end-to-end test
//! runs one against a real receiver.

mod backfill;
mod end_to_end;
mod recipes;
mod replay;
mod roles;
mod views;

use std::path::PathBuf;
use std::time::Duration;

use outbox_relay::config::RelayConfig;
use serde_json::{Value, json};
use testkit::receiver::{Receiver, Reply};
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
