//! Which subscriptions get which events: globs, tenant, payload filter, target_services,
//! disabled subscriptions, and events that match nothing.

use std::collections::BTreeSet;
use std::time::Duration;

use testkit::receiver::Receiver;

use crate::harness::db::TestDb;
use crate::harness::relay::*;

/// Publishes a fixed set of events and returns, per subscription path, which event labels
/// arrived (label = payload "label").
async fn route(subscriptions: &[(&str, &[(&str, &str)])]) -> Vec<(String, BTreeSet<String>)> {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver");
    for (name, columns) in subscriptions {
        add_subscription(&db, name, &receiver.url(&format!("/{name}")), columns).await;
    }
    let relay = spawn_default_relay(&db).await;
    db.client()
        .await
        .batch_execute(
            "SELECT outbox.publish('lead.created', '{\"label\": \"lead-acme\", \"plan\": \"pro\", \"tags\": [\"a\", \"b\"]}', tenant_id => 'acme');
             SELECT outbox.publish('lead.updated', '{\"label\": \"lead-globex\", \"plan\": \"free\"}', tenant_id => 'globex');
             SELECT outbox.publish('invoice.paid', '{\"label\": \"invoice\"}', tenant_id => 'acme');
             SELECT outbox.publish('lead_x.created', '{\"label\": \"underscore\"}');
             SELECT outbox.publish('lead.created', '{\"label\": \"targeted\"}', target_services => '{billing}');
             SELECT outbox.publish('done', '{\"label\": \"marker\"}');",
        )
        .await
        .expect("publish");
    // All six events are dispatched and every created delivery is finished: routing is done.
    wait_until("all events dispatched and delivered", DEADLINE, || async {
        count(
            &db,
            "SELECT count(*) FROM outbox.events WHERE dispatched_at IS NULL",
        )
        .await
            == 0
            && count(
                &db,
                "SELECT count(*) FROM outbox.deliveries WHERE status <> 'delivered'",
            )
            .await
                == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let result = subscriptions
        .iter()
        .map(|(name, _)| {
            let labels = receiver
                .received(&format!("/{name}"))
                .iter()
                .map(|r| {
                    r.json()["data"]["label"]
                        .as_str()
                        .unwrap_or("?")
                        .to_string()
                })
                .collect();
            (name.to_string(), labels)
        })
        .collect();
    relay.shutdown().await;
    result
}

fn set(labels: &[&str]) -> BTreeSet<String> {
    labels.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn every_routing_rule_selects_the_right_events() {
    let routed = route(&[
        ("everything", &[]),
        ("leads", &[("event_types", "'{lead.*}'")]),
        ("exact", &[("event_types", "'{invoice.paid,done}'")]),
        ("suffix", &[("event_types", "'{*.created}'")]),
        ("acme-only", &[("tenant_id", "'acme'")]),
        ("pro-plan", &[("filter", "'{\"plan\": \"pro\"}'")]),
        ("tagged-a", &[("filter", "'{\"tags\": [\"a\"]}'")]),
        ("billing", &[("event_types", "'{lead.created}'")]),
        ("disabled", &[("enabled", "false")]),
    ])
    .await;
    let get = |name: &str| {
        routed
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, l)| l.clone())
            .unwrap_or_default()
    };
    assert_eq!(
        get("everything"),
        set(&[
            "lead-acme",
            "lead-globex",
            "invoice",
            "underscore",
            "marker"
        ]),
        "target_services excludes subscriptions not named"
    );
    assert_eq!(
        get("leads"),
        set(&["lead-acme", "lead-globex"]),
        "lead.* does not match lead_x.created"
    );
    assert_eq!(get("exact"), set(&["invoice", "marker"]));
    assert_eq!(get("suffix"), set(&["lead-acme", "underscore"]));
    assert_eq!(
        get("acme-only"),
        set(&["lead-acme", "invoice"]),
        "tenant filter; tenant-less events excluded"
    );
    assert_eq!(get("pro-plan"), set(&["lead-acme"]));
    assert_eq!(
        get("tagged-a"),
        set(&["lead-acme"]),
        "payload @> filter with arrays"
    );
    assert_eq!(
        get("billing"),
        set(&["lead-acme", "targeted"]),
        "target_services names this subscription"
    );
    assert_eq!(get("disabled"), set(&[]));
}

/// An event nobody wants is marked dispatched (and stays queryable), never retried.
#[tokio::test]
async fn event_matching_no_subscription_is_marked_dispatched() {
    let db = TestDb::new().await;
    let relay = spawn_default_relay(&db).await;
    publish(&db, "nobody.cares", serde_json::json!({})).await;
    wait_until("the event is dispatched", DEADLINE, || async {
        count(
            &db,
            "SELECT count(*) FROM outbox.events WHERE dispatched_at IS NOT NULL",
        )
        .await
            == 1
    })
    .await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.deliveries").await,
        0
    );
    relay.shutdown().await;
}

/// Inserting, disabling and re-enabling a subscription takes effect without a restart.
#[tokio::test]
async fn subscription_changes_take_effect_in_a_running_relay() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver");
    let relay = spawn_default_relay(&db).await;

    let (id, _) = add_subscription(&db, "late", &receiver.url("/late"), &[]).await;
    publish(&db, "a.first", serde_json::json!({})).await;
    receiver
        .wait_for("/late", 1, DEADLINE)
        .await
        .expect("new subscription used");

    db.client()
        .await
        .execute(
            "UPDATE outbox.subscriptions SET enabled = false WHERE id = $1",
            &[&id],
        )
        .await
        .expect("disable");
    // The dispatcher matches against the table, so a disabled subscription gets no new deliveries.
    publish(&db, "a.second", serde_json::json!({})).await;
    wait_until("second event dispatched", DEADLINE, || async {
        count(
            &db,
            "SELECT count(*) FROM outbox.events WHERE dispatched_at IS NULL",
        )
        .await
            == 0
    })
    .await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.deliveries").await,
        1
    );

    // Changing the URL is picked up too.
    db.client()
        .await
        .execute(
            "UPDATE outbox.subscriptions SET enabled = true, url = $2 WHERE id = $1",
            &[&id, &receiver.url("/moved")],
        )
        .await
        .expect("re-enable at a new URL");
    publish(&db, "a.third", serde_json::json!({})).await;
    let moved = receiver
        .wait_for("/moved", 1, DEADLINE)
        .await
        .expect("new URL used");
    assert_eq!(moved[0].json()["event_type"], "a.third");
    relay.shutdown().await;
}

/// `outbox.event_type_matches`, which every fan-out runs for each (event, subscription): '*'
/// is the only wildcard and matches any run of characters, even none; every other
/// character, '_' included, matches itself.
#[tokio::test]
async fn event_type_globs_have_one_wildcard() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let cases: &[(&[&str], &str, bool)] = &[
        (&["*"], "lead.created", true),
        (&["lead.*"], "lead.created", true),
        (&["lead.*"], "lead.", true),
        (&["lead.*"], "lead", false),
        (&["lead.*"], "leads.created", false),
        (&["*.created"], "lead.created", true),
        (&["*.created"], "lead.created.v2", false),
        (&["a*b*c"], "aXbYc", true),
        (&["a*b*c"], "abc", true),
        (&["a*b*c"], "acb", false),
        (&["lead_x"], "lead_x", true),
        (&["lead_x"], "leadAx", false),
        (&["lead_*"], "leadA.created", false),
        (&["lead.created"], "lead.created", true),
        (&["lead.created"], "lead.created.v2", false),
        (&["order.*", "lead.created"], "lead.created", true),
        (&["order.*", "lead.created"], "lead.updated", false),
        (&["a-b:*"], "a-b:c", true),
        (&[], "lead.created", false),
    ];
    for (patterns, event_type, expected) in cases {
        let patterns: Vec<&str> = patterns.to_vec();
        let matched: bool = client
            .query_one(
                "SELECT outbox.event_type_matches($1::text[], $2::text)",
                &[&patterns, event_type],
            )
            .await
            .expect("event_type_matches")
            .get(0);
        assert_eq!(matched, *expected, "{patterns:?} against {event_type:?}");
    }
}
