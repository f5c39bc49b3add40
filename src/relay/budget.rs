//! What one claim may lease: request slots and rate-limit tokens, set aside before the lease.
//!
//! Two places lease deliveries: the deliverer's claim loop (due deliveries) and the dispatcher
//! (deliveries it leases as it creates them). Both take one [`ClaimBudget`] from the same
//! relay-wide pool first, so the two together never take more request slots or rate-limit
//! tokens than the relay has. Kept apart from the deliverer so the slot and token accounting,
//! and its give-back on drop, sit in one place whoever leases.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{Notify, OwnedSemaphorePermit};

use super::subscriptions::{Subscription, SubscriptionId};

/// What one claim may lease, set aside so that the two places that lease (the claim loop
/// and the dispatcher, which leases deliveries as it creates them) never take more
/// than the relay can send: request slots (at most a batch) and each subscription's
/// rate-limit tokens. What the lease does not use goes back when the budget is dropped.
#[derive(Debug)]
pub struct ClaimBudget {
    /// One permit per request slot set aside; each leased delivery takes one.
    permits: OwnedSemaphorePermit,
    /// Subscriptions to lease for, in the order to serve them, and how many each may take.
    pub subscription_ids: Vec<i64>,
    pub wanted: Vec<i32>,
    /// Identifies the claim: its results are written only while the delivery holds it.
    pub lease_token: i64,
    rate_limits: RateLimits,
    /// Rate-limit tokens taken for this claim, per subscription; unused ones go back.
    rate_tokens: HashMap<SubscriptionId, u32>,
    /// Set when a claim found no slot free while budgets held them; the budget that gives
    /// slots back then wakes the claim loop, which would otherwise wait for a request to end
    /// (or the poll) with work due.
    claim_starved: Arc<AtomicBool>,
    slot_freed: Arc<Notify>,
}

impl ClaimBudget {
    /// A budget holding `permits` and no subscription yet: [`RateLimits::fill`] adds them.
    /// `claim_starved` and `slot_freed` are the deliverer's, so dropping the budget can wake
    /// its claim loop.
    pub(super) fn new(
        permits: OwnedSemaphorePermit,
        subscriptions: usize,
        rate_limits: &RateLimits,
        claim_starved: &Arc<AtomicBool>,
        slot_freed: &Arc<Notify>,
    ) -> ClaimBudget {
        ClaimBudget {
            permits,
            subscription_ids: Vec::with_capacity(subscriptions),
            wanted: Vec::with_capacity(subscriptions),
            // Random, not a counter: unique across this relay's restarts as well, which
            // share its relay id when it is configured.
            lease_token: rand::random(),
            rate_limits: rate_limits.clone(),
            rate_tokens: HashMap::new(),
            claim_starved: Arc::clone(claim_starved),
            slot_freed: Arc::clone(slot_freed),
        }
    }

    /// Request slots set aside: the most this claim may lease in all.
    pub fn slots(&self) -> usize {
        self.permits.num_permits()
    }

    /// Marks one rate-limit token of `subscription` as used by a leased delivery, so it is
    /// not given back.
    pub(super) fn spend_rate_token(&mut self, subscription: SubscriptionId) {
        if let Some(tokens) = self.rate_tokens.get_mut(&subscription) {
            *tokens = tokens.saturating_sub(1);
        }
    }

    /// Takes one request slot for a leased delivery; `None` when all are taken.
    pub(super) fn take_slot(&mut self) -> Option<OwnedSemaphorePermit> {
        self.permits.split(1)
    }
}

impl Drop for ClaimBudget {
    fn drop(&mut self) {
        if self.permits.num_permits() > 0 && self.claim_starved.swap(false, Ordering::AcqRel) {
            // Release first, then wake: the woken claim loop must see the slots available.
            let unused = self.permits.num_permits();
            drop(self.permits.split(unused));
            self.slot_freed.notify_one();
        }
        if self.rate_tokens.values().all(|tokens| *tokens == 0) {
            return;
        }
        self.rate_limits.give_back(&self.rate_tokens);
    }
}

/// The relay's token buckets, one per enabled subscription with a `rate_limit_per_second`.
/// Cloning shares them: the deliverer and every budget it hands out hold the same buckets.
#[derive(Debug, Clone, Default)]
pub(super) struct RateLimits {
    buckets: Arc<Mutex<HashMap<SubscriptionId, TokenBucket>>>,
}

impl RateLimits {
    /// Fills `budget` for the `enabled` subscriptions, in the order given, when `free` request
    /// slots are set aside: each may take at most `free`, its `max_in_flight` and, when it is
    /// rate limited, the tokens its bucket holds (taken from the bucket now). Buckets of
    /// subscriptions no longer enabled are dropped.
    pub(super) fn fill(
        &self,
        budget: &mut ClaimBudget,
        enabled: &[Arc<Subscription>],
        free: usize,
    ) {
        let mut limits = self.lock();
        let now = Instant::now();
        for subscription in enabled {
            let mut want = free.min(subscription.max_in_flight as usize);
            if let Some(rate) = subscription.rate_limit_per_second {
                let bucket = limits
                    .entry(subscription.id)
                    .or_insert_with(|| TokenBucket::new(rate, now));
                bucket.set_rate(rate);
                want = want.min(bucket.available(now));
                // Taken now, so a claim running beside this one cannot spend them too.
                let taken = u32::try_from(want).unwrap_or(u32::MAX);
                bucket.take(taken);
                budget.rate_tokens.insert(subscription.id, taken);
            }
            if want > 0 {
                budget.subscription_ids.push(subscription.id.0);
                budget.wanted.push(i32::try_from(want).unwrap_or(i32::MAX));
            }
        }
        limits.retain(|id, _| enabled.iter().any(|s| s.id == *id));
    }

    /// Returns tokens a budget took and its lease did not use.
    fn give_back(&self, rate_tokens: &HashMap<SubscriptionId, u32>) {
        let mut limits = self.lock();
        for (id, tokens) in rate_tokens {
            if let Some(bucket) = limits.get_mut(id) {
                bucket.give_back(*tokens);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SubscriptionId, TokenBucket>> {
        self.buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Per-relay token bucket for `rate_limit_per_second`. Holds at most one second of tokens
/// (at least one), so an idle subscriber gets a burst of at most its per-second rate.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    tokens: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    fn new(rate: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate,
            tokens: rate.max(1.0),
            refilled_at: now,
        }
    }

    fn set_rate(&mut self, rate: f64) {
        self.rate = rate;
    }

    fn capacity(&self) -> f64 {
        self.rate.max(1.0)
    }

    fn available(&mut self, now: Instant) -> usize {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity());
        self.refilled_at = now;
        self.tokens.floor().max(0.0) as usize
    }

    fn take(&mut self, count: u32) {
        self.tokens -= f64::from(count);
    }

    /// Returns tokens taken for a claim that did not use them.
    fn give_back(&mut self, count: u32) {
        self.tokens = (self.tokens + f64::from(count)).min(self.capacity());
    }
}

#[cfg(test)]
mod tests {
    use super::TokenBucket;
    use std::time::{Duration, Instant};

    #[test]
    fn token_bucket_refills_at_its_rate_and_caps_at_one_second() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2.0, start);
        assert_eq!(bucket.available(start), 2);
        bucket.take(2);
        assert_eq!(bucket.available(start), 0);
        assert_eq!(bucket.available(start + Duration::from_millis(500)), 1);
        assert_eq!(
            bucket.available(start + Duration::from_secs(60)),
            2,
            "capped"
        );
    }

    #[test]
    fn slow_rates_still_allow_one_request() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(0.5, start);
        assert_eq!(bucket.available(start), 1);
        bucket.take(1);
        assert_eq!(bucket.available(start + Duration::from_secs(1)), 0);
        assert_eq!(bucket.available(start + Duration::from_secs(2)), 1);
    }
}
