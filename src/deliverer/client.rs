//! The HTTP client that POSTs webhook bodies to subscriber URLs.
//!
//! Owns the transport rules: which addresses a subscriber URL may reach (checked after DNS, so a
//! public name pointing at a private address is refused too), no redirects, no proxies, one
//! deadline over the whole exchange and a bounded read of the response body. It never decides
//! what a status means, never retries and never signs: callers pass finished bytes and headers in
//! and get a plain description of what happened back.

use std::error::Error as StdError;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, NaiveDateTime, Utc};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};

use crate::config::CidrList;
use crate::secret::mask_url;

/// At most this many bytes of a response body are read and kept.
pub const RESPONSE_BODY_LIMIT: usize = 4096;

/// Bounds connection set-up on its own; the per-request timeout still caps it when shorter,
/// because that deadline covers the whole exchange including connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
const ALLOW_HINT: &str = "allow with OUTBOX_ALLOW_PRIVATE_TARGETS";

const FORBIDDEN_V4: &[Ipv4Net] = &[
    Ipv4Net::new_assert(Ipv4Addr::new(0, 0, 0, 0), 8), // "this network", includes unspecified
    Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 0, 0), 8), // private
    Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 10), // CGNAT shared space
    Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8), // loopback
    Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 0, 0), 16), // link-local, cloud metadata
    Ipv4Net::new_assert(Ipv4Addr::new(172, 16, 0, 0), 12), // private
    Ipv4Net::new_assert(Ipv4Addr::new(192, 0, 0, 0), 24), // IETF protocol assignments
    Ipv4Net::new_assert(Ipv4Addr::new(192, 0, 2, 0), 24), // documentation TEST-NET-1
    Ipv4Net::new_assert(Ipv4Addr::new(192, 168, 0, 0), 16), // private
    Ipv4Net::new_assert(Ipv4Addr::new(198, 18, 0, 0), 15), // benchmarking
    Ipv4Net::new_assert(Ipv4Addr::new(198, 51, 100, 0), 24), // documentation TEST-NET-2
    Ipv4Net::new_assert(Ipv4Addr::new(203, 0, 113, 0), 24), // documentation TEST-NET-3
    Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 4), // multicast
    Ipv4Net::new_assert(Ipv4Addr::new(240, 0, 0, 0), 4), // reserved, includes broadcast
];

const FORBIDDEN_V6: &[Ipv6Net] = &[
    // Unspecified, loopback and the deprecated IPv4-compatible ::a.b.c.d forms.
    Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 96),
    Ipv6Net::new_assert(Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48), // local-use NAT64
    Ipv6Net::new_assert(Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64),     // discard-only
    Ipv6Net::new_assert(Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0), 48),    // benchmarking
    Ipv6Net::new_assert(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32), // documentation
    Ipv6Net::new_assert(Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0), 20),    // documentation
    Ipv6Net::new_assert(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),     // unique local
    Ipv6Net::new_assert(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),    // link-local
    Ipv6Net::new_assert(Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10),    // old site-local
    Ipv6Net::new_assert(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),     // multicast
];

/// Well-known NAT64 prefix: the last 32 bits are an IPv4 address the translator will reach.
const NAT64_WKP: Ipv6Net = Ipv6Net::new_assert(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96);

/// Which addresses subscriber URLs may reach.
///
/// Refused unless a CIDR in `allowed_private` covers the address: IPv4 private, loopback,
/// link-local, CGNAT (100.64/10), 0/8 (with unspecified), IETF 192.0.0/24, documentation,
/// benchmarking (198.18/15), multicast, reserved 240/4 (with broadcast); IPv6 loopback,
/// unspecified and IPv4-compatible (::/96), ULA fc00::/7, link-local fe80::/10, site-local
/// fec0::/10, multicast, documentation (2001:db8::/32, 3fff::/20), benchmarking 2001:2::/48,
/// discard 100::/64, local-use NAT64 64:ff9b:1::/48, and the IPv4-mapped (::ffff:0:0/96) and
/// NAT64 (64:ff9b::/96) forms of refused IPv4 addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetPolicy {
    pub allowed_private: Vec<IpNet>,
}

impl From<&CidrList> for TargetPolicy {
    fn from(allowed: &CidrList) -> TargetPolicy {
        TargetPolicy {
            allowed_private: allowed.0.clone(),
        }
    }
}

impl TargetPolicy {
    /// True when a connection to `ip` is allowed.
    pub fn permits(&self, ip: IpAddr) -> bool {
        // Mapped and NAT64 forms reach the embedded IPv4 host, so that host is what gets judged,
        // and an allow-list entry written in IPv4 (127.0.0.0/8) covers them too.
        let embedded = embedded_v4(ip);
        let forbidden = match (embedded, ip) {
            (Some(v4), _) | (None, IpAddr::V4(v4)) => is_forbidden_v4(v4),
            (None, IpAddr::V6(v6)) => FORBIDDEN_V6.iter().any(|net| net.contains(&v6)),
        };
        if !forbidden {
            return true;
        }
        self.allowed_private.iter().any(|net| {
            net.contains(&ip) || embedded.is_some_and(|v4| net.contains(&IpAddr::V4(v4)))
        })
    }
}

fn is_forbidden_v4(ip: Ipv4Addr) -> bool {
    FORBIDDEN_V4.iter().any(|net| net.contains(&ip))
}

fn embedded_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(_) => None,
        IpAddr::V6(v6) => v6.to_ipv4_mapped().or_else(|| {
            NAT64_WKP.contains(&v6).then(|| {
                let [.., a, b, c, d] = v6.octets();
                Ipv4Addr::new(a, b, c, d)
            })
        }),
    }
}

/// The resolver refused every address a name resolved to; found again in reqwest's error chain
/// to report [`FailureKind::ForbiddenTarget`] instead of a generic connect error.
#[derive(Debug, thiserror::Error)]
#[error("refused: {host} resolves only to forbidden addresses ({addrs}); {ALLOW_HINT}")]
struct ForbiddenResolution {
    host: String,
    addrs: String,
}

/// Resolves with the system resolver and drops forbidden addresses, so the check happens on the
/// addresses actually connected to (no gap for DNS rebinding between check and connect).
struct GuardedResolver {
    policy: Arc<TargetPolicy>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = Arc::clone(&self.policy);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let (permitted, refused): (Vec<_>, Vec<_>) = resolved
                .into_iter()
                .partition(|addr| policy.permits(addr.ip()));
            if permitted.is_empty() {
                let addrs = refused
                    .iter()
                    .map(|a| a.ip().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(Box::new(ForbiddenResolution { host, addrs }) as _);
            }
            Ok(Box::new(permitted.into_iter()) as Addrs)
        })
    }
}

/// Building the underlying HTTP client failed (TLS backend, invalid user agent...).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("building the webhook HTTP client")]
    Build(#[source] reqwest::Error),
}

/// One POST to a subscriber.
#[derive(Clone)]
pub struct WebhookRequest<'a> {
    pub url: &'a str,
    pub headers: &'a [(String, String)],
    pub body: Bytes,
    pub timeout: Duration,
}

impl std::fmt::Debug for WebhookRequest<'_> {
    // The URL may hold a password, the headers the signature and static credentials, the
    // body a payload: none of them belongs in a log line or a panic message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let header_names: Vec<&str> = self.headers.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("WebhookRequest")
            .field("url", &mask_url(self.url))
            .field("header_names", &header_names)
            .field("body_len", &self.body.len())
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Why no usable response came back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureKind {
    Timeout,
    Connect,
    ForbiddenTarget,
    InvalidRequest,
    Other,
}

/// What happened to one POST.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpResult {
    /// The subscriber answered (any status). `body_prefix` holds at most [`RESPONSE_BODY_LIMIT`]
    /// bytes, read from the network no further than needed, converted lossily to UTF-8 and cut
    /// on a character boundary.
    Responded {
        status: u16,
        body_prefix: String,
        /// From `Retry-After`, as delta-seconds or HTTP-date; a date in the past gives zero.
        retry_after: Option<Duration>,
    },
    /// No usable response: timeout, connect error, refused target, invalid URL...
    Failed {
        kind: FailureKind,
        /// Human readable, with the cause chain joined by ": ".
        error: String,
    },
}

impl HttpResult {
    fn failed(kind: FailureKind, error: impl Into<String>) -> Self {
        Self::Failed {
            kind,
            error: error.into(),
        }
    }
}

/// POSTs webhook bodies under a [`TargetPolicy`]. Cloning is cheap and shares the connection pool.
#[derive(Clone, Debug)]
pub struct WebhookClient {
    http: reqwest::Client,
    policy: Arc<TargetPolicy>,
}

impl WebhookClient {
    pub fn new(policy: TargetPolicy, user_agent: &str) -> Result<Self, ClientError> {
        let policy = Arc::new(policy);
        let http = reqwest::Client::builder()
            // A redirect would let a subscriber steer signed payloads (and our network position)
            // somewhere it was never registered for; the 3xx is reported as the answer instead.
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would connect on our behalf and bypass the address check.
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver {
                policy: Arc::clone(&policy),
            }))
            .user_agent(user_agent)
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .tcp_nodelay(true)
            .build()
            .map_err(ClientError::Build)?;
        Ok(Self { http, policy })
    }

    /// POSTs `request.body` with `content-type: application/json` plus `request.headers` (a
    /// caller-supplied content-type replaces ours). `request.timeout` bounds connect, send and
    /// the bounded body read together.
    pub async fn send(&self, request: WebhookRequest<'_>) -> HttpResult {
        let timeout = request.timeout;
        // reqwest's own timeout already covers the body; the outer one also bounds anything
        // outside it (DNS before connect, our own reading loop) so no path can hang a worker.
        match tokio::time::timeout(timeout, self.send_inner(request)).await {
            Ok(result) => result,
            Err(_) => HttpResult::failed(
                FailureKind::Timeout,
                format!("timed out after {timeout:?} waiting for the subscriber"),
            ),
        }
    }

    async fn send_inner(&self, request: WebhookRequest<'_>) -> HttpResult {
        let url = match self.check_url(request.url) {
            Ok(url) => url,
            Err(failure) => return failure,
        };
        let headers = match build_headers(request.headers) {
            Ok(headers) => headers,
            Err(failure) => return failure,
        };
        let sent = self
            .http
            .post(url)
            .headers(headers)
            .body(request.body)
            .timeout(request.timeout)
            .send()
            .await;
        let mut response = match sent {
            Ok(response) => response,
            Err(err) => return classify(err),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, Utc::now()));
        let mut prefix: Vec<u8> = Vec::with_capacity(RESPONSE_BODY_LIMIT);
        let mut truncated = false;
        while prefix.len() < RESPONSE_BODY_LIMIT {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = RESPONSE_BODY_LIMIT - prefix.len();
                    truncated = chunk.len() > room;
                    prefix.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(None) => break,
                // Without the whole exchange the status alone may be a lie (a proxy or a crash
                // mid-answer), and redelivery is safe, so this counts as no usable response.
                Err(err) => {
                    let failure = classify(err);
                    return match failure {
                        HttpResult::Failed { kind, error } => HttpResult::failed(
                            kind,
                            format!("reading the body after status {status}: {error}"),
                        ),
                        responded => responded,
                    };
                }
            }
        }
        // Dropping the response here, with the rest unread, closes the connection instead of
        // draining an arbitrarily large (or endless) body back into the pool.
        drop(response);
        let truncated = truncated || prefix.len() == RESPONSE_BODY_LIMIT;
        HttpResult::Responded {
            status,
            body_prefix: lossy_prefix(&prefix, truncated),
            retry_after,
        }
    }

    fn check_url(&self, raw: &str) -> Result<reqwest::Url, HttpResult> {
        let url = reqwest::Url::parse(raw).map_err(|err| {
            // This text is logged and kept in delivery_attempts.error: never the password.
            HttpResult::failed(
                FailureKind::InvalidRequest,
                format!("invalid URL {:?}: {err}", mask_url(raw)),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(HttpResult::failed(
                FailureKind::InvalidRequest,
                format!(
                    "unsupported URL scheme {:?}: only http and https",
                    url.scheme()
                ),
            ));
        }
        let Some(host) = url.host_str() else {
            return Err(HttpResult::failed(
                FailureKind::InvalidRequest,
                format!("URL {:?} has no host", mask_url(raw)),
            ));
        };
        // IP literals never reach the resolver, so they are judged here. The URL parser has
        // already normalised forms like 2130706433 or 0x7f.1 to dotted IPv4.
        let literal = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if let Ok(ip) = literal.parse::<IpAddr>()
            && !self.policy.permits(ip)
        {
            return Err(HttpResult::failed(
                FailureKind::ForbiddenTarget,
                format!("refused: {ip} is a forbidden address; {ALLOW_HINT}"),
            ));
        }
        Ok(url)
    }
}

fn build_headers(pairs: &[(String, String)]) -> Result<HeaderMap, HttpResult> {
    let mut headers = HeaderMap::with_capacity(pairs.len() + 1);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (name, value) in pairs {
        let header_name = HeaderName::from_bytes(name.as_bytes()).map_err(|err| {
            HttpResult::failed(
                FailureKind::InvalidRequest,
                format!("invalid header name {name:?}: {err}"),
            )
        })?;
        let header_value = HeaderValue::from_str(value).map_err(|err| {
            HttpResult::failed(
                FailureKind::InvalidRequest,
                format!("invalid value for header {name:?}: {err}"),
            )
        })?;
        if header_name == CONTENT_TYPE {
            headers.insert(header_name, header_value);
        } else {
            headers.append(header_name, header_value);
        }
    }
    Ok(headers)
}

fn classify(err: reqwest::Error) -> HttpResult {
    // The URL is left out: subscribers put tokens in query strings, and the caller knows the URL.
    let err = err.without_url();
    if let Some(refusal) = find_in_chain::<ForbiddenResolution>(&err) {
        return HttpResult::failed(FailureKind::ForbiddenTarget, refusal.to_string());
    }
    let kind = if err.is_timeout() {
        FailureKind::Timeout
    } else if err.is_connect() {
        FailureKind::Connect
    } else if err.is_builder() {
        FailureKind::InvalidRequest
    } else {
        FailureKind::Other
    };
    HttpResult::failed(kind, error_chain(&err))
}

fn find_in_chain<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut last = text.clone();
    let mut source = err.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        // Some layers already embed their cause in their own message; repeating it adds noise.
        if !last.contains(&message) {
            let _ = write!(text, ": {message}");
        }
        last = message;
        source = cause.source();
    }
    text
}

/// UTF-8 text of `bytes`, invalid sequences and NULs replaced, never longer than [`RESPONSE_BODY_LIMIT`]
/// bytes. When the body was `truncated`, a character cut in half by the limit is dropped rather
/// than shown as a replacement character.
fn lossy_prefix(bytes: &[u8], truncated: bool) -> String {
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
    let at = DateTime::parse_from_rfc2822(value)
        .map(|d| d.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            ["%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y"]
                .iter()
                .find_map(|format| NaiveDateTime::parse_from_str(value, format).ok())
                .map(|naive| naive.and_utc())
        })?;
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Instant;

    use axum::Router;
    use axum::body::Body;
    use axum::http::{HeaderMap as AxumHeaders, StatusCode, header};
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, post};
    use chrono::TimeZone;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test IP literal")
    }

    fn loopback_allowed() -> TargetPolicy {
        TargetPolicy {
            allowed_private: CidrList::parse("127.0.0.0/8").expect("valid list").0,
        }
    }

    fn client(policy: TargetPolicy) -> WebhookClient {
        WebhookClient::new(policy, "outbox-relay-test/1").expect("client builds")
    }

    async fn serve(app: Router) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind test server");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        addr
    }

    fn request<'a>(url: &'a str, headers: &'a [(String, String)]) -> WebhookRequest<'a> {
        WebhookRequest {
            url,
            headers,
            body: Bytes::from_static(br#"{"hello":"world"}"#),
            timeout: Duration::from_secs(5),
        }
    }

    fn expect_failed(result: HttpResult) -> (FailureKind, String) {
        match result {
            HttpResult::Failed { kind, error } => (kind, error),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    // --- policy ---

    #[test]
    fn refuses_every_listed_v4_range() {
        let policy = TargetPolicy::default();
        for addr in [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.1",
            "127.0.0.1",
            "127.255.0.9",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "198.18.0.1",
            "198.19.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(!policy.permits(ip(addr)), "{addr} must be refused");
        }
    }

    #[test]
    fn refuses_every_listed_v6_range_and_embedded_v4_forms() {
        let policy = TargetPolicy::default();
        for addr in [
            "::",
            "::1",
            "::127.0.0.1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "ff0e::1",
            "2001:db8::1",
            "3fff::1",
            "2001:2::1",
            "100::1",
            "64:ff9b:1::a",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(!policy.permits(ip(addr)), "{addr} must be refused");
        }
    }

    #[test]
    fn permits_public_addresses_and_their_embedded_forms() {
        let policy = TargetPolicy::default();
        for addr in [
            "93.184.216.34",
            "8.8.8.8",
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2606:2800:220:1:248:1893:25c8:1946",
            "::ffff:93.184.216.34",
            "64:ff9b::5db8:d822",
        ] {
            assert!(policy.permits(ip(addr)), "{addr} must be permitted");
        }
    }

    #[test]
    fn allow_list_opens_only_what_it_covers() {
        let policy = TargetPolicy {
            allowed_private: CidrList::parse("127.0.0.0/8, 10.1.2.3, fd00::/8")
                .expect("valid list")
                .0,
        };
        assert!(policy.permits(ip("127.0.0.1")));
        assert!(policy.permits(ip("::ffff:127.0.0.1")));
        assert!(policy.permits(ip("10.1.2.3")));
        assert!(!policy.permits(ip("10.1.2.4")));
        assert!(policy.permits(ip("fd00::5")));
        assert!(!policy.permits(ip("fc00::5")));
        assert!(!policy.permits(ip("::1")));
        assert!(!policy.permits(ip("169.254.169.254")));
    }

    // --- helpers ---

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

    // --- real servers on 127.0.0.1 ---

    #[tokio::test]
    async fn posts_json_with_headers_and_reads_the_answer() {
        let seen = Arc::new(std::sync::Mutex::new(None::<(String, String, String)>));
        let seen_in = Arc::clone(&seen);
        let app = Router::new().route(
            "/hook",
            post(move |headers: AxumHeaders, body: Bytes| {
                let seen = Arc::clone(&seen_in);
                async move {
                    let get = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let record = (
                        get("content-type"),
                        get("webhook-id"),
                        String::from_utf8_lossy(&body).into_owned(),
                    );
                    *seen.lock().expect("lock") = Some(record);
                    (
                        StatusCode::CREATED,
                        [(header::RETRY_AFTER, "7")],
                        "accepted",
                    )
                }
            }),
        );
        let addr = serve(app).await;
        let url = format!("http://{addr}/hook");
        let headers = vec![("webhook-id".to_owned(), "msg_1".to_owned())];
        let result = client(loopback_allowed())
            .send(request(&url, &headers))
            .await;
        assert_eq!(
            result,
            HttpResult::Responded {
                status: 201,
                body_prefix: "accepted".to_owned(),
                retry_after: Some(Duration::from_secs(7)),
            }
        );
        let seen = seen.lock().expect("lock").clone();
        assert_eq!(
            seen,
            Some((
                "application/json".to_owned(),
                "msg_1".to_owned(),
                r#"{"hello":"world"}"#.to_owned()
            ))
        );
    }

    #[tokio::test]
    async fn redirects_are_returned_not_followed() {
        let visits = Arc::new(AtomicUsize::new(0));
        let visits_in = Arc::clone(&visits);
        let app = Router::new()
            .route(
                "/start",
                post(|| async { (StatusCode::FOUND, [(header::LOCATION, "/landing")]) }),
            )
            .route(
                "/landing",
                get({
                    let v = Arc::clone(&visits_in);
                    move || async move {
                        v.fetch_add(1, Ordering::SeqCst);
                        "landed"
                    }
                })
                .post(move || async move {
                    visits_in.fetch_add(1, Ordering::SeqCst);
                    "landed"
                }),
            );
        let addr = serve(app).await;
        let url = format!("http://{addr}/start");
        let result = client(loopback_allowed()).send(request(&url, &[])).await;
        assert!(
            matches!(result, HttpResult::Responded { status: 302, .. }),
            "{result:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(visits.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn large_body_is_cut_at_the_limit() {
        let app = Router::new().route("/big", post(|| async { vec![b'a'; 10 * 1024 * 1024] }));
        let addr = serve(app).await;
        let url = format!("http://{addr}/big");
        match client(loopback_allowed()).send(request(&url, &[])).await {
            HttpResult::Responded {
                status,
                body_prefix,
                ..
            } => {
                assert_eq!(status, 200);
                assert_eq!(body_prefix.len(), RESPONSE_BODY_LIMIT);
                assert!(body_prefix.bytes().all(|b| b == b'a'));
            }
            other => panic!("expected a response, got {other:?}"),
        }
    }

    struct SetOnDrop(Arc<AtomicBool>);

    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn endless_body_stops_reading_and_closes_the_connection() {
        let dropped = Arc::new(AtomicBool::new(false));
        let dropped_in = Arc::clone(&dropped);
        let app = Router::new().route(
            "/endless",
            post(move || {
                let guard = SetOnDrop(Arc::clone(&dropped_in));
                async move {
                    let stream = futures::stream::unfold(guard, |guard| async move {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        Some((
                            Ok::<_, std::io::Error>(Bytes::from(vec![b'z'; 1024])),
                            guard,
                        ))
                    });
                    Body::from_stream(stream).into_response()
                }
            }),
        );
        let addr = serve(app).await;
        let url = format!("http://{addr}/endless");
        let mut req = request(&url, &[]);
        req.timeout = Duration::from_secs(30);
        let started = Instant::now();
        let result = client(loopback_allowed()).send(req).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "send must return long before the 30s timeout"
        );
        match result {
            HttpResult::Responded { body_prefix, .. } => {
                assert_eq!(body_prefix.len(), RESPONSE_BODY_LIMIT);
            }
            other => panic!("expected a response, got {other:?}"),
        }
        // The server only drops its endless stream when the client has closed the connection.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !dropped.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "client kept the connection open");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn hanging_server_times_out() {
        let app = Router::new().route(
            "/hang",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                "never"
            }),
        );
        let addr = serve(app).await;
        let url = format!("http://{addr}/hang");
        let mut req = request(&url, &[]);
        req.timeout = Duration::from_millis(300);
        let started = Instant::now();
        let (kind, error) = expect_failed(client(loopback_allowed()).send(req).await);
        let elapsed = started.elapsed();
        assert_eq!(kind, FailureKind::Timeout, "{error}");
        assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    }

    #[tokio::test]
    async fn slow_headers_then_slow_body_times_out_in_total() {
        let app = Router::new().route(
            "/drip",
            post(|| async {
                let stream = futures::stream::unfold((), |()| async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Some((Ok::<_, std::io::Error>(Bytes::from_static(b"d")), ()))
                });
                Body::from_stream(stream).into_response()
            }),
        );
        let addr = serve(app).await;
        let url = format!("http://{addr}/drip");
        let mut req = request(&url, &[]);
        req.timeout = Duration::from_millis(400);
        let started = Instant::now();
        let (kind, error) = expect_failed(client(loopback_allowed()).send(req).await);
        assert_eq!(kind, FailureKind::Timeout, "{error}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn refused_connection_is_a_connect_failure() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("local addr");
        drop(listener);
        let url = format!("http://{addr}/hook");
        let (kind, error) =
            expect_failed(client(loopback_allowed()).send(request(&url, &[])).await);
        assert_eq!(kind, FailureKind::Connect, "{error}");
        assert!(error.contains(": "), "cause chain expected: {error}");
        assert!(
            !error.contains("http://"),
            "URL must stay out of the text: {error}"
        );
    }

    fn counting_app(hits: &Arc<AtomicUsize>) -> Router {
        let hits = Arc::clone(hits);
        Router::new().route(
            "/hook",
            post(move || async move {
                hits.fetch_add(1, Ordering::SeqCst);
                "ok"
            }),
        )
    }

    #[tokio::test]
    async fn loopback_literal_is_refused_by_default_and_allowed_when_listed() {
        let hits = Arc::new(AtomicUsize::new(0));
        let addr = serve(counting_app(&hits)).await;
        let url = format!("http://{addr}/hook");

        let (kind, error) = expect_failed(
            client(TargetPolicy::default())
                .send(request(&url, &[]))
                .await,
        );
        assert_eq!(kind, FailureKind::ForbiddenTarget);
        assert!(error.contains("127.0.0.1"), "{error}");
        assert!(error.contains("OUTBOX_ALLOW_PRIVATE_TARGETS"), "{error}");
        assert_eq!(hits.load(Ordering::SeqCst), 0);

        let mapped = format!("http://[::ffff:127.0.0.1]:{}/hook", addr.port());
        let (kind, _) = expect_failed(
            client(TargetPolicy::default())
                .send(request(&mapped, &[]))
                .await,
        );
        assert_eq!(kind, FailureKind::ForbiddenTarget);
        let decimal = format!("http://2130706433:{}/hook", addr.port());
        let (kind, _) = expect_failed(
            client(TargetPolicy::default())
                .send(request(&decimal, &[]))
                .await,
        );
        assert_eq!(kind, FailureKind::ForbiddenTarget);
        assert_eq!(hits.load(Ordering::SeqCst), 0);

        let result = client(loopback_allowed()).send(request(&url, &[])).await;
        assert!(
            matches!(result, HttpResult::Responded { status: 200, .. }),
            "{result:?}"
        );
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn localhost_name_is_refused_after_dns_by_default() {
        let hits = Arc::new(AtomicUsize::new(0));
        let addr = serve(counting_app(&hits)).await;
        let url = format!("http://localhost:{}/hook", addr.port());

        let (kind, error) = expect_failed(
            client(TargetPolicy::default())
                .send(request(&url, &[]))
                .await,
        );
        assert_eq!(kind, FailureKind::ForbiddenTarget, "{error}");
        assert!(
            error.starts_with("refused: localhost resolves only to forbidden addresses ("),
            "{error}"
        );
        assert!(error.contains("OUTBOX_ALLOW_PRIVATE_TARGETS"), "{error}");
        assert_eq!(hits.load(Ordering::SeqCst), 0);

        let result = client(loopback_allowed()).send(request(&url, &[])).await;
        assert!(
            matches!(result, HttpResult::Responded { status: 200, .. }),
            "{result:?}"
        );
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn invalid_requests_are_refused_before_any_traffic() {
        let c = client(loopback_allowed());
        for url in ["not a url", "ftp://127.0.0.1/x", "file:///etc/passwd"] {
            let (kind, error) = expect_failed(c.send(request(url, &[])).await);
            assert_eq!(kind, FailureKind::InvalidRequest, "{url}: {error}");
        }
        let bad_header = vec![("bad header".to_owned(), "x".to_owned())];
        let (kind, _) = expect_failed(c.send(request("http://127.0.0.1:9/", &bad_header)).await);
        assert_eq!(kind, FailureKind::InvalidRequest);
        let bad_value = vec![("x-ok".to_owned(), "line\nbreak".to_owned())];
        let (kind, _) = expect_failed(c.send(request("http://127.0.0.1:9/", &bad_value)).await);
        assert_eq!(kind, FailureKind::InvalidRequest);
    }

    /// The error is logged and kept in delivery_attempts.error, so it shows the URL masked.
    #[tokio::test]
    async fn url_errors_never_show_the_password() {
        let c = client(loopback_allowed());
        for url in [
            "http://hook:pw-in-url@[::1/hook",
            "http://hook:pw-in-url@127.0.0.1:99999/hook",
        ] {
            let (kind, error) = expect_failed(c.send(request(url, &[])).await);
            assert_eq!(kind, FailureKind::InvalidRequest, "{error}");
            assert!(!error.contains("pw-in-url"), "{error}");
            assert!(error.contains("hook:***@"), "{error}");
        }
    }

    #[tokio::test]
    async fn response_status_and_retry_after_date_are_reported() {
        let app = Router::new().route(
            "/busy",
            post(|| async {
                let mut response: Response =
                    (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response();
                let at = (Utc::now() + chrono::Duration::seconds(120))
                    .format("%a, %d %b %Y %H:%M:%S GMT")
                    .to_string();
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, at.parse().expect("valid header value"));
                response
            }),
        );
        let addr = serve(app).await;
        let url = format!("http://{addr}/busy");
        match client(loopback_allowed()).send(request(&url, &[])).await {
            HttpResult::Responded {
                status,
                body_prefix,
                retry_after,
            } => {
                assert_eq!(status, 503);
                assert_eq!(body_prefix, "busy");
                let wait = retry_after.expect("retry-after parsed");
                assert!(
                    wait > Duration::from_secs(110) && wait <= Duration::from_secs(120),
                    "{wait:?}"
                );
            }
            other => panic!("expected a response, got {other:?}"),
        }
    }
}
