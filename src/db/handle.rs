//! The relay's pool together with how its statements must be sent ([`PoolMode`], applied by
//! [`super::query`]): one handle the dispatcher, deliverer, completer, maintenance and the
//! subscription cache share, so none carries a pool and a mode side by side, and a statement
//! can only run the way the pool allows.

use deadpool_postgres::{Object, Pool, Transaction};
use tokio_postgres::{Error, Row};

use super::query::{self, Params, Query};
use super::{DbContext, DbError};
use crate::config::PoolMode;

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
        Ok(DbClient {
            client,
            mode: self.mode,
        })
    }
}

/// A pooled connection that runs [`Query`]s the way its pool allows.
pub struct DbClient {
    client: Object,
    mode: PoolMode,
}

impl DbClient {
    pub async fn query(&self, statement: &Query, params: &Params<'_>) -> Result<Vec<Row>, Error> {
        query::query(&self.client, self.mode, statement, params).await
    }

    pub async fn query_one(&self, statement: &Query, params: &Params<'_>) -> Result<Row, Error> {
        query::query_one(&self.client, self.mode, statement, params).await
    }

    pub async fn execute(&self, statement: &Query, params: &Params<'_>) -> Result<u64, Error> {
        query::execute(&self.client, self.mode, statement, params).await
    }

    /// BEGIN; fine through a transaction pooler, which keeps one server connection until
    /// COMMIT.
    pub async fn transaction(&mut self) -> Result<DbTransaction<'_>, Error> {
        Ok(DbTransaction {
            transaction: self.client.transaction().await?,
            mode: self.mode,
        })
    }
}

/// A transaction on a [`DbClient`], running [`Query`]s the same way.
pub struct DbTransaction<'a> {
    transaction: Transaction<'a>,
    mode: PoolMode,
}

impl DbTransaction<'_> {
    pub async fn query(&self, statement: &Query, params: &Params<'_>) -> Result<Vec<Row>, Error> {
        query::query(&self.transaction, self.mode, statement, params).await
    }

    pub async fn execute(&self, statement: &Query, params: &Params<'_>) -> Result<u64, Error> {
        query::execute(&self.transaction, self.mode, statement, params).await
    }

    pub async fn commit(self) -> Result<(), Error> {
        self.transaction.commit().await
    }
}
