//! Ordered subscriptions: per ordering_key, one delivery in flight at a time, in event
//! order; a failing head blocks only its key; a dead head lets the key move on; and a
//! lower id committed later is never skipped or overtaken.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::receiver::{Received, Receiver, Reply};

use crate::harness::db::TestDb;
use crate::harness::relay::*;

/// Per key, the payload sequence numbers in arrival order, with arrival times. Pass only
/// the requests that matter (e.g. those answered 2xx, see `Received::succeeded`).
fn arrivals_by_key(received: &[Received]) -> HashMap<String, Vec<(i64, Instant)>> {
    let mut by_key: HashMap<String, Vec<(i64, Instant)>> = HashMap::new();
    for request in received {
        let body = request.json();
        let key = body["ordering_key"].as_str().unwrap_or("-").to_string();
        let seq = body["data"]["seq"].as_i64().unwrap_or(-1);
        by_key.entry(key).or_default().push((seq, request.at));
    }
    by_key
}

async fn publish_keyed(db: &TestDb, key: &str, seq: i64) {
    db.client()
        .await
        .execute(
            "SELECT outbox.publish('lead.updated', $1, ordering_key => $2)",
            &[&json!({ "seq": seq, "key": key }), &key],
        )
        .await
        .expect("publish");
}

#[tokio::test]
async fn each_key_is_delivered_in_event_order_one_at_a_time() {
    let (db, receiver) = db_with_subscriber(
        "crm",
        "/hook",
        &[("ordered", "true"), ("max_in_flight", "10")],
    )
    .await;
    receiver.set_default("/hook", Reply::Delay(Duration::from_millis(40), 200));
    let relay = spawn_default_relay(&db).await;
    for seq in 0..30 {
        publish_keyed(&db, ["lead:1", "lead:2", "lead:3"][seq as usize % 3], seq).await;
    }
    let received = receiver
        .wait_for("/hook", 30, DEADLINE)
        .await
        .expect("all delivered");
    let by_key = arrivals_by_key(&received);
    assert_eq!(by_key.len(), 3);
    for (key, arrivals) in &by_key {
        let seqs: Vec<i64> = arrivals.iter().map(|a| a.0).collect();
        let first: i64 = key.trim_start_matches("lead:").parse().expect("lead:N");
        let expected: Vec<i64> = (0..30).filter(|seq| seq % 3 == first - 1).collect();
        assert_eq!(seqs, expected, "{key}: each event once, in event order");
        for pair in arrivals.windows(2) {
            // The next one may only be sent after the previous answer (40 ms later).
            assert!(
                pair[1].1 - pair[0].1 >= Duration::from_millis(39),
                "{key}: two in flight at once"
            );
        }
    }
    // That other keys flow while one key waits is shown deterministically by
    // a_failing_head_blocks_only_its_key_and_a_dead_head_releases_it.
    wait_for_statuses(&db, "delivered", 30).await;
    assert_eq!(receiver.received("/hook").len(), 30, "nothing sent twice");
    relay.shutdown().await;
}

/// A failing head holds back its own key only; once dead, the key moves on in order.
#[tokio::test]
async fn a_failing_head_blocks_only_its_key_and_a_dead_head_releases_it() {
    let (db, receiver) = db_with_subscriber(
        "crm",
        "/hook",
        &[
            ("ordered", "true"),
            ("retry_schedule", "'{100 milliseconds,1 hour}'"),
        ],
    )
    .await;
    receiver.reply_when_body_contains("/hook", "\"seq\": 0}", Reply::Status(500), usize::MAX);
    // Two quick attempts, then an hour's wait: the head cannot die until the test says so.
    let relay = spawn_default_relay(&db).await;
    publish_keyed(&db, "stuck", 0).await;
    publish_keyed(&db, "stuck", 1).await;
    publish_keyed(&db, "stuck", 2).await;
    for seq in 10..15 {
        publish_keyed(&db, "free", seq).await;
    }
    wait_until("the free key is delivered and the head failed twice", DEADLINE, || async {
        arrivals_by_key(&receiver.received("/hook")).get("free").map(Vec::len) == Some(5)
            && count(&db, "SELECT count(*) FROM outbox.deliveries WHERE status = 'failing' AND attempts = 2").await == 1
    })
    .await;
    let stuck_so_far: Vec<i64> = arrivals_by_key(&receiver.received("/hook"))["stuck"]
        .iter()
        .map(|a| a.0)
        .collect();
    assert_eq!(
        stuck_so_far,
        vec![0, 0],
        "the key overtook its failing head"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.deliveries WHERE blocked").await,
        2
    );

    // The third attempt is the last (1 + 2 waits): make it due now; the head dies and
    // releases its key.
    db.client()
        .await
        .execute(
            "UPDATE outbox.deliveries SET next_attempt_at = now() WHERE status = 'failing'",
            &[],
        )
        .await
        .expect("due now");
    wait_for_statuses(&db, "dead", 1).await;
    wait_for_statuses(&db, "delivered", 7).await;
    let stuck: Vec<i64> = arrivals_by_key(&receiver.received("/hook"))["stuck"]
        .iter()
        .map(|a| a.0)
        .collect();
    assert_eq!(
        stuck,
        vec![0, 0, 0, 1, 2],
        "three failed attempts of the head, then the rest in order"
    );
    relay.shutdown().await;
}

/// The commit-order hazard: a transaction holding a lower id commits after a higher id is
/// visible. The higher id must wait (ordered subscriptions only), and both arrive in id order.
#[tokio::test]
async fn a_lower_id_committed_later_is_not_overtaken() {
    let (db, receiver) = db_with_subscriber("ordered", "/ordered", &[("ordered", "true")]).await;
    add_subscription(&db, "unordered", &receiver.url("/unordered"), &[]).await;
    let relay = spawn_default_relay(&db).await;

    let mut slow_client = db.client().await;
    let slow = slow_client.transaction().await.expect("begin slow");
    slow.execute(
        "SELECT outbox.publish('lead.updated', '{\"seq\": 1}', ordering_key => 'lead:9')",
        &[],
    )
    .await
    .expect("slow insert takes the lower id");
    publish_keyed(&db, "lead:9", 2).await; // higher id, committed first

    // The unordered subscription gets the committed event at once: the relay is working.
    receiver
        .wait_for("/unordered", 1, DEADLINE)
        .await
        .expect("unordered delivery");
    // Several poll rounds later, the ordered one still has nothing.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        receiver.received("/ordered").is_empty(),
        "the higher id overtook an uncommitted lower id"
    );

    slow.commit().await.expect("commit slow");
    let received = receiver
        .wait_for("/ordered", 2, DEADLINE)
        .await
        .expect("both delivered");
    let seqs: Vec<i64> = received
        .iter()
        .map(|r| r.json()["data"]["seq"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(seqs, vec![1, 2]);
    relay.shutdown().await;
}

/// The same hazard when the slow transaction rolls back: the waiting event then goes out.
#[tokio::test]
async fn a_rolled_back_lower_id_releases_the_events_behind_it() {
    let (db, receiver) = db_with_subscriber("ordered", "/ordered", &[("ordered", "true")]).await;
    let relay = spawn_default_relay(&db).await;

    let mut slow_client = db.client().await;
    let slow = slow_client.transaction().await.expect("begin slow");
    slow.execute(
        "SELECT outbox.publish('lead.updated', '{\"seq\": 1}', ordering_key => 'lead:9')",
        &[],
    )
    .await
    .expect("slow insert");
    publish_keyed(&db, "lead:9", 2).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(receiver.received("/ordered").is_empty());
    slow.rollback().await.expect("rollback");
    let received = receiver
        .wait_for("/ordered", 1, DEADLINE)
        .await
        .expect("delivered");
    assert_eq!(received[0].json()["data"]["seq"], 2);
    relay.shutdown().await;
}

/// Concurrent producers on one key, two relays, a subscriber that fails at random (seeded):
/// per key, the successful receipts are complete and in event order.
#[tokio::test]
async fn concurrent_producers_and_two_relays_keep_each_key_in_order() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver");
    // Deterministic failures (the same every run): the first attempt of every seventh event.
    let failing: Vec<i64> = (0..200).filter(|n| n % 7 == 3).collect();
    for seq in &failing {
        // jsonb prints keys sorted with a space after the colon: {"pad": 0, "seq": 3}
        receiver.reply_when_body_contains(
            "/hook",
            &format!("\"seq\": {seq}}}"),
            Reply::Status(503),
            1,
        );
    }
    add_subscription(
        &db,
        "crm",
        &receiver.url("/hook"),
        &[
            ("ordered", "true"),
            (
                "retry_schedule",
                "'{100 milliseconds,100 milliseconds,100 milliseconds}'",
            ),
        ],
    )
    .await;
    let a = spawn_default_relay(&db).await;
    let b = spawn_default_relay(&db).await;

    // Four producers, each its own transactions, interleaving keys.
    let mut producers = Vec::new();
    for producer in 0..4i64 {
        let pool = db.pool().clone();
        producers.push(tokio::spawn(async move {
            let client = pool.get().await.expect("client");
            for i in 0..50i64 {
                let seq = producer * 50 + i;
                let key = format!("k{}", seq % 5);
                client
                    .execute(
                        "SELECT outbox.publish('x', jsonb_build_object('seq', $1::bigint, 'pad', 0), ordering_key => $2)",
                        &[&seq, &key],
                    )
                    .await
                    .expect("publish");
            }
        }));
    }
    for producer in producers {
        producer.await.expect("producer");
    }
    wait_for_statuses(&db, "delivered", 200).await;

    // Event order per key = id order in the events table.
    let expected = sequences_by_key(&db).await;
    let (successes, failures): (Vec<Received>, Vec<Received>) = receiver
        .received("/hook")
        .into_iter()
        .partition(Received::succeeded);
    let mut failed: Vec<i64> = failures
        .iter()
        .map(|r| r.json()["data"]["seq"].as_i64().unwrap_or(-1))
        .collect();
    failed.sort_unstable();
    assert_eq!(failed, failing, "each scripted failure was sent, once");
    // Exact: an event that succeeded twice would show up as a repeat.
    let got: std::collections::BTreeMap<String, Vec<i64>> = arrivals_by_key(&successes)
        .into_iter()
        .map(|(key, arrivals)| (key, arrivals.iter().map(|a| a.0).collect()))
        .collect();
    assert_eq!(
        got, expected,
        "per key, every event succeeded exactly once, in event order"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// Backfill and replay keep an ordered subscription's keys one at a time and in order:
/// backfilled deliveries carry the event's key and wait behind the earlier ones, and a
/// replay of a whole key re-queues it head first.
#[tokio::test]
async fn backfill_and_replay_keep_ordered_keys_in_order() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver");
    receiver.set_default("/hook", Reply::Delay(Duration::from_millis(20), 200));
    // Published (and dispatched to nobody) before the subscription exists.
    let relay = spawn_default_relay(&db).await;
    for seq in 0..12 {
        publish_keyed(&db, ["lead:1", "lead:2"][seq as usize % 2], seq).await;
    }
    wait_until("all events dispatched", DEADLINE, || async {
        count(
            &db,
            "SELECT count(*) FROM outbox.events WHERE dispatched_at IS NULL",
        )
        .await
            == 0
    })
    .await;
    relay.shutdown().await;

    add_subscription(
        &db,
        "late",
        &receiver.url("/hook"),
        &[("ordered", "true"), ("max_in_flight", "10")],
    )
    .await;
    let client = db.client().await;
    client
        .execute(
            "SELECT * FROM outbox.backfill('late', '-infinity', reason => 'catch up')",
            &[],
        )
        .await
        .expect("backfill");
    let flags: Vec<(String, i64, i64)> = client
        .query(
            "SELECT ordering_key, count(*) FILTER (WHERE NOT blocked), count(*)
               FROM outbox.deliveries GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .expect("flags")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        flags,
        vec![("lead:1".to_string(), 1, 6), ("lead:2".to_string(), 1, 6)],
        "backfill must carry the key and leave exactly one delivery per key unblocked"
    );

    let relay = spawn_default_relay(&db).await;
    wait_for_statuses(&db, "delivered", 12).await;
    client
        .execute(
            "SELECT * FROM outbox.replay(status => '{delivered}', subscription => 'late')",
            &[],
        )
        .await
        .expect("replay");
    wait_until("the replay is delivered", DEADLINE, || async {
        receiver.received("/hook").len() == 24
            && count(
                &db,
                "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'",
            )
            .await
                == 12
    })
    .await;
    let by_key = arrivals_by_key(&receiver.received("/hook"));
    assert_eq!(by_key.len(), 2);
    for (key, arrivals) in &by_key {
        let seqs: Vec<i64> = arrivals.iter().map(|a| a.0).collect();
        let first: i64 = key.trim_start_matches("lead:").parse().expect("lead:N");
        let once: Vec<i64> = (0..12).filter(|seq| seq % 2 == first - 1).collect();
        let expected: Vec<i64> = once.iter().chain(&once).copied().collect();
        assert_eq!(
            seqs, expected,
            "{key}: the backfill in order, then the replay in order"
        );
    }
    relay.shutdown().await;
}

/// With no ordered subscription, the ordered pass only moves its cursor, once per poll
/// interval: producers at a steady rate keep a probe pending, and running the pass on every
/// round for that took a tenth of the relay's database time. Counted as calls of the SQL
/// functions: over about 2 s of steady inserts the dispatcher runs hundreds of rounds (1 ms
/// looks in a busy spell), the ordered pass one per 200 ms poll, some 15; on every round it
/// would be as many as the rounds.
#[tokio::test]
async fn without_an_ordered_subscription_the_ordered_pass_runs_once_per_poll_interval() {
    const EVENTS: i64 = 400;
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver");
    add_subscription(&db, "crm", &receiver.url("/hook"), &[]).await;
    track_function_calls(&db).await;
    let relay = spawn_default_relay(&db).await;
    let producer = db.client().await;
    for seq in 0..EVENTS {
        producer
            .execute(
                "INSERT INTO outbox.events (event_type, payload)
                 VALUES ('lead.created', jsonb_build_object('seq', $1::bigint))",
                &[&seq],
            )
            .await
            .expect("insert");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_for_statuses(&db, "delivered", EVENTS).await;
    relay.shutdown().await;
    let rounds = function_calls_after_relays_exit(&db, "dispatch_events").await;
    let ordered_passes = function_calls_after_relays_exit(&db, "dispatch_ordered").await;
    assert!(
        ordered_passes * 5 < rounds,
        "{ordered_passes} ordered passes in {rounds} dispatch rounds for {EVENTS} events over \
         about 2 s"
    );
}
