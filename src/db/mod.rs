//! Database access: the connection pool, embedded migrations, and the error type every
//! component uses for database failures.
//!
//! All SQL the relay runs lives in [`sql`] and reaches the server through [`query`], which
//! knows whether pooled connections may hold prepared statements (see
//! [`PoolMode`]); the wake-up connection lives in [`listen`]. Every
//! connection, pooled or not, is made from a [`DbTarget`] that [`parse_url`] builds, so the
//! URL's TLS settings ([`tls`]) hold for all of them.

pub mod convert;
mod handle;
pub mod listen;
mod pool_mode;
pub mod query;
pub mod sql;
pub mod text;
pub mod tls;
pub mod wake_gate;

pub use handle::{Db, DbClient, DbTransaction};
pub use pool_mode::PoolMode;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::tls::MakeTlsConnect;

use self::tls::{DbTls, TlsSettings};

use crate::config::SessionLimits;

refinery::embed_migrations!("migrations");

/// `application_name` of the relay's connections, so operators (and tests) can find them
/// in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "outbox-relay";

/// Arbitrary but fixed: serialises concurrent `migrate` runs of several relays.
/// refinery's record of applied migrations.
pub const MIGRATION_TABLE: &str = "outbox.schema_history";

const MIGRATION_LOCK_KEY: i64 = 0x6f75_7462_6f78; // "outbox"

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{context}: no database connection available")]
    Pool {
        context: &'static str,
        #[source]
        source: deadpool_postgres::PoolError,
    },
    #[error("{context}")]
    Query {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("invalid DATABASE_URL")]
    Url(#[source] tokio_postgres::Error),
    #[error("TLS settings of the database URL")]
    Tls(#[source] tls::TlsError),
    #[error("building the connection pool")]
    Build(#[source] deadpool_postgres::BuildError),
    #[error("applying migrations")]
    Migrate(#[source] refinery::Error),
}

impl DbError {
    /// The SQLSTATE the server answered with, when the server did answer.
    pub fn sqlstate(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            DbError::Query { source, .. } => source.code(),
            _ => None,
        }
    }

    /// Whether the server refused the statement because of the values it was given: the
    /// same statement with other rows would succeed. Data exceptions (class 22), integrity
    /// violations (23) and program limits (54).
    pub fn is_refused_data(&self) -> bool {
        self.sqlstate().is_some_and(|code| {
            let code = code.code();
            code.starts_with("22") || code.starts_with("23") || code.starts_with("54")
        })
    }

    /// Whether the statement gave up waiting: a lock not granted within `lock_timeout`
    /// (55P03) or the statement cancelled by `statement_timeout` (57014). Often one row held
    /// by another session (say, one left idle in a transaction); the same statement
    /// without that row would go through.
    pub fn is_wait_timeout(&self) -> bool {
        self.sqlstate()
            .is_some_and(|code| matches!(code.code(), "55P03" | "57014"))
    }
}

/// Attaches what we were doing to a database error.
pub trait DbContext<T> {
    fn context(self, context: &'static str) -> Result<T, DbError>;
}

impl<T> DbContext<T> for Result<T, tokio_postgres::Error> {
    fn context(self, context: &'static str) -> Result<T, DbError> {
        self.map_err(|source| DbError::Query { context, source })
    }
}

impl<T> DbContext<T> for Result<T, deadpool_postgres::PoolError> {
    fn context(self, context: &'static str) -> Result<T, DbError> {
        self.map_err(|source| DbError::Pool { context, source })
    }
}

/// Where and how to connect: tokio-postgres's settings plus the TLS connector built from
/// the URL's `sslmode`, `sslrootcert`, `sslcert` and `sslkey`.
pub struct DbTarget {
    pub config: tokio_postgres::Config,
    pub tls: DbTls,
}

/// The connection object of a [`DbTarget`]'s connections.
pub type DbConnection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    <DbTls as MakeTlsConnect<tokio_postgres::Socket>>::Stream,
>;

impl DbTarget {
    /// One connection; the caller spawns (or polls) the connection object.
    pub async fn connect(
        &self,
    ) -> Result<(tokio_postgres::Client, DbConnection), tokio_postgres::Error> {
        self.config.connect(self.tls.clone()).await
    }
}

/// Parses `DATABASE_URL` (a URL or a libpq `key=value` string), reads the certificate files
/// it names, and names the connections `outbox-relay` unless the URL names them.
pub fn parse_url(database_url: &str) -> Result<DbTarget, DbError> {
    let (rest, tls_params) = tls::split_tls_params(database_url);
    let tls_settings =
        TlsSettings::from_params(&tls_params, tls::home_root_cert()).map_err(DbError::Tls)?;
    let mut config: tokio_postgres::Config = rest.parse().map_err(DbError::Url)?;
    config.ssl_mode(tls_settings.tokio_postgres_mode());
    if config.get_application_name().is_none() {
        config.application_name(APPLICATION_NAME);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    let tls = tls_settings.connector().map_err(DbError::Tls)?;
    Ok(DbTarget { config, tls })
}

/// A pool that never blocks forever: waiting for a connection, or for a new one to be
/// made while the database is down, gives up after a few seconds so callers can report
/// not-ready and retry with backoff.
///
/// `limits`, when given, become `statement_timeout`, `lock_timeout` and (if asked)
/// `synchronous_commit = off` through the startup `options`, so they hold from the first
/// statement of every connection at no extra round trip. Pass `None` through a transaction-mode pooler (which refuses startup options);
/// nothing else here sets session state, and whether statements may be prepared is the
/// caller's [`PoolMode`], applied by [`query`].
pub fn connect_pool(
    database_url: &str,
    max_size: usize,
    limits: Option<SessionLimits>,
) -> Result<Pool, DbError> {
    let DbTarget { mut config, tls } = parse_url(database_url)?;
    if let Some(limits) = limits {
        let mut options = config.get_options().unwrap_or_default().to_string();
        for (name, value) in [
            ("statement_timeout", limits.statement_timeout),
            ("lock_timeout", limits.lock_timeout),
        ] {
            if !options.is_empty() {
                options.push(' ');
            }
            options.push_str(&format!("-c {name}={}", value.as_millis().max(1)));
        }
        if limits.async_commit {
            options.push_str(" -c synchronous_commit=off");
        }
        config.options(&options);
    }
    let manager = Manager::from_config(
        config,
        tls,
        ManagerConfig {
            // Verified recycling costs a round trip per checkout; a broken connection is
            // instead noticed by the failing query and dropped by deadpool.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(DbError::Build)
}

/// Applies the embedded migrations. Idempotent, and safe when several relays start at
/// once: they take turns under an advisory lock.
///
/// `database_url` must reach PostgreSQL directly (or through a session-mode pooler): the
/// lock is session-scoped, and refinery prepares statements, neither of which survives a
/// transaction-mode pooler.
pub async fn migrate(database_url: &str) -> Result<refinery::Report, DbError> {
    let (mut client, connection) = parse_url(database_url)?
        .connect()
        .await
        .context("connecting to run migrations")?;
    let connection_task = tokio::spawn(connection);
    let report = migrate_with(&mut client).await;
    drop(client);
    let _ = connection_task.await;
    report
}

/// [`migrate`] on a connection the caller already has (the test harness uses this).
pub async fn migrate_with(
    client: &mut tokio_postgres::Client,
) -> Result<refinery::Report, DbError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .context("waiting for the migration lock")?;
    // refinery creates its history table before the first migration runs, and it belongs
    // with everything else in the outbox schema.
    let result = match client
        .batch_execute("CREATE SCHEMA IF NOT EXISTS outbox")
        .await
        .context("creating schema outbox")
    {
        Ok(()) => migrations::runner()
            .set_migration_table_name(MIGRATION_TABLE)
            .run_async(client)
            .await
            .map_err(DbError::Migrate),
        Err(error) => Err(error),
    };
    // The lock is session-scoped, so a dropped connection releases it even if this fails.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    result
}

/// (version, name) of each embedded migration, oldest first.
pub fn embedded_migrations() -> Vec<(i64, String)> {
    let mut embedded: Vec<(i64, String)> = migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| (i64::from(m.version()), m.name().to_owned()))
        .collect();
    embedded.sort();
    embedded
}
