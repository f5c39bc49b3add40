//! `subscription add|list|show|update|disable|enable|remove` and the errors they explain.

use super::*;

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
