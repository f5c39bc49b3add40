//! The database server a run uses, one fresh database per scenario, and asking it whether the
//! relay is done.

use super::*;

pub(super) struct Server {
    pub(super) admin_url: String,
    pub(super) cluster: Option<TempPostgres>,
}

pub(super) struct BenchDb {
    pub(super) name: String,
    pub(super) url: String,
}

impl Server {
    pub(super) async fn start(database_url: Option<&str>) -> anyhow::Result<Server> {
        match database_url {
            Some(url) => Ok(Server {
                admin_url: url.to_string(),
                cluster: None,
            }),
            None => {
                let cluster = TempPostgres::start()
                    .await
                    .context("starting a throwaway PostgreSQL cluster (or pass --database-url)")?;
                Ok(Server {
                    admin_url: cluster.admin_url(),
                    cluster: Some(cluster),
                })
            }
        }
    }

    pub(super) fn is_throwaway(&self) -> bool {
        self.cluster.is_some()
    }

    pub(super) async fn fresh_db(&self) -> anyhow::Result<BenchDb> {
        let name = format!("outbox_bench_{:012x}", random_u64() & 0xffff_ffff_ffff);
        let admin = connect(&self.admin_url).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name)))
            .await
            .with_context(|| format!("creating database {name}"))?;
        let url = with_database(&self.admin_url, &name);
        outbox_relay::db::migrate(&url)
            .await
            .with_context(|| format!("migrating database {name}"))?;
        Ok(BenchDb { name, url })
    }

    pub(super) async fn drop_db(&self, db: BenchDb, keep: bool) {
        if keep {
            eprintln!("  kept database {} ({})", db.name, db.url);
            return;
        }
        let result = async {
            let admin = connect(&self.admin_url).await?;
            admin
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    quote_ident(&db.name)
                ))
                .await
                .with_context(|| format!("dropping database {}", db.name))
        }
        .await;
        if let Err(error) = result {
            eprintln!("warning: {error:#}");
        }
    }

    pub(super) async fn stop(self) {
        if let Some(cluster) = self.cluster
            && let Err(error) = cluster.stop().await
        {
            eprintln!("warning: stopping the throwaway cluster: {error:#}");
        }
    }
}

pub(super) fn random_u64() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.finish()
}

pub(super) fn quote_ident(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// Replaces the database of a URL (`postgres://…/db?…`) or key=value string.
pub(super) fn with_database(url: &str, database: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(authority_end);
            let query = tail.find('?').map_or("", |start| &tail[start..]);
            format!("{scheme}://{authority}/{database}{query}")
        }
        None => format!("{url} dbname={database}"),
    }
}

pub(super) async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) =
        tokio::time::timeout(Duration::from_secs(10), tokio_postgres::connect(url, NoTls))
            .await
            .map_err(|_| anyhow!("connecting to PostgreSQL timed out after 10s"))?
            .context("connecting to PostgreSQL")?;
    // Errors here are the connection closing (e.g. DROP DATABASE … WITH (FORCE)): not ours to report.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

// ---------------------------------------------------------------------------------------------
// Relay, subscriptions, events
// ---------------------------------------------------------------------------------------------

/// Polls the database until every event is dispatched and no delivery is pending, failing or
/// in flight, then checks that exactly `expected` deliveries were delivered.
pub(super) async fn wait_all_delivered(
    client: &tokio_postgres::Client,
    expected: u64,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> anyhow::Result<()> {
    // Separate counts so each walks a partial index: this runs every DB_POLL while the relay
    // works, and must cost next to nothing. `dispatched_at IS NULL` alone matches neither of
    // the dispatcher's partial indexes, so it read the whole events table each time (a
    // sequential scan every 50 ms took about a sixth of the machine's CPU during a drain).
    let open = client
        .prepare(
            "SELECT (SELECT count(*) FROM outbox.events
                      WHERE dispatched_at IS NULL AND deliver_after <= created_at)
                  + (SELECT count(*) FROM outbox.events
                      WHERE dispatched_at IS NULL AND deliver_after > created_at),
                    (SELECT count(*) FROM outbox.deliveries WHERE status IN ('pending', 'failing')),
                    (SELECT count(*) FROM outbox.deliveries WHERE status = 'in_flight')",
        )
        .await
        .context("preparing the progress query")?;
    loop {
        let row = client
            .query_one(&open, &[])
            .await
            .context("asking for progress")?;
        let (undispatched, due, in_flight): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        if undispatched == 0 && due == 0 && in_flight == 0 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "gave up after {timeout:?}: {undispatched} events undispatched, {due} deliveries \
                 pending/failing, {in_flight} in flight; statuses: {}",
                status_summary(client).await.unwrap_or_default()
            );
        }
        tokio::time::sleep(DB_POLL).await;
    }
    let delivered: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'
               AND subscription_id IN (SELECT id FROM outbox.subscriptions WHERE enabled)",
            &[],
        )
        .await
        .context("counting delivered")?
        .get(0);
    if u64::try_from(delivered).unwrap_or(0) != expected {
        bail!(
            "expected {expected} delivered deliveries, found {delivered}; statuses: {}",
            status_summary(client).await.unwrap_or_default()
        );
    }
    Ok(())
}

pub(super) async fn status_summary(client: &tokio_postgres::Client) -> anyhow::Result<String> {
    let rows = client
        .query(
            "SELECT status, count(*), max(last_error) FROM outbox.deliveries GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let status: String = r.get(0);
            let count: i64 = r.get(1);
            let error: Option<String> = r.get(2);
            match error {
                Some(e) => format!("{status}={count} (e.g. {e})"),
                None => format!("{status}={count}"),
            }
        })
        .collect::<Vec<_>>()
        .join(", "))
}
