//! `outbox-relay demo`: the quick start. Needs nothing but PostgreSQL's binaries: it starts
//! a throwaway cluster (unless `DATABASE_URL` is given), migrates it, starts the relay and a
//! verifying receiver, publishes a small `lead.*` flow, shows each event delivered with its
//! signature checked, then keeps running so you can insert more with psql until Ctrl-C.

use std::time::Duration;

use anyhow::Context;
use tokio_postgres::NoTls;

use crate::config::RelayConfig;
use crate::devkit::postgres::TempPostgres;
use crate::devkit::receiver::{Received, Receiver};

const SUBSCRIPTION: &str = "demo-crm-webhooks";
const HOOK_PATH: &str = "/hooks/crm";

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

    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .context("connecting to the database")?;
    tokio::spawn(connection);
    let secret: String = client
        .query_one(
            "INSERT INTO outbox.subscriptions (name, url, event_types)
             VALUES ($1, $2, '{lead.*}')
             ON CONFLICT (name) DO UPDATE SET url = EXCLUDED.url, enabled = true, disabled_reason = NULL
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
        "Subscription {SUBSCRIPTION:?} → {} (event types lead.*)\n",
        receiver.url(HOOK_PATH)
    );

    // A committed transaction with three events, and one that rolls back: only the first
    // three are ever delivered.
    client
        .batch_execute(
            "BEGIN;
             SELECT outbox.publish('lead.created', '{\"lead_id\": 1, \"email\": \"ada@example.com\"}',
                                   tenant_id => 'acme', source_service => 'django-crm', ordering_key => 'lead:1');
             SELECT outbox.publish('lead.qualified', '{\"lead_id\": 1, \"score\": 87}',
                                   tenant_id => 'acme', source_service => 'django-crm', ordering_key => 'lead:1');
             SELECT outbox.publish('lead.converted', '{\"lead_id\": 1, \"account_id\": 501}',
                                   tenant_id => 'acme', source_service => 'django-crm', ordering_key => 'lead:1');
             COMMIT;
             BEGIN;
             SELECT outbox.publish('lead.created', '{\"lead_id\": 2, \"note\": \"rolled back, never sent\"}');
             ROLLBACK;",
        )
        .await
        .context("publishing the sample events")?;
    println!("Published 3 events in one committed transaction (and 1 in a rolled-back one).");

    let received = receiver
        .wait_for(HOOK_PATH, 3, Duration::from_secs(30))
        .await
        .map_err(anyhow::Error::msg)?;
    for request in &received {
        print_received(request);
    }

    if once {
        relay.shutdown().await;
        return Ok(());
    }
    // A URL with a password (the user's own DATABASE_URL) is never printed: the command then
    // reads it from the environment instead.
    let psql_target = if crate::secret::mask_url(url) == url {
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

fn print_received(request: &Received) {
    let body = request.json();
    let verdict = match request.signature_valid {
        Some(true) => "signature verified",
        Some(false) => "SIGNATURE INVALID",
        None => "signature not checked",
    };
    println!(
        "  ✓ received {:<15} event_id={} data={} ({verdict})",
        body["event_type"].as_str().unwrap_or("?"),
        request.header("webhook-id").unwrap_or("?"),
        body["data"],
    );
}
