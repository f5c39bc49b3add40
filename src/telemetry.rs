//! Logging setup: text for people, JSON for log pipelines; level from `RUST_LOG`, else
//! the command's default (`info` for the relay, `warn` for the demo, whose output is the
//! story it prints). Whatever the level, no secret reaches a log line: see
//! [`QUIET_QUERY_PARAMETERS`] and `crate::config::secret`.

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// tokio-postgres logs every statement's parameter values at debug level, and parameters
/// carry signing secrets (subscription create, rotate-secret). This directive is added after
/// `RUST_LOG`'s, so no level asked for there can turn that logging on.
const QUIET_QUERY_PARAMETERS: &str = "tokio_postgres::query=info";

pub fn init(format: LogFormat, default_level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(default_level))
        .add_directive(
            QUIET_QUERY_PARAMETERS
                .parse()
                .expect("a literal directive that parses"),
        );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Ignore the error when a subscriber is already installed (tests, demo re-entry).
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
