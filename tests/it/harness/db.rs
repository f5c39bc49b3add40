//! Per-test PostgreSQL databases for the integration tests.
//!
//! Owns the server this test binary talks to (the one `DATABASE_URL` names, else one
//! throwaway cluster per binary) and the lifecycle of each test's own database: cloned from
//! the migrated template by [`TestDb::new`], dropped when the [`TestDb`] drops. The server,
//! the template and cloning are `testkit::pg`'s, shared with the benchmark.

use std::time::Duration;

use anyhow::{Context, anyhow};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use testkit::pg::{self, Server};
use tokio::sync::OnceCell;
use tokio_postgres::NoTls;

const TEST_DB_PREFIX: &str = "outbox_test_";
const POOL_SIZE: usize = 8;
/// A test that leaks pool objects should fail loudly instead of hanging.
const POOL_WAIT: Duration = Duration::from_secs(30);
/// Lets `terminate_connections` callers tell the harness's own pool connections apart.
const POOL_APPLICATION_NAME: &str = "outbox_relay_test_pool";

/// The server every test in this binary uses, settled once, with its template database.
/// The static is never dropped, so a throwaway cluster lives as long as the test binary;
/// its parent-death signal shuts it down when the binary exits.
struct TestServer {
    server: Server,
    template: String,
}

/// An error is kept (as text) rather than retried so every test reports the same cause fast.
static SERVER: OnceCell<Result<TestServer, String>> = OnceCell::const_new();

async fn server() -> &'static TestServer {
    let server = SERVER
        .get_or_init(|| async { init_server().await.map_err(|error| format!("{error:#}")) })
        .await;
    match server {
        Ok(server) => server,
        Err(error) => panic!("no PostgreSQL server for the tests: {error}"),
    }
}

async fn init_server() -> anyhow::Result<TestServer> {
    let url = std::env::var("DATABASE_URL")
        .ok()
        .filter(|url| !url.trim().is_empty());
    let server = Server::start(url.as_deref())
        .await
        .context("DATABASE_URL is not set (set it to use a running server)")?;
    let template = server.template().await?;
    Ok(TestServer { server, template })
}

/// A fresh, migrated database for one test, dropped (forcibly) when this value drops.
pub struct TestDb {
    pub url: String,
    pub name: String,
    pool: Pool,
    admin_url: String,
}

impl TestDb {
    /// A fresh, migrated database for one test. Uses DATABASE_URL (any database on the server;
    /// we connect to it to CREATE DATABASE) if set, else a throwaway cluster started once per
    /// test binary, cloned from a template database migrated once per migration set.
    /// Panics with a clear message on failure.
    pub async fn new() -> TestDb {
        match Self::try_new().await {
            Ok(db) => db,
            Err(error) => panic!("could not create a test database: {error:#}"),
        }
    }

    async fn try_new() -> anyhow::Result<TestDb> {
        let TestServer { server, template } = server().await;
        let name = format!("{TEST_DB_PREFIX}{}", uuid::Uuid::new_v4().simple());
        let url = server.create_database(&name, template).await?;
        let pool = build_pool(&url)?;
        Ok(TestDb {
            url,
            name,
            pool,
            admin_url: server.admin_url().to_owned(),
        })
    }

    /// Pool to this test database (at most 8 connections).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub async fn client(&self) -> deadpool_postgres::Object {
        match self.pool.get().await {
            Ok(client) => client,
            Err(error) => panic!("no connection to test database {}: {error}", self.name),
        }
    }

    /// URL of a maintenance database on the same server (for pg_terminate_backend etc.).
    pub fn server_admin_url(&self) -> String {
        self.admin_url.clone()
    }

    /// Terminates the connections to this test database whose application_name is LIKE the
    /// pattern, to simulate a dropped network; returns how many it terminated. Waits (up to
    /// 5 s each) until they are really gone, so the test can rely on it (PostgreSQL 14+).
    pub async fn terminate_connections(&self, application_name_like: &str) -> u64 {
        let terminated = async {
            let admin = pg::connect(&self.admin_url).await?;
            let row = admin
                .query_one(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) \
                     FROM pg_stat_activity \
                     WHERE datname = $1 AND application_name LIKE $2 AND pid <> pg_backend_pid()",
                    &[&self.name, &application_name_like],
                )
                .await
                .context("pg_terminate_backend")?;
            let count: i64 = row.get(0);
            anyhow::Ok(count.unsigned_abs())
        }
        .await;
        match terminated {
            Ok(count) => count,
            Err(error) => panic!(
                "terminating connections to {} named like {application_name_like:?}: {error:#}",
                self.name
            ),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        self.pool.close();
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop cannot await, and blocking on the test's own runtime would deadlock a
        // current-thread runtime, so the drop runs on a thread with a runtime of its own.
        let outcome = std::thread::Builder::new()
            .name("drop-test-db".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("building a runtime")?;
                runtime.block_on(pg::drop_database(&admin_url, &name))
            })
            .context("spawning the drop thread")
            .and_then(|thread| {
                thread
                    .join()
                    .map_err(|_| anyhow!("the drop thread panicked"))?
            });
        if let Err(error) = outcome {
            eprintln!(
                "warning: could not drop test database {}: {error:#}",
                self.name
            );
        }
    }
}

impl std::fmt::Debug for TestDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDb")
            .field("url", &self.url)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn build_pool(url: &str) -> anyhow::Result<Pool> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .with_context(|| format!("parsing test database URL {url}"))?;
    config.application_name(POOL_APPLICATION_NAME);
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(POOL_SIZE)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT))
        .build()
        .context("building the test database pool")
}
