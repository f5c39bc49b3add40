//! How one of the relay's statements reaches the server, per [`PoolMode`].
//!
//! * `Direct`: a named prepared statement, prepared once per connection and cached
//!   (`prepare_typed_cached`), then Bind/Execute per call. Cheapest on a real session.
//! * `TransactionPooler`: the unnamed statement, Parse/Bind/Execute/Sync in one message batch
//!   (`query_typed`). Behind PgBouncer in transaction mode each round trip may be served by a
//!   different server connection, so a named statement prepared in one round trip may not
//!   exist in the next ("prepared statement s3 does not exist"); one batch that ends with Sync
//!   is served by one server connection. Costs a parse per call, and leaves nothing behind on
//!   the server connection.
//!
//! Both paths use the parameter types declared next to the SQL in [`super::sql`], so the
//! whole test suite (which runs `Direct`) also checks the declarations the pooler path relies
//! on. This module never runs anything session-scoped; transactions (BEGIN … COMMIT) are
//! fine through a transaction pooler and are left to the caller.

use std::future::Future;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Error, Row, Statement};

use super::PoolMode;

/// One statement the relay runs: its SQL and the types of its parameters (`$1`, `$2`, … in
/// order). The declared types are what the server sees, so they must match the Rust values
/// passed (tokio-postgres checks each value against its type before sending).
#[derive(Debug)]
pub struct Query {
    pub sql: &'static str,
    pub param_types: &'static [Type],
}

/// Parameters in `$n` order, as tokio-postgres takes them.
pub type Params<'a> = [&'a (dyn ToSql + Sync)];

/// A connection a [`Query`] can run on: a pooled client, or a transaction on one.
///
/// Its methods are the tokio-postgres/deadpool calls of the same names; the trait only exists
/// so [`query`] and [`execute`] serve both.
pub trait Connection: Sync {
    fn prepare_typed_cached(
        &self,
        sql: &str,
        types: &[Type],
    ) -> impl Future<Output = Result<Statement, Error>> + Send;
    fn query_prepared(
        &self,
        statement: &Statement,
        params: &Params<'_>,
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send;
    fn query_one_prepared(
        &self,
        statement: &Statement,
        params: &Params<'_>,
    ) -> impl Future<Output = Result<Row, Error>> + Send;
    fn execute_prepared(
        &self,
        statement: &Statement,
        params: &Params<'_>,
    ) -> impl Future<Output = Result<u64, Error>> + Send;
    fn query_typed(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send;
    fn query_typed_one(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Row, Error>> + Send;
    fn execute_typed(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<u64, Error>> + Send;
}

impl Connection for deadpool_postgres::Object {
    fn prepare_typed_cached(
        &self,
        sql: &str,
        types: &[Type],
    ) -> impl Future<Output = Result<Statement, Error>> + Send {
        deadpool_postgres::ClientWrapper::prepare_typed_cached(self, sql, types)
    }
    fn query_prepared(
        &self,
        statement: &Statement,
        params: &Params<'_>,
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send {
        tokio_postgres::Client::query(self, statement, params)
    }
    fn query_one_prepared(
        &self,
        statement: &Statement,
        params: &Params<'_>,
    ) -> impl Future<Output = Result<Row, Error>> + Send {
        tokio_postgres::Client::query_one(self, statement, params)
    }
    fn execute_prepared(
        &self,
        statement: &Statement,
        params: &Params<'_>,
    ) -> impl Future<Output = Result<u64, Error>> + Send {
        tokio_postgres::Client::execute(self, statement, params)
    }
    fn query_typed(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send {
        tokio_postgres::Client::query_typed(self, sql, params)
    }
    fn query_typed_one(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Row, Error>> + Send {
        tokio_postgres::Client::query_typed_one(self, sql, params)
    }
    fn execute_typed(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<u64, Error>> + Send {
        tokio_postgres::Client::execute_typed(self, sql, params)
    }
}

impl Connection for deadpool_postgres::Transaction<'_> {
    fn prepare_typed_cached(
        &self,
        sql: &str,
        types: &[Type],
    ) -> impl Future<Output = Result<Statement, Error>> + Send {
        deadpool_postgres::Transaction::prepare_typed_cached(self, sql, types)
    }
    fn query_prepared(
        &self,
        statement: &Statement,
        params: &Params<'_>,
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send {
        tokio_postgres::Transaction::query(self, statement, params)
    }
    fn query_one_prepared(
        &self,
        statement: &Statement,
        params: &Params<'_>,
    ) -> impl Future<Output = Result<Row, Error>> + Send {
        tokio_postgres::Transaction::query_one(self, statement, params)
    }
    fn execute_prepared(
        &self,
        statement: &Statement,
        params: &Params<'_>,
    ) -> impl Future<Output = Result<u64, Error>> + Send {
        tokio_postgres::Transaction::execute(self, statement, params)
    }
    fn query_typed(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send {
        tokio_postgres::Transaction::query_typed(self, sql, params)
    }
    fn query_typed_one(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Row, Error>> + Send {
        tokio_postgres::Transaction::query_typed_one(self, sql, params)
    }
    fn execute_typed(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<u64, Error>> + Send {
        tokio_postgres::Transaction::execute_typed(self, sql, params)
    }
}

/// Pairs each value with its declared type, for the unnamed-statement path.
fn typed<'a>(query: &Query, params: &Params<'a>) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    // A count mismatch is a bug in sql.rs; the unit test there checks every declaration.
    debug_assert_eq!(
        params.len(),
        query.param_types.len(),
        "parameter count of {:?}",
        query.sql
    );
    params
        .iter()
        .copied()
        .zip(query.param_types.iter().cloned())
        .collect()
}

/// Runs `query` and returns its rows, the way `mode` requires.
pub async fn query<C: Connection>(
    connection: &C,
    mode: PoolMode,
    query: &Query,
    params: &Params<'_>,
) -> Result<Vec<Row>, Error> {
    match mode {
        PoolMode::Direct => {
            let statement = connection
                .prepare_typed_cached(query.sql, query.param_types)
                .await?;
            connection.query_prepared(&statement, params).await
        }
        PoolMode::TransactionPooler => {
            connection
                .query_typed(query.sql, &typed(query, params))
                .await
        }
    }
}

/// Runs `query`, which must return exactly one row.
pub async fn query_one<C: Connection>(
    connection: &C,
    mode: PoolMode,
    query: &Query,
    params: &Params<'_>,
) -> Result<Row, Error> {
    match mode {
        PoolMode::Direct => {
            let statement = connection
                .prepare_typed_cached(query.sql, query.param_types)
                .await?;
            connection.query_one_prepared(&statement, params).await
        }
        PoolMode::TransactionPooler => {
            connection
                .query_typed_one(query.sql, &typed(query, params))
                .await
        }
    }
}

/// Runs `query` and returns how many rows it changed.
pub async fn execute<C: Connection>(
    connection: &C,
    mode: PoolMode,
    query: &Query,
    params: &Params<'_>,
) -> Result<u64, Error> {
    match mode {
        PoolMode::Direct => {
            let statement = connection
                .prepare_typed_cached(query.sql, query.param_types)
                .await?;
            connection.execute_prepared(&statement, params).await
        }
        PoolMode::TransactionPooler => {
            connection
                .execute_typed(query.sql, &typed(query, params))
                .await
        }
    }
}
