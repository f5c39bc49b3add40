//! An ordered subscription served by three relay processes while the subscriber fails at
//! random: per ordering key, the successful receipts are exactly the key's events in order.

use std::collections::BTreeMap;
use std::time::Instant;

use testkit::receiver::{Receiver, Reply};

use crate::harness::db::TestDb;
use crate::harness::relay::{RelayProcess, add_subscription, count, sequences_by_key};
use crate::{deadlocks, stop_all, wait_until_all_delivered};

const KEYS: i64 = 20;
const PER_KEY: i64 = 100;
/// Fixed, so every run fails the same attempts of the same payloads.
const SEED: u64 = 0x5eed;
/// 20 % of attempts answer 503.
const FAILURE_PER_MILLE: u16 = 200;
/// 20 short waits: 21 attempts, so a delivery dies only after 21 failures in a row
/// (p = 0.2^21 per delivery), which this seed never produces.
const RETRY_SCHEDULE: &str = "'{50 milliseconds,100 milliseconds,100 milliseconds,\
    100 milliseconds,100 milliseconds,100 milliseconds,100 milliseconds,100 milliseconds,\
    100 milliseconds,100 milliseconds,100 milliseconds,100 milliseconds,100 milliseconds,\
    100 milliseconds,100 milliseconds,100 milliseconds,100 milliseconds,100 milliseconds,\
    100 milliseconds,100 milliseconds}'";

/// Three relays, one ordered subscription, 20 keys × 100 events, 20 % of attempts failing
/// (seeded): per key, each request is for the event right after the last success (one at a
/// time, no overtaking), and the successes are exactly 1..=100, each once.
#[tokio::test]
async fn ordered_subscription_under_seeded_random_failures_and_several_relays() {
    let _alone = crate::one_at_a_time().await;
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver");
    receiver.fail_at_random("/hook", SEED, FAILURE_PER_MILLE, Reply::Status(503));
    add_subscription(
        &db,
        "ordered",
        &receiver.url("/hook"),
        &[("ordered", "true"), ("retry_schedule", RETRY_SCHEDULE)],
    )
    .await;
    let mut relays: Vec<RelayProcess> = ["ord-a", "ord-b", "ord-c"]
        .iter()
        .map(|id| RelayProcess::spawn(&db, id, &[]))
        .collect();

    let started = Instant::now();
    let total = KEYS * PER_KEY;
    // Keys interleaved (k00, k01, …, k19, k00, …) over four statements; per key the payload
    // carries its sequence number 1..=100, in event id order.
    let client = db.client().await;
    for part in 0..4 {
        let (first, last) = (part * total / 4 + 1, (part + 1) * total / 4);
        client
            .execute(
                "INSERT INTO outbox.events (event_type, payload, ordering_key)
                 SELECT 'lead.updated', jsonb_build_object('key', k, 'seq', (n - 1) / $3 + 1), k
                   FROM generate_series($1::bigint, $2::bigint) n,
                        LATERAL (SELECT 'k' || lpad(((n - 1) % $3)::text, 2, '0') AS k) key
                  ORDER BY n",
                &[&first, &last, &KEYS],
            )
            .await
            .expect("publish keyed events");
    }
    drop(client);
    let mut handles: Vec<&mut RelayProcess> = relays.iter_mut().collect();
    wait_until_all_delivered(&db, total, &mut handles).await;
    let elapsed = started.elapsed();

    // The events themselves are numbered 1..=100 per key in id order (the test's premise).
    let published = sequences_by_key(&db).await;
    assert_eq!(published.len() as i64, KEYS);
    assert!(
        published
            .values()
            .all(|seqs| *seqs == (1..=PER_KEY).collect::<Vec<_>>())
    );

    // Replay the receipts per key in arrival order.
    let received = receiver.received("/hook");
    let mut last_success: BTreeMap<String, i64> = BTreeMap::new();
    let mut failures = 0;
    for request in &received {
        let body = request.json();
        let key = body["ordering_key"].as_str().unwrap_or("?").to_string();
        let seq = body["data"]["seq"].as_i64().unwrap_or(-1);
        let done = last_success.entry(key.clone()).or_default();
        assert_eq!(
            seq,
            *done + 1,
            "key {key}: a request for seq {seq} arrived while the last success was {done} \
             (overtaking, a gap, or a repeated success)"
        );
        if request.succeeded() {
            *done = seq;
        } else {
            failures += 1;
        }
    }
    let attempts = count(&db, "SELECT sum(attempts)::bigint FROM outbox.deliveries").await;
    let most_attempts = count(&db, "SELECT max(attempts)::bigint FROM outbox.deliveries").await;
    eprintln!(
        "ordered_random_failures: {total} events over {KEYS} keys, {} requests, {failures} \
         answered 503, at most {most_attempts} attempts for one delivery, {:.1} s; \
         deadlocks {}",
        received.len(),
        elapsed.as_secs_f64(),
        deadlocks(&db).await
    );
    assert!(
        last_success.values().all(|done| *done == PER_KEY) && last_success.len() as i64 == KEYS,
        "not every key got through: {last_success:?}"
    );
    assert!(failures > 0, "no failure was injected");
    assert_eq!(
        attempts,
        received.len() as i64,
        "the recorded attempts differ from the requests received"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.deliveries WHERE status <> 'delivered' OR blocked"
        )
        .await,
        0
    );
    stop_all(&mut handles).await;
}
