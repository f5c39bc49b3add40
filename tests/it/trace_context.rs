//! W3C trace context pass-through: a valid `traceparent`/`tracestate` in an event's metadata is
//! sent as request headers on every attempt and replay, an invalid one is left out without
//! failing the delivery, and it replaces a subscription's static trace headers. The body and
//! signature are what they were without it.

use std::collections::HashMap;

use outbox_relay::webhook::{SigningSecret, verify};
use serde_json::json;
use testkit::receiver::{Received, Receiver, Reply};

use crate::harness::db::TestDb;
use crate::harness::relay::*;

const GOOD_PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const GOOD_STATE: &str = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE";
const OTHER_PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
const STATIC_PARENT: &str = "00-11111111111111111111111111111111-2222222222222222-01";
const STATIC_STATE: &str = "static=1";

/// The one value of a header, failing if the request carried it more than once.
fn single<'a>(request: &'a Received, name: &str) -> Option<&'a str> {
    let values: Vec<_> = request.headers.get_all(name).iter().collect();
    assert!(values.len() <= 1, "{name} sent {} times", values.len());
    values.first().map(|v| v.to_str().expect("ASCII header"))
}

fn trace_headers(request: &Received) -> (Option<&str>, Option<&str>) {
    (
        single(request, "traceparent"),
        single(request, "tracestate"),
    )
}

fn case_of(request: &Received) -> String {
    request.json()["data"]["case"]
        .as_str()
        .expect("case in payload")
        .to_owned()
}

#[tokio::test]
async fn metadata_trace_context_becomes_headers_and_wins_over_static_ones() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await.expect("receiver");
    // The first attempt of the "good" event to /plain fails, so a retry is checked too.
    receiver.reply_when_body_contains("/plain", r#""case": "good""#, Reply::Status(500), 1);
    let (_, plain_secret) = add_subscription(
        &db,
        "plain",
        &receiver.url("/plain"),
        &[("retry_schedule", "'{100 milliseconds}'")],
    )
    .await;
    let static_headers =
        json!({"TraceParent": STATIC_PARENT, "tracestate": STATIC_STATE, "x-team": "growth"});
    let (_, static_secret) = add_subscription(
        &db,
        "static",
        &receiver.url("/static"),
        &[("headers", &format!("'{static_headers}'"))],
    )
    .await;
    let relay = spawn_default_relay(&db).await;

    let cases = [
        (
            "good",
            json!({"traceparent": GOOD_PARENT, "tracestate": GOOD_STATE, "correlation_id": "c-1"}),
        ),
        (
            "uppercase",
            json!({"traceparent": GOOD_PARENT.to_uppercase(), "tracestate": GOOD_STATE}),
        ),
        (
            "number",
            json!({"traceparent": 42, "tracestate": GOOD_STATE}),
        ),
        (
            "bad_state",
            json!({"traceparent": OTHER_PARENT, "tracestate": "rojo=\u{e9}"}),
        ),
        ("none", json!({"correlation_id": "c-2"})),
    ];
    let mut event_ids = HashMap::new();
    {
        let client = db.client().await;
        for (case, metadata) in &cases {
            let row = client
                .query_one(
                    "SELECT outbox.publish('trace.test', $1, metadata => $2)",
                    &[&json!({"case": case}), metadata],
                )
                .await
                .expect("publish");
            event_ids.insert(case.to_string(), row.get::<_, uuid::Uuid>(0));
        }
    }

    let plain = receiver
        .wait_for("/plain", cases.len() + 1, DEADLINE)
        .await
        .expect("every event to /plain, and the retry");
    let statics = receiver
        .wait_for("/static", cases.len(), DEADLINE)
        .await
        .expect("every event to /static");
    wait_for_statuses(&db, "delivered", 2 * cases.len() as i64).await;

    // Replayed: the trace context goes out again.
    db.client()
        .await
        .query_one(
            "SELECT matched FROM outbox.replay(status => '{delivered}', subscription => 'plain',
                                               event_ids => ARRAY[$1::uuid], reason => 'trace test')",
            &[&event_ids["good"]],
        )
        .await
        .expect("replay");
    let plain_all = receiver
        .wait_for("/plain", plain.len() + 1, DEADLINE)
        .await
        .expect("the replay");
    assert_eq!(statics.len(), cases.len(), "{statics:?}");

    let expected_plain: HashMap<&str, (Option<&str>, Option<&str>)> = HashMap::from([
        ("good", (Some(GOOD_PARENT), Some(GOOD_STATE))),
        ("uppercase", (None, None)),
        ("number", (None, None)),
        ("bad_state", (Some(OTHER_PARENT), None)),
        ("none", (None, None)),
    ]);
    let expected_static: HashMap<&str, (Option<&str>, Option<&str>)> = HashMap::from([
        ("good", (Some(GOOD_PARENT), Some(GOOD_STATE))),
        // No valid context of its own: the subscription's static headers go out as configured.
        ("uppercase", (Some(STATIC_PARENT), Some(STATIC_STATE))),
        ("number", (Some(STATIC_PARENT), Some(STATIC_STATE))),
        // The event's traceparent replaces the static pair; the static tracestate belongs to
        // another trace and is not sent with it.
        ("bad_state", (Some(OTHER_PARENT), None)),
        ("none", (Some(STATIC_PARENT), Some(STATIC_STATE))),
    ]);

    let stored: HashMap<String, String> = db
        .client()
        .await
        .query(
            "SELECT event_id::text, metadata::text FROM outbox.events",
            &[],
        )
        .await
        .expect("stored metadata")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let now = chrono::Utc::now().timestamp();
    let mut per_case: HashMap<String, usize> = HashMap::new();
    for (requests, secret, expected) in [
        (&plain_all, &plain_secret, &expected_plain),
        (&statics, &static_secret, &expected_static),
    ] {
        let secret = SigningSecret::parse(secret).expect("secret");
        for request in requests {
            let case = case_of(request);
            *per_case.entry(case.clone()).or_default() += 1;
            assert_eq!(
                trace_headers(request),
                expected[case.as_str()],
                "{case} to {}",
                request.path
            );
            // The signature covers the body as before, and the body carries metadata as stored.
            let id = request.header("webhook-id").expect("webhook-id");
            verify(
                &secret,
                id,
                request.header("webhook-timestamp").expect("timestamp"),
                &request.body,
                request.header("webhook-signature").expect("signature"),
                now,
                300,
            )
            .unwrap_or_else(|e| panic!("{case} to {}: {e}", request.path));
            let text = std::str::from_utf8(&request.body).expect("UTF-8 body");
            let metadata = format!(r#","metadata":{},"#, stored[id]);
            assert!(text.contains(&metadata), "{metadata} not in {text}");
            let sent_metadata = &cases
                .iter()
                .find(|(c, _)| *c == case)
                .expect("known case")
                .1;
            assert_eq!(&request.json()["metadata"], sent_metadata);
            if request.path == "/static" {
                assert_eq!(request.header("x-team"), Some("growth"));
            }
        }
    }
    // good: first attempt, retry, replay to /plain and one to /static; the rest once each.
    let expected_counts: HashMap<String, usize> = cases
        .iter()
        .map(|(c, _)| (c.to_string(), if *c == "good" { 4 } else { 2 }))
        .collect();
    assert_eq!(per_case, expected_counts);
    assert_eq!(
        plain_all
            .iter()
            .filter(|r| case_of(r) == "good")
            .filter_map(|r| r.status)
            .collect::<Vec<_>>(),
        [500, 200, 200],
        "attempt, retry, replay"
    );
    relay.shutdown().await;
}
