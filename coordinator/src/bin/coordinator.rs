//! `stagecoach-coordinator`: runs the control plane until Ctrl-C or SIGTERM, or the job's end.
//!
//! The job file and the state store are read and checked before anything listens: the
//! `listening on` line a script waits for means the job was accepted. The exit status is 0
//! when the job finished (or a signal stopped the coordinator), non-zero when it failed, when
//! its driver crashed, or when it could not start.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use stagecoach_coordinator::auth::Auth;
use stagecoach_coordinator::driver::{Driver, Policy, Resume, Settings};
use stagecoach_coordinator::ledger::StoreLedger;
use stagecoach_coordinator::metrics::Metrics;
use stagecoach_coordinator::server::DriverHandle;
use stagecoach_coordinator::tls::ServerTls;
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
    /// The coordinator's TLS certificate (PEM; its chain may follow), for the gRPC services and
    /// the HTTP endpoint. With --tls-key.
    #[arg(
        long,
        value_name = "FILE",
        env = "STAGECOACH_TLS_CERT",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(
        long,
        value_name = "FILE",
        env = "STAGECOACH_TLS_KEY",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS); a certificate's Common Name
    /// ROLE:NAME (or a rule in --auth) gives its role. Needs --tls-cert.
    #[arg(
        long,
        value_name = "FILE",
        env = "STAGECOACH_CLIENT_CA",
        requires = "tls_cert"
    )]
    client_ca: Option<PathBuf>,
    /// The auth file: bearer tokens (by their SHA-256) with roles, and certificate rules (see
    /// `stagecoach certs init`).
    #[arg(long, value_name = "FILE", env = "STAGECOACH_AUTH")]
    auth: Option<PathBuf>,
    /// Listen on a non-loopback address without TLS and without tokens (anyone who reaches the
    /// port may drive the job).
    #[arg(long)]
    insecure: bool,
}

impl Args {
    /// The TLS material and the auth policy, checked: a coordinator reachable from other
    /// machines must authenticate its callers unless told `--insecure`.
    fn security(&self) -> anyhow::Result<(Option<ServerTls>, Auth)> {
        let auth = Auth::load(self.auth.as_deref(), self.client_ca.is_some())?;
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(ServerTls::load(
                cert,
                key,
                self.client_ca.as_deref(),
                auth.has_tokens(),
            )?),
            _ => None,
        };
        let exposed = [self.listen, self.metrics_listen]
            .into_iter()
            .find(|a| !a.ip().is_loopback());
        if let Some(addr) = exposed {
            if tls.is_none() && auth.is_open() && !self.insecure {
                anyhow::bail!(
                    "refusing to listen on {addr} with neither TLS nor tokens: anyone who reaches it could drive the job. \
                     Give --tls-cert/--tls-key (and --client-ca) or --auth with tokens (`stagecoach certs init DIR` writes all of them), \
                     listen on 127.0.0.1, or pass --insecure"
                );
            }
            if tls.is_none() && !auth.is_open() {
                tracing::warn!(%addr, "tokens are accepted without TLS: they cross the network in the clear");
            }
        }
        Ok((tls, auth))
    }
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
    let (tls, auth) = args.security()?;
    let auth = Arc::new(auth);
    // The job and its state first: a coordinator that refuses its job never says it listens.
    let prepared = match &args.job {
        Some(path) => Some(prepare(path, &args.state).await?),
        None => None,
    };
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
        "listening on {}\nmetrics on {}://{}/metrics\n",
        listener.local_addr()?,
        if tls.is_some() { "https" } else { "http" },
        metrics_listener.local_addr()?
    );
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(lines.as_bytes())?;
    stdout.flush()?;
    drop(stdout);

    let http_tls = match &tls {
        Some(t) => Some(t.rustls()?),
        None => None,
    };
    let endpoint = |registry| {
        Arc::new(stagecoach_coordinator::http::Endpoint {
            registry,
            auth: auth.clone(),
            tls: http_tls.clone(),
        })
    };
    let Some((job, driver, metrics)) = prepared else {
        let registry = Metrics::new().registry().clone();
        let http = stagecoach_coordinator::http::serve(metrics_listener, endpoint(registry));
        let coordinator = Arc::new(Coordinator::new("none").with_auth(auth.clone()));
        tokio::select! {
            served = serve(listener, coordinator, tls.as_ref(), shutdown) => served?,
            () = http => {}
        }
        return Ok(());
    };
    let (events, rx) = tokio::sync::mpsc::channel(1024);
    let snapshot = driver.snapshot();
    let mut finished = snapshot.clone();
    let coordinator = Arc::new(
        Coordinator::with_driver(
            job.job.name.clone(),
            DriverHandle {
                events,
                snapshot,
                leases: driver.leases(),
            },
        )
        .with_auth(auth.clone()),
    );
    let span = tracing::info_span!("job", job = %job.job.name);
    let mut driver_task = tokio::spawn(tracing::Instrument::instrument(driver.run(rx), span));
    // Serve until a signal, or until the job is over (after a moment for workers to hear it),
    // or until the driver task ends early (it crashed): the task is awaited either way.
    let over = async move {
        let _ = finished
            .wait_for(|s| {
                s.state == JobState::Finished as i32 || s.state == JobState::Failed as i32
            })
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let metrics_server =
        stagecoach_coordinator::http::serve(metrics_listener, endpoint(metrics.registry().clone()));
    let outcome = finished_outcome(&coordinator);
    let mut crashed = None;
    {
        let served = serve(listener, coordinator.clone(), tls.as_ref(), async {
            tokio::select! {
                _ = shutdown => {}
                _ = over => {}
                ended = &mut driver_task => crashed = Some(ended),
                () = metrics_server => {}
            }
        });
        served.await?;
    }
    match crashed {
        Some(Err(e)) if e.is_panic() => {
            anyhow::bail!("the job's driver crashed ({e}); the state store holds every committed step: restart the coordinator to resume")
        }
        Some(_) => anyhow::bail!("the job's driver stopped unexpectedly"),
        None => {
            driver_task.abort();
            if let Err(e) = driver_task.await {
                if e.is_panic() {
                    anyhow::bail!("the job's driver crashed ({e})");
                }
            }
        }
    }
    outcome()
}

/// Reads and checks the job file, opens the state store and builds the driver where the
/// ledger ends.
async fn prepare(
    path: &std::path::Path,
    state: &str,
) -> anyhow::Result<(JobFile, Driver, Arc<Metrics>)> {
    let job = JobFile::load(path)?;
    let store = stagecoach_coordinator::store::open(state).await?;
    let ledger = StoreLedger::new(store, job.job.name.clone());
    // An interrupted rewind is finished before anything reads the ledger.
    ledger.recover().await?;
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
    let (driver, _) = Driver::new(job.to_proto(), settings, Box::new(ledger), Some(resume))?;
    let spikes = job.spike_config();
    let policy = Policy {
        checkpoints: Some(job.checkpoint_config()),
        spikes: spikes.enabled.then_some(spikes),
        recovery: job.recovery.clone(),
        index: ledger_index,
        events: ledger_events,
    };
    let metrics = Arc::new(Metrics::new());
    let driver = driver.with_policy(policy).with_metrics(metrics.clone());
    Ok((job, driver, metrics))
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
