//! PostgreSQL for the integration tests and the benchmark: the server they use (the one a
//! URL names, else a throwaway [`TempPostgres`]), the template database that holds the
//! current migrations (built once per migration set and server), and fresh databases cloned
//! from it and dropped afterwards.

use std::collections::BTreeSet;
use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use outbox_relay::devkit::postgres::TempPostgres;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

const TEMPLATE_PREFIX: &str = "outbox_relay_tpl_";
/// Serialises template builds across test binaries running in parallel against one server.
/// Advisory locks are per database, which works because all of them lock in the admin database.
const TEMPLATE_LOCK_KEY: i64 = 0x6f75_7462_6f78_7470;
/// CREATE DATABASE fails while anyone is connected to the template; the template refuses new
/// connections, but the migration session may still be exiting right after a build.
const CLONE_ATTEMPTS: u32 = 5;
/// Long enough for a server under a full test run; a server that is not there fails fast.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The server a test binary or a benchmark run creates its databases on.
pub struct Server {
    admin_url: String,
    /// A throwaway cluster, when no URL was given; it lives as long as this value.
    cluster: Option<TempPostgres>,
}

impl Server {
    /// The server `database_url` names (any database on it: databases are created from
    /// there), else a throwaway cluster started now.
    pub async fn start(database_url: Option<&str>) -> anyhow::Result<Server> {
        match database_url {
            Some(url) => Ok(Server {
                admin_url: url.to_owned(),
                cluster: None,
            }),
            None => {
                let cluster = TempPostgres::start()
                    .await
                    .context("starting a throwaway PostgreSQL cluster")?;
                Ok(Server {
                    admin_url: cluster.admin_url(),
                    cluster: Some(cluster),
                })
            }
        }
    }

    /// A URL of a maintenance database on this server.
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    pub fn is_throwaway(&self) -> bool {
        self.cluster.is_some()
    }

    /// Stops the throwaway cluster, if this server is one.
    pub async fn stop(self) -> anyhow::Result<()> {
        match self.cluster {
            Some(cluster) => cluster.stop().await,
            None => Ok(()),
        }
    }

    /// The name of the template database holding the migrations on disk, built now unless
    /// a ready one is there (from an earlier run, or another binary running beside this one).
    pub async fn template(&self) -> anyhow::Result<String> {
        let template = format!("{TEMPLATE_PREFIX}{:016x}", migrations_hash()?);
        ensure_template(&self.admin_url, &template)
            .await
            .with_context(|| format!("preparing template database {template}"))?;
        Ok(template)
    }

    /// Creates database `name` as a copy of `template` and returns its URL.
    pub async fn create_database(&self, name: &str, template: &str) -> anyhow::Result<String> {
        let admin = connect(&self.admin_url).await?;
        let create = format!(
            "CREATE DATABASE {} TEMPLATE {}",
            quote_ident(name),
            quote_ident(template)
        );
        let mut attempt = 1;
        loop {
            match admin.batch_execute(&create).await {
                Ok(()) => return Ok(with_database(&self.admin_url, name)),
                Err(error)
                    if error.code() == Some(&SqlState::OBJECT_IN_USE)
                        && attempt < CLONE_ATTEMPTS =>
                {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => {
                    return Err(error)
                        .with_context(|| format!("creating {name} from template {template}"));
                }
            }
        }
    }

    /// Drops database `name`, whoever is still connected to it.
    pub async fn drop_database(&self, name: &str) -> anyhow::Result<()> {
        drop_database(&self.admin_url, name).await
    }
}

/// Drops database `name` on the server of `admin_url`, whoever is still connected to it.
pub async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    connect(admin_url)
        .await?
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(name)
        ))
        .await
        .with_context(|| format!("dropping database {name}"))
}

/// Hashes the migration files on disk, so a template is reused across runs exactly while
/// the migrations are unchanged.
fn migrations_hash() -> anyhow::Result<u64> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations");
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
            "{} holds migrations {on_disk:?} but this binary embedded {embedded:?} when it \
             was compiled; run `cargo clean -p outbox-relay` and build again",
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

/// Connects and drives the connection on the current runtime. The connection's own end is
/// not reported: it is usually a DROP DATABASE … WITH (FORCE) closing it on purpose.
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) =
        tokio::time::timeout(CONNECT_TIMEOUT, tokio_postgres::connect(url, NoTls))
            .await
            .map_err(|_| anyhow!("connecting to PostgreSQL timed out after {CONNECT_TIMEOUT:?}"))?
            .context("connecting to PostgreSQL")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The same server as `url` (a postgres:// URL or a key=value string), another database.
pub fn with_database(url: &str, database: &str) -> String {
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

/// `url` with extra connection parameters (`user`, `application_name`, ...), which
/// override what the URL says; for URLs and key=value strings alike.
pub fn with_params(url: &str, params: &[(&str, &str)]) -> String {
    let pairs = params.iter().map(|(key, value)| format!("{key}={value}"));
    if !url.contains("://") {
        return format!("{url} {}", pairs.collect::<Vec<_>>().join(" "));
    }
    let joiner = if url.contains('?') { '&' } else { '?' };
    format!("{url}{joiner}{}", pairs.collect::<Vec<_>>().join("&"))
}

pub fn quote_ident(identifier: &str) -> String {
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
