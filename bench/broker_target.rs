//! `--target nats|redis|amqp`: the `drain` and `fanout` backlogs published to a real broker on
//! this machine (NATS with JetStream on 127.0.0.1:4222, Redis on 6379, RabbitMQ on 5672 with
//! guest/guest) instead of POSTed to the receiver. Each subscription gets a sink of its own (a
//! memory stream, a Redis stream, an exchange with one bound queue), removed afterwards; the
//! check that every event arrived counts what the broker holds.

use super::*;

/// Where the backlog goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub(super) enum Target {
    Webhook,
    Nats,
    Redis,
    Amqp,
}

/// One subscription's place at the broker.
pub(super) enum Sink {
    Nats {
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
}

impl Sink {
    /// Creates the sink for subscription `name` (a fresh, unique place at the broker).
    pub(super) async fn create(target: Target, name: &str) -> anyhow::Result<Sink> {
        let unique = format!("{name}-{}", rand::random::<u32>());
        match target {
            Target::Webhook => bail!("webhooks go to the receiver, not a broker sink"),
            Target::Nats => {
                let client = async_nats::connect("127.0.0.1:4222")
                    .await
                    .context("connecting to NATS on 127.0.0.1:4222")?;
                let jetstream = async_nats::jetstream::new(client);
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
        }
    }

    /// Messages the broker holds for this sink (NATS: de-duplicated by `Nats-Msg-Id`).
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
        }
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
        }
    }
}
