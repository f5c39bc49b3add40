//! Kafka: `kafka://[user:pass@]host:port[,host:port…]/{topic}`. Each event is one record on
//! the topic, produced by librdkafka's idempotent producer (`enable.idempotence=true`, which
//! implies `acks=all`, set here explicitly all the same); success is the broker's produce ack
//! (partition and offset). A topic the cluster does not have, a record the broker refuses, no
//! ack within the subscription's `timeout` or no reachable broker is a failed attempt.
//!
//! Key = the event's `ordering_key`, else its `event_id`: Kafka's default partitioner sends
//! one key to one partition, so an ordered subscription (one event in flight per key) keeps
//! per-key order in the topic. Headers `event-id`, `event-type` and `tenant-id` (when the event
//! has one), as the SPEC lists them; the value is the webhook body.
//!
//! Idempotence de-duplicates librdkafka's own retries of one produce (a lost ack) within a
//! producer session. It does not make the relay's retries or replays single: those are new
//! records with the same `event-id` header, which consumers use to drop a second copy.
//!
//! Credentials (`user:pass@`) are sent as SASL/PLAIN over the plain connection; the scheme has
//! no TLS form yet (librdkafka connects to the advertised brokers by itself, so the name each
//! certificate would be checked against is librdkafka's to handle).
//!
//! SSRF: the bootstrap brokers are resolved and checked against the [`TargetPolicy`] and given
//! to librdkafka as addresses. The brokers the cluster advertises (which librdkafka then
//! connects to by itself) are checked when the producer is made; a cluster advertising a
//! forbidden address is refused.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use super::{Endpoint, Link, Message, Server, TargetError, UrlParts, failed};
use crate::webhook::client::{FailureKind, HttpResult};
use crate::webhook::target_policy::TargetPolicy;

/// How long librdkafka keeps trying to deliver one record (`message.timeout.ms`). It is per
/// producer, and a producer serves every subscription on the same brokers whatever their
/// `timeout`, so it cannot be each subscription's own: a record given up on by the relay
/// (its attempt timed out) may still be written until then, and then arrives twice with the
/// same `event-id`. 30 s is twice the SPEC's default `timeout`: a longer per-subscription
/// timeout still fails here after 30 s, with librdkafka's reason.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a produce to a topic the cluster does not list waits for it to appear before
/// failing (`topic.metadata.propagation.max.ms`, 30 s by default): a missing topic should fail
/// the attempt quickly and say so, not look like a slow broker.
const MISSING_TOPIC_WAIT: Duration = Duration::from_secs(2);

/// How long the first metadata request of a new producer may take: within the link's
/// connect bound (`super::CONNECT_TIMEOUT`), so that a broker list nobody answers on ends as
/// a failed connect with librdkafka's reason, not as the link's bare timeout.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// One idempotent producer per broker list and credentials, shared by every topic and every
/// delivery task: librdkafka batches and pipelines their records on its own connections and
/// reconnects by itself; it is replaced only after a fatal error (see [`usable`]).
pub(crate) type Connection = FutureProducer;

pub struct Target {
    /// The first broker and the credentials.
    pub(super) server: Server,
    /// The other brokers of the list, in URL order.
    more: Vec<Endpoint>,
    topic: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `Server`'s Debug leaves the password out.
        f.debug_struct("Target")
            .field("server", &self.server)
            .field("more", &self.more)
            .field("topic", &self.topic)
            .finish()
    }
}

impl Target {
    /// Parses `raw` (its scheme is `kafka`); `shown` is the URL with its password masked, for
    /// errors. The URL parser takes one host only, so the broker list is split here and each
    /// broker parsed on its own; the first one and the rest of the URL go through the shared
    /// [`UrlParts`] (credentials, path, query).
    pub(super) fn parse(raw: &str, shown: &str) -> Result<Target, TargetError> {
        let example = "give kafka://host:9092[,host:9092...]/orders";
        let after_scheme = raw.split_once("://").map_or("", |(_, rest)| rest);
        let authority_end = after_scheme
            .find(['/', '?', '#'])
            .unwrap_or(after_scheme.len());
        let (authority, rest) = after_scheme.split_at(authority_end);
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };
        // Each broker parsed once: `host:port` as the URL parser reads an authority (IPv6 in
        // brackets), kept as the text (for the first, which goes through `UrlParts` with the
        // credentials) and as an endpoint (for the rest).
        let mut brokers = Vec::new();
        for entry in hosts.split(',') {
            let url = reqwest::Url::parse(&format!("kafka://{entry}/"))
                .ok()
                .filter(|url| url.host_str().is_some_and(|host| !host.is_empty()))
                .ok_or_else(|| {
                    TargetError(format!(
                        "{shown:?}: broker {entry:?} is not host:port; {example}"
                    ))
                })?;
            let Some(port) = url.port() else {
                return Err(TargetError(format!(
                    "{shown:?}: broker {entry:?} has no port; {example}"
                )));
            };
            let host = url.host_str().unwrap_or_default();
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            brokers.push((
                entry,
                Endpoint {
                    host: host.to_owned(),
                    port,
                },
            ));
        }
        let Some(((first, _), others)) = brokers.split_first() else {
            return Err(TargetError(format!("{shown:?} has no broker; {example}")));
        };
        let userinfo = userinfo.map_or(String::new(), |userinfo| format!("{userinfo}@"));
        let single = format!("kafka://{userinfo}{first}{rest}");
        let url = reqwest::Url::parse(&single)
            .map_err(|error| TargetError(format!("{shown:?} is not a URL ({error})")))?;
        let parts = UrlParts::new(&url, shown)?;
        parts.query(&[])?;
        let more = others
            .iter()
            .map(|(_, endpoint)| endpoint.clone())
            .collect();
        let topic = super::decode(&parts.path);
        if topic.is_empty() {
            return Err(TargetError(format!("{shown:?} has no topic; {example}")));
        }
        // Kafka's own rule for topic names.
        if topic.len() > 249
            || topic == "."
            || topic == ".."
            || !topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(TargetError(format!(
                "{shown:?}: topic {topic:?} must be 1 to 249 letters, digits, . _ and -"
            )));
        }
        Ok(Target {
            server: parts.server,
            more,
            topic,
        })
    }

    /// Every broker of the list, in URL order.
    fn brokers(&self) -> impl Iterator<Item = &Endpoint> {
        std::iter::once(&self.server.endpoint).chain(&self.more)
    }

    /// One producer per broker list (in URL order), user and password.
    pub(super) fn connection_key(&self) -> String {
        let list: Vec<String> = self.more.iter().map(Endpoint::to_string).collect();
        self.server.connection_key(&list.join(","))
    }

    /// The broker list, for logs and errors.
    pub(super) fn label(&self) -> String {
        let list: Vec<String> = self.brokers().map(Endpoint::to_string).collect();
        list.join(",")
    }
}

/// A producer that hit a fatal error (librdkafka's word: with idempotence, a broken sequence
/// it cannot repair) refuses every record from then on; the link makes a new one.
fn usable(producer: &Connection) -> bool {
    producer.client().fatal_error().is_none()
}

fn millis(duration: Duration) -> String {
    duration.as_millis().to_string()
}

async fn connect(policy: &TargetPolicy, target: &Target) -> Result<Connection, HttpResult> {
    let server = &target.server;
    let mut bootstrap = Vec::new();
    for endpoint in target.brokers() {
        if server.tls {
            // Not reachable (the scheme has no TLS form yet): never a plain connection instead.
            return Err(failed(
                FailureKind::InvalidRequest,
                "kafka: TLS is not supported",
            ));
        }
        bootstrap.push(super::resolve(policy, endpoint).await?.to_string());
    }
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap.join(","))
        .set("client.id", "outbox-relay")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", millis(DELIVERY_TIMEOUT))
        .set(
            "topic.metadata.propagation.max.ms",
            millis(MISSING_TOPIC_WAIT),
        )
        .set(
            "socket.connection.setup.timeout.ms",
            millis(super::CONNECT_TIMEOUT),
        )
        // Records from concurrent deliveries wait at most this long to share a batch.
        .set("linger.ms", "2");
    if server.has_credentials() {
        config
            .set("security.protocol", "sasl_plaintext")
            .set("sasl.mechanisms", "PLAIN")
            .set("sasl.username", server.username.clone())
            .set("sasl.password", server.password());
    }
    let label = target.label();
    // librdkafka's errors name brokers by the address given to it, never the password.
    let producer: FutureProducer = config.create().map_err(|error| {
        failed(
            FailureKind::InvalidRequest,
            format!("kafka: producer for {label}: {error}"),
        )
    })?;
    // librdkafka connects in the background; asking for the cluster's metadata proves a broker
    // answers (a dead broker list fails this attempt now, under the link's backoff) and
    // names the brokers it will connect to next. Blocking call: off the runtime's threads.
    let probe = producer.clone();
    let metadata = tokio::task::spawn_blocking(move || {
        probe
            .client()
            .fetch_metadata(None, Timeout::After(METADATA_TIMEOUT))
    })
    .await
    .map_err(|error| failed(FailureKind::Other, format!("kafka: {error}")))?
    .map_err(|error| {
        failed(
            FailureKind::Connect,
            format!("kafka: connecting to {label}: {error}"),
        )
    })?;
    // Copied out first: the metadata holds raw pointers and cannot be kept across an await.
    let mut advertised_brokers = Vec::new();
    for broker in metadata.brokers() {
        let port = u16::try_from(broker.port()).map_err(|_| {
            failed(
                FailureKind::Rejected,
                format!(
                    "kafka: {label} advertises a broker with port {}",
                    broker.port()
                ),
            )
        })?;
        advertised_brokers.push(Endpoint {
            host: broker.host().to_owned(),
            port,
        });
    }
    drop(metadata);
    for advertised in advertised_brokers {
        super::resolve(policy, &advertised)
            .await
            .map_err(|failure| match failure {
                HttpResult::Failed { kind, error } => failed(
                    kind,
                    format!("kafka: {label} advertises broker {advertised}: {error}"),
                ),
                other => other,
            })?;
    }
    Ok(producer)
}

pub(super) async fn publish(
    policy: &TargetPolicy,
    target: &Target,
    link: &Arc<Link<Connection>>,
    message: &Message<'_>,
) -> Result<HttpResult, HttpResult> {
    let producer = link.get(usable, || connect(policy, target)).await?;
    let event = message.event;
    let event_id = event.event_id.to_string();
    let key = event.ordering_key.as_deref().unwrap_or(&event_id);
    let mut headers = OwnedHeaders::new_with_capacity(3)
        .insert(Header {
            key: "event-id",
            value: Some(event_id.as_str()),
        })
        .insert(Header {
            key: "event-type",
            value: Some(event.event_type.as_str()),
        });
    if let Some(tenant_id) = &event.tenant_id {
        headers = headers.insert(Header {
            key: "tenant-id",
            value: Some(tenant_id.as_str()),
        });
    }
    let record = FutureRecord::to(&target.topic)
        .key(key)
        .payload(message.body.as_ref())
        .headers(headers);
    // The wait for room in librdkafka's queue; the whole publish is bounded by the
    // subscription's timeout in `super::Publishers::publish`.
    let topic = &target.topic;
    Ok(
        match producer.send(record, Timeout::After(message.timeout)).await {
            Ok(delivery) => HttpResult::Published {
                receipt: format!(
                    "kafka: topic {topic} partition {} offset {}",
                    delivery.partition, delivery.offset
                ),
            },
            Err((error, _record)) => {
                let kind = match error.rdkafka_error_code() {
                    Some(RDKafkaErrorCode::MessageTimedOut | RDKafkaErrorCode::RequestTimedOut) => {
                        FailureKind::Timeout
                    }
                    Some(
                        RDKafkaErrorCode::BrokerTransportFailure
                        | RDKafkaErrorCode::AllBrokersDown
                        | RDKafkaErrorCode::NetworkException,
                    ) => FailureKind::Connect,
                    _ if matches!(error, KafkaError::Canceled) => FailureKind::Connect,
                    _ => FailureKind::Rejected,
                };
                failed(kind, format!("kafka: producing to topic {topic}: {error}"))
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<Target, TargetError> {
        Target::parse(url, &crate::config::secret::mask_url(url))
    }

    #[test]
    fn a_broker_list_and_a_topic_parse() {
        let target =
            parse("kafka://u:hunter2@k1:9092,[::1]:9093,k3:19092/orders.v1").expect("valid");
        assert_eq!(target.topic, "orders.v1");
        assert_eq!(target.label(), "k1:9092,[::1]:9093,k3:19092");
        assert_eq!(target.server.username, "u");
        assert_eq!(target.server.password(), "hunter2");
        assert!(!format!("{target:?}").contains("hunter2"));
        let single = parse("kafka://127.0.0.1:9092/t").expect("valid");
        assert_eq!(single.label(), "127.0.0.1:9092");
        assert!(!single.server.has_credentials());
    }

    #[test]
    fn bad_forms_are_refused_without_showing_the_password() {
        for (url, why) in [
            ("kafka://u:hunter2@k1:9092", "no topic"),
            ("kafka://u:hunter2@k1:9092/", "no topic"),
            ("kafka://u:hunter2@k1/t", "no port"),
            ("kafka://u:hunter2@k1:9092,/t", "not host:port"),
            ("kafka://u:hunter2@k1:9092,k2/t", "no port"),
            (
                "kafka://u:hunter2@k1:9092/t?acks=1",
                "unknown query parameter",
            ),
            ("kafka://u:hunter2@k1:9092/a/b", "topic"),
            ("kafka://u:hunter2@k1:9092/..", "topic"),
            ("kafka://u:hunter2@k1:9092/t#f", "fragment"),
        ] {
            let error = match parse(url) {
                Ok(target) => panic!("{url} parsed as {target:?}"),
                Err(error) => error.to_string(),
            };
            assert!(error.contains(why), "{url}: {error}");
            assert!(!error.contains("hunter2"), "{url}: {error}");
        }
    }

    #[test]
    fn one_producer_per_broker_list_and_credentials_not_per_topic() {
        let key = |url| parse(url).expect("valid").connection_key();
        assert_eq!(
            key("kafka://k1:9092,k2:9092/a"),
            key("kafka://k1:9092,k2:9092/b")
        );
        assert_ne!(key("kafka://k1:9092,k2:9092/a"), key("kafka://k1:9092/a"));
        assert_ne!(key("kafka://u:p@k1:9092/a"), key("kafka://k1:9092/a"));
    }
}
