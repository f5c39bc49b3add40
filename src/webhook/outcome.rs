//! Pure: what one HTTP result means for its delivery. The status-code → state table lives
//! here and nowhere else, so it is tested without a socket.
//!
//! - 2xx: delivered.
//! - 3xx (never followed), 4xx, 5xx, timeouts, connection errors, refused targets: failed;
//!   retried after the subscription's next `retry_schedule` wait (±20 % jitter), or dead once
//!   the attempts (1 + schedule length) are used up.
//! - 429 and 503 with `Retry-After`: that wait instead of the schedule's, clamped to
//!   [`RETRY_AFTER_MIN`, `RETRY_AFTER_MAX`].
//! - 410: failed as above, and the subscription is disabled (the subscriber said it is gone).
//! - Broker targets (`crate::broker`): a confirmed publish is delivered, with no status code
//!   and the broker's receipt in place of a response body; a refusal (no stream, nack,
//!   unroutable) is failed as above.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::client::{FailureKind, HttpResult};

/// A subscriber asking for less than this gets this: protects against `Retry-After: 0` loops.
pub const RETRY_AFTER_MIN: Duration = Duration::from_secs(1);
/// A subscriber cannot park its deliveries longer than this with one header.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(6 * 3600);
/// Each scheduled wait is stretched or shrunk by up to this fraction, so retries of a burst
/// that failed together do not arrive together.
pub const JITTER_FRACTION: f64 = 0.2;

/// The delivery's next state.
#[derive(Clone, Debug, PartialEq)]
pub enum NextState {
    Delivered,
    Retry { at: DateTime<Utc> },
    Dead,
}

impl NextState {
    /// The `deliveries.status` string.
    pub fn status(&self) -> &'static str {
        match self {
            NextState::Delivered => "delivered",
            NextState::Retry { .. } => "failing",
            NextState::Dead => "dead",
        }
    }
}

/// What to record for one attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub next: NextState,
    pub status_code: Option<u16>,
    /// Human-readable reason for a failure; None on success.
    pub error: Option<String>,
    pub response_body: Option<String>,
    /// Set when the subscriber answered 410: why the subscription is being disabled.
    pub disable_subscription: Option<String>,
}

impl Verdict {
    pub fn failed(&self) -> bool {
        self.next != NextState::Delivered
    }
}

/// Judges one attempt. `attempts_before` is how many attempts this delivery had already
/// made (since creation or its last replay); `jitter` is a number in [-1, 1] (random in
/// production, fixed in tests) scaled by [`JITTER_FRACTION`].
pub fn judge(
    result: HttpResult,
    attempts_before: u32,
    retry_schedule: &[Duration],
    now: DateTime<Utc>,
    jitter: f64,
) -> Verdict {
    let (status_code, error, response_body, retry_after) = match result {
        HttpResult::Responded {
            status,
            body_prefix,
            retry_after,
        } => {
            if (200..300).contains(&status) {
                return Verdict {
                    next: NextState::Delivered,
                    status_code: Some(status),
                    error: None,
                    response_body: Some(body_prefix),
                    disable_subscription: None,
                };
            }
            let honoured = matches!(status, 429 | 503).then_some(retry_after).flatten();
            (
                Some(status),
                Some(describe_status(status)),
                Some(body_prefix),
                honoured,
            )
        }
        // A broker has no status code; its receipt stands where a webhook's answer would.
        HttpResult::Published { receipt } => {
            return Verdict {
                next: NextState::Delivered,
                status_code: None,
                error: None,
                response_body: Some(receipt),
                disable_subscription: None,
            };
        }
        HttpResult::Failed { kind, error } => {
            let prefix = match kind {
                FailureKind::Timeout => "timeout",
                FailureKind::Connect => "connection failed",
                FailureKind::ForbiddenTarget => "target refused",
                FailureKind::InvalidRequest => "invalid request",
                FailureKind::Rejected => "rejected",
                FailureKind::Other => "request failed",
            };
            (None, Some(format!("{prefix}: {error}")), None, None)
        }
    };

    let attempt_number = attempts_before.saturating_add(1);
    let allowed_attempts = u32::try_from(retry_schedule.len())
        .unwrap_or(u32::MAX)
        .saturating_add(1);
    let next = if attempt_number >= allowed_attempts {
        NextState::Dead
    } else {
        let wait = match retry_after {
            Some(wait) => wait.clamp(RETRY_AFTER_MIN, RETRY_AFTER_MAX),
            None => {
                // attempt_number >= 1 and < allowed_attempts, so the index is in range.
                let scheduled = retry_schedule[(attempt_number - 1) as usize];
                scheduled.mul_f64(1.0 + JITTER_FRACTION * jitter.clamp(-1.0, 1.0))
            }
        };
        let wait = chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX);
        NextState::Retry {
            at: now
                .checked_add_signed(wait)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        }
    };
    let disable_subscription = (status_code == Some(410))
        .then(|| format!("subscriber answered HTTP 410 Gone at {}", now.to_rfc3339()));
    Verdict {
        next,
        status_code,
        error,
        response_body,
        disable_subscription,
    }
}

fn describe_status(status: u16) -> String {
    let reason = http_reason(status);
    if (300..400).contains(&status) {
        format!(
            "HTTP {status} {reason}: redirects are not followed; point the subscription at the final URL"
        )
    } else {
        format!("HTTP {status} {reason}")
    }
}

fn http_reason(status: u16) -> &'static str {
    reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn responded(status: u16, retry_after: Option<Duration>) -> HttpResult {
        HttpResult::Responded {
            status,
            body_prefix: "body".into(),
            retry_after,
        }
    }

    fn schedule() -> Vec<Duration> {
        vec![Duration::from_secs(10), Duration::from_secs(100)]
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .expect("literal timestamp")
            .with_timezone(&Utc)
    }

    #[test]
    fn a_broker_confirm_is_delivered_and_a_broker_refusal_is_retried() {
        let verdict = judge(
            HttpResult::Published {
                receipt: "nats: stream S seq 1".into(),
            },
            0,
            &schedule(),
            now(),
            0.0,
        );
        assert_eq!(verdict.next, NextState::Delivered);
        assert_eq!(verdict.status_code, None);
        assert_eq!(
            verdict.response_body.as_deref(),
            Some("nats: stream S seq 1")
        );
        let refused = judge(
            HttpResult::Failed {
                kind: FailureKind::Rejected,
                error: "nats: no stream for subject a.b".into(),
            },
            0,
            &schedule(),
            now(),
            0.0,
        );
        assert!(matches!(refused.next, NextState::Retry { .. }));
        assert_eq!(
            refused.error.as_deref(),
            Some("rejected: nats: no stream for subject a.b")
        );
    }

    #[test]
    fn any_2xx_is_delivered() {
        for status in [200, 201, 204, 299] {
            let verdict = judge(responded(status, None), 0, &schedule(), now(), 0.0);
            assert_eq!(verdict.next, NextState::Delivered, "status {status}");
            assert!(!verdict.failed());
        }
    }

    #[test]
    fn failures_follow_the_schedule_then_die() {
        let first = judge(responded(500, None), 0, &schedule(), now(), 0.0);
        assert_eq!(
            first.next,
            NextState::Retry {
                at: now() + chrono::Duration::seconds(10)
            }
        );
        let second = judge(responded(500, None), 1, &schedule(), now(), 0.0);
        assert_eq!(
            second.next,
            NextState::Retry {
                at: now() + chrono::Duration::seconds(100)
            }
        );
        let third = judge(responded(500, None), 2, &schedule(), now(), 0.0);
        assert_eq!(third.next, NextState::Dead);
        assert_eq!(
            third.error.as_deref(),
            Some("HTTP 500 Internal Server Error")
        );
    }

    #[test]
    fn empty_schedule_means_one_attempt() {
        assert_eq!(
            judge(responded(500, None), 0, &[], now(), 0.0).next,
            NextState::Dead
        );
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let low = judge(responded(500, None), 0, &schedule(), now(), -1.0);
        let high = judge(responded(500, None), 0, &schedule(), now(), 1.0);
        assert_eq!(
            low.next,
            NextState::Retry {
                at: now() + chrono::Duration::seconds(8)
            }
        );
        assert_eq!(
            high.next,
            NextState::Retry {
                at: now() + chrono::Duration::seconds(12)
            }
        );
        let wild = judge(responded(500, None), 0, &schedule(), now(), 7.0);
        assert_eq!(wild.next, high.next, "jitter input is clamped");
    }

    #[test]
    fn redirects_are_failures_with_advice() {
        let verdict = judge(responded(302, None), 0, &schedule(), now(), 0.0);
        assert!(verdict.failed());
        let error = verdict.error.unwrap_or_default();
        assert!(error.contains("redirects are not followed"), "{error}");
    }

    #[test]
    fn retry_after_is_honoured_for_429_and_503_only_and_clamped() {
        let wait = Some(Duration::from_secs(42));
        for status in [429, 503] {
            let verdict = judge(responded(status, wait), 0, &schedule(), now(), 0.9);
            assert_eq!(
                verdict.next,
                NextState::Retry {
                    at: now() + chrono::Duration::seconds(42)
                }
            );
        }
        let ignored = judge(responded(500, wait), 0, &schedule(), now(), 0.0);
        assert_eq!(
            ignored.next,
            NextState::Retry {
                at: now() + chrono::Duration::seconds(10)
            }
        );
        let tiny = judge(
            responded(429, Some(Duration::ZERO)),
            0,
            &schedule(),
            now(),
            0.0,
        );
        assert_eq!(
            tiny.next,
            NextState::Retry {
                at: now() + chrono::Duration::seconds(1)
            }
        );
        let huge = judge(
            responded(429, Some(Duration::from_secs(1 << 30))),
            0,
            &schedule(),
            now(),
            0.0,
        );
        assert_eq!(
            huge.next,
            NextState::Retry {
                at: now() + chrono::Duration::hours(6)
            }
        );
    }

    #[test]
    fn retry_after_does_not_extend_the_attempt_budget() {
        let verdict = judge(
            responded(429, Some(Duration::from_secs(5))),
            2,
            &schedule(),
            now(),
            0.0,
        );
        assert_eq!(verdict.next, NextState::Dead);
    }

    #[test]
    fn gone_disables_the_subscription() {
        let verdict = judge(responded(410, None), 0, &schedule(), now(), 0.0);
        assert!(verdict.failed());
        assert!(verdict.disable_subscription.is_some());
        assert!(
            judge(responded(404, None), 0, &schedule(), now(), 0.0)
                .disable_subscription
                .is_none()
        );
    }

    #[test]
    fn transport_failures_are_described() {
        let verdict = judge(
            HttpResult::Failed {
                kind: FailureKind::Timeout,
                error: "after 1s".into(),
            },
            0,
            &schedule(),
            now(),
            0.0,
        );
        assert_eq!(verdict.status_code, None);
        assert_eq!(verdict.error.as_deref(), Some("timeout: after 1s"));
        assert!(matches!(verdict.next, NextState::Retry { .. }));
    }
}
