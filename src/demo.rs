//! `outbox-relay demo`: the quick start. Needs nothing but PostgreSQL's binaries: it starts
//! a throwaway cluster (unless `DATABASE_URL` is given), migrates it, starts the relay and a
//! verifying receiver, publishes lead 42's `lead.created → lead.qualified → lead.converted`
//! to an ordered subscription keyed by the lead (plus one event in a transaction that rolls
//! back), waits until every stored sample event is delivered, then shows everything the
//! receiver got, in arrival order, with its signature checked. It then keeps running so you
//! can insert more with psql until Ctrl-C.
//!
//! What it prints is what arrived, not what should have: an unordered subscription would
//! show the three in whatever order the concurrent requests finished, and a rolled-back
//! event that was stored anyway would be listed.

use std::time::Duration;

use anyhow::Context;

use crate::config::RelayConfig;
use crate::devkit::postgres::TempPostgres;
use crate::devkit::receiver::{Received, Receiver};

const SUBSCRIPTION: &str = "demo-crm-webhooks";
const HOOK_PATH: &str = "/hooks/crm";
/// `source_service` of the sample events, which tells this run's events from others.
const SOURCE: &str = "outbox-relay-demo";
/// In the payload of the event whose transaction rolls back; seeing it delivered is a bug.
pub const ROLLED_BACK_MARKER: &str = "rolled back, never sent";

pub async fn run(database_url: Option<String>, once: bool) -> anyhow::Result<()> {
    let (cluster, url) = match database_url {
        Some(url) => {
            println!("Using DATABASE_URL (schema outbox will be created or migrated there).");
            (None, url)
        }
        None => {
            println!("Starting a throwaway PostgreSQL…");
            let cluster = TempPostgres::start()
                .await
                .context("starting a throwaway PostgreSQL (or set DATABASE_URL to use yours)")?;
            let url = cluster.admin_url();
            (Some(cluster), url)
        }
    };
    let result = run_with(&url, once).await;
    if let Some(cluster) = cluster {
        cluster
            .stop()
            .await
            .context("stopping the throwaway PostgreSQL")?;
    }
    result
}

async fn run_with(url: &str, once: bool) -> anyhow::Result<()> {
    crate::db::migrate(url).await.context("migrating")?;
    let receiver = Receiver::start()
        .await
        .context("starting the demo receiver")?;

    let (client, connection) = crate::db::parse_url(url)?
        .connect()
        .await
        .context("connecting to the database")?;
    tokio::spawn(connection);
    // Ordered: per ordering_key (the lead), one delivery at a time, in event order, so a
    // lead's flow reaches the receiver as it happened.
    let secret: String = client
        .query_one(
            "INSERT INTO outbox.subscriptions (name, url, event_types, ordered)
             VALUES ($1, $2, '{lead.*}', true)
             ON CONFLICT (name) DO UPDATE SET url = EXCLUDED.url, event_types = EXCLUDED.event_types,
                 ordered = true, enabled = true, disabled_reason = NULL
             RETURNING secret",
            &[&SUBSCRIPTION, &receiver.url(HOOK_PATH)],
        )
        .await
        .context("creating the demo subscription")?
        .get(0);
    receiver.expect_secret(HOOK_PATH, &secret)?;

    let mut config = RelayConfig::for_tests();
    config.http_addr = "127.0.0.1:8009".parse().expect("literal address");
    let listener = match tokio::net::TcpListener::bind(config.http_addr).await {
        Ok(listener) => listener,
        Err(_) => tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the HTTP listener")?,
    };
    let relay = crate::relay::start(config, url, listener).await?;
    println!(
        "Relay running; metrics at http://{}/metrics",
        relay.http_addr
    );
    println!(
        "Subscription {SUBSCRIPTION:?} → {} (event types lead.*, ordered: one delivery at a time per ordering_key, in event order)\n",
        receiver.url(HOOK_PATH)
    );

    // Events published from here on are this run's (the database may hold older ones).
    let baseline: i64 = client
        .query_one("SELECT coalesce(max(id), 0) FROM outbox.events", &[])
        .await
        .context("reading the latest event id")?
        .get(0);
    // A committed transaction with lead 42's flow, and one for lead 43 that rolls back: only
    // the first three are ever delivered.
    client
        .batch_execute(&format!(
            "BEGIN;
             SELECT outbox.publish('lead.created', '{{\"lead_id\": 42, \"email\": \"ada@example.com\"}}',
                                   tenant_id => 'acme', source_service => '{SOURCE}', ordering_key => 'lead:42');
             SELECT outbox.publish('lead.qualified', '{{\"lead_id\": 42, \"score\": 87}}',
                                   tenant_id => 'acme', source_service => '{SOURCE}', ordering_key => 'lead:42');
             SELECT outbox.publish('lead.converted', '{{\"lead_id\": 42, \"account_id\": 501}}',
                                   tenant_id => 'acme', source_service => '{SOURCE}', ordering_key => 'lead:42');
             COMMIT;
             BEGIN;
             SELECT outbox.publish('lead.created', '{{\"lead_id\": 43, \"note\": \"{ROLLED_BACK_MARKER}\"}}',
                                   tenant_id => 'acme', source_service => '{SOURCE}', ordering_key => 'lead:43');
             ROLLBACK;"
        ))
        .await
        .context("publishing the sample events")?;
    println!(
        "Published lead.created → lead.qualified → lead.converted for lead 42 (ordering_key lead:42) in one committed transaction,\n\
         and lead.created for lead 43 in a transaction that rolled back."
    );

    // Every event of this run that exists is delivered before anything is shown, so what the
    // receiver got is complete: had the rolled-back event been stored, it would be here too.
    wait_until_delivered(&client, baseline, Duration::from_secs(30)).await?;
    let received = receiver.received(HOOK_PATH);
    println!(
        "\nThe receiver got {} request(s), in arrival order:",
        received.len()
    );
    for request in &received {
        print_received(request);
    }
    print_summary(&received);

    if once {
        relay.shutdown().await;
        return Ok(());
    }
    // A URL with a password (the user's own DATABASE_URL) is never printed: the command then
    // reads it from the environment instead.
    let psql_target = if crate::config::secret::mask_url(url) == url {
        format!("'{url}'")
    } else {
        "\"$DATABASE_URL\"".to_owned()
    };
    let url = psql_target;
    println!(
        "\nThe relay keeps running. Publish more from another terminal:\n\n  psql {url} -c \"SELECT outbox.publish('lead.created', '{{\\\"lead_id\\\": 3}}')\"\n\n\
         Look at what happened:\n\n  psql {url} -c 'SELECT id, status, attempts, last_status_code FROM outbox.deliveries ORDER BY id'\n\n\
         Press Ctrl-C to stop (the throwaway database is removed)."
    );
    let mut shown = received.len();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let stop = crate::shutdown::signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                let now = receiver.received(HOOK_PATH);
                for request in &now[shown..] {
                    print_received(request);
                }
                shown = now.len();
            }
        }
    }
    println!("\nStopping…");
    relay.shutdown().await;
    Ok(())
}

/// Waits until every sample event of this run (`id` above `baseline`) has been delivered to
/// the demo subscription.
async fn wait_until_delivered(
    client: &tokio_postgres::Client,
    baseline: i64,
    deadline: Duration,
) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    loop {
        let waiting: i64 = client
            .query_one(
                "SELECT count(*) FROM outbox.events e
                  WHERE e.id > $1 AND e.source_service = $2
                    AND NOT EXISTS (SELECT 1 FROM outbox.deliveries d
                                      JOIN outbox.subscriptions s ON s.id = d.subscription_id
                                     WHERE d.event_id = e.id AND s.name = $3 AND d.status = 'delivered')",
                &[&baseline, &SOURCE, &SUBSCRIPTION],
            )
            .await
            .context("checking the sample events' deliveries")?
            .get(0);
        if waiting == 0 {
            return Ok(());
        }
        if started.elapsed() > deadline {
            anyhow::bail!(
                "{waiting} sample event(s) not delivered after {deadline:?}; see outbox.failed_deliveries"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn print_received(request: &Received) {
    let body = request.json();
    let verdict = match request.signature_valid {
        Some(true) => "signature verified",
        Some(false) => "SIGNATURE INVALID",
        None => "signature not checked",
    };
    println!(
        "  ✓ received {:<15} {} event_id={} data={} ({verdict})",
        body["event_type"].as_str().unwrap_or("?"),
        body["ordering_key"].as_str().unwrap_or("-"),
        request.header("webhook-id").unwrap_or("?"),
        body["data"],
    );
}

/// What arrived per lead, in arrival order, as the receiver saw it (not as intended).
fn print_summary(received: &[Received]) {
    let mut per_key: Vec<(String, Vec<String>)> = Vec::new();
    for request in received {
        let body = request.json();
        let key = body["ordering_key"].as_str().unwrap_or("-").to_owned();
        let event_type = body["event_type"].as_str().unwrap_or("?").to_owned();
        match per_key.iter_mut().find(|(k, _)| *k == key) {
            Some((_, types)) => types.push(event_type),
            None => per_key.push((key, vec![event_type])),
        }
    }
    println!("\nOrdered per lead (ordering_key), as received:");
    for (key, types) in &per_key {
        println!("  {key}: {}", types.join(" → "));
    }
    let rolled_back = received
        .iter()
        .any(|r| String::from_utf8_lossy(&r.body).contains(ROLLED_BACK_MARKER));
    if rolled_back {
        println!("The rolled-back event of lead 43 WAS DELIVERED: this is a bug.");
    } else {
        println!("The rolled-back event of lead 43 was not delivered.");
    }
}
