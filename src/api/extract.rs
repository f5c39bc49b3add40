//! Reading requests: JSON bodies, queries and path parameters that refuse what PostgreSQL
//! cannot store (NUL, text that is not UTF-8) naming the field, and the value parsers and
//! serde helpers the handlers share.

use super::*;

/// A JSON body whose parse errors are 400s in the API's shape, naming the field. An empty
/// body, or `null`, reads as `{}`, so endpoints whose fields are all optional accept no body
/// at all (the document says such a body is optional or `null`).
/// The content type is not checked: the previous event bus's clients do not all send it.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| ApiError::invalid("body", rejection.body_text()))?;
        let bytes: &[u8] =
            if bytes.iter().all(u8::is_ascii_whitespace) || bytes.trim_ascii() == b"null" {
                b"{}"
            } else {
                &bytes
            };
        refuse_nul_in_json(bytes)?;
        let mut deserializer = serde_json::Deserializer::from_slice(bytes);
        serde_path_to_error::deserialize(&mut deserializer)
            .map(ApiJson)
            .map_err(|error| {
                let (field, message) = field_of(&error.path().to_string(), error.inner());
                ApiError::invalid(field.unwrap_or_else(|| "body".to_owned()), message)
            })
    }
}

/// The one check every JSON body passes: no string or key may hold U+0000, which
/// PostgreSQL cannot store in `text` or `jsonb`. JSON can only spell it `\u0000`, so bodies
/// without that sequence (nearly all) are not parsed twice.
pub(super) fn refuse_nul_in_json(bytes: &[u8]) -> Result<(), ApiError> {
    const ESCAPE: &[u8] = b"\\u0000";
    if !bytes.windows(ESCAPE.len()).any(|window| window == ESCAPE) {
        return Ok(());
    }
    // Not JSON at all: the typed parse below says where.
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Ok(());
    };
    match crate::admin::nul_path(&value) {
        Some(path) => {
            let field = if path.is_empty() {
                "body".to_owned()
            } else {
                path
            };
            Err(ApiError::invalid(
                field.clone(),
                format!("{field} {}", crate::admin::NUL_PROBLEM),
            ))
        }
        None => Ok(()),
    }
}

/// Refuses a text value of a query or path parameter that holds U+0000.
pub(super) fn refuse_nul(field: &str, value: &str) -> Result<(), ApiError> {
    if value.contains('\0') {
        return Err(ApiError::invalid(
            field,
            format!("{field} {}", crate::admin::NUL_PROBLEM),
        ));
    }
    Ok(())
}

/// Query parameters whose parse errors are 400s naming the parameter. Values are
/// percent-decoded strictly: a `%00` or bytes that are not UTF-8 are refused naming the
/// parameter, where a lenient decoder would search for U+FFFD or fail in the database.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or("");
        let mut pairs = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = decode_query_part("query", key)?;
            refuse_nul("query", &key)?;
            let value = decode_query_part(&key, value)?;
            refuse_nul(&key, &value)?;
            pairs.push((key, value));
        }
        // Re-encoded so serde_urlencoded reads the checked pairs with its own typing.
        let checked = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&pairs)
            .finish();
        let deserializer =
            serde_urlencoded::Deserializer::new(form_urlencoded::parse(checked.as_bytes()));
        serde_path_to_error::deserialize(deserializer)
            .map(ApiQuery)
            .map_err(|error| {
                let (field, message) = field_of(&error.path().to_string(), error.inner());
                ApiError::invalid(field.unwrap_or_else(|| "query".to_owned()), message)
            })
    }
}

/// One `application/x-www-form-urlencoded` key or value: `+` is a space, `%XX` a byte, and
/// the bytes must be UTF-8.
pub(super) fn decode_query_part(field: &str, raw: &str) -> Result<String, ApiError> {
    let raw = raw.replace('+', " ");
    let bytes: Vec<u8> = percent_encoding::percent_decode(raw.as_bytes()).collect();
    String::from_utf8(bytes).map_err(|_| {
        ApiError::invalid(
            field,
            format!("{field} is not UTF-8 once percent-decoded; send UTF-8 text"),
        )
    })
}

/// The one path parameter of a route (`{name}`, `{event_id}`, `{id}`), as text. Text that
/// is not UTF-8 once percent-decoded or holds U+0000 is a 400 naming the parameter, in the
/// API's error shape (axum's own rejection is plain text).
pub struct ApiPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ApiPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        use axum::extract::Path;
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        match Path::<Vec<(String, String)>>::from_request_parts(parts, state).await {
            Ok(Path(params)) => match params.into_iter().next() {
                Some((key, value)) => {
                    refuse_nul(&key, &value)?;
                    Ok(ApiPath(value))
                }
                None => Err(ApiError::invalid("path", "a path parameter is missing")),
            },
            Err(PathRejection::FailedToDeserializePathParams(error)) => {
                let field = match error.kind() {
                    ErrorKind::InvalidUtf8InPathParam { key } => key.clone(),
                    _ => "path".to_owned(),
                };
                Err(ApiError::invalid(
                    field.clone(),
                    format!("{field}: {}; send UTF-8 text", error.body_text()),
                ))
            }
            Err(rejection) => Err(ApiError::invalid("path", rejection.body_text())),
        }
    }
}

/// The field a deserialisation error is about: the path where it happened, or for
/// "missing field `x`" / "unknown field `x`" (reported at the parent) the field named.
pub(super) fn field_of(path: &str, error: &dyn fmt::Display) -> (Option<String>, String) {
    let message = error.to_string();
    let named = ["missing field `", "unknown field `"]
        .iter()
        .find_map(|prefix| {
            let rest = message.split_once(prefix)?.1;
            Some(rest.split_once('`')?.0.to_owned())
        });
    // serde_path_to_error reports an unknown field at itself, a missing one at its parent.
    let field = match (path, named) {
        (".", named) => named,
        (path, Some(named)) if path != named && !path.ends_with(&format!(".{named}")) => {
            Some(format!("{path}.{named}"))
        }
        (path, _) => Some(path.to_owned()),
    };
    (field, message)
}

/// For `#[serde(deserialize_with)]` on settings a client may clear: absent = `None` (leave
/// alone), `null` = `Some(None)` (clear), a value = `Some(Some(v))`. Use with
/// `#[serde(default)]`.
pub fn double_option<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(deserializer).map(Some)
}

/// For `#[serde(default, deserialize_with = "non_null")]` on optional fields of the admin API
/// for which `null` would mean nothing: absent = `None`, a value = `Some(v)`, and `null` is
/// refused (400 naming the field) instead of being read as "absent", so a client that meant
/// to clear a setting learns it cannot, and the document can say "a string" and be right.
pub fn non_null<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// For `#[serde(default, deserialize_with = "integer")]` on optional integer fields: what
/// JSON Schema calls an integer, which includes `7.0`, so a client that writes every number
/// as a float is not refused. Absent = `None`; `null`, fractions and values out of `T`'s range
/// are refused.
pub fn integer<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64>,
{
    let number = serde_json::Number::deserialize(deserializer)?;
    whole(&number)
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom(format!("{number} is not an integer in range")))
}

/// [`integer`] for fields where `null` means absent too (the compatibility endpoints).
pub fn nullable_integer<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64>,
{
    match Option::<serde_json::Number>::deserialize(deserializer)? {
        None => Ok(None),
        Some(number) => whole(&number).map(Some).ok_or_else(|| {
            serde::de::Error::custom(format!("{number} is not an integer in range"))
        }),
    }
}

pub(super) fn whole<T: TryFrom<i64>>(number: &serde_json::Number) -> Option<T> {
    let value = match number.as_i64() {
        Some(value) => value,
        None => {
            let float = number.as_f64()?;
            // Beyond ±2^63 the cast saturates; such values are out of every T's range anyway,
            // and the fraction check below refuses 7.5.
            if float.fract() != 0.0 || float.abs() >= 9.2e18 {
                return None;
            }
            float as i64
        }
    };
    T::try_from(value).ok()
}

/// Refuses a subscription URL outside [`openapi::WEBHOOK_URL`], the form the document
/// promises. The URL parser alone takes more (`http://a*`, hosts in any script), and the
/// API should refuse what its document calls invalid rather than store it. The CLI and SQL
/// keep the database's looser rule.
pub fn check_webhook_url(
    field: &str,
    url: &crate::config::secret::SecretUrl,
) -> Result<(), ApiError> {
    static PATTERN: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    check_url_pattern(
        field,
        url,
        &PATTERN,
        openapi::WEBHOOK_URL,
        "http:// or https://, an optional user:password@, a host name of letters, digits, - and _ \
         (or an IPv4 or bracketed IPv6 address), an optional port, then printable ASCII without \
         spaces",
    )
}

/// Refuses a subscription URL outside [`openapi::TARGET_URL`] (a webhook or a broker), for the
/// admin API; the same reasoning as [`check_webhook_url`].
pub fn check_target_url(
    field: &str,
    url: &crate::config::secret::SecretUrl,
) -> Result<(), ApiError> {
    static PATTERN: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    check_url_pattern(
        field,
        url,
        &PATTERN,
        openapi::TARGET_URL,
        "a webhook (http:// or https://, an optional user:password@, a host name of letters, \
         digits, - and _ or an IP address, an optional port, then printable ASCII without spaces) \
         or a broker target: nats://host:4222/subject, redis://host:6379/0?stream=S[&maxlen=N], \
         amqp://user:pass@host:5672/vhost?exchange=E[&routing_key=K], \
         kafka://host:9092[,host:9092...]/topic",
    )
}

fn check_url_pattern(
    field: &str,
    url: &crate::config::secret::SecretUrl,
    compiled: &std::sync::OnceLock<regex::Regex>,
    pattern: &str,
    form: &str,
) -> Result<(), ApiError> {
    // A constant pattern, compiled by the unit tests in api/mod.rs: it cannot fail here.
    let compiled = compiled
        .get_or_init(|| regex::Regex::new(pattern).expect("the URL patterns are valid regexes"));
    let raw = url.expose_secret();
    if raw.chars().count() <= openapi::WEBHOOK_URL_MAX && compiled.is_match(raw) {
        return Ok(());
    }
    Err(ApiError::invalid(
        field,
        format!(
            "{} is not a URL this API takes: give {form}; at most {} characters",
            url.masked(),
            openapi::WEBHOOK_URL_MAX
        ),
    ))
}

pub fn parse_uuid(field: &str, raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw.trim()).map_err(|error| {
        ApiError::invalid(
            field,
            format!("{raw:?} is not a UUID ({error}); give one like 0b6f8a3e-9c1d-4e2f-8a7b-1c2d3e4f5a6b"),
        )
    })
}

pub fn parse_time(field: &str, raw: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(raw.trim())
        .map(|time| time.with_timezone(&Utc))
        .map_err(|error| {
            ApiError::invalid(
                field,
                format!(
                    "{raw:?} is not an RFC 3339 time ({error}); give one like 2024-05-01T12:00:00Z"
                ),
            )
        })
}

/// Cursors are the decimal `id` of the last row of the previous page, as `next_cursor` spells
/// it (no sign, spaces or leading zeros; at most 18 digits, far above any id); any other text
/// is refused rather than read as "from the start". The document states the same pattern.
pub fn parse_cursor(raw: &str) -> Result<i64, ApiError> {
    let canonical = (1..=CURSOR_MAX_DIGITS).contains(&raw.len())
        && raw.bytes().all(|b| b.is_ascii_digit())
        && !raw.starts_with('0');
    canonical
        .then(|| raw.parse::<i64>().ok())
        .flatten()
        .ok_or_else(|| {
            ApiError::invalid(
                "cursor",
                format!("{raw:?} is not a cursor; pass the next_cursor of the previous page"),
            )
        })
}

/// Longest cursor [`parse_cursor`] takes: 18 digits always fit an `i64`.
pub const CURSOR_MAX_DIGITS: usize = 18;
