//! The relay's view of `outbox.subscriptions`: a snapshot reloaded every second and at once
//! when the subscriptions trigger notifies, so inserts, updates and disables take effect in
//! a running relay within a second, without restart.
//!
//! Matching events to subscriptions is not done here: the dispatcher does it in SQL, against
//! the table itself, so it can never act on a stale copy. This cache only serves delivery
//! settings (URL, secret, headers, timeout, limits).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::secret::SecretUrl;
use crate::db::{Db, DbContext, DbError, convert, sql};
use crate::webhook::SigningSecret;

/// Reload period when no notification arrives (a lost NOTIFY, or a change made while the
/// LISTEN connection was down).
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriptionId(pub i64);

/// Delivery settings of one subscription. `Debug` is safe to log: the URL shows `***` for
/// its password and the signing secrets show only their length.
#[derive(Debug)]
pub struct Subscription {
    pub id: SubscriptionId,
    pub name: String,
    pub url: SecretUrl,
    /// Signing secrets; more than one while a secret is being rotated.
    pub secrets: Vec<SigningSecret>,
    pub enabled: bool,
    pub timeout: Duration,
    pub max_in_flight: u32,
    pub rate_limit_per_second: Option<f64>,
    pub headers: Vec<(String, String)>,
    pub retry_schedule: Vec<Duration>,
    /// Fanned out by the ordered pass (per-key order) rather than the unordered one.
    pub ordered: bool,
}

#[derive(Clone, Default)]
pub struct SubscriptionCache {
    inner: Arc<RwLock<HashMap<SubscriptionId, Arc<Subscription>>>>,
}

impl SubscriptionCache {
    pub fn get(&self, id: SubscriptionId) -> Option<Arc<Subscription>> {
        self.read().get(&id).cloned()
    }

    /// Enabled subscriptions, ordered by id.
    pub fn enabled(&self) -> Vec<Arc<Subscription>> {
        let mut enabled: Vec<_> = self
            .read()
            .values()
            .filter(|s| s.enabled)
            .cloned()
            .collect();
        enabled.sort_by_key(|s| s.id);
        enabled
    }

    /// Whether any enabled subscription is ordered, as of the last reload.
    pub fn any_enabled_ordered(&self) -> bool {
        self.read().values().any(|s| s.enabled && s.ordered)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<SubscriptionId, Arc<Subscription>>> {
        // A panic while holding the lock cannot leave the map half-written (we only swap it
        // whole), so a poisoned lock is still safe to read.
        self.inner
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Replaces the snapshot with what the table says now.
    pub async fn reload(&self, db: &Db) -> Result<usize, DbError> {
        let client = db.client("loading subscriptions").await?;
        let rows = client
            .query(&sql::LOAD_SUBSCRIPTIONS, &[])
            .await
            .context("loading subscriptions")?;
        let mut fresh = HashMap::with_capacity(rows.len());
        for row in rows {
            let name: String = row.get(1);
            let secret: String = row.get(3);
            let mut secrets = match SigningSecret::parse(&secret) {
                Ok(secret) => vec![secret],
                Err(error) => {
                    // The table's CHECK makes this unreachable unless someone dropped it;
                    // skip the subscription rather than sign with garbage.
                    tracing::error!(subscription = %name, error = %error, "unusable secret; subscription skipped");
                    continue;
                }
            };
            // During a rotation's overlap (the query returns NULL once it has expired), sign
            // with the previous secret too, after the new one.
            if let Some(previous) = row.get::<_, Option<String>>(10) {
                match SigningSecret::parse(&previous) {
                    Ok(previous) => secrets.push(previous),
                    Err(error) => tracing::error!(
                        subscription = %name,
                        error = %error,
                        "unusable previous secret; signing with the current secret only"
                    ),
                }
            }
            let headers: Vec<(String, String)> =
                convert::string_pairs(row.get::<_, serde_json::Value>(8));
            let schedule: Vec<f64> = row.get(9);
            let subscription = Subscription {
                id: SubscriptionId(row.get(0)),
                name,
                url: SecretUrl::new(row.get::<_, String>(2)),
                secrets,
                enabled: row.get(4),
                timeout: convert::seconds(row.get(5)),
                max_in_flight: u32::try_from(row.get::<_, i32>(6)).unwrap_or(1).max(1),
                rate_limit_per_second: row.get(7),
                headers,
                retry_schedule: schedule.into_iter().map(convert::seconds).collect(),
                ordered: row.get(11),
            };
            fresh.insert(subscription.id, Arc::new(subscription));
        }
        let count = fresh.len();
        *self
            .inner
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = fresh;
        Ok(count)
    }

    /// What the deliverer's claim depends on: which subscriptions are enabled, with their
    /// limits. A change here may make deliveries claimable that were not.
    fn claim_settings(&self) -> Vec<(SubscriptionId, u32, Option<u64>)> {
        self.enabled()
            .iter()
            .map(|s| {
                (
                    s.id,
                    s.max_in_flight,
                    s.rate_limit_per_second.map(f64::to_bits),
                )
            })
            .collect()
    }

    /// Keeps the snapshot fresh until cancelled. `changed` is notified by the LISTEN
    /// connection; `claims_changed` is notified after a reload that changed what the
    /// deliverer may claim, so it uses a new subscription or a raised limit at once. (Not
    /// after every reload: that was a claim a second for nothing.)
    pub async fn keep_fresh(
        self,
        db: Db,
        changed: Arc<Notify>,
        claims_changed: Arc<Notify>,
        cancel: CancellationToken,
    ) {
        loop {
            let before = self.claim_settings();
            match self.reload(&db).await {
                Ok(_) => {
                    if self.claim_settings() != before {
                        claims_changed.notify_one();
                    }
                }
                Err(error) => tracing::warn!(
                    error = format!("{:#}", anyhow::Error::from(error)),
                    "reloading subscriptions failed; using the previous snapshot"
                ),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = changed.notified() => {}
                _ = tokio::time::sleep(RELOAD_INTERVAL) => {}
            }
        }
    }
}
