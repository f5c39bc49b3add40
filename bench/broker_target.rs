//! `--target nats|redis|amqp|kafka`: the `drain` and `fanout` backlogs published to a real
//! broker on this machine (NATS with JetStream on 127.0.0.1:4222, Redis on 6379, RabbitMQ on
//! 5672 with guest/guest, a Kafka-protocol broker at `--kafka-broker`) instead of POSTed to the
//! receiver. Each subscription gets a sink of its own (a memory stream, a Redis stream, an
//! exchange with one bound queue, a one-partition topic), removed afterwards; the check that
//! every event arrived counts what the broker holds.

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};

use super::*;

/// When the sink's consumer first saw each event, by its `data.seq` (the `latency` scenario).
pub(super) type Arrivals = Arc<Mutex<HashMap<i64, Instant>>>;

/// A consumer reading the sink while the scenario runs; stopped on drop (a Kafka consumer
/// runs on a blocking thread, which no abort reaches: [`Sink::remove`] stops it).
pub(super) struct Watch {
    pub(super) arrivals: Arrivals,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Notes the arrival of a message whose body is the webhook body (`data.seq`).
fn note(arrivals: &Arrivals, body: &[u8]) {
    let at = Instant::now();
    let seq = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|body| body["data"]["seq"].as_i64());
    if let Some(seq) = seq {
        arrivals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(seq)
            .or_insert(at);
    }
}

/// Where the backlog goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub(super) enum Target {
    Webhook,
    Nats,
    Redis,
    Amqp,
    Kafka,
}

/// One stream's entries as `XREAD` answers: (stream, [(id, [(field, value)])]).
type StreamRead = (String, Vec<(String, Vec<(String, Vec<u8>)>)>);

/// One subscription's place at the broker.
pub(super) enum Sink {
    Nats {
        client: async_nats::Client,
        jetstream: async_nats::jetstream::Context,
        stream: String,
        subject: String,
    },
    Redis {
        connection: redis::aio::MultiplexedConnection,
        stream: String,
    },
    Amqp {
        _connection: lapin::Connection,
        channel: lapin::Channel,
        exchange: String,
        queue: String,
    },
    Kafka {
        broker: String,
        topic: String,
        /// Raised by [`Sink::remove`]: the watching consumers stop, and are waited for before
        /// the topic is deleted (librdkafka crashed on tansu's metadata for a topic deleted
        /// under a consumer still reading it).
        stop: Arc<std::sync::atomic::AtomicBool>,
        readers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    },
}

impl Sink {
    /// Creates the sink for subscription `name` (a fresh, unique place at the broker).
    pub(super) async fn create(args: &Args, name: &str) -> anyhow::Result<Sink> {
        let unique = format!("{name}-{}", rand::random::<u32>());
        match args.target {
            Target::Webhook => bail!("webhooks go to the receiver, not a broker sink"),
            Target::Nats => {
                let client = async_nats::connect("127.0.0.1:4222")
                    .await
                    .context("connecting to NATS on 127.0.0.1:4222")?;
                let jetstream = async_nats::jetstream::new(client.clone());
                let stream = unique.replace('.', "_");
                let subject = format!("bench.{stream}");
                jetstream
                    .create_stream(async_nats::jetstream::stream::Config {
                        name: stream.clone(),
                        subjects: vec![subject.clone()],
                        storage: async_nats::jetstream::stream::StorageType::Memory,
                        ..Default::default()
                    })
                    .await
                    .context("creating the JetStream stream")?;
                Ok(Sink::Nats {
                    client,
                    jetstream,
                    stream,
                    subject,
                })
            }
            Target::Redis => {
                let connection = redis::Client::open("redis://127.0.0.1:6379/0")?
                    .get_multiplexed_async_connection()
                    .await
                    .context("connecting to Redis on 127.0.0.1:6379")?;
                Ok(Sink::Redis {
                    connection,
                    stream: unique,
                })
            }
            Target::Amqp => {
                use lapin::options::{
                    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
                };
                use lapin::types::FieldTable;
                let connection = lapin::Connection::connect(
                    "amqp://guest:guest@127.0.0.1:5672/%2f",
                    lapin::ConnectionProperties::default(),
                )
                .await
                .context("connecting to RabbitMQ on 127.0.0.1:5672")?;
                let channel = connection.create_channel().await?;
                channel
                    .exchange_declare(
                        unique.as_str().into(),
                        lapin::ExchangeKind::Topic,
                        ExchangeDeclareOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                let queue = format!("{unique}-q");
                channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        unique.as_str().into(),
                        "#".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                Ok(Sink::Amqp {
                    _connection: connection,
                    channel,
                    exchange: unique,
                    queue,
                })
            }
            Target::Kafka => {
                let broker = args.kafka_broker.clone();
                let topic = unique;
                let results = kafka_admin(&broker)?
                    .create_topics(
                        &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
                        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(5))),
                    )
                    .await
                    .with_context(|| format!("creating a topic on the Kafka broker {broker}"))?;
                for result in results {
                    result.map_err(|(name, error)| {
                        anyhow::anyhow!("creating topic {name} on {broker}: {error}")
                    })?;
                }
                Ok(Sink::Kafka {
                    broker,
                    topic,
                    stop: Arc::default(),
                    readers: Mutex::default(),
                })
            }
        }
    }

    /// The subscription URL that publishes here.
    pub(super) fn url(&self) -> String {
        match self {
            Sink::Nats { subject, .. } => format!("nats://127.0.0.1:4222/{subject}"),
            Sink::Redis { stream, .. } => format!("redis://127.0.0.1:6379/0?stream={stream}"),
            Sink::Amqp { exchange, .. } => {
                format!("amqp://guest:guest@127.0.0.1:5672/%2f?exchange={exchange}")
            }
            Sink::Kafka { broker, topic, .. } => format!("kafka://{broker}/{topic}"),
        }
    }

    /// Messages the broker holds for this sink (NATS: de-duplicated by `Nats-Msg-Id`; Kafka:
    /// every record, a copy too).
    pub(super) async fn stored(&self) -> anyhow::Result<u64> {
        match self {
            Sink::Nats {
                jetstream, stream, ..
            } => {
                let mut stream = jetstream.get_stream(stream).await?;
                Ok(stream.info().await?.state.messages)
            }
            Sink::Redis { connection, stream } => {
                let mut connection = connection.clone();
                Ok(redis::cmd("XLEN")
                    .arg(stream)
                    .query_async(&mut connection)
                    .await?)
            }
            Sink::Amqp { channel, queue, .. } => {
                let declared = channel
                    .queue_declare(
                        queue.as_str().into(),
                        lapin::options::QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        lapin::types::FieldTable::default(),
                    )
                    .await?;
                Ok(u64::from(declared.message_count()))
            }
            Sink::Kafka { broker, topic, .. } => {
                let consumer = kafka_consumer(broker, topic)?;
                // Read to the end: tansu 0.6.0's high watermark is one past the last batch's
                // base offset, not past its last record, so it cannot count them.
                tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
                    let mut records = 0;
                    while let Some(record) = consumer.poll(Duration::from_secs(1)) {
                        record.context("reading the Kafka topic")?;
                        records += 1;
                    }
                    Ok(records)
                })
                .await?
            }
        }
    }

    /// Starts a consumer that notes when each message arrives: a core NATS subscription on
    /// the subject (JetStream delivers stored messages to it too), `XREAD BLOCK` on the Redis
    /// stream, a `basic.consume` on the bound queue, a Kafka consumer polling the topic (its
    /// fetch waits at most 1 ms at the broker, so it adds little to a record's latency; it
    /// stops in [`Sink::remove`]).
    pub(super) async fn watch(&self) -> anyhow::Result<Watch> {
        let arrivals: Arrivals = Arc::default();
        let noted = Arc::clone(&arrivals);
        let task = match self {
            Sink::Nats {
                client, subject, ..
            } => {
                let mut messages = client.subscribe(subject.clone()).await?;
                client.flush().await?;
                tokio::spawn(async move {
                    while let Some(message) = messages.next().await {
                        note(&noted, &message.payload);
                    }
                })
            }
            Sink::Redis { stream, .. } => {
                let mut connection = redis::Client::open("redis://127.0.0.1:6379/0")?
                    .get_multiplexed_async_connection()
                    .await?;
                let stream = stream.clone();
                tokio::spawn(async move {
                    let mut last = "0".to_string();
                    loop {
                        // Under the client's default 500 ms response timeout.
                        let read: redis::RedisResult<Option<Vec<StreamRead>>> = redis::cmd("XREAD")
                            .arg("BLOCK")
                            .arg(200)
                            .arg("STREAMS")
                            .arg(&stream)
                            .arg(&last)
                            .query_async(&mut connection)
                            .await;
                        let Ok(read) = read else {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        };
                        for (_, entries) in read.unwrap_or_default() {
                            for (id, fields) in entries {
                                if let Some((_, body)) =
                                    fields.iter().find(|(name, _)| name == "body")
                                {
                                    note(&noted, body);
                                }
                                last = id;
                            }
                        }
                    }
                })
            }
            Sink::Amqp { channel, queue, .. } => {
                let mut consumer = channel
                    .basic_consume(
                        queue.as_str().into(),
                        "bench-latency".into(),
                        lapin::options::BasicConsumeOptions {
                            no_ack: true,
                            ..Default::default()
                        },
                        lapin::types::FieldTable::default(),
                    )
                    .await?;
                tokio::spawn(async move {
                    while let Some(Ok(delivery)) = consumer.next().await {
                        note(&noted, &delivery.data);
                    }
                })
            }
            Sink::Kafka {
                broker,
                topic,
                stop,
                readers,
            } => {
                let consumer = kafka_consumer(broker, topic)?;
                let stop = Arc::clone(stop);
                let poller = tokio::task::spawn_blocking(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(Ok(record)) = consumer.poll(Duration::from_millis(100)) {
                            note(&noted, record.payload().unwrap_or_default());
                        }
                    }
                });
                readers
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push(poller);
                return Ok(Watch {
                    arrivals,
                    task: None,
                });
            }
        };
        Ok(Watch {
            arrivals,
            task: Some(task),
        })
    }

    /// Removes what [`Sink::create`] made; best effort.
    pub(super) async fn remove(self) {
        match self {
            Sink::Nats {
                jetstream, stream, ..
            } => {
                let _ = jetstream.delete_stream(stream).await;
            }
            Sink::Redis {
                mut connection,
                stream,
            } => {
                let _: Result<(), _> = redis::cmd("DEL")
                    .arg(stream)
                    .query_async(&mut connection)
                    .await;
            }
            Sink::Amqp {
                channel,
                exchange,
                queue,
                ..
            } => {
                let _ = channel
                    .queue_delete(queue.as_str().into(), Default::default())
                    .await;
                let _ = channel
                    .exchange_delete(exchange.as_str().into(), Default::default())
                    .await;
            }
            Sink::Kafka {
                broker,
                topic,
                stop,
                readers,
            } => {
                stop.store(true, Ordering::Relaxed);
                let readers = std::mem::take(
                    &mut *readers
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()),
                );
                for reader in readers {
                    let _ = reader.await;
                }
                if let Ok(admin) = kafka_admin(&broker) {
                    let _ = admin.delete_topics(&[&topic], &AdminOptions::new()).await;
                }
            }
        }
    }
}

fn kafka_admin(broker: &str) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", broker)
        .create()
        .with_context(|| format!("a Kafka admin client for {broker}"))
}

/// A consumer of the topic's one partition from its first record.
fn kafka_consumer(broker: &str, topic: &str) -> anyhow::Result<BaseConsumer> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set(
            "group.id",
            format!("outbox-bench-{}", rand::random::<u32>()),
        )
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "1")
        .set("fetch.error.backoff.ms", "1")
        .set("fetch.queue.backoff.ms", "1")
        .create()
        .with_context(|| format!("a Kafka consumer for {broker}"))?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&assignment)?;
    Ok(consumer)
}
