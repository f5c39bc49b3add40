//! RabbitMQ (AMQP 0-9-1): `amqp://user:pass@host:port/{vhost}?exchange=E&routing_key=K`.

use std::sync::Arc;

use super::{Endpoint, Link, Message, TargetError, UrlParts, failed};
use crate::secret::{ExposeSecret, SecretString};
use crate::webhook::client::{FailureKind, HttpResult};
use crate::webhook::target_policy::TargetPolicy;

#[derive(Clone)]
pub(crate) struct Connection;

pub struct Target {
    endpoint: Endpoint,
    tls: bool,
    username: String,
    password: Option<SecretString>,
    vhost: String,
    exchange: String,
    routing_key: Option<String>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("amqp::Target")
            .field("endpoint", &self.endpoint)
            .field("vhost", &self.vhost)
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .finish_non_exhaustive()
    }
}

impl Target {
    pub(super) fn parse(parts: UrlParts<'_>) -> Result<Target, TargetError> {
        let mut query = parts.query(&["exchange", "routing_key"])?;
        Ok(Target {
            endpoint: parts.endpoint,
            tls: parts.tls,
            username: parts.username,
            password: parts.password,
            vhost: super::decode(&parts.path),
            exchange: query.remove("exchange").unwrap_or_default(),
            routing_key: query.remove("routing_key"),
        })
    }

    pub(super) fn connection_key(&self) -> String {
        format!(
            "{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}",
            self.tls,
            self.username,
            self.password.as_ref().map_or("", |p| p.expose_secret()),
            self.endpoint,
            self.vhost
        )
    }
}

pub(super) async fn publish(
    _policy: &TargetPolicy,
    _target: &Target,
    _link: &Arc<Link<Connection>>,
    _message: &Message<'_>,
) -> HttpResult {
    failed(FailureKind::InvalidRequest, "amqp: not supported yet")
}
