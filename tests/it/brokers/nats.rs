//! NATS JetStream targets: `nats://host:port/{subject}`, success = the stream's PubAck.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::{self, stream::StorageType};
use outbox_relay::config::RelayConfig;
use uuid::Uuid;

use super::proxy::Proxy;
use super::*;
use crate::harness::db::TestDb;
use crate::harness::relay::*;

const NATS: &str = "127.0.0.1:4222";

/// A memory stream on one fresh subject; deleted on drop.
struct TestStream {
    jetstream: jetstream::Context,
    name: String,
    subject: String,
}

impl TestStream {
    /// `duplicate_window`: how long JetStream drops a second message with the same
    /// `Nats-Msg-Id`.
    async fn create(duplicate_window: Duration) -> TestStream {
        let stream = TestStream::not_yet_created().await;
        stream.create_now(duplicate_window).await;
        stream
    }

    /// A name and subject, with no stream behind them until [`TestStream::create_now`].
    async fn not_yet_created() -> TestStream {
        let client = async_nats::connect(NATS).await.expect("connect to NATS");
        let name = unique("outbox_");
        TestStream {
            jetstream: jetstream::new(client),
            subject: format!("outbox.test.{name}"),
            name,
        }
    }

    async fn create_now(&self, duplicate_window: Duration) {
        self.jetstream
            .create_stream(jetstream::stream::Config {
                name: self.name.clone(),
                subjects: vec![self.subject.clone()],
                storage: StorageType::Memory,
                duplicate_window,
                ..Default::default()
            })
            .await
            .expect("create stream");
    }

    fn url(&self) -> String {
        format!("nats://{NATS}/{}", self.subject)
    }

    /// Every message in the stream, in stream order.
    async fn messages(&self) -> Vec<jetstream::message::StreamMessage> {
        let mut stream = self
            .jetstream
            .get_stream(&self.name)
            .await
            .expect("get stream");
        let count = stream.info().await.expect("stream info").state.messages;
        let mut messages = Vec::new();
        for sequence in 1..=count {
            messages.push(
                stream
                    .get_raw_message(sequence)
                    .await
                    .expect("read message"),
            );
        }
        messages
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let jetstream = self.jetstream.clone();
        let name = self.name.clone();
        // Best effort: a leftover memory stream only costs the broker a little memory.
        tokio::spawn(async move {
            let _ = jetstream.delete_stream(name).await;
        });
    }
}

fn header<'a>(message: &'a jetstream::message::StreamMessage, name: &str) -> Option<&'a str> {
    message.headers.get(name).map(|value| value.as_str())
}

/// Committed events are published once each, with the webhook body byte for byte and the
/// identity headers the SPEC lists.
#[tokio::test]
async fn nats_events_arrive_once_each_with_identity_headers_and_the_webhook_body() {
    let db = TestDb::new().await;
    let stream = TestStream::create(Duration::from_secs(120)).await;
    add_subscription(&db, "orders", &stream.url(), &[]).await;
    let relay = spawn_default_relay(&db).await;
    publish_many(&db, 20, 5).await;
    wait_for_statuses(&db, "delivered", 20).await;
    // Anything extra would show up by now: the relay polls every 200 ms.
    tokio::time::sleep(Duration::from_millis(600)).await;

    let bodies = webhook_bodies(&db).await;
    let messages = stream.messages().await;
    assert_eq!(messages.len(), 20, "each event exactly once");
    let mut seen = HashSet::new();
    for message in &messages {
        let id = header(message, "Nats-Msg-Id").expect("Nats-Msg-Id");
        assert!(seen.insert(id.to_string()), "duplicate {id}");
        let event_id: Uuid = id.parse().expect("Nats-Msg-Id is the event_id");
        assert_eq!(header(message, "webhook-id"), Some(id));
        assert_eq!(header(message, "event-type"), Some("order.created"));
        assert_eq!(header(message, "tenant-id"), Some("acme"));
        let key = header(message, "ordering-key").expect("ordering-key");
        assert!(key.starts_with("order:"), "{key}");
        assert_eq!(
            message.payload, bodies[&event_id],
            "the webhook body, byte for byte"
        );
    }
    let last_codes = count(
        &db,
        "SELECT count(*) FROM outbox.deliveries WHERE last_status_code IS NOT NULL OR last_error IS NOT NULL",
    )
    .await;
    assert_eq!(
        last_codes, 0,
        "a broker has no status code and no error on success"
    );
    relay.shutdown().await;
}

/// A subject no stream listens on: the server has no one to ack, which is a failed attempt
/// with a reason, retried on the schedule, never "delivered".
#[tokio::test]
async fn nats_subject_without_a_stream_is_a_failed_attempt() {
    let db = TestDb::new().await;
    let subject = format!("outbox.nostream.{}", unique("s"));
    add_subscription(
        &db,
        "orders",
        &format!("nats://{NATS}/{subject}"),
        &[("retry_schedule", "'{1 hour}'")],
    )
    .await;
    let relay = spawn_default_relay(&db).await;
    publish_many(&db, 1, 1).await;
    wait_for_statuses(&db, "failing", 1).await;
    assert_eq!(
        last_errors(&db).await,
        [Some(format!(
            "rejected: nats: no stream for subject {subject}"
        ))]
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.delivery_attempts WHERE error LIKE 'rejected: nats: no stream%'"
        )
        .await,
        1,
        "the attempt is recorded"
    );
    relay.shutdown().await;
}

/// The relay's connection is cut three times while 300 events drain: every event ends up in
/// the stream, none twice (a publish whose ack was lost is retried, and JetStream drops the
/// copy by its `Nats-Msg-Id`).
#[tokio::test]
async fn nats_connection_cut_mid_drain_loses_nothing() {
    let db = TestDb::new().await;
    let stream = TestStream::create(Duration::from_secs(120)).await;
    let proxy = Proxy::start(NATS.parse().expect("address")).await;
    add_subscription(
        &db,
        "orders",
        &format!("nats://{}/{}", proxy.addr, stream.subject),
        &CUT_TEST_SETTINGS,
    )
    .await;
    let relay = spawn_default_relay(&db).await;
    publish_many(&db, 300, 10).await;
    let cuts = cut_mid_drain(&db, || proxy.blackhole(), || async { proxy.cut() }).await;
    assert!(cuts > 0, "the relay's connection was cut");
    wait_for_statuses(&db, "delivered", 300).await;
    let ids: HashSet<String> = stream
        .messages()
        .await
        .iter()
        .map(|message| {
            header(message, "Nats-Msg-Id")
                .expect("Nats-Msg-Id")
                .to_string()
        })
        .collect();
    assert_every_event_arrived(&db, &ids).await;
    assert_eq!(stream.messages().await.len(), 300, "no copies stored");
    relay.shutdown().await;
}

/// An ordered subscription publishes each key's events in event order, also when the first
/// publishes fail (no stream yet) and are retried after later events were published.
#[tokio::test]
async fn nats_ordered_subscription_keeps_each_keys_order() {
    let db = TestDb::new().await;
    let stream = TestStream::not_yet_created().await;
    let relay = drain_ordered_past_failing_heads(&db, &stream.url(), || {
        stream.create_now(Duration::from_secs(120))
    })
    .await;
    let messages = stream.messages().await;
    assert_each_keys_order(messages.iter().map(|m| m.payload.as_ref()));
    relay.shutdown().await;
}

/// A replay publishes the event again with the same `Nats-Msg-Id` (once the stream's
/// duplicate window has passed it is stored again; within it JetStream acks it as a
/// duplicate).
#[tokio::test]
async fn nats_replay_republishes_with_the_same_message_id() {
    let db = TestDb::new().await;
    let stream = TestStream::create(Duration::from_millis(500)).await;
    let relay = deliver_one_then_replay(&db, &stream.url(), Duration::from_millis(700)).await;
    wait_until("the replay is stored", DEADLINE, || async {
        stream.messages().await.len() == 2
    })
    .await;
    let messages = stream.messages().await;
    let event_id = the_one_event_id(&db).await;
    for message in &messages {
        assert_eq!(
            header(message, "Nats-Msg-Id"),
            Some(event_id.to_string().as_str())
        );
    }
    assert_eq!(messages[0].payload, messages[1].payload, "the same bytes");
    wait_for_statuses(&db, "delivered", 1).await;
    let recorded: Vec<(Option<String>, bool)> = db
        .client()
        .await
        .query(
            "SELECT response_body, replay_id IS NOT NULL FROM outbox.delivery_attempts",
            &[],
        )
        .await
        .expect("read attempts")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    // Like a webhook's 2xx body, the PubAck receipt is not kept for a success.
    assert_eq!(recorded, [(None, true)], "the replayed attempt is recorded");
    relay.shutdown().await;
}

/// The SSRF guard covers brokers: without an allow-list entry, a broker on loopback is
/// refused before any connection is made.
#[tokio::test]
async fn nats_broker_on_a_private_address_is_refused_without_the_allow_list() {
    let db = TestDb::new().await;
    let stream = TestStream::create(Duration::from_secs(120)).await;
    add_subscription(
        &db,
        "orders",
        &stream.url(),
        &[("retry_schedule", "'{1 hour}'")],
    )
    .await;
    let mut config = RelayConfig::for_tests();
    config.allow_private_targets = Default::default();
    let relay = spawn_relay(&db, config).await;
    publish_many(&db, 1, 1).await;
    wait_for_statuses(&db, "failing", 1).await;
    let errors = last_errors(&db).await;
    let error = errors[0].as_deref().unwrap_or("");
    assert!(
        error
            .starts_with("target refused: refused: 127.0.0.1 resolves only to forbidden addresses")
            && error.contains("OUTBOX_ALLOW_PRIVATE_TARGETS"),
        "{error}"
    );
    assert!(stream.messages().await.is_empty());
    relay.shutdown().await;
}

/// A connection gone silent fails the publish on its timeout; once the peer answers again
/// the next attempt delivers (JetStream acks come back on reply subjects of their own).
#[tokio::test]
async fn nats_connection_gone_silent_recovers_after_a_timeout() {
    let db = TestDb::new().await;
    let stream = TestStream::create(Duration::from_secs(120)).await;
    let proxy = Proxy::start(NATS.parse().expect("address")).await;
    let url = format!("nats://{}/{}", proxy.addr, stream.subject);
    let relay = deliver_past_a_silent_spell(&db, &url, &proxy, RelayConfig::for_tests()).await;
    assert_eq!(stream.messages().await.len(), 2);
    relay.shutdown().await;
}
