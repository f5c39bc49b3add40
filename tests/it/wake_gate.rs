//! The wake-up gate (migrations/V10__quiet_producers.sql, src/db/wake_gate.rs): producers
//! NOTIFY only while a relay holds the gate, relays never wait for it (a waiting session
//! holds back vacuum), and an event whose producer skipped
//! its NOTIFY is still found at once, never left for the fallback poll.

use std::time::Duration;

use futures::StreamExt;
use outbox_relay::config::RelayConfig;
use outbox_relay::db::wake_gate::GATE_LOCK;
use serde_json::json;
use testkit::receiver::Receiver;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::harness::db::TestDb;
use crate::harness::relay::*;

/// Sessions holding (`granted`) or waiting for the gate in `mode`, in this database.
async fn gate_sessions(db: &TestDb, mode: &str, granted: bool) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
              WHERE d.datname = current_database() AND l.locktype = 'advisory'
                AND l.classid = $1::bigint::oid AND l.objid = $2::bigint::oid AND l.objsubid = 2
                AND l.mode = $3 AND l.granted = $4",
            &[
                &i64::from(GATE_LOCK.0),
                &i64::from(GATE_LOCK.1),
                &mode,
                &granted,
            ],
        )
        .await
        .expect("pg_locks")
        .get(0)
}

/// A session LISTENing on outbox_events; payloads arrive on the receiver.
async fn listen(db: &TestDb) -> (tokio_postgres::Client, mpsc::UnboundedReceiver<String>) {
    let (client, mut connection) = tokio_postgres::connect(&db.url, NoTls)
        .await
        .expect("listener connects");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message
                && tx.send(n.payload().to_owned()).is_err()
            {
                return;
            }
        }
    });
    client
        .batch_execute("LISTEN outbox_events")
        .await
        .expect("LISTEN");
    (client, rx)
}

/// Inserts one event in its own transaction, then sends a marker NOTIFY in another one and
/// returns what the listener heard up to the marker. Notifications arrive in commit order, so
/// the insert's NOTIFY, if it sent one, comes before the marker: no waiting on a clock.
async fn notifications_for_one_insert(
    db: &TestDb,
    listener: &mut mpsc::UnboundedReceiver<String>,
) -> Vec<String> {
    let producer = db.client().await;
    producer
        .execute(
            "INSERT INTO outbox.events (event_type, payload) VALUES ('gate.test', '{}')",
            &[],
        )
        .await
        .expect("insert");
    producer
        .batch_execute("NOTIFY outbox_events, 'marker'")
        .await
        .expect("marker");
    let mut heard = Vec::new();
    loop {
        let payload = tokio::time::timeout(DEADLINE, listener.recv())
            .await
            .expect("the marker arrives")
            .expect("listener alive");
        if payload == "marker" {
            return heard;
        }
        heard.push(payload);
    }
}

#[tokio::test]
async fn producers_notify_only_while_a_relay_holds_the_gate() {
    let db = TestDb::new().await;
    let (_listening, mut heard) = listen(&db).await;

    // Nobody at the gate: no NOTIFY, so producers' commits do not queue behind each other.
    assert_eq!(
        notifications_for_one_insert(&db, &mut heard).await,
        Vec::<String>::new()
    );

    // A relay holding the gate (idle, asleep): every insert notifies.
    let holder = db.client().await;
    holder
        .execute(
            "SELECT pg_advisory_lock($1, $2)",
            &[&GATE_LOCK.0, &GATE_LOCK.1],
        )
        .await
        .expect("take the gate");
    assert_eq!(
        notifications_for_one_insert(&db, &mut heard).await,
        vec![""]
    );

    holder
        .execute(
            "SELECT pg_advisory_unlock($1, $2)",
            &[&GATE_LOCK.0, &GATE_LOCK.1],
        )
        .await
        .expect("give the gate back");
    assert_eq!(
        notifications_for_one_insert(&db, &mut heard).await,
        Vec::<String>::new()
    );
}

/// The race the gate exists for: a producer inserts while the relay is busy (so it skips its
/// NOTIFY), and commits only after the relay has gone back to asking for NOTIFYs. The relay
/// must look once more when the gate is granted; with a fallback poll of an hour, nothing
/// else would find the event.
#[tokio::test]
async fn an_event_whose_producer_skipped_notify_is_found_when_the_gate_is_granted() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver starts");
    add_subscription(&db, "gate", &receiver.url("/gate"), &[]).await;
    let mut config = RelayConfig::for_tests();
    config.poll_interval = Duration::from_secs(3600);
    config.busy_poll_interval = Duration::from_millis(5);
    config.busy_linger = Duration::from_millis(500);
    let relay = spawn_relay(&db, config).await;
    wait_until_ready("the relay is ready", &relay.health).await;
    wait_until("the idle relay holds the gate", DEADLINE, || async {
        gate_sessions(&db, "ExclusiveLock", true).await == 1
    })
    .await;

    let mut sent: i64 = 0;
    let mut attempt = 0;
    loop {
        attempt += 1;
        assert!(
            attempt <= 20,
            "never caught the relay busy; the gate is never released"
        );
        // Two wake-ups close together make the relay busy: it gives the gate back.
        // (Apart, so the listener does not fold them into one.)
        publish(&db, "gate.burst", json!({})).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        publish(&db, "gate.burst", json!({})).await;
        sent += 2;
        wait_until("the busy relay releases the gate", DEADLINE, || async {
            gate_sessions(&db, "ExclusiveLock", true).await == 0
        })
        .await;

        let mut producer = db.client().await;
        let tx = producer.transaction().await.expect("begin");
        tx.execute(
            "INSERT INTO outbox.events (event_type, payload) VALUES ('gate.skipped', '{}')",
            &[],
        )
        .await
        .expect("insert");
        // Did this insert skip its NOTIFY (the gate was free, so it holds it shared)? If the
        // relay asked for the gate in between, it notified instead: try again.
        let skipped: bool = tx
            .query_one(
                "SELECT count(*) = 1 FROM pg_locks
                  WHERE pid = pg_backend_pid() AND locktype = 'advisory' AND mode = 'ShareLock'
                    AND classid = $1::bigint::oid AND objid = $2::bigint::oid",
                &[&i64::from(GATE_LOCK.0), &i64::from(GATE_LOCK.1)],
            )
            .await
            .expect("own locks")
            .get(0);
        if !skipped {
            tx.commit().await.expect("commit");
            sent += 1;
            continue;
        }
        // The busy spell ends (500 ms without events) while this producer still holds the
        // gate shared, so the relay's tries fail until it commits.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            gate_sessions(&db, "ExclusiveLock", true).await,
            0,
            "nobody can hold the gate while a producer holds it shared"
        );
        tx.commit().await.expect("commit");
        sent += 1;
        break;
    }
    // Every event, the skipped one too.
    wait_for_statuses(&db, "delivered", sent).await;
    assert_eq!(
        relay.metrics.wakeups.with_label_values(&["poll"]).get(),
        0,
        "the fallback poll never ran"
    );
    relay.shutdown().await;
}

/// Several relays: one holds the gate, the others sleep "covered" by it. None of them waits
/// for the lock: a session waiting inside a statement keeps a snapshot, which holds back
/// vacuum and dead-index-entry cleanup for the whole database.
#[tokio::test]
async fn relays_that_do_not_get_the_gate_never_wait_for_it() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver starts");
    add_subscription(&db, "gate", &receiver.url("/gate"), &[]).await;
    let mut relays = Vec::new();
    for _ in 0..3 {
        let mut config = RelayConfig::for_tests();
        config.poll_interval = Duration::from_secs(3600);
        let relay = spawn_relay(&db, config).await;
        wait_until_ready("the relay is ready", &relay.health).await;
        relays.push(relay);
    }
    wait_until("one relay holds the gate", DEADLINE, || async {
        gate_sessions(&db, "ExclusiveLock", true).await == 1
    })
    .await;
    for _ in 0..20 {
        assert_eq!(gate_sessions(&db, "ExclusiveLock", false).await, 0);
        let waiting = count(
            &db,
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND application_name LIKE 'outbox-relay%'
                AND wait_event_type = 'Lock'",
        )
        .await;
        assert_eq!(waiting, 0, "a relay session waits for a lock");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And an event still wakes them (the gate holder's NOTIFY reaches every relay).
    publish(&db, "gate.one", json!({})).await;
    wait_for_statuses(&db, "delivered", 1).await;
    for relay in relays {
        relay.shutdown().await;
    }
}

/// The gate's session cut (a network blip, a DBA's pg_terminate_backend): the lock goes with
/// it, the relay reconnects and takes the gate again, and a producer's event wakes it as
/// before. With a fallback poll of an hour, only a gate that came back delivers it.
#[tokio::test]
async fn the_gate_is_taken_again_after_its_session_is_cut() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver starts");
    add_subscription(&db, "gate", &receiver.url("/gate"), &[]).await;
    let mut config = RelayConfig::for_tests();
    config.poll_interval = Duration::from_secs(3600);
    let relay = spawn_relay(&db, config).await;
    wait_until_ready("the relay is ready", &relay.health).await;
    wait_until("the idle relay holds the gate", DEADLINE, || async {
        gate_sessions(&db, "ExclusiveLock", true).await == 1
    })
    .await;

    assert_eq!(db.terminate_connections("outbox-relay-wake-gate").await, 1);
    wait_until("the relay holds the gate again", DEADLINE, || async {
        gate_sessions(&db, "ExclusiveLock", true).await == 1
    })
    .await;
    publish(&db, "gate.after_cut", json!({})).await;
    wait_for_statuses(&db, "delivered", 1).await;
    relay.shutdown().await;
}
