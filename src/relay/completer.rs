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
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::deliverer::Completion;
use super::maintenance::GivenUpLeases;
use crate::backoff::Backoff;
use crate::db::{Db, DbClient, DbContext, DbError, sql, text};
use crate::metrics::{Metrics, OutcomeLabel};
use crate::webhook::outcome::NextState;

/// Results a full channel holds before delivery tasks wait.
pub const CHANNEL_CAPACITY: usize = 4096;

const RETRY_BACKOFF_START: Duration = Duration::from_millis(100);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// After shutdown began, a flush that keeps failing is abandoned after this many tries: the
/// leases then expire and another relay re-sends those deliveries (at least once).
const SHUTDOWN_FLUSH_TRIES: u32 = 5;
/// Longest pause between tries of a result whose row another session holds locked.
const DEFERRED_RETRY_MAX: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Completer {
    /// The relay's pool, and how its statements must be sent.
    pub db: Db,
    pub relay_id: Arc<str>,
    pub metrics: Metrics,
    pub flush_interval: Duration,
    pub batch_size: usize,
    /// Where results this completer gave up on are noted, so their leases run out.
    pub given_up: GivenUpLeases,
    /// Wakes the claim loop after results that make a delivery due at once: a retry whose
    /// wait is already over, or the next delivery of an ordered key. (A freed request slot
    /// wakes it only when slots were what held it back.)
    pub deliveries_due: Arc<Notify>,
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
            // Take what is already waiting: while the previous write ran, results queued up,
            // so under load batches grow by themselves and an idle relay writes at once. A
            // request slot stays taken until its result is written, so a fixed wait here
            // would cap throughput at max_in_flight per wait.
            while batch.len() < self.batch_size {
                match results.try_recv() {
                    Ok(completion) => batch.push(completion),
                    Err(_) => break,
                }
            }
            // Optionally linger for more (OUTBOX_FLUSH_INTERVAL): fewer, larger writes.
            if !self.flush_interval.is_zero() {
                let deadline = tokio::time::Instant::now() + self.flush_interval;
                while batch.len() < self.batch_size {
                    match tokio::time::timeout_at(deadline, results.recv()).await {
                        Ok(Some(completion)) => batch.push(completion),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            self.flush_with_retries(&mut batch, &shutdown).await;
        }
    }

    /// Writes `batch`, retrying while the database is unreachable. A batch the server
    /// refuses because of one row (its data, or a lock on it that is not granted in time) is
    /// split in halves until that row stands alone, so the others are written at once; the
    /// row is then stored without the subscriber's text ([`Completer::write_alone`]) or, if it
    /// waits on a lock, retried on the side ([`Completer::retry_later`]).
    async fn flush_with_retries(&self, batch: &mut Vec<Completion>, shutdown: &CancellationToken) {
        let mut parts = vec![std::mem::take(batch)];
        let mut backoff = Backoff::new(RETRY_BACKOFF_START, RETRY_BACKOFF_MAX);
        let mut tries = 0;
        while let Some(mut part) = parts.pop() {
            let error = match self.flush(&part).await {
                Ok(_) => {
                    backoff.reset();
                    tries = 0;
                    continue;
                }
                Err(error) => error,
            };
            self.metrics.count_db_error("completer");
            if error.is_refused_data() || error.is_wait_timeout() {
                if part.len() > 1 {
                    tracing::warn!(
                        error = format!("{:#}", anyhow::Error::from(error)),
                        batch_size = part.len(),
                        "the database refused a batch of results; writing it in halves to find the row"
                    );
                    let second = part.split_off(part.len() / 2);
                    parts.push(second);
                    parts.push(part);
                } else if let Some(completion) = part.pop() {
                    if error.is_refused_data() {
                        self.write_alone(completion, &error).await;
                    } else {
                        self.retry_later(completion, shutdown.clone());
                    }
                }
                continue;
            }
            tries += 1;
            let give_up = shutdown.is_cancelled() && tries >= SHUTDOWN_FLUSH_TRIES;
            tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(error)),
                batch_size = part.len() + parts.iter().map(Vec::len).sum::<usize>(),
                give_up,
                "writing delivery results failed"
            );
            if give_up {
                // Not lost: the leases expire and another relay delivers them again.
                return;
            }
            parts.push(part);
            tokio::time::sleep(backoff.next_pause()).await;
        }
    }

    /// One result whose row stayed locked past `lock_timeout`: written again on the side,
    /// with a growing pause, so the completer's own writes never wait for it. It keeps its
    /// request slot meanwhile (memory stays bounded by OUTBOX_MAX_CONCURRENCY). Once the
    /// lock is gone the result is written, unless the lease ran out and the delivery was
    /// claimed again meanwhile (then the token no longer matches and it is sent again).
    fn retry_later(&self, completion: Completion, shutdown: CancellationToken) {
        tracing::warn!(
            delivery_id = completion.delivery_id,
            subscription = %completion.subscription_name,
            "a delivery's row is locked by another session; retrying its result on the side"
        );
        let completer = self.clone();
        tokio::spawn(async move {
            let mut pause = Backoff::new(
                RETRY_BACKOFF_MAX.min(Duration::from_secs(1)),
                DEFERRED_RETRY_MAX,
            );
            loop {
                tokio::time::sleep(pause.next_pause()).await;
                match completer.flush(std::slice::from_ref(&completion)).await {
                    Ok(_) => return,
                    Err(error) if error.is_refused_data() => {
                        completer.write_alone(completion, &error).await;
                        return;
                    }
                    Err(error) => {
                        completer.metrics.count_db_error("completer");
                        if shutdown.is_cancelled() {
                            // Released on shutdown (or left to expire): sent again.
                            return;
                        }
                        tracing::debug!(
                            error = format!("{:#}", anyhow::Error::from(error)),
                            delivery_id = completion.delivery_id,
                            "still cannot write a held result; retrying"
                        );
                    }
                }
            }
        });
    }

    /// One result the database refused for its data: it is recorded again with the
    /// subscriber's text (error and body) replaced by why it could not be stored, so the
    /// attempt still counts and shows up in the history. Should that fail too, the result is
    /// given up: its lease is no longer renewed, runs out, and the delivery is sent again
    /// (at least once). Either way the rest of the relay's results keep flowing.
    async fn write_alone(&self, mut completion: Completion, refusal: &DbError) {
        let reason = refusal
            .sqlstate()
            .map(|code| code.code().to_string())
            .unwrap_or_default();
        completion.verdict.response_body = None;
        // A success keeps no error text; only a failure says what was left out.
        if completion.verdict.failed() {
            completion.verdict.error = Some(format!(
                "{}; the result as received could not be stored (SQLSTATE {reason}), so it was recorded without the subscriber's text",
                completion.verdict.status_code.map_or_else(
                    || "request failed".to_string(),
                    |code| format!("HTTP {code}")
                ),
            ));
        }
        if let Err(error) = self.flush(std::slice::from_ref(&completion)).await {
            self.given_up
                .add(completion.delivery_id, completion.lease_token);
            self.metrics.count_db_error("completer");
            tracing::error!(
                error = format!("{:#}", anyhow::Error::from(error)),
                delivery_id = completion.delivery_id,
                subscription = %completion.subscription_name,
                "a delivery result could not be stored; its lease will expire and it will be sent again"
            );
        } else {
            tracing::warn!(
                delivery_id = completion.delivery_id,
                subscription = %completion.subscription_name,
                "a delivery result was stored without the subscriber's text, which the database refused"
            );
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
        let mut tokens = Vec::with_capacity(batch.len());
        for c in batch {
            ids.push(c.delivery_id);
            statuses.push(c.verdict.next.status());
            next_attempts.push(match c.verdict.next {
                NextState::Retry { at } => Some(at),
                _ => None,
            });
            status_codes.push(c.verdict.status_code.map(i32::from));
            errors.push(c.verdict.error.as_deref().map(text::storable));
            // Successful bodies are not kept: history is for failures and replays.
            bodies.push(if c.verdict.failed() {
                c.verdict.response_body.as_deref().map(text::storable)
            } else {
                None
            });
            started.push(c.started_at);
            durations.push(i32::try_from(c.duration.as_millis()).unwrap_or(i32::MAX));
            failed.push(c.verdict.failed());
            tokens.push(c.lease_token);
        }
        let mut client = self.db.client("writing delivery results").await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 11] = [
            &ids,
            &statuses,
            &next_attempts,
            &status_codes,
            &errors,
            &bodies,
            &started,
            &durations,
            &failed,
            &tokens,
            &&*self.relay_id,
        ];
        let ordered: Vec<&Completion> = batch.iter().filter(|c| c.ordering_key.is_some()).collect();
        let rows = if ordered.is_empty() {
            client
                .query(&sql::COMPLETE_DELIVERIES, &params)
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
            transaction
                .execute(&sql::LOCK_ORDERED_SUBSCRIPTIONS, &[&subscriptions])
                .await
                .context("locking ordered subscriptions")?;
            let rows = transaction
                .query(&sql::COMPLETE_DELIVERIES, &params)
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
                transaction
                    .execute(
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
        if makes_deliveries_due(batch, &recorded, Utc::now()) {
            self.deliveries_due.notify_one();
        }
        if recorded.len() < batch.len() {
            tracing::info!(
                stale = batch.len() - recorded.len(),
                "results dropped: their leases were reclaimed by another relay"
            );
        }
        self.disable_subscriptions(&client, batch, &recorded).await;
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

    /// Disables the subscriptions whose recorded results answered 410. On its own, after the
    /// results are committed (see `sql::DISABLE_SUBSCRIPTIONS` for the lock order). A failure
    /// here is only logged: the delivery is retried, and its next 410 disables again.
    async fn disable_subscriptions(
        &self,
        client: &DbClient,
        batch: &[Completion],
        recorded: &HashSet<i64>,
    ) {
        let (ids, reasons): (Vec<i64>, Vec<std::borrow::Cow<'_, str>>) = batch
            .iter()
            .filter(|c| recorded.contains(&c.delivery_id))
            .filter_map(|c| {
                let reason = c.verdict.disable_subscription.as_deref()?;
                Some((c.subscription_id.0, text::storable(reason)))
            })
            .unzip();
        if ids.is_empty() {
            return;
        }
        if let Err(error) = client
            .execute(&sql::DISABLE_SUBSCRIPTIONS, &[&ids, &reasons])
            .await
            .context("disabling subscriptions that answered 410")
        {
            self.metrics.count_db_error("completer");
            tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(error)),
                "could not disable subscriptions that answered 410; their next 410 tries again"
            );
        }
    }
}

/// Whether writing these results made a delivery due now: a retry whose wait is over (a
/// retry schedule may start at 0 seconds), or a finished delivery of an ordered key, whose
/// next delivery it released.
fn makes_deliveries_due(batch: &[Completion], recorded: &HashSet<i64>, now: DateTime<Utc>) -> bool {
    batch
        .iter()
        .filter(|c| recorded.contains(&c.delivery_id))
        .any(|c| match c.verdict.next {
            NextState::Retry { at } => at <= now,
            NextState::Delivered | NextState::Dead => c.ordering_key.is_some(),
        })
}
