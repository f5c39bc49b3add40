//! Integration tests: one binary, so they link once and share one PostgreSQL server and
//! one migrated template database. Each test gets its own database cloned from it.

mod harness;
mod harness_selftest;

mod admin_api;
mod brokers;
mod claim_wakeups;
mod cli_commands;
mod compat_api;
mod constraints;
mod dead_index_entries;
mod delivery;
mod deploy_kit;
mod failures;
mod health_and_metrics;
mod leases;
mod locks;
mod openapi_fuzz;
mod operator_sql;
mod ordered;
mod ordered_switch;
mod pgbouncer;
mod poison;
mod resilience;
mod retention;
mod routing;
mod scheduled;
mod secrets;
mod tls;
mod trace_context;
mod wake_gate;
