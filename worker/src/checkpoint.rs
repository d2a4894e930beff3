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
//! folder that hold a manifest of this format). [`save_sync`] writes the same
//! bytes on the calling thread, straight from the live tensors, for comparison.
//!
//! **Checked on resume.** [`load`] refuses a checkpoint whose manifest disagrees with what the
//! coordinator's ledger expects (step, stage, cursors), whose files are missing or differ from
//! their recorded size or sha256, whose format is unknown, or whose model is not the job's; every
//! refusal names the file, the field and both values.
//!
//! **Random state.** Training draws no random numbers after initialisation (no dropout; the data
//! order is the coordinator's, a pure function of the seed and the cursors), so besides the
//! initialisation seed, which only matters before step 0, there is no RNG state to keep.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use sha2::{Digest, Sha256};
use stagecoach_core::checkpoint::hex;
use stagecoach_proto::v1;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use tracing::{info, warn};

use crate::error::{Error, IoContext, Result};
use crate::model::{Llama, ModelConfig};
use crate::optim::AdamW;

pub use stagecoach_core::checkpoint::{
    FileEntry, Manifest, CONFIG, FILES, FORMAT, MANIFEST, MODEL, OPTIMIZER,
};

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

/// The model state a checkpoint is taken from: parameters, optimizer, model shape (with the
/// RoPE θ it computes with now).
#[derive(Clone, Copy)]
pub struct State<'a> {
    pub vs: &'a VarStore,
    pub optimizer: &'a AdamW,
    pub config: &'a ModelConfig,
}

/// The state to write: contiguous fp32 CPU copies nothing else refers to, so the trainer can go
/// on while they are written (or, for [`save_sync`], the live tensors themselves).
pub struct Snapshot {
    weights: Vec<(String, Tensor)>,
    moments: Vec<(String, Tensor)>,
    config: String,
    manifest: Manifest,
    /// Fails the write just before the rename (tests of a write that dies half-way).
    #[cfg(test)]
    fail_before_rename: bool,
}

/// How a snapshot holds the state.
enum Hold {
    /// Deep copies into fp32 CPU memory, reusing the buffers of an earlier snapshot of the
    /// same shapes where there are some (on CPU, `to_device`/`to_kind`/`contiguous` may hand back
    /// the same storage, which the next optimizer step would then change).
    Copy(HashMap<String, Tensor>),
    /// The live tensors where they already are fp32 CPU contiguous memory: for a write that ends
    /// before anything changes them ([`save_sync`]).
    Live,
}

impl Hold {
    fn hold(&mut self, name: &str, t: &Tensor) -> Result<Tensor> {
        let spare = match self {
            Hold::Live
                if t.kind() == Kind::Float && t.device() == Device::Cpu && t.is_contiguous() =>
            {
                return Ok(t.detach());
            }
            Hold::Live => None,
            Hold::Copy(spare) => spare.remove(name),
        };
        let mut out = match spare {
            Some(b) if b.size() == t.size() => b,
            _ => Tensor::f_empty(t.size(), (Kind::Float, Device::Cpu))?,
        };
        tch::no_grad(|| out.f_copy_(t))?;
        Ok(out)
    }
}

impl Snapshot {
    /// Copies the state off (what training waits for).
    pub fn take(state: State<'_>, meta: &Meta) -> Result<Snapshot> {
        Snapshot::build(state, meta, Hold::Copy(HashMap::new()))
    }

    fn build(state: State<'_>, meta: &Meta, mut hold: Hold) -> Result<Snapshot> {
        let vars: BTreeMap<String, Tensor> = state.vs.variables().into_iter().collect();
        let weights = vars
            .iter()
            .map(|(name, t)| Ok((name.clone(), hold.hold(name, t)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut moments = Vec::with_capacity(2 * state.optimizer.params().len());
        for p in state.optimizer.params() {
            for (suffix, t) in [("exp_avg", &p.exp_avg), ("exp_avg_sq", &p.exp_avg_sq)] {
                let name = format!("{}.{suffix}", p.name);
                moments.push((name.clone(), hold.hold(&name, t)?));
            }
        }
        moments.sort_by(|a, b| a.0.cmp(&b.0));
        let config =
            serde_json::to_string_pretty(&crate::hf::config_json(state.config, Kind::Float))
                .expect("a JSON value serializes");
        let created_unix_ms = stagecoach_core::clock::now_ms();
        Ok(Snapshot {
            weights,
            moments,
            config,
            manifest: Manifest {
                format: FORMAT.into(),
                job: meta.job.clone(),
                step: meta.step,
                optimizer_steps: state.optimizer.step_count(),
                stage: meta.stage,
                cursors: meta.cursors.clone(),
                stage_taken: meta.stage_taken.clone(),
                parent: meta.parent.clone(),
                generation: meta.generation,
                rope_theta: state.config.rope_theta,
                created_unix_ms,
                files: BTreeMap::new(),
            },
            #[cfg(test)]
            fail_before_rename: false,
        })
    }

    /// Writes the folder `path` atomically (see the module docs); returns the bytes written.
    /// `id` names the temporary folder, with this process's id.
    pub fn write(&self, path: &Path, id: u64) -> Result<u64> {
        let name = path.file_name().ok_or_else(|| {
            Error::checkpoint(
                path,
                "the path names no folder (it ends in `..` or is empty)",
            )
        })?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).at(&parent)?;
        if path.exists() {
            return Err(Error::checkpoint(
                path,
                "already exists; a checkpoint folder is never replaced in place (give the new one another path)",
            ));
        }
        let tmp = parent.join(format!(
            "{}.tmp-{}-{id}",
            name.to_string_lossy(),
            std::process::id()
        ));
        if tmp.exists() {
            // A leftover of an earlier attempt with the same id in this process.
            std::fs::remove_dir_all(&tmp).at(&tmp)?;
        }
        std::fs::create_dir(&tmp).at(&tmp)?;
        let written = self.write_into(&tmp, path, &parent);
        if written.is_err() {
            if let Err(e) = std::fs::remove_dir_all(&tmp) {
                warn!(path = %tmp.display(), error = %e, "cannot remove the temporary folder of a failed checkpoint write");
            }
        }
        written
    }

    fn write_into(&self, tmp: &Path, path: &Path, parent: &Path) -> Result<u64> {
        let mut manifest = self.manifest.clone();
        for name in FILES {
            let file = tmp.join(name);
            let entry = match name {
                MODEL => write_safetensors(&file, &self.weights)?,
                OPTIMIZER => write_safetensors(&file, &self.moments)?,
                _ => write_hashed(&file, |w| w.write_all(self.config.as_bytes()))?,
            };
            manifest.files.insert(name.to_owned(), entry);
        }
        let text = serde_json::to_string_pretty(&manifest).expect("a manifest serializes");
        let manifest_entry = write_hashed(&tmp.join(MANIFEST), |w| w.write_all(text.as_bytes()))?;
        sync_dir(tmp)?;
        #[cfg(test)]
        if self.fail_before_rename {
            return Err(Error::checkpoint(
                path,
                "injected failure before the rename",
            ));
        }
        std::fs::rename(tmp, path).at(path)?;
        sync_dir(parent)?;
        Ok(manifest.files.values().map(|f| f.bytes).sum::<u64>() + manifest_entry.bytes)
    }

    /// The snapshot's buffers, by name, for the next one to copy into.
    fn into_buffers(self) -> HashMap<String, Tensor> {
        self.weights.into_iter().chain(self.moments).collect()
    }
}

/// Counts and hashes what goes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Creates `path`, lets `f` write it, fsyncs it; returns its size and sha256.
fn write_hashed(
    path: &Path,
    f: impl FnOnce(&mut Hashing<BufWriter<std::fs::File>>) -> std::io::Result<()>,
) -> Result<FileEntry> {
    let file = std::fs::File::create(path).at(path)?;
    let mut w = Hashing {
        inner: BufWriter::with_capacity(8 << 20, file),
        hasher: Sha256::new(),
        bytes: 0,
    };
    f(&mut w).at(path)?;
    let Hashing {
        inner,
        hasher,
        bytes,
    } = w;
    let file = inner.into_inner().map_err(|e| e.into_error()).at(path)?;
    file.sync_all().at(path)?;
    Ok(FileEntry {
        bytes,
        sha256: hex(&hasher.finalize()),
    })
}

/// fsyncs a folder, so that the entries created or renamed in it are durable.
fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

/// Writes the snapshot's tensors (fp32 CPU-contiguous) as safetensors, hashing them as they
/// stream into the file.
fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<FileEntry> {
    if let Some((name, _)) = tensors.iter().find(|(_, t)| t.kind() != Kind::Float) {
        return Err(Error::checkpoint(
            path,
            format!("{name} is not an fp32 tensor"),
        ));
    }
    let mut failed = None;
    let entry = write_hashed(path, |w| {
        crate::hf::write_safetensors_to(w, tensors).map_err(|e| match e {
            Error::Io { source, .. } => source,
            e => {
                let io = std::io::Error::other(e.to_string());
                failed = Some(e);
                io
            }
        })
    });
    match failed {
        Some(e) => Err(Error::checkpoint(path, e.to_string())),
        None => entry,
    }
}

/// How a save ended, as `CheckpointSaved` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Saved {
    pub path: PathBuf,
    /// How long the trainer was held (copying the state off and handing it over).
    pub blocking_seconds: f64,
    /// The background write (files, fsyncs, rename, retention).
    pub write_seconds: f64,
    pub bytes: u64,
    /// Why the write failed (earlier checkpoints are untouched).
    pub error: Option<String>,
}

/// Where to write a checkpoint and what to delete once it is in place.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub path: PathBuf,
    /// Names the temporary folder (`SaveCheckpoint.id`).
    pub id: u64,
    /// Checkpoint folders to delete after this one is in place (retention).
    pub delete: Vec<PathBuf>,
}

type Done = Box<dyn FnOnce(Saved) + Send>;

struct Job {
    snapshot: Snapshot,
    request: Request,
    /// The blocking time (f64 bits), final once the hand-over returned, long before the write
    /// ends and reads it.
    blocking: Arc<AtomicU64>,
    done: Done,
}

/// The background half of [`Writer::save`]: one thread that writes checkpoints in the order they
/// were taken. Dropping the writer waits for the writes already handed over.
///
/// The writer keeps the buffers of the last snapshot it wrote and the next snapshot copies
/// into them: copying into memory already mapped takes about half the time of copying into
/// fresh memory (no page faults), at the price of one checkpoint's worth of host memory staying
/// allocated between checkpoints.
pub struct Writer {
    jobs: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    spare: Arc<Mutex<HashMap<String, Tensor>>>,
}

impl Writer {
    pub fn new() -> Result<Writer> {
        // Room for one write waiting behind the one in progress; a third save waits for a slot
        // (and that wait counts as blocking time).
        let (tx, rx) = sync_channel::<Job>(1);
        let spare = Arc::new(Mutex::new(HashMap::new()));
        let returned = spare.clone();
        let thread = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                for job in rx {
                    let Job {
                        snapshot,
                        request,
                        blocking,
                        done,
                    } = job;
                    let t0 = Instant::now();
                    let written = snapshot.write(&request.path, request.id);
                    *returned.lock().expect("not poisoned") = snapshot.into_buffers();
                    if written.is_ok() {
                        retire(&request.path, &request.delete);
                    }
                    let write_seconds = t0.elapsed().as_secs_f64();
                    let blocking_seconds = f64::from_bits(blocking.load(Ordering::Relaxed));
                    let saved = match written {
                        Ok(bytes) => {
                            info!(path = %request.path.display(), bytes, blocking_seconds, write_seconds, "checkpoint written");
                            Saved {
                                path: request.path,
                                blocking_seconds,
                                write_seconds,
                                bytes,
                                error: None,
                            }
                        }
                        Err(e) => {
                            warn!(path = %request.path.display(), error = %e, "checkpoint write failed; earlier checkpoints are untouched");
                            Saved {
                                path: request.path,
                                blocking_seconds,
                                write_seconds,
                                bytes: 0,
                                error: Some(e.to_string()),
                            }
                        }
                    };
                    done(saved);
                }
            })
            .map_err(|e| Error::Config(format!("cannot start the checkpoint writer thread: {e}")))?;
        Ok(Writer {
            jobs: Some(tx),
            thread: Some(thread),
            spare,
        })
    }

    /// Copies `state` off on this thread, hands it to the writer, and returns the seconds that
    /// took (the blocking time). `done` is called from the writer thread when the write ended,
    /// successfully or not; an error here means nothing was handed over.
    pub fn save(
        &self,
        state: State<'_>,
        meta: &Meta,
        request: Request,
        done: impl FnOnce(Saved) + Send + 'static,
    ) -> Result<f64> {
        let t0 = Instant::now();
        // Empty while a write still holds them: then this snapshot copies into fresh memory.
        let spare = std::mem::take(&mut *self.spare.lock().expect("not poisoned"));
        let snapshot = Snapshot::build(state, meta, Hold::Copy(spare))?;
        self.hand_over(snapshot, request, t0, Box::new(done))
    }

    fn hand_over(
        &self,
        snapshot: Snapshot,
        request: Request,
        t0: Instant,
        done: Done,
    ) -> Result<f64> {
        let jobs = self.jobs.as_ref().expect("present until dropped");
        let blocking = Arc::new(AtomicU64::new(t0.elapsed().as_secs_f64().to_bits()));
        let job = Job {
            snapshot,
            request,
            blocking: blocking.clone(),
            done,
        };
        // The send waits when two writes are already pending; that wait is blocking time too.
        jobs.send(job).map_err(|_| {
            Error::Config("the checkpoint writer thread has ended (it panicked?)".into())
        })?;
        let seconds = t0.elapsed().as_secs_f64();
        blocking.store(seconds.to_bits(), Ordering::Relaxed);
        Ok(seconds)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                warn!("the checkpoint writer thread panicked");
            }
        }
    }
}

/// Saves on the calling thread: the same bytes as [`Writer::save`], written straight from the
/// live tensors (no copy where they already are fp32 CPU memory), hashed, fsynced and renamed
/// before it returns; what training would wait for without the background writer.
pub fn save_sync(state: State<'_>, meta: &Meta, request: &Request) -> Result<Saved> {
    let t0 = Instant::now();
    let snapshot = Snapshot::build(state, meta, Hold::Live)?;
    let t1 = Instant::now();
    let bytes = snapshot.write(&request.path, request.id)?;
    drop(snapshot);
    retire(&request.path, &request.delete);
    Ok(Saved {
        path: request.path.clone(),
        blocking_seconds: t0.elapsed().as_secs_f64(),
        write_seconds: t1.elapsed().as_secs_f64(),
        bytes,
        error: None,
    })
}

/// Deletes the checkpoint folders `delete` (retention) once `kept` is in place. Confined: a
/// folder is deleted only if it lies inside the job's checkpoint folder (the parent of `kept`,
/// symbolic links and `..` resolved), is not `kept`, and holds a `manifest.json` of this format;
/// anything else is refused with a warning naming it, and left alone (a coordinator bug, or a
/// job name like `../../x`, must not delete outside the run's checkpoints).
fn retire(kept: &Path, delete: &[PathBuf]) {
    for old in delete {
        match retirable(kept, old) {
            Ok(None) => {}
            Ok(Some(target)) => match std::fs::remove_dir_all(target) {
                Ok(()) => info!(path = %old.display(), "old checkpoint deleted (retention)"),
                Err(e) => {
                    warn!(path = %old.display(), error = %e, "cannot delete an old checkpoint")
                }
            },
            Err(why) => {
                warn!(path = %old.display(), "retention refused to delete {}: {why}; left alone", old.display())
            }
        }
    }
}

/// The folder retention deletes for `old` now that `kept` is written (`old` resolved; none when
/// it is gone already); `Err` says why it must not.
fn retirable(kept: &Path, old: &Path) -> std::result::Result<Option<PathBuf>, String> {
    let parent = match kept.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let root = std::fs::canonicalize(parent).map_err(|e| {
        format!(
            "the checkpoint folder {} cannot be resolved ({e})",
            parent.display()
        )
    })?;
    let kept = std::fs::canonicalize(kept).unwrap_or_else(|_| kept.to_path_buf());
    let target = match std::fs::canonicalize(old) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !old.is_symlink() => return Ok(None),
        Err(e) => return Err(format!("it cannot be resolved ({e})")),
    };
    if target == kept {
        return Err("it is the checkpoint just written".into());
    }
    if target == root || !target.starts_with(&root) {
        return Err(format!(
            "it is not inside the job's checkpoint folder {} (it resolves to {})",
            root.display(),
            target.display()
        ));
    }
    let manifest = target.join(MANIFEST);
    let text = std::fs::read_to_string(&manifest)
        .map_err(|_| "it holds no readable manifest.json: not a checkpoint".to_owned())?;
    Manifest::parse(&text)
        .map_err(|e| format!("its manifest.json is not one of a checkpoint ({e})"))?;
    Ok(Some(target))
}

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
    use crate::collective::Solo;
    use crate::train::{fixtures, Guard, Shape, Trainer};
    use serde_json::Value;

    /// The samples of step `i` of the tests' little run (4 per step over sources "a" and "b").
    fn batch(i: u64) -> Vec<(usize, u64)> {
        let o = (i * 16) % 112;
        vec![(0, o), (0, o + 8), (1, (i * 4) % 16), (1, (i * 4) % 16 + 1)]
    }

    fn train(t: &mut Trainer, steps: std::ops::Range<u64>) -> Vec<f64> {
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

    fn meta(step: u64) -> Meta {
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

    fn expect(m: &Meta, path: &Path) -> v1::CheckpointRef {
        v1::CheckpointRef {
            path: path.display().to_string(),
            step: m.step,
            stage: m.stage,
            cursors: m.cursors.clone(),
        }
    }

    /// Every parameter and moment, by name, deep-copied.
    fn everything(t: &Trainer) -> Vec<(String, Tensor)> {
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

    fn identical(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|((na, ta), (nb, tb))| na == nb && ta.equal(tb))
    }

    fn save(t: &Trainer, m: &Meta, path: &Path) -> Saved {
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
    fn save_async(writer: &Writer, t: &Trainer, m: &Meta, request: Request) -> Saved {
        let (tx, rx) = std::sync::mpsc::channel();
        let blocking = writer
            .save(t.state(), m, request, move |s| tx.send(s).unwrap())
            .unwrap();
        let saved = rx.recv().unwrap();
        assert_eq!(saved.blocking_seconds, blocking);
        saved
    }

    fn sha256_of(path: &Path) -> String {
        hex(&Sha256::digest(std::fs::read(path).unwrap()))
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

    fn copy_folder(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }

    fn edit_manifest(dir: &Path, f: impl FnOnce(&mut Value)) {
        let path = dir.join(MANIFEST);
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&path, v.to_string()).unwrap();
    }

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

    /// Retention deletes only checkpoint folders (a manifest of this format) inside the
    /// checkpoint folder of the one just written; everything else it is given, outside by path,
    /// by `..` or through a symbolic link, is left where it is.
    #[test]
    fn retention_is_confined_to_the_jobs_checkpoint_folder() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("run").join("ckpts");
        let elsewhere = dir.path().join("elsewhere");
        let checkpoint = |path: &Path, format: &str| {
            std::fs::create_dir_all(path).unwrap();
            let m = serde_json::json!({"format": format, "files": {}});
            std::fs::write(path.join(MANIFEST), m.to_string()).unwrap();
        };
        let kept = root.join("step-3");
        checkpoint(&kept, FORMAT);
        let old = root.join("step-1");
        checkpoint(&old, FORMAT);
        let nested = root.join("archive").join("step-0");
        checkpoint(&nested, FORMAT);
        let other_format = root.join("step-2");
        checkpoint(&other_format, "stagecoach-checkpoint/9");
        let plain = root.join("notes");
        std::fs::create_dir_all(&plain).unwrap();
        let outside = elsewhere.join("step-9");
        checkpoint(&outside, FORMAT);
        let link = root.join("link");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let dotdot = root.join("..").join("..").join("elsewhere").join("step-9");
        let parent_itself = root.join(".");

        retire(
            &kept,
            &[
                old.clone(),
                nested.clone(),
                other_format.clone(),
                plain.clone(),
                outside.clone(),
                link.clone(),
                dotdot.clone(),
                parent_itself,
                root.join("gone"),
                root.join(".").join("step-3"),
            ],
        );
        assert!(
            !old.exists() && !nested.exists(),
            "checkpoints inside are retired"
        );
        for (what, p) in [
            ("the checkpoint just written", &kept),
            ("a manifest of another format", &other_format),
            ("a folder without a manifest", &plain),
            ("a checkpoint outside", &outside),
            ("a symbolic link to a checkpoint outside", &link),
            ("the checkpoint folder itself", &root),
        ] {
            assert!(p.exists(), "{what} was deleted");
        }
        assert!(outside.join(MANIFEST).is_file());
        for (kept, p) in [(&kept, &kept), (&kept, &dotdot), (&kept, &link)] {
            assert!(retirable(kept, p).is_err(), "{}", p.display());
        }
        let err = retirable(&kept, &dotdot).unwrap_err();
        assert!(
            err.contains("not inside the job's checkpoint folder"),
            "{err}"
        );
        assert_eq!(retirable(&kept, &root.join("gone")), Ok(None));
    }

    /// A write that dies half-way (a crash leaving a temporary folder, or a failure before the
    /// rename) leaves the previous checkpoint in place and loadable, and retention deletes only
    /// checkpoint folders, only after a successful write.
    #[test]
    fn failed_writes_leave_the_previous_checkpoint_loadable() {
        let dir = tempfile::tempdir().unwrap();
        let spec = fixtures::job(dir.path());
        let mut t = Trainer::new(&spec, Device::Cpu).unwrap();
        train(&mut t, 0..1);
        let root = dir.path().join("ckpts");
        let (first, second) = (root.join("step-1"), root.join("step-2"));
        let m1 = meta(1);
        let writer = Writer::new().unwrap();
        let saved = save_async(
            &writer,
            &t,
            &m1,
            Request {
                path: first.clone(),
                id: 1,
                delete: vec![],
            },
        );
        assert_eq!(saved.error, None);
        let state_at_1 = everything(&t);
        train(&mut t, 1..2);
        let m2 = meta(2);

        // A crash mid-write: a temporary folder holding part of the files.
        let crashed = root.join("step-2.tmp-999-9");
        std::fs::create_dir_all(&crashed).unwrap();
        std::fs::write(crashed.join(MODEL), b"half a file").unwrap();
        let err = read_manifest(&crashed).unwrap_err().to_string();
        assert!(err.contains("no manifest.json"), "{err}");

        // A write that fails before its rename, with the first checkpoint listed for deletion.
        let mut snapshot = Snapshot::take(t.state(), &m2).unwrap();
        snapshot.fail_before_rename = true;
        let (tx, rx) = std::sync::mpsc::channel();
        let request = Request {
            path: second.clone(),
            id: 2,
            delete: vec![first.clone()],
        };
        writer
            .hand_over(
                snapshot,
                request,
                Instant::now(),
                Box::new(move |s| tx.send(s).unwrap()),
            )
            .unwrap();
        let failed = rx.recv().unwrap();
        assert!(
            failed
                .error
                .as_deref()
                .unwrap_or("")
                .contains("injected failure"),
            "{failed:?}"
        );
        assert!(!second.exists());
        let names: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names
                .iter()
                .any(|n| n.contains(&format!(".tmp-{}-", std::process::id()))),
            "the failed write's temporary folder is removed: {names:?}"
        );
        let mut fresh = Trainer::new(&spec, Device::Cpu).unwrap();
        load(&mut fresh, &first, &expect(&m1, &first)).unwrap();
        assert!(identical(&state_at_1, &everything(&fresh)));

        // A folder already at the path is never replaced.
        let taken = root.join("taken");
        std::fs::create_dir_all(&taken).unwrap();
        std::fs::write(taken.join("keep.txt"), b"mine").unwrap();
        let err = save_sync(
            t.state(),
            &m2,
            &Request {
                path: taken.clone(),
                id: 3,
                delete: vec![],
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(std::fs::read(taken.join("keep.txt")).unwrap(), b"mine");

        // Retention after a successful write: the old checkpoint goes; a folder without a
        // manifest, a missing one and the new checkpoint itself stay or are ignored.
        let saved = save_async(
            &writer,
            &t,
            &m2,
            Request {
                path: second.clone(),
                id: 4,
                delete: vec![
                    first.clone(),
                    taken.clone(),
                    root.join("gone"),
                    second.clone(),
                ],
            },
        );
        assert_eq!(saved.error, None);
        assert!(!first.exists());
        assert!(taken.join("keep.txt").exists());
        load(&mut fresh, &second, &expect(&m2, &second)).unwrap();
        assert!(identical(&everything(&t), &everything(&fresh)));
    }
}
