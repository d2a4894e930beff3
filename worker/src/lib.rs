//! The stagecoach worker: the data plane that trains a SmolLM2-family model with libtorch.
//!
//! Modules:
//! - [`model`]: the Llama/SmolLM2 model and its presets;
//! - [`hf`]: transformers interchange (`config.json` + safetensors with `LlamaForCausalLM` names);
//! - [`optim`]: AdamW and gradient clipping; [`schedule`]: the WSD learning-rate schedule;
//! - [`shards`]: datatrove `.ds` token shards; [`tokenize`]: text to shards;
//!   [`corpus`]: the synthetic demo corpus; [`mixture`]: the sample order over weighted sources;
//! - [`config`]: the training configuration file; [`train`]: the training loop;
//! - [`device`]: CPU/CUDA selection; [`error`]: the crate's error type.

pub mod config;
pub mod corpus;
pub mod device;
pub mod error;
pub mod hf;
pub mod mixture;
pub mod model;
pub mod optim;
pub mod schedule;
pub mod shards;
pub mod tokenize;
pub mod train;

pub use error::{Error, Result};
