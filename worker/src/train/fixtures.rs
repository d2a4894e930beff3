//! A small job on data written for the test, shared by the tests of this module, `checkpoint`
//! and `agent`.

use std::path::Path;

use stagecoach_proto::v1;

use crate::model::{Llama, ModelConfig};
use crate::shards::{ShardWriter, TokenSize};

/// Writes a folder of `files` shards of `tokens` byte-level tokens each.
pub fn shards(dir: &Path, files: usize, tokens: usize, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    for f in 0..files {
        let mut w =
            ShardWriter::create(&dir.join(format!("{f:02}.ds")), TokenSize::U16, "bytes").unwrap();
        let doc: Vec<u32> = (0..tokens as u64)
            .map(|i| ((i * 7919 + seed * 104_729 + f as u64 * 31) % 256) as u32)
            .collect();
        w.write_document(&doc).unwrap();
        w.finish().unwrap();
    }
}

/// A micro model over source "a" (two files, also its own held-out folder) and source "b"
/// (no held-out folder). The model starts from a transformers folder written here, so that
/// trainers built from the job are identical whatever else uses libtorch's global random
/// generator meanwhile (tests run in parallel).
pub fn job(dir: &Path) -> v1::JobSpec {
    shards(&dir.join("a"), 2, 80, 1);
    shards(&dir.join("b"), 1, 50, 2);
    let config = ModelConfig::preset("micro").unwrap();
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _model = Llama::new(&vs, config.clone()).unwrap();
    crate::hf::save(&vs, &config, &dir.join("model")).unwrap();
    let path = |p: &str| dir.join(p).display().to_string();
    v1::JobSpec {
        name: "test".into(),
        model_from: path("model"),
        optimizer: Some(v1::OptimizerSpec {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.01,
            grad_clip: 1.0,
        }),
        seq_len: 32,
        sources: vec![
            v1::SourceSpec {
                name: "a".into(),
                path: path("a"),
                eval_path: path("a"),
            },
            v1::SourceSpec {
                name: "b".into(),
                path: path("b"),
                eval_path: String::new(),
            },
        ],
        threads: 1,
        init_seed: 3,
        ..Default::default()
    }
}
