//! Checkpoints: everything a resume needs from the worker, as a folder that transformers can
//! also load.
//!
//! ```text
//! <path>/
//!   model.safetensors       the weights under LlamaForCausalLM's names, fp32
//!   config.json             the LlamaConfig (as `hf::config_json` writes it; RoPE θ of the
//!                           stage the checkpoint was taken in)
//!   optimizer.safetensors   "<name>.exp_avg" and "<name>.exp_avg_sq" per parameter, fp32
//!   manifest.json           format, job, step, optimizer_steps, stage, cursors, stage_taken,
//!                           parent, generation, rope_theta, created_unix_ms, and per file its
//!                           size and sha256
//! ```
//!
//! **Atomic.** The folder is written as a sibling `<path>.tmp-<pid>-<id>`, every file fsynced,
//! then renamed to `<path>` and the parent fsynced: a crash mid-write leaves only a `.tmp-`
//! folder (no manifest in place), never a damaged `<path>`; a failed write removes its
//! temporary folder and touches nothing else. An existing `<path>` is never replaced.
//!
//! **Asynchronous.** [`Writer::save`] copies every parameter and both AdamW moments to fresh
//! CPU tensors on the calling (trainer) thread, which is all training waits for (the *blocking*
//! time), and a background thread writes, hashes and fsyncs them, then applies retention (deletes
//! the older checkpoint folders it was given, only ones inside the new checkpoint's parent
//! folder that hold a manifest of this format). [`save_sync`] writes the same bytes on the
//! calling thread, straight from the live tensors, for comparison.
//!
//! **Checked on resume.** [`load`] refuses a checkpoint whose manifest disagrees with what the
//! coordinator's ledger expects (step, stage, cursors), whose files are missing or differ from
//! their recorded size or sha256, whose format is unknown, or whose model is not the job's; every
//! refusal names the file, the field and both values.
//!
//! **Random state.** Training draws no random numbers after initialisation (no dropout; the data
//! order is the coordinator's, a pure function of the seed and the cursors), so besides the
//! initialisation seed, which only matters before step 0, there is no RNG state to keep.
//!
//! `write.rs` holds the writer (snapshot, background thread, retention), `load.rs` the checks
//! and the restore.

mod load;
mod write;

pub use load::{load, read_manifest, Target};
pub use stagecoach_core::checkpoint::{
    FileEntry, Manifest, CONFIG, FILES, FORMAT, MANIFEST, MODEL, OPTIMIZER,
};
pub use write::{save_sync, Request, Saved, Snapshot, State, Writer};

use stagecoach_proto::v1;

/// What the coordinator says about the state being saved (its half of the manifest).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Meta {
    pub job: String,
    pub step: u64,
    pub stage: u32,
    pub cursors: Vec<u64>,
    pub stage_taken: Vec<u64>,
    pub parent: String,
    pub generation: u64,
}

impl From<&v1::SaveCheckpoint> for Meta {
    fn from(s: &v1::SaveCheckpoint) -> Meta {
        Meta {
            job: s.job.clone(),
            step: s.step,
            stage: s.stage,
            cursors: s.cursors.clone(),
            stage_taken: s.stage_taken.clone(),
            parent: s.parent.clone(),
            generation: s.generation,
        }
    }
}

/// What the tests of this module and of `write` and `load` share: a little run of the test
/// job, saving, and comparing trainers.
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use serde_json::Value;
    use sha2::{Digest, Sha256};
    use stagecoach_core::checkpoint::hex;
    use tch::{Device, Tensor};

    use super::*;
    use crate::collective::Solo;
    use crate::train::{fixtures, Guard, Shape, Trainer};

    /// The samples of step `i` of the tests' little run (4 per step over sources "a" and "b").
    pub(super) fn batch(i: u64) -> Vec<(usize, u64)> {
        let o = (i * 16) % 112;
        vec![(0, o), (0, o + 8), (1, (i * 4) % 16), (1, (i * 4) % 16 + 1)]
    }

    pub(super) fn train(t: &mut Trainer, steps: std::ops::Range<u64>) -> Vec<f64> {
        steps
            .map(|i| {
                let lr = 1e-3 * (1.0 + i as f64 / 4.0);
                let r = t
                    .step(
                        &batch(i),
                        Shape::new(16, 3).unwrap(),
                        4,
                        lr,
                        Guard::default(),
                        &mut Solo,
                    )
                    .unwrap();
                assert!(!r.skipped);
                r.loss_sum
            })
            .collect()
    }

    pub(super) fn meta(step: u64) -> Meta {
        Meta {
            job: "test".into(),
            step,
            stage: 1,
            cursors: vec![step * 32, step * 8],
            stage_taken: vec![step * 2, step * 2],
            parent: "runs/x/step-0".into(),
            generation: 3,
        }
    }

    pub(super) fn expect(m: &Meta, path: &Path) -> v1::CheckpointRef {
        v1::CheckpointRef {
            path: path.display().to_string(),
            step: m.step,
            stage: m.stage,
            cursors: m.cursors.clone(),
        }
    }

    /// Every parameter and moment, by name, deep-copied.
    pub(super) fn everything(t: &Trainer) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = t
            .var_store()
            .variables()
            .into_iter()
            .map(|(n, p)| (n, p.detach().copy()))
            .collect();
        for p in t.optimizer().params() {
            v.push((format!("{}.exp_avg", p.name), p.exp_avg.copy()));
            v.push((format!("{}.exp_avg_sq", p.name), p.exp_avg_sq.copy()));
        }
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub(super) fn identical(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|((na, ta), (nb, tb))| na == nb && ta.equal(tb))
    }

    pub(super) fn save(t: &Trainer, m: &Meta, path: &Path) -> Saved {
        save_sync(
            t.state(),
            m,
            &Request {
                path: path.into(),
                id: 1,
                delete: Vec::new(),
            },
        )
        .unwrap()
    }

    /// Through the background writer, waiting for it.
    pub(super) fn save_async(writer: &Writer, t: &Trainer, m: &Meta, request: Request) -> Saved {
        let (tx, rx) = std::sync::mpsc::channel();
        let blocking = writer
            .save(t.state(), m, request, move |s| tx.send(s).unwrap())
            .unwrap();
        let saved = rx.recv().unwrap();
        assert_eq!(saved.blocking_seconds, blocking);
        saved
    }

    pub(super) fn sha256_of(path: &Path) -> String {
        hex(&Sha256::digest(std::fs::read(path).unwrap()))
    }

    pub(super) fn copy_folder(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }

    pub(super) fn edit_manifest(dir: &Path, f: impl FnOnce(&mut Value)) {
        let path = dir.join(MANIFEST);
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&path, v.to_string()).unwrap();
    }

    #[test]
    fn save_and_load_round_trip_bit_exactly_with_the_manifest_of_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let spec = fixtures::job(dir.path());
        let mut t = Trainer::new(&spec, Device::Cpu).unwrap();
        train(&mut t, 0..3);
        t.set_rope_theta(20_000.0).unwrap();
        let m = meta(3);
        let sync_path = dir.path().join("ckpt").join("sync");
        let saved = save(&t, &m, &sync_path);
        assert!(saved.error.is_none());
        let writer = Writer::new().unwrap();
        let async_path = dir.path().join("ckpt").join("async");
        let request = Request {
            path: async_path.clone(),
            id: 2,
            delete: Vec::new(),
        };
        let saved_async = save_async(&writer, &t, &m, request);
        assert_eq!(saved_async.error, None);
        assert_eq!(saved_async.bytes, saved.bytes);

        // The manifest holds what the contract lists; sizes and digests are the files'.
        let manifest = read_manifest(&sync_path).unwrap();
        assert_eq!(
            (
                manifest.format.as_str(),
                manifest.job.as_str(),
                manifest.step
            ),
            (FORMAT, "test", 3)
        );
        assert_eq!(
            (
                manifest.optimizer_steps,
                manifest.stage,
                manifest.generation
            ),
            (3, 1, 3)
        );
        assert_eq!(
            (
                &manifest.cursors,
                &manifest.stage_taken,
                manifest.parent.as_str()
            ),
            (&m.cursors, &m.stage_taken, "runs/x/step-0")
        );
        assert_eq!(manifest.rope_theta, 20_000.0);
        assert!(manifest.created_unix_ms > 1_600_000_000_000);
        assert_eq!(manifest.files.len(), 3);
        let mut total = std::fs::metadata(sync_path.join(MANIFEST)).unwrap().len();
        for (name, entry) in &manifest.files {
            let file = sync_path.join(name);
            assert_eq!(
                entry.bytes,
                std::fs::metadata(&file).unwrap().len(),
                "{name}"
            );
            assert_eq!(entry.sha256, sha256_of(&file), "{name}");
            total += entry.bytes;
            // The background and the synchronous save write the same bytes.
            assert_eq!(entry.sha256, sha256_of(&async_path.join(name)), "{name}");
        }
        assert_eq!(saved.bytes, total);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("ckpt"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            leftovers.len(),
            2,
            "no temporary folder left: {leftovers:?}"
        );

        // Another reader (tch's) sees every parameter under its name, equal to ours.
        let weights: BTreeMap<String, Tensor> = Tensor::read_safetensors(sync_path.join(MODEL))
            .unwrap()
            .into_iter()
            .collect();
        let vars = t.var_store().variables();
        assert_eq!(weights.len(), vars.len());
        for (name, p) in &vars {
            assert!(weights[name].equal(&p.detach()), "{name}");
        }
        let config = crate::hf::read_config(&sync_path.join(CONFIG)).unwrap();
        assert_eq!(config.rope_theta, 20_000.0);

        // A fresh trainer loads it: every parameter, moment and the step count, bit for bit.
        let mut fresh = Trainer::new(&spec, Device::Cpu).unwrap();
        assert!(!identical(&everything(&t), &everything(&fresh)));
        let loaded = load(&mut fresh, &async_path, &expect(&m, &async_path)).unwrap();
        assert_eq!(loaded.step, 3);
        assert!(identical(&everything(&t), &everything(&fresh)));
        assert_eq!(fresh.optimizer().step_count(), 3);
        assert_eq!(fresh.rope_theta(), 20_000.0);
    }

    /// Stopped after step N and resumed from its checkpoint in a new trainer, the next k steps
    /// give the losses of the run that never stopped.
    #[test]
    fn a_resumed_run_gives_the_same_losses_as_the_uninterrupted_one() {
        let dir = tempfile::tempdir().unwrap();
        let spec = fixtures::job(dir.path());
        let (n, k) = (4, 5);
        let mut uninterrupted = Trainer::new(&spec, Device::Cpu).unwrap();
        train(&mut uninterrupted, 0..n);
        let path = dir.path().join("step-4");
        let m = meta(n);
        save(&uninterrupted, &m, &path);
        let expected = train(&mut uninterrupted, n..n + k);

        let mut resumed = Trainer::new(&spec, Device::Cpu).unwrap();
        load(&mut resumed, &path, &expect(&m, &path)).unwrap();
        let got = train(&mut resumed, n..n + k);
        let worst = expected
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        println!("resume after step {n}: {k} more steps, max |loss difference| = {worst:e}");
        assert_eq!(expected, got, "bit-for-bit");
        assert!(identical(
            &everything(&uninterrupted),
            &everything(&resumed)
        ));
    }
}
