//! `drain` and `fanout`: a backlog committed before the relay starts, timed from the relay's
//! start to the last `delivered_at`.

use super::*;

/// Inserts `count` events that look fully processed (dispatched, one delivered delivery each to
/// a disabled subscription), then ANALYZEs, as autovacuum would have long since done.
pub(super) async fn insert_history(
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

/// Per subscription: deliveries delivered and the last `delivered_at`.
pub(super) async fn delivered_per_subscription(
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

pub(super) async fn last_dispatched_at(
    client: &tokio_postgres::Client,
) -> anyhow::Result<DateTime<Utc>> {
    client
        .query_one("SELECT max(dispatched_at) FROM outbox.events", &[])
        .await
        .context("reading dispatch times")?
        .get::<_, Option<DateTime<Utc>>>(0)
        .ok_or_else(|| anyhow!("no event was dispatched"))
}

pub(super) fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

/// What reached the receiver: requests, distinct webhook ids, last arrival after `start`.
pub(super) struct Arrivals {
    pub(super) requests: usize,
    pub(super) distinct: usize,
    pub(super) last_after_start: Duration,
}

pub(super) async fn arrivals(
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
pub(super) async fn backlog_scenario(
    args: &Args,
    server: &Server,
    scenario: &'static str,
    events: u64,
    subscriptions: u32,
) -> anyhow::Result<Vec<Row>> {
    let deadline = tokio::time::Instant::now() + args.scenario_timeout;
    let db = server.fresh_db().await?;
    let scenario: &'static str = match args.target {
        Target::Webhook => scenario,
        // One short label per run of a bench binary: leaking it is simpler than owning it.
        target => Box::leak(
            format!("{scenario}:{target:?}")
                .to_lowercase()
                .into_boxed_str(),
        ),
    };
    let mut sinks = Vec::new();
    let result = async {
        let client = connect(&db.url).await?;
        let receiver = RemoteReceiver::start().await?;
        let mut paths = Vec::new();
        for i in 0..subscriptions {
            let path = format!("/{scenario}/{i}");
            let name = format!("bench-{}-{i}", scenario.replace(':', "-"));
            let url = if args.target == Target::Webhook {
                receiver.url(&path)
            } else {
                let sink = Sink::create(args, &name).await?;
                let url = sink.url();
                sinks.push(sink);
                url
            };
            add_subscription(&client, &name, &url, args.max_in_flight).await?;
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
        if args.target != Target::Webhook {
            // The broker holds what arrived; its arrival times are not read back, so the
            // last arrival is the last delivered_at (the confirm came before it).
            let mut stored = 0;
            for sink in &sinks {
                stored += sink.stored().await?;
            }
            requests = usize::try_from(stored).unwrap_or(usize::MAX);
            distinct = usize::try_from(expected).unwrap_or(usize::MAX);
            last_arrival = Duration::from_secs_f64(drain.max(0.0));
            if stored < expected {
                bail!("the broker holds {stored} messages, expected {expected}");
            }
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
    for sink in sinks {
        sink.remove().await;
    }
    server.drop_db(db, args.keep_databases).await;
    result
}
