//! The admin commands (`subscription …`, `replay`, `status`) run as the real binary against a
//! test database: exit codes, what they print, and what they leave in the tables. The secret
//! rotation tests also run a relay and a receiver, to show the signatures subscribers get.

use std::process::Stdio;
use std::time::Duration;

use outbox_relay::devkit::receiver::{Received, Receiver};
use outbox_relay::webhook::{self, SigningSecret};
use serde_json::json;

use crate::harness::db::TestDb;
use crate::harness::relay::*;

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

#[tokio::test]
async fn add_prints_the_secret_once_and_list_never_shows_it() {
    let db = TestDb::new().await;
    let run = cli(
        &db,
        &[
            "subscription",
            "add",
            "crm",
            "--url",
            "https://crm.internal/hooks",
            "--event-type",
            "lead.*",
            "--event-type",
            "invoice.paid",
            "--tenant-id",
            "acme",
            "--filter",
            r#"{"plan":"pro"}"#,
            "--header",
            "X-Team=growth",
            "--timeout",
            "2s",
            "--max-in-flight",
            "3",
            "--rate-limit",
            "5",
            "--retry-schedule",
            "1s,2m",
            "--ordered",
        ],
    )
    .await
    .ok("subscription add");
    let secret = run.line_value("secret:");
    assert!(secret.starts_with("whsec_"), "{}", run.stdout);
    assert_eq!(
        run.stdout.matches(&secret).count(),
        1,
        "secret printed once: {}",
        run.stdout
    );
    assert!(
        run.stdout.contains("not shown again"),
        "no warning that the secret is shown once: {}",
        run.stdout
    );

    let row = db
        .client()
        .await
        .query_one(
            "SELECT secret, event_types, tenant_id, filter, headers, extract(epoch FROM timeout)::float8,
                    max_in_flight, rate_limit_per_second::float8, retry_schedule::text, ordered, enabled
               FROM outbox.subscriptions WHERE name = 'crm'",
            &[],
        )
        .await
        .expect("the subscription row");
    assert_eq!(row.get::<_, String>(0), secret);
    assert_eq!(row.get::<_, Vec<String>>(1), ["lead.*", "invoice.paid"]);
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("acme"));
    assert_eq!(
        row.get::<_, Option<serde_json::Value>>(3),
        Some(json!({"plan": "pro"}))
    );
    assert_eq!(
        row.get::<_, serde_json::Value>(4),
        json!({"X-Team": "growth"})
    );
    assert_eq!(row.get::<_, f64>(5), 2.0);
    assert_eq!(row.get::<_, i32>(6), 3);
    assert_eq!(row.get::<_, Option<f64>>(7), Some(5.0));
    assert_eq!(row.get::<_, String>(8), r#"{00:00:01,00:02:00}"#);
    assert!(row.get::<_, bool>(9), "ordered");
    assert!(row.get::<_, bool>(10), "enabled");

    let list = cli(&db, &["subscription", "list"])
        .await
        .ok("subscription list");
    assert!(list.stdout.contains("crm"), "{}", list.stdout);
    assert!(list.stdout.contains("https://crm.internal/hooks"));
    assert!(list.stdout.contains("lead.*,invoice.paid"));
    assert!(!list.stdout.contains(&secret), "list shows the secret");

    let json_list = cli(&db, &["subscription", "list", "--json"])
        .await
        .ok("subscription list --json");
    assert!(
        !json_list.stdout.contains(&secret),
        "list --json shows the secret"
    );
    let parsed: serde_json::Value =
        serde_json::from_str(&json_list.stdout).expect("list --json prints JSON");
    let first = &parsed[0];
    assert_eq!(first["name"], "crm");
    assert_eq!(first["max_in_flight"], 3);
    assert_eq!(first["timeout_seconds"], 2.0);
    assert_eq!(first["retry_schedule_seconds"], json!([1.0, 120.0]));
    assert!(first.get("secret").is_none(), "{first}");

    let show = cli(&db, &["subscription", "show", "crm"])
        .await
        .ok("subscription show");
    assert!(!show.stdout.contains(&secret), "show prints the secret");
    assert!(show.stdout.contains("X-Team=growth"), "{}", show.stdout);
}

#[tokio::test]
async fn a_taken_name_is_refused_with_what_to_do() {
    let db = TestDb::new().await;
    add(&db, "crm", "https://crm.internal/a", &[]).await;
    let run = cli(
        &db,
        &[
            "subscription",
            "add",
            "crm",
            "--url",
            "https://crm.internal/b",
        ],
    )
    .await
    .failed("adding a second crm");
    assert!(
        run.stderr
            .contains(r#"a subscription named "crm" already exists"#),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("subscription update crm"),
        "{}",
        run.stderr
    );
    assert_eq!(
        text(&db, "SELECT url FROM outbox.subscriptions")
            .await
            .as_deref(),
        Some("https://crm.internal/a")
    );
}

#[tokio::test]
async fn bad_values_are_refused_naming_the_problem() {
    let db = TestDb::new().await;
    let cases: [(&[&str], &[&str]); 8] = [
        (
            &["--url", "ftp://crm.internal/x"],
            &["invalid url", "http://", "--url"],
        ),
        (
            &["--url", "crm.internal/hooks"],
            &["invalid url", "absolute URL"],
        ),
        (
            &["--url", "https://crm.internal/x", "--timeout", "10m"],
            &[
                "invalid timeout",
                "100ms and 5m",
                "timeout_sane",
                "--timeout",
            ],
        ),
        (
            &[
                "--url",
                "https://crm.internal/x",
                "--header",
                "Webhook-Signature=x",
            ],
            &["invalid headers", "cannot be overridden", "--header"],
        ),
        (
            &["--url", "https://crm.internal/x", "--max-in-flight", "0"],
            &[
                "invalid max_in_flight",
                "between 1 and 10000",
                "--max-in-flight",
            ],
        ),
        (
            &[
                "--url",
                "https://crm.internal/x",
                "--secret",
                "whsec_c2hvcnQ=",
            ],
            &["invalid secret", "whsec_", "--secret"],
        ),
        (
            &["--url", "https://crm.internal/x", "--filter", "[1]"],
            &["--filter", "not an object"],
        ),
        (
            // PostgreSQL cannot store NUL in jsonb; refused before it gets there.
            &[
                "--url",
                "https://crm.internal/x",
                "--filter",
                r#"{"plan": "pro\u0000"}"#,
            ],
            &["--filter", "plan", "NUL"],
        ),
    ];
    for (flags, expected) in cases {
        let mut args = vec!["subscription", "add", "crm"];
        args.extend_from_slice(flags);
        let run = cli(&db, &args).await.failed(&format!("add {flags:?}"));
        for needle in expected {
            assert!(
                run.stderr.contains(needle),
                "add {flags:?}: {needle:?} not in stderr:\n{}",
                run.stderr
            );
        }
    }
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.subscriptions").await,
        0
    );
}

#[tokio::test]
async fn update_changes_only_the_given_settings() {
    let db = TestDb::new().await;
    add(
        &db,
        "crm",
        "https://crm.internal/a",
        &[
            "--event-type",
            "lead.*",
            "--rate-limit",
            "10",
            "--tenant-id",
            "acme",
        ],
    )
    .await;
    cli(
        &db,
        &[
            "subscription",
            "update",
            "crm",
            "--url",
            "https://crm.internal/b",
            "--max-in-flight",
            "7",
            "--no-rate-limit",
            "--retry-schedule",
            "none",
        ],
    )
    .await
    .ok("subscription update");
    let row = db
        .client()
        .await
        .query_one(
            "SELECT url, max_in_flight, rate_limit_per_second::float8, cardinality(retry_schedule),
                    event_types, tenant_id
               FROM outbox.subscriptions WHERE name = 'crm'",
            &[],
        )
        .await
        .expect("the subscription row");
    assert_eq!(row.get::<_, String>(0), "https://crm.internal/b");
    assert_eq!(row.get::<_, i32>(1), 7);
    assert_eq!(row.get::<_, Option<f64>>(2), None);
    assert_eq!(row.get::<_, i32>(3), 0);
    assert_eq!(row.get::<_, Vec<String>>(4), ["lead.*"], "left alone");
    assert_eq!(row.get::<_, Option<String>>(5).as_deref(), Some("acme"));

    let run = cli(&db, &["subscription", "update", "crm"])
        .await
        .failed("update without settings");
    assert!(run.stderr.contains("nothing to change"), "{}", run.stderr);
    let run = cli(
        &db,
        &["subscription", "update", "nope", "--max-in-flight", "2"],
    )
    .await
    .failed("update of an unknown subscription");
    assert!(
        run.stderr.contains(r#"no subscription named "nope""#)
            && run.stderr.contains("subscription list"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn disable_keeps_the_reason_and_enable_clears_it() {
    let db = TestDb::new().await;
    add(&db, "crm", "https://crm.internal/a", &[]).await;
    cli(
        &db,
        &[
            "subscription",
            "disable",
            "crm",
            "--reason",
            "CRM migration",
        ],
    )
    .await
    .ok("subscription disable");
    let state =
        "SELECT enabled::text || ':' || coalesce(disabled_reason, '') FROM outbox.subscriptions";
    assert_eq!(
        text(&db, state).await.as_deref(),
        Some("false:CRM migration")
    );
    let list = cli(&db, &["subscription", "list"]).await.ok("list");
    assert!(list.stdout.contains(" no "), "{}", list.stdout);

    cli(&db, &["subscription", "enable", "crm"])
        .await
        .ok("subscription enable");
    assert_eq!(text(&db, state).await.as_deref(), Some("true:"));
}

#[tokio::test]
async fn remove_is_refused_without_yes_and_then_ends_open_deliveries() {
    let db = TestDb::new().await;
    add(&db, "crm", "https://crm.internal/a", &[]).await;
    delivery_with_status(&db, "crm", "failing").await;

    let run = cli(&db, &["subscription", "remove", "crm"])
        .await
        .failed("remove without --yes");
    for needle in [
        "--yes",
        "1 open delivery",
        "dead",
        "subscription disable crm",
    ] {
        assert!(
            run.stderr.contains(needle),
            "{needle:?} not in:\n{}",
            run.stderr
        );
    }
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.subscriptions").await,
        1
    );

    let run = cli(&db, &["subscription", "remove", "crm", "--yes"])
        .await
        .ok("remove --yes");
    assert!(
        run.stdout.contains("1 open delivery marked dead"),
        "{}",
        run.stdout
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.subscriptions").await,
        0
    );
    assert_eq!(deliveries(&db).await, vec![("dead".to_owned(), 1)]);
}

#[tokio::test]
async fn rotate_secret_keeps_the_previous_secret_for_the_overlap() {
    let db = TestDb::new().await;
    let old = add(&db, "crm", "https://crm.internal/a", &[]).await;

    let run = cli(&db, &["subscription", "rotate-secret", "crm"])
        .await
        .ok("rotate-secret");
    let new = run.line_value("new secret:");
    assert_ne!(new, old);
    assert_eq!(run.stdout.matches(&new).count(), 1, "{}", run.stdout);
    let row = db
        .client()
        .await
        .query_one(
            "SELECT secret, previous_secret,
                    previous_secret_expires_at > now() + interval '23 hours'
                AND previous_secret_expires_at <= now() + interval '24 hours'
               FROM outbox.subscriptions",
            &[],
        )
        .await
        .expect("the subscription row");
    assert_eq!(row.get::<_, String>(0), new);
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some(old.as_str())
    );
    assert!(row.get::<_, bool>(2), "default overlap is 24h");
    let list = cli(&db, &["subscription", "list", "--json"])
        .await
        .ok("list");
    assert!(
        !list.stdout.contains(&new) && !list.stdout.contains(&old),
        "{}",
        list.stdout
    );

    let given = webhook::generate_secret();
    cli(
        &db,
        &[
            "subscription",
            "rotate-secret",
            "crm",
            "--overlap",
            "0s",
            "--secret",
            &given,
        ],
    )
    .await
    .ok("rotate-secret --overlap 0s --secret");
    assert_eq!(
        text(
            &db,
            "SELECT secret || ':' || coalesce(previous_secret, 'none') FROM outbox.subscriptions"
        )
        .await,
        Some(format!("{given}:none"))
    );

    let run = cli(&db, &["subscription", "rotate-secret", "nope"])
        .await
        .failed("rotating an unknown subscription");
    assert!(
        run.stderr.contains(r#"no subscription named "nope""#),
        "{}",
        run.stderr
    );
}

/// The `v1,` entries of a request's signature header.
fn signatures(request: &Received) -> Vec<String> {
    request
        .header(webhook::HEADER_SIGNATURE)
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Whether one signature entry of `request` verifies under `secret`.
fn signed_by(request: &Received, entry: &str, secret: &str) -> bool {
    let secret = SigningSecret::parse(secret).expect("a valid secret");
    webhook::verify(
        &secret,
        request.header(webhook::HEADER_ID).unwrap_or(""),
        request.header(webhook::HEADER_TIMESTAMP).unwrap_or(""),
        &request.body,
        entry,
        chrono::Utc::now().timestamp(),
        300,
    )
    .is_ok()
}

/// Publishes events one at a time until a request for one of them satisfies `wanted`; returns
/// that request. Each event is published only after the previous one arrived, so the relay's
/// subscription cache picks up a change within a few rounds.
async fn publish_until(
    db: &TestDb,
    receiver: &Receiver,
    what: &str,
    wanted: impl Fn(&Received) -> bool,
) -> Received {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let event_id = publish(db, "lead.created", json!({"n": 1}))
            .await
            .to_string();
        let arrived = |r: &Received| r.header(webhook::HEADER_ID) == Some(event_id.as_str());
        let request = loop {
            if let Some(request) = receiver.received("/hook").into_iter().find(arrived) {
                break request;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if wanted(&request) {
            return request;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "timed out waiting for {what}; last signature header: {:?}",
            signatures(&request)
        );
    }
}

/// During the overlap a subscriber holding either secret accepts every request: each
/// carries a signature under the new secret first, then one under the previous secret.
#[tokio::test]
async fn during_a_rotation_overlap_requests_are_signed_with_both_secrets() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver");
    let old = add(&db, "crm", &receiver.url("/hook"), &[]).await;
    receiver
        .expect_secret("/hook", &old)
        .expect("old secret is valid");
    let relay = spawn_default_relay(&db).await;

    let before = publish_until(&db, &receiver, "a delivery before rotating", |_| true).await;
    assert_eq!(signatures(&before).len(), 1);
    assert_eq!(before.signature_valid, Some(true));

    let new = cli(
        &db,
        &["subscription", "rotate-secret", "crm", "--overlap", "1h"],
    )
    .await
    .ok("rotate-secret")
    .line_value("new secret:");
    let during = publish_until(&db, &receiver, "a request with two signatures", |r| {
        signatures(r).len() == 2
    })
    .await;
    let entries = signatures(&during);
    assert!(
        signed_by(&during, &entries[0], &new),
        "first entry: new secret"
    );
    assert!(!signed_by(&during, &entries[0], &old));
    assert!(
        signed_by(&during, &entries[1], &old),
        "second entry: old secret"
    );
    assert!(!signed_by(&during, &entries[1], &new));
    assert_eq!(
        during.signature_valid,
        Some(true),
        "a receiver still on the old secret accepts it"
    );
    relay.shutdown().await;
}

/// Once the overlap has passed the relay signs with the new secret alone, without restart.
#[tokio::test]
async fn after_the_rotation_overlap_only_the_new_secret_signs() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver");
    let old = add(&db, "crm", &receiver.url("/hook"), &[]).await;
    let relay = spawn_default_relay(&db).await;
    publish_until(&db, &receiver, "a delivery before rotating", |_| true).await;

    let new = cli(
        &db,
        &["subscription", "rotate-secret", "crm", "--overlap", "1s"],
    )
    .await
    .ok("rotate-secret --overlap 1s")
    .line_value("new secret:");
    let after = publish_until(
        &db,
        &receiver,
        "a request signed only with the new secret",
        |r| {
            let entries = signatures(r);
            entries.len() == 1 && signed_by(r, &entries[0], &new)
        },
    )
    .await;
    let entries = signatures(&after);
    assert!(!signed_by(&after, &entries[0], &old));
    receiver
        .expect_secret("/hook", &new)
        .expect("new secret is valid");
    let next = publish_until(&db, &receiver, "one more delivery", |_| true).await;
    assert_eq!(next.signature_valid, Some(true));
    assert_eq!(signatures(&next).len(), 1);
    relay.shutdown().await;
}

#[tokio::test]
async fn replay_dry_run_counts_and_replay_requeues_dead_deliveries() {
    let db = TestDb::new().await;
    add(&db, "crm", "https://crm.internal/a", &[]).await;
    add(&db, "billing", "https://billing.internal/a", &[]).await;
    delivery_with_status(&db, "crm", "dead").await;
    delivery_with_status(&db, "crm", "dead").await;
    delivery_with_status(&db, "billing", "dead").await;

    let run = cli(
        &db,
        &[
            "replay",
            "--subscription",
            "crm",
            "--dry-run",
            "--reason",
            "check",
        ],
    )
    .await
    .ok("replay --dry-run");
    assert!(
        run.stdout.contains("would re-queue 2 deliveries"),
        "{}",
        run.stdout
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'dead'"
        )
        .await,
        3,
        "a dry run changes nothing"
    );

    let run = run_binary(
        Some(&db.url),
        &[("USER", "alice")],
        &["replay", "--subscription", "crm", "--reason", "CRM fixed"],
    )
    .await
    .ok("replay");
    let replay_id: i64 = run
        .stdout
        .strip_prefix("replay ")
        .and_then(|rest| rest.split(':').next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no replay id in {:?}", run.stdout));
    assert!(
        run.stdout.contains("2 deliveries re-queued"),
        "{}",
        run.stdout
    );
    let row = db
        .client()
        .await
        .query_one(
            "SELECT requested_by, reason, matched, dry_run, criteria->>'subscription'
               FROM outbox.replays WHERE id = $1",
            &[&replay_id],
        )
        .await
        .expect("the replay row");
    assert_eq!(
        row.get::<_, String>(0),
        "alice",
        "requested_by defaults to $USER"
    );
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("CRM fixed")
    );
    assert_eq!(row.get::<_, i64>(2), 2);
    assert!(!row.get::<_, bool>(3));
    assert_eq!(row.get::<_, Option<String>>(4).as_deref(), Some("crm"));
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.deliveries d JOIN outbox.subscriptions s ON s.id = d.subscription_id
              WHERE s.name = 'crm' AND d.status = 'pending' AND d.attempts = 0"
        )
        .await,
        2
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'dead'"
        )
        .await,
        1,
        "billing's delivery is left alone"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.replays").await,
        2,
        "the dry run is recorded too"
    );

    let run = cli(&db, &["replay", "--status", "in_flight"])
        .await
        .failed("replaying in_flight");
    assert!(run.stderr.contains("in_flight"), "{}", run.stderr);
    let run = cli(&db, &["replay", "--subscription", "nope"])
        .await
        .failed("replaying an unknown subscription");
    assert!(
        run.stderr.contains(r#"no subscription named "nope""#),
        "{}",
        run.stderr
    );
    let run = cli(&db, &["replay", "--created-after", "yesterday"])
        .await
        .failed("a bad timestamp");
    assert!(run.stderr.contains("RFC 3339"), "{}", run.stderr);
}

#[tokio::test]
async fn status_shows_backlog_deliveries_and_recent_replays() {
    let db = TestDb::new().await;
    add(&db, "crm", "https://crm.internal/a", &[]).await;
    add(&db, "billing", "https://billing.internal/a", &[]).await;
    for status in [
        "pending",
        "pending",
        "in_flight",
        "failing",
        "dead",
        "delivered",
    ] {
        delivery_with_status(&db, "crm", status).await;
    }
    // Not dispatched yet: no relay runs in this test.
    publish(&db, "lead.created", json!({})).await;
    cli(&db, &["replay", "--dry-run", "--reason", "audit"])
        .await
        .ok("replay --dry-run");

    let run = cli(&db, &["status"]).await.ok("status");
    assert!(
        run.stdout
            .contains("Backlog: 1 event waiting to be dispatched"),
        "{}",
        run.stdout
    );
    let crm = run
        .stdout
        .lines()
        .find(|line| line.starts_with("crm "))
        .unwrap_or_else(|| panic!("no crm row in:\n{}", run.stdout));
    let cells: Vec<&str> = crm.split_whitespace().collect();
    assert_eq!(&cells[..6], ["crm", "yes", "2", "1", "1", "1"], "{crm}");
    assert!(run.stdout.contains("audit"), "{}", run.stdout);

    let run = cli(&db, &["status", "--json"]).await.ok("status --json");
    let report: serde_json::Value =
        serde_json::from_str(&run.stdout).expect("status --json is JSON");
    assert_eq!(report["backlog"]["undispatched_events"], 1);
    assert!(report["backlog"]["oldest_undispatched_age_seconds"].is_number());
    let subscriptions = report["subscriptions"].as_array().expect("subscriptions");
    let crm = subscriptions
        .iter()
        .find(|s| s["name"] == "crm")
        .expect("crm in status");
    assert_eq!(
        (
            &crm["pending"],
            &crm["in_flight"],
            &crm["failing"],
            &crm["dead"]
        ),
        (&json!(2), &json!(1), &json!(1), &json!(1))
    );
    assert!(crm["oldest_pending_age_seconds"].is_number());
    let billing = subscriptions
        .iter()
        .find(|s| s["name"] == "billing")
        .expect("billing in status");
    assert_eq!(billing["pending"], 0);
    assert!(billing["oldest_pending_age_seconds"].is_null());
    let replays = report["recent_replays"].as_array().expect("recent_replays");
    assert_eq!(replays.len(), 1);
    assert_eq!(replays[0]["reason"], "audit");
    assert_eq!(replays[0]["dry_run"], true);
}

#[tokio::test]
async fn admin_commands_without_database_url_say_how_to_set_it() {
    for args in [
        &["subscription", "list"][..],
        &[
            "subscription",
            "add",
            "crm",
            "--url",
            "https://crm.internal/a",
        ],
        &["replay", "--dry-run"],
        &["status"],
    ] {
        let run = run_binary(None, &[], args)
            .await
            .failed(&format!("{args:?} without DATABASE_URL"));
        assert!(
            run.stderr.contains("DATABASE_URL is not set")
                && run.stderr.contains("export DATABASE_URL="),
            "{args:?}: {}",
            run.stderr
        );
    }
}
