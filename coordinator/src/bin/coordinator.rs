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
use stagecoach_coordinator::driver::{Driver, Policy, Resume, RunEnd, Settings};
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
    /// Run as one of several replicas of the job's coordinator (needs --state etcd://...): the
    /// replicas elect a leader in etcd, which runs the job; the others stand by, answer every
    /// call with the leader's URL, and take over when it goes.
    #[arg(long, requires = "job")]
    ha: bool,
    /// With --ha: the URL clients reach this replica at (what the others tell them); default
    /// http(s)://LISTEN when --listen names a host.
    #[arg(
        long,
        value_name = "URL",
        env = "STAGECOACH_ADVERTISE",
        requires = "ha"
    )]
    advertise: Option<String>,
    /// With --ha: the election lease in seconds. A leader that cannot renew it for this long
    /// steps down; a dead leader is replaced after at most this long.
    #[arg(long, value_name = "SECONDS", default_value_t = 5, requires = "ha",
          value_parser = clap::value_parser!(u64).range(1..=300))]
    election_ttl: u64,
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
    if args.ha {
        return replica(&args, tls, auth, shutdown).await;
    }
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
    let endpoint = |registry, page: Option<stagecoach_coordinator::page::PageSource>| {
        Arc::new(stagecoach_coordinator::http::Endpoint {
            registry,
            auth: auth.clone(),
            tls: http_tls.clone(),
            page: page.map(std::sync::OnceLock::from).unwrap_or_default(),
            leading: None,
        })
    };
    let Some((job, driver, metrics)) = prepared else {
        let registry = Metrics::new().registry().clone();
        let http = stagecoach_coordinator::http::serve(metrics_listener, endpoint(registry, None));
        let coordinator = Arc::new(Coordinator::new("none").with_auth(auth.clone()));
        tokio::select! {
            served = serve(listener, coordinator, tls.as_ref(), shutdown) => served?,
            () = http => {}
        }
        return Ok(());
    };
    let (events, rx) = tokio::sync::mpsc::channel(1024);
    let snapshot = driver.snapshot();
    let finished = snapshot.clone();
    let handle = DriverHandle {
        events,
        snapshot,
        leases: driver.leases(),
    };
    let page = stagecoach_coordinator::page::PageSource {
        job: job.job.name.clone(),
        driver: handle.clone(),
        view: driver.view(),
    };
    let coordinator =
        Arc::new(Coordinator::with_driver(job.job.name.clone(), handle).with_auth(auth.clone()));
    let span = tracing::info_span!("job", job = %job.job.name);
    let mut driver_task = tokio::spawn(tracing::Instrument::instrument(driver.run(rx), span));
    // Serve until a signal, or until the job is over (after a moment for workers to hear it),
    // or until the driver task ends early (it crashed): the task is awaited either way.
    let over = job_over(finished);
    let metrics_server = stagecoach_coordinator::http::serve(
        metrics_listener,
        endpoint(metrics.registry().clone(), Some(page)),
    );
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
    let metrics = Arc::new(Metrics::new());
    let driver = driver_on(&job, store, metrics.clone()).await?;
    Ok((job, driver, metrics))
}

/// The driver of `job` over `store`, where its ledger ends.
async fn driver_on(
    job: &JobFile,
    store: Arc<dyn stagecoach_coordinator::store::StateStore>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Driver> {
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
    Ok(driver.with_policy(policy).with_metrics(metrics))
}

/// `--ha`: one replica of the job's coordinator. Joins the election and serves at once as a
/// standby (every call answered with the leader's URL); once elected, builds the driver from
/// the store, fenced on its election key, and runs the job. Steps down (exits with status 3)
/// when its election lease lapses or a write is fenced off; resigns on a signal, so that a
/// standby takes over without waiting for the lease.
async fn replica(
    args: &Args,
    tls: Option<ServerTls>,
    auth: Arc<Auth>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use stagecoach_coordinator::ha::Election;
    use stagecoach_coordinator::server::Replicas;
    use stagecoach_coordinator::store::{self, etcd::EtcdStore};

    let path = args.job.as_deref().context("--ha needs --job")?;
    let job = JobFile::load(path)?;
    let (endpoints, prefix) = store::etcd_url(&args.state)
        .context("--ha needs the state in etcd (--state etcd://host:port[,host:port...][/prefix]): the replicas elect their leader there")??;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let advertise = match &args.advertise {
        Some(url) => url.clone(),
        None if args.listen.ip().is_unspecified() => anyhow::bail!(
            "--listen {} names no host the other replicas and the workers can reach: give --advertise URL",
            args.listen
        ),
        None => format!("{scheme}://{}", args.listen),
    };
    let store = EtcdStore::connect(&endpoints, &prefix).await?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let metrics_listener = TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot serve metrics on {}", args.metrics_listen))?;
    // With port 0 the URL takes the port chosen.
    let advertise = if args.advertise.is_none() {
        format!("{scheme}://{}", listener.local_addr()?)
    } else {
        advertise
    };
    let ttl = Duration::from_secs(args.election_ttl);
    let election = Election::join(&endpoints, &prefix, &job.job.name, &advertise, ttl).await?;
    stagecoach_coordinator::metrics::leadership(false);
    let lines = format!(
        "listening on {}\nmetrics on {scheme}://{}/metrics\n",
        listener.local_addr()?,
        metrics_listener.local_addr()?
    );
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(lines.as_bytes())?;
    stdout.flush()?;
    drop(stdout);

    let metrics = Arc::new(Metrics::new());
    let coordinator = Arc::new(
        Coordinator::standby(
            job.job.name.clone(),
            Replicas {
                advertise: advertise.clone(),
                candidates: election.candidates(),
            },
        )
        .with_auth(auth.clone()),
    );
    let endpoint = Arc::new(stagecoach_coordinator::http::Endpoint {
        registry: metrics.registry().clone(),
        auth: auth.clone(),
        tls: match &tls {
            Some(t) => Some(t.rustls()?),
            None => None,
        },
        page: std::sync::OnceLock::new(),
        leading: Some(coordinator.leading()),
    });
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let server = {
        let coordinator = coordinator.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            serve(listener, coordinator, tls.as_ref(), async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
        })
    };
    let _http = AbortOnDrop(tokio::spawn(stagecoach_coordinator::http::serve(
        metrics_listener,
        endpoint.clone(),
    )));
    tracing::info!(%advertise, "standing by");
    let mut lost = election.lost();
    tokio::pin!(shutdown);

    // Standing by: until elected, a signal, or the lease lost.
    let leadership = tokio::select! {
        won = election.campaign() => match won {
            Ok(leadership) => leadership,
            Err(store::StoreError::Fenced(reason)) => {
                step_down(&format!("while standing by: {reason}"))
            }
            Err(e) => return Err(e.into()),
        },
        () = &mut shutdown => {
            let _ = stop.send(true);
            election.resign().await;
            let _ = server.await;
            return Ok(());
        }
        reason = lost.wait_for(Option::is_some) => {
            let reason = reason.map(|r| r.clone().unwrap_or_default()).unwrap_or_default();
            step_down(&format!("while standing by: {reason}"));
        }
    };
    stagecoach_coordinator::metrics::leadership(true);
    let fenced: Arc<dyn store::StateStore> = Arc::new(store.fenced(leadership.fence));
    // Reading the job back from the store: an outage (an etcd member gone, a leader election
    // in etcd) is waited out for a while, as the driver waits out one while it runs.
    let elected = std::time::Instant::now();
    let driver = loop {
        match driver_on(&job, fenced.clone(), metrics.clone()).await {
            Ok(d) => break d,
            Err(e) if is_fenced(&e) => step_down(&format!("{e:#}")),
            Err(e)
                if store_error(&e).is_some_and(|s| s.retryable())
                    && elected.elapsed() < READ_BACK_PATIENCE =>
            {
                if let Some(reason) = lost.borrow().clone() {
                    step_down(&reason);
                }
                tracing::warn!(error = %format!("{e:#}"), "cannot read the job back from the state store yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let (events, rx) = tokio::sync::mpsc::channel(1024);
    let finished = driver.snapshot();
    let handle = DriverHandle {
        events,
        snapshot: driver.snapshot(),
        leases: driver.leases(),
    };
    // The status page first: the HTTP endpoint serves it from when this replica leads.
    let _ = endpoint.page.set(stagecoach_coordinator::page::PageSource {
        job: job.job.name.clone(),
        driver: handle.clone(),
        view: driver.view(),
    });
    coordinator.lead(handle);
    tracing::info!(%advertise, "leading the job");
    let span = tracing::info_span!("job", job = %job.job.name);
    let mut driver_task = tokio::spawn(tracing::Instrument::instrument(driver.run(rx), span));
    let over = job_over(finished);
    let outcome = finished_outcome(&coordinator);
    tokio::select! {
        ended = &mut driver_task => match ended {
            Ok(RunEnd::Deposed(reason)) => step_down(&reason),
            Ok(RunEnd::Closed) => anyhow::bail!("the job's driver stopped unexpectedly"),
            Err(e) => anyhow::bail!("the job's driver crashed ({e}); the state store holds every committed step: another replica takes over"),
        },
        reason = lost.wait_for(Option::is_some) => {
            let reason = reason.map(|r| r.clone().unwrap_or_default()).unwrap_or_default();
            step_down(&reason);
        }
        () = &mut shutdown => {}
        () = over => {}
    }
    driver_task.abort();
    let _ = stop.send(true);
    election.resign().await;
    let _ = server.await;
    outcome()
}

/// How long an elected replica keeps trying to read its job back through a store outage.
const READ_BACK_PATIENCE: Duration = Duration::from_secs(30);

/// The state store's error behind `e`, if that is what it is.
fn store_error(e: &anyhow::Error) -> Option<&stagecoach_coordinator::store::StoreError> {
    e.chain().find_map(|c| {
        c.downcast_ref::<stagecoach_coordinator::store::StoreError>()
            .or(match c.downcast_ref::<stagecoach_coordinator::Error>() {
                Some(stagecoach_coordinator::Error::Store(s)) => Some(s),
                _ => None,
            })
    })
}

/// Whether a failure to build the driver is a fenced write (another replica leads already).
fn is_fenced(e: &anyhow::Error) -> bool {
    matches!(
        store_error(e),
        Some(stagecoach_coordinator::store::StoreError::Fenced(_))
    )
}

/// Leaves at once, telling why: another replica leads (or will), and this one must not talk to
/// workers or write any more. Status 3, so that a supervisor restarts it as a standby.
fn step_down(reason: &str) -> ! {
    stagecoach_coordinator::metrics::leadership(false);
    tracing::error!(%reason, "stepping down: this coordinator no longer leads the job");
    eprintln!("stagecoach-coordinator: stepping down: {reason}");
    std::process::exit(3)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves once the job finished or failed, after a moment for the workers to hear it.
async fn job_over(
    mut snapshot: tokio::sync::watch::Receiver<stagecoach_coordinator::status::Snapshot>,
) {
    let _ = snapshot
        .wait_for(|s| s.state == JobState::Finished as i32 || s.state == JobState::Failed as i32)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
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
