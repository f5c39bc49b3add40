//! The admin commands (`subscription …`, `replay`, `status`) run as the real binary against a
//! test database: exit codes, what they print, and what they leave in the tables. The secret
//! rotation tests also run a relay and a receiver, to show the signatures subscribers get.

use std::process::Stdio;
use std::time::Duration;

use outbox_relay::webhook::{self, SigningSecret};
use serde_json::json;
use testkit::receiver::{Received, Receiver};

use crate::harness::db::TestDb;
use crate::harness::relay::*;

mod replay_and_status;
mod rotation;
mod subscriptions;

/// What one run of the binary did.
struct Run {
    success: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self, what: &str) -> Run {
        assert!(
            self.success,
            "{what} failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    fn failed(self, what: &str) -> Run {
        assert!(
            !self.success,
            "{what} should have failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// The value after `label` on the line that starts with it.
    fn line_value(&self, label: &str) -> String {
        self.stdout
            .lines()
            .find_map(|line| line.strip_prefix(label))
            .unwrap_or_else(|| panic!("no line starting {label:?} in:\n{}", self.stdout))
            .trim()
            .to_owned()
    }
}

async fn run_binary(database_url: Option<&str>, envs: &[(&str, &str)], args: &[&str]) -> Run {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    command
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("USER")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(url) = database_url {
        command.env("DATABASE_URL", url);
    }
    for (key, value) in envs {
        command.env(key, value);
    }
    let output = tokio::time::timeout(DEADLINE, command.output())
        .await
        .unwrap_or_else(|_| panic!("outbox-relay {args:?} did not finish"))
        .expect("run the outbox-relay binary");
    Run {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

async fn cli(db: &TestDb, args: &[&str]) -> Run {
    run_binary(Some(&db.url), &[], args).await
}

/// `subscription add`, returning the secret it printed.
async fn add(db: &TestDb, name: &str, url: &str, extra: &[&str]) -> String {
    let mut args = vec!["subscription", "add", name, "--url", url];
    args.extend_from_slice(extra);
    cli(db, &args)
        .await
        .ok("subscription add")
        .line_value("secret:")
}

async fn text(db: &TestDb, sql: &str) -> Option<String> {
    db.client()
        .await
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// Inserts an event that is already dispatched and one delivery of it with `status`, so
/// tests control delivery state without a relay. Returns the event's uuid.
async fn delivery_with_status(db: &TestDb, subscription: &str, status: &str) -> uuid::Uuid {
    let lease = if status == "in_flight" {
        "'elsewhere', now() + interval '1 hour'"
    } else {
        "NULL, NULL"
    };
    db.client()
        .await
        .query_one(
            &format!(
                "WITH e AS (
                     INSERT INTO outbox.events (event_type, payload, dispatched_at)
                     VALUES ('lead.created', '{{}}', now()) RETURNING id, event_id
                 ), d AS (
                     INSERT INTO outbox.deliveries (event_id, subscription_id, status, attempts, lease_owner, lease_expires_at)
                     SELECT e.id, s.id, $2, 1, {lease}
                       FROM e, outbox.subscriptions s WHERE s.name = $1
                 )
                 SELECT event_id FROM e"
            ),
            &[&subscription, &status],
        )
        .await
        .expect("insert a delivery")
        .get(0)
}
