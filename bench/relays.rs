//! `three_relays`: does a second and third relay add throughput, and do they stay out of each
//! other's way? The `drain` backlog (N events committed first, one subscription to the
//! out-of-process receiver) drained once by 1 relay and once by 3 relays at the same time,
//! each relay a separate process running the real binary (`relay_process`), as a deployment
//! with replicas runs them. Phases alternate ABBA over `--relay-rounds` (1, 3, 3, 1, …), each
//! on a fresh database, so drift over the sitting (another load on the machine, the server's
//! caches) falls on both sides alike.
//!
//! Checked per phase: every delivery `delivered` (`wait_all_delivered`) and every event at
//! the receiver; reported: requests the receiver saw twice (the coordination through leases
//! is meant to leave none), deliveries that needed more than one attempt, and what the
//! relays' sessions were waiting on, sampled from `pg_stat_activity`, so a slowdown with 3
//! relays can be told apart as lock waits, WAL or CPU.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use chrono::Utc;

use super::relay_process::{Metrics, RELAY_APPLICATION_NAME_LIKE, RelayGroup};
use super::{
    Args, Row, Server, arrivals, connect, delivered_per_subscription, insert_events,
    receiver_with_subscription, row, seconds_between, wait_all_delivered,
};

const SCENARIO: &str = "three_relays";
const PATH: &str = "/three_relays";
/// How often `pg_stat_activity` is sampled: often enough for a few hundred samples in a
/// 10-second drain, rarely enough that the sampling query is not part of the load.
const WAIT_SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// What one phase measured.
struct Phase {
    relays: usize,
    deliveries: u64,
    /// Relay spawn → last `delivered_at`.
    drain_s: f64,
    /// Relay spawn → first `delivered_at` (process start, connect, first claim).
    first_delivery_s: f64,
    duplicates: u64,
    retried: u64,
    metrics: Vec<Metrics>,
    waits: WaitSamples,
}

/// `pg_stat_activity` samples of the relays' active sessions.
#[derive(Default)]
struct WaitSamples {
    samples: u64,
    /// Sum over samples of active sessions, and of those waiting on a heavyweight lock.
    active: u64,
    lock_waiting: u64,
    /// `wait_event_type:wait_event` (or `CPU` when active and not waiting) → session-samples.
    by_event: BTreeMap<String, u64>,
}

pub async fn three_relays_scenario(args: &Args, server: &Server) -> anyhow::Result<Vec<Row>> {
    let deadline = tokio::time::Instant::now() + args.scenario_timeout;
    if args.relay_rounds == 0 || args.events == 0 {
        bail!("--relay-rounds and --events must be at least 1");
    }
    let mut phases = Vec::new();
    for round in 0..args.relay_rounds {
        let order = if round % 2 == 0 { [1, 3] } else { [3, 1] };
        for relays in order {
            let number = phases.len() + 1;
            let phase = run_phase(args, server, relays, number, deadline)
                .await
                .with_context(|| format!("phase {number} ({relays} relay process(es))"))?;
            phases.push(phase);
        }
    }
    Ok(rows(&phases))
}

async fn run_phase(
    args: &Args,
    server: &Server,
    relay_count: usize,
    number: usize,
    deadline: tokio::time::Instant,
) -> anyhow::Result<Phase> {
    let db = server.fresh_db().await?;
    let result = async {
        let client = connect(&db.url).await?;
        let sampler = connect(&db.url).await?;
        let receiver =
            receiver_with_subscription(&client, "bench-relays", PATH, args.max_in_flight).await?;
        let insert_time =
            insert_events(&client, "bench.relays", args.events, args.payload_pad).await?;
        if args.analyze_before {
            client.batch_execute("ANALYZE outbox.events").await?;
        }
        eprintln!(
            "  three_relays phase {number}: {} events inserted in {:.2}s; starting {relay_count} relay process(es)",
            args.events,
            insert_time.as_secs_f64()
        );

        let http = reqwest::Client::new();
        let mut group = RelayGroup::default();
        let mut waits = WaitSamples::default();
        let start_wall = Utc::now();
        let start = Instant::now();
        let outcome = async {
            for i in 0..relay_count {
                group.spawn(args, &db.url, &format!("bench-{number}-{i}"))?;
            }
            tokio::select! {
                waited = wait_all_delivered(&client, args.events, deadline, args.scenario_timeout) => waited?,
                error = group.watch() => return Err(error),
                never = sample_waits(&sampler, &mut waits) => match never {},
            }
            let mut metrics = Vec::new();
            for relay in &group.relays {
                metrics.push(relay.metrics(&http).await?);
            }
            anyhow::Ok(metrics)
        }
        .await;
        // Always, also when the phase failed: no relay process outlives its phase.
        let stopped = group.stop_all().await;
        let metrics = outcome?;
        stopped.context("stopping the relay processes")?;

        let per_sub = delivered_per_subscription(&client).await?;
        let last_delivered = per_sub
            .values()
            .map(|(_, at)| *at)
            .max()
            .ok_or_else(|| anyhow!("nothing delivered"))?;
        let first_delivered: chrono::DateTime<Utc> = client
            .query_one(
                "SELECT min(delivered_at) FROM outbox.deliveries WHERE status = 'delivered'",
                &[],
            )
            .await
            .context("reading the first delivery time")?
            .get::<_, Option<_>>(0)
            .ok_or_else(|| anyhow!("nothing delivered"))?;
        // attempts counts the requests made for a delivery: more than one means a retry
        // (a failed request, or a lease that expired and was taken over).
        let retried: i64 = client
            .query_one(
                "SELECT count(*) FROM outbox.deliveries WHERE attempts > 1",
                &[],
            )
            .await
            .context("counting retried deliveries")?
            .get(0);
        let seen = arrivals(&receiver, PATH, start).await?;
        if seen.distinct as u64 != args.events {
            bail!(
                "the receiver saw {} distinct deliveries, expected {}",
                seen.distinct,
                args.events
            );
        }
        let phase = Phase {
            relays: relay_count,
            deliveries: args.events,
            drain_s: seconds_between(start_wall, last_delivered),
            first_delivery_s: seconds_between(start_wall, first_delivered),
            duplicates: (seen.requests - seen.distinct) as u64,
            retried: u64::try_from(retried).unwrap_or(0),
            metrics,
            waits,
        };
        report_phase(number, &phase);
        Ok(phase)
    }
    .await;
    server.drop_db(db, args.keep_databases).await;
    result
}

/// Samples the relays' active sessions until dropped (the drain finishing ends the `select!`
/// it runs in). A failed sample is reported once and sampling stops; the drain goes on.
async fn sample_waits(client: &tokio_postgres::Client, waits: &mut WaitSamples) -> Infallible {
    let query = match client
        .prepare(
            "SELECT CASE WHEN wait_event_type IS NULL THEN 'CPU'
                         ELSE wait_event_type || ':' || wait_event END,
                    wait_event_type IS NOT DISTINCT FROM 'Lock',
                    count(*)
               FROM pg_stat_activity
              WHERE datname = current_database() AND state = 'active'
                AND application_name LIKE $1
              GROUP BY 1, 2",
        )
        .await
    {
        Ok(query) => query,
        Err(error) => {
            eprintln!("warning: not sampling pg_stat_activity: {error:#}");
            return std::future::pending().await;
        }
    };
    let mut ticks = tokio::time::interval(WAIT_SAMPLE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let rows = match client.query(&query, &[&RELAY_APPLICATION_NAME_LIKE]).await {
            Ok(rows) => rows,
            Err(error) => {
                eprintln!("warning: sampling pg_stat_activity stopped: {error:#}");
                return std::future::pending().await;
            }
        };
        waits.samples += 1;
        for r in rows {
            let event: String = r.get(0);
            let is_lock: bool = r.get(1);
            let sessions = u64::try_from(r.get::<_, i64>(2)).unwrap_or(0);
            waits.active += sessions;
            if is_lock {
                waits.lock_waiting += sessions;
            }
            *waits.by_event.entry(event).or_default() += sessions;
        }
    }
}

/// One stderr line per phase, with its top wait events: the table has the averages.
fn report_phase(number: usize, phase: &Phase) {
    let mut events: Vec<(&String, &u64)> = phase.waits.by_event.iter().collect();
    events.sort_by(|a, b| b.1.cmp(a.1));
    let samples = phase.waits.samples.max(1) as f64;
    let top = events
        .iter()
        .take(6)
        .map(|(event, n)| format!("{event} {:.2}", **n as f64 / samples))
        .collect::<Vec<_>>()
        .join(", ");
    let split = phase
        .metrics
        .iter()
        .map(|m| format!("{:.0}", m.delivered))
        .collect::<Vec<_>>()
        .join("/");
    eprintln!(
        "  three_relays phase {number}: {} relay(s) drained {} in {:.2}s ({:.0}/s), per relay {split}; \
         duplicates {}, retried {}; relay sessions active on average by wait event ({} samples): {}",
        phase.relays,
        phase.deliveries,
        phase.drain_s,
        phase.deliveries as f64 / phase.drain_s,
        phase.duplicates,
        phase.retried,
        phase.waits.samples,
        if top.is_empty() { "none seen" } else { &top }
    );
}

fn rows(phases: &[Phase]) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut rates = BTreeMap::new();
    for relays in [1, 3] {
        let of: Vec<&Phase> = phases.iter().filter(|p| p.relays == relays).collect();
        let label = if relays == 1 { "1 relay" } else { "3 relays" };
        let deliveries: u64 = of.iter().map(|p| p.deliveries).sum();
        let drain: f64 = of.iter().map(|p| p.drain_s).sum();
        let rate = deliveries as f64 / drain;
        rates.insert(relays, rate);
        let samples: u64 = of.iter().map(|p| p.waits.samples).sum();
        let per_sample = |total: u64| total as f64 / samples.max(1) as f64;
        let metric = |f: fn(&Metrics) -> f64| -> f64 {
            of.iter().flat_map(|p| p.metrics.iter()).map(f).sum()
        };
        rows.push(row(
            SCENARIO,
            &format!("deliveries_per_s {label}"),
            rate,
            "1/s",
        ));
        rows.push(row(
            SCENARIO,
            &format!("first_delivery_s {label} (spawn → first delivered_at, mean)"),
            of.iter().map(|p| p.first_delivery_s).sum::<f64>() / of.len().max(1) as f64,
            "s",
        ));
        rows.push(row(
            SCENARIO,
            &format!("duplicate_requests {label}"),
            of.iter().map(|p| p.duplicates).sum::<u64>() as f64,
            "count",
        ));
        rows.push(row(
            SCENARIO,
            &format!("retried_deliveries {label} (attempts > 1)"),
            of.iter().map(|p| p.retried).sum::<u64>() as f64,
            "count",
        ));
        rows.push(row(
            SCENARIO,
            &format!("relay_db_errors {label}"),
            metric(|m| m.db_errors),
            "count",
        ));
        let reclaimed = metric(|m| m.leases_reclaimed);
        if reclaimed > 0.0 {
            rows.push(row(
                SCENARIO,
                &format!("leases_reclaimed {label}"),
                reclaimed,
                "count",
            ));
        }
        rows.push(row(
            SCENARIO,
            &format!("relay_sessions_active_avg {label}"),
            per_sample(of.iter().map(|p| p.waits.active).sum()),
            "sessions",
        ));
        rows.push(row(
            SCENARIO,
            &format!("relay_sessions_lock_wait_avg {label}"),
            per_sample(of.iter().map(|p| p.waits.lock_waiting).sum()),
            "sessions",
        ));
    }
    if let (Some(one), Some(three)) = (rates.get(&1), rates.get(&3)) {
        rows.push(row(
            SCENARIO,
            "ratio deliveries_per_s 3 relays / 1 relay",
            three / one,
            "x",
        ));
    }
    // How evenly the three shared the work (from each relay's own delivered counter).
    let smallest_share = phases
        .iter()
        .filter(|p| p.relays == 3)
        .filter_map(|p| {
            let total: f64 = p.metrics.iter().map(|m| m.delivered).sum();
            p.metrics
                .iter()
                .map(|m| m.delivered / total * 100.0)
                .min_by(f64::total_cmp)
        })
        .min_by(f64::total_cmp);
    if let Some(share) = smallest_share {
        rows.push(row(
            SCENARIO,
            "smallest_relay_share_pct 3 relays (33.3 = even)",
            share,
            "%",
        ));
    }
    for (i, p) in phases.iter().enumerate() {
        rows.push(row(
            SCENARIO,
            &format!(
                "phase{} deliveries_per_s ({} relay{})",
                i + 1,
                p.relays,
                if p.relays == 1 { "" } else { "s" }
            ),
            p.deliveries as f64 / p.drain_s,
            "1/s",
        ));
    }
    rows
}
