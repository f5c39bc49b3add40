//! The admin HTTP API (`/admin/v1`), end to end: a relay with an admin token, real HTTP,
//! real PostgreSQL. Shared helpers for `compat_api/` live here too.

use outbox_relay::config::RelayConfig;
use outbox_relay::relay::RelayHandle;
use reqwest::Method;
use serde_json::{Value, json};
use testkit::receiver::{Receiver, Reply};

use crate::harness::db::TestDb;
use crate::harness::relay::*;

mod access;
mod input;
mod resources;
mod text;

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
