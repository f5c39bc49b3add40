//! The JSON body of one event, byte for byte what every attempt and replay sends. Pure: no
//! I/O, no clock.

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::WebhookError;

/// What the relay sends for one event; built once so every attempt and replay sends the same bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventForDelivery {
    pub event_id: Uuid,
    pub event_type: String,
    pub tenant_id: Option<String>,
    pub source_service: Option<String>,
    pub created_at: DateTime<Utc>,
    /// jsonb text as PostgreSQL prints it (`payload::text`); spliced in verbatim (serde_json
    /// `RawValue`) so numbers keep full precision and the bytes are the same on every attempt.
    pub payload_json: String,
    pub metadata_json: String,
    pub ordering_key: Option<String>,
}

// Field order here is the wire key order; serde_json keeps declaration order.
#[derive(Serialize)]
struct Body<'a> {
    event_id: &'a Uuid,
    event_type: &'a str,
    tenant_id: Option<&'a str>,
    source_service: Option<&'a str>,
    timestamp: String,
    data: &'a RawValue,
    metadata: &'a RawValue,
    ordering_key: Option<&'a str>,
}

/// Builds the compact body
/// `{"event_id","event_type","tenant_id","source_service","timestamp","data","metadata","ordering_key"}`
/// in exactly that key order; `timestamp` is `created_at` in RFC 3339, UTC, microseconds, `Z`.
///
/// `data` and `metadata` are the given JSON texts without re-encoding (surrounding whitespace
/// trimmed), so a number such as `12345678901234567890123` is never rounded through `f64`.
pub fn build_body(event: &EventForDelivery) -> Result<Bytes, WebhookError> {
    let data = raw_json("payload", &event.payload_json)?;
    let metadata = raw_json("metadata", &event.metadata_json)?;
    let body = Body {
        event_id: &event.event_id,
        event_type: &event.event_type,
        tenant_id: event.tenant_id.as_deref(),
        source_service: event.source_service.as_deref(),
        timestamp: event
            .created_at
            .to_rfc3339_opts(SecondsFormat::Micros, true),
        data,
        metadata,
        ordering_key: event.ordering_key.as_deref(),
    };
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .map_err(WebhookError::Serialize)
}

fn raw_json<'a>(field: &'static str, text: &'a str) -> Result<&'a RawValue, WebhookError> {
    serde_json::from_str(text).map_err(|source| WebhookError::InvalidJson { field, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn event() -> EventForDelivery {
        EventForDelivery {
            event_id: Uuid::parse_str("0191e0b4-7c1a-7d3e-9f00-123456789abc").expect("valid uuid"),
            event_type: "order.created".to_owned(),
            tenant_id: Some("acme".to_owned()),
            source_service: None,
            created_at: Utc
                .with_ymd_and_hms(2024, 3, 5, 7, 8, 9)
                .single()
                .expect("valid date")
                + chrono::Duration::microseconds(123_456),
            payload_json: r#"{"amount": 12345678901234567890123, "rate": 0.1, "note": "é\"x"}"#
                .to_owned(),
            metadata_json: "{}".to_owned(),
            ordering_key: Some("order-42".to_owned()),
        }
    }

    #[test]
    fn body_is_byte_exact_and_keeps_number_text() {
        let body = build_body(&event()).expect("body builds");
        let expected = concat!(
            r#"{"event_id":"0191e0b4-7c1a-7d3e-9f00-123456789abc","event_type":"order.created","#,
            r#""tenant_id":"acme","source_service":null,"timestamp":"2024-03-05T07:08:09.123456Z","#,
            r#""data":{"amount": 12345678901234567890123, "rate": 0.1, "note": "é\"x"},"#,
            r#""metadata":{},"ordering_key":"order-42"}"#
        );
        assert_eq!(std::str::from_utf8(&body).expect("utf-8"), expected);
        assert_eq!(build_body(&event()).expect("body builds"), body);
    }

    #[test]
    fn body_timestamp_keeps_trailing_zero_micros_and_trims_surrounding_whitespace() {
        let mut e = event();
        e.created_at = Utc
            .with_ymd_and_hms(2024, 1, 1, 0, 0, 0)
            .single()
            .expect("valid date");
        e.payload_json = " [1, 2]\n".to_owned();
        e.ordering_key = None;
        e.tenant_id = None;
        let body = build_body(&e).expect("body builds");
        let text = std::str::from_utf8(&body).expect("utf-8");
        assert!(text.contains(r#""timestamp":"2024-01-01T00:00:00.000000Z""#));
        assert!(text.contains(r#""data":[1, 2],"#));
        assert!(text.contains(r#""tenant_id":null"#));
        assert!(text.ends_with(r#""ordering_key":null}"#));
    }

    #[test]
    fn body_refuses_invalid_json() {
        let mut e = event();
        e.payload_json = "{not json".to_owned();
        assert!(matches!(
            build_body(&e),
            Err(WebhookError::InvalidJson {
                field: "payload",
                ..
            })
        ));
        let mut e = event();
        e.metadata_json = "1 2".to_owned();
        assert!(matches!(
            build_body(&e),
            Err(WebhookError::InvalidJson {
                field: "metadata",
                ..
            })
        ));
    }
}
