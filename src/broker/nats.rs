//! NATS JetStream: `nats://[user:pass@]host[:port]/{subject}`. Each event is a JetStream
//! publish to the subject; success is the stream's PubAck. A subject no stream listens on is
//! a failed attempt (the server answers "no responders" instead of an ack), so an event is
//! never "delivered" into nothing.
//!
//! `Nats-Msg-Id` = `event_id` lets JetStream drop a second copy of the same event within the
//! stream's duplicate window (a retry after a lost ack, a relay crash); such a publish is
//! acked with `duplicate: true` and counts as delivered. So a replay inside that window is
//! acknowledged without a second stored message; after it, the replay is stored again.

use std::sync::Arc;

use async_nats::jetstream::context::PublishErrorKind;

use super::{Link, Message, Server, TargetError, UrlParts, failed};
use crate::webhook::client::{FailureKind, HttpResult, error_chain};
use crate::webhook::target_policy::TargetPolicy;

/// Shares one multiplexed connection: publishes from every delivery task go out on it
/// concurrently and their acks are matched by reply subject.
pub(crate) type Connection = async_nats::Client;

#[derive(Debug)]
pub struct Target {
    pub(super) server: Server,
    subject: String,
}

impl Target {
    pub(super) fn parse(parts: UrlParts<'_>) -> Result<Target, TargetError> {
        parts.query(&[])?;
        let subject = super::decode(&parts.path);
        if subject.is_empty() {
            return Err(TargetError(format!(
                "{:?} has no subject: give nats://host:4222/orders.created",
                parts.shown
            )));
        }
        let valid_token = |token: &str| {
            !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_:-".contains(&b))
        };
        if !subject.split('.').all(valid_token) {
            return Err(TargetError(format!(
                "{:?}: subject {subject:?} must be dot-separated tokens of letters, digits, _ : and - (no wildcards)",
                parts.shown
            )));
        }
        Ok(Target {
            server: parts.server,
            subject,
        })
    }

    /// One connection per server and user.
    pub(super) fn connection_key(&self) -> String {
        self.server.connection_key("")
    }
}

async fn connect(policy: &TargetPolicy, target: &Target) -> Result<Connection, HttpResult> {
    let server = &target.server;
    let addr = super::resolve(policy, &server.endpoint).await?;
    // The client reconnects by itself after a broken connection (with its own backoff), always
    // to this checked address: servers the broker advertises are ignored, they were never
    // checked against the policy.
    let mut options = async_nats::ConnectOptions::new()
        .name("outbox-relay")
        .ignore_discovered_servers()
        .connection_timeout(super::CONNECT_TIMEOUT);
    if server.has_credentials() {
        options = options.user_and_password(server.username.clone(), server.password().to_owned());
    }
    // The URL holds only the resolved address: nothing secret can end up in its errors.
    options
        .connect(format!("nats://{addr}"))
        .await
        .map_err(|error| {
            failed(
                FailureKind::Connect,
                format!("nats: connecting to {}: {error}", server.endpoint),
            )
        })
}

pub(super) async fn publish(
    policy: &TargetPolicy,
    target: &Target,
    link: &Arc<Link<Connection>>,
    message: &Message<'_>,
) -> Result<HttpResult, HttpResult> {
    let client = link.get(|_| true, || connect(policy, target)).await?;
    let event = message.event;
    let event_id = event.event_id.to_string();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", event_id.as_str());
    headers.insert("webhook-id", event_id.as_str());
    headers.insert("event-type", super::header_safe(&event.event_type).as_str());
    for (name, value) in message.optional_headers() {
        // The SPEC names tenant-id and ordering-key for NATS; source-service rides along as
        // it does on RabbitMQ, for consumers that route on it.
        headers.insert(name, value.as_str());
    }
    let mut jetstream = async_nats::jetstream::new(client);
    jetstream.set_timeout(message.timeout);
    let result = match jetstream
        .publish_with_headers(target.subject.clone(), headers, message.body.clone())
        .await
    {
        Ok(ack) => ack.await,
        Err(error) => Err(error),
    };
    Ok(match result {
        Ok(ack) => HttpResult::Published {
            receipt: format!(
                "nats: stream {} seq {}{}",
                ack.stream,
                ack.sequence,
                if ack.duplicate { " (duplicate)" } else { "" }
            ),
        },
        Err(error) => {
            let subject = &target.subject;
            let (kind, text) = match error.kind() {
                PublishErrorKind::StreamNotFound => (
                    FailureKind::Rejected,
                    format!("nats: no stream for subject {subject}"),
                ),
                PublishErrorKind::TimedOut => (
                    FailureKind::Timeout,
                    format!(
                        "nats: no PubAck for subject {subject} within {:?}",
                        message.timeout
                    ),
                ),
                PublishErrorKind::BrokenPipe => (
                    FailureKind::Connect,
                    format!("nats: connection lost before the PubAck for subject {subject}"),
                ),
                _ => (
                    FailureKind::Rejected,
                    format!(
                        "nats: publishing to subject {subject}: {}",
                        error_chain(&error)
                    ),
                ),
            };
            failed(kind, text)
        }
    })
}
