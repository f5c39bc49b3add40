//! Behind PgBouncer in transaction mode (`OUTBOX_DB_POOL_MODE=transaction-pooler`): the relay
//! keeps no session state on pooled connections, so it delivers (plain, retried and ordered)
//! through a pooler with fewer server connections than relay connections; LISTEN goes to a
//! direct URL or is off (poll-only); and the configuration that would silently never hear a
//! NOTIFY is refused.
//!
//! These tests need the `pgbouncer` binary; without it they fail, unless
//! `OUTBOX_ALLOW_MISSING_TOOLS=1` (then they print `SKIPPED` and pass).

use std::collections::HashMap;
use std::time::Duration;

use outbox_relay::config::RelayConfig;
use outbox_relay::db::{PoolMode, query, sql};
use outbox_relay::relay::RelayHandle;
use serde_json::json;
use testkit::receiver::{Receiver, Reply};
use tokio_postgres::error::SqlState;

use crate::harness::db::TestDb;
use crate::harness::pgbouncer::PgBouncer;
use crate::harness::relay::*;

/// Fewer than the relay's pool (`RelayConfig::for_tests`: 6), so consecutive round trips of
/// one relay connection are served by different server connections.
const SERVER_CONNECTIONS: u32 = 2;

fn pooler_config() -> RelayConfig {
    RelayConfig {
        db_pool_mode: PoolMode::TransactionPooler.name().to_owned(),
        ..RelayConfig::for_tests()
    }
}

/// A producer behind the pooler: the simple query protocol, as a Django app through PgBouncer
/// would send one statement.
async fn publish_through(
    client: &tokio_postgres::Client,
    payload: serde_json::Value,
    key: Option<&str>,
) {
    let key = key.map_or("NULL".to_string(), |k| format!("'{k}'"));
    client
        .batch_execute(&format!(
            "SELECT outbox.publish('lead.updated', '{payload}'::jsonb, ordering_key => {key})"
        ))
        .await
        .expect("publish through pgbouncer");
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(connection);
    client
}

/// The harness really interleaves server connections: a named prepared statement (what
/// `Direct` mode uses) made on one round trip is gone on the next once another client holds
/// that server connection, while the pooler mode's unnamed statement runs fine. PgBouncer
/// hands out the most recently used idle server connection first (LIFO), which makes the
/// interleaving below deterministic.
#[tokio::test]
async fn named_statements_break_behind_a_transaction_pooler_and_pooler_mode_does_not() {
    let db = TestDb::new().await;
    let Some(bouncer) = PgBouncer::start(
        &db,
        SERVER_CONNECTIONS,
        "named_statements_break_behind_a_transaction_pooler_and_pooler_mode_does_not",
    ) else {
        return;
    };
    let pool = outbox_relay::db::connect_pool(&bouncer.url(), 2, None).expect("pool");
    let mut holder = pool.get().await.expect("first connection");
    let client = pool.get().await.expect("second connection");

    // Prepared (and cached) on the only server connection so far, then executed there.
    query::query(&client, PoolMode::Direct, &sql::LOAD_SUBSCRIPTIONS, &[])
        .await
        .expect("first use of a named statement");
    // Another client now holds that server connection in a transaction...
    let transaction = holder.transaction().await.expect("BEGIN");
    transaction
        .batch_execute("SELECT 1")
        .await
        .expect("statement in the holder's transaction");
    // ... so this client's next round trip is served by a second server connection, which
    // never saw the statement.
    let error = query::query(&client, PoolMode::Direct, &sql::LOAD_SUBSCRIPTIONS, &[])
        .await
        .expect_err("a named statement cannot follow the client to another server connection");
    assert_eq!(
        error.code(),
        Some(&SqlState::INVALID_SQL_STATEMENT_NAME),
        "{error}"
    );
    query::query(
        &client,
        PoolMode::TransactionPooler,
        &sql::LOAD_SUBSCRIPTIONS,
        &[],
    )
    .await
    .expect("the unnamed statement runs on any server connection");
    transaction.commit().await.expect("COMMIT");
}

/// Poll-only mode through the pooler: plain deliveries, a retry after a 503, and an ordered
/// subscription (per key, in order), with no database error on the way and /readyz ready
/// with the listener reported as disabled.
#[tokio::test]
async fn poll_only_relay_behind_pgbouncer_delivers_retries_and_keeps_order() {
    let db = TestDb::new().await;
    let Some(bouncer) = PgBouncer::start(
        &db,
        SERVER_CONNECTIONS,
        "poll_only_relay_behind_pgbouncer_delivers_retries_and_keeps_order",
    ) else {
        return;
    };
    let receiver = Receiver::start().await.expect("receiver");
    receiver.queue("/plain", [Reply::Status(503)]);
    add_subscription(
        &db,
        "plain",
        &receiver.url("/plain"),
        &[("retry_schedule", "'{100 milliseconds}'")],
    )
    .await;
    add_subscription(
        &db,
        "ordered",
        &receiver.url("/ordered"),
        &[
            ("ordered", "true"),
            ("max_in_flight", "10"),
            ("retry_schedule", "'{100 milliseconds}'"),
        ],
    )
    .await;
    // The first request for seq 1 of key b fails: its key must wait for the retry.
    // (jsonb stores the payload as {"key": "b", "seq": 1}.)
    receiver.reply_when_body_contains("/ordered", "\"seq\": 1}", Reply::Status(503), 1);

    let relay = spawn_relay_at(
        &bouncer.url(),
        RelayConfig {
            listen: false,
            ..pooler_config()
        },
    )
    .await;
    wait_until_ready(
        "the poll-only relay is ready without a listener",
        &relay.health,
    )
    .await;

    let producer = connect(&bouncer.url()).await;
    const EVENTS: i64 = 12;
    for seq in 0..EVENTS {
        let key = ["a", "b", "c"][(seq % 3) as usize];
        publish_through(&producer, json!({"seq": seq, "key": key}), Some(key)).await;
    }

    // Every event reaches both subscriptions; the 503s are retried.
    let plain = receiver
        .wait_for("/plain", EVENTS as usize + 1, DEADLINE)
        .await
        .expect("plain deliveries, one retried");
    assert_eq!(plain.len(), EVENTS as usize + 1);
    wait_for_statuses(&db, "delivered", 2 * EVENTS).await;
    let ordered = receiver.received("/ordered");
    assert_eq!(ordered.len(), EVENTS as usize + 1, "one ordered retry");

    // Per key, requests arrive in event order (the failed one is repeated before its
    // successors are sent).
    let mut by_key: HashMap<String, Vec<i64>> = HashMap::new();
    for request in &ordered {
        let body = request.json();
        by_key
            .entry(body["ordering_key"].as_str().unwrap_or("-").to_string())
            .or_default()
            .push(body["data"]["seq"].as_i64().unwrap_or(-1));
    }
    assert_eq!(by_key["a"], vec![0, 3, 6, 9]);
    assert_eq!(by_key["b"], vec![1, 1, 4, 7, 10]);
    assert_eq!(by_key["c"], vec![2, 5, 8, 11]);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.delivery_attempts WHERE status_code = 503"
        )
        .await,
        2
    );

    assert_eq!(
        db_errors(&relay),
        0,
        "no statement failed behind the pooler"
    );
    assert_eq!(
        relay.metrics.wakeups.with_label_values(&["notify"]).get(),
        0,
        "poll-only: nothing listens"
    );
    let (status, body) = get_readyz(&relay).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["listener"], "disabled", "{body}");
    relay.shutdown().await;
}

/// Pooled connections through PgBouncer, LISTEN on a direct connection: a producer's NOTIFY
/// (sent through the pooler) wakes the dispatcher. The poll interval is an hour, so the
/// event can only be dispatched because of the wake-up.
#[tokio::test]
async fn pooler_mode_with_a_direct_listen_url_wakes_on_notify() {
    let db = TestDb::new().await;
    let Some(bouncer) = PgBouncer::start(
        &db,
        SERVER_CONNECTIONS,
        "pooler_mode_with_a_direct_listen_url_wakes_on_notify",
    ) else {
        return;
    };
    let receiver = Receiver::start().await.expect("receiver");
    add_subscription(&db, "crm", &receiver.url("/hook"), &[]).await;

    let relay = spawn_relay_at(
        &bouncer.url(),
        RelayConfig {
            listen_database_url: Some(db.url.clone().into()),
            poll_interval: Duration::from_secs(3600),
            ..pooler_config()
        },
    )
    .await;
    wait_until_ready("the relay listens on the direct URL", &relay.health).await;
    let notify_wakeups = || relay.metrics.wakeups.with_label_values(&["notify"]).get();
    // The catch-up wake-up every (re)connected listener sends is counted first.
    wait_until(
        "the listener's catch-up wake-up is counted",
        DEADLINE,
        || async { notify_wakeups() >= 1 },
    )
    .await;
    let before = notify_wakeups();

    let producer = connect(&bouncer.url()).await;
    publish_through(&producer, json!({"lead": 42}), None).await;
    receiver
        .wait_for("/hook", 1, DEADLINE)
        .await
        .expect("delivered after the NOTIFY woke the dispatcher");
    assert!(
        notify_wakeups() > before,
        "outbox_wakeups_total{{reason=\"notify\"}} did not move"
    );
    assert_eq!(db_errors(&relay), 0);
    let (status, body) = get_readyz(&relay).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["listener"], true, "{body}");
    relay.shutdown().await;
}

/// LISTEN through a transaction pooler would never hear anything; the relay refuses to start
/// that way and names both fixes. Either fix is accepted.
#[tokio::test]
async fn pooler_mode_refuses_to_listen_through_the_pooler() {
    let refused = pooler_config();
    let error = refused
        .validate()
        .expect_err("LISTEN through the pooler is refused");
    let message = error.to_string();
    assert!(message.contains("OUTBOX_LISTEN_DATABASE_URL"), "{message}");
    assert!(message.contains("OUTBOX_LISTEN=false"), "{message}");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    // Refused before connecting anywhere, so no database is needed.
    match outbox_relay::relay::start(refused, "postgres://nobody@127.0.0.1:1/none", listener).await
    {
        Err(outbox_relay::relay::StartError::Config(_)) => {}
        Err(other) => panic!("expected a configuration error, got {other:#}"),
        Ok(_) => panic!("the relay started with LISTEN through a transaction pooler"),
    }

    RelayConfig {
        listen: false,
        ..pooler_config()
    }
    .validate()
    .expect("poll-only is fine");
    RelayConfig {
        listen_database_url: Some("postgres://postgres@127.0.0.1/postgres".into()),
        ..pooler_config()
    }
    .validate()
    .expect("a direct LISTEN URL is fine");
}

/// The admin API and the `subscription`/`replay`/`status` commands through the pooler: their
/// statements go out unnamed with declared parameter types (`query_typed`), so none depends
/// on the server connection a previous round trip used. Many at once over 2 server
/// connections; a statement prepared by name would be missing on the next round trip's
/// server connection ("prepared statement … does not exist") or collide with another
/// client's of the same name.
#[tokio::test]
async fn admin_api_and_cli_work_through_a_transaction_pooler() {
    let db = TestDb::new().await;
    let Some(bouncer) = PgBouncer::start(
        &db,
        SERVER_CONNECTIONS,
        "admin_api_and_cli_work_through_a_transaction_pooler",
    ) else {
        return;
    };
    const TOKEN: &str = "pooler-admin-token";
    let relay = spawn_relay_at(
        &bouncer.url(),
        RelayConfig {
            listen: false,
            admin_token: Some(TOKEN.into()),
            ..pooler_config()
        },
    )
    .await;
    wait_until_ready("the relay behind the pooler is ready", &relay.health).await;
    let http = reqwest::Client::new();
    let admin = format!("http://{}/admin/v1", relay.http_addr);

    let creates = (0..8).map(|i| {
        http.post(format!("{admin}/subscriptions"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(
                json!({"name": format!("sub-{i}"), "url": "https://hooks.example.com/in",
                       "event_types": ["lead.*"], "max_in_flight": 4})
                .to_string(),
            )
            .send()
    });
    for response in futures::future::join_all(creates).await {
        let response = response.expect("POST /subscriptions");
        let status = response.status().as_u16();
        assert_eq!(status, 201, "{}", response.text().await.unwrap_or_default());
    }
    let paths = [
        "/subscriptions",
        "/subscriptions/sub-3",
        "/events?limit=10",
        "/replays?limit=5",
    ];
    let reads = (0..40).map(|i| {
        http.get(format!("{admin}{}", paths[i % paths.len()]))
            .bearer_auth(TOKEN)
            .send()
    });
    for response in futures::future::join_all(reads).await {
        let response = response.expect("GET");
        let status = response.status().as_u16();
        assert_eq!(status, 200, "{}", response.text().await.unwrap_or_default());
    }
    let patch = http
        .patch(format!("{admin}/subscriptions/sub-1"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(json!({"timeout_seconds": 5, "filter": {"plan": "pro"}}).to_string())
        .send()
        .await
        .expect("PATCH");
    assert_eq!(patch.status().as_u16(), 200);
    let replay = http
        .post(format!("{admin}/replays"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(json!({"subscription": "sub-2", "status": ["dead"], "dry_run": true}).to_string())
        .send()
        .await
        .expect("POST /replays");
    assert_eq!(replay.status().as_u16(), 201);

    let commands: [&[&str]; 4] = [
        &["subscription", "list"],
        &["subscription", "show", "sub-4"],
        &["status"],
        &["replay", "--status", "dead", "--dry-run"],
    ];
    let runs = (0..3).flat_map(|_| commands.iter()).map(|args| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .args(*args)
            .env("DATABASE_URL", bouncer.url())
            .env_remove("OUTBOX_ADMIN_TOKEN")
            .kill_on_drop(true)
            .output()
    });
    for (output, args) in futures::future::join_all(runs)
        .await
        .into_iter()
        .zip((0..3).flat_map(|_| commands.iter()))
    {
        let output = output.expect("run the CLI");
        assert!(
            output.status.success(),
            "outbox-relay {args:?} through the pooler: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert_eq!(db_errors(&relay), 0);
    relay.shutdown().await;
}

async fn get_readyz(relay: &RelayHandle) -> (u16, serde_json::Value) {
    let response = reqwest::get(format!("http://{}/readyz", relay.http_addr))
        .await
        .expect("GET /readyz");
    let status = response.status().as_u16();
    let text = response.text().await.expect("/readyz body");
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("/readyz JSON {text:?}: {e}"));
    (status, body)
}
