//! `stagecoach export CHECKPOINT DIR`, offline: the model of a checkpoint folder, checked
//! against its manifest, copied out as a folder transformers loads.
//!
//! A checkpoint folder (written by rank 0, see the worker's checkpoint writer) holds
//! `model.safetensors` (transformers' `LlamaForCausalLM` names, fp32), `config.json`,
//! `optimizer.safetensors` and `manifest.json`, which records the format, the job, the step and
//! the data state, and the size and SHA-256 of every file. Only the first two are exported:
//! together they are a transformers model folder.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use stagecoach_core::checkpoint::{hex, FileEntry, Manifest, MANIFEST, MODEL_FILES};

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
        let partial = dir.join(format!(".{name}.partial"));
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

    /// A checkpoint folder with a correct manifest; returns the manifest.
    fn fake_checkpoint(dir: &Path) -> Manifest {
        fs::create_dir_all(dir).unwrap();
        let files: [(&str, &[u8]); 3] = [
            ("model.safetensors", b"weights weights weights"),
            ("config.json", b"{\"model_type\": \"llama\"}"),
            ("optimizer.safetensors", b"moments"),
        ];
        let mut digests = BTreeMap::new();
        for (name, bytes) in files {
            fs::write(dir.join(name), bytes).unwrap();
            digests.insert(
                name.to_owned(),
                FileEntry {
                    bytes: bytes.len() as u64,
                    sha256: hex(&Sha256::digest(bytes)),
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
        assert!(
            text.starts_with(&format!(
                "exported step 120 of job \"demo\" from {} to {}\n  model.safetensors       23 B  sha256 c6b30cb3",
                ck.display(),
                out_dir.display()
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
        fs::write(ck.join("config.json"), b"{\"model_type\": \"LLAMA\"}").unwrap();
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
            err.contains("config.json is 2 bytes, manifest.json says 23"),
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
