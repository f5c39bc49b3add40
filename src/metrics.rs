//! Prometheus metrics with the SPEC's names, on a registry owned by one relay (not the
//! global default), so tests can run several relays in one process.
//!
//! Labels are bounded: subscription names and fixed words only, never an event or tenant id.
//!
//! Besides the relay's own series: `process_*` (CPU, memory, file descriptors, from /proc)
//! and `outbox_db_pool_*`, read from the pool's in-memory counters at scrape time (no query).

use deadpool_postgres::Pool;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Webhook latencies: 1 ms … 30 s.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0,
];
/// Event creation → delivered: sub-second when healthy, hours when a subscriber was down.
const LAG_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0, 21600.0, 86400.0,
];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub events_dispatched: IntCounter,
    pub deliveries: IntCounterVec,
    pub delivery_duration: HistogramVec,
    pub delivery_lag: HistogramVec,
    pub pending_deliveries: IntGaugeVec,
    pub dead_deliveries: IntGaugeVec,
    pub subscription_disabled: IntGaugeVec,
    pub oldest_pending_seconds: IntGauge,
    pub wakeups: IntCounterVec,
    pub leases_reclaimed: IntCounter,
    pub events_purged: IntCounter,
    pub db_errors: IntCounterVec,
}

/// Outcome label values of `outbox_deliveries_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutcomeLabel {
    Delivered,
    Failed,
    Dead,
}

impl OutcomeLabel {
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeLabel::Delivered => "delivered",
            OutcomeLabel::Failed => "failed",
            OutcomeLabel::Dead => "dead",
        }
    }
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let events_dispatched = IntCounter::new(
            "outbox_events_dispatched_total",
            "Events fanned out into deliveries.",
        )?;
        let deliveries = IntCounterVec::new(
            Opts::new(
                "outbox_deliveries_total",
                "Delivery attempts by result: delivered, failed (will retry) or dead.",
            ),
            &["subscription", "outcome"],
        )?;
        let delivery_duration = HistogramVec::new(
            HistogramOpts::new(
                "outbox_delivery_duration_seconds",
                "Duration of one webhook request.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["subscription"],
        )?;
        let delivery_lag = HistogramVec::new(
            HistogramOpts::new(
                "outbox_delivery_lag_seconds",
                "From the event's created_at to its successful delivery.",
            )
            .buckets(LAG_BUCKETS.to_vec()),
            &["subscription"],
        )?;
        let pending_deliveries = IntGaugeVec::new(
            Opts::new(
                "outbox_pending_deliveries",
                "Deliveries not yet delivered nor dead (pending, in flight or failing).",
            ),
            &["subscription"],
        )?;
        let dead_deliveries = IntGaugeVec::new(
            Opts::new("outbox_dead_deliveries", "Deliveries that gave up."),
            &["subscription"],
        )?;
        let subscription_disabled = IntGaugeVec::new(
            Opts::new(
                "outbox_subscription_disabled",
                "1 while the subscription is disabled (nothing is sent to it), else 0.",
            ),
            &["subscription"],
        )?;
        let oldest_pending_seconds = IntGauge::new(
            "outbox_oldest_pending_seconds",
            "Age of the oldest event not yet dispatched or delivered.",
        )?;
        let wakeups = IntCounterVec::new(
            Opts::new(
                "outbox_wakeups_total",
                "Dispatcher wake-ups by reason: notify or poll.",
            ),
            &["reason"],
        )?;
        let leases_reclaimed = IntCounter::new(
            "outbox_leases_reclaimed_total",
            "In-flight deliveries whose lease expired (their relay stopped) and were re-queued.",
        )?;
        let events_purged = IntCounter::new(
            "outbox_events_purged_total",
            "Finished events deleted by retention (OUTBOX_RETENTION), with their deliveries and attempts.",
        )?;
        let db_errors = IntCounterVec::new(
            Opts::new(
                "outbox_db_errors_total",
                "Database operations that failed, by component.",
            ),
            &["component"],
        )?;
        registry.register(Box::new(events_dispatched.clone()))?;
        registry.register(Box::new(deliveries.clone()))?;
        registry.register(Box::new(delivery_duration.clone()))?;
        registry.register(Box::new(delivery_lag.clone()))?;
        registry.register(Box::new(pending_deliveries.clone()))?;
        registry.register(Box::new(dead_deliveries.clone()))?;
        registry.register(Box::new(subscription_disabled.clone()))?;
        registry.register(Box::new(oldest_pending_seconds.clone()))?;
        registry.register(Box::new(wakeups.clone()))?;
        registry.register(Box::new(leases_reclaimed.clone()))?;
        registry.register(Box::new(events_purged.clone()))?;
        registry.register(Box::new(db_errors.clone()))?;
        // Only Linux has /proc; elsewhere the process series are simply absent.
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Metrics {
            registry,
            events_dispatched,
            deliveries,
            delivery_duration,
            delivery_lag,
            pending_deliveries,
            dead_deliveries,
            subscription_disabled,
            oldest_pending_seconds,
            wakeups,
            leases_reclaimed,
            events_purged,
            db_errors,
        })
    }

    /// Counts one failed database statement of `component` (`outbox_db_errors_total`).
    pub fn count_db_error(&self, component: &'static str) {
        self.db_errors.with_label_values(&[component]).inc();
    }

    /// Exposes the pool's connection counts (`outbox_db_pool_*`). Called once per relay.
    pub fn register_pool(&self, pool: Pool) -> Result<(), prometheus::Error> {
        self.registry.register(Box::new(PoolCollector::new(pool)?))
    }

    /// Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(error) = encoder.encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(error = %error, "encoding metrics failed");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// Reads the pool's counters when scraped: they live in memory, so this costs no query and
/// is never stale.
struct PoolCollector {
    pool: Pool,
    connections: IntGaugeVec,
    max_connections: IntGauge,
    waiting: IntGauge,
}

impl PoolCollector {
    fn new(pool: Pool) -> Result<PoolCollector, prometheus::Error> {
        Ok(PoolCollector {
            pool,
            connections: IntGaugeVec::new(
                Opts::new(
                    "outbox_db_pool_connections",
                    "Open pooled database connections: idle or in use.",
                ),
                &["state"],
            )?,
            max_connections: IntGauge::new(
                "outbox_db_pool_max_connections",
                "Largest number of pooled connections (OUTBOX_DB_POOL_SIZE).",
            )?,
            waiting: IntGauge::new(
                "outbox_db_pool_waiting",
                "Tasks waiting for a pooled connection; persistently above 0 means the pool is too small.",
            )?,
        })
    }
}

impl Collector for PoolCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.connections.desc();
        descs.extend(self.max_connections.desc());
        descs.extend(self.waiting.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let status = self.pool.status();
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.connections
            .with_label_values(&["idle"])
            .set(gauge(status.available));
        self.connections
            .with_label_values(&["in_use"])
            .set(gauge(status.size.saturating_sub(status.available)));
        self.max_connections.set(gauge(status.max_size));
        self.waiting.set(gauge(status.waiting));
        let mut families = self.connections.collect();
        families.extend(self.max_connections.collect());
        families.extend(self.waiting.collect());
        families
    }
}
