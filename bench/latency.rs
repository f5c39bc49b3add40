//! `latency`: events published one per transaction at a steady rate, timed from COMMIT to the
//! request at the receiver.

use super::*;

pub(super) async fn latency_scenario(args: &Args, server: &Server) -> anyhow::Result<Vec<Row>> {
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
    let scenario: &'static str = match args.target {
        Target::Webhook => SCENARIO,
        // One short label per run of a bench binary: leaking it is simpler than owning it.
        target => Box::leak(
            format!("{SCENARIO}:{target:?}")
                .to_lowercase()
                .into_boxed_str(),
        ),
    };
    let mut sink = None;
    let result = async {
        let client = connect(&db.url).await?;
        let receiver =
            receiver_with_subscription(&client, "bench-latency", PATH, args.max_in_flight).await?;
        // A broker target: the subscription publishes to its sink, and a consumer notes the
        // arrivals (the receiver above then gets nothing).
        let watch = if args.target == Target::Webhook {
            None
        } else {
            client
                .execute("DELETE FROM outbox.subscriptions", &[])
                .await
                .context("replacing the receiver's subscription")?;
            let created = sink.insert(Sink::create(args, "bench-latency").await?);
            add_subscription(&client, "bench-latency", &created.url(), args.max_in_flight).await?;
            Some(created.watch().await?)
        };
        let arrived = async || -> anyhow::Result<u64> {
            Ok(match &watch {
                None => receiver.received(PATH).await?.len() as u64,
                Some(watch) => watch
                    .arrivals
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .len() as u64,
            })
        };
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
                if arrived().await? >= count {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    bail!(
                        "gave up after {:?}: {} of {count} events arrived",
                        args.scenario_timeout,
                        arrived().await?
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
        if let Some(watch) = &watch {
            first_arrival = watch
                .arrivals
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone();
        }
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
            row(scenario, "events", latencies_ms.len() as f64, "count"),
            row(scenario, "p50_ms", percentile(&latencies_ms, 0.50), "ms"),
            row(scenario, "p90_ms", percentile(&latencies_ms, 0.90), "ms"),
            row(scenario, "p99_ms", percentile(&latencies_ms, 0.99), "ms"),
            row(
                scenario,
                "max_ms",
                *latencies_ms.last().unwrap_or(&0.0),
                "ms",
            ),
            row(scenario, "mean_ms", mean, "ms"),
        ];
        rows.extend(relay_counter_rows(scenario, &before, &after));
        Ok(rows)
    }
    .await;
    if let Some(sink) = sink {
        sink.remove().await;
    }
    server.drop_db(db, args.keep_databases).await;
    result
}

/// Publishes `count` events, one transaction each, one every `period`; returns (seq, the
/// instant COMMIT returned).
pub(super) async fn publish_at_rate(
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
pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
