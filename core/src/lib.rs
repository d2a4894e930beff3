//! The pure job logic of stagecoach, shared by the coordinator and the worker: what a job is and
//! how it unfolds step by step, with no I/O but reading a job file (the checkpoint format takes
//! bytes), no server, no libtorch.
//!
//! Module map:
//! - [`spec`]: the job file (TOML), its validation (every problem with its path in the file),
//!   the model presets, and its wire form `v1::JobSpec`.
//! - [`plan`]: the deterministic sample plan (weighted round-robin between sources, a keyed
//!   permutation of each source's blocks, per-source cursors in tokens).
//! - [`curriculum`]: the stage state machine over the plan: budgets, manual transitions,
//!   mixture edits, the LR of each step, skip ranges, and its durable record.
//! - [`schedule`]: the WSD learning-rate schedule.
//! - [`spike`]: the loss-spike detector and the step guard.
//! - [`recovery`]: the `[recovery]` section and the failure budget (retries, backoff, pause or
//!   fail).
//! - [`retention`]: the checkpoint policy (`[checkpoints]`) and which checkpoints retention
//!   removes.
//! - [`checkpoint`]: the checkpoint folder format: file names, the manifest, safetensors headers
//!   read from bytes, and the tensors a transformers Llama `config.json` implies.
//! - [`clock`]: timestamps (`now_ms`) and the date of result files.
//! - [`metrics`]: registering metrics, the sliding-window rate both binaries report, and (with
//!   the `http` feature) the `/metrics` endpoint.
//!
//! Layering: `stagecoach-proto` ← this crate ← {`stagecoach-coordinator`, `stagecoach-worker`}.
//! Nothing here may depend on either of those (a test in `tests/` checks it).

pub mod checkpoint;
pub mod clock;
pub mod curriculum;
pub mod metrics;
pub mod plan;
pub mod recovery;
pub mod retention;
pub mod schedule;
pub mod spec;
pub mod spike;
