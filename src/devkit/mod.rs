//! What `outbox-relay demo` runs besides the relay: a throwaway PostgreSQL cluster and a
//! webhook receiver that records and verifies what arrives. The integration tests and the
//! benchmark build on both (their failure scripting lives in `crates/testkit`).

pub mod postgres;
pub mod receiver;
