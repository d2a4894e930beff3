//! The embedded state store's memory and compaction cost as a ledger grows, against the whole
//! state held in memory (what the store kept before segments), in the same run.
//!
//! For each step count: a ledger's shape, one new `jobs/bench/ledger/steps/{step}` key per step
//! (a `--value-bytes` record) and `jobs/bench/ledger/last` rewritten every step, committed
//! `--steps-per-commit` steps to a transaction (the memory and compaction figures do not depend
//! on it; one fsync per step would only make the run long). Each side runs in a child process of
//! its own, so that one's freed memory is not the other's: the store (its default flush size),
//! then the reference, a `BTreeMap` of the same keys and values with their metadata. Reported:
//! the process's resident memory growth, the store's own estimate of what it holds (memtables
//! and index), its segments, the bytes its flushes and merges wrote against the bytes written
//! (and what a whole-state snapshot per flush, the store's former compaction, would have
//! written: computed, for the same flush size), and point reads of random steps. Writes
//! (overwrites) a markdown table.
//!
//! Usage: bench_store [--machine "8-core workstation"] [--output bench/results/store-cpu.md]
//!                    [--steps 10000,100000,400000,1600000] [--dir target/bench-store]

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use serde::{Deserialize, Serialize};
use stagecoach_coordinator::store::embedded::{EmbeddedStore, DEFAULT_COMPACT_AFTER_BYTES};
use stagecoach_coordinator::store::{Op, StateStore, Versioned};

#[derive(Parser)]
#[command(about = "The embedded store's memory and compaction cost against an in-memory map")]
struct Args {
    /// How to name this machine in the results (default: "<cores>-core machine (<arch>)").
    #[arg(long)]
    machine: Option<String>,
    /// The markdown file to write.
    #[arg(long, default_value = "bench/results/store-cpu.md")]
    output: PathBuf,
    /// Ledger lengths to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [10_000u64, 100_000, 400_000, 1_600_000])]
    steps: Vec<u64>,
    #[arg(long, default_value_t = 288)]
    value_bytes: usize,
    #[arg(long, default_value_t = 100)]
    steps_per_commit: u64,
    /// Where the stores are written (each deleted afterwards).
    #[arg(long, default_value = "target/bench-store")]
    dir: PathBuf,
    /// Internal: run one side in this process and print its figures as JSON.
    #[arg(long, hide = true)]
    side: Option<String>,
}

#[derive(Serialize, Deserialize, Default)]
struct Figures {
    rss_growth: u64,
    memory_estimate: u64,
    memory_peak: u64,
    segments: usize,
    segment_bytes: u64,
    written: u64,
    data: u64,
    write_secs: f64,
    get_p50_us: f64,
    get_p99_us: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(side) = &args.side {
        let steps = args.steps[0];
        let figures = tokio::runtime::Runtime::new()?.block_on(run_side(side, steps, &args))?;
        println!("{}", serde_json::to_string(&figures)?);
        return Ok(());
    }
    let machine = args.machine.clone().unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        format!("{cores}-core machine ({})", std::env::consts::ARCH)
    });
    std::fs::create_dir_all(&args.dir).with_context(|| args.dir.display().to_string())?;
    let header = "| steps | data written | store: RSS growth | store: held at the end, at most (estimate) | in-memory map: RSS growth | RSS store / map | segments | on disk | compaction wrote / data | whole-state snapshots would write / data | store get p50 / p99 | map get p50 / p99 |";
    println!("{header}");
    let mut rows = Vec::new();
    for &steps in &args.steps {
        let store = child(&args, "store", steps)?;
        let map = child(&args, "map", steps)?;
        let snapshots = snapshot_bytes(steps, args.value_bytes, args.steps_per_commit);
        let row = format!(
            "| {steps} | {} | {} | {}, {} | {} | {:.3} | {} | {} | {:.2} | {:.1} | {:.1} / {:.1} µs | {:.2} / {:.2} µs |",
            mib(store.data),
            mib(store.rss_growth),
            mib(store.memory_estimate),
            mib(store.memory_peak),
            mib(map.rss_growth),
            store.rss_growth as f64 / map.rss_growth.max(1) as f64,
            store.segments,
            mib(store.segment_bytes),
            store.written as f64 / store.data as f64,
            snapshots as f64 / store.data as f64,
            store.get_p50_us,
            store.get_p99_us,
            map.get_p50_us,
            map.get_p99_us,
        );
        println!("{row}");
        rows.push(row);
    }
    let mut report = String::new();
    writeln!(
        report,
        "# Embedded state store: memory and compaction as a ledger grows\n"
    )?;
    writeln!(
        report,
        "Machine: {machine}. `make bench-store` (coordinator/src/bin/bench_store.rs): a ledger of \
         `steps` steps ({} B per step record and the `last` key rewritten every step, {} steps \
         to a transaction) written into the embedded store (flush size {} MiB), and the same \
         keys and values in a `BTreeMap` with their metadata, each in a child process of its \
         own. RSS growth is the process's resident memory after the writes and reads less before \
         (freed memory the allocator keeps counts: it shows the peak); 'held' is the store's \
         own estimate of its memtables and index (`StoreStats::memory_bytes`). \
         'Whole-state snapshots would write' is computed: the state's size summed over every \
         flush, what the store's compaction wrote before segments. Gets: 2,000 random steps.\n",
        args.value_bytes,
        args.steps_per_commit,
        DEFAULT_COMPACT_AFTER_BYTES >> 20,
    )?;
    writeln!(report, "{header}")?;
    writeln!(report, "|{}", "---|".repeat(header.matches(" |").count()))?;
    for row in rows {
        writeln!(report, "{row}")?;
    }
    if let Some(dir) = args.output.parent() {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    }
    std::fs::write(&args.output, report).with_context(|| args.output.display().to_string())?;
    println!("wrote {}", args.output.display());
    Ok(())
}

fn child(args: &Args, side: &str, steps: u64) -> anyhow::Result<Figures> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .args(["--side", side, "--steps", &steps.to_string()])
        .args(["--value-bytes", &args.value_bytes.to_string()])
        .args(["--steps-per-commit", &args.steps_per_commit.to_string()])
        .arg("--dir")
        .arg(&args.dir)
        .output()?;
    if !out.status.success() {
        bail!(
            "the {side} side for {steps} steps failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8(out.stdout)?;
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("the {side} side printed {text:?}"))
}

fn step_key(step: u64) -> String {
    format!("jobs/bench/ledger/steps/{step:012}")
}

fn value(step: u64, bytes: usize) -> Vec<u8> {
    let mut v = step.to_le_bytes().repeat(bytes / 8 + 1);
    v.truncate(bytes);
    v
}

async fn run_side(side: &str, steps: u64, args: &Args) -> anyhow::Result<Figures> {
    let before = rss()?;
    let mut figures = Figures::default();
    let started = Instant::now();
    let keys: Vec<u64> = (0..2000u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % steps)
        .collect();
    let mut samples = Vec::with_capacity(keys.len());
    match side {
        "store" => {
            let dir = args
                .dir
                .join(format!("store-{steps}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let store = EmbeddedStore::open(&dir)?;
            for first in (0..steps).step_by(args.steps_per_commit as usize) {
                let last = (first + args.steps_per_commit).min(steps);
                let mut ops: Vec<Op> = (first..last)
                    .map(|step| Op::Put {
                        key: step_key(step),
                        value: value(step, args.value_bytes),
                    })
                    .collect();
                ops.push(Op::Put {
                    key: "jobs/bench/ledger/last".into(),
                    value: last.to_le_bytes().to_vec(),
                });
                figures.data += data_bytes(&ops);
                store.txn(Vec::new(), ops).await?;
                figures.memory_peak = figures.memory_peak.max(store.stats().memory_bytes());
            }
            figures.write_secs = started.elapsed().as_secs_f64();
            for &step in &keys {
                let t = Instant::now();
                let got = store.get(&step_key(step)).await?;
                samples.push(t.elapsed().as_secs_f64() * 1e6);
                if got.map(|v| v.value) != Some(value(step, args.value_bytes)) {
                    bail!("step {step} read back wrong");
                }
            }
            let stats = store.stats();
            figures.rss_growth = rss()?.saturating_sub(before);
            figures.memory_estimate = stats.memory_bytes();
            figures.segments = stats.segments;
            figures.segment_bytes = stats.segment_bytes;
            figures.written = stats.written_bytes;
            drop(store);
            std::fs::remove_dir_all(&dir)?;
        }
        "map" => {
            let mut map = std::collections::BTreeMap::new();
            for step in 0..steps {
                let v = Versioned {
                    value: value(step, args.value_bytes),
                    version: 1,
                    mod_revision: step + 1,
                };
                figures.data += (step_key(step).len() + v.value.len()) as u64;
                map.insert(step_key(step), v);
            }
            figures.write_secs = started.elapsed().as_secs_f64();
            for &step in &keys {
                let t = Instant::now();
                let got = map.get(&step_key(step)).cloned();
                samples.push(t.elapsed().as_secs_f64() * 1e6);
                if got.is_none() {
                    bail!("step {step} missing");
                }
            }
            figures.rss_growth = rss()?.saturating_sub(before);
            std::hint::black_box(&map);
        }
        other => bail!("unknown side {other}"),
    }
    samples.sort_by(f64::total_cmp);
    figures.get_p50_us = samples[samples.len() / 2];
    figures.get_p99_us = samples[samples.len() * 99 / 100];
    Ok(figures)
}

fn data_bytes(ops: &[Op]) -> u64 {
    ops.iter()
        .map(|op| match op {
            Op::Put { key, value } => key.len() + value.len(),
            Op::Delete { key } => key.len(),
        } as u64)
        .sum()
}

/// What whole-state snapshots would have written: the state's size each time the log filled
/// (a log op is its key and value and 9 bytes, a commit 60 bytes more with its `last` op; a
/// snapshot entry its key and value and 24 bytes).
fn snapshot_bytes(steps: u64, value_bytes: usize, per_commit: u64) -> u64 {
    let kv = (step_key(0).len() + value_bytes) as u64;
    let (mut log, mut state, mut written) = (0, 0, 0);
    for first in (0..steps).step_by(per_commit as usize) {
        let n = per_commit.min(steps - first);
        log += n * (kv + 9) + 60;
        state += n * (kv + 24);
        if log >= DEFAULT_COMPACT_AFTER_BYTES {
            written += state;
            log = 0;
        }
    }
    written
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// The process's resident memory.
fn rss() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|l| l.trim().strip_suffix("kB"))
        .context("no VmRSS in /proc/self/status")?
        .trim()
        .parse()?;
    Ok(kb * 1024)
}
