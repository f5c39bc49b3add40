//! How the relay's pooled connections reach PostgreSQL, and so how its statements must be
//! sent ([`super::query`]): prepared and cached per connection when connections are its
//! own, unnamed with declared parameter types through a transaction-mode pooler (which
//! hands each transaction whichever server connection is free, so a statement prepared on
//! one may not exist on the next).
//!
//! The configuration holds the mode as the name given in `OUTBOX_DB_POOL_MODE`
//! (`RelayConfig::db_pool_mode`); this is where that name gets its meaning.

use crate::config::{POOL_MODE_DIRECT, POOL_MODE_TRANSACTION_POOLER};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMode {
    /// Straight to PostgreSQL, or through a session-mode pooler.
    Direct,
    /// Through a transaction-mode pooler such as PgBouncer.
    TransactionPooler,
}

impl PoolMode {
    /// The mode an `OUTBOX_DB_POOL_MODE` name stands for; `None` for any other text.
    pub fn from_name(name: &str) -> Option<PoolMode> {
        match name {
            POOL_MODE_DIRECT => Some(PoolMode::Direct),
            POOL_MODE_TRANSACTION_POOLER => Some(PoolMode::TransactionPooler),
            _ => None,
        }
    }

    /// The name `OUTBOX_DB_POOL_MODE` gives this mode.
    pub fn name(self) -> &'static str {
        match self {
            PoolMode::Direct => POOL_MODE_DIRECT,
            PoolMode::TransactionPooler => POOL_MODE_TRANSACTION_POOLER,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_is_read_back_from_its_name() {
        for mode in [PoolMode::Direct, PoolMode::TransactionPooler] {
            assert_eq!(PoolMode::from_name(mode.name()), Some(mode));
        }
        assert_eq!(PoolMode::from_name("session"), None);
    }
}
