//! Background upkeep every relay runs, as three independent tasks: renewing its own leases
//! (heartbeat) and re-queueing deliveries whose lease expired (their relay died); refreshing
//! the backlog gauges; and retention.
//!
//! Leases are short and renewed by the heartbeat, so a relay killed with -9 has its work
//! picked up within seconds (lease duration + one heartbeat), not after the slowest timeout;
//! and a live relay's slow request is never taken over, however long the subscriber takes.
//! There is no leader: reclaiming is one guarded UPDATE with SKIP LOCKED, safe to run on
//! every relay at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::db::{Db, DbContext, DbError, sql};
use crate::health::Health;
use crate::metrics::Metrics;

/// Expired leases re-queued per statement; the loop repeats while batches come back full.
const RECLAIM_BATCH: i64 = 1000;
/// A lease older than this is not renewed (see `sql::HEARTBEAT_LEASES`): twice the longest
/// request timeout a subscription may set, plus room for a slow result write.
pub const MAX_LEASE_AGE: Duration = Duration::from_secs(15 * 60);
/// Events deleted per retention statement: small enough that one batch holds its row locks
/// (and those of the cascaded deliveries) only briefly.
const PURGE_BATCH: i64 = 1000;
/// Retention runs this often, and again after [`PURGE_BATCH_PAUSE`] while batches come back full.
const PURGE_INTERVAL: Duration = Duration::from_secs(60);
const PURGE_BATCH_PAUSE: Duration = Duration::from_millis(200);
/// Gauges are refreshed this often (one query), not per scrape.
pub const GAUGE_REFRESH_INTERVAL: Duration = Duration::from_secs(5);

/// Claims whose result the completer could not store and gave up on, as (delivery id,
/// lease token). The heartbeat stops renewing those leases, so they expire and the deliveries
/// are re-queued (sent again: at least once) instead of being renewed, in flight, until the
/// lease age limit. Keyed by the claim's token: a later claim of the same delivery is renewed
/// as usual. Entries older than [`MAX_LEASE_AGE`] are dropped: by then the heartbeat skips
/// the lease anyway.
#[derive(Clone, Debug, Default)]
pub struct GivenUpLeases(Arc<Mutex<HashMap<(i64, i64), Instant>>>);

impl GivenUpLeases {
    pub fn add(&self, delivery_id: i64, lease_token: i64) {
        self.entries()
            .insert((delivery_id, lease_token), Instant::now());
    }

    /// The (delivery ids, lease tokens) still to leave unrenewed, as two arrays.
    fn current(&self) -> (Vec<i64>, Vec<i64>) {
        let mut entries = self.entries();
        entries.retain(|_, given_up_at| given_up_at.elapsed() < MAX_LEASE_AGE);
        entries.keys().copied().unzip()
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<(i64, i64), Instant>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub struct Maintenance {
    /// The relay's pool, and how its statements must be sent.
    pub db: Db,
    pub relay_id: Arc<str>,
    pub lease_duration: Duration,
    pub metrics: Metrics,
    pub health: Health,
    /// Notified when reclaimed deliveries are due, so the deliverer takes them at once.
    pub deliveries_requeued: Arc<Notify>,
    pub given_up: GivenUpLeases,
}

impl Maintenance {
    /// Extends every lease this relay holds. Returns how many.
    pub async fn heartbeat(&self) -> Result<u64, DbError> {
        let client = self.db.client("renewing leases").await?;
        let (given_up_ids, given_up_tokens) = self.given_up.current();
        client
            .execute(
                &sql::HEARTBEAT_LEASES,
                &[
                    &&*self.relay_id,
                    &self.lease_duration.as_secs_f64(),
                    &MAX_LEASE_AGE.as_secs_f64(),
                    &given_up_ids,
                    &given_up_tokens,
                ],
            )
            .await
            .context("renewing leases")
    }

    /// Re-queues deliveries whose lease expired. Returns how many.
    pub async fn reclaim_expired(&self) -> Result<u64, DbError> {
        let client = self.db.client("reclaiming expired leases").await?;
        let mut total = 0;
        loop {
            let reclaimed = client
                .query(&sql::RECLAIM_EXPIRED_LEASES, &[&RECLAIM_BATCH])
                .await
                .context("reclaiming expired leases")?
                .len() as u64;
            total += reclaimed;
            if reclaimed < RECLAIM_BATCH as u64 {
                break;
            }
        }
        if total > 0 {
            self.metrics.leases_reclaimed.inc_by(total);
            self.deliveries_requeued.notify_one();
            tracing::warn!(
                reclaimed = total,
                "re-queued deliveries whose relay stopped renewing its lease"
            );
        }
        Ok(total)
    }

    /// Deletes one batch of finished events older than `retention`. Returns how many.
    pub async fn purge_expired(&self, retention: Duration) -> Result<u64, DbError> {
        let client = self.db.client("purging expired events").await?;
        let purged = client
            .execute(
                &sql::PURGE_EXPIRED_EVENTS,
                &[&retention.as_secs_f64(), &PURGE_BATCH],
            )
            .await
            .context("purging expired events")?;
        self.metrics.events_purged.inc_by(purged);
        if purged > 0 {
            tracing::info!(purged, "deleted finished events past retention");
        }
        Ok(purged)
    }

    /// Readiness requires the schema to be at least what this binary embeds: an older one
    /// lacks columns or functions the relay's statements use.
    pub async fn check_schema(&self) -> Result<bool, DbError> {
        let client = self.db.client("checking the schema version").await?;
        let applied: Option<i32> = client
            .query_one(&sql::APPLIED_MIGRATIONS, &[])
            .await
            .context("checking the schema version")?
            .get(0);
        let wanted = crate::db::embedded_migrations()
            .last()
            .map(|(version, _)| *version)
            .unwrap_or(0);
        let current = applied.map(i64::from).unwrap_or(0) >= wanted;
        self.health
            .schema_current
            .store(current, std::sync::atomic::Ordering::SeqCst);
        if !current {
            tracing::error!(applied = ?applied, wanted, "schema is older than this relay: run outbox-relay migrate");
        }
        Ok(current)
    }

    pub async fn refresh_gauges(&self) -> Result<(), DbError> {
        self.check_schema().await?;
        let client = self.db.client("refreshing gauges").await?;
        let rows = client
            .query(&sql::BACKLOG_GAUGES, &[])
            .await
            .context("reading backlog")?;
        // Subscriptions that were removed must not keep reporting their last value.
        self.metrics.pending_deliveries.reset();
        self.metrics.dead_deliveries.reset();
        self.metrics.subscription_disabled.reset();
        for row in rows {
            let name: String = row.get(0);
            self.metrics
                .pending_deliveries
                .with_label_values(&[&name])
                .set(row.get(1));
            self.metrics
                .dead_deliveries
                .with_label_values(&[&name])
                .set(row.get(2));
            self.metrics
                .subscription_disabled
                .with_label_values(&[&name])
                .set(row.get(3));
        }
        let oldest: f64 = client
            .query_one(&sql::OLDEST_PENDING_SECONDS, &[])
            .await
            .context("reading oldest pending age")?
            .get(0);
        self.metrics.oldest_pending_seconds.set(oldest as i64);
        Ok(())
    }

    /// Renews this relay's leases and re-queues expired ones, every `interval`. A task of
    /// its own: a slow gauge query or retention batch must never delay it, or a live
    /// relay's slow requests would be taken over by another relay once their leases ran out.
    pub async fn run_heartbeat(self: Arc<Self>, interval: Duration, cancel: CancellationToken) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while tick_or_stop(&mut ticks, &cancel).await {
            let result = match self.heartbeat().await {
                Ok(_) => self.reclaim_expired().await.map(|_| ()),
                Err(error) => Err(error),
            };
            if let Err(error) = result {
                self.report(
                    error,
                    "lease heartbeat failed; leases expire unless renewed in time",
                );
            }
        }
    }

    /// Refreshes the backlog gauges (and the schema check) every [`GAUGE_REFRESH_INTERVAL`].
    pub async fn run_gauges(self: Arc<Self>, cancel: CancellationToken) {
        let mut ticks = tokio::time::interval(GAUGE_REFRESH_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while tick_or_stop(&mut ticks, &cancel).await {
            if let Err(error) = self.refresh_gauges().await {
                self.report(error, "refreshing gauges failed");
            }
        }
    }

    /// Deletes finished events older than `retention`: one batch per turn, the next at once
    /// (after a short pause) while batches come back full, else every [`PURGE_INTERVAL`].
    pub async fn run_retention(self: Arc<Self>, retention: Duration, cancel: CancellationToken) {
        loop {
            let pause = match self.purge_expired(retention).await {
                Ok(purged) if purged >= PURGE_BATCH as u64 => PURGE_BATCH_PAUSE,
                Ok(_) => PURGE_INTERVAL,
                Err(error) => {
                    self.report(error, "retention purge failed");
                    PURGE_INTERVAL
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Counts and logs a failed round; the task carries on at its next turn.
    fn report(&self, error: DbError, what_failed: &'static str) {
        self.metrics.count_db_error("maintenance");
        tracing::warn!(
            error = format!("{:#}", anyhow::Error::from(error)),
            "{what_failed}"
        );
    }
}

/// Waits for the next tick; false once `cancel` fires.
async fn tick_or_stop(ticks: &mut tokio::time::Interval, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = ticks.tick() => true,
    }
}
