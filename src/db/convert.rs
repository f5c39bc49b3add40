//! Column values as the relay and the admin paths read them, in one place: intervals come
//! back as seconds (`extract(epoch …)`, tokio-postgres has no interval type) and static
//! headers as a jsonb object of strings.

use std::time::Duration;

/// Seconds from `extract(epoch FROM …)::float8`. The CHECK constraints keep these finite and
/// non-negative; anything else reads as zero rather than failing a whole load.
pub fn seconds(value: f64) -> Duration {
    Duration::try_from_secs_f64(value).unwrap_or(Duration::ZERO)
}

/// A `headers` jsonb object as (name, value) pairs. The `headers_valid` constraint admits only
/// string values; anything else is skipped rather than failing a whole load.
pub fn string_pairs<C: FromIterator<(String, String)>>(headers: serde_json::Value) -> C {
    match headers {
        serde_json::Value::Object(map) => map
            .into_iter()
            .filter_map(|(name, value)| value.as_str().map(|value| (name, value.to_owned())))
            .collect(),
        _ => std::iter::empty().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn seconds_and_headers_read_as_stored_and_odd_values_do_not_fail() {
        assert_eq!(seconds(1.5), Duration::from_millis(1500));
        assert_eq!(seconds(-1.0), Duration::ZERO);
        assert_eq!(seconds(f64::NAN), Duration::ZERO);
        let pairs: BTreeMap<String, String> =
            string_pairs(serde_json::json!({"X-Team": "crm", "X-Bad": 1}));
        assert_eq!(pairs.len(), 1);
        assert_eq!(pairs["X-Team"], "crm");
        let none: Vec<(String, String)> = string_pairs(serde_json::json!([1]));
        assert!(none.is_empty());
    }
}
