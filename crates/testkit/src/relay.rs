//! Relays as the tests and the benchmark run them: in this process on a port of its own
//! ([`start`]), or as `outbox-relay run` processes told apart by their sessions'
//! `application_name` ([`process_application_name`]); and what both read of a relay.

use anyhow::Context;
use outbox_relay::config::RelayConfig;
use outbox_relay::relay::RelayHandle;

/// Starts a relay in this process against an already-migrated database, its HTTP listener
/// on a free port of 127.0.0.1 (`RelayHandle::http_addr`).
pub async fn start(config: RelayConfig, database_url: &str) -> anyhow::Result<RelayHandle> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the relay's HTTP listener on 127.0.0.1:0")?;
    outbox_relay::relay::start(config, database_url, listener)
        .await
        .context("starting the relay")
}

/// Database errors the relay counted (`outbox_db_errors_total`), all components together.
pub fn db_errors(relay: &RelayHandle) -> u64 {
    ["dispatcher", "deliverer", "completer", "maintenance"]
        .iter()
        .map(|component| {
            relay
                .metrics
                .db_errors
                .with_label_values(&[component])
                .get()
        })
        .sum()
}

/// `application_name` of a relay process's pooled connections: `outbox-relay.<relay id>`,
/// so one relay's sessions can be told from another's. (Its LISTEN connection is always
/// `outbox-relay-listen`, one per relay.)
pub fn process_application_name(relay_id: &str) -> String {
    format!("outbox-relay.{relay_id}")
}
