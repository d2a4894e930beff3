//! The embedded store's segments: memory that stays bounded as the state grows, compaction that
//! writes what changed rather than the whole state, etcd's semantics across flushes, merges and
//! reopens (checked against a model), and what a compaction cut short leaves on disk.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure};
use stagecoach_coordinator::store::embedded::{EmbeddedStore, SEGMENT_EXTENSION, WAL_FILE};
use stagecoach_coordinator::store::{conformance, Compare, Op, StateStore, StoreError, Versioned};
use tempfile::TempDir;

fn segment_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == SEGMENT_EXTENSION) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Waits for the background compaction: [`EmbeddedStore::compact`] does, and then merges too,
/// so tests that look at the tiers themselves reopen instead.
fn reopen(s: EmbeddedStore, dir: &Path, compact_after: u64) -> anyhow::Result<EmbeddedStore> {
    drop(s);
    Ok(EmbeddedStore::open_with(dir, compact_after)?)
}

/// The suite every store passes, with a log so small that nearly every write flushes: values,
/// versions and deletions then live in segments and their merges.
#[tokio::test]
async fn embedded_store_conforms_when_every_write_flushes() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let store = Arc::new(EmbeddedStore::open_with(dir.path(), 1)?);
    conformance::run_all(store.clone()).await;
    let state = store.range("").await?;
    assert!(
        store.stats().segments >= 1 && !segment_files(dir.path())?.is_empty(),
        "{:?}",
        store.stats()
    );
    drop(store);
    let s = EmbeddedStore::open(dir.path())?;
    assert_eq!(s.range("").await?, state, "the same state after reopening");
    Ok(())
}

/// A ledger's shape: one new key per step forever, and a key rewritten every step. The store's
/// memory stays near its flush size while the state grows to many times that; every flush
/// and merge together write a small multiple of the data (a whole-state snapshot per flush
/// writes the state again each time: quadratic); every value reads back, before and after
/// reopening.
#[tokio::test]
async fn embedded_store_memory_is_bounded_and_compaction_incremental() -> anyhow::Result<()> {
    const FLUSH: u64 = 32 << 10;
    const STEPS: u64 = 12_000;
    const PER_COMMIT: u64 = 20;
    let dir = TempDir::new()?;
    let mut s = EmbeddedStore::open_with(dir.path(), FLUSH)?;
    let value = |step: u64| format!("{step:0>200}").into_bytes();
    let step_key = |step: u64| format!("jobs/j/ledger/steps/{step:012}");
    let (mut peak_memory, mut peak_segments, mut data) = (0, 0, 0);
    for first in (0..STEPS).step_by(PER_COMMIT as usize) {
        let mut ops: Vec<Op> = (first..first + PER_COMMIT)
            .map(|step| Op::Put {
                key: step_key(step),
                value: value(step),
            })
            .collect();
        ops.push(Op::Put {
            key: "jobs/j/ledger/last".into(),
            value: first.to_le_bytes().to_vec(),
        });
        data += ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value } => (key.len() + value.len()) as u64,
                Op::Delete { key } => key.len() as u64,
            })
            .sum::<u64>();
        assert!(s.txn(Vec::new(), ops).await?);
        let stats = s.stats();
        peak_memory = peak_memory.max(stats.memory_bytes());
        peak_segments = peak_segments.max(stats.segments);
    }
    // A rewind: the last 1,000 steps deleted.
    for first in (STEPS - 1000..STEPS).step_by(100) {
        let ops = (first..first + 100)
            .map(|step| Op::Delete {
                key: step_key(step),
            })
            .collect();
        assert!(s.txn(Vec::new(), ops).await?);
    }
    let tiers = s.stats();
    // Waits for the background work, then writes every segment into one.
    s.compact().await?;
    let compacted = s.stats();
    println!(
        "{data} bytes written by the caller; peak memory {peak_memory} B, peak segments \
         {peak_segments}; before a full compaction {tiers:?}; after {compacted:?}"
    );
    ensure!(
        data > 40 * FLUSH,
        "the state is many flushes' worth ({data} B)"
    );
    // Two tables of up to twice the flush size each (as log bytes; an entry in memory takes
    // about 1.4 times its log bytes here), and the index.
    ensure!(
        peak_memory < 6 * FLUSH + data / 50,
        "memory {peak_memory} B for {data} B of state: more than two tables and an index"
    );
    ensure!(
        tiers.index_bytes * 40 < tiers.segment_bytes,
        "the index is a small fraction of the segments: {tiers:?}"
    );
    // With f flushes, a binary counter keeps at most about log2(f) + 1 segments.
    let flushes = (data / FLUSH + 1) as f64;
    ensure!(
        (peak_segments as f64) <= flushes.log2() + 3.0,
        "{peak_segments} segments for {flushes} flushes"
    );
    // Each byte is rewritten once per merge level (log2 of the flushes), and once more by the
    // full compaction; a snapshot of the whole state per flush writes about data × flushes / 2.
    ensure!(
        (compacted.written_bytes as f64) < data as f64 * (flushes.log2() + 4.0),
        "compactions wrote {} B for {data} B of writes",
        compacted.written_bytes
    );
    ensure!(
        compacted.written_bytes > data,
        "the counter saw the flushes: {compacted:?}"
    );
    // One segment, without the deletions' tombstones or the overwritten values.
    ensure!(compacted.segments == 1, "{compacted:?}");
    ensure!(
        compacted.segment_bytes < tiers.segment_bytes,
        "{tiers:?} -> {compacted:?}"
    );
    assert_eq!(fs::metadata(dir.path().join(WAL_FILE))?.len(), 0);
    let before_reopen = s.range("").await?;
    s = reopen(s, dir.path(), FLUSH)?;
    assert_eq!(s.range("").await?, before_reopen);

    for step in [0, 1, 4_567, STEPS - 1001] {
        let got = s.get(&step_key(step)).await?.map(|v| v.value);
        assert_eq!(got, Some(value(step)), "step {step}");
    }
    for step in [STEPS - 1000, STEPS - 1] {
        assert_eq!(
            s.get(&step_key(step)).await?,
            None,
            "step {step} was deleted"
        );
    }
    let steps = s.range("jobs/j/ledger/steps/").await?;
    assert_eq!(steps.len() as u64, STEPS - 1000);
    for (i, (key, v)) in steps.iter().enumerate() {
        assert_eq!(*key, step_key(i as u64));
        assert_eq!(v.value, value(i as u64));
        assert_eq!(v.version, 1);
    }
    let last = s
        .get("jobs/j/ledger/last")
        .await?
        .expect("written every commit");
    assert_eq!(last.version, STEPS / PER_COMMIT);

    Ok(())
}

/// A reference for etcd's semantics: the state, and the revision.
#[derive(Default)]
struct Model {
    kvs: BTreeMap<String, Versioned>,
    revision: u64,
}

impl Model {
    fn txn(&mut self, compares: &[Compare], ops: &[Op]) -> bool {
        let holds = compares.iter().all(|c| match c {
            Compare::Version { key, version } => {
                self.kvs.get(key).map_or(0, |v| v.version) == *version
            }
            Compare::Value { key, value } => self.kvs.get(key).is_some_and(|v| v.value == *value),
        });
        if !holds {
            return false;
        }
        let changes = ops.iter().any(|op| match op {
            Op::Put { .. } => true,
            Op::Delete { key } => self.kvs.contains_key(key),
        });
        if changes {
            self.revision += 1;
        }
        for op in ops {
            match op {
                Op::Put { key, value } => {
                    let version = self.kvs.get(key).map_or(0, |v| v.version) + 1;
                    self.kvs.insert(
                        key.clone(),
                        Versioned {
                            value: value.clone(),
                            version,
                            mod_revision: self.revision,
                        },
                    );
                }
                Op::Delete { key } => {
                    self.kvs.remove(key);
                }
            }
        }
        true
    }
}

/// A small deterministic generator (xorshift64*), so a failure names its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// Random puts, deletes and guarded transactions over a few hundred keys, with a log small
/// enough to flush every few writes and reopens at random points: every read agrees with the
/// model, values, versions and revisions alike.
#[tokio::test]
async fn embedded_store_agrees_with_a_model_across_flushes_merges_and_reopens() -> anyhow::Result<()>
{
    for seed in [1u64, 7, 42] {
        let dir = TempDir::new()?;
        let compact_after = 2_000;
        let mut s = EmbeddedStore::open_with(dir.path(), compact_after)?;
        let mut model = Model::default();
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let key = |rng: &mut Rng| format!("k/{:03}", rng.below(300));
        for i in 0..3_000 {
            let ops: Vec<Op> = {
                let mut keys: Vec<String> = (0..=rng.below(4)).map(|_| key(&mut rng)).collect();
                keys.sort();
                keys.dedup();
                keys.into_iter()
                    .map(|key| {
                        if rng.below(4) == 0 {
                            Op::Delete { key }
                        } else {
                            let len = rng.below(120) as usize;
                            Op::Put {
                                key,
                                value: vec![(i % 251) as u8; len],
                            }
                        }
                    })
                    .collect()
            };
            let compares = match rng.below(3) {
                0 => Vec::new(),
                1 => {
                    let key = key(&mut rng);
                    let version = model.kvs.get(&key).map_or(0, |v| v.version) + rng.below(2);
                    vec![Compare::Version { key, version }]
                }
                _ => {
                    let key = key(&mut rng);
                    let value = model
                        .kvs
                        .get(&key)
                        .map(|v| v.value.clone())
                        .unwrap_or_default();
                    vec![Compare::Value { key, value }]
                }
            };
            let want = model.txn(&compares, &ops);
            let got = s.txn(compares, ops).await?;
            ensure!(
                got == want,
                "seed {seed}, write {i}: txn {got}, the model {want}"
            );
            if rng.below(10) == 0 {
                let k = key(&mut rng);
                ensure!(
                    s.get(&k).await? == model.kvs.get(&k).cloned(),
                    "seed {seed}, write {i}: get {k}"
                );
            }
            if rng.below(300) == 0 {
                s = reopen(s, dir.path(), compact_after)?;
            }
            if rng.below(100) == 0 {
                let prefix = format!("k/{}", rng.below(3));
                let want: Vec<_> = model
                    .kvs
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                ensure!(
                    s.range(&prefix).await? == want,
                    "seed {seed}, write {i}: range {prefix}"
                );
            }
        }
        let want: Vec<_> = model.kvs.clone().into_iter().collect();
        ensure!(s.range("").await? == want, "seed {seed}: the whole state");
        assert!(s.stats().segments >= 1, "seed {seed}: {:?}", s.stats());
        let revision = s.put("k/after", Vec::new()).await?;
        ensure!(
            revision == model.revision + 1,
            "seed {seed}: revision {revision}, model {}",
            model.revision
        );
    }
    Ok(())
}

/// What a crash in a compaction leaves: a merge's inputs beside its output (the output, in
/// place, wins and the inputs are deleted), a segment's temporary file (deleted), and damage.
#[tokio::test]
async fn embedded_store_opens_what_a_compaction_cut_short_leaves() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let s = EmbeddedStore::open_with(dir.path(), 1)?;
    for i in 0..40u8 {
        s.put(&format!("k/{}", i % 13), vec![i; 50]).await?;
    }
    s.delete("k/5").await?;
    let want = s.range("").await?;
    let s = reopen(s, dir.path(), 1)?;
    let inputs: Vec<(PathBuf, Vec<u8>)> = segment_files(dir.path())?
        .into_iter()
        .map(|p| fs::read(&p).map(|b| (p, b)))
        .collect::<Result<_, _>>()?;
    ensure!(
        inputs.len() >= 2,
        "several segments to merge: {inputs:?}",
        inputs = inputs.len()
    );
    s.compact().await?;
    drop(s);
    let merged = segment_files(dir.path())?;
    assert_eq!(merged.len(), 1);
    // The merge renamed its output into place, then the crash: the inputs are still there.
    for (path, bytes) in &inputs {
        fs::write(path, bytes)?;
    }
    fs::write(
        dir.path()
            .join("00000000000000000099-00000000000000000099.seg.tmp"),
        b"half",
    )?;
    let s = EmbeddedStore::open(dir.path())?;
    assert_eq!(s.range("").await?, want);
    assert_eq!(
        segment_files(dir.path())?,
        merged,
        "the merge's leftover inputs are gone"
    );
    assert!(
        !fs::read_dir(dir.path())?
            .any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "tmp"))),
        "no temporary file is left"
    );
    drop(s);

    // A flipped byte in a block is named, not read as data.
    let mut bytes = fs::read(&merged[0])?;
    bytes[20] ^= 0x40;
    fs::write(&merged[0], &bytes)?;
    let s = EmbeddedStore::open(dir.path())?;
    let err = match s.range("").await {
        Ok(got) => bail!("a damaged segment was read: {got:?}"),
        Err(e) => e,
    };
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(SEGMENT_EXTENSION), "{err}");
    drop(s);

    // A cut-short segment (its footer gone) is refused at open, naming the file.
    fs::write(&merged[0], &bytes[..bytes.len() - 5])?;
    let err = match EmbeddedStore::open(dir.path()) {
        Ok(_) => bail!("a truncated segment was opened"),
        Err(e) => e,
    };
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(
        err.to_string().contains(&*merged[0].to_string_lossy()),
        "{err}"
    );

    // Two segments that overlap without one covering the other cannot both be right.
    let dir = TempDir::new()?;
    let s = EmbeddedStore::open_with(dir.path(), 1)?;
    for i in 0..3u8 {
        s.put("k", vec![i]).await?;
    }
    drop(s);
    let files = segment_files(dir.path())?;
    let Some(any) = files.first() else {
        bail!("no segment written")
    };
    let bytes = fs::read(any)?;
    for file in &files {
        fs::remove_file(file)?;
    }
    for (lo, hi) in [(1, 2), (2, 3)] {
        fs::write(
            dir.path()
                .join(format!("{lo:020}-{hi:020}.{SEGMENT_EXTENSION}")),
            &bytes,
        )?;
    }
    let err = match EmbeddedStore::open(dir.path()) {
        Ok(_) => bail!("overlapping segments were accepted"),
        Err(e) => e,
    };
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("overlaps"), "{err}");
    Ok(())
}

/// The fault campaign (`scripts/faults.py`) reads a job's embedded store from its files after
/// the coordinator has gone: its reader, in another language, sees what the store holds, across
/// segments, merges, deletions and the log.
#[tokio::test]
async fn the_fault_campaigns_reader_sees_what_the_store_holds() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let s = EmbeddedStore::open_with(dir.path(), 600)?;
    for i in 0..300u32 {
        s.put(
            &format!("jobs/j/k/{:03}", i % 97),
            i.to_le_bytes().repeat(1 + i as usize % 9),
        )
        .await?;
        if i % 11 == 0 {
            s.delete(&format!("jobs/j/k/{:03}", (i * 7) % 97)).await?;
        }
    }
    // Where the writes land depends on how the background compaction keeps pace: write on
    // until, with it finished (closing joins it), the state lies in several segments and the
    // log both, which is what the reader must put together.
    let mut s = s;
    let mut tail = 0u32;
    loop {
        drop(s);
        let spread = segment_files(dir.path())?.len() >= 2
            && fs::metadata(dir.path().join(WAL_FILE))?.len() > 0;
        s = EmbeddedStore::open_with(dir.path(), 600)?;
        if spread {
            break;
        }
        ensure!(tail < 200, "no state spread over segments and the log");
        s.put(&format!("jobs/j/tail/{tail:03}"), vec![7u8; 3])
            .await?;
        tail += 1;
    }
    let want: BTreeMap<String, String> = s
        .range("")
        .await?
        .into_iter()
        .map(|(k, v)| (k, v.value.iter().map(|b| format!("{b:02x}")).collect()))
        .collect();
    drop(s);
    let python = std::env::var("STAGECOACH_PYTHON").unwrap_or_else(|_| "python3".into());
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts");
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(
            "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); \
             import faults; kvs = faults.read_embedded(Path(sys.argv[2]), ''); \
             print(json.dumps({k: v.hex() for k, v in kvs.items()}))",
        )
        .arg(&scripts)
        .arg(dir.path())
        .output()?;
    ensure!(
        out.status.success(),
        "faults.py's reader failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: BTreeMap<String, String> = serde_json::from_slice(&out.stdout)?;
    assert_eq!(got, want);
    Ok(())
}
