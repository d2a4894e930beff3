//! Writing a checkpoint: the snapshot copied off on the trainer thread, the background writer
//! (temporary folder, fsync, rename, sha256 manifest), and retention.

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
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use tracing::{info, warn};

use super::{FileEntry, Manifest, Meta, FILES, FORMAT, MANIFEST, MODEL, OPTIMIZER};
use crate::error::{Error, IoContext, Result};
use crate::model::ModelConfig;
use crate::optim::AdamW;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::tests::*;
    use crate::checkpoint::{load, read_manifest};
    use crate::train::{fixtures, Trainer};

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
