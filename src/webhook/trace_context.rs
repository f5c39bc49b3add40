//! W3C Trace Context pass-through: the `traceparent` (and `tracestate`) a producer put in an
//! event's `metadata` become request headers, so its trace continues at the subscriber.
//!
//! Pure, like `webhook`: no I/O, no logging. Only the two keys are decoded; a missing, invalid or
//! non-string value is simply not sent, so trace context can never fail a delivery. The body is
//! not touched: metadata stays in it as it was stored.

use serde::Deserialize;
use serde_json::value::RawValue;

pub const HEADER_TRACEPARENT: &str = "traceparent";
pub const HEADER_TRACESTATE: &str = "tracestate";

/// Version `00` is exactly this long; later versions at least this long.
const TRACEPARENT_V00_LEN: usize = 55;
/// Cap for a later version's traceparent (fields we cannot interpret yet) and for tracestate.
const MAX_LEN: usize = 512;

/// A valid `traceparent`, with the `tracestate` to send next to it (if any was valid).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub traceparent: String,
    pub tracestate: Option<String>,
}

/// The only keys read from metadata. Each is a raw JSON value so a bad `tracestate` (a number, an
/// object) drops only itself instead of failing the whole decode and taking traceparent with it.
#[derive(Deserialize)]
struct TraceFields<'a> {
    #[serde(default, borrow)]
    traceparent: Option<&'a RawValue>,
    #[serde(default, borrow)]
    tracestate: Option<&'a RawValue>,
}

impl TraceContext {
    /// The trace context to send for an event whose metadata is `metadata_json` (a JSON object
    /// as text), or `None` when it has no valid `traceparent`. One pass over the text; other
    /// keys are skipped without being decoded.
    pub fn from_metadata(metadata_json: &str) -> Option<TraceContext> {
        // A derived struct also accepts a JSON array (fields by position): metadata is an
        // object by table constraint, and anything else has no trace context.
        if !metadata_json.trim_start().starts_with('{') {
            return None;
        }
        // Most events carry no trace context: skip the JSON parse for them. The text is
        // PostgreSQL's rendering of a jsonb value, which never escapes a plain ASCII key.
        if !metadata_json.contains("\"traceparent\"") {
            return None;
        }
        let fields: TraceFields<'_> = serde_json::from_str(metadata_json).ok()?;
        let traceparent = json_string(fields.traceparent?).filter(|v| is_valid_traceparent(v))?;
        let tracestate = fields
            .tracestate
            .and_then(json_string)
            .filter(|v| is_valid_tracestate(v));
        Some(TraceContext {
            traceparent,
            tracestate,
        })
    }

    /// Puts this context into a request's headers. Any `traceparent` or `tracestate` already
    /// there (a subscription's static headers, names compared case-insensitively) is removed
    /// first: the event's context wins, and the two go together, so a static `tracestate` is
    /// never sent next to a traceparent it does not belong to.
    pub fn apply_to(self, headers: &mut Vec<(String, String)>) {
        headers.retain(|(name, _)| !is_trace_header(name));
        headers.push((HEADER_TRACEPARENT.to_owned(), self.traceparent));
        if let Some(tracestate) = self.tracestate {
            headers.push((HEADER_TRACESTATE.to_owned(), tracestate));
        }
    }
}

fn is_trace_header(name: &str) -> bool {
    name.eq_ignore_ascii_case(HEADER_TRACEPARENT) || name.eq_ignore_ascii_case(HEADER_TRACESTATE)
}

/// The decoded string, or `None` for any other JSON type (`null` never gets here: serde maps it
/// to a missing field).
fn json_string(raw: &RawValue) -> Option<String> {
    serde_json::from_str(raw.get()).ok()
}

/// W3C Trace Context level 1 `traceparent`: `version-traceid-parentid-flags`, lowercase hex;
/// version not `ff`, trace-id (32) and parent-id (16) not all zeros, flags 2 hex digits.
/// Version `00` is exactly 55 characters. A later version may append fields after a `-` (the
/// spec's forward-compatibility rule); they are passed through as sent if they are lowercase
/// hex and `-` and the whole value is at most 512 characters.
pub fn is_valid_traceparent(value: &str) -> bool {
    let b = value.as_bytes();
    if b.len() < TRACEPARENT_V00_LEN || b.len() > MAX_LEN {
        return false;
    }
    let (version, trace_id, parent_id, flags) = (&b[0..2], &b[3..35], &b[36..52], &b[53..55]);
    let fields_ok = b[2] == b'-'
        && b[35] == b'-'
        && b[52] == b'-'
        && is_lower_hex(version)
        && version != b"ff"
        && is_lower_hex(trace_id)
        && !is_all_zeros(trace_id)
        && is_lower_hex(parent_id)
        && !is_all_zeros(parent_id)
        && is_lower_hex(flags);
    if !fields_ok {
        return false;
    }
    let rest = &b[TRACEPARENT_V00_LEN..];
    if version == b"00" {
        return rest.is_empty();
    }
    rest.is_empty()
        || (rest[0] == b'-'
            && rest
                .iter()
                .all(|&c| c == b'-' || c.is_ascii_digit() || (b'a'..=b'f').contains(&c)))
}

/// `tracestate` as passed through: printable ASCII (0x20–0x7E), at most 512 characters, not
/// blank (an empty header carries nothing). Its list-member syntax is the tracing vendors'
/// business and is not checked.
pub fn is_valid_tracestate(value: &str) -> bool {
    value.len() <= MAX_LEN
        && value.bytes().all(|c| (0x20..=0x7e).contains(&c))
        && !value.trim().is_empty()
}

fn is_lower_hex(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .all(|&c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

fn is_all_zeros(bytes: &[u8]) -> bool {
    bytes.iter().all(|&c| c == b'0')
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn context(metadata: &str) -> Option<TraceContext> {
        TraceContext::from_metadata(metadata)
    }

    #[test]
    fn accepts_the_spec_example_and_any_flags() {
        assert!(is_valid_traceparent(VALID));
        assert!(is_valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        ));
        assert!(is_valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff"
        ));
        assert!(is_valid_traceparent(
            "00-00000000000000000000000000000001-0000000000000001-01"
        ));
    }

    #[test]
    fn refuses_uppercase_hex_anywhere() {
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
            "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(!is_valid_traceparent(bad), "{bad}");
        }
    }

    #[test]
    fn refuses_wrong_lengths_and_separators() {
        for bad in [
            "",
            "00",
            // trace-id one short / one long
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47361-00f067aa0ba902b7-01",
            // parent-id one short / one long
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b71-01",
            // flags one / three digits
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-011",
            // version 00 with anything after the flags
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-abcd",
            // 55 characters, separators in the wrong places or wrong characters
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "004-bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 ",
        ] {
            assert!(!is_valid_traceparent(bad), "{bad:?}");
        }
        // Right length, right hex, but a digit where a separator belongs.
        for at in [2, 35, 52] {
            let mut bad = VALID.to_owned();
            bad.replace_range(at..=at, "a");
            assert!(!is_valid_traceparent(&bad), "{bad:?}");
        }
    }

    #[test]
    fn refuses_all_zero_ids() {
        assert!(!is_valid_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!is_valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"
        ));
    }

    #[test]
    fn refuses_version_ff_and_passes_later_versions_through() {
        assert!(!is_valid_traceparent(
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        // A later version: its own 55 characters, or more fields after a dash.
        assert!(is_valid_traceparent(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(is_valid_traceparent(
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-abc-def"
        ));
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01ab",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-XYZ",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-a\r\nx: y",
        ] {
            assert!(!is_valid_traceparent(bad), "{bad:?}");
        }
        let long = format!(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-{}",
            "a".repeat(512)
        );
        assert!(!is_valid_traceparent(&long));
    }

    #[test]
    fn tracestate_is_printable_ascii_up_to_512_chars() {
        assert!(is_valid_tracestate(
            "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
        ));
        assert!(is_valid_tracestate(&"a".repeat(512)));
        assert!(!is_valid_tracestate(&"a".repeat(513)));
        assert!(!is_valid_tracestate("rojo=1\r\nx-injected: yes"));
        assert!(!is_valid_tracestate("rojo=1\tcongo=2"));
        assert!(!is_valid_tracestate("rojo=é"));
        assert!(!is_valid_tracestate("rojo=\u{7f}"));
        assert!(!is_valid_tracestate(""));
        assert!(!is_valid_tracestate("   "));
    }

    #[test]
    fn reads_both_keys_from_metadata_and_ignores_the_rest() {
        let metadata = format!(
            r#"{{"correlation_id": "c-1", "nested": {{"traceparent": "x"}}, "traceparent": "{VALID}", "tracestate": "rojo=00f067aa0ba902b7", "n": [1, 2.5e300]}}"#
        );
        assert_eq!(
            context(&metadata),
            Some(TraceContext {
                traceparent: VALID.to_owned(),
                tracestate: Some("rojo=00f067aa0ba902b7".to_owned()),
            })
        );
        assert_eq!(
            context(&format!(r#"{{"traceparent": "{VALID}"}}"#)),
            Some(TraceContext {
                traceparent: VALID.to_owned(),
                tracestate: None,
            })
        );
        // Escapes are decoded like any JSON string.
        assert_eq!(
            context(&format!(
                r#"{{"traceparent": "{VALID}", "tracestate": "a=\"q\"\\b"}}"#
            ))
            .and_then(|c| c.tracestate),
            Some(r#"a="q"\b"#.to_owned())
        );
    }

    #[test]
    fn no_context_without_a_valid_string_traceparent() {
        for metadata in [
            "{}",
            r#"{"tracestate": "rojo=1"}"#,
            r#"{"traceparent": null}"#,
            r#"{"traceparent": 42}"#,
            r#"{"traceparent": true}"#,
            r#"{"traceparent": ["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"]}"#,
            r#"{"traceparent": {"v": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}}"#,
            r#"{"traceparent": "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01", "tracestate": "rojo=1"}"#,
            r#"{"Traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}"#,
            // Not an object (the table forbids it; a derived struct would read it by position).
            r#"["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"]"#,
            r#""00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01""#,
            "not json",
            "",
        ] {
            assert_eq!(context(metadata), None, "{metadata}");
        }
    }

    #[test]
    fn a_bad_tracestate_drops_only_itself() {
        for tracestate in [
            r#"42"#,
            r#"{"a": 1}"#,
            r#""é""#,
            &format!(r#""{}""#, "a".repeat(513)),
        ] {
            let metadata = format!(r#"{{"traceparent": "{VALID}", "tracestate": {tracestate}}}"#);
            assert_eq!(
                context(&metadata),
                Some(TraceContext {
                    traceparent: VALID.to_owned(),
                    tracestate: None,
                }),
                "{metadata}"
            );
        }
    }

    #[test]
    fn the_event_context_replaces_static_trace_headers() {
        let mut headers = vec![
            ("x-api-key".to_owned(), "k".to_owned()),
            (
                "TraceParent".to_owned(),
                "00-11111111111111111111111111111111-2222222222222222-01".to_owned(),
            ),
            ("TRACESTATE".to_owned(), "static=1".to_owned()),
        ];
        TraceContext {
            traceparent: VALID.to_owned(),
            tracestate: None,
        }
        .apply_to(&mut headers);
        assert_eq!(
            headers,
            [
                ("x-api-key".to_owned(), "k".to_owned()),
                ("traceparent".to_owned(), VALID.to_owned()),
            ],
            "the static tracestate does not belong to the event's traceparent"
        );
        TraceContext {
            traceparent: VALID.to_owned(),
            tracestate: Some("rojo=1".to_owned()),
        }
        .apply_to(&mut headers);
        assert_eq!(
            headers,
            [
                ("x-api-key".to_owned(), "k".to_owned()),
                ("traceparent".to_owned(), VALID.to_owned()),
                ("tracestate".to_owned(), "rojo=1".to_owned()),
            ]
        );
    }
}
