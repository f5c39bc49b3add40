//! `subscription rotate-secret`: both secrets sign during the overlap, only the new one after.

use super::*;

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
pub(super) fn signatures(request: &Received) -> Vec<String> {
    request
        .header(webhook::HEADER_SIGNATURE)
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Whether one signature entry of `request` verifies under `secret`.
pub(super) fn signed_by(request: &Received, entry: &str, secret: &str) -> bool {
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
pub(super) async fn publish_until(
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
