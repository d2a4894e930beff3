//! How long training waits for a checkpoint: the asynchronous save (the state copied off on the
//! trainer thread, written in the background) against a synchronous save of the same model
//! state (copy, write, sha256, fsync, rename, all on the calling thread), in the same run, for
//! each preset, on the CPU.
//!
//! For each preset: a model and an AdamW optimizer with non-zero moments (one update from random
//! gradients), then one round more than `--repeats` of one asynchronous save (its blocking time;
//! its write is waited for before the next save, so saves never overlap) and one synchronous
//! save, each into a fresh folder under `--dir` that is deleted afterwards. The first
//! asynchronous save (into fresh memory) is reported on its own, the others (into the writer's
//! kept buffers) as a median. Writes (overwrites) a markdown table.
//!
//! Usage: bench_checkpoint [--machine "8-core workstation"] [--output bench/results/checkpoint-cpu.md]
//!                         [--presets tiny,smollm2-135m] [--repeats 5] [--dir target/bench-checkpoint]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Parser;
use stagecoach_worker::checkpoint::{save_sync, Meta, Request, State, Writer};
use stagecoach_worker::model::{Llama, ModelConfig};
use stagecoach_worker::optim::{AdamW, AdamWConfig};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

#[derive(Parser)]
#[command(
    about = "Checkpoint blocking time: asynchronous save vs a synchronous save of the same state"
)]
struct Args {
    /// How to name this machine in the results (default: "<cores>-core machine (<arch>)").
    #[arg(long)]
    machine: Option<String>,
    /// The markdown file to write.
    #[arg(long, default_value = "bench/results/checkpoint-cpu.md")]
    output: PathBuf,
    /// Model presets to measure.
    #[arg(long, value_delimiter = ',', default_values_t = ["tiny".to_string(), "smollm2-135m".to_string()])]
    presets: Vec<String>,
    /// Rounds per preset (one asynchronous and one synchronous save each).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Where the checkpoint folders are written (and deleted); on the disk to be measured.
    #[arg(long, default_value = "target/bench-checkpoint")]
    dir: PathBuf,
    /// Intra-op threads of libtorch (the copies).
    #[arg(long, default_value_t = 2)]
    threads: i32,
}

struct Row {
    preset: String,
    parameters: i64,
    bytes: u64,
    repeats: usize,
    /// The first asynchronous save, which copies into fresh memory.
    blocking_first: f64,
    /// Later ones, which copy into the writer's buffers from the save before (median).
    blocking: f64,
    background_write: f64,
    sync: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    tch::set_num_threads(args.threads);
    let machine = args.machine.clone().unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        format!("{cores}-core machine ({})", std::env::consts::ARCH)
    });
    std::fs::create_dir_all(&args.dir).with_context(|| args.dir.display().to_string())?;
    println!(
        "| preset | parameters | checkpoint | rounds | async, first save: training blocked | async: training blocked | async: background write | sync save: training blocked | async blocked / sync |"
    );
    let mut rows = Vec::new();
    for preset in &args.presets {
        let row = measure(preset, args.repeats, &args.dir).with_context(|| preset.clone())?;
        println!("{}", line(&row));
        rows.push(row);
    }
    let report = report(&machine, args.threads, &rows);
    if let Some(dir) = args.output.parent() {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    }
    std::fs::write(&args.output, report).with_context(|| args.output.display().to_string())?;
    println!("wrote {}", args.output.display());
    Ok(())
}

fn measure(preset: &str, repeats: usize, dir: &Path) -> anyhow::Result<Row> {
    let config = ModelConfig::preset(preset)?;
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let _model = Llama::new(&vs, config.clone())?;
    let mut optimizer = AdamW::new(&vs, AdamWConfig::default())?;
    // d/dp sum(p * g) = g: one update from random gradients gives the moments real values.
    let loss = optimizer
        .params()
        .iter()
        .map(|p| {
            (&p.param * Tensor::randn(p.param.size(), (Kind::Float, Device::Cpu))).sum(Kind::Float)
        })
        .fold(Tensor::from(0f32), |a, b| a + b);
    loss.backward();
    optimizer.step(1e-3);
    optimizer.zero_grad();
    let state = State {
        vs: &vs,
        optimizer: &optimizer,
        config: &config,
    };
    let meta = Meta {
        job: "bench".into(),
        step: 1,
        cursors: vec![0],
        stage_taken: vec![0],
        ..Default::default()
    };
    let writer = Writer::new()?;
    let (mut blocking, mut background, mut sync) = (Vec::new(), Vec::new(), Vec::new());
    let mut bytes = 0;
    // One round more than asked: the first asynchronous save is reported on its own.
    for round in 0..=repeats {
        let path = dir.join(format!("{preset}-async-{round}"));
        let (tx, rx) = std::sync::mpsc::channel();
        let request = Request {
            path: path.clone(),
            id: round as u64,
            delete: Vec::new(),
        };
        blocking.push(writer.save(state, &meta, request, move |saved| {
            let _ = tx.send(saved);
        })?);
        let saved = rx.recv().context("the writer thread ended")?;
        if let Some(e) = saved.error {
            bail!("asynchronous save: {e}");
        }
        background.push(saved.write_seconds);
        bytes = saved.bytes;
        remove(&path)?;

        let path = dir.join(format!("{preset}-sync-{round}"));
        let request = Request {
            path: path.clone(),
            id: round as u64,
            delete: Vec::new(),
        };
        let saved = save_sync(state, &meta, &request)?;
        if saved.bytes != bytes {
            bail!(
                "the synchronous save wrote {} bytes, the asynchronous one {bytes}",
                saved.bytes
            );
        }
        sync.push(saved.blocking_seconds);
        remove(&path)?;
    }
    Ok(Row {
        preset: preset.into(),
        parameters: config.num_parameters(),
        bytes,
        repeats,
        blocking_first: blocking[0],
        blocking: median(&mut blocking[1..]),
        background_write: median(&mut background[1..]),
        sync: median(&mut sync[1..]),
    })
}

fn remove(path: &Path) -> anyhow::Result<()> {
    std::fs::remove_dir_all(path).with_context(|| path.display().to_string())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn line(r: &Row) -> String {
    format!(
        "| {} | {:.1}M | {:.1} MB | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.3} ({:.0}x less) |",
        r.preset,
        r.parameters as f64 / 1e6,
        r.bytes as f64 / 1e6,
        r.repeats,
        r.blocking_first * 1e3,
        r.blocking * 1e3,
        r.background_write * 1e3,
        r.sync * 1e3,
        r.blocking / r.sync,
        r.sync / r.blocking.max(1e-12)
    )
}

fn report(machine: &str, threads: i32, rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Checkpoint blocking time: asynchronous vs synchronous save (CPU)\n"
    );
    let _ = writeln!(
        s,
        "`make bench-checkpoint`; {} on {machine}, libtorch with {threads} threads, checkpoints \
         written to the machine's disk. Per preset, a model and AdamW optimizer with non-zero \
         moments; each round takes one asynchronous save (`checkpoint::Writer::save`: parameters \
         and both moments copied to CPU buffers on the calling thread, which is all training \
         waits for; the folder then written, hashed (sha256), fsynced and renamed by the writer \
         thread) and one synchronous save of the same state (`checkpoint::save_sync`: the same \
         bytes written straight from the live tensors, hashed, fsynced and renamed before it \
         returns), each into a new folder, deleted afterwards. A save starts only after the \
         previous write ended. The first asynchronous save copies into fresh memory; later ones \
         copy into the buffers the writer kept from the save before (median over the rounds). \
         Ratio = async blocked (median) / sync save (median). MB = 1e6 bytes.\n",
        stagecoach_core::clock::utc_date(),
    );
    let _ = writeln!(
        s,
        "| preset | parameters | checkpoint | rounds | async, first save: training blocked | async: training blocked | async: background write | sync save: training blocked | async blocked / sync |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(s, "{}", line(r));
    }
    s
}
