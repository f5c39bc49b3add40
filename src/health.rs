//! Readiness as the components see it, read by `/readyz`. Each flag is set by the component
//! that knows: the LISTEN connection, the last database round trips, the schema check at
//! startup and on every gauge refresh, and shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Clone, Default)]
pub struct Health {
    pub listener_connected: Arc<AtomicBool>,
    pub database_reachable: Arc<AtomicBool>,
    pub schema_current: Arc<AtomicBool>,
    pub shutting_down: Arc<AtomicBool>,
}

/// The `/readyz` body: every check, and the names of those that failed.
#[derive(Debug, serde::Serialize, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub database: bool,
    pub listener: bool,
    pub migrations: bool,
    pub shutting_down: bool,
    pub failed: Vec<&'static str>,
}

impl Health {
    pub fn set_database_reachable(&self, reachable: bool) {
        self.database_reachable.store(reachable, Ordering::SeqCst);
    }

    pub fn readiness(&self) -> Readiness {
        let database = self.database_reachable.load(Ordering::SeqCst);
        let listener = self.listener_connected.load(Ordering::SeqCst);
        let migrations = self.schema_current.load(Ordering::SeqCst);
        let shutting_down = self.shutting_down.load(Ordering::SeqCst);
        let mut failed = Vec::new();
        if !database {
            failed.push("database unreachable");
        }
        if !listener {
            failed.push("LISTEN connection down");
        }
        if !migrations {
            failed.push("schema older than this relay: run outbox-relay migrate");
        }
        if shutting_down {
            failed.push("shutting down");
        }
        Readiness {
            ready: failed.is_empty(),
            database,
            listener,
            migrations,
            shutting_down,
            failed,
        }
    }
}
