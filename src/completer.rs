//! Writes delivery results back in batches: one statement per flush updates the deliveries,
//! records the attempts and disables subscriptions that answered 410.
//!
//! Results arrive over a bounded channel; when the database is slow the channel fills and
//! delivery tasks wait to hand over their result (back-pressure), so memory stays bounded.
//! Every write is guarded by the lease owner, so a result that arrives after its lease was
//! reclaimed by another relay changes nothing. A longer flush interval means fewer writes but
//! a wider window in which a crash re-sends requests whose results were not yet written.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::PoolMode;
use crate::db::{DbContext, DbError, query, sql};
use crate::deliverer::outcome::{NextState, Verdict};
use crate::metrics::{Metrics, OutcomeLabel};
use crate::subscriptions::SubscriptionId;

/// Results a full channel holds before delivery tasks wait.
pub const CHANNEL_CAPACITY: usize = 4096;

const RETRY_BACKOFF_START: Duration = Duration::from_millis(100);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// After shutdown began, a flush that keeps failing is abandoned after this many tries: the
/// leases then expire and another relay re-sends those deliveries (at least once).
const SHUTDOWN_FLUSH_TRIES: u32 = 5;

/// One finished attempt.
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
    /// The request slot, freed when this result is written or given up (by dropping it).
    pub slot: crate::deliverer::DeliverySlot,
}

pub struct Completer {
    pub pool: Pool,
    /// Whether pooled connections may hold prepared statements.
    pub pool_mode: PoolMode,
    pub relay_id: Arc<str>,
    pub metrics: Metrics,
    pub flush_interval: Duration,
    pub batch_size: usize,
}

impl Completer {
    /// Runs until every sender is dropped and the last results are written. It is not
    /// cancelled with the rest of the relay: the final flush must happen during shutdown.
    pub async fn run(self, mut results: mpsc::Receiver<Completion>, shutdown: CancellationToken) {
        let mut batch = Vec::with_capacity(self.batch_size);
        loop {
            let Some(first) = results.recv().await else {
                return;
            };
            batch.push(first);
            // Wait a little for more, so a burst becomes one statement.
            let deadline = tokio::time::Instant::now() + self.flush_interval;
            while batch.len() < self.batch_size {
                match tokio::time::timeout_at(deadline, results.recv()).await {
                    Ok(Some(completion)) => batch.push(completion),
                    Ok(None) | Err(_) => break,
                }
            }
            self.flush_with_retries(&mut batch, &shutdown).await;
        }
    }

    async fn flush_with_retries(&self, batch: &mut Vec<Completion>, shutdown: &CancellationToken) {
        let mut backoff = RETRY_BACKOFF_START;
        let mut tries = 0;
        loop {
            tries += 1;
            match self.flush(batch).await {
                Ok(_) => {
                    batch.clear();
                    return;
                }
                Err(error) => {
                    self.metrics
                        .db_errors
                        .with_label_values(&["completer"])
                        .inc();
                    let give_up = shutdown.is_cancelled() && tries >= SHUTDOWN_FLUSH_TRIES;
                    tracing::warn!(
                        error = format!("{:#}", anyhow::Error::from(error)),
                        batch_size = batch.len(),
                        give_up,
                        "writing delivery results failed"
                    );
                    if give_up {
                        // Not lost: the leases expire and another relay delivers them again.
                        batch.clear();
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                }
            }
        }
    }

    /// Writes one batch in one statement. Returns how many deliveries were updated (fewer
    /// than the batch when some leases had been reclaimed meanwhile).
    pub async fn flush(&self, batch: &[Completion]) -> Result<usize, DbError> {
        if batch.is_empty() {
            return Ok(0);
        }
        let mut ids = Vec::with_capacity(batch.len());
        let mut statuses = Vec::with_capacity(batch.len());
        let mut next_attempts: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(batch.len());
        let mut status_codes: Vec<Option<i32>> = Vec::with_capacity(batch.len());
        let mut errors = Vec::with_capacity(batch.len());
        let mut bodies = Vec::with_capacity(batch.len());
        let mut started = Vec::with_capacity(batch.len());
        let mut durations = Vec::with_capacity(batch.len());
        let mut failed = Vec::with_capacity(batch.len());
        let mut disable_ids = Vec::new();
        let mut disable_reasons = Vec::new();
        for c in batch {
            ids.push(c.delivery_id);
            statuses.push(c.verdict.next.status());
            next_attempts.push(match c.verdict.next {
                NextState::Retry { at } => Some(at),
                _ => None,
            });
            status_codes.push(c.verdict.status_code.map(i32::from));
            errors.push(c.verdict.error.as_deref());
            // Successful bodies are not kept: history is for failures and replays.
            bodies.push(if c.verdict.failed() {
                c.verdict.response_body.as_deref()
            } else {
                None
            });
            started.push(c.started_at);
            durations.push(i32::try_from(c.duration.as_millis()).unwrap_or(i32::MAX));
            failed.push(c.verdict.failed());
            if let Some(reason) = &c.verdict.disable_subscription {
                disable_ids.push(c.subscription_id.0);
                disable_reasons.push(reason.as_str());
            }
        }
        let mut client = self.pool.get().await.context("writing delivery results")?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 12] = [
            &ids,
            &statuses,
            &next_attempts,
            &status_codes,
            &errors,
            &bodies,
            &started,
            &durations,
            &failed,
            &disable_ids,
            &disable_reasons,
            &&*self.relay_id,
        ];
        let ordered: Vec<&Completion> = batch.iter().filter(|c| c.ordering_key.is_some()).collect();
        let rows = if ordered.is_empty() {
            query::query(&client, self.pool_mode, &sql::COMPLETE_DELIVERIES, &params)
                .await
                .context("writing delivery results")?
        } else {
            // Finishing the head of an ordered key and promoting the next one happen in one
            // transaction, under the same per-subscription lock ordered fan-out takes, so a
            // delivery created concurrently for the key is either seen here or sees the
            // head finished (see migrations/V5__ordered_subscriptions.sql). The lock is
            // transaction-scoped, so this is safe behind a transaction pooler, which keeps
            // one server connection from BEGIN to COMMIT.
            let transaction = client
                .transaction()
                .await
                .context("writing ordered delivery results")?;
            let mut subscriptions: Vec<i64> = ordered.iter().map(|c| c.subscription_id.0).collect();
            subscriptions.sort_unstable();
            subscriptions.dedup();
            query::execute(
                &transaction,
                self.pool_mode,
                &sql::LOCK_ORDERED_SUBSCRIPTIONS,
                &[&subscriptions],
            )
            .await
            .context("locking ordered subscriptions")?;
            let rows = query::query(
                &transaction,
                self.pool_mode,
                &sql::COMPLETE_DELIVERIES,
                &params,
            )
            .await
            .context("writing delivery results")?;
            let updated: HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
            let finished: Vec<&&Completion> = ordered
                .iter()
                .filter(|c| updated.contains(&c.delivery_id))
                .filter(|c| !matches!(c.verdict.next, NextState::Retry { .. }))
                .collect();
            if !finished.is_empty() {
                let subscription_ids: Vec<i64> =
                    finished.iter().map(|c| c.subscription_id.0).collect();
                let keys: Vec<Option<&str>> =
                    finished.iter().map(|c| c.ordering_key.as_deref()).collect();
                let finished_ids: Vec<i64> = finished.iter().map(|c| c.delivery_id).collect();
                query::execute(
                    &transaction,
                    self.pool_mode,
                    &sql::ADVANCE_ORDERING_KEYS,
                    &[&subscription_ids, &keys, &finished_ids],
                )
                .await
                .context("advancing ordering keys")?;
            }
            transaction
                .commit()
                .await
                .context("committing delivery results")?;
            rows
        };
        let recorded: HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
        if recorded.len() < batch.len() {
            tracing::info!(
                stale = batch.len() - recorded.len(),
                "results dropped: their leases were reclaimed by another relay"
            );
        }
        let now = Utc::now();
        for c in batch.iter().filter(|c| recorded.contains(&c.delivery_id)) {
            let label = match c.verdict.next {
                NextState::Delivered => OutcomeLabel::Delivered,
                NextState::Retry { .. } => OutcomeLabel::Failed,
                NextState::Dead => OutcomeLabel::Dead,
            };
            self.metrics
                .deliveries
                .with_label_values(&[&*c.subscription_name, label.as_str()])
                .inc();
            if label == OutcomeLabel::Delivered {
                let lag = (now - c.event_created_at).to_std().unwrap_or_default();
                self.metrics
                    .delivery_lag
                    .with_label_values(&[&*c.subscription_name])
                    .observe(lag.as_secs_f64());
            }
            if let Some(reason) = &c.verdict.disable_subscription {
                tracing::warn!(subscription = %c.subscription_name, reason = %reason, "subscription disabled");
            }
        }
        Ok(recorded.len())
    }
}
