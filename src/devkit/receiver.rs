//! A real webhook receiver on 127.0.0.1:0 for the demo: it records every request (method,
//! path, headers, body bytes, arrival time, the status it answered), verifies the signature
//! when it knows the path's secret, and answers 200.
//!
//! How it answers is a [`Respond`] chosen at start ([`Receiver::start_responding`]), so the
//! tests and the benchmark script their failures (statuses, delays, `Retry-After`, hangs…)
//! on top of this one recorder without the production crate carrying that scripting.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::webhook::{self, SigningSecret};

/// One request as it arrived.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
    /// Some(result) when the receiver knew the secret for this path.
    pub signature_valid: Option<bool>,
    /// The status the receiver answered (after any delay its [`Respond`] chose); `None`
    /// when it never answers. A delayed answer may still reach the client too late (its
    /// timeout).
    pub status: Option<u16>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// Whether the receiver answered 2xx.
    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|code| (200..300).contains(&code))
    }
}

/// How a receiver answers a request, decided when it arrives.
pub trait Respond: Send + Sync + 'static {
    fn respond(&self, path: &str, body: &[u8]) -> Answer;

    /// Called once a request is recorded (it is then in [`Receiver::received`]), before its
    /// answer goes out: where whoever waits for arrivals is woken.
    fn recorded(&self) {}
}

/// A decided answer: the status to record for the request (`None`: it is never answered)
/// and the response, which may take its time.
pub struct Answer {
    pub status: Option<u16>,
    pub response: BoxFuture<'static, Response>,
}

impl Answer {
    /// `code` at once.
    pub fn status(code: u16) -> Answer {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Answer {
            status: Some(code),
            response: Box::pin(async move { status.into_response() }),
        }
    }
}

/// The demo's answer: 200 to everything.
struct AlwaysOk;

impl Respond for AlwaysOk {
    fn respond(&self, _path: &str, _body: &[u8]) -> Answer {
        Answer::status(200)
    }
}

#[derive(Clone)]
struct Shared {
    received: Arc<Mutex<Vec<Received>>>,
    secrets: Arc<Mutex<HashMap<String, SigningSecret>>>,
    respond: Arc<dyn Respond>,
}

pub struct Receiver {
    pub addr: SocketAddr,
    shared: Shared,
    stop: CancellationToken,
}

impl Receiver {
    /// A receiver that answers 200 to every request.
    pub async fn start() -> std::io::Result<Receiver> {
        Receiver::start_responding(Arc::new(AlwaysOk)).await
    }

    /// A receiver that answers as `respond` decides.
    pub async fn start_responding(respond: Arc<dyn Respond>) -> std::io::Result<Receiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Shared {
            received: Arc::default(),
            secrets: Arc::default(),
            respond,
        };
        let stop = CancellationToken::new();
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let stopped = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
        });
        Ok(Receiver { addr, shared, stop })
    }

    /// URL of a path on this receiver, e.g. `url("/hooks")`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Verify signatures of requests to `path` with this secret.
    pub fn expect_secret(&self, path: &str, secret: &str) -> Result<(), webhook::WebhookError> {
        let secret = SigningSecret::parse(secret)?;
        lock(&self.shared.secrets).insert(path.to_string(), secret);
        Ok(())
    }

    pub fn received(&self, path: &str) -> Vec<Received> {
        lock(&self.shared.received)
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    pub fn received_all(&self) -> Vec<Received> {
        lock(&self.shared.received).clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A poisoned lock still holds what was recorded; a panicking test reports itself.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

async fn handle(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let answer = shared.respond.respond(&path, &body);
    let secret = lock(&shared.secrets).get(&path).cloned();
    let signature_valid = secret.map(|secret| {
        let get = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        };
        webhook::verify(
            &secret,
            get("webhook-id"),
            get("webhook-timestamp"),
            &body,
            get("webhook-signature"),
            chrono::Utc::now().timestamp(),
            300,
        )
        .is_ok()
    });
    lock(&shared.received).push(Received {
        method,
        path,
        headers,
        body,
        at: Instant::now(),
        signature_valid,
        status: answer.status,
    });
    shared.respond.recorded();
    answer.response.await
}
