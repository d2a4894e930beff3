//! `stagecoach-bench`: N simulated data-parallel ranks against a real coordinator, over the
//! real `Workers` protocol, to measure how many ranks it holds and how fast it steps them.
//!
//! | module | what it is |
//! |---|---|
//! | [`rank`] | one simulated rank: register, session, heartbeats, an answer to every message |
//! | [`node`] | one simulated node in one task: its ranks' registrations, one `NodeSession`, one summed report per step |
//! | [`probe`] | a process's CPU time and peak RSS (`/proc`), the coordinator's `/metrics`, a folder's size |
//! | [`report`] | the figures: Work latency from the ranks' logs, one markdown row, one JSON line |
//!
//! A few ranks share one HTTP/2 connection ([`Options::ranks_per_channel`]), all run on one
//! tokio runtime, and their registrations are bounded ([`Options::joining`]). A run is bounded
//! in time: the world must run within `--form-timeout-secs`, then it steps for `--run-secs`;
//! a world that does not form is a row that says so.

pub mod node;
pub mod probe;
pub mod rank;
pub mod report;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use probe::Usage;
use rank::{RankLog, Shared, Transport};
use report::Figures;
use stagecoach_proto::relay::Relay;
use stagecoach_proto::v1::workers_client::WorkersClient;

/// N simulated ranks against a coordinator; prints one markdown row of what it measured.
#[derive(Debug, Clone, Parser)]
#[command(version)]
pub struct Options {
    /// The coordinator's gRPC URL (plain HTTP/2, no TLS).
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:7070")]
    pub coordinator: String,
    /// Simulated ranks (the job's workers.min and max should be this).
    #[arg(long, short = 'n', value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub ranks: u32,
    /// Ranks sharing one HTTP/2 connection. Kept small: the coordinator's HTTP/2 server (h2)
    /// ends a connection (GOAWAY, ENHANCE_YOUR_CALM "too_many_data_frames") that holds more
    /// small DATA frames it has not read yet than its budget (about 2,400), and every rank
    /// sends a heartbeat a second: with R ranks a connection, a coordinator whose session
    /// readers wait on a busy driver for 2,400 / R seconds loses all R sessions at once, which
    /// a real worker, alone on its connection, would not.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub ranks_per_channel: u32,
    /// Ranks per simulated node. Above 1, the ranks of a node hold their sessions inside one
    /// `NodeSession` through a relay (`stagecoach_proto::relay`, what a node agent runs for
    /// its ranks), and each node has a connection of its own (`--ranks-per-channel` is not
    /// used). 1: every rank holds its own `Session`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub ranks_per_node: u32,
    /// With `--ranks-per-node` above 1, what speaks for a node. `relay`: a task per rank
    /// behind the node's relay, as behind a node agent. `direct`: one task per node that sends
    /// the coordinator what such a relay sends when its ranks agree (one summed report per
    /// step, see `node`), which costs the load generator far less.
    #[arg(long, value_enum, default_value_t = NodeClient::Relay)]
    pub node_client: NodeClient,
    /// Registrations (each with its session's opening) in progress at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub joining: u32,
    /// How long the world may take to run at every rank, from the start.
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    pub form_timeout_secs: f64,
    /// How long to step once the world runs.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub run_secs: f64,
    /// The coordinator's process id: its CPU time and peak RSS (`/proc`).
    #[arg(long, value_name = "PID")]
    pub coordinator_pid: Option<u32>,
    /// The coordinator's Prometheus endpoint (http://host:port/metrics): steps committed and
    /// generations as it counts them.
    #[arg(long, value_name = "URL")]
    pub metrics_url: Option<String>,
    /// The coordinator's embedded state folder (its --state): bytes written per step.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Append the figures as one JSON line to this file.
    #[arg(long, value_name = "FILE")]
    pub json_out: Option<PathBuf>,
    /// A name for the run, kept in the JSON line (e.g. the coordinator build).
    #[arg(long, default_value = "")]
    pub label: String,
    /// The load generator's runtime threads (0: one per core). One leaves the coordinator a
    /// core of a 2-core machine to itself.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print the table's header before the row.
    #[arg(long)]
    pub header: bool,
}

/// What speaks for a simulated node (`--node-client`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NodeClient {
    Relay,
    Direct,
}

impl NodeClient {
    pub fn name(self) -> &'static str {
        match self {
            NodeClient::Relay => "relay",
            NodeClient::Direct => "direct",
        }
    }
}

/// How often formation progress is printed (stderr).
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// How long the ranks may take to end once told to stop, before they are aborted.
const WIND_DOWN: Duration = Duration::from_secs(15);

/// How long a `/metrics` scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

impl Options {
    fn check(&self) -> anyhow::Result<()> {
        let positive = |name: &str, v: f64| {
            anyhow::ensure!(
                v.is_finite() && v > 0.0,
                "{name} must be a positive number of seconds, got {v}"
            );
            Ok(())
        };
        positive("--form-timeout-secs", self.form_timeout_secs)?;
        positive("--run-secs", self.run_secs)?;
        anyhow::ensure!(
            self.coordinator.starts_with("http://"),
            "--coordinator {:?}: give an http:// URL (the bench speaks plain HTTP/2, no TLS)",
            self.coordinator
        );
        if let Some(dir) = &self.state_dir {
            anyhow::ensure!(
                dir.is_dir(),
                "--state-dir {}: not a folder (give the coordinator's --state folder)",
                dir.display()
            );
        }
        Ok(())
    }
}

/// What the probes saw at one moment.
#[derive(Debug, Clone, Default)]
struct Probe {
    coordinator: Option<Usage>,
    metrics: Option<std::collections::BTreeMap<String, f64>>,
    state_bytes: Option<u64>,
}

fn probe(options: &Options, ticks: f64) -> Probe {
    let metrics = options.metrics_url.as_deref().and_then(|url| {
        probe::scrape(url, SCRAPE_TIMEOUT)
            .map_err(|e| eprintln!("stagecoach-bench: {e:#}"))
            .ok()
    });
    let coordinator = options.coordinator_pid.and_then(|pid| {
        probe::usage(&pid.to_string(), ticks)
            .map_err(|e| eprintln!("stagecoach-bench: {e:#}"))
            .ok()
    });
    let state_bytes = options
        .state_dir
        .as_deref()
        .and_then(|d| probe::folder_bytes(d).ok());
    Probe {
        coordinator,
        metrics,
        state_bytes,
    }
}

fn metric(p: &Probe, name: &str) -> Option<f64> {
    p.metrics.as_ref().and_then(|m| probe::metric_sum(m, name))
}

/// Runs the bench and prints its row (and the header with `--header`); appends the JSON line
/// to `--json-out`.
pub fn run(options: Options) -> anyhow::Result<Figures> {
    options.check()?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if options.threads > 0 {
        runtime.worker_threads(options.threads);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let figures = runtime.block_on(bench(&options))?;
    // Whatever a rank still holds (an aborted task's stream) goes with the runtime, now.
    runtime.shutdown_timeout(Duration::from_secs(1));
    let mut stdout = std::io::stdout().lock();
    if options.header {
        writeln!(stdout, "{}", Figures::header())?;
    }
    writeln!(stdout, "{}", figures.row())?;
    if let Some(path) = &options.json_out {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening --json-out {}", path.display()))?;
        writeln!(file, "{}", figures.json())
            .with_context(|| format!("writing --json-out {}", path.display()))?;
    }
    Ok(figures)
}

/// Ranks that share a connection: a channel's, or a node's.
fn per_connection(options: &Options) -> u32 {
    if options.ranks_per_node > 1 {
        options.ranks_per_node
    } else {
        options.ranks_per_channel
    }
}

async fn channels(options: &Options) -> anyhow::Result<Vec<Channel>> {
    let n = options.ranks.div_ceil(per_connection(options)) as usize;
    let per = u64::from(per_connection(options).min(options.ranks));
    // Each real worker has its own connection with HTTP/2's default 64 KiB window; ranks that
    // share one get the sum, so the coordinator can send them as much as it could send them
    // apart.
    let window = (per * 65_535).min(u64::from(u32::MAX >> 1)) as u32;
    let endpoint = Endpoint::from_shared(options.coordinator.clone())
        .with_context(|| format!("--coordinator {:?} is not a URL", options.coordinator))?
        .connect_timeout(Duration::from_secs(10))
        .initial_connection_window_size(window)
        .tcp_nodelay(true);
    // The first connects now, so an unreachable coordinator is an error at once.
    let first = endpoint.connect().await.with_context(|| {
        format!(
            "cannot reach the coordinator at {} (is it running, on that port?)",
            options.coordinator
        )
    })?;
    let mut all = vec![first];
    all.extend((1..n).map(|_| endpoint.connect_lazy()));
    Ok(all)
}

async fn bench(options: &Options) -> anyhow::Result<Figures> {
    let ticks = probe::clock_ticks();
    let n = options.ranks as usize;
    let channels = channels(options).await?;
    let before = tokio::task::block_in_place(|| probe(options, ticks));
    let (shared, mut running) = Shared::new(n, options.joining as usize);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut ranks = tokio::task::JoinSet::new();
    let per = per_connection(options) as usize;
    if options.ranks_per_node > 1 && options.node_client == NodeClient::Direct {
        for (i, channel) in channels.into_iter().enumerate() {
            let ranks_of_node = i * per..((i + 1) * per).min(n);
            ranks.spawn(node::run(
                ranks_of_node,
                shared.clone(),
                channel,
                stop_rx.clone(),
            ));
        }
    } else {
        let transports: Vec<Transport> = channels
            .into_iter()
            .map(|channel| {
                if options.ranks_per_node > 1 {
                    let client = WorkersClient::with_interceptor(channel, Default::default());
                    Transport::Node(Arc::new(Relay::new(client)))
                } else {
                    Transport::Own(channel)
                }
            })
            .collect();
        for i in 0..n {
            let transport = transports[i / per].clone();
            ranks.spawn(rank::run(i, shared.clone(), transport, stop_rx.clone()));
        }
    }
    let start = Instant::now();
    let form_deadline = start + Duration::from_secs_f64(options.form_timeout_secs);
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    progress.tick().await;
    let formed = loop {
        tokio::select! {
            r = running.wait_for(|r| *r) => break r.is_ok(),
            () = tokio::time::sleep_until(form_deadline.into()) => break false,
            _ = progress.tick() => print_progress(&shared, start),
        }
    };
    let mut figures = Figures {
        label: options.label.clone(),
        ranks: n,
        ranks_per_node: options.ranks_per_node,
        node_client: (options.ranks_per_node > 1).then(|| options.node_client.name()),
        form_timeout_seconds: options.form_timeout_secs,
        ..Default::default()
    };
    let (at_running, counted, end) = if formed {
        let r = *shared.running.get().expect("set before the signal");
        let first = *shared.first_register.get().unwrap_or(&start);
        figures.formed_seconds = Some(r.at.saturating_duration_since(first).as_secs_f64());
        eprintln!(
            "stagecoach-bench: {n} ranks: world of {} (generation {}) running after {:.1} s; stepping for {} s",
            r.world_size,
            r.generation,
            figures.formed_seconds.unwrap_or_default(),
            options.run_secs
        );
        // The ranks' count and the coordinator's are read together at each end of the window
        // (the scrape first, as it is the quickest of the probes).
        let steps_before = shared.max_work_step.load(Ordering::Relaxed);
        let at_running = tokio::task::block_in_place(|| probe(options, ticks));
        let window_start = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(options.run_secs)).await;
        let window_end = Instant::now();
        let steps_after = shared.max_work_step.load(Ordering::Relaxed);
        let end = tokio::task::block_in_place(|| probe(options, ticks));
        figures.run_seconds = (window_end - window_start).as_secs_f64();
        // Work for step k means step k - 1 is committed: the highest step given out counts
        // the committed steps.
        figures.steps = Some(steps_after - steps_before);
        if let (Some(a), Some(b)) = (
            metric(&at_running, "stagecoach_job_step"),
            metric(&end, "stagecoach_job_step"),
        ) {
            figures.coordinator_steps = Some((b - a).max(0.0) as u64);
        }
        // The latencies are those of the steps counted, so that there is one for each rank
        // and step (Work that came while a probe ran is in both or in neither).
        (at_running, Some(steps_before + 1..=steps_after), end)
    } else {
        eprintln!(
            "stagecoach-bench: {n} ranks: no world ran within {} s",
            options.form_timeout_secs
        );
        print_progress(&shared, start);
        let at_timeout = tokio::task::block_in_place(|| probe(options, ticks));
        (at_timeout.clone(), None, at_timeout)
    };
    figures.registered = shared.counts.registered.load(Ordering::Relaxed);
    figures.attached = shared.counts.attached.load(Ordering::Relaxed);
    figures.readies = shared.counts.readies.load(Ordering::Relaxed);
    stop_tx.send_replace(true);
    let logs = collect(&mut ranks).await;
    let c = &shared.counts;
    figures.leases_lost = c.leases_lost.load(Ordering::Relaxed);
    figures.sessions_broken = c.sessions_broken.load(Ordering::Relaxed);
    figures.stops = c.stops.load(Ordering::Relaxed);
    figures.join_errors = c.join_errors.load(Ordering::Relaxed);
    figures.job_over = c.job_over.load(Ordering::Relaxed);
    figures.last_work_step = shared.max_work_step.load(Ordering::Relaxed);
    figures.first_break = c
        .first_break
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Some(counted) = counted {
        let latencies = report::step_latencies(&logs, counted);
        figures.latency_samples = latencies.len();
        let ms = |q: f64| report::quantile(&latencies, q).map(|ns| ns as f64 / 1e6);
        if let (Some(p50), Some(p99), Some(max)) = (ms(0.5), ms(0.99), ms(1.0)) {
            figures.latency_ms = Some((p50, p99, max));
        }
    }
    figures.generations = metric(&end, "stagecoach_job_generations_total").map(|g| g as u64);
    figures.generations_ended =
        metric(&end, "stagecoach_job_generations_ended_total").map(|g| g as u64);
    if let (Some(b), Some(r)) = (&before.coordinator, &at_running.coordinator) {
        figures.coordinator_cpu_formation = Some(r.cpu_seconds - b.cpu_seconds);
        if formed {
            if let Some(e) = &end.coordinator {
                figures.coordinator_cpu_run = Some(e.cpu_seconds - r.cpu_seconds);
            }
        }
    }
    figures.coordinator_peak_rss_bytes = end
        .coordinator
        .or(at_running.coordinator)
        .map(|u| u.peak_rss_bytes);
    if let (Some(a), Some(b), true) = (at_running.state_bytes, end.state_bytes, formed) {
        // Committed steps by the coordinator's count when it was read, else the ranks'.
        let steps = figures.coordinator_steps.or(figures.steps).unwrap_or(0);
        if b < a {
            figures.store_compacted = true;
        } else if steps > 0 {
            figures.store_bytes_per_step = Some((b - a) as f64 / steps as f64);
        }
    }
    figures.bench_cpu = probe::usage("self", ticks).ok().map(|u| u.cpu_seconds);
    Ok(figures)
}

/// Waits for every rank to end (they were told to stop), aborting those still running after
/// [`WIND_DOWN`]; their logs.
async fn collect(ranks: &mut tokio::task::JoinSet<RankLog>) -> Vec<RankLog> {
    let mut logs = Vec::with_capacity(ranks.len());
    let deadline = tokio::time::Instant::now() + WIND_DOWN;
    loop {
        match tokio::time::timeout_at(deadline, ranks.join_next()).await {
            Ok(Some(Ok(log))) => logs.push(log),
            Ok(Some(Err(e))) => eprintln!("stagecoach-bench: a rank task failed: {e}"),
            Ok(None) => break,
            Err(_) => {
                eprintln!(
                    "stagecoach-bench: {} ranks did not stop within {} s; aborted (their logs are lost)",
                    ranks.len(),
                    WIND_DOWN.as_secs()
                );
                ranks.abort_all();
                break;
            }
        }
    }
    logs
}

fn print_progress(shared: &Arc<Shared>, start: Instant) {
    let c = &shared.counts;
    eprintln!(
        "stagecoach-bench: {:.0} s: {}/{} registered, {} in a session, {} World, {} Ready, {} leases lost, {} failed joins",
        start.elapsed().as_secs_f64(),
        c.registered.load(Ordering::Relaxed),
        shared.ranks,
        c.attached.load(Ordering::Relaxed),
        c.worlds.load(Ordering::Relaxed),
        c.readies.load(Ordering::Relaxed),
        c.leases_lost.load(Ordering::Relaxed),
        c.join_errors.load(Ordering::Relaxed),
    );
}
