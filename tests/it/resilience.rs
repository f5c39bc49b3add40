//! Processes, connections and relays failing: nothing committed is lost, and several relays
//! never both deliver the same attempt.

use std::collections::HashMap;
use std::time::Duration;

use outbox_relay::config::RelayConfig;
use testkit::receiver::{Receiver, Reply};

use crate::harness::db::TestDb;
use crate::harness::relay::*;

async fn publish_many(db: &TestDb, count: i64) {
    db.client()
        .await
        .execute(
            "INSERT INTO outbox.events (event_type, payload)
             SELECT 'load.tick', jsonb_build_object('n', n) FROM generate_series(1, $1::bigint) n",
            &[&count],
        )
        .await
        .expect("publish");
}

/// webhook-id → how many times it arrived.
fn arrivals(receiver: &Receiver, path: &str) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for request in receiver.received(path) {
        *seen
            .entry(request.header("webhook-id").unwrap_or("?").to_string())
            .or_default() += 1;
    }
    seen
}

/// kill -9 of the real binary mid-flight, then a new relay: every event is delivered, and
/// only requests whose results the killed relay had not recorded can arrive twice: at most
/// its `--max-concurrency` (a request slot is freed only once its result is written; an
/// answered request no longer counts against `max_in_flight`, so that alone bounds nothing).
#[tokio::test]
async fn relay_killed_mid_flight_then_restarted_delivers_everything() {
    let (db, receiver) = db_with_subscriber("crm", "/hook", &[("max_in_flight", "8")]).await;
    receiver.set_default("/hook", Reply::Delay(Duration::from_millis(100), 200));
    publish_many(&db, 200).await;

    let mut first = RelayProcess::spawn(&db, "doomed", &["--max-concurrency", "8"]);
    receiver
        .wait_for("/hook", 20, DEADLINE)
        .await
        .expect("first relay delivering");
    first.kill_9().await;
    let before_restart = receiver.received("/hook").len();
    assert!(
        before_restart < 200,
        "the kill came too late to test anything"
    );

    let mut second = RelayProcess::spawn(&db, "survivor", &[]);
    wait_for_statuses(&db, "delivered", 200).await;
    let seen = arrivals(&receiver, "/hook");
    assert_eq!(seen.len(), 200, "every event delivered");
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    assert!(
        duplicates <= 8,
        "{duplicates} duplicates, more than the killed relay could hold unrecorded \
         (--max-concurrency 8)"
    );
    assert_eq!(second.terminate().await.code(), Some(0));
}

/// Deliveries this relay recorded as delivered (its `outbox_deliveries_total`), all
/// subscriptions of the two-relay test together.
fn delivered_by(relay: &outbox_relay::relay::RelayHandle) -> u64 {
    ["crm", "erp"]
        .iter()
        .map(|subscription| {
            relay
                .metrics
                .deliveries
                .with_label_values(&[subscription, "delivered"])
                .get()
        })
        .sum()
}

/// Two relays on one database: each event arrives exactly once, and each delivery is
/// recorded by exactly one relay. Both do work, by construction rather than by luck: B runs
/// alone first, then both together, then A alone.
#[tokio::test]
async fn two_relays_never_deliver_the_same_attempt() {
    let (db, receiver) = db_with_subscriber("crm", "/hook", &[]).await;
    add_subscription(&db, "erp", &receiver.url("/erp"), &[("max_in_flight", "2")]).await;
    let config = RelayConfig {
        dispatch_batch_size: 20,
        delivery_batch_size: 10,
        ..RelayConfig::for_tests()
    };

    let b = spawn_relay(&db, config.clone()).await;
    publish_many(&db, 50).await;
    wait_for_statuses(&db, "delivered", 100).await;
    let a = spawn_relay(&db, config).await;
    publish_many(&db, 300).await;
    wait_for_statuses(&db, "delivered", 700).await;
    let by_b = delivered_by(&b);
    b.shutdown().await;
    publish_many(&db, 50).await;
    wait_for_statuses(&db, "delivered", 800).await;
    let by_a = delivered_by(&a);
    a.shutdown().await;

    for path in ["/hook", "/erp"] {
        let seen = arrivals(&receiver, path);
        assert_eq!(seen.len(), 400, "{path}: every event");
        assert!(
            seen.values().all(|n| *n == 1),
            "{path}: duplicates {:?}",
            seen.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
        );
    }
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'"
        )
        .await,
        800
    );
    assert!(by_b >= 100, "B delivered what it ran alone for ({by_b})");
    assert!(by_a >= 100, "A delivered what it ran alone for ({by_a})");
    assert_eq!(
        by_a + by_b,
        800,
        "each delivery recorded by exactly one relay"
    );
}

/// A lease the relay holds in the database but no longer works on (leaked) is not renewed
/// forever: past the longest possible request it expires and the delivery is sent.
#[tokio::test]
async fn a_leaked_lease_is_not_renewed_forever() {
    let (db, receiver) = db_with_subscriber("crm", "/hook", &[]).await;
    publish_many(&db, 2).await;
    let relay = spawn_relay(
        &db,
        RelayConfig {
            relay_id: Some("leaky".into()),
            ..RelayConfig::for_tests()
        },
    )
    .await;
    wait_for_statuses(&db, "delivered", 2).await;
    // Fake the leak: this relay's id on an in-flight row it never claimed, claimed long ago
    // (beyond the heartbeat's age limit) with a lease that has not expired yet.
    let stale = format!(
        "{} seconds",
        outbox_relay::relay::maintenance::MAX_LEASE_AGE.as_secs() + 60
    );
    db.client()
        .await
        .execute(
            "UPDATE outbox.deliveries SET status = 'in_flight', lease_owner = 'leaky',
                    lease_expires_at = now() + interval '2 seconds',
                    updated_at = now() - $1::text::interval
              WHERE id = (SELECT min(id) FROM outbox.deliveries)",
            &[&stale],
        )
        .await
        .expect("fake a leaked lease");
    let before = receiver.received("/hook").len();
    wait_for_statuses(&db, "delivered", 2).await;
    receiver
        .wait_for("/hook", before + 1, DEADLINE)
        .await
        .expect("the leaked delivery is sent again");
    assert_eq!(relay.metrics.leases_reclaimed.get(), 1);
    relay.shutdown().await;
}

/// A relay that crashes holding leases: another relay reclaims them once they expire.
#[tokio::test]
async fn expired_leases_are_reclaimed_by_another_relay() {
    let (db, receiver) = db_with_subscriber("crm", "/hook", &[]).await;
    // The first three requests hang, so the first relay dies holding them.
    receiver.queue("/hook", [Reply::Hang, Reply::Hang, Reply::Hang]);
    let crashing = spawn_relay(
        &db,
        RelayConfig {
            relay_id: Some("crashing".into()),
            ..RelayConfig::for_tests()
        },
    )
    .await;
    publish_many(&db, 3).await;
    receiver
        .wait_for("/hook", 3, DEADLINE)
        .await
        .expect("three in flight");
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.deliveries WHERE status = 'in_flight' AND lease_owner = 'crashing'").await, 3);
    crashing.crash().await;

    let rescuer = spawn_default_relay(&db).await;
    wait_for_statuses(&db, "delivered", 3).await;
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.deliveries WHERE last_error IS NULL"
        )
        .await,
        3,
        "a delivered row carries no stale error"
    );
    assert_eq!(
        rescuer.metrics.leases_reclaimed.get(),
        3,
        "the rescuer re-queued the dead relay's leases"
    );
    rescuer.shutdown().await;
}

/// A slow subscriber's request outlives the lease duration many times over: the heartbeat
/// keeps it, so no second relay sends it again.
#[tokio::test]
async fn slow_requests_of_a_live_relay_are_never_taken_over() {
    let (db, receiver) = db_with_subscriber("crm", "/hook", &[("timeout", "'20 seconds'")]).await;
    receiver.queue("/hook", [Reply::Delay(Duration::from_secs(8), 200)]);
    let a = spawn_default_relay(&db).await; // lease 3 s, heartbeat 0.5 s
    publish_many(&db, 1).await;
    receiver
        .wait_for("/hook", 1, DEADLINE)
        .await
        .expect("in flight");
    let b = spawn_default_relay(&db).await;
    wait_for_statuses(&db, "delivered", 1).await;
    assert_eq!(
        receiver.received("/hook").len(),
        1,
        "the slow request was sent twice"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// Every relay connection is killed (as on a database restart or network drop): the relay
/// reconnects, re-LISTENs and delivers what was published meanwhile.
#[tokio::test]
async fn relay_recovers_when_its_database_connections_are_terminated() {
    let (db, receiver) = db_with_subscriber("crm", "/hook", &[]).await;
    let relay = spawn_default_relay(&db).await;
    publish_many(&db, 10).await;
    receiver
        .wait_for("/hook", 10, DEADLINE)
        .await
        .expect("before");
    wait_until_ready("relay ready", &relay.health).await;

    for _ in 0..3 {
        // The relay reconnects lazily: cut again only once it has.
        wait_for_relay_sessions(&db, 1).await;
        let terminated = db.terminate_connections("outbox-relay%").await;
        assert!(terminated >= 1, "no relay connection found to terminate");
        publish_many(&db, 10).await;
    }
    receiver
        .wait_for("/hook", 40, DEADLINE)
        .await
        .expect("after reconnecting");
    wait_for_statuses(&db, "delivered", 40).await;
    wait_until_ready("relay ready again", &relay.health).await;
    relay.shutdown().await;
}

/// SIGTERM: in-flight requests finish within the grace period, results are written, the
/// process exits 0 and holds no lease.
#[tokio::test]
async fn sigterm_finishes_in_flight_requests_and_exits_cleanly() {
    let (db, receiver) = db_with_subscriber("crm", "/hook", &[]).await;
    receiver.set_default("/hook", Reply::Delay(Duration::from_millis(1500), 200));
    publish_many(&db, 5).await;
    let mut relay = RelayProcess::spawn(&db, "graceful", &["--shutdown-grace", "10s"]);
    receiver
        .wait_for("/hook", 5, DEADLINE)
        .await
        .expect("all five in flight");

    let status = relay.terminate().await;
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'"
        )
        .await,
        5
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.deliveries WHERE lease_owner IS NOT NULL"
        )
        .await,
        0
    );
}

/// Shutdown past the grace period: unfinished requests are abandoned and their deliveries
/// handed back, due now, for another relay.
#[tokio::test]
async fn shutdown_past_the_grace_period_hands_back_unfinished_deliveries() {
    let (db, receiver) = db_with_subscriber("crm", "/hook", &[("timeout", "'60 seconds'")]).await;
    receiver.queue("/hook", [Reply::Hang]);
    let relay = spawn_relay(
        &db,
        RelayConfig {
            shutdown_grace: Duration::from_millis(300),
            ..RelayConfig::for_tests()
        },
    )
    .await;
    publish_many(&db, 1).await;
    receiver
        .wait_for("/hook", 1, DEADLINE)
        .await
        .expect("in flight");
    relay.shutdown().await;
    assert_eq!(deliveries(&db).await, vec![("pending".to_string(), 0)]);
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.deliveries WHERE lease_owner IS NULL AND next_attempt_at <= now()").await, 1);
}

/// A real PostgreSQL restart (its own throwaway cluster, so other tests are unaffected):
/// while it is down the relay stays up and reports not-ready; afterwards it reconnects,
/// re-LISTENs and delivers both what was committed before and after.
#[tokio::test]
async fn relay_rides_out_a_postgres_restart() {
    let mut cluster = outbox_relay::devkit::postgres::TempPostgres::start()
        .await
        .expect("throwaway cluster");
    let url = cluster.admin_url();
    outbox_relay::db::migrate(&url).await.expect("migrate");
    let receiver = Receiver::start().await.expect("receiver");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
        .execute(
            "INSERT INTO outbox.subscriptions (name, url) VALUES ('crm', $1)",
            &[&receiver.url("/hook")],
        )
        .await
        .expect("subscription");
    client
        .batch_execute("INSERT INTO outbox.events (event_type, payload) SELECT 'before', '{}' FROM generate_series(1, 5)")
        .await
        .expect("publish before");
    drop(client);

    let relay = spawn_relay_at(&url, RelayConfig::for_tests()).await;
    receiver
        .wait_for("/hook", 5, DEADLINE)
        .await
        .expect("delivered before the restart");
    wait_until_ready("ready before the restart", &relay.health).await;

    let health = relay.health.clone();
    let saw_not_ready = tokio::spawn(async move {
        let until = tokio::time::Instant::now() + DEADLINE;
        while tokio::time::Instant::now() < until {
            if !health.readiness().ready {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    });
    cluster
        .restart(Duration::from_secs(2))
        .await
        .expect("restart");
    assert!(
        saw_not_ready.await.expect("watcher"),
        "readiness never dropped while PostgreSQL was down"
    );

    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("reconnect");
    tokio::spawn(connection);
    client
        .batch_execute("INSERT INTO outbox.events (event_type, payload) SELECT 'after', '{}' FROM generate_series(1, 5)")
        .await
        .expect("publish after");
    let received = receiver
        .wait_for("/hook", 10, DEADLINE)
        .await
        .expect("delivered after the restart");
    assert_eq!(
        received
            .iter()
            .filter(|r| r.json()["event_type"] == "after")
            .count(),
        5
    );
    wait_until("every delivery recorded", DEADLINE, || async {
        client
            .query_one(
                "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'",
                &[],
            )
            .await
            .map(|row| row.get::<_, i64>(0) == 10)
            .unwrap_or(false)
    })
    .await;
    wait_until_ready("ready again", &relay.health).await;
    relay.shutdown().await;
    drop(client);
    cluster.stop().await.expect("stop cluster");
}
