//! `stagecoach export` on a real checkpoint: a coordinator and one worker train the micro
//! preset a few steps and checkpoint; the export loads in transformers (the venv's python) with
//! the worker's own logits; and a checkpoint whose manifest was re-sealed over a broken
//! safetensors header, or over a tensor of the wrong shape, is refused with the file and the
//! tensor named, leaving nothing behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use stagecoach_core::checkpoint::{hex, Dtype, Header, MANIFEST, MODEL};
use stagecoach_e2e::{
    bin, coordinator, demo_corpus, join_worker, micro, python, workspace_dir, MIX,
};

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("start the command")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The F32 tensor `name` of a safetensors file: shape and values.
fn read_f32(path: &Path, name: &str) -> (Vec<u64>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let h = Header::parse(&bytes, bytes.len() as u64).unwrap();
    let t = &h.tensors[name];
    assert_eq!(t.dtype, Dtype::F32, "{name} in {}", path.display());
    let start = (h.data_start() + t.data_offsets.0) as usize;
    let end = (h.data_start() + t.data_offsets.1) as usize;
    let values = bytes[start..end]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.shape.clone(), values)
}

/// Writes `ids` ([rows, cols], int64) as the `input_ids` of a safetensors file.
fn write_ids(path: &Path, ids: &[i64], rows: u64) {
    let shape = [rows, ids.len() as u64 / rows];
    let mut bytes = Header::encode(
        &Default::default(),
        [("input_ids", Dtype::I64, shape.as_slice())],
    );
    for id in ids {
        bytes.extend_from_slice(&id.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Records the size and sha256 of `file` as they are now in `dir`'s manifest: what someone
/// who edited a file and re-sealed the checkpoint leaves.
fn reseal(dir: &Path, file: &str) {
    let bytes = std::fs::read(dir.join(file)).unwrap();
    let path = dir.join(MANIFEST);
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    m["files"][file] = serde_json::json!({
        "bytes": bytes.len(),
        "sha256": hex(&Sha256::digest(&bytes)),
    });
    std::fs::write(&path, m.to_string()).unwrap();
}

/// `model.safetensors` of `dir` with its header JSON edited by `f` (the data kept).
fn edit_header(dir: &Path, f: impl FnOnce(&mut Value)) {
    let path = dir.join(MODEL);
    let bytes = std::fs::read(&path).unwrap();
    let h = Header::parse(&bytes, bytes.len() as u64).unwrap();
    let mut json: Value = serde_json::from_slice(&bytes[8..h.data_start() as usize]).unwrap();
    f(&mut json);
    let mut text = json.to_string().into_bytes();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[h.data_start() as usize..]);
    std::fs::write(&path, out).unwrap();
}

/// The checkpoint folder of the highest step under `dir`.
fn last_checkpoint(dir: &Path) -> PathBuf {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join(MANIFEST).is_file())
        .map(|p| {
            let m: Value =
                serde_json::from_str(&std::fs::read_to_string(p.join(MANIFEST)).unwrap()).unwrap();
            (m["step"].as_u64().unwrap(), p)
        })
        .collect();
    found.sort();
    found
        .pop()
        .unwrap_or_else(|| panic!("no checkpoint under {}", dir.display()))
        .1
}

#[test]
fn a_real_checkpoint_exports_to_transformers_and_tampered_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = demo_corpus(d);
    let checkpoints = d.join("export-checkpoints");
    let job = micro("export", &data, 1)
        .stage("main", 6, 64, MIX)
        .set("schedule.warmup_steps", 2)
        .set("schedule.decay_start.step", 4)
        .set(
            "checkpoints.dir",
            checkpoints.to_string_lossy().into_owned(),
        )
        .set("checkpoints.every_steps", 3)
        .write(d.join("export.toml"));
    let (mut coord, url) = coordinator(&job, &d.join("state"), &d.join("coordinator.log"));
    let mut worker = join_worker(&url, d, "worker", &[]);
    let status = coord.wait(Duration::from_secs(240));
    let log = std::fs::read_to_string(d.join("coordinator.log")).unwrap();
    assert!(status.success(), "coordinator failed:\n{log}");
    assert!(
        worker.wait(Duration::from_secs(60)).success(),
        "the worker failed"
    );
    let ckpt = last_checkpoint(&checkpoints);

    // Export, then the worker's logits (from the checkpoint) against transformers' (from the
    // exported folder) on the same ids.
    let out_dir = d.join("hf");
    let out = run(Command::new(bin("stagecoach"))
        .arg("export")
        .arg(&ckpt)
        .arg(&out_dir));
    assert!(out.status.success(), "export: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("from_pretrained("));
    let ids: Vec<i64> = (0..32).map(|i| (i * 37 + 11) % 264).collect();
    let inputs = d.join("ids.safetensors");
    write_ids(&inputs, &ids, 2);
    let ours_path = d.join("ours.safetensors");
    let out = run(Command::new(bin("stagecoach-worker"))
        .arg("logits")
        .arg("--model")
        .arg(&ckpt)
        .arg("--input")
        .arg(&inputs)
        .arg("--output")
        .arg(&ours_path));
    assert!(out.status.success(), "logits: {}", text(&out.stderr));
    let theirs_path = d.join("theirs.safetensors");
    let out = run(Command::new(python())
        .arg(workspace_dir().join("python/reference.py"))
        .arg("hf-logits")
        .arg(&out_dir)
        .arg(&inputs)
        .arg(&theirs_path));
    assert!(out.status.success(), "reference.py: {}", text(&out.stderr));
    let (shape, ours) = read_f32(&ours_path, "logits");
    let (their_shape, theirs) = read_f32(&theirs_path, "logits");
    assert_eq!(shape, [2, 16, 264]);
    assert_eq!(shape, their_shape);
    let worst = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!(
        "{} exported and loaded by transformers: max |logit difference| = {worst:.3e}",
        ckpt.display()
    );
    assert!(worst <= 1e-4, "max abs logit difference {worst}");

    // Re-sealed over a broken header, or over a tensor of the wrong shape: refused, with the
    // file (and the tensor and both shapes) named, and nothing exported.
    let broken = d.join("broken-header");
    copy_folder(&ckpt, &broken);
    let model = broken.join(MODEL);
    let mut bytes = std::fs::read(&model).unwrap();
    let len = bytes.len() as u64;
    bytes[..8].copy_from_slice(&len.to_le_bytes());
    std::fs::write(&model, bytes).unwrap();
    reseal(&broken, MODEL);
    let reshaped = d.join("wrong-shape");
    copy_folder(&ckpt, &reshaped);
    edit_header(&reshaped, |h| {
        h["model.layers.1.mlp.down_proj.weight"]["shape"] = serde_json::json!([176, 64]);
    });
    reseal(&reshaped, MODEL);
    for (folder, wanted) in [
        (
            &broken,
            format!("{MODEL}: the header length is {len} bytes but"),
        ),
        (
            &reshaped,
            format!(
                "{MODEL}: tensor model.layers.1.mlp.down_proj.weight has shape [176, 64] but \
                 config.json implies [64, 176]"
            ),
        ),
    ] {
        let dest = d.join("refused");
        let out = run(Command::new(bin("stagecoach"))
            .arg("export")
            .arg(folder)
            .arg(&dest));
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {err}", folder.display());
        assert!(
            err.contains(&wanted) && err.contains("nothing exported"),
            "{}: {err:?} does not say {wanted:?}",
            folder.display()
        );
        assert!(!dest.exists(), "a refused export left {}", dest.display());
    }
}
