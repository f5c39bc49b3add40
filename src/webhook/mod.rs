//! What a webhook is, apart from when and whether one is sent: its body and signature, the
//! HTTP transport with its address policy, what an answer means for the delivery, and the
//! trace context it carries. Nothing here reads the database or the relay's state; the
//! relay's deliverer puts these pieces together.

use std::num::ParseIntError;

pub mod body;
pub mod client;
pub mod outcome;
pub mod response;
pub mod signature;
pub mod target_policy;
pub mod trace_context;

pub use body::{EventForDelivery, build_body};
pub use signature::{
    HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, SigningSecret, generate_secret, sign, verify,
};

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
