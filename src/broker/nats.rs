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

use super::{Endpoint, Link, Message, TargetError, UrlParts, failed, resolve};
use crate::secret::{ExposeSecret, SecretString};
use crate::webhook::client::{FailureKind, HttpResult, error_chain};
use crate::webhook::target_policy::TargetPolicy;

/// Shares one multiplexed connection: publishes from every delivery task go out on it
/// concurrently and their acks are matched by reply subject.
pub(crate) type Connection = async_nats::Client;

pub struct Target {
    endpoint: Endpoint,
    credentials: Option<(String, SecretString)>,
    subject: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("nats::Target")
            .field("endpoint", &self.endpoint)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
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
        let credentials = match (parts.username.is_empty(), parts.password) {
            (true, None) => None,
            (_, password) => Some((
                parts.username,
                password.unwrap_or_else(|| SecretString::from(String::new())),
            )),
        };
        Ok(Target {
            endpoint: parts.endpoint,
            credentials,
            subject,
        })
    }

    /// One connection per server and user.
    pub(super) fn connection_key(&self) -> String {
        let (user, password) = match &self.credentials {
            Some((user, password)) => (user.as_str(), password.expose_secret()),
            None => ("", ""),
        };
        format!("{user}\u{0}{password}\u{0}{}", self.endpoint)
    }
}

async fn connect(policy: &TargetPolicy, target: &Target) -> Result<Connection, HttpResult> {
    let addr = resolve(policy, &target.endpoint).await?;
    // The client reconnects by itself after a broken connection (with its own backoff), always
    // to this checked address: servers the broker advertises are ignored, they were never
    // checked against the policy.
    let mut options = async_nats::ConnectOptions::new()
        .name("outbox-relay")
        .ignore_discovered_servers()
        .connection_timeout(super::CONNECT_TIMEOUT);
    if let Some((user, password)) = &target.credentials {
        options = options.user_and_password(user.clone(), password.expose_secret().to_owned());
    }
    // The URL holds only the resolved address: nothing secret can end up in its errors.
    options
        .connect(format!("nats://{addr}"))
        .await
        .map_err(|error| {
            failed(
                FailureKind::Connect,
                format!("nats: connecting to {}: {error}", target.endpoint),
            )
        })
}

pub(super) async fn publish(
    policy: &TargetPolicy,
    target: &Target,
    link: &Arc<Link<Connection>>,
    message: &Message<'_>,
) -> HttpResult {
    let client = match link.get(|_| true, || connect(policy, target)).await {
        Ok(client) => client,
        Err(failure) => return failure,
    };
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
    match result {
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
    }
}
