//! Development kit: a throwaway PostgreSQL cluster and a verifying webhook receiver,
//! shared by `outbox-relay demo`, the integration tests and the benchmark.

pub mod postgres;
pub mod receiver;
