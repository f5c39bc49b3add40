//! Secrets never leave (SPEC, Guarantees): the admin token, passwords in the database, listen
//! and target URLs, and subscription signing secrets appear in no log line, error message,
//! metric or `--help` text. Each run uses fresh, unique values, so finding one anywhere in what
//! the real binary printed can only mean it leaked.

use std::process::Stdio;

use outbox_relay::webhook::generate_secret;
use serde_json::json;
use tokio::io::AsyncReadExt as _;
use uuid::Uuid;

use crate::harness::db::TestDb;
use crate::harness::relay::*;

/// Every unique secret of one run, with a name for the failure message.
struct Secrets(Vec<(&'static str, String)>);

impl Secrets {
    /// Panics naming each secret found in `text` (what the binary printed for `what`).
    fn assert_absent(&self, what: &str, text: &str) {
        let leaked: Vec<&str> = self
            .0
            .iter()
            .filter(|(_, value)| text.contains(value.as_str()))
            .map(|(name, _)| *name)
            .collect();
        assert!(
            leaked.is_empty(),
            "{what} shows the secret(s) {leaked:?}:\n{text}"
        );
    }
}

/// A value nobody else could print by chance.
fn unique(prefix: &str) -> String {
    format!("{prefix}{}", Uuid::new_v4().simple())
}

/// `url` (postgres://user@host:port/db) with `user:password` as its credentials.
fn with_credentials(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let host_and_db = rest.rsplit_once('@').map_or(rest, |(_, tail)| tail);
    format!("{scheme}://{user}:{password}@{host_and_db}")
}

/// A port nothing listens on (bound, then released).
async fn closed_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a port");
    listener.local_addr().expect("local address").port()
}

/// One run of the binary (not `run`), at debug level: whether it succeeded, and what it
/// printed (stdout and stderr) after a first line naming the command, which is not output.
async fn run_cli(envs: &[(&str, &str)], args: &[&str]) -> (bool, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    command
        .args(args)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "debug")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(DEADLINE, command.output())
        .await
        .unwrap_or_else(|_| panic!("outbox-relay {args:?} did not finish"))
        .expect("run the outbox-relay binary");
    let text = format!(
        "$ outbox-relay {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// The relay binary at debug level with every kind of secret configured, through startup, a
/// refused and an unreachable delivery target, API requests with a wrong token and bad
/// input, a cut of its database connections, and SIGTERM; the CLI with a password in its
/// database URL, a wrong database URL, bad input, and `--help` of every command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_output_logs_errors_metrics_or_help() {
    let db = TestDb::new().await;
    let role = unique("outbox_secrets_");
    let db_password = unique("dbpw");
    // The server trusts local connections, so any password logs in: the listen URL gets a
    // different one, to show each URL is masked on its own.
    let listen_password = unique("listenpw");
    let wrong_db_password = unique("wrongpw");
    let admin_token = unique("token");
    let target_password = unique("targetpw");
    let api_target_password = unique("apitargetpw");
    let bad_target_password = unique("badtargetpw");
    let secret = generate_secret();
    let api_secret = generate_secret();
    let secrets = Secrets(vec![
        ("database password", db_password.clone()),
        ("listen database password", listen_password.clone()),
        ("wrong database password", wrong_db_password.clone()),
        ("admin token", admin_token.clone()),
        ("target URL password", target_password.clone()),
        ("API target URL password", api_target_password.clone()),
        ("refused target URL password", bad_target_password.clone()),
        (
            "signing secret",
            secret.trim_start_matches("whsec_").to_owned(),
        ),
        (
            "API signing secret",
            api_secret.trim_start_matches("whsec_").to_owned(),
        ),
    ]);

    // A login role with a password of its own, allowed what the relay and the CLI do.
    let admin = db.client().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{db_password}';
             GRANT USAGE ON SCHEMA outbox TO {role};
             GRANT ALL ON ALL TABLES IN SCHEMA outbox TO {role};
             GRANT ALL ON ALL SEQUENCES IN SCHEMA outbox TO {role};
             GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA outbox TO {role};"
        ))
        .await
        .expect("create the login role");
    let database_url = with_credentials(&db.url, &role, &db_password);
    let listen_url = with_credentials(&db.url, &role, &listen_password);

    // Two subscriptions with a password in their URL and a known secret: one at an address
    // the relay refuses (10/8 is not allowed below), one at a closed port.
    let refused_url = format!("http://hook:{target_password}@10.255.255.1/hook");
    let closed_url = format!(
        "http://hook:{target_password}@127.0.0.1:{}/hook",
        closed_port().await
    );
    add_subscription(
        &db,
        "refused",
        &refused_url,
        &[("secret", &format!("'{secret}'"))],
    )
    .await;
    add_subscription(&db, "closed", &closed_url, &[("retry_schedule", "'{}'")]).await;
    // Broker targets with passwords, at closed ports: their connect errors must not show them.
    for (name, url) in [
        (
            "nats",
            format!(
                "nats://relay:{target_password}@127.0.0.1:{}/orders",
                closed_port().await
            ),
        ),
        (
            "redis",
            format!(
                "redis://:{target_password}@127.0.0.1:{}/0?stream=orders",
                closed_port().await
            ),
        ),
        (
            "amqp",
            format!(
                "amqp://relay:{target_password}@127.0.0.1:{}/%2f?exchange=events",
                closed_port().await
            ),
        ),
    ] {
        add_subscription(&db, name, &url, &[("retry_schedule", "'{}'")]).await;
    }

    let http_port = closed_port().await;
    let mut relay = RelayProcess::builder("secrets")
        .flag("--http-addr", &format!("127.0.0.1:{http_port}"))
        .flag("--allow-private-targets", "127.0.0.0/8")
        .env("DATABASE_URL", &database_url)
        .env("OUTBOX_LISTEN_DATABASE_URL", &listen_url)
        .env("OUTBOX_ADMIN_TOKEN", &admin_token)
        .env("RUST_LOG", "debug")
        .capture_output()
        .spawn(&db);
    let mut stdout = relay.child.stdout.take().expect("piped stdout");
    let mut stderr = relay.child.stderr.take().expect("piped stderr");
    // Read while it runs, so a full pipe never blocks the relay.
    let stdout_task = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text).await;
        text
    });
    let stderr_task = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });

    let base = format!("http://127.0.0.1:{http_port}");
    let http = reqwest::Client::new();
    wait_until("the relay is ready", DEADLINE, || async {
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|response| response.status().is_success())
    })
    .await;

    // What the API answers is checked like any other output.
    let mut answers = Vec::new();
    let call = async |token: &str,
                      method: reqwest::Method,
                      path: &str,
                      body: Option<serde_json::Value>| {
        let mut request = http
            .request(method.clone(), format!("{base}/admin/v1{path}"))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.expect("API request");
        let status = response.status();
        let text = response.text().await.expect("API answer");
        (status, format!("{method} {path} -> {status}\n{text}"))
    };
    let (status, wrong_token) =
        call("wrong-token", reqwest::Method::GET, "/subscriptions", None).await;
    assert_eq!(status, 401);
    answers.push(wrong_token);
    let (status, refused) = call(
        &admin_token,
        reqwest::Method::POST,
        "/subscriptions",
        Some(
            json!({"name": "bad", "url": format!("ftp://hook:{bad_target_password}@example.com/")}),
        ),
    )
    .await;
    assert_eq!(status, 400, "{refused}");
    answers.push(refused);
    let (status, created) = call(
        &admin_token,
        reqwest::Method::POST,
        "/subscriptions",
        Some(json!({
            "name": "api",
            "url": format!("http://hook:{api_target_password}@127.0.0.1:{}/hook", closed_port().await),
            "secret": api_secret,
            "retry_schedule_seconds": [],
        })),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    // The one answer meant to carry the secret it was given; its URL is still masked.
    assert!(created.contains(&api_secret), "{created}");
    secrets.assert_absent(
        "the create answer, apart from its secret",
        &created.replace(&api_secret, "<the secret, shown once>"),
    );
    let (status, list) = call(&admin_token, reqwest::Method::GET, "/subscriptions", None).await;
    assert_eq!(status, 200);
    assert!(list.contains("hook:***@"), "URLs are shown masked: {list}");
    answers.push(list);
    let (status, masked_back) = call(
        &admin_token,
        reqwest::Method::PATCH,
        "/subscriptions/closed",
        Some(json!({"url": "http://hook:***@127.0.0.1:1/hook"})),
    )
    .await;
    assert_eq!(
        status, 400,
        "a masked URL sent back is refused: {masked_back}"
    );
    answers.push(masked_back);

    // Failing deliveries: refused target, closed port (their errors are logged at debug and
    // kept in the attempts).
    for n in 0..3 {
        publish(&db, "secrets.test", json!({ "n": n })).await;
    }
    wait_until(
        "every subscription has a failed attempt",
        DEADLINE,
        || async {
            count(
                &db,
                "SELECT count(DISTINCT d.subscription_id) FROM outbox.delivery_attempts a
               JOIN outbox.deliveries d ON d.id = a.delivery_id WHERE a.error IS NOT NULL",
            )
            .await
                >= 6
        },
    )
    .await;
    let errors: Vec<String> = db
        .client()
        .await
        .query(
            "SELECT coalesce(error, '') FROM outbox.delivery_attempts
             UNION ALL SELECT coalesce(last_error, '') FROM outbox.deliveries",
            &[],
        )
        .await
        .expect("read errors")
        .iter()
        .map(|row| row.get(0))
        .collect();
    secrets.assert_absent("delivery errors in the database", &errors.join("\n"));

    // A cut database connection: the relay logs the failures and reconnects.
    assert!(db.terminate_connections("outbox-relay%").await > 0);
    wait_for_relay_sessions(&db, 2).await;

    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("scrape /metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(metrics.contains("outbox_deliveries_total"), "{metrics}");
    secrets.assert_absent("/metrics", &metrics);

    // The CLI with the password in its URL, against the same database.
    let cli_env = [
        ("DATABASE_URL", database_url.as_str()),
        ("OUTBOX_LISTEN_DATABASE_URL", listen_url.as_str()),
        ("OUTBOX_ADMIN_TOKEN", admin_token.as_str()),
    ];
    let mut printed = Vec::new();
    for args in [
        &["status"][..],
        &["subscription", "list"],
        &["subscription", "list", "--json"],
        &["subscription", "show", "refused"],
        &["subscription", "show", "refused", "--json"],
    ] {
        let (ok, text) = run_cli(&cli_env, args).await;
        assert!(ok, "{text}");
        printed.push(text);
    }
    for masked in [
        "hook:***@10.255.255.1",
        "nats://relay:***@127.0.0.1",
        "redis://:***@127.0.0.1",
        "amqp://relay:***@127.0.0.1",
    ] {
        assert!(
            printed[1].contains(masked),
            "the list shows the URL masked as {masked}: {}",
            printed[1]
        );
    }
    let bad_url = format!("ftp://hook:{bad_target_password}@example.com/");
    let bad_broker_url = format!("amqp://u:{bad_target_password}@127.0.0.1/?exchange=e&queue=q");
    for args in [
        &["subscription", "add", "bad", "--url", &bad_url][..],
        &["subscription", "add", "bad", "--url", &bad_broker_url],
        &[
            "subscription",
            "update",
            "refused",
            "--url",
            "http://hook:***@10.255.255.1/hook",
        ],
        &["run", "--no-such-flag"],
    ] {
        let (ok, text) = run_cli(&cli_env, args).await;
        assert!(!ok, "{text}");
        printed.push(text);
    }
    // A wrong database URL, with a password, that cannot connect.
    let wrong_url = format!(
        "postgres://{role}:{wrong_db_password}@127.0.0.1:{}/nowhere",
        closed_port().await
    );
    for args in [&["status"][..], &["migrate"], &["subscription", "list"]] {
        let (ok, text) = run_cli(&[("DATABASE_URL", &wrong_url)], args).await;
        assert!(!ok, "{text}");
        printed.push(text);
    }
    // --help of every command, with every secret in the environment.
    for args in [
        &["--help"][..],
        &["migrate", "--help"],
        &["run", "--help"],
        &["subscription", "--help"],
        &["subscription", "add", "--help"],
        &["subscription", "list", "--help"],
        &["subscription", "show", "--help"],
        &["subscription", "update", "--help"],
        &["subscription", "disable", "--help"],
        &["subscription", "enable", "--help"],
        &["subscription", "remove", "--help"],
        &["subscription", "rotate-secret", "--help"],
        &["replay", "--help"],
        &["status", "--help"],
        &["demo", "--help"],
    ] {
        let (ok, text) = run_cli(&cli_env, args).await;
        assert!(ok, "{text}");
        printed.push(text);
    }
    assert!(
        printed
            .iter()
            .any(|text| text.contains("[env: DATABASE_URL]")),
        "--help names the variable without its value"
    );

    let status = relay.terminate().await;
    assert!(
        status.success(),
        "relay exit status after SIGTERM: {status}"
    );
    let relay_output = format!(
        "{}{}",
        stdout_task.await.expect("stdout reader"),
        stderr_task.await.expect("stderr reader")
    );
    // The checks below are only worth something if the output holds what they look at.
    for expected in [
        "relay started",
        "listen_database_url",
        ":***@",
        "relay stopped",
    ] {
        assert!(
            relay_output.contains(expected),
            "the relay's output lacks {expected:?}:\n{relay_output}"
        );
    }
    secrets.assert_absent("the relay's output (stdout and stderr)", &relay_output);
    secrets.assert_absent("API answers", &answers.join("\n"));
    for text in &printed {
        let (command, output) = text.split_once('\n').unwrap_or((text, ""));
        secrets.assert_absent(&format!("the CLI's output of {command}"), output);
    }

    drop(admin);
    let cleanup = db.client().await;
    cleanup
        .batch_execute(&format!("DROP OWNED BY {role}"))
        .await
        .expect("drop the role's privileges");
    cleanup
        .batch_execute(&format!("DROP ROLE {role}"))
        .await
        .expect("drop the login role");
}
