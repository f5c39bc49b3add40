//! outbox-relay benchmark: throughput, fan-out, wake-up latency, slow-subscriber isolation
//! and the cost NOTIFY adds to producers. Run by hand, never by `cargo test`:
//!
//! ```sh
//! cargo bench --bench drain -- --scenario all          # or: --scenario latency, …
//! cargo bench --bench drain -- --help
//! ```
//!
//! Each scenario gets a fresh, migrated database, cloned from the integration tests' template
//! (`testkit::pg`): on a throwaway cluster (`TempPostgres`, the default; it runs with
//! fsync=off and synchronous_commit=off) or, with `--database-url`, as
//! `outbox_bench_<random>` created and dropped on that server. The relay runs in this process
//! (`relay::start`) against the tests' scripted receiver (`testkit::receiver`) on 127.0.0.1, in
//! a process of its own (`remote_receiver`, the bench binary started again); all traffic
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
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use chrono::{DateTime, Utc};
use clap::{Parser, ValueEnum};
use outbox_relay::config::{CidrList, RelayConfig};
use outbox_relay::relay::RelayHandle;

mod args;

use args::*;

mod backlog;

mod broker_target;
use broker_target::{Sink, Target};

mod database;

mod latency;

mod machine;

mod slow_subscriber;

use backlog::*;
use database::*;
use latency::*;
use machine::*;
use slow_subscriber::*;

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
    testkit::relay::start(relay_config(args), url).await
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
        db_errors: testkit::relay::db_errors(relay),
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
    let max_in_flight = max_in_flight.to_string();
    let (id, _secret) =
        testkit::outbox::add_subscription(client, name, url, &[("max_in_flight", &max_in_flight)])
            .await?;
    Ok(id)
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
