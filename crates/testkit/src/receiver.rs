//! The demo's recording receiver ([`outbox_relay::devkit::receiver`]) with scripted answers,
//! for the tests and the benchmark: per path, a queue of [`Reply`]s (status, delay,
//! `Retry-After`, redirect, oversized or garbage bodies, hang), then a default; rules that
//! answer requests whose body contains a needle; and a seeded, pseudo-random share of
//! failures (see [`Receiver::fail_at_random`]) for fault tests that must be reproducible.
//!
//! Everything else (the server, what is recorded, signature checks) is the demo receiver's,
//! reached through `Deref`.

use std::collections::{HashMap, VecDeque};
use std::ops::Deref;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use outbox_relay::devkit::receiver::{self as recorder, Answer, Respond};
use tokio::sync::Notify;

pub use outbox_relay::devkit::receiver::Received;

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

impl Reply {
    /// The status this reply answers with; `None` when it never answers.
    fn status(&self) -> Option<u16> {
        match self {
            Reply::Status(code)
            | Reply::RetryAfter(code, _)
            | Reply::Delay(_, code)
            | Reply::LargeBody(code, _) => Some(*code),
            Reply::Redirect(_) => Some(302),
            Reply::Garbage => Some(200),
            Reply::Hang => None,
        }
    }

    fn into_answer(self) -> Answer {
        Answer {
            status: self.status(),
            response: Box::pin(respond(self)),
        }
    }
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

struct Rule {
    path: String,
    needle: String,
    reply: Reply,
    uses_left: usize,
}

/// A seeded share of a path's requests answered with `reply` (see [`Receiver::fail_at_random`]).
struct RandomFailures {
    seed: u64,
    per_mille: u16,
    reply: Reply,
    /// How many requests with each content key arrived so far (the attempt number).
    seen: HashMap<u64, u64>,
}

impl RandomFailures {
    /// Deterministic in (seed, content, how many times that content arrived before), so a
    /// run's failure pattern does not depend on the order in which requests happen to arrive.
    fn decide(&mut self, body: &[u8]) -> Option<Reply> {
        let content = content_key(body);
        let attempt = self.seen.entry(content).or_default();
        let draw = splitmix64(self.seed ^ splitmix64(content ^ splitmix64(*attempt))) % 1000;
        *attempt += 1;
        (draw < u64::from(self.per_mille)).then(|| self.reply.clone())
    }
}

/// What identifies "the same request" across attempts and runs: a webhook body's `data`
/// (the event payload: test-controlled, unlike the event id and timestamps), else the body.
fn content_key(body: &[u8]) -> u64 {
    let data = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|value| value.get("data").map(ToString::to_string));
    fnv1a(data.as_ref().map_or(body, |data| data.as_bytes()))
}

/// FNV-1a: a stable hash (std's `DefaultHasher` may change between Rust releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// SplitMix64's finaliser: spreads every input bit over the output.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Default)]
struct Script {
    /// Checked before the queue; the first matching rule with uses left answers.
    rules: Vec<Rule>,
    /// Checked after the rules, before the queue.
    random_failures: HashMap<String, RandomFailures>,
    queued: HashMap<String, VecDeque<Reply>>,
    defaults: HashMap<String, Reply>,
}

impl Script {
    fn next_reply(&mut self, path: &str, body: &[u8]) -> Reply {
        let text = String::from_utf8_lossy(body);
        let ruled = self
            .rules
            .iter_mut()
            .find(|rule| {
                rule.uses_left > 0 && rule.path == path && text.contains(rule.needle.as_str())
            })
            .map(|rule| {
                rule.uses_left -= 1;
                rule.reply.clone()
            });
        ruled
            .or_else(|| {
                self.random_failures
                    .get_mut(path)
                    .and_then(|random| random.decide(body))
            })
            .or_else(|| self.queued.get_mut(path).and_then(VecDeque::pop_front))
            .or_else(|| self.defaults.get(path).cloned())
            .unwrap_or(Reply::Status(200))
    }
}

/// The script a receiver answers from, shared with its server, and the wake-up of those
/// waiting for arrivals ([`Receiver::wait_for`]).
#[derive(Clone, Default)]
struct Scripted {
    script: Arc<Mutex<Script>>,
    arrived: Arc<Notify>,
}

impl Scripted {
    /// A poisoned lock still holds the script; a panicking test reports itself.
    fn lock(&self) -> MutexGuard<'_, Script> {
        self.script.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Respond for Scripted {
    fn respond(&self, path: &str, body: &[u8]) -> Answer {
        self.lock().next_reply(path, body).into_answer()
    }

    fn recorded(&self) {
        self.arrived.notify_waiters();
    }
}

/// A recording receiver whose answers the test scripts.
pub struct Receiver {
    recorder: recorder::Receiver,
    script: Scripted,
}

impl Deref for Receiver {
    type Target = recorder::Receiver;

    fn deref(&self) -> &recorder::Receiver {
        &self.recorder
    }
}

impl Receiver {
    /// A receiver answering 200 until told otherwise.
    pub async fn start() -> std::io::Result<Receiver> {
        let script = Scripted::default();
        let recorder = recorder::Receiver::start_responding(Arc::new(script.clone())).await?;
        Ok(Receiver { recorder, script })
    }

    /// Replies used, in order, for the next requests to `path`.
    pub fn queue(&self, path: &str, replies: impl IntoIterator<Item = Reply>) {
        self.script
            .lock()
            .queued
            .entry(path.to_string())
            .or_default()
            .extend(replies);
    }

    /// Answer the next `times` requests to `path` whose body contains `needle` with `reply`
    /// (`usize::MAX` for always).
    pub fn reply_when_body_contains(&self, path: &str, needle: &str, reply: Reply, times: usize) {
        self.script.lock().rules.push(Rule {
            path: path.to_string(),
            needle: needle.to_string(),
            reply,
            uses_left: times,
        });
    }

    /// Answer a pseudo-random share of the requests to `path` (`per_mille` out of 1000) with
    /// `reply`, after the body rules and before the queue. Seeded and keyed by the request's
    /// content and attempt number (see `RandomFailures::decide`), so a given seed fails the
    /// same attempts of the same payloads on every run, whatever order they arrive in.
    pub fn fail_at_random(&self, path: &str, seed: u64, per_mille: u16, reply: Reply) {
        self.script.lock().random_failures.insert(
            path.to_string(),
            RandomFailures {
                seed,
                per_mille: per_mille.min(1000),
                reply,
                seen: HashMap::new(),
            },
        );
    }

    pub fn clear_rules(&self) {
        self.script.lock().rules.clear();
    }

    /// Reply for `path` once its queue is empty (200 unless set).
    pub fn set_default(&self, path: &str, reply: Reply) {
        self.script.lock().defaults.insert(path.to_string(), reply);
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
            // Registered before looking, so an arrival in between still wakes this wait.
            let arrived = self.script.arrived.notified();
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (payload seq, attempt) → failed, for the given arrival order of (seq, event id).
    fn pattern(seed: u64, arrivals: &[(u32, &str)]) -> HashMap<(u32, u32), bool> {
        let mut random = RandomFailures {
            seed,
            per_mille: 200,
            reply: Reply::Status(503),
            seen: HashMap::new(),
        };
        let mut attempts: HashMap<u32, u32> = HashMap::new();
        let mut failed = HashMap::new();
        for (seq, id) in arrivals {
            let body = format!(r#"{{"event_id": "{id}", "data": {{"seq": {seq}}}}}"#);
            let attempt = attempts.entry(*seq).or_default();
            failed.insert((*seq, *attempt), random.decide(body.as_bytes()).is_some());
            *attempt += 1;
        }
        failed
    }

    #[test]
    fn random_failures_depend_on_seed_payload_and_attempt_not_on_arrival_order() {
        let forward: Vec<(u32, &str)> = (0..500).flat_map(|n| [(n, "a"), (n, "a")]).collect();
        // Other event ids (as on another run), reversed arrival order.
        let backward: Vec<(u32, &str)> =
            (0..500).rev().flat_map(|n| [(n, "b"), (n, "c")]).collect();
        let first = pattern(7, &forward);
        assert_eq!(first, pattern(7, &backward));
        let failed = first.values().filter(|f| **f).count();
        assert!((120..=280).contains(&failed), "{failed} of 1000 failed");
        assert_ne!(first, pattern(8, &forward), "another seed, another pattern");
    }
}
