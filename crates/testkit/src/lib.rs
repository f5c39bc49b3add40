//! What outbox-relay's integration tests (`tests/it`, `tests/fault`) and its benchmark
//! (`bench/`) share, kept out of the shipped crate: a webhook receiver whose answers are
//! scripted ([`receiver`]) on top of the demo's recording one.

pub mod receiver;
