//! The wake-up connection: one dedicated, unpooled connection that LISTENs for producers'
//! NOTIFYs and turns them into in-process wake-ups.
//!
//! A notification is only a hint. While this connection is down nothing is heard, so after
//! every (re)connect it wakes everyone once to catch up, and the components keep polling.
//! It never runs queries for anyone else: pooled connections may sit behind a transaction
//! pooler, where LISTEN would not work. Behind one, this connection goes to
//! `OUTBOX_LISTEN_DATABASE_URL` (PostgreSQL itself); with `OUTBOX_LISTEN=false` it is not
//! opened at all and the relay polls.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::{DbContext, DbError};
use crate::backoff::Backoff;

/// Channel the events trigger notifies (see migrations/V3__wakeup.sql).
pub const EVENTS_CHANNEL: &str = "outbox_events";
/// Channel the subscriptions trigger notifies.
pub const SUBSCRIPTIONS_CHANNEL: &str = "outbox_subscriptions";

const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// What the listener wakes.
#[derive(Clone)]
pub struct WakeTargets {
    pub events: Arc<Notify>,
    pub subscriptions: Arc<Notify>,
    /// True while LISTEN is established; /readyz reports it.
    pub connected: Arc<AtomicBool>,
}

/// Runs until `cancel` fires, reconnecting with exponential backoff.
pub async fn run(database_url: String, targets: WakeTargets, cancel: CancellationToken) {
    let mut backoff = Backoff::new(BACKOFF_START, BACKOFF_MAX);
    loop {
        let session = listen_once(&database_url, &targets, &cancel);
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            result = session => result,
        };
        targets.connected.store(false, Ordering::SeqCst);
        // Shutting down ends the session too (and `select!` may see that before it sees the
        // cancellation): the relay closing its own connection is not worth a warning.
        if cancel.is_cancelled() {
            tracing::debug!("LISTEN connection closed for shutdown");
            return;
        }
        match result {
            Ok(()) => {
                tracing::warn!("LISTEN connection closed by the server; reconnecting");
                backoff.reset();
            }
            Err(error) => {
                tracing::warn!(error = format!("{:#}", anyhow::Error::from(error)), retry_in = ?backoff.current(),
                    "LISTEN connection failed; polling continues meanwhile");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_pause()) => {}
        }
    }
}

/// One connection's life: connect, LISTEN, forward notifications until it breaks.
async fn listen_once(
    database_url: &str,
    targets: &WakeTargets,
    cancel: &CancellationToken,
) -> Result<(), DbError> {
    let mut target = super::parse_url(database_url)?;
    target
        .config
        .application_name(format!("{}-listen", super::APPLICATION_NAME));
    let (client, mut connection) = target
        .connect()
        .await
        .context("connecting the LISTEN session")?;

    // The connection object must be polled for the client's queries to make progress, and it
    // is also where notifications arrive. Its driver task wakes the targets directly: a
    // wake-up is a coalescing Notify, so a burst of NOTIFYs costs no memory here.
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let driver_targets = targets.clone();
    let mut driver = tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            match message? {
                AsyncMessage::Notification(n) if n.channel() == EVENTS_CHANNEL => {
                    driver_targets.events.notify_one();
                }
                AsyncMessage::Notification(n) if n.channel() == SUBSCRIPTIONS_CHANNEL => {
                    driver_targets.subscriptions.notify_one();
                }
                _ => {}
            }
        }
        Ok::<(), tokio_postgres::Error>(())
    });

    let listening = client
        .batch_execute(&format!(
            "LISTEN {EVENTS_CHANNEL}; LISTEN {SUBSCRIPTIONS_CHANNEL}"
        ))
        .await
        .context("LISTEN");
    let result = match listening {
        Err(error) => Err(error),
        Ok(()) => {
            targets.connected.store(true, Ordering::SeqCst);
            tracing::info!("listening for wake-ups");
            // Anything committed while we were not listening is found by this catch-up pass.
            targets.events.notify_one();
            targets.subscriptions.notify_one();
            tokio::select! {
                _ = cancel.cancelled() => Ok(()),
                ended = &mut driver => match ended {
                    Ok(Err(error)) => Err(DbError::Query { context: "LISTEN connection lost", source: error }),
                    // Closed by the server, or the driver task panicked: reconnect either way.
                    Ok(Ok(())) | Err(_) => Ok(()),
                },
            }
        }
    };
    drop(client);
    driver.abort();
    result
}
