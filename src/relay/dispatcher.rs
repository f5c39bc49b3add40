//! Events → deliveries. Wakes on NOTIFY (or the fallback poll), claims due events in
//! batches with `FOR UPDATE SKIP LOCKED`, fans each out to every matching enabled
//! subscription and marks it dispatched, one statement (one transaction) per batch.
//!
//! Fan-out is quick database work; it never waits on the network, so a slow subscriber
//! never holds up dispatch.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::subscriptions::SubscriptionCache;
use crate::backoff::Backoff;
use crate::db::wake_gate::WakeGate;
use crate::db::{Db, DbClient, DbContext, DbError, sql};
use crate::health::Health;
use crate::metrics::Metrics;

/// After a database error, wait this long before the next try (doubling up to the max).
const ERROR_BACKOFF_START: Duration = Duration::from_millis(250);
const ERROR_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// First re-check of a pending ordered-dispatch probe. Short, because the probe normally
/// completes once the transactions running at probe time commit (milliseconds).
const ORDERED_FOLLOW_UP_START: Duration = Duration::from_millis(10);
/// Look-again interval while the wake-up gate is asked for but not yet held: from the busy
/// poll interval (at least this, so OUTBOX_BUSY_POLL_INTERVAL=0 does not spin) doubling to
/// the max while a producer transaction keeps the gate taken.
const GATE_PENDING_POLL_MIN: Duration = Duration::from_millis(1);
const GATE_PENDING_POLL_MAX: Duration = Duration::from_millis(100);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DispatchedBatch {
    /// Events fanned out to unordered subscriptions (and marked dispatched).
    pub events: u64,
    /// Events the ordered pass moved its cursor over.
    pub ordered_events: u64,
    /// Ordered fan-out is waiting for older producer transactions to end; run again soon.
    pub ordered_probe_pending: bool,
    pub deliveries: u64,
}

pub struct Dispatcher {
    /// The relay's pool, and how its statements must be sent.
    pub db: Db,
    pub batch_size: u32,
    pub metrics: Metrics,
    pub health: Health,
    /// Notified when new deliveries exist, so the deliverer claims them at once.
    pub deliveries_created: Arc<Notify>,
    /// Tells whether any subscription is ordered: without one, the ordered pass (two more
    /// round trips, one of them a write) runs once per poll interval instead of every round,
    /// only to keep its cursor moving (retention and a future ordered subscription use it).
    pub subscriptions: SubscriptionCache,
    /// How producers are asked to NOTIFY (see `db::wake_gate`); `None` in poll-only mode.
    pub wake_gate: Option<WakeGate>,
    /// While busy, look for new events this often instead of waiting for a NOTIFY; zero
    /// keeps the gate always asked for (producers always NOTIFY).
    pub busy_poll_interval: Duration,
    /// Busy lasts this long after the last event found, and two wake-ups this close together
    /// start it.
    pub busy_linger: Duration,
}

impl Dispatcher {
    /// Dispatches one batch, with the ordered pass. The seam tests step instead of waiting
    /// for timers.
    pub async fn run_once(&self) -> Result<DispatchedBatch, DbError> {
        self.run_round(true).await
    }

    /// One batch of unordered fan-out, and of ordered fan-out when `with_ordered`.
    async fn run_round(&self, with_ordered: bool) -> Result<DispatchedBatch, DbError> {
        let client = self.db.client("dispatching events").await?;
        let limit = i32::try_from(self.batch_size).unwrap_or(i32::MAX);
        let row = client
            .query_one(&sql::DISPATCH_EVENTS, &[&limit])
            .await
            .context("dispatching events")?;
        let mut batch = DispatchedBatch {
            events: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
            deliveries: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
            ordered_events: 0,
            ordered_probe_pending: false,
        };
        self.metrics.events_dispatched.inc_by(batch.events);
        // Wake the deliverer now, not after the ordered pass's two round trips: those
        // deliveries are committed and due, and every event would otherwise wait for them.
        if batch.deliveries > 0 {
            self.deliveries_created.notify_one();
        }
        if with_ordered {
            let (events, deliveries, probe_pending) = self.ordered_pass(&client, limit).await?;
            batch.ordered_events = events;
            batch.ordered_probe_pending = probe_pending;
            batch.deliveries += deliveries;
            if deliveries > 0 {
                self.deliveries_created.notify_one();
            }
        }
        Ok(batch)
    }

    /// Ordered subscriptions get their deliveries from a second, commit-order-safe pass.
    /// Returns (events passed, deliveries created, probe pending).
    async fn ordered_pass(
        &self,
        client: &DbClient,
        limit: i32,
    ) -> Result<(u64, u64, bool), DbError> {
        let row = client
            .query_one(&sql::DISPATCH_ORDERED, &[&limit])
            .await
            .context("dispatching events to ordered subscriptions")?;
        let mut probe_pending: bool = row.get(2);
        if !probe_pending {
            // A statement of its own (autocommit): the probe's xid must be assigned after
            // it reads the sequence, in a transaction that had none before. Through a
            // transaction pooler an autocommit statement is a transaction of its own too.
            probe_pending = client
                .query_one(&sql::START_ORDERED_PROBE, &[])
                .await
                .context("starting an ordered-dispatch probe")?
                .get(0);
        }
        Ok((
            u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
            u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
            probe_pending,
        ))
    }

    /// Dispatches until nothing is due (with the ordered pass when `with_ordered`). Returns
    /// how many events went out, and whether ordered fan-out has a probe waiting.
    pub async fn drain(&self, with_ordered: bool) -> Result<(u64, bool), DbError> {
        let mut total = 0;
        loop {
            let batch = self.run_round(with_ordered).await?;
            total += batch.events;
            let full = u64::from(self.batch_size);
            if batch.events < full && batch.ordered_events < full {
                return Ok((total, batch.ordered_probe_pending));
            }
        }
    }

    pub async fn run(self, wake: Arc<Notify>, poll_interval: Duration, cancel: CancellationToken) {
        let mut backoff = Backoff::new(ERROR_BACKOFF_START, ERROR_BACKOFF_MAX);
        let mut follow_up = Backoff::new(ORDERED_FOLLOW_UP_START, poll_interval);
        let mut ordered_pass_at: Option<tokio::time::Instant> = None;
        let mut busy = BusySpell::new(self.busy_poll_interval, self.busy_linger);
        let mut gate_pending = Backoff::new(
            GATE_PENDING_POLL_MIN.max(self.busy_poll_interval),
            GATE_PENDING_POLL_MAX,
        );
        loop {
            let mut wait = poll_interval;
            // With no ordered subscription enabled, the ordered pass only keeps its cursor
            // near the newest events (where an ordered subscription created later starts),
            // so once per poll interval is enough. Run on every round (producers at a steady
            // rate keep a probe pending) it took a tenth of the relay's database time.
            let ordered_enabled = self.subscriptions.any_enabled_ordered();
            let with_ordered =
                ordered_enabled || ordered_pass_at.is_none_or(|at| at.elapsed() >= poll_interval);
            if with_ordered {
                ordered_pass_at = Some(tokio::time::Instant::now());
            }
            match self.drain(with_ordered).await {
                Ok((events, probe_pending)) => {
                    // A pending probe usually completes as soon as the producers that were
                    // mid-transaction commit: look again shortly, backing off towards the
                    // poll interval while an old transaction holds it.
                    if probe_pending && ordered_enabled {
                        wait = follow_up.next_pause();
                    } else {
                        follow_up.reset();
                    }
                    self.health.set_database_reachable(true);
                    backoff.reset();
                    if events > 0 {
                        tracing::debug!(batch_size = events, "dispatched events");
                        busy.found_work();
                    }
                }
                Err(error) => {
                    self.health.set_database_reachable(false);
                    self.metrics.count_db_error("dispatcher");
                    tracing::warn!(
                        error = format!("{:#}", anyhow::Error::from(error)),
                        retry_in = ?backoff.current(),
                        "dispatch failed; will retry"
                    );
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next_pause()) => {}
                    }
                    continue;
                }
            }
            let busy_poll = busy.is_on();
            if let Some(gate) = &self.wake_gate {
                // Busy: producers need not NOTIFY, the next look comes within the busy poll.
                // Idle: ask for NOTIFYs; the grant (once producers that skipped theirs have
                // ended) wakes this loop for the one more look that makes sleeping safe.
                if busy_poll {
                    gate.release();
                } else {
                    gate.request();
                }
            }
            if busy_poll {
                wait = wait.min(self.busy_poll_interval);
            }
            // Asked for the gate but not yet holding it (nor covered by another relay's):
            // producers may still be skipping their NOTIFY, so keep looking, less often the
            // longer a producer transaction keeps the gate taken. (A busy spell looks every
            // busy poll anyway, and starts the next wait for the gate from the shortest.)
            if !busy_poll
                && self
                    .wake_gate
                    .as_ref()
                    .is_some_and(|gate| !gate.may_sleep())
            {
                wait = wait.min(gate_pending.next_pause());
            } else {
                gate_pending.reset();
            }
            let reason = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = wake.notified() => {
                    busy.woken();
                    Some("notify")
                }
                _ = granted(self.wake_gate.as_ref()) => None,
                // A short ordered-probe follow-up or busy poll is not a wake-up from idle:
                // counting it as a poll would hide how often the fallback poll finds work.
                _ = tokio::time::sleep(wait) => (wait == poll_interval).then_some("poll"),
            };
            if let Some(reason) = reason {
                self.metrics.wakeups.with_label_values(&[reason]).inc();
            }
        }
    }
}

/// Resolves when the gate is granted; never without a gate.
async fn granted(gate: Option<&WakeGate>) {
    match gate {
        Some(gate) => gate.granted().await,
        None => std::future::pending().await,
    }
}

/// Whether the dispatcher is in a busy spell: events keep coming, so it looks for them every
/// busy poll interval and producers skip NOTIFY. A spell starts when two wake-ups come
/// within `linger` of each other (one event now and then keeps the NOTIFY path, which costs
/// no polling), lasts while looks keep finding events, and ends `linger` after the last.
struct BusySpell {
    enabled: bool,
    linger: Duration,
    until: Option<tokio::time::Instant>,
    last_wake: Option<tokio::time::Instant>,
}

impl BusySpell {
    fn new(busy_poll_interval: Duration, linger: Duration) -> BusySpell {
        BusySpell {
            enabled: !busy_poll_interval.is_zero() && !linger.is_zero(),
            linger,
            until: None,
            last_wake: None,
        }
    }

    fn is_on(&self) -> bool {
        self.until
            .is_some_and(|until| tokio::time::Instant::now() < until)
    }

    /// A look found events: a spell under way goes on.
    fn found_work(&mut self) {
        if self.is_on() {
            self.until = Some(tokio::time::Instant::now() + self.linger);
        }
    }

    /// A NOTIFY woke the dispatcher.
    fn woken(&mut self) {
        let now = tokio::time::Instant::now();
        if self.enabled
            && self
                .last_wake
                .is_some_and(|last| now.duration_since(last) < self.linger)
        {
            self.until = Some(now + self.linger);
        }
        self.last_wake = Some(now);
    }
}
