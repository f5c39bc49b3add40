//! Assembles a running relay from its parts and owns its lifecycle.
//!
//! ```text
//! producer txn ─INSERT─► outbox.events: NOTIFY only while a relay holds the wake-up gate
//! db::listen ─wake─► dispatcher ◄─ busy look / gate granted / poll tick (the truth when a
//!                                  NOTIFY is lost, or the only pace with OUTBOX_LISTEN=false)
//! dispatcher: claim events SKIP LOCKED → INSERT matching deliveries → mark dispatched (1 statement)
//! deliverer:  lease due deliveries (committed, no txn held) → HTTP per delivery, bounded
//! completer:  results → one UPDATE + INSERT per batch, guarded by the lease owner
//! maintenance: heartbeat own leases and re-queue expired ones; gauges; retention (3 tasks)
//! ```
//!
//! Shutdown runs in phases: stop claiming and fail `/readyz` → in-flight requests get up to
//! the grace period → the completer writes the last results → whatever is still leased is
//! handed back (due now) so another relay takes it at once.

pub mod completer;
pub mod deliverer;
pub mod dispatcher;
pub mod maintenance;
pub mod rate_limit;
pub mod subscriptions;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::completer::Completer;
use self::deliverer::Deliverer;
use self::dispatcher::Dispatcher;
use self::maintenance::{GivenUpLeases, Maintenance};
use self::subscriptions::SubscriptionCache;
use crate::config::secret::{self, ExposeSecret};
use crate::config::{self, RelayConfig};
use crate::db::{self, Db, DbContext, DbError, PoolMode, sql};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::webhook::client::WebhookClient;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("setting up metrics")]
    Metrics(#[from] prometheus::Error),
    #[error("building the HTTP client")]
    Client(#[from] crate::webhook::client::ClientError),
    #[error(transparent)]
    BrokerTrust(#[from] crate::broker::TlsTrustError),
    #[error("binding the HTTP listener on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Connections the admin API and compatibility endpoints may hold at once.
const ADMIN_POOL_SIZE: usize = 4;

/// A running relay. Dropping it does not stop it: call [`RelayHandle::shutdown`].
pub struct RelayHandle {
    pub relay_id: String,
    pub http_addr: SocketAddr,
    pub metrics: Metrics,
    pub health: Health,
    cancel: CancellationToken,
    crash: CancellationToken,
    lifecycle: JoinHandle<()>,
    /// Tasks that outlive `cancel` during a graceful stop, aborted on a simulated crash.
    crash_aborts: Vec<tokio::task::AbortHandle>,
}

impl RelayHandle {
    /// Graceful stop; returns once everything is written back and released.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.lifecycle.await;
    }

    /// Resolves when the relay stopped by itself or because of a signal.
    pub async fn wait(&mut self) {
        let _ = (&mut self.lifecycle).await;
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Simulates a crash for tests: every task stops where it is; no result is written and
    /// no lease released, as after `kill -9`.
    pub async fn crash(self) {
        self.crash.cancel();
        self.cancel.cancel();
        for task in &self.crash_aborts {
            task.abort();
        }
        self.lifecycle.abort();
        let _ = self.lifecycle.await;
    }
}

/// Starts a relay against an already-migrated database, serving HTTP on `http_listener`
/// (bound by the caller, so tests can use port 0).
pub async fn start(
    config: RelayConfig,
    database_url: &str,
    http_listener: tokio::net::TcpListener,
) -> Result<RelayHandle, StartError> {
    config.validate()?;
    let relay_id: Arc<str> = Arc::from(
        config
            .relay_id
            .clone()
            .unwrap_or_else(config::default_relay_id),
    );
    let pool = db::connect_pool(
        database_url,
        config.db_pool_size as usize,
        config.session_limits(),
    )?;
    let mode = PoolMode::from_name(&config.db_pool_mode)
        .expect("validate() accepts only the pool modes' names");
    let db = Db::new(pool.clone(), mode);
    let metrics = Metrics::new()?;
    metrics.register_pool(pool.clone())?;
    let health = Health::new(config.listen);
    let client = WebhookClient::new(
        crate::webhook::target_policy::TargetPolicy::from(&config.allow_private_targets),
        &format!("outbox-relay/{}", env!("CARGO_PKG_VERSION")),
    )?;
    let brokers = crate::broker::Publishers::new(
        client.policy(),
        crate::broker::TlsTrust::from_config(config.broker_ca_file.as_deref())?,
    );
    let http_addr = http_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.http_addr,
            source,
        })?;

    let cancel = CancellationToken::new();
    let crash = CancellationToken::new();
    let events_wake = Arc::new(Notify::new());
    let subscriptions_changed = Arc::new(Notify::new());
    let deliveries_wake = Arc::new(Notify::new());

    let subscriptions = SubscriptionCache::default();
    // Start with a loaded cache so the first claim round already knows every subscription;
    // a database that is down now is not fatal: the reload loop keeps trying.
    if let Err(error) = subscriptions.reload(&db).await {
        tracing::warn!(
            error = format!("{:#}", anyhow::Error::from(error)),
            "initial subscription load failed; retrying in the background"
        );
    }

    let (results_tx, results_rx) = mpsc::channel(completer::CHANNEL_CAPACITY);
    let deliverer = Arc::new(Deliverer::new(
        db.clone(),
        subscriptions.clone(),
        client,
        brokers.clone(),
        metrics.clone(),
        health.clone(),
        relay_id.clone(),
        config.lease_duration,
        config.delivery_batch_size,
        config.max_concurrency,
        results_tx,
        crash.child_token(),
    ));
    let dispatcher = Dispatcher {
        db: db.clone(),
        batch_size: config.dispatch_batch_size,
        metrics: metrics.clone(),
        health: health.clone(),
        deliveries_created: deliveries_wake.clone(),
        subscriptions: subscriptions.clone(),
        wake_gate: config.listen.then(db::wake_gate::WakeGate::new),
        busy_poll_interval: config.busy_poll_interval,
        busy_linger: config.busy_linger,
    };
    let given_up = GivenUpLeases::default();
    let maintenance = Maintenance {
        db: db.clone(),
        relay_id: relay_id.clone(),
        lease_duration: config.lease_duration,
        metrics: metrics.clone(),
        health: health.clone(),
        deliveries_requeued: deliveries_wake.clone(),
        given_up: given_up.clone(),
    };
    if let Err(error) = maintenance.check_schema().await {
        tracing::warn!(
            error = format!("{:#}", anyhow::Error::from(error)),
            "could not check the schema version yet"
        );
    }
    let completer = Completer {
        db: db.clone(),
        relay_id: relay_id.clone(),
        metrics: metrics.clone(),
        flush_interval: config.flush_interval,
        batch_size: config.flush_batch_size as usize,
        given_up,
        deliveries_due: deliveries_wake.clone(),
    };

    // `claiming` stops the loops that take new work; the completer and in-flight requests
    // outlive it so shutdown can finish what was started.
    let claiming = cancel.child_token();
    let mut background = tokio::task::JoinSet::new();
    // LISTEN needs a session of its own, so it never uses the pool: behind a transaction
    // pooler it goes to OUTBOX_LISTEN_DATABASE_URL (PostgreSQL itself), or nowhere in
    // poll-only mode, where the poll interval alone paces the relay.
    if config.listen {
        let listen_url = config.listen_database_url.as_ref().map_or_else(
            || database_url.to_owned(),
            |url| url.expose_secret().to_owned(),
        );
        if let Some(gate) = &dispatcher.wake_gate {
            background.spawn(gate.clone().run(listen_url.clone(), claiming.clone()));
        }
        background.spawn(db::listen::run(
            listen_url,
            db::listen::WakeTargets {
                events: events_wake.clone(),
                subscriptions: subscriptions_changed.clone(),
                connected: health.listener_connected.clone(),
            },
            claiming.clone(),
        ));
    } else {
        tracing::info!(poll_interval = ?config.poll_interval, "poll-only mode: no LISTEN connection");
    }
    background.spawn(subscriptions.clone().keep_fresh(
        db.clone(),
        subscriptions_changed,
        deliveries_wake.clone(),
        claiming.clone(),
    ));
    background.spawn(dispatcher.run(events_wake, config.poll_interval, claiming.clone()));
    background.spawn(brokers.close_idle_connections(config.broker_idle_timeout, claiming.clone()));
    let maintenance = Arc::new(maintenance);
    background
        .spawn(Arc::clone(&maintenance).run_heartbeat(config.heartbeat_interval, claiming.clone()));
    background.spawn(Arc::clone(&maintenance).run_gauges(claiming.clone()));
    if let Some(retention) = config.retention {
        background.spawn(Arc::clone(&maintenance).run_retention(retention, claiming.clone()));
    }
    background.spawn(Arc::clone(&deliverer).run(
        deliveries_wake,
        config.poll_interval,
        claiming.clone(),
    ));
    let completer_task = tokio::spawn(completer.run(results_rx, cancel.clone()));

    // validate() refused a blank token, so None here means the API is off by choice.
    let admin_token = config
        .admin_token
        .as_ref()
        .and_then(|token| crate::api::AdminToken::new(token.expose_secret()));
    // The admin API gets connections of its own that keep the server's commit setting
    // (the relay's own bookkeeping may not, see OUTBOX_ASYNC_COMMIT). Made on first use.
    let admin_pool =
        db::connect_pool(database_url, ADMIN_POOL_SIZE, config.admin_session_limits())?;
    let http_state = crate::http::HttpState {
        health: health.clone(),
        metrics: metrics.clone(),
        pool: admin_pool.clone(),
        admin_token,
    };
    let http_cancel = cancel.clone();
    let http_task = tokio::spawn(async move {
        let server = axum::serve(http_listener, crate::http::router(http_state))
            .with_graceful_shutdown(async move { http_cancel.cancelled().await });
        if let Err(error) = server.await {
            tracing::error!(error = %error, "HTTP listener failed");
        }
    });

    // The config's Debug shows its secrets masked (see crate::config); the database URL is
    // not part of it, so it is masked here.
    tracing::info!(
        relay_id = %relay_id,
        http_addr = %http_addr,
        database_url = %secret::mask_url(database_url),
        config = ?config,
        "relay started"
    );

    let crash_aborts = vec![completer_task.abort_handle(), http_task.abort_handle()];
    let lifecycle = {
        let cancel = cancel.clone();
        let crash = crash.clone();
        let health = health.clone();
        let relay_id = relay_id.clone();
        let shutdown_grace = config.shutdown_grace;
        let db = db.clone();
        tokio::spawn(async move {
            cancel.cancelled().await;
            if crash.is_cancelled() {
                return;
            }
            health.shutting_down.store(true, Ordering::SeqCst);
            tracing::info!("shutting down: no new work is claimed");
            while background.join_next().await.is_some() {}

            deliverer.tasks.close();
            if tokio::time::timeout(shutdown_grace, deliverer.tasks.wait())
                .await
                .is_err()
            {
                tracing::warn!(grace = ?shutdown_grace, "requests still in flight after the grace period; abandoning them");
                deliverer.abandon.cancel();
                deliverer.tasks.wait().await;
            }
            // Dropping the last sender lets the completer write what is left and finish.
            drop(deliverer);
            let _ = completer_task.await;
            match release_leases(&db, &relay_id).await {
                Ok(0) => {}
                Ok(released) => tracing::info!(released, "handed back unfinished deliveries"),
                Err(error) => tracing::warn!(
                    error = format!("{:#}", anyhow::Error::from(error)),
                    "could not hand back leases; they expire and are reclaimed by another relay"
                ),
            }
            let _ = http_task.await;
            pool.close();
            admin_pool.close();
            tracing::info!("relay stopped");
        })
    };

    Ok(RelayHandle {
        relay_id: relay_id.to_string(),
        http_addr,
        metrics,
        health,
        cancel,
        crash,
        lifecycle,
        crash_aborts,
    })
}

async fn release_leases(db: &Db, relay_id: &str) -> Result<u64, DbError> {
    let client = db.client("releasing leases").await?;
    client
        .execute(&sql::RELEASE_LEASES, &[&relay_id])
        .await
        .context("releasing leases")
}
