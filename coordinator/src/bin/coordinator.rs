//! `stagecoach-coordinator`: runs the control plane until Ctrl-C or SIGTERM.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use stagecoach_coordinator::driver::{Driver, Policy, Resume, Settings};
use stagecoach_coordinator::ledger::StoreLedger;
use stagecoach_coordinator::metrics::Metrics;
use stagecoach_coordinator::server::DriverHandle;
use stagecoach_coordinator::{serve, shutdown_signal, Coordinator};
use stagecoach_core::spec::JobFile;
use stagecoach_proto::v1::JobState;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};

/// The stagecoach coordinator (gRPC control plane).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on; port 0 picks a free port (the chosen address is printed on stdout).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Address of the Prometheus endpoint (GET /metrics); port 0 picks a free port (printed on
    /// stdout, second line).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9400")]
    metrics_listen: SocketAddr,
    /// The job file to run (TOML). Without it the coordinator only answers status queries.
    #[arg(long, value_name = "FILE")]
    job: Option<std::path::PathBuf>,
    /// Durable state: a directory (the embedded store) or etcd://host:port[/prefix].
    #[arg(long, value_name = "URL", default_value = "runs/state")]
    state: String,
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
    let metrics_listener = TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| {
            format!(
                "cannot serve metrics on {} (choose another address with --metrics-listen)",
                args.metrics_listen
            )
        })?;
    // Scripts and tests read these lines to learn the ports when an address asks for port 0.
    // One write: a reader that stops after the first line must not make the second one fail.
    let lines = format!(
        "listening on {}\nmetrics on http://{}/metrics\n",
        listener.local_addr()?,
        metrics_listener.local_addr()?
    );
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(lines.as_bytes())?;
    stdout.flush()?;
    drop(stdout);
    let metrics = Arc::new(Metrics::new());
    tokio::spawn(stagecoach_core::metrics::serve(
        metrics_listener,
        metrics.registry().clone(),
    ));

    let Some(job_path) = args.job else {
        serve(listener, Arc::new(Coordinator::new("none")), shutdown).await?;
        return Ok(());
    };
    let job = JobFile::load(&job_path)?;
    let store = stagecoach_coordinator::store::open(&args.state).await?;
    let ledger = StoreLedger::new(store, job.job.name.clone());
    // Resume where the ledger ends, with the curriculum's record, the checkpoint index and the
    // spike events.
    let ledger_index = ledger.checkpoints().await?;
    let ledger_events = ledger.events().await?;
    let resume = Resume {
        last: ledger.last().await?,
        record: ledger.curriculum().await?,
    };
    let w = &job.workers;
    let settings = Settings {
        min: w.min,
        max: w.max,
        lease: Duration::from_millis(w.lease_ms),
        heartbeat: Duration::from_millis(w.heartbeat_ms),
        rendezvous: Duration::from_millis(w.rendezvous_ms),
    };
    let (driver, snapshot) = Driver::new(job.to_proto(), settings, Box::new(ledger), Some(resume))?;
    let spikes = job.spike_config();
    let policy = Policy {
        checkpoints: Some(job.checkpoint_config()),
        spikes: spikes.enabled.then_some(spikes),
        index: ledger_index,
        events: ledger_events,
    };
    let driver = driver.with_policy(policy).with_metrics(metrics);
    let (events, rx) = tokio::sync::mpsc::channel(1024);
    let mut finished = snapshot.clone();
    let coordinator = Arc::new(Coordinator::with_driver(
        job.job.name.clone(),
        DriverHandle { events, snapshot },
    ));
    let span = tracing::info_span!("job", job = %job.job.name);
    let driver_task = tokio::spawn(tracing::Instrument::instrument(driver.run(rx), span));
    // Serve until a signal, or until the job is over (after a moment for workers to hear it).
    let over = async move {
        let _ = finished
            .wait_for(|s| {
                s.state == JobState::Finished as i32 || s.state == JobState::Failed as i32
            })
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let outcome = finished_outcome(&coordinator);
    serve(listener, coordinator.clone(), async move {
        tokio::select! { _ = shutdown => {}, _ = over => {} }
    })
    .await?;
    driver_task.abort();
    outcome()
}

/// Exit status: success unless the job failed.
fn finished_outcome(c: &Arc<Coordinator>) -> impl FnOnce() -> anyhow::Result<()> {
    let c = c.clone();
    move || match c.driver_snapshot() {
        Some(s) if s.state == JobState::Failed as i32 => {
            anyhow::bail!("the job failed: {}", s.detail)
        }
        Some(s) => {
            // stdout may be closed by now (a supervisor that only read the address line).
            let _ = writeln!(
                std::io::stdout(),
                "job ended at step {} of {}: loss {} ({})",
                s.step,
                s.total_steps,
                s.loss.map_or("-".into(), |l| format!("{l:.4}")),
                s.detail
            );
            Ok(())
        }
        None => Ok(()),
    }
}
