//! `producer_cost`: what the outbox costs the services that write to it. Producers commit
//! single-row INSERT transactions (synchronous_commit=on, as production runs) into
//! `outbox.events` while a relay delivers them, and, in alternating phases (ABBA, so drift
//! cancels), into a plain table with the same columns, defaults, constraints and indexes but
//! no trigger and nobody reading it. The relay keeps running through the plain phases, idle.
//!
//! Two measurements:
//! - throughput at each of `--producer-connections` (default 1, 8 and 32): transactions/s,
//!   outbox as a percentage of plain;
//! - commit latency at a steady rate (`--producer-steady-rate` over
//!   `--producer-steady-connections`): INSERT + COMMIT round trips, mean and p99.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{
    Args, ProducerRelayWork, Row, Server, connect, on_own_runtime, percentile,
    receiver_with_subscription, relay_counter_rows, relay_counters, row, start_relay, stop_relay,
    wait_all_delivered,
};

const SCENARIO: &str = "producer_cost";
const PATH: &str = "/producer";

/// Where a phase's producers write.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Table {
    /// `outbox.events`, with its triggers, while the relay delivers.
    Outbox,
    /// `bench_plain.events`: same shape, no trigger, no reader.
    Plain,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Outbox => "outbox",
            Table::Plain => "plain",
        }
    }

    fn insert_sql(self) -> &'static str {
        match self {
            Table::Outbox => {
                "INSERT INTO outbox.events (event_type, payload)
                 VALUES ('bench.producer', jsonb_build_object('seq', $1::bigint, 'pad', repeat('x', $2::int)))"
            }
            Table::Plain => {
                "INSERT INTO bench_plain.events (event_type, payload)
                 VALUES ('bench.producer', jsonb_build_object('seq', $1::bigint, 'pad', repeat('x', $2::int)))"
            }
        }
    }

    /// ABBA over rounds: round 0 outbox first, round 1 plain first, …
    fn order(round: u32) -> [Table; 2] {
        if round.is_multiple_of(2) {
            [Table::Outbox, Table::Plain]
        } else {
            [Table::Plain, Table::Outbox]
        }
    }
}

/// What one phase's producers are asked to do.
#[derive(Clone, Copy)]
enum Load {
    /// `transactions` as fast as the connections go.
    Flat { transactions: u64 },
    /// `rate` transactions/s in total, for `duration`.
    Steady { rate: f64, duration: Duration },
}

pub(crate) async fn producer_cost_scenario(
    args: &Args,
    server: &Server,
) -> anyhow::Result<Vec<Row>> {
    let deadline = tokio::time::Instant::now() + args.scenario_timeout;
    let (scenario, relay_doing) = match args.producer_relay_work {
        ProducerRelayWork::Deliver => (SCENARIO, "delivering"),
        ProducerRelayWork::DispatchOnly => ("producer_cost:dispatch_only", "dispatching only"),
    };
    if args.producer_connections.is_empty()
        || args.producer_connections.contains(&0)
        || args.producer_transactions == 0
        || args.producer_steady_connections == 0
    {
        bail!("producer connection counts and --producer-transactions must be at least 1");
    }
    if !(args.producer_steady_rate > 0.0 && args.producer_steady_rate <= 10_000.0) {
        bail!("--producer-steady-rate must be in (0, 10000]");
    }
    let db = server.fresh_db().await?;
    let result = async {
        let admin = connect(&db.url).await?;
        let fsync: String = admin.query_one("SHOW fsync", &[]).await?.get(0);
        if fsync != "on" {
            eprintln!(
                "  warning: fsync={fsync}: commits wait for no disk flush; use --database-url to a \
                 server with fsync=on for figures users see"
            );
        }
        // LIKE … INCLUDING ALL copies defaults, identity, CHECK constraints and indexes (the
        // partial ones too), never triggers: the producer's side of the table, nothing more.
        admin
            .batch_execute(
                "CREATE SCHEMA bench_plain;
                 CREATE TABLE bench_plain.events (LIKE outbox.events INCLUDING ALL);",
            )
            .await
            .context("creating the plain table")?;
        let _receiver =
            receiver_with_subscription(&admin, "bench-producer", PATH, args.max_in_flight).await?;
        if args.producer_relay_work == ProducerRelayWork::DispatchOnly {
            admin
                .execute(
                    "UPDATE outbox.subscriptions SET event_types = '{bench.nothing}'",
                    &[],
                )
                .await
                .context("making the subscription match nothing")?;
        }
        let relay = start_relay(args, &db.url).await?;
        let outcome = async {
            let before = relay_counters(&relay);
            let mut delivered_expected = 0u64;
            let mut rows = Vec::new();
            eprintln!(
                "  producer_cost: relay work {:?}, {} transactions per phase, {} round(s) ABBA, \
                 connections {:?}; steady {}/s over {} connections for {:?}",
                args.producer_relay_work,
                args.producer_transactions,
                args.producer_rounds,
                args.producer_connections,
                args.producer_steady_rate,
                args.producer_steady_connections,
                args.producer_steady_duration,
            );
            if args.producer_warmup > 0 {
                for table in [Table::Outbox, Table::Plain] {
                    let load = Load::Flat {
                        transactions: args.producer_warmup,
                    };
                    let phase =
                        run_phase(&db.url, table, 4, load, args.payload_pad, deadline).await?;
                    delivered_expected +=
                        relay_catches_up(&admin, table, &phase, delivered_expected, args, deadline)
                            .await?;
                }
            }

            for &connections in &args.producer_connections {
                let mut totals = [(0u64, Duration::ZERO); 2];
                for round in 0..args.producer_rounds {
                    for table in Table::order(round) {
                        let load = Load::Flat {
                            transactions: args.producer_transactions,
                        };
                        let phase = run_phase(
                            &db.url,
                            table,
                            connections,
                            load,
                            args.payload_pad,
                            deadline,
                        )
                        .await?;
                        let slot = &mut totals[table as usize];
                        slot.0 += phase.transactions;
                        slot.1 += phase.elapsed;
                        delivered_expected += relay_catches_up(
                            &admin,
                            table,
                            &phase,
                            delivered_expected,
                            args,
                            deadline,
                        )
                        .await?;
                    }
                }
                let rate = |(n, d): (u64, Duration)| n as f64 / d.as_secs_f64();
                let (outbox, plain) = (rate(totals[0]), rate(totals[1]));
                rows.push(row(
                    scenario,
                    &format!("c{connections} tx_per_s outbox (relay {relay_doing})"),
                    outbox,
                    "1/s",
                ));
                rows.push(row(
                    scenario,
                    &format!("c{connections} tx_per_s plain table"),
                    plain,
                    "1/s",
                ));
                rows.push(row(
                    scenario,
                    &format!("c{connections} outbox/plain"),
                    outbox / plain * 100.0,
                    "%",
                ));
            }

            let mut latencies: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
            for round in 0..args.producer_rounds {
                for table in Table::order(round) {
                    let load = Load::Steady {
                        rate: args.producer_steady_rate,
                        duration: args.producer_steady_duration,
                    };
                    let phase = run_phase(
                        &db.url,
                        table,
                        args.producer_steady_connections,
                        load,
                        args.payload_pad,
                        deadline,
                    )
                    .await?;
                    latencies[table as usize].extend_from_slice(&phase.commit_ms);
                    delivered_expected +=
                        relay_catches_up(&admin, table, &phase, delivered_expected, args, deadline)
                            .await?;
                }
            }
            let rate = args.producer_steady_rate;
            let mut summary = [(0.0, 0.0); 2];
            for table in [Table::Outbox, Table::Plain] {
                let values = &mut latencies[table as usize];
                values.sort_by(f64::total_cmp);
                let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
                let p99 = percentile(values, 0.99);
                summary[table as usize] = (mean, p99);
                rows.push(row(
                    scenario,
                    &format!("steady {rate}/s commit_ms mean {}", table.name()),
                    mean,
                    "ms",
                ));
                rows.push(row(
                    scenario,
                    &format!("steady {rate}/s commit_ms p99 {}", table.name()),
                    p99,
                    "ms",
                ));
            }
            rows.push(row(
                scenario,
                &format!("steady {rate}/s mean outbox/plain"),
                summary[0].0 / summary[1].0,
                "x",
            ));
            rows.push(row(
                scenario,
                &format!("steady {rate}/s p99 outbox/plain"),
                summary[0].1 / summary[1].1,
                "x",
            ));
            let after = relay_counters(&relay);
            rows.extend(relay_counter_rows(scenario, &before, &after));
            Ok(rows)
        }
        .await;
        stop_relay(relay).await;
        outcome
    }
    .await;
    server.drop_db(db, args.keep_databases).await;
    result
}

/// After an outbox phase, waits until the relay has delivered everything produced so far
/// (`delivered_before` plus this phase), so a plain phase never shares the machine with a
/// backlog. Returns how many deliveries the phase added.
async fn relay_catches_up(
    admin: &tokio_postgres::Client,
    table: Table,
    phase: &Phase,
    delivered_before: u64,
    args: &Args,
    deadline: tokio::time::Instant,
) -> anyhow::Result<u64> {
    if table != Table::Outbox {
        return Ok(0);
    }
    let delivered = match args.producer_relay_work {
        ProducerRelayWork::Deliver => phase.transactions,
        ProducerRelayWork::DispatchOnly => 0,
    };
    wait_all_delivered(
        admin,
        delivered_before + delivered,
        deadline,
        args.scenario_timeout,
    )
    .await?;
    Ok(delivered)
}

struct Phase {
    transactions: u64,
    elapsed: Duration,
    /// Per transaction, INSERT sent → COMMIT returned (steady phases only).
    commit_ms: Vec<f64>,
}

/// One phase on a thread and runtime of its own, so the in-process relay's work cannot delay
/// the moment a producer notes COMMIT returning.
async fn run_phase(
    url: &str,
    table: Table,
    connections: u64,
    load: Load,
    pad: i32,
    deadline: tokio::time::Instant,
) -> anyhow::Result<Phase> {
    let url = url.to_owned();
    on_own_runtime("bench-producers", move || async move {
        produce(&url, table, connections, load, pad, deadline).await
    })
    .await
}

async fn produce(
    url: &str,
    table: Table,
    connections: u64,
    load: Load,
    pad: i32,
    deadline: tokio::time::Instant,
) -> anyhow::Result<Phase> {
    let mut clients = Vec::new();
    for _ in 0..connections {
        let client = connect(url).await?;
        client
            .batch_execute("SET synchronous_commit = on")
            .await
            .context("setting synchronous_commit")?;
        let insert = client
            .prepare(table.insert_sql())
            .await
            .context("preparing the producer insert")?;
        clients.push((client, insert));
    }
    let (per_connection, period) = match load {
        Load::Flat { transactions } => (transactions.div_ceil(connections), None),
        Load::Steady { rate, duration } => {
            let total = (rate * duration.as_secs_f64()).round() as u64;
            let period = Duration::from_secs_f64(connections as f64 / rate);
            (total.div_ceil(connections), Some(period))
        }
    };
    let started = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, (client, insert)) in clients.into_iter().enumerate() {
        tasks.spawn(async move {
            let mut commit_ms = Vec::new();
            // Steady producers start spread over one period so their commits interleave.
            let offset = period.map_or(Duration::ZERO, |p| {
                p.mul_f64(index as f64 / connections as f64)
            });
            for seq in 0..per_connection {
                if tokio::time::Instant::now() >= deadline {
                    bail!("gave up: the scenario deadline passed while producing");
                }
                if let Some(period) = period {
                    tokio::time::sleep_until(started + offset + period.mul_f64(seq as f64)).await;
                }
                client.batch_execute("BEGIN").await.context("BEGIN")?;
                let sent = Instant::now();
                client
                    .execute(&insert, &[&(seq as i64), &pad])
                    .await
                    .context("INSERT")?;
                client.batch_execute("COMMIT").await.context("COMMIT")?;
                if period.is_some() {
                    commit_ms.push(sent.elapsed().as_secs_f64() * 1e3);
                }
            }
            anyhow::Ok((per_connection, commit_ms))
        });
    }
    let mut phase = Phase {
        transactions: 0,
        elapsed: Duration::ZERO,
        commit_ms: Vec::new(),
    };
    while let Some(joined) = tasks.join_next().await {
        let (count, mut commit_ms) = joined.context("producer task panicked")??;
        phase.transactions += count;
        phase.commit_ms.append(&mut commit_ms);
    }
    phase.elapsed = started.elapsed();
    Ok(phase)
}
