//! TLS to PostgreSQL against a real TLS server: a throwaway cluster of its own (whether or
//! not `DATABASE_URL` is set), with `ssl = on`, a CA and certificates generated here, and a
//! `pg_hba.conf` that takes user `postgres` over TLS only, `certuser` by client certificate
//! only, and `plainok` in plain text or TLS.
//!
//! The server certificate names `db.test` only, not 127.0.0.1: connecting to 127.0.0.1
//! is the wrong host name, and `db.test` with `hostaddr=127.0.0.1` is the right one, all on
//! loopback and independent of this machine's name or certificates.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use outbox_relay::config::RelayConfig;
use outbox_relay::devkit::postgres::{ClusterSetup, TempPostgres};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use serde_json::json;
use testkit::receiver::Receiver;
use tokio::sync::OnceCell;

use crate::harness::relay::{DEADLINE, wait_until, wait_until_ready};

/// The only name in the server certificate.
const SERVER_NAME: &str = "db.test";
/// A password in the URLs (trust auth ignores it) that must never show in an error.
const PASSWORD: &str = "tls-test-pw-9f2c";

struct TlsCluster {
    cluster: TempPostgres,
    /// Holds the CA files and the client certificate and key.
    files: tempfile::TempDir,
}

impl TlsCluster {
    fn path(&self, name: &str) -> PathBuf {
        self.files.path().join(name)
    }

    /// `postgres://user:pw@host:port/database?params`, always to 127.0.0.1 (as `hostaddr`
    /// when `host` is a name).
    fn url(&self, user: &str, host: &str, database: &str, params: &[(&str, &str)]) -> String {
        let mut query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if host != "127.0.0.1" {
            query.push("hostaddr=127.0.0.1".into());
        }
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{}", query.join("&"))
        };
        format!(
            "postgres://{user}:{PASSWORD}@{host}:{}/{database}{query}",
            self.cluster.port()
        )
    }

    /// verify-full with the right host name and the trusted CA: what production looks like.
    fn verified_url(&self, database: &str) -> String {
        let ca = self.path("ca.pem");
        self.url(
            "postgres",
            SERVER_NAME,
            database,
            &[
                ("sslmode", "verify-full"),
                ("sslrootcert", &ca.to_string_lossy()),
            ],
        )
    }
}

static CLUSTER: OnceCell<Result<TlsCluster, String>> = OnceCell::const_new();

async fn cluster() -> &'static TlsCluster {
    let cluster = CLUSTER
        .get_or_init(|| async { start_cluster().await.map_err(|error| format!("{error:#}")) })
        .await;
    match cluster {
        Ok(cluster) => cluster,
        Err(error) => panic!("no TLS cluster for the tests: {error}"),
    }
}

async fn start_cluster() -> anyhow::Result<TlsCluster> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "outbox-relay test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params.clone(), ca_key)?;
    // Same name, different key: what an attacker's (or another environment's) CA looks like.
    let other_ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let server_key = KeyPair::generate()?;
    let mut server_params = CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, SERVER_NAME);
    let server_cert = server_params.signed_by(&server_key, &ca)?;

    // cert auth maps the certificate's CN to the database user.
    let client_key = KeyPair::generate()?;
    let mut client_params = CertificateParams::new(Vec::<String>::new())?;
    client_params
        .distinguished_name
        .push(DnType::CommonName, "certuser");
    let client_cert = client_params.signed_by(&client_key, &ca)?;

    let files = tempfile::tempdir()?;
    let write = |name: &str, contents: &str| {
        std::fs::write(files.path().join(name), contents)
            .map_err(|error| anyhow::anyhow!("writing {name}: {error}"))
    };
    write("ca.pem", &ca.pem())?;
    write("other-ca.pem", &other_ca.pem())?;
    write("client.pem", &client_cert.pem())?;
    write("client.key", &client_key.serialize_pem())?;

    let setup = ClusterSetup {
        settings: vec![
            ("ssl".into(), "on".into()),
            ("ssl_ca_file".into(), "root.crt".into()),
        ],
        data_files: vec![
            ("server.crt".into(), server_cert.pem().into_bytes()),
            ("server.key".into(), server_key.serialize_pem().into_bytes()),
            ("root.crt".into(), ca.pem().into_bytes()),
        ],
        hba: Some(
            "local all all trust\n\
             hostssl all certuser 127.0.0.1/32 cert\n\
             hostssl all postgres 127.0.0.1/32 trust\n\
             host all plainok 127.0.0.1/32 trust\n"
                .into(),
        ),
    };
    let cluster = TempPostgres::start_with(setup).await?;
    let tls = TlsCluster { cluster, files };
    let admin = connect(&tls.verified_url("postgres"))
        .await
        .map_err(|error| anyhow::anyhow!("connecting as postgres over TLS: {error}"))?;
    admin
        .batch_execute("CREATE ROLE certuser LOGIN; CREATE ROLE plainok LOGIN")
        .await?;
    Ok(tls)
}

/// Connects through the relay's own connection code (`db::parse_url`), as every relay
/// connection does; the error is the whole cause chain, as an operator would see it.
async fn connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let target = outbox_relay::db::parse_url(url).map_err(|error| chain(&error))?;
    let (client, connection) = tokio::time::timeout(DEADLINE, target.connect())
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|error| chain(&error))?;
    tokio::spawn(connection);
    Ok(client)
}

fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Whether this session is encrypted, and as whom, by the server's account.
async fn session(client: &tokio_postgres::Client) -> (bool, String) {
    let row = client
        .query_one(
            "SELECT ssl, current_user::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("read pg_stat_ssl");
    (row.get(0), row.get(1))
}

/// Connecting must fail, and say it is a certificate problem, naming host and settings.
fn assert_certificate_refused(
    result: Result<tokio_postgres::Client, String>,
    host: &str,
) -> String {
    let error = match result {
        Ok(_) => panic!("connected although the certificate should have been refused"),
        Err(error) => error,
    };
    assert!(
        error.contains(&format!("TLS certificate verification failed for {host}")),
        "not reported as a certificate problem: {error}"
    );
    assert!(!error.contains(PASSWORD), "the password leaked: {error}");
    error
}

/// The everyday production setting: the right host name on a certificate from a trusted CA.
#[tokio::test]
async fn verify_full_accepts_a_certificate_for_the_host_name() {
    let tls = cluster().await;
    let client = connect(&tls.verified_url("postgres"))
        .await
        .expect("verify-full connects");
    assert_eq!(session(&client).await, (true, "postgres".into()));
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_for_another_host_name() {
    let tls = cluster().await;
    let ca = tls.path("ca.pem");
    let ca = ca.to_string_lossy();
    let url = tls.url(
        "postgres",
        "127.0.0.1",
        "postgres",
        &[("sslmode", "verify-full"), ("sslrootcert", &ca)],
    );
    let error = assert_certificate_refused(connect(&url).await, "127.0.0.1");
    assert!(
        error.contains("sslmode=verify-full") && error.contains(&format!("sslrootcert={ca}")),
        "the error should name the settings that refused it: {error}"
    );
}

/// verify-ca checks the chain and nothing else, as libpq does: any host name goes.
#[tokio::test]
async fn verify_ca_accepts_a_trusted_chain_for_any_host_name() {
    let tls = cluster().await;
    let ca = tls.path("ca.pem");
    let url = tls.url(
        "postgres",
        "127.0.0.1",
        "postgres",
        &[
            ("sslmode", "verify-ca"),
            ("sslrootcert", &ca.to_string_lossy()),
        ],
    );
    let client = connect(&url).await.expect("verify-ca connects");
    assert_eq!(session(&client).await, (true, "postgres".into()));
}

/// A certificate from a CA we were not told to trust is refused in every mode that checks
/// one, `require` with a root file included (libpq then checks the chain too).
#[tokio::test]
async fn a_certificate_from_an_untrusted_ca_is_refused() {
    let tls = cluster().await;
    let other_ca = tls.path("other-ca.pem");
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = tls.url(
            "postgres",
            SERVER_NAME,
            "postgres",
            &[
                ("sslmode", mode),
                ("sslrootcert", &other_ca.to_string_lossy()),
            ],
        );
        let error = assert_certificate_refused(connect(&url).await, SERVER_NAME);
        assert!(
            error.contains(&format!("sslmode={mode}")),
            "{mode}: {error}"
        );
    }
}

/// A refused certificate ends the attempt: no retry in plain text, even where the server
/// would take plain text (user `plainok`) and even in `prefer` (with a root file).
#[tokio::test]
async fn a_refused_certificate_never_falls_back_to_plain_text() {
    let tls = cluster().await;
    let plain = connect(&tls.url(
        "plainok",
        "127.0.0.1",
        "postgres",
        &[("sslmode", "disable")],
    ))
    .await
    .expect("plainok may connect in plain text");
    assert_eq!(session(&plain).await, (false, "plainok".into()));

    let other_ca = tls.path("other-ca.pem");
    for mode in ["verify-full", "verify-ca", "require", "prefer"] {
        let url = tls.url(
            "plainok",
            SERVER_NAME,
            "postgres",
            &[
                ("sslmode", mode),
                ("sslrootcert", &other_ca.to_string_lossy()),
            ],
        );
        assert_certificate_refused(connect(&url).await, SERVER_NAME);
    }
}

/// `require` encrypts without checking the certificate, and `prefer` (the default) uses
/// TLS whenever the server offers it.
#[tokio::test]
async fn require_and_prefer_encrypt_without_a_root_file() {
    let tls = cluster().await;
    for params in [&[("sslmode", "require")][..], &[("sslmode", "prefer")], &[]] {
        let url = tls.url("plainok", "127.0.0.1", "postgres", params);
        let client = connect(&url)
            .await
            .unwrap_or_else(|error| panic!("{params:?}: {error}"));
        assert_eq!(
            session(&client).await,
            (true, "plainok".into()),
            "{params:?}"
        );
    }
}

/// `disable` never starts TLS, so a TLS-only server refuses it.
#[tokio::test]
async fn disable_is_refused_by_a_tls_only_server() {
    let tls = cluster().await;
    let url = tls.url(
        "postgres",
        "127.0.0.1",
        "postgres",
        &[("sslmode", "disable")],
    );
    let Err(error) = connect(&url).await else {
        panic!("plain text should be refused");
    };
    assert!(
        error.contains("no encryption"),
        "expected the server's pg_hba refusal: {error}"
    );
    assert!(!error.contains(PASSWORD), "the password leaked: {error}");
}

/// `cert` authentication: the client certificate is the credential.
#[tokio::test]
async fn a_client_certificate_authenticates() {
    let tls = cluster().await;
    let ca = tls.path("ca.pem");
    let cert = tls.path("client.pem");
    let key = tls.path("client.key");
    let mut params = vec![
        ("sslmode", "verify-full".to_owned()),
        ("sslrootcert", ca.to_string_lossy().into_owned()),
    ];
    let url = |params: &[(&str, String)]| {
        let params: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
        tls.url("certuser", SERVER_NAME, "postgres", &params)
    };
    let Err(error) = connect(&url(&params)).await else {
        panic!("without a client certificate cert auth should refuse");
    };
    assert!(error.contains("certificate"), "{error}");

    params.push(("sslcert", cert.to_string_lossy().into_owned()));
    params.push(("sslkey", key.to_string_lossy().into_owned()));
    let client = connect(&url(&params))
        .await
        .expect("the client certificate authenticates");
    assert_eq!(session(&client).await, (true, "certuser".into()));
}

/// The same settings in libpq's `key=value` form.
#[tokio::test]
async fn key_value_connection_strings_carry_the_tls_settings() {
    let tls = cluster().await;
    let ca = tls.path("ca.pem");
    let port = tls.cluster.port();
    let right = format!(
        "host={SERVER_NAME} hostaddr=127.0.0.1 port={port} user=postgres password={PASSWORD} \
         dbname=postgres sslmode=verify-full sslrootcert='{}'",
        ca.display()
    );
    let client = connect(&right)
        .await
        .expect("key=value verify-full connects");
    assert_eq!(session(&client).await, (true, "postgres".into()));
    let wrong = format!(
        "host=127.0.0.1 port={port} user=postgres password={PASSWORD} dbname=postgres \
         sslmode=verify-full sslrootcert='{}'",
        ca.display()
    );
    assert_certificate_refused(connect(&wrong).await, "127.0.0.1");
}

async fn fresh_database(tls: &TlsCluster) -> String {
    let name = format!("tls_{}", uuid::Uuid::new_v4().simple());
    let admin = connect(&tls.verified_url("postgres"))
        .await
        .expect("admin connection");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    name
}

/// A relay given a verify-full URL migrates, connects its pool, LISTEN and wake-up gate
/// sessions over TLS (the server takes nothing else from `postgres`) and delivers.
#[tokio::test]
async fn a_relay_with_a_verify_full_url_delivers_over_tls() {
    let tls = cluster().await;
    let database = fresh_database(tls).await;
    let url = tls.verified_url(&database);
    outbox_relay::db::migrate(&url)
        .await
        .expect("migrate over TLS");

    let receiver = Receiver::start().await.expect("receiver");
    let client = connect(&url).await.expect("test connection");
    client
        .execute(
            "INSERT INTO outbox.subscriptions (name, url) VALUES ('tls-crm', $1)",
            &[&receiver.url("/hook")],
        )
        .await
        .expect("subscription");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind relay HTTP");
    let relay = outbox_relay::relay::start(RelayConfig::for_tests(), &url, listener)
        .await
        .expect("relay starts");
    wait_until_ready("the relay over TLS is ready", &relay.health).await;

    client
        .execute(
            "SELECT outbox.publish('lead.created', $1)",
            &[&json!({"lead_id": 7})],
        )
        .await
        .expect("publish");
    let received = receiver
        .wait_for("/hook", 1, DEADLINE)
        .await
        .expect("the event arrives");
    assert_eq!(
        received[0].json()["data"]["lead_id"],
        json!(7),
        "{:?}",
        received[0].json()
    );

    // Every kind of session the relay opens is there, and encrypted.
    let sessions = "SELECT a.application_name, s.ssl FROM pg_stat_activity a
                      JOIN pg_stat_ssl s USING (pid)
                     WHERE a.datname = current_database() AND a.application_name LIKE 'outbox-relay%'";
    wait_until(
        "the relay's pool, LISTEN and gate sessions are all connected",
        DEADLINE,
        || async {
            let rows = client.query(sessions, &[]).await.expect("sessions");
            let names: std::collections::BTreeSet<String> =
                rows.iter().map(|row| row.get(0)).collect();
            [
                "outbox-relay",
                "outbox-relay-listen",
                "outbox-relay-wake-gate",
            ]
            .iter()
            .all(|name| names.contains(*name))
        },
    )
    .await;
    for row in client.query(sessions, &[]).await.expect("sessions") {
        let (name, ssl): (String, bool) = (row.get(0), row.get(1));
        assert!(ssl, "{name} is not encrypted");
    }
    relay.shutdown().await;
}

struct Run {
    success: bool,
    stdout: String,
    stderr: String,
}

async fn run_cli(database_url: &str, args: &[&str]) -> Run {
    let output = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .args(args)
            .env("DATABASE_URL", database_url)
            .env("RUST_LOG", "warn")
            // libpq's default root file must not change what these URLs mean.
            .env("HOME", Path::new("/nonexistent"))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("outbox-relay {args:?} did not finish"))
    .expect("run the outbox-relay binary");
    Run {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The CLI connects with the URL's TLS settings too, and a refused certificate is reported
/// as such, without the password.
#[tokio::test]
async fn cli_commands_use_the_tls_settings() {
    let tls = cluster().await;
    let database = fresh_database(tls).await;
    let url = tls.verified_url(&database);
    for args in [&["migrate"][..], &["status"], &["subscription", "list"]] {
        let run = run_cli(&url, args).await;
        assert!(
            run.success,
            "outbox-relay {args:?} over verify-full failed\nstdout:\n{}\nstderr:\n{}",
            run.stdout, run.stderr
        );
    }

    let ca = tls.path("ca.pem");
    let wrong_host = tls.url(
        "postgres",
        "127.0.0.1",
        &database,
        &[
            ("sslmode", "verify-full"),
            ("sslrootcert", &ca.to_string_lossy()),
        ],
    );
    for args in [&["migrate"][..], &["status"]] {
        let run = run_cli(&wrong_host, args).await;
        assert!(!run.success, "{args:?} connected to the wrong host name");
        assert!(
            run.stderr
                .contains("TLS certificate verification failed for 127.0.0.1"),
            "{args:?}: not reported as a certificate problem:\n{}",
            run.stderr
        );
        assert!(
            !run.stderr.contains(PASSWORD) && !run.stdout.contains(PASSWORD),
            "{args:?}: the password leaked:\n{}{}",
            run.stdout,
            run.stderr
        );
    }
}
