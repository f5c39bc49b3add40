//! What Prometheus and the orchestrator see: /healthz, /readyz (naming what failed) and
//! /metrics moving with real deliveries; and the demo, the README's first command.

use std::time::Duration;

use outbox_relay::config::RelayConfig;
use serde_json::json;
use testkit::receiver::Reply;

use crate::harness::db::TestDb;
use crate::harness::relay::*;

async fn get(url: &str) -> (u16, String) {
    let response = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

#[tokio::test]
async fn a_running_relay_is_healthy_and_ready() {
    let db = TestDb::new().await;
    let relay = spawn_default_relay(&db).await;
    let base = format!("http://{}", relay.http_addr);
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
    wait_until("/readyz answers 200", DEADLINE, || async {
        get(&format!("{base}/readyz")).await.0 == 200
    })
    .await;
    let (_, body) = get(&format!("{base}/readyz")).await;
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body["ready"], true);
    assert_eq!(body["failed"], json!([]));
    relay.shutdown().await;
}

/// Pointed at a database that is not there, the relay runs (no panic) and says why it is
/// not ready.
#[tokio::test]
async fn readyz_names_an_unreachable_database() {
    let relay = spawn_relay_at(&unreachable_database_url(), RelayConfig::for_tests()).await;
    let base = format!("http://{}", relay.http_addr);
    wait_until("/readyz reports the database", DEADLINE, || async {
        let (status, body) = get(&format!("{base}/readyz")).await;
        status == 503
            && body.contains("database unreachable")
            && body.contains("LISTEN connection down")
    })
    .await;
    assert_eq!(
        get(&format!("{base}/healthz")).await.0,
        200,
        "the process itself is fine"
    );
    relay.shutdown().await;
}

/// A schema older than the binary (a migration not applied) keeps the relay not-ready.
#[tokio::test]
async fn readyz_names_missing_migrations() {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute("DELETE FROM outbox.schema_history WHERE version = (SELECT max(version) FROM outbox.schema_history)")
        .await
        .expect("forget the newest migration");
    let relay = spawn_default_relay(&db).await;
    let (status, body) = get(&format!("http://{}/readyz", relay.http_addr)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("run outbox-relay migrate"), "{body}");
    relay.shutdown().await;
}

fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == name_and_labels)
                .then(|| value.parse().ok())
                .flatten()
        })
}

#[tokio::test]
async fn metrics_move_with_deliveries() {
    let db = TestDb::new().await;
    let _receiver = ok_and_broken_subscribers(&db).await;
    let relay = spawn_default_relay(&db).await;
    for n in 0..3 {
        publish(&db, "lead.created", json!({ "n": n })).await;
    }
    wait_for_statuses(&db, "delivered", 3).await;
    wait_for_statuses(&db, "dead", 3).await;

    let url = format!("http://{}/metrics", relay.http_addr);
    // Gauges refresh on a 5 s timer.
    wait_until("gauges show the dead deliveries", DEADLINE, || async {
        metric(
            &get(&url).await.1,
            r#"outbox_dead_deliveries{subscription="broken"}"#,
        ) == Some(3.0)
    })
    .await;
    let text = get(&url).await.1;
    assert_eq!(metric(&text, "outbox_events_dispatched_total"), Some(3.0));
    assert_eq!(
        metric(
            &text,
            r#"outbox_deliveries_total{outcome="delivered",subscription="crm"}"#
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"outbox_deliveries_total{outcome="failed",subscription="broken"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"outbox_deliveries_total{outcome="dead",subscription="broken"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"outbox_delivery_duration_seconds_count{subscription="crm"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"outbox_delivery_lag_seconds_count{subscription="crm"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(&text, r#"outbox_pending_deliveries{subscription="crm"}"#),
        Some(0.0)
    );
    assert!(
        metric(&text, r#"outbox_wakeups_total{reason="notify"}"#).unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert!(metric(&text, "outbox_oldest_pending_seconds").is_some());
    assert_eq!(
        metric(&text, "outbox_db_pool_max_connections"),
        Some(f64::from(
            outbox_relay::config::RelayConfig::for_tests().db_pool_size
        ))
    );
    assert!(
        metric(&text, r#"outbox_db_pool_connections{state="idle"}"#).unwrap_or(0.0)
            + metric(&text, r#"outbox_db_pool_connections{state="in_use"}"#).unwrap_or(0.0)
            >= 1.0,
        "the relay has used its pool: {text}"
    );
    assert!(metric(&text, "outbox_db_pool_waiting").is_some());
    assert!(
        metric(&text, "process_resident_memory_bytes").unwrap_or(0.0) > 0.0,
        "{text}"
    );
    assert!(!text.contains("tenant"), "no tenant labels");
    promtool_check_metrics(&text);
    relay.shutdown().await;
}

/// `promtool check metrics` (Debian package `prometheus`) lints the exposition: names,
/// units, help texts, histogram shape. A missing promtool fails the test unless
/// OUTBOX_ALLOW_MISSING_TOOLS=1 (see `harness::tools`).
fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) => {
            crate::harness::tools::missing_tool(
                "promtool",
                "the /metrics lint",
                "`apt-get install -y --no-install-recommends prometheus`",
                &error.to_string(),
            );
            return;
        }
    };
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let output = child.wait_with_output().expect("promtool finishes");
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The pending gauge counts what is waiting, and the oldest-pending age grows with it.
#[tokio::test]
async fn backlog_gauges_report_waiting_work() {
    let (db, receiver) =
        db_with_subscriber("down", "/down", &[("retry_schedule", "'{1 hour}'")]).await;
    receiver.set_default("/down", Reply::Status(503));
    let relay = spawn_default_relay(&db).await;
    publish(&db, "lead.created", json!({})).await;
    publish(&db, "lead.created", json!({})).await;
    wait_for_statuses(&db, "failing", 2).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let url = format!("http://{}/metrics", relay.http_addr);
    wait_until(
        "pending gauge is 2 and the oldest age is at least 1 s",
        DEADLINE,
        || async {
            let text = get(&url).await.1;
            metric(&text, r#"outbox_pending_deliveries{subscription="down"}"#) == Some(2.0)
                && metric(&text, "outbox_oldest_pending_seconds").unwrap_or(0.0) >= 1.0
        },
    )
    .await;
    relay.shutdown().await;
}

/// `outbox_subscription_disabled` is 1 for a disabled subscription and 0 for an enabled
/// one, and follows an operator's UPDATE within a gauge refresh.
#[tokio::test]
async fn subscription_disabled_gauge_follows_the_enabled_flag() {
    let db = TestDb::new().await;
    add_subscription(&db, "on", "http://127.0.0.1:9/on", &[]).await;
    add_subscription(
        &db,
        "off",
        "http://127.0.0.1:9/off",
        &[("enabled", "false"), ("disabled_reason", "'test'")],
    )
    .await;
    let relay = spawn_default_relay(&db).await;
    let url = format!("http://{}/metrics", relay.http_addr);
    wait_until("off is reported disabled, on enabled", DEADLINE, || async {
        let text = get(&url).await.1;
        metric(&text, r#"outbox_subscription_disabled{subscription="off"}"#) == Some(1.0)
            && metric(&text, r#"outbox_subscription_disabled{subscription="on"}"#) == Some(0.0)
    })
    .await;
    db.client()
        .await
        .batch_execute("UPDATE outbox.subscriptions SET enabled = false WHERE name = 'on'")
        .await
        .expect("disable on");
    wait_until(
        "on is reported disabled after the UPDATE",
        DEADLINE,
        || async {
            metric(
                &get(&url).await.1,
                r#"outbox_subscription_disabled{subscription="on"}"#,
            ) == Some(1.0)
        },
    )
    .await;
    relay.shutdown().await;
}

/// `outbox-relay demo --once`: lead 42's flow arrives in event order (an ordered
/// subscription keyed by the lead), every signature verifies, the rolled-back event is not
/// among what the receiver got (the demo shows it all once every stored sample event is
/// delivered, so a stored one would be there), and a clean exit logs no warning.
#[tokio::test]
async fn demo_delivers_the_sample_flow_in_order_with_verified_signatures() {
    let db = TestDb::new().await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["demo", "--once"])
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "info")
        .output();
    let output = tokio::time::timeout(DEADLINE, output)
        .await
        .expect("demo finishes")
        .expect("demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    // What the receiver got, in arrival order: (event type, ordering key, verdict).
    let received: Vec<(&str, &str, bool)> = stdout
        .lines()
        .filter_map(|line| line.trim().strip_prefix("✓ received "))
        .map(|rest| {
            let mut words = rest.split_whitespace();
            (
                words.next().expect("event type"),
                words.next().expect("ordering key"),
                rest.ends_with("(signature verified)"),
            )
        })
        .collect();
    assert_eq!(
        received,
        [
            ("lead.created", "lead:42", true),
            ("lead.qualified", "lead:42", true),
            ("lead.converted", "lead:42", true),
        ],
        "{stdout}"
    );
    assert!(
        stdout.contains("lead:42: lead.created → lead.qualified → lead.converted"),
        "{stdout}"
    );
    assert!(
        !stdout.contains(outbox_relay::demo::ROLLED_BACK_MARKER),
        "{stdout}"
    );
    assert!(
        !stderr.contains("WARN"),
        "a clean exit logged a warning:\n{stderr}"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'"
        )
        .await,
        3
    );
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.events").await, 3);
}

/// A buffer the test's log subscriber writes to.
#[derive(Clone, Default)]
struct LogBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The LISTEN connection ending because the relay shuts down is not a warning. Shutdown and
/// the session's end are seen at the same moment, so which one the listener noticed first
/// used to be a coin toss; twenty shutdowns in a row make a warning on either side show.
#[tokio::test]
async fn the_listen_connection_closes_quietly_on_shutdown() {
    let db = TestDb::new().await;
    let logs = LogBuffer::default();
    let writer = logs.clone();
    // tracing-core caches each log line's interest process-wide, and while exactly one
    // dispatcher is registered it asks the default of whichever thread reaches the line first
    // (tokio-rs/tracing#3611): a sibling test's relay, on a thread with no subscriber, then
    // caches "never" and this test's capture sees nothing. With a second live dispatcher the
    // interest is the union of all registered ones.
    let _second_dispatcher = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
    // The test runtime is single-threaded, so this thread's subscriber sees every task.
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    );
    // What a sibling test does: the listener's log lines first reached on a thread that has
    // no subscriber.
    let url = db.url.clone();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime without a subscriber")
            .block_on(listen_then_shut_down(url));
    })
    .join()
    .expect("the subscriber-less listener ends");
    for _ in 0..20 {
        listen_then_shut_down(db.url.clone()).await;
    }
    let logs = String::from_utf8(logs.0.lock().expect("log buffer").clone()).expect("UTF-8");
    assert_eq!(logs.matches("listening for wake-ups").count(), 20, "{logs}");
    assert!(!logs.contains("WARN"), "{logs}");
}

/// Starts a LISTEN session, waits until it listens, and shuts it down.
async fn listen_then_shut_down(url: String) {
    use outbox_relay::db::listen::{self, WakeTargets};
    use std::sync::atomic::Ordering;
    let targets = WakeTargets {
        events: Default::default(),
        subscriptions: Default::default(),
        connected: Default::default(),
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let listener = tokio::spawn(listen::run(url, targets.clone(), cancel.clone()));
    wait_until("LISTEN is established", DEADLINE, || {
        let connected = targets.connected.clone();
        async move { connected.load(Ordering::SeqCst) }
    })
    .await;
    cancel.cancel();
    tokio::time::timeout(DEADLINE, listener)
        .await
        .expect("the listener stops when cancelled")
        .expect("the listener task ends without panicking");
}
