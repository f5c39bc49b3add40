//! `footprint`: what a relay costs besides CPU.
//!
//! (a) Memory: the real binary in a process of its own (`relay_process`) drains `--events`
//! committed before it starts; its resident set (`/proc/<pid>/status` VmRSS) is sampled every
//! 200 ms: peak, the kernel's high-water mark (VmHWM, which catches a peak between samples)
//! and the figure once drained. With `--soak-duration D`, it then gets a steady
//! `--latency-rate` of single-event transactions for D: RSS at the start and end of the soak,
//! its range and its slope show whether memory stays flat (no growth per event handled).
//!
//! (b) Disk: `--footprint-events` events inserted in large `generate_series` batches while a
//! relay delivers them; sizes of events, deliveries and delivery_attempts (total, heap,
//! indexes); then the relay's own retention statement (`PURGE_EXPIRED_EVENTS`, with a
//! retention of 0 s so every finished event qualifies, in larger batches than the relay's
//! 1000 so it takes seconds, not the relay's paced minutes), a plain VACUUM, and the sizes
//! again: what retention gives back without VACUUM FULL.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::relay_process::{RelayGroup, RelayProcess, kib_to_mib};
use super::{
    Args, Row, Server, connect, insert_events, receiver_with_subscription, row, wait_all_delivered,
};

const SCENARIO: &str = "footprint";
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// Events per INSERT … generate_series statement in (b): large, as a bulk producer would
/// commit, and small enough that the relay starts on the first batch while the rest follow.
const INSERT_BATCH: u64 = 50_000;
/// Events per retention statement in (b). The relay deletes 1000 per statement with a pause
/// in between (a background task that must not hold locks for long); here only the end
/// state matters.
const PURGE_BATCH: i64 = 10_000;
const TABLES: [(&str, &str); 3] = [
    ("outbox.events", "events"),
    ("outbox.deliveries", "deliveries"),
    ("outbox.delivery_attempts", "attempts"),
];

pub async fn footprint_scenario(args: &Args, server: &Server) -> anyhow::Result<Vec<Row>> {
    let deadline = tokio::time::Instant::now() + args.scenario_timeout;
    if args.events == 0 {
        bail!("--events must be at least 1");
    }
    if !args.soak_duration.is_zero() {
        if args.soak_duration >= args.scenario_timeout {
            bail!(
                "--soak-duration {:?} must be shorter than --scenario-timeout {:?}: the soak runs \
                 within the scenario's deadline (e.g. --scenario-timeout 20m for a 10m soak)",
                args.soak_duration,
                args.scenario_timeout
            );
        }
        if !(args.latency_rate > 0.0 && args.latency_rate <= 10_000.0) {
            bail!("--latency-rate (the soak's publish rate) must be in (0, 10000]");
        }
    }
    let mut rows = relay_memory(args, server, deadline)
        .await
        .context("(a) relay memory")?;
    if args.footprint_events > 0 {
        rows.extend(
            table_sizes(args, server, deadline)
                .await
                .context("(b) table and index sizes")?,
        );
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// (a) relay memory
// ---------------------------------------------------------------------------------------------

/// RSS samples, KiB, with the time since sampling began.
type Samples = Vec<(Duration, u64)>;

async fn relay_memory(
    args: &Args,
    server: &Server,
    deadline: tokio::time::Instant,
) -> anyhow::Result<Vec<Row>> {
    const PATH: &str = "/footprint";
    let db = server.fresh_db().await?;
    let result = async {
        let client = connect(&db.url).await?;
        let _receiver =
            receiver_with_subscription(&client, "bench-footprint", PATH, args.max_in_flight)
                .await?;
        let insert_time =
            insert_events(&client, "bench.footprint", args.events, args.payload_pad).await?;
        eprintln!(
            "  footprint: {} events inserted in {:.2}s; starting the relay process",
            args.events,
            insert_time.as_secs_f64()
        );
        let mut group = RelayGroup::default();
        let outcome = async {
            group.spawn(args, &db.url, "bench-footprint")?;
            let relay = group
                .relays
                .last_mut()
                .context("the relay just started is in the group")?;
            let started = Instant::now();
            let mut drain = Samples::new();
            sample_rss_while(
                relay,
                &mut drain,
                wait_all_delivered(&client, args.events, deadline, args.scenario_timeout),
            )
            .await?;
            let drained = relay.memory()?;
            // The reading at the end counts too: a short drain may end between samples.
            let peak = drain
                .iter()
                .map(|(_, kib)| *kib)
                .chain([drained.rss_kib])
                .max()
                .unwrap_or(drained.rss_kib);
            eprintln!(
                "  footprint: drained in {:.2}s; {} RSS samples",
                started.elapsed().as_secs_f64(),
                drain.len()
            );
            let mut rows = vec![
                row(SCENARIO, "drain events", args.events as f64, "count"),
                row(
                    SCENARIO,
                    "rss_peak_mib (drain, sampled every 200ms)",
                    kib_to_mib(peak),
                    "MiB",
                ),
                row(
                    SCENARIO,
                    "rss_hwm_mib (drain, VmHWM)",
                    kib_to_mib(drained.hwm_kib),
                    "MiB",
                ),
                row(
                    SCENARIO,
                    "rss_end_mib (drained)",
                    kib_to_mib(drained.rss_kib),
                    "MiB",
                ),
            ];
            if !args.soak_duration.is_zero() {
                rows.extend(soak(args, &db.url, &client, relay, deadline).await?);
            }
            anyhow::Ok(rows)
        }
        .await;
        let stopped = group.stop_all().await;
        let rows = outcome?;
        stopped.context("stopping the relay process")?;
        Ok(rows)
    }
    .await;
    server.drop_db(db, args.keep_databases).await;
    result
}

/// A steady publish rate for `--soak-duration` against the idle, drained relay.
async fn soak(
    args: &Args,
    url: &str,
    client: &tokio_postgres::Client,
    relay: &mut RelayProcess,
    deadline: tokio::time::Instant,
) -> anyhow::Result<Vec<Row>> {
    eprintln!(
        "  footprint: soak, {}/s single-event transactions for {:?}",
        args.latency_rate, args.soak_duration
    );
    let mut samples = Samples::new();
    let published =
        sample_rss_while(relay, &mut samples, publish_steady(url, args, deadline)).await?;
    let end = relay.memory()?;
    // Whatever the last transactions produced must still be delivered: a soak that falls
    // behind is not a flat one.
    let mut catching_up = Samples::new();
    sample_rss_while(
        relay,
        &mut catching_up,
        wait_all_delivered(
            client,
            args.events + published,
            deadline,
            args.scenario_timeout,
        ),
    )
    .await?;
    let (Some(first), Some(_)) = (samples.first(), samples.last()) else {
        bail!("no RSS sample was taken during the soak");
    };
    let start_kib = first.1;
    let max_kib = samples.iter().map(|(_, kib)| *kib).max().unwrap_or(0);
    let min_kib = samples.iter().map(|(_, kib)| *kib).min().unwrap_or(0);
    print_timeline(&samples, args.soak_duration);
    Ok(vec![
        row(SCENARIO, "soak events", published as f64, "count"),
        row(SCENARIO, "soak_rss_start_mib", kib_to_mib(start_kib), "MiB"),
        row(SCENARIO, "soak_rss_end_mib", kib_to_mib(end.rss_kib), "MiB"),
        row(SCENARIO, "soak_rss_min_mib", kib_to_mib(min_kib), "MiB"),
        row(SCENARIO, "soak_rss_max_mib", kib_to_mib(max_kib), "MiB"),
        row(
            SCENARIO,
            "soak_rss_slope_mib_per_min (least squares)",
            slope_mib_per_min(&samples),
            "MiB/min",
        ),
    ])
}

/// Runs `work` while sampling the relay's RSS every [`RSS_SAMPLE_EVERY`] into `samples`;
/// fails at once if the relay exits.
async fn sample_rss_while<T>(
    relay: &mut RelayProcess,
    samples: &mut Samples,
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let started = Instant::now();
    let sampler = async {
        let mut ticks = tokio::time::interval(RSS_SAMPLE_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if let Err(error) = relay.check_alive() {
                return error;
            }
            match relay.memory() {
                Ok(memory) => samples.push((started.elapsed(), memory.rss_kib)),
                Err(error) => return error,
            }
        }
    };
    tokio::select! {
        result = work => result,
        error = sampler => Err(error),
    }
}

/// Single-event transactions at `--latency-rate` for `--soak-duration`; returns how many.
async fn publish_steady(
    url: &str,
    args: &Args,
    deadline: tokio::time::Instant,
) -> anyhow::Result<u64> {
    let client = connect(url).await?;
    let insert = client
        .prepare(
            "INSERT INTO outbox.events (event_type, payload)
             VALUES ('bench.soak', jsonb_build_object('seq', $1::bigint, 'pad', repeat('x', $2::int)))",
        )
        .await
        .context("preparing the soak insert")?;
    let period = Duration::from_secs_f64(1.0 / args.latency_rate);
    let count = (args.latency_rate * args.soak_duration.as_secs_f64()).round() as u64;
    let start = tokio::time::Instant::now();
    for seq in 0..count {
        tokio::time::sleep_until(start + period.mul_f64(seq as f64)).await;
        if tokio::time::Instant::now() >= deadline {
            bail!("gave up: the scenario deadline passed during the soak");
        }
        // One statement in autocommit: one transaction, one NOTIFY, as a producer commits.
        client
            .execute(&insert, &[&(seq as i64), &args.payload_pad])
            .await
            .context("publishing a soak event")?;
    }
    Ok(count)
}

/// About 20 lines of (time, RSS) on stderr, so growth over the soak is visible.
fn print_timeline(samples: &Samples, duration: Duration) {
    let step = (duration / 20).max(RSS_SAMPLE_EVERY);
    let mut next = Duration::ZERO;
    let mut line = Vec::new();
    for (at, kib) in samples {
        if *at >= next {
            line.push(format!("{:.1}s {:.1}", at.as_secs_f64(), kib_to_mib(*kib)));
            next = *at + step;
        }
    }
    eprintln!("  footprint: soak RSS (MiB) over time: {}", line.join(", "));
}

/// Least-squares slope of RSS over time.
fn slope_mib_per_min(samples: &Samples) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let xs = samples.iter().map(|(at, _)| at.as_secs_f64() / 60.0);
    let ys = samples.iter().map(|(_, kib)| kib_to_mib(*kib));
    let mean_x = xs.clone().sum::<f64>() / n;
    let mean_y = ys.clone().sum::<f64>() / n;
    let (mut covariance, mut variance) = (0.0, 0.0);
    for (x, y) in xs.zip(ys) {
        covariance += (x - mean_x) * (y - mean_y);
        variance += (x - mean_x) * (x - mean_x);
    }
    if variance == 0.0 {
        0.0
    } else {
        covariance / variance
    }
}

// ---------------------------------------------------------------------------------------------
// (b) table and index sizes
// ---------------------------------------------------------------------------------------------

async fn table_sizes(
    args: &Args,
    server: &Server,
    deadline: tokio::time::Instant,
) -> anyhow::Result<Vec<Row>> {
    const PATH: &str = "/footprint-sizes";
    let events = args.footprint_events;
    let db = server.fresh_db().await?;
    let result = async {
        let client = connect(&db.url).await?;
        let _receiver =
            receiver_with_subscription(&client, "bench-footprint-sizes", PATH, args.max_in_flight).await?;
        eprintln!(
            "  footprint: inserting {events} events in batches of {INSERT_BATCH} while a relay process delivers them"
        );
        let started = Instant::now();
        let mut group = RelayGroup::default();
        let outcome = async {
            group.spawn(args, &db.url, "bench-footprint-sizes")?;
            let work = async {
                let mut left = events;
                while left > 0 {
                    if tokio::time::Instant::now() >= deadline {
                        bail!("gave up: the scenario deadline passed while inserting");
                    }
                    let batch = left.min(INSERT_BATCH);
                    insert_events(&client, "bench.footprint", batch, args.payload_pad).await?;
                    left -= batch;
                }
                wait_all_delivered(&client, events, deadline, args.scenario_timeout).await?;
                // Retention only deletes events the ordered-dispatch cursor has passed; the
                // dispatcher moves it along once per poll interval.
                wait_for_cursor(&client, deadline).await
            };
            tokio::select! {
                done = work => done,
                error = group.watch() => Err(error),
            }
        }
        .await;
        // The sizes are taken at rest: no relay writing (its retention is off anyway).
        let stopped = group.stop_all().await;
        outcome?;
        stopped.context("stopping the relay process")?;
        let delivered_s = started.elapsed().as_secs_f64();

        let before = sizes(&client).await?;
        let retention_started = Instant::now();
        let purged = purge_all(&client, deadline).await?;
        if purged != events {
            bail!("retention deleted {purged} events, expected all {events}");
        }
        let retention_s = retention_started.elapsed().as_secs_f64();
        let vacuum_started = Instant::now();
        for (table, _) in TABLES {
            // One statement per call: VACUUM refuses a multi-statement query's transaction.
            client
                .batch_execute(&format!("VACUUM {table}"))
                .await
                .with_context(|| format!("vacuuming {table}"))?;
        }
        let vacuum_s = vacuum_started.elapsed().as_secs_f64();
        let after = sizes(&client).await?;
        eprintln!(
            "  footprint: {events} events delivered in {delivered_s:.1}s; retention {retention_s:.1}s, VACUUM {vacuum_s:.1}s"
        );

        let mut rows = vec![
            row(SCENARIO, "sizes events", events as f64, "count"),
            row(
                SCENARIO,
                "sizes insert+deliver_s",
                delivered_s,
                "s",
            ),
            row(SCENARIO, "sizes retention_s", retention_s, "s"),
            row(SCENARIO, "sizes vacuum_s", vacuum_s, "s"),
        ];
        let total_bytes: i64 = before.iter().map(|s| s.total).sum();
        rows.push(row(
            SCENARIO,
            "sizes bytes_per_event (3 tables, delivered)",
            total_bytes as f64 / events as f64,
            "B",
        ));
        for (when, sizes) in [("delivered", &before), ("after retention+VACUUM", &after)] {
            for s in sizes {
                rows.push(row(
                    SCENARIO,
                    &format!("{} total_mib ({when})", s.label),
                    mib(s.total),
                    "MiB",
                ));
                rows.push(row(
                    SCENARIO,
                    &format!("{} heap_mib ({when})", s.label),
                    mib(s.heap),
                    "MiB",
                ));
                rows.push(row(
                    SCENARIO,
                    &format!("{} indexes_mib ({when})", s.label),
                    mib(s.indexes),
                    "MiB",
                ));
                rows.push(row(
                    SCENARIO,
                    &format!("{} rows ({when})", s.label),
                    s.rows as f64,
                    "count",
                ));
            }
        }
        Ok(rows)
    }
    .await;
    server.drop_db(db, args.keep_databases).await;
    result
}

/// Waits until the ordered-dispatch cursor has passed the last event.
async fn wait_for_cursor(
    client: &tokio_postgres::Client,
    deadline: tokio::time::Instant,
) -> anyhow::Result<()> {
    loop {
        let row = client
            .query_one(
                "SELECT (SELECT last_event_id FROM outbox.ordered_dispatch_cursor),
                        (SELECT coalesce(max(id), 0) FROM outbox.events)",
                &[],
            )
            .await
            .context("reading the ordered-dispatch cursor")?;
        let (cursor, last): (i64, i64) = (row.get(0), row.get(1));
        if cursor >= last {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("gave up: the ordered-dispatch cursor is at event {cursor}, the last is {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The relay's retention statement, with a retention of 0 s, until it deletes no more.
async fn purge_all(
    client: &tokio_postgres::Client,
    deadline: tokio::time::Instant,
) -> anyhow::Result<u64> {
    let purge = client
        .prepare(outbox_relay::db::sql::PURGE_EXPIRED_EVENTS.sql)
        .await
        .context("preparing the retention statement")?;
    let mut total = 0;
    loop {
        if tokio::time::Instant::now() >= deadline {
            bail!("gave up: the scenario deadline passed during retention ({total} deleted)");
        }
        let deleted = client
            .execute(&purge, &[&0.0f64, &PURGE_BATCH])
            .await
            .context("running retention")?;
        total += deleted;
        if deleted < PURGE_BATCH as u64 {
            return Ok(total);
        }
    }
}

struct Size {
    label: &'static str,
    /// pg_total_relation_size: heap, TOAST, free-space and visibility maps, indexes.
    total: i64,
    /// pg_relation_size: the heap's main fork.
    heap: i64,
    /// pg_indexes_size.
    indexes: i64,
    rows: i64,
}

async fn sizes(client: &tokio_postgres::Client) -> anyhow::Result<Vec<Size>> {
    let mut sizes = Vec::new();
    for (table, label) in TABLES {
        // Table names are the constants above, not input.
        let row = client
            .query_one(
                &format!(
                    "SELECT pg_total_relation_size('{table}'), pg_relation_size('{table}'),
                            pg_indexes_size('{table}'), (SELECT count(*) FROM {table})"
                ),
                &[],
            )
            .await
            .with_context(|| format!("measuring {table}"))?;
        sizes.push(Size {
            label,
            total: row.get(0),
            heap: row.get(1),
            indexes: row.get(2),
            rows: row.get(3),
        });
    }
    Ok(sizes)
}

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
