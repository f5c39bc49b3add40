//! The relay's pool together with how its statements must be sent ([`PoolMode`], applied by
//! [`super::query`]): one handle the dispatcher, deliverer, completer, maintenance and the
//! subscription cache share, so none carries a pool and a mode side by side, and a statement
//! can only run the way the pool allows.

use deadpool_postgres::{Object, Pool, Transaction};
use tokio_postgres::{Error, Row};

use super::query::{self, Connection, Params, Query};
use super::{DbContext, DbError, PoolMode};

#[derive(Clone)]
pub struct Db {
    pool: Pool,
    mode: PoolMode,
}

impl Db {
    pub fn new(pool: Pool, mode: PoolMode) -> Db {
        Db { pool, mode }
    }

    /// A pooled connection; `context` names what it was for when none comes in time.
    pub async fn client(&self, context: &'static str) -> Result<DbClient, DbError> {
        let client = self.pool.get().await.context(context)?;
        Ok(Statements {
            connection: client,
            mode: self.mode,
        })
    }
}

/// A connection (a pooled one, or a transaction on it) that runs [`Query`]s the way its pool
/// allows.
pub struct Statements<C> {
    connection: C,
    mode: PoolMode,
}

/// A pooled connection from [`Db::client`].
pub type DbClient = Statements<Object>;

/// A transaction on a [`DbClient`].
pub type DbTransaction<'a> = Statements<Transaction<'a>>;

impl<C: Connection> Statements<C> {
    pub async fn query(&self, statement: &Query, params: &Params<'_>) -> Result<Vec<Row>, Error> {
        query::query(&self.connection, self.mode, statement, params).await
    }

    pub async fn query_one(&self, statement: &Query, params: &Params<'_>) -> Result<Row, Error> {
        query::query_one(&self.connection, self.mode, statement, params).await
    }

    pub async fn execute(&self, statement: &Query, params: &Params<'_>) -> Result<u64, Error> {
        query::execute(&self.connection, self.mode, statement, params).await
    }
}

impl DbClient {
    /// BEGIN; fine through a transaction pooler, which keeps one server connection until
    /// COMMIT.
    pub async fn transaction(&mut self) -> Result<DbTransaction<'_>, Error> {
        Ok(Statements {
            connection: self.connection.transaction().await?,
            mode: self.mode,
        })
    }
}

impl DbTransaction<'_> {
    pub async fn commit(self) -> Result<(), Error> {
        self.connection.commit().await
    }
}
