//! `stagecoach export CHECKPOINT DIR`, offline: the model of a checkpoint folder, checked
//! against its manifest, copied out as a folder transformers loads.
//!
//! A checkpoint folder (written by rank 0, see the worker's checkpoint writer) holds
//! `model.safetensors` (transformers' `LlamaForCausalLM` names, fp32), `config.json`,
//! `optimizer.safetensors` and `manifest.json`, which records the format, the job, the step and
//! the data state, and the size and SHA-256 of every file. Only the first two are exported:
//! together they are a transformers model folder.
//!
//! What is exported is checked as copied, so that a folder transformers cannot load is never
//! written: each file against its size and SHA-256 in the manifest, `config.json` as a
//! `LlamaForCausalLM` config, the safetensors header as one (sane length, offsets that tile
//! the file), and every tensor's name, dtype and shape against what `config.json` implies (a
//! manifest re-sealed over a broken or mismatched file passes the digests, not these).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use stagecoach_core::checkpoint::{
    hex, FileEntry, Header, LlamaLayout, Manifest, CONFIG, MANIFEST, MODEL, MODEL_FILES,
};

use super::checkpoints::format_bytes;
use crate::Error;

fn bad(checkpoint: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: checkpoint.display().to_string(),
        reason: reason.into(),
    }
}

fn destination(dir: &Path, reason: impl Into<String>) -> Error {
    Error::Destination {
        path: dir.display().to_string(),
        reason: reason.into(),
    }
}

/// Reads and checks the manifest of the checkpoint folder `checkpoint`: its format, and the
/// digests of the model files (what an export relies on; other fields may be absent).
pub fn read_manifest(checkpoint: &Path) -> Result<Manifest, Error> {
    if !checkpoint.is_dir() {
        return Err(bad(
            checkpoint,
            "not a folder; give a checkpoint folder (`stagecoach checkpoints` lists them)",
        ));
    }
    let path = checkpoint.join(MANIFEST);
    let text = fs::read_to_string(&path).map_err(|e| {
        let why = match e.kind() {
            io::ErrorKind::NotFound => "no manifest.json: not a stagecoach checkpoint folder, \
                or one whose write never finished"
                .to_owned(),
            _ => format!("cannot read manifest.json: {e}"),
        };
        bad(checkpoint, why)
    })?;
    let manifest =
        Manifest::parse(&text).map_err(|e| bad(checkpoint, format!("{MANIFEST}: {e}")))?;
    for name in MODEL_FILES {
        manifest
            .entry(name)
            .map_err(|e| bad(checkpoint, format!("{MANIFEST}: {e}")))?;
    }
    Ok(manifest)
}

/// Copies `from` to `to` and returns the size and SHA-256 of what was copied.
fn copy_hashing(from: &Path, to: &Path) -> Result<FileEntry, (bool, io::Error)> {
    // (true, e): reading the source failed; (false, e): writing the copy did.
    let mut src = File::open(from).map_err(|e| (true, e))?;
    let mut dst = File::create(to).map_err(|e| (false, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err((true, e)),
        };
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n]).map_err(|e| (false, e))?;
        bytes += n as u64;
    }
    dst.sync_all().map_err(|e| (false, e))?;
    Ok(FileEntry {
        bytes,
        sha256: hex(&hasher.finalize()),
    })
}

/// Checks the copied model files (`config` and `model`, under their temporary names) as
/// transformers will read them: `config.json` is a Llama config, `model.safetensors` a
/// safetensors file consistent with its size, holding exactly the tensors `config.json`
/// implies, each with its dtype and shape. The reason names the file and the tensor.
fn check_model_files(config: &Path, model: &Path) -> Result<(), String> {
    let text = fs::read(config).map_err(|e| format!("cannot read back {CONFIG}: {e}"))?;
    let value: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| format!("{CONFIG} is not valid JSON: {e}"))?;
    let layout = LlamaLayout::of_config(&value).map_err(|e| format!("{CONFIG}: {e}"))?;
    let mut file = File::open(model).map_err(|e| format!("cannot read back {MODEL}: {e}"))?;
    let file_len = file
        .metadata()
        .map_err(|e| format!("cannot read back {MODEL}: {e}"))?
        .len();
    let mut prefix = vec![0u8; 8.min(file_len) as usize];
    file.read_exact(&mut prefix)
        .map_err(|e| format!("cannot read back {MODEL}: {e}"))?;
    let json_len = Header::json_len(&prefix, file_len).map_err(|e| format!("{MODEL}: {e}"))?;
    prefix.resize(8 + json_len as usize, 0);
    file.read_exact(&mut prefix[8..])
        .map_err(|e| format!("cannot read back {MODEL}: {e}"))?;
    let header = Header::parse(&prefix, file_len).map_err(|e| format!("{MODEL}: {e}"))?;
    let mismatches = layout.mismatches(&header);
    if let Some(first) = mismatches.first() {
        let more = match mismatches.len() {
            1 => String::new(),
            n => format!(" (and {} more problems)", n - 1),
        };
        return Err(format!("{MODEL}: {first}{more}"));
    }
    Ok(())
}

/// Where the export copies `name` before every file passed its checks.
fn partial_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.partial"))
}

/// Removes what a failed export wrote: the files under their temporary and final names, and
/// `dir` if the export made it.
fn clean_up(dir: &Path, partials: &[PathBuf], made_dir: bool) {
    for p in partials {
        let _ = fs::remove_file(p);
    }
    for name in MODEL_FILES {
        let _ = fs::remove_file(dir.join(name));
    }
    if made_dir {
        let _ = fs::remove_dir(dir);
    }
}

/// `stagecoach export CHECKPOINT DIR`: checks the manifest and the size and SHA-256 of the
/// model files, then copies them into `dir` (created; it must not hold anything yet). Nothing
/// is left in `dir` when a check fails. Returns what to print.
pub fn export(checkpoint: &Path, dir: &Path) -> Result<String, Error> {
    let manifest = read_manifest(checkpoint)?;
    let made_dir = match fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(destination(
                    dir,
                    "the folder is not empty; export into a new or empty folder",
                ));
            }
            false
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir)
                .map_err(|e| destination(dir, format!("cannot create the folder: {e}")))?;
            true
        }
        Err(e) => {
            let why = if dir.exists() && !dir.is_dir() {
                "not a folder; give a new or empty folder".to_owned()
            } else {
                format!("cannot use the folder: {e}")
            };
            return Err(destination(dir, why));
        }
    };
    // Each file is copied under a temporary name and checked as copied (one read, and what is
    // checked is what was written); the names become final once every file passed.
    let mut partials: Vec<PathBuf> = Vec::new();
    let mut written: Vec<(&str, FileEntry)> = Vec::new();
    for name in MODEL_FILES {
        let want = manifest
            .entry(name)
            .map_err(|e| bad(checkpoint, e.to_string()))?;
        let partial = partial_path(dir, name);
        partials.push(partial.clone());
        let got = match copy_hashing(&checkpoint.join(name), &partial) {
            Ok(got) => got,
            Err((reading, e)) => {
                clean_up(dir, &partials, made_dir);
                return Err(if reading {
                    match e.kind() {
                        io::ErrorKind::NotFound => bad(
                            checkpoint,
                            format!("{name} is missing, though manifest.json lists it"),
                        ),
                        _ => bad(checkpoint, format!("cannot read {name}: {e}")),
                    }
                } else {
                    destination(dir, format!("cannot write {name}: {e}"))
                });
            }
        };
        let problem = if got.bytes != want.bytes {
            Some(format!(
                "{name} is {} bytes, manifest.json says {}",
                got.bytes, want.bytes
            ))
        } else if !got.sha256.eq_ignore_ascii_case(&want.sha256) {
            Some(format!(
                "the sha256 of {name} is {}, manifest.json says {}",
                got.sha256, want.sha256
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            clean_up(dir, &partials, made_dir);
            return Err(bad(
                checkpoint,
                format!(
                    "{problem}: the file changed after the checkpoint was written; nothing \
                     exported"
                ),
            ));
        }
        written.push((name, got));
    }
    if let Err(problem) = check_model_files(&partial_path(dir, CONFIG), &partial_path(dir, MODEL)) {
        clean_up(dir, &partials, made_dir);
        return Err(bad(
            checkpoint,
            format!("{problem}; transformers cannot load this model; nothing exported"),
        ));
    }
    for (name, partial) in MODEL_FILES.iter().zip(&partials) {
        if let Err(e) = fs::rename(partial, dir.join(name)) {
            clean_up(dir, &partials, made_dir);
            return Err(destination(dir, format!("cannot write {name}: {e}")));
        }
    }

    let job = match manifest.job.is_empty() {
        true => String::new(),
        false => format!(" of job {:?}", manifest.job),
    };
    let mut out = format!(
        "exported step {}{job} from {} to {}\n",
        manifest.step,
        checkpoint.display(),
        dir.display()
    );
    let width = MODEL_FILES.iter().map(|n| n.len()).max().unwrap_or(0);
    for (name, d) in &written {
        out += &format!(
            "  {name:<width$}  {:>9}  sha256 {}\n",
            format_bytes(d.bytes),
            d.sha256
        );
    }
    out += &format!(
        "a transformers model folder: LlamaForCausalLM.from_pretrained({:?})",
        dir.display().to_string()
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stagecoach_core::checkpoint::FORMAT;
    use std::collections::BTreeMap;

    use serde_json::{json, Value};
    use stagecoach_core::checkpoint::Dtype;

    /// A small Llama's `config.json` (one layer, hidden 4, grouped-query attention, tied).
    fn llama_config() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 8, "hidden_size": 4, "intermediate_size": 6,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 2, "tie_word_embeddings": true, "torch_dtype": "float32",
        })
    }

    /// Tensors to write: name, dtype, shape.
    type Tensors = Vec<(String, Dtype, Vec<u64>)>;

    /// A safetensors file of `tensors` whose element bytes count up from 0.
    fn safetensors(tensors: &[(String, Dtype, Vec<u64>)]) -> Vec<u8> {
        let meta = BTreeMap::from([("format".to_owned(), "pt".to_owned())]);
        let mut bytes = Header::encode(
            &meta,
            tensors
                .iter()
                .map(|(n, d, s)| (n.as_str(), *d, s.as_slice())),
        );
        let data: u64 = tensors
            .iter()
            .map(|(_, d, s)| s.iter().product::<u64>() * d.size())
            .sum();
        bytes.extend((0..data).map(|i| i as u8));
        bytes
    }

    /// The tensors `config` implies, all F32.
    fn tensors_of(config: &Value) -> Tensors {
        LlamaLayout::of_config(config)
            .unwrap()
            .tensors
            .into_iter()
            .map(|(n, s)| (n, Dtype::F32, s))
            .collect()
    }

    /// Writes a manifest whose sizes and digests are those of the files in `dir` now (what a
    /// re-sealed, tampered checkpoint looks like); returns it.
    fn seal(dir: &Path) -> Manifest {
        let mut digests = BTreeMap::new();
        for name in ["model.safetensors", "config.json", "optimizer.safetensors"] {
            let bytes = fs::read(dir.join(name)).unwrap();
            digests.insert(
                name.to_owned(),
                FileEntry {
                    bytes: bytes.len() as u64,
                    sha256: hex(&Sha256::digest(&bytes)),
                },
            );
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            job: "demo".into(),
            step: 120,
            optimizer_steps: 118,
            stage: 1,
            cursors: vec![1, 2],
            stage_taken: vec![1, 2],
            parent: String::new(),
            generation: 2,
            rope_theta: 10_000.0,
            created_unix_ms: 1,
            files: digests,
        };
        fs::write(
            dir.join(MANIFEST),
            serde_json::to_string_pretty(&manifest).unwrap(),
        )
        .unwrap();
        manifest
    }

    /// A sound checkpoint folder of the small Llama; returns its manifest.
    fn fake_checkpoint(dir: &Path) -> Manifest {
        fs::create_dir_all(dir).unwrap();
        let config = llama_config();
        fs::write(dir.join("config.json"), config.to_string()).unwrap();
        fs::write(
            dir.join("model.safetensors"),
            safetensors(&tensors_of(&config)),
        )
        .unwrap();
        fs::write(dir.join("optimizer.safetensors"), b"moments").unwrap();
        seal(dir)
    }

    fn message(err: Error) -> String {
        err.to_string()
    }

    #[test]
    fn sha256_is_the_standard_digest() {
        // FIPS 180-2's example.
        assert_eq!(
            hex(&Sha256::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn exports_the_model_files_of_a_sound_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let ck = tmp.path().join("step-00000120");
        let manifest = fake_checkpoint(&ck);
        assert_eq!(read_manifest(&ck).unwrap(), manifest);
        let out_dir = tmp.path().join("out/model");
        let text = export(&ck, &out_dir).unwrap();
        let model = &manifest.files["model.safetensors"];
        assert!(
            text.starts_with(&format!(
                "exported step 120 of job \"demo\" from {} to {}\n  model.safetensors  {:>9}  sha256 {}\n",
                ck.display(),
                out_dir.display(),
                format_bytes(model.bytes),
                model.sha256
            )),
            "{text}"
        );
        assert!(text.contains("from_pretrained("), "{text}");
        let mut names: Vec<String> = fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["config.json", "model.safetensors"]);
        for name in MODEL_FILES {
            assert_eq!(
                fs::read(out_dir.join(name)).unwrap(),
                fs::read(ck.join(name)).unwrap()
            );
        }
        // An empty folder that exists is fine too.
        let empty = tmp.path().join("empty");
        fs::create_dir(&empty).unwrap();
        export(&ck, &empty).unwrap();
    }

    #[test]
    fn refuses_a_tampered_or_incomplete_checkpoint_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let ck = tmp.path().join("ck");
        fake_checkpoint(&ck);
        let out_dir = tmp.path().join("out");

        // Same size, other bytes: only the digest tells.
        let config = fs::read_to_string(ck.join("config.json")).unwrap();
        let size = config.len();
        fs::write(ck.join("config.json"), config.replace("llama", "LLAMA")).unwrap();
        let err = message(export(&ck, &out_dir).unwrap_err());
        assert!(
            err.starts_with(&format!(
                "checkpoint {}: the sha256 of config.json is ",
                ck.display()
            )) && err
                .ends_with("the file changed after the checkpoint was written; nothing exported"),
            "{err}"
        );
        assert!(!out_dir.exists(), "a refused export left {out_dir:?}");

        fs::write(ck.join("config.json"), b"{}").unwrap();
        let err = message(export(&ck, &out_dir).unwrap_err());
        assert!(
            err.contains(&format!(
                "config.json is 2 bytes, manifest.json says {size}"
            )),
            "{err}"
        );

        fs::remove_file(ck.join("model.safetensors")).unwrap();
        let err = message(export(&ck, &out_dir).unwrap_err());
        assert!(
            err.contains("model.safetensors is missing, though manifest.json lists it"),
            "{err}"
        );
        assert!(!out_dir.exists());

        // The manifest itself.
        let mut m = fake_checkpoint(&ck);
        let write =
            |m: &Manifest| fs::write(ck.join(MANIFEST), serde_json::to_string(m).unwrap()).unwrap();
        m.format = "stagecoach-checkpoint/9".into();
        write(&m);
        let err = message(export(&ck, &out_dir).unwrap_err());
        assert!(
            err.ends_with(
                "manifest.json: format is \"stagecoach-checkpoint/9\"; this stagecoach reads \
                 \"stagecoach-checkpoint/1\" only"
            ),
            "{err}"
        );
        m.format = FORMAT.into();
        m.files.remove("config.json");
        write(&m);
        let err = message(export(&ck, &out_dir).unwrap_err());
        assert!(
            err.ends_with(
                "manifest.json: \"files\" lists no config.json; the checkpoint is incomplete"
            ),
            "{err}"
        );
        fs::write(ck.join(MANIFEST), "{\"format\": ").unwrap();
        let err = message(export(&ck, &out_dir).unwrap_err());
        assert!(err.contains("manifest.json: not valid JSON: "), "{err}");
        fs::remove_file(ck.join(MANIFEST)).unwrap();
        let err = message(export(&ck, &out_dir).unwrap_err());
        assert!(
            err.contains("no manifest.json: not a stagecoach checkpoint folder"),
            "{err}"
        );
        let err = message(export(&tmp.path().join("nope"), &out_dir).unwrap_err());
        assert!(err.contains("not a folder"), "{err}");
        assert!(!out_dir.exists());
    }

    /// A checkpoint whose manifest was re-sealed over files transformers cannot load (the
    /// digests agree): each is refused, naming the file (and the tensor and both shapes), and
    /// nothing is left in the destination.
    #[test]
    fn refuses_model_files_that_a_resealed_manifest_vouches_for() {
        let tmp = tempfile::tempdir().unwrap();
        let config = llama_config();
        let tensors = tensors_of(&config);
        let edited = |f: &dyn Fn(&mut Tensors)| {
            let mut t = tensors.clone();
            f(&mut t);
            safetensors(&t)
        };
        let find = |t: &[(String, Dtype, Vec<u64>)], name: &str| {
            t.iter().position(|(n, _, _)| n == name).unwrap()
        };
        let good_model = safetensors(&tensors);
        let json_len = u64::from_le_bytes(good_model[..8].try_into().unwrap()) as usize;
        let config_with = |key: &str, v: Value| {
            let mut c = config.clone();
            c[key] = v;
            c.to_string().into_bytes()
        };
        // What, config.json, model.safetensors, what the error says.
        type Case<'a> = (&'a str, Vec<u8>, Vec<u8>, Vec<&'a str>);
        let cases: Vec<Case<'_>> = vec![
            (
                "config.json not JSON",
                b"{\"model_type\": ".to_vec(),
                good_model.clone(),
                vec!["config.json is not valid JSON"],
            ),
            (
                "not a Llama config",
                config_with("model_type", json!("gpt2")),
                good_model.clone(),
                vec!["config.json: model_type is \"gpt2\""],
            ),
            (
                "a config without hidden_size",
                config_with("hidden_size", Value::Null),
                good_model.clone(),
                vec!["config.json: hidden_size is absent"],
            ),
            (
                "a header length past the end of the file",
                config.to_string().into_bytes(),
                {
                    let mut m = good_model.clone();
                    m[..8].copy_from_slice(&(1u64 << 20).to_le_bytes());
                    m
                },
                vec!["model.safetensors: the header length is 1048576 bytes but"],
            ),
            (
                "a header that is not JSON",
                config.to_string().into_bytes(),
                {
                    let mut m = good_model.clone();
                    m[8] = b'[';
                    m
                },
                vec!["model.safetensors: the header is not a JSON object"],
            ),
            (
                "data cut short",
                config.to_string().into_bytes(),
                good_model[..good_model.len() - 4].to_vec(),
                vec!["model.safetensors: the tensors' data ends at byte"],
            ),
            (
                "data offsets inconsistent with the shape",
                config.to_string().into_bytes(),
                {
                    // model.norm.weight's shape [4] says [5] in a header of the same length.
                    let text = String::from_utf8(good_model[8..8 + json_len].to_vec()).unwrap();
                    let at = text.find("\"model.norm.weight\"").unwrap();
                    let shape = at + text[at..].find("\"shape\":[4]").unwrap();
                    let mut m = good_model.clone();
                    m[8 + shape + "\"shape\":[".len()] = b'5';
                    m
                },
                vec!["model.safetensors: tensor model.norm.weight: data_offsets", "of shape [5] take 20"],
            ),
            (
                "a tensor of the wrong shape",
                config.to_string().into_bytes(),
                edited(&|t| {
                    let i = find(t, "model.layers.0.mlp.up_proj.weight");
                    t[i].2 = vec![4, 6];
                }),
                vec![
                    "model.safetensors: tensor model.layers.0.mlp.up_proj.weight has shape [4, 6] \
                     but config.json implies [6, 4]",
                ],
            ),
            (
                "a config of another size",
                config_with("intermediate_size", json!(8)),
                good_model.clone(),
                vec![
                    "model.layers.0.mlp.gate_proj.weight has shape [6, 4] but config.json implies [8, 4]",
                    "(and 2 more problems)",
                ],
            ),
            (
                "a missing tensor",
                config.to_string().into_bytes(),
                edited(&|t| {
                    let i = find(t, "model.norm.weight");
                    t.remove(i);
                }),
                vec!["model.safetensors: no tensor model.norm.weight, which config.json implies (shape [4])"],
            ),
            (
                "an extra tensor",
                config.to_string().into_bytes(),
                edited(&|t| t.push(("model.layers.1.input_layernorm.weight".into(), Dtype::F32, vec![4]))),
                vec!["model.safetensors: tensor model.layers.1.input_layernorm.weight (shape [4]) is not part of the model"],
            ),
            (
                "an untied config over tied weights",
                config_with("tie_word_embeddings", json!(false)),
                good_model.clone(),
                vec!["no tensor lm_head.weight, which config.json implies (shape [8, 4])"],
            ),
            (
                "bf16 weights under a float32 config",
                config.to_string().into_bytes(),
                edited(&|t| {
                    for x in t.iter_mut() {
                        x.1 = Dtype::BF16;
                    }
                }),
                vec!["tensor model.embed_tokens.weight is BF16 but config.json's torch_dtype implies F32"],
            ),
        ];
        for (i, (what, config_bytes, model_bytes, wanted)) in cases.into_iter().enumerate() {
            let ck = tmp.path().join(format!("ck-{i}"));
            fake_checkpoint(&ck);
            fs::write(ck.join("config.json"), config_bytes).unwrap();
            fs::write(ck.join("model.safetensors"), model_bytes).unwrap();
            seal(&ck);
            let out_dir = tmp.path().join(format!("out-{i}"));
            let err = message(export(&ck, &out_dir).unwrap_err());
            println!("{what}: {err}");
            assert!(
                err.starts_with(&format!("checkpoint {}: ", ck.display()))
                    && err.ends_with("transformers cannot load this model; nothing exported"),
                "{what}: {err}"
            );
            for w in wanted {
                assert!(err.contains(w), "{what}: {err:?} does not say {w:?}");
            }
            assert!(
                !out_dir.exists(),
                "{what}: a refused export left {out_dir:?}"
            );
        }
        // Into a folder that exists: it is left as empty as it was.
        let ck = tmp.path().join("ck-shape");
        fake_checkpoint(&ck);
        fs::write(
            ck.join("model.safetensors"),
            edited(&|t| t[0].2 = vec![4, 8]),
        )
        .unwrap();
        seal(&ck);
        let empty = tmp.path().join("empty");
        fs::create_dir(&empty).unwrap();
        let err = message(export(&ck, &empty).unwrap_err());
        assert!(
            err.contains(
                "model.embed_tokens.weight has shape [4, 8] but config.json implies [8, 4]"
            ),
            "{err}"
        );
        assert_eq!(fs::read_dir(&empty).unwrap().count(), 0);
    }

    #[test]
    fn refuses_a_destination_that_holds_something() {
        let tmp = tempfile::tempdir().unwrap();
        let ck = tmp.path().join("ck");
        fake_checkpoint(&ck);
        let full = tmp.path().join("full");
        fs::create_dir(&full).unwrap();
        fs::write(full.join("keep.txt"), b"mine").unwrap();
        let err = export(&ck, &full).unwrap_err();
        assert!(matches!(err, Error::Destination { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "{}: the folder is not empty; export into a new or empty folder",
                full.display()
            )
        );
        assert_eq!(fs::read(full.join("keep.txt")).unwrap(), b"mine");
        let file = tmp.path().join("file");
        fs::write(&file, b"x").unwrap();
        let err = message(export(&ck, &file).unwrap_err());
        assert!(
            err.ends_with(": not a folder; give a new or empty folder"),
            "{err}"
        );
    }
}
