//! The HTTP client that POSTs webhook bodies to subscriber URLs.
//!
//! Owns the transport rules: only addresses the [`TargetPolicy`] permits (checked after DNS, see
//! [`super::target_policy`]), no redirects, no proxies, one
//! deadline over the whole exchange and a bounded read of the response body. It never decides
//! what a status means, never retries and never signs: callers pass finished bytes and headers in
//! and get a plain description of what happened back.

use std::error::Error as StdError;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};

use super::response::{RESPONSE_BODY_LIMIT, lossy_prefix, parse_retry_after};
use super::target_policy::{ALLOW_HINT, ForbiddenResolution, GuardedResolver, TargetPolicy};
use crate::config::secret::mask_url;

/// Bounds connection set-up on its own; the per-request timeout still caps it when shorter,
/// because that deadline covers the whole exchange including connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

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
    /// A broker answered and refused the message (no stream for the subject, a nack, an
    /// unroutable message, an error reply).
    Rejected,
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
    /// A broker confirmed the message durably (a JetStream PubAck, a Redis entry id, a
    /// RabbitMQ `basic.ack` of a routed message). `receipt` says where it was stored.
    Published { receipt: String },
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
            .dns_resolver(Arc::new(GuardedResolver::new(Arc::clone(&policy))))
            .user_agent(user_agent)
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .tcp_nodelay(true)
            .build()
            .map_err(ClientError::Build)?;
        Ok(Self { http, policy })
    }

    /// The address policy, shared with the broker publishers so every kind of target obeys
    /// the same `OUTBOX_ALLOW_PRIVATE_TARGETS`.
    pub fn policy(&self) -> Arc<TargetPolicy> {
        Arc::clone(&self.policy)
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

/// `err` and its causes joined by ": " (a cause already quoted by its parent is left out).
pub(crate) fn error_chain(err: &(dyn StdError + 'static)) -> String {
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

// Real servers on loopback: long enough to keep in a file of their own.
#[cfg(test)]
mod tests;
