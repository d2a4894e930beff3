//! `stagecoach-worker`: train, tokenize text into shards, write the demo corpus, inspect shards.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use stagecoach_core::spec::JobFile;
use stagecoach_worker::agent::node;
use stagecoach_worker::corpus::{self, Domain};
use stagecoach_worker::fault::{Faults, Poison};
use stagecoach_worker::model::Precision;
use stagecoach_worker::shards::{self, ShardFolder, TokenSize};
use stagecoach_worker::tokenize::{self, ShardOptions, TextTokenizer};
use stagecoach_worker::{hf, model, train};

/// The `join --help` heading of the options that break things on purpose.
const FAULTS: &str = "Fault injection (for tests)";
/// The `join --help` heading of the node agent's options.
const NODE: &str = "Node agent (one worker per device: --devices)";

/// The options a node agent gives each child a value of its own for, instead of passing them
/// through as given.
const AGENT_OWNED: &[&str] = &[
    "--devices",
    "--log-dir",
    "--max-restarts",
    "--restart-window-secs",
    "--grace-secs",
    "--listen",
    "--metrics-listen",
    "--metrics-out",
];

#[derive(Parser)]
#[command(
    name = "stagecoach-worker",
    version,
    about = "The stagecoach training worker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How the steps compute (the same update either way, up to rounding).
#[derive(Args, Clone, Copy)]
struct FastPathArgs {
    /// fp32, or bf16: matrix products and attention in bf16 over fp32 weights and optimizer
    /// state, as bf16 autocast.
    #[arg(long, default_value = "fp32")]
    precision: Precision,
    /// Update with ATen's fused AdamW kernel (as torch.optim.AdamW(fused=True)).
    #[arg(long)]
    fused_adamw: bool,
}

impl FastPathArgs {
    fn get(self) -> train::FastPath {
        train::FastPath {
            precision: self.precision,
            fused_adamw: self.fused_adamw,
        }
    }
}

/// The node agent's options (`join --devices`).
#[derive(Args)]
struct NodeArgs {
    /// Run as this node's agent: start one worker per device (this binary, with these
    /// options and its own --device, ports and log) and supervise them. `all`: every CUDA
    /// device of the node; or a list: cpu,cpu or cuda:0,cuda:1.
    #[arg(long, value_name = "LIST", conflicts_with = "device", help_heading = NODE)]
    devices: Option<node::DeviceList>,
    /// Worker N logs to DIR/worker-N.log (appended to across restarts); without it, every
    /// worker's lines go to this process's stderr, prefixed with their local rank.
    #[arg(long, value_name = "DIR", requires = "devices", help_heading = NODE)]
    log_dir: Option<PathBuf>,
    /// Restarts of one worker allowed within --restart-window-secs; one more stops every
    /// worker and the agent fails.
    #[arg(long, value_name = "N", default_value_t = 5, requires = "devices", help_heading = NODE)]
    max_restarts: u32,
    /// The window --max-restarts counts restarts in.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 600,
        requires = "devices",
        help_heading = NODE
    )]
    restart_window_secs: u64,
    /// On SIGTERM or SIGINT, how long the workers have to exit after SIGTERM before
    /// SIGKILL.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 10,
        requires = "devices",
        help_heading = NODE
    )]
    grace_secs: u64,
    /// Carry the workers' sessions to the coordinator over one stream (a NodeSession): the
    /// workers reach this agent on loopback, and the coordinator handles one message per node
    /// where it would one per worker. One --coordinator URL only.
    #[arg(long, requires = "devices", help_heading = NODE)]
    relay: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model alone on this machine from a job file, without a coordinator.
    Train {
        /// The job file (TOML; see examples/ and the coordinator's `spec` module).
        #[arg(long)]
        config: PathBuf,
        /// cpu, cuda or cuda:N (overrides [train].device).
        #[arg(long)]
        device: Option<String>,
        /// Stop after this many steps (the curriculum and its schedule keep their configured
        /// length).
        #[arg(long)]
        steps: Option<u64>,
        /// Write one JSON record per step to this file.
        #[arg(long)]
        metrics_out: Option<PathBuf>,
        /// Save the final model as a transformers folder here.
        #[arg(long)]
        save: Option<PathBuf>,
        #[command(flatten)]
        fast: FastPathArgs,
    },
    /// Measure training throughput on random tokens (no data, no coordinator) and print one
    /// JSON line: tokens/s, MFU, GPU memory.
    BenchTrain {
        /// A model preset (smollm2-135m, smollm2-360m, smollm2-1.7b, tiny, micro).
        #[arg(long, default_value = "smollm2-135m")]
        preset: String,
        /// Tokens per sample.
        #[arg(long, default_value_t = 2048)]
        seq: usize,
        /// Samples per forward/backward.
        #[arg(long, default_value_t = 4)]
        micro_batch: usize,
        /// Micro-batches per optimizer step.
        #[arg(long, default_value_t = 1)]
        accumulation: usize,
        /// Timed optimizer steps.
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Untimed optimizer steps first.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cuda")]
        device: String,
        /// Read the loss back every this many steps (the loop's only synchronisation).
        #[arg(long, default_value_t = 10)]
        log_every: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Peak dense FLOP/s of the device in TFLOP/s for the MFU (default: 989, H100/H200
        /// dense bf16, on CUDA; none on CPU).
        #[arg(long)]
        peak_tflops: Option<f64>,
        #[command(flatten)]
        fast: FastPathArgs,
    },
    /// Join a job: register with the coordinator and train what it sends until the job ends.
    Join {
        /// The coordinator's URL, or its replicas' URLs separated by commas (`--ha`): the
        /// worker registers with the one that leads and follows a new leader.
        #[arg(
            long,
            env = "STAGECOACH_COORDINATOR",
            default_value = "http://127.0.0.1:7070"
        )]
        coordinator: String,
        /// Where to accept the collective's ring neighbour (port 0: any free port); the
        /// address the worker registers, so other nodes' workers must reach it there [default:
        /// 127.0.0.1:0]. With --devices: the host of every worker (without one, or 0.0.0.0:
        /// this node's address towards the coordinator) and the first worker's port (the next
        /// ones count up from it; 0: each takes a free port).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// cpu (workers all-reduce over a TCP ring) or cuda / cuda:N (NCCL, its unique id
        /// relayed by the coordinator); overrides the job's [train] device. Without it the
        /// worker registers as a CPU worker (the backend is chosen at registration, before the
        /// job is known), and a job whose device is a GPU asks for this option.
        #[arg(long)]
        device: Option<String>,
        /// Write one JSON record per trained step (with its samples) to this file. With
        /// --devices: worker N writes FILE's stem + "-N" (a restart: + "-N.restartK").
        #[arg(long)]
        metrics_out: Option<PathBuf>,
        /// Where to serve Prometheus metrics (GET /metrics); port 0 picks a free port (logged).
        /// With --devices: worker N serves on the port + N (0: each a free one).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
        metrics_listen: std::net::SocketAddr,
        /// When the session with the coordinator breaks, keep the model and keep trying to
        /// register again for this many seconds before giving up.
        #[arg(long, value_name = "SECONDS", default_value_t = 120)]
        reconnect_secs: u64,
        /// The CA that signed the coordinator's certificate: talk TLS, and check it against this.
        #[arg(long, value_name = "FILE", env = "STAGECOACH_CA")]
        ca: Option<PathBuf>,
        /// A client certificate for mutual TLS (with --key).
        #[arg(long, value_name = "FILE", env = "STAGECOACH_CERT")]
        cert: Option<PathBuf>,
        /// The private key of --cert.
        #[arg(long, value_name = "FILE", env = "STAGECOACH_KEY")]
        key: Option<PathBuf>,
        /// A file holding the worker join token (without one, the STAGECOACH_TOKEN environment
        /// variable is used if set). Tokens are never given on the command line.
        #[arg(long, value_name = "FILE", env = "STAGECOACH_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Replace the tokens of every training sample of source index SOURCE whose token
        /// offset lies in FROM..TO (TO excluded) with uniformly random tokens (a fixed seed), so
        /// the loss jumps for real. Repeatable.
        #[arg(long, value_name = "SOURCE:FROM..TO", help_heading = FAULTS)]
        poison: Vec<Poison>,
        /// Abort the process, as a crash would, when about to train step N.
        #[arg(long, value_name = "N", help_heading = FAULTS)]
        kill_at_step: Option<u64>,
        /// Stop sending heartbeats when about to train step N (the process stays alive and
        /// keeps training what it is sent).
        #[arg(long, value_name = "N", help_heading = FAULTS)]
        stop_heartbeats_at_step: Option<u64>,
        #[command(flatten)]
        fast: FastPathArgs,
        #[command(flatten)]
        node: Box<NodeArgs>,
    },
    /// Tokenize jsonl files, text files or folders of them into datatrove token shards.
    Tokenize {
        /// Input files or folders (.jsonl: one document per line; other files: one document each).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output folder (must hold no .ds files yet).
        #[arg(long)]
        output: PathBuf,
        /// A transformers tokenizer.json; without it, the built-in byte-level tokenizer is used.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// End-of-document token appended to every document (with --tokenizer).
        #[arg(long, default_value = "<|endoftext|>")]
        eos_token: String,
        /// The jsonl field holding the text.
        #[arg(long, default_value = "text")]
        text_field: String,
        /// Seed of the document shuffle.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Keep the input order instead of shuffling documents.
        #[arg(long)]
        no_shuffle: bool,
        /// Output file name prefix.
        #[arg(long, default_value = "tokens")]
        prefix: String,
        /// Start a new .ds file after this many tokens.
        #[arg(long, default_value_t = 100_000_000)]
        max_tokens_per_file: u64,
    },
    /// Write the synthetic demo corpus (prose, math, code, and long stories for context
    /// extension) as byte-level shards: OUTPUT/<domain>/train and OUTPUT/<domain>/valid.
    DemoCorpus {
        #[arg(long)]
        output: PathBuf,
        #[arg(long, default_value_t = 1234)]
        seed: u64,
        /// Training documents per domain (the long domain's stories: see --long-docs).
        #[arg(long, default_value_t = 4000)]
        docs: usize,
        /// Held-out documents per domain (the long domain: a fifth as many, at least one).
        #[arg(long, default_value_t = 200)]
        valid_docs: usize,
        /// Training documents of the long domain (default: a fifth of --docs, at least one;
        /// its stories are about five times longer, so every domain gets a similar number of
        /// tokens).
        #[arg(long)]
        long_docs: Option<usize>,
    },
    /// Summarise a folder of shards and show the start of its first document.
    Inspect {
        folder: PathBuf,
        /// Token size (2 or 4) of shards whose .ds.metadata names none; without it, a shard
        /// without .ds.metadata is refused (its token size would be a guess).
        #[arg(long)]
        token_bytes: Option<usize>,
    },
    /// Compute the logits of a model folder (transformers', a checkpoint or an export of one)
    /// for token ids, with this worker's model: what `python/reference.py hf-logits` computes
    /// with transformers, to compare the two.
    Logits {
        /// The model folder: config.json and model.safetensors.
        #[arg(long)]
        model: PathBuf,
        /// A safetensors file holding "input_ids", int64, [batch, seq].
        #[arg(long)]
        input: PathBuf,
        /// Where to write "logits", fp32, [batch, seq, vocab], as safetensors.
        #[arg(long)]
        output: PathBuf,
    },
    /// Write a freshly initialised model of a preset as a transformers folder.
    Init {
        #[arg(long)]
        preset: String,
        #[arg(long)]
        output: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::builder()
                .with_default_directive(tracing_subscriber::filter::LevelFilter::INFO.into())
                .from_env_lossy(),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let mut out = std::io::stdout().lock();
    match run(cli, &mut out).and_then(|code| Ok(out.flush().map(|()| code)?)) {
        Ok(code) => code,
        // `stagecoach-worker inspect ... | head -1`: the reader is gone; nothing left to say.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "Error: {e:?}");
            // A node agent does not start a worker again whose job failed.
            match e.downcast_ref::<stagecoach_worker::Error>() {
                Some(stagecoach_worker::Error::JobOver {
                    finished: false, ..
                }) => ExitCode::from(stagecoach_worker::agent::node::JOB_FAILED_EXIT as u8),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Whether `e` comes from writing to a pipe whose reader has gone.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Runs a command, printing what it reports to `out`; returns the exit status.
fn run(cli: Cli, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Train {
            config,
            device,
            steps,
            metrics_out,
            save,
            fast,
        } => {
            let spec = JobFile::load(&config)?.to_proto();
            let opts = train::RunOptions {
                device,
                steps,
                metrics_out,
                save,
                fast_path: fast.get(),
            };
            let summary = train::run_standalone(&spec, &opts, out)?;
            let (Some(first), Some(last)) = (summary.steps.first(), summary.steps.last()) else {
                anyhow::bail!("the job trained no step");
            };
            let tokens: u64 = summary.tokens_per_source.iter().sum();
            writeln!(
                out,
                "done: {} steps, {} tokens in {:.1}s ({:.0} tokens/s); loss {:.4} -> {:.4}; tokens per source: {}",
                summary.steps.len(),
                tokens,
                summary.seconds,
                tokens as f64 / summary.seconds,
                first.loss,
                last.loss,
                summary
                    .source_names
                    .iter()
                    .zip(&summary.tokens_per_source)
                    .map(|(n, c)| format!("{n}={c}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )?;
        }
        Command::BenchTrain {
            preset,
            seq,
            micro_batch,
            accumulation,
            steps,
            warmup,
            device,
            log_every,
            seed,
            peak_tflops,
            fast,
        } => {
            let peak = peak_tflops
                .or_else(|| device.starts_with("cuda").then_some(989.0))
                .map(|t| t * 1e12);
            let report = train::bench_train(
                &train::BenchOptions {
                    preset,
                    seq_len: seq,
                    micro_batch,
                    accumulation,
                    steps,
                    warmup,
                    device,
                    fast_path: fast.get(),
                    log_every,
                    seed,
                },
                peak,
            )?;
            writeln!(out, "{}", serde_json::to_string(&report)?)?;
        }
        Command::Join {
            coordinator,
            listen,
            device,
            metrics_out,
            metrics_listen,
            reconnect_secs,
            ca,
            cert,
            key,
            token_file,
            poison,
            kill_at_step,
            stop_heartbeats_at_step,
            fast,
            node: node_args,
        } => {
            // Checked here also for an agent, so that a bad file stops it before any worker.
            let auth = stagecoach_proto::connect::ClientAuth::from_files(
                ca.as_deref(),
                cert.as_deref(),
                key.as_deref(),
                token_file.as_deref(),
            )?;
            let NodeArgs {
                devices,
                log_dir,
                max_restarts,
                restart_window_secs,
                grace_secs,
                relay,
            } = *node_args;
            if let Some(devices) = devices {
                return run_node(node::NodeOptions {
                    devices,
                    coordinator,
                    listen,
                    metrics_listen,
                    metrics_out,
                    log_dir,
                    restarts: node::RestartPolicy::new(
                        max_restarts,
                        std::time::Duration::from_secs(restart_window_secs),
                    ),
                    grace: std::time::Duration::from_secs(grace_secs),
                    pass_through: join_arguments()?,
                    exe: std::env::current_exe()
                        .context("cannot find this binary to start the workers")?,
                    relay: relay.then(|| auth.clone()),
                });
            }
            stagecoach_worker::agent::join(stagecoach_worker::agent::JoinOptions {
                coordinator,
                listen: listen.unwrap_or_else(|| ([127, 0, 0, 1], 0).into()),
                device,
                metrics_out,
                metrics_listen,
                reconnect: std::time::Duration::from_secs(reconnect_secs),
                faults: Faults {
                    poison,
                    kill_at_step,
                    stop_heartbeats_at_step,
                },
                fast_path: fast.get(),
                auth,
            })?;
        }
        Command::Tokenize {
            inputs,
            output,
            tokenizer,
            eos_token,
            text_field,
            seed,
            no_shuffle,
            prefix,
            max_tokens_per_file,
        } => {
            let tok = match &tokenizer {
                Some(path) => TextTokenizer::from_file(path, &eos_token)?,
                None => TextTokenizer::Bytes,
            };
            let files = tokenize::input_files(&inputs)?;
            let opts = ShardOptions {
                output,
                prefix,
                seed,
                max_tokens_per_file,
                shuffle: !no_shuffle,
            };
            let pb = tokenize::progress_bar("tokenizing");
            let written = tokenize::write_shards(
                tokenize::read_documents(files, text_field),
                &tok,
                &opts,
                &pb,
            )?;
            pb.finish_and_clear();
            writeln!(
                out,
                "wrote {} documents, {} tokens into {} file(s) in {} (tokenizer {}, vocabulary {})",
                written.documents,
                written.tokens,
                written.files.len(),
                opts.output.display(),
                tok.name(),
                tok.vocab_size()
            )?;
        }
        Command::DemoCorpus {
            output,
            seed,
            docs,
            valid_docs,
            long_docs,
        } => {
            let tok = TextTokenizer::Bytes;
            let fifth = |n: usize| if n == 0 { 0 } else { (n / 5).max(1) };
            for domain in Domain::ALL {
                let (docs, valid_docs) = match domain {
                    Domain::Long => (long_docs.unwrap_or(fifth(docs)), fifth(valid_docs)),
                    _ => (docs, valid_docs),
                };
                let all = corpus::generate(domain, seed, docs + valid_docs);
                let (train_docs, valid) = all.split_at(docs);
                for (split, texts) in [("train", train_docs), ("valid", valid)] {
                    let opts = ShardOptions {
                        output: output.join(domain.name()).join(split),
                        prefix: domain.name().to_owned(),
                        seed,
                        max_tokens_per_file: 1 << 20,
                        shuffle: true,
                    };
                    let pb = tokenize::progress_bar(domain.name());
                    let w =
                        tokenize::write_shards(texts.iter().cloned().map(Ok), &tok, &opts, &pb)?;
                    pb.finish_and_clear();
                    writeln!(
                        out,
                        "{:<6} {split:<5} {:>6} documents {:>9} tokens -> {}",
                        domain.name(),
                        w.documents,
                        w.tokens,
                        opts.output.display()
                    )?;
                }
            }
            writeln!(
                out,
                "synthetic demo corpus written to {} (byte-level tokens)",
                output.display()
            )?;
        }
        Command::Inspect {
            folder,
            token_bytes,
        } => {
            let size = match token_bytes {
                None => None,
                Some(2) => Some(TokenSize::U16),
                Some(4) => Some(TokenSize::U32),
                Some(n) => anyhow::bail!("--token-bytes must be 2 or 4, got {n}"),
            };
            if size.is_none() {
                let missing = shards::without_metadata(&folder)?;
                if let Some(first) = missing.first() {
                    anyhow::bail!(
                        "{} has no .ds.metadata ({} of the folder's .ds files lack one), so its \
                         token size is unknown: pass --token-bytes 2 or 4 (training reads such \
                         shards with the size the model's vocabulary needs: 2 bytes up to \
                         65,536 ids), or tokenize the data again",
                        first.display(),
                        missing.len()
                    );
                }
            }
            // Refuses what training refuses: no .ds files, damaged ones, no tokens at all.
            let f = ShardFolder::open(&folder, size.unwrap_or(TokenSize::U16))?;
            for s in f.shards() {
                writeln!(
                    out,
                    "{}  {} documents  {} tokens  {}-byte tokens  tokenizer {}{}",
                    s.path().display(),
                    s.num_documents(),
                    s.num_tokens(),
                    s.token_size().bytes(),
                    s.tokenizer_name().unwrap_or("(no metadata)"),
                    if s.num_tokens() == 0 {
                        "  (empty: skipped when reading)"
                    } else {
                        ""
                    }
                )?;
            }
            let first = f.shards().iter().find(|s| s.num_tokens() > 0);
            if let Some(first) =
                first.filter(|s| s.tokenizer_name() == Some(TextTokenizer::Bytes.name()))
            {
                let doc = first.document(0)?;
                let text = TextTokenizer::Bytes.decode(&doc[..doc.len().min(300)])?;
                writeln!(out, "--- first document (start) ---\n{text}")?;
            }
        }
        Command::Logits {
            model,
            input,
            output,
        } => {
            let cfg = hf::read_config(&model.join("config.json"))?;
            let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
            let llama = model::Llama::new(&vs, cfg.clone())?;
            hf::load(&mut vs, &model)?;
            let bytes = std::fs::read(&input).with_context(|| input.display().to_string())?;
            let ids = hf::read_safetensors(&input, &bytes)?
                .remove("input_ids")
                .with_context(|| format!("{}: no tensor \"input_ids\"", input.display()))?;
            if ids.kind() != tch::Kind::Int64 || ids.dim() != 2 {
                anyhow::bail!(
                    "{}: input_ids is {:?} of shape {:?}; give int64 ids of shape [batch, seq]",
                    input.display(),
                    ids.kind(),
                    ids.size()
                );
            }
            let flat = Vec::<i64>::try_from(ids.reshape([-1]))?;
            if let Some(bad) = flat.iter().find(|&&t| t < 0 || t >= cfg.vocab_size) {
                anyhow::bail!(
                    "{}: token id {bad} is outside the model's vocabulary of {} ids",
                    input.display(),
                    cfg.vocab_size
                );
            }
            let logits = tch::no_grad(|| llama.forward(&ids))?;
            hf::write_safetensors(&output, &[("logits".into(), logits.shallow_clone())])?;
            writeln!(
                out,
                "wrote logits {:?} of {} to {}",
                logits.size(),
                model.display(),
                output.display()
            )?;
        }
        Command::Init {
            preset,
            output,
            seed,
        } => {
            let cfg = model::ModelConfig::preset(&preset)?;
            tch::manual_seed(seed as i64);
            let vs = tch::nn::VarStore::new(tch::Device::Cpu);
            let _model = model::Llama::new(&vs, cfg.clone())?;
            hf::save(&vs, &cfg, &output)
                .with_context(|| format!("saving to {}", output.display()))?;
            writeln!(
                out,
                "wrote {} ({:.2}M parameters) to {}",
                preset,
                cfg.num_parameters() as f64 / 1e6,
                output.display()
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs a node agent; its outcome is the exit status.
fn run_node(opts: node::NodeOptions) -> anyhow::Result<ExitCode> {
    let outcome = node::run(opts)?;
    match &outcome {
        node::Outcome::Finished => {}
        node::Outcome::Stopped { detail, .. } => {
            writeln!(std::io::stderr(), "{detail}")?;
        }
        node::Outcome::Failed { reason } => {
            writeln!(
                std::io::stderr(),
                "Error: {reason}; every worker of this node was stopped"
            )?;
        }
    }
    Ok(ExitCode::from(outcome.exit_code()))
}

/// The `join` options this process was given, without those each worker of a node agent gets
/// a value of its own for.
fn join_arguments() -> anyhow::Result<Vec<std::ffi::OsString>> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    anyhow::ensure!(
        args.first().is_some_and(|a| a == "join"),
        "--devices is an option of `stagecoach-worker join`"
    );
    // `--relay` is a flag of the agent's alone, without a value.
    let args: Vec<std::ffi::OsString> = args[1..]
        .iter()
        .filter(|a| *a != "--relay")
        .cloned()
        .collect();
    Ok(node::pass_through(&args, AGENT_OWNED))
}
