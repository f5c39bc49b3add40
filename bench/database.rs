//! The database server a run uses, one fresh database per scenario, and asking it whether the
//! relay is done.

use super::*;

use testkit::pg;

pub(super) use testkit::pg::connect;

/// The server of a run (`--database-url`'s, else a throwaway cluster) with the template
/// database its scenarios' databases are cloned from: the integration tests' own
/// (`testkit::pg`), so a scenario's database is migrated exactly as a test's is.
pub(super) struct Server {
    pg: pg::Server,
    template: String,
}

pub(super) struct BenchDb {
    pub(super) name: String,
    pub(super) url: String,
}

impl Server {
    pub(super) async fn start(database_url: Option<&str>) -> anyhow::Result<Server> {
        let pg = pg::Server::start(database_url)
            .await
            .context("no --database-url given")?;
        let template = pg.template().await?;
        Ok(Server { pg, template })
    }

    pub(super) fn admin_url(&self) -> &str {
        self.pg.admin_url()
    }

    pub(super) fn is_throwaway(&self) -> bool {
        self.pg.is_throwaway()
    }

    pub(super) async fn fresh_db(&self) -> anyhow::Result<BenchDb> {
        let name = format!("outbox_bench_{}", uuid::Uuid::new_v4().simple());
        let url = self.pg.create_database(&name, &self.template).await?;
        Ok(BenchDb { name, url })
    }

    pub(super) async fn drop_db(&self, db: BenchDb, keep: bool) {
        if keep {
            eprintln!("  kept database {} ({})", db.name, db.url);
            return;
        }
        if let Err(error) = self.pg.drop_database(&db.name).await {
            eprintln!("warning: {error:#}");
        }
    }

    pub(super) async fn stop(self) {
        if let Err(error) = self.pg.stop().await {
            eprintln!("warning: stopping the throwaway cluster: {error:#}");
        }
    }
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
