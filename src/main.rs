//! The `outbox-relay` binary: parse the command line, set up logging, run the command.
//! Errors are printed with their cause chain and the process exits non-zero.

use std::process::ExitCode;

use clap::Parser;

mod cli;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let default_level = match cli.command {
        cli::Command::Demo { .. } => "warn",
        _ => "info",
    };
    outbox_relay::telemetry::init(cli.log_format, default_level);
    match cli::execute(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
