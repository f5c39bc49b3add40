//! RabbitMQ (AMQP 0-9-1): `amqp://user:pass@host:port/{vhost}?exchange=E&routing_key=K`.
//! Each event is a persistent, `mandatory` message on a channel in publisher-confirm mode;
//! success is the broker's `basic.ack` of a routed message. A `basic.return` (the exchange has
//! no queue bound for the routing key), a `basic.nack`, a closed channel (no such exchange) or
//! a lost connection is a failed attempt.
//!
//! `routing_key` defaults to the event type; no `exchange` means the default exchange (the
//! routing key then names a queue). An empty vhost means RabbitMQ's default, `/`.
//!
//! `amqps://`: TLS over the connection to the checked address, the broker's certificate
//! verified against the URL's host name and the [`TlsTrust`] roots.
//!
//! One connection per broker, user and vhost; on it one channel per exchange, because the
//! broker closes a channel on some errors (a publish to a missing exchange) and that must not
//! fail the messages other subscriptions have in flight on other exchanges.

use std::collections::HashMap;
use std::sync::Arc;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{BasicProperties, Confirmation, ConnectionProperties};

use super::{BrokenFlag, Link, Message, Server, TargetError, TlsTrust, UrlParts, failed};
use crate::webhook::client::{FailureKind, HttpResult, error_chain};
use crate::webhook::target_policy::TargetPolicy;

/// AMQP `delivery_mode` for a message the broker writes to disk (with a durable queue).
const PERSISTENT: u8 = 2;

/// A connection and its confirm-mode channels, by exchange. Cloning shares them.
#[derive(Clone)]
pub(crate) struct Connection {
    connection: Arc<lapin::Connection>,
    channels: Arc<tokio::sync::Mutex<HashMap<String, lapin::Channel>>>,
    /// Set when a publish gave up waiting for its confirm. A publish lost on the way (a
    /// connection gone silent) shifts the channel's confirm numbering: the broker's next ack
    /// answers the lost message, so every later publish would wait for the one after it.
    /// The link makes a new connection instead.
    broken: BrokenFlag,
}

impl Connection {
    fn usable(&self) -> bool {
        self.connection.status().connected() && !self.broken.is_set()
    }

    /// The exchange's channel, opened (in confirm mode) when there is none or the broker
    /// closed the last one.
    async fn channel(&self, exchange: &str) -> Result<lapin::Channel, HttpResult> {
        let mut channels = self.channels.lock().await;
        if let Some(channel) = channels.get(exchange)
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let opening = async {
            let channel = self.connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok::<_, lapin::Error>(channel)
        };
        let channel = opening.await.map_err(|error| {
            failed(
                FailureKind::Connect,
                format!("amqp: opening a channel: {}", error_chain(&error)),
            )
        })?;
        channels.insert(exchange.to_owned(), channel.clone());
        Ok(channel)
    }
}

#[derive(Debug)]
pub struct Target {
    pub(super) server: Server,
    vhost: String,
    exchange: String,
    routing_key: Option<String>,
}

impl Target {
    pub(super) fn parse(parts: UrlParts<'_>) -> Result<Target, TargetError> {
        let mut query = parts.query(&["exchange", "routing_key"])?;
        let exchange = query.remove("exchange").unwrap_or_default();
        let routing_key = query.remove("routing_key");
        for (what, value) in [
            ("exchange", Some(&exchange)),
            ("routing_key", routing_key.as_ref()),
        ] {
            if value.is_some_and(|value| ShortString::try_new(value.as_str()).is_err()) {
                return Err(TargetError(format!(
                    "{:?}: {what} is longer than AMQP's 255 bytes",
                    parts.shown
                )));
            }
        }
        let vhost = super::decode(&parts.path);
        Ok(Target {
            server: parts.server,
            vhost: if vhost.is_empty() {
                "/".to_owned()
            } else {
                vhost
            },
            exchange,
            routing_key,
        })
    }

    /// One connection per server, user and vhost.
    pub(super) fn connection_key(&self) -> String {
        self.server.connection_key(&self.vhost)
    }

    /// The exchange as the broker's messages name it ("" is the default exchange).
    fn exchange_shown(&self) -> String {
        if self.exchange.is_empty() {
            "(default)".to_owned()
        } else {
            format!("{:?}", self.exchange)
        }
    }
}

async fn connect(
    policy: &TargetPolicy,
    trust: &TlsTrust,
    target: &Target,
) -> Result<Connection, HttpResult> {
    let server = &target.server;
    let addr = super::resolve(policy, &server.endpoint).await?;
    let userinfo = if !server.has_credentials() {
        // What an AMQP URI without credentials means: RabbitMQ's guest user.
        AMQPUserInfo::default()
    } else {
        AMQPUserInfo {
            username: server.username.clone(),
            password: server.password().to_owned(),
        }
    };
    let uri = AMQPUri {
        scheme: if server.tls {
            AMQPScheme::AMQPS
        } else {
            AMQPScheme::AMQP
        },
        authority: AMQPAuthority {
            userinfo,
            host: server.endpoint.host.clone(),
            port: addr.port(),
        },
        vhost: target.vhost.clone(),
        query: AMQPQueryString::default(),
    };
    let properties = ConnectionProperties::default().with_connection_name("outbox-relay".into());
    let runtime = lapin::runtime::default_runtime().map_err(|error| {
        failed(
            FailureKind::Connect,
            format!("amqp: no runtime: {}", error_chain(&error)),
        )
    })?;
    let tls = server.tls;
    let trust = trust.clone();
    // Connect to the checked address, not the name: see `super::resolve`. The name (in `uri`)
    // is what a TLS certificate is verified against. lapin calls this again to reconnect.
    let connect_checked = async move |uri: AMQPUri, runtime| {
        // lapin runs this on a thread of its own and waits for it there: without a bound, a
        // peer that accepts TCP but never finishes the handshake would hold that thread
        // for good, one more at each reconnect.
        let connecting = async {
            let stream = lapin::AsyncTcpStream::connect(&runtime, addr).await?;
            if !tls {
                return Ok(stream);
            }
            tls_handshake(stream, &uri.authority.host, &trust).await
        };
        tokio::time::timeout(super::CONNECT_TIMEOUT, connecting)
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", super::CONNECT_TIMEOUT),
                ))
            })
            .map_err(lapin::Error::from)
    };
    let connection = lapin::Connection::connector(uri, runtime, connect_checked, properties)
        .await
        .map_err(|error| {
            failed(
                FailureKind::Connect,
                // lapin's errors name neither the URI nor the password.
                format!(
                    "amqp: connecting to {} (vhost {:?}): {}",
                    server.endpoint,
                    target.vhost,
                    error_chain(&error)
                ),
            )
        })?;
    Ok(Connection {
        connection: Arc::new(connection),
        channels: Arc::default(),
        broken: BrokenFlag::default(),
    })
}

/// TLS over `stream`, the broker's certificate verified against `host` and the [`TlsTrust`]
/// roots.
async fn tls_handshake<S>(
    stream: lapin::AsyncTcpStream<S>,
    host: &str,
    trust: &TlsTrust,
) -> std::io::Result<lapin::AsyncTcpStream<S>>
where
    S: futures::AsyncRead + futures::AsyncWrite + Send + Unpin + 'static,
{
    match trust.ca_certificates() {
        // The configured CAs in place of the system's roots.
        Some(certificates) => {
            let connector = lapin::tcp::RustlsConnectorConfig::default()
                .with_parsable_certificates(certificates)
                .connector_with_no_client_auth()?;
            stream.into_rustls(&connector, host).await
        }
        None => {
            stream
                .into_tls(host, lapin::tcp::TLSConfig::default())
                .await
        }
    }
}

fn properties(message: &Message<'_>) -> BasicProperties {
    let event = message.event;
    let mut headers = FieldTable::default();
    for (name, value) in message.optional_headers() {
        headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
    }
    BasicProperties::default()
        .with_message_id(event.event_id.to_string().into())
        // An event type is at most 255 ASCII characters (events.event_type_format), so it
        // fits a short string.
        .with_type(ShortString::try_new(event.event_type.as_str()).unwrap_or_default())
        .with_content_type("application/json".into())
        .with_delivery_mode(PERSISTENT)
        // When the event was created, like the body's timestamp: the same on every attempt.
        .with_timestamp(u64::try_from(event.created_at.timestamp()).unwrap_or(0))
        .with_headers(headers)
}

pub(super) async fn publish(
    policy: &TargetPolicy,
    trust: &TlsTrust,
    target: &Target,
    link: &Arc<Link<Connection>>,
    message: &Message<'_>,
) -> Result<HttpResult, HttpResult> {
    let connection = link
        .get(Connection::usable, || connect(policy, trust, target))
        .await?;
    let channel = connection.channel(&target.exchange).await?;
    let routing_key = target
        .routing_key
        .as_deref()
        .unwrap_or(&message.event.event_type);
    let exchange = target.exchange_shown();
    let awaiting = connection.broken.awaiting_answer();
    let confirm = channel
        .basic_publish(
            target.exchange.as_str().into(),
            ShortString::try_new(routing_key).unwrap_or_default(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &message.body,
            properties(message),
        )
        .await;
    let confirmation = match confirm {
        Ok(confirm) => confirm.await,
        Err(error) => Err(error),
    };
    // Answered (or failed, which lapin's status shows): the connection is not suspect.
    awaiting.answered();
    Ok(match confirmation {
        Ok(Confirmation::Ack(None)) => HttpResult::Published {
            receipt: format!("amqp: exchange {exchange} acked, routing key {routing_key:?}"),
        },
        Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned))) => failed(
            FailureKind::Rejected,
            format!(
                "amqp: unroutable: exchange {exchange} returned the message for routing key \
                 {routing_key:?} ({} {}); bind a queue to it",
                returned.reply_code, returned.reply_text
            ),
        ),
        Ok(Confirmation::Nack(None)) => failed(
            FailureKind::Rejected,
            format!("amqp: exchange {exchange} nacked the message (routing key {routing_key:?})"),
        ),
        Ok(Confirmation::NotRequested) => failed(
            FailureKind::Other,
            "amqp: the channel is not in confirm mode, so nothing confirmed the message",
        ),
        Err(error) => {
            let text = error_chain(&error);
            // A channel the broker closed (NOT_FOUND: no such exchange, ACCESS_REFUSED) is the
            // broker's refusal; anything else is the connection's failure.
            let kind = if text.contains("NOT_FOUND") || text.contains("ACCESS_REFUSED") {
                FailureKind::Rejected
            } else {
                FailureKind::Connect
            };
            failed(
                kind,
                format!("amqp: publishing to exchange {exchange}: {text}"),
            )
        }
    })
}
