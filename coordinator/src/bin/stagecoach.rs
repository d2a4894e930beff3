//! `stagecoach`: the user CLI of a stagecoach job.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use stagecoach_coordinator::cli;

/// Control and inspect a stagecoach training job.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// URL of the coordinator.
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "STAGECOACH_COORDINATOR",
        default_value = cli::DEFAULT_COORDINATOR
    )]
    coordinator: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the job's name and state, and the coordinator's version and uptime.
    Status {
        /// Print one line of JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Cli::parse();
    let result = match args.command {
        Command::Status { json } => cli::status(&args.coordinator, json).await,
    };
    match result {
        Ok(output) => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(cli::exit_code(&err))
        }
    }
}
