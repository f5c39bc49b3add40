//! Readiness as the components see it, read by `/readyz`. Each flag is set by the component
//! that knows: the LISTEN connection, the last database round trips, the schema check at
//! startup and on every gauge refresh, and shutdown.
//!
//! In poll-only mode (`OUTBOX_LISTEN=false`) there is no LISTEN connection, so it cannot be
//! down: readiness then ignores it and `/readyz` reports the listener as `"disabled"`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Clone)]
pub struct Health {
    pub listener_connected: Arc<AtomicBool>,
    /// False in poll-only mode: no LISTEN connection is opened, so none is waited for.
    pub listener_required: bool,
    pub database_reachable: Arc<AtomicBool>,
    pub schema_current: Arc<AtomicBool>,
    pub shutting_down: Arc<AtomicBool>,
}

impl Default for Health {
    /// Listening, as `OUTBOX_LISTEN` defaults to.
    fn default() -> Health {
        Health::new(true)
    }
}

/// The `/readyz` body: every check, and the names of those that failed.
#[derive(Debug, serde::Serialize, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub database: bool,
    pub listener: ListenerStatus,
    pub migrations: bool,
    pub shutting_down: bool,
    pub failed: Vec<&'static str>,
}

/// The LISTEN connection as `/readyz` shows it: `true` (connected), `false` (down) or
/// `"disabled"` (poll-only mode). Booleans for the first two, as before poll-only mode
/// existed, so probes that read `listener == true` keep working.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerStatus {
    Connected,
    Down,
    Disabled,
}

impl serde::Serialize for ListenerStatus {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ListenerStatus::Connected => serializer.serialize_bool(true),
            ListenerStatus::Down => serializer.serialize_bool(false),
            ListenerStatus::Disabled => serializer.serialize_str("disabled"),
        }
    }
}

impl Health {
    /// `listener_required`: whether the relay LISTENs (`OUTBOX_LISTEN`).
    pub fn new(listener_required: bool) -> Health {
        Health {
            listener_connected: Arc::default(),
            listener_required,
            database_reachable: Arc::default(),
            schema_current: Arc::default(),
            shutting_down: Arc::default(),
        }
    }

    pub fn set_database_reachable(&self, reachable: bool) {
        self.database_reachable.store(reachable, Ordering::SeqCst);
    }

    pub fn readiness(&self) -> Readiness {
        let database = self.database_reachable.load(Ordering::SeqCst);
        let listener = match (
            self.listener_required,
            self.listener_connected.load(Ordering::SeqCst),
        ) {
            (false, _) => ListenerStatus::Disabled,
            (true, true) => ListenerStatus::Connected,
            (true, false) => ListenerStatus::Down,
        };
        let migrations = self.schema_current.load(Ordering::SeqCst);
        let shutting_down = self.shutting_down.load(Ordering::SeqCst);
        let mut failed = Vec::new();
        if !database {
            failed.push("database unreachable");
        }
        if listener == ListenerStatus::Down {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy(listener_required: bool) -> Health {
        let health = Health::new(listener_required);
        health.set_database_reachable(true);
        health.schema_current.store(true, Ordering::SeqCst);
        health
    }

    #[test]
    fn a_required_listener_that_is_down_fails_readiness() {
        let readiness = healthy(true).readiness();
        assert!(!readiness.ready);
        assert_eq!(readiness.failed, vec!["LISTEN connection down"]);
        assert_eq!(
            serde_json::to_value(&readiness).expect("serializes")["listener"],
            false
        );
    }

    #[test]
    fn poll_only_mode_is_ready_without_a_listener_and_says_disabled() {
        let readiness = healthy(false).readiness();
        assert!(readiness.ready, "{:?}", readiness.failed);
        assert_eq!(
            serde_json::to_value(&readiness).expect("serializes")["listener"],
            "disabled"
        );
    }
}
