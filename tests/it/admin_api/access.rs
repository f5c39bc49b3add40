//! Who may call the admin API and what it answers when the database is gone.

use super::*;

#[tokio::test]
async fn admin_and_compat_routes_are_absent_without_a_token() {
    let db = TestDb::new().await;
    let relay = spawn_default_relay(&db).await;
    let api = Api::at(&relay);
    for (method, path) in [
        (Method::GET, "/admin/v1/subscriptions"),
        (Method::GET, "/admin/v1/openapi.json"),
        (Method::GET, "/subscriptions"),
        (Method::POST, "/events/publish"),
        (Method::GET, "/api/events/status/pending"),
    ] {
        let answer = api.call(method.clone(), path, None).await;
        assert_eq!(
            answer.status, 404,
            "{method} {path} is mounted without a token"
        );
    }
    assert_eq!(api.get("/healthz").await.status, 200);
    relay.shutdown().await;
}

/// A blank token is refused when the relay starts, instead of leaving the API off although
/// the operator set the variable.
#[tokio::test]
async fn a_blank_token_is_refused_at_start() {
    let config = RelayConfig {
        admin_token: Some("  ".into()),
        ..RelayConfig::for_tests()
    };
    let error = config.validate().expect_err("blank token refused");
    assert!(error.to_string().contains("OUTBOX_ADMIN_TOKEN"), "{error}");
}

/// With the database gone, the API answers 503 in its error shape (nothing is leaked from
/// the driver), and the relay keeps serving.
#[tokio::test]
async fn the_database_going_away_is_a_503() {
    let relay = spawn_relay_at(
        &unreachable_database_url(),
        RelayConfig {
            admin_token: Some(TOKEN.into()),
            ..RelayConfig::for_tests()
        },
    )
    .await;
    let api = Api::at(&relay);
    api.get("/admin/v1/subscriptions")
        .await
        .expect_error(503, "unavailable", None);
    api.post("/events/publish", json!({ "event_type": "lead.created" }))
        .await
        .expect_error(503, "unavailable", None);
    assert_eq!(api.get("/healthz").await.status, 200);
    relay.shutdown().await;
}

#[tokio::test]
async fn requests_without_the_right_token_are_refused() {
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    for authorization in [
        None,
        Some("Bearer wrong-token"),
        Some(&format!("Bearer {TOKEN}x")[..]),
        Some(&format!("Basic {TOKEN}")[..]),
        Some("Bearer "),
    ] {
        for (method, path) in [
            (Method::GET, "/admin/v1/subscriptions"),
            (Method::GET, "/admin/v1/events"),
            (Method::POST, "/events/publish"),
            (Method::GET, "/api/events/status/pending"),
        ] {
            let answer = api.call_as(authorization, method.clone(), path, None).await;
            let challenge = answer.www_authenticate.clone().unwrap_or_default();
            assert!(
                challenge.starts_with("Bearer"),
                "{method} {path} with {authorization:?}: WWW-Authenticate {challenge:?}"
            );
            answer.expect_error(401, "unauthorized", None);
        }
    }
    // Nothing was published by the refused requests.
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.events").await, 0);
    // The scheme is case-insensitive (RFC 7235); the token is not.
    api.call_as(
        Some(&format!("bearer {TOKEN}")),
        Method::GET,
        "/admin/v1/subscriptions",
        None,
    )
    .await
    .expect(200);
    relay.shutdown().await;
}
