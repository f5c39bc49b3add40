//! `replay` (dry run and for real) and `status`.

use super::*;

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
