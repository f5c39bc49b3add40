//! The wake-up gate: how a relay tells producers whether it wants a NOTIFY.
//!
//! NOTIFY makes producers' commits queue one behind the other (migrations/V10__quiet_producers.sql
//! says why), so producers notify only while some relay holds or waits for advisory lock
//! [`GATE_LOCK`]. A relay asks for it when it has run out of work and is about to sleep, and
//! gives it back as soon as it is busy again. The lock is granted only once every producer
//! transaction that skipped its NOTIFY has ended; the relay then looks for work once more
//! (`granted`) before it sleeps, which is what makes skipping safe.
//!
//! The lock lives on a dedicated, unpooled connection (a session lock cannot go through a
//! transaction pooler, and waiting for it must not hold up the LISTEN connection, whose
//! notifications the server only sends between statements). While this connection is down
//! nobody may be holding the gate: producers then skip NOTIFY and the relay finds their
//! events on its fallback poll, as when the LISTEN connection is down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use super::{DbContext, DbError};

/// Advisory lock key (1869575540, 0), 'outw'; the events trigger tries it shared.
pub const GATE_LOCK: (i32, i32) = (1_869_575_540, 0);

const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The dispatcher's side of the gate. Cheap to clone.
#[derive(Clone)]
pub struct WakeGate {
    /// True while the dispatcher wants the gate (it is idle and wants NOTIFYs).
    wanted: Arc<watch::Sender<bool>>,
    /// Notified each time the gate is granted: skipped producers have ended, look once more.
    granted: Arc<Notify>,
    /// True while this relay holds the gate.
    held: Arc<AtomicBool>,
}

impl Default for WakeGate {
    fn default() -> Self {
        Self::new()
    }
}

impl WakeGate {
    pub fn new() -> WakeGate {
        WakeGate {
            wanted: Arc::new(watch::channel(false).0),
            granted: Arc::new(Notify::new()),
            held: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Ask for NOTIFYs: the relay has run out of work and will sleep.
    pub fn request(&self) {
        self.wanted
            .send_if_modified(|wanted| !std::mem::replace(wanted, true));
    }

    /// Stop NOTIFYs: the relay is busy and looks for work on its own.
    pub fn release(&self) {
        self.wanted
            .send_if_modified(|wanted| std::mem::replace(wanted, false));
    }

    /// Resolves when the gate is next granted.
    pub async fn granted(&self) {
        self.granted.notified().await;
    }

    pub fn is_held(&self) -> bool {
        self.held.load(Ordering::SeqCst)
    }

    /// Keeps the gate's connection and follows `request`/`release` until `cancel` fires,
    /// reconnecting with exponential backoff.
    pub async fn run(self, database_url: String, cancel: CancellationToken) {
        let mut backoff = BACKOFF_START;
        loop {
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                result = self.session(&database_url) => result,
            };
            self.held.store(false, Ordering::SeqCst);
            if cancel.is_cancelled() {
                return;
            }
            match result {
                Ok(()) => backoff = BACKOFF_START,
                Err(error) => tracing::warn!(
                    error = format!("{:#}", anyhow::Error::from(error)),
                    retry_in = ?backoff,
                    "wake-up gate connection failed; producers skip NOTIFY and the fallback poll finds their events meanwhile"
                ),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection's life. Returns only on an error or when the server closes it.
    async fn session(&self, database_url: &str) -> Result<(), DbError> {
        let mut config = super::parse_url(database_url)?;
        config.application_name(format!("{}-wake-gate", super::APPLICATION_NAME));
        let (client, connection) = config
            .connect(NoTls)
            .await
            .context("connecting the wake-up gate session")?;
        let mut driver = tokio::spawn(connection);
        let result = async {
            // Waiting for the gate is this session's job: no timeout may cut the wait short.
            client
                .batch_execute("SET statement_timeout = 0; SET lock_timeout = 0")
                .await
                .context("configuring the wake-up gate session")?;
            let lock = client
                .prepare("SELECT pg_advisory_lock($1, $2)")
                .await
                .context("preparing the wake-up gate lock")?;
            let unlock = client
                .prepare("SELECT pg_advisory_unlock($1, $2)")
                .await
                .context("preparing the wake-up gate unlock")?;
            let mut wanted = self.wanted.subscribe();
            loop {
                if wanted.wait_for(|wanted| *wanted).await.is_err() {
                    return Ok(());
                }
                // Granted once every producer that skipped its NOTIFY has ended. A release
                // asked for meanwhile is honoured right after (the wait cannot be withdrawn).
                client
                    .execute(&lock, &[&GATE_LOCK.0, &GATE_LOCK.1])
                    .await
                    .context("taking the wake-up gate")?;
                self.held.store(true, Ordering::SeqCst);
                self.granted.notify_one();
                if wanted.wait_for(|wanted| !*wanted).await.is_err() {
                    return Ok(());
                }
                client
                    .execute(&unlock, &[&GATE_LOCK.0, &GATE_LOCK.1])
                    .await
                    .context("releasing the wake-up gate")?;
                self.held.store(false, Ordering::SeqCst);
            }
        };
        tokio::select! {
            result = result => result,
            ended = &mut driver => match ended {
                Ok(Err(error)) => Err(DbError::Query { context: "wake-up gate connection lost", source: error }),
                Ok(Ok(())) | Err(_) => Ok(()),
            },
        }
    }
}
