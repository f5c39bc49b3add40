//! The bytes of a webhook: the JSON body of one event and its Standard Webhooks signature.
//!
//! Owns the body layout, signing-secret parsing, signing (with key rotation) and verification for
//! receivers. Everything here is pure: it never does I/O, never reads the clock (callers pass the
//! time in) and never decides whether or when a delivery happens.

use std::fmt;
use std::num::ParseIntError;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use serde::Serialize;
use serde_json::value::RawValue;
use sha2::Sha256;
use uuid::Uuid;

/// Header carrying the message id that is part of the signed content.
pub const HEADER_ID: &str = "webhook-id";
/// Header carrying the Unix timestamp (seconds) that is part of the signed content.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// Header carrying the space-separated `v1,<base64>` signatures.
pub const HEADER_SIGNATURE: &str = "webhook-signature";

const SECRET_PREFIX: &str = "whsec_";
const SIGNATURE_VERSION: &str = "v1";

type HmacSha256 = Hmac<Sha256>;

/// Why a body could not be built, a secret was refused, or a signature did not verify.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("event {field} is not a single valid JSON value")]
    InvalidJson {
        field: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("serializing the webhook body")]
    Serialize(#[source] serde_json::Error),
    #[error("signing secret must start with \"whsec_\"")]
    SecretMissingPrefix,
    #[error("signing secret is not valid base64 after \"whsec_\"")]
    SecretBadBase64(#[source] base64::DecodeError),
    #[error("signing secret has an empty key")]
    SecretEmptyKey,
    #[error("webhook timestamp {value:?} is not an integer number of seconds")]
    BadTimestamp {
        value: String,
        #[source]
        source: ParseIntError,
    },
    #[error(
        "webhook timestamp {timestamp} is more than {tolerance_secs}s away from now ({now_unix})"
    )]
    TimestampOutOfTolerance {
        timestamp: i64,
        now_unix: i64,
        tolerance_secs: i64,
    },
    #[error("no v1 signature in the header matches the body under this secret")]
    NoMatchingSignature,
}

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

/// A Standard Webhooks signing secret, `whsec_` followed by the base64 of the HMAC key. The key
/// is a `secrecy` secret: zeroed when dropped, and shown by `Debug` only as its length.
#[derive(Clone)]
pub struct SigningSecret {
    key: SecretSlice<u8>,
}

impl SigningSecret {
    /// Accepts only the `whsec_` form so a secret pasted from elsewhere (a bare token, a URL-safe
    /// base64 string) is refused loudly instead of silently signing with a different key.
    pub fn parse(secret: &str) -> Result<Self, WebhookError> {
        let encoded = secret
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .ok_or(WebhookError::SecretMissingPrefix)?;
        let key = BASE64
            .decode(encoded)
            .map_err(WebhookError::SecretBadBase64)?;
        if key.is_empty() {
            return Err(WebhookError::SecretEmptyKey);
        }
        Ok(Self {
            key: SecretSlice::from(key),
        })
    }

    fn mac_over(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(self.key.expose_secret())
            .expect("HMAC takes keys of any length (long ones are hashed first)");
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }
}

impl fmt::Debug for SigningSecret {
    // The key is the whole secret; logs and panics must never carry it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningSecret")
            .field(
                "key",
                &format_args!("<redacted {} bytes>", self.key.expose_secret().len()),
            )
            .finish()
    }
}

/// The `webhook-signature` value: `v1,<base64(HMAC-SHA256(key, "{msg_id}.{timestamp}.{body}"))>`
/// for each secret, separated by one space, so receivers holding either the old or the new
/// secret accept the message while a key is being rotated.
pub fn sign(secrets: &[SigningSecret], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|secret| {
            let tag = secret.mac_over(msg_id, timestamp, body).finalize();
            format!("{SIGNATURE_VERSION},{}", BASE64.encode(tag.into_bytes()))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// For receivers (the demo, tests): accepts when the timestamp is within `tolerance_secs` of
/// `now_unix` and any `v1` entry of `signature_header` matches under `secret`.
///
/// Entries of other versions or with undecodable base64 are skipped rather than fatal, because
/// a sender may list signatures this receiver does not understand next to one it does.
pub fn verify(
    secret: &SigningSecret,
    msg_id: &str,
    timestamp_header: &str,
    body: &[u8],
    signature_header: &str,
    now_unix: i64,
    tolerance_secs: i64,
) -> Result<(), WebhookError> {
    let timestamp: i64 =
        timestamp_header
            .trim()
            .parse()
            .map_err(|source| WebhookError::BadTimestamp {
                value: timestamp_header.to_owned(),
                source,
            })?;
    // Replay protection comes first so a stale message is refused whatever its signature.
    let skew = now_unix.abs_diff(timestamp);
    if skew > tolerance_secs.max(0).unsigned_abs() {
        return Err(WebhookError::TimestampOutOfTolerance {
            timestamp,
            now_unix,
            tolerance_secs,
        });
    }
    let mac = secret.mac_over(msg_id, timestamp, body);
    let matched = signature_header
        .split_whitespace()
        .filter_map(|entry| entry.split_once(','))
        .filter(|(version, _)| *version == SIGNATURE_VERSION)
        .filter_map(|(_, encoded)| BASE64.decode(encoded).ok())
        // verify_slice compares in constant time, so a mismatch leaks nothing about the tag.
        .any(|tag| mac.clone().verify_slice(&tag).is_ok());
    if matched {
        Ok(())
    } else {
        Err(WebhookError::NoMatchingSignature)
    }
}

/// A fresh secret: `whsec_` + base64 of 32 bytes from the thread-local CSPRNG (OS-seeded).
pub fn generate_secret() -> String {
    let mut key = [0u8; 32];
    rand::fill(&mut key[..]);
    format!("{SECRET_PREFIX}{}", BASE64.encode(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TIMESTAMP: i64 = 1_614_265_330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn secret(s: &str) -> SigningSecret {
        SigningSecret::parse(s).expect("test secret is valid")
    }

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
    fn standard_webhooks_known_answer() {
        let s = secret(SPEC_SECRET);
        assert_eq!(
            sign(
                std::slice::from_ref(&s),
                SPEC_MSG_ID,
                SPEC_TIMESTAMP,
                SPEC_BODY
            ),
            SPEC_SIGNATURE
        );
        verify(
            &s,
            SPEC_MSG_ID,
            "1614265330",
            SPEC_BODY,
            SPEC_SIGNATURE,
            SPEC_TIMESTAMP + 10,
            300,
        )
        .expect("spec example verifies");
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

    #[test]
    fn rotation_signs_with_every_secret() {
        let old = secret(SPEC_SECRET);
        let new = secret(&generate_secret());
        let header = sign(&[old.clone(), new.clone()], "msg_1", 1_700_000_000, b"{}");
        let entries: Vec<&str> = header.split(' ').collect();
        assert_eq!(entries.len(), 2);
        assert!(entries.iter().all(|e| e.starts_with("v1,")));
        for (s, entry) in [(&old, entries[0]), (&new, entries[1])] {
            verify(s, "msg_1", "1700000000", b"{}", entry, 1_700_000_000, 60)
                .expect("each entry verifies alone");
            verify(s, "msg_1", "1700000000", b"{}", &header, 1_700_000_000, 60)
                .expect("full header verifies");
        }
    }

    #[test]
    fn verify_rejects_tampering_wrong_secret_and_stale_timestamps() {
        let s = secret(SPEC_SECRET);
        let ts = "1614265330";
        let check = |secret: &SigningSecret, body: &[u8], msg: &str, now: i64| {
            verify(secret, msg, ts, body, SPEC_SIGNATURE, now, 300)
        };
        assert!(matches!(
            check(&s, br#"{"test": 2432232315}"#, SPEC_MSG_ID, SPEC_TIMESTAMP),
            Err(WebhookError::NoMatchingSignature)
        ));
        assert!(matches!(
            check(&s, SPEC_BODY, "msg_other", SPEC_TIMESTAMP),
            Err(WebhookError::NoMatchingSignature)
        ));
        let other = secret(&generate_secret());
        assert!(matches!(
            check(&other, SPEC_BODY, SPEC_MSG_ID, SPEC_TIMESTAMP),
            Err(WebhookError::NoMatchingSignature)
        ));
        for now in [SPEC_TIMESTAMP + 301, SPEC_TIMESTAMP - 301] {
            assert!(matches!(
                check(&s, SPEC_BODY, SPEC_MSG_ID, now),
                Err(WebhookError::TimestampOutOfTolerance { .. })
            ));
        }
        check(&s, SPEC_BODY, SPEC_MSG_ID, SPEC_TIMESTAMP + 300).expect("edge of tolerance");
        assert!(matches!(
            verify(&s, SPEC_MSG_ID, "soon", SPEC_BODY, SPEC_SIGNATURE, 0, 300),
            Err(WebhookError::BadTimestamp { .. })
        ));
    }

    #[test]
    fn verify_skips_unknown_versions_and_garbage_entries() {
        let s = secret(SPEC_SECRET);
        let header = format!("v2,abc v1,!!notbase64 nocomma {SPEC_SIGNATURE}");
        verify(
            &s,
            SPEC_MSG_ID,
            "1614265330",
            SPEC_BODY,
            &header,
            SPEC_TIMESTAMP,
            0,
        )
        .expect("the valid v1 entry is found");
        let v2_only = SPEC_SIGNATURE.replacen("v1,", "v2,", 1);
        assert!(
            verify(
                &s,
                SPEC_MSG_ID,
                "1614265330",
                SPEC_BODY,
                &v2_only,
                SPEC_TIMESTAMP,
                0
            )
            .is_err()
        );
    }

    #[test]
    fn debug_hides_the_key() {
        let s = secret(SPEC_SECRET);
        let shown = format!("{s:?}");
        assert!(!shown.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"));
        let key = BASE64
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .expect("valid base64");
        assert!(!shown.contains(&format!("{key:?}")));
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn bad_secrets_are_refused() {
        assert!(matches!(
            SigningSecret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Err(WebhookError::SecretMissingPrefix)
        ));
        assert!(matches!(
            SigningSecret::parse("whsec_not base64!"),
            Err(WebhookError::SecretBadBase64(_))
        ));
        assert!(matches!(
            SigningSecret::parse("whsec_"),
            Err(WebhookError::SecretEmptyKey)
        ));
    }

    #[test]
    fn generated_secrets_parse_and_differ() {
        let a = generate_secret();
        let b = generate_secret();
        assert_ne!(a, b);
        let parsed = SigningSecret::parse(&a).expect("generated secret parses");
        assert_eq!(parsed.key.expose_secret().len(), 32);
    }
}
