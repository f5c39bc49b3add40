//! Broker targets (SPEC "Broker targets"): a subscription whose `url` names a NATS subject, a
//! Redis stream, a RabbitMQ exchange or a Kafka topic gets each event published there instead
//! of POSTed.
//!
//! This module owns the URL forms (parsed in `target.rs`, checked again by the `url_scheme`
//! constraint in SQL), the SSRF check on the broker's resolved address, and [`Publishers`]: one
//! long-lived connection per broker (not per delivery), shared by every delivery task, which
//! publishes concurrently on it (the brokers' clients multiplex and pipeline). It never
//! decides what an outcome means for the delivery: a publish ends as an
//! [`HttpResult`](crate::webhook::client::HttpResult), judged by
//! [`crate::webhook::outcome::judge`] like a webhook's answer, so retries, dead deliveries and
//! attempt rows work the same for every target.
//!
//! A broken or refused connection is a failed attempt, never an error of the relay: the next
//! attempt reconnects, no sooner than a backoff after the last failed connect (so a broker that
//! is down is not hammered by every due delivery).

mod amqp;
mod kafka;
mod nats;
mod redis;
mod target;
mod trust;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::secret::SecretUrl;
use crate::webhook::EventForDelivery;
use crate::webhook::client::{FailureKind, HttpResult};
use crate::webhook::target_policy::{ALLOW_HINT, TargetPolicy};

// The URL forms moved to `target.rs`; re-exported so callers (and the kind modules, through
// `super::`) name them as before.
pub use self::target::{Endpoint, SCHEMES, Server, Target, TargetError, is_broker_url};
use self::target::{UrlParts, decode};
pub use self::trust::{TlsTrust, TlsTrustError};

/// Bounds one connection set-up (DNS, TCP, the protocol's handshake); the publish's own
/// timeout still cuts it short when smaller, as a webhook's does.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed connect before the next try, doubling to the cap. Attempts made in
/// between fail at once with the last connect error. No measurement behind the numbers: short
/// enough that a restarted broker is used again within seconds, long enough that a dead one
/// costs one connect per second at most.
const RECONNECT_BACKOFF_START: Duration = Duration::from_millis(100);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Parsed URLs kept; past this the cache is emptied (URLs of changed or removed subscriptions
/// would otherwise pile up). Connections are not affected.
const ROUTE_CACHE_MAX: usize = 4096;

/// One event to publish.
pub struct Message<'a> {
    pub event: &'a EventForDelivery,
    /// The webhook body, byte for byte.
    pub body: Bytes,
    /// The subscription's `timeout`: connect (when needed), publish and the broker's confirm.
    pub timeout: Duration,
}

impl Message<'_> {
    /// `(name, value)` of the identity and metadata carried beside the body, in the SPEC's
    /// spelling for headers; values made safe for every broker's header encoding (no control
    /// characters: a CR/LF inside a NATS header would end it).
    fn optional_headers(&self) -> Vec<(&'static str, String)> {
        let event = self.event;
        [
            ("tenant-id", event.tenant_id.as_deref()),
            ("ordering-key", event.ordering_key.as_deref()),
            ("source-service", event.source_service.as_deref()),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.map(|value| (name, header_safe(value))))
        .collect()
    }
}

/// `value` with control characters replaced by spaces.
fn header_safe(value: &str) -> String {
    value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn failed(kind: FailureKind, error: impl Into<String>) -> HttpResult {
    HttpResult::Failed {
        kind,
        error: error.into(),
    }
}

/// Whether a connection is to be replaced. Set when a publish failed on the connection, or
/// when its future was dropped before the broker answered (its timeout): a request lost on
/// the way leaves a pipelined connection waiting for an answer that never comes, so it is
/// suspect too. The link makes a new connection on the next attempt. Cloning shares it.
#[derive(Clone, Debug, Default)]
pub(super) struct BrokenFlag(Arc<std::sync::atomic::AtomicBool>);

impl BrokenFlag {
    pub(super) fn is_set(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sets the flag unless [`AwaitingAnswer::answered`] is called first.
    pub(super) fn awaiting_answer(&self) -> AwaitingAnswer<'_> {
        AwaitingAnswer(Some(self))
    }
}

/// A request sent on a connection, not answered yet: see [`BrokenFlag::awaiting_answer`].
pub(super) struct AwaitingAnswer<'a>(Option<&'a BrokenFlag>);

impl AwaitingAnswer<'_> {
    /// The broker answered: the connection is not suspect.
    pub(super) fn answered(mut self) {
        self.0 = None;
    }
}

impl Drop for AwaitingAnswer<'_> {
    fn drop(&mut self) {
        if let Some(flag) = self.0 {
            flag.set();
        }
    }
}

/// Resolves the broker's host and keeps only the addresses the [`TargetPolicy`] permits: the
/// connection is then made to that address, so a name cannot be re-pointed between check and
/// connect. With TLS (`rediss://`, `amqps://`) the certificate is still verified against the
/// name in the URL, as for a webhook's `https://`.
async fn resolve(policy: &TargetPolicy, endpoint: &Endpoint) -> Result<SocketAddr, HttpResult> {
    let resolved: Vec<SocketAddr> =
        tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|error| {
                failed(
                    FailureKind::Connect,
                    format!("resolving {endpoint}: {error}"),
                )
            })?
            .collect();
    if let Some(permitted) = resolved.iter().find(|addr| policy.permits(addr.ip())) {
        return Ok(*permitted);
    }
    let addrs = resolved
        .iter()
        .map(|a| a.ip().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    Err(failed(
        FailureKind::ForbiddenTarget,
        format!(
            "refused: {} resolves only to forbidden addresses ({addrs}); {ALLOW_HINT}",
            endpoint.host
        ),
    ))
}

/// A long-lived connection to one broker, made on first use and remade after it broke, no
/// sooner than a backoff after the last failed connect.
pub(crate) struct Link<C> {
    /// What it connects to, for logs: kind and endpoint, never credentials.
    label: String,
    state: tokio::sync::Mutex<LinkState<C>>,
}

struct LinkState<C> {
    connection: Option<C>,
    /// When a publish last asked for the connection: a link unused for
    /// `OUTBOX_BROKER_IDLE_TIMEOUT` is closed (see [`Publishers::close_idle`]).
    last_used: Instant,
    backoff: Backoff,
    /// After a failed connect: no new try before then; the attempts in between fail with
    /// `last_error`.
    retry_at: Option<Instant>,
    last_error: String,
}

impl<C: Clone> Link<C> {
    fn new(label: String) -> Link<C> {
        Link {
            label,
            state: tokio::sync::Mutex::new(LinkState {
                connection: None,
                last_used: Instant::now(),
                backoff: Backoff::new(RECONNECT_BACKOFF_START, RECONNECT_BACKOFF_MAX),
                retry_at: None,
                last_error: String::new(),
            }),
        }
    }

    /// The connection, after (re)connecting with `connect` when there is none or `usable` says
    /// the one held is finished. Concurrent callers wait for one connect instead of each
    /// opening their own.
    async fn get<F, Fut>(&self, usable: impl Fn(&C) -> bool, connect: F) -> Result<C, HttpResult>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, HttpResult>>,
    {
        let mut state = self.state.lock().await;
        state.last_used = Instant::now();
        if let Some(connection) = &state.connection {
            if usable(connection) {
                return Ok(connection.clone());
            }
            state.connection = None;
        }
        let now = Instant::now();
        if let Some(retry_at) = state.retry_at
            && now < retry_at
        {
            return Err(failed(
                FailureKind::Connect,
                format!(
                    "{} (next reconnect in {} ms)",
                    state.last_error,
                    retry_at.duration_since(now).as_millis()
                ),
            ));
        }
        let outcome = match tokio::time::timeout(CONNECT_TIMEOUT, connect()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(failed(
                FailureKind::Timeout,
                format!("connecting timed out after {CONNECT_TIMEOUT:?}"),
            )),
        };
        match outcome {
            Ok(connection) => {
                // Once per (re)connect, not per delivery.
                tracing::info!(broker = %self.label, "connected to broker");
                state.connection = Some(connection.clone());
                state.backoff.reset();
                state.retry_at = None;
                Ok(connection)
            }
            Err(failure) => {
                if let HttpResult::Failed { error, .. } = &failure {
                    state.last_error.clone_from(error);
                }
                let pause = state.backoff.next_pause();
                // At most once per backoff step: the deliveries failing meanwhile say so in
                // their attempts. The text names the endpoint, never the credentials.
                tracing::warn!(
                    broker = %self.label,
                    error = %state.last_error,
                    retry_in_ms = pause.as_millis() as u64,
                    "connecting to broker failed; its deliveries fail until it is back"
                );
                state.retry_at = Some(Instant::now() + pause);
                Err(failure)
            }
        }
    }
}

impl<C> Link<C> {
    /// Whether no publish asked for the connection for `idle` before `now`. A link being
    /// connected (its lock taken) is in use.
    fn idle_for(&self, idle: Duration, now: Instant) -> bool {
        self.state
            .try_lock()
            .is_ok_and(|state| now.saturating_duration_since(state.last_used) >= idle)
    }
}

/// Takes out of `links` those idle for `idle` that nothing else holds (no cached route, no
/// publish under way) and returns them: dropping them closes their connections, which the
/// caller does after the map's lock is released (a Kafka producer's drop waits for its
/// threads).
fn take_idle_links<C>(
    links: &Mutex<HashMap<String, Arc<Link<C>>>>,
    idle: Duration,
    now: Instant,
) -> Vec<Arc<Link<C>>> {
    let mut taken = Vec::new();
    lock(links).retain(|_, link| {
        let take = Arc::strong_count(link) == 1 && link.idle_for(idle, now);
        if take {
            tracing::info!(broker = %link.label, idle = ?idle, "closing an idle broker connection");
            taken.push(Arc::clone(link));
        }
        !take
    });
    taken
}

/// A parsed target and the connection that serves it.
enum Route {
    Nats(nats::Target, Arc<Link<nats::Connection>>),
    Redis(redis::Target, Arc<Link<redis::Connection>>),
    Amqp(amqp::Target, Arc<Link<amqp::Connection>>),
    Kafka(kafka::Target, Arc<Link<kafka::Connection>>),
}

/// Every broker connection of one relay, keyed by what a connection is for (broker address,
/// credentials and, where it is part of the connection, the database or vhost). Cloning shares
/// them.
#[derive(Clone)]
pub struct Publishers {
    inner: Arc<Inner>,
}

struct Inner {
    policy: Arc<TargetPolicy>,
    trust: TlsTrust,
    /// Full target URL (secret: it may hold a password) → its route.
    routes: Mutex<HashMap<String, Arc<Route>>>,
    nats: Mutex<HashMap<String, Arc<Link<nats::Connection>>>>,
    redis: Mutex<HashMap<String, Arc<Link<redis::Connection>>>>,
    amqp: Mutex<HashMap<String, Arc<Link<amqp::Connection>>>>,
    kafka: Mutex<HashMap<String, Arc<Link<kafka::Connection>>>>,
}

impl std::fmt::Debug for Publishers {
    // The maps' keys hold passwords.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publishers").finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only whole inserts happen under these locks: a panic cannot leave a map half-written.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn link<C: Clone>(
    links: &Mutex<HashMap<String, Arc<Link<C>>>>,
    key: String,
    label: impl FnOnce() -> String,
) -> Arc<Link<C>> {
    Arc::clone(
        lock(links)
            .entry(key)
            .or_insert_with(|| Arc::new(Link::new(label()))),
    )
}

impl Route {
    fn idle_for(&self, idle: Duration, now: Instant) -> bool {
        match self {
            Route::Nats(_, link) => link.idle_for(idle, now),
            Route::Redis(_, link) => link.idle_for(idle, now),
            Route::Amqp(_, link) => link.idle_for(idle, now),
            Route::Kafka(_, link) => link.idle_for(idle, now),
        }
    }
}

impl Publishers {
    /// Closes the connections no publish used for `idle` (a subscription removed, moved to
    /// another broker, or quiet): without this each broker a relay ever published to would
    /// keep a connection, and librdkafka its threads, for the relay's lifetime. A target
    /// used again reconnects on its next publish.
    pub fn close_idle(&self, idle: Duration) {
        let now = Instant::now();
        // Routes first: a cached route holds its link.
        lock(&self.inner.routes).retain(|_, route| !route.idle_for(idle, now));
        let inner = &self.inner;
        // Dropping these closes their connections, here (after the maps' locks).
        take_idle_links(&inner.nats, idle, now);
        take_idle_links(&inner.redis, idle, now);
        take_idle_links(&inner.amqp, idle, now);
        let kafka = take_idle_links(&inner.kafka, idle, now);
        if !kafka.is_empty() {
            // Dropping a producer joins librdkafka's threads: not on a runtime worker.
            tokio::task::spawn_blocking(move || drop(kafka));
        }
    }

    /// [`Publishers::close_idle`] every `idle / 2` (at most every minute) until `stop`.
    pub async fn close_idle_connections(self, idle: Duration, stop: CancellationToken) {
        let every = (idle / 2).min(Duration::from_secs(60));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => self.close_idle(idle),
            }
        }
    }

    /// No connection is opened here: each is made when its first event is published.
    pub fn new(policy: Arc<TargetPolicy>, trust: TlsTrust) -> Publishers {
        Publishers {
            inner: Arc::new(Inner {
                policy,
                trust,
                routes: Mutex::new(HashMap::new()),
                nats: Mutex::new(HashMap::new()),
                redis: Mutex::new(HashMap::new()),
                amqp: Mutex::new(HashMap::new()),
                kafka: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Publishes one event to the broker `url` names and says what happened: published (with
    /// the broker's receipt), or failed and why. Bounded by `message.timeout` as a whole.
    pub async fn publish(&self, url: &SecretUrl, message: Message<'_>) -> HttpResult {
        let route = match self.route(url) {
            Ok(route) => route,
            Err(error) => return failed(FailureKind::InvalidRequest, error.to_string()),
        };
        let timeout = message.timeout;
        let policy = &self.inner.policy;
        let trust = &self.inner.trust;
        let publishing = async {
            // Err: the publish did not get as far as the broker's answer (no connection).
            let result = match &*route {
                Route::Nats(target, link) => nats::publish(policy, target, link, &message).await,
                Route::Redis(target, link) => {
                    redis::publish(policy, trust, target, link, &message).await
                }
                Route::Amqp(target, link) => {
                    amqp::publish(policy, trust, target, link, &message).await
                }
                Route::Kafka(target, link) => kafka::publish(policy, target, link, &message).await,
            };
            result.unwrap_or_else(|failure| failure)
        };
        match tokio::time::timeout(timeout, publishing).await {
            Ok(result) => result,
            Err(_) => failed(
                FailureKind::Timeout,
                format!(
                    "{}: no confirm within {timeout:?}",
                    match &*route {
                        Route::Nats(..) => "nats",
                        Route::Redis(..) => "redis",
                        Route::Amqp(..) => "amqp",
                        Route::Kafka(..) => "kafka",
                    }
                ),
            ),
        }
    }

    fn route(&self, url: &SecretUrl) -> Result<Arc<Route>, TargetError> {
        let raw = url.expose_secret();
        if let Some(route) = lock(&self.inner.routes).get(raw) {
            return Ok(Arc::clone(route));
        }
        let target = Target::parse(raw)?;
        tracing::debug!(url = %url, kind = target.kind(), "new broker route");
        let route = Arc::new(match target {
            Target::Nats(target) => {
                let link = link(&self.inner.nats, target.connection_key(), || {
                    format!("nats://{}", target.server.endpoint)
                });
                Route::Nats(target, link)
            }
            Target::Redis(target) => {
                let link = link(&self.inner.redis, target.connection_key(), || {
                    format!("redis://{}", target.server.endpoint)
                });
                Route::Redis(target, link)
            }
            Target::Amqp(target) => {
                let link = link(&self.inner.amqp, target.connection_key(), || {
                    format!("amqp://{}", target.server.endpoint)
                });
                Route::Amqp(target, link)
            }
            Target::Kafka(target) => {
                let link = link(&self.inner.kafka, target.connection_key(), || {
                    format!("kafka://{}", target.label())
                });
                Route::Kafka(target, link)
            }
        });
        let mut routes = lock(&self.inner.routes);
        if routes.len() >= ROUTE_CACHE_MAX {
            routes.clear();
        }
        routes.insert(raw.to_owned(), Arc::clone(&route));
        Ok(route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link is closed once idle for the timeout and held by nothing else; one still held
    /// (a cached route, a publish under way) or used since stays.
    #[tokio::test]
    async fn idle_links_nothing_holds_are_closed() {
        let links: Mutex<HashMap<String, Arc<Link<u32>>>> = Mutex::default();
        let connect = || async { Ok(1) };
        for name in ["idle", "held", "used"] {
            let link = link(&links, name.to_owned(), || name.to_owned());
            link.get(|_| true, connect).await.expect("connects");
        }
        let held = Arc::clone(&lock(&links)["held"]);
        let idle = Duration::from_secs(60);
        let later = Instant::now() + idle;
        assert!(
            take_idle_links(&links, idle, Instant::now()).is_empty(),
            "nothing idle yet"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        let used = Arc::clone(&lock(&links)["used"]);
        used.get(|_| true, connect).await.expect("connected");
        drop(used);
        // Idle for 60 s at `later` measured from the first gets, not from the second use.
        let taken = take_idle_links(&links, idle - Duration::from_millis(10), later);
        let taken: Vec<&str> = taken.iter().map(|link| link.label.as_str()).collect();
        assert_eq!(taken, ["idle"]);
        let left: std::collections::BTreeSet<String> = lock(&links).keys().cloned().collect();
        assert_eq!(left, ["held", "used"].map(str::to_owned).into());
        drop(held);
    }

    /// After a failed connect, attempts fail at once (no connect) until the backoff has
    /// passed; then one connect is tried again, and a success is kept and shared.
    #[tokio::test]
    async fn a_failed_connect_backs_off_and_a_good_connection_is_reused() {
        let link: Link<u32> = Link::new("test".to_owned());
        let connects = std::sync::atomic::AtomicU32::new(0);
        let refuse = || async {
            connects.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(failed(FailureKind::Connect, "refused"))
        };
        let accept = || async {
            connects.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(7)
        };
        assert!(link.get(|_| true, refuse).await.is_err());
        let during_backoff = link.get(|_| true, accept).await;
        match during_backoff {
            Err(HttpResult::Failed { kind, error }) => {
                assert_eq!(kind, FailureKind::Connect);
                assert!(error.starts_with("refused (next reconnect in "), "{error}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(connects.load(std::sync::atomic::Ordering::SeqCst), 1);
        tokio::time::sleep(RECONNECT_BACKOFF_START + Duration::from_millis(20)).await;
        assert_eq!(link.get(|_| true, accept).await.ok(), Some(7));
        assert_eq!(link.get(|_| true, refuse).await.ok(), Some(7), "kept");
        assert_eq!(connects.load(std::sync::atomic::Ordering::SeqCst), 2);
        // A connection its client reports finished is replaced.
        assert!(link.get(|_| false, refuse).await.is_err());
        assert_eq!(connects.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[test]
    fn header_values_lose_control_characters() {
        assert_eq!(header_safe("a\r\nb\tc"), "a  b c");
    }
}
