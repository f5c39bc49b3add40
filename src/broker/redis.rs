//! Redis Streams: `redis://[user:pass@]host[:port][/db]?stream=S[&maxlen=N]`. Each event is
//! `XADD S [MAXLEN ~ N] * event_id … event_type … body …` (plus `tenant_id`, `ordering_key`
//! and `source_service` when the event has them); success is the entry id Redis returns.
//!
//! Redis has no de-duplication: an event retried after a lost reply, or replayed, is a second
//! entry with the same `event_id` field, which consumers use to drop it.
//!
//! `rediss://`: TLS over the connection to the checked address, the server's certificate
//! verified against the URL's host name and the [`TlsTrust`] roots.

use std::net::SocketAddr;
use std::sync::Arc;

use redis::aio::MultiplexedConnection;

use super::{BrokenFlag, Link, Message, Server, TargetError, TlsTrust, UrlParts, failed};
use crate::webhook::client::{FailureKind, HttpResult, error_chain};
use crate::webhook::target_policy::TargetPolicy;

/// A multiplexed connection: every delivery task's XADD is pipelined on it, and a broken
/// connection fails only the commands in flight on it. It connects to the checked address
/// (given to the client by [`CheckedAddress`]); once a command found it broken, or went
/// unanswered until its publish timed out, the link makes a new one.
///
/// Not the client's connection manager, which reconnects by itself: it cannot be given the
/// checked address for a name (TLS needs the name), and a command whose request was lost on
/// the way (a connection gone silent) leaves a multiplexed connection waiting for a reply
/// that never comes, after which every later command on it times out too. The manager only
/// reconnects after an I/O error, so it kept that connection for good.
#[derive(Clone)]
pub(crate) struct Connection {
    connection: MultiplexedConnection,
    broken: BrokenFlag,
}

impl Connection {
    fn usable(&self) -> bool {
        !self.broken.is_set()
    }

    async fn xadd(&self, command: &redis::Cmd) -> redis::RedisResult<String> {
        let awaiting = self.broken.awaiting_answer();
        let result = command.query_async(&mut self.connection.clone()).await;
        let connection_failed = result.as_ref().is_err_and(|error| {
            error.is_io_error() || error.is_connection_dropped() || error.is_unrecoverable_error()
        });
        if !connection_failed {
            awaiting.answered();
        }
        result
    }
}

/// Answers the client's name lookup with the address [`super::resolve`] checked, so that the
/// connection keeps the name (a TLS certificate is verified against it) but cannot be
/// steered elsewhere.
struct CheckedAddress(SocketAddr);

impl redis::io::AsyncDNSResolver for CheckedAddress {
    fn resolve<'a, 'b: 'a>(
        &'a self,
        _host: &'b str,
        _port: u16,
    ) -> redis::RedisFuture<'a, Box<dyn Iterator<Item = SocketAddr> + Send + 'a>> {
        let addr = self.0;
        Box::pin(async move {
            Ok(Box::new(std::iter::once(addr)) as Box<dyn Iterator<Item = SocketAddr> + Send>)
        })
    }
}

#[derive(Debug)]
pub struct Target {
    pub(super) server: Server,
    db: i64,
    stream: String,
    maxlen: Option<u64>,
}

impl Target {
    pub(super) fn parse(parts: UrlParts<'_>) -> Result<Target, TargetError> {
        let mut query = parts.query(&["stream", "maxlen"])?;
        let shown = parts.shown;
        let stream = query.remove("stream").ok_or_else(|| {
            TargetError(format!(
                "{shown:?} names no stream: give redis://host:6379/0?stream=orders"
            ))
        })?;
        let maxlen = match query.remove("maxlen") {
            None => None,
            Some(text) => Some(
                text.parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0 && text.len() <= 18 && text.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| {
                        TargetError(format!(
                            "{shown:?}: maxlen {text:?} must be a positive whole number of at most 18 digits"
                        ))
                    })?,
            ),
        };
        let db = if parts.path.is_empty() {
            0
        } else {
            parts
                .path
                .parse::<i64>()
                .ok()
                .filter(|_| parts.path.len() <= 5 && parts.path.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| {
                    TargetError(format!(
                        "{shown:?}: the database {:?} must be a number of at most 5 digits",
                        parts.path
                    ))
                })?
        };
        Ok(Target {
            server: parts.server,
            db,
            stream,
            maxlen,
        })
    }

    /// One connection per server, user and database.
    pub(super) fn connection_key(&self) -> String {
        self.server.connection_key(&self.db.to_string())
    }
}

async fn connect(
    policy: &TargetPolicy,
    trust: &TlsTrust,
    target: &Target,
) -> Result<Connection, HttpResult> {
    let server = &target.server;
    let addr = super::resolve(policy, &server.endpoint).await?;
    let mut settings = redis::RedisConnectionInfo::default().set_db(target.db);
    if !server.username.is_empty() {
        settings = settings.set_username(&server.username);
    }
    if server.password.is_some() {
        settings = settings.set_password(server.password());
    }
    let connect_failed = |error: redis::RedisError| {
        failed(
            FailureKind::Connect,
            format!(
                "redis: connecting to {}: {}",
                server.endpoint,
                error_chain(&error)
            ),
        )
    };
    let invalid =
        |error: redis::RedisError| failed(FailureKind::InvalidRequest, format!("redis: {error}"));
    // The name stays in the address (a TLS certificate is verified against it); the lookup
    // is answered with the checked address.
    let scheme = if server.tls { "rediss" } else { "redis" };
    let info =
        redis::IntoConnectionInfo::into_connection_info(format!("{scheme}://{}/", server.endpoint))
            .map_err(invalid)?
            .set_redis_settings(settings);
    let client = match trust.ca_pem() {
        // The configured CAs in place of the system's roots.
        Some(pem) if server.tls => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.as_bytes().to_vec()),
            },
        ),
        _ => redis::Client::open(info),
    }
    .map_err(invalid)?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(super::CONNECT_TIMEOUT))
        // Each publish is bounded by its subscription's timeout instead (in `super`): one
        // fixed response timeout here would override it.
        .set_response_timeout(None)
        .set_dns_resolver(CheckedAddress(addr));
    let connection = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(connect_failed)?;
    Ok(Connection {
        connection,
        broken: BrokenFlag::default(),
    })
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
    let event = message.event;
    let mut command = redis::cmd("XADD");
    command.arg(&target.stream);
    if let Some(maxlen) = target.maxlen {
        command.arg("MAXLEN").arg("~").arg(maxlen);
    }
    command
        .arg("*")
        .arg("event_id")
        .arg(event.event_id.to_string())
        .arg("event_type")
        .arg(&event.event_type)
        .arg("body")
        .arg(message.body.as_ref());
    for (name, value) in [
        ("tenant_id", &event.tenant_id),
        ("ordering_key", &event.ordering_key),
        ("source_service", &event.source_service),
    ] {
        if let Some(value) = value {
            command.arg(name).arg(value);
        }
    }
    Ok(match connection.xadd(&command).await {
        Ok(entry_id) => HttpResult::Published {
            receipt: format!("redis: stream {} entry {entry_id}", target.stream),
        },
        Err(error) => {
            let kind = if error.is_timeout() {
                FailureKind::Timeout
            } else if error.is_io_error()
                || error.is_connection_dropped()
                || error.is_connection_refusal()
            {
                FailureKind::Connect
            } else {
                FailureKind::Rejected
            };
            failed(
                kind,
                format!(
                    "redis: XADD to stream {}: {}",
                    target.stream,
                    error_chain(&error)
                ),
            )
        }
    })
}
