//! The Standard Webhooks signature: signing-secret parsing, signing (with key rotation) and
//! verification for receivers. Pure: it never does I/O and never reads the clock (callers
//! pass the time in).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use sha2::Sha256;

use super::WebhookError;

/// Header carrying the message id that is part of the signed content.
pub const HEADER_ID: &str = "webhook-id";
/// Header carrying the Unix timestamp (seconds) that is part of the signed content.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// Header carrying the space-separated `v1,<base64>` signatures.
pub const HEADER_SIGNATURE: &str = "webhook-signature";

const SECRET_PREFIX: &str = "whsec_";
const SIGNATURE_VERSION: &str = "v1";

type HmacSha256 = Hmac<Sha256>;

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

    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TIMESTAMP: i64 = 1_614_265_330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn secret(s: &str) -> SigningSecret {
        SigningSecret::parse(s).expect("test secret is valid")
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
