//! outbox-relay: moves committed rows of `outbox.events` to subscribers as signed webhooks.
//!
//! The library holds everything; `src/main.rs` only parses the command line and calls in.
//! [`relay`] shows how the parts fit; the README describes the guarantees and
//! `../shared/SPEC.md` the public contract.

pub mod admin;
pub mod api;
pub mod backoff;
pub mod broker;
pub mod config;
pub mod db;
pub mod demo;
pub mod devkit;
pub mod health;
pub mod http;
pub mod metrics;
pub mod relay;
pub mod shutdown;
pub mod telemetry;
pub mod webhook;
