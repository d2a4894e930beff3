//! `stagecoach-coordinator`: runs the control plane until Ctrl-C or SIGTERM.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use stagecoach_coordinator::{serve, shutdown_signal, Coordinator};
use tokio::net::TcpListener;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};

/// The stagecoach coordinator (gRPC control plane).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on; port 0 picks a free port (the chosen address is printed on stdout).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Name of the job this coordinator runs.
    #[arg(long, value_name = "NAME", default_value = "stagecoach")]
    job: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::builder()
                .with_default_directive(LevelFilter::INFO.into())
                .from_env_lossy(),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let shutdown = shutdown_signal().context("installing signal handlers")?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    // Scripts and tests read this line to learn the port when --listen asks for port 0.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {}", listener.local_addr()?)?;
    stdout.flush()?;
    drop(stdout);

    serve(listener, Arc::new(Coordinator::new(args.job)), shutdown).await?;
    Ok(())
}
