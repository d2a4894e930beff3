//! All-reduce bandwidth of the CPU collective (TCP ring on loopback, ranks as threads of this
//! process) next to a plain memcpy of the same size in the same run.
//!
//! Reports, per world size and buffer size, the median over timed iterations (after one warm-up
//! that also checks the sum) of: algorithm bandwidth = bytes / time, bus bandwidth = algorithm
//! bandwidth x 2(n-1)/n (what each rank's link carries), and memcpy bandwidth = bytes / time of
//! one `copy_from_slice`. Writes (overwrites) a markdown table.
//!
//! Usage: bench_allreduce [--machine "8-core workstation"] [--output bench/results/allreduce-cpu.md]
//!                        [--ranks 2,4] [--sizes-mib 1,4,16,64,256]

use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use stagecoach_worker::collective::tcp::{TcpConfig, TcpRing};
use stagecoach_worker::collective::Collective;

#[derive(Parser)]
#[command(about = "CPU (TCP loopback) ring all-reduce bandwidth against memcpy")]
struct Args {
    /// How to name this machine in the results (default: "<cores>-core CI-class machine (<arch>)").
    #[arg(long)]
    machine: Option<String>,
    /// The markdown file to write.
    #[arg(long, default_value = "bench/results/allreduce-cpu.md")]
    output: PathBuf,
    /// World sizes to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [2usize, 4])]
    ranks: Vec<usize>,
    /// Buffer sizes in MiB of f32.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16, 64, 256])]
    sizes_mib: Vec<usize>,
}

const MIB: usize = 1 << 20;

/// Timed iterations for a buffer size: fewer for big buffers to bound the run time.
fn iterations(bytes: usize) -> usize {
    (1024 * MIB / bytes).clamp(3, 50)
}

struct Row {
    ranks: usize,
    bytes: usize,
    iters: usize,
    time: Duration,
    memcpy: Duration,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let machine = args.machine.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        format!("{cores}-core CI-class machine ({})", std::env::consts::ARCH)
    });
    let mut rows = Vec::new();
    for &n in &args.ranks {
        if n < 2 {
            bail!("world sizes must be at least 2, got {n}");
        }
        let sizes: Vec<usize> = args.sizes_mib.iter().map(|m| m * MIB).collect();
        let times = measure(n, &sizes).with_context(|| format!("{n} ranks"))?;
        for (&bytes, time) in sizes.iter().zip(times) {
            let row = Row {
                ranks: n,
                bytes,
                iters: iterations(bytes),
                time,
                memcpy: memcpy_time(bytes),
            };
            println!("{}", line(&row));
            rows.push(row);
        }
    }
    let report = report(&machine, &rows);
    if let Some(dir) = args.output.parent() {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    }
    std::fs::write(&args.output, report).with_context(|| args.output.display().to_string())?;
    println!("wrote {}", args.output.display());
    Ok(())
}

/// Runs `n` ranks as threads; returns, per size, the median over iterations of the slowest rank.
fn measure(n: usize, sizes: &[usize]) -> anyhow::Result<Vec<Duration>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let peers = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<Result<Vec<_>, _>>()?;
    let barrier = Arc::new(Barrier::new(n));
    let config = TcpConfig::new(0, Duration::from_secs(60));
    let ranks: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let (peers, barrier, sizes) = (peers.clone(), barrier.clone(), sizes.to_vec());
            std::thread::spawn(move || -> anyhow::Result<Vec<Vec<Duration>>> {
                let mut ring = TcpRing::connect(rank, n, listener, peers[(rank + 1) % n], config)?;
                // Every rank goes through every barrier, even after an error, so none is stranded.
                let mut first_error = None;
                let mut per_size = Vec::new();
                for bytes in sizes {
                    let mut buf = vec![(rank + 1) as f32; bytes / 4];
                    barrier.wait();
                    let warm = ring.all_reduce_sum(&mut buf);
                    let want = (n * (n + 1) / 2) as f32;
                    if warm.is_ok() && buf.iter().any(|&x| x != want) {
                        first_error.get_or_insert(anyhow::anyhow!("rank {rank}: wrong sum"));
                    }
                    let mut times = Vec::new();
                    for _ in 0..iterations(bytes) {
                        barrier.wait();
                        let start = Instant::now();
                        let result = ring.all_reduce_sum(&mut buf);
                        times.push(start.elapsed());
                        if let Err(e) = result {
                            first_error.get_or_insert(e.into());
                        }
                    }
                    if let Err(e) = warm {
                        first_error.get_or_insert(e.into());
                    }
                    per_size.push(times);
                }
                first_error.map_or(Ok(per_size), Err)
            })
        })
        .collect();
    let mut results = Vec::new();
    for handle in ranks {
        results.push(
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("a rank panicked"))??,
        );
    }
    Ok((0..sizes.len())
        .map(|s| {
            let iters = results[0][s].len();
            let mut slowest: Vec<Duration> = (0..iters)
                .map(|i| results.iter().map(|r| r[s][i]).max().unwrap_or_default())
                .collect();
            median(&mut slowest)
        })
        .collect())
}

/// Median time of copying `bytes` between two warmed-up buffers.
fn memcpy_time(bytes: usize) -> Duration {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src);
    let mut times: Vec<Duration> = (0..iterations(bytes))
        .map(|_| {
            let start = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
            start.elapsed()
        })
        .collect();
    median(&mut times)
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

fn gbps(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64().max(1e-12) / 1e9
}

fn line(r: &Row) -> String {
    let alg = gbps(r.bytes, r.time);
    let bus = alg * 2.0 * (r.ranks - 1) as f64 / r.ranks as f64;
    let copy = gbps(r.bytes, r.memcpy);
    format!(
        "| {} | {} MiB | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} |",
        r.ranks,
        r.bytes / MIB,
        r.iters,
        r.time.as_secs_f64() * 1e3,
        alg,
        bus,
        copy,
        bus / copy
    )
}

fn report(machine: &str, rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# CPU all-reduce: TCP ring on loopback vs memcpy\n");
    let _ = writeln!(
        s,
        "`make bench-allreduce`; {} on {machine}. Ranks are threads of one process joined by \
         `collective::tcp::TcpRing` over 127.0.0.1 (1 MiB chunks); f32 buffers; median over the \
         timed iterations (after one warm-up that checks the sum) of the slowest rank. \
         algbw = bytes / time; busbw = algbw x 2(n-1)/n, the traffic each rank's link carries; \
         memcpy = one `copy_from_slice` of the same size in the same run. GB = 1e9 bytes.\n",
        stagecoach_core::clock::utc_date(),
    );
    let _ = writeln!(
        s,
        "| ranks | size | iters | time ms | algbw GB/s | busbw GB/s | memcpy GB/s | busbw / memcpy |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(s, "{}", line(r));
    }
    s
}
