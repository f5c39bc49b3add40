//! Redis Streams: `redis://[user:pass@]host[:port][/db]?stream=S[&maxlen=N]`. Each event is
//! `XADD S [MAXLEN ~ N] * event_id … event_type … body …` (plus `tenant_id`, `ordering_key`
//! and `source_service` when the event has them); success is the entry id Redis returns.
//!
//! Redis has no de-duplication: an event retried after a lost reply, or replayed, is a second
//! entry with the same `event_id` field, which consumers use to drop it. `rediss://` (TLS) is
//! accepted by the schema but not yet by this build: such a delivery fails with a reason.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Endpoint, Link, Message, TargetError, UrlParts, failed, resolve};
use crate::secret::{ExposeSecret, SecretString};
use crate::webhook::client::{FailureKind, HttpResult, error_chain};
use crate::webhook::target_policy::TargetPolicy;

/// A multiplexed connection that reconnects by itself: every delivery task's XADD is
/// pipelined on it, and a broken connection fails only the commands in flight on it.
pub(crate) type Connection = ConnectionManager;

pub struct Target {
    endpoint: Endpoint,
    tls: bool,
    username: String,
    password: Option<SecretString>,
    db: i64,
    stream: String,
    maxlen: Option<u64>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("redis::Target")
            .field("endpoint", &self.endpoint)
            .field("db", &self.db)
            .field("stream", &self.stream)
            .field("maxlen", &self.maxlen)
            .finish_non_exhaustive()
    }
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
            endpoint: parts.endpoint,
            tls: parts.tls,
            username: parts.username,
            password: parts.password,
            db,
            stream,
            maxlen,
        })
    }

    /// One connection per server, user and database.
    pub(super) fn connection_key(&self) -> String {
        format!(
            "{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}",
            self.tls,
            self.username,
            self.password
                .as_ref()
                .map_or("", |password| password.expose_secret()),
            self.endpoint,
            self.db
        )
    }
}

async fn connect(policy: &TargetPolicy, target: &Target) -> Result<Connection, HttpResult> {
    if target.tls {
        return Err(failed(
            FailureKind::InvalidRequest,
            "redis: rediss:// (TLS) is not supported yet; use redis:// on a trusted network",
        ));
    }
    let addr = resolve(policy, &target.endpoint).await?;
    let mut settings = redis::RedisConnectionInfo::default().set_db(target.db);
    if !target.username.is_empty() {
        settings = settings.set_username(&target.username);
    }
    if let Some(password) = &target.password {
        settings = settings.set_password(password.expose_secret());
    }
    // Connect to the checked address, not the name: see `super::resolve`. The manager's
    // reconnects go to the same address.
    let info = redis::IntoConnectionInfo::into_connection_info(redis::ConnectionAddr::Tcp(
        addr.ip().to_string(),
        addr.port(),
    ))
    .map_err(|error| failed(FailureKind::InvalidRequest, format!("redis: {error}")))?
    .set_redis_settings(settings);
    let client = redis::Client::open(info)
        .map_err(|error| failed(FailureKind::InvalidRequest, format!("redis: {error}")))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(super::CONNECT_TIMEOUT))
        // Each publish is bounded by its subscription's timeout instead (in `super`): one
        // fixed response timeout here would override it.
        .set_response_timeout(None)
        .set_max_delay(Duration::from_secs(5));
    ConnectionManager::new_with_config(client, config)
        .await
        .map_err(|error| {
            failed(
                FailureKind::Connect,
                format!(
                    "redis: connecting to {}: {}",
                    target.endpoint,
                    error_chain(&error)
                ),
            )
        })
}

pub(super) async fn publish(
    policy: &TargetPolicy,
    target: &Target,
    link: &Arc<Link<Connection>>,
    message: &Message<'_>,
) -> HttpResult {
    let mut connection = match link.get(|_| true, || connect(policy, target)).await {
        Ok(connection) => connection,
        Err(failure) => return failure,
    };
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
    match command.query_async::<String>(&mut connection).await {
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
    }
}
