//! RabbitMQ targets: `amqp://user:pass@host:port/{vhost}?exchange=E&routing_key=K`, success =
//! `basic.ack` of a routed message (publisher confirms, `mandatory`).

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use uuid::Uuid;

use super::proxy::Proxy;
use super::*;
use crate::harness::db::TestDb;
use crate::harness::relay::*;
use outbox_relay::config::RelayConfig;

const RABBIT: &str = "127.0.0.1:5672";

/// What the queue got: one message.
#[derive(Clone)]
struct Delivery {
    routing_key: String,
    properties: BasicProperties,
    data: Vec<u8>,
}

/// A topic exchange of its own, with (optionally) a queue bound to every routing key; deleted
/// on drop (the queue is exclusive to this test's connection).
struct TestExchange {
    _connection: Connection,
    channel: lapin::Channel,
    name: String,
    queue: String,
    received: Mutex<Vec<Delivery>>,
}

impl TestExchange {
    async fn create(bind_a_queue: bool) -> TestExchange {
        let connection = Connection::connect(
            &format!("amqp://guest:guest@{RABBIT}/%2f"),
            ConnectionProperties::default(),
        )
        .await
        .expect("connect to RabbitMQ");
        let channel = connection.create_channel().await.expect("channel");
        let name = unique("outbox-test-");
        channel
            .exchange_declare(
                name.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("declare exchange");
        let exchange = TestExchange {
            _connection: connection,
            channel,
            queue: format!("{name}-q"),
            name,
            received: Mutex::new(Vec::new()),
        };
        if bind_a_queue {
            exchange.bind_a_queue().await;
        }
        exchange
    }

    /// Declares the queue and binds it to every routing key: from now on messages are routed.
    async fn bind_a_queue(&self) {
        self.channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare queue");
        self.channel
            .queue_bind(
                self.queue.as_str().into(),
                self.name.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind queue");
    }

    fn url(&self, host_port: &str, query: &str) -> String {
        format!(
            "amqp://guest:guest@{host_port}/%2f?exchange={}{query}",
            self.name
        )
    }

    /// Every message that reached the queue so far, in queue order.
    async fn messages(&self) -> Vec<Delivery> {
        let mut fresh = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            fresh.push(Delivery {
                routing_key: message.delivery.routing_key.to_string(),
                properties: message.delivery.properties,
                data: message.delivery.data,
            });
        }
        let mut received = self.received.lock().expect("received");
        received.extend(fresh);
        received.clone()
    }
}

impl Drop for TestExchange {
    fn drop(&mut self) {
        let channel = self.channel.clone();
        let name = self.name.clone();
        tokio::spawn(async move {
            let _ = channel
                .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        });
    }
}

fn header(message: &Delivery, name: &str) -> Option<String> {
    let headers = message.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(value) => {
            Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
        }
        other => panic!("{name} is {other:?}"),
    }
}

fn message_id(message: &Delivery) -> String {
    message
        .properties
        .message_id()
        .as_ref()
        .expect("message_id")
        .to_string()
}

/// Committed events are published once each: persistent, `message_id` = event_id, `type`,
/// `content_type`, `timestamp`, the SPEC's headers, routed by the event type, and the webhook
/// body byte for byte.
#[tokio::test]
async fn amqp_events_arrive_once_each_with_identity_properties_and_the_webhook_body() {
    let db = TestDb::new().await;
    let exchange = TestExchange::create(true).await;
    add_subscription(&db, "orders", &exchange.url(RABBIT, ""), &[]).await;
    let relay = spawn_default_relay(&db).await;
    publish_many(&db, 20, 5).await;
    wait_for_statuses(&db, "delivered", 20).await;
    tokio::time::sleep(Duration::from_millis(600)).await;

    let bodies = webhook_bodies(&db).await;
    let created: std::collections::HashMap<Uuid, i64> = db
        .client()
        .await
        .query(
            "SELECT event_id, extract(epoch FROM created_at)::bigint FROM outbox.events",
            &[],
        )
        .await
        .expect("read events")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let messages = exchange.messages().await;
    assert_eq!(messages.len(), 20, "each event exactly once");
    let mut seen = HashSet::new();
    for message in &messages {
        let id = message_id(message);
        assert!(seen.insert(id.clone()), "duplicate {id}");
        let event_id: Uuid = id.parse().expect("message_id is the event_id");
        let properties = &message.properties;
        assert_eq!(
            properties.kind().as_ref().map(|t| t.as_str()),
            Some("order.created")
        );
        assert_eq!(
            properties.content_type().as_ref().map(|t| t.as_str()),
            Some("application/json")
        );
        assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
        let timestamp = properties.timestamp().expect("timestamp");
        assert!(
            (i64::try_from(timestamp).expect("timestamp") - created[&event_id]).abs() <= 1,
            "timestamp is the event's created_at"
        );
        assert_eq!(header(message, "tenant-id").as_deref(), Some("acme"));
        assert_eq!(header(message, "source-service").as_deref(), Some("shop"));
        assert!(
            header(message, "ordering-key")
                .expect("ordering-key")
                .starts_with("order:")
        );
        assert_eq!(
            message.routing_key.as_str(),
            "order.created",
            "routed by event type"
        );
        assert_eq!(
            message.data,
            bodies[&event_id].as_ref(),
            "the webhook body, byte for byte"
        );
    }
    relay.shutdown().await;
}

/// `routing_key` in the URL replaces the event type as the routing key.
#[tokio::test]
async fn amqp_routing_key_from_the_url_is_used() {
    let db = TestDb::new().await;
    let exchange = TestExchange::create(true).await;
    add_subscription(
        &db,
        "orders",
        &exchange.url(RABBIT, "&routing_key=shop.orders"),
        &[],
    )
    .await;
    let relay = spawn_default_relay(&db).await;
    publish_many(&db, 2, 1).await;
    wait_for_statuses(&db, "delivered", 2).await;
    let messages = exchange.messages().await;
    assert_eq!(messages.len(), 2);
    assert!(
        messages
            .iter()
            .all(|m| m.routing_key.as_str() == "shop.orders")
    );
    relay.shutdown().await;
}

/// A message no queue receives (`mandatory`: the broker returns it) is a failed attempt, and
/// so is a publish to an exchange that does not exist (the broker closes the channel); a
/// subscription to a working exchange on the same connection is not disturbed by either.
#[tokio::test]
async fn amqp_unroutable_message_and_missing_exchange_are_failed_attempts() {
    let db = TestDb::new().await;
    let unbound = TestExchange::create(false).await;
    let working = TestExchange::create(true).await;
    let missing = unique("outbox-missing-");
    let hour = [("retry_schedule", "'{1 hour}'")];
    add_subscription(&db, "unbound", &unbound.url(RABBIT, ""), &hour).await;
    add_subscription(
        &db,
        "missing",
        &format!("amqp://guest:guest@{RABBIT}/%2f?exchange={missing}"),
        &hour,
    )
    .await;
    add_subscription(&db, "working", &working.url(RABBIT, ""), &hour).await;
    let relay = spawn_default_relay(&db).await;
    publish_many(&db, 3, 3).await;
    wait_for_statuses(&db, "failing", 6).await;
    wait_for_statuses(&db, "delivered", 3).await;
    let errors: Vec<(String, String)> = db
        .client()
        .await
        .query(
            "SELECT s.name, d.last_error FROM outbox.deliveries d
               JOIN outbox.subscriptions s ON s.id = d.subscription_id
              WHERE d.status = 'failing' ORDER BY d.id",
            &[],
        )
        .await
        .expect("read errors")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    for (subscription, error) in &errors {
        let expected = match subscription.as_str() {
            "unbound" => format!(
                "rejected: amqp: unroutable: exchange {:?} returned the message for routing key \"order.created\" (312 NO_ROUTE)",
                unbound.name
            ),
            "missing" => format!("rejected: amqp: publishing to exchange {missing:?}: "),
            other => panic!("{other} failed: {error}"),
        };
        assert!(
            error.starts_with(&expected),
            "{subscription}: {error}\nexpected {expected}"
        );
    }
    assert!(
        errors
            .iter()
            .any(|(s, e)| s == "missing" && e.contains("NOT_FOUND")),
        "{errors:?}"
    );
    assert_eq!(working.messages().await.len(), 3);
    relay.shutdown().await;
}

/// The relay's connection is cut three times while 300 events drain: every event reaches the
/// queue (one whose confirm was lost may arrive twice; none is missing).
#[tokio::test]
async fn amqp_connection_cut_mid_drain_loses_nothing() {
    let db = TestDb::new().await;
    let exchange = TestExchange::create(true).await;
    let proxy = Proxy::start(RABBIT.parse().expect("address")).await;
    add_subscription(
        &db,
        "orders",
        &exchange.url(&proxy.addr.to_string(), ""),
        &CUT_TEST_SETTINGS,
    )
    .await;
    let relay = spawn_default_relay(&db).await;
    publish_many(&db, 300, 10).await;
    let cuts = cut_mid_drain(&db, || proxy.blackhole(), || async { proxy.cut() }).await;
    assert!(cuts > 0, "the relay's connection was cut");
    wait_for_statuses(&db, "delivered", 300).await;
    let ids: HashSet<String> = exchange.messages().await.iter().map(message_id).collect();
    assert_every_event_arrived(&db, &ids).await;
    relay.shutdown().await;
}

/// An ordered subscription publishes each key's events in event order, also when the first
/// publishes fail (no queue bound yet: returned) and are retried after later events were
/// published.
#[tokio::test]
async fn amqp_ordered_subscription_keeps_each_keys_order() {
    let db = TestDb::new().await;
    let exchange = TestExchange::create(false).await;
    let relay = drain_ordered_past_failing_heads(&db, &exchange.url(RABBIT, ""), || {
        exchange.bind_a_queue()
    })
    .await;
    let messages = exchange.messages().await;
    assert_each_keys_order(messages.iter().map(|m| m.data.as_slice()));
    relay.shutdown().await;
}

/// A replay publishes the event again with the same `message_id` and body.
#[tokio::test]
async fn amqp_replay_republishes_with_the_same_message_id() {
    let db = TestDb::new().await;
    let exchange = TestExchange::create(true).await;
    let relay = deliver_one_then_replay(&db, &exchange.url(RABBIT, ""), Duration::ZERO).await;
    wait_until("the replay arrives", DEADLINE, || async {
        exchange.messages().await.len() == 2
    })
    .await;
    let messages = exchange.messages().await;
    let event_id = the_one_event_id(&db).await;
    for message in &messages {
        assert_eq!(message_id(message), event_id.to_string());
    }
    assert_eq!(messages[0].data, messages[1].data, "the same bytes");
    relay.shutdown().await;
}

/// `amqps://` to `localhost` through a TLS proxy with a certificate from the test's CA,
/// trusted by `OUTBOX_BROKER_CA_FILE`: every event reaches the queue. The same proxy reached
/// as `127.0.0.1` is refused (the certificate names `localhost`): failed attempts that say
/// why, and nothing in that queue.
#[tokio::test]
async fn amqps_publishes_over_tls_verified_against_the_urls_host_name() {
    let broker = TlsBroker::start(RABBIT).await;
    let db = TestDb::new().await;
    let by_name = TestExchange::create(true).await;
    let by_ip = TestExchange::create(true).await;
    let relay = publish_by_name_and_by_ip(
        &db,
        &broker,
        &over_tls(&by_name.url(&broker.by_name(), "")),
        &over_tls(&by_ip.url(&broker.by_ip(), "")),
    )
    .await;
    assert_eq!(by_name.messages().await.len(), 10);
    assert!(
        by_ip.messages().await.is_empty(),
        "nothing reaches the broker by a name the certificate lacks"
    );
    relay.shutdown().await;
}

/// Without `OUTBOX_BROKER_CA_FILE` the system's roots decide, and the test CA is not among
/// them: every attempt fails on the certificate, none falls back to plain text.
#[tokio::test]
async fn amqps_refuses_a_certificate_from_an_unknown_ca() {
    let broker = TlsBroker::start(RABBIT).await;
    let db = TestDb::new().await;
    let exchange = TestExchange::create(true).await;
    let url = over_tls(&exchange.url(&broker.by_name(), ""));
    let relay = publish_with_an_unknown_ca(&db, &url).await;
    assert!(exchange.messages().await.is_empty());
    relay.shutdown().await;
}

/// A connection gone silent fails the publish on its timeout; the next attempt uses a new
/// connection (the lost publish shifted the channel's confirm numbering) and delivers.
#[tokio::test]
async fn amqp_connection_gone_silent_recovers_after_a_timeout() {
    let proxy = Proxy::start(RABBIT.parse().expect("address")).await;
    let db = TestDb::new().await;
    let exchange = TestExchange::create(true).await;
    let url = exchange.url(&proxy.addr.to_string(), "");
    let relay = deliver_past_a_silent_spell(&db, &url, &proxy, RelayConfig::for_tests()).await;
    let ids: HashSet<String> = exchange.messages().await.iter().map(message_id).collect();
    assert_eq!(ids.len(), 2);
    relay.shutdown().await;
}
