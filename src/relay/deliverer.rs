//! Deliveries → HTTP requests. Claims due deliveries with a lease (committed at once: no
//! transaction or row lock is held while a request is in flight), sends each as a signed
//! webhook in its own task, and hands the result to the completer.
//!
//! Limits: the relay-wide semaphore bounds concurrent requests (and so memory); each
//! subscription's `max_in_flight` is enforced across relays by the claim itself; its
//! `rate_limit_per_second` is a token bucket per relay. The deliverer claims at most what it
//! can start now, so nothing waits leased in memory: what a claim may take is set aside first
//! as a [`ClaimBudget`] (`budget.rs`, shared with the dispatcher's leases).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use super::budget::ClaimBudget;
use super::budget::RateLimits;
use super::subscriptions::{Subscription, SubscriptionCache, SubscriptionId};
use crate::backoff::Backoff;
use crate::db::{Db, DbContext, DbError, sql};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::webhook::client::{FailureKind, HttpResult, WebhookClient, WebhookRequest};
use crate::webhook::outcome::{self, Verdict};
use crate::webhook::trace_context::TraceContext;
use crate::webhook::{self, EventForDelivery};

const ERROR_BACKOFF_START: Duration = Duration::from_millis(250);
const ERROR_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One of the relay's `max_concurrency` request slots, held from claim until the result is
/// written. Dropping it frees the slot and wakes the claim loop.
#[derive(Debug)]
pub struct DeliverySlot {
    permit: Option<OwnedSemaphorePermit>,
    freed: Arc<Notify>,
}

impl Drop for DeliverySlot {
    fn drop(&mut self) {
        // Release first, then wake: the woken claim loop must see the permit available.
        drop(self.permit.take());
        self.freed.notify_one();
    }
}

/// One finished attempt, on its way to the completer (which writes it and then drops the
/// slot).
#[derive(Debug)]
pub struct Completion {
    pub delivery_id: i64,
    pub subscription_id: SubscriptionId,
    pub subscription_name: Arc<str>,
    pub verdict: Verdict,
    pub started_at: DateTime<Utc>,
    pub duration: Duration,
    pub event_created_at: DateTime<Utc>,
    /// Set for deliveries of ordered subscriptions.
    pub ordering_key: Option<String>,
    /// The claim this result belongs to (see `sql::COMPLETE_DELIVERIES`).
    pub lease_token: i64,
    /// The request slot, freed when this result is written or given up (by dropping it).
    pub slot: DeliverySlot,
}

/// A leased delivery with what its request is built from.
#[derive(Debug)]
pub struct ClaimedDelivery {
    pub delivery_id: i64,
    pub subscription_id: SubscriptionId,
    /// Attempts made before this one (since creation or the last replay).
    pub attempts_before: u32,
    /// Set for deliveries of ordered subscriptions: finishing one advances its key.
    pub ordering_key: Option<String>,
    /// Identifies this claim; the result is written only while the delivery still holds it.
    pub lease_token: i64,
    pub event: EventForDelivery,
}

impl ClaimedDelivery {
    /// Reads a leased delivery from a row whose columns `first..` are, in order: delivery
    /// id, subscription id, attempts, replay id, then the event's id, type, tenant, source
    /// service, created_at, payload and metadata (as text) and ordering key. The claim and
    /// the leasing dispatch both return them so.
    pub fn from_row(
        row: &tokio_postgres::Row,
        first: usize,
        delivery_ordering_key: Option<String>,
        lease_token: i64,
    ) -> ClaimedDelivery {
        ClaimedDelivery {
            delivery_id: row.get(first),
            subscription_id: SubscriptionId(row.get(first + 1)),
            attempts_before: u32::try_from(row.get::<_, i32>(first + 2)).unwrap_or(0),
            ordering_key: delivery_ordering_key,
            lease_token,
            event: EventForDelivery {
                event_id: row.get(first + 4),
                event_type: row.get(first + 5),
                tenant_id: row.get(first + 6),
                source_service: row.get(first + 7),
                created_at: row.get::<_, DateTime<Utc>>(first + 8),
                payload_json: row.get(first + 9),
                metadata_json: row.get(first + 10),
                ordering_key: row.get(first + 11),
            },
        }
    }
}

/// How a delivery was leased (label of `outbox_deliveries_leased_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeasePath {
    /// Claimed as a due delivery.
    Claim,
    /// Leased by the dispatcher as it created the delivery.
    Dispatch,
}

impl LeasePath {
    pub fn as_str(self) -> &'static str {
        match self {
            LeasePath::Claim => "claim",
            LeasePath::Dispatch => "dispatch",
        }
    }
}

pub struct Deliverer {
    /// The relay's pool, and how its statements must be sent.
    pub db: Db,
    pub subscriptions: SubscriptionCache,
    pub client: WebhookClient,
    /// Long-lived connections to broker targets (subscriptions whose URL names a broker).
    pub brokers: crate::broker::Publishers,
    pub metrics: Metrics,
    pub health: Health,
    pub relay_id: Arc<str>,
    pub lease_duration: Duration,
    pub batch_size: u32,
    /// Relay-wide cap on concurrent requests.
    pub permits: Arc<Semaphore>,
    pub results: mpsc::Sender<Completion>,
    /// Notified whenever a request finishes, so freed capacity is used at once.
    pub slot_freed: Arc<Notify>,
    /// Fires on a hard stop (shutdown grace exceeded, or a simulated crash): requests are
    /// abandoned without a result and their leases released or left to expire.
    pub abandon: CancellationToken,
    pub tasks: TaskTracker,
    rate_limits: RateLimits,
    round: std::sync::atomic::AtomicUsize,
    /// See [`ClaimBudget`]'s `claim_starved`.
    claim_starved: Arc<AtomicBool>,
    /// Notified when a claim found less due than it could send: the dispatcher may fill the
    /// free slots with deliveries it leases as it creates them.
    pub hungry: Arc<Notify>,
}

impl Deliverer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        db: Db,
        subscriptions: SubscriptionCache,
        client: WebhookClient,
        metrics: Metrics,
        health: Health,
        relay_id: Arc<str>,
        lease_duration: Duration,
        batch_size: u32,
        max_concurrency: u32,
        results: mpsc::Sender<Completion>,
        abandon: CancellationToken,
    ) -> Deliverer {
        Deliverer {
            db,
            subscriptions,
            brokers: crate::broker::Publishers::new(client.policy()),
            client,
            metrics,
            health,
            relay_id,
            lease_duration,
            batch_size,
            permits: Arc::new(Semaphore::new(max_concurrency as usize)),
            results,
            slot_freed: Arc::new(Notify::new()),
            abandon,
            tasks: TaskTracker::new(),
            rate_limits: RateLimits::default(),
            round: std::sync::atomic::AtomicUsize::new(0),
            claim_starved: Arc::new(AtomicBool::new(false)),
            hungry: Arc::new(Notify::new()),
        }
    }

    /// One claim round: lease what is due and can start now, and start a request for each.
    /// Returns (claimed, asked): fewer claimed than asked means nothing more is due now.
    pub async fn claim_and_start(self: &Arc<Self>) -> Result<(usize, usize), DbError> {
        let Some(budget) = self.reserve() else {
            // Every slot is taken: by requests (each wakes this loop when it ends) or by a
            // dispatch round's budget (which wakes it when it gives slots back).
            self.claim_starved.store(true, Ordering::Release);
            return Ok((0, 0));
        };
        let asked = budget.slots();
        let claimed = if budget.subscription_ids.is_empty() {
            Vec::new()
        } else {
            self.claim(&budget).await?
        };
        let count = self.start(budget, claimed, LeasePath::Claim);
        if count < asked {
            self.hungry.notify_one();
        }
        Ok((count, asked))
    }

    /// Sets aside what this relay may lease now: its free request slots (at most a batch)
    /// and, per enabled subscription, at most its `max_in_flight` and its rate-limit tokens.
    /// `None` when no slot is free. The database still applies each subscription's
    /// `max_in_flight` across relays when it leases.
    pub fn reserve(&self) -> Option<ClaimBudget> {
        let free = self.free_slots();
        let permits = u32::try_from(free)
            .ok()
            .filter(|free| *free > 0)
            .and_then(|free| self.permits.clone().try_acquire_many_owned(free).ok())?;
        let mut enabled = self.subscriptions.enabled();
        if !enabled.is_empty() {
            // Rotate the order each round so, when capacity is short, no subscription always
            // comes first. (The claim never waits on a lock, so order cannot deadlock.)
            let offset = self.round.fetch_add(1, Ordering::Relaxed) % enabled.len();
            enabled.rotate_left(offset);
        }
        let mut budget = ClaimBudget::new(
            permits,
            enabled.len(),
            &self.rate_limits,
            &self.claim_starved,
            &self.slot_freed,
        );
        self.rate_limits.fill(&mut budget, &enabled, free);
        Some(budget)
    }

    /// This relay's lease owner name and lease duration in seconds, as the lease
    /// statements take them.
    pub fn lease_owner(&self) -> (&str, f64) {
        (&self.relay_id, self.lease_duration.as_secs_f64())
    }

    /// Starts a request for each leased delivery, each with a slot from `budget`; the
    /// unused slots and rate tokens go back with the budget. Returns how many started.
    pub fn start(
        self: &Arc<Self>,
        mut budget: ClaimBudget,
        leased: Vec<ClaimedDelivery>,
        path: LeasePath,
    ) -> usize {
        let count = leased.len();
        if count > 0 {
            self.metrics
                .deliveries_leased
                .with_label_values(&[path.as_str()])
                .inc_by(count as u64);
        }
        for delivery in leased {
            budget.spend_rate_token(delivery.subscription_id);
            let Some(subscription) = self.subscriptions.get(delivery.subscription_id) else {
                // Removed since the claim: its delete trigger already marked the delivery dead.
                continue;
            };
            // The database leases no more than the budget's total, one slot each.
            let Some(permit) = budget.take_slot() else {
                tracing::error!(
                    delivery_id = delivery.delivery_id,
                    "leased more deliveries than request slots set aside; the lease will expire"
                );
                continue;
            };
            let this = Arc::clone(self);
            self.tasks.spawn(async move {
                this.deliver(delivery, subscription, permit).await;
            });
        }
        count
    }

    /// Request slots free now (at most a batch): what a claim could lease.
    fn free_slots(&self) -> usize {
        self.permits
            .available_permits()
            .min(self.batch_size as usize)
    }

    async fn claim(&self, budget: &ClaimBudget) -> Result<Vec<ClaimedDelivery>, DbError> {
        let client = self.db.client("claiming deliveries").await?;
        let total = i32::try_from(budget.slots()).unwrap_or(i32::MAX);
        let (owner, lease_seconds) = self.lease_owner();
        let rows = client
            .query(
                &sql::CLAIM_DELIVERIES,
                &[
                    &budget.subscription_ids,
                    &budget.wanted,
                    &total,
                    &owner,
                    &lease_seconds,
                    &budget.lease_token,
                ],
            )
            .await
            .context("claiming deliveries")?;
        Ok(rows
            .iter()
            .map(|row| ClaimedDelivery::from_row(row, 0, row.get(12), budget.lease_token))
            .collect())
    }

    /// Sends one request and hands its verdict to the completer, with its slot: the slot is
    /// freed when the result is written (or given up), not when the request ends. So the
    /// relay never holds more unrecorded requests than `max_concurrency`, which bounds what
    /// a crash can re-send, and a slow database slows claiming (back-pressure).
    async fn deliver(
        self: Arc<Self>,
        delivery: ClaimedDelivery,
        subscription: Arc<Subscription>,
        permit: OwnedSemaphorePermit,
    ) {
        let slot = DeliverySlot {
            permit: Some(permit),
            freed: self.slot_freed.clone(),
        };
        let started_at = Utc::now();
        let clock = Instant::now();
        let result = tokio::select! {
            _ = self.abandon.cancelled() => {
                drop(slot);
                return;
            }
            result = self.send(&delivery, &subscription) => result,
        };
        let duration = clock.elapsed();
        self.metrics
            .delivery_duration
            .with_label_values(&[&subscription.name])
            .observe(duration.as_secs_f64());
        let verdict = outcome::judge(
            result,
            delivery.attempts_before,
            &subscription.retry_schedule,
            Utc::now(),
            rand::random_range(-1.0..=1.0),
        );
        tracing::debug!(
            delivery_id = delivery.delivery_id,
            event_id = %delivery.event.event_id,
            subscription = %subscription.name,
            attempt = delivery.attempts_before + 1,
            status_code = verdict.status_code,
            outcome = verdict.next.status(),
            duration_ms = duration.as_millis() as u64,
            "attempt finished"
        );
        let completion = Completion {
            delivery_id: delivery.delivery_id,
            subscription_id: subscription.id,
            subscription_name: Arc::from(subscription.name.as_str()),
            verdict,
            started_at,
            duration,
            event_created_at: delivery.event.created_at,
            ordering_key: delivery.ordering_key,
            lease_token: delivery.lease_token,
            slot,
        };
        tokio::select! {
            _ = self.abandon.cancelled() => {}
            _ = self.results.send(completion) => {}
        }
    }

    async fn send(&self, delivery: &ClaimedDelivery, subscription: &Subscription) -> HttpResult {
        let body = match webhook::build_body(&delivery.event) {
            Ok(body) => body,
            Err(error) => {
                return HttpResult::Failed {
                    kind: FailureKind::InvalidRequest,
                    error: format!("building the webhook body: {error}"),
                };
            }
        };
        // The one place a target's kind is chosen: by the URL's scheme, on every attempt, so
        // an edited subscription URL takes effect like any other setting.
        if crate::broker::is_broker_url(subscription.url.expose_secret()) {
            let message = crate::broker::Message {
                event: &delivery.event,
                body,
                timeout: subscription.timeout,
            };
            return self.brokers.publish(&subscription.url, message).await;
        }
        let message_id = delivery.event.event_id.to_string();
        let timestamp = Utc::now().timestamp();
        let signature = webhook::sign(&subscription.secrets, &message_id, timestamp, &body);
        let mut headers = subscription.headers.clone();
        // Read on every attempt and replay, like the body: the producer's trace continues at
        // the subscriber however often the event is sent. Overrides the subscription's own.
        if let Some(trace) = TraceContext::from_metadata(&delivery.event.metadata_json) {
            trace.apply_to(&mut headers);
        }
        headers.push(("webhook-id".to_string(), message_id));
        headers.push(("webhook-timestamp".to_string(), timestamp.to_string()));
        headers.push(("webhook-signature".to_string(), signature));
        self.client
            .send(WebhookRequest {
                url: subscription.url.expose_secret(),
                headers: &headers,
                body,
                timeout: subscription.timeout,
            })
            .await
    }

    /// Claims and starts work until cancelled: at once when woken (new deliveries, freed
    /// capacity, reclaimed leases), else every poll interval (retries coming due).
    pub async fn run(
        self: Arc<Self>,
        wake: Arc<Notify>,
        poll_interval: Duration,
        cancel: CancellationToken,
    ) {
        let mut backoff = Backoff::new(ERROR_BACKOFF_START, ERROR_BACKOFF_MAX);
        loop {
            loop {
                if cancel.is_cancelled() {
                    return;
                }
                match self.claim_and_start().await {
                    Ok((claimed, asked)) => {
                        backoff.reset();
                        if claimed > 0 {
                            tracing::debug!(batch_size = claimed, "claimed deliveries");
                        }
                        if claimed == 0 || claimed < asked {
                            break;
                        }
                    }
                    Err(error) => {
                        self.health.set_database_reachable(false);
                        self.metrics.count_db_error("deliverer");
                        tracing::warn!(
                            error = format!("{:#}", anyhow::Error::from(error)),
                            retry_in = ?backoff.current(),
                            "claiming deliveries failed; will retry"
                        );
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(backoff.next_pause()) => {}
                        }
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = wake.notified() => {}
                _ = self.slot_freed.notified() => {}
                _ = tokio::time::sleep(poll_interval) => {}
            }
        }
    }
}
