//! Locks held elsewhere (retention waiting on a row, a session idle in a transaction, a
//! subscription being removed) never stall the relay's lease heartbeat or its result writes,
//! and never deadlock with them.

use std::time::Duration;

use outbox_relay::config::RelayConfig;
use serde_json::json;
use testkit::receiver::Receiver;

use crate::harness::db::TestDb;
use crate::harness::raw_http::{Answer, RawServer};
use crate::harness::relay::*;

/// Number of the relay's sessions waiting on a lock whose statement contains `needle`.
async fn relay_sessions_waiting(db: &TestDb, needle: &str) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND application_name LIKE 'outbox-relay%'
                AND wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%'",
            &[&needle],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

async fn lease_expires_at(db: &TestDb, delivery: i64) -> Option<chrono::DateTime<chrono::Utc>> {
    db.client()
        .await
        .query_one(
            "SELECT lease_expires_at FROM outbox.deliveries WHERE id = $1",
            &[&delivery],
        )
        .await
        .expect("delivery")
        .get(0)
}

/// Retention stuck behind a row lock (its cascade waits on a delivery another session
/// holds) must not hold up the heartbeat: the relay's slow in-flight request keeps its lease
/// renewed while the purge is still waiting. (They shared one loop; the purge blocked it.)
#[tokio::test]
async fn the_heartbeat_renews_leases_while_retention_waits_on_a_lock() {
    let db = TestDb::new().await;
    let (old_subscription, _) = add_subscription(
        &db,
        "archive",
        "http://127.0.0.1:9/never",
        &[("event_types", "'{lead.*}'")],
    )
    .await;
    // An old, finished event retention will delete, with a delivery another session locks.
    let old_delivery: i64 = db
        .client()
        .await
        .query_one(
            "WITH e AS (INSERT INTO outbox.events (event_type, payload, created_at, dispatched_at)
                        VALUES ('lead.created', '{}', now() - interval '2 hours', now() - interval '2 hours')
                        RETURNING id),
                  d AS (INSERT INTO outbox.deliveries (event_id, subscription_id, status, delivered_at)
                        SELECT id, $1, 'delivered', now() FROM e RETURNING id),
                  c AS (UPDATE outbox.ordered_dispatch_cursor SET last_event_id = (SELECT id FROM e))
             SELECT id FROM d",
            &[&old_subscription],
        )
        .await
        .expect("old finished event")
        .get(0);
    let mut holder = db.client().await;
    let holding = holder.transaction().await.expect("begin");
    holding
        .execute(
            "SELECT 1 FROM outbox.deliveries WHERE id = $1 FOR UPDATE",
            &[&old_delivery],
        )
        .await
        .expect("lock the old delivery");

    let slow = RawServer::start_gated(Answer::status_with_body(200, b"ok")).await;
    add_subscription(
        &db,
        "slow",
        &slow.url("/hook"),
        &[("event_types", "'{order.*}'")],
    )
    .await;
    let config = RelayConfig {
        retention: Some(Duration::from_secs(3600)),
        // Long enough that the purge is still waiting when the test looks.
        lock_timeout: Duration::from_secs(60),
        statement_timeout: Duration::from_secs(120),
        ..RelayConfig::for_tests()
    };
    let relay = spawn_relay(&db, config).await;
    wait_until(
        "retention waits on the locked delivery",
        DEADLINE,
        || async { relay_sessions_waiting(&db, "DELETE FROM outbox.events").await == 1 },
    )
    .await;

    publish(&db, "order.placed", json!({})).await;
    wait_until("the slow request is in flight", DEADLINE, || async {
        slow.requests() == 1
    })
    .await;
    let delivery = count(
        &db,
        "SELECT id FROM outbox.deliveries WHERE status = 'in_flight'",
    )
    .await;
    let leased_until = lease_expires_at(&db, delivery).await.expect("leased");
    wait_until(
        "the heartbeat renews the lease while retention still waits",
        DEADLINE,
        || async {
            assert_eq!(
                relay_sessions_waiting(&db, "DELETE FROM outbox.events").await,
                1,
                "retention stopped waiting before the lease was renewed"
            );
            lease_expires_at(&db, delivery)
                .await
                .is_some_and(|at| at > leased_until)
        },
    )
    .await;

    holding.rollback().await.expect("release the lock");
    slow.release(1);
    let placed =
        "SELECT count(*) FROM outbox.deliveries d JOIN outbox.events e ON e.id = d.event_id
                   WHERE e.event_type = 'order.placed' AND d.status = 'delivered'";
    wait_until("the slow request is recorded", DEADLINE, || async {
        count(&db, placed).await == 1
    })
    .await;
    assert_eq!(
        count(
            &db,
            "SELECT d.attempts::bigint FROM outbox.deliveries d JOIN outbox.events e ON e.id = d.event_id
              WHERE e.event_type = 'order.placed'"
        )
        .await,
        1,
        "one attempt: the lease was never lost and the request never sent twice"
    );
    assert_eq!(slow.requests(), 1);
    relay.shutdown().await;
}

/// A session idle in a transaction that holds a delivery's row lock cannot stall the
/// completer: its statement gives up after `lock_timeout`, the other results of the batch and
/// those that follow are written, and once the lock is gone the held delivery ends delivered:
/// its result is written from the side retry, or, if its lease ran out meanwhile (the locked
/// row cannot be renewed), it is claimed and sent again.
#[tokio::test]
async fn a_row_locked_by_an_idle_transaction_does_not_stall_other_results() {
    let db = TestDb::new().await;
    let gated = RawServer::start_gated(Answer::status_with_body(200, b"ok")).await;
    add_subscription(
        &db,
        "held",
        &gated.url("/hook"),
        &[("event_types", "'{held.*}'")],
    )
    .await;
    let healthy = Receiver::start().await.expect("receiver");
    add_subscription(
        &db,
        "healthy",
        &healthy.url("/hook"),
        &[("event_types", "'{lead.*}'")],
    )
    .await;
    let config = RelayConfig {
        lock_timeout: Duration::from_millis(500),
        ..RelayConfig::for_tests()
    };
    let relay = spawn_relay(&db, config).await;

    publish(&db, "held.created", json!({})).await;
    wait_until("the held request is in flight", DEADLINE, || async {
        gated.requests() == 1
    })
    .await;
    let held = count(
        &db,
        "SELECT id FROM outbox.deliveries WHERE status = 'in_flight'",
    )
    .await;
    let mut holder = db.client().await;
    let holding = holder.transaction().await.expect("begin");
    holding
        .execute(
            "SELECT 1 FROM outbox.deliveries WHERE id = $1 FOR UPDATE",
            &[&held],
        )
        .await
        .expect("lock the held delivery");
    gated.release(10);

    for seq in 0..20 {
        publish(&db, "lead.created", json!({ "seq": seq })).await;
    }
    healthy
        .wait_for("/hook", 20, DEADLINE)
        .await
        .expect("the healthy subscriber gets its events");
    wait_until(
        "the healthy results are written while the lock is still held",
        DEADLINE,
        || async {
            count(
                &db,
                "SELECT count(*) FROM outbox.deliveries d JOIN outbox.subscriptions s
                   ON s.id = d.subscription_id
                  WHERE s.name = 'healthy' AND d.status = 'delivered'",
            )
            .await
                == 20
        },
    )
    .await;

    holding.commit().await.expect("release the lock");
    wait_until(
        "the held delivery is recorded once the lock is gone",
        DEADLINE,
        || async {
            count(
                &db,
                &format!("SELECT count(*) FROM outbox.deliveries WHERE id = {held} AND status = 'delivered'"),
            )
            .await
                == 1
        },
    )
    .await;
    let sent = gated.requests();
    assert!(
        (1..=2).contains(&sent),
        "at most one more send after the lock ({sent} requests)"
    );
    relay.shutdown().await;
}

/// A 410 result and a subscription DELETE at the same moment: DELETE locks the subscription,
/// then (its trigger) the deliveries; the completer used to lock the deliveries, then the
/// subscription, in one statement. Here the DELETE's session takes the subscription first and
/// the completer writes a 410 while it is held; nothing may deadlock.
#[tokio::test]
async fn a_410_result_and_a_subscription_delete_do_not_deadlock() {
    let db = TestDb::new().await;
    let gone = RawServer::start_gated(Answer::status_with_body(410, b"gone")).await;
    let (subscription, _) = add_subscription(&db, "leaving", &gone.url("/hook"), &[]).await;
    let relay = spawn_default_relay(&db).await;
    publish(&db, "lead.created", json!({})).await;
    wait_until("the request is in flight", DEADLINE, || async {
        gone.requests() == 1
    })
    .await;

    let mut remover = db.client().await;
    let removing = remover.transaction().await.expect("begin");
    removing
        .execute(
            "SELECT 1 FROM outbox.subscriptions WHERE id = $1 FOR UPDATE",
            &[&subscription],
        )
        .await
        .expect("lock the subscription as DELETE does first");
    gone.release(1);
    wait_until(
        "the completer waits for the subscription row",
        DEADLINE,
        || async { relay_sessions_waiting(&db, "outbox.subscriptions").await == 1 },
    )
    .await;
    removing
        .execute(
            "DELETE FROM outbox.subscriptions WHERE id = $1",
            &[&subscription],
        )
        .await
        .expect("the DELETE (and its trigger's update of deliveries) goes through");
    removing.commit().await.expect("commit the removal");

    wait_until("the completer's write finished", DEADLINE, || async {
        relay_sessions_waiting(&db, "outbox.subscriptions").await == 0
    })
    .await;
    assert_eq!(
        relay
            .metrics
            .db_errors
            .with_label_values(&["completer"])
            .get(),
        0,
        "the completer's statements all succeeded (no deadlock victim)"
    );
    let row = db
        .client()
        .await
        .query_one(
            "SELECT status, attempts, last_status_code FROM outbox.deliveries",
            &[],
        )
        .await
        .expect("the delivery");
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, i32>(1),
            row.get::<_, Option<i32>>(2)
        ),
        ("dead".to_string(), 1, Some(410)),
        "the 410 attempt is recorded, then the removal ends the delivery"
    );
    relay.shutdown().await;
}

/// The relay's pooled connections carry its timeouts and asynchronous commit from their
/// first statement; the admin API's connections carry the timeouts (a longer statement one)
/// and commit as the server is configured (durably by default).
#[tokio::test]
async fn relay_connections_carry_their_session_settings_and_admin_ones_commit_durably() {
    let db = TestDb::new().await;
    let config = RelayConfig {
        statement_timeout: Duration::from_secs(42),
        lock_timeout: Duration::from_millis(1500),
        ..RelayConfig::for_tests()
    };
    // The admin pool leaves commits as the server has them (the throwaway test cluster runs
    // with synchronous_commit off, the local server with it on).
    let server_default: String = db
        .client()
        .await
        .query_one("SHOW synchronous_commit", &[])
        .await
        .expect("SHOW")
        .get(0);
    for (limits, statement_timeout, synchronous_commit) in [
        (config.session_limits(), "42s", "off"),
        (
            config.admin_session_limits(),
            "10min",
            server_default.as_str(),
        ),
    ] {
        let pool = outbox_relay::db::connect_pool(&db.url, 1, limits).expect("pool");
        let client = pool.get().await.expect("connection");
        let mut shown = Vec::new();
        for setting in ["statement_timeout", "lock_timeout", "synchronous_commit"] {
            let value: String = client
                .query_one(&format!("SHOW {setting}"), &[])
                .await
                .expect("SHOW")
                .get(0);
            shown.push(value);
        }
        assert_eq!(shown, [statement_timeout, "1500ms", synchronous_commit]);
    }
    let pooled = RelayConfig {
        db_pool_mode: outbox_relay::db::PoolMode::TransactionPooler
            .name()
            .to_owned(),
        ..config
    };
    assert_eq!(
        pooled.session_limits(),
        None,
        "a transaction pooler refuses startup options"
    );
}
