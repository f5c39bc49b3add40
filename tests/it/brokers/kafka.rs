//! Kafka targets: `kafka://host:port[,host:port…]/{topic}`, idempotent producer, success = the
//! broker's produce ack. Each test starts its own Kafka-protocol broker, tansu with memory
//! storage, on a free port ([`Tansu`]): nothing is shared, so a test may stop its broker.
//!
//! The binary is `$OUTBOX_TANSU`, else `~/.cache/outbox-relay/tansu-0.6.0/bin/tansu`, where
//! `.ci/run` installs it (`cargo install tansu --version 0.6.0 --locked --features dynostore
//! --root ~/.cache/outbox-relay/tansu-0.6.0`). tansu creates no topic on a produce: a topic the
//! test has not created is a missing topic.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use uuid::Uuid;

use super::proxy::Proxy;
use super::*;
use crate::harness::db::TestDb;
use crate::harness::relay::*;

/// The tansu version `.ci/run` installs and the tests were written against.
const TANSU_VERSION: &str = "0.6.0";
/// Names the binary; unset, the `.ci/run` install location is used.
const TANSU_ENV: &str = "OUTBOX_TANSU";

fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os(TANSU_ENV) {
        return PathBuf::from(path);
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    PathBuf::from(home).join(format!(
        ".cache/outbox-relay/tansu-{TANSU_VERSION}/bin/tansu"
    ))
}

/// One tansu broker, memory storage, on 127.0.0.1; killed on drop.
struct Tansu {
    addr: SocketAddr,
    /// The address the broker gives its clients in metadata, which they then connect to:
    /// its own, or a [`Proxy`]'s in front of it.
    advertised: SocketAddr,
    binary: PathBuf,
    child: Option<tokio::process::Child>,
}

impl Tansu {
    /// A running broker on a free port, or `None` when the binary is missing and
    /// `OUTBOX_ALLOW_MISSING_TOOLS=1` (the test then returns); panics otherwise.
    async fn start(test: &str) -> Option<Tansu> {
        Tansu::start_advertising(test, |addr| async move { (addr, ()) })
            .await
            .map(|(tansu, _)| tansu)
    }

    /// A running broker behind a [`Proxy`], which it advertises: every connection a client
    /// makes, bootstrap or not, goes through the proxy, so the test can break them all.
    async fn start_behind_proxy(test: &str) -> Option<(Tansu, Proxy)> {
        let (tansu, proxy) = Tansu::start_advertising(test, |addr| async move {
            let proxy = Proxy::start(addr).await;
            (proxy.addr, Some(proxy))
        })
        .await?;
        Some((tansu, proxy.expect("a proxy was started")))
    }

    /// [`Tansu::start`], advertising the address `advertise` gives for the broker's own (and
    /// keeping what else it returns).
    async fn start_advertising<A, Fut, T>(test: &str, advertise: A) -> Option<(Tansu, T)>
    where
        A: FnOnce(SocketAddr) -> Fut,
        Fut: std::future::Future<Output = (SocketAddr, T)>,
    {
        let binary = tansu_binary();
        if !binary.is_file() {
            crate::harness::tools::missing_tool(
                "tansu",
                test,
                &format!(
                    "`cargo install tansu --version {TANSU_VERSION} --locked --features dynostore \
                     --root ~/.cache/outbox-relay/tansu-{TANSU_VERSION}` (as .ci/run does), or set \
                     {TANSU_ENV} to the binary"
                ),
                &format!("{} does not exist", binary.display()),
            );
            return None;
        }
        // The port can be taken between this probe and tansu's bind; then start() fails
        // loudly, no test passes wrongly.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port");
        let (advertised, kept) = advertise(addr).await;
        let mut tansu = Tansu {
            addr,
            advertised,
            binary,
            child: None,
        };
        tansu.resume().await;
        Some((tansu, kept))
    }

    /// Starts the broker (again) on its port, empty (memory storage), and waits until it
    /// answers a metadata request.
    async fn resume(&mut self) {
        let listener = format!("tcp://{}", self.addr);
        let advertised = format!("tcp://{}", self.advertised);
        let child = tokio::process::Command::new(&self.binary)
            .args(["broker", "--listener-url", &listener])
            .args(["--advertised-listener-url", &advertised])
            .args(["--storage-engine", "memory://tansu/"])
            .arg("--silent")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| panic!("starting {}: {error}", self.binary.display()));
        self.child = Some(child);
        let addr = self.addr;
        wait_until("tansu answers", DEADLINE, || async move {
            tokio::task::spawn_blocking(move || {
                let consumer: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", addr.to_string())
                    .create()
                    .expect("consumer");
                consumer
                    .fetch_metadata(None, Duration::from_millis(500))
                    .is_ok()
            })
            .await
            .expect("metadata probe")
        })
        .await;
    }

    /// Kills the broker (its topics are gone with it).
    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill tansu");
        }
    }

    fn url(&self, topic: &str) -> String {
        format!("kafka://{}/{topic}", self.advertised)
    }

    async fn create_topic(&self, topic: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.addr.to_string())
            .create()
            .expect("admin client");
        let results = admin
            .create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(5))),
            )
            .await
            .expect("create topic");
        for result in results {
            result.unwrap_or_else(|(name, error)| panic!("creating topic {name}: {error}"));
        }
    }

    /// Every record of `topic`, partition by partition, each in offset order.
    async fn records(&self, topic: &str) -> Vec<OwnedMessage> {
        let addr = self.addr;
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", addr.to_string())
                .set("group.id", format!("outbox-test-{}", Uuid::new_v4()))
                .set("enable.auto.commit", "false")
                .create()
                .expect("consumer");
            let metadata = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(5))
                .expect("topic metadata");
            let partitions: Vec<i32> = metadata.topics()[0]
                .partitions()
                .iter()
                .map(|p| p.id())
                .collect();
            // Read until the partitions have been quiet for a second: tansu 0.6.0 reports a
            // high watermark of one past the last batch's base offset, not past its last
            // record, so the watermark cannot say where a partition ends.
            let mut assignment = TopicPartitionList::new();
            for partition in partitions {
                assignment
                    .add_partition_offset(&topic, partition, Offset::Beginning)
                    .expect("assignment");
            }
            consumer.assign(&assignment).expect("assign");
            let mut records = Vec::new();
            let until = std::time::Instant::now() + DEADLINE;
            while let Some(result) = consumer.poll(Duration::from_secs(1)) {
                assert!(std::time::Instant::now() < until, "reading {topic}");
                records.push(result.expect("fetch").detach());
            }
            // Partition by partition, each in offset order.
            records.sort_by_key(|record| (record.partition(), record.offset()));
            records
        })
        .await
        .expect("reading records")
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            // kill_on_drop would do it too; started now so the port is free sooner.
            let _ = child.start_kill();
        }
    }
}

fn header<'a>(record: &'a OwnedMessage, name: &str) -> Option<&'a str> {
    let headers = record.headers()?;
    headers
        .iter()
        .find(|header| header.key == name)
        .and_then(|header| header.value)
        .map(|value| std::str::from_utf8(value).expect("UTF-8 header"))
}

fn key(record: &OwnedMessage) -> &str {
    std::str::from_utf8(record.key().expect("a key")).expect("UTF-8 key")
}

/// Committed events are produced once each, keyed by their ordering key, with the SPEC's
/// headers and the webhook body byte for byte.
#[tokio::test]
async fn kafka_events_arrive_once_each_with_key_headers_and_the_webhook_body() {
    let test = "kafka_events_arrive_once_each_with_key_headers_and_the_webhook_body";
    let Some(tansu) = Tansu::start(test).await else {
        return;
    };
    let db = TestDb::new().await;
    let topic = unique("orders_");
    tansu.create_topic(&topic, 3).await;
    add_subscription(&db, "orders", &tansu.url(&topic), &[]).await;
    let relay = spawn_default_relay(&db).await;
    publish_many(&db, 20, 5).await;
    // And one event without an ordering key: its key is its event id.
    publish(&db, "order.paid", serde_json::json!({"seq": 100})).await;
    wait_for_statuses(&db, "delivered", 21).await;
    // Anything extra would show up by now: the relay polls every 200 ms.
    tokio::time::sleep(Duration::from_millis(600)).await;

    let bodies = webhook_bodies(&db).await;
    let records = tansu.records(&topic).await;
    assert_eq!(records.len(), 21, "each event exactly once");
    let mut seen = HashSet::new();
    for record in &records {
        let id = header(record, "event-id").expect("event-id");
        assert!(seen.insert(id.to_string()), "duplicate {id}");
        let event_id: Uuid = id.parse().expect("event-id is the event_id");
        let body: serde_json::Value =
            serde_json::from_slice(record.payload().expect("payload")).expect("JSON");
        if header(record, "event-type") == Some("order.paid") {
            assert_eq!(key(record), id, "no ordering key: the event id");
            assert_eq!(header(record, "tenant-id"), None);
        } else {
            assert!(key(record).starts_with("order:"), "{}", key(record));
            assert_eq!(body["ordering_key"].as_str(), Some(key(record)));
            assert_eq!(header(record, "event-type"), Some("order.created"));
            assert_eq!(header(record, "tenant-id"), Some("acme"));
        }
        assert_eq!(
            record.payload(),
            Some(bodies[&event_id].as_ref()),
            "the webhook body, byte for byte"
        );
    }
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.deliveries WHERE last_error IS NOT NULL"
        )
        .await,
        0
    );
    relay.shutdown().await;
}

/// An ordered subscription produces each key's events in event order, also when the first
/// produces fail (the topic does not exist yet) and are retried after later events.
#[tokio::test]
async fn kafka_ordered_subscription_keeps_each_keys_order() {
    let Some(tansu) = Tansu::start("kafka_ordered_subscription_keeps_each_keys_order").await else {
        return;
    };
    let db = TestDb::new().await;
    let topic = unique("ordered_");
    let relay =
        drain_ordered_past_failing_heads(&db, &tansu.url(&topic), || tansu.create_topic(&topic, 3))
            .await;
    let records = tansu.records(&topic).await;
    assert_each_keys_order(records.iter().filter_map(|r| r.payload()));
    relay.shutdown().await;
}

/// A replay produces the event again with the same `event-id` header and the same bytes.
#[tokio::test]
async fn kafka_replay_republishes_with_the_same_event_id() {
    let Some(tansu) = Tansu::start("kafka_replay_republishes_with_the_same_event_id").await else {
        return;
    };
    let db = TestDb::new().await;
    let topic = unique("replay_");
    tansu.create_topic(&topic, 1).await;
    let relay = deliver_one_then_replay(&db, &tansu.url(&topic), Duration::ZERO).await;
    wait_until("the replay is stored", DEADLINE, || async {
        tansu.records(&topic).await.len() == 2
    })
    .await;
    let records = tansu.records(&topic).await;
    let event_id = the_one_event_id(&db).await.to_string();
    for record in &records {
        assert_eq!(header(record, "event-id"), Some(event_id.as_str()));
    }
    assert_eq!(records[0].payload(), records[1].payload(), "the same bytes");
    relay.shutdown().await;
}

/// A topic the cluster does not have is a failed attempt with a reason; once the topic exists
/// the retry delivers it.
#[tokio::test]
async fn kafka_missing_topic_is_a_failed_attempt_then_recovers() {
    let Some(tansu) = Tansu::start("kafka_missing_topic_is_a_failed_attempt_then_recovers").await
    else {
        return;
    };
    let db = TestDb::new().await;
    let topic = unique("missing_");
    add_subscription(
        &db,
        "orders",
        &tansu.url(&topic),
        &[(
            "retry_schedule",
            "'{500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms}'",
        )],
    )
    .await;
    let relay = spawn_default_relay(&db).await;
    publish_many(&db, 1, 1).await;
    wait_for_statuses(&db, "failing", 1).await;
    let errors = last_errors(&db).await;
    let error = errors[0].as_deref().unwrap_or("");
    assert!(
        error.contains(&format!("kafka: producing to topic {topic}")),
        "{error}"
    );
    tansu.create_topic(&topic, 1).await;
    wait_for_statuses(&db, "delivered", 1).await;
    assert_eq!(tansu.records(&topic).await.len(), 1);
    relay.shutdown().await;
}

/// A stopped broker is a failed attempt (no connection), not a crashed relay; the broker back
/// on the same address, the retry delivers it, once.
#[tokio::test]
async fn kafka_stopped_broker_is_a_failed_attempt_then_recovers() {
    let Some(mut tansu) =
        Tansu::start("kafka_stopped_broker_is_a_failed_attempt_then_recovers").await
    else {
        return;
    };
    let db = TestDb::new().await;
    let topic = unique("stopped_");
    tansu.stop().await;
    add_subscription(
        &db,
        "orders",
        &tansu.url(&topic),
        &[
            (
                "retry_schedule",
                "'{500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms}'",
            ),
            // Longer than the producer's first metadata request may take (5 s), so the
            // attempt ends as a failed connect with its reason rather than as this timeout.
            ("timeout", "'15 seconds'"),
        ],
    )
    .await;
    let relay = spawn_default_relay(&db).await;
    publish_many(&db, 1, 1).await;
    wait_for_statuses(&db, "failing", 1).await;
    let errors = last_errors(&db).await;
    let error = errors[0].as_deref().unwrap_or("");
    assert!(
        error.starts_with(&format!(
            "connection failed: kafka: connecting to {}: ",
            tansu.addr
        )),
        "{error}"
    );
    tansu.resume().await;
    tansu.create_topic(&topic, 1).await;
    wait_for_statuses(&db, "delivered", 1).await;
    assert_eq!(tansu.records(&topic).await.len(), 1);
    relay.shutdown().await;
}

/// The relay's broker connections are cut three times while 300 events drain (tansu runs
/// behind a proxy it advertises, so the producer reaches it only through the proxy): every
/// event ends up in the topic. A record whose ack was lost may be there twice (the relay's
/// retry is a new record; consumers drop the copy by `event-id`); none is missing.
#[tokio::test]
async fn kafka_connection_cut_mid_drain_loses_nothing() {
    let Some((tansu, proxy)) =
        Tansu::start_behind_proxy("kafka_connection_cut_mid_drain_loses_nothing").await
    else {
        return;
    };
    let db = TestDb::new().await;
    let topic = unique("cut_");
    tansu.create_topic(&topic, 3).await;
    add_subscription(&db, "orders", &tansu.url(&topic), &CUT_TEST_SETTINGS).await;
    let relay = spawn_default_relay(&db).await;
    publish_many(&db, 300, 10).await;
    let cuts = cut_mid_drain(&db, || proxy.blackhole(), || async { proxy.cut() }).await;
    assert!(cuts > 0, "the relay's connections were cut");
    wait_for_statuses(&db, "delivered", 300).await;
    let records = tansu.records(&topic).await;
    let ids: HashSet<String> = records
        .iter()
        .map(|record| header(record, "event-id").expect("event-id").to_string())
        .collect();
    assert_every_event_arrived(&db, &ids).await;
    relay.shutdown().await;
}
