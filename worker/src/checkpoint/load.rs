//! Restoring a checkpoint: the manifest and the files checked against the coordinator's
//! expectations and against each other before anything is copied into the model.

use std::collections::BTreeMap;
use std::path::Path;

use sha2::{Digest, Sha256};
use stagecoach_core::checkpoint::hex;
use stagecoach_proto::v1;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use super::{Manifest, CONFIG, FILES, MANIFEST, MODEL, OPTIMIZER};
use crate::error::{Error, IoContext, Result};
use crate::model::{Llama, ModelConfig};
use crate::optim::AdamW;

/// Reads `dir/manifest.json`, refusing an unknown format or missing fields (a resume needs
/// every one).
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    if !path.is_file() {
        return Err(Error::checkpoint(
            dir,
            "no manifest.json: not a checkpoint folder, or its write never finished",
        ));
    }
    let text = std::fs::read_to_string(&path).at(&path)?;
    Manifest::parse_complete(&text).map_err(|e| Error::checkpoint(&path, e.to_string()))
}

/// The manifest of `dir`, checked against what the coordinator expects and against the files
/// it lists; with the bytes of those files, read once.
struct Verified {
    manifest: Manifest,
    model: Vec<u8>,
    optimizer: Vec<u8>,
}

fn verify(dir: &Path, expect: &v1::CheckpointRef) -> Result<Verified> {
    let m = read_manifest(dir)?;
    let path = dir.join(MANIFEST);
    let refuse = |field: &str, got: String, want: String| {
        Error::checkpoint(
            &path,
            format!("{field} {got} but the coordinator's ledger says {want}; the checkpoint is not from this point of the job"),
        )
    };
    if m.step != expect.step {
        return Err(refuse("step", m.step.to_string(), expect.step.to_string()));
    }
    if m.stage != expect.stage {
        return Err(refuse(
            "stage",
            m.stage.to_string(),
            expect.stage.to_string(),
        ));
    }
    if m.cursors != expect.cursors {
        return Err(refuse(
            "cursors",
            format!("{:?}", m.cursors),
            format!("{:?}", expect.cursors),
        ));
    }
    if m.optimizer_steps > m.step {
        return Err(Error::checkpoint(
            &path,
            format!(
                "optimizer_steps {} exceeds step {}: a step applies at most one update",
                m.optimizer_steps, m.step
            ),
        ));
    }
    if !(m.rope_theta.is_finite() && m.rope_theta > 0.0) {
        return Err(Error::checkpoint(
            &path,
            format!("rope_theta {} is not a positive number", m.rope_theta),
        ));
    }
    let mut bytes = BTreeMap::new();
    for name in FILES {
        let entry = m
            .files
            .get(name)
            .ok_or_else(|| Error::checkpoint(&path, format!("\"files\" lists no {name}")))?;
        let file = dir.join(name);
        let data = match std::fs::read(&file) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::checkpoint(
                    &file,
                    format!("missing, but the manifest lists it ({} bytes)", entry.bytes),
                ))
            }
            Err(e) => return Err(e).at(&file),
        };
        if data.len() as u64 != entry.bytes {
            return Err(Error::checkpoint(
                &file,
                format!(
                    "{} bytes but the manifest says {}; the file was truncated or replaced",
                    data.len(),
                    entry.bytes
                ),
            ));
        }
        let sha = hex(&Sha256::digest(&data));
        if sha != entry.sha256 {
            return Err(Error::checkpoint(
                &file,
                format!(
                    "sha256 {sha} but the manifest says {}; the file is damaged or was replaced",
                    entry.sha256
                ),
            ));
        }
        bytes.insert(name, data);
    }
    Ok(Verified {
        manifest: m,
        model: bytes.remove(MODEL).unwrap_or_default(),
        optimizer: bytes.remove(OPTIMIZER).unwrap_or_default(),
    })
}

/// The tensors of a checkpoint's safetensors file, all fp32.
fn read_fp32(path: &Path, data: &[u8]) -> Result<BTreeMap<String, Tensor>> {
    let tensors = crate::hf::read_safetensors(path, data)?;
    if let Some((name, t)) = tensors.iter().find(|(_, t)| t.kind() != Kind::Float) {
        return Err(Error::checkpoint(
            path,
            format!("{name} is {:?}; checkpoints hold F32 tensors", t.kind()),
        ));
    }
    Ok(tensors)
}

/// What a refusal of a checkpoint's tensors ends with.
const ANOTHER_MODEL: &str = "the checkpoint is of another model than this job's";

/// Refuses a `config.json` whose architecture differs from the job's model.
fn check_config(path: &Path, ours: &ModelConfig) -> Result<()> {
    let theirs = crate::hf::read_config(path)?;
    let fields: [(&str, f64, f64); 8] = [
        (
            "vocab_size",
            theirs.vocab_size as f64,
            ours.vocab_size as f64,
        ),
        (
            "hidden_size",
            theirs.hidden_size as f64,
            ours.hidden_size as f64,
        ),
        (
            "intermediate_size",
            theirs.intermediate_size as f64,
            ours.intermediate_size as f64,
        ),
        (
            "num_hidden_layers",
            theirs.num_hidden_layers as f64,
            ours.num_hidden_layers as f64,
        ),
        (
            "num_attention_heads",
            theirs.num_attention_heads as f64,
            ours.num_attention_heads as f64,
        ),
        (
            "num_key_value_heads",
            theirs.num_key_value_heads as f64,
            ours.num_key_value_heads as f64,
        ),
        ("head_dim", theirs.head_dim as f64, ours.head_dim as f64),
        ("rms_norm_eps", theirs.rms_norm_eps, ours.rms_norm_eps),
    ];
    for (field, got, want) in fields {
        if got != want {
            return Err(Error::checkpoint(
                path,
                format!("{field} {got} but this job's model has {want}; the checkpoint is of another model"),
            ));
        }
    }
    Ok(())
}

/// The state a checkpoint is restored into: parameters, optimizer, and the model (its shape
/// is checked against the checkpoint's, its RoPE θ set to the checkpoint's). The trainer hands
/// it over (`impl From<&mut Trainer>`).
pub struct Target<'a> {
    pub vs: &'a VarStore,
    pub optimizer: &'a mut AdamW,
    pub model: &'a mut Llama,
}

/// Loads the checkpoint folder `dir` into `into` (weights, AdamW moments and step count, RoPE
/// θ) after checking it against `expect` (see the module docs). Nothing is changed unless every
/// check passes. Returns the manifest: its `step` is the steps the model has now taken.
pub fn load<'a>(
    into: impl Into<Target<'a>>,
    dir: &Path,
    expect: &v1::CheckpointRef,
) -> Result<Manifest> {
    let Target {
        vs,
        optimizer,
        model,
    } = into.into();
    let v = verify(dir, expect)?;
    check_config(&dir.join(CONFIG), model.config())?;
    let model_path = dir.join(MODEL);
    let vars = vs.variables();
    let weights = crate::hf::match_tensors(
        &model_path,
        "parameter",
        vars.iter().map(|(n, t)| (n.clone(), t)),
        read_fp32(&model_path, &v.model)?,
        ANOTHER_MODEL,
    )?;
    let opt_path = dir.join(OPTIMIZER);
    let expected_moments = optimizer.params().iter().flat_map(|p| {
        [
            (format!("{}.exp_avg", p.name), &p.exp_avg),
            (format!("{}.exp_avg_sq", p.name), &p.exp_avg_sq),
        ]
    });
    let moments = crate::hf::match_tensors(
        &opt_path,
        "moment",
        expected_moments,
        read_fp32(&opt_path, &v.optimizer)?,
        ANOTHER_MODEL,
    )?;
    tch::no_grad(|| -> Result<()> {
        for (dst, src) in weights.iter().chain(&moments) {
            dst.shallow_clone().f_copy_(src)?;
        }
        Ok(())
    })?;
    optimizer.set_step_count(v.manifest.optimizer_steps);
    // `verify` checked θ is a positive number: this cannot fail.
    model.set_rope_theta(v.manifest.rope_theta)?;
    Ok(v.manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::tests::*;
    use crate::checkpoint::{save_sync, Request, State};
    use crate::train::{fixtures, Trainer};
    use tch::Device;

    /// Each tampering is refused with the file, the field and both values named, and the
    /// trainer is left as it was.
    #[test]
    fn tampered_checkpoints_are_refused_with_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let spec = fixtures::job(dir.path());
        let mut t = Trainer::new(&spec, Device::Cpu).unwrap();
        train(&mut t, 0..2);
        let good = dir.path().join("good");
        let m = meta(2);
        save(&t, &m, &good);
        let mut target = Trainer::new(&spec, Device::Cpu).unwrap();
        let before = everything(&target);
        let ok = expect(&m, &good);

        type Tamper = Box<dyn Fn(&Path)>;
        let cases: Vec<(&str, Tamper, v1::CheckpointRef, Vec<String>)> = vec![
            (
                "the ledger's cursors differ",
                Box::new(|_: &Path| {}),
                v1::CheckpointRef {
                    cursors: vec![64, 17],
                    ..ok.clone()
                },
                vec![
                    "manifest.json: cursors [64, 16] but the coordinator's ledger says [64, 17]"
                        .into(),
                    "not from this point of the job".into(),
                ],
            ),
            (
                "cursors edited in the manifest",
                Box::new(|d: &Path| edit_manifest(d, |v| v["cursors"] = serde_json::json!([1, 2]))),
                ok.clone(),
                vec!["cursors [1, 2] but the coordinator's ledger says [64, 16]".into()],
            ),
            (
                "step edited in the manifest",
                Box::new(|d: &Path| edit_manifest(d, |v| v["step"] = 7.into())),
                ok.clone(),
                vec!["manifest.json: step 7 but the coordinator's ledger says 2".into()],
            ),
            (
                "another stage",
                Box::new(|_: &Path| {}),
                v1::CheckpointRef {
                    stage: 0,
                    ..ok.clone()
                },
                vec!["stage 1 but the coordinator's ledger says 0".into()],
            ),
            (
                "unknown format",
                Box::new(|d: &Path| {
                    edit_manifest(d, |v| v["format"] = "stagecoach-checkpoint/9".into())
                }),
                ok.clone(),
                vec![
                    "manifest.json: format is \"stagecoach-checkpoint/9\"".into(),
                    "reads \"stagecoach-checkpoint/1\" only".into(),
                ],
            ),
            (
                "no optimizer_steps",
                Box::new(|d: &Path| {
                    edit_manifest(d, |v| {
                        v.as_object_mut().unwrap().remove("optimizer_steps");
                    })
                }),
                ok.clone(),
                vec!["manifest.json: no \"optimizer_steps\" field".into()],
            ),
            (
                "more updates than steps",
                Box::new(|d: &Path| edit_manifest(d, |v| v["optimizer_steps"] = 3.into())),
                ok.clone(),
                vec!["optimizer_steps 3 exceeds step 2".into()],
            ),
            (
                "a byte of the weights flipped",
                Box::new(|d: &Path| {
                    let f = d.join(MODEL);
                    let mut bytes = std::fs::read(&f).unwrap();
                    let last = bytes.len() - 3;
                    bytes[last] ^= 0x40;
                    std::fs::write(&f, bytes).unwrap();
                }),
                ok.clone(),
                vec![
                    "model.safetensors: sha256".into(),
                    "but the manifest says".into(),
                    "damaged or was replaced".into(),
                ],
            ),
            (
                "the moments truncated",
                Box::new(|d: &Path| {
                    let f = d.join(OPTIMIZER);
                    let bytes = std::fs::read(&f).unwrap();
                    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
                }),
                ok.clone(),
                vec![
                    "optimizer.safetensors:".into(),
                    "truncated or replaced".into(),
                ],
            ),
            (
                "the moments missing",
                Box::new(|d: &Path| std::fs::remove_file(d.join(OPTIMIZER)).unwrap()),
                ok.clone(),
                vec!["optimizer.safetensors: missing, but the manifest lists it".into()],
            ),
            (
                "no manifest",
                Box::new(|d: &Path| std::fs::remove_file(d.join(MANIFEST)).unwrap()),
                ok.clone(),
                vec!["no manifest.json".into()],
            ),
        ];
        for (i, (what, tamper, expectation, wanted)) in cases.into_iter().enumerate() {
            let copy = dir.path().join(format!("tampered-{i}"));
            copy_folder(&good, &copy);
            tamper(&copy);
            let expectation = v1::CheckpointRef {
                path: copy.display().to_string(),
                ..expectation
            };
            let err = load(&mut target, &copy, &expectation)
                .unwrap_err()
                .to_string();
            println!("{what}: {err}");
            for w in &wanted {
                assert!(
                    err.contains(w.as_str()),
                    "{what}: {err:?} does not say {w:?}"
                );
            }
            assert!(err.contains(&copy.display().to_string()), "{what}: {err}");
            assert!(
                identical(&before, &everything(&target)),
                "{what}: the trainer changed"
            );
        }
        // The untouched folder loads.
        load(&mut target, &good, &ok).unwrap();
        assert!(identical(&everything(&t), &everything(&target)));
    }

    #[test]
    fn a_checkpoint_of_another_model_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let spec = fixtures::job(dir.path());
        let mut t = Trainer::new(&spec, Device::Cpu).unwrap();
        let mut other = t.model_config().clone();
        other.intermediate_size += 8;
        let vs = VarStore::new(Device::Cpu);
        let _model = crate::model::Llama::new(&vs, other.clone()).unwrap();
        let optimizer = AdamW::new(&vs, Default::default()).unwrap();
        let state = State {
            vs: &vs,
            optimizer: &optimizer,
            config: &other,
        };
        let path = dir.path().join("other");
        let m = meta(0);
        save_sync(
            state,
            &m,
            &Request {
                path: path.clone(),
                id: 0,
                delete: vec![],
            },
        )
        .unwrap();
        let err = load(&mut t, &path, &expect(&m, &path))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config.json: intermediate_size")
                && err.contains("but this job's model has")
                && err.contains("another model"),
            "{err}"
        );
        // With the config made to agree, the tensors themselves are refused.
        std::fs::write(
            path.join(CONFIG),
            serde_json::to_string(&crate::hf::config_json(t.model_config(), Kind::Float)).unwrap(),
        )
        .unwrap();
        let sha = sha256_of(&path.join(CONFIG));
        let bytes = std::fs::metadata(path.join(CONFIG)).unwrap().len();
        edit_manifest(&path, |v| {
            v["files"][CONFIG] = serde_json::json!({"bytes": bytes, "sha256": sha})
        });
        let err = load(&mut t, &path, &expect(&m, &path))
            .unwrap_err()
            .to_string();
        assert!(err.contains("mlp") && err.contains("has shape"), "{err}");
    }
}
