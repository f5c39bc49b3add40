//! outbox-relay benchmark: throughput, fan-out, wake-up latency, slow-subscriber isolation
//! and the cost NOTIFY adds to producers. Run by hand, never by `cargo test`:
//!
//! ```sh
//! cargo bench --bench drain -- --scenario all          # or: --scenario latency, …
//! cargo bench --bench drain -- --help
//! ```
//!
//! Each scenario gets a fresh, migrated database: on a throwaway cluster (`TempPostgres`, the
//! default; it runs with fsync=off and synchronous_commit=off) or, with `--database-url`, as
//! `outbox_bench_<random>` created and dropped on that server. The relay runs in this process
//! (`relay::start`) against a real receiver on 127.0.0.1 (`devkit::receiver`) in a process of
//! its own (`remote_receiver`, the bench binary started again); all traffic
//! stays on loopback. Every wait has a deadline (`--scenario-timeout`).
//!
//! Scenarios:
//! - `drain`: N events committed before the relay starts, one subscription; time from relay
//!   start until the last delivery is `delivered` in the database.
//! - `fanout`: N/4 events to 4 matching subscriptions (N deliveries), measured the same way.
//! - `latency`: idle relay; single-event transactions at a steady rate; COMMIT returned →
//!   request arrived at the receiver (the NOTIFY wake-up path), percentiles.
//! - `three_relays`: the `drain` backlog drained by 1 and by 3 relays at once, each a process
//!   of the real binary (phases ABBA); deliveries/s, the ratio, duplicates. See `relays`.
//! - `footprint`: the relay process's RSS over a drain (and a soak), and the tables' and
//!   indexes' sizes before and after retention. See `footprint`.
//!   Neither is part of `all`: they start relay processes and take minutes at full size.
//! - `slow_subscriber`: a subscriber answering after 200 ms (max_in_flight 64) next to a fast
//!   one; the fast one's drain time must not follow the slow one's.
//! - `producer_cost`: producer transactions/s and commit latency into `outbox.events` while the
//!   relay delivers, against a plain table of the same shape (see `producer.rs`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use chrono::{DateTime, Utc};
use clap::{Parser, ValueEnum};
use outbox_relay::config::{CidrList, RelayConfig};
use outbox_relay::devkit::postgres::TempPostgres;
use outbox_relay::relay::RelayHandle;
use tokio_postgres::NoTls;

mod footprint;
mod producer;
mod relay_process;
mod relays;
mod remote_receiver;
use remote_receiver::RemoteReceiver;

/// How often the database is asked whether the work is done. The figures come from the
/// rows' own timestamps, not from when a poll noticed, so a coarse poll loses no precision;
/// a fine one costs the relay CPU: with autovacuum off, as on the benchmark's server, the
/// counts walk index entries of rows already done, thousands per poll.
const DB_POLL: Duration = Duration::from_millis(250);
/// Extra time the hard backstop gives a scenario beyond its own deadline before the process
/// gives up on it entirely.
const BACKSTOP_SLACK: Duration = Duration::from_secs(60);
const RELAY_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug, Clone)]
#[command(
    name = "drain",
    about = "outbox-relay benchmark (throughput, fan-out, latency, slow subscriber, producer cost)"
)]
struct Args {
    /// Passed by `cargo bench` to every bench target; accepted and ignored.
    #[arg(long, hide = true)]
    bench: bool,

    /// Internal: run as the receiver process (see `remote_receiver`).
    #[arg(long, hide = true)]
    serve_receiver: bool,

    /// Which scenario to run; `all` runs each in turn.
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    scenario: Scenario,

    /// Use this PostgreSQL server (a fresh `outbox_bench_<random>` database is created and
    /// dropped per scenario) instead of a throwaway cluster. Needs CREATEDB.
    #[arg(long)]
    database_url: Option<String>,

    /// Events for `drain`; `fanout` uses events/4 events × 4 subscriptions (same deliveries).
    #[arg(long, default_value_t = 20_000)]
    events: u64,

    /// Subscriptions in `fanout`.
    #[arg(long, default_value_t = 4)]
    fanout_subscriptions: u32,

    /// Bytes of padding in each event payload (`{"seq": n, "pad": "xxx…"}`).
    #[arg(long, default_value_t = 200)]
    payload_pad: i32,

    /// `max_in_flight` of the benchmark's subscriptions (the column default is 64).
    #[arg(long, default_value_t = 64)]
    max_in_flight: i32,

    /// Run ANALYZE on the filled events table before the relay starts (by default the backlog
    /// has no statistics yet, as right after a burst: autovacuum has not looked at it).
    #[arg(long)]
    analyze_before: bool,

    /// `drain`/`fanout`: events already dispatched and delivered before the backlog (a
    /// database with history, as production has; then ANALYZEd as autovacuum would). The
    /// plans of the relay's statements depend on the table sizes.
    #[arg(long, default_value_t = 0)]
    history_events: u64,

    /// `three_relays`: rounds of (1 relay, 3 relays) phases, alternating ABBA.
    #[arg(long, default_value_t = 1)]
    relay_rounds: u32,

    /// `footprint`: after the drain, publish at `--latency-rate` for this long while the
    /// relay's RSS is sampled (0 = no soak). Must fit in `--scenario-timeout`.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    soak_duration: Duration,

    /// `footprint`: events inserted and delivered before the table and index sizes are
    /// taken (0 = skip that part).
    #[arg(long, default_value_t = 1_000_000)]
    footprint_events: u64,

    /// `latency`: events published per second, one transaction each.
    #[arg(long, default_value_t = 50.0)]
    latency_rate: f64,

    /// `latency`: how long to publish.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    latency_duration: Duration,

    /// `slow_subscriber`: events (each goes to the slow and the fast subscriber).
    #[arg(long, default_value_t = 2_000)]
    slow_events: u64,

    /// `slow_subscriber`: how long the slow subscriber takes to answer.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    slow_delay: Duration,

    /// `slow_subscriber`: max_in_flight of the slow subscriber.
    #[arg(long, default_value_t = 64)]
    slow_max_in_flight: i32,

    /// `producer_cost`: transactions per throughput phase.
    #[arg(long, default_value_t = 5_000)]
    producer_transactions: u64,

    /// `producer_cost`: the producer connection counts measured for throughput.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    producer_connections: Vec<u64>,

    /// `producer_cost`: rounds of (outbox, plain) phases, alternating ABBA.
    #[arg(long, default_value_t = 2)]
    producer_rounds: u32,

    /// `producer_cost`: warm-up transactions into each table before the measured phases.
    #[arg(long, default_value_t = 500)]
    producer_warmup: u64,

    /// `producer_cost`: transactions/s, in total, of the steady commit-latency phases.
    #[arg(long, default_value_t = 300.0)]
    producer_steady_rate: f64,

    /// `producer_cost`: connections sharing the steady rate.
    #[arg(long, default_value_t = 4)]
    producer_steady_connections: u64,

    /// `producer_cost`: length of each steady phase.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    producer_steady_duration: Duration,

    /// Keep each scenario's database instead of dropping it (with `--database-url`, for
    /// looking at what happened; a throwaway cluster is removed at exit regardless).
    #[arg(long)]
    keep_databases: bool,

    /// Each scenario gives up after this long.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    scenario_timeout: Duration,

    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,

    // Relay settings: production defaults (README, "Configuration").
    /// Relay: fallback poll interval (OUTBOX_POLL_INTERVAL).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    poll_interval: Duration,
    /// Relay: look for events this often while busy (OUTBOX_BUSY_POLL_INTERVAL).
    #[arg(long, default_value = "1ms", value_parser = parse_duration)]
    busy_poll_interval: Duration,
    /// Relay: how long a busy spell outlasts the last event (OUTBOX_BUSY_LINGER).
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    busy_linger: Duration,
    /// Relay: lease duration (OUTBOX_LEASE_DURATION).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// Relay: heartbeat interval (OUTBOX_HEARTBEAT_INTERVAL).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// Relay: result flush interval (OUTBOX_FLUSH_INTERVAL).
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    flush_interval: Duration,
    /// Relay: bookkeeping commits without waiting for WAL flush (OUTBOX_ASYNC_COMMIT).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    async_commit: bool,
    /// Relay: results per write (OUTBOX_FLUSH_BATCH_SIZE).
    #[arg(long, default_value_t = 500)]
    flush_batch_size: u32,
    /// Relay: events fanned out per transaction (OUTBOX_DISPATCH_BATCH_SIZE).
    #[arg(long, default_value_t = 500)]
    dispatch_batch_size: u32,
    /// Relay: deliveries leased per claim (OUTBOX_DELIVERY_BATCH_SIZE).
    #[arg(long, default_value_t = 200)]
    delivery_batch_size: u32,
    /// Relay: concurrent requests, all subscriptions (OUTBOX_MAX_CONCURRENCY).
    #[arg(long, default_value_t = 256)]
    max_concurrency: u32,
    /// Relay: pooled connections (OUTBOX_DB_POOL_SIZE).
    #[arg(long, default_value_t = 8)]
    db_pool_size: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
enum Scenario {
    All,
    Drain,
    Fanout,
    Latency,
    SlowSubscriber,
    ProducerCost,
    ThreeRelays,
    Footprint,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::All => "all",
            Scenario::Drain => "drain",
            Scenario::Fanout => "fanout",
            Scenario::Latency => "latency",
            Scenario::SlowSubscriber => "slow_subscriber",
            Scenario::ProducerCost => "producer_cost",
            Scenario::ThreeRelays => "three_relays",
            Scenario::Footprint => "footprint",
        }
    }
}

/// `50ms`, `1s`, `1.5s`, `5m`; a bare number is seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || format!("invalid duration {text:?}: expected e.g. 50ms, 1s, 5m");
    let value: f64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" | "min" => value * 60.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| bad())
}

/// One line of the result table.
#[derive(Debug, Clone)]
struct Row {
    scenario: &'static str,
    metric: String,
    value: f64,
    unit: &'static str,
}

fn row(scenario: &'static str, metric: &str, value: f64, unit: &'static str) -> Row {
    Row {
        scenario,
        metric: metric.to_string(),
        value,
        unit,
    }
}

// ---------------------------------------------------------------------------------------------
// Database server and per-scenario databases
// ---------------------------------------------------------------------------------------------

struct Server {
    admin_url: String,
    cluster: Option<TempPostgres>,
}

struct BenchDb {
    name: String,
    url: String,
}

impl Server {
    async fn start(database_url: Option<&str>) -> anyhow::Result<Server> {
        match database_url {
            Some(url) => Ok(Server {
                admin_url: url.to_string(),
                cluster: None,
            }),
            None => {
                let cluster = TempPostgres::start()
                    .await
                    .context("starting a throwaway PostgreSQL cluster (or pass --database-url)")?;
                Ok(Server {
                    admin_url: cluster.admin_url(),
                    cluster: Some(cluster),
                })
            }
        }
    }

    fn is_throwaway(&self) -> bool {
        self.cluster.is_some()
    }

    async fn fresh_db(&self) -> anyhow::Result<BenchDb> {
        let name = format!("outbox_bench_{:012x}", random_u64() & 0xffff_ffff_ffff);
        let admin = connect(&self.admin_url).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name)))
            .await
            .with_context(|| format!("creating database {name}"))?;
        let url = with_database(&self.admin_url, &name);
        outbox_relay::db::migrate(&url)
            .await
            .with_context(|| format!("migrating database {name}"))?;
        Ok(BenchDb { name, url })
    }

    async fn drop_db(&self, db: BenchDb, keep: bool) {
        if keep {
            eprintln!("  kept database {} ({})", db.name, db.url);
            return;
        }
        let result = async {
            let admin = connect(&self.admin_url).await?;
            admin
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    quote_ident(&db.name)
                ))
                .await
                .with_context(|| format!("dropping database {}", db.name))
        }
        .await;
        if let Err(error) = result {
            eprintln!("warning: {error:#}");
        }
    }

    async fn stop(self) {
        if let Some(cluster) = self.cluster
            && let Err(error) = cluster.stop().await
        {
            eprintln!("warning: stopping the throwaway cluster: {error:#}");
        }
    }
}

fn random_u64() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.finish()
}

fn quote_ident(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// Replaces the database of a URL (`postgres://…/db?…`) or key=value string.
fn with_database(url: &str, database: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(authority_end);
            let query = tail.find('?').map_or("", |start| &tail[start..]);
            format!("{scheme}://{authority}/{database}{query}")
        }
        None => format!("{url} dbname={database}"),
    }
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) =
        tokio::time::timeout(Duration::from_secs(10), tokio_postgres::connect(url, NoTls))
            .await
            .map_err(|_| anyhow!("connecting to PostgreSQL timed out after 10s"))?
            .context("connecting to PostgreSQL")?;
    // Errors here are the connection closing (e.g. DROP DATABASE … WITH (FORCE)): not ours to report.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

// ---------------------------------------------------------------------------------------------
// Relay, subscriptions, events
// ---------------------------------------------------------------------------------------------

fn relay_config(args: &Args) -> RelayConfig {
    let mut config = RelayConfig::for_tests();
    config.allow_private_targets =
        CidrList(vec!["127.0.0.0/8".parse().expect("literal CIDR is valid")]);
    config.poll_interval = args.poll_interval;
    config.busy_poll_interval = args.busy_poll_interval;
    config.busy_linger = args.busy_linger;
    config.lease_duration = args.lease_duration;
    config.heartbeat_interval = args.heartbeat_interval;
    config.flush_interval = args.flush_interval;
    config.flush_batch_size = args.flush_batch_size;
    config.async_commit = args.async_commit;
    config.dispatch_batch_size = args.dispatch_batch_size;
    config.delivery_batch_size = args.delivery_batch_size;
    config.max_concurrency = args.max_concurrency;
    config.db_pool_size = args.db_pool_size;
    config.relay_id = Some(format!("bench:{}", std::process::id()));
    config
}

async fn start_relay(args: &Args, url: &str) -> anyhow::Result<RelayHandle> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the relay's HTTP listener on 127.0.0.1:0")?;
    outbox_relay::relay::start(relay_config(args), url, listener)
        .await
        .context("starting the relay")
}

/// Relay counters worth reading before shutdown.
struct RelayCounters {
    wakeups_notify: u64,
    wakeups_poll: u64,
    db_errors: u64,
}

fn relay_counters(relay: &RelayHandle) -> RelayCounters {
    let m = &relay.metrics;
    RelayCounters {
        wakeups_notify: m.wakeups.with_label_values(&["notify"]).get(),
        wakeups_poll: m.wakeups.with_label_values(&["poll"]).get(),
        db_errors: ["dispatcher", "deliverer", "completer", "maintenance"]
            .iter()
            .map(|c| m.db_errors.with_label_values(&[*c]).get())
            .sum(),
    }
}

/// The dispatcher's wake-ups between two readings, and the relay's database errors if any.
fn relay_counter_rows(
    scenario: &'static str,
    before: &RelayCounters,
    after: &RelayCounters,
) -> Vec<Row> {
    let mut rows = vec![
        row(
            scenario,
            "wakeups_notify (dispatcher)",
            (after.wakeups_notify - before.wakeups_notify) as f64,
            "count",
        ),
        row(
            scenario,
            "wakeups_poll (dispatcher)",
            (after.wakeups_poll - before.wakeups_poll) as f64,
            "count",
        ),
    ];
    rows.extend(db_errors_row(scenario, after.db_errors));
    rows
}

async fn stop_relay(relay: RelayHandle) {
    if tokio::time::timeout(RELAY_SHUTDOWN_TIMEOUT, relay.shutdown())
        .await
        .is_err()
    {
        eprintln!("warning: the relay did not stop within {RELAY_SHUTDOWN_TIMEOUT:?}");
    }
}

async fn add_subscription(
    client: &tokio_postgres::Client,
    name: &str,
    url: &str,
    max_in_flight: i32,
) -> anyhow::Result<i64> {
    let row = client
        .query_one(
            "INSERT INTO outbox.subscriptions (name, url, max_in_flight) VALUES ($1, $2, $3) RETURNING id",
            &[&name, &url, &max_in_flight],
        )
        .await
        .with_context(|| format!("adding subscription {name}"))?;
    Ok(row.get(0))
}

/// Starts the receiver process and subscribes `name` to its `path`: the setup of every
/// scenario with one subscriber.
async fn receiver_with_subscription(
    client: &tokio_postgres::Client,
    name: &str,
    path: &str,
    max_in_flight: i32,
) -> anyhow::Result<RemoteReceiver> {
    let receiver = RemoteReceiver::start().await?;
    add_subscription(client, name, &receiver.url(path), max_in_flight).await?;
    Ok(receiver)
}

/// Runs `make()`'s future to completion on a thread and current-thread runtime of its own, so
/// the in-process relay's work cannot delay the moments it notes (the OS still shares the
/// cores, as in production).
async fn on_own_runtime<T, F, Fut>(name: &str, make: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let thread = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || -> anyhow::Result<T> {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building a runtime of its own")?
                .block_on(make())
        })
        .with_context(|| format!("spawning thread {name}"))?;
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .context("joining a thread")?
        .map_err(|_| anyhow!("a thread of the benchmark panicked"))?
}

/// A row for the relay's database errors, when there were any.
fn db_errors_row(scenario: &'static str, errors: u64) -> Option<Row> {
    (errors > 0).then(|| row(scenario, "relay_db_errors", errors as f64, "count"))
}

/// Inserts `count` events in one statement (one transaction, one NOTIFY).
async fn insert_events(
    client: &tokio_postgres::Client,
    event_type: &str,
    count: u64,
    pad: i32,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let count = i64::try_from(count).context("event count")?;
    client
        .execute(
            "INSERT INTO outbox.events (event_type, payload)
             SELECT $1, jsonb_build_object('seq', g, 'pad', repeat('x', $3::int))
               FROM generate_series(1, $2::bigint) g",
            &[&event_type, &count, &pad],
        )
        .await
        .context("inserting events")?;
    Ok(started.elapsed())
}

/// Inserts `count` events that look fully processed (dispatched, one delivered delivery each to
/// a disabled subscription), then ANALYZEs, as autovacuum would have long since done.
async fn insert_history(
    client: &tokio_postgres::Client,
    count: u64,
    pad: i32,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let count = i64::try_from(count).context("history count")?;
    client
        .batch_execute(
            "INSERT INTO outbox.subscriptions (name, url, enabled) VALUES ('bench-history', 'http://127.0.0.1:9/history', false)",
        )
        .await
        .context("adding the history subscription")?;
    client
        .execute(
            "WITH e AS (
                 INSERT INTO outbox.events (event_type, payload, created_at, deliver_after, dispatched_at)
                 SELECT 'bench.history', jsonb_build_object('seq', g, 'pad', repeat('x', $2::int)),
                        now() - interval '1 day', now() - interval '1 day', now() - interval '1 day'
                   FROM generate_series(1, $1::bigint) g
                 RETURNING id
             )
             INSERT INTO outbox.deliveries (event_id, subscription_id, status, attempts, delivered_at, created_at, updated_at)
             SELECT e.id, s.id, 'delivered', 1, now() - interval '1 day', now() - interval '1 day', now() - interval '1 day'
               FROM e, outbox.subscriptions s WHERE s.name = 'bench-history'",
            &[&count, &pad],
        )
        .await
        .context("inserting history")?;
    // One statement per call: VACUUM refuses the implicit transaction of a multi-statement query.
    for table in ["outbox.events", "outbox.deliveries"] {
        client
            .batch_execute(&format!("VACUUM ANALYZE {table}"))
            .await
            .with_context(|| format!("vacuuming {table}"))?;
    }
    eprintln!(
        "  history: {count} delivered events inserted and vacuumed in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Polls the database until every event is dispatched and no delivery is pending, failing or
/// in flight, then checks that exactly `expected` deliveries were delivered.
async fn wait_all_delivered(
    client: &tokio_postgres::Client,
    expected: u64,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> anyhow::Result<()> {
    // Separate counts so each walks a partial index: this runs every DB_POLL while the relay
    // works, and must cost next to nothing. `dispatched_at IS NULL` alone matches neither of
    // the dispatcher's partial indexes, so it read the whole events table each time (a
    // sequential scan every 50 ms took about a sixth of the machine's CPU during a drain).
    let open = client
        .prepare(
            "SELECT (SELECT count(*) FROM outbox.events
                      WHERE dispatched_at IS NULL AND deliver_after <= created_at)
                  + (SELECT count(*) FROM outbox.events
                      WHERE dispatched_at IS NULL AND deliver_after > created_at),
                    (SELECT count(*) FROM outbox.deliveries WHERE status IN ('pending', 'failing')),
                    (SELECT count(*) FROM outbox.deliveries WHERE status = 'in_flight')",
        )
        .await
        .context("preparing the progress query")?;
    loop {
        let row = client
            .query_one(&open, &[])
            .await
            .context("asking for progress")?;
        let (undispatched, due, in_flight): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        if undispatched == 0 && due == 0 && in_flight == 0 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "gave up after {timeout:?}: {undispatched} events undispatched, {due} deliveries \
                 pending/failing, {in_flight} in flight; statuses: {}",
                status_summary(client).await.unwrap_or_default()
            );
        }
        tokio::time::sleep(DB_POLL).await;
    }
    let delivered: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'
               AND subscription_id IN (SELECT id FROM outbox.subscriptions WHERE enabled)",
            &[],
        )
        .await
        .context("counting delivered")?
        .get(0);
    if u64::try_from(delivered).unwrap_or(0) != expected {
        bail!(
            "expected {expected} delivered deliveries, found {delivered}; statuses: {}",
            status_summary(client).await.unwrap_or_default()
        );
    }
    Ok(())
}

async fn status_summary(client: &tokio_postgres::Client) -> anyhow::Result<String> {
    let rows = client
        .query(
            "SELECT status, count(*), max(last_error) FROM outbox.deliveries GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let status: String = r.get(0);
            let count: i64 = r.get(1);
            let error: Option<String> = r.get(2);
            match error {
                Some(e) => format!("{status}={count} (e.g. {e})"),
                None => format!("{status}={count}"),
            }
        })
        .collect::<Vec<_>>()
        .join(", "))
}

/// Per subscription: deliveries delivered and the last `delivered_at`.
async fn delivered_per_subscription(
    client: &tokio_postgres::Client,
) -> anyhow::Result<HashMap<i64, (i64, DateTime<Utc>)>> {
    let rows = client
        .query(
            "SELECT subscription_id, count(*), max(delivered_at)
               FROM outbox.deliveries WHERE status = 'delivered' GROUP BY 1",
            &[],
        )
        .await
        .context("reading delivery times")?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, i64>(0), (r.get(1), r.get(2))))
        .collect())
}

async fn last_dispatched_at(client: &tokio_postgres::Client) -> anyhow::Result<DateTime<Utc>> {
    client
        .query_one("SELECT max(dispatched_at) FROM outbox.events", &[])
        .await
        .context("reading dispatch times")?
        .get::<_, Option<DateTime<Utc>>>(0)
        .ok_or_else(|| anyhow!("no event was dispatched"))
}

fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

/// What reached the receiver: requests, distinct webhook ids, last arrival after `start`.
struct Arrivals {
    requests: usize,
    distinct: usize,
    last_after_start: Duration,
}

async fn arrivals(
    receiver: &RemoteReceiver,
    path: &str,
    start: Instant,
) -> anyhow::Result<Arrivals> {
    let received = receiver.received(path).await?;
    let distinct: HashSet<String> = received
        .iter()
        .filter_map(|r| r.webhook_id.clone())
        .collect();
    let last = received
        .iter()
        .map(|r| r.at)
        .max()
        .map(|at| at.saturating_duration_since(start))
        .unwrap_or_default();
    Ok(Arrivals {
        requests: received.len(),
        distinct: distinct.len(),
        last_after_start: last,
    })
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

/// `drain` and `fanout`: a backlog committed before the relay starts, drained to N subscriptions.
async fn backlog_scenario(
    args: &Args,
    server: &Server,
    scenario: &'static str,
    events: u64,
    subscriptions: u32,
) -> anyhow::Result<Vec<Row>> {
    let deadline = tokio::time::Instant::now() + args.scenario_timeout;
    let db = server.fresh_db().await?;
    let result = async {
        let client = connect(&db.url).await?;
        let receiver = RemoteReceiver::start().await?;
        let mut paths = Vec::new();
        for i in 0..subscriptions {
            let path = format!("/{scenario}/{i}");
            add_subscription(
                &client,
                &format!("bench-{scenario}-{i}"),
                &receiver.url(&path),
                args.max_in_flight,
            )
            .await?;
            paths.push(path);
        }
        if args.history_events > 0 {
            insert_history(&client, args.history_events, args.payload_pad).await?;
        }
        let insert_time = insert_events(&client, "bench.backlog", events, args.payload_pad).await?;
        if args.analyze_before {
            client.batch_execute("ANALYZE outbox.events").await?;
        }
        let expected = events * u64::from(subscriptions);
        eprintln!(
            "  {scenario}: {events} events × {subscriptions} subscriptions inserted in {:.2}s; starting the relay",
            insert_time.as_secs_f64()
        );

        let start_wall = Utc::now();
        let start = Instant::now();
        let relay = start_relay(args, &db.url).await?;
        let waited = wait_all_delivered(&client, expected, deadline, args.scenario_timeout).await;
        let polled = start.elapsed();
        let counters = relay_counters(&relay);
        stop_relay(relay).await;
        waited?;

        let per_sub = delivered_per_subscription(&client).await?;
        let last_delivered = per_sub
            .values()
            .map(|(_, at)| *at)
            .max()
            .ok_or_else(|| anyhow!("nothing delivered"))?;
        let drain = seconds_between(start_wall, last_delivered);
        let dispatched = seconds_between(start_wall, last_dispatched_at(&client).await?);
        let mut requests = 0;
        let mut distinct = 0;
        let mut last_arrival = Duration::ZERO;
        for path in &paths {
            let a = arrivals(&receiver, path, start).await?;
            requests += a.requests;
            distinct += a.distinct;
            last_arrival = last_arrival.max(a.last_after_start);
        }
        if distinct as u64 != expected {
            bail!("the receiver saw {distinct} distinct deliveries, expected {expected}");
        }
        let mut rows = vec![
            row(scenario, "deliveries", expected as f64, "count"),
            row(scenario, "deliveries_per_s", expected as f64 / drain, "1/s"),
            row(scenario, "drain_s (relay start → last delivered_at)", drain, "s"),
            row(scenario, "all_dispatched_s", dispatched, "s"),
            row(
                scenario,
                "last_arrival_s (receiver)",
                last_arrival.as_secs_f64(),
                "s",
            ),
            row(
                scenario,
                "done_seen_by_poll_s",
                polled.as_secs_f64(),
                "s",
            ),
            row(
                scenario,
                "duplicate_requests",
                (requests - distinct) as f64,
                "count",
            ),
        ];
        rows.extend(db_errors_row(scenario, counters.db_errors));
        Ok(rows)
    }
    .await;
    server.drop_db(db, args.keep_databases).await;
    result
}

async fn latency_scenario(args: &Args, server: &Server) -> anyhow::Result<Vec<Row>> {
    const SCENARIO: &str = "latency";
    const PATH: &str = "/latency";
    let deadline = tokio::time::Instant::now() + args.scenario_timeout;
    if !(args.latency_rate > 0.0 && args.latency_rate <= 10_000.0) {
        bail!("--latency-rate must be in (0, 10000]");
    }
    let count = (args.latency_rate * args.latency_duration.as_secs_f64()).round() as u64;
    if count == 0 {
        bail!("--latency-rate × --latency-duration publishes no event");
    }
    let db = server.fresh_db().await?;
    let result = async {
        let client = connect(&db.url).await?;
        let receiver =
            receiver_with_subscription(&client, "bench-latency", PATH, args.max_in_flight).await?;
        let relay = start_relay(args, &db.url).await?;
        let outcome = async {
            // Idle and listening before the first event.
            while !relay.health.listener_connected.load(Ordering::SeqCst) {
                if tokio::time::Instant::now() >= deadline {
                    bail!("the relay's LISTEN connection never came up");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let before = relay_counters(&relay);
            eprintln!(
                "  latency: publishing {count} events at {}/s, one transaction each",
                args.latency_rate
            );

            // The producer runs on its own thread and runtime so the relay's work cannot delay
            // the moment we note COMMIT returning.
            let url = db.url.clone();
            let period = Duration::from_secs_f64(1.0 / args.latency_rate);
            let pad = args.payload_pad;
            let commits = on_own_runtime("bench-producer", move || async move {
                publish_at_rate(&url, count, period, pad).await
            })
            .await?;

            loop {
                if receiver.received(PATH).await?.len() as u64 >= count {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    bail!(
                        "gave up after {:?}: {} of {count} events arrived",
                        args.scenario_timeout,
                        receiver.received(PATH).await?.len()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            wait_all_delivered(&client, count, deadline, args.scenario_timeout).await?;
            let after = relay_counters(&relay);
            Ok((commits, before, after))
        }
        .await;
        stop_relay(relay).await;
        let (commits, before, after) = outcome?;

        let mut first_arrival: HashMap<i64, Instant> = HashMap::new();
        for r in receiver.received(PATH).await? {
            let Some(seq) = r.seq else {
                bail!("a request without data.seq reached the receiver");
            };
            first_arrival
                .entry(seq)
                .and_modify(|at| *at = (*at).min(r.at))
                .or_insert(r.at);
        }
        let mut latencies_ms: Vec<f64> = Vec::with_capacity(commits.len());
        for (seq, committed) in &commits {
            let arrived = first_arrival
                .get(seq)
                .ok_or_else(|| anyhow!("event {seq} never arrived"))?;
            // Negative when the request arrived before this side noted COMMIT returning.
            let ms = if *arrived >= *committed {
                arrived.duration_since(*committed).as_secs_f64() * 1e3
            } else {
                -committed.duration_since(*arrived).as_secs_f64() * 1e3
            };
            latencies_ms.push(ms);
        }
        latencies_ms.sort_by(f64::total_cmp);
        let mean = latencies_ms.iter().sum::<f64>() / latencies_ms.len() as f64;
        let mut rows = vec![
            row(SCENARIO, "events", latencies_ms.len() as f64, "count"),
            row(SCENARIO, "p50_ms", percentile(&latencies_ms, 0.50), "ms"),
            row(SCENARIO, "p90_ms", percentile(&latencies_ms, 0.90), "ms"),
            row(SCENARIO, "p99_ms", percentile(&latencies_ms, 0.99), "ms"),
            row(
                SCENARIO,
                "max_ms",
                *latencies_ms.last().unwrap_or(&0.0),
                "ms",
            ),
            row(SCENARIO, "mean_ms", mean, "ms"),
        ];
        rows.extend(relay_counter_rows(SCENARIO, &before, &after));
        Ok(rows)
    }
    .await;
    server.drop_db(db, args.keep_databases).await;
    result
}

/// Publishes `count` events, one transaction each, one every `period`; returns (seq, the
/// instant COMMIT returned).
async fn publish_at_rate(
    url: &str,
    count: u64,
    period: Duration,
    pad: i32,
) -> anyhow::Result<Vec<(i64, Instant)>> {
    {
        let mut client = connect(url).await?;
        let insert = client
            .prepare(
                "INSERT INTO outbox.events (event_type, payload)
                 VALUES ('bench.latency', jsonb_build_object('seq', $1::bigint, 'pad', repeat('x', $2::int)))",
            )
            .await
            .context("preparing the producer insert")?;
        let start = tokio::time::Instant::now();
        let mut commits = Vec::with_capacity(count as usize);
        for seq in 0..count {
            tokio::time::sleep_until(start + period.mul_f64(seq as f64)).await;
            let seq = seq as i64;
            let tx = client.transaction().await.context("BEGIN")?;
            tx.execute(&insert, &[&seq, &pad]).await.context("INSERT")?;
            tx.commit().await.context("COMMIT")?;
            commits.push((seq, Instant::now()));
        }
        Ok(commits)
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn slow_subscriber_scenario(args: &Args, server: &Server) -> anyhow::Result<Vec<Row>> {
    const SCENARIO: &str = "slow_subscriber";
    let deadline = tokio::time::Instant::now() + args.scenario_timeout;
    let db = server.fresh_db().await?;
    let result = async {
        let client = connect(&db.url).await?;
        let receiver = RemoteReceiver::start().await?;
        receiver.set_delay("/slow", args.slow_delay, 200).await?;
        let slow = add_subscription(
            &client,
            "bench-slow",
            &receiver.url("/slow"),
            args.slow_max_in_flight,
        )
        .await?;
        let fast = add_subscription(
            &client,
            "bench-fast",
            &receiver.url("/fast"),
            args.max_in_flight,
        )
        .await?;
        insert_events(&client, "bench.slow", args.slow_events, args.payload_pad).await?;
        if args.analyze_before {
            client.batch_execute("ANALYZE outbox.events").await?;
        }
        eprintln!(
            "  slow_subscriber: {} events to a {:?} subscriber (max_in_flight {}) and a fast one",
            args.slow_events, args.slow_delay, args.slow_max_in_flight
        );
        let start_wall = Utc::now();
        let start = Instant::now();
        let relay = start_relay(args, &db.url).await?;
        let waited = wait_all_delivered(
            &client,
            args.slow_events * 2,
            deadline,
            args.scenario_timeout,
        )
        .await;
        let counters = relay_counters(&relay);
        stop_relay(relay).await;
        waited?;

        let per_sub = delivered_per_subscription(&client).await?;
        let time_of = |id: i64| -> anyhow::Result<f64> {
            let (_, at) = per_sub
                .get(&id)
                .ok_or_else(|| anyhow!("subscription {id} got nothing"))?;
            Ok(seconds_between(start_wall, *at))
        };
        let fast_s = time_of(fast)?;
        let slow_s = time_of(slow)?;
        let fast_arrival = arrivals(&receiver, "/fast", start).await?;
        let slow_arrival = arrivals(&receiver, "/slow", start).await?;
        let floor = args.slow_events as f64 * args.slow_delay.as_secs_f64()
            / f64::from(args.slow_max_in_flight);
        let mut rows = vec![
            row(SCENARIO, "fast_drain_s", fast_s, "s"),
            row(SCENARIO, "slow_drain_s", slow_s, "s"),
            row(
                SCENARIO,
                "slow_floor_s (events×delay/max_in_flight)",
                floor,
                "s",
            ),
            row(
                SCENARIO,
                "fast_last_arrival_s (receiver)",
                fast_arrival.last_after_start.as_secs_f64(),
                "s",
            ),
            row(
                SCENARIO,
                "slow_last_arrival_s (receiver)",
                slow_arrival.last_after_start.as_secs_f64(),
                "s",
            ),
            row(
                SCENARIO,
                "fast_deliveries_per_s",
                args.slow_events as f64 / fast_s,
                "1/s",
            ),
        ];
        rows.extend(db_errors_row(SCENARIO, counters.db_errors));
        Ok(rows)
    }
    .await;
    server.drop_db(db, args.keep_databases).await;
    result
}

// ---------------------------------------------------------------------------------------------
// Machine facts, output, main
// ---------------------------------------------------------------------------------------------

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// `MemTotal` of /proc/meminfo, e.g. `24105 MiB`.
fn mem_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| format!("{} MiB", kib / 1024))
        .unwrap_or_else(|| "unknown".into())
}

async fn machine_facts(server: &Server) -> anyhow::Result<Vec<(String, String)>> {
    let admin = connect(&server.admin_url).await?;
    let mut facts = vec![
        (
            "nproc".to_string(),
            std::thread::available_parallelism()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "unknown".into()),
        ),
        ("cpu".to_string(), cpu_model()),
        ("memory".to_string(), mem_total()),
        (
            "kernel".to_string(),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
        ),
        (
            "build profile".to_string(),
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
            .to_string(),
        ),
        ("loadavg at start".to_string(), loadavg()),
        (
            "postgres".to_string(),
            if server.is_throwaway() {
                "throwaway cluster (devkit TempPostgres)".to_string()
            } else {
                "--database-url".to_string()
            },
        ),
    ];
    for setting in [
        "server_version",
        "fsync",
        "synchronous_commit",
        "shared_buffers",
        // Durability and checkpoint pacing set what a write-heavy drain costs the server.
        "wal_level",
        "max_wal_size",
        "checkpoint_timeout",
        "full_page_writes",
        // The sizes `footprint` reports depend on when autovacuum ran.
        "autovacuum",
        // Three relays hold about 3 × (pool + 1) sessions.
        "max_connections",
    ] {
        let value: String = admin
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .with_context(|| format!("SHOW {setting}"))?
            .get(0);
        facts.push((setting.to_string(), value));
    }
    Ok(facts)
}

fn print_table(rows: &[Row]) {
    let width = rows
        .iter()
        .map(|r| r.metric.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!(
        "{:<16} {:<width$} {:>12} unit",
        "scenario", "metric", "value"
    );
    println!("{}", "-".repeat(16 + width + 12 + 8));
    for r in rows {
        let value = if r.value.abs() >= 100.0 || r.value.fract() == 0.0 {
            format!("{:.0}", r.value)
        } else {
            format!("{:.3}", r.value)
        };
        println!(
            "{:<16} {:<width$} {:>12} {}",
            r.scenario, r.metric, value, r.unit
        );
    }
}

async fn run_scenario(
    args: &Args,
    server: &Server,
    scenario: Scenario,
) -> anyhow::Result<Vec<Row>> {
    match scenario {
        Scenario::Drain => backlog_scenario(args, server, "drain", args.events, 1).await,
        Scenario::Fanout => {
            let subs = args.fanout_subscriptions.max(1);
            backlog_scenario(args, server, "fanout", args.events / u64::from(subs), subs).await
        }
        Scenario::Latency => latency_scenario(args, server).await,
        Scenario::SlowSubscriber => slow_subscriber_scenario(args, server).await,
        Scenario::ProducerCost => producer::producer_cost_scenario(args, server).await,
        Scenario::ThreeRelays => relays::three_relays_scenario(args, server).await,
        Scenario::Footprint => footprint::footprint_scenario(args, server).await,
        Scenario::All => unreachable!("expanded by main"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.serve_receiver {
        return remote_receiver::serve().await;
    }
    outbox_relay::telemetry::init(outbox_relay::telemetry::LogFormat::Text, "warn");
    relay_config(&args)
        .validate()
        .context("relay settings from the flags")?;

    let scenarios = match args.scenario {
        Scenario::All => vec![
            Scenario::Drain,
            Scenario::Fanout,
            Scenario::Latency,
            Scenario::SlowSubscriber,
            Scenario::ProducerCost,
        ],
        one => vec![one],
    };

    let server = Server::start(args.database_url.as_deref()).await?;
    let facts = machine_facts(&server).await?;
    println!("outbox-relay benchmark");
    for (name, value) in &facts {
        println!("  {name:<18} {value}");
    }
    let config = relay_config(&args);
    println!(
        "  relay config       poll {:?} (busy {:?} for {:?}), lease {:?}, heartbeat {:?}, flush {:?}/{}, async commit {}, \
         dispatch batch {}, delivery batch {}, max concurrency {}, pool {}; subscriptions max_in_flight {}",
        config.poll_interval,
        config.busy_poll_interval,
        config.busy_linger,
        config.lease_duration,
        config.heartbeat_interval,
        config.flush_interval,
        config.flush_batch_size,
        config.async_commit,
        config.dispatch_batch_size,
        config.delivery_batch_size,
        config.max_concurrency,
        config.db_pool_size,
        args.max_in_flight
    );
    println!();

    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for scenario in scenarios {
        eprintln!("running {} (load average {})", scenario.name(), loadavg());
        let backstop = args.scenario_timeout + BACKSTOP_SLACK;
        match tokio::time::timeout(backstop, run_scenario(&args, &server, scenario)).await {
            Ok(Ok(mut scenario_rows)) => rows.append(&mut scenario_rows),
            Ok(Err(error)) => {
                eprintln!("scenario {} failed: {error:#}", scenario.name());
                failures.push(format!("{}: {error:#}", scenario.name()));
            }
            Err(_) => {
                // The scenario is stuck somewhere its own deadline does not reach; its tasks
                // may still hold the database, so stop here.
                eprintln!(
                    "scenario {} did not finish within {backstop:?}; aborting the benchmark",
                    scenario.name()
                );
                print_table(&rows);
                drop(server);
                std::process::exit(2);
            }
        }
    }

    println!("loadavg at end      {}", loadavg());
    println!();
    print_table(&rows);

    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "facts": facts.iter().cloned().collect::<BTreeMap<_, _>>(),
            "loadavg_end": loadavg(),
            "results": rows.iter().map(|r| serde_json::json!({
                "scenario": r.scenario, "metric": r.metric, "value": r.value, "unit": r.unit,
            })).collect::<Vec<_>>(),
            "failures": failures,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }

    server.stop().await;
    if !failures.is_empty() {
        bail!(
            "{} scenario(s) failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}
