//! The transport against real servers on 127.0.0.1: timeouts, redirects, cut bodies, refused
//! targets.

use super::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap as AxumHeaders, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::net::SocketAddr;

use crate::config::CidrList;

fn loopback_allowed() -> TargetPolicy {
    TargetPolicy {
        allowed_private: CidrList::parse("127.0.0.0/8").expect("valid list").0,
    }
}

fn client(policy: TargetPolicy) -> WebhookClient {
    WebhookClient::new(policy, "outbox-relay-test/1").expect("client builds")
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind test server");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

fn request<'a>(url: &'a str, headers: &'a [(String, String)]) -> WebhookRequest<'a> {
    WebhookRequest {
        url,
        headers,
        body: Bytes::from_static(br#"{"hello":"world"}"#),
        timeout: Duration::from_secs(5),
    }
}

fn expect_failed(result: HttpResult) -> (FailureKind, String) {
    match result {
        HttpResult::Failed { kind, error } => (kind, error),
        other => panic!("expected a failure, got {other:?}"),
    }
}

// --- helpers ---
// --- real servers on 127.0.0.1 ---

#[tokio::test]
async fn posts_json_with_headers_and_reads_the_answer() {
    let seen = Arc::new(std::sync::Mutex::new(None::<(String, String, String)>));
    let seen_in = Arc::clone(&seen);
    let app = Router::new().route(
        "/hook",
        post(move |headers: AxumHeaders, body: Bytes| {
            let seen = Arc::clone(&seen_in);
            async move {
                let get = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                let record = (
                    get("content-type"),
                    get("webhook-id"),
                    String::from_utf8_lossy(&body).into_owned(),
                );
                *seen.lock().expect("lock") = Some(record);
                (
                    StatusCode::CREATED,
                    [(header::RETRY_AFTER, "7")],
                    "accepted",
                )
            }
        }),
    );
    let addr = serve(app).await;
    let url = format!("http://{addr}/hook");
    let headers = vec![("webhook-id".to_owned(), "msg_1".to_owned())];
    let result = client(loopback_allowed())
        .send(request(&url, &headers))
        .await;
    assert_eq!(
        result,
        HttpResult::Responded {
            status: 201,
            body_prefix: "accepted".to_owned(),
            retry_after: Some(Duration::from_secs(7)),
        }
    );
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(
        seen,
        Some((
            "application/json".to_owned(),
            "msg_1".to_owned(),
            r#"{"hello":"world"}"#.to_owned()
        ))
    );
}

#[tokio::test]
async fn redirects_are_returned_not_followed() {
    let visits = Arc::new(AtomicUsize::new(0));
    let visits_in = Arc::clone(&visits);
    let app = Router::new()
        .route(
            "/start",
            post(|| async { (StatusCode::FOUND, [(header::LOCATION, "/landing")]) }),
        )
        .route(
            "/landing",
            get({
                let v = Arc::clone(&visits_in);
                move || async move {
                    v.fetch_add(1, Ordering::SeqCst);
                    "landed"
                }
            })
            .post(move || async move {
                visits_in.fetch_add(1, Ordering::SeqCst);
                "landed"
            }),
        );
    let addr = serve(app).await;
    let url = format!("http://{addr}/start");
    let result = client(loopback_allowed()).send(request(&url, &[])).await;
    assert!(
        matches!(result, HttpResult::Responded { status: 302, .. }),
        "{result:?}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(visits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn large_body_is_cut_at_the_limit() {
    let app = Router::new().route("/big", post(|| async { vec![b'a'; 10 * 1024 * 1024] }));
    let addr = serve(app).await;
    let url = format!("http://{addr}/big");
    match client(loopback_allowed()).send(request(&url, &[])).await {
        HttpResult::Responded {
            status,
            body_prefix,
            ..
        } => {
            assert_eq!(status, 200);
            assert_eq!(body_prefix.len(), RESPONSE_BODY_LIMIT);
            assert!(body_prefix.bytes().all(|b| b == b'a'));
        }
        other => panic!("expected a response, got {other:?}"),
    }
}

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn endless_body_stops_reading_and_closes_the_connection() {
    let dropped = Arc::new(AtomicBool::new(false));
    let dropped_in = Arc::clone(&dropped);
    let app = Router::new().route(
        "/endless",
        post(move || {
            let guard = SetOnDrop(Arc::clone(&dropped_in));
            async move {
                let stream = futures::stream::unfold(guard, |guard| async move {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    Some((
                        Ok::<_, std::io::Error>(Bytes::from(vec![b'z'; 1024])),
                        guard,
                    ))
                });
                Body::from_stream(stream).into_response()
            }
        }),
    );
    let addr = serve(app).await;
    let url = format!("http://{addr}/endless");
    let mut req = request(&url, &[]);
    req.timeout = Duration::from_secs(30);
    let started = Instant::now();
    let result = client(loopback_allowed()).send(req).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "send must return long before the 30s timeout"
    );
    match result {
        HttpResult::Responded { body_prefix, .. } => {
            assert_eq!(body_prefix.len(), RESPONSE_BODY_LIMIT);
        }
        other => panic!("expected a response, got {other:?}"),
    }
    // The server only drops its endless stream when the client has closed the connection.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !dropped.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "client kept the connection open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn hanging_server_times_out() {
    let app = Router::new().route(
        "/hang",
        post(|| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            "never"
        }),
    );
    let addr = serve(app).await;
    let url = format!("http://{addr}/hang");
    let mut req = request(&url, &[]);
    req.timeout = Duration::from_millis(300);
    let started = Instant::now();
    let (kind, error) = expect_failed(client(loopback_allowed()).send(req).await);
    let elapsed = started.elapsed();
    assert_eq!(kind, FailureKind::Timeout, "{error}");
    assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
}

#[tokio::test]
async fn slow_headers_then_slow_body_times_out_in_total() {
    let app = Router::new().route(
        "/drip",
        post(|| async {
            let stream = futures::stream::unfold((), |()| async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Some((Ok::<_, std::io::Error>(Bytes::from_static(b"d")), ()))
            });
            Body::from_stream(stream).into_response()
        }),
    );
    let addr = serve(app).await;
    let url = format!("http://{addr}/drip");
    let mut req = request(&url, &[]);
    req.timeout = Duration::from_millis(400);
    let started = Instant::now();
    let (kind, error) = expect_failed(client(loopback_allowed()).send(req).await);
    assert_eq!(kind, FailureKind::Timeout, "{error}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn refused_connection_is_a_connect_failure() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    let url = format!("http://{addr}/hook");
    let (kind, error) = expect_failed(client(loopback_allowed()).send(request(&url, &[])).await);
    assert_eq!(kind, FailureKind::Connect, "{error}");
    assert!(error.contains(": "), "cause chain expected: {error}");
    assert!(
        !error.contains("http://"),
        "URL must stay out of the text: {error}"
    );
}

fn counting_app(hits: &Arc<AtomicUsize>) -> Router {
    let hits = Arc::clone(hits);
    Router::new().route(
        "/hook",
        post(move || async move {
            hits.fetch_add(1, Ordering::SeqCst);
            "ok"
        }),
    )
}

#[tokio::test]
async fn loopback_literal_is_refused_by_default_and_allowed_when_listed() {
    let hits = Arc::new(AtomicUsize::new(0));
    let addr = serve(counting_app(&hits)).await;
    let url = format!("http://{addr}/hook");

    let (kind, error) = expect_failed(
        client(TargetPolicy::default())
            .send(request(&url, &[]))
            .await,
    );
    assert_eq!(kind, FailureKind::ForbiddenTarget);
    assert!(error.contains("127.0.0.1"), "{error}");
    assert!(error.contains("OUTBOX_ALLOW_PRIVATE_TARGETS"), "{error}");
    assert_eq!(hits.load(Ordering::SeqCst), 0);

    let mapped = format!("http://[::ffff:127.0.0.1]:{}/hook", addr.port());
    let (kind, _) = expect_failed(
        client(TargetPolicy::default())
            .send(request(&mapped, &[]))
            .await,
    );
    assert_eq!(kind, FailureKind::ForbiddenTarget);
    let decimal = format!("http://2130706433:{}/hook", addr.port());
    let (kind, _) = expect_failed(
        client(TargetPolicy::default())
            .send(request(&decimal, &[]))
            .await,
    );
    assert_eq!(kind, FailureKind::ForbiddenTarget);
    assert_eq!(hits.load(Ordering::SeqCst), 0);

    let result = client(loopback_allowed()).send(request(&url, &[])).await;
    assert!(
        matches!(result, HttpResult::Responded { status: 200, .. }),
        "{result:?}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn localhost_name_is_refused_after_dns_by_default() {
    let hits = Arc::new(AtomicUsize::new(0));
    let addr = serve(counting_app(&hits)).await;
    let url = format!("http://localhost:{}/hook", addr.port());

    let (kind, error) = expect_failed(
        client(TargetPolicy::default())
            .send(request(&url, &[]))
            .await,
    );
    assert_eq!(kind, FailureKind::ForbiddenTarget, "{error}");
    assert!(
        error.starts_with("refused: localhost resolves only to forbidden addresses ("),
        "{error}"
    );
    assert!(error.contains("OUTBOX_ALLOW_PRIVATE_TARGETS"), "{error}");
    assert_eq!(hits.load(Ordering::SeqCst), 0);

    let result = client(loopback_allowed()).send(request(&url, &[])).await;
    assert!(
        matches!(result, HttpResult::Responded { status: 200, .. }),
        "{result:?}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn invalid_requests_are_refused_before_any_traffic() {
    let c = client(loopback_allowed());
    for url in ["not a url", "ftp://127.0.0.1/x", "file:///etc/passwd"] {
        let (kind, error) = expect_failed(c.send(request(url, &[])).await);
        assert_eq!(kind, FailureKind::InvalidRequest, "{url}: {error}");
    }
    let bad_header = vec![("bad header".to_owned(), "x".to_owned())];
    let (kind, _) = expect_failed(c.send(request("http://127.0.0.1:9/", &bad_header)).await);
    assert_eq!(kind, FailureKind::InvalidRequest);
    let bad_value = vec![("x-ok".to_owned(), "line\nbreak".to_owned())];
    let (kind, _) = expect_failed(c.send(request("http://127.0.0.1:9/", &bad_value)).await);
    assert_eq!(kind, FailureKind::InvalidRequest);
}

/// The error is logged and kept in delivery_attempts.error, so it shows the URL masked.
#[tokio::test]
async fn url_errors_never_show_the_password() {
    let c = client(loopback_allowed());
    for url in [
        "http://hook:pw-in-url@[::1/hook",
        "http://hook:pw-in-url@127.0.0.1:99999/hook",
    ] {
        let (kind, error) = expect_failed(c.send(request(url, &[])).await);
        assert_eq!(kind, FailureKind::InvalidRequest, "{error}");
        assert!(!error.contains("pw-in-url"), "{error}");
        assert!(error.contains("hook:***@"), "{error}");
    }
}

#[tokio::test]
async fn response_status_and_retry_after_date_are_reported() {
    let app = Router::new().route(
        "/busy",
        post(|| async {
            let mut response: Response = (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response();
            let at = (Utc::now() + chrono::Duration::seconds(120))
                .format("%a, %d %b %Y %H:%M:%S GMT")
                .to_string();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, at.parse().expect("valid header value"));
            response
        }),
    );
    let addr = serve(app).await;
    let url = format!("http://{addr}/busy");
    match client(loopback_allowed()).send(request(&url, &[])).await {
        HttpResult::Responded {
            status,
            body_prefix,
            retry_after,
        } => {
            assert_eq!(status, 503);
            assert_eq!(body_prefix, "busy");
            let wait = retry_after.expect("retry-after parsed");
            assert!(
                wait > Duration::from_secs(110) && wait <= Duration::from_secs(120),
                "{wait:?}"
            );
        }
        other => panic!("expected a response, got {other:?}"),
    }
}
