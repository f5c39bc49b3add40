//! A real webhook receiver on 127.0.0.1:0 for the demo, the tests and the benchmark.
//!
//! It records every request (method, path, headers, body bytes, arrival time), verifies the
//! signature when it knows the secret, and answers from a per-path script: a queue of replies
//! (status, delay, `Retry-After`, redirect, oversized or garbage bodies, hang), then a default.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::deliverer::webhook::{self, SigningSecret};

/// How the receiver answers one request.
#[derive(Clone, Debug)]
pub enum Reply {
    Status(u16),
    /// Status with a `Retry-After` header value.
    RetryAfter(u16, String),
    /// 302 to the given location.
    Redirect(String),
    /// Wait, then answer with the status.
    Delay(Duration, u16),
    /// Never answer (until the client gives up).
    Hang,
    /// Answer the status with a body of this many bytes.
    LargeBody(u16, usize),
    /// 200 with a non-JSON, non-UTF-8 body.
    Garbage,
}

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
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

struct Rule {
    path: String,
    needle: String,
    reply: Reply,
    uses_left: usize,
}

#[derive(Default)]
struct Script {
    /// Checked before the queue; the first matching rule with uses left answers.
    rules: Vec<Rule>,
    queued: HashMap<String, VecDeque<Reply>>,
    defaults: HashMap<String, Reply>,
    secrets: HashMap<String, SigningSecret>,
}

#[derive(Clone, Default)]
struct Shared {
    received: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<Script>>,
    arrived: Arc<Notify>,
}

pub struct Receiver {
    pub addr: SocketAddr,
    shared: Shared,
    stop: CancellationToken,
}

impl Receiver {
    pub async fn start() -> std::io::Result<Receiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Shared::default();
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

    /// Replies used, in order, for the next requests to `path`.
    pub fn queue(&self, path: &str, replies: impl IntoIterator<Item = Reply>) {
        self.script()
            .queued
            .entry(path.to_string())
            .or_default()
            .extend(replies);
    }

    /// Answer the next `times` requests to `path` whose body contains `needle` with `reply`
    /// (`usize::MAX` for always).
    pub fn reply_when_body_contains(&self, path: &str, needle: &str, reply: Reply, times: usize) {
        self.script().rules.push(Rule {
            path: path.to_string(),
            needle: needle.to_string(),
            reply,
            uses_left: times,
        });
    }

    pub fn clear_rules(&self) {
        self.script().rules.clear();
    }

    /// Reply for `path` once its queue is empty (200 unless set).
    pub fn set_default(&self, path: &str, reply: Reply) {
        self.script().defaults.insert(path.to_string(), reply);
    }

    /// Verify signatures of requests to `path` with this secret.
    pub fn expect_secret(&self, path: &str, secret: &str) -> Result<(), webhook::WebhookError> {
        let secret = SigningSecret::parse(secret)?;
        self.script().secrets.insert(path.to_string(), secret);
        Ok(())
    }

    pub fn received(&self, path: &str) -> Vec<Received> {
        self.shared
            .received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    pub fn received_all(&self) -> Vec<Received> {
        self.shared
            .received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until at least `count` requests reached `path`. On timeout the error lists
    /// what did arrive, so a failing test says what happened.
    pub async fn wait_for(
        &self,
        path: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Received>, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let arrived = self.shared.arrived.notified();
            let received = self.received(path);
            if received.len() >= count {
                return Ok(received);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                let summary: Vec<String> = self
                    .received_all()
                    .iter()
                    .map(|r| {
                        format!(
                            "{} {} {}",
                            r.method,
                            r.path,
                            String::from_utf8_lossy(&r.body)
                        )
                    })
                    .collect();
                return Err(format!(
                    "expected {count} requests to {path} within {timeout:?}, got {}: {summary:#?}",
                    received.len()
                ));
            }
        }
    }

    fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.shared.script.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn handle(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let (reply, secret) = {
        let mut script = shared.script.lock().unwrap_or_else(|p| p.into_inner());
        let text = String::from_utf8_lossy(&body);
        let ruled = script
            .rules
            .iter_mut()
            .find(|rule| {
                rule.uses_left > 0 && rule.path == path && text.contains(rule.needle.as_str())
            })
            .map(|rule| {
                rule.uses_left -= 1;
                rule.reply.clone()
            });
        let reply = ruled
            .or_else(|| script.queued.get_mut(&path).and_then(VecDeque::pop_front))
            .or_else(|| script.defaults.get(&path).cloned())
            .unwrap_or(Reply::Status(200));
        (reply, script.secrets.get(&path).cloned())
    };
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
    shared
        .received
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Received {
            method,
            path,
            headers,
            body,
            at: Instant::now(),
            signature_valid,
        });
    shared.arrived.notify_waiters();
    respond(reply).await
}

async fn respond(reply: Reply) -> Response {
    let status =
        |code: u16| StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match reply {
        Reply::Status(code) => status(code).into_response(),
        Reply::RetryAfter(code, value) => {
            (status(code), [(header::RETRY_AFTER, value)]).into_response()
        }
        Reply::Redirect(location) => {
            (StatusCode::FOUND, [(header::LOCATION, location)]).into_response()
        }
        Reply::Delay(wait, code) => {
            tokio::time::sleep(wait).await;
            status(code).into_response()
        }
        Reply::Hang => {
            futures::future::pending::<()>().await;
            StatusCode::OK.into_response()
        }
        Reply::LargeBody(code, size) => {
            (status(code), Body::from(vec![b'x'; size])).into_response()
        }
        Reply::Garbage => (
            StatusCode::OK,
            Body::from(vec![0xff, 0xfe, 0x00, 0x9c, b'{']),
        )
            .into_response(),
    }
}
