//! Broker targets against the real brokers on this machine (NATS with JetStream on
//! 127.0.0.1:4222, Redis on 6379, RabbitMQ on 5672 with guest/guest; `.ci/run` starts them),
//! and Kafka against a tansu broker each test starts itself (see `kafka`).
//! Every test names its own subject, stream or exchange, so they run in parallel.
//!
//! "The connection breaks mid-drain" is staged with [`proxy::Proxy`], a TCP relay in the test
//! between the relay and the broker: cutting its connections breaks the relay's long-lived
//! connection exactly as a broker restart or a network cut does, without disturbing the other
//! tests that share the broker. For Redis the cut is the broker's own `CLIENT KILL`.
//!
//! `rediss://` and `amqps://` meet the same proxy ending TLS with a certificate for
//! `localhost` from a CA of the test's own ([`TestTls`]).

mod amqp;
mod kafka;
mod nats;
mod proxy;
mod redis;
mod urls;

use std::collections::HashMap;

use bytes::Bytes;
use outbox_relay::webhook::{EventForDelivery, build_body};
use uuid::Uuid;

use crate::harness::db::TestDb;

/// A CA of the test's own, a certificate for `localhost` signed by it (served by
/// [`proxy::Proxy::start_tls`]), and the CA's PEM in a file, for `OUTBOX_BROKER_CA_FILE`.
struct TestTls {
    acceptor: tokio_rustls::TlsAcceptor,
    ca_file: tempfile::NamedTempFile,
}

impl TestTls {
    fn new() -> TestTls {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "outbox-relay broker test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        let server_key = KeyPair::generate().expect("server key");
        let server_cert = CertificateParams::new(vec!["localhost".to_owned()])
            .expect("server params")
            .signed_by(&server_key, &ca)
            .expect("server certificate");
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![server_cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
            )
            .expect("server TLS config");
        let ca_file = tempfile::NamedTempFile::new().expect("CA file");
        std::fs::write(ca_file.path(), ca.pem()).expect("writing the CA file");
        TestTls {
            acceptor: tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)),
            ca_file,
        }
    }

    /// The test relay's settings, trusting this CA (and only it) for broker TLS.
    fn trusting_relay_config(&self) -> outbox_relay::config::RelayConfig {
        let mut config = outbox_relay::config::RelayConfig::for_tests();
        config.broker_ca_file = Some(self.ca_file.path().to_owned());
        config
    }
}

/// `url` with its scheme's TLS form: `redis://…` → `rediss://…`, `amqp://…` → `amqps://…`.
fn over_tls(url: &str) -> String {
    url.replacen("://", "s://", 1)
}

/// An `OUTBOX_BROKER_CA_FILE` that names no readable file, or one without a usable CA, stops
/// the relay at start with the path, before it connects anywhere: not a relay that starts
/// and then fails every TLS publish.
#[tokio::test]
async fn a_relay_with_an_unusable_broker_ca_file_does_not_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let not_a_ca = dir.path().join("not-a-ca.pem");
    std::fs::write(&not_a_ca, "no certificate here\n").expect("write");
    for path in [dir.path().join("missing.pem"), not_a_ca] {
        let mut config = outbox_relay::config::RelayConfig::for_tests();
        config.broker_ca_file = Some(path.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = crate::harness::relay::unreachable_database_url();
        match outbox_relay::relay::start(config, &url, listener).await {
            Err(error @ outbox_relay::relay::StartError::BrokerTrust(_)) => {
                let text = error.to_string();
                assert!(text.contains(&path.display().to_string()), "{text}");
            }
            Err(other) => panic!("expected the CA file refused, got {other:#}"),
            Ok(_) => panic!("the relay started with {}", path.display()),
        }
    }
}

/// A broker behind [`proxy::Proxy::start_tls`]: reached as `localhost` (the name its
/// certificate holds) or as `127.0.0.1` (a name it does not).
struct TlsBroker {
    tls: TestTls,
    proxy: proxy::Proxy,
}

impl TlsBroker {
    async fn start(broker: &str) -> TlsBroker {
        let tls = TestTls::new();
        let proxy =
            proxy::Proxy::start_tls(broker.parse().expect("address"), tls.acceptor.clone()).await;
        TlsBroker { tls, proxy }
    }

    /// `host:port` with the certificate's name.
    fn by_name(&self) -> String {
        format!("localhost:{}", self.proxy.addr.port())
    }

    /// `host:port` with an address the certificate does not name.
    fn by_ip(&self) -> String {
        self.proxy.addr.to_string()
    }
}

/// Subscription settings for the TLS tests: a refused handshake is retried every second for
/// longer than a test waits, so a refused delivery is still `failing` (not yet `dead`) when
/// the test counts them, however slow the machine.
const TLS_TEST_SETTINGS: [(&str, &str); 1] = [(
    "retry_schedule",
    "'{1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,\
       1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s}'",
)];

/// Subscriptions `by_name` (`name_url`, the broker by the certificate's name) and `by_ip`
/// (`ip_url`, by its address), a relay trusting the test CA, 10 events. Returns the relay once
/// `by_name` has delivered all 10 and `by_ip`'s have failed, each on the certificate's name.
async fn publish_by_name_and_by_ip(
    db: &TestDb,
    broker: &TlsBroker,
    name_url: &str,
    ip_url: &str,
) -> outbox_relay::relay::RelayHandle {
    use crate::harness::relay::{add_subscription, spawn_relay, wait_for_statuses};
    add_subscription(db, "by_name", name_url, &TLS_TEST_SETTINGS).await;
    add_subscription(db, "by_ip", ip_url, &TLS_TEST_SETTINGS).await;
    let relay = spawn_relay(db, broker.tls.trusting_relay_config()).await;
    publish_many(db, 10, 5).await;
    wait_for_statuses(db, "delivered", 10).await;
    wait_for_statuses(db, "failing", 10).await;
    assert_failed_with(db, "by_ip", "certificate not valid for name").await;
    relay
}

/// A subscription `orders` to `url`, a relay with the system's roots only (the test CA is not
/// among them), 3 events. Returns the relay once all 3 failed on the unknown issuer.
async fn publish_with_an_unknown_ca(db: &TestDb, url: &str) -> outbox_relay::relay::RelayHandle {
    use crate::harness::relay::{add_subscription, spawn_default_relay, wait_for_statuses};
    add_subscription(db, "orders", url, &TLS_TEST_SETTINGS).await;
    let relay = spawn_default_relay(db).await;
    publish_many(db, 3, 3).await;
    wait_for_statuses(db, "failing", 3).await;
    assert_failed_with(db, "orders", "UnknownIssuer").await;
    relay
}

/// A subscription `orders` to `url` (through `proxy`) with a 1 s timeout, a relay with
/// `config`, one event delivered; then the proxy drops what it is sent (a connection gone
/// silent, as behind a dead NAT entry) while a second event is published, which fails on its
/// timeout; then the proxy forwards again. Returns the relay once both are delivered: the
/// attempts after the silent spell must not wait on what was lost in it.
async fn deliver_past_a_silent_spell(
    db: &TestDb,
    url: &str,
    proxy: &proxy::Proxy,
    config: outbox_relay::config::RelayConfig,
) -> outbox_relay::relay::RelayHandle {
    use crate::harness::relay::{add_subscription, spawn_relay, wait_for_statuses};
    add_subscription(
        db,
        "orders",
        url,
        &[
            ("timeout", "'1 second'"),
            ("retry_schedule", "'{200ms,200ms,200ms,200ms,200ms,200ms}'"),
        ],
    )
    .await;
    let relay = spawn_relay(db, config).await;
    publish_many(db, 1, 1).await;
    wait_for_statuses(db, "delivered", 1).await;
    proxy.blackhole();
    publish_many(db, 1, 1).await;
    wait_for_statuses(db, "failing", 1).await;
    let errors = last_errors(db).await;
    let error = errors[1].as_deref().unwrap_or_default();
    assert!(error.starts_with("timeout: "), "{error}");
    proxy.resume();
    wait_for_statuses(db, "delivered", 2).await;
    relay
}

/// Asserts that every delivery of `subscription` has failed at least once with an error
/// containing `reason`.
async fn assert_failed_with(db: &TestDb, subscription: &str, reason: &str) {
    let errors: Vec<Option<String>> = db
        .client()
        .await
        .query(
            "SELECT d.last_error FROM outbox.deliveries d
               JOIN outbox.subscriptions s ON s.id = d.subscription_id
              WHERE s.name = $1",
            &[&subscription],
        )
        .await
        .expect("read deliveries")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(!errors.is_empty(), "{subscription} has deliveries");
    for error in errors {
        let error = error.unwrap_or_default();
        assert!(error.contains(reason), "{subscription}: {error:?}");
    }
}

/// A name no other test (or earlier run) uses: subjects, streams, exchanges.
fn unique(prefix: &str) -> String {
    format!("{prefix}{}", Uuid::new_v4().simple())
}

/// Every event's webhook body as the relay builds it, by event id: what must arrive byte for
/// byte.
async fn webhook_bodies(db: &TestDb) -> HashMap<Uuid, Bytes> {
    db.client()
        .await
        .query(
            "SELECT event_id, event_type, tenant_id, source_service, created_at, payload::text,
                    metadata::text, ordering_key
               FROM outbox.events",
            &[],
        )
        .await
        .expect("read events")
        .iter()
        .map(|row| {
            let event = EventForDelivery {
                event_id: row.get(0),
                event_type: row.get(1),
                tenant_id: row.get(2),
                source_service: row.get(3),
                created_at: row.get(4),
                payload_json: row.get(5),
                metadata_json: row.get(6),
                ordering_key: row.get(7),
            };
            (event.event_id, build_body(&event).expect("body builds"))
        })
        .collect()
}

/// An ordered subscription `orders` to `url` whose first events fail at the broker (the
/// caller set that up) until `heal` runs. [`ORDERED_EVENTS`] / 3 events on [`ORDERED_KEYS`]
/// keys are published first; once some have failed, `heal` lets publishes succeed and the rest
/// are published. Without per-key order the later events would overtake the failed ones,
/// which come back only on retry. Returns the relay, running, once everything is delivered.
async fn drain_ordered_past_failing_heads<H, Fut>(
    db: &TestDb,
    url: &str,
    heal: H,
) -> outbox_relay::relay::RelayHandle
where
    H: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use crate::harness::relay::{add_subscription, spawn_default_relay, wait_for_statuses};
    add_subscription(
        db,
        "orders",
        url,
        &[
            ("ordered", "true"),
            ("max_in_flight", "10"),
            (
                "retry_schedule",
                "'{300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms}'",
            ),
        ],
    )
    .await;
    let relay = spawn_default_relay(db).await;
    let first = ORDERED_EVENTS / 3;
    publish_seqs(db, 0..first, ORDERED_KEYS).await;
    wait_for_statuses(db, "failing", ORDERED_KEYS).await;
    heal().await;
    publish_seqs(db, first..ORDERED_EVENTS, ORDERED_KEYS).await;
    wait_for_statuses(db, "delivered", ORDERED_EVENTS).await;
    relay
}

const ORDERED_EVENTS: i64 = 60;
const ORDERED_KEYS: i64 = 4;

/// Asserts that the bodies, in the order the broker holds them, keep each key's event order.
fn assert_each_keys_order<'a>(bodies: impl Iterator<Item = &'a [u8]>) {
    assert_eq!(
        seqs_by_key(bodies),
        expected_seqs(ORDERED_EVENTS, ORDERED_KEYS)
    );
}

/// A subscription `orders` to `url`, a relay, one event delivered, then (after `pause`) a
/// replay of it; the relay is returned running.
async fn deliver_one_then_replay(
    db: &TestDb,
    url: &str,
    pause: std::time::Duration,
) -> outbox_relay::relay::RelayHandle {
    use crate::harness::relay::{add_subscription, spawn_default_relay, wait_for_statuses};
    add_subscription(db, "orders", url, &[]).await;
    let relay = spawn_default_relay(db).await;
    publish_many(db, 1, 1).await;
    wait_for_statuses(db, "delivered", 1).await;
    tokio::time::sleep(pause).await;
    assert_eq!(replay_delivered(db, "orders").await, 1);
    relay
}

/// Asserts that `ids` (the event ids found at the broker, each once) are exactly the
/// database's events; says how many are missing.
async fn assert_every_event_arrived(db: &TestDb, ids: &std::collections::HashSet<String>) {
    let expected: std::collections::HashSet<String> = webhook_bodies(db)
        .await
        .keys()
        .map(Uuid::to_string)
        .collect();
    let missing: Vec<&String> = expected.difference(ids).collect();
    assert!(
        missing.is_empty(),
        "{} of {} events missing: {missing:?}",
        missing.len(),
        expected.len()
    );
    assert_eq!(ids.len(), expected.len(), "nothing else arrived");
}

/// The `event_id` of the database's only event.
async fn the_one_event_id(db: &TestDb) -> Uuid {
    let ids: Vec<Uuid> = webhook_bodies(db).await.into_keys().collect();
    assert_eq!(ids.len(), 1, "one event");
    ids[0]
}

/// Publishes `count` events `order.created` with tenant `acme`, source `shop` and ordering
/// key `order:{n % keys}`, payload `{"seq": n}`, one statement.
async fn publish_many(db: &TestDb, count: i64, keys: i64) {
    publish_seqs(db, 0..count, keys).await;
}

/// [`publish_many`] for the `seq`s in `seqs`.
async fn publish_seqs(db: &TestDb, seqs: std::ops::Range<i64>, keys: i64) {
    db.client()
        .await
        .execute(
            "INSERT INTO outbox.events (event_type, payload, tenant_id, source_service, ordering_key)
             SELECT 'order.created', jsonb_build_object('seq', n), 'acme', 'shop', 'order:' || (n % $3::bigint)
               FROM generate_series($1::bigint, $2::bigint - 1) n",
            &[&seqs.start, &seqs.end, &keys],
        )
        .await
        .expect("publish events");
}

/// Subscription settings for the connection-cut tests: quick retries, a confirm timeout
/// longer than a cut takes, and a rate limit that spreads a 300-event drain over about two
/// seconds (claims come in bursts of at most 150 a second), so each cut finds work to break.
const CUT_TEST_SETTINGS: [(&str, &str); 3] = [
    (
        "retry_schedule",
        "'{100ms,200ms,400ms,800ms,1s,1s,1s,1s,1s,1s,1s,1s}'",
    ),
    ("timeout", "'3 seconds'"),
    ("rate_limit_per_second", "150"),
];

/// Breaks the relay's broker connection three times during a drain of 300 events, once 50,
/// 120 and 200 are delivered: first `before_cut` (the proxy starts dropping what is sent, so
/// the next burst of publishes is lost on the way and never confirmed), a little over a second
/// for that burst, then `cut`. Returns how many connections `cut` broke.
async fn cut_mid_drain<B, F, Fut>(db: &TestDb, before_cut: B, mut cut: F) -> usize
where
    B: Fn(),
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let mut broken = 0;
    for delivered in [50, 120, 200] {
        crate::harness::relay::wait_for_statuses(db, "delivered", delivered).await;
        before_cut();
        tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
        broken += cut().await;
    }
    broken
}

/// The last error of every delivery, in id order.
async fn last_errors(db: &TestDb) -> Vec<Option<String>> {
    db.client()
        .await
        .query("SELECT last_error FROM outbox.deliveries ORDER BY id", &[])
        .await
        .expect("read deliveries")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Replays every delivered delivery of `subscription` and returns how many were re-queued.
async fn replay_delivered(db: &TestDb, subscription: &str) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT matched FROM outbox.replay(status => '{delivered}', subscription => $1, reason => 'test')",
            &[&subscription],
        )
        .await
        .expect("replay")
        .get(0)
}

/// Per ordering key, the `seq` of each body in arrival order.
fn seqs_by_key<'a>(bodies: impl Iterator<Item = &'a [u8]>) -> HashMap<String, Vec<i64>> {
    let mut by_key: HashMap<String, Vec<i64>> = HashMap::new();
    for body in bodies {
        let body: serde_json::Value = serde_json::from_slice(body).expect("JSON body");
        by_key
            .entry(body["ordering_key"].as_str().unwrap_or("-").to_string())
            .or_default()
            .push(body["data"]["seq"].as_i64().expect("seq"));
    }
    by_key
}

/// Per key, the `seq`s in event order, as published by [`publish_many`].
fn expected_seqs(count: i64, keys: i64) -> HashMap<String, Vec<i64>> {
    let mut by_key: HashMap<String, Vec<i64>> = HashMap::new();
    for n in 0..count {
        by_key
            .entry(format!("order:{}", n % keys))
            .or_default()
            .push(n);
    }
    by_key
}
