//! The stagecoach worker: the data plane that trains a SmolLM2-family model with libtorch.
//!
//! Modules:
//! - [`model`]: the Llama/SmolLM2 model and its presets;
//! - [`hf`]: transformers interchange (`config.json` + safetensors with `LlamaForCausalLM` names);
//! - [`optim`]: AdamW and gradient clipping (the WSD schedule is the coordinator's `schedule`);
//! - [`shards`]: datatrove `.ds` token shards, a folder read as one token stream; [`tokenize`]:
//!   text to shards; [`corpus`]: the synthetic demo corpus;
//! - [`job`]: from the coordinator's job spec to model, optimizer and data (train and held-out);
//!   [`train`]: the training step, the held-out evaluation and the standalone loop through the
//!   curriculum; [`collective`]: gradient all-reduce;
//! - [`agent`]: the coordinator-driven worker (`join`): session, heartbeats, reconnection, the
//!   trainer thread (stages applied per step, the step guard, evaluations and checkpoints
//!   between steps); [`metrics`]: its Prometheus metrics; [`steplog`]: the `--metrics-out`
//!   record of each step, the same for `train` and `join`;
//! - [`checkpoint`]: checkpoint folders (atomic, written in the background, checked on resume);
//!   [`fault`]: fault injection for tests (poisoned samples, a crash, silent heartbeats);
//! - [`device`]: CPU/CUDA selection; [`error`]: the crate's error type.

pub mod agent;
pub mod checkpoint;
pub mod collective;
pub mod corpus;
pub mod device;
pub mod error;
pub mod fault;
pub mod hf;
pub mod job;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod shards;
pub mod steplog;
pub mod tokenize;
pub mod train;

pub use error::{Error, Result};
