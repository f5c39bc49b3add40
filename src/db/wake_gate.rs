//! The wake-up gate: how a relay tells producers whether it wants a NOTIFY.
//!
//! NOTIFY makes producers' commits queue one behind the other (migrations/V10__quiet_producers.sql
//! says why), so producers notify only while some relay holds advisory lock [`GATE_LOCK`]. A
//! relay asks for it when it has run out of work and is about to sleep, and gives it back as
//! soon as it is busy again. The lock can be taken only once every producer transaction that
//! skipped its NOTIFY has ended; the relay then looks for work once more (`granted`) before it
//! sleeps, which is what makes skipping safe.
//!
//! The lock is tried, never waited for: a session waiting inside `SELECT pg_advisory_lock()`
//! keeps a snapshot, which holds back vacuum and the cleanup of dead index entries for the
//! whole database (three relays, two of them waiting, drained at half the rate of one). A try
//! that fails because another relay holds the gate leaves this relay free to sleep, since
//! producers NOTIFY for that one; a try that fails because producers still hold it shared
//! (they skipped their NOTIFY) is repeated, and the relay keeps looking for work meanwhile.
//!
//! The lock lives on a dedicated, unpooled connection to the LISTEN URL (a session lock
//! cannot go through a transaction pooler, and a pooled connection goes back to the pool).
//! While this connection is down nobody may be holding the gate: producers then skip NOTIFY
//! and the relay finds their events on its fallback poll, as when the LISTEN connection is
//! down.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::{DbContext, DbError};
use crate::backoff::Backoff;

/// Advisory lock key (1869575540, 0), 'outw'; the events trigger tries it shared.
pub const GATE_LOCK: (i32, i32) = (1_869_575_540, 0);

const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Pauses between tries for the gate: short at first (producers that skipped their NOTIFY
/// usually commit within milliseconds), growing while it stays taken.
const TRY_PAUSE_START: Duration = Duration::from_millis(1);
const TRY_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Where this relay stands with the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum GateState {
    /// The gate's session is not connected: producers skip their NOTIFY, and the relay
    /// falls back to its poll interval, as when its LISTEN connection is down.
    Down = 4,
    /// Not asked for: producers may be skipping their NOTIFY.
    Released = 0,
    /// Asked for; producers that skipped their NOTIFY still hold it shared.
    Trying = 1,
    /// Held by this relay: producers NOTIFY.
    Held = 2,
    /// Held by another relay: producers NOTIFY (for it, and every relay hears them).
    Covered = 3,
}

impl GateState {
    fn from_u8(value: u8) -> GateState {
        match value {
            1 => GateState::Trying,
            2 => GateState::Held,
            3 => GateState::Covered,
            0 => GateState::Released,
            _ => GateState::Down,
        }
    }
}

/// The dispatcher's side of the gate. Cheap to clone.
#[derive(Clone)]
pub struct WakeGate {
    /// True while the dispatcher wants the gate (it is idle and wants NOTIFYs).
    wanted: Arc<watch::Sender<bool>>,
    /// Notified each time the gate is granted: skipped producers have ended, look once more.
    granted: Arc<Notify>,
    state: Arc<AtomicU8>,
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
            state: Arc::new(AtomicU8::new(GateState::Down as u8)),
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

    fn state(&self) -> GateState {
        GateState::from_u8(self.state.load(Ordering::SeqCst))
    }

    /// Whether the relay may sleep until a NOTIFY or its poll: producers NOTIFY now (after
    /// the grant, the relay looks once more first), or the gate is down and the poll is all
    /// there is.
    pub fn may_sleep(&self) -> bool {
        matches!(
            self.state(),
            GateState::Held | GateState::Covered | GateState::Down
        )
    }

    fn set(&self, state: GateState) {
        self.state.store(state as u8, Ordering::SeqCst);
    }

    /// Keeps the gate's connection and follows `request`/`release` until `cancel` fires,
    /// reconnecting with exponential backoff.
    pub async fn run(self, database_url: String, cancel: CancellationToken) {
        let mut backoff = Backoff::new(BACKOFF_START, BACKOFF_MAX);
        loop {
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                result = self.session(&database_url) => result,
            };
            self.set(GateState::Down);
            if cancel.is_cancelled() {
                return;
            }
            match result {
                Ok(()) => backoff.reset(),
                Err(error) => tracing::warn!(
                    error = format!("{:#}", anyhow::Error::from(error)),
                    retry_in = ?backoff.current(),
                    "wake-up gate connection failed; producers skip NOTIFY and the fallback poll finds their events meanwhile"
                ),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_pause()) => {}
            }
        }
    }

    /// One connection's life. Returns only on an error or when the server closes it.
    async fn session(&self, database_url: &str) -> Result<(), DbError> {
        let mut target = super::parse_url(database_url)?;
        target
            .config
            .application_name(format!("{}-wake-gate", super::APPLICATION_NAME));
        let (client, connection) = target
            .connect()
            .await
            .context("connecting the wake-up gate session")?;
        let mut driver = tokio::spawn(connection);
        let result = async {
            self.set(GateState::Released);
            let try_lock = client
                .prepare("SELECT pg_try_advisory_lock($1, $2)")
                .await
                .context("preparing the wake-up gate lock")?;
            let unlock = client
                .prepare("SELECT pg_advisory_unlock($1, $2)")
                .await
                .context("preparing the wake-up gate unlock")?;
            let held_elsewhere = client
                .prepare(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks
                      WHERE locktype = 'advisory' AND granted AND mode = 'ExclusiveLock'
                        AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                        AND classid = $1::integer::oid AND objid = $2::integer::oid AND objsubid = 2
                        AND pid <> pg_backend_pid())",
                )
                .await
                .context("preparing the wake-up gate check")?;
            let mut wanted = self.wanted.subscribe();
            loop {
                if wanted.wait_for(|wanted| *wanted).await.is_err() {
                    return Ok(());
                }
                let mut pause = Backoff::new(TRY_PAUSE_START, TRY_PAUSE_MAX);
                let taken = loop {
                    let taken: bool = client
                        .query_one(&try_lock, &[&GATE_LOCK.0, &GATE_LOCK.1])
                        .await
                        .context("trying the wake-up gate")?
                        .get(0);
                    if taken {
                        break true;
                    }
                    let covered: bool = client
                        .query_one(&held_elsewhere, &[&GATE_LOCK.0, &GATE_LOCK.1])
                        .await
                        .context("checking the wake-up gate")?
                        .get(0);
                    self.set(if covered {
                        GateState::Covered
                    } else {
                        GateState::Trying
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(pause.next_pause()) => {}
                        changed = wanted.wait_for(|wanted| !*wanted) => {
                            if changed.is_err() {
                                return Ok(());
                            }
                            break false;
                        }
                    }
                };
                if !taken {
                    self.set(GateState::Released);
                    continue;
                }
                self.set(GateState::Held);
                self.granted.notify_one();
                if wanted.wait_for(|wanted| !*wanted).await.is_err() {
                    return Ok(());
                }
                client
                    .execute(&unlock, &[&GATE_LOCK.0, &GATE_LOCK.1])
                    .await
                    .context("releasing the wake-up gate")?;
                self.set(GateState::Released);
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
