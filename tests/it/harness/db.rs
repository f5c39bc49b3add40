//! Per-test PostgreSQL databases for the integration tests.
//!
//! Owns the server the tests talk to (the one `DATABASE_URL` names, else one [`TempPostgres`]
//! per test binary), the migrated template database, and the lifecycle of each test's own
//! database: cloned from the template by [`TestDb::new`], dropped when the [`TestDb`] drops.

use std::collections::BTreeSet;
use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use outbox_relay::devkit::postgres::TempPostgres;
use tokio::sync::OnceCell;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

const TEMPLATE_PREFIX: &str = "outbox_relay_tpl_";
const TEST_DB_PREFIX: &str = "outbox_test_";
const POOL_SIZE: usize = 8;
/// A test that leaks pool objects should fail loudly instead of hanging.
const POOL_WAIT: Duration = Duration::from_secs(30);
/// Lets `terminate_connections` callers tell the harness's own pool connections apart.
const POOL_APPLICATION_NAME: &str = "outbox_relay_test_pool";
/// Serialises template builds across test binaries running in parallel against one server.
/// Advisory locks are per database, which works because all of them lock in the admin database.
const TEMPLATE_LOCK_KEY: i64 = 0x6f75_7462_6f78_7470;
/// CREATE DATABASE fails while anyone is connected to the template; the template refuses new
/// connections, but the migration session may still be exiting right after a build.
const CLONE_ATTEMPTS: u32 = 5;

/// The server every test in this binary uses, settled once.
struct Server {
    admin_url: String,
    template: String,
    /// Kept so the throwaway cluster lives as long as the test binary; the static is never
    /// dropped, and the cluster's parent-death signal shuts it down when the binary exits.
    _cluster: Option<TempPostgres>,
}

/// An error is kept (as text) rather than retried so every test reports the same cause fast.
static SERVER: OnceCell<Result<Server, String>> = OnceCell::const_new();

async fn server() -> &'static Server {
    let server = SERVER
        .get_or_init(|| async { init_server().await.map_err(|error| format!("{error:#}")) })
        .await;
    match server {
        Ok(server) => server,
        Err(error) => panic!("no PostgreSQL server for the tests: {error}"),
    }
}

async fn init_server() -> anyhow::Result<Server> {
    let (admin_url, cluster) = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => (url, None),
        _ => {
            let cluster = TempPostgres::start().await.context(
                "starting a throwaway PostgreSQL cluster (set DATABASE_URL to use a running server)",
            )?;
            (cluster.admin_url(), Some(cluster))
        }
    };
    let template = format!("{TEMPLATE_PREFIX}{:016x}", migrations_hash()?);
    ensure_template(&admin_url, &template)
        .await
        .with_context(|| format!("preparing template database {template}"))?;
    Ok(Server {
        admin_url,
        template,
        _cluster: cluster,
    })
}

/// Hashes the migration files on disk, so a template is reused across runs exactly while
/// the migrations are unchanged.
fn migrations_hash() -> anyhow::Result<u64> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut files = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry
            .file_name()
            .into_string()
            .map_err(|name| anyhow!("non-UTF-8 file name in migrations/: {name:?}"))?;
        if let Some(migration) = parse_migration_file_name(&name) {
            let contents = fs::read(entry.path())
                .with_context(|| format!("reading {}", entry.path().display()))?;
            files.push((migration, name, contents));
        }
    }
    files.sort();

    // refinery embeds the files at compile time and cargo only notices edits to files it
    // already embedded, not new ones: a stale binary would build a template without them
    // under the name of the new set.
    let on_disk: BTreeSet<_> = files
        .iter()
        .map(|(migration, _, _)| migration.clone())
        .collect();
    let embedded: BTreeSet<_> = outbox_relay::db::embedded_migrations()
        .into_iter()
        .collect();
    if on_disk != embedded {
        bail!(
            "{} holds migrations {on_disk:?} but this test binary embedded {embedded:?} when it \
             was compiled; run `cargo clean -p outbox-relay` and test again",
            dir.display()
        );
    }

    let mut hasher = DefaultHasher::new();
    for (_, name, contents) in &files {
        name.hash(&mut hasher);
        contents.hash(&mut hasher);
    }
    Ok(hasher.finish())
}

/// `V12__name.sql` to (12, "name"), for the names refinery picks up; anything else is `None`.
fn parse_migration_file_name(file_name: &str) -> Option<(i64, String)> {
    let stem = file_name
        .strip_suffix(".sql")
        .or_else(|| file_name.strip_suffix(".rs"))?;
    let rest = stem.strip_prefix('V').or_else(|| stem.strip_prefix('U'))?;
    let (version, name) = rest.split_once("__")?;
    let version = version.parse().ok()?;
    let valid_name = !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_');
    valid_name.then(|| (version, name.to_owned()))
}

async fn ensure_template(admin_url: &str, template: &str) -> anyhow::Result<()> {
    let admin = connect(admin_url).await?;
    if template_ready(&admin, template).await? {
        return Ok(());
    }
    admin
        .execute("SELECT pg_advisory_lock($1)", &[&TEMPLATE_LOCK_KEY])
        .await
        .context("taking the template advisory lock")?;
    let built = build_template_locked(&admin, admin_url, template).await;
    let unlocked = admin
        .execute("SELECT pg_advisory_unlock($1)", &[&TEMPLATE_LOCK_KEY])
        .await
        .context("releasing the template advisory lock");
    built?;
    unlocked?;
    Ok(())
}

/// A template is marked `datistemplate` only as the last step of a successful build, so an
/// unmarked one is the remains of a build that died halfway.
async fn template_ready(admin: &tokio_postgres::Client, template: &str) -> anyhow::Result<bool> {
    let row = admin
        .query_opt(
            "SELECT datistemplate FROM pg_database WHERE datname = $1",
            &[&template],
        )
        .await
        .context("looking up the template database")?;
    Ok(row.is_some_and(|row| row.get::<_, bool>(0)))
}

async fn build_template_locked(
    admin: &tokio_postgres::Client,
    admin_url: &str,
    template: &str,
) -> anyhow::Result<()> {
    // Another binary may have built it while we waited for the lock.
    if template_ready(admin, template).await? {
        return Ok(());
    }
    let quoted = quote_ident(template);
    // Two statements, not one string: a multi-statement query is one implicit transaction,
    // which neither DROP DATABASE nor CREATE DATABASE accepts.
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
        .await
        .context("dropping a half-built template database")?;
    admin
        .batch_execute(&format!("CREATE DATABASE {quoted}"))
        .await
        .context("creating the template database")?;

    let (mut client, connection) =
        tokio_postgres::connect(&with_database(admin_url, template), NoTls)
            .await
            .context("connecting to the template database")?;
    let connection = tokio::spawn(connection);
    outbox_relay::db::migrate_with(&mut client)
        .await
        .context("applying migrations to the template database")?;
    drop(client);
    // Waiting for the session to close keeps it from blocking the first clone.
    if let Ok(Err(error)) = connection.await {
        eprintln!("warning: template migration connection ended with an error: {error}");
    }

    // ALLOW_CONNECTIONS false: a stray session in the template would make every clone fail.
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {quoted} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false"
        ))
        .await
        .context("marking the template database ready")
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
    /// we connect to it to CREATE DATABASE) if set, else a TempPostgres started once per test
    /// binary, cloned from a template database migrated once per migration set.
    /// Panics with a clear message on failure.
    pub async fn new() -> TestDb {
        match Self::try_new().await {
            Ok(db) => db,
            Err(error) => panic!("could not create a test database: {error:#}"),
        }
    }

    async fn try_new() -> anyhow::Result<TestDb> {
        let server = server().await;
        let name = format!("{TEST_DB_PREFIX}{}", uuid::Uuid::new_v4().simple());
        let admin = connect(&server.admin_url).await?;
        let create = format!(
            "CREATE DATABASE {} TEMPLATE {}",
            quote_ident(&name),
            quote_ident(&server.template)
        );
        let mut attempt = 1;
        loop {
            match admin.batch_execute(&create).await {
                Ok(()) => break,
                Err(error)
                    if error.code() == Some(&SqlState::OBJECT_IN_USE)
                        && attempt < CLONE_ATTEMPTS =>
                {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => {
                    return Err(error).with_context(|| {
                        format!("creating {name} from template {}", server.template)
                    });
                }
            }
        }

        let url = with_database(&server.admin_url, &name);
        let pool = build_pool(&url)?;
        Ok(TestDb {
            url,
            name,
            pool,
            admin_url: server.admin_url.clone(),
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
            let admin = connect(&self.admin_url).await?;
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
        let drop_sql = format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(&self.name)
        );
        // Drop cannot await, and blocking on the test's own runtime would deadlock a
        // current-thread runtime, so the drop runs on a thread with a runtime of its own.
        let outcome = std::thread::Builder::new()
            .name("drop-test-db".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("building a runtime")?;
                runtime.block_on(async {
                    let admin = connect(&admin_url).await?;
                    admin
                        .batch_execute(&drop_sql)
                        .await
                        .context("DROP DATABASE")
                })
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

/// Connects and drives the connection on the current runtime.
async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            eprintln!("warning: harness connection ended with an error: {error}");
        }
    });
    Ok(client)
}

/// The same server as `url` (a postgres:// URL or a key=value string), another database.
fn with_database(url: &str, database: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            // User info cannot hold a raw '/' or '?', so the first one ends the authority.
            let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(authority_end);
            let query = tail.find('?').map_or("", |start| &tail[start..]);
            format!("{scheme}://{authority}/{database}{query}")
        }
        // In key=value strings the last dbname wins.
        None => format!("{url} dbname={database}"),
    }
}

fn quote_ident(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_database_replaces_only_the_database() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "x"),
            "postgres://u:p@h:5432/x?sslmode=disable"
        );
        assert_eq!(with_database("postgresql://h", "x"), "postgresql://h/x");
        assert_eq!(
            with_database("postgres:///db?host=/tmp", "x"),
            "postgres:///x?host=/tmp"
        );
        assert_eq!(
            with_database("host=/tmp user=postgres", "x"),
            "host=/tmp user=postgres dbname=x"
        );
    }

    #[test]
    fn parses_migration_file_names_like_refinery() {
        assert_eq!(
            parse_migration_file_name("V12__add_thing.sql"),
            Some((12, "add_thing".to_owned()))
        );
        assert_eq!(parse_migration_file_name("README.md"), None);
        assert_eq!(parse_migration_file_name("V1_missing.sql"), None);
    }
}
