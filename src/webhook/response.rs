//! What the relay keeps of a subscriber's answer: the body as storable text, cut on a
//! character boundary, and the wait a `Retry-After` header asks for. Pure: no I/O, the clock
//! is passed in.

use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};

/// At most this many bytes of a response body are read and kept.
pub const RESPONSE_BODY_LIMIT: usize = 4096;

/// UTF-8 text of `bytes`, invalid sequences and NULs replaced, never longer than [`RESPONSE_BODY_LIMIT`]
/// bytes. When the body was `truncated`, a character cut in half by the limit is dropped rather
/// than shown as a replacement character.
pub fn lossy_prefix(bytes: &[u8], truncated: bool) -> String {
    let bytes = if truncated {
        &bytes[..complete_utf8_len(bytes)]
    } else {
        bytes
    };
    // NUL is valid UTF-8 but not storable text; it becomes a replacement character as well.
    let mut text = crate::db::text::storable(&String::from_utf8_lossy(bytes)).into_owned();
    // Replacement characters are 3 bytes and may stand for 1 invalid byte, so the text can grow.
    if text.len() > RESPONSE_BODY_LIMIT {
        let mut cut = RESPONSE_BODY_LIMIT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// Length of `bytes` without a trailing, incomplete UTF-8 sequence.
fn complete_utf8_len(bytes: &[u8]) -> usize {
    // A sequence is at most 4 bytes, so its lead byte is within the last 4.
    for back in 1..=bytes.len().min(4) {
        let index = bytes.len() - back;
        let byte = bytes[index];
        if byte & 0b1100_0000 == 0b1000_0000 {
            continue; // continuation byte: keep looking for the lead
        }
        let needed = match byte {
            0x00..=0x7f => 1,
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => return bytes.len(), // invalid lead: leave it to the lossy conversion
        };
        return if back < needed { index } else { bytes.len() };
    }
    bytes.len()
}

/// Parses a `Retry-After` value: delta-seconds, or an HTTP-date (IMF-fixdate, RFC 850 or asctime)
/// measured from `now`; a date already past gives zero.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse::<u64>().ok().map(Duration::from_secs);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::from(now))
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn retry_after_forms() {
        let now = Utc
            .with_ymd_and_hms(2015, 10, 21, 7, 27, 0)
            .single()
            .expect("valid date");
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Wednesday, 21-Oct-15 07:28:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_retry_after("Wed Oct 21 07:29:00 2015", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("1.5", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }

    #[test]
    fn prefix_cuts_on_char_boundary() {
        let mut body = b"x".to_vec();
        for _ in 0..3000 {
            body.extend_from_slice("é".as_bytes());
        }
        let limited = &body[..RESPONSE_BODY_LIMIT];
        let text = lossy_prefix(limited, true);
        assert_eq!(text.len(), RESPONSE_BODY_LIMIT - 1);
        assert!(!text.contains('\u{FFFD}'));

        let invalid = vec![0xffu8; RESPONSE_BODY_LIMIT];
        let text = lossy_prefix(&invalid, true);
        assert!(text.len() <= RESPONSE_BODY_LIMIT);
        assert!(text.chars().all(|c| c == '\u{FFFD}'));

        assert_eq!(lossy_prefix("abc€".as_bytes(), false), "abc€");
        assert_eq!(lossy_prefix(&"abc€".as_bytes()[..5], true), "abc");
        assert_eq!(
            lossy_prefix(b"upstream\0failed", false),
            "upstream\u{FFFD}failed"
        );
    }
}
