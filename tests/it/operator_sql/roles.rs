//! Roles (see the parent module for the fixtures).

use super::*;

/// Runs the statements as `role` (SET LOCAL ROLE) in one transaction that is rolled back;
/// returns the rows of the last one.
async fn as_role(
    db: &TestDb,
    role: &str,
    statements: &[&str],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let mut client = db.client().await;
    let tx = client.transaction().await.expect("begin");
    tx.batch_execute(&format!("SET LOCAL ROLE {role}"))
        .await
        .expect("set role");
    let mut rows = Vec::new();
    for statement in statements {
        rows = tx.query(*statement, &[]).await?;
    }
    tx.rollback().await.expect("rollback");
    Ok(rows)
}

async fn allowed_steps(db: &TestDb, role: &str, statements: &[&str]) -> Vec<Row> {
    as_role(db, role, statements)
        .await
        .unwrap_or_else(|e| panic!("{role} should be allowed to run {statements:?}: {e:?}"))
}

async fn allowed(db: &TestDb, role: &str, sql: &str) -> Vec<Row> {
    allowed_steps(db, role, &[sql]).await
}

async fn denied(db: &TestDb, role: &str, sql: &str) {
    match as_role(db, role, &[sql]).await {
        Ok(_) => panic!("{role} should not be allowed to run {sql}"),
        Err(error) => assert_eq!(
            db_error(&error).0,
            "42501",
            "{role} running {sql}: expected insufficient_privilege, got {error:?}"
        ),
    }
}

/// sql/roles.sql is idempotent and safe to run concurrently (roles are cluster-wide and
/// other test runs may create them at the same moment); each role can do its job and
/// nothing beyond it.
#[tokio::test]
async fn least_privilege_roles_allow_each_job_and_nothing_more() {
    let db = TestDb::new().await;
    let crm = subscription(&db, "crm").await;
    let (e, _) = event(&db, "lead.created", None, "1 minute").await;
    delivery(&db, e, crm, "dead").await;
    let (pending_event, _) = event(&db, "lead.created", None, "1 minute").await;
    let pending = delivery(&db, pending_event, crm, "pending").await;
    db.client()
        .await
        .execute(
            "UPDATE outbox.deliveries SET next_attempt_at = now() WHERE id = $1",
            &[&pending],
        )
        .await
        .expect("make it due");

    let (first, second) = tokio::join!(psql(&db, "roles.sql", &[]), psql(&db, "roles.sql", &[]));
    let out = psql(&db, "roles.sql", &[]).await;
    assert_eq!(first, out, "a second run changes nothing");
    assert_eq!(second, out);
    assert!(out.contains("outbox_producer"), "{out}");

    // Producers write events and read back nothing but their ids.
    let p = "outbox_producer";
    let rows = allowed(
        &db,
        p,
        "INSERT INTO outbox.events (event_type, payload) VALUES ('lead.created', '{}') RETURNING event_id",
    )
    .await;
    assert_eq!(rows.len(), 1);
    allowed(
        &db,
        p,
        "SELECT outbox.publish('lead.created', '{}', tenant_id => 'acme')",
    )
    .await;
    for sql in [
        "SELECT name FROM outbox.subscriptions",
        "SELECT secret FROM outbox.subscriptions",
        "SELECT payload FROM outbox.events",
        "SELECT count(*) FROM outbox.deliveries",
        "SELECT * FROM outbox.replay(dry_run => true)",
    ] {
        denied(&db, p, sql).await;
    }

    // Operators read everything but secrets and replay through the function only.
    let o = "outbox_operator";
    for sql in [
        "SELECT * FROM outbox.deliveries",
        "SELECT * FROM outbox.delivery_attempts",
        "SELECT * FROM outbox.failed_deliveries",
        "SELECT * FROM outbox.subscription_health",
    ] {
        allowed(&db, o, sql).await;
    }
    allowed(
        &db,
        o,
        "SELECT name, url, event_types, enabled FROM outbox.subscriptions",
    )
    .await;
    for sql in [
        "SELECT secret FROM outbox.subscriptions",
        "SELECT previous_secret FROM outbox.subscriptions",
        "SELECT * FROM outbox.subscriptions",
        "UPDATE outbox.deliveries SET status = 'pending'",
    ] {
        denied(&db, o, sql).await;
    }
    denied(
        &db,
        o,
        "INSERT INTO outbox.events (event_type, payload) VALUES ('x', '{}')",
    )
    .await;
    allowed(
        &db,
        o,
        "UPDATE outbox.subscriptions SET enabled = true, disabled_reason = NULL WHERE name = 'crm'",
    )
    .await;
    let rows = allowed_steps(
        &db,
        o,
        &[
            "SELECT * FROM outbox.replay(reason => 'operator')",
            "SELECT r.matched, r.requested_by,
                    (SELECT count(*) FROM outbox.deliveries WHERE status = 'pending')
               FROM outbox.replays r",
        ],
    )
    .await;
    assert_eq!(
        rows[0].get::<_, i64>(0),
        1,
        "the operator's replay re-queued the dead delivery"
    );
    assert_eq!(
        rows[0].get::<_, String>(1),
        "outbox_operator",
        "requested_by is the caller"
    );
    assert_eq!(rows[0].get::<_, i64>(2), 2);
    allowed(&db, o, "SELECT * FROM outbox.backfill('crm', '-infinity')").await;

    // The relay claims, completes and records; it does not change the schema.
    let r = "outbox_relay";
    let claim = format!(
        "SELECT count(*) FROM outbox.claim_deliveries_and_limits(ARRAY[{crm}::bigint], ARRAY[10], 10, 'relay-test', interval '10 seconds', 1, '{{}}')
          WHERE delivery_id IS NOT NULL"
    );
    let rows = allowed_steps(
        &db,
        r,
        &[
            &claim,
            "UPDATE outbox.deliveries
                SET status = 'delivered', attempts = attempts + 1, delivered_at = now(),
                    lease_owner = NULL, lease_expires_at = NULL
              WHERE lease_owner = 'relay-test'",
            "INSERT INTO outbox.delivery_attempts (delivery_id, attempt, started_at, duration_ms, status_code)
             SELECT id, 1, now(), 1, 200 FROM outbox.deliveries WHERE status = 'delivered' RETURNING 1",
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'",
        ],
    )
    .await;
    assert_eq!(
        rows[0].get::<_, i64>(0),
        1,
        "the due pending delivery was claimed"
    );
    allowed(
        &db,
        r,
        "UPDATE outbox.events SET dispatched_at = now() WHERE dispatched_at IS NULL",
    )
    .await;
    for sql in [
        "SELECT * FROM outbox.dispatch_ordered(100)",
        "SELECT outbox.start_ordered_probe()",
        "SELECT * FROM outbox.replay(dry_run => true)",
    ] {
        allowed(&db, r, sql).await;
    }
    denied(
        &db,
        r,
        "INSERT INTO outbox.replays (criteria) VALUES ('{}')",
    )
    .await;
    allowed(&db, r, "SELECT secret FROM outbox.subscriptions").await;
    denied(&db, r, "CREATE TABLE outbox.not_allowed (id int)").await;
    // Retention deletes events; their deliveries and attempts go by cascade, and nothing
    // else of the history can be deleted or rewritten.
    let rows = allowed_steps(
        &db,
        r,
        &[
            "DELETE FROM outbox.events",
            "SELECT (SELECT count(*) FROM outbox.deliveries) + (SELECT count(*) FROM outbox.delivery_attempts)",
        ],
    )
    .await;
    assert_eq!(
        rows[0].get::<_, i64>(0),
        0,
        "deliveries and attempts went with their events"
    );
    // The admin API and the `subscription` CLI: manage subscriptions (removing one ends its
    // open deliveries through a trigger that runs with the relay's column grants), publish,
    // read the history.
    let rows = allowed_steps(
        &db,
        r,
        &[
            "INSERT INTO outbox.subscriptions (name, url) VALUES ('new-one', 'https://example.com/hook')",
            "UPDATE outbox.subscriptions SET max_in_flight = 3 WHERE name = 'new-one'",
            "DELETE FROM outbox.subscriptions WHERE name = 'crm'",
            "INSERT INTO outbox.events (event_type, payload) VALUES ('lead.created', '{}')",
            "SELECT outbox.max_payload_bytes()",
            "SELECT count(*) FROM outbox.replays",
            "SELECT count(*) FROM outbox.schema_history",
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'dead' AND last_error LIKE '%was removed'",
        ],
    )
    .await;
    assert_eq!(
        rows[0].get::<_, i64>(0),
        1,
        "removing a subscription ended its pending delivery"
    );
    for sql in [
        "DELETE FROM outbox.deliveries",
        "DELETE FROM outbox.delivery_attempts",
        "UPDATE outbox.delivery_attempts SET error = 'x'",
        "UPDATE outbox.events SET payload = '{}'",
        "UPDATE outbox.deliveries SET event_id = event_id",
        "DELETE FROM outbox.replays",
        "DELETE FROM outbox.schema_history",
        "SELECT * FROM outbox.failed_deliveries",
        "SELECT * FROM outbox.backfill('crm', '-infinity')",
    ] {
        denied(&db, r, sql).await;
    }
}

/// A LOGIN user that is a member of `outbox_relay` and nothing else, dropped on `Drop` (roles
/// are cluster-wide; the name is unique so parallel test runs never share one).
struct RelayLogin {
    name: String,
    admin_url: String,
}

impl RelayLogin {
    async fn create(db: &TestDb) -> RelayLogin {
        let name = format!(
            "outbox_test_relay_{}",
            &Uuid::new_v4().simple().to_string()[..12]
        );
        db.client()
            .await
            .batch_execute(&format!(
                "CREATE ROLE {name} LOGIN PASSWORD 'relay-test' IN ROLE outbox_relay"
            ))
            .await
            .expect("create the relay login");
        RelayLogin {
            name,
            admin_url: db.server_admin_url(),
        }
    }

    /// The test database's URL, logged in as this user instead.
    fn url(&self, db: &TestDb) -> String {
        with_params(&db.url, &[("user", &self.name), ("password", "relay-test")])
    }
}

impl Drop for RelayLogin {
    fn drop(&mut self) {
        let (name, url) = (self.name.clone(), self.admin_url.clone());
        // Drop runs inside the test's runtime: do the blocking cleanup on a thread of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(async move {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP ROLE IF EXISTS {name}"))
                    .await
                    .map_err(|e| e.to_string())
            })
        })
        .join();
        if let Ok(Err(error)) = dropped {
            eprintln!("could not drop test role {}: {error}", self.name);
        }
    }
}

/// The README's promise for `outbox_relay`: a real relay logged in as a member of that role
/// only delivers, retries, dead-letters, disables on 410, reclaims an expired lease, heartbeats,
/// runs ordered fan-out and purges old finished events with retention on, without a single
/// database error.
#[tokio::test]
async fn a_relay_logged_in_with_the_relay_role_only_does_all_its_work_including_retention() {
    let db = TestDb::new().await;
    psql(&db, "roles.sql", &[]).await;
    let login = RelayLogin::create(&db).await;
    let relay_url = login.url(&db);
    let membership = count(
        &db,
        &format!(
            "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member
              WHERE r.rolname = '{}'",
            login.name
        ),
    )
    .await;
    assert_eq!(membership, 1, "member of outbox_relay only");

    let receiver = Receiver::start().await.expect("receiver");
    receiver.queue("/flaky", [Reply::Status(500)]);
    receiver.set_default("/broken", Reply::Status(500));
    receiver.set_default("/gone", Reply::Status(410));
    // Longer than a heartbeat interval, so the lease is renewed while it is in flight.
    receiver.set_default("/slow", Reply::Delay(Duration::from_secs(1), 200));
    let fast_retry = [("retry_schedule", "'{0 seconds}'")];
    let ok = add_subscription(
        &db,
        "ok",
        &receiver.url("/ok"),
        &[("event_types", "'{ok.*}'")],
    )
    .await
    .0;
    for (name, columns) in [
        ("flaky", "flaky.*"),
        ("broken", "broken.*"),
        ("gone", "gone.*"),
        ("slow", "slow.*"),
    ] {
        let mut all = vec![("event_types", format!("'{{{columns}}}'"))];
        if name == "gone" {
            // The 410 disables the subscription in a statement after its result is written;
            // with an immediate retry, a claim between the two could send it again (and make
            // it dead). An hour keeps its one failure failing, as asserted below.
            all.push(("retry_schedule", "'{1 hour}'".to_string()));
        } else {
            all.extend(fast_retry.iter().map(|(c, v)| (*c, v.to_string())));
        }
        let all: Vec<(&str, &str)> = all.iter().map(|(c, v)| (*c, v.as_str())).collect();
        add_subscription(&db, name, &receiver.url(&format!("/{name}")), &all).await;
    }
    add_subscription(
        &db,
        "ordered",
        &receiver.url("/ordered"),
        &[("event_types", "'{order.*}'"), ("ordered", "true")],
    )
    .await;
    for (event_type, payload) in [
        ("ok.created", json!({ "n": 1 })),
        ("flaky.created", json!({ "n": 2 })),
        ("broken.created", json!({ "n": 3 })),
        ("gone.created", json!({ "n": 4 })),
        ("slow.created", json!({ "n": 5 })),
    ] {
        publish(&db, event_type, payload).await;
    }
    db.client()
        .await
        .batch_execute(
            "INSERT INTO outbox.events (event_type, payload, ordering_key)
             SELECT 'order.placed', jsonb_build_object('seq', n), 'key-1' FROM generate_series(1, 3) n",
        )
        .await
        .expect("ordered events");
    // A delivery a dead relay left in flight: its lease expired, so it must be reclaimed.
    let (orphan_event, _) = event(&db, "ok.orphaned", None, "1 minute").await;
    db.client()
        .await
        .execute(
            "INSERT INTO outbox.deliveries (event_id, subscription_id, status, lease_owner, lease_expires_at)
             VALUES ($1, $2, 'in_flight', 'a-dead-relay', now() - interval '1 second')",
            &[&orphan_event, &ok],
        )
        .await
        .expect("orphaned delivery");

    let relay = spawn_relay_at(&relay_url, RelayConfig::for_tests()).await;
    wait_until_ready("the relay-role relay is ready", &relay.health).await;
    // ok, flaky, slow, 3 ordered and the orphan once reclaimed; broken after its retry; gone
    // failed once, and waits: its 410 disabled the subscription.
    wait_for_statuses(&db, "delivered", 7).await;
    wait_for_statuses(&db, "dead", 1).await;
    wait_for_statuses(&db, "failing", 1).await;
    wait_until(
        "everything is dispatched and passed by ordered fan-out",
        DEADLINE,
        || async {
            count(
                &db,
                "SELECT count(*) FROM outbox.events
              WHERE dispatched_at IS NULL
                 OR id > (SELECT last_event_id FROM outbox.ordered_dispatch_cursor)",
            )
            .await
                == 0
        },
    )
    .await;
    let errors = db_errors(&relay);
    let session_user = count(
        &db,
        &format!(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND usename = '{}'",
            login.name
        ),
    )
    .await;
    relay.shutdown().await;
    assert_eq!(
        errors, 0,
        "database errors while delivering as the relay role"
    );
    assert!(
        session_user > 0,
        "the relay was logged in as the relay login"
    );
    let by_status: Vec<(String, String, i32)> = db
        .client()
        .await
        .query(
            "SELECT s.name, d.status, d.attempts FROM outbox.deliveries d
               JOIN outbox.subscriptions s ON s.id = d.subscription_id
              ORDER BY d.id",
            &[],
        )
        .await
        .expect("deliveries")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let of = |name: &str| -> Vec<(String, i32)> {
        by_status
            .iter()
            .filter(|(s, _, _)| s == name)
            .map(|(_, status, attempts)| (status.clone(), *attempts))
            .collect()
    };
    assert_eq!(of("flaky"), [("delivered".to_string(), 2)], "retried");
    assert_eq!(of("broken"), [("dead".to_string(), 2)], "dead-lettered");
    assert_eq!(of("gone"), [("failing".to_string(), 1)]);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.subscriptions WHERE name = 'gone' AND NOT enabled"
        )
        .await,
        1,
        "a 410 disables the subscription"
    );
    assert_eq!(
        of("ordered"),
        vec![("delivered".to_string(), 1); 3],
        "ordered fan-out and key advance"
    );
    assert!(
        of("ok").iter().all(|(status, _)| status == "delivered") && of("ok").len() == 2,
        "the orphaned delivery was reclaimed and delivered: {:?}",
        of("ok")
    );
    let attempts = count(&db, "SELECT count(*) FROM outbox.delivery_attempts").await;
    assert!(attempts >= 3, "failed attempts were recorded ({attempts})");

    // Age everything past retention but one recent finished event, and let a relay with
    // retention on purge as the relay role: all but that one and the open delivery's event.
    db.client()
        .await
        .batch_execute(
            "UPDATE outbox.events SET created_at = now() - interval '2 days'
              WHERE event_type <> 'slow.created'",
        )
        .await
        .expect("age events");
    let relay = spawn_relay_at(
        &relay_url,
        RelayConfig {
            retention: Some(Duration::from_secs(3600)),
            ..RelayConfig::for_tests()
        },
    )
    .await;
    wait_until("old finished events are purged", DEADLINE, || async {
        let errors = db_errors(&relay);
        assert_eq!(errors, 0, "database errors while purging as the relay role");
        count(&db, "SELECT count(*) FROM outbox.events").await == 2
    })
    .await;
    let purged = relay.metrics.events_purged.get();
    let errors = db_errors(&relay);
    relay.shutdown().await;
    assert_eq!(errors, 0, "database errors while purging as the relay role");
    assert_eq!(
        purged, 7,
        "every old finished event was purged by this relay"
    );
    let left: Vec<String> = db
        .client()
        .await
        .query("SELECT event_type FROM outbox.events ORDER BY id", &[])
        .await
        .expect("events left")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        left,
        ["gone.created", "slow.created"],
        "the open delivery's event and the recent one stay"
    );
    assert_eq!(
        count(
            &db,
            "SELECT (SELECT count(*) FROM outbox.deliveries) * 1000 + (SELECT count(*) FROM outbox.delivery_attempts)"
        )
        .await,
        2001,
        "the purged events' deliveries and attempts went with them; the two left keep theirs"
    );
}
