//! The admin HTTP API (`/admin/v1`), end to end: a relay with an admin token, real HTTP,
//! real PostgreSQL. Shared helpers for `compat_api.rs` live here too.

use outbox_relay::config::RelayConfig;
use outbox_relay::devkit::receiver::{Receiver, Reply};
use outbox_relay::relay::RelayHandle;
use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::db::TestDb;
use crate::harness::relay::*;

pub const TOKEN: &str = "test-admin-token-7f3a";

/// A relay with the admin API on, and a client that talks to it.
pub struct Api {
    pub base: String,
    client: reqwest::Client,
}

/// One answer: status, the `WWW-Authenticate` header, the JSON body (`Null` if none).
pub struct Answer {
    pub status: u16,
    pub www_authenticate: Option<String>,
    pub body: Value,
}

impl Answer {
    /// Asserts the status, then returns the body.
    #[track_caller]
    pub fn expect(self, status: u16) -> Value {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {:#}",
            self.body
        );
        self.body
    }

    /// Asserts the API's error shape with this status, code and field.
    #[track_caller]
    pub fn expect_error(self, status: u16, code: &str, field: Option<&str>) {
        let body = self.expect(status);
        let error = &body["error"];
        assert_eq!(error["code"], code, "{body:#}");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body:#}"
        );
        match field {
            Some(field) => assert_eq!(error["field"], field, "{body:#}"),
            None => assert!(error.get("field").is_none(), "{body:#}"),
        }
    }
}

impl Api {
    pub async fn spawn(db: &TestDb) -> (RelayHandle, Api) {
        let mut config = RelayConfig::for_tests();
        config.admin_token = Some(TOKEN.into());
        let relay = spawn_relay(db, config).await;
        let api = Api::at(&relay);
        (relay, api)
    }

    pub fn at(relay: &RelayHandle) -> Api {
        Api {
            base: format!("http://{}", relay.http_addr),
            client: reqwest::Client::new(),
        }
    }

    /// A request with the right token.
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        self.call_as(Some(&format!("Bearer {TOKEN}")), method, path, body)
            .await
    }

    pub async fn call_as(
        &self,
        authorization: Option<&str>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Answer {
        let mut request = self
            .client
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status().as_u16();
        let www_authenticate = response
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = response.text().await.expect("response body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{method} {path}: body is not JSON ({e}): {text}"))
        };
        Answer {
            status,
            www_authenticate,
            body,
        }
    }

    /// A request whose body is these bytes as they are (not necessarily JSON or UTF-8).
    pub async fn post_bytes(&self, path: &str, body: &'static [u8]) -> Answer {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = response.status().as_u16();
        let text = response.text().await.expect("response body");
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("POST {path}: body is not JSON ({e}): {text}"));
        Answer {
            status,
            www_authenticate: None,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> Answer {
        self.call(Method::PATCH, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Answer {
        self.call(Method::DELETE, path, None).await
    }
}

/// Inserts an event with the given type, tenant and age (`created_at = now() - age`).
async fn insert_event(db: &TestDb, event_type: &str, tenant: &str, age: &str) -> (i64, String) {
    let row = db
        .client()
        .await
        .query_one(
            "INSERT INTO outbox.events (event_type, payload, tenant_id, created_at)
             VALUES ($1, '{}', $2, now() - $3::text::interval) RETURNING id, event_id::text",
            &[&event_type, &tenant, &age],
        )
        .await
        .expect("insert event");
    (row.get(0), row.get(1))
}

/// Every event id of a search, following `next_cursor` page by page.
async fn all_pages(api: &Api, query: &str) -> (Vec<i64>, usize) {
    let mut ids = Vec::new();
    let mut pages = 0;
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/admin/v1/events?{query}&cursor={cursor}"),
            None => format!("/admin/v1/events?{query}"),
        };
        let page = api.get(&path).await.expect(200);
        pages += 1;
        ids.extend(
            page["events"]
                .as_array()
                .expect("events array")
                .iter()
                .map(|e| e["id"].as_i64().expect("id")),
        );
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return (ids, pages),
        }
        assert!(pages < 100, "pagination does not end");
    }
}

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
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!(
        "postgres://postgres@{}/nowhere",
        closed.local_addr().expect("addr")
    );
    drop(closed);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let relay = outbox_relay::relay::start(
        RelayConfig {
            admin_token: Some(TOKEN.into()),
            ..RelayConfig::for_tests()
        },
        &url,
        listener,
    )
    .await
    .expect("starts even without a database");
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

#[tokio::test]
async fn bad_input_is_a_400_naming_the_field() {
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    let url = "http://127.0.0.1:9/hook";
    for (body, field) in [
        (json!({ "name": "crm", "url": "not a url" }), "url"),
        (json!({ "name": "crm", "url": "ftp://x.internal/a" }), "url"),
        (json!({ "name": "crm" }), "url"),
        (json!({ "url": url }), "name"),
        (json!({ "name": "bad name!", "url": url }), "name"),
        (
            json!({ "name": "crm", "url": url, "event_types": ["lead.*", "lead created"] }),
            "event_types",
        ),
        (
            json!({ "name": "crm", "url": url, "timeout_seconds": 0.01 }),
            "timeout_seconds",
        ),
        (
            json!({ "name": "crm", "url": url, "timeout_seconds": -1 }),
            "timeout_seconds",
        ),
        (
            json!({ "name": "crm", "url": url, "max_in_flight": 0 }),
            "max_in_flight",
        ),
        (
            json!({ "name": "crm", "url": url, "filter": [1] }),
            "filter",
        ),
        (
            json!({ "name": "crm", "url": url, "secret": "short" }),
            "secret",
        ),
        (
            json!({ "name": "crm", "url": url, "colour": "red" }),
            "colour",
        ),
        (
            json!({ "name": "crm", "url": url, "max_in_flight": "many" }),
            "max_in_flight",
        ),
    ] {
        api.post("/admin/v1/subscriptions", body.clone())
            .await
            .expect_error(400, "invalid_input", Some(field));
    }
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.subscriptions").await,
        0
    );

    // A body that is not JSON at all.
    let answer = api
        .call_as(
            Some(&format!("Bearer {TOKEN}")),
            Method::POST,
            "/admin/v1/subscriptions",
            None,
        )
        .await;
    answer.expect_error(400, "invalid_input", Some("name"));

    api.post(
        "/admin/v1/subscriptions",
        json!({ "name": "crm", "url": url }),
    )
    .await
    .expect(201);
    api.patch("/admin/v1/subscriptions/crm", json!({}))
        .await
        .expect_error(400, "invalid_input", Some("body"));
    api.patch("/admin/v1/subscriptions/crm", json!({ "url": "nope" }))
        .await
        .expect_error(400, "invalid_input", Some("url"));
    api.patch(
        "/admin/v1/subscriptions/crm",
        json!({ "retry_schedule_seconds": [1, -5] }),
    )
    .await
    .expect_error(400, "invalid_input", Some("retry_schedule_seconds[1]"));
    api.patch("/admin/v1/subscriptions/crm", json!({ "name": "other" }))
        .await
        .expect_error(400, "invalid_input", Some("name"));

    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=abc", "limit"),
        ("event_type=lead%20created", "event_type"),
        ("event_type=lead.%3F", "event_type"),
        ("status=lost", "status"),
        ("since=yesterday", "since"),
        (
            "since=2024-02-01T00:00:00Z&until=2024-01-01T00:00:00Z",
            "until",
        ),
        ("cursor=abc", "cursor"),
        ("colour=red", "colour"),
    ] {
        api.get(&format!("/admin/v1/events?{query}"))
            .await
            .expect_error(400, "invalid_input", Some(field));
    }
    api.get("/admin/v1/events/not-a-uuid").await.expect_error(
        400,
        "invalid_input",
        Some("event_id"),
    );
    api.get("/admin/v1/replays/abc")
        .await
        .expect_error(400, "invalid_input", Some("id"));
    api.get("/admin/v1/replays?limit=1000")
        .await
        .expect_error(400, "invalid_input", Some("limit"));
    for (body, field) in [
        (json!({ "status": ["lost"] }), "status[0]"),
        (json!({ "status": ["in_flight"] }), "status[0]"),
        (json!({ "event_ids": ["nope"] }), "event_ids"),
        (json!({ "subscription": null }), "subscription"),
        (json!({ "max_events": 1.5 }), "max_events"),
        (json!({ "event_type": "lead created" }), "event_type"),
        (json!({ "max_events": 0 }), "max_events"),
        (json!({ "created_after": "soon" }), "created_after"),
        (json!({ "dry_run": "yes" }), "dry_run"),
    ] {
        api.post("/admin/v1/replays", body)
            .await
            .expect_error(400, "invalid_input", Some(field));
    }
    // Well formed, but naming what does not exist: 404, as for any missing resource.
    api.post("/admin/v1/replays", json!({ "subscription": "nobody" }))
        .await
        .expect_error(404, "not_found", Some("subscription"));
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.replays").await, 0);
    relay.shutdown().await;
}

/// U+0000 in any text the API takes (body fields at any depth, query and path parameters)
/// is a 400 naming it: PostgreSQL stores NUL in neither text nor jsonb, and without the
/// check its refusal surfaced as `500 internal`.
#[tokio::test]
async fn nul_in_any_admin_text_field_is_a_400_naming_it() {
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    let url = "http://127.0.0.1:9/hook";
    api.post(
        "/admin/v1/subscriptions",
        json!({ "name": "crm", "url": url }),
    )
    .await
    .expect(201);
    let nul = "a\u{0}b";
    let create = |field: &str, value: Value| {
        let mut body = json!({ "name": "crm-2", "url": url });
        body[field] = value;
        body
    };
    let cases: Vec<(Method, String, Option<Value>, &str)> = vec![
        // Create: every text setting, and strings nested in arrays and objects.
        (
            Method::POST,
            "/admin/v1/subscriptions".into(),
            Some(create("name", json!(nul))),
            "name",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions".into(),
            Some(create("url", json!(format!("{url}{nul}")))),
            "url",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions".into(),
            Some(create("secret", json!(nul))),
            "secret",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions".into(),
            Some(create("event_types", json!(["lead.*", nul]))),
            "event_types[1]",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions".into(),
            Some(create("tenant_id", json!(nul))),
            "tenant_id",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions".into(),
            Some(create("filter", json!({ "plan": nul }))),
            "filter.plan",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions".into(),
            Some(create("filter", json!({ "tags": [{ "t": nul }] }))),
            "filter.tags[0].t",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions".into(),
            Some(create("headers", json!({ "X-Team": nul }))),
            "headers.X-Team",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions".into(),
            Some(create("headers", json!({ nul: "crm" }))),
            "headers",
        ),
        // Update.
        (
            Method::PATCH,
            "/admin/v1/subscriptions/crm".into(),
            Some(json!({ "url": format!("{url}{nul}") })),
            "url",
        ),
        (
            Method::PATCH,
            "/admin/v1/subscriptions/crm".into(),
            Some(json!({ "event_types": [nul] })),
            "event_types[0]",
        ),
        (
            Method::PATCH,
            "/admin/v1/subscriptions/crm".into(),
            Some(json!({ "tenant_id": nul })),
            "tenant_id",
        ),
        (
            Method::PATCH,
            "/admin/v1/subscriptions/crm".into(),
            Some(json!({ "filter": { "plan": nul } })),
            "filter.plan",
        ),
        (
            Method::PATCH,
            "/admin/v1/subscriptions/crm".into(),
            Some(json!({ "headers": { "X-Team": nul } })),
            "headers.X-Team",
        ),
        // Disable and rotate bodies.
        (
            Method::POST,
            "/admin/v1/subscriptions/crm/disable".into(),
            Some(json!({ "reason": nul })),
            "reason",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions/crm/rotate-secret".into(),
            Some(json!({ "secret": nul })),
            "secret",
        ),
        // Path parameters.
        (
            Method::GET,
            "/admin/v1/subscriptions/cr%00m".into(),
            None,
            "name",
        ),
        (
            Method::PATCH,
            "/admin/v1/subscriptions/cr%00m".into(),
            Some(json!({ "max_in_flight": 2 })),
            "name",
        ),
        (
            Method::DELETE,
            "/admin/v1/subscriptions/cr%00m".into(),
            None,
            "name",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions/cr%00m/disable".into(),
            None,
            "name",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions/cr%00m/enable".into(),
            None,
            "name",
        ),
        (
            Method::POST,
            "/admin/v1/subscriptions/cr%00m/rotate-secret".into(),
            None,
            "name",
        ),
        (Method::GET, "/admin/v1/events/%00".into(), None, "event_id"),
        (Method::GET, "/admin/v1/replays/1%00".into(), None, "id"),
        // Query parameters.
        (
            Method::GET,
            "/admin/v1/events?event_type=lead%00".into(),
            None,
            "event_type",
        ),
        (
            Method::GET,
            "/admin/v1/events?tenant_id=t%001".into(),
            None,
            "tenant_id",
        ),
        (
            Method::GET,
            "/admin/v1/events?since=%00".into(),
            None,
            "since",
        ),
        (
            Method::GET,
            "/admin/v1/events?until=%00".into(),
            None,
            "until",
        ),
        (
            Method::GET,
            "/admin/v1/events?status=dead%00".into(),
            None,
            "status",
        ),
        (
            Method::GET,
            "/admin/v1/events?cursor=1%00".into(),
            None,
            "cursor",
        ),
        (
            Method::GET,
            "/admin/v1/replays?cursor=1%00".into(),
            None,
            "cursor",
        ),
        // Replay criteria.
        (
            Method::POST,
            "/admin/v1/replays".into(),
            Some(json!({ "status": [nul] })),
            "status[0]",
        ),
        (
            Method::POST,
            "/admin/v1/replays".into(),
            Some(json!({ "subscription": nul })),
            "subscription",
        ),
        (
            Method::POST,
            "/admin/v1/replays".into(),
            Some(json!({ "event_type": nul })),
            "event_type",
        ),
        (
            Method::POST,
            "/admin/v1/replays".into(),
            Some(json!({ "tenant_id": nul })),
            "tenant_id",
        ),
        (
            Method::POST,
            "/admin/v1/replays".into(),
            Some(json!({ "created_after": nul })),
            "created_after",
        ),
        (
            Method::POST,
            "/admin/v1/replays".into(),
            Some(json!({ "created_before": nul })),
            "created_before",
        ),
        (
            Method::POST,
            "/admin/v1/replays".into(),
            Some(json!({ "event_ids": [nul] })),
            "event_ids[0]",
        ),
        (
            Method::POST,
            "/admin/v1/replays".into(),
            Some(json!({ "requested_by": nul })),
            "requested_by",
        ),
        (
            Method::POST,
            "/admin/v1/replays".into(),
            Some(json!({ "reason": nul })),
            "reason",
        ),
    ];
    for (method, path, body, field) in cases {
        let answer = api.call(method.clone(), &path, body.clone()).await;
        assert_eq!(
            (answer.status, answer.body["error"]["field"].as_str()),
            (400, Some(field)),
            "{method} {path} {body:?}: {:#}",
            answer.body
        );
        assert_eq!(answer.body["error"]["code"], "invalid_input");
    }
    // Nothing was written: crm is as created, and no replay was recorded.
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.subscriptions").await,
        1
    );
    let crm = api.get("/admin/v1/subscriptions/crm").await.expect(200);
    assert_eq!(crm["enabled"], true);
    assert_eq!(crm["url"], url);
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.replays").await, 0);
    relay.shutdown().await;
}

/// Text that is not UTF-8 (raw bytes in a body, percent-encoded bytes in a path or query,
/// a lone surrogate escape) and values longer than their column allows are 400s naming the
/// field, never 500s.
#[tokio::test]
async fn text_that_is_not_utf8_or_too_long_is_a_400() {
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    api.post_bytes(
        "/admin/v1/subscriptions",
        b"{\"name\": \"cr\xffm\", \"url\": \"http://127.0.0.1:9/hook\"}",
    )
    .await
    .expect_error(400, "invalid_input", Some("name"));
    api.post_bytes(
        "/admin/v1/subscriptions",
        br#"{"name": "cr\ud800m", "url": "http://127.0.0.1:9/hook"}"#,
    )
    .await
    .expect_error(400, "invalid_input", Some("name"));
    api.get("/admin/v1/subscriptions/cr%FFm")
        .await
        .expect_error(400, "invalid_input", Some("name"));
    api.get("/admin/v1/events?tenant_id=t%FF1")
        .await
        .expect_error(400, "invalid_input", Some("tenant_id"));
    let long = "a".repeat(256);
    api.post(
        "/admin/v1/subscriptions",
        json!({ "name": long, "url": "http://127.0.0.1:9/hook" }),
    )
    .await
    .expect_error(400, "invalid_input", Some("name"));
    api.post(
        "/admin/v1/subscriptions",
        json!({ "name": "crm", "url": format!("http://127.0.0.1:9/{}", "a".repeat(3000)) }),
    )
    .await
    .expect_error(400, "invalid_input", Some("url"));
    api.post(
        "/admin/v1/subscriptions",
        json!({ "name": "crm", "url": "http://127.0.0.1:9/hook", "event_types": [long] }),
    )
    .await
    .expect_error(400, "invalid_input", Some("event_types"));
    api.post(
        "/admin/v1/subscriptions",
        json!({ "name": "crm", "url": "http://127.0.0.1:9/hook",
                "retry_schedule_seconds": [1e18] }),
    )
    .await
    .expect_error(400, "invalid_input", Some("retry_schedule_seconds[0]"));
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.subscriptions").await,
        0
    );
    relay.shutdown().await;
}

/// Bad data that reaches PostgreSQL anyway (a caller of [`outbox_relay::admin`] other than
/// the API, which checks first) comes back as invalid input, not as a failed query: data
/// exceptions (SQLSTATE class 22, e.g. NUL in text or jsonb) and integrity violations
/// (class 23) name their field or constraint, and the API answers them with 400.
#[tokio::test]
async fn database_data_errors_are_invalid_input_not_failures() {
    use outbox_relay::admin::{self, AdminError, NewEvent};
    use outbox_relay::api::ApiError;
    let db = TestDb::new().await;
    let client = db.client().await;
    add_subscription(&db, "crm", "http://127.0.0.1:9/hook", &[]).await;
    let event = |payload: Value, ordering_key: Option<String>| NewEvent {
        event_id: None,
        event_type: "lead.created".to_owned(),
        payload,
        tenant_id: None,
        source_service: None,
        ordering_key,
        target_services: None,
        metadata: json!({}),
        priority: 0,
    };
    let cases: Vec<(&str, Result<(), AdminError>, &str, &str)> = vec![
        (
            "NUL in text",
            admin::disable_subscription(&client, "crm", Some("a\u{0}b"))
                .await
                .map(drop),
            "value",
            "NUL",
        ),
        (
            "NUL in a jsonb string",
            admin::publish_event(&client, &event(json!({ "note": "a\u{0}b" }), None))
                .await
                .map(drop),
            "value",
            "NUL",
        ),
        (
            "a CHECK constraint",
            admin::publish_event(&client, &event(json!({}), Some("k".repeat(300))))
                .await
                .map(drop),
            "ordering_key",
            "ordering_key_length",
        ),
    ];
    for (what, result, field, says) in cases {
        let error = result.expect_err(what);
        match &error {
            AdminError::Invalid {
                field: named,
                problem,
            } => {
                assert_eq!(*named, field, "{what}: {error}");
                assert!(problem.contains(says), "{what}: {error}");
            }
            other => panic!("{what}: not invalid input: {other:?}"),
        }
        let answer = ApiError::from(error);
        assert_eq!(answer.status.as_u16(), 400, "{what}: {answer:?}");
        assert_eq!(answer.field.as_deref(), Some(field), "{what}");
    }
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.events").await, 0);
}

#[tokio::test]
async fn a_taken_subscription_name_is_a_409_and_unknown_names_are_404() {
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    let body = json!({ "name": "crm", "url": "http://127.0.0.1:9/hook" });
    api.post("/admin/v1/subscriptions", body.clone())
        .await
        .expect(201);
    api.post("/admin/v1/subscriptions", body)
        .await
        .expect_error(409, "duplicate", Some("name"));
    for (method, path) in [
        (Method::GET, "/admin/v1/subscriptions/ghost"),
        (Method::DELETE, "/admin/v1/subscriptions/ghost"),
        (Method::POST, "/admin/v1/subscriptions/ghost/enable"),
        (Method::POST, "/admin/v1/subscriptions/ghost/disable"),
        (Method::POST, "/admin/v1/subscriptions/ghost/rotate-secret"),
        (
            Method::GET,
            "/admin/v1/events/0b6f8a3e-9c1d-4e2f-8a7b-1c2d3e4f5a6b",
        ),
        (Method::GET, "/admin/v1/replays/424242"),
        (Method::GET, "/admin/v1/no-such-thing"),
    ] {
        api.call(method, path, None)
            .await
            .expect_error(404, "not_found", None);
    }
    api.patch("/admin/v1/subscriptions/ghost", json!({ "ordered": true }))
        .await
        .expect_error(404, "not_found", None);
    relay.shutdown().await;
}

#[tokio::test]
async fn subscription_crud_round_trip_shows_the_secret_only_on_create_and_rotate() {
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    let created = api
        .post(
            "/admin/v1/subscriptions",
            json!({
                "name": "ai-agents",
                "url": "http://127.0.0.1:9/hooks",
                "event_types": ["lead.*", "invoice.paid"],
                "filter": { "plan": "pro" },
                "headers": { "X-Team": "crm" },
                "timeout_seconds": 2.5,
                "retry_schedule_seconds": [1, 60],
                "rate_limit_per_second": 20
            }),
        )
        .await
        .expect(201);
    let secret = created["secret"]
        .as_str()
        .expect("secret on create")
        .to_owned();
    assert!(secret.starts_with("whsec_"), "{created:#}");
    assert_eq!(created["name"], "ai-agents");
    assert_eq!(created["event_types"], json!(["lead.*", "invoice.paid"]));
    assert_eq!(created["timeout_seconds"], 2.5);
    assert_eq!(created["retry_schedule_seconds"], json!([1.0, 60.0]));
    assert_eq!(created["headers"], json!({ "X-Team": "crm" }));
    let stored: String = db
        .client()
        .await
        .query_one(
            "SELECT secret FROM outbox.subscriptions WHERE name = 'ai-agents'",
            &[],
        )
        .await
        .expect("read secret")
        .get(0);
    assert_eq!(stored, secret);

    let listed = api.get("/admin/v1/subscriptions").await.expect(200);
    assert_eq!(listed["subscriptions"].as_array().map(Vec::len), Some(1));
    let one = api
        .get("/admin/v1/subscriptions/ai-agents")
        .await
        .expect(200);
    for body in [&listed, &one] {
        let text = body.to_string();
        assert!(
            !text.contains(&secret) && !text.contains("\"secret\""),
            "{text}"
        );
    }
    assert_eq!(one["filter"], json!({ "plan": "pro" }));

    let updated = api
        .patch(
            "/admin/v1/subscriptions/ai-agents",
            json!({ "event_types": ["order.*"], "tenant_id": "t1", "filter": null, "max_in_flight": 3, "ordered": true }),
        )
        .await
        .expect(200);
    assert_eq!(updated["event_types"], json!(["order.*"]));
    assert_eq!(updated["tenant_id"], "t1");
    assert_eq!(updated["filter"], Value::Null, "null clears the filter");
    assert_eq!(updated["max_in_flight"], 3);
    assert_eq!(updated["ordered"], true);
    assert_eq!(updated["timeout_seconds"], 2.5, "absent settings stay");
    assert!(!updated.to_string().contains("secret\""));

    let disabled = api
        .post(
            "/admin/v1/subscriptions/ai-agents/disable",
            json!({ "reason": "maintenance" }),
        )
        .await
        .expect(200);
    assert_eq!(disabled["enabled"], false);
    assert_eq!(disabled["disabled_reason"], "maintenance");
    let enabled = api
        .call(
            Method::POST,
            "/admin/v1/subscriptions/ai-agents/enable",
            None,
        )
        .await
        .expect(200);
    assert_eq!(enabled["enabled"], true);
    assert_eq!(enabled["disabled_reason"], Value::Null);

    let rotated = api
        .call(
            Method::POST,
            "/admin/v1/subscriptions/ai-agents/rotate-secret",
            None,
        )
        .await
        .expect(200);
    let new_secret = rotated["secret"].as_str().expect("secret on rotate");
    assert!(new_secret.starts_with("whsec_") && new_secret != secret);
    assert!(
        rotated["previous_secret_expires_at"].is_string(),
        "default overlap: {rotated:#}"
    );
    let immediate = api
        .post(
            "/admin/v1/subscriptions/ai-agents/rotate-secret",
            json!({ "overlap_seconds": 0 }),
        )
        .await
        .expect(200);
    assert_eq!(immediate["previous_secret_expires_at"], Value::Null);
    let after = api
        .get("/admin/v1/subscriptions/ai-agents")
        .await
        .expect(200);
    assert!(!after.to_string().contains("whsec_"), "{after:#}");

    let removed = api
        .delete("/admin/v1/subscriptions/ai-agents")
        .await
        .expect(200);
    assert_eq!(removed["name"], "ai-agents");
    assert_eq!(removed["deliveries_ended"], 0);
    api.get("/admin/v1/subscriptions/ai-agents")
        .await
        .expect_error(404, "not_found", None);
    assert_eq!(
        api.get("/admin/v1/subscriptions").await.expect(200)["subscriptions"],
        json!([])
    );
    relay.shutdown().await;
}

/// Keyset pages of a search cover exactly the matching events, newest first, whatever the
/// page size, and the filters narrow them as documented.
#[tokio::test]
async fn event_search_filters_and_pages_without_gaps_or_repeats() {
    let db = TestDb::new().await;
    let mut expected_all = Vec::new();
    let mut leads = Vec::new();
    let mut recent_t2 = Vec::new();
    for i in 0..7 {
        let (id, _) = insert_event(&db, "lead.created", "t1", &format!("{} minutes", 10 + i)).await;
        expected_all.push(id);
        leads.push(id);
    }
    for i in 0..3 {
        let (id, _) = insert_event(&db, "invoice.paid", "t2", &format!("{i} hours")).await;
        expected_all.push(id);
        if i == 0 {
            recent_t2.push(id);
        }
    }
    for _ in 0..2 {
        let (id, _) = insert_event(&db, "lead.updated", "t2", "1 minute").await;
        expected_all.push(id);
        leads.push(id);
        recent_t2.push(id);
    }
    // Two lead.created events with a dead delivery to a disabled subscription (the relay
    // leaves both alone).
    let (sub_id, _) = add_subscription(
        &db,
        "archive",
        "http://127.0.0.1:9/x",
        &[("enabled", "false"), ("event_types", "'{nothing}'")],
    )
    .await;
    let dead: Vec<i64> = leads[..2].to_vec();
    db.client()
        .await
        .execute(
            "INSERT INTO outbox.deliveries (event_id, subscription_id, status, attempts)
             SELECT unnest($1::bigint[]), $2, 'dead', 1",
            &[&dead, &sub_id],
        )
        .await
        .expect("insert dead deliveries");

    let (relay, api) = Api::spawn(&db).await;
    let descending = |mut ids: Vec<i64>| {
        ids.sort_unstable_by(|a, b| b.cmp(a));
        ids
    };
    for limit in [1, 3, 5, 12, 500] {
        let (ids, pages) = all_pages(&api, &format!("limit={limit}")).await;
        assert_eq!(ids, descending(expected_all.clone()), "limit {limit}");
        assert_eq!(
            pages,
            expected_all.len().div_ceil(limit).max(1),
            "limit {limit}"
        );
    }
    let (ids, _) = all_pages(&api, "event_type=lead.created&limit=2").await;
    assert_eq!(ids.len(), 7);
    let (ids, _) = all_pages(&api, "event_type=lead.*&limit=4").await;
    assert_eq!(ids, descending(leads.clone()));
    let (ids, _) = all_pages(&api, "tenant_id=t2&limit=2").await;
    assert_eq!(ids.len(), 5);
    let since = (chrono::Utc::now() - chrono::Duration::minutes(5))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (ids, _) = all_pages(&api, &format!("tenant_id=t2&since={since}&limit=1")).await;
    assert_eq!(ids, descending(recent_t2.clone()));
    let (ids, _) = all_pages(&api, &format!("until={since}")).await;
    assert_eq!(ids.len(), expected_all.len() - recent_t2.len());
    let (ids, _) = all_pages(&api, "status=dead&limit=1").await;
    assert_eq!(ids, descending(dead.clone()));

    let page = api
        .get("/admin/v1/events?status=dead&limit=1")
        .await
        .expect(200);
    let event = &page["events"][0];
    assert_eq!(event["deliveries"], json!({ "dead": 1 }));
    assert_eq!(event["event_type"], "lead.created");
    assert!(event.get("payload").is_none(), "search leaves payloads out");
    assert!(page["next_cursor"].is_string());
    relay.shutdown().await;
}

/// A delivery that died is visible with its attempt, replayed through the API (dry run
/// first), delivered again with the same webhook-id, and the replays are listed.
#[tokio::test]
async fn a_dead_delivery_replayed_through_the_api_is_delivered_again() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver");
    receiver.queue("/hooks", [Reply::Status(500)]);
    add_subscription(
        &db,
        "billing",
        &receiver.url("/hooks"),
        &[("retry_schedule", "'{}'")],
    )
    .await;
    let (relay, api) = Api::spawn(&db).await;
    let event_id = publish(&db, "invoice.paid", json!({ "invoice": 7 })).await;
    wait_for_statuses(&db, "dead", 1).await;

    let detail = api
        .get(&format!("/admin/v1/events/{event_id}"))
        .await
        .expect(200);
    assert_eq!(detail["event_id"], event_id.to_string());
    assert_eq!(detail["payload"], json!({ "invoice": 7 }));
    assert_eq!(detail["deliveries"], json!({ "dead": 1 }));
    let delivery = &detail["delivery_list"][0];
    assert_eq!(delivery["subscription"], "billing");
    assert_eq!(delivery["status"], "dead");
    assert_eq!(delivery["attempts"], 1);
    assert_eq!(delivery["last_status_code"], 500);
    let history = delivery["attempt_history"]
        .as_array()
        .expect("attempt_history");
    assert_eq!(history.len(), 1, "{detail:#}");
    assert_eq!(history[0]["attempt"], 1);
    assert_eq!(history[0]["status_code"], 500);

    let dry = api
        .post(
            "/admin/v1/replays",
            json!({ "event_ids": [event_id.to_string()], "dry_run": true }),
        )
        .await
        .expect(201);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["matched"], 1);
    assert_eq!(dry["requested_by"], "admin-api");
    assert_eq!(
        deliveries(&db).await,
        vec![("dead".to_owned(), 1)],
        "a dry run changes nothing"
    );

    let replay = api
        .post(
            "/admin/v1/replays",
            json!({ "event_ids": [event_id.to_string()], "subscription": "billing",
                    "reason": "billing fixed their endpoint", "requested_by": "ops@example.com" }),
        )
        .await
        .expect(201);
    assert_eq!(replay["dry_run"], false);
    assert_eq!(replay["matched"], 1);
    assert_eq!(replay["requested_by"], "ops@example.com");
    assert_eq!(
        replay["criteria"]["event_ids"],
        json!([event_id.to_string()])
    );
    let replay_id = replay["id"].as_i64().expect("replay id");

    wait_for_statuses(&db, "delivered", 1).await;
    let received = receiver
        .wait_for("/hooks", 2, DEADLINE)
        .await
        .expect("both attempts arrive");
    assert_eq!(
        received[0].header("webhook-id"),
        received[1].header("webhook-id")
    );
    assert_eq!(
        received[0].body, received[1].body,
        "a replay sends the same bytes"
    );

    let detail = api
        .get(&format!("/admin/v1/events/{event_id}"))
        .await
        .expect(200);
    assert_eq!(detail["delivery_list"][0]["status"], "delivered");
    assert_eq!(detail["delivery_list"][0]["replay_id"], replay_id);

    let one = api
        .get(&format!("/admin/v1/replays/{replay_id}"))
        .await
        .expect(200);
    assert_eq!(one, replay);
    let first_page = api.get("/admin/v1/replays?limit=1").await.expect(200);
    assert_eq!(first_page["replays"][0]["id"], replay_id, "newest first");
    let cursor = first_page["next_cursor"].as_str().expect("a second page");
    let second_page = api
        .get(&format!("/admin/v1/replays?limit=1&cursor={cursor}"))
        .await
        .expect(200);
    assert_eq!(second_page["replays"][0]["id"], dry["id"]);
    assert_eq!(second_page["next_cursor"], Value::Null);
    relay.shutdown().await;
}

#[tokio::test]
async fn the_openapi_document_describes_every_route() {
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    // Served without the token: it describes, it does not act.
    let document = api
        .call_as(None, Method::GET, "/admin/v1/openapi.json", None)
        .await
        .expect(200);
    assert!(
        document["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3."))
    );
    let paths = document["paths"].as_object().expect("paths");
    let routes = [
        ("/admin/v1/openapi.json", "get"),
        ("/admin/v1/subscriptions", "get"),
        ("/admin/v1/subscriptions", "post"),
        ("/admin/v1/subscriptions/{name}", "get"),
        ("/admin/v1/subscriptions/{name}", "patch"),
        ("/admin/v1/subscriptions/{name}", "delete"),
        ("/admin/v1/subscriptions/{name}/disable", "post"),
        ("/admin/v1/subscriptions/{name}/enable", "post"),
        ("/admin/v1/subscriptions/{name}/rotate-secret", "post"),
        ("/admin/v1/events", "get"),
        ("/admin/v1/events/{event_id}", "get"),
        ("/admin/v1/replays", "get"),
        ("/admin/v1/replays", "post"),
        ("/admin/v1/replays/{id}", "get"),
        ("/events/publish", "post"),
        ("/events/subscribe", "post"),
        ("/subscriptions", "get"),
        ("/events/history", "post"),
        ("/api/events/{event_id}/replay", "post"),
        ("/api/events/replay/batch", "post"),
        ("/api/events/status/pending", "get"),
    ];
    for (path, method) in routes {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} is not in the document"
        );
    }
    let documented: usize = paths
        .values()
        .map(|p| p.as_object().map_or(0, |ops| ops.len()))
        .sum();
    assert_eq!(
        documented,
        routes.len(),
        "the document lists routes that do not exist"
    );
    // Every $ref points at a schema that exists.
    let schemas = document["components"]["schemas"]
        .as_object()
        .expect("schemas");
    let text = document.to_string();
    for reference in text.split("#/components/schemas/").skip(1) {
        let name = reference.split('"').next().unwrap_or_default();
        assert!(schemas.contains_key(name), "dangling $ref {name}");
    }
    // Every operation it lists is served: the router and the document are built from one
    // list of handlers (utoipa_axum's routes!), and this checks that from outside. A route
    // the server does not have answers 405, the admin fallback, or axum's empty 404.
    for (path, method) in routes {
        let concrete = path
            .replace("{name}", "nobody")
            .replace("{event_id}", "3f1c3a52-52a1-4d57-9a43-8a8c61f3a0de")
            .replace("{id}", "999999");
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
        let body = (method != Method::GET && method != Method::DELETE).then(|| json!({}));
        let answer = api.call(method.clone(), &concrete, body).await;
        assert_ne!(answer.status, 405, "{method} {concrete}: {:#}", answer.body);
        assert!(
            answer.body.is_object(),
            "{method} {concrete}: no JSON answer"
        );
        let message = answer.body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !message.contains("no such admin API route"),
            "{method} {concrete} is documented but not routed"
        );
    }
    relay.shutdown().await;
}

/// Numbers are judged as the client sent them, against the limits the document states: a
/// value just outside a limit used to be rounded onto it (to the microseconds of an interval,
/// to a `real`) and stored. Whole numbers written as floats are integers, as JSON Schema says.
#[tokio::test]
async fn numbers_just_outside_the_documented_limits_are_refused_and_7_0_is_an_integer() {
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    let url = "http://127.0.0.1:9/hook";
    for (setting, value, field) in [
        ("timeout_seconds", json!(300.000_000_1), "timeout_seconds"),
        ("timeout_seconds", json!(0.099_999_999), "timeout_seconds"),
        (
            "rate_limit_per_second",
            json!(100_000.001),
            "rate_limit_per_second",
        ),
        (
            "rate_limit_per_second",
            json!(1e-40),
            "rate_limit_per_second",
        ),
        (
            "retry_schedule_seconds",
            json!([5, 604_800.000_000_1]),
            "retry_schedule_seconds[1]",
        ),
        ("max_in_flight", json!(5.5), "max_in_flight"),
        // A setting that cannot be cleared refuses null rather than ignoring it.
        ("max_in_flight", Value::Null, "max_in_flight"),
    ] {
        let mut body = json!({ "name": "crm", "url": url });
        body[setting] = value.clone();
        api.post("/admin/v1/subscriptions", body)
            .await
            .expect_error(400, "invalid_input", Some(field));
    }
    let created = api
        .post(
            "/admin/v1/subscriptions",
            json!({ "name": "crm", "url": url, "max_in_flight": 7.0, "timeout_seconds": 300,
                    "rate_limit_per_second": 0.001, "retry_schedule_seconds": [604_800] }),
        )
        .await
        .expect(201);
    assert_eq!(created["max_in_flight"], 7, "{created:#}");
    // Cursors are spelled as next_cursor spells them.
    for cursor in ["01", "+1", "1000000000000000000"] {
        api.get(&format!(
            "/admin/v1/events?cursor={}",
            cursor.replace('+', "%2B")
        ))
        .await
        .expect_error(400, "invalid_input", Some("cursor"));
    }
    // An optional body may be null.
    api.post("/admin/v1/subscriptions/crm/disable", Value::Null)
        .await
        .expect(200);
    relay.shutdown().await;
}

/// Subscription URLs must have the form the document gives: the URL parser alone accepts
/// hosts such as `a*`, which the document calls invalid (the fuzzer found one stored).
#[tokio::test]
async fn a_subscription_url_outside_the_documented_form_is_refused() {
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    for url in ["HTTP://A*", "http://é.example/hook", "http://a:65536/"] {
        api.post(
            "/admin/v1/subscriptions",
            json!({ "name": "crm", "url": url }),
        )
        .await
        .expect_error(400, "invalid_input", Some("url"));
    }
    api.post(
        "/admin/v1/subscriptions",
        json!({ "name": "crm", "url": "https://user:pw@my_service:8443/in?x=1" }),
    )
    .await
    .expect(201);
    api.patch("/admin/v1/subscriptions/crm", json!({ "url": "http://a*" }))
        .await
        .expect_error(400, "invalid_input", Some("url"));
    relay.shutdown().await;
}

/// jsonb keeps numbers an f64 cannot hold (a producer may insert 1e400; f64::MAX comes back
/// as 309 digits). The API passes them through as stored; reading them as f64 panicked the
/// handler, so one such event broke every listing that included it.
#[tokio::test]
async fn json_numbers_beyond_f64_are_shown_as_stored() {
    let db = TestDb::new().await;
    let (relay, api) = Api::spawn(&db).await;
    db.client()
        .await
        .batch_execute(
            r#"INSERT INTO outbox.events (event_type, payload, metadata)
               VALUES ('lead.created', '{"big": 1e400}', '{"max": 1.7976931348623157e308}');
               INSERT INTO outbox.subscriptions (name, url, filter)
               VALUES ('crm', 'http://127.0.0.1:9/hook', '{"big": 1e400}')"#,
        )
        .await
        .expect("insert");
    // The answers are read as text: serde_json itself (as any f64 client) cannot hold them.
    let client = reqwest::Client::new();
    let text = |path: String| {
        let request = client
            .request(
                if path == "/events/history" {
                    Method::POST
                } else {
                    Method::GET
                },
                format!("{}{path}", api.base),
            )
            .header("authorization", format!("Bearer {TOKEN}"));
        async move {
            let response = request.send().await.expect("request");
            assert_eq!(response.status(), 200, "{path}");
            response.text().await.expect("body")
        }
    };
    let max = format!("17976931348623157{}", "0".repeat(292));
    let page = text("/admin/v1/events".to_owned()).await;
    assert!(page.contains(&format!(r#""max": {max}"#)), "{page}");
    let event_id = page
        .split(r#""event_id":""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("event_id");
    let big = format!("1{}", "0".repeat(400));
    let detail = text(format!("/admin/v1/events/{event_id}")).await;
    assert!(detail.contains(&format!(r#""big": {big}"#)), "{detail}");
    let subscription = text("/admin/v1/subscriptions/crm".to_owned()).await;
    assert!(subscription.contains(&big), "{subscription}");
    let history = text("/events/history".to_owned()).await;
    assert!(history.contains(&big), "{history}");
    relay.shutdown().await;
}
