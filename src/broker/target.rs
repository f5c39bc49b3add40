//! The broker URL forms (SPEC "Broker targets"): which URLs name a broker, what a broker URL
//! must hold for each kind, and what parsing it gives ([`Target`], with the [`Server`] to
//! connect to). Parsing only: nothing here connects or resolves a name (that is `mod.rs`, with
//! the SSRF check). Kept apart so `mod.rs` is about connections and publishing, and parsing,
//! which the admin paths also use to check a subscription's URL, reads on its own.

use std::collections::HashMap;

use super::{amqp, kafka, nats, redis};
use crate::config::secret::{ExposeSecret, SecretString, mask_url};

/// The URL schemes that name a broker, as `subscription add --help` and the API list them.
pub const SCHEMES: [&str; 6] = ["nats", "redis", "rediss", "amqp", "amqps", "kafka"];

/// Whether `url` names a broker (by its scheme) rather than a webhook.
pub fn is_broker_url(url: &str) -> bool {
    url.split_once("://")
        .is_some_and(|(scheme, _)| SCHEMES.iter().any(|s| s.eq_ignore_ascii_case(scheme)))
}

/// A broker target URL that cannot be used. The text never holds the password.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TargetError(pub(super) String);

/// A parsed broker target.
#[derive(Debug)]
pub enum Target {
    Nats(nats::Target),
    Redis(redis::Target),
    Amqp(amqp::Target),
    Kafka(kafka::Target),
}

impl Target {
    /// Parses a broker URL (see the SPEC's table); refuses what the `url_scheme` constraint
    /// refuses, with a reason.
    pub fn parse(raw: &str) -> Result<Target, TargetError> {
        let shown = mask_url(raw);
        // A broker list (`host:port,host:port`) is no URL authority: kafka parses its own.
        if raw
            .split_once("://")
            .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("kafka"))
        {
            return kafka::Target::parse(raw, &shown).map(Target::Kafka);
        }
        let url = reqwest::Url::parse(raw)
            .map_err(|error| TargetError(format!("{shown:?} is not a URL ({error})")))?;
        let parts = UrlParts::new(&url, &shown)?;
        match url.scheme() {
            "nats" => nats::Target::parse(parts).map(Target::Nats),
            "redis" | "rediss" => redis::Target::parse(parts).map(Target::Redis),
            "amqp" | "amqps" => amqp::Target::parse(parts).map(Target::Amqp),
            other => Err(TargetError(format!(
                "{shown:?} uses scheme {other:?}; brokers are {}",
                SCHEMES.join(", ")
            ))),
        }
    }

    pub(super) fn kind(&self) -> &'static str {
        match self {
            Target::Nats(_) => "nats",
            Target::Redis(_) => "redis",
            Target::Amqp(_) => "amqp",
            Target::Kafka(_) => "kafka",
        }
    }
}

/// What the URL parser gives, decoded once for every kind.
pub(super) struct UrlParts<'a> {
    pub(super) shown: &'a str,
    pub(super) server: Server,
    /// The path without its leading `/`, still percent-encoded.
    pub(super) path: String,
    pub(super) query: Vec<(String, String)>,
}

/// A broker and who connects to it. `Debug` leaves the password out, so the targets holding
/// one can derive it.
pub struct Server {
    pub(super) endpoint: Endpoint,
    pub(super) tls: bool,
    pub(super) username: String,
    pub(super) password: Option<SecretString>,
}

impl Server {
    /// Which long-lived connection serves a target: the same server, user and password, and
    /// `scope` (a Redis database, an AMQP vhost). Secret: it holds the password.
    pub(super) fn connection_key(&self, scope: &str) -> String {
        format!(
            "{}\u{0}{}\u{0}{}\u{0}{}\u{0}{scope}",
            self.tls,
            self.username,
            self.password(),
            self.endpoint
        )
    }

    /// The password, or "" without one.
    pub(super) fn password(&self) -> &str {
        self.password
            .as_ref()
            .map_or("", |password| password.expose_secret())
    }

    pub(super) fn has_credentials(&self) -> bool {
        !self.username.is_empty() || self.password.is_some()
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("endpoint", &self.endpoint)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl<'a> UrlParts<'a> {
    pub(super) fn new(url: &reqwest::Url, shown: &'a str) -> Result<UrlParts<'a>, TargetError> {
        let host = url
            .host_str()
            .filter(|host| !host.is_empty())
            .ok_or_else(|| TargetError(format!("{shown:?} has no host")))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let scheme = url.scheme();
        let tls = matches!(scheme, "rediss" | "amqps");
        let port = url.port().unwrap_or(match scheme {
            "nats" => 4222,
            "redis" | "rediss" => 6379,
            "amqps" => 5671,
            _ => 5672,
        });
        if url.fragment().is_some() {
            return Err(TargetError(format!("{shown:?} has a #fragment")));
        }
        let mut query: Vec<(String, String)> = Vec::new();
        for (key, value) in url.query_pairs() {
            if query.iter().any(|(seen, _)| *seen == key) {
                return Err(TargetError(format!(
                    "{shown:?} gives query parameter {key:?} twice"
                )));
            }
            query.push((key.into_owned(), value.into_owned()));
        }
        Ok(UrlParts {
            shown,
            server: Server {
                endpoint: Endpoint {
                    host: host.to_owned(),
                    port,
                },
                tls,
                username: decode(url.username()),
                password: url.password().map(|p| SecretString::from(decode(p))),
            },
            path: url.path().strip_prefix('/').unwrap_or("").to_owned(),
            query,
        })
    }

    /// Takes the query parameters: each of `allowed` at most once; anything else refused.
    pub(super) fn query(&self, allowed: &[&str]) -> Result<HashMap<String, String>, TargetError> {
        let mut found = HashMap::new();
        for (key, value) in &self.query {
            if !allowed.contains(&key.as_str()) {
                return Err(TargetError(format!(
                    "{:?} has unknown query parameter {key:?}; this target takes {}",
                    self.shown,
                    allowed.join(", ")
                )));
            }
            if value.is_empty() {
                return Err(TargetError(format!(
                    "{:?} gives query parameter {key:?} no value",
                    self.shown
                )));
            }
            found.insert(key.clone(), value.clone());
        }
        Ok(found)
    }
}

pub(super) fn decode(raw: &str) -> String {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8_lossy()
        .into_owned()
}

/// Host and port of a broker, as written in the URL (resolved and checked when connecting).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(url: &str) -> String {
        match Target::parse(url) {
            Ok(target) => panic!("{url} parsed as {target:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn broker_urls_are_told_apart_from_webhooks_by_scheme() {
        assert!(is_broker_url("nats://h/s"));
        assert!(is_broker_url("AMQP://h"));
        assert!(is_broker_url("rediss://h?stream=s"));
        assert!(!is_broker_url("https://h/nats://"));
        assert!(is_broker_url("kafka://h:9092/t"));
        assert!(!is_broker_url("mqtt://h/t"));
    }

    #[test]
    fn every_kind_parses_its_spec_form() {
        assert!(matches!(
            Target::parse("nats://127.0.0.1:4222/orders.created"),
            Ok(Target::Nats(_))
        ));
        assert!(matches!(
            Target::parse("redis://127.0.0.1:6379/0?stream=orders&maxlen=1000"),
            Ok(Target::Redis(_))
        ));
        assert!(matches!(
            Target::parse("amqp://guest:guest@127.0.0.1:5672/%2f?exchange=e&routing_key=k"),
            Ok(Target::Amqp(_))
        ));
        assert!(matches!(
            Target::parse("kafka://127.0.0.1:9092,127.0.0.2:9092/orders"),
            Ok(Target::Kafka(_))
        ));
    }

    #[test]
    fn refusals_say_why_and_never_show_the_password() {
        for (url, why) in [
            ("nats://u:hunter2@h:4222", "no subject"),
            ("nats://u:hunter2@h/a.*", "subject"),
            ("redis://:hunter2@h/0", "stream"),
            (
                "redis://:hunter2@h/0?stream=s&maxln=5",
                "unknown query parameter",
            ),
            ("redis://:hunter2@h/0?stream=s&maxlen=0", "maxlen"),
            (
                "amqp://u:hunter2@h/?exchange=e&bogus=1",
                "unknown query parameter",
            ),
            ("kafka://u:hunter2@h:9092", "no topic"),
            ("mqtt://u:hunter2@h/t", "scheme"),
        ] {
            let error = refused(url);
            assert!(error.contains(why), "{url}: {error}");
            assert!(!error.contains("hunter2"), "{url}: {error}");
        }
    }

    #[test]
    fn a_parsed_target_never_shows_its_password() {
        for url in [
            "nats://u:hunter2@h/a",
            "redis://:hunter2@h/0?stream=s",
            "amqp://u:hunter2@h/?exchange=e",
            "kafka://u:hunter2@h:9092/t",
        ] {
            let shown = format!("{:?}", Target::parse(url).expect("valid"));
            assert!(!shown.contains("hunter2"), "{shown}");
        }
    }
}
