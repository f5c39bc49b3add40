//! Running relays in tests (in-process, or the real binary for kill -9), plus the small
//! SQL helpers most tests share.

use std::future::Future;
use std::process::Stdio;
use std::time::Duration;

use outbox_relay::config::RelayConfig;
use outbox_relay::relay::RelayHandle;
use testkit::receiver::{Receiver, Reply};
use uuid::Uuid;

use super::db::TestDb;

// Shared with the benchmark, which names relay processes' sessions the same way.
pub use testkit::pg::with_params;
pub use testkit::relay::{db_errors, process_application_name};

/// Generous: these are deadlines for things that normally take milliseconds, on a shared
/// machine. Nothing asserts on how fast anything was.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub async fn spawn_relay(db: &TestDb, config: RelayConfig) -> RelayHandle {
    spawn_relay_at(&db.url, config).await
}

/// A database URL at a loopback port nothing listens on: a database that is not there.
pub fn unreachable_database_url() -> String {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let addr = closed.local_addr().expect("the free port's address");
    // Dropped at once: the port is free again, so connecting there is refused.
    drop(closed);
    format!("postgres://postgres@{addr}/nowhere")
}

/// A relay connecting with its own URL (another user, a pooler, a database that is not
/// there) rather than to a test database: it starts whether or not the database answers.
pub async fn spawn_relay_at(database_url: &str, config: RelayConfig) -> RelayHandle {
    match testkit::relay::start(config, database_url).await {
        Ok(relay) => relay,
        Err(error) => panic!("relay does not start: {error:#}"),
    }
}

pub async fn spawn_default_relay(db: &TestDb) -> RelayHandle {
    spawn_relay(db, RelayConfig::for_tests()).await
}

/// Polls `condition` until it holds; panics with `what` after the deadline.
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + deadline;
    while !condition().await {
        if tokio::time::Instant::now() > until {
            panic!("timed out after {deadline:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the relay reports ready; on timeout, panics naming the checks that failed.
pub async fn wait_until_ready(what: &str, health: &outbox_relay::health::Health) {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let readiness = health.readiness();
        if readiness.ready {
            return;
        }
        if tokio::time::Instant::now() > until {
            panic!(
                "timed out after {DEADLINE:?} waiting until {what}; failed: {:?}",
                readiness.failed
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Inserts a subscription with the given extra column assignments (SQL fragments such as
/// `event_types => '{lead.*}'` are not supported; pass `("event_types", "'{lead.*}'")`).
/// Returns (id, secret).
pub async fn add_subscription(
    db: &TestDb,
    name: &str,
    url: &str,
    columns: &[(&str, &str)],
) -> (i64, String) {
    let client = db.client().await;
    match testkit::outbox::add_subscription(&client, name, url, columns).await {
        Ok(added) => added,
        Err(error) => panic!("{error:#}"),
    }
}

/// A fresh database and a receiver with one subscription, `name`, to its `path`: how most
/// delivery tests begin. Set the receiver's replies before starting a relay.
pub async fn db_with_subscriber(
    name: &str,
    path: &str,
    columns: &[(&str, &str)],
) -> (TestDb, Receiver) {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver");
    add_subscription(&db, name, &receiver.url(path), columns).await;
    (db, receiver)
}

/// A receiver with two subscriptions to it: `crm` (answers 200 at `/ok`) and `broken`
/// (500 at `/broken`, retried once after 100 ms, then dead): every delivery outcome in a
/// few hundred milliseconds.
pub async fn ok_and_broken_subscribers(db: &TestDb) -> Receiver {
    let receiver = Receiver::start().await.expect("receiver");
    receiver.set_default("/broken", Reply::Status(500));
    add_subscription(db, "crm", &receiver.url("/ok"), &[]).await;
    add_subscription(
        db,
        "broken",
        &receiver.url("/broken"),
        &[("retry_schedule", "'{100 milliseconds}'")],
    )
    .await;
    receiver
}

pub async fn publish(db: &TestDb, event_type: &str, payload: serde_json::Value) -> Uuid {
    db.client()
        .await
        .query_one("SELECT outbox.publish($1, $2)", &[&event_type, &payload])
        .await
        .expect("publish")
        .get(0)
}

/// Waits until the relay process `relay_id` has at least one pooled connection open, and
/// `listen_sessions` LISTEN connections are open (one per relay): after a cut, every relay
/// has reconnected, not just any.
#[allow(dead_code, reason = "used by tests/fault, which shares this harness")]
pub async fn wait_for_sessions_of(db: &TestDb, relay_ids: &[&str]) {
    for relay_id in relay_ids {
        let sql = format!(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND application_name = '{}'",
            process_application_name(relay_id)
        );
        wait_until(
            &format!("relay {relay_id} has reconnected its pool"),
            DEADLINE,
            || async { count(db, &sql).await >= 1 },
        )
        .await;
    }
    let wanted = relay_ids.len() as i64;
    wait_until(
        &format!("{wanted} LISTEN sessions (one per relay) are connected"),
        DEADLINE,
        || async {
            count(
                db,
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND application_name = 'outbox-relay-listen'",
            )
            .await
                >= wanted
        },
    )
    .await;
}

/// Waits until at least `sessions` relay connections (pool or LISTEN) are open on the test
/// database. Relays reconnect lazily after a cut, so a test cutting again must wait first.
/// Counts the sessions of every relay: with several relays, use [`wait_for_sessions_of`].
pub async fn wait_for_relay_sessions(db: &TestDb, sessions: i64) {
    wait_until(
        &format!("{sessions} relay sessions are connected"),
        DEADLINE,
        || async { count(db, RELAY_SESSIONS).await >= sessions },
    )
    .await;
}

/// Relay connections (pool or LISTEN) open on the test database.
const RELAY_SESSIONS: &str = "SELECT count(*) FROM pg_stat_activity
                               WHERE datname = current_database()
                                 AND application_name LIKE 'outbox-relay%'";

/// Per ordering key, the payloads' `seq` numbers in event (id) order.
pub async fn sequences_by_key(db: &TestDb) -> std::collections::BTreeMap<String, Vec<i64>> {
    let rows = db
        .client()
        .await
        .query(
            "SELECT ordering_key, (payload->>'seq')::bigint FROM outbox.events ORDER BY id",
            &[],
        )
        .await
        .expect("read events");
    let mut by_key = std::collections::BTreeMap::<String, Vec<i64>>::new();
    for row in rows {
        by_key.entry(row.get(0)).or_default().push(row.get(1));
    }
    by_key
}

/// Runs one SQL statement returning a single bigint (counts in assertions).
pub async fn count(db: &TestDb, sql: &str) -> i64 {
    db.client()
        .await
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// (status, attempts) of every delivery, in id order.
pub async fn deliveries(db: &TestDb) -> Vec<(String, i32)> {
    db.client()
        .await
        .query(
            "SELECT status, attempts FROM outbox.deliveries ORDER BY id",
            &[],
        )
        .await
        .expect("read deliveries")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

pub async fn wait_for_statuses(db: &TestDb, status: &str, count_wanted: i64) {
    let sql = format!("SELECT count(*) FROM outbox.deliveries WHERE status = '{status}'");
    wait_until(
        &format!("{count_wanted} deliveries are {status}"),
        DEADLINE,
        || async { count(db, &sql).await >= count_wanted },
    )
    .await;
}

/// The real binary, for crash and signal tests.
pub struct RelayProcess {
    pub child: tokio::process::Child,
    /// The `--relay-id` it runs with: its `lease_owner` in outbox.deliveries.
    #[allow(dead_code, reason = "read by tests/fault, which shares this harness")]
    pub relay_id: String,
}

/// Flags every [`RelayProcess`] gets unless the builder overrides them: short intervals so
/// crashes show up within seconds, loopback targets allowed, an ephemeral HTTP port.
const PROCESS_DEFAULT_FLAGS: [(&str, &str); 5] = [
    ("--http-addr", "127.0.0.1:0"),
    ("--allow-private-targets", "127.0.0.0/8"),
    ("--poll-interval", "200ms"),
    ("--lease-duration", "2s"),
    ("--heartbeat-interval", "500ms"),
];

/// Builds the command line of a [`RelayProcess`]: the defaults above, any of which
/// [`flag`](Self::flag) replaces (clap refuses a flag given twice), then extra arguments.
pub struct RelayProcessBuilder {
    relay_id: String,
    flags: Vec<(String, String)>,
    extra_args: Vec<String>,
    envs: Vec<(String, String)>,
    capture_output: bool,
}

impl RelayProcessBuilder {
    /// Sets a flag of `outbox-relay run`, replacing its default if it has one, e.g.
    /// `.flag("--max-concurrency", "16")`.
    #[allow(dead_code, reason = "used by tests/fault, which shares this harness")]
    pub fn flag(mut self, name: &str, value: &str) -> Self {
        match self.flags.iter_mut().find(|(flag, _)| flag == name) {
            Some((_, old)) => *old = value.to_string(),
            None => self.flags.push((name.to_string(), value.to_string())),
        }
        self
    }

    /// Arguments appended as given, after the flags.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.extra_args
            .extend(args.iter().map(|arg| arg.to_string()));
        self
    }

    /// Sets an environment variable of the process, replacing the defaults
    /// (`DATABASE_URL` = the test database, `RUST_LOG=warn`) when it names one of them.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    /// Pipes stdout and stderr (read them from `child`) instead of dropping stdout and
    /// passing stderr through.
    pub fn capture_output(mut self) -> Self {
        self.capture_output = true;
        self
    }

    pub fn spawn(self, db: &TestDb) -> RelayProcess {
        let (stdout, stderr) = if self.capture_output {
            (Stdio::piped(), Stdio::piped())
        } else {
            (Stdio::null(), Stdio::inherit())
        };
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .arg("run")
            .args(self.flags.iter().flat_map(|(flag, value)| [flag, value]))
            .args(["--relay-id", &self.relay_id])
            .args(&self.extra_args)
            .env(
                "DATABASE_URL",
                with_params(
                    &db.url,
                    &[(
                        "application_name",
                        &process_application_name(&self.relay_id),
                    )],
                ),
            )
            .env("RUST_LOG", "warn")
            .envs(self.envs.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("start outbox-relay binary");
        RelayProcess {
            child,
            relay_id: self.relay_id,
        }
    }
}

impl RelayProcess {
    pub fn spawn(db: &TestDb, relay_id: &str, extra_args: &[&str]) -> RelayProcess {
        Self::builder(relay_id).args(extra_args).spawn(db)
    }

    pub fn builder(relay_id: &str) -> RelayProcessBuilder {
        RelayProcessBuilder {
            relay_id: relay_id.to_string(),
            flags: PROCESS_DEFAULT_FLAGS
                .iter()
                .map(|(flag, value)| (flag.to_string(), value.to_string()))
                .collect(),
            extra_args: Vec::new(),
            envs: Vec::new(),
            capture_output: false,
        }
    }

    pub async fn kill_9(&mut self) {
        self.child.kill().await.expect("kill -9 relay");
    }

    /// SIGTERM, then wait for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("relay still running") as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("send SIGTERM");
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("relay exits after SIGTERM")
            .expect("wait for relay")
    }
}

/// Rows read from `table` by sequential scans plus entries returned by scans of its indexes,
/// as counted in this session's statistics not yet reported: they include earlier
/// transactions of the session, so take the difference of two readings around a statement.
pub async fn rows_read_in_transaction(
    transaction: &deadpool_postgres::Transaction<'_>,
    table: &str,
) -> i64 {
    transaction
        .query_one(
            "SELECT pg_stat_get_xact_tuples_returned($1::text::regclass)
                  + coalesce(sum(pg_stat_get_xact_tuples_returned(i.indexrelid)), 0)::bigint
               FROM pg_index i WHERE i.indrelid = $1::text::regclass",
            &[&table],
        )
        .await
        .unwrap_or_else(|e| panic!("rows read from {table}: {e}"))
        .get(0)
}

/// The plans of `statement` and of every statement it runs inside functions (auto_explain,
/// with ANALYZE), in a transaction rolled back afterwards. Needs psql.
pub async fn nested_plans(db: &TestDb, statement: &str) -> String {
    let output = tokio::process::Command::new("psql")
        .arg(&db.url)
        .args(["--no-psqlrc", "-v", "ON_ERROR_STOP=1", "-c"])
        .arg(format!(
            "LOAD 'auto_explain';
             SET auto_explain.log_min_duration = 0;
             SET auto_explain.log_analyze = on;
             SET auto_explain.log_nested_statements = on;
             SET client_min_messages = log;
             BEGIN;
             {statement};
             ROLLBACK;"
        ))
        .output()
        .await
        .expect("run psql (is it installed?)");
    let plans = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "psql failed:\n{plans}");
    plans
}

/// Makes PostgreSQL count calls of PL/pgSQL functions (`track_functions = 'pl'`) in the
/// sessions that connect to `db` from now on: start relays afterwards.
pub async fn track_function_calls(db: &TestDb) {
    db.client()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {} SET track_functions = 'pl'",
            db.name
        ))
        .await
        .expect("track function calls");
}

/// Calls of `outbox.<function>` counted since [`track_function_calls`], once the relays'
/// sessions are gone: a session reports its statistics as it exits, before it leaves
/// pg_stat_activity. Shut the relays down first.
pub async fn function_calls_after_relays_exit(db: &TestDb, function: &str) -> i64 {
    wait_until("the relay's sessions have ended", DEADLINE, || async {
        count(db, RELAY_SESSIONS).await == 0
    })
    .await;
    count(
        db,
        &format!(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_user_functions
              WHERE schemaname = 'outbox' AND funcname = '{function}'"
        ),
    )
    .await
}
