//! Redis Streams targets: `redis://host:port/{db}?stream=S&maxlen=N`, success = the entry id.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use ::redis::AsyncCommands;
use uuid::Uuid;

use super::proxy::Proxy;
use super::*;
use crate::harness::db::TestDb;
use crate::harness::relay::*;
use outbox_relay::config::RelayConfig;

const REDIS: &str = "127.0.0.1:6379";

/// A fresh stream name in db 0; deleted on drop.
struct TestStream {
    connection: ::redis::aio::MultiplexedConnection,
    name: String,
}

/// One stream entry's fields, as XRANGE lists them.
type Fields = Vec<(String, Vec<u8>)>;
/// One stream entry: its id and fields.
type Entry = (String, HashMap<String, Vec<u8>>);

impl TestStream {
    async fn new() -> TestStream {
        let client = ::redis::Client::open(format!("redis://{REDIS}/0")).expect("redis URL");
        let connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to Redis");
        TestStream {
            connection,
            name: unique("outbox-test-"),
        }
    }

    fn url(&self, host_port: &str, query: &str) -> String {
        format!("redis://{host_port}/0?stream={}{query}", self.name)
    }

    async fn entries(&self) -> Vec<Entry> {
        let mut connection = self.connection.clone();
        let raw: Vec<(String, Fields)> = ::redis::cmd("XRANGE")
            .arg(&self.name)
            .arg("-")
            .arg("+")
            .query_async(&mut connection)
            .await
            .expect("XRANGE");
        raw.into_iter()
            .map(|(id, fields)| (id, fields.into_iter().collect()))
            .collect()
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let mut connection = self.connection.clone();
        let name = self.name.clone();
        tokio::spawn(async move {
            let _: Result<(), _> = connection.del(name).await;
        });
    }
}

fn field<'a>(entry: &'a Entry, name: &str) -> Option<&'a str> {
    entry
        .1
        .get(name)
        .map(|value| std::str::from_utf8(value).expect("UTF-8 field"))
}

/// Committed events are added once each, with `event_id`, `event_type`, the webhook body byte
/// for byte, and the event's tenant, ordering key and source as fields.
#[tokio::test]
async fn redis_events_arrive_once_each_with_identity_fields_and_the_webhook_body() {
    let db = TestDb::new().await;
    let stream = TestStream::new().await;
    add_subscription(&db, "orders", &stream.url(REDIS, ""), &[]).await;
    let relay = spawn_default_relay(&db).await;
    publish_many(&db, 20, 5).await;
    wait_for_statuses(&db, "delivered", 20).await;
    tokio::time::sleep(Duration::from_millis(600)).await;

    let bodies = webhook_bodies(&db).await;
    let entries = stream.entries().await;
    assert_eq!(entries.len(), 20, "each event exactly once");
    let mut seen = HashSet::new();
    for entry in &entries {
        let id = field(entry, "event_id").expect("event_id");
        assert!(seen.insert(id.to_string()), "duplicate {id}");
        let event_id: Uuid = id.parse().expect("a UUID");
        assert_eq!(field(entry, "event_type"), Some("order.created"));
        assert_eq!(field(entry, "tenant_id"), Some("acme"));
        assert_eq!(field(entry, "source_service"), Some("shop"));
        assert!(
            field(entry, "ordering_key")
                .expect("ordering_key")
                .starts_with("order:")
        );
        assert_eq!(
            entry.1["body"].as_slice(),
            bodies[&event_id].as_ref(),
            "the webhook body, byte for byte"
        );
    }
    relay.shutdown().await;
}

/// `maxlen` trims the stream (approximately, as `MAXLEN ~` does) while every event is still
/// confirmed.
#[tokio::test]
async fn redis_maxlen_trims_the_stream() {
    let db = TestDb::new().await;
    let stream = TestStream::new().await;
    add_subscription(&db, "orders", &stream.url(REDIS, "&maxlen=10"), &[]).await;
    let relay = spawn_default_relay(&db).await;
    publish_many(&db, 300, 1).await;
    wait_for_statuses(&db, "delivered", 300).await;
    let kept = stream.entries().await.len();
    // `~` trims whole macro nodes (100 entries by default), so up to about 110 remain.
    assert!((10..300).contains(&kept), "kept {kept}");
    relay.shutdown().await;
}

/// Redis kills the relay's connection (`CLIENT KILL`) three times while 300 events drain:
/// every event ends up in the stream. Redis has no de-duplication, so an entry whose reply
/// was lost may be there twice; none is missing.
#[tokio::test]
async fn redis_client_kill_mid_drain_loses_nothing() {
    let db = TestDb::new().await;
    let stream = TestStream::new().await;
    // Through a proxy to learn which connection is the relay's (its address as Redis sees
    // it) and to lose a burst of XADDs on the way; the cut itself is Redis's CLIENT KILL.
    let proxy = Proxy::start(REDIS.parse().expect("address")).await;
    add_subscription(
        &db,
        "orders",
        &stream.url(&proxy.addr.to_string(), ""),
        &CUT_TEST_SETTINGS,
    )
    .await;
    let relay = spawn_default_relay(&db).await;
    publish_many(&db, 300, 10).await;
    let admin = stream.connection.clone();
    let proxy = &proxy;
    let killed = cut_mid_drain(
        &db,
        || proxy.blackhole(),
        || {
            let mut admin = admin.clone();
            let addrs = proxy.upstream_addrs();
            async move {
                let mut killed = 0;
                for addr in addrs {
                    let gone: i64 = ::redis::cmd("CLIENT")
                        .arg("KILL")
                        .arg("ADDR")
                        .arg(addr.to_string())
                        .query_async(&mut admin)
                        .await
                        .unwrap_or(0);
                    killed += usize::try_from(gone).unwrap_or(0);
                }
                // New connections must get through; the killed ones carried the lost burst.
                proxy.resume();
                killed
            }
        },
    )
    .await;
    assert!(killed > 0, "Redis killed the relay's connection");
    wait_for_statuses(&db, "delivered", 300).await;
    let ids: HashSet<String> = stream
        .entries()
        .await
        .iter()
        .map(|entry| field(entry, "event_id").expect("event_id").to_string())
        .collect();
    assert_every_event_arrived(&db, &ids).await;
    relay.shutdown().await;
}

/// An ordered subscription adds each key's events in event order, also when the first XADDs
/// fail (the key is not a stream yet) and are retried after later events were published.
#[tokio::test]
async fn redis_ordered_subscription_keeps_each_keys_order() {
    let db = TestDb::new().await;
    let stream = TestStream::new().await;
    let mut connection = stream.connection.clone();
    let () = connection
        .set(&stream.name, "not a stream yet")
        .await
        .expect("SET");
    let relay = drain_ordered_past_failing_heads(&db, &stream.url(REDIS, ""), || async {
        let () = connection.del(&stream.name).await.expect("DEL");
    })
    .await;
    let entries = stream.entries().await;
    assert_each_keys_order(entries.iter().map(|entry| entry.1["body"].as_slice()));
    relay.shutdown().await;
}

/// A replay adds the event again, with the same `event_id` and the same body.
#[tokio::test]
async fn redis_replay_republishes_with_the_same_event_id() {
    let db = TestDb::new().await;
    let stream = TestStream::new().await;
    let relay = deliver_one_then_replay(&db, &stream.url(REDIS, ""), Duration::ZERO).await;
    wait_until("the replay is added", DEADLINE, || async {
        stream.entries().await.len() == 2
    })
    .await;
    let entries = stream.entries().await;
    let event_id = the_one_event_id(&db).await;
    for entry in &entries {
        assert_eq!(
            field(entry, "event_id"),
            Some(event_id.to_string().as_str())
        );
    }
    assert_eq!(entries[0].1["body"], entries[1].1["body"], "the same bytes");
    relay.shutdown().await;
}

/// A Redis error reply (here: the key holds a string, not a stream) is a failed attempt with
/// Redis's own words, retried on the schedule.
#[tokio::test]
async fn redis_error_reply_is_a_failed_attempt() {
    let db = TestDb::new().await;
    let stream = TestStream::new().await;
    let mut connection = stream.connection.clone();
    let () = connection
        .set(&stream.name, "not a stream")
        .await
        .expect("SET");
    add_subscription(
        &db,
        "orders",
        &stream.url(REDIS, ""),
        &[("retry_schedule", "'{1 hour}'")],
    )
    .await;
    let relay = spawn_default_relay(&db).await;
    publish_many(&db, 1, 1).await;
    wait_for_statuses(&db, "failing", 1).await;
    let errors = last_errors(&db).await;
    let error = errors[0].as_deref().unwrap_or("");
    assert!(
        error.starts_with(&format!(
            "rejected: redis: XADD to stream {}: ",
            stream.name
        )) && error.contains("WRONGTYPE"),
        "{error}"
    );
    relay.shutdown().await;
}

/// `rediss://` to `localhost` through a TLS proxy with a certificate from the test's CA,
/// trusted by `OUTBOX_BROKER_CA_FILE`: every event is added. The same proxy reached as
/// `127.0.0.1` is refused (the certificate names `localhost`): failed attempts that say why,
/// and nothing in that stream.
#[tokio::test]
async fn rediss_publishes_over_tls_verified_against_the_urls_host_name() {
    let broker = TlsBroker::start(REDIS).await;
    let db = TestDb::new().await;
    let (by_name, by_ip) = (TestStream::new().await, TestStream::new().await);
    let relay = publish_by_name_and_by_ip(
        &db,
        &broker,
        &over_tls(&by_name.url(&broker.by_name(), "")),
        &over_tls(&by_ip.url(&broker.by_ip(), "")),
    )
    .await;
    assert_eq!(by_name.entries().await.len(), 10);
    assert!(
        by_ip.entries().await.is_empty(),
        "nothing reaches the broker by a name the certificate lacks"
    );
    relay.shutdown().await;
}

/// Without `OUTBOX_BROKER_CA_FILE` the system's roots decide, and the test CA is not among
/// them: every attempt fails on the certificate, none falls back to plain text.
#[tokio::test]
async fn rediss_refuses_a_certificate_from_an_unknown_ca() {
    let broker = TlsBroker::start(REDIS).await;
    let db = TestDb::new().await;
    let stream = TestStream::new().await;
    let url = over_tls(&stream.url(&broker.by_name(), ""));
    let relay = publish_with_an_unknown_ca(&db, &url).await;
    assert!(stream.entries().await.is_empty());
    relay.shutdown().await;
}

/// A broker connection no publish used for `OUTBOX_BROKER_IDLE_TIMEOUT` is closed (a removed
/// or quiet subscription must not keep one for the relay's lifetime); the next publish
/// connects again.
#[tokio::test]
async fn redis_idle_connection_is_closed_and_the_next_publish_reconnects() {
    let db = TestDb::new().await;
    let stream = TestStream::new().await;
    let proxy = Proxy::start(REDIS.parse().expect("address")).await;
    add_subscription(&db, "orders", &stream.url(&proxy.addr.to_string(), ""), &[]).await;
    let mut config = RelayConfig::for_tests();
    // Long enough that the checks right after a delivery see the connection still open on
    // a slow machine; the sweep runs every half of it.
    config.broker_idle_timeout = Duration::from_secs(3);
    let relay = spawn_relay(&db, config).await;
    publish_many(&db, 1, 1).await;
    wait_for_statuses(&db, "delivered", 1).await;
    assert_eq!(
        proxy.upstream_addrs().len(),
        1,
        "one connection after the publish"
    );
    wait_until("the idle connection is closed", DEADLINE, || async {
        proxy.upstream_addrs().is_empty()
    })
    .await;
    publish_many(&db, 1, 1).await;
    wait_for_statuses(&db, "delivered", 2).await;
    assert_eq!(stream.entries().await.len(), 2);
    assert_eq!(proxy.upstream_addrs().len(), 1, "connected again");
    relay.shutdown().await;
}

/// A `rediss://` connection gone silent fails the publish on its timeout, and the next
/// attempt uses a new connection: the command lost on the way left the old one waiting for a
/// reply that never comes.
#[tokio::test]
async fn rediss_connection_gone_silent_is_replaced_after_a_timeout() {
    let broker = TlsBroker::start(REDIS).await;
    let db = TestDb::new().await;
    let stream = TestStream::new().await;
    let url = over_tls(&stream.url(&broker.by_name(), ""));
    let config = broker.tls.trusting_relay_config();
    let relay = deliver_past_a_silent_spell(&db, &url, &broker.proxy, config).await;
    assert_eq!(stream.entries().await.len(), 2);
    relay.shutdown().await;
}

/// The same for a plain `redis://` connection.
#[tokio::test]
async fn redis_connection_gone_silent_is_replaced_after_a_timeout() {
    let proxy = Proxy::start(REDIS.parse().expect("address")).await;
    let db = TestDb::new().await;
    let stream = TestStream::new().await;
    let url = stream.url(&proxy.addr.to_string(), "");
    let relay = deliver_past_a_silent_spell(&db, &url, &proxy, RelayConfig::for_tests()).await;
    assert_eq!(stream.entries().await.len(), 2);
    relay.shutdown().await;
}
