//! Command line: `migrate`, `run`, `subscription …`, `replay`, `status`, `demo`. Parsing and
//! printing only; the work is in the library (`outbox_relay::admin` for the admin commands).
//! What it accepts is `args`, what each command does `commands`, how results look `render`;
//! this file has the stdout macros they share.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, anyhow};
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Parser, Subcommand};
use futures::StreamExt as _;
use serde::Serialize;
use uuid::Uuid;

use outbox_relay::admin::{
    self, AdminError, NewSubscription, ReplayCriteria, SecretText, SubscriptionInfo,
    SubscriptionSettings, SubscriptionUpdate,
};
use outbox_relay::config::RelayConfig;
use outbox_relay::config::secret::SecretUrl;
use outbox_relay::telemetry::LogFormat;

/// `println!` that stops quietly when stdout is closed (`outbox-relay status | head`)
/// instead of panicking, and returns other write errors.
macro_rules! say {
    ($($arg:tt)*) => {
        write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` with the same care as [`say!`].
macro_rules! emit {
    ($($arg:tt)*) => {
        write_stdout(format_args!($($arg)*))
    };
}

mod args;
mod commands;
mod render;

use args::*;
pub use args::{Cli, Command};
pub use commands::execute;
use render::*;

fn write_stdout(text: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result.context("writing to stdout"),
    }
}
