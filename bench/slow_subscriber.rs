//! `slow_subscriber`: a subscriber that answers slowly beside a fast one; the fast one must not
//! wait.

use super::*;

pub(super) async fn slow_subscriber_scenario(
    args: &Args,
    server: &Server,
) -> anyhow::Result<Vec<Row>> {
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
