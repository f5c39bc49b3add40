//! What outbox-relay's integration tests (`tests/it`, `tests/fault`) and its benchmark
//! (`bench/`) share, kept out of the shipped crate: PostgreSQL servers, the migrated
//! template and fresh databases ([`pg`]); relays in this process or as processes
//! ([`relay`]); subscriptions ([`outbox`]); and a webhook receiver whose answers are
//! scripted ([`receiver`]) on top of the demo's recording one.

pub mod outbox;
pub mod pg;
pub mod receiver;
pub mod relay;
