//! `stagecoach`: the user CLI of a stagecoach job.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, Subcommand};
use stagecoach_coordinator::cli;
use stagecoach_proto::v1::SourceWeight;

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
    /// The CA that signed the coordinator's certificate: talk TLS, and check it against this.
    #[arg(long, global = true, value_name = "FILE", env = "STAGECOACH_CA")]
    ca: Option<PathBuf>,
    /// A client certificate for mutual TLS (with --key).
    #[arg(long, global = true, value_name = "FILE", env = "STAGECOACH_CERT")]
    cert: Option<PathBuf>,
    /// The private key of --cert.
    #[arg(long, global = true, value_name = "FILE", env = "STAGECOACH_KEY")]
    key: Option<PathBuf>,
    /// A file holding a bearer token (without one, the STAGECOACH_TOKEN environment variable
    /// is used if set). Tokens are never given on the command line.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "STAGECOACH_TOKEN_FILE"
    )]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the job: state, stage, step, tokens, loss, workers and the next transition.
    Status {
        /// Print one line of JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show the curriculum: every stage (done, current, planned), the tokens each trained per
    /// source, the transitions so far and the evaluations.
    Stages {
        /// Print one line of JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Move to another stage at the next step every rank can take.
    Stage {
        #[command(subcommand)]
        action: StageAction,
    },
    /// Change the data mixture of a stage.
    Mix {
        #[command(subcommand)]
        action: MixAction,
    },
    /// Stop starting new steps (the step in flight finishes).
    Pause,
    /// Start training again after a pause.
    Resume,
    /// Compute the validation loss per source now; `stagecoach stages` shows the results.
    Eval,
    /// Take a checkpoint.
    Checkpoint {
        #[command(subcommand)]
        action: CheckpointAction,
    },
    /// Show the checkpoint index: step, folder, stage, loss, known-good, pinned, lineage, how
    /// long it held training and took to write, size, and why it was taken.
    Checkpoints {
        /// Print one line of JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Roll every rank back to a checkpoint and train on from there.
    Rollback {
        /// The checkpoint: its folder or its step, as `stagecoach checkpoints` lists them
        /// [default: the latest known-good one].
        checkpoint: Option<String>,
    },
    /// Show the loss-spike events: when detected, the rule, the rolling mean it was judged
    /// against, what was done, where a rollback went and the data it skipped.
    Events {
        /// Print one line of JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Copy the model of a checkpoint folder into DIR as a transformers model folder
    /// (config.json and model.safetensors), after checking them against the checkpoint's
    /// manifest. Needs no coordinator.
    Export {
        /// The checkpoint folder.
        checkpoint: PathBuf,
        /// Where to write the model folder (created; it must be empty if it exists).
        dir: PathBuf,
    },
    /// Write the status page's charts of a run (loss, validation, tokens, stages) as SVG files
    /// (and PNG with --png), from its state store. Needs no coordinator.
    Plot(cli::plot::PlotArgs),
    /// Make the certificates and tokens of a cluster (needs no coordinator).
    Certs {
        #[command(subcommand)]
        action: CertsAction,
    },
    /// Check a job file without a coordinator: every problem, with its place in the file.
    Validate {
        /// The job file (TOML).
        job: PathBuf,
        /// Do not look at the data folders (check the file alone).
        #[arg(long, conflicts_with = "data_root")]
        no_data: bool,
        /// The folder the sources' relative paths start from, as the workers will see it
        /// [default: the current directory].
        #[arg(long, value_name = "DIR")]
        data_root: Option<PathBuf>,
        /// Print one line of JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum StageAction {
    /// End the current stage now and start the next one.
    Next,
    /// End the current stage now and start the stage NAME.
    Set {
        /// The stage to start (a name from `stagecoach stages`).
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum CertsAction {
    /// Write a CA, the coordinator's certificate, client certificates for a worker, an operator
    /// and a viewer, a token per role and the auth file into DIR.
    Init {
        /// The folder to write into (created; no file in it is ever replaced).
        dir: PathBuf,
        /// A name or address the coordinator is reached at, besides localhost, 127.0.0.1 and ::1
        /// (repeat for several).
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
    },
    /// Write a new token into FILE and print the auth file entry that admits it.
    Token {
        /// Who holds it (the audit trail's name).
        #[arg(long)]
        name: String,
        /// viewer, operator or worker.
        #[arg(long, value_parser = parse_role)]
        role: stagecoach_coordinator::auth::Role,
        /// Where to write the token.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

fn parse_role(s: &str) -> Result<stagecoach_coordinator::auth::Role, String> {
    use stagecoach_coordinator::auth::Role;
    match s {
        "viewer" => Ok(Role::Viewer),
        "operator" => Ok(Role::Operator),
        "worker" => Ok(Role::Worker),
        other => Err(format!(
            "{other:?}: the roles are viewer, operator and worker"
        )),
    }
}

#[derive(Debug, Subcommand)]
enum CheckpointAction {
    /// Write a checkpoint after the step in flight (or now, between steps).
    Now,
}

#[derive(Debug, Subcommand)]
enum MixAction {
    /// Replace the mixture of STAGE (the current one or one still to come); sources left out
    /// weigh 0, and the weights must sum to 1.
    Set {
        /// The stage whose mixture to replace.
        stage: String,
        /// The new weights, one per source: e.g. prose=0.75 code=0.2 math=0.05.
        #[arg(required = true, value_name = "SOURCE=WEIGHT", value_parser = cli::parse_source_weight)]
        weights: Vec<SourceWeight>,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Cli::parse();
    let url = &args.coordinator;
    match stagecoach_proto::connect::ClientAuth::from_files(
        args.ca.as_deref(),
        args.cert.as_deref(),
        args.key.as_deref(),
        args.token_file.as_deref(),
    ) {
        Ok(auth) => cli::set_client_auth(auth),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = match args.command {
        Command::Status { json } => cli::status(url, json).await,
        Command::Stages { json } => cli::stages(url, json).await,
        Command::Stage { action } => match action {
            StageAction::Next => cli::change_stage(url, None).await,
            StageAction::Set { name } => cli::change_stage(url, Some(&name)).await,
        },
        Command::Mix {
            action: MixAction::Set { stage, weights },
        } => {
            if let Err(message) = cli::check_mix(&weights) {
                Cli::command()
                    .error(ErrorKind::ValueValidation, message)
                    .exit();
            }
            cli::set_mix(url, &stage, weights).await
        }
        Command::Pause => cli::pause(url).await,
        Command::Resume => cli::resume(url).await,
        Command::Eval => cli::evaluate(url).await,
        Command::Checkpoint {
            action: CheckpointAction::Now,
        } => cli::checkpoint_now(url).await,
        Command::Checkpoints { json } => cli::checkpoints(url, json).await,
        Command::Rollback { checkpoint } => cli::rollback(url, checkpoint.as_deref()).await,
        Command::Events { json } => cli::events(url, json).await,
        Command::Export { checkpoint, dir } => cli::export(&checkpoint, &dir),
        Command::Plot(args) => cli::plot::plot(&args).await,
        Command::Certs { action } => match action {
            CertsAction::Init { dir, hosts } => stagecoach_coordinator::certs::init(&dir, &hosts),
            CertsAction::Token { name, role, out } => {
                stagecoach_coordinator::certs::token(&name, role, &out)
            }
        },
        Command::Validate {
            job,
            no_data,
            data_root,
            json,
        } => {
            let root = data_root
                .or_else(|| std::env::current_dir().ok())
                .unwrap_or_else(|| PathBuf::from("."));
            let validation = cli::validate(&job, (!no_data).then_some(root.as_path()), json);
            return if validation.valid {
                println!("{}", validation.output);
                ExitCode::SUCCESS
            } else {
                // The JSON report is the answer a script reads; the problems are for people.
                if json {
                    println!("{}", validation.output);
                } else {
                    eprintln!("{}", validation.output);
                }
                ExitCode::FAILURE
            };
        }
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
