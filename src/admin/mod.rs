//! Administrative operations shared by the CLI (`outbox-relay subscription|replay|status`)
//! and the admin API: managing subscriptions (including secret rotation), replaying
//! deliveries and summarising the state of the outbox.
//!
//! Every function takes a plain `&tokio_postgres::Client` (a pooled connection derefs to
//! one) and returns [`AdminError`], whose variants are the cases a caller answers
//! differently: an unknown name, a taken name, a refused value (naming the field), a schema
//! that needs `migrate`, or a database failure. Values are checked by the table's CHECK
//! constraints; a violation comes back as [`AdminError::Invalid`] naming the field, so the
//! database stays the one place the rules live. Only the URL and a given secret are checked
//! here first, because their errors can say more than a constraint name.
//!
//! Results are `Serialize` (for `--json` and the HTTP API). Secrets appear only in the results
//! of [`create_subscription`] and [`rotate_secret`], never in [`SubscriptionInfo`].
//!
//! One file per use case (`subscriptions`, `events`, `replays`, `status`); this one holds
//! what they share: the error type and how database errors become it, input checks, keyset
//! pages and the serde helpers.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Serialize, Serializer};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{Json, ToSql, Type};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::config::secret::{ExposeSecret, MASK, SecretString, SecretUrl, mask_url};
use crate::db::{DbError, convert};
use crate::webhook::{SigningSecret, generate_secret};

mod events;
mod replays;
mod status;
mod subscriptions;

pub use events::*;
pub use replays::*;
pub use status::*;
pub use subscriptions::*;

/// A `jsonb` value as PostgreSQL prints it, passed through without being parsed into a
/// [`serde_json::Value`]: jsonb keeps numbers of any size and precision (a producer may
/// insert `1e400`, and `1.7976931348623157e308` comes back as a 309-digit integer), which an
/// `f64` cannot hold, so reading them as `Value` failed, and a listing panicked on one row.
pub type Jsonb = Box<serde_json::value::RawValue>;

/// Delivery statuses `outbox.deliveries.status` can hold (what replay criteria may name).
pub const DELIVERY_STATUSES: [&str; 5] = ["pending", "in_flight", "delivered", "failing", "dead"];

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no subscription named {name:?}")]
    NotFound { name: String },
    #[error("a subscription named {name:?} already exists")]
    Duplicate { name: String },
    /// A value was refused, before the database saw it or by one of its CHECK constraints.
    #[error("invalid {field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
    /// The database lacks a table, column or function this version uses.
    #[error(
        "{context}: the database schema is older than this outbox-relay ({detail}); apply the migrations with `outbox-relay migrate`"
    )]
    SchemaOutdated {
        context: &'static str,
        detail: String,
    },
    #[error(transparent)]
    Db(#[from] DbError),
}

/// A signing secret as text (`whsec_…`). `Debug` never shows it; [`SecretText::expose`]
/// does, and serializing it does too: it is serialized only into the one answer that hands a
/// new secret to its owner (create, rotate-secret).
#[derive(Clone)]
pub struct SecretText(SecretString);

impl SecretText {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(SecretString::from(secret.into()))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl PartialEq for SecretText {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for SecretText {}

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretText(<redacted>)")
    }
}

impl Serialize for SecretText {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.expose())
    }
}

impl<'de> serde::Deserialize<'de> for SecretText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(SecretText::new)
    }
}

/// Cuts the one extra row a page query reads and returns the cursor of the next page.
fn page_cursor<T>(rows: &mut Vec<T>, limit: i64, id: impl Fn(&T) -> i64) -> Option<String> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|row| id(row).to_string())
    } else {
        None
    }
}

fn check_limit(limit: i64) -> Result<(), AdminError> {
    if (1..=PAGE_SIZE_MAX).contains(&limit) {
        Ok(())
    } else {
        Err(AdminError::Invalid {
            field: "limit",
            problem: format!("{limit} is out of range; give 1 to {PAGE_SIZE_MAX}"),
        })
    }
}

/// The rule of `outbox.are_valid_event_type_patterns`, checked here so the error names the
/// field instead of surfacing from inside a query.
pub fn check_event_type_pattern(field: &'static str, pattern: &str) -> Result<(), AdminError> {
    let valid = (1..=255).contains(&pattern.len())
        && pattern
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-*".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(AdminError::Invalid {
            field,
            problem: format!(
                "{pattern:?} is neither an event type nor a glob; use 1 to 255 of letters, digits, . _ : - and * as a wildcard, e.g. lead.created or lead.*"
            ),
        })
    }
}

fn check_status(field: &'static str, status: &str) -> Result<(), AdminError> {
    if DELIVERY_STATUSES.contains(&status) {
        Ok(())
    } else {
        Err(AdminError::Invalid {
            field,
            problem: format!(
                "{status:?} is not a delivery status; use {}",
                DELIVERY_STATUSES.join(", ")
            ),
        })
    }
}

/// A parameter with the PostgreSQL type it is declared as. Every admin statement goes out
/// as one unnamed Parse/Bind/Execute with its parameter types declared (`query_typed`), never
/// as a named prepared statement: one round trip that leaves nothing on the server
/// connection, so the admin API and the CLI work through a transaction pooler (PgBouncer in
/// transaction mode) as well as directly. These statements are not hot; a parse each costs
/// nothing that matters.
type Param = (Box<dyn ToSql + Sync + Send>, Type);

fn as_params(params: &[Param]) -> Vec<(&(dyn ToSql + Sync), Type)> {
    params
        .iter()
        .map(|(value, sql_type)| (value.as_ref() as &(dyn ToSql + Sync), sql_type.clone()))
        .collect()
}

/// The PostgreSQL type a Rust value is sent as, so builders can declare each parameter.
trait SqlType {
    const SQL_TYPE: Type;
}

macro_rules! sql_types {
    ($($rust:ty => $sql:ident),* $(,)?) => {
        $(impl SqlType for $rust { const SQL_TYPE: Type = Type::$sql; })*
    };
}

sql_types! {
    bool => BOOL, i32 => INT4, i64 => INT8, f32 => FLOAT4, f64 => FLOAT8, String => TEXT,
    Uuid => UUID, DateTime<Utc> => TIMESTAMPTZ, serde_json::Value => JSONB,
    Vec<String> => TEXT_ARRAY, Vec<f64> => FLOAT8_ARRAY, Vec<Uuid> => UUID_ARRAY,
}

impl<T: SqlType> SqlType for Option<T> {
    const SQL_TYPE: Type = T::SQL_TYPE;
}

fn not_found(name: &str) -> AdminError {
    AdminError::NotFound {
        name: name.to_owned(),
    }
}

/// Where in a JSON value a string (or an object key) holds U+0000, as a path in the
/// request's own words (`name`, `headers.X-Team`, `event_types[1]`; `""` for the value
/// itself); `None` when nowhere.
///
/// PostgreSQL refuses NUL in `text` (`invalid byte sequence for encoding "UTF8": 0x00`)
/// and in `jsonb` strings (`unsupported Unicode escape sequence`), and its error does not
/// say which parameter held it. Callers refuse such input with this path before any
/// query runs, so the error names the field instead of being a failed query.
pub fn nul_path(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(text) => text.contains('\0').then(String::new),
        serde_json::Value::Array(items) => items.iter().enumerate().find_map(|(index, item)| {
            nul_path(item).map(|inner| join_path(&format!("[{index}]"), &inner))
        }),
        serde_json::Value::Object(map) => map.iter().find_map(|(key, item)| {
            if key.contains('\0') {
                // The key itself cannot be shown as a field name; its object is to blame.
                return Some(String::new());
            }
            nul_path(item).map(|inner| join_path(key, &inner))
        }),
        _ => None,
    }
}

/// `head` followed by the path `tail` below it.
fn join_path(head: &str, tail: &str) -> String {
    if tail.is_empty() {
        head.to_owned()
    } else if tail.starts_with('[') {
        format!("{head}{tail}")
    } else {
        format!("{head}.{tail}")
    }
}

/// What to tell a client whose text held U+0000.
pub const NUL_PROBLEM: &str =
    "contains a NUL character (\\u0000), which PostgreSQL cannot store in text or JSON; remove it";

/// Turns the database errors callers act on into their own variants. Data exceptions
/// (SQLSTATE class 22) and integrity violations (class 23) are caused by the values sent,
/// so they are [`AdminError::Invalid`] naming the constraint's or column's field, never a
/// failed query.
fn classify(error: tokio_postgres::Error, context: &'static str, name: &str) -> AdminError {
    if let Some(db) = error.as_db_error() {
        let code = db.code();
        if *code == SqlState::UNIQUE_VIOLATION && db.constraint() == Some("subscriptions_name_key")
        {
            return AdminError::Duplicate {
                name: name.to_owned(),
            };
        }
        if *code == SqlState::UNDEFINED_TABLE
            || *code == SqlState::UNDEFINED_COLUMN
            || *code == SqlState::UNDEFINED_FUNCTION
            || *code == SqlState::INVALID_SCHEMA_NAME
        {
            return AdminError::SchemaOutdated {
                context,
                detail: db.message().to_owned(),
            };
        }
        // What a function such as outbox.replay raises about its arguments.
        if *code == SqlState::RAISE_EXCEPTION
            || *code == SqlState::INVALID_PARAMETER_VALUE
            || *code == SqlState::INVALID_TEXT_REPRESENTATION
        {
            let mut problem = db.message().to_owned();
            if let Some(hint) = db.hint() {
                problem.push_str(". ");
                problem.push_str(hint);
            }
            return AdminError::Invalid {
                field: "arguments",
                problem,
            };
        }
        let class = code.code().get(..2);
        if class == Some("22") || class == Some("23") {
            let (field, rule) = db
                .constraint()
                .map(constraint_rule)
                .filter(|(field, _)| *field != "value")
                .unwrap_or_else(|| (db.column().map_or("value", column_field), None));
            let nul = *code == SqlState::CHARACTER_NOT_IN_REPERTOIRE
                || *code == SqlState::UNTRANSLATABLE_CHARACTER;
            let mut problem = match (rule, nul) {
                (Some(rule), _) => rule.to_owned(),
                (None, true) => format!("a value {NUL_PROBLEM}"),
                (None, false) => db.message().to_owned(),
            };
            match db.constraint() {
                Some(constraint) => problem.push_str(&format!(" (constraint {constraint})")),
                None => problem.push_str(&format!(" (SQLSTATE {})", code.code())),
            }
            if let Some(hint) = db.hint() {
                problem.push_str(". ");
                problem.push_str(hint);
            }
            return AdminError::Invalid { field, problem };
        }
    }
    AdminError::Db(DbError::Query {
        context,
        source: error,
    })
}

/// A column a data exception or NOT NULL violation names, as a field of this module
/// (`value` for one it does not know).
fn column_field(column: &str) -> &'static str {
    const FIELDS: [&str; 17] = [
        "name",
        "url",
        "secret",
        "event_types",
        "tenant_id",
        "filter",
        "headers",
        "timeout",
        "max_in_flight",
        "rate_limit_per_second",
        "retry_schedule",
        "event_type",
        "payload",
        "metadata",
        "ordering_key",
        "source_service",
        "target_services",
    ];
    FIELDS
        .iter()
        .find(|field| **field == column)
        .copied()
        .unwrap_or("value")
}

/// The field a subscriptions CHECK constraint guards, and its rule in words.
fn constraint_rule(constraint: &str) -> (&'static str, Option<&'static str>) {
    match constraint {
        "name_format" => (
            "name",
            Some("1 to 255 characters: letters, digits and . _ : -"),
        ),
        "url_scheme" => (
            "url",
            Some(
                "must be an http:// or https:// URL with a host, or a broker target: nats://host:port/subject, redis://host:port/db?stream=S[&maxlen=N], amqp://user:pass@host:port/vhost?exchange=E[&routing_key=K]; without spaces, at most 2048 characters",
            ),
        ),
        "event_types_format" => (
            "event_types",
            Some(
                "at least one pattern; each 1 to 255 characters: letters, digits, . _ : - and * as a wildcard",
            ),
        ),
        "filter_is_object" => (
            "filter",
            Some(r#"must be a JSON object, e.g. {"plan": "pro"}"#),
        ),
        "secret_format" | "previous_secret_format" => (
            "secret",
            Some("must be whsec_ followed by the base64 of at least 16 bytes"),
        ),
        "retry_schedule_sane" => (
            "retry_schedule",
            Some("at most 50 waits, each between 0s and 7 days"),
        ),
        "timeout_sane" => ("timeout", Some("must be between 100ms and 5m")),
        "max_in_flight_sane" => ("max_in_flight", Some("must be between 1 and 10000")),
        "rate_limit_sane" => (
            "rate_limit_per_second",
            Some("must be greater than 0 and at most 100000"),
        ),
        "headers_valid" => (
            "headers",
            Some(
                "names of at most 128 token characters with string values; content-type, content-length, host, user-agent, transfer-encoding, connection and the webhook-* headers are set by the relay and cannot be overridden",
            ),
        ),
        // outbox.events constraints (publish_event).
        "event_type_format" => (
            "event_type",
            Some("1 to 255 characters: letters, digits and . _ : -"),
        ),
        "payload_size" => (
            "payload",
            Some("larger than outbox.max_payload_bytes() (default 1 MiB of JSON text)"),
        ),
        "metadata_is_object" => ("metadata", Some("must be a JSON object")),
        "target_services_not_empty" => (
            "target_services",
            Some("must name at least one subscription, or be left out for all"),
        ),
        "ordering_key_length" => ("ordering_key", Some("must be 1 to 255 characters")),
        _ => ("value", None),
    }
}

fn seconds<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(value.as_secs_f64())
}

fn seconds_list<S: Serializer>(values: &[Duration], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(values.iter().map(Duration::as_secs_f64))
}

fn rfc3339<S: Serializer>(value: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&value.to_rfc3339_opts(SecondsFormat::Micros, true))
}

fn rfc3339_option<S: Serializer>(
    value: &Option<DateTime<Utc>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(value) => rfc3339(value, serializer),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_before_the_database_sees_them() {
        for bad in [
            "not a url",
            "agents.internal/hooks",
            "ftp://agents.internal/x",
            "mailto:ops@example.com",
        ] {
            match check_url(bad) {
                Err(AdminError::Invalid { field: "url", .. }) => {}
                other => panic!("{bad:?} was not refused as a url: {other:?}"),
            }
        }
        for good in [
            "http://127.0.0.1:8080/hook",
            "https://agents.internal/x?y=1",
        ] {
            assert!(check_url(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn url_errors_show_the_url_masked_and_a_masked_url_is_refused() {
        match check_url("ftp://hook:pw-in-url@agents.internal/x") {
            Err(error @ AdminError::Invalid { field: "url", .. }) => {
                let message = error.to_string();
                assert!(!message.contains("pw-in-url"), "{message}");
                assert!(message.contains("hook:***@"), "{message}");
            }
            other => panic!("not refused as a url: {other:?}"),
        }
        assert!(check_url("https://hook:***@agents.internal/x").is_err());
        assert!(check_url("https://hook:pw@agents.internal/x").is_ok());
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let created = CreatedSubscription {
            id: 1,
            name: "crm".to_owned(),
            secret: SecretText::new(generate_secret()),
        };
        let debug = format!("{created:?}");
        assert!(!debug.contains(created.secret.expose()), "{debug}");
        assert!(debug.contains("redacted"));
    }

    #[test]
    fn nul_is_found_wherever_it_is_nested() {
        use serde_json::json;
        for (value, path) in [
            (json!("a\u{0}b"), Some("")),
            (json!({ "name": "crm\u{0}" }), Some("name")),
            (
                json!({ "headers": { "X-Team": "a\u{0}" } }),
                Some("headers.X-Team"),
            ),
            (
                json!({ "event_types": ["lead.*", "\u{0}"] }),
                Some("event_types[1]"),
            ),
            (
                json!({ "data": { "a": [{ "b": "\u{0}" }] } }),
                Some("data.a[0].b"),
            ),
            (json!({ "headers": { "X-\u{0}": "a" } }), Some("headers")),
            (json!({ "name": "crm", "n": 1, "list": [null, true] }), None),
            (json!("\\u0000 spelled out"), None),
        ] {
            assert_eq!(nul_path(&value).as_deref(), path, "{value}");
        }
    }

    #[test]
    fn every_subscription_constraint_names_its_field() {
        for (constraint, field) in [
            ("url_scheme", "url"),
            ("timeout_sane", "timeout"),
            ("rate_limit_sane", "rate_limit_per_second"),
            ("previous_secret_format", "secret"),
        ] {
            let (named, rule) = constraint_rule(constraint);
            assert_eq!(named, field);
            assert!(rule.is_some());
        }
    }
}
